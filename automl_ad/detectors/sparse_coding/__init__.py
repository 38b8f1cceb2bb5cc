"""Sparse-coding route: a dictionary of normal patches; anomalies are coded badly."""
