"""Backbone features: local weights with their own settings, clear offline errors, the on-disk feature cache."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS, needs

from automl_ad.data.imageset import ImageSet
from automl_ad.errors import AutomlAdError
from automl_ad.features import BackboneWeightsError, FeatureCache, extract_features, load_extractor, resolve_device
from automl_ad.features.backbone import resolve_weights
from automl_ad.features.cache import FEATURE_TIMES


def _images(n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return ImageSet.from_arrays([rng.random((size, size, 3)).astype(np.float32) for _ in range(n)])


def test_device_auto_and_explicit_cuda_check():
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(AutomlAdError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_missing_weights_file_is_explained(tmp_path):
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        resolve_weights("resnet18", str(tmp_path / "nope.safetensors"), True)


def test_offline_without_weights_says_how_to_provide_them(monkeypatch):
    import automl_ad.features.backbone as backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbone, "_hub_cached_file", lambda cfg: None)
    with pytest.raises(BackboneWeightsError, match="--weights PATH"):
        resolve_weights("resnet18", None, True)


def test_random_weights_need_no_download():
    extractor = load_extractor("resnet18", (8, 16), 64, pretrained=False)
    features = extractor.features(_images().load(64))
    assert [f.shape for f in features] == [(3, 128, 8, 8), (3, 256, 4, 4)]


def test_unknown_stride_is_explained():
    with pytest.raises(AutomlAdError, match="feature strides"):
        load_extractor("resnet18", (8, 64), 64, pretrained=False)


@needs(SHARED_WEIGHTS)
def test_known_local_weights_bring_their_settings():
    source = resolve_weights("mobilenetv2_100", str(SHARED_WEIGHTS), True)
    assert source.mean == (0.5, 0.5, 0.5) and dict(source.create_kwargs) == {"pad_type": "same"}
    assert source.identity.startswith("245baed6")
    explicit = resolve_weights("mobilenetv2_100", str(SHARED_WEIGHTS), True, mean=(0.4, 0.4, 0.4))
    assert explicit.mean == (0.4, 0.4, 0.4)
    with pytest.raises(BackboneWeightsError, match="holds mobilenetv2_100 weights"):
        resolve_weights("resnet18", str(SHARED_WEIGHTS), True)


@needs(SHARED_WEIGHTS)
def test_local_weights_give_imagenet_features():
    """The shared weights classify a cat photo as a cat (the weights really loaded, with the right settings)."""
    import timm
    import torch
    from skimage import data

    from automl_ad.data.io import resize_image

    source = resolve_weights("mobilenetv2_100", str(SHARED_WEIGHTS), True)
    model = timm.create_model("mobilenetv2_100", pretrained=True, **dict(source.create_kwargs),
                              pretrained_cfg_overlay=dict(file=source.file)).eval()
    image = resize_image(data.chelsea().astype(np.float32) / 255, 224)
    x = (torch.from_numpy(image.transpose(2, 0, 1))[None] - 0.5) / 0.5
    with torch.inference_mode():
        top = int(model(x).argmax())
    assert top in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_cpu_runner_matches_eager_at_any_batch_size(backend):
    import torch

    from automl_ad.features.runtime import cpu_runner

    extractor = load_extractor("resnet18", (8, 16), 64, pretrained=False)
    runner = cpu_runner(extractor.model, torch.zeros(1, 3, 64, 64), backend=backend)
    for count in (1, 3):
        batch = extractor.normalise(_images(count).load(64))
        with torch.inference_mode():
            eager = extractor.model(batch)
        outputs = runner(batch)
        assert len(outputs) == 2
        for fast, reference in zip(outputs, eager):
            assert fast.shape == reference.shape
            assert torch.allclose(fast, reference, atol=1e-4)
    with pytest.raises(ValueError, match="backend"):
        cpu_runner(extractor.model, torch.zeros(1, 3, 64, 64), backend="tensorrt")


def test_unused_stages_are_not_computed():
    extractor = load_extractor("mobilenetv2_100", (8,), 64, pretrained=False)
    assert len(extractor.model.blocks) == 3  # stem blocks 0-2 reach stride 8; the later ones are dropped
    assert extractor.features(_images(1).load(64))[0].shape == (1, 32, 8, 8)


@pytest.mark.parametrize("size", [(64, 64), (45, 70)])
def test_same_padding_is_constant_in_exported_graphs_and_numerically_unchanged(size, tmp_path):
    """timm's TensorFlow-style 'same' convolutions give the same features with constant padding, and the exported
    graph computes no padding from shapes."""
    import io

    import onnx
    import onnxruntime
    import timm
    import torch

    from automl_ad.features.same_padding import ConstantPaddingConv2dSame, fix_same_padding

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", pretrained=False, features_only=True, pad_type="same").eval()
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        dynamic = model(images)
        fix_same_padding(model)
        constant = model(images)
    assert any(isinstance(m, ConstantPaddingConv2dSame) for m in model.modules())
    for a, b in zip(dynamic, constant):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.onnx.export(model, (images,), buffer, dynamo=False, opset_version=17)
    assert "Shape" not in {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    # ... and ONNX Runtime folds every Pad into its convolution (an empty value input blocked that)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    assert "Pad" not in {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}


def test_feature_cache_round_trip_and_reuse(tmp_path):
    cache = FeatureCache(tmp_path)
    extractor = load_extractor("resnet18", (8, 16), 64, pretrained=False)
    paths = []
    from PIL import Image

    for i, image in enumerate(_images(4).arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    images = ImageSet.from_paths(paths)
    before = dataclasses.replace(FEATURE_TIMES)
    first = extract_features(extractor, images, cache)
    second = extract_features(extractor, images, cache)
    assert (cache.hits, cache.misses) == (4, 4)  # one entry per image
    assert FEATURE_TIMES.computed_images - before.computed_images == 4
    assert FEATURE_TIMES.loaded_images - before.loaded_images == 4
    assert FEATURE_TIMES.computed_s > before.computed_s and FEATURE_TIMES.loaded_s > before.loaded_s
    assert FEATURE_TIMES.saved_s >= before.saved_s
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other = extract_features(load_extractor("resnet18", (8, 16), 64, pretrained=False), images.subset([0, 1]), cache)
    assert other[0].shape[0] == 2 and cache.misses == 4


def test_feature_cache_reuses_images_across_sets(tmp_path):
    """A set that shares images with an earlier one (a screening rung's share, then all images) computes only the
    new images, and the result equals computing it afresh, image rows in order (tiles: several per image)."""
    from PIL import Image

    from automl_ad.data.geometry import Geometry

    arrays = _images(5).arrays
    paths = []
    for i, image in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        size = (64 + 32 * (i % 2), 64)  # two widths: 1 or 2 tiles
        Image.fromarray((image * 255).astype(np.uint8)).resize(size).save(paths[-1])
    images = ImageSet.from_paths(paths)
    tiles = Geometry.from_dict({"mode": "tile", "height": 64, "width": 64, "scale": 1.0, "overlap": 16})
    for geometry in (None, tiles):
        cache = FeatureCache(tmp_path / str(geometry is None))
        extractor = load_extractor("resnet18", (8, 16), 64, pretrained=False, geometry=geometry)
        expected = extractor.features_of(images)
        before = dataclasses.replace(FEATURE_TIMES)
        share = extract_features(extractor, images.subset([1, 3]), cache)
        full = extract_features(extractor, images, cache)
        assert FEATURE_TIMES.computed_images - before.computed_images == 5  # 2, then the 3 not seen
        assert FEATURE_TIMES.loaded_images - before.loaded_images == 2
        assert (cache.hits, cache.misses) == (2, 5)
        for got, want in zip(full, expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
        assert len(share[0]) == sum(1 + (i % 2 if geometry else 0) for i in (1, 3))


def test_damaged_cache_entry_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    key = cache.key({"x": 1}, "abc")
    cache.put(key, [np.ones((2, 3), np.float32)])
    path = next((tmp_path / "features").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:20])
    assert cache.get(key) is None


def test_full_disk_stops_caching_but_not_the_features(tmp_path, monkeypatch, caplog):
    """A cache that cannot be written (here: the disk is full) costs time, never the result: the features are
    returned as computed, nothing half-written stays, one warning says what to do, and the process stops trying."""
    from safetensors import numpy as safetensors_numpy

    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(safetensors_numpy, "save_file", full_disk)
    cache = FeatureCache(tmp_path)
    extractor = load_extractor("resnet18", (8, 16), 64, pretrained=False)
    images = _images(3)
    with caplog.at_level("WARNING", logger="automl_ad.features.cache"):
        features = extract_features(extractor, images, cache)
    for got, want in zip(features, extractor.features_of(images)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(calls) == 1 and not cache.enabled  # tried once, then computed without the cache
    assert list((tmp_path / "features").iterdir()) == []
    assert "No space left on device" in caplog.text and "AUTOML_AD_CACHE_DIR" in caplog.text


def _writer(root, value):
    cache = FeatureCache(root)
    for _ in range(20):
        cache.put("samekey", [np.full((256, 256), value, np.float32)])


def test_concurrent_writers_never_leave_partial_files(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(str(tmp_path), v)) for v in (1.0, 2.0)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    arrays = FeatureCache(tmp_path).get("samekey")
    assert arrays is not None and np.unique(arrays[0]).size == 1
    assert not [p for p in os.listdir(tmp_path / "features") if p.startswith(".tmp-")]


def test_random_weights_are_the_same_in_every_process(tmp_path):
    """The cache keys random backbones as "random": another process must get the same network."""
    import subprocess
    import sys

    code = ("import sys, torch, numpy as np; from automl_ad.features import load_extractor; "
            "torch.manual_seed(int(sys.argv[1])); "  # whatever the process drew from torch's generator before
            "e = load_extractor('resnet18', (8,), 32, pretrained=False); "
            "print(float(e.features(np.full((1, 32, 32, 3), 0.5, np.float32))[0].sum()))")
    sums = {subprocess.run([sys.executable, "-c", code, str(seed)], capture_output=True, text=True,
                           check=True).stdout.strip() for seed in (1, 2)}
    assert len(sums) == 1


def test_importing_automl_ad_first_shortens_torchs_openmp_spin_unless_the_user_set_it():
    """torch's idle OpenMP workers spin on the cores ONNX Runtime runs on next; automl-ad sets libgomp's spin count
    before torch loads it, and keeps a value the user set."""
    import os
    import subprocess
    import sys

    from automl_ad.defaults import OPENMP_SPIN_COUNT

    code = "import automl_ad, os, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "123"}, capture_output=True,
                            text=True, check=True)
    assert ours.stdout.split() == [str(OPENMP_SPIN_COUNT)] and theirs.stdout.split() == ["123"]


def _disk(monkeypatch, total_mb, free_mb):
    """Make every folder's disk report ``total_mb`` in all with ``free_mb`` free."""
    from types import SimpleNamespace

    from automl_ad import folders

    usage = SimpleNamespace(total=total_mb * 2**20, used=(total_mb - free_mb) * 2**20, free=free_mb * 2**20)
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: usage)


