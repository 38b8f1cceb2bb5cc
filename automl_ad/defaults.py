"""Project-wide defaults, in one place. Detector hyperparameter defaults live in the detector code instead."""

from __future__ import annotations

#: Working-directory folder where commands keep their state (profile, recommendation) between steps.
STATE_DIR = ".automl-ad"

#: Image file suffixes the data layer reads (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Bits per pixel that cameras deliver in 16-bit files. A dataset of 16-bit images is scaled to [0, 1] by the full
#: scale of the smallest of these depths that holds its largest pixel value: a 12-bit camera's images (values up to
#: 4095) divided by 65535 reach the network at 1/16 of their contrast (magnetic_tile stored so: PaDiM's test AUROC
#: 0.912 -> 0.830, PatchCore's 0.906 -> 0.780; 8-bit values in 16-bit files: 0.58 and 0.48).
SENSOR_BIT_DEPTHS = (8, 10, 12, 14, 16)

#: Spins of an idle OpenMP (GNU libgomp) worker of torch before it sleeps, set as ``GOMP_SPINCOUNT`` when automl-ad is
#: imported before torch and the variable is unset (libgomp's own default is 300,000). torch's workers spin after
#: every parallel op (an image resize, a map upsampling) on the cores ONNX Runtime runs the graph on next. Measured on
#: 2 cores, MobileNetV2 at 256 px, batch 1 from a decoded bottle image: the bare backbone 6.5-8.6 -> 5.6 ms, PatchCore
#: 8.8 -> 7.6 ms, STPM 18.0 -> 10.5 ms, FastFlow 13.8 -> 10.8 ms; fits and batch-8 scoring within 1-8%. Intel
#: OpenMP builds of torch read ``KMP_BLOCKTIME`` instead (not set here: not measured).
OPENMP_SPIN_COUNT = 10_000

#: Threads used to decode and hash images during validation.
IO_WORKERS = 4

#: zlib level of the PNGs automl-ad writes (overlays, masks, synthetic anomalies, demo data). Measured on a
#: 3390x460 heatmap overlay: 693 ms and 1.71 MB at Pillow's default 6, 134 ms and 1.99 MB at 1 (lossless either way).
PNG_COMPRESS_LEVEL = 1

#: Largest image (width x height, all pages of a TIFF together) that is decoded. It is checked from the file header
#: before any pixel is decoded, so a small compressed "decompression bomb" (an 875 KB PNG of 30000x30000) is refused
#: instead of exhausting memory. 150 million admits large industrial frames (a 16384-pixel line-scan camera with
#: 9000 lines, or a 12000x12000 stitched image: at most ~0.9 GB as 16-bit RGB) but refuses 30000x30000 (900 million,
#: 2.7 GB as 8-bit RGB before conversion to float). It also stays below Pillow's own hard limit (~179 million).
#: The environment variable overrides it; functions of ``automl_ad.data.io`` also take ``max_pixels``.
MAX_IMAGE_PIXELS = 150_000_000
MAX_IMAGE_PIXELS_ENV = "AUTOML_AD_MAX_IMAGE_PIXELS"

#: YAML a user supplies (constraint profiles, search spaces, ``--param`` values): the largest file read, and the
#: most values a document may hold once its aliases are expanded. The shipped files are under 4 KB and 300 values;
#: the value limit stops "billion laughs" alias bombs (a 510-byte file that expands to 10^9 values).
YAML_MAX_BYTES = 1_000_000
YAML_MAX_VALUES = 100_000

