"""Files a run writes: pictures as PNG (encoded by TensorFlow, no plotting library), checkpoints.

- `image_grid`: a grid of images in [0, 1] (samples of an image model).
- `density_panels`: for 2-D data, three square panels side by side: a histogram of the data,
  the model density on a grid, and a histogram of samples from the model.
- `checkpoint_dir`, `latest_checkpoint`: where a run's checkpoints go, and the newest one.
"""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

__all__ = ["checkpoint_dir", "density_panels", "image_grid", "latest_checkpoint", "write_png"]


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Writes a uint8 array `[H, W]` or `[H, W, C]` (C = 1 or 3) as a PNG file."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    tf.io.write_file(str(path), tf.io.encode_png(image))


def image_grid(images: np.ndarray, *, columns: int | None = None, scale: int = 1) -> np.ndarray:
    """Tiles images `[N, H, W, C]` with values in [0, 1] into one uint8 image.

    Args:
        images: float array; values are clipped to [0, 1] (NaN shows as black).
        columns: images per row; default the ceiling of sqrt(N).
        scale: nearest-neighbour upscaling factor (8x8 digits are tiny).

    Returns:
        uint8 array `[rows * (H + 1) + 1, columns * (W + 1) + 1, C]` with 1-pixel gray borders.
    """
    images = np.nan_to_num(np.clip(np.asarray(images, np.float64), 0.0, 1.0))
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 0.5)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = (
            images[i]
        )
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return np.round(grid * 255.0).astype(np.uint8)


def _histogram(points: np.ndarray, bounds: float, bins: int) -> np.ndarray:
    counts, _, _ = np.histogram2d(
        points[:, 1], points[:, 0], bins=bins, range=[[-bounds, bounds], [-bounds, bounds]]
    )
    return counts[::-1]  # image rows go down, y goes up


def density_panels(
    data: np.ndarray,
    log_prob_fn: Callable[[np.ndarray], np.ndarray],
    samples: np.ndarray,
    *,
    bounds: float = 4.0,
    bins: int = 128,
) -> np.ndarray:
    """Data histogram, model density and sample histogram of 2-D points, side by side.

    Args:
        data: `[N, 2]` points from the data.
        log_prob_fn: maps `[M, 2]` float32 points to `[M]` log-densities.
        samples: `[K, 2]` points sampled from the model.
        bounds: the panels show [-bounds, bounds]^2.
        bins: pixels per side of each panel.

    Returns:
        uint8 grayscale image `[bins, 3 * bins + 2]` (brighter = more mass).
    """
    centers = (np.arange(bins) + 0.5) / bins * 2 * bounds - bounds
    xs, ys = np.meshgrid(centers, centers[::-1])
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    density = np.exp(np.asarray(log_prob_fn(grid), np.float64)).reshape(bins, bins)
    panels = [_histogram(data, bounds, bins), density, _histogram(samples, bounds, bins)]
    out = []
    for panel in panels:
        panel = np.nan_to_num(panel)
        top = panel.max()
        out.append(panel / top if top > 0 else panel)
        out.append(np.full((bins, 1), 0.5))
    return np.round(np.concatenate(out[:-1], axis=1) * 255.0).astype(np.uint8)


def checkpoint_dir(run_dir: Path) -> Path:
    """Where the per-epoch checkpoints (weights and optimizer state) of a run go."""
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The newest `epoch_NNN.weights.h5` in the run and its epoch, or None."""
    found = sorted(checkpoint_dir(run_dir).glob("epoch_*.weights.h5"))
    if not found:
        return None
    path = found[-1]
    return path, int(path.name.split("_")[1].split(".")[0])
