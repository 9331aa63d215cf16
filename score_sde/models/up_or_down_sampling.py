"""FIR up- and down-sampling of NHWC images (StyleGAN2's ``upfirdn``), in pure JAX.

NCSN++ resamples with a finite-impulse-response filter instead of nearest-neighbour copies or
average pooling (Karras et al. 2020, as used by Song et al. 2021). Everything here is built on one
primitive, ``upfirdn_2d``, which for each channel of each image

    1. upsamples by inserting ``up - 1`` zeros after every pixel (rows and columns),
    2. pads ``pad0`` zeros before and ``pad1`` after (a negative pad crops),
    3. convolves with the 2-D FIR kernel (a true convolution: the kernel is flipped),
    4. keeps every ``down``-th pixel.

A separable kernel (every kernel ``setup_kernel`` makes from a 1-D one) runs as two 1-D passes of
shifted, weighted copies of the image, one per axis; when only upsampling, each pass filters the
``up`` output phases separately instead of filtering inserted zeros (polyphase). That is elementwise
work XLA fuses, 10-40x faster forward+backward on a CPU than the depthwise convolution used for
other kernels: there steps 1-2 are one ``lax.pad`` (interior padding) and steps 3-4 one depthwise
strided convolution. Either way every function is differentiable to any order, jittable and free
of host work.

A 1-D kernel k is made separable (outer(k, k)) and normalised to sum 1 (``setup_kernel``), then
multiplied by ``gain * factor**2`` when upsampling (so constant images keep their value) or by
``gain`` when downsampling. The default [1, 3, 3, 1] is the binomial filter NCSN++ uses.

Shapes: images are (B, H, W, C); conv weights are HWIO (k, k, C_in, C_out).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

DEFAULT_KERNEL = (1, 3, 3, 1)
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
  """A 2-D float32 FIR kernel of sum 1: outer(k, k) for a 1-D ``k``, ``k`` itself if 2-D and square."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"An FIR kernel must be 1-D or a square 2-D array, got shape {k.shape}; "
                     f"pass e.g. fir_kernel=(1, 3, 3, 1).")
  if np.sum(k) == 0:
    raise ValueError("An FIR kernel must not sum to zero (it is normalised to sum 1).")
  return k / np.sum(k)


def upfirdn_2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Array:
  """Upsample, pad, FIR-filter and downsample every channel of NHWC images (same on both axes).

  Args:
    x: (B, H, W, C) images.
    k: (K, K) FIR kernel, used as given (no normalisation).
    up: upsampling factor (zeros inserted after each pixel).
    down: downsampling factor (every ``down``-th output pixel is kept).
    pad: zeros (pad0, pad1) added before / after each spatial axis after upsampling; negative crops.

  Returns:
    (B, H', W', C) with H' = (H * up + pad0 + pad1 - K) // down + 1, and W' likewise.
  """
  k = np.asarray(k, dtype=np.float32)
  size = k.shape[0]
  pad0, pad1 = pad
  out_h = (x.shape[1] * up + pad0 + pad1 - size) // down + 1
  out_w = (x.shape[2] * up + pad0 + pad1 - size) // down + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f"upfirdn_2d of a {x.shape[1]}x{x.shape[2]} image with a {size}x{size} kernel, "
                     f"up={up}, down={down}, pad={pad} leaves no pixels; use a larger image or less cropping.")
  factors = _separable(k)
  if factors is not None:  # two 1-D passes of shifted, weighted copies: elementwise work XLA fuses
    for axis, taps in zip((1, 2), factors):
      x = _upfirdn_1d(x, taps, up, down, pad, axis)
    return x
  # Zero insertion is interior padding; the up - 1 zeros after the last pixel join pad1.
  spatial = (pad0, pad1 + up - 1, up - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), spatial, spatial, (0, 0, 0)))
  # A true convolution is a cross-correlation with the flipped kernel; one filter per channel.
  channels = x.shape[-1]
  w = jnp.asarray(np.tile(k[::-1, ::-1, None, None], (1, 1, 1, channels)), x.dtype)
  return lax.conv_general_dilated(x, w, window_strides=(down, down), padding="VALID",
                                  dimension_numbers=_DIMENSIONS, feature_group_count=channels)


