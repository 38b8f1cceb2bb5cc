"""Hostile input at intake: decompression bombs among the images, hostile constraint profiles and YAML, markup in
paths. Each case checks the error says what is wrong and what to do, and that the rest of the work still ran.

Bombs are made in tmp_path at test time: a 30000x30000 PNG (875 KB, 900 million pixels) whose deflate stream is
one compressed block repeated, and a 30000x30000 TIFF (0.9 MB) of pre-compressed zlib tiles.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import noise_image, write_image
from PIL import Image

from automl_ad.cli import EXIT_OK, EXIT_USAGE, main
from automl_ad.constraints import load_constraints
from automl_ad.constraints.profile import constraints_from_dict
from automl_ad.data import open_dataset
from automl_ad.data.io import ImageReadError, ImageTooLargeError, decode_image_bytes, read_image
from automl_ad.defaults import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, YAML_MAX_BYTES
from automl_ad.errors import ConfigError
from automl_ad.profiling import profile_dataset
from automl_ad.search.space import SPACES_ENV, load_space

BOMB_SIDE = 30000
RAISE_IT = f"raise the limit with {MAX_IMAGE_PIXELS_ENV}"


def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid 8-bit gray PNG of zeros; the deflate stream repeats one flushed block, so it is built instantly."""
    rows = 1000
    block = bytes(width + 1) * rows  # filter byte + pixels, per row
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate.compress(block)
    first = deflate.flush(zlib.Z_FULL_FLUSH)
    deflate.compress(block)
    repeat = deflate.flush(zlib.Z_FULL_FLUSH)  # a full flush resets the history: every later block encodes alike
    total = (width + 1) * height
    adler = ((total % 65521) << 16) | 1  # Adler-32 of `total` zero bytes
    stream = b"\x78\xda" + first + repeat * (height // rows - 1) + deflate.flush() + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def tiff_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A zlib-tiled 8-bit TIFF of zeros; tifffile writes the pre-encoded tiles as they are."""
    tile = zlib.compress(bytes(1024 * 1024), 9)
    count = ((side + 1023) // 1024) ** 2
    tifffile.imwrite(path, (tile for _ in range(count)), shape=(side, side), dtype=np.uint8, tile=(1024, 1024),
                     compression="zlib")
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    (folder / "bomb.png").write_bytes(png_bomb())
    return {"png": folder / "bomb.png", "tif": tiff_bomb(folder / "bomb.tif")}


def test_the_bombs_are_real_and_small():
    small = png_bomb(3000, 3000)  # same construction, small enough to decode here
    assert np.asarray(Image.open(io.BytesIO(small))).shape == (3000, 3000)
    assert len(png_bomb()) < 1_000_000


def test_png_bomb_in_a_dataset_is_reported_and_the_rest_is_profiled(mvtec_dir, bombs):
    shutil.copy(bombs["png"], mvtec_dir / "train" / "good" / "huge.png")
    dataset = open_dataset(mvtec_dir)
    problem = next(p for p in dataset.problems if p.path.name == "huge.png")
    assert "900,000,000 pixels" in problem.problem and f"limit of {MAX_IMAGE_PIXELS:,}" in problem.problem
    assert "skipped" in problem.problem and RAISE_IT in problem.fix
    profile = profile_dataset(dataset)
    assert profile.counts.normal_train == 6 and profile.counts.skipped_files == 1


def test_bomb_mask_keeps_its_image_without_a_mask(mvtec_dir, bombs):
    mask = mvtec_dir / "ground_truth" / "crack" / "000_mask.png"
    shutil.copy(bombs["png"], mask)
    dataset = open_dataset(mvtec_dir)
    problem = next(p for p in dataset.problems if p.path == mask)
    assert "900,000,000 pixels" in problem.problem and "kept without a mask" in problem.problem
    assert sum(r.label == "crack" for r in dataset.records) == 2


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from /proc (Linux)")
def test_bombs_are_refused_from_the_header_without_decoding(bombs):
    """In a fresh process: both bombs refused by read_image and decode_image_bytes, and the process's peak memory
    (VmHWM: that of its own address space; ru_maxrss would include the forked parent's) stays far below the
    900 MB one decoded bomb needs."""
    script = (
        "import json, re, sys\n"
        "from pathlib import Path\n"
        "from automl_ad.data.io import ImageTooLargeError, decode_image_bytes, read_image\n"
        "errors = []\n"
        "for path in sys.argv[1:]:\n"
        "    for decode in (lambda: read_image(path), lambda: decode_image_bytes(Path(path).read_bytes(), 'upload')):\n"
        "        try:\n"
        "            decode()\n"
        "            errors.append(None)\n"
        "        except ImageTooLargeError as exc:\n"
        "            errors.append(str(exc))\n"
        "peak = re.search(r'VmHWM:\\s*(\\d+) kB', Path('/proc/self/status').read_text())\n"
        "print(json.dumps({'errors': errors, 'peak_mb': int(peak.group(1)) / 1024}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bombs["png"]), str(bombs["tif"])], capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    png_file, png_bytes, tif_file, tif_bytes = result["errors"]
    assert png_file.startswith(str(bombs["png"])) and "900,000,000 pixels" in png_file and RAISE_IT in png_file
    assert tif_file.startswith(str(bombs["tif"])) and "30000x30000 (900,000,000 pixels)" in tif_file
    assert png_bytes.startswith("upload ") and tif_bytes.startswith("upload is 30000x30000")
    assert result["peak_mb"] < 400, f"peak {result['peak_mb']:.0f} MB: the bomb was decoded"


def test_decode_image_bytes_matches_read_image_and_names_its_source(tmp_path, bombs):
    good = write_image(tmp_path / "good.png", noise_image(3))
    np.testing.assert_array_equal(decode_image_bytes(good.read_bytes()), read_image(good))
    tif = tmp_path / "wide.tif"
    tifffile.imwrite(tif, (noise_image(4).astype(np.uint16) * 257))
    np.testing.assert_array_equal(decode_image_bytes(tif.read_bytes()), read_image(tif))
    with pytest.raises(ImageTooLargeError, match=r"^inputs\[1\] has 900,000,000 pixels"):
        decode_image_bytes(bombs["png"].read_bytes(), "inputs[1]")
    with pytest.raises(ImageReadError, match=r"^inputs\[2\] is empty"):
        decode_image_bytes(b"", "inputs[2]")


def test_pixel_limit_follows_argument_then_environment(tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.png", noise_image(0, size=40))  # 1,600 pixels
    with pytest.raises(ImageTooLargeError, match=r"a.png is 40x40 \(1,600 pixels\), more than the limit of 1,000"):
        read_image(image, max_pixels=1000)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1000")
    with pytest.raises(ImageTooLargeError, match="limit of 1,000 pixels"):
        read_image(image)
    assert read_image(image, max_pixels=2000).shape == (40, 40, 3)  # the argument wins over the environment
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "2000")
    assert read_image(image).shape == (40, 40, 3)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=f"{MAX_IMAGE_PIXELS_ENV}='lots' is not a positive whole number"):
        read_image(image)


def test_environment_limit_applies_to_intake(mvtec_dir, monkeypatch):
    write_image(mvtec_dir / "train" / "good" / "big.png", noise_image(7, size=64))  # 4,096 pixels; others 1,024
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "2000")
    dataset = open_dataset(mvtec_dir)
    assert [p.path.name for p in dataset.problems if "limit of 2,000" in p.problem] == ["big.png"]
    assert sum(r.split == "train" for r in dataset.records) == 6


# automl_ad.data.io silences Pillow's warning process-wide; pytest restores the warning filters for every test.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_limit_yields_to_a_larger_user_limit(tmp_path, monkeypatch):
    """Pillow's own hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS) becomes our error, and a larger limit the user
    sets is the one that decides."""
    image = write_image(tmp_path / "a.png", noise_image(0, size=64))  # 4,096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2,000
    with pytest.raises(ImageTooLargeError, match="has 4,096 pixels, more than the limit of 3,000"):
        read_image(image, max_pixels=3000)
    assert read_image(image, max_pixels=5000).shape == (64, 64, 3)


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, key", [
    ("latency_ms: .nan\n", "'latency_ms' is nan"),
    ("throughput_fps: .inf\n", "'throughput_fps' is inf"),
    ("priorities: {accuracy: .nan}\n", "'priorities.accuracy' is nan"),
    ("priorities: {speed: .inf}\n", "'priorities.speed' is inf"),
    ("hardware: {device: cpu, ram_gb: -.inf}\n", "'hardware.ram_gb' is -inf"),
    ("training_time: .nan\n", "'training_time' is nan"),
])
def test_non_finite_numbers_in_a_profile_are_refused(tmp_path, text, key):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_constraints(path)
    assert str(info.value).startswith(f"{path}: {key}, not a finite number; write a number")


