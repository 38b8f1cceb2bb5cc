"""Robust PCA: low-rank background plus sparse anomalies per image (image-decomposition route)."""