#: Screening the good images (``recommend``): each of ``SCREEN_FOLDS`` folds of the normal training images is scored
#: by the screen family's default fitted on the other folds (at most ``SCREEN_FIT_IMAGES`` of them, which bounds the
#: fits on large sets), and an image is named when its out-of-fold score lies above Tukey's far-out fence, the third
#: quartile plus ``SCREEN_FENCE_IQR`` interquartile ranges of all of them. Planting 10 real defects among the good
#: training images: bottle 10 of 10 named (and 2 of 209 good ones), ball_screw 7 of 10 (7 of 568), magnetic_tile 3
#: of 10 (2 of 762). Fewer than ``SCREEN_MIN_NORMALS`` good images are not screened (too few for the quartiles).
SCREEN_FAMILY = "patchcore"
SCREEN_FOLDS = 3
SCREEN_FIT_IMAGES = 400
SCREEN_FENCE_IQR = 3.0
SCREEN_MIN_NORMALS = 20

#: Profiling: images used for the expensive structure statistics, and their working resolution: the short side.
#: Images are analysed at the dataset's median aspect ratio (a 16:1 fabric at 128 x 2048, not squashed to a square,
#: which would average its weave away), the long side capped at PROFILE_MAX_ASPECT short sides. Elongated data
#: gets fewer images so the sample holds at most PROFILE_SAMPLE_PIXELS pixels (120 images of aspect 4 at 128 px).
PROFILE_SAMPLE_IMAGES = 120
PROFILE_RESOLUTION = 128
PROFILE_MAX_ASPECT = 16
PROFILE_SAMPLE_PIXELS = 120 * 128 * 512
#: Masks read to measure defect sizes (evenly spaced sample).
PROFILE_SAMPLE_MASKS = 400

#: Input geometry proposal (reasoning in automl_ad/recommend/geometry.py).
#: The families' default square input, and the least a proposal feeds the backbone: ImageNet backbones were
#: trained on 224-px views and the families' defaults are tuned at 256.
GEOMETRY_BASE_SIDE = 256
#: Finest stride of the default feature pyramid of the backbone families (strides 8 and 16).
GEOMETRY_FEATURE_STRIDE = 8
#: Feature cells a defect must span on its short side: at 2 cells it contains at least one whole cell wherever it
#: falls, so at least one feature vector is computed mostly from defect pixels.
GEOMETRY_MIN_DEFECT_CELLS = 2
#: Largest aspect distortion a squash may cause: the aspect jitter ImageNet backbones were trained with
#: (RandomResizedCrop ratio 3/4..4/3), so squashed features stay in the distribution the backbone knows.
GEOMETRY_SQUASH_MAX_ASPECT = 4 / 3
#: Longest side of a single (untiled) network input; larger views are tiled (bounded memory per inference: a
#: per-position model such as PaDiM holds a covariance per cell, at most 16384 cells at 1024 px and stride 8,
#: about 0.7 GB at 100 dimensions). A view up to native pixels costs less than overlapping tiles of the same image.
GEOMETRY_MAX_SINGLE_SIDE = 1024
#: Tile sides tried (square tiles, multiples of the deepest stride 32).
GEOMETRY_TILE_SIDES = (256, 384, 512)
#: Without masks or a declared size, the smallest defect worth finding is assumed to span this fraction of the
#: image's short side (1/20: 12.8 px of a 256-px view). Declare the real size with `data: {smallest_defect_px: N}`
#: in a constraint profile.
SMALLEST_DEFECT_FRACTION = 0.05

#: Label shortcuts (``automl_ad.data.validation``): file facts (size, format, colour, bit depth, alpha) that tell
#: defective images from good ones without looking at the part. A fact is reported when a small decision tree on it
#: alone, cross-validated, ranks the labelled images at this image AUROC or more (0.5 is chance; a fact a model can
#: notice then earns validation and test scores that the line's own images will not), with at least
#: ``SHORTCUT_MIN_IMAGES`` good and as many defective images.
SHORTCUT_AUROC = 0.75
SHORTCUT_MIN_IMAGES = 10

