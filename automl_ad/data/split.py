"""The split of a dataset that a search fits on, selects with and reports on; written with the search so that
export and reports read the very same images from any working directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from automl_ad.data.imageset import ImageSet
from automl_ad.data.synthetic import without_trained_kinds

#: What a search's validation anomalies are, by ``validation_kind``, in words.
ANOMALY_WORDS = {"real": "real defects", "synthetic": "synthetic anomalies",
                 "mixed": "real defects and synthetic anomalies"}


@dataclass
class SearchSplit:
    """Train (normal), validation (what trials are ranked on) and test (final report only) image sets.
    ``validation_kind`` is "real", "synthetic" or "mixed" (too few real defects: synthetic anomalies beside them;
    :data:`~automl_ad.defaults.MIN_REAL_VALIDATION_DEFECTS`); ``reference`` holds the real-defect validation images when
    ranking is on synthetic anomalies although real defects exist (trials are scored on both, to measure how
    well the synthetic ranking agrees with the real one); ``synthetic_reference`` holds synthetic anomalies on the
    held-out normals when ranking is on real defects and the search was asked to compare (the same agreement, seen
    from the other side). Synthetic validation anomalies carry their kind
    (``validation.kinds``): a family is ranked with :meth:`validation_for` the kinds it trains on."""

    train: ImageSet
    validation: ImageSet
    test: ImageSet
    validation_kind: str
    reference: ImageSet | None = None
    synthetic_reference: ImageSet | None = None

    def describe(self) -> str:
        n_val_bad = int(self.validation.labels.sum())
        n_val_good = len(self.validation) - n_val_bad
        n_test_bad = int(self.test.labels.sum()) if len(self.test) else 0
        kinds = list(self.validation.kinds or [])
        n_synthetic = sum(k is not None for k in kinds)
        named = sorted({k for k in kinds if k is not None})
        held_out = (f" ({', '.join(named)}; each family is ranked on {n_val_good} of kinds it does not train on)"
                    if named and n_synthetic > n_val_good else "")
        anomalies = (f"{n_val_bad - n_synthetic} real defects (too few to rank on alone) and {n_synthetic} "
                     "synthetic anomalies" if self.validation_kind == "mixed" else
                     f"{n_val_bad} {self.validation_kind} anomalies")
        return (f"train {len(self.train)} normal; validation {n_val_good} normal + {anomalies}{held_out}; "
                f"test {len(self.test) - n_test_bad} normal + {n_test_bad} defective")

    def validation_for(self, trained_on: Sequence[str]) -> ImageSet:
        """The validation images of a family that trains on the synthetic anomaly kinds ``trained_on`` (its
        ``trains_on_anomalies``), those kinds held out (:func:`automl_ad.data.synthetic.without_trained_kinds`)."""
        return without_trained_kinds(self.validation, trained_on)

    def normal_validation(self) -> ImageSet:
        """The held-out normal images (thresholds are calibrated on them)."""
        return self.validation.subset([i for i, label in enumerate(self.validation.labels) if label == 0])

    def to_json(self) -> dict:
        sets = {"train": self.train, "validation": self.validation, "test": self.test, "reference": self.reference,
                "synthetic_reference": self.synthetic_reference}
        return {"validation_kind": self.validation_kind,
                **{name: images.to_json() for name, images in sets.items() if images is not None}}

    @classmethod
    def from_json(cls, data: dict) -> SearchSplit:
        sets = {name: ImageSet.from_json(data[name]) if data.get(name) else None
                for name in ("train", "validation", "test", "reference", "synthetic_reference")}
        if sets["test"] is None:
            sets["test"] = ImageSet(paths=[], labels=[], mask_paths=[])
        return cls(validation_kind=data["validation_kind"], **sets)
