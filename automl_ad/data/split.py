"""The split of a dataset that a search fits on, selects with and reports on; written with the search so that
export and reports read the very same images from any working directory."""

from __future__ import annotations

from dataclasses import dataclass

from automl_ad.data.imageset import ImageSet


@dataclass
class SearchSplit:
    """Train (normal), validation (what trials are ranked on) and test (final report only) image sets.
    ``validation_kind`` is "real" or "synthetic"; ``reference`` holds the real-defect validation images when
    ranking is on synthetic anomalies although real defects exist (trials are scored on both, to measure how
    well the synthetic ranking agrees with the real one)."""

    train: ImageSet
    validation: ImageSet
    test: ImageSet
    validation_kind: str
    reference: ImageSet | None = None

    def describe(self) -> str:
        n_val_bad = int(self.validation.labels.sum())
        n_test_bad = int(self.test.labels.sum()) if len(self.test) else 0
        return (f"train {len(self.train)} normal; validation {len(self.validation) - n_val_bad} normal + "
                f"{n_val_bad} {self.validation_kind} anomalies; test {len(self.test) - n_test_bad} normal + "
                f"{n_test_bad} defective")

    def normal_validation(self) -> ImageSet:
        """The held-out normal images (thresholds are calibrated on them)."""
        return self.validation.subset([i for i, label in enumerate(self.validation.labels) if label == 0])

    def to_json(self) -> dict:
        sets = {"train": self.train, "validation": self.validation, "test": self.test, "reference": self.reference}
        return {"validation_kind": self.validation_kind,
                **{name: images.to_json() for name, images in sets.items() if images is not None}}

    @classmethod
    def from_json(cls, data: dict) -> SearchSplit:
        sets = {name: ImageSet.from_json(data[name]) if data.get(name) else None
                for name in ("train", "validation", "test", "reference")}
        if sets["test"] is None:
            sets["test"] = ImageSet(paths=[], labels=[], mask_paths=[])
        return cls(validation_kind=data["validation_kind"], **sets)
