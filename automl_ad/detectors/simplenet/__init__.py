"""SimpleNet: a discriminator separating adapted patch features from noisy ones (self-supervised route)."""
