"""How long a trial will take, and at which fidelity it fits the time it may have.

A trial's work is its training images × epochs (1 for families that do not train iteratively) × the pixels the
network sees per image (``input_size``², times the tiles when the geometry tiles; CutPaste's network sees every
patch), and its validation images × pixels. Fitting also spends the family's own extra seconds on work that does not
grow linearly with the pixels (:meth:`~automl_ad.detectors.base.Detector.extra_fit_seconds`, timed on this machine:
PatchCore's coreset compares training patches with each other, PaDiM's Gaussians grow with the square and cube of
its channels). That estimate is scaled by the family's measured extra seconds against it, median over its trials of
at least half the size (the coreset estimate is an upper bound: it skips most comparisons on object images).
Seconds per unit of the linear work are learnt online from the trials this search has finished (per family: median
of its measurements, so one trial slowed by a neighbour does not swing it); a family not measured yet gets
the cost model's fit estimate (:func:`automl_ad.recommend.cost.estimate_route`) times the machine's measured speed
relative to that model, and the evaluation seconds per unit measured on the other families. Both take one vote per
family (the median over families of each one's median), so a family with several screening trials does not speak
for the machine. Evaluation is what a trial reports it spent after its fit (validation, cost measurement, saving):
running the network grows with the validation images × pixels, the rest (metrics, heatmaps, saving) with the
validation images only; both cost about the same whatever the family. On ball_screw it took 8-18 s for every
squash default but CutPaste, while the cost model's forward pass times 11 (the template family's factor, which had
run three times) predicted 38 s for PaDiM's: a 150-s search then never ran PaDiM.

Two parts of a trial are not work: the seconds it spends making networks ready (importing timm, loading weights,
exporting graphs, opening runtime sessions: :data:`~automl_ad.features.runtime.SETUP_TIME`), a fixed cost learnt
apart (per family, else the median over families), and the features the cache gave it, which a later trial may have
to compute (counted as work at what computing them took). A PaDiM default on 50 ball_screw images spent 2.8 of its
3.9 fit seconds on set-up: learnt as work, it had a tiled PaDiM on 151 images predicted at 445 s, which took 52.
An iterative fit also scores the validation images every ``SEARCH_REPORT_EVERY`` epochs (not after the last): the
trial reports those seconds apart, and they are predicted as that many evaluations (a CutPaste trial of 12 epochs on
magnetic_tile scored 117 validation images at 841 patches five times, which nothing predicted, and was killed at
its 369-s limit). The rest of a trial's wall time beyond fit and evaluation is the trial process's fixed overhead,
also learnt (median over trials). A timed-out trial is a lower bound: its family is then predicted to cost at least
``SEARCH_COST_MARGIN`` × what it ran out of.

A fidelity shrinks the work: a fraction of the training images (rungs 1, 1/η, 1/η², as long as a rung keeps
``SEARCH_MIN_SCREEN_IMAGES``) and, for iterative families, fewer epochs. :func:`plan_trial` picks the highest
fidelity whose predicted time fits the trial's limit, or says why nothing does. The prediction must fit even when
it falls as far short as the furthest of this search (wall time over prediction of every finished trial, and limit
over prediction of every one that ran out of time, of predictions from a family's own measurements, as this one must
be; at most ``SEARCH_COST_MARGIN``); for an iterative family only its
seconds after training, since training stops at a deadline whatever was predicted (made longer as a whole, a
12-image STPM default trained 5 epochs in a 31-s limit, against 9). Where the limit is what is left of the budget,
a trial that would be killed at it runs at a lower rung or is not started: on a 6-minute search of 1800-px bottles a
CutPaste predicted 104 s (most of it scoring 841 patches per image) started with 131 s left, after a PaDiM had
taken twice its prediction, and was killed at the end of the budget, a third of it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from statistics import median

from automl_ad.constraints import ConstraintProfile
from automl_ad.constraints.profile import Hardware
from automl_ad.data.geometry import Geometry, tile_grid
from automl_ad.defaults import (
    SEARCH_COST_MARGIN,
    SEARCH_FIDELITY_RUNGS,
    SEARCH_LIMIT_SLACK_S,
    SEARCH_MIN_SCREEN_IMAGES,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_REPORT_EVERY,
    SEARCH_TRAINING_PASS_FACTOR,
    SEARCH_TRAINING_SHARE,
    SEARCH_TRIAL_BASE_BYTES,
    SEARCH_TRIAL_OVERHEAD_S,
    SEARCH_UNMEASURED_COST_MARGIN,
)
from automl_ad.recommend.cost import cost_model, estimate_route


@dataclass(frozen=True)
class FamilyTraits:
    """What the predictor needs to know of a family: its cost-model route, whether it trains in epochs, how many
    its default configuration trains (a configuration that does not set ``epochs`` trains that many), its extra
    fit seconds (``extra_fit_s(train_images, network_pixels, params)``; see the module docstring), the bytes a
    fit holds at its peak (``peak_bytes(train_images, network_pixels, params)``) and the images per training batch
    of a configuration that does not set ``batch_size`` (None: the family has no batches to shrink)."""

    route: str
    iterative: bool
    default_epochs: int | None = None
    extra_fit_s: Callable[[int, float, dict], float] | None = None
    peak_bytes: Callable[[int, float, dict], float] | None = None
    default_batch: int | None = None


@dataclass(frozen=True)
class Work:
    """What one trial has to do."""

    family: str
    train_images: int
    validation_images: int
    pixels: float  # network input pixels per image
    epochs: int | None  # None for families that do not train iteratively

    @property
    def fit_units(self) -> float:
        """Training work in image-epoch megapixels."""
        return self.train_images * (self.epochs or 1) * self.pixels / 1e6

    @property
    def eval_units(self) -> float:
        """Scoring work in image megapixels."""
        return self.validation_images * self.pixels / 1e6


@dataclass(frozen=True)
class TrialTimes:
    """What a finished trial measured, in seconds."""

    fit_s: float
    wall_s: float
    eval_s: float | None = None  # after the fit: validation, cost measurement, saving (None: not reported)
    extra_s: float | None = None  # of ``fit_s``, on the family's extra work (None: not reported)
    fit_setup_s: float = 0.0  # of ``fit_s``, making networks ready (:data:`~automl_ad.features.runtime.SETUP_TIME`)
    interim_s: float = 0.0  # of ``fit_s``, scoring the validation images between epochs
    eval_setup_s: float = 0.0  # of ``eval_s``, the same
    eval_network_s: float | None = None  # of ``eval_s``, running the network (set-up aside); None: not reported
    fit_cached_s: float = 0.0  # what the features the cache gave the fit would have taken to compute
    eval_cached_s: float = 0.0  # the same after the fit


@dataclass(frozen=True)
class Prediction:
    fit_s: float
    eval_s: float
    overhead_s: float
    basis: str
    fit_setup_s: float = 0.0  # of ``fit_s``: making networks ready, whatever the epochs

    @property
    def total_s(self) -> float:
        return self.fit_s + self.eval_s + self.overhead_s


def network_pixels(params: dict, image_hw: tuple[float, float]) -> float:
    """Pixels the network sees per image of ``image_hw``: all inputs of the ``geometry`` (every tile, padding
    included), else ``input_size``², else the image's own pixels."""
    hw = (max(1, round(image_hw[0])), max(1, round(image_hw[1])))
    if isinstance(params.get("geometry"), dict):
        return float(tile_grid(Geometry.from_dict(params["geometry"]), hw).network_pixels)
    side = params.get("input_size")
    if isinstance(side, (int, float)) and side > 0:
        return float(side) ** 2
    return float(hw[0] * hw[1])


