"""Data intake: layout detection, image reading, validation, splits and the built-in demo data."""

from automl_ad.data.dataset import Dataset, DataSplit, load_datasets, open_dataset
from automl_ad.data.layout import NORMAL_LABEL, ImageRecord
from automl_ad.data.validation import Problem

__all__ = ["DataSplit", "Dataset", "ImageRecord", "NORMAL_LABEL", "Problem", "load_datasets", "open_dataset"]
