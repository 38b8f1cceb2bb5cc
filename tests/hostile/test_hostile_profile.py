"""Hostile input to the dataset profile and the dataset scan: empty masks, blank frames, `profile --out` naming a
file that is not a folder (or a user's image), a category that does not exist, and entries of image folders that
cannot be read (broken and looping links, FIFOs, device files, formats automl-ad does not read). Each case checks
that the message names the file and says why, and that nothing is overwritten or hangs."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image, square_mask, write_image
from PIL import Image

from automl_ad.cli import EXIT_DATA, EXIT_OK, EXIT_USAGE, main
from automl_ad.data import open_dataset
from automl_ad.data.layout import describe_skipped, image_files
from automl_ad.errors import InvalidDatasetError, UsageError
from automl_ad.profiling import profile_dataset, profile_paths, save_profiles


def _one_line(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


def _problems(dataset, word: str) -> list[str]:
    return [str(p) for p in dataset.problems if word in p.problem]


# --- empty masks (audit item 10) ---------------------------------------------------------------------------------

def test_an_empty_mask_counts_neither_as_a_mask_nor_towards_defect_sizes(mvtec_dir):
    """001's mask is all zero: it is warned about, and the profile's masks and defect sizes are 000's alone."""
    write_image(mvtec_dir / "ground_truth" / "crack" / "001_mask.png", np.zeros((32, 32), np.uint8))
    dataset = open_dataset(mvtec_dir)
    assert _problems(dataset, "mask is empty")
    profile = profile_dataset(dataset)
    assert profile.counts.masks == 1 and profile.facts()["has_masks"]
    assert profile.defects.masks == 1 and profile.defects.measured_masks == 1
    assert profile.defects.area_fraction_min == pytest.approx(64 / 1024)
    assert profile.defects.small_defect_share == 0 and profile.defects.size_px_p10 == 8


def test_only_empty_masks_read_as_no_masks_like_the_recommendation_says(mvtec_dir, capsys):
    for i in range(2):
        write_image(mvtec_dir / "ground_truth" / "crack" / f"{i:03d}_mask.png", np.zeros((32, 32), np.uint8))
    profile = profile_dataset(open_dataset(mvtec_dir))
    assert profile.counts.masks == 0 and profile.defects is None and not profile.facts()["has_masks"]
    assert profile.smallest_defect()[1].startswith("no masks: assumed")
    assert main(["profile", str(mvtec_dir)]) == EXIT_OK
    out = _one_line(capsys.readouterr().out)
    assert "0 masks" in out and "defect size: 0.00%" not in out and "no masks: assumed" in out


# --- blank frames (audit item 11) --------------------------------------------------------------------------------

def _with_blank_frames(root: Path) -> dict[str, Path]:
    good = root / "train" / "good"
    return {
        "black": write_image(good / "black.png", np.zeros((32, 32, 3), np.uint8)),
        "white": write_image(good / "white.png", np.full((32, 32, 3), 255, np.uint8)),
        "red": write_image(good / "red.png", np.tile(np.array([200, 0, 0], np.uint8), (32, 32, 1))),
        "gray": write_image(good / "gray.png", np.full((32, 32), 128, np.uint8)),
    }


