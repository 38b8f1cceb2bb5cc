"""Shared pieces for the generative families that train their own networks on pixels (autoencoder, GANomaly,
diffusion): image tensors, seeded mini-batches, map smoothing and reduction to image scores.
"""

from __future__ import annotations

import numpy as np

from automl_ad.data.imageset import ImageSet

IMAGE_SCORES = ("max", "top_k_mean")


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


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of ``sigma`` pixels over each (H, W) map of an (N, H, W) stack (0 = unchanged)."""
    from scipy import ndimage

    maps = np.asarray(maps, dtype=np.float32)
    if sigma > 0:
        maps = ndimage.gaussian_filter(maps, sigma=(0, sigma, sigma), truncate=4.0)
    return maps.astype(np.float32)


def reduce_maps(maps: np.ndarray, how: str, top_k_fraction: float) -> np.ndarray:
    """Image scores from (N, H, W) maps: the maximum, or the mean of the ``top_k_fraction`` highest pixels."""
    flat = maps.reshape(len(maps), -1)
    if how == "max":
        return flat.max(axis=1)
    k = max(1, int(round(top_k_fraction * flat.shape[1])))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def module_tensors(module, prefix: str = "") -> dict[str, np.ndarray]:
    """A module's state_dict as numpy arrays (for safetensors), keys prefixed."""
    return {prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_module_tensors(module, tensors: dict[str, np.ndarray], prefix: str = "") -> None:
    """Load the ``prefix``-ed arrays of ``tensors`` into ``module`` (strict)."""
    import torch

    device = next(module.parameters()).device
    module.load_state_dict({k[len(prefix):]: torch.from_numpy(v).to(device) for k, v in tensors.items()
                            if k.startswith(prefix)})
