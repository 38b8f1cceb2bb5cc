"""Hostile /invocations requests against a served package: server paths, non-images, bombs, oversized payloads.

Requests go through MLflow's own scoring-server code (``scoring_server.invocations``: JSON parsing, the model,
JSON serialisation) on the pyfunc model loaded in-process, so each answer is exactly what the HTTP server sends.
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_image, write_image
from PIL import Image

from automl_ad import load_package
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.data.imageset import ImageSet
from automl_ad.data.io import decode_image_bytes, to_float
from automl_ad.defaults import SERVE_PATHS_ROOT_ENV
from automl_ad.deploy.package import export_package
from automl_ad.deploy.serving import RequestScorer, ServingLimits, log_package, scorer_for
from automl_ad.deploy.thresholds import calibrate_image_threshold
from automl_ad.detectors import create_detector
from automl_ad.errors import ConfigError

OUTSIDE_ROOT = "not valid base64, and not a path inside the folder this server reads images from"
NO_SERVER_FILES = "this server does not read server-side files"


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    root = generate_demo(tmp_path_factory.mktemp("demo"), categories=["object"], n_train=12, n_test_good=2,
                         n_test_per_defect=1, size=64)["object"]
    dataset = open_dataset(root)
    train = ImageSet.from_records(dataset.normal_in("train"), dataset)
    detector = create_detector("gaussian", input_size=64, scales=(1.0,)).fit(train)
    normal = detector.score_samples(train).image_scores
    return export_package(detector, tmp_path_factory.mktemp("pkg") / "pkg",
                          {"image": calibrate_image_threshold(normal).to_dict()})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Served folder ``root`` (``good.png`` and a symlink to an outside image) and ``outside.png`` beside it."""
    base = tmp_path_factory.mktemp("files")
    root = base / "served"
    good = write_image(root / "good.png", noise_image(1, size=64))
    outside = write_image(base / "outside.png", noise_image(2, size=64))
    (root / "link.png").symlink_to(outside)
    return {"root": root, "good": good, "outside": outside}


