"""The HTML report of a search: profile, recommendation, trials, Pareto front, test-split evaluation."""
