"""ONNX export: every family with an inference graph matches its own ``score_samples`` under onnxruntime (the
exported file holds the whole inference from the preprocessed image, where ``score_samples`` runs the family's
head on the extracted features; ``test_graph_references.py`` checks that head against numpy), packages ship
model.onnx with its parity figures (covered by the sha256 manifest), and the others say why they have none."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from automl_ad import load_package
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.deploy.onnx_export import PARITY_TOLERANCE, export_onnx, run_onnx
from automl_ad.deploy.package import PackageError, export_package
from automl_ad.detectors import create_detector, detector_class

EXPORTABLE = ["patchcore", "padim", "stpm", "fastflow", "autoencoder", "ganomaly", "deep_svdd", "simplenet",
              "gaussian"]
#: Extra settings covering the other branches of some graphs (score reductions, modes, objectives).
VARIANTS = {"autoencoder": {"map_metric": "ssim", "image_score": "top_k_mean"}, "ganomaly": {"image_score": "latent"},
            "gaussian": {"mode": "shared"}, "deep_svdd": {"objective": "soft-boundary"},
            "stpm": {"map_combination": "sum", "smoothing_sigma": 2.0}, "patchcore": {"embedding_dim": 64}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = generate_demo(tmp_path_factory.mktemp("demo"), categories=["object"], n_train=8, n_test_good=2,
                         n_test_per_defect=1, size=64)["object"]
    dataset = open_dataset(root)
    train = ImageSet.from_records(dataset.normal_in("train"), dataset)
    test = ImageSet.from_records([r for r in dataset.records if r.split == "test"], dataset)
    return train, test


def _fit(name: str, train: ImageSet, **extra):
    """The family's cheap test settings with a random tiny backbone and at most 2 epochs (parity needs no skill)."""
    params = {**detector_class(name).test_params, **extra}
    if "backbone" in params:
        params.update(backbone="resnet18", weights=None, pretrained=False)
    if "epochs" in params:
        params["epochs"] = min(params["epochs"], 2)
    return create_detector(name, **params).fit(train)


@pytest.mark.parametrize("name, params", [(name, {}) for name in EXPORTABLE] + list(VARIANTS.items()),
                         ids=EXPORTABLE + [f"{name}-variant" for name in VARIANTS])
def test_onnx_matches_score(name, params, demo, tmp_path):
    train, test = demo
    detector = _fit(name, train, **params)
    record = export_onnx(detector, tmp_path / "model.onnx", test.subset([0, 1]))
    assert record["file"] == "model.onnx", record.get("reason")
    assert record["parity_relative"] <= PARITY_TOLERANCE
    # all test images at once: another batch size than the export's and the check's
    outputs = detector.per_image_scores(test, *run_onnx(tmp_path / "model.onnx", detector.graph_input(test)))
    scores, maps = outputs.image_scores, outputs.anomaly_maps
    expected = detector.score_samples(test)
    span = np.ptp(expected.anomaly_maps)
    assert np.abs(scores - expected.image_scores).max() <= PARITY_TOLERANCE * span
    assert np.abs(maps - expected.anomaly_maps).max() <= PARITY_TOLERANCE * span
    assert record["input"]["shape"] == ["batch", *detector.graph_input(test.subset([0])).shape[1:]]


def test_package_ships_checked_onnx_covered_by_the_manifest(demo, tmp_path):
    train, test = demo
    detector = _fit("padim", train)
    path = export_package(detector, tmp_path / "pkg", {"image": {"value": 1.0}}, parity_images=test.subset([0, 3]))
    manifest = json.loads((path / "manifest.json").read_text())
    onnx = manifest["onnx"]
    assert onnx["file"] == "model.onnx" and onnx["opset"] == 17 and "model.onnx" in manifest["files"]
    assert onnx["input"]["size"] == 64 and onnx["input"]["channels"] == 3 and onnx["parity_images"] == 2
    assert max(onnx["parity_max_abs_diff"].values()) < 1e-3
    assert "Running model.onnx" in (path / "README.md").read_text()
    load_package(path)
    copy = shutil.copytree(path, tmp_path / "copy")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model.onnx does not match its sha256"):
        load_package(copy)


@pytest.mark.parametrize("name, params, reason", [
    ("frequency", {}, "Fourier"),
    ("patchcore", {"index": "hnsw"}, "only the exact index"),
])
def test_family_without_graph_records_why(name, params, reason, demo, tmp_path):
    train, test = demo
    detector = _fit(name, train, **params)
    with pytest.warns(UserWarning, match="model.onnx is not part of the package"):
        path = export_package(detector, tmp_path / "pkg", {"image": {"value": 1.0}}, parity_images=test)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["onnx"]["file"] is None and reason in manifest["onnx"]["reason"]
    assert not (path / "model.onnx").exists() and "has no model.onnx" in (path / "README.md").read_text()


def test_failed_parity_or_no_images_ship_no_onnx(demo, tmp_path, monkeypatch):
    train, test = demo
    detector = _fit("padim", train)
    with pytest.warns(UserWarning, match="no images"):
        assert export_onnx(detector, tmp_path / "a.onnx", None)["file"] is None
    real = detector.score_samples
    monkeypatch.setattr(detector, "score_samples", lambda images: type(real(images))(real(images).image_scores + 1,
                                                                             real(images).anomaly_maps))
    with pytest.warns(UserWarning, match="parity check failed"):
        record = export_onnx(detector, tmp_path / "b.onnx", test)
    assert record["file"] is None and not (tmp_path / "b.onnx").exists()
