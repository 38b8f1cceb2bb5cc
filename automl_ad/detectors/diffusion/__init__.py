"""Denoising diffusion reconstruction, DDAD-style (diffusion route)."""
