"""Experiment tracking (MLflow): searches, trials, Pareto fronts."""
