"""Gaussian model of local filter-bank features (statistical route)."""
