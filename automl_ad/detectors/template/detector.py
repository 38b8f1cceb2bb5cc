"""Template matching: compare each registered test image with a golden template of the normal part.

1. Working images: luma at ``input_size`` x ``input_size``.
2. Reference: the medoid of the normal images (Euclidean distance, subsampled to about 64 px).
3. Registration of every normal image to the reference: translation by phase correlation
   (``skimage.registration.phase_cross_correlation`` with ``upsample_factor`` subpixel refinement, on
   Hann-windowed images so the image borders do not pull the peak to zero shift); with ``max_rotation`` > 0 also
   a small rotation: the angle, in steps of ``rotation_step`` degrees, whose translation-registered image
   correlates best with the reference. Past 9 angles it is found coarse to fine (:func:`search_angles`): every
   k-th angle first, then every angle between the best of those and its two neighbours (a +-15-degree search in
   0.5-degree steps registers 21 angles, not 61).
4. Template: pixel-wise median of the registered normals. The normals are registered a second time, to this
   template, and the template recomputed (the medoid alone is a noisy reference).
5. Tolerance: 1.4826 x the median absolute deviation of the registered normals around the template per pixel
   (a robust standard deviation), floored at ``tolerance_floor`` (0..1 grey scale; the default 0.01, about
   2.5 levels of 8 bits, is sensor-noise level: it keeps pixels that never vary, such as a saturated background,
   from turning noise into huge deviations).
6. Applicability: the normalised cross-correlation of each registered normal's high-pass detail (image minus a
   Gaussian blur of sigma ``input_size``/64) with the template's detail; when the median is below
   ``min_alignment`` the images do not share one layout and ``fit`` raises :class:`NotApplicableError`.
7. Scoring: register the test image to the template, divide ``|image - template|`` by the tolerance, remove
   isolated noise with a grey-level opening of ``opening_size`` pixels, smooth with a Gaussian of
   ``smoothing_sigma``, move the map back into the test image's frame; image score = maximum of the map.

Rotation search is off by default: on MVTec bottle at 256 px a +-2 degree search (9 angles) moved AUPRO only from
0.837 to 0.847, while fitting took about 7x and scoring about 6x longer.
"""

from __future__ import annotations

import logging
from numbers import Integral, Real

import numpy as np
from scipy import ndimage

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import Detector, EpochCallback, NotApplicableError, Scores
from automl_ad.detectors.parameters import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Interval
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

_MAD_TO_STD = 1.4826


