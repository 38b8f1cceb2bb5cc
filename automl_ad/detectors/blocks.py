"""Shared building blocks of the detectors' inference graphs (plain torch modules, exportable to ONNX).

* :class:`Normalise` and :class:`Backbone`: the weights' mean/std normalisation, then the timm feature pyramid;
  :class:`FeatureGraph` puts a backbone family's head on top of it (the whole inference, images to scores).
* :class:`GaussianBlur`: scipy's ``gaussian_filter`` (truncate 4, 'reflect' border, optional derivative order)
  as a gather (border) and two 1-D convolutions; :class:`UpsampleSmooth`: bilinear upsampling, then that blur
  (one matrix per axis).
* :class:`MapHead`: image score (map maximum or mean of the top pixels) next to the map.
* :class:`PatchEmbedding`: locally aware patch features (PatchCore's, also read by Deep SVDD and SimpleNet), and
  :class:`PatchScoreHead`, which maps each such patch to a score with a network.
* :func:`ssim_map`: structural similarity (Wang et al. 2004) as a differentiable map.

No block knows a family: each family's own graph lives in ``<family>/graph.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRUNCATE = 4.0  # scipy's default: the kernel reaches 4 sigma
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


# --- backbone ---------------------------------------------------------------------------------------------------
class Normalise(nn.Module):
    """Images (N, 3, S, S) in [0, 1] -> normalised with the backbone weights' mean and std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images):
        return (images - self.mean) / self.std


class Backbone(nn.Module):
    """Images (N, 3, S, S) in [0, 1] -> the extractor's feature maps (list of NCHW tensors)."""

    def __init__(self, extractor):
        super().__init__()
        self.model = extractor.model
        self.normalise = Normalise(extractor.spec.weights.mean, extractor.spec.weights.std)

    def forward(self, images):
        return list(self.model(self.normalise(images)))


class FeatureGraph(nn.Module):
    """A backbone family's whole inference: images -> backbone feature maps -> the family's head ->
    (image scores, maps). ``with_images``: the head reads the images too, before the feature maps."""

    def __init__(self, backbone: Backbone, head: nn.Module, with_images: bool = False):
        super().__init__()
        self.backbone, self.head, self.with_images = backbone, head, with_images

    def forward(self, images):
        features = self.backbone(images)
        return self.head(images, *features) if self.with_images else self.head(*features)


# --- maps -------------------------------------------------------------------------------------------------------
class GaussianBlur(nn.Module):
    """``scipy.ndimage.gaussian_filter(maps, (0, sigma, sigma), order=(0, *order), truncate=4)`` on (N, C, H, W)
    tensors of a fixed (H, W): the border is mirrored as scipy's 'reflect' mode (a constant gather)."""

    def __init__(self, sigma: float, size: tuple[int, int], order: tuple[int, int] = (0, 0)):
        super().__init__()
        from scipy import ndimage

        radius = int(TRUNCATE * float(sigma) + 0.5)
        impulse = np.zeros(2 * radius + 1)
        impulse[radius] = 1.0
        for axis, (length, derivative) in enumerate(zip(size, order)):
            # filtering an impulse gives the kernel mirrored; conv2d correlates, so mirror it back
            kernel = ndimage.gaussian_filter1d(impulse, sigma, order=derivative, mode="constant",
                                               truncate=TRUNCATE)[::-1].copy()
            shape = (1, 1, -1, 1) if axis == 0 else (1, 1, 1, -1)
            self.register_buffer(f"kernel{axis}", torch.tensor(kernel, dtype=torch.float32).view(shape))
            index = np.pad(np.arange(length), radius, mode="symmetric")
            self.register_buffer(f"index{axis}", torch.from_numpy(index.astype(np.int64)))

    def forward(self, maps):
        n, c, h, w = maps.shape
        flat = maps.reshape(-1, 1, h, w)
        flat = F.conv2d(flat.index_select(2, self.index0), self.kernel0)
        flat = F.conv2d(flat.index_select(3, self.index1), self.kernel1)
        return flat.reshape(n, c, h, w)


