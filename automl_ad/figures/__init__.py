"""Figures shared by the search, deployment and reports: the Pareto plot and heatmap overlays (matplotlib/Pillow)."""
