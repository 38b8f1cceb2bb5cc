"""Input geometry: resize targets, padding, tile grids with overlap, and stitching maps back to the image."""

from __future__ import annotations

import numpy as np
import pytest

from automl_ad.data.geometry import Geometry, axis_origins, feature_cells, resize_target, stitch, tile_grid, to_tiles
from automl_ad.errors import ConfigError


def _smooth_image(height: int, width: int, channels: int | None = None) -> np.ndarray:
    y, x = np.mgrid[:height, :width] / max(height, width)
    image = (0.5 + 0.3 * np.sin(3 * x + 1) * np.cos(2 * y)).astype(np.float32)
    return np.dstack([image, 1 - image, image * 0.5]) if channels else image


def _coverage(grid):
    covered = np.zeros(grid.canvas_hw, int)
    th, tw = grid.tile_hw
    for y, x in grid.origins:
        assert 0 <= y and y + th <= grid.canvas_hw[0] and 0 <= x and x + tw <= grid.canvas_hw[1]
        covered[y:y + th, x:x + tw] += 1
    return covered


@pytest.mark.parametrize("length,tile,overlap", [(1000, 256, 32), (4096, 256, 16), (257, 256, 0), (513, 256, 64),
                                                 (256, 256, 32), (100, 256, 32), (9999, 384, 96)])
def test_axis_origins_cover_with_at_least_the_overlap(length, tile, overlap):
    origins = axis_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] == max(0, length - tile)
    steps = np.diff(origins)
    assert (steps > 0).all() and (steps <= tile - overlap).all()  # neighbours overlap by >= overlap
    if length > tile:  # no more tiles than needed for that overlap
        assert len(origins) == int(np.ceil((length - overlap) / (tile - overlap)))


@pytest.mark.parametrize("image_hw", [(256, 4096), (4096, 256), (460, 1130), (100, 60), (7, 3000), (256, 256)])
def test_tile_grid_covers_the_whole_image(image_hw):
    geometry = Geometry("tile", 256, 256, scale=1.0, overlap=32)
    grid = tile_grid(geometry, image_hw)
    covered = _coverage(grid)
    top, bottom, left, right = grid.padding
    assert grid.canvas_hw == (grid.resized_hw[0] + top + bottom, grid.resized_hw[1] + left + right)
    assert (covered[top:top + grid.resized_hw[0], left:left + grid.resized_hw[1]] >= 1).all()
    assert grid.resized_hw == image_hw  # scale 1: native pixels


def test_extreme_aspect_tiles_run_along_the_long_side():
    wide = tile_grid(Geometry("tile", 256, 256, scale=1.0, overlap=16), (256, 4096))
    tall = tile_grid(Geometry("tile", 256, 256, scale=1.0, overlap=16), (4096, 256))
    assert wide.n_tiles == tall.n_tiles == 17 and {y for y, _ in wide.origins} == {0}
    assert {x for _, x in tall.origins} == {0} and wide.padding == tall.padding == (0, 0, 0, 0)


def test_image_smaller_than_a_tile_is_padded_to_one_tile_and_stitched_back():
    geometry = Geometry("tile", 256, 256, scale=1.0, overlap=32)
    image = _smooth_image(100, 60)
    grid = tile_grid(geometry, image.shape)
    assert grid.n_tiles == 1 and grid.canvas_hw == (256, 256) and grid.padding == (78, 78, 98, 98)
    tiles = to_tiles(image, grid)
    assert tiles.shape == (1, 256, 256)
    np.testing.assert_allclose(tiles[0, 78:178, 98:158], image, atol=1e-6)
    np.testing.assert_allclose(stitch(tiles, grid), image, atol=1e-6)


@pytest.mark.parametrize("geometry,image_hw", [
    (Geometry("tile", 256, 256, scale=1.0, overlap=32), (460, 1130)),
    (Geometry("tile", 128, 128, scale=1.0, overlap=16), (256, 4096)),
    (Geometry("tile", 128, 128, scale=1.0, overlap=16), (4096, 256)),
    (Geometry("squash", 64, 64), (64, 64)),
    (Geometry("letterbox", 96, 256), (96, 256)),
])
def test_round_trip_at_native_scale_is_exact(geometry, image_hw):
    image = _smooth_image(*image_hw)
    grid = tile_grid(geometry, image_hw)
    np.testing.assert_allclose(stitch(to_tiles(image, grid), grid), image, atol=1e-6)


@pytest.mark.parametrize("geometry", [Geometry.squash(256), Geometry("letterbox", 256, 256),
                                      Geometry("letterbox", 128, 320, pad="edge"),
                                      Geometry("tile", 256, 256, scale=0.5, overlap=32, pad="constant")])
