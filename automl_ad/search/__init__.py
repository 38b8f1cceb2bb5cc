"""The search: search spaces, validation data, the trial runner, the Ray Tune engine and its live view."""
