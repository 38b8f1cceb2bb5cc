"""The search: what it is asked (request), what runs next (proposer, cost predictor, spaces), how trials run (Ray
runtime, trial processes), one search from start to end (engine, resume), its validation data and its live view."""
