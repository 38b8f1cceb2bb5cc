"""Building blocks of detectors' inference graphs (:meth:`Detector.inference_graph`): plain torch modules that
reproduce ``score_samples`` on a preprocessed image batch, so they can be exported (ONNX) and run without automl-ad.

* :class:`Backbone`: normalisation with the weights' mean/std, then the eager timm feature pyramid.
* :class:`GaussianBlur`: scipy's ``gaussian_filter`` (truncate 4, 'reflect' border, optional derivative order)
  as a gather (border) and two 1-D convolutions.
* :class:`UpsampleSmooth`: :func:`~automl_ad.detectors.feature_based.upsample_and_smooth` as a module.
* :class:`PatchEmbedding`: PatchCore's locally aware patch features.
* :class:`MapHead`: image score (map maximum or mean of the top pixels) next to the map.

Then one graph module per exportable family, built by its ``inference_graph``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TRUNCATE = 4.0  # scipy's default: the kernel reaches 4 sigma


class Backbone(nn.Module):
    """Images (N, 3, S, S) in [0, 1] -> the extractor's feature maps (list of NCHW tensors)."""

    def __init__(self, extractor):
        super().__init__()
        self.model, self.channels = on_cpu(extractor.model), tuple(extractor.channels)
        self.register_buffer("mean", torch.tensor(extractor.spec.weights.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(extractor.spec.weights.std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, images):
        return (images - self.mean) / self.std

    def forward(self, images):
        return list(self.model(self.normalise(images)))


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


class UpsampleSmooth(nn.Module):
    """(N, h, w) maps -> (N, size, size): bilinear upsampling, then a Gaussian blur of ``sigma`` (0 = none)."""

    def __init__(self, size: int, sigma: float):
        super().__init__()
        self.size = int(size)
        self.blur = GaussianBlur(sigma, (self.size, self.size)) if sigma > 0 else None

    def forward(self, maps):
        up = upsample(maps[:, None], self.size)
        return (self.blur(up) if self.blur is not None else up)[:, 0]


class MapHead(nn.Module):
    """(N, H, W) maps -> (image scores (N,), maps): the map's maximum, or the mean of its ``top_k`` highest."""

    def __init__(self, top_k: int | None = None):
        super().__init__()
        self.top_k = top_k

    def forward(self, maps):
        flat = maps.flatten(1)
        scores = flat.max(dim=1).values if self.top_k is None else flat.topk(self.top_k, dim=1).values.mean(dim=1)
        return scores, maps


def upsample(maps, size: int):
    """Bilinear resize of NCHW tensors to (size, size), as every family upsamples its maps."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


class PatchEmbedding(nn.Module):
    """PatchCore's locally aware patch features (N, h, w, D) of images: ``neighbourhood`` averages of the backbone's
    maps, coarser maps upsampled to the finest, concatenated, optionally averaged down to ``embedding_dim``."""

    def __init__(self, backbone: Backbone, neighbourhood: int, embedding_dim: int | None):
        super().__init__()
        self.backbone, self.neighbourhood = backbone, int(neighbourhood)
        width = sum(backbone.channels)
        # adaptive 1-D average pooling over channels as a constant matrix (exports to one MatMul)
        self.register_buffer("pool", adaptive_pool_matrix(width, int(embedding_dim))
                             if embedding_dim and embedding_dim != width else None)

    def forward(self, images):
        return patch_embedding(self.backbone(images), self.neighbourhood, self.pool)


def patch_embedding(features: list, neighbourhood: int, pool=None):
    """(N, h, w, D) locally aware patch features of a feature pyramid (NCHW tensors, finest first); ``pool`` is
    an optional (width, D) channel-averaging matrix (:func:`adaptive_pool_matrix`)."""
    pad = neighbourhood // 2
    maps = [F.avg_pool2d(f, neighbourhood, stride=1, padding=pad) for f in features]
    height, width = maps[0].shape[-2:]
    maps = [m if m.shape[-2:] == (height, width) else
            F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in maps]
    embedding = torch.cat(maps, dim=1).permute(0, 2, 3, 1)
    return embedding if pool is None else embedding @ pool


def adaptive_pool_matrix(length: int, size: int):
    """(length, size) matrix whose product averages as ``F.adaptive_avg_pool1d(x, size)``."""
    return F.adaptive_avg_pool1d(torch.eye(length)[:, None], size)[:, 0]


def on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself when it lives on the CPU, else a CPU copy (the detector keeps its own on the GPU)."""
    tensors = [*module.parameters(), *module.buffers()]
    return module if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(module).cpu()


class PatchCoreGraph(nn.Module):
    """PatchCore's scoring: exact nearest neighbours in the bank (a constant) by the squared-norm expansion, as
    faiss' exact index, the re-weighted image score and the smoothed distance map."""

    def __init__(self, embed: PatchEmbedding, bank: np.ndarray, num_neighbors: int, size: int, sigma: float):
        super().__init__()
        self.embed = embed
        self.register_buffer("bank", torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)))
        self.register_buffer("bank_norms", self.bank.pow(2).sum(dim=1))
        self.k = min(int(num_neighbors), len(bank)) if num_neighbors > 1 and len(bank) > 1 else 1
        self.smooth = UpsampleSmooth(size, sigma)

    def _squared_distances(self, queries):
        """(..., D) queries -> (..., M) squared L2 distances to every bank feature."""
        return queries.pow(2).sum(dim=-1, keepdim=True) - 2 * queries @ self.bank.T + self.bank_norms

    def forward(self, images):
        embedding = self.embed(images)
        _, h, w, d = embedding.shape
        queries = embedding.reshape(-1, h * w, d)
        squared, nearest = self._squared_distances(queries).min(dim=-1)
        distances = squared.clamp(min=0).sqrt()  # (N, h*w)
        worst = distances.argmax(dim=1, keepdim=True)
        star = distances.gather(1, worst)[:, 0]
        scores = star if self.k == 1 else self._reweight(queries, star, nearest.gather(1, worst)[:, 0], worst)
        return scores, self.smooth(distances.reshape(-1, h, w))

    def _reweight(self, queries, star, star_bank, worst):
        """s* x (1 - softmax weight of m* among its ``k`` bank neighbours), as PatchCore's image score."""
        bank_point = self.bank[star_bank]  # m*, (N, D)
        support = self._squared_distances(bank_point).topk(self.k, dim=1, largest=False).indices  # m* first
        test_point = queries.gather(1, worst[:, :, None].expand(-1, -1, queries.shape[-1]))  # (N, 1, D)
        support_distances = (self.bank[support] - test_point).pow(2).sum(dim=2).sqrt()
        support_distances = torch.cat([star[:, None], support_distances[:, 1:]], dim=1)
        return (1 - support_distances.softmax(dim=1)[:, 0]) * star


