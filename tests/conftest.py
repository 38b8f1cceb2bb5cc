"""Shared fixtures: tiny datasets written into tmp_path, and the shared real datasets when present."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BOTTLE = SHARED / "datasets" / "mvtec_ad" / "bottle"
MAGNETIC_TILE = SHARED / "datasets" / "mtd" / "magnetic_tile"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenetv2_100_tflite_in1k.safetensors"

# Tests never touch the user's feature cache; theirs is removed when the session ends.
os.environ["AUTOML_AD_CACHE_DIR"] = tempfile.mkdtemp(prefix="automl-ad-test-cache-")
atexit.register(shutil.rmtree, os.environ["AUTOML_AD_CACHE_DIR"], ignore_errors=True)


def write_image(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def noise_image(seed: int, size: int = 32, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 255, shape, dtype=np.uint8)


def square_mask(size: int = 32, value: int = 255) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[8:16, 8:16] = value
    return mask


@pytest.fixture
def offline(monkeypatch):
    """No hub: backbones load from local files or the built-in weights (cached lookups cleared around the test)."""
    from automl_ad.features import backbone

    monkeypatch.setenv("AUTOML_AD_OFFLINE", "1")
    for cached in (backbone.hub_reachable, backbone._resolved_weights):
        cached.cache_clear()
    yield
    for cached in (backbone.hub_reachable, backbone._resolved_weights):
        cached.cache_clear()


@pytest.fixture
def mvtec_dir(tmp_path: Path) -> Path:
    """A valid MVTec-style category: 6 train good, 2 test good, 2 'crack' with masks."""
    root = tmp_path / "part"
    for i in range(6):
        write_image(root / "train" / "good" / f"{i:03d}.png", noise_image(i))
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", noise_image(100 + i))
        write_image(root / "test" / "crack" / f"{i:03d}.png", noise_image(200 + i))
        write_image(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", square_mask())
    return root


def needs(path: Path):
    """Skip a test when a shared dataset or weights file is not on this machine."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``automl-ad ARGV``; no traceback may be printed."""
    from automl_ad.cli import main  # here, not at the top: the cache folder above must be set before automl_ad loads

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err
