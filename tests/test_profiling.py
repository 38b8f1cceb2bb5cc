"""Dataset profile facts: texture vs object, periodicity, alignment, colour, sizes, defect statistics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BOTTLE, MAGNETIC_TILE, needs, noise_image, write_image
from skimage import data as skdata

from automl_ad.data import open_dataset
from automl_ad.profiling import DatasetProfile, profile_dataset
from automl_ad.profiling.structure import alignment_stats, structure_stats


def _crops(texture: np.ndarray, n: int = 30, size: int = 160, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, texture.shape[0] - size, 2)
        out.append(texture[y:y + size, x:x + size])
    return out


def _as_stack(images, resolution=128):
    from skimage.transform import resize

    return np.stack([resize(i.astype(np.float32) / 255, (resolution, resolution), anti_aliasing=True)
                     for i in images])


@pytest.mark.parametrize("name", ["brick", "grass", "gravel"])
def test_skimage_texture_crops_are_texture(name):
    stats = structure_stats(_as_stack(_crops(getattr(skdata, name)())))
    assert stats.kind == "texture" and stats.confidence > 0.7
    assert not alignment_stats(_as_stack(_crops(getattr(skdata, name)()))).template_viable


def test_brick_is_periodic_and_gravel_is_not():
    assert structure_stats(_as_stack(_crops(skdata.brick()))).periodic
    assert not structure_stats(_as_stack(_crops(skdata.gravel()))).periodic


def _object_images(n=20, shift=0, seed=0):
    """A bright bracket with two holes on a dark background, optionally shifted/rotated at random."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    base = np.zeros((128, 128), np.float32) + 0.1
    base[30:98, 24:104] = 0.8
    yy, xx = np.mgrid[:128, :128]
    for cy, cx in ((64, 44), (64, 84)):
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] = 0.1
    images = []
    for _ in range(n):
        image = base + rng.normal(0, 0.02, base.shape).astype(np.float32)
        if shift:
            image = ndimage.rotate(image, rng.uniform(0, 360), reshape=False, mode="nearest")
            image = ndimage.shift(image, rng.uniform(-shift, shift, 2), mode="nearest")
        images.append(image)
    return np.stack(images)


def test_aligned_object_is_object_and_registers():
    images = _object_images()
    assert structure_stats(images).kind == "object"
    alignment = alignment_stats(images)
    assert alignment.template_viable and alignment.per_position_viable


def test_unaligned_object_is_still_object_but_not_template_viable():
    images = _object_images(shift=20)
    assert structure_stats(images).kind == "object"
    assert not alignment_stats(images).per_position_viable


def test_profile_counts_colour_and_json_round_trip(mvtec_dir, tmp_path):
    gray = noise_image(7, channels=1)
    write_image(mvtec_dir / "train" / "good" / "gray_rgb.png", np.dstack([gray] * 3))
    profile = profile_dataset(open_dataset(mvtec_dir))
    assert profile.counts.normal_train == 7 and profile.counts.abnormal == {"crack": 2}
    assert profile.counts.masks == 2 and profile.color.effectively_gray_color_files == 1
    assert profile.color.mode == "mixed" and profile.color.bit_depths == [8]
    assert profile.size.width_min == 32 and profile.size.distinct_sizes == 1
    assert profile.defects.area_fraction_median == pytest.approx(64 / 1024)
    path = profile.save(tmp_path / "p.json")
    assert DatasetProfile.load(path) == profile


def test_overrides_replace_facts(mvtec_dir):
    profile = profile_dataset(open_dataset(mvtec_dir)).with_overrides({"kind": "texture", "aligned": True})
    facts = profile.facts()
    assert facts["kind"] == "texture" and facts["aligned"] and facts["per_position_aligned"]


@needs(BOTTLE)
def test_bottle_is_an_aligned_object():
    profile = profile_dataset(open_dataset(BOTTLE))
    assert profile.structure.kind == "object" and profile.structure.confidence > 0.8
    assert profile.alignment.template_viable
    assert profile.color.mode == "color"


@needs(MAGNETIC_TILE)
def test_magnetic_tile_is_an_unaligned_texture():
    profile = profile_dataset(open_dataset(MAGNETIC_TILE))
    assert profile.structure.kind == "texture" and profile.structure.confidence > 0.8
    assert not profile.alignment.template_viable
    assert profile.color.mode == "gray" and profile.size.distinct_sizes > 100
    assert profile.counts.normal_train == 762 and profile.defects.masks == 392
