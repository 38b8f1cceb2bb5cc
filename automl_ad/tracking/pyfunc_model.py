"""MLflow "model from code" that serves an automl-ad package (logged by :func:`automl_ad.tracking.serving.log_package`).

Input: a DataFrame with an ``image`` column holding file paths or base64-encoded image files (PNG, JPEG, ...).
Output: a DataFrame with ``score``, ``anomalous`` (against the package's calibrated threshold) and ``error``.
The package is verified (sha256 of every file) when the model loads; nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow
import numpy as np
import pandas as pd


class PackageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from automl_ad import load_package

        self.package = load_package(context.artifacts["package"])

    def predict(self, context, model_input, params=None):
        from PIL import Image

        from automl_ad.data.io import ImageReadError, load_image, to_float

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        rows = []
        for item in frame["image"]:
            try:
                if isinstance(item, str) and not item.startswith(("/", ".")) and len(item) > 256:
                    with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
                        array = to_float(np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB")
                                                    else image))
                else:
                    array = load_image(item)
                result = self.package.predict(array)
                rows.append({"score": result.score, "anomalous": bool(result.anomalous), "error": ""})
            except (ImageReadError, OSError, ValueError, binascii.Error) as exc:
                rows.append({"score": float("nan"), "anomalous": False, "error": f"{type(exc).__name__}: {exc}"})
        return pd.DataFrame(rows)


mlflow.models.set_model(PackageModel())
