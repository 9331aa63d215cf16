"""PNG pictures of samples, drawn with numpy and PIL (no plotting library).

    save_image_grid(path, images)                 # (N, H, W, C) in [0, 1] -> a square-ish grid
    save_scatter(path, points, reference=data)    # (N, D) points -> a scatter plot of the first 2 coords

Paths may be local or any ``etils.epath`` URL.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
from etils import epath

_PAD = 2                                     # pixels between and around grid cells
_SAMPLE_RGB = np.array([31, 119, 180], np.uint8)     # blue
_REFERENCE_RGB = np.array([190, 190, 190], np.uint8)  # light grey


def _save(path: str | epath.PathLike, image: PIL.Image.Image) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    image.save(f, format="PNG")


def image_grid(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
  """Tiles images (N, H, W, C) into one uint8 image (rows, cols, C), ``ncol`` (default ceil sqrt N) wide.

  Values are clipped to [0, 1] and scaled to 0..255; cells are separated by a black border.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
    raise ValueError(f"images must be (N, H, W, C) with N >= 1 and C in (1, 3), got shape {images.shape}.")
  n, h, w, c = images.shape
  ncol = ncol or math.ceil(math.sqrt(n))
  nrow = math.ceil(n / ncol)
  grid = np.zeros((nrow * (h + _PAD) + _PAD, ncol * (w + _PAD) + _PAD, c), np.uint8)
  cells = np.round(np.clip(np.nan_to_num(images), 0.0, 1.0) * 255.0).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    y, x = _PAD + r * (h + _PAD), _PAD + col * (w + _PAD)
    grid[y:y + h, x:x + w] = cells[i]
  return grid


def save_image_grid(path: str | epath.PathLike, images: np.ndarray, ncol: int | None = None,
                    min_width: int = 256) -> None:
  """Writes ``image_grid(images, ncol)`` as a PNG (grey for one channel, RGB for three).

  Args:
    path: the file to write.
    images: (N, H, W, C) floats in [0, 1] (the data scaler already inverted); C is 1 or 3.
    ncol: images per row (default ceil(sqrt(N))).
    min_width: a narrower grid is enlarged by an integer factor (nearest neighbour), so that
      small images (8x8 digits) stay visible.
  """
  grid = image_grid(images, ncol)
  factor = max(1, -(-min_width // grid.shape[1]))
  grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
  _save(path, PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid))


def _frame(points: np.ndarray, reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """A square frame (lo (2,), hi (2,)) around the central 99% of ``points`` (N, 2) and ``reference`` (M, 2).

  With a reference, the frame reaches at most 3 times the reference's own half-width from its
  centre, so that diverged samples neither hide the data nor fill the picture.
  """
  def central(x):
    lo, hi = np.percentile(x, 0.5, axis=0), np.percentile(x, 99.5, axis=0)
    return (lo + hi) / 2, max(float(np.max(hi - lo)) / 2, 1e-6) * 1.15

  if reference is None or not len(reference):
    if not len(points):
      return np.full(2, -1.0), np.full(2, 1.0)
    centre, half = central(points)
    return centre - half, centre + half
  centre, half = central(reference)
  if len(points):
    lo, hi = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5, axis=0)
    half = min(max(half, float(np.max(np.abs(np.stack([lo, hi]) - centre))) * 1.05), 3 * half)
  return centre - half, centre + half


def _raster(points: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: int, radius: int) -> np.ndarray:
  """A (size, size) mask of disks of ``radius`` pixels at ``points`` (N, 2); y grows upwards."""
  mask = np.zeros((size, size), bool)
  pixels = np.floor((points - lo) / (hi - lo) * size).astype(np.int64)
  inside = np.all((pixels >= 0) & (pixels < size), axis=1)
  col, row = pixels[inside, 0], size - 1 - pixels[inside, 1]
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      if dx * dx + dy * dy <= radius * radius:
        mask[np.clip(row + dy, 0, size - 1), np.clip(col + dx, 0, size - 1)] = True
  return mask


def save_scatter(path: str | epath.PathLike, points: np.ndarray, reference: np.ndarray | None = None,
                 size: int = 512, radius: int = 2) -> None:
  """Writes a scatter plot of ``points`` (blue) over ``reference`` (grey) as a PNG.

  The frame is square and holds the central 99% of the finite points (samples and reference, but
  at most 3 times the reference's extent), so a few diverged samples do not shrink the picture;
  the caption gives the frame and counts the samples outside it and the non-finite ones.

  Args:
    path: the file to write.
    points: (N, D) samples, D >= 2; the first two coordinates are drawn.
    reference: optional (M, D) data points drawn underneath.
    size: width and height of the plot area in pixels.
    radius: radius of each dot in pixels.
  """
  points = np.asarray(points, np.float64)
  if points.ndim != 2 or points.shape[1] < 2:
    raise ValueError(f"points must be (N, D) with D >= 2, got shape {points.shape}.")
  finite = np.all(np.isfinite(points[:, :2]), axis=1)
  xy = points[finite, :2]
  ref = None
  if reference is not None:
    ref = np.asarray(reference, np.float64).reshape(-1, np.shape(reference)[-1])[:, :2]
    ref = ref[np.all(np.isfinite(ref), axis=1)]
  lo, hi = _frame(xy, ref)
  # Plot area: reference underneath, samples on top.
  area = np.full((size, size, 3), 255, np.uint8)
  if ref is not None and len(ref):
    area[_raster(ref, lo, hi, size, radius)] = _REFERENCE_RGB
  area[_raster(xy, lo, hi, size, radius)] = _SAMPLE_RGB
  # A caption strip above the area, and a thin frame.
  caption_height = 30
  canvas = PIL.Image.new("RGB", (size, size + caption_height), "white")
  canvas.paste(PIL.Image.fromarray(area), (0, caption_height))
  draw = PIL.ImageDraw.Draw(canvas)
  draw.rectangle([0, caption_height, size - 1, size + caption_height - 1], outline="black")
  outside = int(np.sum(np.any((xy < lo) | (xy >= hi), axis=1)))
  draw.text((4, 2), f"{len(points)} samples (blue), x in [{lo[0]:.2f}, {hi[0]:.2f}], "
                    f"y in [{lo[1]:.2f}, {hi[1]:.2f}]", fill="black")
  draw.text((4, 15), f"{outside} outside the frame, {int(np.sum(~finite))} non-finite"
                     + ("; data in grey" if ref is not None else ""), fill="black")
  _save(path, canvas)
