"""Heatmap overlays and the PNGs automl-ad writes."""

from __future__ import annotations

import matplotlib
import numpy as np

from automl_ad.data.io import read_image, save_png
from automl_ad.figures.heatmaps import overlay


def test_overlay_colours_the_map_as_matplotlibs_jet_and_outlines_the_mask():
    rng = np.random.default_rng(0)
    image, anomaly_map = rng.random((40, 90, 3)), rng.random((40, 90)) * 3 - 0.5
    mask = np.zeros((40, 90), bool)
    mask[10:30, 20:60] = True
    picture = overlay(image, anomaly_map, 0.0, 2.0, mask)
    heat = np.clip(anomaly_map / 2.0, 0, 1)
    expected = (np.clip(0.55 * image + 0.45 * matplotlib.colormaps["jet"](heat)[..., :3], 0, 1) * 255).astype(np.uint8)
    inside = np.zeros_like(mask)
    inside[13:27, 23:57] = True  # away from the outline
    outside = ~mask
    outside[8:32, 18:62] = False
    for region in (inside, outside):
        assert np.abs(picture[region].astype(int) - expected[region]).max() <= 1
    outline = mask & ~inside
    assert (picture[10, 20:60] == 255).all() and not (expected[outline] == 255).all()


def test_save_png_is_lossless_for_8_bit_colour_and_16_bit_gray(tmp_path):
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    gray = rng.integers(0, 65536, (30, 50), dtype=np.uint16)
    for name, array in (("colour.png", colour), ("gray.png", gray)):
        save_png(tmp_path / name, array)
        assert np.array_equal(read_image(tmp_path / name), array)
