"""Screening the good images for ones that look unlike the others, before a search learns them as normal."""

from automl_ad.screening.normals import NormalScreen, screen_normals

__all__ = ["NormalScreen", "screen_normals"]
