"""Serving a model package with `mlflow models serve`: logging it, and handling the images of /invocations requests.

Clients send image files base64-encoded (any format the data layer reads; a ``data:image/<type>;base64,`` prefix is
accepted). Every image gets its own row (``score``, ``anomalous``, ``error``, the error empty when it was scored), so
one bad image never fails the rest of its request. Server-side paths are refused unless a folder is allowed
(``log_package(allow_paths_under=...)`` or ``$AUTOML_AD_SERVE_PATHS_UNDER``), and then only files inside that folder
(after resolving symlinks) are read. Requests are bounded (:mod:`automl_ad.defaults`, ``SERVE_*``): images, base64
characters per image and per request, and decoded pixels per request (checked from each header before decoding).
Errors are short messages with no stack trace and no server path.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from automl_ad.data.io import ImageReadError, ImageTooLargeError, decode_image_bytes, max_image_pixels
from automl_ad.defaults import (
    SERVE_MAX_ITEM_CHARS,
    SERVE_MAX_ITEMS,
    SERVE_MAX_REQUEST_CHARS,
    SERVE_MAX_REQUEST_PIXELS,
    SERVE_PATHS_ROOT_ENV,
)
from automl_ad.deploy.package import Package, load_package
from automl_ad.errors import ConfigError
from automl_ad.tracking.store import Tracker

_logger = logging.getLogger(__name__)
_WHITESPACE = re.compile(r"\s+")
_SEND_BYTES = "send the image file's bytes base64-encoded (optionally as data:image/<type>;base64,<data>)"
_REASON_CHARS = 200  # longest decoder reason quoted back to a client


@dataclass(frozen=True)
class ServingLimits:
    """What one /invocations request may carry."""

    max_items: int = SERVE_MAX_ITEMS
    max_item_chars: int = SERVE_MAX_ITEM_CHARS
    max_request_chars: int = SERVE_MAX_REQUEST_CHARS
    max_request_pixels: int = SERVE_MAX_REQUEST_PIXELS

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serving limit {name}={value!r} must be a positive whole number")


class ItemError(Exception):
    """One image could not be scored; the message is safe to send to any client."""


class RequestShapeError(ItemError):
    """The request does not hold a list of images; ``rows`` is how many result rows to answer with."""

    def __init__(self, rows: int):
        super().__init__('expected {"inputs": ["<base64 image>", ...]} or a DataFrame with an "image" column')
        self.rows = max(1, rows)


def allowed_root(path: str | Path) -> str:
    """The real path of the folder that server-side image paths are confined to."""
    root = os.path.realpath(os.path.expanduser(str(path)))
    if not os.path.isdir(root):
        raise ConfigError(f"{path} is not a folder; server-side image paths can only be allowed under an existing "
                          "folder (the one holding the images to serve)")
    if os.path.dirname(root) == root:
        raise ConfigError("allowing server-side paths under the filesystem root would let any client read any file; "
                          "name the folder that holds the images")
    return root


class RequestScorer:
    """Scores the images of /invocations requests with a loaded package."""

    def __init__(self, package: Package, limits: ServingLimits | None = None, paths_root: str | Path | None = None):
        self.package = package
        self.limits = limits or ServingLimits()
        self.paths_root = allowed_root(paths_root) if paths_root else None
        self.image_pixel_limit = min(max_image_pixels(), self.limits.max_request_pixels)

    def score(self, model_input) -> pd.DataFrame:
        """One row per image of ``model_input`` (as MLflow parsed the request); never raises."""
        try:
            items = request_items(model_input)
        except RequestShapeError as exc:
            return _frame([_error_row(str(exc))] * exc.rows)
        try:
            return _frame(self._score_items(items))
        except Exception:  # a bug must not reach MLflow, which would answer with our stack trace
            _logger.exception("unexpected error while scoring a request")
            return _frame([_error_row("internal error while scoring this request; the server log has the details")]
                          * max(1, len(items)))

    def _score_items(self, items: list) -> list[dict]:
        limits = self.limits
        if len(items) > limits.max_items:
            return [_error_row(f"the request has {len(items):,} images; this server takes at most "
                               f"{limits.max_items:,} per request: split it")] * len(items)
        total = sum(len(item) for item in items if isinstance(item, str) and len(item) <= limits.max_item_chars)
        if total > limits.max_request_chars:
            return [_error_row(f"the request carries {total:,} characters of image data; this server takes at most "
                               f"{limits.max_request_chars:,} per request: split it")] * len(items)
        rows, pixels_left = [], limits.max_request_pixels
        for item in items:
            try:
                if pixels_left <= 0:
                    raise ItemError(f"earlier images used up this request's budget of {limits.max_request_pixels:,} "
                                    "decoded pixels: send this one in another request")
                array = self._decode(item, min(self.image_pixel_limit, pixels_left))
                pixels_left -= array.shape[0] * array.shape[1]
                rows.append(self._predict(array))
            except ItemError as exc:
                rows.append(_error_row(str(exc)))
        return rows

    def _decode(self, item, max_pixels: int) -> np.ndarray:
        if not isinstance(item, str):
            raise ItemError(f"expected a base64 image string, got {_json_type(item)}")
        if len(item) > self.limits.max_item_chars:
            raise ItemError(f"the image data is {len(item):,} characters; this server takes at most "
                            f"{self.limits.max_item_chars:,} per image")
        try:
            data = _decode_base64(item)
        except ValueError as exc:  # binascii.Error is a ValueError
            if self.paths_root is None or item.startswith("data:"):
                raise ItemError(f"not valid base64 ({exc}), and this server does not read server-side files: "
                                f"{_SEND_BYTES}") from None
            data = self._read_allowed_file(item)
        try:
            return decode_image_bytes(data, "the image", max_pixels=max_pixels)
        except ImageTooLargeError as exc:
            raise ItemError(self._too_large(exc)) from None
        except ImageReadError as exc:
            raise ItemError(f"the image {exc.reason[:_REASON_CHARS]}") from None

    def _read_allowed_file(self, text: str) -> bytes:
        """The bytes of a file inside the allowed folder; one message for every path outside it, existing or not."""
        try:
            path = os.path.realpath(os.path.join(self.paths_root, text))
        except (ValueError, OSError):  # e.g. an embedded NUL
            path = None
        if path is None or not Path(path).is_relative_to(self.paths_root):
            raise ItemError("not valid base64, and not a path inside the folder this server reads images from: "
                            f"{_SEND_BYTES}")
        limit = self.limits.max_item_chars * 3 // 4
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise ItemError(f"cannot open that file in the served folder ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ItemError("that path in the served folder is not a regular file")
            data = file.read(limit + 1)
        if len(data) > limit:
            raise ItemError(f"that file is larger than the {limit:,} bytes this server reads per image")
        return data

    def _too_large(self, exc: ImageTooLargeError) -> str:
        size = f"{exc.pixels:,} pixels" if exc.pixels else "more pixels than the decoder allows"
        if exc.limit < self.image_pixel_limit:
            return (f"the image has {size}, more than the {exc.limit:,} left of this request's budget of "
                    f"{self.limits.max_request_pixels:,} decoded pixels: send it in another request")
        return (f"the image has {size}, more than this server's limit of {exc.limit:,} pixels per image (checked "
                "before decoding): downscale or crop it")

    def _predict(self, array: np.ndarray) -> dict:
        try:
            result = self.package.predict(array)
        except Exception as exc:
            _logger.exception("scoring an image failed")
            raise ItemError(f"the image could not be scored ({type(exc).__name__}); the server log has the "
                            "details") from None
        if not math.isfinite(result.score):
            raise ItemError("the detector returned a non-finite score for this image")
        return {"score": float(result.score), "anomalous": bool(result.anomalous), "error": "",
                "note": "; ".join(result.notes)}


def request_items(model_input) -> list:
    """The image items of a request, in the shapes MLflow hands a pyfunc model (array, list, dict, DataFrame)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return model_input["image"].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise RequestShapeError(len(model_input))
    if isinstance(model_input, dict):
        if "image" not in model_input and len(model_input) != 1:
            raise RequestShapeError(1)
        model_input = model_input["image"] if "image" in model_input else next(iter(model_input.values()))
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 0:
            return [model_input.item()]
        if model_input.ndim == 2 and model_input.shape[1] == 1:
            model_input = model_input[:, 0]
        return list(model_input)
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple, pd.Series)):
        return list(model_input)
    raise RequestShapeError(1)


