"""Heatmap overlays: anomaly maps blended over their images, with the defect outline when a mask exists."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from automl_ad.data.io import resize_image, save_png


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None,
            alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: ``image`` (H, W[, 3], float in [0, 1]) with the map (resized to it) in the 'jet' colour map
    on a fixed [vmin, vmax] scale, so colours mean the same across images; mask outline in white."""
    from scipy import ndimage

    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    heat = resize_image(anomaly_map.astype(np.float32), rgb.shape[:2])
    heat = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    lut = _jet()  # matplotlib's own lookup: level min(int(x * 256), 255) of its 256 colours
    coloured = lut[np.minimum((heat * len(lut)).astype(np.int32), len(lut) - 1)]
    blended = (1 - alpha) * rgb + alpha * coloured
    if mask is not None:
        mask = resize_image(mask.astype(np.float32), rgb.shape[:2]) > 0.5
        blended[mask ^ ndimage.binary_erosion(mask, iterations=2)] = 1.0
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)


@cache
def _jet() -> np.ndarray:
    """The 'jet' colour map's 256 RGB colours (float32); indexing them is ~10x faster than calling the map."""
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    return cmap(np.arange(cmap.N))[:, :3].astype(np.float32)


def save_overlays(out_dir: str | Path, images, maps: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                  names: list[str], masks: list | None = None, count: int = 6) -> list[Path]:
    """Save overlays for the highest-scoring anomalous and normal images (the most telling ones)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    normal_maps = maps[labels == 0] if (labels == 0).any() else maps
    vmin, vmax = float(np.percentile(normal_maps, 1)), float(np.percentile(maps, 99.9))
    order = np.argsort(-scores)
    chosen = ([i for i in order if labels[i] == 1][: count - count // 3]
              + [i for i in order if labels[i] == 0][: count // 3])
    paths = []
    for i in chosen:
        picture = overlay(images[i], maps[i], vmin, vmax, None if masks is None else masks[i])
        kind = "defect" if labels[i] else "normal"
        path = out_dir / f"{kind}_{scores[i]:.3f}_{Path(names[i]).stem}.png"
        save_png(path, picture)
        paths.append(path)
    return paths