@pytest.mark.parametrize("data, message", [
    ({"latency_ms": float("nan")}, "'latency_ms' must be a positive number, got nan (not a finite number)"),
    ({"max_model_mb": float("inf")}, "'max_model_mb' must be a positive number, got inf (not a finite number)"),
    ({"latency_ms": 10**400}, "'latency_ms' must be a positive number"),
    ({"priorities": {"accuracy": float("nan")}}, "priority 'accuracy' must be a number >= 0, got nan"),
    ({"training_time": float("inf")}, "training_time: duration inf must be a positive, finite time"),
])
def test_non_finite_numbers_in_a_profile_mapping_are_refused(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        constraints_from_dict(data, where="p.yaml")


def test_non_utf8_profile_is_a_config_error(tmp_path, mvtec_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: Prüfstand\nlatency_ms: 20\n".encode("latin-1"))
    assert main(["recommend", str(mvtec_dir), "--profile", str(path)]) == EXIT_USAGE
    assert f"error: {path}: is not UTF-8 text (byte 0xfc at offset 8" in capsys.readouterr().err
    path.write_bytes("\ufeffname: Prüfstand\nlatency_ms: 20\n".encode("utf-8"))  # UTF-8, even with a BOM, is fine
    assert load_constraints(path).name == "Prüfstand"


def test_alias_bomb_profile_is_refused_but_ordinary_anchors_work(tmp_path):
    bomb = tmp_path / "lol.yaml"
    bomb.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) expand to more than 100,000 values .*alias bomb"):
        load_constraints(bomb)
    merged = tmp_path / "merge.yaml"
    merged.write_text("priorities: {accuracy: &weight 2.0, speed: *weight}\n")
    assert load_constraints(merged).priorities["speed"] == 2.0


@pytest.mark.parametrize("text, message", [
    ("a: &a [1, *a]\n", "contains an alias to itself"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("latency_ms: !!python/object/apply:os.system [echo hi]\n", "could not determine a constructor"),
])
def test_self_reference_deep_nesting_and_python_tags_are_refused(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_constraints(path)
    assert str(info.value).startswith(str(path))


def test_oversized_yaml_file_is_not_read(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * (YAML_MAX_BYTES // 10 + 1) + "latency_ms: 20\n")
    with pytest.raises(ConfigError, match=f"is larger than {YAML_MAX_BYTES:,} bytes"):
        load_constraints(path)


def test_param_alias_bomb_is_a_usage_error_and_nothing_is_written(mvtec_dir, tmp_path, capsys):
    bomb = "[" + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]" for i in range(9)) + "]"
    out = tmp_path / "model"
    assert main(["fit", str(mvtec_dir), "--family", "patchcore", "--param", f"feature_strides={bomb}",
                 "--out", str(out)]) == EXIT_USAGE
    assert "error: --param feature_strides: its aliases (*name) expand to more than" in capsys.readouterr().err
    assert main(["fit", str(mvtec_dir), "--family", "patchcore", "--param", "coreset_ratio=.nan",
                 "--out", str(out)]) == EXIT_USAGE
    assert "error: --param coreset_ratio: the value is nan, not a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_search_space_alias_bomb_is_refused(tmp_path, monkeypatch):
    (tmp_path / "patchcore.yaml").write_text(BILLION_LAUGHS)
    monkeypatch.setenv(SPACES_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="patchcore.yaml: its aliases"):
        load_space("patchcore")


def test_markup_in_a_path_is_printed_literally(tmp_path, bombs, capsys):
    """`[/red]` in the data path (and so in every problem line and the profile header) is text, not markup."""
    root = tmp_path / "[" / "red]" / "[bold]part"  # the path reads .../[/red]/[bold]part
    for i in range(6):
        write_image(root / "train" / "good" / f"{i:03d}.png", noise_image(i))
    shutil.copy(bombs["png"], root / "train" / "good" / "huge.png")
    assert main(["profile", str(root)]) == EXIT_OK
    out = " ".join(capsys.readouterr().out.split())  # undo the console's line wrapping
    assert f"[bold]part (mvtec layout, {root})" in out
    assert f"[error] {root}/train/good/huge.png: image has 900,000,000 pixels" in out


def test_problem_lines_carry_no_literal_markup_tags(mvtec_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cut = mvtec_dir / "train" / "good" / "cut.png"
    cut.write_bytes((mvtec_dir / "train" / "good" / "000.png").read_bytes()[:100])
    assert main(["recommend", str(mvtec_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"[error] {cut}: image is truncated" in " ".join(out.split())
    assert "[yellow]" not in out and "[/yellow]" not in out
    assert "Memory bank" in out  # the recommendation still ran
