"""Frequency-domain analysis: suppress the periodic background of a texture in the Fourier domain.

Both methods work on the spectrum of the periodic component of the luma at ``input_size`` (Moisan's
periodic-plus-smooth decomposition, 2011): the FFT treats an image as periodic, so the jump between opposite
borders would put a bright cross into the spectrum and a bright frame into the residual; the decomposition moves
that jump into a smooth image, which is dropped.

* ``method="poft"`` - the phase-only Fourier transform (Aiger & Talbot, 2010): F = FFT(image); keep only the
  phase, P = F / |F|; residual r = IFFT(P). Every frequency gets the same weight, so the few strong frequencies
  of a periodic background collapse while aperiodic detail (a defect's edges) keeps its energy.
* ``method="spectrum"`` - background-spectrum removal learnt from the normal images: the mean log-magnitude
  spectrum of the normals; its smooth baseline (a median filter over ``baseline_size`` frequency bins, wrapping
  around the periodic frequency domain); the periodic background = the frequencies where the mean spectrum
  rises more than ``peak_threshold`` (natural-log units) above the baseline, widened by ``notch_radius`` bins.
  A test spectrum is notched at those frequencies and divided by exp(baseline) (whitened by the normal
  background's smooth spectrum, so fine aperiodic detail is not drowned by the texture's strong low frequencies);
  residual r = IFFT of the result.

Anomaly map: |r| smoothed with a Gaussian of ``smoothing_sigma``, then standardised with the mean and standard
deviation of the smoothed residuals of the training normals pooled over all pixels (one pair for all positions,
since textures are not aligned); image score = maximum of the map.

Suited to periodic textures only: on objects, and on stochastic textures, the residual holds all the normal
structure too. Fitting only estimates the calibration (and, for ``spectrum``, the background spectrum); nothing is
trained iteratively, so ``needs_training`` is False as for the route.
"""

from __future__ import annotations

import logging
from numbers import Integral

import numpy as np
from scipy import ndimage

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import Detector, EpochCallback, Scores
from automl_ad.detectors.parameters import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, Interval, Options
from automl_ad.detectors.registry import register_detector

log = logging.getLogger(__name__)

METHODS = ("poft", "spectrum")
_EPS = 1e-12


@register_detector
class FrequencyDomain(Detector):
    """Frequency-domain route: the residual after removing a texture's periodic background (POFT or notching)."""

    name = "frequency"
    route = "frequency_domain"
    needs_training = False
    no_graph = ("it filters each image's Fourier spectrum with numpy (periodic-plus-smooth decomposition),"
                " not a torch graph")
    test_params = {"input_size": 96, "smoothing_sigma": 3.0}
    test_category = "texture"
    gray = True
    _parameter_constraints = {
        "input_size": [Interval(Integral, 16, None, closed="left")], "method": [Options(*METHODS)],
        "smoothing_sigma": [NON_NEGATIVE], "peak_threshold": [POSITIVE],
        "baseline_size": [Interval(Integral, 3, None, closed="left")], "notch_radius": [NON_NEGATIVE_INT],
    }

    def __init__(self, input_size=256, method="spectrum", smoothing_sigma=4.0, peak_threshold=0.5, baseline_size=9,
                 notch_radius=1):
        self._store_parameters(locals())

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        images = train.load(self.input_size, gray=True)
        if self.method == "spectrum":
            mean_log = sum(np.log(np.abs(_periodic_spectrum(image)) + _EPS) for image in images) / len(images)
            baseline = ndimage.median_filter(mean_log, size=self.baseline_size, mode="wrap")
            peaks = mean_log - baseline > self.peak_threshold
            if self.notch_radius > 0:
                radius = self.notch_radius
                yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
                peaks = ndimage.maximum_filter(peaks, footprint=yy ** 2 + xx ** 2 <= radius ** 2, mode="wrap")
            self.filter_ = (~peaks / np.exp(baseline)).astype(np.float32)
            log.info("%s: notching %.2f%% of the frequencies as periodic background", self.name, 100 * peaks.mean())
        total = squares = 0.0
        for image in images:
            residual = self._residual(image).astype(np.float64)
            total += residual.sum()
            squares += (residual * residual).sum()
        count = images.size
        self.residual_mean_ = float(total / count)
        self.residual_std_ = float(np.sqrt(max(squares / count - self.residual_mean_ ** 2, 0))) + _EPS

    # --- residuals and scoring --------------------------------------------------------------------------------
    def _residual(self, image: np.ndarray) -> np.ndarray:
        """Smoothed absolute residual of one gray image after removing the periodic background."""
        spectrum = _periodic_spectrum(image)
        if self.method == "poft":
            spectrum = spectrum / (np.abs(spectrum) + _EPS)
        else:
            spectrum = spectrum * self.filter_
        residual = np.abs(np.real(np.fft.ifft2(spectrum)))
        if self.smoothing_sigma > 0:
            residual = ndimage.gaussian_filter(residual, self.smoothing_sigma, truncate=4.0)
        return residual

    def _score(self, images: ImageSet) -> Scores:
        maps = np.stack([(self._residual(image) - self.residual_mean_) / self.residual_std_
                         for image in images.load(self.input_size, gray=True)]).astype(np.float32)
        return Scores(maps.reshape(len(maps), -1).max(axis=1), maps)

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {"filter": self.filter_} if self.method == "spectrum" else {}
        return tensors, {"residual_mean": self.residual_mean_, "residual_std": self.residual_std_}

    def _restore(self, tensors, state):
        if self.method == "spectrum":
            self.filter_ = tensors["filter"]
        self.residual_mean_ = state["residual_mean"]
        self.residual_std_ = state["residual_std"]


def _periodic_spectrum(image: np.ndarray) -> np.ndarray:
    """FFT of the periodic component of ``image`` (Moisan 2011: image = periodic + smooth; the smooth part holds
    the jumps between opposite borders and is removed), with the mean (DC) set to zero."""
    image = image.astype(np.float64)
    rows, cols = image.shape
    boundary = np.zeros_like(image)
    boundary[0] += image[-1] - image[0]
    boundary[-1] -= image[-1] - image[0]
    boundary[:, 0] += image[:, -1] - image[:, 0]
    boundary[:, -1] -= image[:, -1] - image[:, 0]
    laplacian = (2 * np.cos(2 * np.pi * np.arange(rows) / rows)[:, None]
                 + 2 * np.cos(2 * np.pi * np.arange(cols) / cols)[None] - 4)
    laplacian[0, 0] = 1.0
    spectrum = np.fft.fft2(image) - np.fft.fft2(boundary) / laplacian
    spectrum[0, 0] = 0.0
    return spectrum
