"""CutPaste: a CNN fine-tuned to recognise pasted patches; Gaussian density of its embeddings (self-supervised
route)."""
