"""Image decomposition route: low-rank background plus sparse anomalies (robust PCA)."""
