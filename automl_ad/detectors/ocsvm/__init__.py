"""One-class SVM on pooled backbone features (classification-surface route)."""
