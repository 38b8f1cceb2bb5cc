"""Input geometry through the pipeline: fit, score, feature cache, save/load, ONNX export, package predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from automl_ad import load_package
from automl_ad.data.geometry import Geometry
from automl_ad.data.imageset import ImageSet
from automl_ad.deploy.onnx_export import PARITY_TOLERANCE, export_onnx
from automl_ad.deploy.package import export_package
from automl_ad.detectors import Detector, create_detector
from automl_ad.errors import InvalidParameterError
from automl_ad.features import FeatureCache, load_extractor
from automl_ad.search.space import Parameter, SearchSpace, load_space, proposed_geometries

TILE = Geometry("tile", 64, 96, scale=1.0, overlap=16).to_dict()  # cut to the strip's height, as proposed
LETTERBOX = Geometry("letterbox", 64, 128).to_dict()
#: A random tiny backbone: the tests check the plumbing, not pretrained skill.
BACKBONE = {"backbone": "resnet18", "pretrained": False, "weights": None, "input_size": 64}
WIDE = (64, 320)  # 1:5, as a strip of fabric or a commutator
DEFECT = (slice(28, 36), slice(250, 258))  # 8 x 8 pixels near the right end


def _texture(rng, shape=WIDE) -> np.ndarray:
    """A smooth, repetitive grey texture (stripes plus mild noise), float in [0, 1]."""
    height, width = shape
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    base = 0.5 + 0.2 * np.sin(x / 3.0) * np.cos(y / 5.0)
    return np.clip(base + rng.normal(0, 0.02, shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Eight normal training strips (files) and a test set of a normal strip and one with a small bright defect."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("wide")
    paths = []
    for i in range(8):
        path = folder / f"train_{i}.png"
        Image.fromarray((_texture(rng) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    normal, defective = _texture(rng), _texture(rng)
    defective[DEFECT] = 1.0
    test = []
    for name, image in (("good", normal), ("bad", defective)):
        path = folder / f"test_{name}.png"
        Image.fromarray((image * 255).astype(np.uint8)).save(path)
        test.append(path)
    return ImageSet.from_paths(paths), ImageSet.from_paths(test, labels=[0, 1])


@pytest.mark.parametrize("family", ["padim", "patchcore"])
def test_tiles_find_a_small_defect_at_full_resolution(family, wide, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOML_AD_CACHE_DIR", str(tmp_path))
    train, test = wide
    detector = create_detector(family, **BACKBONE, geometry=TILE).fit(train)
    grids = test.grids(detector.input_geometry())
    assert [g.n_tiles for g in grids] == [4, 4]  # ceil((320 - 16) / (96 - 16)) tiles of 64x96 px per strip
    scores = detector.score_samples(test)
    assert scores.anomaly_maps.shape == (2, *WIDE)  # stitched back to the image, not to the network input
    assert scores.image_scores[1] > scores.image_scores[0]
    peak = np.unravel_index(np.argmax(scores.anomaly_maps[1]), WIDE)
    assert abs(peak[0] - 32) <= 12 and abs(peak[1] - 254) <= 12, peak
    # the image score is the largest of its tiles' scores
    raw = detector._score(test)
    assert len(raw.image_scores) == 8
    assert scores.image_scores[1] == pytest.approx(raw.image_scores[4:].max())


def test_letterbox_scores_images_of_mixed_aspect(tmp_path):
    rng = np.random.default_rng(1)
    train = ImageSet.from_arrays([_texture(rng, shape) for shape in [(64, 128), (60, 150), (80, 120), (64, 128)]])
    shapes = [(64, 128), (50, 160), (64, 128)]
    test = ImageSet.from_arrays([_texture(rng, shape) for shape in shapes])
    detector = create_detector("padim", **BACKBONE, geometry=LETTERBOX).fit(train)
    assert detector.graph_input(test).shape == (3, 3, 64, 128)  # aspect kept: one 64 x 128 input per image
    scores = detector.score_samples(test)
    assert scores.image_scores.shape == (3,) and np.isfinite(scores.image_scores).all()
    assert scores.anomaly_maps.shape == (3, 64, 128)  # every map at the most common image size
    single = detector.score_samples(test.subset([1]))
    assert single.anomaly_maps.shape == (1, 50, 160)  # one image: its own full resolution


def test_feature_cache_key_differs_per_geometry():
    keys = {}
    for name, geometry in [("none", None), ("squash", Geometry.squash(64)), ("tile", Geometry.from_dict(TILE)),
                           ("letterbox", Geometry.from_dict(LETTERBOX))]:
        spec = load_extractor("resnet18", (8,), 64, pretrained=False, geometry=geometry).spec
        keys[name] = FeatureCache.key(spec.key(), "images")
    assert keys["none"] == keys["squash"]  # the default is the squash it always was
    assert len({keys["squash"], keys["tile"], keys["letterbox"]}) == 3


def test_saved_model_keeps_its_geometry(wide, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOML_AD_CACHE_DIR", str(tmp_path))
    train, test = wide
    detector = create_detector("padim", **BACKBONE, geometry=TILE).fit(train)
    loaded = Detector.load(detector.save(tmp_path / "model"))
    assert loaded.get_params()["geometry"] == TILE and loaded.input_geometry() == Geometry.from_dict(TILE)
    record = json.loads((tmp_path / "model" / "detector.json").read_text())
    assert record["params"]["geometry"] == TILE
    np.testing.assert_allclose(loaded.score_samples(test).anomaly_maps, detector.score_samples(test).anomaly_maps,
                               rtol=1e-5, atol=1e-5)
    default = create_detector("padim", **BACKBONE)
    assert default.input_geometry() is None  # geometry None: the square squash to input_size, as before


def test_package_predict_and_onnx_run_the_tile_loop(wide, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOML_AD_CACHE_DIR", str(tmp_path))
    train, test = wide
    detector = create_detector("padim", **BACKBONE, geometry=TILE).fit(train)
    expected = detector.score_samples(test)
    record = export_onnx(detector, tmp_path / "model.onnx", test)
    assert record["file"] == "model.onnx", record.get("reason")
    assert record["parity_relative"] <= PARITY_TOLERANCE and record["input"]["geometry"] == TILE
    path = export_package(detector, tmp_path / "pkg", {"image": {"value": float(expected.image_scores.mean())}},
                          parity_images=test)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["preprocessing"]["geometry"] == TILE and manifest["onnx"]["file"] == "model.onnx"
    assert "stitch" in (path / "README.md").read_text()
    package = load_package(path)
    for index, image_path in enumerate(test.paths):
        prediction = package.predict(image_path)
        assert prediction.anomaly_map.shape == WIDE
        assert prediction.score == pytest.approx(float(expected.image_scores[index]), rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(prediction.anomaly_map, expected.anomaly_maps[index], rtol=1e-4, atol=1e-4)


def test_bad_geometries_are_refused_with_the_reason():
    with pytest.raises(InvalidParameterError, match="tile mode needs a positive finite scale"):
        create_detector("padim", **BACKBONE, geometry={"mode": "tile", "height": 64, "width": 64})._validate_params()
    with pytest.raises(InvalidParameterError, match="unknown keys"):
        create_detector("patchcore", **BACKBONE, geometry={"mode": "squash", "side": 64})._validate_params()
    with pytest.raises(InvalidParameterError, match="must be 64x64"):  # CutPaste trains on square input_size pixels
        create_detector("cutpaste", **BACKBONE, geometry=LETTERBOX)._validate_params()
    with pytest.raises(InvalidParameterError, match="not 64x96"):  # nor a tile that is not square
        create_detector("cutpaste", **BACKBONE, geometry=TILE)._validate_params()
    create_detector("cutpaste", **BACKBONE, geometry={**TILE, "width": 64})._validate_params()


def test_search_space_samples_geometries_as_a_categorical_of_dicts():
    import optuna

    space = SearchSpace("padim", (Parameter("n_features", "int", 8, 16),)).with_geometries([TILE, LETTERBOX, TILE])
    geometry = next(p for p in space.parameters if p.name == "geometry")
    assert geometry.type == "categorical" and list(geometry.choices) == [TILE, LETTERBOX]  # duplicates dropped
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [space.sample(study.ask())["geometry"] for _ in range(12)]
    assert all(g in (TILE, LETTERBOX) for g in seen) and isinstance(seen[0], dict)
    create_detector("padim", **BACKBONE, geometry=seen[0])._validate_params()
    assert space.with_geometries([]) == space  # nothing proposed: the space is unchanged


def test_recommended_geometries_reach_every_backbone_space_the_family_accepts():
    squash = Geometry.squash(256).to_dict()
    tile = Geometry("tile", 256, 256, scale=0.5, overlap=32).to_dict()
    letterbox = Geometry("letterbox", 256, 512).to_dict()
    recommendation = {"geometry": {"geometry": tile, "default": {"geometry": squash},
                                   "alternatives": [{"geometry": letterbox}, {"geometry": tile}]}}
    proposed = proposed_geometries(recommendation)
    assert proposed == [tile, squash, letterbox] and proposed_geometries({}) == []
    padim = load_space("padim").with_geometries(proposed)
    assert padim.parameters[0].name == "geometry" and list(padim.parameters[0].choices) == proposed
    cutpaste = load_space("cutpaste").with_geometries(proposed)  # its network reads 256 x 256 squares only
    assert list(next(p for p in cutpaste.parameters if p.name == "geometry").choices) == [tile, squash]
    gaussian = load_space("gaussian")
    assert gaussian.with_geometries(proposed) == gaussian  # no backbone, no geometry


BACKBONE_FAMILIES = ["patchcore", "padim", "fastflow", "stpm", "simplenet", "deep_svdd", "ocsvm", "cutpaste",
                     "diffusion"]


@pytest.mark.parametrize("family", BACKBONE_FAMILIES)
def test_every_backbone_family_fits_and_scores_tiles_and_letterboxes(family):
    """Tiles (square, at the family's input_size) and, where the family's network allows, a letterbox of another
    aspect: fit, then maps at every image's full resolution."""
    from automl_ad.detectors import detector_class

    params = {**detector_class(family).test_params, "backbone": "resnet18", "pretrained": False, "weights": None}
    params.update({"epochs": min(params.get("epochs", 1), 2)} if "epochs" in params else {})
    if family == "ocsvm":
        params["localization"] = "sliding"
    side = int(params["input_size"])
    rng = np.random.default_rng(2)
    train = ImageSet.from_arrays([_texture(rng, (48, 3 * side)) for _ in range(4)])
    test = ImageSet.from_arrays([_texture(rng, (48, 3 * side)) for _ in range(2)])
    geometries = [Geometry("tile", side, side, scale=1.0, overlap=side // 4)]
    if not detector_class(family).square_network_input:
        geometries.append(Geometry("letterbox", side, 2 * side))
    for geometry in geometries:
        detector = create_detector(family, **params, geometry=geometry.to_dict()).fit(train)
        scores = detector.score_samples(test)
        assert scores.image_scores.shape == (2,) and np.isfinite(scores.image_scores).all(), geometry
        if scores.anomaly_maps is not None:
            assert scores.anomaly_maps.shape == (2, 48, 3 * side), geometry
