"""GANomaly: adversarially trained encoder-decoder-encoder (GAN route)."""