def _decode_base64(text: str) -> bytes:
    """The bytes of base64 text, or of a ``data:...;base64,`` URL; ValueError when it is not base64."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ValueError("a data: URL must be data:image/<type>;base64,<data>")
    return base64.b64decode(_WHITESPACE.sub("", text), validate=True)


def _json_type(item) -> str:
    if item is None or (isinstance(item, float) and math.isnan(item)):
        return "null"
    if isinstance(item, (bool, np.bool_)):
        return "a boolean"
    if isinstance(item, (int, float, np.number)):
        return "a number"
    if isinstance(item, dict):
        return "an object"
    if isinstance(item, (list, tuple, np.ndarray)):
        return "an array"
    return f"a {type(item).__name__}"


def _error_row(message: str) -> dict:
    return {"score": None, "anomalous": None, "error": message, "note": ""}


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Result rows; unscored images have null score and verdict (JSON null, never NaN, which is not valid JSON)."""
    return pd.DataFrame({"score": pd.Series([row["score"] for row in rows], dtype=object),
                         "anomalous": pd.Series([row["anomalous"] for row in rows], dtype=object),
                         "error": pd.Series([row["error"] for row in rows], dtype=object),
                         "note": pd.Series([row["note"] for row in rows], dtype=object)})


def scorer_for(package_dir: str | Path, model_config: dict | None = None) -> RequestScorer:
    """The scorer the served model uses: the verified package, limits and allowed folder from the logged config
    (``$AUTOML_AD_SERVE_PATHS_UNDER`` takes precedence for the folder)."""
    config = model_config or {}
    limits = ServingLimits(**{field.name: config[field.name] for field in fields(ServingLimits)
                              if config.get(field.name) is not None})
    root = os.environ.get(SERVE_PATHS_ROOT_ENV, "").strip() or config.get("allow_paths_under")
    return RequestScorer(load_package(package_dir), limits, root)


def log_package(package_dir: str | Path, tracking_uri: str | None = None, run_id: str | None = None,
                name: str = "anomaly_model", allow_paths_under: str | Path | None = None,
                limits: ServingLimits | None = None) -> str:
    """Log ``package_dir`` (verified on load) as a pyfunc model; returns its ``models:/`` URI.

    Logged to run ``run_id`` (e.g. the trial the package came from) or a new run in experiment "automl-ad/served".
    Serve with ``mlflow models serve -m <uri> --env-manager local`` in an environment that has automl-ad. Clients send
    base64 image files; ``allow_paths_under`` also lets them name files inside that folder (off by default).
    """
    load_package(package_dir)  # refuse to log a damaged package
    config = {"allow_paths_under": allowed_root(allow_paths_under) if allow_paths_under else None,
              **asdict(limits or ServingLimits())}
    return Tracker(tracking_uri).log_pyfunc(Path(__file__).with_name("pyfunc_model.py"),
                                           {"package": str(Path(package_dir).resolve())}, config, run_id, name)
