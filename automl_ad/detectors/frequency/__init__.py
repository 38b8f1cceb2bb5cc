"""Frequency-domain analysis: periodic texture background removed in the Fourier domain (frequency-domain route)."""