class PadimGraph(nn.Module):
    """PaDiM's scoring: the selected channels on the finest grid, Mahalanobis distance with the stored inverse
    covariances (constants), the smoothed map and its maximum."""

    def __init__(self, backbone: Backbone, channels: np.ndarray, widths: list[int], grid: tuple[int, int],
                 mean: np.ndarray, inv_covariance: np.ndarray, size: int, sigma: float):
        super().__init__()
        self.backbone, self.grid = backbone, tuple(int(g) for g in grid)
        offsets = np.cumsum([0, *widths])
        self.levels = []
        for level in range(len(widths)):
            local = channels[(channels >= offsets[level]) & (channels < offsets[level + 1])] - offsets[level]
            if len(local):
                self.register_buffer(f"channels{level}", torch.from_numpy(local.astype(np.int64)))
                self.levels.append(level)
        self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)))
        self.register_buffer("inv_covariance", torch.from_numpy(np.ascontiguousarray(inv_covariance,
                                                                                      dtype=np.float32)))
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, images):
        features = self.backbone(images)
        maps = []
        for level in self.levels:
            selected = features[level].index_select(1, getattr(self, f"channels{level}"))
            if tuple(selected.shape[-2:]) != self.grid:
                selected = F.interpolate(selected, size=self.grid, mode="nearest")
            maps.append(selected)
        embedding = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)  # (N, P, D)
        delta = (embedding - self.mean).transpose(0, 1)  # (P, N, D)
        squared = ((delta @ self.inv_covariance) * delta).sum(dim=2)  # (P, N)
        distances = squared.clamp(min=0).sqrt().transpose(0, 1).reshape(-1, *self.grid)
        return self.head(self.smooth(distances))


