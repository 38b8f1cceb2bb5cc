"""Hostile and careless use of ``export``: the search's dataset edited, replaced, pruned, grown or moved after the
search; file permissions of a package; the exit code of a damaged package.

A search's models were trained and ranked on its images as they were; export calibrates the thresholds on the same
images and writes the search's dataset fingerprint into the package. When the images changed, that would be a
silently wrong package: export must stop, name the files and say what to do."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image, square_mask, write_image

from automl_ad import load_package
from automl_ad.cli import EXIT_DATA, EXIT_OK, main
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.data.split import SearchSplit
from automl_ad.deploy.package import PackageError, export_package
from automl_ad.detectors import create_detector
from automl_ad.errors import DataChangedError
from automl_ad.search.validation import prepare_search_data
from automl_ad.tracking.records import SearchRecord, check_split_data

pytestmark = [pytest.mark.filterwarnings("ignore:model.onnx is not part of the package"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

THRESHOLDS = {"image": {"value": 0.5, "method": "empirical", "target_false_alarm_rate": 0.01}, "active": "image"}


def flip(path: Path) -> None:
    """Edit an image in place, as a re-export or another batch under the same name would."""
    from PIL import Image

    with Image.open(path) as image:
        flipped = np.asarray(image)[::-1].copy()
    write_image(path, flipped)


# --- the check itself, on a split as a search writes it (no search run: quick) --------------------------------
@pytest.fixture
def searched(tmp_path):
    """A dataset, the split a search of it logs (through JSON, as export reads it back) and its search record:
    10 train normals, 3 test normals and 2 defects with masks; validation is mixed (held-out normals, synthetic
    anomalies made in the working folder, and the real defects)."""
    root = tmp_path / "data" / "part"
    for i in range(10):
        write_image(root / "train" / "good" / f"{i:03d}.png", noise_image(i))
    for i in range(3):
        write_image(root / "test" / "good" / f"{i:03d}.png", noise_image(100 + i))
    for i in range(4):
        write_image(root / "test" / "crack" / f"{i:03d}.png", noise_image(200 + i))
        write_image(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", square_mask())
    dataset = open_dataset(root)
    work = tmp_path / "work"
    split = prepare_search_data(dataset, work, seed=0, families=["gaussian"])
    data = json.loads(json.dumps(split.to_json()))
    search = SearchRecord(run_id="a" * 32, experiment="e", data=str(dataset.root), seed=0, metric="combined",
                          validation_kind=split.validation_kind, families=["gaussian"], work_dir=str(work),
                          fingerprint=dataset.fingerprint(), dataset_name=dataset.name,
                          start_time=int(time.time() * 1000), params={})
    time.sleep(0.05)  # files made after this are newer than the search's start
    return search, data, dataset.root


def fresh(data: dict) -> SearchSplit:
    return SearchSplit.from_json(data)


def held_out_normals(data: dict) -> list[Path]:
    split = fresh(data)
    return [Path(p) for p, label, kind in zip(split.validation.paths, split.validation.labels,
                                              split.validation.kinds) if label == 0 and kind is None]


def test_unchanged_data_passes_and_every_image_is_hashed_once(searched, monkeypatch):
    search, data, _ = searched
    split = fresh(data)
    assert split.validation_kind == "mixed" and split.validation.content_hashes is None  # what makes it hard
    said = []
    check_split_data(search, split, said.append)
    assert said == []
    for images in (split.train, split.validation, split.test):
        assert images.content_hashes and len(images.content_hashes) == len(images)
    # the feature cache takes the hashes the check read, and reads no file again
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} hashed twice"))
    assert split.validation.image_fingerprints() == split.validation.content_hashes


def test_an_edited_training_image_is_named(searched):
    search, data, root = searched
    flip(root / "train" / "good" / fresh(data).train.paths[0].name)
    with pytest.raises(DataChangedError) as caught:
        check_split_data(search, fresh(data))
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_DATA
    assert "has changed since the search" in message and f"train/good/{fresh(data).train.paths[0].name}" in message
    assert "Restore the files the search used" in message and f"automl-ad search {root}" in message


def test_an_edited_held_out_normal_is_named(searched):
    """The split holds no hash of the held-out normals beside synthetic anomalies: the synthetic-validation
    manifest of the search's folder has them."""
    search, data, root = searched
    normal = held_out_normals(data)[0]
    flip(normal)
    with pytest.raises(DataChangedError, match=f"1 of the .* images it used differ .*: "
                                               f"{normal.relative_to(root).as_posix()}"):
        check_split_data(search, fresh(data))


def test_an_edited_held_out_image_is_caught_by_the_fingerprint_without_the_manifest(searched):
    search, data, root = searched
    (Path(search.work_dir) / "synthetic-validation" / "manifest.json").unlink()
    normal = held_out_normals(data)[-1]
    flip(normal)
    with pytest.raises(DataChangedError) as caught:
        check_split_data(search, fresh(data))
    message = str(caught.value)
    assert f"no longer match the dataset fingerprint it recorded ({search.fingerprint})" in message
    assert normal.relative_to(root).as_posix() in message


def test_a_replaced_validation_defect_is_caught(searched):
    search, data, root = searched
    split = fresh(data)
    defect = next(Path(p) for p, label, kind in zip(split.validation.paths, split.validation.labels,
                                                    split.validation.kinds) if label == 1 and kind is None)
    write_image(defect, noise_image(999))
    with pytest.raises(DataChangedError, match=defect.relative_to(root).as_posix()):
        check_split_data(search, fresh(data))


