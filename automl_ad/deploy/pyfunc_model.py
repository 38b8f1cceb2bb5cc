"""MLflow "model from code" that serves an automl-ad package (logged by :func:`automl_ad.deploy.serving.log_package`).

Input: base64-encoded image files, as ``{"inputs": [...]}`` or a DataFrame with an ``image`` column.
Output: one row per image with ``score``, ``anomalous`` (against the package's calibrated threshold), ``error``
and ``note`` (how the image differs from the training images, :mod:`automl_ad.deploy.appearance`; empty if not).
Request handling (limits, per-image errors, server-side paths only inside an allowed folder) is
:class:`automl_ad.deploy.serving.RequestScorer`; it never raises, so MLflow never answers with a stack trace.
The package is verified (sha256 of every file) when the model loads; nothing is unpickled.
"""

from __future__ import annotations

import mlflow

from automl_ad.deploy.serving import scorer_for


class PackageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.scorer = scorer_for(context.artifacts["package"], context.model_config)

    def predict(self, context, model_input, params=None):
        return self.scorer.score(model_input)


mlflow.models.set_model(PackageModel())
