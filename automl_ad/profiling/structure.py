"""Structure statistics of normal images: texture vs object, periodicity, alignment to a common template.

All functions take a stack of gray images ``(N, H, W)`` as float32 at one working size. The profile analyses images
at their native aspect ratio (short side at the working resolution), not squashed to a square: squashing a 16:1
fabric to a square averages its weave away along the long side and leaves only what every image shares (fixed
illumination or sensor stripes), which reads as an aligned object.

* **Aligned detail** — z-score each image's high-pass detail and average across images: structure that sits at
  the same place in every image (an object's edges) survives, texture detail at random phase cancels. The
  variance of that mean (0..1) is the share of detail that is common to all images.
* **Background share** — an object usually sits on a plain background: the largest region of low-detail blocks
  that touches the image border. A texture has detail everywhere, or only small flat patches. This catches
  objects that are not aligned (rotated or shifted parts).
* **Periodicity** — the highest autocorrelation of the detail image outside its central lobe: repeated
  patterns (brick, woven fabric) give strong secondary peaks; stochastic textures and objects do not.
* **Alignment** — normalised cross-correlation of each image's detail to the median template, before and after
  translation registration (phase correlation); the shift tells how far parts move between images.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

#: Decision thresholds (object evidence is the larger of the two ratios to its threshold).
ALIGNED_DETAIL_OBJECT = 0.25
BACKGROUND_SHARE_OBJECT = 0.22
PERIODICITY_PERIODIC = 0.3
ALIGNMENT_TEMPLATE_VIABLE = 0.6
ALIGNMENT_PER_POSITION_VIABLE = 0.5

_DETAIL_SIGMA = 2.0
_BLOCKS = 16
_LOW_ENERGY = 0.2
_AUTOCORR_LOBE = 0.2


@dataclass(frozen=True)
class StructureStats:
    """Texture/object evidence and the resulting decision."""

    kind: str  # "texture" or "object"
    confidence: float  # 0.5 (undecided) .. 1.0
    aligned_detail: float
    background_share: float
    periodicity: float
    periodic: bool  # a texture whose pattern repeats (never set for objects)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AlignmentStats:
    """How well normal images register to a common template."""

    score: float  # best of raw and registered detail correlation, 0..1
    raw_correlation: float
    registered_correlation: float
    median_shift: float  # fraction of the image side (the geometric mean of height and width)
    template_viable: bool
    per_position_viable: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _zscore(images: np.ndarray) -> np.ndarray:
    centred = images - images.mean(axis=(-2, -1), keepdims=True)
    return centred / (centred.std(axis=(-2, -1), keepdims=True) + 1e-6)


def detail(images: np.ndarray) -> np.ndarray:
    """High-pass detail: image minus its Gaussian blur (removes illumination and shading)."""
    return images - ndimage.gaussian_filter(images, (0, _DETAIL_SIGMA, _DETAIL_SIGMA))


def aligned_detail(images: np.ndarray) -> float:
    """Share of z-scored detail variance common to all images at the same position (≈1/N for textures)."""
    return float(_zscore(detail(images)).mean(axis=0).var())


def background_share(images: np.ndarray) -> float:
    """Median share of the image covered by the largest plain region touching the border.

    Blocks whose detail energy is below a fifth of the image's 90th-percentile block are "plain"; an object's
    background forms one large plain region around it, while flat patches of a texture (brick faces) are small
    and separated by busy borders. Blocks are square: ``_BLOCKS`` along the short side, as many as fit along the
    long one.
    """
    n, height, width = images.shape
    side = max(1, min(height, width) // _BLOCKS)
    rows, cols = height // side, width // side
    energy = np.abs(detail(images))[:, : rows * side, : cols * side]
    blocks = energy.reshape(n, rows, side, cols, side).mean(axis=(2, 4))
    reference = np.percentile(blocks.reshape(n, -1), 90, axis=1)[:, None, None] + 1e-9
    shares = []
    for plain in blocks < _LOW_ENERGY * reference:
        labels, _ = ndimage.label(plain)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        border = border[border > 0]
        sizes = ndimage.sum(plain, labels, border) if len(border) else [0.0]
        shares.append(float(np.max(sizes)) / plain.size)
    return float(np.median(shares))


def periodicity(images: np.ndarray) -> float:
    """Median over images of the strongest autocorrelation peak outside the central lobe (0..1)."""
    peaks = []
    for image in _zscore(detail(images)):
        spectrum = np.fft.fft2(image)
        autocorr = np.fft.fftshift(np.real(np.fft.ifft2(np.abs(spectrum) ** 2)))
        if autocorr.max() <= 0:  # no detail at all (a blank frame): nothing repeats
            peaks.append(0.0)
            continue
        autocorr /= autocorr.max()
        labels, _ = ndimage.label(autocorr > _AUTOCORR_LOBE)
        centre = labels[autocorr.shape[0] // 2, autocorr.shape[1] // 2]
        lobe = ndimage.binary_dilation(labels == centre, iterations=2)
        peaks.append(float(autocorr[~lobe].max()) if (~lobe).any() else 0.0)
    return float(np.median(peaks))


def structure_stats(images: np.ndarray) -> StructureStats:
    """Decide texture vs object from aligned detail and background share; add periodicity."""
    common = aligned_detail(images)
    background = background_share(images)
    evidence = max(common / ALIGNED_DETAIL_OBJECT, background / BACKGROUND_SHARE_OBJECT, 1e-3)
    confidence = 0.5 + 0.5 * min(1.0, abs(np.log(evidence)) / np.log(3.0))
    period = periodicity(images)
    kind = "object" if evidence >= 1 else "texture"
    return StructureStats(kind=kind, confidence=round(float(confidence), 3),
                          aligned_detail=round(common, 4), background_share=round(background, 4),
                          periodicity=round(period, 4), periodic=kind == "texture" and period >= PERIODICITY_PERIODIC)


def alignment_stats(images: np.ndarray, max_images: int = 60) -> AlignmentStats:
    """Correlate each image's detail with the median template, before and after translation registration."""
    from skimage.registration import phase_cross_correlation

    details = _zscore(detail(images))
    template = _zscore(np.median(details, axis=0)[None])[0]
    raw, registered, shifts = [], [], []
    for image in details[:max_images]:
        raw.append(float((image * template).mean()))
        if not image.any() or not template.any():  # no detail to register (a blank frame, or blank templates)
            registered.append(raw[-1])
            shifts.append(0.0)
            continue
        with warnings.catch_warnings():  # skimage warns, naming no file, about images it finds empty
            warnings.filterwarnings("ignore", message="Could not determine RMS error", category=UserWarning)
            shift, _, _ = phase_cross_correlation(template, image, normalization=None)
        moved = _zscore(ndimage.shift(image, shift, mode="nearest")[None])[0]
        registered.append(float((moved * template).mean()))
        shifts.append(float(np.hypot(*shift)) / np.sqrt(images.shape[-2] * images.shape[-1]))
    raw_corr, reg_corr = float(np.median(raw)), float(np.median(registered))
    score = max(0.0, raw_corr, reg_corr)
    return AlignmentStats(score=round(score, 4), raw_correlation=round(raw_corr, 4),
                          registered_correlation=round(reg_corr, 4), median_shift=round(float(np.median(shifts)), 4),
                          template_viable=score >= ALIGNMENT_TEMPLATE_VIABLE,
                          per_position_viable=raw_corr >= ALIGNMENT_PER_POSITION_VIABLE)
