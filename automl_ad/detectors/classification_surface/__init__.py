"""Classification-surface route: a one-class boundary around normal images (OC-SVM / SVDD)."""
