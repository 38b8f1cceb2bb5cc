"""Deployment: threshold calibration, package round trip, tamper detection, predict on mixed inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS
from PIL import Image

from automl_ad import load_package
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.deploy.package import PackageError, export_package
from automl_ad.deploy.predict import predict_files
from automl_ad.deploy.thresholds import calibrate_image_threshold, calibrate_pixel_threshold, f1_optimal_threshold
from automl_ad.detectors import create_detector


def test_false_alarm_rate_on_fresh_normals_is_near_target():
    achieved = {"evt": [], "empirical": []}
    for seed in range(60):
        rng = np.random.default_rng(seed)
        threshold = calibrate_image_threshold(rng.gamma(2.0, 1.0, 200), far=0.01)
        fresh = rng.gamma(2.0, 1.0, 20000)
        achieved["evt"].append((fresh > threshold.value).mean())
        achieved["empirical"].append((fresh > threshold.empirical).mean())
    assert 0.004 < np.mean(achieved["evt"]) < 0.02
    assert 0.005 < np.mean(achieved["empirical"]) <= 0.011  # split-conformal: at most the target on average


def test_threshold_edge_cases_and_f1():
    small = calibrate_image_threshold([0.1, 0.2, 0.3, 0.4], far=0.01)
    assert small.method == "empirical" and "too few" in small.note
    with pytest.raises(ValueError):
        calibrate_image_threshold([0.1], far=0.01)
    f1 = f1_optimal_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.8, 0.9])
    assert f1.value == pytest.approx(0.8) and "F1 1.000" in f1.note
    pixel = calibrate_pixel_threshold([np.arange(100, dtype=np.float32).reshape(10, 10)], far=0.1)
    assert pixel.value == pytest.approx(89.1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = generate_demo(tmp_path_factory.mktemp("demo"), categories=["object"], n_train=16, n_test_good=4,
                         n_test_per_defect=2, size=64)["object"]
    dataset = open_dataset(root)
    train = ImageSet.from_records(dataset.normal_in("train"), dataset)
    test = ImageSet.from_records([r for r in dataset.records if r.split == "test"], dataset)
    return root, train, test


@pytest.fixture(scope="module")
def package(demo, tmp_path_factory):
    _, train, test = demo
    detector = create_detector("gaussian", input_size=64, scales=(1.0, 2.0)).fit(train)
    scores = detector.score_samples(test)
    normal = scores.image_scores[test.labels == 0]
    thresholds = {"image": calibrate_image_threshold(normal).to_dict(),
                  "pixel": calibrate_pixel_threshold(scores.anomaly_maps[test.labels == 0]).to_dict()}
    path = export_package(detector, tmp_path_factory.mktemp("pkg") / "pkg", thresholds, training={"n": len(train)})
    return path, detector, scores


def test_round_trip_gives_identical_scores_and_lists_every_file(package, demo):
    path, detector, scores = package
    loaded = load_package(path)
    again = loaded.detector.score_samples(demo[2])
    np.testing.assert_array_equal(again.image_scores, scores.image_scores)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert not list(path.rglob("*.pkl")) and manifest["thresholds"]["image"]["target_false_alarm_rate"] == 0.01
    assert (path / "README.md").read_text().startswith("# automl-ad model package: gaussian")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "version"])
def test_tampered_package_is_refused(package, tmp_path, damage):
    path = shutil.copytree(package[0], tmp_path / "copy")
    if damage == "flip":
        data = bytearray((path / "weights.safetensors").read_bytes())
        data[-1] ^= 1
        (path / "weights.safetensors").write_bytes(bytes(data))
    elif damage == "truncate":
        (path / "detector.json").write_text((path / "detector.json").read_text()[:50])
    elif damage == "delete":
        (path / "weights.safetensors").unlink()
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["format_version"] = 99
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match={"flip": "sha256", "truncate": "sha256", "delete": "missing",
                                            "version": "format"}[damage]):
        load_package(path)


@pytest.fixture(scope="module")
def onnx_package(package, demo, tmp_path_factory):
    """The same detector exported with parity images, so the package carries model.onnx."""
    _, detector, scores = package
    thresholds = json.loads((package[0] / "manifest.json").read_text())["thresholds"]
    path = export_package(detector, tmp_path_factory.mktemp("onnx") / "pkg", thresholds,
                          parity_images=demo[2].subset(range(4)))
    assert (path / "model.onnx").is_file()
    return path, scores


def test_a_loaded_package_scores_with_its_own_model_onnx(onnx_package, demo, monkeypatch):
    """No second export when a package loads: in-memory images run the package's model.onnx as it is."""
    import automl_ad.features.runtime as runtime

    def no_export(*args, **kwargs):
        raise AssertionError("the graph was exported again")

    monkeypatch.setattr(runtime, "_onnx_runner", no_export)
    monkeypatch.setattr(runtime, "_torchscript_runner", no_export)  # the fallback when ONNX Runtime fails
    path, scores = onnx_package
    again = load_package(path).detector.score_samples(ImageSet.from_arrays(demo[2].load()))
    np.testing.assert_allclose(again.image_scores, scores.image_scores, rtol=1e-5, atol=1e-6)