def test_cache_never_takes_its_disk_below_the_reserve(tmp_path, monkeypatch, caplog):
    """Whatever its cap, the cache leaves its disk the reserve of free space (2 GB or 5% of the disk): trimming
    evicts the least recently used entries down to it, and a nearly full disk stops new entries (one warning)."""
    from automl_ad.defaults import DISK_RESERVE_MB
    from automl_ad.folders import disk_cap_mb

    cache = FeatureCache(tmp_path)
    _disk(monkeypatch, total_mb=10_000, free_mb=9_000)  # room, whatever this machine's disk holds
    for i in range(4):  # 4 entries of 1 MB, oldest first
        cache.put(f"k{i}", [np.zeros((2**18,), np.float32)])
        os.utime(cache._path(f"k{i}"), (1_000 + i, 1_000 + i))
    _disk(monkeypatch, total_mb=10_000, free_mb=DISK_RESERVE_MB + 1.5)  # room for 1.5 MB more
    assert disk_cap_mb(tmp_path, 4, 20_000) == pytest.approx(5.5)
    assert cache.trim(20_000) == 0
    _disk(monkeypatch, total_mb=10_000, free_mb=DISK_RESERVE_MB - 1.5)  # 1.5 MB below the reserve
    assert cache.trim(20_000) == 2  # 4 MB -> 2.5 MB allowed: the two oldest go
    assert [cache.get(f"k{i}") is not None for i in range(4)] == [False, False, True, True]
    _disk(monkeypatch, total_mb=100_000, free_mb=5_000 + 0.5)  # reserve is 5% of 100 GB here
    with caplog.at_level("WARNING", logger="automl_ad.features.cache"):
        cache.put("k4", [np.zeros((2**18,), np.float32)])
        cache.put("k5", [np.zeros((2**18,), np.float32)])
    assert cache.get("k4") is None and not cache.enabled
    assert caplog.text.count("nearly full") == 1 and "AUTOML_AD_CACHE_DIR" in caplog.text
