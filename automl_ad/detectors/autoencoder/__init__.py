"""Convolutional autoencoder, reconstruction error as the anomaly map (autoencoder route)."""
