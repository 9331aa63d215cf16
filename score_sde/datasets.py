"""Data: toy 2-D sets, embedded digits, TFDS and folder images through one grain pipeline; data scalers.

    train_ds, eval_ds = datasets.get_dataset(config)            # config.data.*, training.*, seed
    batch = next(train_ds.make_iterator())    # {"image": float32 [0, 1], "label": int32, "mask": bool}
    x = datasets.get_data_scaler(config.data.centered)(batch["image"])

Batches, the training and evaluation regimes, sources and preparation rules: ``docs/data.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import zlib
from typing import Any, Callable, Sequence

import grain
import jax
from absl import flags
from absl import logging
import ml_collections
import numpy as np
import PIL.Image

from score_sde import analytic

Batch = dict[str, np.ndarray]

_TOY_NUM_TRAIN = 100_000    # training points of a toy set when config.data.num_train is 0
_TOY_NUM_TEST = 10_000
_TOY_DATA_SEED = 20210101   # toy sets are fixed finite samples; split streams fold in 0 / 1
_DIGITS_NUM_TEST = 297      # of 1797 digits; the split is a fixed permutation (seed 0)


# --- Scalers ----------------------------------------------------------------------------------

def get_data_scaler(centered: bool) -> Callable[[Any], Any]:
  """Maps data in [0, 1] to [-1, 1] when ``centered``, else the identity; pure, works under jit."""
  if centered:
    return lambda x: x * 2.0 - 1.0
  return lambda x: x


def get_data_inverse_scaler(centered: bool) -> Callable[[Any], Any]:
  """Inverse of ``get_data_scaler(centered)``; pure, works under jit."""
  if centered:
    return lambda x: (x + 1.0) / 2.0
  return lambda x: x


# --- Toy 2-D sets -----------------------------------------------------------------------------
# Each generator maps (rng, n) to points (n, 2) float32 and labels (n,) int32.

# Two Gaussian mixtures with closed-form densities (weights, means, covariances).
_EIGHT_GAUSSIANS = (
    np.full(8, 1 / 8),
    np.sqrt(2.0) * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1),
    np.tile(0.2**2 * np.eye(2), (8, 1, 1)),
)
_MIXTURE = (
    np.array([0.45, 0.35, 0.2]),
    np.array([[-1.0, -0.6], [1.0, 0.2], [0.0, 1.2]]),
    np.array([[[0.3, 0.15], [0.15, 0.2]], [[0.15, -0.05], [-0.05, 0.4]], [[0.5, 0.0], [0.0, 0.05]]]),
)


def _sample_mixture(params: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact draws from sum_k w_k N(mu_k, Sigma_k); the label is the component k."""
  weights, means, covs = params
  k = rng.choice(len(weights), size=n, p=weights)
  z = rng.standard_normal((n, means.shape[1]))
  x = means[k] + np.einsum("nij,nj->ni", np.linalg.cholesky(covs)[k], z)
  return x.astype(np.float32), k.astype(np.int32)


def _checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Uniform on the 8 dark cells of a 4x4 board on [-2, 2]^2 (std 1.15); label: the cell."""
  cell = rng.integers(0, 8, size=n)
  row = cell // 2
  col = 2 * (cell % 2) + row % 2
  x = np.stack([col, row], 1) - 2.0 + rng.random((n, 2))
  return x.astype(np.float32), cell.astype(np.int32)


def _swissroll(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(t cos t, t sin t) / 7, t ~ U[1.5 pi, 4.5 pi], noise std 0.5 / 7 (std ~0.97); label 0."""
  t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
  x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + 0.5 * rng.standard_normal((n, 2))
  return (x / 7.0).astype(np.float32), np.zeros(n, np.int32)


def _twomoons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Two interleaved half circles, noise std 0.1, centred and scaled by 1.25 (std ~1.1, ~0.6)."""
  moon = rng.integers(0, 2, size=n)
  theta = np.pi * rng.random(n)
  upper = np.stack([np.cos(theta), np.sin(theta)], 1)
  lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], 1)
  x = np.where(moon[:, None] == 0, upper, lower) + 0.1 * rng.standard_normal((n, 2))
  return (1.25 * (x - [0.5, 0.25])).astype(np.float32), moon.astype(np.int32)


# Toy sets by name: (rng, n) -> (points (n, 2) float32, labels (n,) int32).
TOY_DATASETS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "checkerboard": _checkerboard,
    "8gaussians": functools.partial(_sample_mixture, _EIGHT_GAUSSIANS),  # radius sqrt 2, std 0.2
    "swissroll": _swissroll,
    "twomoons": _twomoons,
    "mixture": functools.partial(_sample_mixture, _MIXTURE),  # 3 anisotropic components
}

# Toy sets whose density is known exactly.
_TOY_DENSITIES = {"8gaussians": _EIGHT_GAUSSIANS, "mixture": _MIXTURE}
TOY_DENSITIES = tuple(_TOY_DENSITIES)


def sample_toy(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``n`` points (n, 2) float32 and labels (n,) int32 of the toy set ``name``, fixed by ``seed``."""
  if name not in TOY_DATASETS:
    raise ValueError(f"Unknown toy data set {name!r}; valid choices: {sorted(TOY_DATASETS)}.")
  return TOY_DATASETS[name](np.random.default_rng(seed), n)