def blur(sigma: float, size: int) -> nn.Module:
    """A :class:`GaussianBlur` of ``sigma`` for (N, C, size, size) maps; the identity for sigma 0."""
    return GaussianBlur(sigma, (int(size), int(size))) if sigma > 0 else nn.Identity()


class UpsampleSmooth(nn.Module):
    """(N, h, w) maps -> (N, size, size): bilinear upsampling, then a Gaussian blur of ``sigma`` (0 = none; as
    :class:`GaussianBlur`). Both are linear and separable, so together they are one matrix per axis, applied as
    ``rows @ map @ columns.T``: two small matrix products instead of a resize, a border gather and two 1-D
    convolutions over the full-size map (measured in PatchCore's graph at 256 px: 1.8 -> 0.1 ms per image)."""

    def __init__(self, size: int, sigma: float):
        super().__init__()
        self.size, self.sigma = int(size), float(sigma)
        # (h, w, device, dtype) -> (rows, columns), built on first use (constants in an exported graph)
        self._operators: dict = {}

    def forward(self, maps):
        h, w = maps.shape[-2:]
        if self.sigma == 0 and (int(h), int(w)) == (self.size, self.size):
            return maps  # the operators would be identities (two full-size products: 0.55 ms at 256 px)
        key = (int(h), int(w), maps.device, maps.dtype)
        if key not in self._operators:
            self._operators[key] = tuple(torch.from_numpy(upsample_smooth_operator(n, self.size, self.sigma))
                                         .to(maps.device, maps.dtype) for n in (int(h), int(w)))
        rows, columns = self._operators[key]
        return rows @ maps @ columns.T