#: How a prediction from the family's own measured trials states its basis.
MEASURED_BASIS = "measured on"


class CostPredictor:
    """Predicts a trial's seconds from its work; learns from the trials of this search (see module docstring)."""

    def __init__(self, traits: dict[str, FamilyTraits], threads: int = 2, device: str = "cpu",
                 memory_per_trial_bytes: float | None = None):
        self.traits = traits
        #: Memory one trial may use (None: no limit); a configuration whose model needs more is not started.
        self.memory_per_trial_bytes = memory_per_trial_bytes
        self.constraints = ConstraintProfile(hardware=Hardware(device="gpu" if device == "cuda" else "cpu",
                                                               cpu_cores=max(1, int(threads))))
        self._fit_rates: dict[str, list[float]] = {}  # seconds per fit unit (extra seconds aside), per family
        self._eval_rates: dict[str, list[float]] = {}  # seconds per eval unit, per family (the network's part)
        self._eval_image_rates: dict[str, list[float]] = {}  # seconds per validation image (the rest), per family
        self._fit_speed: dict[str, list[float]] = {}  # measured / prior fit seconds (extra aside), per family
        self._at_least: dict[str, float] = {}  # per family: seconds per (fit + eval) unit it needed at least
        self._overheads: list[float] = []  # measured fixed seconds of a trial process (every trial)
        # per family: (estimated extra fit seconds, measured / estimated) of each trial that reported them
        self._extra_scales: dict[str, list[tuple[float, float]]] = {}
        self._fit_setups: dict[str, list[float]] = {}  # set-up seconds of the fit, per family
        self._eval_setups: dict[str, list[float]] = {}  # set-up seconds after the fit, per family
        self._under = 1.0  # the most a finished trial took over its prediction (a timed-out one: at least its limit)

    # --- learning ---------------------------------------------------------------------------------------------
    def observe(self, work: Work, times: TrialTimes, params: dict | None = None) -> None:
        """A finished trial of ``work`` and what it measured."""
        if not (times.fit_s >= 0 and times.wall_s > 0) or work.fit_units <= 0:
            return
        params = params or {}
        eval_s = times.eval_s
        if eval_s is None or not eval_s >= 0:
            eval_s = max(0.0, times.wall_s - times.fit_s - self.overhead_s())
        else:
            self._overheads.append(max(0.0, times.wall_s - times.fit_s - eval_s))
        self._fit_setups.setdefault(work.family, []).append(times.fit_setup_s)
        self._eval_setups.setdefault(work.family, []).append(times.eval_setup_s)
        estimate = self._extra_fit_s(work, params)
        extra_s = times.extra_s if times.extra_s is not None and times.extra_s >= 0 else None
        if extra_s is not None and estimate > 0:
            self._extra_scales.setdefault(work.family, []).append((estimate, extra_s / estimate))
        fit_work = times.fit_s + times.fit_cached_s - times.fit_setup_s - times.interim_s
        linear_fit_s = max(0.0, fit_work - (extra_s if extra_s is not None else estimate))
        self._fit_rates.setdefault(work.family, []).append(linear_fit_s / work.fit_units)
        if work.eval_units > 0:
            eval_work = max(0.0, eval_s + times.eval_cached_s - times.eval_setup_s)
            network = eval_work if times.eval_network_s is None else min(eval_work, times.eval_network_s +
                                                                          times.eval_cached_s)
            self._eval_rates.setdefault(work.family, []).append(network / work.eval_units)
            if times.eval_network_s is not None:
                self._eval_image_rates.setdefault(work.family, []).append((eval_work - network) /
                                                                          work.validation_images)
        prior = self._prior(work, params)
        if prior.fit_s > 0:
            self._fit_speed.setdefault(work.family, []).append(linear_fit_s / prior.fit_s)

    def observe_timeout(self, work: Work, limit_s: float) -> None:
        """A trial of ``work`` ran out of ``limit_s``: its family costs at least that much per unit."""
        units = work.fit_units + work.eval_units
        if units > 0 and limit_s > 0:
            self._at_least[work.family] = max(self._at_least.get(work.family, 0.0), limit_s / units)

    def observe_prediction(self, predicted_s: float, took_s: float, basis: str) -> None:
        """A trial predicted at ``predicted_s`` on ``basis`` took ``took_s`` (its wall time; its limit when it ran
        out of it). Only predictions from the family's own measurements count: a first trial's cost-model guess
        has its own wider margin, and on ball_screw one at 1.7x short held the promising tiled trial back."""
        if predicted_s > 0 and took_s > 0 and basis.startswith(MEASURED_BASIS):
            self._under = max(self._under, took_s / predicted_s)

    def under_prediction(self, family: str) -> float:
        """How far under the truth a prediction of ``family`` may be: for a family measured in this search, the
        furthest such a prediction fell short so far, within 1 and ``SEARCH_COST_MARGIN``; 1 for the others."""
        return min(SEARCH_COST_MARGIN, self._under) if self.measured(family) else 1.0

    def overhead_s(self) -> float:
        """A trial process's fixed seconds (start, imports, loading the data): the median measured, else the prior
        ``SEARCH_TRIAL_OVERHEAD_S``."""
        return median(self._overheads) if self._overheads else SEARCH_TRIAL_OVERHEAD_S

    def measured(self, family: str) -> int:
        """How many finished trials of ``family`` the prediction rests on."""
        return len(self._fit_rates.get(family, []))

    # --- predicting -------------------------------------------------------------------------------------------
    def predict(self, work: Work, params: dict | None = None) -> Prediction:
        params = params or {}
        prior = self._prior(work, params)
        extra = self._expected_extra_s(work, params)
        # set-up: the cost model's prior has none
        fit_setup = _own_else_machine(self._fit_setups, work.family) or 0.0
        eval_setup = _own_else_machine(self._eval_setups, work.family) or 0.0
        eval_rate = _own_else_machine(self._eval_rates, work.family)
        image_rate = _own_else_machine(self._eval_image_rates, work.family)
        evaluation = prior.eval_s if eval_rate is None else \
            eval_rate * work.eval_units + (image_rate or 0.0) * work.validation_images
        interim = _interim_evaluations(work.epochs) * evaluation  # during the fit
        if self.measured(work.family):
            fit = median(self._fit_rates[work.family]) * work.fit_units + extra
            basis = f"{MEASURED_BASIS} {self.measured(work.family)} trial(s) of {work.family}"
        else:
            fit_speed = _median_of_medians(self._fit_speed)
            fit = prior.fit_s * (fit_speed or 1.0) + extra
            basis = "cost model" if fit_speed is None else \
                f"cost model × measured machine speed {fit_speed:.2g} (fit); evaluation as measured on other families"
        prediction = Prediction(fit_setup + fit + interim, eval_setup + evaluation, self.overhead_s(), basis,
                                fit_setup)
        floor = self._at_least.get(work.family, 0.0) * SEARCH_COST_MARGIN * (work.fit_units + work.eval_units)
        if floor > prediction.total_s:  # it timed out before: at least the margin times what it ran out of
            scale = (floor - prediction.overhead_s) / max(prediction.fit_s + prediction.eval_s, 1e-9)
            prediction = Prediction(prediction.fit_s * scale, prediction.eval_s * scale, prediction.overhead_s,
                                    f"{prediction.basis}, raised: timed out before", prediction.fit_setup_s)
        return prediction

    def peak_bytes(self, work: Work, params: dict) -> float:
        """Memory a trial of ``work`` holds at its peak: the family's arrays that grow with it (``peak_bytes``)
        and ``SEARCH_TRIAL_BASE_BYTES`` for the process (libraries, network, batches)."""
        peak = self.traits.get(work.family, FamilyTraits("", False)).peak_bytes
        return SEARCH_TRIAL_BASE_BYTES + (peak(work.train_images, work.pixels, params) if peak else 0.0)

    def _extra_fit_s(self, work: Work, params: dict) -> float:
        """The family's estimate of its fit seconds beyond the linear work (see the module docstring)."""
        extra = self.traits.get(work.family, FamilyTraits("", False)).extra_fit_s
        return extra(work.train_images, work.pixels, params) if extra else 0.0

    def _expected_extra_s(self, work: Work, params: dict) -> float:
        """That estimate scaled by what the family's trials of at least half its size measured against it
        (unscaled until one did). A smaller trial says little: PatchCore's coreset took 0.41 of its estimate on 1/9
        of magnetic_tile's patches and 0.87 on all of them, so the default planned from the first was cut at its
        training deadline."""
        estimate = self._extra_fit_s(work, params)
        scales = [scale for size, scale in self._extra_scales.get(work.family, []) if size >= estimate / 2]
        return estimate * (median(scales) if scales else 1.0)

    def _prior(self, work: Work, params: dict) -> Prediction:
        """The cost model's estimate: per-image inference time of the family's route and backbone at its pixels;
        training is that per image-epoch (times the forward + backward factor for iterative families)."""
        traits = self.traits.get(work.family, FamilyTraits("memory_bank", False))
        route = traits.route if traits.route in cost_model()["routes"] else "memory_bank"
        known = {b["name"] for b in cost_model()["backbones"]}
        backbone = params.get("backbone")
        side = max(1, int(math.sqrt(work.pixels)))
        ms = estimate_route(route, self.constraints, side, int(work.pixels), side,
                            [backbone] if backbone in known else None).latency_ms
        passes = SEARCH_TRAINING_PASS_FACTOR if traits.iterative else 1.0
        return Prediction(work.train_images * (work.epochs or 1) * ms * passes / 1000,
                          work.validation_images * ms / 1000, self.overhead_s(), "cost model")


