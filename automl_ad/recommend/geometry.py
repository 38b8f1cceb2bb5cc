"""Propose an input geometry from the profile: the least compute that keeps the smallest defect visible.

The rules (constants in :mod:`automl_ad.defaults`), from how a CNN feature map sees a defect:

1. **Visibility.** A feature map at stride ``s`` describes the image in ``s x s`` cells; the finest level of the
   families' default pyramid is ``s = 8`` (``GEOMETRY_FEATURE_STRIDE``). A defect spanning ``c`` cells contains at
   least ``floor(c) - 1`` whole cells wherever it falls, so it needs ``GEOMETRY_MIN_DEFECT_CELLS = 2`` cells on its
   short side for one feature vector to be computed mostly from defect pixels; below that every cell it touches
   mixes it with more normal surface than defect, and its signal fades into the normal variation. The smallest
   defect is :meth:`DatasetProfile.smallest_defect`: the 10th percentile of the masks, a declared size, or an
   assumed 5 % of the short side.
2. **No enlarging.** The scale needed (network pixels per image pixel) is ``2 * 8 / defect_px``, but never above 1:
   native pixels hold all the detail there is; enlarging makes cells smaller than pixels without adding any.
   A single view may still enlarge a small image up to the families' default side (256), as they always did.
   The view at native pixels (its long side the image's rounded to a multiple of 32) is always a candidate.
3. **Aspect.** When the images (10th to 90th percentile of their aspect ratios) lie within 3/4..4/3
   (``GEOMETRY_SQUASH_MAX_ASPECT``: the aspect jitter ImageNet backbones were trained with) a square squash;
   otherwise the aspect is kept: a letterbox into a box of the median aspect ratio, its short
   side rounded up to a multiple of the deepest stride (32), so the median image is padded by under 32 px, and at
   least 64 px (two cells of the deepest level).
4. **Single view or tiles.** A single view is 256..1024 px on its long side (``GEOMETRY_MAX_SINGLE_SIDE``: memory
   per inference stays bounded; a per-position model holds one covariance per cell). Otherwise square tiles
   (``GEOMETRY_TILE_SIDES``) at the needed scale, cut to the image on an axis it does not fill (rounded up to
   the deepest stride): a strip is tiled along its length only, without padding. Neighbouring tiles overlap by
   at least the typical (median) defect, so a typical defect lies whole inside one tile (a window no longer than
   the overlap always fits in one of two neighbours), and by at least two cells (cells next to a tile edge see
   padding); by at most a quarter of the tile, which bounds the extra work to (4/3)^2.
5. **Cost.** Each candidate's backbone time is estimated from its pixels per image (all tiles) with the cost model,
   using the lightest backbone with weights here and the heaviest route head, so every route can run it.
   Candidates over the latency budget (stated, or assumed for the device) are not chosen; if none fits, the
   cheapest. A stated budget excludes them; under an assumed one the cheapest candidate over it that shows the
   defect in more cells is still offered to the search (it measures what the extra time buys).
6. **Choice.** The cheapest candidate that keeps the smallest defect at 2 cells or more; if none does, the one
   that gives it the most cells (within 5 %), then the cheapest; ties go to fewer tiles. Alternatives for the
   search: the best other candidate of each mode, and the cheapest one that doubles the defect's cells over the
   default (a cheap first step).
"""

from __future__ import annotations

from dataclasses import dataclass

from automl_ad.constraints import ConstraintProfile
from automl_ad.data.geometry import Geometry, feature_cells, tile_grid
from automl_ad.defaults import (
    GEOMETRY_BASE_SIDE,
    GEOMETRY_FEATURE_STRIDE,
    GEOMETRY_MAX_SINGLE_SIDE,
    GEOMETRY_MIN_DEFECT_CELLS,
    GEOMETRY_SQUASH_MAX_ASPECT,
    GEOMETRY_TILE_SIDES,
)
from automl_ad.profiling import DatasetProfile
from automl_ad.recommend.cost import cost_model, heaviest_head_factor, latency_target_ms, pixels_ms

#: Deepest stride any family uses (feature_strides up to 32): network inputs are multiples of it.
_DEEPEST_STRIDE = 32
_SIDE_STEP = 64
_SAME_CELLS = 0.05


@dataclass(frozen=True)
class Candidate:
    """One geometry and what it gives for the median image."""

    geometry: Geometry
    cells: float  # the smallest defect, in feature cells
    tiles: int
    network_pixels: int
    backbone_ms: float  # estimated, lightest available backbone with the heaviest head

    def to_dict(self) -> dict:
        return {"geometry": self.geometry.to_dict(), "key": self.geometry.key(), "cells": round(self.cells, 2),
                "tiles": self.tiles, "network_pixels": self.network_pixels,
                "backbone_ms": round(self.backbone_ms, 1)}