#: Split: fraction of normal training images held out for validation, and of labelled defects used for selection.
VALIDATION_FRACTION = 0.2
#: Most pixels of an anomaly map as ``score_samples`` returns it: at the image's aspect, its full resolution or
#: smaller (twice a 256x256 squash map). Every geometry's maps come back at the same shape for the same image, so
#: pixel metrics compare geometries on the same pixels, and evaluating wide or large images stays bounded.
SCORE_MAP_PIXELS = 2 * 256 * 256
DEFECT_VALIDATION_FRACTION = 0.5
#: Fewest test normals worth keeping out of training without labelled defects and a declared split: fewer could
#: only count false alarms, too coarsely (8 of 40 flat images: in steps of 12%), so they train instead.
MIN_TEST_NORMALS = 20
#: Fewest labelled defects a search ranks on alone (``--validation auto``). An AUROC over n anomalies moves in
#: steps of 1/n, so below about 10 one image decides between trials (60 good and 3 defective bottles: 2 validation
#: defects, "resolves about ±0.10"); with fewer, synthetic anomalies on the held-out normals join them.
MIN_REAL_VALIDATION_DEFECTS = 10
SPLIT_SEED = 0
#: Fewest normal training images `automl-ad fit` accepts: one image shows no normal variation (the per-position
#: Gaussian cannot fit it; spread estimates of the other families collapse). Every family fits from two.
MIN_TRAIN_IMAGES = 2

#: Recommendation: how many routes are shortlisted unless the user asks otherwise.
SHORTLIST_SIZE = 4
#: ... and a route scoring within this many points of the last one shortlisted joins it. The report scores each
#: dimension in whole points and the route score is their priority-weighted mean, so a tenth of a point is one
#: dimension's point at a tenth of the weight, no reason to leave a route untried (on ball_screw the
#: distribution-map route, whose tiled PaDiM was the best model of an earlier search, scored 7.0 against 7.1).
SHORTLIST_TIE_POINTS = 0.25

#: `automl-ad ui`: the MLflow UI listens on this machine only (loopback), on this port unless --port says otherwise.
UI_HOST = "127.0.0.1"
UI_PORT = 5000
#: Seconds the MLflow UI has to exit after a stop request before it is killed.
UI_STOP_GRACE_S = 10

#: Built-in demo data location (relative to the working directory).
DEMO_DATA_DIR = "automl-ad-demo/data"

#: Images decoded at a time when extracting backbone features (bounds memory on large training sets).
FEATURE_CHUNK_IMAGES = 32

#: Backbone numeric precisions (``precision`` of backbone families): int8 is ONNX Runtime static quantisation on CPU.
PRECISIONS = ("fp32", "int8")
#: Training images (spread evenly over the training set) that calibrate an int8 backbone's activation ranges.
INT8_CALIBRATION_IMAGES = 32

