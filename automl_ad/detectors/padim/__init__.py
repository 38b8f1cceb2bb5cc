"""PaDiM: per-position Gaussians of patch embeddings, Mahalanobis distance (distribution-map route)."""