class PatchScoreGraph(nn.Module):
    """Families scoring each locally aware patch feature with a network (Deep SVDD, SimpleNet): ``patch_score``
    maps (P, D) patches to (P,) scores; the map is their grid upsampled and smoothed, the image score its max."""

    def __init__(self, embed: PatchEmbedding, patch_score: nn.Module, size: int, sigma: float):
        super().__init__()
        self.embed, self.patch_score = embed, patch_score
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, images):
        embedding = self.embed(images)
        _, h, w, d = embedding.shape
        return self.head(self.smooth(self.patch_score(embedding.reshape(-1, d)).reshape(-1, h, w)))


class SvddDistance(nn.Module):
    """Deep SVDD's patch score: ||phi(x) - c||^2 - ``offset`` (R^2 for the soft-boundary objective)."""

    def __init__(self, network: nn.Module, centre, offset: float):
        super().__init__()
        self.network, self.offset = on_cpu(network), float(offset)
        self.register_buffer("centre", centre.detach().cpu().float())

    def forward(self, patches):
        return (self.network(patches) - self.centre).pow(2).sum(dim=1) - self.offset


class NegatedDiscriminator(nn.Module):
    """SimpleNet's patch score: -D(adaptor(x))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = on_cpu(model)

    def forward(self, patches):
        return -self.model["discriminator"](self.model["adaptor"](patches))[:, 0]


class STPMGraph(nn.Module):
    """STPM's scoring: teacher and student on the normalised images, per-stage normalised feature distances
    upsampled and combined (product or sum), optionally smoothed; image score = the map's maximum."""

    def __init__(self, teacher: Backbone, student: nn.Module, size: int, combination: str, sigma: float):
        super().__init__()
        self.teacher, self.student, self.size = teacher, on_cpu(student), int(size)
        self.product = combination == "product"
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, images):
        from automl_ad.detectors.stpm.detector import feature_distances

        normalised = self.teacher.normalise(images)
        combined = None
        for t, s in zip(self.teacher.model(normalised), self.student(normalised)):
            level = upsample(feature_distances(t, s)[:, None], self.size)
            combined = level if combined is None else combined * level if self.product else combined + level
        return self.head(self.smooth(combined[:, 0]))


class FastFlowGraph(nn.Module):
    """FastFlow's scoring: flows on the backbone's stages, 1 - mean over stages of the upsampled likelihood
    exp(-0.5 mean_c z^2), optionally smoothed; image score = the map's maximum."""

    def __init__(self, backbone: Backbone, model: nn.Module, size: int, sigma: float):
        super().__init__()
        self.backbone, self.model, self.size = backbone, on_cpu(model), int(size)
        self.smooth, self.head = UpsampleSmooth(size, sigma), MapHead()

    def forward(self, images):
        from automl_ad.detectors.fastflow.detector import _forward

        stages = _forward(self.model, self.backbone(images))
        likelihood = sum(upsample(torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True)), self.size)
                         for z, _ in stages)
        return self.head(self.smooth(1 - likelihood[:, 0] / len(stages)))


