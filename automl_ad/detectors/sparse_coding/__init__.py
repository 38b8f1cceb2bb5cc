"""Sparse coding: patches coded over a dictionary of normal patches (sparse-coding route)."""