def test_a_model_onnx_with_external_data_is_refused(onnx_package, tmp_path):
    """A tensor whose data lives in another file would make ONNX Runtime open that path: refused at load, even in
    a package whose hashes and integrity record were rewritten to match."""
    import hashlib

    import onnx

    from automl_ad.deploy import package as package_module

    path = shutil.copytree(onnx_package[0], tmp_path / "copy")
    model = onnx.load(path / "model.onnx")
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/hostname")
    (path / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    manifest["integrity"] = package_module._integrity({k: v for k, v in manifest.items() if k != "integrity"})
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="model.onnx refers to external data files"):
        load_package(path)


def test_predict_raises_a_failed_overlay_write_instead_of_losing_it(package, demo, tmp_path, monkeypatch):
    import automl_ad.deploy.predict as predict

    written = []

    def disk_full(path, array):
        if len(written) == 3:
            raise OSError(28, "No space left on device", str(path))
        written.append(path)

    monkeypatch.setattr(predict, "save_png", disk_full)
    images = sorted((demo[0] / "test").rglob("*.png"))[:6]
    with pytest.raises(OSError, match="No space left"):
        predict_files(load_package(package[0]), [str(p) for p in images], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "predictions.csv").exists()  # no summary that names files never written


def test_predict_mixed_inputs_reports_bad_files(package, demo, tmp_path):
    root = demo[0]
    bad = tmp_path / "inputs" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    good = sorted((root / "test" / "good").glob("*.png"))[:2]
    defects = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "good")[:2]
    rows = predict_files(load_package(package[0]), [str(p) for p in good + defects] + [str(bad.parent)],
                         tmp_path / "out", progress=False)
    assert [r["verdict"] for r in rows][-1] == "error" and "broken.png" in rows[-1]["image"]
    assert all(r["verdict"] in ("normal", "anomalous") and r["score_ms"] > 0 for r in rows[:-1])
    assert "score_ms" not in rows[-1]
    assert (tmp_path / "out" / "predictions.csv").is_file() and len(list((tmp_path / "out" / "masks").iterdir())) == 4
    assert sum(r["verdict"] == "anomalous" for r in rows[2:4]) >= sum(r["verdict"] == "anomalous" for r in rows[:2])


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="shared backbone weights not available")
def test_backbone_weights_travel_with_the_package(demo, tmp_path):
    _, train, test = demo
    detector = create_detector("patchcore", backbone="mobilenetv2_100", weights=str(SHARED_WEIGHTS), input_size=64,
                               coreset_ratio=0.5).fit(train)
    path = export_package(detector, tmp_path / "pkg", {"image": calibrate_image_threshold([0.1, 0.2, 0.3]).to_dict()})
    moved = shutil.move(str(path), str(tmp_path / "elsewhere"))
    loaded = load_package(moved)
    assert loaded.detector.get_params()["weights"].startswith(str(moved))
    np.testing.assert_allclose(loaded.detector.score_samples(test).image_scores,
                               detector.score_samples(test).image_scores, rtol=1e-5)


