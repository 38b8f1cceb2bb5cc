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
    # the 4 empty masks under ground_truth/uneven are left out of the defect sizes
    assert profile.counts.normal_train == 762 and profile.defects.masks == 388


# --- native aspect ratio, defect sizes ---------------------------------------------------------------------------

def _woven_fabric(seed: int, height: int = 256, width: int = 4096) -> np.ndarray:
    """A 16:1 woven fabric as a line-scan camera sees it: a weave whose yarns drift (random-walk phase), a random
    offset per image, and faint stripes fixed to the sensor rows that every image shares."""
    rng = np.random.default_rng(seed)
    y, x = np.arange(height)[:, None], np.arange(width)[None, :]
    drift = np.cumsum(rng.normal(0, 0.05, width))
    phase_y, phase_x = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * y / 9 + phase_y + 0.3 * drift) * np.sin(2 * np.pi * x / 11 + phase_x + drift)
    image = 0.5 + 0.2 * weave + 0.03 * np.sin(2 * np.pi * y / 37) + rng.normal(0, 0.05, (height, width))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _wide_part(seed: int, height: int = 96, width: int = 768) -> np.ndarray:
    """An aligned elongated part (a 8:1 rail with bolt holes) on a plain background, with sensor noise."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width), 0.1)
    image[30:66, 40:728] = 0.8
    yy, xx = np.mgrid[:height, :width]
    for cx in range(100, 700, 120):
        image[(yy - 48) ** 2 + (xx - cx) ** 2 < 100] = 0.1
    return (np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1) * 255).astype(np.uint8)


def _plain_dataset(root, images, masks=None):
    for i, image in enumerate(images):
        write_image(root / "good" / f"{i:03d}.png", image)
    for i, (image, mask) in enumerate(masks or []):
        write_image(root / "scratch" / f"{i:03d}.png", image)
        write_image(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


def test_structure_shape_keeps_the_median_aspect():
    from automl_ad.profiling.profile import structure_shape

    assert structure_shape(1.0) == (128, 128)
    assert structure_shape(16.0) == (128, 2048) and structure_shape(1 / 16) == (2048, 128)
    assert structure_shape(2.4565) == (128, 314)
    assert structure_shape(64.0) == (32, 2048)  # beyond 16:1 the long side stops, the short side shrinks


def test_wide_fabric_is_a_texture_not_an_aligned_object(tmp_path):
    from automl_ad.data.io import resize_image

    fabrics = [_woven_fabric(seed) for seed in range(30)]
    # squashed to a square, as profiling did before, the weave averages away and the shared stripes read as an
    # aligned object that template matching could handle
    squashed = np.stack([resize_image(f.astype(np.float32) / 255, 128) for f in fabrics])
    assert structure_stats(squashed).kind == "object" and alignment_stats(squashed).template_viable

    profile = profile_dataset(open_dataset(_plain_dataset(tmp_path / "fabric", fabrics)))
    assert profile.sample_hw == (128, 2048) and profile.size.aspect_median == 16.0
    assert profile.facts()["aspect"] == 16.0
    assert profile.structure.kind == "texture" and profile.structure.periodic
    assert not profile.alignment.template_viable and not profile.alignment.per_position_viable
    assert not profile.facts()["aligned"]


def test_wide_aligned_part_stays_an_aligned_object(tmp_path):
    profile = profile_dataset(open_dataset(_plain_dataset(tmp_path / "rail", [_wide_part(s) for s in range(20)])))
    assert profile.sample_hw == (128, 1024)
    assert profile.structure.kind == "object" and profile.alignment.template_viable


def test_defect_sizes_from_masks_in_pixels_fraction_and_cells(tmp_path):
    """Masks with one main defect of known short side (plus a speck that must not count) in 460x1130 images."""
    masks = []
    for i, side in enumerate((10, 20, 20, 40, 80)):
        mask = np.zeros((460, 1130), np.uint8)
        mask[100:100 + side, 200:200 + 3 * side] = 255
        mask[400:402, 1000:1002] = 255  # a 2-px fragment
        masks.append((noise_image(i, 8), mask))
    images = [np.full((460, 1130), 128, np.uint8) + noise_image(s, 1130, 1)[:460] // 8 for s in range(5)]
    root = _plain_dataset(tmp_path / "screws", images)
    for i, (_, mask) in enumerate(masks):
        write_image(root / "scratch" / f"{i:03d}.png", np.full((460, 1130), 100, np.uint8))
        write_image(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    profile = profile_dataset(open_dataset(root))
    d = profile.defects
    assert d.measured_masks == 5 and d.size_px_median == 20
    assert d.size_px_p10 == pytest.approx(np.percentile([10, 20, 20, 40, 80], 10))
    assert d.size_fraction_median == pytest.approx(20 / 460, abs=1e-4)
    # the default 256 squash shrinks x by 256/1130: a 20-px defect spans 20 * 0.2265 / 8 = 0.57 cells
    assert d.base_cells_median == pytest.approx(20 * 256 / 1130 / 8, abs=1e-3)
    px, source = profile.smallest_defect()
    assert px == d.size_px_p10 and "10th percentile of 5 masks" in source
    from automl_ad.data.geometry import Geometry

    assert profile.defect_cells(Geometry("tile", 256, 256, scale=1.0, overlap=32)) == pytest.approx(px / 8)


def test_smallest_defect_without_masks_is_an_assumed_fraction_or_declared(tmp_path):
    from automl_ad.defaults import SMALLEST_DEFECT_FRACTION
    from automl_ad.errors import ConfigError

    profile = profile_dataset(open_dataset(_plain_dataset(tmp_path / "rail", [_wide_part(s) for s in range(6)])))
    px, source = profile.smallest_defect()
    assert profile.defects is None and px == pytest.approx(SMALLEST_DEFECT_FRACTION * 96) and "assumed" in source
    declared = profile.with_overrides({"smallest_defect_px": 12})
    assert declared.smallest_defect() == (12.0, "declared in the constraint profile")
    assert declared.facts()["smallest_defect_px"] == 12
    with pytest.raises(ConfigError, match="smallest_defect_px"):
        profile.with_overrides({"smallest_defect_px": 0})


def test_old_profiles_must_be_profiled_again(tmp_path, mvtec_dir):
    data = profile_dataset(open_dataset(mvtec_dir)).to_dict()
    data["schema_version"] = 1
    with pytest.raises(ValueError, match="profile again"):
        DatasetProfile.from_dict(data)