def _batch_that_fits(predictor: CostPredictor, sizes: TrialSizes, family: str, params: dict,
                     fidelity: Fidelity) -> int | None:
    """Images per training batch at ``fidelity``: None (the configuration's) when that fits the memory a trial has
    or the family has no batches, else the largest half, quarter... of it that fits (at least 1): a smaller batch
    costs a training step's activations, not the images it learns from."""
    configured = params.get("batch_size", predictor.traits.get(family, FamilyTraits("", False)).default_batch)
    limit = predictor.memory_per_trial_bytes
    if not isinstance(configured, int) or not limit:
        return None
    work = sizes.work(family, params, fidelity)
    batch = configured
    while batch > 1 and predictor.peak_bytes(work, _with_batch(params, batch)) > limit:
        batch = max(1, batch // 2)
    return None if batch == configured else batch


def _with_batch(params: dict, batch: int | None) -> dict:
    return params if batch is None else {**params, "batch_size": batch}


def _interim_evaluations(epochs: int | None) -> int:
    """How often a trial of ``epochs`` scores the validation images between epochs (every
    ``SEARCH_REPORT_EVERY``, not after the last: the final evaluation follows)."""
    return max(0, int(epochs) - 1) // SEARCH_REPORT_EVERY if epochs else 0


def _own_else_machine(values: dict[str, list[float]], family: str) -> float | None:
    """``family``'s median measurement, else the median over the measured families (one vote each); None before
    any measurement."""
    own = values.get(family)
    return median(own) if own else _median_of_medians(values)


def _median_of_medians(values: dict[str, list[float]]) -> float | None:
    """The median over families of each family's median (one vote per family); None before any measurement."""
    medians = [median(v) for v in values.values() if v]
    return median(medians) if medians else None


# --- fidelities ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fidelity:
    """How much of its full training a trial gets: a share of the training images and (iterative) its epochs; a
    screening rung is also ranked on part of the validation images (:func:`~automl_ad.search.validation.
    screening_validation`)."""

    rung: int  # 0 = all training images; k = 1/η^k of them
    train_fraction: float
    train_images: int
    epochs: int | None = None  # epochs it trains (None: not iterative)
    full_epochs: int | None = None  # the configuration's own epochs
    validation_images: int | None = None  # the validation images it is ranked on (None: all)
    batch_size: int | None = None  # images per training batch, where the configuration's would not fit in memory

    @property
    def full(self) -> bool:
        return self.rung == 0 and self.epochs == self.full_epochs

    @property
    def work_fraction(self) -> float:
        """Share of the full-fidelity training work."""
        return self.train_fraction * ((self.epochs / self.full_epochs) if self.full_epochs else 1.0)

    def describe(self) -> str:
        text = "all training images" if self.rung == 0 else \
            f"{self.train_images} training images (1/{SEARCH_REDUCTION_FACTOR ** self.rung})"
        if self.full_epochs is not None:
            text += f", {self.epochs}/{self.full_epochs} epochs"
        if self.validation_images is not None:
            text += f", ranked on {self.validation_images} validation images"
        if self.batch_size is not None:
            text += f", {self.batch_size} image{'s' if self.batch_size != 1 else ''} per batch (memory)"
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def rungs(train_images: int) -> list[int]:
    """Fidelity rungs available for ``train_images`` training images, full first."""
    return [k for k in range(SEARCH_FIDELITY_RUNGS + 1)
            if k == 0 or train_images / SEARCH_REDUCTION_FACTOR ** k >= SEARCH_MIN_SCREEN_IMAGES]


def fidelity_at(rung: int, sizes: TrialSizes, epochs: int | None) -> Fidelity:
    """Rung ``rung`` of ``sizes`` (a screening rung ranked on ``sizes.screen_validation_images``)."""
    fraction = 1.0 / SEARCH_REDUCTION_FACTOR ** rung
    return Fidelity(rung, fraction, max(1, round(sizes.train_images * fraction)), epochs, epochs,
                    sizes.screen_validation_images if rung else None)


@dataclass(frozen=True)
class TrialPlan:
    """A trial's fidelity, its predicted seconds and its time limit; or, when nothing fits, why (``skip``)."""

    fidelity: Fidelity | None
    prediction: Prediction | None
    limit_s: float
    skip: str | None = None
    skip_reason: str = "predicted too slow"


@dataclass
class TrialSizes:
    """The search's data: training and validation images, and their mean height and width; the validation images
    a screening rung is ranked on (None: all); per family, the pixels its network processes for an input's
    (:meth:`~automl_ad.detectors.base.Detector.scoring_pixels`; the input's own when a family is not listed); the
    sizes of a sample of the images (none: all are ``image_hw``)."""

    train_images: int
    validation_images: int
    image_hw: tuple[float, float]
    screen_validation_images: int | None = None
    scoring_pixels: dict[str, Callable[[dict, float], float]] = field(default_factory=dict, compare=False)
    sampled_hw: tuple[tuple[int, int], ...] = ()

    def network_pixels(self, params: dict) -> float:
        """Network pixels per image of ``params``, averaged over the sampled images: a mix of sizes tiles as each
        image does, not as their mean (on ball_screw 3% of the images are 1540x645; the mean of a sample that held
        one was two 480-px tile rows high, the usual image one, and tiled trials were predicted at twice their
        pixels)."""
        counts = Counter(self.sampled_hw or [self.image_hw])
        return sum(n * network_pixels(params, hw) for hw, n in counts.items()) / sum(counts.values())

    def work(self, family: str, params: dict, fidelity: Fidelity) -> Work:
        pixels = self.network_pixels(params)
        scoring = self.scoring_pixels.get(family)
        return Work(family, fidelity.train_images, fidelity.validation_images or self.validation_images,
                    scoring(params, pixels) if scoring else pixels, fidelity.epochs)


def plan_trial(predictor: CostPredictor, sizes: TrialSizes, family: str, params: dict, cap_s: float,
               first_rung: int = 0, within_s: float | None = None) -> TrialPlan:
    """The highest fidelity from ``first_rung`` down whose predicted seconds fit ``within_s`` (default ``cap_s``),
    made as far short as the furthest prediction of this search (:meth:`CostPredictor.under_prediction`; for an
    iterative family only the seconds after training, since training stops at its deadline).

    An iterative family that would not finish its epochs within the training share of that time (and the time
    left after scoring) trains fewer epochs (at least one) before a lower rung is tried. The limit is
    ``SEARCH_COST_MARGIN`` (``SEARCH_UNMEASURED_COST_MARGIN`` for a family not measured yet) × the prediction plus
    ``SEARCH_LIMIT_SLACK_S``, never above ``cap_s``. A rung whose fit would not fit in the memory one trial has
    trains in smaller batches (families that train in batches: :func:`_batch_that_fits`) or is passed over; the
    trial is skipped when no rung fits.
    """
    under = predictor.under_prediction(family)
    room = min(cap_s, within_s) if within_s is not None else cap_s
    traits = predictor.traits.get(family, FamilyTraits("", False))
    epochs = params.get("epochs", traits.default_epochs)
    full_epochs = int(epochs) if traits.iterative and isinstance(epochs, (int, float)) else None
    levels = [k for k in rungs(sizes.train_images) if k >= first_rung] or [max(rungs(sizes.train_images))]
    fidelities = {rung: fidelity_at(rung, sizes, full_epochs) for rung in levels}
    batches = {rung: _batch_that_fits(predictor, sizes, family, params, fidelities[rung]) for rung in levels}
    needs = {rung: predictor.peak_bytes(sizes.work(family, params, fidelities[rung]),
                                        _with_batch(params, batches[rung])) for rung in levels}
    if predictor.memory_per_trial_bytes and min(needs.values()) > predictor.memory_per_trial_bytes:
        fidelity = replace(fidelities[levels[-1]], batch_size=batches[levels[-1]])
        return TrialPlan(None, predictor.predict(sizes.work(family, params, fidelity), params), cap_s,
                         skip=f"it needs about {needs[levels[-1]] / 2**30:.1f} GiB at its peak even with "
                              f"{fidelity.describe()}, over the {predictor.memory_per_trial_bytes / 2**30:.1f} GiB "
                              "one trial may use here", skip_reason="predicted out of memory")
    levels = [rung for rung in levels if not predictor.memory_per_trial_bytes
              or needs[rung] <= predictor.memory_per_trial_bytes]
    last = None
    for rung in levels:
        one_epoch = ""  # said when not even one epoch fits the training share
        fidelity = replace(fidelities[rung], batch_size=batches[rung])
        prediction = predictor.predict(sizes.work(family, params, fidelity), params)
        fit_room = min(SEARCH_TRAINING_SHARE * room, room - under * (prediction.eval_s + prediction.overhead_s))
        if full_epochs and prediction.fit_s > fit_room:
            per_epoch = (prediction.fit_s - prediction.fit_setup_s) / full_epochs  # the set-up is paid once
            epochs = int(max(0.0, fit_room - prediction.fit_setup_s) // per_epoch) if per_epoch > 0 else full_epochs
            if epochs >= 1:
                fidelity = replace(fidelity, epochs=epochs)
                prediction = predictor.predict(sizes.work(family, params, fidelity), params)
            else:
                one_epoch = f" (one epoch alone: {per_epoch:.0f} s of training)"
        last = (fidelity, prediction)
        if _surely_needed(prediction, under, traits.iterative) <= room:
            margin = SEARCH_COST_MARGIN if predictor.measured(family) else SEARCH_UNMEASURED_COST_MARGIN
            limit = min(cap_s, margin * prediction.total_s + SEARCH_LIMIT_SLACK_S)
            return TrialPlan(fidelity, prediction, limit)
    fidelity, prediction = last
    needed = _surely_needed(prediction, under, traits.iterative)
    short = "" if needed == prediction.total_s else \
        f": {needed:.0f} s if it falls {under:.2f}x short like the furthest prediction of this search"
    return TrialPlan(None, prediction, cap_s,
                     skip=f"predicted {prediction.total_s:.0f} s ({prediction.basis}) even with "
                          f"{fidelity.describe()}{short}, over the {room:.0f} s it may have{one_epoch}")


def _surely_needed(prediction: Prediction, under: float, iterative: bool) -> float:
    """Seconds a trial needs if its prediction falls ``under`` times short: all of it, but for an iterative family
    only the part after training (training stops at its deadline, a share of the limit, whatever it predicted)."""
    unsure = prediction.eval_s + prediction.overhead_s if iterative else prediction.total_s
    return prediction.total_s + (under - 1.0) * unsure