def test_a_deleted_image_or_mask_is_named(searched):
    search, data, root = searched
    (root / "test" / "good" / "001.png").unlink()
    (root / "ground_truth" / "crack" / "003_mask.png").unlink()
    with pytest.raises(DataChangedError) as caught:
        check_split_data(search, fresh(data))
    message = str(caught.value)
    assert re.search(f"2 of the \\d+ files \\(images and masks\\) search {search.run_id} used are gone from its "
                     f"dataset {re.escape(str(root))}: ", message), message
    assert "test/good/001.png" in message and "ground_truth/crack/003_mask.png" in message


def test_a_moved_dataset_is_named_with_what_to_do(searched):
    search, data, root = searched
    root.rename(root.with_name("moved"))
    with pytest.raises(DataChangedError) as caught:
        check_split_data(search, fresh(data))
    message = str(caught.value)
    assert f"the dataset search {search.run_id} used, {root}, is gone (moved or deleted?)" in message
    assert f"Put the dataset back at {root}" in message and "automl-ad search NEW_FOLDER" in message


def test_a_cleaned_search_folder_is_named(searched):
    search, data, _ = searched
    shutil.rmtree(Path(search.work_dir) / "synthetic-validation")
    with pytest.raises(DataChangedError, match=f"synthetic validation images search {search.run_id} made are gone "
                                               f"from its working folder {search.work_dir}"):
        check_split_data(search, fresh(data))


def test_an_added_image_is_noted_not_refused(searched):
    search, data, root = searched
    write_image(root / "train" / "good" / "new.png", noise_image(555))
    said = []
    check_split_data(search, fresh(data), said.append)
    assert len(said) == 1 and "1 image(s) in" in said[0] and "train/good/new.png" in said[0]
    assert "newer than search" in said[0] and "trained and calibrated without them" in said[0]


def test_many_changed_files_are_counted_not_all_listed(searched):
    search, data, root = searched
    for path in sorted((root / "train" / "good").glob("*.png")):
        flip(path)
    with pytest.raises(DataChangedError, match=r"and \d+ more\. "):
        check_split_data(search, fresh(data))


# --- export end to end: a real (tiny) search ------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    from automl_ad.search.engine import run_search
    from automl_ad.search.request import SearchRequest

    work = tmp_path_factory.mktemp("export-search")
    data = generate_demo(work / "data", categories=["texture"], n_train=16, n_test_good=4, n_test_per_defect=2,
                         size=48)["texture"]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        run_search(SearchRequest(data=str(data), families=["gaussian"], budget_s=200, max_trials=1, tracking_uri=uri,
                                 trial_timeout_s=120))
    yield Path(data), uri
    import ray

    ray.shutdown()


def test_export_refuses_a_dataset_changed_after_the_search(search_run, tmp_path, capsys):
    data, uri = search_run
    image = sorted((data / "train" / "good").glob("*.png"))[0]
    kept = image.read_bytes()
    try:
        flip(image)
        code = main(["export", "--best", str(tmp_path / "pkg"), "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert code == EXIT_DATA, err
        assert "has changed since the search" in err and f"train/good/{image.name}" in err
        assert not (tmp_path / "pkg").exists()  # no package claims a fingerprint it was not calibrated on
    finally:
        image.write_bytes(kept)


def test_export_of_a_moved_dataset_says_where_it_was(search_run, tmp_path, capsys):
    data, uri = search_run
    moved = data.with_name("moved")
    data.rename(moved)
    try:
        code = main(["export", "--best", str(tmp_path / "pkg"), "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert code == EXIT_DATA, err
        assert f"used, {data}, is gone (moved or deleted?)" in err and "Traceback" not in err
    finally:
        moved.rename(data)


def test_export_of_unchanged_data_gives_files_the_usual_permissions(search_run, tmp_path, capsys):
    data, uri = search_run
    assert main(["export", "--best", str(tmp_path / "pkg"), "--tracking-uri", uri]) == EXIT_OK, \
        capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "pkg").iterdir()}
    assert "weights.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert load_package(tmp_path / "pkg").manifest["training"]["fingerprint"] == open_dataset(data).fingerprint()


# --- packages -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    train = ImageSet.from_arrays([noise_image(i, size=32) for i in range(6)])
    return create_detector("gaussian", input_size=32, scales=(1.0,)).fit(train)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_package_file_gets_the_permissions_open_gives(detector, tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = export_package(detector, tmp_path / "pkg", THRESHOLDS)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert "weights.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_a_damaged_package_is_a_data_problem_not_an_unexpected_error(detector, tmp_path, capsys):
    package = export_package(detector, tmp_path / "pkg", THRESHOLDS)
    images = tmp_path / "images"
    write_image(images / "a.png", noise_image(7))
    with open(package / "weights.safetensors", "ab") as handle:
        handle.write(b"tampered")
    assert main(["predict", str(package), str(images), "--out", str(tmp_path / "out")]) == EXIT_DATA
    assert "sha256" in capsys.readouterr().err
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["thresholds"]["image"]["value"] = "high"
    (package / "manifest.json").write_text(json.dumps(manifest))
    assert main(["predict", str(package), str(images), "--out", str(tmp_path / "out2")]) == EXIT_DATA
    assert PackageError.exit_code == EXIT_DATA