def toy_density(name: str) -> analytic.GaussianMixture:
  """The exact density of the toy set ``name`` as a ``GaussianMixture`` (its ``log_prob`` is in nats)."""
  if name not in _TOY_DENSITIES:
    raise ValueError(f"The toy set {name!r} has no closed-form density; these do: {sorted(_TOY_DENSITIES)}.")
  return analytic.GaussianMixture.create(*_TOY_DENSITIES[name])


# --- Sources: random-access sequences of {"image": ..., "label": ...} -------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """An in-memory source: ``images`` (N, ...) (uint8 images or float points), ``labels`` (N,)."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if len(self.images) != len(self.labels):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels.")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}


def _check_split(split: str) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"Unknown split {split!r}; valid choices: ['test', 'train'].")


def toy_source(name: str, split: str, num_train: int = 0) -> ArraySource:
  """The fixed training (``num_train`` points, 0: 100,000) or held-out (10,000 points) toy set.

  The two splits come from independent streams of a fixed data seed, so they are disjoint.
  """
  _check_split(split)
  if name not in TOY_DATASETS:
    raise ValueError(f"Unknown toy data set {name!r}; valid choices: {sorted(TOY_DATASETS)}.")
  if num_train < 0:
    raise ValueError(f"num_train must be non-negative (0: {_TOY_NUM_TRAIN}), got {num_train}.")
  n = (num_train or _TOY_NUM_TRAIN) if split == "train" else _TOY_NUM_TEST
  rng = np.random.default_rng([_TOY_DATA_SEED, 0 if split == "train" else 1])
  return ArraySource(*TOY_DATASETS[name](rng, n))


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
  # Imported here: scikit-learn takes seconds to import and only the digits need it.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int32)


def _digits_split(split: str, n: int) -> np.ndarray:
  """The indices of ``split`` among the n digits: a fixed permutation (seed 0), test first."""
  _check_split(split)
  order = np.random.default_rng(0).permutation(n)
  return order[:_DIGITS_NUM_TEST] if split == "test" else order[_DIGITS_NUM_TEST:]


def digits_source(split: str) -> ArraySource:
  """scikit-learn's 8x8 handwritten digits as uint8 (N, 8, 8, 1) in 0..255, classes 0..9.

  A fixed permutation (seed 0) puts 297 of the 1797 digits in ``"test"``, the rest in ``"train"``.
  """
  images, labels = _digits()
  index = _digits_split(split, len(images))
  return ArraySource(images[index], labels[index])


# The ink colours of ``digits_rgb`` (uint8 RGB): red, green, blue, yellow, magenta, cyan.
DIGITS_PALETTE = np.array([[230, 40, 40], [40, 190, 60], [50, 90, 240], [240, 200, 30], [200, 50, 210],
                           [30, 200, 210]], np.uint8)
_DIGITS_PALETTE_SEED = 1  # digit i of the 1797 gets colour integers(len(palette), size=1797)[i]


@functools.cache
def _digits_rgb() -> tuple[np.ndarray, np.ndarray]:
  images, labels = _digits()
  colours = np.random.default_rng(_DIGITS_PALETTE_SEED).integers(len(DIGITS_PALETTE), size=len(images))
  ink = DIGITS_PALETTE[colours].astype(np.float64)[:, None, None, :] / 255.0
  return np.round(images * ink).astype(np.uint8), labels


def digits_rgb_source(split: str) -> ArraySource:
  """The digits of ``digits_source`` in colour: uint8 (N, 8, 8, 3), classes 0..9, the same split.

  Digit i (of scikit-learn's 1797) has the ink colour c_i of ``DIGITS_PALETTE``, drawn once from a
  fixed seed, so an example keeps its colour whatever the split or the pipeline's seed: each
  pixel is round(v c_i / 255), v the grey digit's value in 0..255, on a black background.
  """
  images, labels = _digits_rgb()
  index = _digits_split(split, len(images))
  return ArraySource(images[index], labels[index])


