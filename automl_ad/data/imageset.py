"""ImageSet: the images a detector fits on or scores — files (with labels and masks) or in-memory arrays."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from automl_ad.data.geometry import Geometry, TileGrid, tile_grid, to_tiles
from automl_ad.data.io import load_image, read_mask, to_float
from automl_ad.defaults import IO_WORKERS


@dataclass
class ImageSet:
    """An ordered set of images with optional labels (1 = anomalous) and masks.

    Build it with :meth:`from_records` (files of a validated dataset), :meth:`from_paths` or
    :meth:`from_arrays`. ``image_fingerprints`` identify the content (the feature cache's keys) without decoding.
    ``kinds`` names, per image, the kind of a synthesised anomaly (:data:`automl_ad.data.synthetic.KINDS`); None
    for real images. ``full_scale`` is what 16-bit images are divided by (their dataset's
    :attr:`~automl_ad.data.Dataset.full_scale`; None: 65535).
    """

    paths: list[Path] | None = None
    arrays: list[np.ndarray] | None = None
    labels: np.ndarray | None = None
    mask_paths: list[Path | None] | None = None
    content_hashes: list[str] | None = None
    kinds: list[str | None] | None = None
    full_scale: int | None = None
    _fingerprints: list[str] | None = field(default=None, repr=False)

    def __post_init__(self):
        if (self.paths is None) == (self.arrays is None):
            raise ValueError("an ImageSet holds either paths or arrays")
        n = len(self)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"labels has shape {self.labels.shape}, expected ({n},)")
        if self.mask_paths is not None and len(self.mask_paths) != n:
            raise ValueError("mask_paths must have one entry (or None) per image")
        if self.kinds is not None and len(self.kinds) != n:
            raise ValueError("kinds must have one entry (or None) per image")

    @classmethod
    def from_records(cls, records: Sequence, dataset=None) -> ImageSet:
        """Images of a validated :class:`~automl_ad.data.Dataset` (its content hashes make fingerprinting free)."""
        hashes = [dataset.info[r.path].sha256 for r in records] if dataset is not None else None
        return cls(paths=[r.path for r in records], labels=[0 if r.is_normal else 1 for r in records],
                   mask_paths=[r.mask for r in records], content_hashes=hashes,
                   full_scale=dataset.full_scale if dataset is not None else None)

    def to_json(self) -> dict:
        """Absolute paths, labels, masks, content hashes and full scale as JSON-ready data (file-backed sets
        only)."""
        if self.paths is None:
            raise ValueError("only an ImageSet of files can be written as JSON")
        labels = self.labels if self.labels is not None else np.zeros(len(self), np.int64)
        return {"paths": [str(Path(p).resolve()) for p in self.paths], "labels": labels.tolist(),
                "masks": [None if m is None else str(Path(m).resolve())
                          for m in (self.mask_paths or [None] * len(self))],
                "hashes": self.content_hashes, **({"kinds": self.kinds} if self.kinds is not None else {}),
                **({"full_scale": self.full_scale} if self.full_scale is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> ImageSet:
        """The inverse of :meth:`to_json`."""
        return cls(paths=[Path(p) for p in data["paths"]], labels=np.asarray(data["labels"], np.int64),
                   mask_paths=[None if m is None else Path(m) for m in data["masks"]],
                   content_hashes=data.get("hashes"), kinds=data.get("kinds"), full_scale=data.get("full_scale"))

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], labels=None) -> ImageSet:
        return cls(paths=[Path(p) for p in paths], labels=labels)

    @classmethod
    def from_arrays(cls, arrays, labels=None) -> ImageSet:
        """In-memory images: uint8/uint16, or float in [0, 1]; (H, W) gray or (H, W, 3) colour."""
        items = [np.asarray(a) for a in arrays]
        for i, a in enumerate(items):
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
                raise ValueError(f"image {i} has shape {a.shape}; expected (H, W) or (H, W, 3)")
        return cls(arrays=items, labels=labels)

    def __len__(self) -> int:
        return len(self.paths if self.paths is not None else self.arrays)

    def subset(self, indices: Sequence[int]) -> ImageSet:
        pick = lambda items: None if items is None else [items[i] for i in indices]  # noqa: E731
        return ImageSet(paths=pick(self.paths), arrays=pick(self.arrays),
                        labels=None if self.labels is None else self.labels[list(indices)],
                        mask_paths=pick(self.mask_paths), content_hashes=pick(self.content_hashes),
                        kinds=pick(self.kinds), full_scale=self.full_scale, _fingerprints=pick(self._fingerprints))

    def concatenated(self, other: ImageSet) -> ImageSet:
        """This set's images followed by ``other``'s: both of files, labelled alike, read at the same full scale."""
        if self.paths is None or other.paths is None or (self.labels is None) != (other.labels is None) \
                or self.full_scale != other.full_scale:
            raise ValueError("only image sets of files, labelled alike and read at the same full scale, concatenate")

        def joined(mine, theirs, whole: bool = False):
            if mine is None and theirs is None or whole and (mine is None or theirs is None):
                return None
            return list(mine or [None] * len(self)) + list(theirs or [None] * len(other))

        return ImageSet(paths=self.paths + other.paths,
                        labels=None if self.labels is None else np.concatenate([self.labels, other.labels]),
                        mask_paths=joined(self.mask_paths, other.mask_paths),
                        content_hashes=joined(self.content_hashes, other.content_hashes, whole=True),
                        kinds=joined(self.kinds, other.kinds), full_scale=self.full_scale)

    def at_full_scale(self, full_scale: int | None) -> ImageSet:
        """The same images read with another ``full_scale`` (a fitted detector scores new images as it was
        trained)."""
        if full_scale == self.full_scale:
            return self
        return ImageSet(paths=self.paths, arrays=self.arrays, labels=self.labels, mask_paths=self.mask_paths,
                        content_hashes=self.content_hashes, kinds=self.kinds, full_scale=full_scale)

    def image_fingerprints(self) -> list[str]:
        """A hash of each image's content (file bytes, or array shape, type and bytes) and of the full scale it is
        read at: the feature cache's key for that image, whatever set it comes in."""
        if self._fingerprints is None:
            def of_array(a: np.ndarray) -> str:
                digest = hashlib.sha256(f"{a.shape}{a.dtype}".encode())
                digest.update(np.ascontiguousarray(a).tobytes())
                return digest.hexdigest()

            contents = [of_array(a) for a in self.arrays] if self.arrays is not None else \
                list(self.content_hashes) if self.content_hashes else \
                [hashlib.sha256(path.read_bytes()).hexdigest() for path in self.paths]
            self._fingerprints = contents if self.full_scale is None else \
                [hashlib.sha256(f"{content}/{self.full_scale}".encode()).hexdigest() for content in contents]
        return self._fingerprints

    def _array(self, i: int, size, gray: bool) -> np.ndarray:
        if self.paths is not None:
            return load_image(self.paths[i], size, gray=gray, full_scale=self.full_scale)
        from automl_ad.data.io import resize_image, to_gray

        a = self.arrays[i]
        a = a[..., :3] if a.ndim == 3 and a.shape[2] == 4 else a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
        a = to_float(a, self.full_scale) if a.dtype.kind in "ui" else a.astype(np.float32, copy=False)
        if gray:
            a = to_gray(a)
        a = resize_image(a, size) if size is not None else a
        return a.copy() if np.may_share_memory(a, self.arrays[i]) else a  # never hand out the stored array

    def load(self, size: int | tuple[int, int] | None = None, gray: bool = False) -> np.ndarray:
        """All images as float32 in [0, 1]: ``(N, H, W)`` when ``gray`` else ``(N, H, W, 3)`` (gray repeated).

        ``size`` (square int or (height, width)) is required when the images differ in size.
        """
        images = self._map(lambda i: self._array(i, size, gray))
        if not gray:
            images = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]
        shapes = {a.shape for a in images}
        if len(shapes) > 1:
            raise ValueError(f"images differ in size ({len(shapes)} shapes); pass size= to load them at one size")
        return np.stack(images) if images else np.empty((0,), np.float32)

    def network_inputs(self, geometry: Geometry, gray: bool = False) -> np.ndarray:
        """The network inputs of every image under ``geometry``, in image order (an image's tiles in the order of
        its grid): float32 ``(M, h, w)`` when ``gray`` else ``(M, h, w, 3)``, ``h x w = geometry.input_hw``.

        A squash is exactly :meth:`load` at the network size (one input per image); letterbox and tile decode each
        image at its own size and cut it with :func:`~automl_ad.data.geometry.to_tiles`.
        """
        if geometry.mode == "squash":
            return self.load(geometry.input_hw, gray=gray)

        def inputs_of(i: int) -> np.ndarray:
            image = self._array(i, None, gray)
            if not gray and image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            return to_tiles(image, tile_grid(geometry, image.shape[:2]))

        parts = self._map(inputs_of)
        if not parts:
            return np.empty((0, *geometry.input_hw, *(() if gray else (3,))), np.float32)
        return np.concatenate(parts)

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image as stored; files are sized from their header when it can be read."""
        if self.arrays is not None:
            return [tuple(int(v) for v in a.shape[:2]) for a in self.arrays]
        return self._map(lambda i: _file_size(self.paths[i]))

    def grids(self, geometry: Geometry) -> list[TileGrid]:
        """Each image's :class:`~automl_ad.data.geometry.TileGrid` under ``geometry`` (how many network inputs it
        has, and how their maps are stitched back)."""
        return [tile_grid(geometry, hw) for hw in self.sizes()]

    def load_each(self, gray: bool = False) -> list[np.ndarray]:
        """Every image decoded at its stored size (float32 in [0, 1]); sizes may differ."""
        return self._map(lambda i: self._array(i, None, gray))

    def _map(self, function) -> list:
        """``function`` over every index, decoding in parallel threads when there is more than one image."""
        if len(self) <= 1:
            return [function(i) for i in range(len(self))]
        with ThreadPoolExecutor(IO_WORKERS) as pool:
            return list(pool.map(function, range(len(self))))

    def masks(self) -> list[np.ndarray | None]:
        """Binary masks (bool) as stored, one per image, None where the image has none."""
        if self.mask_paths is None:
            return [None] * len(self)
        return [None if p is None else read_mask(p) > 0 for p in self.mask_paths]


def _file_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file: from its header (Pillow opens lazily), else by decoding it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return int(height), int(width)
    except Exception:  # noqa: BLE001 - a format Pillow cannot open lazily: decode it as loading would
        return tuple(int(v) for v in load_image(path).shape[:2])
