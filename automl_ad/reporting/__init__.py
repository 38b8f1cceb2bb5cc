"""Plots and visual reports: heatmap overlays, benchmark figures."""
