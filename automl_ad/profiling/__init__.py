"""Dataset profiling: counts, sizes, colour, texture vs object, alignment, defect sizes."""

from automl_ad.profiling.profile import DatasetProfile, profile_dataset

__all__ = ["DatasetProfile", "profile_dataset"]