@pytest.mark.parametrize("image_hw", [(460, 1130), (1130, 460), (300, 300)])
def test_round_trip_through_resizing_stays_close(geometry, image_hw):
    image = _smooth_image(*image_hw)
    grid = tile_grid(geometry, image_hw)
    tiles = to_tiles(image, grid)
    assert tiles.shape == (grid.n_tiles, *geometry.input_hw)
    back = stitch(tiles, grid)
    assert back.shape == image_hw and np.abs(back - image).max() < 0.02


def test_colour_images_keep_their_channels():
    image = _smooth_image(200, 500, channels=3)
    grid = tile_grid(Geometry("tile", 128, 128, scale=1.0, overlap=16), (200, 500))
    tiles = to_tiles(image, grid)
    assert tiles.shape == (grid.n_tiles, 128, 128, 3)


def test_letterbox_keeps_aspect_and_pads_by_policy():
    geometry = Geometry("letterbox", 256, 256, pad="constant")
    grid = tile_grid(geometry, (460, 1130))
    assert grid.resized_hw == (104, 256) and grid.padding == (76, 76, 0, 0) and grid.n_tiles == 1
    sy, sx = grid.scale_hw
    assert abs(sy - sx) < 0.01  # aspect kept
    tile = to_tiles(_smooth_image(460, 1130), grid)[0]
    assert (tile[:76] == 0.5).all() and (tile[-76:] == 0.5).all()
    reflected = to_tiles(_smooth_image(460, 1130), tile_grid(Geometry("letterbox", 256, 256), (460, 1130)))[0]
    np.testing.assert_allclose(reflected[75], reflected[77])  # mirrored about the first image row


def test_squash_ignores_aspect():
    grid = tile_grid(Geometry.squash(256), (460, 1130))
    assert grid.resized_hw == (256, 256) and grid.padding == (0, 0, 0, 0) and grid.n_tiles == 1
    assert resize_target(Geometry.squash(256), (4096, 256)) == (256, 256)


def test_overlaps_are_averaged():
    geometry = Geometry("tile", 64, 64, scale=1.0, overlap=32)
    grid = tile_grid(geometry, (64, 96))
    assert grid.origins == ((0, 0), (0, 32))
    maps = np.stack([np.full((8, 8), 1.0), np.full((8, 8), 3.0)])  # maps at 1/8 resolution
    stitched = stitch(maps, grid)
    np.testing.assert_allclose(stitched[:, :32], 1.0, atol=1e-6)
    np.testing.assert_allclose(stitched[:, 32:64], 2.0, atol=1e-6)
    np.testing.assert_allclose(stitched[:, 64:], 3.0, atol=1e-6)


def test_feature_cells_follow_the_most_shrunk_axis():
    # an 18-px defect in a 1130x460 image, squashed to 256: x shrinks by 0.227 -> 4 px -> half a stride-8 cell
    assert feature_cells(Geometry.squash(256), (460, 1130), 18, 8) == pytest.approx(18 * 256 / 1130 / 8)
    assert feature_cells(Geometry("tile", 256, 256, scale=1.0, overlap=32), (460, 1130), 18, 8) == 2.25


def test_dict_round_trip_and_keys():
    geometries = [Geometry.squash(256), Geometry("letterbox", 224, 512, pad="edge"),
                  Geometry("tile", 384, 384, scale=0.75, overlap=64)]
    for geometry in geometries:
        assert Geometry.from_dict(geometry.to_dict()) == geometry
    keys = [g.key() for g in geometries]
    assert keys == ["squash-256x256", "letterbox-224x512-edge", "tile-384x384-s0.75-o64-reflect"]
    assert Geometry("tile", 384, 384, scale=0.75, overlap=32).key() != keys[2]


@pytest.mark.parametrize("bad", [dict(mode="crop"), dict(pad="wrap"), dict(height=4), dict(width=256.5),
                                 dict(mode="tile", scale=None), dict(mode="tile", scale=0.0),
                                 dict(mode="tile", scale=float("nan")), dict(mode="tile", scale=1.0, overlap=200),
                                 dict(mode="squash", scale=1.0), dict(mode="letterbox", overlap=8)])
def test_invalid_geometries_are_refused_with_the_reason(bad):
    with pytest.raises(ConfigError, match="invalid input geometry"):
        Geometry(**{"mode": "squash", **bad})
    with pytest.raises(ConfigError, match="unknown keys"):
        Geometry.from_dict({"mode": "squash", "size": 256})


def test_grid_and_stitch_refuse_mismatched_inputs():
    grid = tile_grid(Geometry("tile", 64, 64, scale=1.0, overlap=0), (64, 128))
    with pytest.raises(ValueError, match="grid was made for"):
        to_tiles(np.zeros((64, 64), np.float32), grid)
    with pytest.raises(ValueError, match="expected 2 maps"):
        stitch(np.zeros((3, 8, 8)), grid)
    with pytest.raises(ValueError, match="no pixels"):
        tile_grid(Geometry.squash(64), (0, 10))
