"""STPM's scoring head: the student on the normalised images beside the teacher's feature maps, per-stage
normalised feature distances upsampled and combined (product or sum), optionally smoothed; image score = the
map's maximum."""

from __future__ import annotations

from torch import nn

from automl_ad.detectors.blocks import MapHead, Normalise, UpsampleSmooth


def feature_distances(teacher, student):
    """Per-position 0.5 * squared distance of channel-L2-normalised features (as ``F.normalize``: norms below
    1e-12 count as 1e-12): (N, C, h, w) pairs -> (N, h, w). Expanded as 0.5 (|t|² / a² + |s|² / b²) - t·s / (a b)
    with a, b the clamped norms: three channel sums and no normalised copies of the feature maps (rounding leaves
    about 3e-7 on nearly equal features, against 1e-11; clamped at 0)."""
    tt, ss, ts = (teacher * teacher).sum(dim=1), (student * student).sum(dim=1), (teacher * student).sum(dim=1)
    a, b = tt.sqrt().clamp(min=1e-12), ss.sqrt().clamp(min=1e-12)
    return (0.5 * (tt / (a * a) + ss / (b * b)) - ts / (a * b)).clamp(min=0)


class STPMStudent(nn.Module):
    """Images -> the student's feature maps (on the images normalised as the teacher's)."""

    def __init__(self, normalise: Normalise, student: nn.Module):
        super().__init__()
        self.normalise, self.student = normalise, student

    def forward(self, images):
        return list(self.student(self.normalise(images)))


class STPMMaps(nn.Module):
    """(*teacher feature maps, *student feature maps) -> (image scores, maps)."""

    def __init__(self, size: int, combination: str, sigma: float):
        super().__init__()
        self.size, self.product = int(size), combination == "product"
        # each level's map upsampled as two small products (exactly bilinear; faster than a resize)
        self.upsample, self.smooth, self.head = UpsampleSmooth(size, 0.0), UpsampleSmooth(size, sigma), MapHead()

    def forward(self, *features):
        levels = len(features) // 2
        combined = None
        for t, s in zip(features[:levels], features[levels:]):
            level = self.upsample(feature_distances(t, s))
            combined = level if combined is None else combined * level if self.product else combined + level
        return self.head(self.smooth(combined))


class STPMHead(nn.Module):
    """(images, *teacher feature maps) -> (image scores, maps): the student beside the teacher, then the maps."""

    def __init__(self, normalise: Normalise, student: nn.Module, size: int, combination: str, sigma: float):
        super().__init__()
        self.network, self.maps = STPMStudent(normalise, student), STPMMaps(size, combination, sigma)

    def forward(self, images, *teacher):
        return self.maps(*teacher, *self.network(images))
