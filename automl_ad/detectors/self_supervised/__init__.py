"""Self-supervised route: features adapted by a pretext task on normal images (synthetic anomalies)."""