@dataclass(frozen=True)
class GeometryProposal:
    """The proposed geometry, why, and the alternatives a search may try."""

    chosen: Candidate
    default: Candidate  # the families' default, a 256 x 256 squash
    # the best other candidate of each mode that fits the budget, a cheap step, and (budget assumed) one over it
    alternatives: tuple[Candidate, ...]
    image_hw: tuple[int, int]  # the median image it was planned for
    defect_px: float
    defect_source: str
    stride: int
    backbone: str
    target_ms: float
    reasons: tuple[str, ...]

    @property
    def geometry(self) -> Geometry:
        return self.chosen.geometry

    def to_dict(self) -> dict:
        return {**self.chosen.to_dict(), "default": self.default.to_dict(),
                "alternatives": [a.to_dict() for a in self.alternatives], "image_hw": list(self.image_hw),
                "smallest_defect_px": round(self.defect_px, 1), "defect_source": self.defect_source,
                "stride": self.stride, "min_cells": GEOMETRY_MIN_DEFECT_CELLS, "costed_with": self.backbone,
                "target_ms": round(self.target_ms, 1), "reasons": list(self.reasons)}


def _ceil_to(value: float, multiple: int) -> int:
    return int(-(-value // multiple) * multiple)


def _single_views(image_hw: tuple[int, int], elongation: float, squash: bool) -> list[Geometry]:
    """Squashes (near-square images) or letterboxes of the median aspect, long side 256..1024 in steps of 64, never
    enlarging the image beyond native pixels on both axes except at the default side; and the view at native
    pixels, its long side the image's rounded to the deepest stride (a 300x200 image was tiled for the native
    pixels a 288x192 letterbox gives: its 320-px view enlarges, its 256-px view loses 15%)."""
    height, width = image_hw

    def view(side: int) -> Geometry | None:
        if squash:
            return Geometry.squash(side)
        short = _ceil_to(side / elongation, _DEEPEST_STRIDE)
        if short < 2 * _DEEPEST_STRIDE:
            return None
        return Geometry("letterbox", short, side) if width >= height else Geometry("letterbox", side, short)

    def enlarges(geometry: Geometry) -> bool:
        return min(tile_grid(geometry, image_hw).scale_hw) > 1

    views = []
    for side in range(GEOMETRY_BASE_SIDE, GEOMETRY_MAX_SINGLE_SIDE + 1, _SIDE_STEP):
        candidate = view(side)
        if candidate is None:
            continue
        if side > GEOMETRY_BASE_SIDE and enlarges(candidate):
            break
        views.append(candidate)
    side = round(max(image_hw) / _DEEPEST_STRIDE) * _DEEPEST_STRIDE
    native = view(side) if GEOMETRY_BASE_SIDE < side <= GEOMETRY_MAX_SINGLE_SIDE else None
    if native is not None and native not in views:
        views.append(native)
    return views


def _tilings(image_hw: tuple[int, int], scale: float, typical_px: float) -> list[Geometry]:
    """Tiles of each side at ``scale``. When the image needs several, a side longer than the scaled image on an
    axis is cut to the image (rounded up to the deepest stride): a 2048x128 strip gets tiles of 128x256, not
    256x256 tiles that are half reflection. (One tile stays square: it is a view, compared with the others.)"""
    stride = GEOMETRY_FEATURE_STRIDE
    extent = [max(2 * _DEEPEST_STRIDE, _ceil_to(round(length * scale), _DEEPEST_STRIDE)) for length in image_hw]
    tilings = []
    for side in GEOMETRY_TILE_SIDES:
        tiling = None
        for height, width in ((min(side, extent[0]), min(side, extent[1])), (side, side)):
            overlap = min(min(height, width) // 4, max(2 * stride, _ceil_to(typical_px * scale, stride)))
            tiling = Geometry("tile", height, width, scale=scale, overlap=overlap)
            if tile_grid(tiling, image_hw).n_tiles > 1:
                break
        if tiling not in tilings:
            tilings.append(tiling)
    return tilings


def _candidate(geometry: Geometry, image_hw, defect_px: float, gmac: float, constraints, head: float) -> Candidate:
    grid = tile_grid(geometry, image_hw)
    return Candidate(geometry, feature_cells(geometry, image_hw, defect_px, GEOMETRY_FEATURE_STRIDE), grid.n_tiles,
                     grid.network_pixels, pixels_ms(gmac, grid.network_pixels, constraints) * head)


def _cheapest(candidates: list[Candidate]) -> Candidate:
    return min(candidates, key=lambda c: (c.network_pixels, c.tiles))


def _why(chosen: Candidate, aspects: str, typical_px: float) -> str:
    geometry = chosen.geometry
    if geometry.mode == "squash":
        return f"aspects {aspects}, within the 3/4..4/3 jitter ImageNet backbones were trained with"
    if geometry.mode == "letterbox":
        return f"aspects {aspects} kept instead of squashed"
    if chosen.tiles == 1:
        return "one tile holds the whole image at this scale"
    typical = typical_px * geometry.scale
    overlap = (f"a typical defect ({typical:.0f} px at this scale) lies whole in one tile"
               if geometry.overlap >= typical else "capped at a quarter of the tile")
    return f"{chosen.tiles} tiles per image; overlap {geometry.overlap} px: {overlap}"


def propose_geometry(profile: DatasetProfile, constraints: ConstraintProfile, backbone: str) -> GeometryProposal:
    """The geometry for ``profile`` under ``constraints``, costed with ``backbone`` (the lightest one available)."""
    gmac = next(b["gmac_224"] for b in cost_model()["backbones"] if b["name"] == backbone)
    head = heaviest_head_factor()
    target, stated = latency_target_ms(constraints)
    image_hw = profile.size.median_hw
    elongation = max(image_hw) / min(image_hw)
    size = profile.size
    spread = [max(a, 1 / a) for a in (size.aspect_p10, size.aspect_median, size.aspect_p90)]
    squash = max(spread) <= GEOMETRY_SQUASH_MAX_ASPECT + 1e-9
    aspects = (f"{size.aspect_median:.2f}" if size.aspect_p10 == size.aspect_p90 else
               f"{size.aspect_p10:.2f}-{size.aspect_p90:.2f}") + " (width/height)"
    defect_px, source = profile.smallest_defect()
    stride, need = GEOMETRY_FEATURE_STRIDE, GEOMETRY_MIN_DEFECT_CELLS
    needed_scale = need * stride / defect_px
    scale = min(1.0, _ceil_to(needed_scale * 100, 1) / 100)
    typical_px = profile.defects.size_px_median if profile.defects and profile.defects.measured_masks else defect_px

    make = lambda g: _candidate(g, image_hw, defect_px, gmac, constraints, head)  # noqa: E731
    default = make(Geometry.squash(GEOMETRY_BASE_SIDE))
    candidates = [make(g) for g in _single_views(image_hw, elongation, squash)]
    # a tiling that fits the image in one tile is a view; worth having only at native pixels (none of the views
    # can give those when the image is larger than 256), and only when those show the defect larger than the
    # default (a 96-px image in a 256-px tile at native scale shows it smaller than the default squash does)
    candidates += [c for c in map(make, _tilings(image_hw, scale, typical_px))
                   if c.tiles > 1 or (scale == 1 and c.cells > default.cells * (1 + _SAME_CELLS))]
    affordable = [c for c in candidates if c.backbone_ms <= target] or [_cheapest(candidates)]
    visible = [c for c in affordable if c.cells >= need - 1e-9]
    if visible:
        chosen = _cheapest(visible)
    else:
        most = max(c.cells for c in affordable)
        chosen = _cheapest([c for c in affordable if c.cells >= most * (1 - _SAME_CELLS)])

    budget = f"{'your' if stated else 'an assumed'} {target:g} ms budget on {constraints.hardware.device}"
    reasons = [(f"smallest defect ~{defect_px:.0f} px ({source}) in {image_hw[1]}x{image_hw[0]} images "
                f"(median; aspect {elongation:.2f}:1)"),
               (f"a defect needs >= {need} feature cells at stride {stride} to fill one cell wherever it falls; the "
                f"default {default.geometry.describe()} gives it {default.cells:.1f}")]
    if chosen.geometry == default.geometry:
        reasons.append("the default is kept" + (": no larger view is needed" if visible else ""))
    else:
        reasons.append(f"proposed: {chosen.geometry.describe()}, giving it {chosen.cells:.1f} cells "
                       f"({_why(chosen, aspects, typical_px)})")
    if not visible:
        limit = (budget if any(c.cells >= need - 1e-9 for c in candidates) else
                 "native pixels (enlarging adds no detail)")
        reasons.append(f"no geometry reaches {need} cells within {limit}: this one gives the most")
    over = [c for c in candidates if c.backbone_ms > target and c.cells > chosen.cells * (1 + _SAME_CELLS)]
    finer = _cheapest(over) if over else None
    if finer:
        reasons.append(f"{finer.geometry.describe()} would give {finer.cells:.1f} cells but needs ~"
                       f"{finer.backbone_ms:.0f} ms, over {budget}" + ("" if stated else
                       ": the search tries it anyway, since no budget was stated (a --profile with "
                       "latency_ms rules it out)"))
    reasons.append(f"estimated backbone time ~{chosen.backbone_ms:.0f} ms per image with {backbone} "
                   f"(x{head:g} for the heaviest route head) against {budget}")
    alternatives = []
    for mode in ("squash", "letterbox", "tile"):
        others = [c for c in affordable if c.geometry.mode == mode and c.geometry not in (chosen.geometry,
                                                                                           default.geometry)]
        if others:
            alternatives.append(max(others, key=lambda c: (round(c.cells, 1), -c.network_pixels)))
    # a cheap step: the least compute that doubles the smallest defect's cells over the default (a search tries
    # the cheapest proposal first, so it learns early whether more resolution pays)
    steps = [c for c in affordable if c.cells >= 2 * default.cells and c.network_pixels < chosen.network_pixels
             and c.geometry != default.geometry and c not in alternatives]
    if steps:
        alternatives.append(_cheapest(steps))
    if finer and not stated:  # an assumed budget ranks the candidates; only a stated one excludes
        alternatives.append(finer)
    return GeometryProposal(chosen, default, tuple(alternatives), image_hw, defect_px, source, stride, backbone,
                            target, tuple(reasons))