def upsample_smooth_operator(length: int, size: int, sigma: float) -> np.ndarray:
    """(size, length) float32 matrix: bilinear resampling of a ``length`` axis to ``size`` (as ``F.interpolate``
    without aligned corners), then scipy's 1-D Gaussian of ``sigma`` with its 'reflect' border (none for sigma 0)."""
    from scipy import ndimage

    basis = torch.eye(length, dtype=torch.float64).reshape(length, 1, length, 1)
    resample = F.interpolate(basis, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.numpy()
    if sigma > 0:
        resample = ndimage.gaussian_filter1d(resample, sigma, axis=0, mode="reflect", truncate=TRUNCATE)
    return np.ascontiguousarray(resample, dtype=np.float32)


class MapHead(nn.Module):
    """(N, H, W) maps -> (image scores (N,), maps): the map's maximum, or the mean of its ``top_k`` highest."""

    def __init__(self, top_k: int | None = None):
        super().__init__()
        self.top_k = top_k

    def forward(self, maps):
        flat = maps.flatten(1)
        scores = flat.max(dim=1).values if self.top_k is None else flat.topk(self.top_k, dim=1).values.mean(dim=1)
        return scores, maps


def upsample_and_smooth(maps: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """:class:`UpsampleSmooth` on a numpy stack (N, h, w) -> (N, size, size), for families without a graph."""
    with torch.inference_mode():
        return UpsampleSmooth(size, sigma)(torch.from_numpy(np.ascontiguousarray(maps, np.float32))).numpy()


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of ``sigma`` pixels over each (H, W) map of a numpy stack (N, H, W) (0 = unchanged)."""
    maps = np.ascontiguousarray(maps, np.float32)
    if sigma <= 0:
        return maps
    with torch.inference_mode():
        return GaussianBlur(sigma, maps.shape[1:])(torch.from_numpy(maps)[:, None])[:, 0].numpy()


# --- patch features ---------------------------------------------------------------------------------------------
class PatchEmbedding(nn.Module):
    """Locally aware patch features (N, h, w, D) of a feature pyramid (NCHW maps, finest first, ``width`` channels
    in all): ``neighbourhood`` averages of each map (zero padding counts at the border), coarser maps upsampled
    (bilinear) to the finest, concatenated, optionally averaged down to ``embedding_dim`` channels."""

    def __init__(self, width: int, neighbourhood: int, embedding_dim: int | None):
        super().__init__()
        self.neighbourhood = int(neighbourhood)
        # adaptive 1-D average pooling over channels as a constant matrix (exports to one MatMul)
        self.register_buffer("pool", adaptive_pool_matrix(int(width), int(embedding_dim))
                             if embedding_dim and embedding_dim != width else None)

    def forward(self, *features):
        pad = self.neighbourhood // 2
        maps = [F.avg_pool2d(f, self.neighbourhood, stride=1, padding=pad) for f in features]
        height, width = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == (height, width) else
                F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in maps]
        embedding = torch.cat(maps, dim=1).permute(0, 2, 3, 1)
        return embedding if self.pool is None else embedding @ self.pool

    def of(self, features: list[np.ndarray]):
        """The embedding of numpy feature maps, as a contiguous CPU tensor (fit and training read it)."""
        with torch.no_grad():
            return self(*[torch.from_numpy(f) for f in features]).contiguous()


def adaptive_pool_matrix(length: int, size: int):
    """(length, size) matrix whose product averages as ``F.adaptive_avg_pool1d(x, size)``."""
    return F.adaptive_avg_pool1d(torch.eye(length)[:, None], size)[:, 0]


class PatchScoreHead(nn.Module):
    """Feature maps -> (image scores, maps) for families scoring each locally aware patch feature with a network
    (Deep SVDD, SimpleNet): ``patch_score`` maps (P, D) patches to (P,) scores; the map is their grid upsampled
    and smoothed, the image score its maximum."""

    def __init__(self, embed: PatchEmbedding, patch_score: nn.Module, size: int, sigma: float):
        super().__init__()
        self.embed, self.patch_score = embed, patch_score
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, *features):
        embedding = self.embed(*features)
        _, h, w, d = embedding.shape
        return self.head(self.smooth(self.patch_score(embedding.reshape(-1, d)).reshape(-1, h, w)))


# --- structural similarity --------------------------------------------------------------------------------------
def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA):
    """A normalised 2-D Gaussian window (torch, float64)."""
    coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-coordinates ** 2 / (2 * sigma ** 2))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def ssim_window(channels: int):
    """:func:`gaussian_window` as a depthwise filter (C, 1, 11, 11) for :func:`ssim_map`."""
    return gaussian_window()[None, None].expand(channels, 1, -1, -1)


def ssim_map(x, y, data_range: float = 1.0, same_size: bool = True, window=None):
    """Per-channel SSIM map of NCHW tensors (Wang et al. 2004: Gaussian window 11 px, sigma 1.5, K1 0.01,
    K2 0.03, population covariances as scikit-image's default). ``same_size`` pads by reflection so the map
    has the input's size; otherwise only fully covered ('valid') positions are returned. Differentiable.
    ``window``: the (C, 1, 11, 11) filter of :func:`ssim_window`, when it is made beforehand (graph export)."""
    channels = x.shape[1]
    window = ssim_window(channels).to(x) if window is None else window
    if same_size:
        pad = SSIM_WINDOW // 2
        x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    local_mean = lambda t: F.conv2d(t, window, groups=channels)  # noqa: E731
    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


# --- devices ----------------------------------------------------------------------------------------------------
def on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself when it lives on the CPU, else a CPU copy (the detector keeps its own on the GPU)."""
    return module if all(t.device.type == "cpu" for t in tensors_of(module)) else copy.deepcopy(module).cpu()


def tensors_of(module: nn.Module) -> list:
    """Every parameter and buffer of ``module`` (each once)."""
    return [*module.parameters(), *module.buffers()]