def test_package_served_as_mlflow_pyfunc(package, demo, tmp_path):
    import base64
    import warnings

    import mlflow
    import pandas as pd

    from automl_ad.deploy.serving import log_package

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_uri = log_package(package[0], tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mlflow.pyfunc.load_model(model_uri)
    image = sorted((demo[0] / "test").rglob("*.png"))[0]
    frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode(), str(image)]})
    out = model.predict(frame)
    expected = load_package(package[0]).predict(str(image)).score
    assert out["score"][0] == pytest.approx(expected)
    assert "does not read server-side files" in out["error"][1] and out["score"][1] is None


def _trial(name: str, quality: float, throughput: float, latency_ms: float, model_mb: float, memory_mb: float = 900):
    from automl_ad.tracking.records import TrialRecord

    return TrialRecord(run_id=name, search_id="s", trial=name, family=name, route="r", status="ok",
                       default_config=False, pareto_rank=0, params={},
                       metrics={"quality": quality, "throughput": throughput, "latency_ms_p50": latency_ms,
                                "model_mb": model_mb, "memory_mb": memory_mb})


def test_export_best_takes_the_best_quality_within_the_profiles_limits():
    from automl_ad.deploy.export import best_for, within_limits

    slow = _trial("slow", 0.83, 3.0, 310.0, 3.0, memory_mb=1700)
    small = _trial("small", 0.66, 35.0, 33.0, 0.5, memory_mb=790)
    fast = _trial("fast", 0.66, 63.0, 21.0, 0.3, memory_mb=1440)
    front = [slow, small, fast]
    notes = []
    # no stated limits: the best quality, even when "balanced" would trade 17 points for speed and memory
    assert best_for(within_limits(front, {}, notes.append), "quality") is slow and not notes
    assert best_for(front, "balanced") is small
    assert best_for([small, fast], "quality") is fast  # a tie in quality goes to the higher throughput
    # a latency budget leaves the slow trial out and says so
    assert best_for(within_limits(front, {"latency_ms": 50.0}, notes.append), "quality") is fast
    assert "1 of 3" in notes[-1] and "latency ms <= 50" in notes[-1]
    assert within_limits(front, {"latency_ms": 50.0, "model_mb": 0.4}) == [fast]
    # nothing meets the limits: all are kept, with a warning naming the fastest
    assert within_limits(front, {"latency_ms": 5.0}, notes.append) == front
    assert notes[-1].startswith("warning: no Pareto-front trial meets") and "21.0 ms" in notes[-1]


def test_export_best_says_when_the_search_has_not_ended():
    """A search still running (or killed before it ended) has complete trials but no Pareto front yet: export says
    so and what to do, instead of reporting no complete trial."""
    from dataclasses import replace

    from automl_ad.deploy.export import choose_run
    from automl_ad.errors import UsageError
    from automl_ad.tracking.records import SearchRecord

    running = SearchRecord(run_id="s", experiment="e", data="d", seed=0, metric="combined", validation_kind="real",
                           families=["patchcore"], work_dir=None, fingerprint="", dataset_name="d", start_time=0,
                           params={}, ended=False)
    unranked = replace(_trial("patchcore", 0.9, 50.0, 20.0, 5.0), pareto_rank=None)

    class Store:
        def __init__(self, search):
            self.search = search

        def resolve(self, target):
            return self.search

        def front(self, search_id):
            return []

        def trials(self, search_id):
            return [unranked]

    with pytest.raises(UsageError, match=r"has not ended .*1 complete trial\(s\) so far.*--resume"):
        choose_run(Store(running), None, "quality")
    with pytest.raises(UsageError, match="no complete trial on its Pareto front"):
        choose_run(Store(replace(running, ended=True)), None, "quality")


