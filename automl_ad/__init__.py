"""automl-ad: pick and tune the right industrial image anomaly-detection method for your data."""

__version__ = "0.1.0"
