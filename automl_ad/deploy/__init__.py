"""Deployment: calibrated thresholds, model packages, prediction."""