def test_a_12_bit_cameras_images_are_read_at_its_scale_from_fit_to_predict(demo, tmp_path):
    """16-bit files holding 12-bit values: the dataset reads them by 4095, the detector keeps that scale, and a
    package scores a file path as the detector scored the dataset's images (the 8-bit originals give the same
    scores but for the 0.4% between 16/4095 and 1/255); the synthetic anomalies are written at that scale too."""
    from automl_ad.data.io import read_image
    from automl_ad.deploy.appearance import training_appearance
    from automl_ad.search.validation import synthesise_validation

    source = demo[0]
    for path in sorted(source.rglob("*.png")):
        target = tmp_path / "twelve" / path.relative_to(source)
        image = read_image(path)
        gray = image if "ground_truth" in path.parts else (image.astype(np.float32).mean(axis=-1) if image.ndim == 3
                                                            else image).astype(np.uint16) << 4
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray if "ground_truth" not in path.parts else image).save(target)
    dataset = open_dataset(tmp_path / "twelve")
    assert dataset.full_scale == 4095
    train = ImageSet.from_records(dataset.normal_in("train"), dataset)
    test = ImageSet.from_records([r for r in dataset.records if r.split == "test"], dataset)
    detector = create_detector("gaussian", input_size=64, scales=(1.0, 2.0)).fit(train)
    assert detector.full_scale_ == 4095
    scores = detector.score_samples(test).image_scores
    eight = ImageSet.from_arrays([(read_image(p) >> 4).astype(np.uint8) for p in test.paths])
    np.testing.assert_allclose(detector.score_samples(eight).image_scores, scores, rtol=0.05)
    as_65535 = ImageSet(paths=test.paths, labels=test.labels).at_full_scale(None)
    assert test.image_fingerprints() != ImageSet.from_paths(test.paths).image_fingerprints()  # cache keys differ
    parity = ImageSet.from_paths(test.paths[:4])  # files without their dataset: the detector's scale applies
    np.testing.assert_array_equal(detector.graph_input(parity), detector.graph_input(test.subset(range(4))))
    path = export_package(detector, tmp_path / "pkg", {"image": calibrate_image_threshold(scores).to_dict()},
                          training={"n": len(train), "images": training_appearance(train)}, parity_images=parity)
    package = load_package(path)
    assert (path / "model.onnx").is_file()  # the ONNX graph's parity check read them as the detector does
    assert package.full_scale == 4095 and package.manifest["preprocessing"]["full_scale"] == 4095
    assert package.predict(test.paths[0]).score == pytest.approx(float(scores[0]), rel=1e-4)
    assert package.predict(test.paths[0]).notes == ()
    brighter = package.predict(read_image(test.paths[0]) << 4)  # a 16-bit camera's image
    assert any("above the 4095 (12-bit) of the training images" in note for note in brighter.notes)
    tinted = np.stack([read_image(test.paths[0]) + offset for offset in (0, 96, 192)], axis=-1)  # 6-12 levels
    assert any("a colour image; the training images are gray" in note for note in package.predict(tinted).notes)
    assert test.load(64).max() > 0.5 and as_65535.load(64).max() < 1 / 16  # 65535 would leave them dark
    normals = ImageSet.from_records(dataset.normal_in("test"), dataset)
    synthetic = synthesise_validation(normals, tmp_path / "synthetic")
    assert synthetic.full_scale == 4095 and max(int(read_image(p).max()) for p in synthetic.paths) <= 4095