def _load(package_dir, tmp_path_factory, **log_options):
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    model_uri = log_package(package_dir, tracking_uri=uri, **log_options)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def served(package_dir, tmp_path_factory):
    """The model as `mlflow models serve` loads it: default settings (no server paths)."""
    return _load(package_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def served_with_paths(package_dir, images, tmp_path_factory):
    """Paths allowed under ``images["root"]``, and small limits: 3 images, 64x64x2 pixels per request."""
    limits = ServingLimits(max_items=3, max_item_chars=40_000, max_request_chars=60_000,
                           max_request_pixels=2 * 64 * 64)
    return _load(package_dir, tmp_path_factory, allow_paths_under=images["root"], limits=limits)


def post(model, body) -> tuple[int, dict]:
    """What the scoring server answers to a POST of ``body`` (a dict sent as JSON, or raw text)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    text = body if isinstance(body, str) else json.dumps(body)
    try:
        answer = invocations(text, "application/json", model, model.metadata.get_input_schema())
    except MlflowException as exc:  # the server's handler turns these into the HTTP answer, as here
        return exc.get_http_status_code(), _strict_json(exc.serialize_as_json())
    return answer.status, _strict_json(answer.response)


def _strict_json(text: str):
    """Parse as strict JSON: NaN/Infinity (which Python's json writes) are not valid JSON."""
    def refuse(constant):
        raise AssertionError(f"answer is not valid JSON: it contains {constant}")

    return json.loads(text, parse_constant=refuse)


def predictions(model, items: list) -> list[dict]:
    status, answer = post(model, {"inputs": items})
    assert status == 200, answer
    assert len(answer["predictions"]) == len(items)
    for row in answer["predictions"]:
        assert set(row) == {"score", "anomalous", "error", "note"}
        assert "Traceback" not in row["error"] and "/tmp" not in row["error"] and "pytest-" not in row["error"]
        assert (row["score"] is None) == bool(row["error"]) == (row["anomalous"] is None)
    return answer["predictions"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def expected_score(package_dir, data: bytes) -> float:
    return load_package(package_dir).predict(to_float(decode_image_bytes(data))).score


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of ``width`` x ``height`` zero pixels, compressed to a tiny file (never in memory)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)
    body = b"".join(compressor.compress(row * 1000) for _ in range(height // 1000))
    body += compressor.compress(row * (height % 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_server_paths_are_refused_by_default_whether_or_not_the_file_exists(served, package_dir, images):
    good = images["good"].read_bytes()
    missing = images["good"].with_name("gone.png")
    rows = predictions(served, ["/etc/shadow", "/etc/hostname", "/etc/xostname", str(images["good"]), str(missing),
                                "../../../../etc/passwd", b64(good)])
    for row in rows[:6]:
        assert NO_SERVER_FILES in row["error"] and "not valid base64" in row["error"]
    assert rows[1]["error"] == rows[2]["error"]  # /etc/hostname exists, /etc/xostname does not
    assert rows[3]["error"] == rows[4]["error"]  # an existing image and a missing one
    assert rows[6]["score"] == pytest.approx(expected_score(package_dir, good))


def test_paths_outside_the_allowed_folder_get_one_message(served_with_paths, images):
    outside = images["outside"]
    for item in ["/etc/shadow", "/etc/hostname", str(outside), str(outside.with_name("missing.png")),
                 "../outside.png", "../../../../../../etc/hostname", "link.png", "/etc/passwd\x00.png"]:
        [row] = predictions(served_with_paths, [item])
        assert row["error"].startswith(OUTSIDE_ROOT), (item, row)


def test_paths_inside_the_allowed_folder_are_scored(served_with_paths, package_dir, images):
    expected = load_package(package_dir).predict(str(images["good"])).score  # as `automl-ad predict` scores it
    rows = predictions(served_with_paths, ["nothing-here.png", "good.png", str(images["good"])])
    assert rows[0]["error"] == "cannot open that file in the served folder (No such file or directory)"
    assert [row["score"] for row in rows[1:]] == [pytest.approx(expected)] * 2


def test_allowed_folder_from_the_environment_and_refused_folders(package_dir, images, monkeypatch, tmp_path):
    assert scorer_for(package_dir, {}).paths_root is None
    monkeypatch.setenv(SERVE_PATHS_ROOT_ENV, str(images["root"]))
    scorer = scorer_for(package_dir, {"allow_paths_under": None})
    assert scorer.paths_root == os.path.realpath(images["root"])
    assert scorer.score(["good.png"])["error"][0] == ""
    with pytest.raises(ConfigError, match="filesystem root"):
        log_package(package_dir, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", allow_paths_under="/")
    with pytest.raises(ConfigError, match="is not a folder"):
        RequestScorer(load_package(package_dir), paths_root=tmp_path / "absent")
    with pytest.raises(ConfigError, match="positive whole number"):
        ServingLimits(max_items=0)


def test_jpeg_base64_and_data_urls_are_scored(served, package_dir):
    jpeg = encoded(noise_image(3, size=64), "JPEG", quality=90)
    text = b64(jpeg)
    assert text.startswith("/9j/")
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    rows = predictions(served, [text, "data:image/jpeg;base64," + text, wrapped])
    assert [row["score"] for row in rows] == [pytest.approx(expected_score(package_dir, jpeg))] * 3
    assert all(isinstance(row["anomalous"], bool) for row in rows)


def test_other_formats_are_scored(served, package_dir):
    colour, grey16 = noise_image(16, size=64), (noise_image(17, size=64, channels=1).astype(np.uint16) * 257)
    files = [encoded(colour, "BMP"), encoded(colour, "TIFF"), encoded(grey16, "PNG"), encoded(colour, "GIF"),
             encoded(colour, "WEBP", lossless=True)]
    rows = predictions(served, [b64(data) for data in files])
    assert [row["score"] for row in rows] == [pytest.approx(expected_score(package_dir, data)) for data in files]


def test_tiny_png_base64_is_image_data_not_a_path(served, package_dir):
    tiny = encoded(noise_image(4, size=8, channels=1))
    assert len(b64(tiny)) <= 256
    [row] = predictions(served, [b64(tiny)])
    assert row["error"] == "" and row["score"] == pytest.approx(expected_score(package_dir, tiny))


def test_non_string_items_get_their_own_errors(served):
    good = b64(encoded(noise_image(5, size=64)))
    rows = predictions(served, [7, None, {"path": "/etc/shadow"}, good, True, 2.5])
    assert [row["error"] for row in rows] == [
        "expected a base64 image string, got a number", "expected a base64 image string, got null",
        "expected a base64 image string, got an object", "", "expected a base64 image string, got a boolean",
        "expected a base64 image string, got a number"]
    rows = predictions(served, [[good, good], [good, good]])  # a 2-D array: each row is an array
    assert [row["error"] for row in rows] == ["expected a base64 image string, got an array"] * 2


def test_invalid_base64_and_non_images_get_their_own_errors(served):
    good = b64(encoded(noise_image(6, size=64)))
    png = encoded(noise_image(7, size=64))
    rows = predictions(served, ["abc", "@@@@", "data:image/png,abcd", "data:image/png;base64,@@", "",
                                b64(b"hello, this is plain text"), b64(png[: len(png) // 2]), good])
    assert "Incorrect padding" in rows[0]["error"] and "Only base64 data" in rows[1]["error"]
    assert "data:image/<type>;base64,<data>" in rows[2]["error"] and "not valid base64" in rows[3]["error"]
    assert rows[4]["error"] == "the image is empty (0 bytes)"
    assert rows[5]["error"].startswith("the image is not a recognised image format")
    assert rows[6]["error"].startswith("the image is truncated")
    assert rows[7]["error"] == ""


def test_decompression_bombs_are_refused_from_their_header(served):
    huge, large = bomb_png(30_000, 30_000), bomb_png(12_000, 12_000)  # the second is below Pillow's own limit
    assert len(huge) < 300_000 and struct.unpack(">II", huge[16:24]) == (30_000, 30_000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = predictions(served, [b64(huge), b64(large), b64(encoded(noise_image(8, size=64)))])
    assert rows[0]["error"].startswith("the image has 900,000,000 pixels, more than this server's limit of "
                                       "32,000,000 pixels per image (checked before decoding)")
    assert rows[1]["error"].startswith("the image has 144,000,000 pixels, more than this server's limit")
    assert rows[2]["error"] == ""
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kb < 400_000  # decoding the 12000x12000 one takes 144 MB as 8-bit and 576 MB more as float


def test_request_pixel_budget_is_shared_by_its_images(served_with_paths):
    image = b64(encoded(noise_image(9, size=64)))
    rows = predictions(served_with_paths, [image, image, b64(encoded(noise_image(10, size=8)))])
    assert [row["error"] for row in rows[:2]] == ["", ""]
    assert "used up this request's budget of 8,192 decoded pixels" in rows[2]["error"]
    rows = predictions(served_with_paths, [image, b64(encoded(noise_image(11, size=80)))])
    assert rows[0]["error"] == "" and "more than the 4,096 left of this request's budget" in rows[1]["error"]


def test_oversized_items_and_requests(served_with_paths):
    image = b64(encoded(noise_image(12, size=64)))  # ~16,000 characters
    big = b64(encoded(noise_image(13, size=128)))  # ~66,000 characters, above the 40,000 per image
    rows = predictions(served_with_paths, [big, image])
    assert rows[0]["error"].startswith(f"the image data is {len(big):,} characters; this server takes at most 40,000")
    assert rows[1]["error"] == ""
    for items, message in [([image] * 4, "the request has 4 images; this server takes at most 3 per request"),
                           ([image + "\n" * 15_000] * 3, "characters of image data; this server takes at most 60,000")]:
        rows = predictions(served_with_paths, items)
        assert all(message in row["error"] for row in rows), rows[0]


def test_failures_inside_the_model_never_reach_mlflow(served, monkeypatch):
    scorer = served.unwrap_python_model().scorer
    real_predict, good = scorer.package.predict, b64(encoded(noise_image(18, size=64)))

    def fail_on_bright_images(array):
        if array.mean() > 150:  # the image as decoded (uint8)
            raise RuntimeError("failed reading /srv/secret/weights")
        return real_predict(array)

    monkeypatch.setattr(scorer.package, "predict", fail_on_bright_images)
    rows = predictions(served, [b64(encoded(np.full((64, 64, 3), 250, np.uint8))), good])
    assert rows[0]["error"] == "the image could not be scored (RuntimeError); the server log has the details"
    assert rows[1]["error"] == ""

    def bug(items):
        raise KeyError("/srv/secret")

    monkeypatch.setattr(scorer, "_score_items", bug)
    status, answer = post(served, {"inputs": [good, good]})
    assert status == 200 and [row["error"] for row in answer["predictions"]] == [
        "internal error while scoring this request; the server log has the details"] * 2


def test_request_shapes_and_what_mlflow_itself_answers(served):
    good = b64(encoded(noise_image(14, size=64)))
    status, answer = post(served, {"dataframe_split": {"columns": ["image"], "data": [[good], [None]]}})
    assert status == 200 and answer["predictions"][0]["error"] == ""
    assert answer["predictions"][1]["error"] == "expected a base64 image string, got null"
    status, answer = post(served, {"inputs": {"a": [good], "b": [good]}})
    assert status == 200 and '"image" column' in answer["predictions"][0]["error"]
    status, answer = post(served, {"inputs": good})
    assert status == 200 and answer["predictions"][0]["error"] == ""
    # Requests MLflow cannot parse never reach the model: MLflow answers 400 itself, without a stack trace
    # (malformed JSON, a ragged list, a body that is not a JSON object).
    for body in ['{"inputs": ["abc"', json.dumps({"inputs": [good, [good]]}), json.dumps([good])]:
        status, answer = post(served, body)
        assert status == 400 and answer["error_code"] == "BAD_REQUEST" and "stack_trace" not in answer


@pytest.mark.slow
def test_real_mlflow_server_answers_hostile_requests(package_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model_uri = log_package(package_dir, tracking_uri=uri)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def call(body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, _strict_json(answer.read().decode())
        except urllib.error.HTTPError as exc:
            return exc.code, _strict_json(exc.read().decode())

    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(1)
        good = b64(encoded(noise_image(15, size=64)))
        status, answer = call(json.dumps({"inputs": ["/etc/hostname", good, 7, b64(bomb_png(30_000, 30_000))]})
                              .encode())
        rows = answer["predictions"]
        assert status == 200 and [bool(row["error"]) for row in rows] == [True, False, True, True]
        assert NO_SERVER_FILES in rows[0]["error"] and isinstance(rows[1]["score"], float)
        assert rows[3]["score"] is None and "900,000,000 pixels" in rows[3]["error"]
        status, answer = call(b'{"inputs": ["abc"')
        assert status == 400 and "stack_trace" not in answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