@register_detector
class TemplateMatching(Detector):
    """Template-matching route: registered difference to a median template, normalised per pixel."""

    name = "template"
    route = "template_matching"
    needs_training = False
    no_graph = ("each image is registered to the template by a search over shifts (and rotations) with"
                " scikit-image, not a fixed torch graph")
    test_params = {"input_size": 96}
    test_category = "object"
    gray = True
    _parameter_constraints = {
        "input_size": [Interval(Integral, 16, None, closed="left")], "upsample_factor": [POSITIVE_INT],
        "max_rotation": [Interval(Real, 0, 45, closed="both")], "rotation_step": [POSITIVE],
        "tolerance_floor": [POSITIVE], "opening_size": [POSITIVE_INT], "smoothing_sigma": [NON_NEGATIVE],
        "min_alignment": [Interval(Real, -1, 1, closed="both")],
    }

    def __init__(self, input_size=256, upsample_factor=10, max_rotation=0.0, rotation_step=0.5,
                 tolerance_floor=0.01, opening_size=3, smoothing_sigma=4.0, min_alignment=0.5):
        self._store_parameters(locals())

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        images = train.load(self.input_size, gray=True)
        reference = images[_medoid(images)]
        registered = np.stack([self._register(image, reference)[0] for image in images])
        template = np.median(registered, axis=0)
        registered = np.stack([self._register(image, template)[0] for image in images])
        template = np.median(registered, axis=0)
        mad = np.median(np.abs(registered - template), axis=0)
        self.template_ = template.astype(np.float32)
        self.tolerance_ = np.maximum(_MAD_TO_STD * mad, self.tolerance_floor).astype(np.float32)
        sigma = self.input_size / 64
        template_detail = template - ndimage.gaussian_filter(template, sigma)
        self.alignment_ = float(np.median([_ncc(r - ndimage.gaussian_filter(r, sigma), template_detail)
                                           for r in registered]))
        log.info("%s: normals correlate %.3f with their template after registration", self.name, self.alignment_)
        if self.alignment_ < self.min_alignment:
            raise NotApplicableError(
                f"template matching needs aligned images: the normal images correlate only {self.alignment_:.2f} "
                f"with their template after registration (needs >= {self.min_alignment}); use a route for "
                "unaligned data (memory bank, statistical 'shared', frequency for textures)")

    @classmethod
    def scoring_pixels(cls, params: dict, pixels: float) -> float:
        """Every angle the rotation search tries registers the whole image: ``pixels`` times those angles (trying
        all 61 angles of a 15-degree search in 0.5-degree steps took 62x as long as none at 512 px; predicted as
        one, such a trial was killed at its limit)."""
        defaults = cls()
        angles = rotation_angles(float(params.get("max_rotation", defaults.max_rotation)),
                                 float(params.get("rotation_step", defaults.rotation_step)))
        return pixels * sum(len(group) for group in search_angles(angles, angles[len(angles) // 2]))

    # --- registration -----------------------------------------------------------------------------------------
    def _register(self, image: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """``image`` moved onto ``reference``: (registered image, rotation in degrees, (dy, dx) shift)."""
        from skimage.registration import phase_cross_correlation

        window = _hann(image.shape)
        angles = rotation_angles(self.max_rotation, self.rotation_step)
        best = None

        def better(angle: float):
            rotated = image if angle == 0 else ndimage.rotate(image, angle, reshape=False, order=1, mode="nearest")
            shift, _, _ = phase_cross_correlation(reference * window, rotated * window,
                                                  upsample_factor=self.upsample_factor)
            moved = ndimage.shift(rotated, shift, order=1, mode="nearest")
            match = _ncc(moved, reference) if len(angles) > 1 else 0.0
            return (match, moved, float(angle), shift) if best is None or match > best[0] else best

        for group in search_angles(angles, None):
            for angle in group:
                best = better(angle)
        if len(angles) > 1:
            for angle in search_angles(angles, best[2])[1]:
                best = better(angle)
        return best[1], best[2], best[3]

    # --- score ------------------------------------------------------------------------------------------------
    def _score(self, images: ImageSet) -> Scores:
        gray = images.load(self.input_size, gray=True)
        maps = np.empty(gray.shape, np.float32)
        for i, image in enumerate(gray):
            registered, angle, shift = self._register(image, self.template_)
            deviation = np.abs(registered - self.template_) / self.tolerance_
            if self.opening_size > 1:
                deviation = ndimage.grey_opening(deviation, size=(self.opening_size, self.opening_size))
            if self.smoothing_sigma > 0:
                deviation = ndimage.gaussian_filter(deviation, self.smoothing_sigma, truncate=4.0)
            deviation = ndimage.shift(deviation, -shift, order=1, mode="nearest")  # back to the image's frame
            if angle != 0:
                deviation = ndimage.rotate(deviation, -angle, reshape=False, order=1, mode="nearest")
            maps[i] = deviation
        return Scores(maps.reshape(len(maps), -1).max(axis=1), maps)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        return {"template": self.template_, "tolerance": self.tolerance_}, {"alignment": self.alignment_}

    def _restore(self, tensors, state):
        self.template_ = tensors["template"]
        self.tolerance_ = tensors["tolerance"]
        self.alignment_ = state["alignment"]


def rotation_angles(max_rotation: float, step: float) -> np.ndarray:
    """The rotations tried, in degrees: 0 alone, else every ``step`` within +-``max_rotation``."""
    if max_rotation == 0:
        return np.zeros(1)
    half = int(np.floor(max_rotation / step + 1e-9))
    return np.arange(-half, half + 1) * step


#: Rotation searches up to this many angles try every angle; longer ones go coarse to fine.
_ALL_ANGLES_UP_TO = 9


def search_angles(angles: np.ndarray, best: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The angles a registration tries, as (coarse, fine): coarse is every k-th of ``angles`` through 0 (all of
    them up to 9 angles; beyond, k = sqrt(n / 2) rounded, which makes the fewest tries in all), fine the angles
    between the coarse pass's ``best`` and its coarse neighbours (empty while ``best`` is None, or when coarse had
    them all). The correlation falls smoothly as a part turns away from the template, so the best coarse angle
    lies next to the best one."""
    if len(angles) <= _ALL_ANGLES_UP_TO:
        return angles, angles[:0]
    stride = max(2, round(np.sqrt(len(angles) / 2)))
    middle = len(angles) // 2  # the angle 0
    coarse = angles[middle % stride::stride]
    if best is None:
        return coarse, angles[:0]
    position = int(np.abs(angles - best).argmin())
    near = np.arange(max(0, position - stride + 1), min(len(angles), position + stride))
    return coarse, np.array([angles[i] for i in near if (i - middle) % stride != 0])


def _medoid(images: np.ndarray) -> int:
    """Index of the image with the smallest summed squared distance to all others (subsampled to ~64 px)."""
    step = max(1, images.shape[-1] // 64)
    small = images[:, ::step, ::step].reshape(len(images), -1).astype(np.float64)
    norms = (small * small).sum(axis=1)
    distances = norms[:, None] + norms[None] - 2 * small @ small.T
    return int(distances.sum(axis=1).argmin())


def _hann(shape: tuple[int, int]) -> np.ndarray:
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1])).astype(np.float32)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-12))