def test_blank_frames_are_named_once_each_and_raise_no_library_warnings(mvtec_dir):
    blanks = _with_blank_frames(mvtec_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = open_dataset(mvtec_dir)
        profile = profile_dataset(dataset)
    assert not [str(w.message) for w in caught], "numpy/skimage warnings that name no file leaked out"
    found = _problems(dataset, "image is blank")
    assert len(found) == 4
    for name, path in blanks.items():
        line = next(p for p in found if str(path) in p)
        assert "camera or trigger failure" in line and "Remove it if the capture failed" in line
        assert "still used as a normal image" in line
        assert {"black": "all black", "white": "all white", "red": "one uniform colour",
                "gray": "one uniform gray level"}[name] in line
    # the noise images are colour: the blank frames do not make the dataset "mixed", nor its structure odd
    assert profile.color.mode == "color" and profile.color.gray_files == 0
    assert profile.counts.normal_train == 10  # the blank frames are still images of the dataset
    assert profile.sample_images == 6  # but not in the structure sample


def test_a_dataset_of_blank_frames_only_still_profiles_to_finite_numbers(tmp_path):
    root = tmp_path / "dark"
    for i in range(4):
        write_image(root / "good" / f"{i}.png", np.full((32, 32), 7 * i, np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = open_dataset(root)
        profile = profile_dataset(dataset)
    assert not [str(w.message) for w in caught]
    assert len(_problems(dataset, "image is blank")) == 4
    json.dumps(profile.to_dict(), allow_nan=False)  # no NaN from dividing by an empty image


def test_profile_command_prints_the_blank_frames_and_no_raw_warnings(mvtec_dir, capsys):
    _with_blank_frames(mvtec_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["profile", str(mvtec_dir)]) == EXIT_OK
    captured = capsys.readouterr()
    out = _one_line(captured.out)
    assert f"[warning] {mvtec_dir}/train/good/black.png: image is blank (all black" in out
    assert "colour: color" in out
    text = captured.err + " ".join(str(w.message) for w in caught)
    assert "invalid value encountered" not in text and "RMS error" not in text


# --- profile --out (audit items 9e and 12) -----------------------------------------------------------------------

def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_profile_out_never_overwrites_an_image_and_prints_no_traceback(mvtec_dir, tmp_path, capsys):
    victim = tmp_path / "victim.png"
    write_image(victim, noise_image(7))
    before = _digest(victim)
    assert main(["profile", str(mvtec_dir), "--out", str(victim)]) == EXIT_USAGE
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: ") and "victim.png" in err and "Traceback" not in err
    assert victim.is_file() and _digest(victim) == before


def test_profile_paths_take_a_name_with_a_suffix_as_a_file_for_one_category(tmp_path):
    assert profile_paths(tmp_path / "prof.txt", ["base"]) == [tmp_path / "prof.txt"]
    assert profile_paths(tmp_path / "profile.JSON", ["base"]) == [tmp_path / "profile.JSON"]
    assert profile_paths(tmp_path / "profiles", ["base"]) == [tmp_path / "profiles" / "base.json"]
    assert profile_paths(f"{tmp_path}/prof.d/", ["a", "b"]) == [tmp_path / "prof.d" / "a.json",
                                                                 tmp_path / "prof.d" / "b.json"]
    (tmp_path / "existing.d").mkdir()
    assert profile_paths(tmp_path / "existing.d", ["base"]) == [tmp_path / "existing.d" / "base.json"]
    (tmp_path / "noext").write_text("")  # an existing file without a suffix is a file (empty: may be written)
    assert profile_paths(tmp_path / "noext", ["base"]) == [tmp_path / "noext"]


def test_profile_paths_need_a_folder_for_several_categories(tmp_path):
    with pytest.raises(UsageError, match=r"names a file, but the data holds 2 categories \(a, b\).*give --out a "
                                         r"folder.*--category"):
        profile_paths(tmp_path / "prof.json", ["a", "b"])
    assert not (tmp_path / "prof.json").exists()


def test_profile_paths_refuse_files_that_are_not_profiles(mvtec_dir, tmp_path):
    image = write_image(tmp_path / "photo.png", noise_image(3))
    before = _digest(image)
    with pytest.raises(UsageError, match="is an existing file that is not JSON"):
        profile_paths(image, ["base"])
    other = tmp_path / "settings.json"
    other.write_text('{"threshold": 3}')
    with pytest.raises(UsageError, match="is an existing JSON file that is not an automl-ad profile"):
        profile_paths(other, ["base"])
    blocked = tmp_path / "notes"
    blocked.write_text("my notes")
    with pytest.raises(UsageError, match="notes is an existing file, not a folder"):
        profile_paths(blocked / "sub" / "p.json", ["base"])

    profile = profile_dataset(open_dataset(mvtec_dir))
    written = save_profiles([profile], tmp_path / "prof.txt")
    assert written == [tmp_path / "prof.txt"] and (tmp_path / "prof.txt").is_file()
    assert save_profiles([profile], tmp_path / "prof.txt") == written  # an earlier profile may be replaced
    assert json.loads((tmp_path / "prof.txt").read_text())["fingerprint"] == profile.fingerprint
    with pytest.raises(UsageError):
        profile.save(image)  # the method refuses too, whoever calls it
    with pytest.raises(UsageError, match="is an existing file, not a folder"):
        profile.save(image / "part.json")
    assert _digest(image) == before


def test_profile_out_with_a_suffix_writes_that_file(mvtec_dir, tmp_path):
    out = tmp_path / "prof.txt"
    assert main(["profile", str(mvtec_dir), "--out", str(out)]) == EXIT_OK
    assert out.is_file() and json.loads(out.read_text())["name"] == mvtec_dir.name


# --- a category that does not exist (audit item 13c) -------------------------------------------------------------

def test_unknown_category_of_a_single_category_dataset(mvtec_dir, capsys):
    with pytest.raises(InvalidDatasetError, match=r"has no category 'nope'; it is a single-category dataset "
                                                  r"\(mvtec layout\)\. Leave out --category"):
        open_dataset(mvtec_dir, category="nope")
    assert main(["profile", str(mvtec_dir), "--category", "nope"]) == EXIT_DATA
    assert "no category 'nope'" in _one_line(capsys.readouterr().err)


def test_unknown_category_lists_the_categories(tmp_path, capsys):
    for name in ("Screw", "bottle"):
        write_image(tmp_path / "data" / name / "train" / "good" / "0.png", noise_image(1))
    (tmp_path / "data" / "notes").mkdir()  # a folder that is not a category is not listed
    with pytest.raises(InvalidDatasetError, match=r"has no category 'screw'\. Its categories are: Screw, bottle\. "
                                                  r"Did you mean 'Screw'\?"):
        open_dataset(tmp_path / "data", category="screw")
    assert main(["profile", str(tmp_path / "data"), "--category", "nope"]) == EXIT_DATA
    assert "Its categories are: Screw, bottle." in _one_line(capsys.readouterr().err)


def test_a_missing_folder_elsewhere_keeps_the_plain_message(tmp_path):
    with pytest.raises(InvalidDatasetError, match="does not exist. Pass the folder that holds your images"):
        open_dataset(tmp_path / "nowhere" / "data")


# --- entries the scan cannot read (audit item 14) ----------------------------------------------------------------

def _hostile_entries(good: Path) -> list[str]:
    """Broken link, link loop, link to a folder, FIFO, link to a device, WebP and GIF images in ``good``."""
    (good / "dangling.png").symlink_to("/nonexistent/automl-ad-test.png")
    (good / "loopa").symlink_to("loopb")
    (good / "loopb").symlink_to("loopa")
    (good / "loop").symlink_to(".")
    os.mkfifo(good / "fifo.png")
    (good / "devzero.png").symlink_to("/dev/zero")
    image = Image.fromarray(noise_image(5))
    image.save(good / "w.webp")
    image.save(good / "g.gif")
    return ["devzero.png", "dangling.png", "fifo.png", "g.gif", "loop", "loopa", "loopb", "w.webp"]


@pytest.fixture
def no_hang():
    """Dump the stacks and stop the run should the scan block on the FIFO."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_every_entry_the_scan_skips_is_named_with_its_reason(mvtec_dir, no_hang, caplog):
    good = mvtec_dir / "train" / "good"
    names = _hostile_entries(good)
    with caplog.at_level("INFO", logger="automl_ad.data.validation"):
        dataset = open_dataset(mvtec_dir)
    assert len(dataset.normal_in("train")) == 6
    found = [p for p in dataset.problems if "were skipped" in p.problem]
    assert len(found) == 1 and found[0].severity == "warning" and found[0].path == mvtec_dir.resolve()
    text = found[0].problem
    assert text.startswith("8 entries in its image folders were skipped. ")
    assert "train/good/dangling.png: broken symbolic link, its target /nonexistent/automl-ad-test.png does not " \
           "exist" in text
    assert "train/good/devzero.png: symbolic link to a device file, not a regular file" in text
    assert "train/good/fifo.png: a named pipe (FIFO), not a regular file" in text
    assert "train/good/g.gif: unsupported image format '.gif'" in text
    assert "train/good/loop: symbolic link to a folder, which is not followed" in text
    assert "and 3 more (run with --verbose to list them all)" in text
    logged = caplog.text
    assert all(f"train/good/{name}:" in logged for name in names)
    assert "symbolic link loop" in logged and "unsupported image format '.webp'" in logged
    # the WebP and GIF images are no longer counted as "non-image files"
    assert not [p for p in dataset.problems if p.severity == "note" and p.path.suffix in (".webp", ".gif")]


def test_a_few_skipped_entries_are_all_named_in_the_profile_output(tmp_path, no_hang, capsys):
    root = tmp_path / "plain"
    for i in range(3):
        write_image(root / "good" / f"{i}.png", noise_image(i))
    write_image(root / "scratch" / "0.png", noise_image(9))
    write_image(root / "masks" / "scratch" / "0.png", square_mask())
    (root / "good" / "gone.png").symlink_to(root / "good" / "missing.png")
    os.mkfifo(root / "masks" / "scratch" / "pipe.png")
    Image.fromarray(noise_image(4)).save(root / "scratch" / "1.webp")
    assert main(["profile", str(root)]) == EXIT_OK
    out = _one_line(capsys.readouterr().out)
    assert f"[warning] {root}: 3 entries in its image folders were skipped. good/gone.png: broken symbolic link" in out
    assert "masks/scratch/pipe.png: a named pipe (FIFO), not a regular file" in out
    assert "scratch/1.webp: unsupported image format '.webp'" in out and "--verbose to list them" not in out
    assert "non-image file(s) ignored" not in out


def test_image_files_lists_images_and_the_skipped_entries_of_any_folder(tmp_path, no_hang):
    """The helper a predict over folders can use: the images, and the entries skipped with their reasons."""
    folder = tmp_path / "incoming"
    write_image(folder / "sub" / "a.png", noise_image(1))
    (folder / "notes.txt").write_text("not an image")
    names = _hostile_entries(folder)
    images, skipped = image_files(folder)
    assert images == [folder / "sub" / "a.png"]
    assert sorted(p.name for p, _ in skipped) == sorted(names)
    sentence = describe_skipped(skipped, folder)
    assert sentence.startswith("8 entries were skipped. dangling.png: broken symbolic link")
    assert sentence.endswith("; and 3 more")
    assert describe_skipped(skipped[:1], folder) == ("1 entry was skipped. dangling.png: broken symbolic link, its "
                                                     "target /nonexistent/automl-ad-test.png does not exist")


def test_a_folder_of_a_single_category_dataset_is_not_taken_for_a_category(mvtec_dir, capsys):
    # `--category train` opened train/ alone as a dataset of good images only (its "good" folder looks like the
    # plain layout): the search would then have had no real defects to rank on, and said nothing
    with pytest.raises(InvalidDatasetError, match=r"single-category dataset \(mvtec layout\), so 'train' is one of "
                                                  r"its folders, not a category.*Leave out --category"):
        open_dataset(mvtec_dir, category="train")
    for command in ("profile", "recommend"):
        assert main([command, str(mvtec_dir), "--category", "train"]) == EXIT_DATA
        assert "'train' is one of its folders, not a category" in _one_line(capsys.readouterr().err)
