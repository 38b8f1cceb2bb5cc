"""Input geometry: how an image of any size and aspect becomes network inputs, and how maps go back.

A :class:`Geometry` is one of three modes:

* ``squash`` — resize the whole image to ``height`` x ``width``, ignoring its aspect ratio (what every family did
  before geometry was searched, at 256 x 256).
* ``letterbox`` — resize keeping the aspect ratio so the image fits inside ``height`` x ``width``, centre it and
  fill the rest by the padding policy ``pad``. The stitched map is cropped back to the image, so padding never
  scores.
* ``tile`` — resize by ``scale`` (network pixels per image pixel; 1.0 = native pixels), then cover the result with
  ``height`` x ``width`` tiles that overlap by at least ``overlap`` network pixels. An axis shorter than a tile is
  padded (centred) to one tile. Maps of overlapping tiles are averaged.

Padding policies (``pad``): ``reflect`` (default: mirrored image content, so no artificial edge appears at the
image border and the band near it is computed from image-like context), ``edge`` (repeat the border pixel) or
``constant`` (mid grey 0.5).

:func:`tile_grid` turns a geometry and an image size into a :class:`TileGrid` (resize target, padding, tile
origins); :func:`to_tiles` cuts an image into network inputs and :func:`stitch` maps per-tile score maps (at any
resolution) back to the full image. Every other layer takes its geometry from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from automl_ad.data.io import resize_image
from automl_ad.errors import ConfigError

MODES = ("squash", "letterbox", "tile")
PAD_POLICIES = ("reflect", "edge", "constant")
_CONSTANT_FILL = 0.5
_MIN_SIDE = 8


@dataclass(frozen=True)
class Geometry:
    """Network input geometry; ``height`` x ``width`` is the network input (one tile for ``tile``)."""

    mode: str = "squash"
    height: int = 256
    width: int = 256
    scale: float | None = None  # tile only: network pixels per image pixel
    overlap: int = 0  # tile only: least overlap of neighbouring tiles, network pixels
    pad: str = "reflect"  # letterbox borders and tiles past the image edge

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.pad not in PAD_POLICIES:
            problems.append(f"pad {self.pad!r} is not one of {', '.join(PAD_POLICIES)}")
        for name in ("height", "width", "overlap"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                problems.append(f"{name} must be a whole number of pixels, got {value!r}")
        if not problems:
            if min(self.height, self.width) < _MIN_SIDE:
                problems.append(f"the network input {self.height}x{self.width} is smaller than {_MIN_SIDE} pixels")
            if self.mode == "tile":
                if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not (
                        math.isfinite(self.scale) and self.scale > 0):
                    problems.append(f"tile mode needs a positive finite scale, got {self.scale!r}")
                if not 0 <= self.overlap < min(self.height, self.width) // 2 + 1:
                    problems.append(f"overlap {self.overlap} must be between 0 and half the tile side "
                                    f"({min(self.height, self.width) // 2})")
            elif self.scale is not None or self.overlap:
                problems.append(f"scale and overlap apply to tile mode only, not {self.mode}")
        if problems:
            raise ConfigError(f"invalid input geometry {self._describe()}: " + "; ".join(problems))

    def _describe(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())

    @property
    def input_hw(self) -> tuple[int, int]:
        """The network input (one tile in tile mode)."""
        return int(self.height), int(self.width)

    def key(self) -> str:
        """A stable, readable identity for cache keys and run names, e.g. ``tile-256x256-s0.5-o32-reflect``."""
        if self.mode == "squash":
            return f"squash-{self.height}x{self.width}"
        if self.mode == "letterbox":
            return f"letterbox-{self.height}x{self.width}-{self.pad}"
        return f"tile-{self.height}x{self.width}-s{self.scale:.6g}-o{self.overlap}-{self.pad}"

    def describe(self) -> str:
        """One line for people."""
        if self.mode == "squash":
            return f"squash to {self.height}x{self.width}"
        if self.mode == "letterbox":
            return f"letterbox into {self.height}x{self.width} (aspect kept, {self.pad} padding)"
        return (f"tiles of {self.height}x{self.width} at scale {self.scale:.3g} overlapping by at least "
                f"{self.overlap} px ({self.pad} padding)")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "height": int(self.height), "width": int(self.width),
                "scale": None if self.scale is None else float(self.scale), "overlap": int(self.overlap),
                "pad": self.pad}

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        if not isinstance(data, dict):
            raise ConfigError(f"an input geometry must be a mapping (mode, height, width, ...), got {data!r}")
        unknown = set(data) - {"mode", "height", "width", "scale", "overlap", "pad"}
        if unknown:
            raise ConfigError(f"input geometry: unknown keys {sorted(unknown)}; use mode, height, width, scale, "
                              "overlap, pad")
        return cls(**data)

    @classmethod
    def squash(cls, side: int) -> Geometry:
        return cls("squash", side, side)


@dataclass(frozen=True)
class TileGrid:
    """Where an image of ``image_hw`` goes: resized to ``resized_hw``, padded by ``padding`` (top, bottom, left,
    right; filled by the policy ``pad``) to ``canvas_hw``, and cut into ``tile_hw`` tiles whose top-left corners
    are ``origins``."""

    image_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    padding: tuple[int, int, int, int]
    canvas_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    origins: tuple[tuple[int, int], ...]
    pad: str = "reflect"

    @property
    def n_tiles(self) -> int:
        return len(self.origins)

    @property
    def network_pixels(self) -> int:
        """Pixels the network processes for this image (all tiles, padding included)."""
        return self.n_tiles * self.tile_hw[0] * self.tile_hw[1]

    @property
    def scale_hw(self) -> tuple[float, float]:
        """Network pixels per image pixel, per axis."""
        return self.resized_hw[0] / self.image_hw[0], self.resized_hw[1] / self.image_hw[1]


def geometry_label(params: dict) -> str | None:
    """A detector's input geometry in a few characters, from its parameters (``geometry``, else the square
    ``input_size``): e.g. ``tile-256x256-s1-o16-reflect``, ``squash-256x256``; None when it has neither."""
    if params.get("geometry"):
        return Geometry.from_dict(params["geometry"]).key()
    size = params.get("input_size")
    return None if size is None else Geometry.squash(int(size)).key()


def resize_target(geometry: Geometry, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The size an ``image_hw`` image is resized to before padding and tiling."""
    height, width = _check_hw(image_hw)
    if geometry.mode == "squash":
        return geometry.input_hw
    factor = (min(geometry.height / height, geometry.width / width) if geometry.mode == "letterbox"
              else geometry.scale)
    target = (max(1, round(height * factor)), max(1, round(width * factor)))
    if geometry.mode == "letterbox":  # rounding never pushes the image out of the box
        target = (min(target[0], geometry.height), min(target[1], geometry.width))
    return target


def axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering ``[0, length)`` with tiles of ``tile`` overlapping by at least ``overlap``.

    ``n = ceil((length - overlap) / (tile - overlap))`` tiles, spread evenly from 0 to ``length - tile`` (integer
    steps of at most ``tile - overlap``, so every overlap is at least ``overlap``). ``length <= tile``: one tile.
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    n = -(-(length - overlap) // step)
    return [(i * (length - tile)) // (n - 1) for i in range(n)]


def tile_grid(geometry: Geometry, image_hw: tuple[int, int]) -> TileGrid:
    """The full plan for one image: resize target, padding, canvas and tile origins (one tile unless tiling)."""
    image_hw = _check_hw(image_hw)
    resized = resize_target(geometry, image_hw)
    canvas = (max(resized[0], geometry.height), max(resized[1], geometry.width))
    pad_h, pad_w = canvas[0] - resized[0], canvas[1] - resized[1]
    padding = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    rows = axis_origins(canvas[0], geometry.height, geometry.overlap)
    cols = axis_origins(canvas[1], geometry.width, geometry.overlap)
    return TileGrid(image_hw, resized, padding, canvas, geometry.input_hw, tuple((y, x) for y in rows for x in cols),
                    geometry.pad)


def feature_cells(geometry: Geometry, image_hw: tuple[int, int], size_px: float, stride: int) -> float:
    """How many feature cells (at ``stride``) a structure ``size_px`` image pixels across spans in the network
    input, along the axis that shrinks it most."""
    return size_px * min(tile_grid(geometry, image_hw).scale_hw) / stride


def to_tiles(image: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Network inputs ``(n_tiles, tile_h, tile_w[, C])`` (float32) from an image of ``grid.image_hw``."""
    if tuple(image.shape[:2]) != grid.image_hw:
        raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}, the grid was made for "
                         f"{grid.image_hw[0]}x{grid.image_hw[1]}")
    canvas = _pad(resize_image(image.astype(np.float32, copy=False), grid.resized_hw), grid.padding, grid.pad)
    th, tw = grid.tile_hw
    return np.stack([canvas[y:y + th, x:x + tw] for y, x in grid.origins])


def map_shape(image_hw: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """An image's (height, width) scaled down, aspect kept, to at most ``max_pixels`` (unchanged when smaller)."""
    height, width = _check_hw(image_hw)
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    return max(1, round(height * scale)), max(1, round(width * scale))


def stitch(tile_maps: np.ndarray, grid: TileGrid, out_hw: tuple[int, int] | None = None) -> np.ndarray:
    """One map from per-tile maps ``(n_tiles, h, w)`` at any resolution (each is resized to the tile, overlaps are
    averaged, padding is cropped, the result is resized to ``out_hw``, by default the image's ``image_hw``)."""
    tile_maps = np.asarray(tile_maps, dtype=np.float32)
    if tile_maps.ndim != 3 or len(tile_maps) != grid.n_tiles:
        raise ValueError(f"expected {grid.n_tiles} maps of shape (h, w), got an array of shape {tile_maps.shape}")
    total = np.zeros(grid.canvas_hw, np.float64)
    count = np.zeros(grid.canvas_hw, np.float64)
    th, tw = grid.tile_hw
    for (y, x), tile_map in zip(grid.origins, tile_maps):
        total[y:y + th, x:x + tw] += resize_image(tile_map, grid.tile_hw)
        count[y:y + th, x:x + tw] += 1
    top, _, left, _ = grid.padding
    rh, rw = grid.resized_hw
    content = (total / count)[top:top + rh, left:left + rw].astype(np.float32)
    return resize_image(content, out_hw or grid.image_hw)


def _pad(image: np.ndarray, padding: tuple[int, int, int, int], pad: str) -> np.ndarray:
    top, bottom, left, right = padding
    if not any(padding):
        return image
    widths = [(top, bottom), (left, right)] + [(0, 0)] * (image.ndim - 2)
    if pad == "constant":
        return np.pad(image, widths, mode="constant", constant_values=_CONSTANT_FILL)
    return np.pad(image, widths, mode=pad)


def _check_hw(image_hw) -> tuple[int, int]:
    height, width = (int(v) for v in image_hw)
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} has no pixels")
    return height, width
