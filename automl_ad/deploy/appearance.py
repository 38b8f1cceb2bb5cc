"""What a model's training images looked like (sizes, aspect ratios, colour), kept in its package's manifest, and
how a new image differs from them. A threshold holds for images like those it was calibrated on; ``predict`` notes
each image from another camera, crop, orientation or colour mode, so that its verdict is read with care."""

from __future__ import annotations

import numpy as np

from automl_ad.data.imageset import ImageSet
from automl_ad.data.io import channels_identical, full_scale_of, read_image
from automl_ad.defaults import APPEARANCE_ASPECT_FACTOR, APPEARANCE_COLOUR_SAMPLE, APPEARANCE_SIZE_FACTOR


def colour_mode(image: np.ndarray, full_scale: int | None = None) -> str:
    """"gray" for one channel or three (nearly) identical ones, else "colour" (integer images, 16-bit ones read at
    ``full_scale``, or float in [0, 1])."""
    if image.ndim == 2:
        return "gray"
    return "gray" if channels_identical(image * 255.0 if image.dtype.kind == "f" else image,
                                        full_scale=full_scale) else "colour"


def training_appearance(images: ImageSet) -> dict:
    """Height, width and aspect-ratio (width / height) ranges of ``images`` (every file's header), their colour
    mode ("gray", "colour" or "mixed") and, for image files, their bit depth (8 or 16; absent when mixed), from up
    to ``APPEARANCE_COLOUR_SAMPLE`` of them spread over the set."""
    sizes = np.array(images.sizes(), dtype=float)  # (height, width)
    aspects = sizes[:, 1] / sizes[:, 0]
    picks = np.unique(np.linspace(0, len(images) - 1, min(len(images), APPEARANCE_COLOUR_SAMPLE)).astype(int))
    sample = [images.arrays[i] if images.arrays is not None else read_image(images.paths[i]) for i in picks]
    modes = {colour_mode(image, images.full_scale) for image in sample}
    depths = {16 if image.dtype == np.uint16 else 8 for image in sample if image.dtype.kind == "u"}
    return {"height": [int(sizes[:, 0].min()), int(sizes[:, 0].max())],
            "width": [int(sizes[:, 1].min()), int(sizes[:, 1].max())],
            "aspect": [round(float(aspects.min()), 4), round(float(aspects.max()), 4)],
            "colour": modes.pop() if len(modes) == 1 else "mixed",
            **({"bits": depths.pop()} if len(depths) == 1 and images.arrays is None else {})}


def differences(image: np.ndarray, appearance: dict | None, full_scale: int | None = None) -> list[str]:
    """How ``image`` (decoded, (H, W) or (H, W, 3)) differs from the training images of ``appearance`` (as
    :func:`training_appearance` returns; None or malformed, e.g. an older package: no size or colour check) and,
    for 16-bit pixels, from their ``full_scale`` (a 12-bit camera's 4095: brighter pixels read as white)."""
    found = []
    brightest = int(image.max()) if image.dtype == np.uint16 else 0
    if full_scale is not None and brightest > full_scale:
        found.append(f"16-bit pixels up to {brightest}, above the {full_scale} ({full_scale.bit_length()}-bit) "
                     "of the training images: brighter pixels read as white")
    colour_scale = full_scale
    if image.dtype == np.uint16 and full_scale is None and isinstance(appearance, dict) \
            and appearance.get("bits") == 8 and full_scale_of(brightest) < 65535:
        colour_scale = full_scale_of(brightest)  # its colour is judged on its own scale, not 65535's
        found.append(f"16-bit pixels up to {brightest} ({colour_scale.bit_length()}-bit values) where the training "
                     f"images are 8-bit: read against 65535, at 1/{65535 // colour_scale} of their contrast; "
                     "convert such files to 8 bits as the training images were, or search on them")
    try:
        (low_h, high_h), (low_w, high_w), (low_a, high_a) = (
            [float(v) for v in appearance[key]] for key in ("height", "width", "aspect"))
        trained = appearance["colour"]
    except (TypeError, KeyError, ValueError):
        return found
    height, width = image.shape[:2]
    if not low_a / APPEARANCE_ASPECT_FACTOR <= width / height <= high_a * APPEARANCE_ASPECT_FACTOR:
        found.append(f"aspect ratio {width / height:.2f} (width / height) against {_span(low_a, high_a, '.2f')} "
                     "for the training images")
    elif not (low_h / APPEARANCE_SIZE_FACTOR <= height <= high_h * APPEARANCE_SIZE_FACTOR
              and low_w / APPEARANCE_SIZE_FACTOR <= width <= high_w * APPEARANCE_SIZE_FACTOR):
        found.append(f"{width}x{height} pixels against {_span(low_w, high_w, '.0f')}x{_span(low_h, high_h, '.0f')} "
                     "for the training images")
    mode = colour_mode(image, colour_scale)
    if trained in ("gray", "colour") and mode != trained:
        found.append(f"a {mode} image; the training images are {trained}")
    return found


def _span(low: float, high: float, spec: str) -> str:
    return format(low, spec) if format(low, spec) == format(high, spec) else f"{low:{spec}}-{high:{spec}}"
