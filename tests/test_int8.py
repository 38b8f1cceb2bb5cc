"""``precision="int8"``: backbone families run an ONNX Runtime statically quantised backbone, calibrated on the
training images at fit, saved with the model (a uint8 array in its safetensors, never re-calibrated on load),
part of the feature-cache key, exported in packages as one ONNX graph (normalisation, the same quantised network,
the head) under a stated parity tolerance, and refused on a GPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import write_image

from automl_ad import load_package
from automl_ad.data.imageset import ImageSet
from automl_ad.defaults import BUILTIN_BACKBONE
from automl_ad.deploy.onnx_export import INPUT_NAME, OUTPUT_NAMES, PARITY_TOLERANCE, _parity, export_onnx, run_onnx
from automl_ad.deploy.package import PackageError, _check_onnx, export_package
from automl_ad.detectors import Detector, create_detector, detector_class, feature_based
from automl_ad.detectors.feature_based import INT8_BACKBONE_TENSOR
from automl_ad.detectors.graph_based import GraphDetector
from automl_ad.errors import InvalidParameterError
from automl_ad.evaluation import image_auroc
from automl_ad.features.quantize import calibration_indices, quantise_products
from automl_ad.features.runtime import export_onnx_bytes

SIZE = 64
#: How much image AUROC int8 may lose against fp32 on the easy synthetic defect below (test scale, not a benchmark).
AUROC_LOSS = 0.05


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A normal image: diagonal stripes of random phase over a gray background, with mild noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    stripes = 0.5 + 0.2 * np.sin((x + y) * 0.6 + rng.uniform(0, 2 * np.pi))
    image = stripes[..., None] * np.array([0.9, 0.8, 0.7]) + rng.normal(0, 0.02, (SIZE, SIZE, 3))
    return np.clip(image, 0, 1).astype(np.float32)


def _defect(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An easy defect: a dark 14-pixel square at a random place."""
    top, left = rng.integers(4, SIZE - 18, 2)
    image = image.copy()
    image[top:top + 14, left:left + 14] = [0.05, 0.1, 0.3]
    return image


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    train = ImageSet.from_arrays([_texture(rng) for _ in range(12)])
    normals = [_texture(rng) for _ in range(8)]
    defects = [_defect(_texture(rng), rng) for _ in range(8)]
    test = ImageSet.from_arrays(normals + defects, labels=np.array([0] * 8 + [1] * 8))
    return train, test


def _detector(family: str, precision: str, **extra) -> Detector:
    params = {"backbone": BUILTIN_BACKBONE, "input_size": SIZE, "device": "cpu", "precision": precision, **extra}
    if family == "patchcore":
        params["coreset_ratio"] = 0.5
    return create_detector(family, **params)


@pytest.fixture(scope="module")
def fitted(sets):
    """fp32 and int8 PatchCore and PaDiM fitted on the same training images."""
    train, _ = sets
    return {(family, precision): _detector(family, precision).fit(train)
            for family in ("patchcore", "padim") for precision in ("fp32", "int8")}


@pytest.mark.parametrize("family", ["patchcore", "padim"])
def test_int8_scores_finite_and_close_to_fp32(family, fitted, sets):
    _, test = sets
    fp32, int8 = fitted[family, "fp32"], fitted[family, "int8"]
    reference, quantised = fp32.score_samples(test), int8.score_samples(test)
    assert np.isfinite(quantised.image_scores).all() and np.isfinite(quantised.anomaly_maps).all()
    assert not np.array_equal(reference.image_scores, quantised.image_scores)  # the int8 network really ran
    fp32_auroc = image_auroc(test.labels, reference.image_scores)
    int8_auroc = image_auroc(test.labels, quantised.image_scores)
    assert fp32_auroc >= 0.9, f"the synthetic defect should be easy for fp32 {family} (AUROC {fp32_auroc:.3f})"
    assert int8_auroc >= fp32_auroc - AUROC_LOSS, f"{family}: int8 AUROC {int8_auroc:.3f} vs fp32 {fp32_auroc:.3f}"
    # scores rank the images nearly as fp32 does
    assert np.corrcoef(reference.image_scores, quantised.image_scores)[0, 1] > 0.98  # 0.999 seen