#: Feature cache: environment variable that overrides its location, and the default location.
FEATURE_CACHE_ENV = "AUTOML_AD_CACHE_DIR"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/automl-ad`` (usually ``~/.cache/automl-ad``)."""
    import os

    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "automl-ad")

#: Search: disk caps for the feature cache and for saved trial models (non-front models are evicted first),
#: and how often (in epochs) iterative families report validation quality to the early-stopping scheduler.
SEARCH_CACHE_CAP_MB = 20_000
SEARCH_ARTIFACT_CAP_MB = 5_000
#: Free space the feature cache and saved trial models always leave on their disk: this many MB, or this share of
#: the disk when that is more. Below it they shrink (least recently used first), whatever their caps.
DISK_RESERVE_MB = 2_000
DISK_RESERVE_SHARE = 0.05
SEARCH_REPORT_EVERY = 2
#: Share of the per-trial time limit an iterative family may train for; it then stops and is evaluated with the
#: epochs it reached (the rest of the limit is for validation and cost measurement).
SEARCH_TRAINING_SHARE = 0.7
#: Pareto ranking: throughputs or peak memories within this share of each other are ties (a trial's peak memory
#: is mostly the imported libraries, and both figures move by a few percent between runs of one trial), so a model
#: far worse on quality does not join the front for 9 MB less of 1164.
PARETO_TIE_SHARE = 0.05
#: Search budget when none is given, and the longest accepted (budgets and trial limits above it are refused).
SEARCH_BUDGET = "1h"
SEARCH_MAX_BUDGET_S = 30 * 86400
#: How often a running search saves the time it has spent, so that `--resume` after a hard kill gets the rest.
SEARCH_CHECKPOINT_EVERY_S = 5
#: Numbers a search can rank trials by (`search --metric`, see automl_ad.search.validation.quality): combined =
#: mean of image AUROC and AUPRO; detection_at_far = share of validation defects detected at the threshold that
#: flags DEFAULT_FALSE_ALARM_RATE of the validation normals.
QUALITY_METRICS = ("combined", "image_auroc", "aupro", "pixel_auroc", "pixel_ap", "image_f1_max", "detection_at_far")

#: Target false-alarm rate (share of normal images flagged) of calibrated thresholds and of detection_at_far.
DEFAULT_FALSE_ALARM_RATE = 0.01
#: Export: when the held-out normals are too few to set the threshold at the target rate, a family that fits in
#: closed form (not iteratively) is refitted this many times on folds of the training normals, each scoring the
#: images it left out (cross-conformal calibration), so every training normal adds an unseen-image score; the
#: refits may take at most this many seconds, predicted from the model's own fit time.
CALIBRATION_FOLDS = 5
CALIBRATION_REFIT_MAX_S = 300

#: Offline default backbone: its ImageNet weights ship inside the package (``automl_ad/features/builtin/``) and
#: are used when no other weights for it are available and the hub cannot be reached.
BUILTIN_BACKBONE = "mobilenetv2_100"
BUILTIN_WEIGHTS_FILE = "mobilenetv2_100_tflite_in1k.safetensors"

#: Serving (`mlflow models serve` of a package logged by `export --mlflow`): what one /invocations request may carry.
#: Images are sent as base64 text: at most this many images, characters per image (~24 MB file) and per request
#: (~48 MB), and decoded pixels per request (checked from each header before decoding; 32 million is e.g. 32
#: 1024x1024 images or one 8000x4000 frame, about 0.5 GB as float RGB). Images are decoded one at a time.
SERVE_MAX_ITEMS = 256
SERVE_MAX_ITEM_CHARS = 32 * 2**20
SERVE_MAX_REQUEST_CHARS = 64 * 2**20
SERVE_MAX_REQUEST_PIXELS = 32_000_000
#: Server-side image paths are refused unless a folder is allowed: at log time or with this environment variable
#: (read by the server; it takes precedence). Only files inside that folder (after resolving symlinks) are read.
SERVE_PATHS_ROOT_ENV = "AUTOML_AD_SERVE_PATHS_UNDER"

#: Model packages: environment variable holding a secret key. Set at export, the manifest is signed with an
#: HMAC-SHA256 under it; set at load, a package must carry a valid signature under it.
PACKAGE_KEY_ENV = "AUTOML_AD_PACKAGE_KEY"
#: Predict flags an image that does not look like the training images (automl_ad.deploy.appearance): an aspect
#: ratio beyond this factor of the training images' range, a side beyond this factor of their sizes, or the other
#: colour mode. The threshold was set on images like the training ones; a new camera, crop or orientation can move
#: every score (a ball_screw model trained on images turned by 90 degrees flagged every unturned one, good or not).
APPEARANCE_ASPECT_FACTOR = 1.15
APPEARANCE_SIZE_FACTOR = 2.0
#: Training images decoded at export to tell gray from colour (sizes come from every file's header).
APPEARANCE_COLOUR_SAMPLE = 16

#: Budget-aware search scheduling (automl_ad.search.cost_predictor, automl_ad.search.proposer).
#: Successive-halving factor η: fidelity rungs train on 1, 1/η, 1/η² ... of the training images; the per-family
#: ASHA stops iterative trials at 1/η³, 1/η², 1/η of their own schedule, keeping the best 1/η at each rung.
SEARCH_REDUCTION_FACTOR = 3
#: Rungs below full fidelity (train fractions 1/η ... 1/η^n), as long as a rung keeps this many training images.
SEARCH_FIDELITY_RUNGS = 2
SEARCH_MIN_SCREEN_IMAGES = 8
#: Screening rungs (fewer training images) are also ranked on 1/η of each class of validation images (anomaly kind
#: by kind, spread evenly), but on at least this many of each (all of a smaller class): scoring the validation
#: dominates a one-pass family's trial (a tiled PaDiM on 1/3 of ball_screw's images spent 80 of its 150 s on its
#: 311 validation images); 30 and 30 still resolve about 0.05 of image AUROC at 0.8, enough to pick what to promote.
SEARCH_MIN_SCREEN_VALIDATION = 30
#: A new configuration starts at the highest fidelity at which the remaining budget (times the parallel trials)
#: still affords this many configurations of its predicted cost (η²: one full successive-halving bracket).
SEARCH_CONFIGS_PER_BUDGET = 9
#: A trial's limit: this multiple of its predicted seconds plus the slack, capped by the remaining budget
#: (predictions from a crude prior or a few measurements are off by up to about this factor).
SEARCH_COST_MARGIN = 2.0
#: The same for a family not yet measured in this search (the cost model alone: a family's first trial on
#: magnetic_tile ran out of a 76 s limit from it, on a machine whose speed had been measured on other families).
SEARCH_UNMEASURED_COST_MARGIN = 4.0
SEARCH_LIMIT_SLACK_S = 30.0
#: Until some trial has completed, this share of the remaining budget is kept for cheaper fallbacks.
SEARCH_FALLBACK_RESERVE = 0.25
#: Anytime: the first this share of the budget is a quick look: each family's default (and the recommended
#: geometry on the cheapest family), cheapest on all images first, on few training images, as far as that time affords,
#: so that a model close to the final best exists early (issue #11 asks for 2 points after 10% of the budget).
SEARCH_QUICK_LOOK_SHARE = 0.1
#: A quick-look trial runs on more training images (all, else 1/η) when that is predicted to cost at most this
#: multiple of its run on the fewest: where scoring the validation images dominates (a one-pass family), fewer
#: training images save little time and cost quality.
SEARCH_QUICK_LOOK_FULL_COST = 1.5
#: Prior for the fixed seconds of a trial process (start, imports, cost measurement, saving) before any is measured.
SEARCH_TRIAL_OVERHEAD_S = 15.0
#: Memory of a trial process besides the arrays its family predicts (Detector.peak_memory_bytes): libraries, the
#: network, batches (a PaDiM and a PatchCore trial measured 1.1-1.3 GB before their models grew).
SEARCH_TRIAL_BASE_BYTES = 1.5 * 2 ** 30
#: Training images whose sizes (headers only) the cost predictor averages its network pixels over.
SEARCH_SIZE_SAMPLES = 32
#: Prior training passes per image-epoch relative to one inference (forward + backward of a trained network).
SEARCH_TRAINING_PASS_FACTOR = 3.0
#: Metric of a search's run: the best validation quality of a complete trial that saved a model so far (full
#: fidelity or screened: the search keeps a screened model that beats the full ones; step = seconds into the
#: search, time before a resume included); the live view, the leaderboard and a plot show it.
SEARCH_BEST_QUALITY_METRIC = "best_quality"
#: Seconds before a search's end by which every trial has ended (its limit and its hard kill), so that it is recorded.
SEARCH_END_TAIL_S = 6.0
#: Seconds a worker whose trial process was SIGKILLed from outside waits to see whether its own Ray node is going
#: down too (its raylet gone): then the trial is a lost worker, not a process killed for memory.
SEARCH_NODE_LOSS_GRACE_S = 2.0
