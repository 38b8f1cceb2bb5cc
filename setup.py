"""Package layout for setuptools (metadata is in pyproject.toml). The top-level ``search_spaces/`` and
``profiles/`` folders ship inside the package as ``automl_ad.search_spaces`` and ``automl_ad.profiles``."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["automl_ad", "automl_ad.*"]) + ["automl_ad.search_spaces", "automl_ad.profiles"],
    package_dir={"automl_ad.search_spaces": "search_spaces", "automl_ad.profiles": "profiles"},
    package_data={"automl_ad.knowledge": ["*.yaml", "*.csv"], "automl_ad.recommend": ["*.yaml"],
                  "automl_ad.features": ["*.yaml", "builtin/*.safetensors", "builtin/*.md"],
                  "automl_ad.search_spaces": ["*.yaml"], "automl_ad.profiles": ["*.yaml"]},
)
