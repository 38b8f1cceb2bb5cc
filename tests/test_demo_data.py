"""Tests for the built-in synthetic demo dataset."""

import itertools
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from automl_ad.data.demo import DEMO_CATEGORIES, MARKER_FILE, generate_demo, render_sample

PARAMS = dict(n_train=4, n_test_good=2, n_test_per_defect=2, size=64, seed=3)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    roots = generate_demo(out, **PARAMS)
    assert roots == {category: out / category for category in DEMO_CATEGORIES}
    return out


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ncc(a, b):
    a = (a - a.mean()) / a.std()
    b = (b - b.mean()) / b.std()
    return float((a * b).mean())


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_layout(demo_root, category):
    root = demo_root / category
    defects = DEMO_CATEGORIES[category]
    assert _names(root) == sorted(["train", "test", "ground_truth", MARKER_FILE])
    assert _names(root / "train") == ["good"]
    assert _names(root / "train" / "good") == ["000.png", "001.png", "002.png", "003.png"]
    assert _names(root / "test") == sorted(("good",) + defects)
    assert _names(root / "test" / "good") == ["000.png", "001.png"]
    assert _names(root / "ground_truth") == sorted(defects)
    for defect in defects:
        assert _names(root / "test" / defect) == ["000.png", "001.png"]
        assert _names(root / "ground_truth" / defect) == ["000_mask.png", "001_mask.png"]
    marker = json.loads((root / MARKER_FILE).read_text())
    assert marker["category"] == category and marker["size"] == PARAMS["size"]


@pytest.mark.parametrize("category, mode", [("texture", "L"), ("object", "RGB")])
def test_images_and_masks(demo_root, category, mode):
    root = demo_root / category
    for path in root.glob("*/*/*.png"):
        if path.parts[-3] == "ground_truth":
            continue
        with Image.open(path) as image:
            assert image.mode == mode and image.size == (PARAMS["size"], PARAMS["size"])
        if path.parent.name == "good":
            continue
        with Image.open(root / "ground_truth" / path.parent.name / f"{path.stem}_mask.png") as mask_image:
            assert mask_image.mode == "L" and mask_image.size == (PARAMS["size"], PARAMS["size"])
            mask = np.asarray(mask_image)
        assert set(np.unique(mask)) == {0, 255}


def test_deterministic(demo_root, tmp_path):
    generate_demo(tmp_path, **PARAMS)
    for category in DEMO_CATEGORIES:
        assert _files(tmp_path / category) == _files(demo_root / category)
    other = generate_demo(tmp_path / "other", categories=("object",), **{**PARAMS, "seed": 4})
    assert _files(other["object"]) != _files(demo_root / "object")


@pytest.mark.parametrize(
    "category, defect", [(c, d) for c, defects in DEMO_CATEGORIES.items() for d in defects]
)
def test_mask_marks_changed_pixels(category, defect):
    for index in range(4):
        sample = render_sample(category, defect, 96, np.random.default_rng([11, index]))
        changed = sample.image != sample.reference
        if changed.ndim == 3:
            changed = changed.any(axis=-1)
        mask = sample.mask
        assert mask.shape == changed.shape and mask.dtype == bool and mask.any()
        near_mask = ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=2)
        assert not (changed & ~near_mask).any(), "pixels changed outside the mask"
        assert changed[mask].mean() > 0.9, "mask covers many unchanged pixels"


def test_good_sample_has_no_mask():
    sample = render_sample("object", None, 64, np.random.default_rng(0))
    assert sample.mask is None and np.array_equal(sample.image, sample.reference)


def test_objects_aligned_textures_not(demo_root):
    def mean_ncc(category):
        train_good = demo_root / category / "train" / "good"
        images = [np.asarray(Image.open(p).convert("L"), float) for p in train_good.glob("*.png")]
        return np.mean([_ncc(a, b) for a, b in itertools.combinations(images, 2)])

    assert mean_ncc("object") > 0.8
    assert mean_ncc("texture") < 0.5


def test_existing_folder_rules(tmp_path):
    small = dict(n_train=1, n_test_good=1, n_test_per_defect=1, size=48, seed=0)
    root = generate_demo(tmp_path, categories=("texture",), **small)["texture"]
    first = root / "train" / "good" / "000.png"
    stamp = first.stat().st_mtime_ns

    assert generate_demo(tmp_path, categories=("texture",), **small) == {"texture": root}
    assert first.stat().st_mtime_ns == stamp

    with pytest.raises(FileExistsError, match="different parameters"):
        generate_demo(tmp_path, categories=("texture",), **{**small, "seed": 1})
    with pytest.raises(FileExistsError, match="different parameters"):
        generate_demo(tmp_path, categories=("texture",), texture_source="gravel", **small)

    first.unlink()
    with pytest.raises(FileExistsError, match="incomplete"):
        generate_demo(tmp_path, categories=("texture",), **small)

    generate_demo(tmp_path, categories=("texture",), overwrite=True, **{**small, "seed": 1})
    assert json.loads((root / MARKER_FILE).read_text())["seed"] == 1 and first.exists()

    user_folder = tmp_path / "user" / "object"
    user_folder.mkdir(parents=True)
    (user_folder / "keep.txt").write_text("user data")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not made by the demo generator"):
            generate_demo(tmp_path / "user", categories=("object",), overwrite=overwrite, **small)
    assert (user_folder / "keep.txt").read_text() == "user data"
    assert not [p for p in (tmp_path / "user").iterdir() if p.name != "object"], "temporary folder left behind"


@pytest.mark.parametrize(
    "kwargs",
    [{"categories": ("metal",)}, {"texture_source": "wood"}, {"n_train": 0}, {"size": 16}, {"seed": -1}],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_demo(tmp_path, **kwargs)
