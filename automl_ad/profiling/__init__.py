"""Dataset profiling: counts, sizes, colour, texture vs object, alignment, defect sizes."""

from automl_ad.profiling.profile import DatasetProfile, profile_dataset, profile_paths, save_profiles

__all__ = ["DatasetProfile", "profile_dataset", "profile_paths", "save_profiles"]
