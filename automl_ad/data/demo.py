"""Built-in synthetic demo dataset in MVTec AD layout.

Everything is generated locally and deterministically from a seed:

* ``texture`` (grayscale): randomly placed, flipped and rescaled crops of one
  scikit-image texture (``brick`` by default) with scratches, pits (``hole``)
  and stains;
* ``object`` (RGB): renderings of an aligned machined flange (bore, keyway,
  bolt holes, chamfers, laser-marked code) with small pose and lighting
  variation, and scratches, missing parts, foreign particles and stains.

Defects are alpha-blended into a defect-free rendering; a ground-truth mask
pixel is set where the defect's alpha is at least 0.5 (for missing parts:
where the rendering differs).
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import data as skdata
from skimage.transform import resize

from automl_ad.data.io import save_png

logger = logging.getLogger(__name__)

DEMO_CATEGORIES: dict[str, tuple[str, ...]] = {
    "texture": ("scratch", "hole", "stain"),
    "object": ("scratch", "missing_part", "extra_part", "stain"),
}
TEXTURE_SOURCES = ("brick", "grass", "gravel")
MARKER_FILE = "demo.json"
GENERATOR_VERSION = 1

_LIGHT = np.array([-1.0, -1.0]) / math.sqrt(2.0)  # image-plane direction towards the light (top left)
_MIN_MASK_FRACTION = 0.002  # smallest accepted defect, as a fraction of the image area

# Flange geometry, in units of the image size.
_OUTER_R = 0.40
_BORE_R = 0.11
_KEY_HALF_WIDTH = 0.025
_KEY_TOP = 0.15
_BOLT_CIRCLE = 0.27
_BOLT_R = 0.042
_BOLT_ANGLES = np.deg2rad([45.0, 135.0, 225.0, 315.0])
_CHAMFER = 0.014
_STEEL = np.array([0.70, 0.72, 0.75])

# Laser marking canvas: covers [-_OUTER_R, _OUTER_R]^2 of the part frame.
_MARK_RES = 480
_MARK_TEXT = "0427"
_GLYPHS = {  # 3x5 bitmap digits, row by row
    "0": "111101101101111",
    "2": "111001111100111",
    "4": "101101111001001",
    "7": "111001001001001",
}


class DemoSample(NamedTuple):
    """One generated image, its defect mask (None for good images) and its defect-free twin."""

    image: np.ndarray
    mask: np.ndarray | None
    reference: np.ndarray


def generate_demo(
    out_dir: str | os.PathLike[str],
    categories: Iterable[str] = ("texture", "object"),
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 5,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    texture_source: str = "brick",
) -> dict[str, Path]:
    """Write the demo dataset in MVTec layout and return ``{category: category root}``.

    An existing category folder is reused when its ``demo.json`` records the same
    parameters; otherwise ``FileExistsError`` is raised. ``overwrite=True`` only
    deletes folders that carry the generator's ``demo.json`` marker.
    """
    categories = (categories,) if isinstance(categories, str) else tuple(dict.fromkeys(categories))
    n_train, n_test_good, n_test_per_defect, size, seed = map(
        operator.index, (n_train, n_test_good, n_test_per_defect, size, seed)
    )
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown demo categories {unknown}; choose from {list(DEMO_CATEGORIES)}")
    if texture_source not in TEXTURE_SOURCES:
        raise ValueError(f"unknown texture_source {texture_source!r}; choose from {TEXTURE_SOURCES}")
    if min(n_train, n_test_good, n_test_per_defect) < 1:
        raise ValueError("n_train, n_test_good and n_test_per_defect must be at least 1")
    if size < 32:
        raise ValueError("size must be at least 32 pixels")
    if seed < 0:
        raise ValueError("seed must be non-negative")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roots = {}
    for category in categories:
        params = {
            "generator": __name__,
            "version": GENERATOR_VERSION,
            "category": category,
            "defect_types": list(DEMO_CATEGORIES[category]),
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_test_per_defect": n_test_per_defect,
            "size": size,
            "seed": seed,
        }
        if category == "texture":
            params["texture_source"] = texture_source
        root = out / category
        if _reuse_or_clear(root, params, overwrite):
            logger.info("reusing demo category %s at %s", category, root)
        else:
            _write_category(root, params)
            logger.info("generated demo category %s at %s", category, root)
        roots[category] = root
    return roots


def render_sample(
    category: str,
    defect_type: str | None,
    size: int,
    rng: np.random.Generator,
    texture_source: str = "brick",
) -> DemoSample:
    """Render one uint8 image (H x W gray for texture, H x W x 3 for object) with an optional defect.

    ``reference`` is the same image without the defect (same pose and noise), so
    ``image != reference`` shows exactly the pixels the defect altered.
    """
    if category == "texture":
        clean = _render_texture(texture_source, size, rng)
        support = np.ones((size, size))
        look = None
    elif category == "object":
        look = _random_look(rng, size)
        clean, support = _render_flange(size, look)
    else:
        raise ValueError(f"unknown demo category {category!r}")

    defective, mask = clean, None
    if defect_type is not None:
        if defect_type not in DEMO_CATEGORIES[category]:
            raise ValueError(f"defect type {defect_type!r} is not defined for category {category!r}")
        min_pixels = max(4, int(_MIN_MASK_FRACTION * size * size))
        for _ in range(50):
            if defect_type == "missing_part":
                defective, mask = _missing_part(clean, rng, size, look)
            else:
                defective, mask = _DEFECTS[defect_type](clean, rng, support)
            if mask.sum() >= min_pixels:
                break
        else:
            raise RuntimeError(f"could not place a {defect_type} defect on a {size}px {category} image")

    noise = rng.normal(0.0, rng.uniform(0.006, 0.012), clean.shape)
    image, reference = _to_uint8(defective + noise), _to_uint8(clean + noise)
    if category == "texture":
        image, reference = image[..., 0], reference[..., 0]
    return DemoSample(image, mask, reference)


# --------------------------------------------------------------------------- folders


def _reuse_or_clear(root: Path, params: dict, overwrite: bool) -> bool:
    """Return True if ``root`` already holds this dataset; clear it if allowed; raise otherwise."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder")
    if not any(root.iterdir()):
        root.rmdir()
        return False
    marker = root / MARKER_FILE
    try:
        existing = json.loads(marker.read_text())
    except (OSError, ValueError):
        raise FileExistsError(
            f"{root} is not empty and has no readable {MARKER_FILE}, so it was not made by the demo "
            "generator; refusing to reuse or delete it. Choose another output folder."
        ) from None
    if overwrite:
        shutil.rmtree(root)
        return False
    if existing != params:
        raise FileExistsError(
            f"{root} holds a demo dataset generated with different parameters "
            f"({existing} instead of {params}); pass overwrite=True to regenerate it."
        )
    if sum(1 for _ in root.rglob("*.png")) != _expected_png_count(params):
        raise FileExistsError(f"{root} is an incomplete demo dataset; pass overwrite=True to regenerate it.")
    return True


