"""Synthetic anomalies with masks, for ranking models when the user has no labelled defects.

Three kinds, from the self-supervised literature:

* ``cutpaste`` (Li et al., 2021): a rectangle of the image (2-15% of its area, aspect 0.3-3.3), colour-jittered,
  pasted at another place.
* ``scar`` (Li et al., 2021): a thin, long, rotated rectangle (2-16 px wide, 10-25 px long at 256 px, scaled with
  the image) filled with jittered content of the image.
* ``perlin`` (DRAEM, Zavrtanik et al., 2021): a Perlin-noise mask thresholded at 0.5 (scales 2^0-2^6), blending a
  foreign texture: ``I' = (1 - M) I + (1 - b) M A + b M I`` with opacity ``b`` in [0.1, 1).
  The foreign textures are real photographs shipped with scikit-image, rotated, recoloured and rescaled.

Every anomaly differs visibly from its source inside the mask (it is redrawn when the change is too faint), and
keeps at most ``MAX_REGIONS`` connected regions, its largest (the rest of the image is restored): real defects
come in one or a few regions, and AUPRO weighs every region alike, so a Perlin mask's hundreds of speckles at its
finest scales would otherwise outweigh every other anomaly of a validation set (94% of the regions on
magnetic_tile before this cap) and make its AUPRO a test of speckle localisation.

Families that train on some of these kinds (CutPaste trains on cut-paste and scar patches; a detector declares
them in ``trains_on_anomalies``) would be flattered by them, so a search ranks each family only on the kinds it
does not train on. The validation anomalies are made in rounds (:func:`round_kind`): one round is one anomaly
per held-out normal image, kinds in turn; :func:`rounds_needed` rounds leave every family at least one anomaly
of another kind per normal image, and :func:`without_trained_kinds` picks one round's worth of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from automl_ad.data.imageset import ImageSet

KINDS = ("cutpaste", "scar", "perlin")
_MIN_CHANGE = 0.05  # mean absolute change inside the mask, in [0, 1] intensity units
MAX_REGIONS = 3  # connected regions kept per anomaly, the largest


def validation_folder(work_dir: str | Path, seed: int = 0) -> Path:
    """Where a search's synthetic validation anomalies of ``seed`` are written under its ``work_dir`` (one folder per
    seed: the dataset's searches share ``work_dir``, and another seed's anomalies must not replace those a search
    was ranked on)."""
    return Path(work_dir) / ("synthetic-validation" if seed == 0 else f"synthetic-validation-seed{seed}")


def make_anomaly(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A defective copy of ``image`` (float32 (H, W[, 3]) in [0, 1]) and its boolean mask."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}; choose from {', '.join(KINDS)}")
    maker = {"cutpaste": _cutpaste, "scar": _scar, "perlin": _perlin}[kind]
    for _ in range(20):
        out, mask = _largest_regions(*maker(image, rng), image)
        if mask.any() and np.abs(out - image)[mask].mean() >= _MIN_CHANGE:
            return out.astype(np.float32), mask
    return out.astype(np.float32), mask  # a flat image: the last draw, however faint


def _largest_regions(out: np.ndarray, mask: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out`` and ``mask`` cut to the mask's ``MAX_REGIONS`` largest connected regions (8-connected, as AUPRO
    counts them), ``image`` restored elsewhere."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= MAX_REGIONS:
        return out, mask
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.isin(labels, 1 + np.argsort(sizes, kind="stable")[::-1][:MAX_REGIONS])
    return np.where(kept[..., None] if out.ndim == 3 else kept, out, image), kept


def round_kind(index: int, round_number: int) -> str:
    """The kind of the anomaly made on normal image ``index`` in round ``round_number``: kinds in turn, shifted by
    one kind per round (so ``len(KINDS)`` rounds put every kind on every image)."""
    return KINDS[(index + round_number) % len(KINDS)]


def rounds_needed(trained_on: Iterable[Sequence[str]]) -> int:
    """Rounds of anomalies after which every family, given by the kinds it trains on, has at least one anomaly of
    another kind on every normal image: r rounds put r different kinds on each image, of which at most
    ``len(KINDS)`` minus the family's untrained kinds are trained ones. At least 1, at most ``len(KINDS)``."""
    fewest_untrained = min((len(set(KINDS) - set(kinds)) for kinds in trained_on), default=len(KINDS))
    return min(len(KINDS), len(KINDS) - fewest_untrained + 1)