def test_int8_backbone_is_onnx_qdq_with_per_channel_weights(fitted):
    detector = fitted["padim", "int8"]
    model = onnx.load_from_string(detector.int8_backbone_)
    operators = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    weight_scales = [init for init in model.graph.initializer if init.name.endswith("_scale") and init.dims]
    assert weight_scales and max(init.dims[0] for init in weight_scales) > 1  # one scale per output channel
    assert fitted["padim", "fp32"].int8_backbone_ is None


def test_calibration_sample_is_spread_and_bounded():
    assert list(calibration_indices(5, 32)) == [0, 1, 2, 3, 4]
    picked = calibration_indices(1000, 32)
    assert len(picked) == 32 and picked[0] == 0 and picked[-1] == 999


@pytest.mark.parametrize("family", ["patchcore", "padim"])
def test_save_load_scores_identically_without_recalibrating(family, fitted, sets, tmp_path, monkeypatch):
    _, test = sets
    detector = fitted[family, "int8"]
    detector.save(tmp_path)
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "tensors.safetensors"))[INT8_BACKBONE_TENSOR]
    assert stored.dtype == np.uint8 and stored.tobytes() == detector.int8_backbone_

    def no_calibration(*args, **kwargs):
        raise AssertionError("a loaded int8 model must not be calibrated again")

    monkeypatch.setattr(feature_based, "quantise_backbone", no_calibration)
    loaded = Detector.load(tmp_path)
    assert loaded.precision == "int8" and loaded.int8_backbone_ == detector.int8_backbone_
    np.testing.assert_array_equal(loaded.score_samples(test).image_scores, detector.score_samples(test).image_scores)
    np.testing.assert_array_equal(loaded.score_samples(test).anomaly_maps, detector.score_samples(test).anomaly_maps)


@pytest.mark.parametrize("family", ["fastflow", "simplenet", "deep_svdd", "ocsvm"])
def test_every_family_searching_int8_loads_what_it_saved(family, sets, tmp_path):
    """Families that restore their whole state dict must not see the int8 network among their arrays."""
    train, test = sets
    params = {**detector_class(family).test_params, "backbone": BUILTIN_BACKBONE, "pretrained": True,
              "input_size": SIZE, "device": "cpu", "precision": "int8"}
    detector = create_detector(family, **params).fit(train)
    detector.save(tmp_path)
    loaded = Detector.load(tmp_path)
    assert loaded.int8_backbone_ == detector.int8_backbone_
    np.testing.assert_allclose(loaded.score_samples(test).image_scores, detector.score_samples(test).image_scores,
                               rtol=1e-5, atol=1e-5)