def tfds_source(name: str, split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
  """A TFDS data set prepared as ArrayRecord, read with ``tfds.data_source`` (no TensorFlow).

  Raises:
    FileNotFoundError: when the set is not prepared in ``data_dir``, saying how to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only TFDS sets need it)
  data_dir = data_dir or None
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      raise
    root = data_dir or tfds.core.constants.DATA_DIR
    raise FileNotFoundError(
        f"The TFDS data set {name!r} (split {split!r}) is not prepared in data_dir={root!r}. "
        f"Prepare it once, outside training, in an environment with TensorFlow: "
        f"`pip install tensorflow tensorflow-datasets && tfds build {name} --data_dir={root} "
        f"--file_format=array_record`; then train with --config.data.data_dir={root} "
        f"(TensorFlow is not needed for training).") from e


def _tfds_split(name: str, test_split: str) -> Callable[[str, str | None], Sequence[dict[str, Any]]]:
  """A TFDS set whose held-out split is ``test_split``."""

  def make(split: str, data_dir: str | None) -> Sequence[dict[str, Any]]:
    _check_split(split)
    return tfds_source(name, test_split if split == "test" else split, data_dir)

  return make


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of a few bytes; used on TFRecord length headers only (8 bytes each)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


def _fields(buf: bytes) -> list[tuple[int, Any]]:
  """The (field number, value) pairs of a protobuf message: ints for varints, bytes when length-delimited."""
  pos, out = 0, []
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = buf[pos:pos + size], pos + size
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    out.append((number, value))
  return out


def parse_example(record: bytes) -> dict[str, list]:
  """A serialised ``tf.train.Example`` as {feature name: list of bytes or ints} (floats unsupported).

  The wire format is read directly (Example.features = 1; Features.feature = map<string, Feature>;
  Feature.bytes_list = 1, int64_list = 3), so no TensorFlow is needed.
  """
  features = {}
  for number, message in _fields(record):
    if number != 1:
      continue
    for entry_number, entry in _fields(message):
      if entry_number != 1:
        continue
      entry = dict(_fields(entry))
      name, values = entry.get(1, b"").decode(), []
      for kind, lst in _fields(entry.get(2, b"")):
        for item_number, item in _fields(lst):
          if item_number != 1:
            continue
          if kind == 1:
            values.append(item)
          elif kind == 3 and isinstance(item, bytes):  # packed int64s
            pos = 0
            while pos < len(item):
              v, pos = _varint(item, pos)
              values.append(v - (1 << 64) if v >= 1 << 63 else v)
          elif kind == 3:
            values.append(item)
      features[name] = values
  return features


class TFRecordSource:
  """Random access to StyleGAN ``dataset_tool`` TFRecords: Examples with ``shape`` (C, H, W) and raw ``data``.

  The files are indexed once (record offsets, from the length headers, whose checksums are
  verified) and records are read on demand, so a 13 GB FFHQ file costs no memory. Images come out
  as uint8 (H, W, C), label 0.

  Args:
    paths: the ``.tfrecords`` files, read in the given order.

  Raises:
    ValueError: for a damaged or truncated file (naming it and the offset).
  """

  def __init__(self, paths: Sequence[str | pathlib.Path]):
    self.paths = [pathlib.Path(p) for p in paths]
    self.held_out_note = ""
    self._index: list[tuple[int, int, int]] = []  # (file, data offset, data length)
    for f, path in enumerate(self.paths):
      size, offset = path.stat().st_size, 0
      with path.open("rb") as handle:
        while offset < size:
          handle.seek(offset)
          header = handle.read(12)
          if len(header) < 12 or int.from_bytes(header[8:], "little") != _masked_crc(header[:8]):
            raise ValueError(f"{path} is damaged or truncated at byte {offset} (bad TFRecord header); "
                             f"re-create it with the dataset tool.")
          length = int.from_bytes(header[:8], "little")
          if offset + 16 + length > size:
            raise ValueError(f"{path} is truncated: its record at byte {offset} needs {length} bytes.")
          self._index.append((f, offset + 12, length))
          offset += 16 + length

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> dict[str, Any]:
    f, offset, length = self._index[index]
    with self.paths[f].open("rb") as handle:
      handle.seek(offset)
      features = parse_example(handle.read(length))
    shape, data = features.get("shape"), features.get("data")
    if not shape or not data or len(data[0]) != math.prod(shape):
      raise ValueError(f"Record {index} of {self.paths[f]} is not a dataset-tool image (features 'shape' "
                       f"(C, H, W) and 'data' with C*H*W bytes); got features {sorted(features)}.")
    image = np.frombuffer(data[0], np.uint8).reshape(shape).transpose(1, 2, 0)
    return {"image": image, "label": 0}


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageFileSource:
  """Image files read one at a time, as uint8 (H, W, channels) at their own size (label 0).

  Any PIL mode is converted: palette, greyscale and RGBA images to RGB for ``channels = 3`` (alpha
  dropped), and everything to greyscale for ``channels = 1``.
  """

  def __init__(self, paths: Sequence[pathlib.Path], channels: int = 3):
    if channels not in (1, 3):
      raise ValueError(f"Image folders are read as RGB (3 channels) or greyscale (1), not {channels}; set "
                       f"config.data.num_channels to 3 or 1.")
    self.paths, self.channels = list(paths), channels
    self.held_out_note = ""

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    try:
      with PIL.Image.open(path) as image:
        if image.mode in ("P", "PA", "LA", "RGBA", "I;16", "I", "F"):
          image = image.convert("RGBA" if image.mode in ("P", "PA", "LA", "RGBA") else "L")
        array = np.asarray(image.convert("RGB" if self.channels == 3 else "L"))
    except (OSError, ValueError) as e:
      raise ValueError(f"{path} is not a readable image ({e}); remove it from the folder or replace it.") from e
    return {"image": array if array.ndim == 3 else array[..., None], "label": 0}


def _held_out_split(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) indices of n examples: a fixed permutation (seed 0), the first round(f n) held out."""
  order = np.random.default_rng(0).permutation(n)
  k = round(n * test_fraction)
  if not 0 < k < n:
    raise ValueError(f"config.data.test_fraction={test_fraction} holds out {k} of {n} images; choose a fraction "
                     f"that leaves at least one image on each side.")
  return np.sort(order[k:]), np.sort(order[:k])


def folder_source(split: str, data_dir: str | None, name: str = "this data set", *, channels: int = 3,
                  test_fraction: float = 0.0) -> Sequence[dict[str, Any]]:
  """Images from ``data_dir``: TFRecords of StyleGAN's dataset tool, or a folder of image files.

  ``data_dir`` may be a ``.tfrecords`` file, a folder of ``.tfrecords`` files (read in name order), or a
  folder of PNG / JPEG / BMP / WebP images of any sizes and modes (read recursively in path order,
  lazily). The held-out split is ``data_dir/test`` when ``data_dir/train`` and ``data_dir/test`` exist,
  else a fixed ``test_fraction`` of the images, else (fraction 0) the training images themselves; the
  source's ``held_out_note`` says which.

  Raises:
    FileNotFoundError: when ``data_dir`` is unset, missing or holds no images, saying what to put there.
  """
  _check_split(split)
  if not data_dir:
    raise FileNotFoundError(f"{name} is read from StyleGAN dataset-tool TFRecords or a folder of PNG / JPEG "
                            f"images: set --config.data.data_dir to the .tfrecords file or the folder.")
  root = pathlib.Path(data_dir)
  if not root.exists():
    raise FileNotFoundError(f"config.data.data_dir={data_dir} does not exist; point --config.data.data_dir at the "
                            f"folder of images (or the .tfrecords file) of {name}.")
  split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
  if split_dirs:
    root = root / split
  if root.is_file() and root.suffix == ".tfrecords":
    records = [root]
  else:
    records = sorted(root.glob("*.tfrecords")) if root.is_dir() else []
  if records:
    source = TFRecordSource(records)
  else:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not paths:
      raise FileNotFoundError(f"No .tfrecords or image files ({', '.join(_IMAGE_SUFFIXES)}) under {root} for "
                              f"{name}; put them there or point --config.data.data_dir at the file or folder "
                              f"that holds them.")
    source = ImageFileSource(paths, channels)
  if split_dirs:
    source.held_out_note = f"the images of {pathlib.Path(data_dir) / 'test'}"
  elif test_fraction:
    if not isinstance(source, ImageFileSource):
      raise ValueError(f"config.data.test_fraction holds out part of a folder of image files, not of TFRecords "
                       f"({root}); set it to 0, or put the held-out images in {root}/test and the rest in "
                       f"{root}/train.")
    train_ids, test_ids = _held_out_split(len(source.paths), test_fraction)
    source = ImageFileSource([source.paths[i] for i in (train_ids if split == "train" else test_ids)], channels)
    source.held_out_note = f"a fixed {test_fraction:g} of the images of {root}, not used for training"
  else:
    source.held_out_note = (f"the training images themselves: {pathlib.Path(data_dir)} has no test/ folder and "
                            f"config.data.test_fraction is 0")
  return source


# --- Preparation: uint8 (H, W, C) -> uint8 (image_size, image_size, C) -----------------------
# PIL on uint8 (see the module docstring). PIL's bilinear and bicubic filters widen with the scale
# when shrinking, i.e. they are antialiased like the original's ``tf.image.resize(..., antialias=True)``.

_CELEBA_CROP = 140


def _resize(image: np.ndarray, height: int, width: int,
            resample: PIL.Image.Resampling = PIL.Image.Resampling.BILINEAR) -> np.ndarray:
  """A uint8 (H, W, C) image resized to (height, width, C) channel by channel; as is if already that size."""
  if image.shape[:2] == (height, width):
    return image
  channels = [PIL.Image.fromarray(image[..., c]).resize((width, height), resample)
              for c in range(image.shape[-1])]
  return np.stack([np.asarray(c) for c in channels], -1)


def _resize_small(image: np.ndarray, size: int) -> np.ndarray:
  """The original's ``resize_small``: bilinear, the shorter side to ``size``.

  Args:
    image: uint8 (H, W, C).
    size: the new shorter side.

  Returns:
    uint8 (round(H r), round(W r), C) with r = size / min(H, W) (round half to even, as ``tf.round``).
  """
  h, w = image.shape[:2]
  ratio = size / min(h, w)
  return _resize(image, round(h * ratio), round(w * ratio))


def _central_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central (size, size, C) square of a (H, W, C) image: top (H - size) // 2, left (W - size) // 2."""
  h, w = image.shape[:2]
  if not 0 < size <= min(h, w):
    raise ValueError(f"Cannot crop {size} x {size} pixels from an image of {h} x {w} pixels.")
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def prepare_resize(image: np.ndarray, image_size: int) -> np.ndarray:
  """CIFAR-10, SVHN, FFHQ, CelebA-HQ, folders, digits: bilinear resize to (image_size, image_size).

  Args:
    image: uint8 (H, W, C).
    image_size: the side of the square output.

  Returns:
    uint8 (image_size, image_size, C); ``image`` itself when it is already that size.
  """
  return _resize(image, image_size, image_size)


def prepare_crop_resize(image: np.ndarray, image_size: int) -> np.ndarray:
  """Image folders: the central square of side min(H, W), then a bilinear resize to (image_size, image_size).

  Args:
    image: uint8 (H, W, C) of any size.
    image_size: the side of the square output.

  Returns:
    uint8 (image_size, image_size, C).
  """
  return _resize(_central_crop(image, min(image.shape[:2])), image_size, image_size)


def prepare_celeba(image: np.ndarray, image_size: int) -> np.ndarray:
  """CelebA: the central 140 x 140 square, then ``resize_small`` (bilinear) to image_size.

  Args:
    image: uint8 (H, W, C) with H, W >= 140 (CelebA's aligned faces are 218 x 178).
    image_size: the side of the square output.

  Returns:
    uint8 (image_size, image_size, C).
  """
  return _resize_small(_central_crop(image, _CELEBA_CROP), image_size)


def prepare_lsun(image: np.ndarray, image_size: int) -> np.ndarray:
  """LSUN: at 128, resize_small then central crop; at other sizes, central square crop then bicubic.

  At image_size 128, ``resize_small`` (bilinear) to 128, then the central 128 x 128. At any other
  size, the central square of side min(H, W), then a bicubic resize (antialiased when shrinking) to
  (image_size, image_size).

  Args:
    image: uint8 (H, W, C).
    image_size: the side of the square output.

  Returns:
    uint8 (image_size, image_size, C); ``image`` itself when it is already that size.
  """
  if image_size == 128:
    return _central_crop(_resize_small(image, 128), 128)
  square = _central_crop(image, min(image.shape[:2]))
  return _resize(square, image_size, image_size, PIL.Image.Resampling.BICUBIC)


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """An image data set: where its examples come from and how each image is brought to ``image_size``.

  Attributes:
    source: (split, data_dir) -> random-access examples {"image": uint8 (H, W, C), "label": int}
      (a missing label reads as 0).
    prepare: (uint8 (H, W, C), image_size) -> uint8 (image_size, image_size, C).
  """

  source: Callable[..., Sequence[dict[str, Any]]]
  prepare: Callable[[np.ndarray, int], np.ndarray] = prepare_resize
  folder: bool = False  # the source also takes ``channels`` and ``test_fraction`` (``folder_source``)


# Image sets by name (lower case). Held-out splits and preparation follow the original: CIFAR-10 and
# SVHN resized (bilinear); CelebA's validation split, central crop 140 then resize_small; LSUN's
# validation split, resize_small then central crop at 128, else central square crop then bicubic
# resize; FFHQ and CelebA-HQ from dataset-tool TFRecords (or image folders), resized only when their
# size differs from image_size; "image_folder" for any folder of images (``data.data_dir``).
IMAGE_DATASETS: dict[str, ImageSet] = {
    "digits": ImageSet(lambda split, data_dir: digits_source(split)),
    "digits_rgb": ImageSet(lambda split, data_dir: digits_rgb_source(split)),
    "cifar10": ImageSet(functools.partial(tfds_source, "cifar10")),
    "svhn": ImageSet(functools.partial(tfds_source, "svhn_cropped")),
    "celeba": ImageSet(_tfds_split("celeb_a", "validation"), prepare_celeba),
    "lsun/bedroom": ImageSet(_tfds_split("lsun/bedroom", "validation"), prepare_lsun),
    "lsun/church_outdoor": ImageSet(_tfds_split("lsun/church_outdoor", "validation"), prepare_lsun),
    "ffhq": ImageSet(functools.partial(folder_source, name="FFHQ"), folder=True),
    "celebahq": ImageSet(functools.partial(folder_source, name="CelebA-HQ"), folder=True),
    "image_folder": ImageSet(functools.partial(folder_source, name="data.dataset='image_folder'"),
                             prepare_crop_resize, folder=True),
}


# --- Pipeline ---------------------------------------------------------------------------------

def _read(source: Sequence[dict[str, Any]], ids: np.ndarray, image_size: int | None,
          prepare: Callable[[np.ndarray, int], np.ndarray]) -> tuple[Sequence[np.ndarray], np.ndarray]:
  """Examples ``ids`` (M,) of ``source``: M uint8 images (brought to image_size) or data (M, ...) float32, and
  labels (M,) int32.

  uint8 images not already (image_size, image_size) go through ``prepare``; those that are, pass
  untouched (an ``ArraySource`` at the size is indexed without a per-image step).
  """
  if isinstance(source, ArraySource):
    images, labels = source.images[ids], source.labels[ids]
  else:
    examples = [source[int(i)] for i in ids]
    images = [np.asarray(example["image"]) for example in examples]
    labels = np.array([example.get("label", 0) for example in examples])
  if images[0].dtype != np.uint8:
    return np.asarray(images, np.float32), labels.astype(np.int32)
  size = (image_size, image_size)
  if image_size is not None and not (isinstance(images, np.ndarray) and images.shape[1:3] == size):
    prepared = [image if image.shape[:2] == size else prepare(image, image_size) for image in images]
    for image, out in zip(images, prepared):
      if out.shape[:2] != size or out.dtype != np.uint8:
        raise ValueError(f"The preparation rule {getattr(prepare, '__name__', prepare)!r} made a {out.dtype} "
                         f"{out.shape} image of a {image.shape} one; a rule must return uint8 "
                         f"({image_size}, {image_size}, C).")
    images = prepared
  return images, labels.astype(np.int32)


def _to_unit(out: np.ndarray, image: np.ndarray, rng: np.random.Generator, random_flip: bool,
             dequantize: bool) -> None:
  """Writes the uint8 ``image`` into float32 ``out`` as image / 255, or dequantised, (image + U[0, 1)) / 256,
  flipped horizontally with probability 1/2 when ``random_flip`` (one pass over the pixels)."""
  if rng.random() < 0.5 and random_flip:  # the coin is always drawn: flips do not depend
    image = image[:, ::-1]                                         # on dequantize
  if dequantize:
    np.add(image, rng.random(image.shape, dtype=np.float32), out=out)
    out /= np.float32(256.0)
  else:
    np.divide(image, np.float32(255.0), out=out)


try:  # grain's array in shared memory: a worker's batch built in it reaches the training process uncopied
  from grain._src.python.ipc import shared_memory_array as _shm  # pylint: disable=g-import-not-at-top
  _SharedMemoryArray = _shm.SharedMemoryArray
except (ImportError, AttributeError):  # another grain version: grain copies the batch into shared memory itself
  _SharedMemoryArray = None


NUM_THREADS = 4  # grain's reading threads in the training process when it reads without worker processes


def _read_options(num_threads: int = NUM_THREADS) -> grain.ReadOptions:
  """grain's in-process reading: ``num_threads`` threads, 8 elements prefetched."""
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8)