def _expected_png_count(params: dict) -> int:
    n_defect_images = len(params["defect_types"]) * params["n_test_per_defect"]
    return params["n_train"] + params["n_test_good"] + 2 * n_defect_images


def _write_category(root: Path, params: dict) -> None:
    """Render all images of one category into a temporary folder, then move it to ``root``."""
    category = params["category"]
    category_id = list(DEMO_CATEGORIES).index(category)
    jobs = [("train", None, params["n_train"]), ("test", None, params["n_test_good"])]
    jobs += [("test", defect, params["n_test_per_defect"]) for defect in params["defect_types"]]
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}-", dir=root.parent))
    try:
        for split_id, (split, defect, count) in enumerate(jobs):
            image_dir = tmp / split / (defect or "good")
            image_dir.mkdir(parents=True)
            if defect:
                (tmp / "ground_truth" / defect).mkdir(parents=True)
            for index in range(count):
                rng = np.random.default_rng([params["seed"], category_id, split_id, index])
                sample = render_sample(category, defect, params["size"], rng, params.get("texture_source", "brick"))
                save_png(image_dir / f"{index:03d}.png", sample.image)
                if defect:
                    mask_path = tmp / "ground_truth" / defect / f"{index:03d}_mask.png"
                    save_png(mask_path, sample.mask.astype(np.uint8) * 255)
        (tmp / MARKER_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- texture


@cache
def _texture_array(name: str) -> np.ndarray:
    texture = getattr(skdata, name)().astype(np.float64) / 255.0
    texture.setflags(write=False)
    return texture


def _render_texture(source: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random window of the source texture (about half its width), flipped, rescaled to ``size``."""
    texture = _texture_array(source)
    crop = min(int(round(texture.shape[0] * 0.5 * rng.uniform(0.9, 1.15))), texture.shape[0])
    y0, x0 = rng.integers(0, texture.shape[0] - crop + 1, size=2)
    patch = texture[y0 : y0 + crop, x0 : x0 + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    patch = resize(patch, (size, size), order=1, anti_aliasing=crop > size)
    mean = patch.mean()
    patch = (patch - mean) * rng.uniform(0.92, 1.08) + mean + rng.uniform(-0.03, 0.03)
    return patch[..., None]


# --------------------------------------------------------------------------- object


@dataclass(frozen=True)
class _Look:
    """Pose and lighting of one flange rendering."""

    shift: tuple[float, float]
    angle: float
    gain: float
    highlight_angle: float
    turning_phases: tuple[float, float]
    background: float


def _random_look(rng: np.random.Generator, size: int) -> _Look:
    jitter = 2.0 * size / 256
    return _Look(
        shift=(rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)),
        angle=math.radians(rng.uniform(-2.0, 2.0)),
        gain=rng.uniform(0.94, 1.06),
        highlight_angle=math.radians(rng.uniform(-60.0, -30.0)),
        turning_phases=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)),
        background=rng.uniform(0.10, 0.14),
    )


@dataclass(frozen=True)
class _Chunk:
    """A piece broken off the flange rim, in part coordinates (units of the image size)."""

    center: tuple[float, float]
    radius: float
    harmonics: np.ndarray


def _render_flange(
    size: int, look: _Look, undrilled_hole: int | None = None, chunk: _Chunk | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render the flange as an H x W x 3 float image; also return the metal coverage map."""
    s = float(size)
    centres = np.arange(size) + 0.5 - s / 2
    x, y = np.meshgrid(centres - look.shift[0], centres - look.shift[1])
    cos_a, sin_a = math.cos(look.angle), math.sin(look.angle)
    u, v = cos_a * x + sin_a * y, -sin_a * x + cos_a * y  # part frame, pixels
    r = np.hypot(u, v)

    # Signed distance into the metal (pixels): disc minus bore, keyway and bolt holes.
    key_centre = -(0.8 * _BORE_R + _KEY_TOP) / 2 * s
    key_half = np.array([_KEY_HALF_WIDTH, (_KEY_TOP - 0.8 * _BORE_R) / 2]) * s
    in_opening = np.maximum(_BORE_R * s - r, -_box_distance(u, v - key_centre, key_half))
    for index, angle in enumerate(_BOLT_ANGLES):
        if index != undrilled_hole:
            hole_r = np.hypot(u - _BOLT_CIRCLE * s * math.cos(angle), v - _BOLT_CIRCLE * s * math.sin(angle))
            in_opening = np.maximum(in_opening, _BOLT_R * s - hole_r)
    sd = np.minimum(_OUTER_R * s - r, -in_opening)

    # Face: light fall-off, anisotropic highlight of a turned surface, fine turning grooves.
    phi = np.arctan2(y, x)
    periods = (max(3.0, 0.012 * s), max(7.0, 0.035 * s))
    face = (
        0.86
        + 0.08 * (x * _LIGHT[0] + y * _LIGHT[1]) / (_OUTER_R * s)
        + 0.07 * np.cos(2 * (phi - look.highlight_angle))
        + 0.02 * np.sin(2 * np.pi * r / periods[0] + look.turning_phases[0])
        + 0.012 * np.sin(2 * np.pi * r / periods[1] + look.turning_phases[1])
    )
    face = face * (1.0 - 0.75 * _marking(size, u, v))
    # Chamfers: brightness follows the edge normal (the outward direction of the signed distance).
    grad_y, grad_x = np.gradient(sd)
    norm = np.hypot(grad_x, grad_y) + 1e-9
    facing = -(grad_x * _LIGHT[0] + grad_y * _LIGHT[1]) / norm
    chamfer = 0.55 + 0.5 * facing + 0.25 * np.clip(facing, 0, 1) ** 4
    chamfer_weight = np.clip(_CHAMFER * s - sd + 0.5, 0, 1)
    shade = face * (1 - chamfer_weight) + chamfer * chamfer_weight
    coverage = np.clip(sd + 0.5, 0, 1)

    if chunk is not None:
        in_chunk = _blob_distance(u - chunk.center[0] * s, v - chunk.center[1] * s, chunk.radius * s, chunk.harmonics)
        fracture = np.clip(1 + in_chunk / max(1.5, 0.008 * s), 0, 1)
        shade = shade * (1 - 0.35 * fracture)
        coverage = coverage * np.clip(0.5 - in_chunk, 0, 1)

    metal = shade[..., None] * _STEEL * look.gain
    # Dark, slightly blue background with vignetting and the flange's soft drop shadow.
    offset = 0.011 * s
    shadow = np.clip((_OUTER_R * s - np.hypot(x - offset, y - offset)) / (0.03 * s) + 0.5, 0, 1)
    vignette = 1 - 0.3 * (np.hypot(x, y) / (0.7 * s)) ** 2
    background = (look.background * vignette * (1 - 0.55 * shadow))[..., None] * np.array([0.95, 1.0, 1.1])
    image = background + coverage[..., None] * (metal - background)
    return image, coverage


def _box_distance(u: np.ndarray, v: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Signed distance to an axis-aligned box centred at the origin (negative inside)."""
    qu, qv = np.abs(u) - half[0], np.abs(v) - half[1]
    return np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0)


@cache
def _marking_canvas(size: int) -> np.ndarray:
    """Ink map of the laser marking (a data-matrix-like code and a part number), blurred for ``size``."""
    canvas = np.zeros((_MARK_RES, _MARK_RES))
    to_px = _MARK_RES / (2 * _OUTER_R)

    modules = np.random.default_rng(2417).random((12, 12)) < 0.5
    modules[:, 0] = modules[-1, :] = True  # finder pattern
    modules[0, :] = np.arange(12) % 2 == 0  # clock tracks
    modules[:, -1] = np.arange(12) % 2 == 1
    module_px = 5
    top = int((_BOLT_CIRCLE + _OUTER_R) * to_px) - 6 * module_px
    left = _MARK_RES // 2 - 6 * module_px
    code = np.kron(modules, np.ones((module_px, module_px)))
    canvas[top : top + code.shape[0], left : left + code.shape[1]] = code

    cell = 4
    glyphs = [np.array([int(bit) for bit in _GLYPHS[char]]).reshape(5, 3) for char in _MARK_TEXT]
    text = np.hstack([np.pad(glyph, ((0, 0), (0, 1))) for glyph in glyphs])[:, :-1]
    text = np.kron(text, np.ones((cell, cell)))
    top = int((_OUTER_R - _BOLT_CIRCLE) * to_px) - text.shape[0] // 2
    left = _MARK_RES // 2 - text.shape[1] // 2
    canvas[top : top + text.shape[0], left : left + text.shape[1]] = text

    canvas = ndimage.gaussian_filter(canvas, 0.45 * _MARK_RES / (2 * _OUTER_R * size))
    canvas.setflags(write=False)
    return canvas


def _marking(size: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample the marking ink at part-frame pixel coordinates."""
    scale = _MARK_RES / (2 * _OUTER_R * size)
    rows = v * scale + _MARK_RES / 2 - 0.5
    cols = u * scale + _MARK_RES / 2 - 0.5
    return ndimage.map_coordinates(_marking_canvas(size), [rows, cols], order=1, cval=0.0)


# --------------------------------------------------------------------------- defects


def _scratch(image: np.ndarray, rng: np.random.Generator, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One to four roughly parallel thin curved lines, brighter or darker than the surface."""
    size = image.shape[0]
    centre = _random_point(rng, support, margin=2)
    length = rng.uniform(0.3, 0.65) * size
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.3, 0.3) * length
    half_width = max(0.7, size / 256 * rng.uniform(0.8, 2.0))
    spacing = max(2.0, size / 256 * rng.uniform(3.0, 7.0))
    alpha = np.zeros(support.shape)
    for line in range(rng.integers(1, 5)):
        line_length = length * rng.uniform(0.4, 1.0)
        line_centre = centre + normal * (line + rng.uniform(-0.3, 0.3)) * spacing
        line_centre = line_centre + direction * rng.uniform(-0.2, 0.2) * length
        line_start = line_centre - direction * line_length / 2
        line_end = line_centre + direction * line_length / 2
        control = line_centre + normal * bend * rng.uniform(0.7, 1.3) * line_length / length
        t = np.linspace(0, 1, int(line_length * 3) + 2)[:, None]
        points = (1 - t) ** 2 * line_start + 2 * (1 - t) * t * control + t**2 * line_end
        taper = 0.3 + 0.7 * np.sqrt(np.sin(np.pi * t[:, 0]))
        widths = np.maximum(half_width * rng.uniform(0.5, 1.0) * taper, 0.75)  # keeps the mask 4-connected
        alpha = np.maximum(alpha, _stroke_alpha(support.shape, points, widths))
    alpha = alpha * (support >= 0.5)
    target = np.clip(image + rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.4), 0, 1)
    return _apply(image, target, alpha)


def _pit(image: np.ndarray, rng: np.random.Generator, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dark, irregular elliptical pit with a shaded wall and a bright raised rim."""
    size = image.shape[0]
    area = rng.uniform(0.008, 0.04) * size * size
    aspect = rng.uniform(0.55, 1.0)
    major = math.sqrt(area / (math.pi * aspect))
    minor = major * aspect
    rim_width = max(1.0, 0.012 * size)
    cx, cy = _random_point(rng, support, margin=major + rim_width)
    theta = rng.uniform(0, np.pi)
    grid = np.arange(size) + 0.5
    x, y = np.meshgrid(grid - cx, grid - cy)
    pu = (math.cos(theta) * x + math.sin(theta) * y) / major
    pv = (-math.sin(theta) * x + math.cos(theta) * y) / minor
    inside = _blob_distance(pu, pv, 1.0, _random_harmonics(rng, 6, 0.15)) * major

    grad_y, grad_x = np.gradient(inside)
    norm = np.hypot(grad_x, grad_y) + 1e-9
    wall_facing = (grad_x * _LIGHT[0] + grad_y * _LIGHT[1]) / norm  # far wall faces the light
    depth = np.clip(inside / (0.7 * minor), 0, 1)
    floor = (image * 0.4 + 0.05) * ((1 - 0.35 * depth) * (1 + 0.6 * wall_facing * (1 - depth)))[..., None]
    rim_t = np.clip(-inside / rim_width, 0, 1)
    rim = image + (0.06 + 0.16 * np.sin(np.pi * rim_t) * (0.4 + 0.6 * np.clip(-wall_facing, 0, 1)))[..., None]
    target = np.clip(np.where((inside >= 0)[..., None], floor, rim), 0, 1)
    alpha = np.clip(inside + rim_width + 0.5, 0, 1) * (support >= 0.5)
    return _apply(image, target, alpha)


def _stain(image: np.ndarray, rng: np.random.Generator, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smooth irregular blob that tints (rust, oil) or darkens the surface, with soft edges."""
    size = image.shape[0]
    radius = math.sqrt(rng.uniform(0.012, 0.07) * size * size / math.pi)
    cx, cy = _random_point(rng, support, margin=0.3 * radius)
    grid = np.arange(size) + 0.5
    x, y = np.meshgrid(grid - cx, grid - cy)
    inside = _blob_distance(x, y, radius, _random_harmonics(rng, 6, 0.35))
    mottling = ndimage.gaussian_filter(rng.normal(size=support.shape), radius / 4)
    mottling = 0.75 + 0.25 * mottling / (np.abs(mottling).max() + 1e-9)
    ramp = np.clip(inside / (0.6 * radius), 0, 1) ** 0.7 * mottling
    alpha = np.where(inside >= 0, 0.5 + 0.5 * ramp, 0.5 * np.clip(1 + inside / 1.5, 0, 1)) * (support >= 0.5)

    edge = np.exp(-(((inside - 2.0) / (0.08 * radius + 1.0)) ** 2))  # darker "coffee ring" at the rim
    if image.shape[-1] == 3:
        tint = [np.array([0.85, 0.55, 0.35]), np.array([0.60, 0.58, 0.68])][rng.integers(2)]  # rust, oil
    else:
        tint = np.array([rng.uniform(0.55, 0.75)])
    target = _blend(image, image * tint * (1 - 0.15 * edge)[..., None], np.full(alpha.shape, rng.uniform(0.75, 1.0)))
    return _apply(image, target, alpha)


def _particle(image: np.ndarray, rng: np.random.Generator, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreign particle (debris, brass chip, rubber crumb) lying on the surface, with a drop shadow."""
    size = image.shape[0]
    radius = math.sqrt(rng.uniform(0.008, 0.03) * size * size / math.pi)
    cx, cy = _random_point(rng, support, margin=radius)
    harmonics = _random_harmonics(rng, 7, 0.5)
    grid = np.arange(size) + 0.5
    x, y = np.meshgrid(grid - cx, grid - cy)
    inside = _blob_distance(x, y, radius, harmonics)
    offset = max(1.0, 0.012 * size)
    shadow = np.clip(_blob_distance(x - offset, y - offset, radius, harmonics) / 2 + 0.5, 0, 1)
    body = np.clip(inside + 0.5, 0, 1)

    height = np.sqrt(np.clip(inside / (0.5 * radius), 0, 1)) * 0.5 * radius
    grad_y, grad_x = np.gradient(height)
    light = np.array([_LIGHT[0], _LIGHT[1], 1.2]) / np.linalg.norm([_LIGHT[0], _LIGHT[1], 1.2])
    facing = (-grad_x * light[0] - grad_y * light[1] + light[2]) / np.sqrt(grad_x**2 + grad_y**2 + 1)
    grain = 1 + 0.08 * ndimage.gaussian_filter(rng.normal(size=support.shape), 1.0) / 0.28
    colours = np.array([[0.24, 0.21, 0.18], [0.80, 0.62, 0.30], [0.10, 0.10, 0.11]])
    colour = colours[rng.integers(len(colours))]
    if image.shape[-1] == 1:
        colour = colour.mean(keepdims=True)
    particle = np.clip(colour * ((0.35 + 0.8 * np.clip(facing, 0, 1)) * grain)[..., None], 0, 1)

    shaded = _blend(image, image * 0.5, shadow)
    return _blend(shaded, particle, body), np.maximum(shadow, body) >= 0.5


def _missing_part(
    reference: np.ndarray, rng: np.random.Generator, size: int, look: _Look
) -> tuple[np.ndarray, np.ndarray]:
    """An undrilled bolt hole or a chunk broken off the rim; the mask is where the rendering differs."""
    if rng.random() < 0.5:
        defective, _ = _render_flange(size, look, undrilled_hole=int(rng.integers(len(_BOLT_ANGLES))))
    else:
        angle = rng.integers(4) * np.pi / 2 + math.radians(rng.uniform(-20, 20))
        distance = _OUTER_R + rng.uniform(-0.02, 0.02)
        chunk = _Chunk(
            center=(distance * math.cos(angle), distance * math.sin(angle)),
            radius=rng.uniform(0.08, 0.12),
            harmonics=_random_harmonics(rng, 9, 0.45),
        )
        defective, _ = _render_flange(size, look, chunk=chunk)
    changed = np.abs(defective - reference).max(axis=-1) > 0.5 / 255
    return defective, ndimage.binary_fill_holes(changed)


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _pit,
    "stain": _stain,
    "extra_part": _particle,
}


# --------------------------------------------------------------------------- geometry helpers


def _blend(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return image + alpha[..., None] * (target - image)


def _apply(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``target`` in with ``alpha``; the mask is alpha >= 0.5.

    Faint alpha more than two pixels from the mask (a soft edge whose core was
    clipped away by the support) is dropped, so that the mask covers every altered pixel.
    """
    mask = alpha >= 0.5
    alpha = alpha * ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=2)
    return _blend(image, target, alpha), mask


def _random_point(rng: np.random.Generator, support: np.ndarray, margin: float) -> np.ndarray:
    """Random pixel centre (x, y) fully inside ``support`` and at least ``margin`` px from the border."""
    size = support.shape[0]
    m = min(int(math.ceil(margin)), size // 2 - 1)
    ys, xs = np.nonzero(support[m : size - m, m : size - m] >= 0.99)
    k = rng.integers(len(ys))
    return np.array([xs[k] + m + 0.5, ys[k] + m + 0.5])


def _random_harmonics(rng: np.random.Generator, max_order: int, roughness: float) -> np.ndarray:
    """Rows of (order, amplitude, phase) describing a smooth random outline."""
    orders = np.arange(2, max_order + 1)
    amplitudes = roughness * rng.uniform(0, 1, len(orders)) / orders
    return np.column_stack([orders, amplitudes, rng.uniform(0, 2 * np.pi, len(orders))])


def _blob_distance(x: np.ndarray, y: np.ndarray, radius: float, harmonics: np.ndarray) -> np.ndarray:
    """Approximate signed distance (positive inside) to a star-shaped blob around the origin.

    The value changes by at least one unit per pixel along rays from the centre, so
    ``-d`` bounds the true distance to the outline for outside points.
    """
    phi = np.arctan2(y, x)
    outline = np.ones_like(phi)
    for order, amplitude, phase in harmonics:
        outline += amplitude * np.cos(order * phi + phase)
    return radius * outline - np.hypot(x, y)


def _stroke_alpha(shape: tuple[int, int], points: np.ndarray, half_widths: np.ndarray) -> np.ndarray:
    """Anti-aliased alpha of a densely sampled polyline (x, y points) with per-point half widths."""
    reach = float(half_widths.max()) + 2.0
    x0, y0 = np.maximum(np.floor(points.min(axis=0) - reach).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0) + reach).astype(int), [shape[1], shape[0]])
    alpha = np.zeros(shape)
    if x0 >= x1 or y0 >= y1:
        return alpha
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    distance, nearest = cKDTree(points).query(np.column_stack([xs.ravel(), ys.ravel()]), distance_upper_bound=reach)
    widths = np.append(half_widths, 0.0)  # index len(points) means "nothing within reach"
    alpha[y0:y1, x0:x1] = np.clip(widths[nearest] + 0.5 - np.minimum(distance, reach), 0, 1).reshape(ys.shape)
    return alpha