def test_saved_state_must_match_precision(fitted, tmp_path):
    fitted["padim", "int8"].save(tmp_path)
    record = json.loads((tmp_path / "detector.json").read_text())
    record["params"]["precision"] = "fp32"
    (tmp_path / "detector.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match="int8 backbone but precision is 'fp32'"):
        Detector.load(tmp_path)


def test_feature_cache_key_names_the_int8_network(fitted):
    fp32_key = fitted["padim", "fp32"]._extractor().spec.key()
    int8_key = fitted["padim", "int8"]._extractor().spec.key()
    assert fp32_key["precision"] == "fp32" and "int8_model" not in fp32_key
    assert int8_key["precision"] == "int8" and len(int8_key["int8_model"]) == 64
    assert {k: v for k, v in int8_key.items() if k not in ("precision", "int8_model")} == \
        {k: v for k, v in fp32_key.items() if k != "precision"}
    other = fitted["patchcore", "int8"]._extractor().spec.key()  # same backbone and training set: same network
    assert other["int8_model"] == int8_key["int8_model"]


@pytest.mark.parametrize("family", ["patchcore", "padim"])
def test_package_carries_the_quantised_graph_with_parity(family, fitted, sets, tmp_path):
    _, test = sets
    detector = fitted[family, "int8"]
    path = export_package(detector, tmp_path / "pkg", {"image": {"value": 1.0}}, parity_images=test.subset([0, 8]))
    manifest = json.loads((path / "manifest.json").read_text())
    record = manifest["onnx"]
    assert record["file"] == "model.onnx", record.get("reason")
    assert record["backbone_precision"] == "int8" and "MinMax" in record["quantisation"]
    assert record["parity_tolerance"] == PARITY_TOLERANCE and record["parity_relative"] <= PARITY_TOLERANCE
    assert manifest["params"]["precision"] == "int8"
    model = onnx.load(str(path / "model.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) > 10
    # PatchCore's nearest-neighbour products by its bank run in int8 too, and the manifest says so
    products = family == "patchcore"
    assert any(node.op_type == "MatMulInteger" for node in model.graph.node) == products
    assert ("dynamic quantisation" in record["quantisation"]) == products
    # every test image (another batch size than the check's) agrees within the stated tolerance
    scores, maps = run_onnx(path / "model.onnx", detector.graph_input(test))
    expected = detector.score_samples(test)
    span = np.ptp(expected.anomaly_maps)
    assert np.abs(maps - expected.anomaly_maps).max() <= PARITY_TOLERANCE * span
    assert np.abs(scores - expected.image_scores).max() <= PARITY_TOLERANCE * span
    package = load_package(path)
    np.testing.assert_array_equal(package.detector.score_samples(test).image_scores, expected.image_scores)


@pytest.mark.parametrize("family", ["patchcore", "padim"])
def test_in_memory_images_run_the_whole_int8_graph_in_one_session(family, fitted, sets):
    """In-memory images (deployment, latency) run normalisation, the quantised backbone and the head as one ONNX
    Runtime session, the graph packages carry; it agrees with the quantised backbone run on its own, its features
    passed to the head (the path of image files, through the feature cache)."""
    _, test = sets
    detector = fitted[family, "int8"]
    detector._runners = None
    whole = detector._score(test)
    assert set(detector._runners) == {"whole"}
    two_sessions = GraphDetector._score(detector, test)
    assert set(detector._runners) == {"whole", "head"}
    span = np.ptp(two_sessions.anomaly_maps)
    assert np.abs(whole.anomaly_maps - two_sessions.anomaly_maps).max() <= PARITY_TOLERANCE * span
    assert np.abs(whole.image_scores - two_sessions.image_scores).max() <= PARITY_TOLERANCE * span


def test_int8_patchcore_scores_cached_features_with_the_quantised_product(fitted, sets, monkeypatch):
    """Image files (features from the cache) run PatchCore's head with its bank product in int8, as in-memory
    images and packages do, so the search validates what gets deployed; fp32 keeps the exact product."""
    _, test = sets
    built = []
    monkeypatch.setattr("automl_ad.detectors.graph_based.quantise_products",
                        lambda model: built.append(model) or quantise_products(model))
    for precision, quantised in (("fp32", False), ("int8", True)):
        detector = fitted["patchcore", precision]
        detector._runners = None
        GraphDetector._score(detector, test)
        assert bool(built) == quantised
    operators = {node.op_type for node in onnx.load_from_string(quantise_products(built[0])).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators and "Gemm" not in operators


def test_parity_check_tells_the_fp32_network_from_the_int8_one(fitted, sets, tmp_path):
    """The check would catch a package that carried the fp32 backbone of an int8 detector."""
    _, test = sets
    detector = fitted["padim", "int8"]
    inputs = detector.graph_input(test)
    fp32 = export_onnx_bytes(detector.inference_graph(), (torch.from_numpy(inputs[:2]),), [INPUT_NAME],
                             list(OUTPUT_NAMES))  # the fp32 network
    (tmp_path / "fp32.onnx").write_bytes(fp32)
    assert _parity(detector.score_samples(test), *run_onnx(tmp_path / "fp32.onnx", inputs))["relative"] > \
        10 * PARITY_TOLERANCE


def test_manifest_check_refuses_an_inconsistent_precision_record(fitted, sets, tmp_path):
    _, test = sets
    record = export_onnx(fitted["padim", "int8"], tmp_path / "model.onnx", test.subset([0, 8]))
    files = {"model.onnx": "0" * 64}
    _check_onnx(tmp_path, record, files)  # as exported: accepted
    for broken in ({**record, "backbone_precision": "int4"}, {k: v for k, v in record.items() if k != "quantisation"},
                   {**record, "backbone_precision": "fp32"}):
        with pytest.raises(PackageError, match="onnx.(backbone_precision|quantisation)"):
            _check_onnx(tmp_path, broken, files)


def test_cached_features_of_files_are_kept_apart_by_precision(sets, tmp_path):
    """Image files go through the feature cache: int8 and fp32 features get their own entries, and a fit on files
    scores as one on the same pixels in memory."""
    train, test = sets
    paths = [write_image(tmp_path / f"{i}.png", (image * 255).round().astype(np.uint8))
             for i, image in enumerate(train.load(SIZE))]
    files = ImageSet.from_paths(paths)
    cache = feature_based.feature_cache()
    before = set(cache.root.glob("*.safetensors")) if cache.root.is_dir() else set()
    int8 = _detector("padim", "int8").fit(files)
    _detector("padim", "fp32").fit(files)
    assert len(set(cache.root.glob("*.safetensors")) - before) == 2 * len(files)  # per image and precision
    in_memory = _detector("padim", "int8").fit(ImageSet.from_arrays([np.asarray(p) for p in files.load(SIZE)]))
    np.testing.assert_allclose(int8.score_samples(test).image_scores, in_memory.score_samples(test).image_scores,
                               rtol=1e-5)


def test_fp32_package_records_fp32(fitted, sets, tmp_path):
    _, test = sets
    record = export_onnx(fitted["padim", "fp32"], tmp_path / "model.onnx", test.subset([0, 8]))
    assert record["backbone_precision"] == "fp32" and "quantisation" not in record


def test_head_reading_images_exports_with_int8(sets, tmp_path):
    """STPM's student reads the images: the int8 graph passes them through to the head."""
    train, test = sets
    detector = _detector("stpm", "int8", epochs=1, feature_strides=(4, 8)).fit(train)
    record = export_onnx(detector, tmp_path / "model.onnx", test.subset([0, 8]))
    assert record["file"] == "model.onnx", record.get("reason")
    assert record["parity_relative"] <= PARITY_TOLERANCE


def test_int8_is_refused_on_a_gpu(sets, monkeypatch):
    train, _ = sets
    monkeypatch.setattr(feature_based, "resolve_device", lambda device: "cuda")
    detector = _detector("padim", "int8", device="auto")
    with pytest.raises(InvalidParameterError, match="precision int8 runs on CPU through ONNX Runtime; use fp32 on a "
                       "GPU"):
        detector.fit(train)


def test_precision_is_checked_and_absent_where_the_backbone_is_fine_tuned(sets):
    train, _ = sets
    with pytest.raises(InvalidParameterError, match="precision"):
        _detector("padim", "int4").fit(train)
    assert "precision" not in detector_class("cutpaste")().get_params()
    for family in ("patchcore", "padim", "stpm", "fastflow", "simplenet", "deep_svdd", "diffusion", "ocsvm"):
        assert detector_class(family)().get_params()["precision"] == "fp32"