def _new_batch(shape: tuple[int, ...], shared: bool) -> np.ndarray:
  """An uninitialised float32 array of ``shape``, in shared memory when ``shared`` (worker processes)."""
  return _SharedMemoryArray(shape, np.float32) if shared else np.empty(shape, np.float32)


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the ``n`` examples in ``epoch`` of a training stream."""
  return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True)
class _Batches:
  """Element k of a pipeline: ``n_jitted_steps`` batches of ``per_host`` examples, read and augmented.
  Training: host h's batch i holds the global stream positions i B + h B / P + j (j < B / P), where
  position p is example perm_e[p mod N] of epoch e = p div N. Evaluation: host h's batch i holds its
  shard's positions i b + j, i.e. examples h + P (i b + j), padding past the end of the split.
  """

  source: Sequence[dict[str, Any]]
  element_shape: tuple[int, ...]
  training: bool
  per_host: int
  n_jitted_steps: int
  process_index: int
  process_count: int
  image_size: int | None
  prepare: Callable[[np.ndarray, int], np.ndarray]
  random_flip: bool
  dequantize: bool
  shuffle_seed: int
  augment_seed: int
  shared_memory: bool = False  # build batches in shared memory (set for worker processes)

  def __call__(self, k: int) -> Batch:
    n, h, p = len(self.source), self.process_index, self.process_count
    step = k * self.n_jitted_steps + np.arange(self.n_jitted_steps)[:, None]
    j = np.arange(self.per_host)[None, :]
    if self.training:
      epoch, offset = np.divmod((step * p + h) * self.per_host + j, n)
      ids = np.empty_like(offset)
      for e in np.unique(epoch):
        ids[epoch == e] = _permutation(self.shuffle_seed, int(e), n)[offset[epoch == e]]
      mask = np.ones(ids.shape, bool)
    else:
      epoch, ids = np.zeros_like(j + step), h + p * (step * self.per_host + j)
      mask = ids < n
    data = _new_batch(ids.shape + self.element_shape, self.shared_memory and _SharedMemoryArray is not None)
    if not mask.all():
      data[~mask] = 0.0
    label = np.zeros(ids.shape, np.int32)
    if mask.any():
      images, label[mask] = _read(self.source, ids[mask], self.image_size, self.prepare)
      if images[0].dtype != np.uint8:
        data[mask] = images
      elif not (self.random_flip or self.dequantize):
        data[mask] = np.divide(images, np.float32(255.0), dtype=np.float32)
      else:  # each image scaled and augmented straight into its row of the batch
        rows = data.reshape(-1, *self.element_shape)
        for i, (row, example, e) in enumerate(zip(np.flatnonzero(mask), ids[mask], epoch[mask])):
          # Keyed by (example, epoch): the same draw whatever the batch size or number of hosts.
          key = (self.augment_seed << 96) + (int(example) << 32) + int(e)
          _to_unit(rows[row], images[i], np.random.Generator(np.random.PCG64(key)), self.random_flip, self.dequantize)
    if self.n_jitted_steps == 1:
      data, label, mask = data[0], label[0], mask[0]
    return {"image": data, "label": label, "mask": mask}


def _per_host(batch_size: int, process_count: int, what: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    lower = max(process_count, batch_size // process_count * process_count)
    raise ValueError(f"{what}={batch_size} is not divisible by the number of processes ({process_count}); "
                     f"each host reads {what} / processes examples. Use a multiple of {process_count}, "
                     f"e.g. {lower} or {lower + process_count}.")
  return batch_size // process_count


class Stream:
  """An iterator over a pipeline's elements that knows its position: ``next_index``, the next element's index."""

  def __init__(self, dataset: grain.IterDataset, next_index: int):
    self._iterator, self.next_index = iter(dataset), next_index

  def __iter__(self) -> Stream:
    return self

  def __next__(self) -> Batch:
    element = next(self._iterator)
    self.next_index += 1
    return element

  def close(self) -> None:
    """Stops the worker processes and threads reading ahead."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """One split's batches for this host, with what the training loop needs to know about them.

  Element k is ``batches(k)``, a pure function of k, so a stream resumes by starting at its index
  (``dataset_from``), whatever reads it: ``read_options.num_threads`` threads in this process, or
  ``num_workers`` grain worker processes.

  Attributes:
    batches: element index -> batch (picklable: worker processes receive it).
    name: the split, e.g. ``"cifar10/train"``.
    num_examples: examples in the split (all hosts).
    training: an infinite shuffled stream, or one ordered, padded pass.
    batch_size: the global batch; per_host_batch_size = batch_size / process_count.
    per_host_batch_size: rows this host contributes to each batch.
    n_jitted_steps: batches stacked on a leading axis per element (1: no extra axis).
    num_batches: elements one pass yields on every host (None when training).
    element_shape: one example's data, (H, W, C) or (2,).
    eight_bit: 8-bit images, where dequantisation and bits/dim apply.
    density: the exact density of a toy set that has one, else None.
    seed: the pipeline seed.
    process_count: hosts sharing the split.
    read_options: grain's threads and prefetch buffer (in elements) in this process, without workers.
    num_workers: grain worker processes reading elements, one at a time each (0: none, the threads of
      ``read_options`` run in this process).
    source_note: where the split's examples come from, for reports (e.g. a held-out fraction).
  """

  batches: Callable[[int], Batch]
  name: str
  num_examples: int
  training: bool
  batch_size: int
  per_host_batch_size: int
  n_jitted_steps: int
  num_batches: int | None
  element_shape: tuple[int, ...]
  eight_bit: bool
  density: analytic.GaussianMixture | None
  seed: int
  process_count: int
  read_options: grain.ReadOptions
  num_workers: int = 0
  source_note: str = ""

  def _fingerprint(self) -> dict[str, Any]:
    fingerprint = {"name": self.name, "num_examples": self.num_examples, "seed": self.seed,
                   "training": self.training}
    if not self.training:  # positions in a padded pass depend on the sharding
      fingerprint.update(batch_size=self.batch_size, n_jitted_steps=self.n_jitted_steps,
                         process_count=self.process_count)
    return fingerprint

  def dataset_from(self, index: int = 0) -> grain.IterDataset:
    """The grain dataset of elements index, index + 1, ... (to ``num_batches`` when not training)."""
    stop = sys.maxsize if self.num_batches is None else max(index, self.num_batches)
    elements = grain.MapDataset.range(index, stop)
    if not self.num_workers:
      return elements.map(self.batches).to_iter_dataset(self.read_options)
    # Each worker builds one batch at a time, in shared memory (threads would contend for its Python lock).
    batches = self.batches
    if isinstance(batches, _Batches):
      batches = dataclasses.replace(batches, shared_memory=True)
    dataset = elements.map(batches).to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (their defaults do here)
      flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=2))

  @property
  def dataset(self) -> grain.IterDataset:
    return self.dataset_from(0)

  def __iter__(self) -> Stream:
    return self.make_iterator()

  def make_iterator(self, state: dict[str, Any] | None = None) -> Stream:
    """A fresh iterator, or one that resumes from ``iterator_state``'s output."""
    index = 0
    if state is not None:
      if state.get("pipeline") != self._fingerprint():
        raise ValueError(f"The saved data-iterator state is for {state.get('pipeline')}, but this pipeline "
                         f"is {self._fingerprint()}; resume with the same data set, seed and split, or start "
                         f"the data stream afresh by not restoring its state.")
      position = int(state["position"])
      per_element = self.n_jitted_steps * self.batch_size if self.training else 1
      if position % per_element:
        raise ValueError(f"The saved state is {position} examples into the stream, not a multiple of "
                         f"n_jitted_steps * batch_size = {per_element}; resume with a batch size and "
                         f"n_jitted_steps whose product divides {position}.")
      index = position // per_element
    return Stream(self.dataset_from(index), index)

  def iterator_state(self, iterator: Stream) -> dict[str, Any]:
    """A JSON-serialisable snapshot of ``iterator``'s position (save it with the checkpoint).

    Training streams store the global number of examples consumed, so the state restores on any
    number of hosts and with any batch size and ``n_jitted_steps`` whose product divides it.
    """
    per_element = self.n_jitted_steps * self.batch_size if self.training else 1
    return {"position": iterator.next_index * per_element, "pipeline": self._fingerprint()}