def test_appearance_notes_images_unlike_the_training_ones():
    """Aspect ratio, size and colour mode against the training images' ranges; a manifest without them (an older
    package) or a malformed one checks nothing."""
    from automl_ad.data.imageset import ImageSet
    from automl_ad.deploy.appearance import differences, training_appearance

    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 255, (100, 200), dtype=np.uint8), rng.integers(0, 255, (120, 220), dtype=np.uint8)]
    looks = training_appearance(ImageSet.from_arrays(gray))
    assert looks == {"height": [100, 120], "width": [200, 220], "aspect": [1.8333, 2.0], "colour": "gray"}
    assert differences(rng.integers(0, 255, (110, 200), dtype=np.uint8), looks) == []
    grey_rgb = np.repeat(rng.integers(0, 255, (110, 200, 1), dtype=np.uint8), 3, axis=2)
    assert differences(grey_rgb, looks) == []  # three equal channels are gray
    assert differences(gray[0].T, looks) == [
        "aspect ratio 0.50 (width / height) against 1.83-2.00 for the training images"]
    assert differences(np.zeros((480, 900), np.uint8), looks) == [
        "900x480 pixels against 200-220x100-120 for the training images"]
    assert differences(rng.integers(0, 255, (110, 200, 3), dtype=np.uint8), looks) == [
        "a colour image; the training images are gray"]
    colour = rng.integers(0, 255, (110, 200, 3), dtype=np.uint8)
    assert differences(colour / 255.0, looks) == ["a colour image; the training images are gray"]  # floats in [0, 1]
    assert differences(grey_rgb / 255.0, looks) == []
    mixed = training_appearance(ImageSet.from_arrays([gray[0], rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)]))
    assert mixed["colour"] == "mixed" and differences(gray[1], mixed) == []
    for malformed in (None, {}, {"height": "tall"}, {"height": [1], "width": [1, 2], "aspect": [1, 2]}, [1, 2]):
        assert differences(gray[0], malformed) == []


def test_appearance_notes_12_bit_values_read_against_65535_by_a_model_of_8_bit_images(tmp_path):
    """A package trained on 8-bit files reads a 16-bit file by 65535: right for a 16-bit camera, 1/16 of the contrast
    for 12-bit values. The note says so, and the colour is judged on the file's own scale (not "gray" because its
    channels are all dark)."""
    from automl_ad.deploy.appearance import differences, training_appearance

    rng = np.random.default_rng(0)
    colour = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(3)]
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for image, path in zip(colour, paths):
        Image.fromarray(image).save(path)
    looks = training_appearance(ImageSet.from_paths(paths))
    assert looks["bits"] == 8 and looks["colour"] == "colour"
    assert differences(colour[0].astype(np.uint16) * 257, looks) == []  # a 16-bit camera: read right
    assert differences(colour[0], looks) == []  # an 8-bit file: nothing to note
    notes = differences(colour[0].astype(np.uint16) * 16, looks)
    assert len(notes) == 1 and "12-bit values) where the training images are 8-bit" in notes[0] \
        and "at 1/16 of their contrast" in notes[0]
    assert "bits" not in training_appearance(ImageSet.from_arrays(colour))  # arrays: their files' depth unknown


def test_the_operating_point_names_synthetic_anomalies_as_such_and_test_defects_as_defects():
    from automl_ad.deploy.export import Calibration, _say_operating_point

    calibration = Calibration({}, {"false_alarm_rate": 0.0, "detection_rate": 0.5}, [], [], [])
    lines = []
    test = {"false_alarm_rate": 0.02, "detection_rate": 0.75}
    _say_operating_point(calibration, {"validation_kind": "synthetic", "test": test}, 0.01, lines.append)
    assert "on validation: false alarms 0.0%, synthetic anomalies detected 50.0%" in lines[0]
    assert "on test: false alarms 2.0%, defects detected 75.0%" in lines[1]
    lines.clear()
    _say_operating_point(calibration, {"validation_kind": "real"}, 0.01, lines.append)
    assert lines == ["At the threshold (target false-alarm rate 0.01) on validation: false alarms 0.0%, defects "
                     "detected 50.0%"]