class AutoencoderGraph(nn.Module):
    """The autoencoder's scoring: reconstruction error map (squared error summed over channels, or 1 - SSIM
    averaged over channels), Gaussian-smoothed, reduced to the image score by ``head``."""

    def __init__(self, model: nn.Module, metric: str, size: int, sigma: float, head: MapHead):
        super().__init__()
        from automl_ad.detectors.autoencoder.detector import ssim_window

        self.model, self.metric = on_cpu(model), metric
        channels = next(self.model.parameters()).shape[1]  # the first convolution's input channels
        self.register_buffer("window", ssim_window(channels).float().contiguous() if metric == "ssim" else None)
        self.blur = GaussianBlur(sigma, (size, size)) if sigma > 0 else None
        self.head = head

    def forward(self, images):
        from automl_ad.detectors.autoencoder.detector import ssim_map

        reconstruction = self.model(images)
        if self.metric == "l2":
            maps = (images - reconstruction).pow(2).sum(dim=1, keepdim=True)
        else:
            maps = (1 - ssim_map(reconstruction, images, window=self.window)).mean(dim=1, keepdim=True)
        return self.head((self.blur(maps) if self.blur is not None else maps)[:, 0])


class GanomalyGraph(nn.Module):
    """GANomaly's scoring: images mapped to [-1, 1], the generator's reconstruction; map = smoothed mean
    absolute residual / 2, image score = the latent distance or the map's maximum."""

    def __init__(self, generator: nn.Module, size: int, sigma: float, latent_score: bool):
        super().__init__()
        self.generator, self.latent_score = on_cpu(generator), latent_score
        self.blur = GaussianBlur(sigma, (size, size)) if sigma > 0 else None
        self.head = MapHead()

    def forward(self, images):
        inputs = images * 2 - 1
        fake, latent_in, latent_out = self.generator(inputs)
        maps = (inputs - fake).abs().mean(dim=1, keepdim=True) / 2
        maps = (self.blur(maps) if self.blur is not None else maps)[:, 0]
        if self.latent_score:
            return (latent_in - latent_out).pow(2).flatten(1).mean(dim=1), maps
        return self.head(maps)


class GaussianGraph(nn.Module):
    """The statistical route's scoring on luma images (N, 1, S, S): per scale the local mean, local standard
    deviation and scale-normalised Gaussian derivatives, the Mahalanobis distance to the normal model (one per
    position or shared), smoothed; image score = the map's maximum."""

    #: (derivative order per axis, power of sigma) of each filter after the local mean, in the family's order
    DERIVATIVES = (((0, 1), 1), ((1, 0), 1), ((0, 2), 2), ((2, 0), 2), ((1, 1), 2))

    def __init__(self, scales, size: int, location: np.ndarray, precision: np.ndarray, per_position: bool,
                 sigma: float):
        super().__init__()
        shape = (int(size), int(size))
        self.scales = [float(s) for s in scales]
        self.means = nn.ModuleList(GaussianBlur(s, shape) for s in self.scales)
        self.derivatives = nn.ModuleList(GaussianBlur(s, shape, order) for s in self.scales
                                         for order, _ in self.DERIVATIVES)
        self.per_position = per_position
        self.register_buffer("location", torch.from_numpy(np.ascontiguousarray(location, dtype=np.float32)))
        self.register_buffer("precision", torch.from_numpy(np.ascontiguousarray(precision, dtype=np.float32)))
        self.blur = GaussianBlur(sigma, shape) if sigma > 0 else None
        self.head = MapHead()

    def forward(self, images):
        channels = []
        for index, (sigma, mean_filter) in enumerate(zip(self.scales, self.means)):
            mean = mean_filter(images)
            channels += [mean, (mean_filter(images * images) - mean * mean).clamp(min=0).sqrt()]
            filters = self.derivatives[index * len(self.DERIVATIVES):(index + 1) * len(self.DERIVATIVES)]
            channels += [sigma ** power * blur(images) for blur, (_, power) in zip(filters, self.DERIVATIVES)]
        centred = torch.cat(channels, dim=1).permute(0, 2, 3, 1) - self.location  # (N, H, W, D)
        if self.per_position:
            projected = (centred[..., None, :] @ self.precision)[..., 0, :]
        else:
            projected = centred @ self.precision
        distance = (projected * centred).sum(dim=-1).clamp(min=0).sqrt()[:, None]
        return self.head((self.blur(distance) if self.blur is not None else distance)[:, 0])
