"""Where the benchmarks find the shared data: the project root, ../shared (or $AD_SHARED), the offline backbone
weights and the three real datasets."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AD_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenetv2_100_tflite_in1k.safetensors"
DATASETS = {"bottle": SHARED / "datasets" / "mvtec_ad" / "bottle",
            "magnetic_tile": SHARED / "datasets" / "mtd" / "magnetic_tile",
            "ball_screw": SHARED / "datasets" / "bsdata" / "ball_screw"}