def without_trained_kinds(images: ImageSet, trained_on: Sequence[str]) -> ImageSet:
    """The validation images of a family that trains on the synthetic kinds ``trained_on``: every normal image
    and real defect, and as many synthetic anomalies of the other kinds as there are normal images (the first
    ones in order, so with nothing held out this is the first round: one per normal image, kinds in turn).
    ``images`` without synthetic anomalies is returned as it is; a ValueError when every one is of a trained kind."""
    if images.kinds is None or all(kind is None for kind in images.kinds):
        return images
    wanted, kept, keep = int((images.labels == 0).sum()), 0, []
    for index, kind in enumerate(images.kinds):
        if kind is None:
            keep.append(index)
        elif kind not in trained_on and kept < wanted:
            keep.append(index)
            kept += 1
    if not kept:
        present = sorted({kind for kind in images.kinds if kind is not None})
        raise ValueError(f"every synthetic validation anomaly ({', '.join(present)}) is of a kind this family "
                         f"trains on ({', '.join(trained_on)}); rank it on labelled defects (--validation real)")
    return images.subset(keep)


def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and (for colour) per-channel gain changes of up to ±30%."""
    out = (patch - patch.mean()) * rng.uniform(0.7, 1.3) + patch.mean() + rng.uniform(-0.3, 0.3)
    if out.ndim == 3:
        out = out * rng.uniform(0.7, 1.3, size=(1, 1, out.shape[2]))
    return np.clip(out, 0, 1)


def _cutpaste(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    area = rng.uniform(0.02, 0.15) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(np.sqrt(area * aspect), 2, h - 1))
    pw = int(np.clip(np.sqrt(area / aspect), 2, w - 1))
    y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    y1, x1 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = image.copy()
    out[y1:y1 + ph, x1:x1 + pw] = _jitter(image[y0:y0 + ph, x0:x0 + pw], rng)
    mask = np.zeros((h, w), bool)
    mask[y1:y1 + ph, x1:x1 + pw] = True
    return out, mask


def _scar(image: np.ndarray, rng: np.random.Generator):
    from skimage.draw import polygon

    h, w = image.shape[:2]
    scale = min(h, w) / 256
    width = rng.uniform(2, 16) * scale
    length = rng.uniform(10, 25) * scale * 2
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(length / 2, h - length / 2), rng.uniform(length / 2, w - length / 2)
    along, across = np.array([np.sin(angle), np.cos(angle)]), np.array([np.cos(angle), -np.sin(angle)])
    corners = [np.array([cy, cx]) + sa * along * length / 2 + sc * across * width / 2
               for sa, sc in ((-1, -1), (-1, 1), (1, 1), (1, -1))]
    rows, cols = polygon([c[0] for c in corners], [c[1] for c in corners], shape=(h, w))
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    # fill with jittered content from another place of the image
    dy, dx = rng.integers(-h // 3, h // 3 + 1), rng.integers(-w // 3, w // 3 + 1)
    source = np.roll(image, (dy, dx), axis=(0, 1))
    out = image.copy()
    out[mask] = _jitter(source, rng)[mask]
    return out, mask


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise of ``shape`` with ``res`` lattice cells per axis (values roughly in [-1, 1])."""
    h, w = shape
    angles = rng.uniform(0, 2 * np.pi, (res[0] + 1, res[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, res[0], h, endpoint=False)
    x = np.linspace(0, res[1], w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3  # noqa: E731
    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return np.sqrt(2) * (top * (1 - uy) + bottom * uy)


@lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    """Foreign textures: real photographs shipped with scikit-image, as float RGB in [0, 1]."""
    from skimage import data
    from skimage.color import gray2rgb

    images = []
    for name in ("brick", "grass", "gravel", "rocket", "coffee", "chelsea", "immunohistochemistry", "coins"):
        try:
            image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a missing optional sample image just narrows the choice
            continue
        image = image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0)
        images.append(gray2rgb(image) if image.ndim == 2 else image[..., :3])
    return tuple(images)


def _foreign(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    from skimage.transform import resize, rotate

    textures = _textures()
    texture = textures[rng.integers(len(textures))]
    texture = rotate(texture, rng.uniform(-90, 90), mode="reflect")
    texture = resize(texture, shape, anti_aliasing=True)
    return _jitter(texture, rng)


def _perlin(image: np.ndarray, rng: np.random.Generator):
    h, w = image.shape[:2]
    side = int(2 ** np.ceil(np.log2(max(h, w))))
    res = (2 ** int(rng.integers(0, 7)), 2 ** int(rng.integers(0, 7)))
    noise = perlin_noise((side, side), res, rng)[:h, :w]
    mask = noise > 0.5
    foreign = _foreign((h, w), rng)
    if image.ndim == 2:
        foreign = foreign.mean(axis=2)
    opacity = rng.uniform(0.1, 1.0)
    m = mask[..., None] if image.ndim == 3 else mask
    out = (1 - m) * image + (1 - opacity) * m * foreign + opacity * m * image
    return out, mask
