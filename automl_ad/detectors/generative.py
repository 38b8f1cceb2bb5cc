"""Shared pieces for the generative families that train their own networks on pixels (autoencoder, GANomaly,
diffusion): image tensors, seeded mini-batches, augmentation and module weights as arrays.
"""

from __future__ import annotations

import numpy as np

from automl_ad.data.imageset import ImageSet


def image_tensor(images: ImageSet, size: int, gray: bool, device: str):
    """Images as a float32 NCHW tensor in [0, 1] on ``device`` (1 channel when ``gray`` else 3)."""
    import torch

    pixels = images.load(size, gray=gray)
    pixels = pixels[:, None] if gray else pixels.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(device)


def epoch_batches(count: int, batch_size: int, generator):
    """Index tensors of one shuffled pass over ``count`` items (the last batch may be smaller)."""
    import torch

    order = torch.randperm(count, generator=generator)
    return [order[start:start + batch_size] for start in range(0, count, batch_size)]


def random_flips(batch, generator):
    """Each image flipped horizontally and/or vertically with probability 0.5 (light augmentation)."""
    import torch

    flip = torch.rand(2, len(batch), generator=generator) < 0.5
    batch = batch.clone()
    batch[flip[0]] = batch[flip[0]].flip(-1)
    batch[flip[1]] = batch[flip[1]].flip(-2)
    return batch


def module_tensors(module, prefix: str = "") -> dict[str, np.ndarray]:
    """A module's state_dict as numpy arrays (for safetensors), keys prefixed."""
    return {prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_module_tensors(module, tensors: dict[str, np.ndarray], prefix: str = "") -> None:
    """Load the ``prefix``-ed arrays of ``tensors`` into ``module`` (strict)."""
    import torch

    device = next(module.parameters()).device
    module.load_state_dict({k[len(prefix):]: torch.from_numpy(v).to(device) for k, v in tensors.items()
                            if k.startswith(prefix)})
