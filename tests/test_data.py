"""Data intake: layouts, image formats, every validation problem, splits, and that the user's folder is untouched."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
from conftest import BOTTLE, needs, noise_image, square_mask, write_image
from PIL import Image

from automl_ad.data import load_datasets, open_dataset
from automl_ad.data.io import full_scale_of, inspect_image, load_image, read_image, to_float
from automl_ad.errors import InvalidDatasetError


def _snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# --- layouts ---------------------------------------------------------------------------------------------------

def test_mvtec_layout(mvtec_dir):
    dataset = open_dataset(mvtec_dir)
    assert dataset.layout == "mvtec"
    assert len(dataset.normal_in("train")) == 6 and len(dataset.normal_in("test")) == 2
    assert dataset.defect_types == {"crack": 2}
    assert all(r.mask is not None for r in dataset.abnormal)
    assert not [p for p in dataset.problems if p.severity != "note"]


@pytest.mark.parametrize("normal, defect", [("good", "scratch"), ("OK", "NG")])
def test_plain_layout_with_masks_mirror(tmp_path, normal, defect):
    """good/ or OK/ (the OK / NG folders of factory inspection): before, a root holding OK/ and NG/ was read as two
    flat categories, each all normal, so the NG images could be trained on as good ones."""
    root = tmp_path / "plain"
    for i in range(5):
        write_image(root / normal / f"g{i}.png", noise_image(i))
    write_image(root / defect / "s0.png", noise_image(50))
    write_image(root / "masks" / defect / "s0.png", square_mask())
    dataset = open_dataset(root)
    assert dataset.layout == "plain"
    assert len(dataset.normal_in(None)) == 5
    assert [(r.label, r.mask) for r in dataset.abnormal] == [(defect, root / "masks" / defect / "s0.png")]


def test_a_normal_folder_is_recognised_by_its_names_in_any_case_and_only_once(tmp_path):
    mvtec = tmp_path / "mvtec"
    for i in range(4):
        write_image(mvtec / "train" / "Normal" / f"g{i}.png", noise_image(i))
    write_image(mvtec / "test" / "normal" / "t0.png", noise_image(9))
    write_image(mvtec / "test" / "crack" / "c0.png", noise_image(60))
    dataset = open_dataset(mvtec)
    assert dataset.layout == "mvtec" and len(dataset.normal_in("train")) == 4 and len(dataset.normal_in("test")) == 1
    assert [r.label for r in dataset.abnormal] == ["crack"]

    write_image(mvtec / "train" / "good" / "g9.png", noise_image(9))
    with pytest.raises(InvalidDatasetError, match=r"2 folders of normal images \(Normal/, good/\)"):
        open_dataset(mvtec)


def test_flat_folder_is_all_normal(tmp_path):
    for i in range(4):
        write_image(tmp_path / "imgs" / f"{i}.jpg", noise_image(i))
    dataset = open_dataset(tmp_path / "imgs")
    assert dataset.layout == "flat" and len(dataset.normal) == 4 and not dataset.abnormal


def test_multi_category_root(tmp_path, mvtec_dir):
    shutil.copytree(mvtec_dir, tmp_path / "root" / "a")
    shutil.copytree(mvtec_dir, tmp_path / "root" / "b")
    datasets = load_datasets(tmp_path / "root")
    assert [d.name for d in datasets] == ["a", "b"]
    with pytest.raises(InvalidDatasetError, match="choose one with --category"):
        open_dataset(tmp_path / "root")
    assert open_dataset(tmp_path / "root", category="b").name == "b"


def test_unrecognised_folder_explains_layouts(tmp_path):
    (tmp_path / "x" / "sub").mkdir(parents=True)
    with pytest.raises(InvalidDatasetError, match="train/good"):
        load_datasets(tmp_path / "x")
    with pytest.raises(InvalidDatasetError, match="does not exist"):
        load_datasets(tmp_path / "missing")


# --- formats ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_reads_common_formats(tmp_path, suffix):
    path = write_image(tmp_path / f"x{suffix}", noise_image(1))
    assert read_image(path).shape == (32, 32, 3)


def test_reads_16bit_tiff_and_png_gray(tmp_path):
    array = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    tifffile.imwrite(tmp_path / "a.tiff", array)
    write_image(tmp_path / "b.png", array)
    for name in ("a.tiff", "b.png"):
        info = inspect_image(tmp_path / name)
        assert info.bit_depth == 16 and info.channels == 1
        np.testing.assert_array_equal(read_image(tmp_path / name), array)
    assert load_image(tmp_path / "a.tiff").max() == pytest.approx(array.max() / 65535)


def test_16bit_images_are_read_at_their_cameras_bit_depth(tmp_path):
    assert [full_scale_of(v) for v in (0, 255, 256, 1023, 1024, 4095, 4096, 65535)] == \
        [255, 255, 1023, 1023, 4095, 4095, 16383, 65535]
    twelve = np.array([[0, 2048], [4095, 100]], np.uint16)
    assert to_float(twelve, 4095).max() == 1.0 and to_float(twelve).max() == pytest.approx(4095 / 65535)
    assert to_float(np.array([[5000]], np.uint16), 4095)[0, 0] == 1.0  # above the full scale: clipped
    assert to_float(np.array([[255]], np.uint8), 4095)[0, 0] == 1.0  # 8-bit images keep their own scale
    for name, shift in (("twelve", 4), ("sixteen", 8)):
        root = tmp_path / name
        for i in range(4):
            image = (noise_image(i, channels=1).astype(np.uint16) << shift) + (15 if shift == 4 else 255)
            write_image(root / "train" / "good" / f"{i}.png", image)
        dataset = open_dataset(root)
        assert dataset.info[dataset.records[0].path].max_value <= (4095 if shift == 4 else 65535)
        assert dataset.full_scale == (4095 if shift == 4 else None)  # 65535 is the default: None
    write_image(tmp_path / "eight" / "train" / "good" / "0.png", noise_image(0))
    assert open_dataset(tmp_path / "eight").full_scale is None
    # colour judged at the camera's scale: channels 6 grey levels apart (8-bit) stay colour in 12-bit files
    colour = np.stack([np.full((32, 32), v, np.uint16) for v in (100, 106, 112)], axis=-1) << 4
    tifffile.imwrite(tmp_path / "colour.tif", colour)
    tifffile.imwrite(tmp_path / "gray.tif", np.repeat(colour[..., :1], 3, axis=-1))
    assert not inspect_image(tmp_path / "colour.tif").effectively_gray  # 65535 would call it gray (0.4 levels)
    assert inspect_image(tmp_path / "gray.tif").effectively_gray


def test_reads_16bit_rgb_tiff(tmp_path):
    array = np.random.default_rng(0).integers(0, 65535, (16, 16, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", array)
    assert read_image(tmp_path / "c.tif").dtype == np.uint16
    assert inspect_image(tmp_path / "c.tif").channels == 3


def test_alpha_channels_are_dropped(tmp_path):
    rgba = np.dstack([noise_image(1), np.full((32, 32), 255, np.uint8)])
    la = np.dstack([noise_image(2, channels=1), np.full((32, 32), 255, np.uint8)])
    write_image(tmp_path / "rgba.png", rgba)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "rgba.png").shape == (32, 32, 3)
    assert inspect_image(tmp_path / "rgba.png").has_alpha
    assert read_image(tmp_path / "la.png").shape == (32, 32)


def test_rgb_file_that_is_gray_is_detected(tmp_path):
    gray = noise_image(3, channels=1)
    write_image(tmp_path / "g.png", np.dstack([gray] * 3))
    write_image(tmp_path / "c.png", noise_image(4))
    assert inspect_image(tmp_path / "g.png").effectively_gray
    assert not inspect_image(tmp_path / "c.png").effectively_gray


# --- validation problems ---------------------------------------------------------------------------------------

def _problems(dataset, text):
    return [p for p in dataset.problems if text in p.problem]


def test_zero_byte_and_truncated_files_are_skipped_with_reasons(mvtec_dir):
    (mvtec_dir / "train" / "good" / "empty.png").write_bytes(b"")
    good = (mvtec_dir / "train" / "good" / "000.png").read_bytes()
    (mvtec_dir / "train" / "good" / "cut.png").write_bytes(good[: len(good) // 2])
    (mvtec_dir / "train" / "good" / "fake.jpg").write_bytes(b"this is not a jpeg at all")
    dataset = open_dataset(mvtec_dir)
    assert len(dataset.normal_in("train")) == 6
    assert _problems(dataset, "empty (0 bytes)")[0].path.name == "empty.png"
    assert _problems(dataset, "truncated")[0].path.name == "cut.png"
    assert any(p.path.name == "fake.jpg" for p in dataset.problems if p.severity == "error")
    assert all(p.fix for p in dataset.problems)


def test_strict_reports_all_problems_at_once(mvtec_dir):
    (mvtec_dir / "train" / "good" / "empty.png").write_bytes(b"")
    write_image(mvtec_dir / "ground_truth" / "crack" / "001_mask.png", square_mask(size=16))
    with pytest.raises(InvalidDatasetError) as info:
        open_dataset(mvtec_dir, strict=True)
    text = str(info.value)
    assert "empty.png" in text and "001_mask.png" in text
    assert len([p for p in info.value.problems if p.severity == "error"]) == 2


def test_mask_problems(mvtec_dir):
    write_image(mvtec_dir / "ground_truth" / "crack" / "000_mask.png", square_mask(size=16))  # wrong size
    gradient = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    write_image(mvtec_dir / "ground_truth" / "crack" / "001_mask.png", gradient)  # not binary
    write_image(mvtec_dir / "ground_truth" / "crack" / "999_mask.png", square_mask())  # no image
    dataset = open_dataset(mvtec_dir)
    assert _problems(dataset, "but its image is 32x32")[0].path.name == "000_mask.png"
    assert _problems(dataset, "not binary")[0].path.name == "001_mask.png"
    assert _problems(dataset, "no matching image")[0].path.name == "999_mask.png"
    assert all(r.mask is None for r in dataset.abnormal)  # both masks dropped, images kept
    assert len(dataset.abnormal) == 2


def test_empty_mask_is_a_warning(mvtec_dir):
    write_image(mvtec_dir / "ground_truth" / "crack" / "000_mask.png", np.zeros((32, 32), np.uint8))
    dataset = open_dataset(mvtec_dir)
    assert _problems(dataset, "mask is empty")[0].severity == "warning"
    assert dataset.masks[mvtec_dir / "ground_truth" / "crack" / "000_mask.png"].defect_fraction == 0


def test_images_rotated_by_exif_are_named_and_a_mask_drawn_on_the_turned_view_is_explained(mvtec_dir):
    """Photos whose EXIF orientation tag makes viewers turn them: one warning names them (automl-ad reads the stored
    pixels), and a mask the size of the turned view says so instead of asking for a resize."""
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise
    wide = np.zeros((24, 32, 3), np.uint8)
    write_image(mvtec_dir / "test" / "crack" / "000.jpg", wide, exif=exif.tobytes())
    (mvtec_dir / "test" / "crack" / "000.png").unlink()
    write_image(mvtec_dir / "ground_truth" / "crack" / "000_mask.png", np.pad(square_mask(24), ((0, 8), (0, 0))))
    write_image(mvtec_dir / "train" / "good" / "006.jpg", noise_image(6), exif=exif.tobytes())
    dataset = open_dataset(mvtec_dir)
    rotated = _problems(dataset, "EXIF orientation tag (2 of 11 images do)")
    assert len(rotated) == 1 and rotated[0].severity == "warning"
    turned = _problems(dataset, "mask is 24x32 but its image is 32x24")[0]
    assert "drawn on that turned view" in turned.problem and "exif_transpose" in turned.fix
    assert inspect_image(mvtec_dir / "train" / "good" / "000.png").orientation == 1


def _plain(root, good: list[tuple[str, np.ndarray]], bad: list[tuple[str, np.ndarray]]):
    for i, (suffix, image) in enumerate(good):
        write_image(root / "good" / f"g{i}{suffix}", image)
    for i, (suffix, image) in enumerate(bad):
        write_image(root / "dent" / f"d{i}{suffix}", image)
    return open_dataset(root)


def _noise(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_defects_told_apart_by_file_facts_alone_are_warned_about(tmp_path):
    """Defects photographed at another size, or saved in another format, than the good images: a model could learn
    the size or the format instead of the defect, so the dataset says so (a warning, nothing is dropped)."""
    sized = _plain(tmp_path / "sized", [(".png", _noise(i, 32, 48)) for i in range(20)],
                   [(".png", _noise(100 + i, 40, 60)) for i in range(12)])
    [warning] = _problems(sized, "the image size alone tells the defective images from the good ones")
    assert warning.severity == "warning" and warning.path == tmp_path / "sized"
    assert "good images: 48x32 100%" in warning.problem and "defective: 60x40 100%" in warning.problem
    assert "capture good and defective images the same way" in warning.fix.lower()
    assert len(sized.normal) == 20 and len(sized.abnormal) == 12

    formats = _plain(tmp_path / "formats", [(".png", _noise(i, 32, 32)) for i in range(20)],
                     [(".jpeg", _noise(100 + i, 32, 32)) for i in range(8)] + [(".jpg", _noise(200 + i, 32, 32))
                                                                                for i in range(4)])
    [warning] = _problems(formats, "the file format alone tells")
    assert "good images: png 100%" in warning.problem and "defective: jpg 100%" in warning.problem
    assert not _problems(formats, "image size alone")


def test_profile_and_report_carry_the_shortcut(tmp_path):
    """The profile keeps the shortcut's sentence, so the search's HTML report shows it above the dataset facts."""
    from types import SimpleNamespace

    from automl_ad.profiling import profile_dataset
    from automl_ad.reporting.html_report import profile_section

    dataset = _plain(tmp_path / "sized", [(".png", _noise(i, 32, 48)) for i in range(20)],
                     [(".png", _noise(100 + i, 40, 60)) for i in range(12)])
    profile = profile_dataset(dataset)
    assert len(profile.shortcuts) == 1 and profile.shortcuts[0].startswith("the image size alone tells")
    html = profile_section(SimpleNamespace(params={}, profile=profile.to_dict(), profile_note="profiled", screen=None))
    assert "Warning: the image size alone tells the defective images from the good ones" in html
    clean = _plain(tmp_path / "clean", [(".png", _noise(i, 32, 48)) for i in range(20)],
                   [(".png", _noise(100 + i, 32, 48)) for i in range(12)])
    assert profile_dataset(clean).shortcuts == []


def test_file_facts_unrelated_to_the_label_or_too_few_defects_raise_no_shortcut_warning(tmp_path):
    """Every image its own size (as magnetic_tile's crops), sizes mixed alike in both classes, or fewer than ten
    defects: no warning."""
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(24, 64, (40, 2))]
    varied = _plain(tmp_path / "varied", [(".png", _noise(i, *sizes[i])) for i in range(28)],
                    [(".png", _noise(100 + i, *sizes[28 + i])) for i in range(12)])
    mixed = _plain(tmp_path / "mixed", [(".png" if i % 2 else ".jpg", _noise(i, *(32, 48)[::1 - 2 * (i % 2)]))
                                         for i in range(20)],
                   [(".png" if i % 2 else ".jpg", _noise(100 + i, *(32, 48)[::1 - 2 * (i % 2)])) for i in range(12)])
    few = _plain(tmp_path / "few", [(".png", _noise(i, 32, 48)) for i in range(20)],
                 [(".png", _noise(100 + i, 40, 60)) for i in range(9)])
    for dataset in (varied, mixed, few):
        assert not _problems(dataset, "alone tells"), dataset.root


def test_empty_folder_and_non_image_files(mvtec_dir):
    (mvtec_dir / "test" / "hole").mkdir()
    (mvtec_dir / "train" / "good" / "notes.txt").write_text("hello")
    dataset = open_dataset(mvtec_dir)
    assert _problems(dataset, "holds no images")[0].path.name == "hole"
    note = _problems(dataset, "not an image file")[0]
    assert note.severity == "note" and note.path.name == "notes.txt"


def test_no_normal_images_is_fatal_even_without_strict(tmp_path):
    root = tmp_path / "c"
    (root / "train" / "good").mkdir(parents=True)
    write_image(root / "test" / "crack" / "0.png", noise_image(0))
    with pytest.raises(InvalidDatasetError, match="no usable normal"):
        open_dataset(root)


def test_duplicate_across_train_and_test_is_removed_from_test(mvtec_dir):
    shutil.copy(mvtec_dir / "train" / "good" / "000.png", mvtec_dir / "test" / "good" / "dup.png")
    dataset = open_dataset(mvtec_dir)
    assert mvtec_dir / "test" / "good" / "dup.png" not in {r.path for r in dataset.records}
    assert _problems(dataset, "leak")[0].path.name == "dup.png"
    with pytest.raises(InvalidDatasetError, match="leak"):
        open_dataset(mvtec_dir, strict=True)


def test_same_image_with_two_labels_is_dropped(mvtec_dir):
    shutil.copy(mvtec_dir / "test" / "crack" / "000.png", mvtec_dir / "test" / "good" / "same.png")
    dataset = open_dataset(mvtec_dir)
    paths = {r.path.name for r in dataset.records if r.split == "test"}
    assert "same.png" not in paths and len(dataset.abnormal) == 1
    assert _problems(dataset, "with labels")


def test_validation_never_writes_into_the_users_folder(mvtec_dir):
    (mvtec_dir / "train" / "good" / "empty.png").write_bytes(b"")
    before = _snapshot(mvtec_dir)
    open_dataset(mvtec_dir)
    assert _snapshot(mvtec_dir) == before


# --- splits and fingerprint ------------------------------------------------------------------------------------

def test_split_is_deterministic_and_keeps_test_defects_out_of_train(mvtec_dir):
    dataset = open_dataset(mvtec_dir)
    a, b = dataset.split(seed=1), dataset.split(seed=1)
    assert a == b
    assert all(r.is_normal and r.split == "train" for r in a.train)
    assert {r.path for r in a.validation}.isdisjoint({r.path for r in a.test})
    assert len(a.train) + sum(r.is_normal and r.split == "train" for r in a.validation) == 6
    assert sum(not r.is_normal for r in a.validation) == 1 and sum(not r.is_normal for r in a.test) == 1


def test_half_the_declared_test_normals_join_validation_as_half_the_defects_do(tmp_path):
    """Validation should see what test sees: declared test normals may differ from the training ones (another day,
    another batch), so half of them join the held-out training normals in validation, as half the defects do (on
    magnetic_tile, where test normals score higher than training ones, a PatchCore threshold for 1% false alarms
    flagged 11.6% of the other test normals when set on training normals alone, 6.3% with half of them); the
    defects' split is the one it was without them."""
    root = tmp_path / "part"
    for i in range(8):
        write_image(root / "train" / "good" / f"{i:03d}.png", noise_image(i))
    for i in range(10):
        write_image(root / "test" / "good" / f"{i:03d}.png", noise_image(100 + i))
        write_image(root / "test" / "crack" / f"{i:03d}.png", noise_image(200 + i))
    dataset = open_dataset(root)
    split = dataset.split()
    normals = [r for r in split.validation if r.is_normal]
    assert [r.split for r in normals].count("train") == 2 and [r.split for r in normals].count("test") == 5
    assert sum(r.is_normal for r in split.test) == 5 and len(split.train) == 6
    assert {r.path for r in split.validation}.isdisjoint({r.path for r in split.test})
    defects = {r.path for r in split.validation if not r.is_normal}
    assert len(defects) == 5 and defects == {r.path for r in dataset.split(validation_fraction=0.5).validation
                                             if not r.is_normal}
    # a fit/test split (fit, evaluate) keeps every declared test image for test
    holdout = dataset.holdout_split()
    assert len(holdout.train) == 8 and not holdout.validation and len(holdout.test) == 20


def test_split_without_declared_test_holds_out_normals(tmp_path):
    for i in range(10):
        write_image(tmp_path / "f" / f"{i}.png", noise_image(i))
    split = open_dataset(tmp_path / "f").split(validation_fraction=0.2)
    assert (len(split.train), len(split.validation), len(split.test)) == (6, 2, 2)


def test_fingerprint_changes_with_content(mvtec_dir):
    first = open_dataset(mvtec_dir).fingerprint()
    assert open_dataset(mvtec_dir).fingerprint() == first
    write_image(mvtec_dir / "train" / "good" / "000.png", noise_image(999))
    assert open_dataset(mvtec_dir).fingerprint() != first


def test_load_gives_common_size_and_channels(tmp_path):
    write_image(tmp_path / "f" / "a.png", noise_image(1, size=40, channels=1))
    write_image(tmp_path / "f" / "b.png", noise_image(2, size=24))
    dataset = open_dataset(tmp_path / "f")
    images = dataset.load(dataset.records, size=16)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32 and images.max() <= 1


@needs(BOTTLE)
def test_real_mvtec_category_reads_cleanly():
    dataset = open_dataset(BOTTLE)
    assert len(dataset.normal_in("train")) == 209 and sum(dataset.defect_types.values()) == 63
    assert len(dataset.masks) == 63
    assert [p for p in dataset.problems if p.severity != "note"] == []