def build_pipeline(source: Sequence[dict[str, Any]], *, name: str, batch_size: int, training: bool,
                   seed: int, image_size: int | None = None,
                   prepare: Callable[[np.ndarray, int], np.ndarray] = prepare_resize,
                   random_flip: bool = False, uniform_dequantization: bool = False, n_jitted_steps: int = 1,
                   process_index: int | None = None, process_count: int | None = None,
                   density: analytic.GaussianMixture | None = None,
                   read_options: grain.ReadOptions | None = None, num_workers: int = 0) -> Pipeline:
  """Batches of ``source`` for this host (see the module docstring for the two regimes).

  Args:
    source: random-access examples {"image": uint8 (H, W, C) or float (D,), "label": int}.
    name: names the split in saved iterator states and salts the seed, e.g. "cifar10/train".
    batch_size: the global batch, over all hosts.
    training: an infinite shuffled stream, else one ordered pass padded with ``mask=False``.
    seed: orders and augments the examples (with ``name``).
    image_size: bring uint8 images to (image_size, image_size) with ``prepare``; None keeps their size.
    prepare: (uint8 (H, W, C), image_size) -> uint8 (image_size, image_size, C), applied to images not
      already that size, e.g. ``IMAGE_DATASETS[name].prepare`` (default ``prepare_resize``: bilinear).
    random_flip: flip images horizontally with probability 1/2.
    uniform_dequantization: (x 255 + U[0, 1)) / 256 on 8-bit images.
    n_jitted_steps: stack this many batches per element on a leading axis (when > 1).
    process_index: this host (default ``jax.process_index()``).
    process_count: hosts (default ``jax.process_count()``).
    density: the exact density of the data, if known, recorded on the pipeline.
    read_options: grain's threads and prefetch buffer (in elements) in this process, without workers; default
      4 threads, 8 elements.
    num_workers: grain worker processes that read and prepare elements, one at a time each, and hand them
      over in shared memory (0: the threads of ``read_options`` run in this process).

  Returns:
    A ``Pipeline`` whose elements are ``{"image", "label", "mask"}`` batches of numpy arrays.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}.")
  if n_jitted_steps < 1:
    raise ValueError(f"n_jitted_steps must be a positive integer, got {n_jitted_steps}.")
  per_host = _per_host(batch_size, process_count, "batch_size")
  if len(source) == 0:
    raise ValueError(f"The source of {name} has no examples.")
  eight_bit = np.asarray(source[0]["image"]).dtype == np.uint8
  if (random_flip or uniform_dequantization) and not eight_bit:
    raise ValueError(f"{name} is not a set of 8-bit images, so random_flip and uniform_dequantization do "
                     f"not apply; set config.data.random_flip=False and "
                     f"config.data.uniform_dequantization=False.")
  shuffle_seed, augment_seed = (int(s) for s in
                                np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(2))
  element_shape = tuple(np.shape(_read(source, np.zeros(1, int), image_size, prepare)[0][0]))
  batches = _Batches(
      source=source, element_shape=element_shape, training=training, per_host=per_host,
      n_jitted_steps=n_jitted_steps, process_index=process_index, process_count=process_count,
      image_size=image_size, prepare=prepare, random_flip=random_flip, dequantize=uniform_dequantization,
      shuffle_seed=shuffle_seed, augment_seed=augment_seed)
  num_batches = None
  if not training:  # every host yields the same number of elements, padding its shard
    num_batches = math.ceil(math.ceil(len(source) / process_count) / (per_host * n_jitted_steps))
  if num_workers < 0:
    raise ValueError(f"num_workers must be a non-negative integer, got {num_workers}.")
  return Pipeline(
      batches=batches, name=name, num_examples=len(source), training=training, batch_size=batch_size,
      per_host_batch_size=per_host, n_jitted_steps=n_jitted_steps, num_batches=num_batches,
      element_shape=element_shape, eight_bit=eight_bit, density=density, seed=seed, process_count=process_count,
      read_options=read_options or _read_options(), num_workers=num_workers)


# --- From a config ----------------------------------------------------------------------------

def get_dataset(config: ml_collections.ConfigDict, *, evaluation: bool = False,
                uniform_dequantization: bool | None = None, seed: int | None = None,
                process_index: int | None = None, process_count: int | None = None
                ) -> tuple[Pipeline, Pipeline]:
  """The training and held-out pipelines of ``config.data.dataset``.

  With ``evaluation=False`` both are training streams (infinite, shuffled) of
  ``config.training.batch_size`` stacked ``config.training.n_jitted_steps`` deep: the train split
  with ``config.data.random_flip``, and the test split unflipped for the periodic eval loss. With
  ``evaluation=True`` both splits are one ordered, padded pass of ``config.eval.batch_size``
  (no flip, no stacking) for the full-data loss and bits/dim. ``image_size`` and ``num_channels``
  apply to image sets; toy sets need ``random_flip`` and ``uniform_dequantization`` off.

  Args:
    config: reads ``data.{dataset, image_size, num_channels, random_flip, uniform_dequantization,
      data_dir, num_train, num_workers, num_threads}``, ``training.{batch_size, n_jitted_steps}``,
      ``eval.batch_size``, ``seed``.
    evaluation: the evaluation regime above.
    uniform_dequantization: overrides ``config.data.uniform_dequantization`` (bits/dim needs True).
    seed: overrides ``config.seed`` (e.g. a fresh dequantisation per bits/dim round).
    process_index: this host (default ``jax.process_index()``).
    process_count: hosts (default ``jax.process_count()``).

  Returns:
    (train, eval) pipelines.
  """
  data = config.data
  name = data.dataset.lower()
  seed = config.seed if seed is None else seed
  dequantize = data.uniform_dequantization if uniform_dequantization is None else uniform_dequantization
  process_count = jax.process_count() if process_count is None else process_count
  if evaluation:
    batch_size, n_jitted = config.eval.batch_size, 1
    _per_host(batch_size, process_count, "config.eval.batch_size")
  else:
    batch_size, n_jitted = config.training.batch_size, config.training.n_jitted_steps
    _per_host(batch_size, process_count, "config.training.batch_size")

  if name in TOY_DATASETS:
    sources = {split: toy_source(name, split, data.num_train) for split in ("train", "test")}
    image_size, prepare = None, prepare_resize
    density = toy_density(name) if name in _TOY_DENSITIES else None
  elif name in IMAGE_DATASETS:
    image_set = IMAGE_DATASETS[name]
    options = {"channels": data.num_channels, "test_fraction": data.test_fraction} if image_set.folder else {}
    sources = {split: image_set.source(split, data.data_dir, **options) for split in ("train", "test")}
    image_size, prepare, density = data.image_size, image_set.prepare, None
    channels = np.asarray(sources["train"][0]["image"]).shape[-1]
    if channels != data.num_channels:
      raise ValueError(f"{data.dataset} images have {channels} channel(s); set "
                       f"config.data.num_channels={channels}.")
  else:
    raise ValueError(f"Unknown data set {data.dataset!r}; valid choices (case-insensitive): "
                     f"{sorted(TOY_DATASETS) + sorted(IMAGE_DATASETS)}. Set config.data.dataset.")

  read_options = _read_options(data.get("num_threads", NUM_THREADS))
  build = functools.partial(
      build_pipeline, batch_size=batch_size, training=not evaluation, seed=seed, image_size=image_size,
      prepare=prepare, uniform_dequantization=dequantize, n_jitted_steps=n_jitted,
      process_index=process_index, process_count=process_count, density=density, read_options=read_options)
  workers = data.get("num_workers", 0)
  train = build(sources["train"], name=f"{name}/train", random_flip=data.random_flip and not evaluation,
                num_workers=workers)
  note = getattr(sources["test"], "held_out_note", "")
  # While training, the held-out stream gives one batch per eval: threads keep up without worker processes.
  held_out = build(sources["test"], name=f"{name}/test", num_workers=workers if evaluation else 0)
  held_out = dataclasses.replace(held_out, source_note=note)
  if note and process_index in (None, 0) and jax.process_index() == 0:
    logging.info("data: %s, %d training and %d held-out examples; held out: %s.", data.dataset, len(sources["train"]),
                 len(sources["test"]), note)
  return train, held_out