def _separable(k: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """(column, row) with k = outer(column, row) to float32 precision, or None if k is not separable."""
  total = float(np.sum(k, dtype=np.float64))
  if total == 0:
    return None
  column, row = np.sum(k, axis=1, dtype=np.float64), np.sum(k, axis=0, dtype=np.float64) / total
  if not np.allclose(np.outer(column, row), k, rtol=1e-6, atol=1e-7 * float(np.max(np.abs(k)))):
    return None
  return column, row


def _upfirdn_1d(x: Array, taps: np.ndarray, up: int, down: int, pad: tuple[int, int], axis: int) -> Array:
  """``upfirdn_2d``'s steps along one axis with the 1-D kernel ``taps``: sum_t taps[K-1-t] x'[i * down + t]."""
  if up > 1 and down == 1:
    return _upsample_1d(x, taps, up, pad, axis)
  pad0, pad1 = pad
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (pad0, pad1 + up - 1, up - 1)
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  size = len(taps)
  n_out = (x.shape[axis] - size) // down + 1
  flipped = taps[::-1]
  terms = [lax.slice_in_dim(x, t, t + (n_out - 1) * down + 1, down, axis) * jnp.asarray(flipped[t], x.dtype)
           for t in range(size) if flipped[t] != 0]
  return functools.reduce(jnp.add, terms)


def _upsample_1d(x: Array, taps: np.ndarray, up: int, pad: tuple[int, int], axis: int) -> Array:
  """``_upfirdn_1d`` for down = 1 without the inserted zeros (polyphase).

  Output i = up * m + p only meets the taps t with p + t - pad0 divisible by up, at input pixel
  (p + t - pad0) / up + m; each phase p is a short filter of the input, and the phases interleave.
  """
  pad0, pad1 = pad
  n, size, flipped = x.shape[axis], len(taps), taps[::-1]
  n_out = n * up + pad0 + pad1 - size + 1
  per_phase = -(-n_out // up)
  plan = [[((p + t - pad0) // up, flipped[t]) for t in range(size) if (p + t - pad0) % up == 0 and flipped[t] != 0]
          for p in range(up)]
  starts = [q for phase in plan for q, _ in phase] or [0]
  before, after = max(0, -min(starts)), max(0, max(starts) + per_phase - n)
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (before, after, 0)
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  shape = list(x.shape)
  shape[axis] = per_phase
  phases = [functools.reduce(jnp.add, [lax.slice_in_dim(x, q + before, q + before + per_phase, axis=axis)
                                       * jnp.asarray(weight, x.dtype) for q, weight in phase])
            if phase else jnp.zeros(shape, x.dtype) for phase in plan]
  y = jnp.stack(phases, axis=axis + 1)
  y = y.reshape(y.shape[:axis] + (per_phase * up,) + y.shape[axis + 2:])
  return lax.slice_in_dim(y, 0, n_out, axis=axis)


def upsample_2d(x: Array, k: Sequence[float] | None = DEFAULT_KERNEL, factor: int = 2,
                gain: float = 1.0) -> Array:
  """Upsamples (B, H, W, C) -> (B, H * factor, W * factor, C) with the FIR filter ``k``.

  ``k=None`` means [1] * factor, i.e. nearest-neighbour upsampling.
  """
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor**2)
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Sequence[float] | None = DEFAULT_KERNEL, factor: int = 2,
                  gain: float = 1.0) -> Array:
  """Downsamples (B, H, W, C) -> (B, H // factor, W // factor, C) with the FIR filter ``k``.

  ``k=None`` means [1] * factor, i.e. average pooling.
  """
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, k: Sequence[float] | None = DEFAULT_KERNEL, factor: int = 2,
                     gain: float = 1.0) -> Array:
  """FIR upsampling fused with a convolution: (B, H, W, C_in) -> (B, H * factor, W * factor, C_out).

  A stride-``factor`` transposed convolution with ``w`` (HWIO, square and odd), then the FIR filter,
  with all padding applied once, as StyleGAN2's fused op.
  """
  size = w.shape[0]
  if w.ndim != 4 or w.shape[1] != size:
    raise ValueError(f"upsample_conv_2d needs a square HWIO weight, got shape {w.shape}.")
  k = setup_kernel([1] * factor if k is None else k) * (gain * factor**2)
  p = (k.shape[0] - factor) - (size - 1)
  # Transposed convolution: every input pixel stamps w, i.e. a cross-correlation of the zero-dilated,
  # (size - 1)-padded input with w; the output is (H - 1) * factor + size pixels high.
  x = lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1, 1), padding=[(size - 1, size - 1)] * 2,
                               lhs_dilation=(factor, factor), dimension_numbers=_DIMENSIONS)
  return upfirdn_2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, k: Sequence[float] | None = DEFAULT_KERNEL, factor: int = 2,
                       gain: float = 1.0) -> Array:
  """A convolution fused with FIR downsampling: (B, H, W, C_in) -> (B, H // factor, W // factor, C_out).

  The FIR filter (padded once for both operations), then a stride-``factor`` VALID convolution with
  ``w`` (HWIO, square).
  """
  size = w.shape[0]
  if w.ndim != 4 or w.shape[1] != size:
    raise ValueError(f"conv_downsample_2d needs a square HWIO weight, got shape {w.shape}.")
  k = setup_kernel([1] * factor if k is None else k) * gain
  p = (k.shape[0] - factor) + (size - 1)
  x = upfirdn_2d(x, k, pad=((p + 1) // 2, p // 2))
  return lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(factor, factor), padding="VALID",
                                  dimension_numbers=_DIMENSIONS)


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
  """Nearest-neighbour upsampling: (B, H, W, C) -> (B, H * factor, W * factor, C)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
  """Average pooling over factor x factor blocks: (B, H, W, C) -> (B, H // factor, W // factor, C)."""
  b, height, width, channels = x.shape
  x = x.reshape(b, height // factor, factor, width // factor, factor, channels)
  return jnp.mean(x, axis=(2, 4))


class Conv2d(nn.Module):
  """Square convolution with optional fused FIR up- or down-sampling by 2 (StyleGAN2's ``Conv2d``).

  Without resampling it is a stride-1 'SAME' convolution. Parameters are ``weight`` (HWIO) and
  ``bias``, the names of the original's checkpoints.

  Attributes:
    fmaps: output channels.
    kernel: spatial size of the (odd) convolution kernel.
    up: upsample by 2 (``upsample_conv_2d``).
    down: downsample by 2 (``conv_downsample_2d``).
    resample_kernel: the FIR filter.
    use_bias: add a bias (initialised to zero).
    kernel_init: initialiser of ``weight``.
    dtype: compute dtype (``None``: the input's); the parameters stay float32.
  """

  fmaps: int
  kernel: int = 3
  up: bool = False
  down: bool = False
  resample_kernel: Sequence[float] = DEFAULT_KERNEL
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C_in) -> (B, H', W', fmaps), H' = 2H (up), H // 2 (down) or H."""
    if self.up and self.down:
      raise ValueError("Conv2d can upsample or downsample, not both; set up=False or down=False.")
    if self.kernel < 1 or self.kernel % 2 != 1:
      raise ValueError(f"Conv2d needs an odd kernel size, got {self.kernel}.")
    w = self.param("weight", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.up:
      x = upsample_conv_2d(x, w, self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, w, self.resample_kernel)
    else:
      x = lax.conv_general_dilated(x, w.astype(x.dtype), window_strides=(1, 1), padding="SAME",
                                   dimension_numbers=_DIMENSIONS)
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.fmaps,)).astype(x.dtype)
    return x
