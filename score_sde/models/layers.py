"""Layers of the score networks: initialisers, label embeddings, residual and attention blocks.

Conventions follow the original's DDPM / NCSN++ models (Ho et al. 2020; Song et al. 2021), and
every block creates its sub-layers in the original's order, so Flax names them as the original
did (``Conv_0``, ``Dense_0``, ``GroupNorm_1``, ``NIN_3``, ...) and its checkpoints map one to one.

* Initialisers (``default_init``): variance scaling, fan_avg, uniform; scale 0 means 1e-10, so
  the last layer of a residual branch starts near zero and every block starts as the identity.
  ``NIN`` (a 1x1 convolution written as a matrix ``W`` (C_in, C_out) plus bias ``b``) defaults to
  scale 0.1, as in the original.
* GroupNorm (``num_groups``): NCSN++'s group count min(C // 4, 32), lowered to a divisor of C
  when needed (which the original never needs: there it always divides); DDPM fixes 32 groups.
  Epsilon 1e-6; the variance is computed in two passes (mean of squared deviations), which
  matches the PyTorch port's GroupNorm more closely than E[x^2] - E[x]^2. ``GroupNorm`` sums per
  channel and then per group, which XLA compiles to far cheaper reductions than flax's grouped ones.
* Noise labels are embedded either with Gaussian Fourier features of log(label) (random, frozen
  frequencies W ~ N(0, scale^2)) or with DDPM's sinusoidal position embedding of the label.
* Resampling (``Upsample`` / ``Downsample``): nearest-neighbour copies / average pooling, or the
  FIR filter of ``up_or_down_sampling``; optionally with a 3x3 convolution (fused with the FIR
  filter in ``up_or_down_sampling.Conv2d``).
* Residual blocks: ``ResnetBlock`` (this package's small U-Net), ``ResnetBlockDDPM`` (Ho et al.),
  ``ResnetBlockDDPMpp`` and ``ResnetBlockBigGANpp`` (NCSN++; the BigGAN block resamples inside
  the block). ``skip_rescale`` divides a residual sum by sqrt(2).
* Memory and speed options (both off by default, which is the original's arithmetic):
  ``rematerialised`` wraps a block class in ``nn.remat`` under its own name, so the backward pass
  recomputes the block's activations and the parameter tree is unchanged; a layer's ``dtype``
  (``compute_dtype``: ``None`` for float32, or bfloat16) is the dtype its convolutions, dense layers
  and attention compute in, while parameters stay float32 and GroupNorm statistics and softmax
  are computed in float32.

Shapes: labels are (B,); images are NHWC; vectors are (B, D); embeddings are (B, E).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import up_or_down_sampling

Array = jax.Array
Activation = Callable[[Array], Array]

EMBEDDING_TYPES = ("fourier", "positional")
# Compute dtypes by ``config.model.dtype``; ``None`` lets flax compute in the parameters' float32.
DTYPES: dict[str, Any] = {"float32": None, "bfloat16": jnp.bfloat16}

# The original's ``get_act``: activation functions by ``config.model.nonlinearity``.
ACTIVATIONS: dict[str, Activation] = {
    "swish": nn.swish,
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
}


def get_act(nonlinearity: str) -> Activation:
  """The activation named ``nonlinearity`` (case-insensitive); ValueError naming the choices."""
  name = nonlinearity.lower()
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown nonlinearity {nonlinearity!r}; valid choices: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


# --- memory and speed options ---------------------------------------------------------------------


def compute_dtype(name: str) -> Any:
  """The compute dtype named ``name`` (``DTYPES``): ``None`` for float32, else e.g. ``jnp.bfloat16``."""
  if name not in DTYPES:
    raise ValueError(f"Unknown compute dtype {name!r}; valid choices: {sorted(DTYPES)}. Set config.model.dtype "
                     f"to one of them.")
  return DTYPES[name]


@functools.cache
def _rematerialised(cls: type[nn.Module], static_argnums: tuple[int, ...]) -> type[nn.Module]:
  lifted = nn.remat(cls, static_argnums=static_argnums)
  # Flax names a submodule after its class: keeping the name keeps every parameter path.
  lifted.__name__ = lifted.__qualname__ = cls.__name__
  return lifted


def rematerialised(cls: type[nn.Module], remat: bool, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """``cls``, or with ``remat`` its ``nn.remat`` version under the same name and parameter paths.

  Args:
    cls: a block class.
    remat: recompute the block's activations on the backward pass instead of storing them.
    static_argnums: positions of non-array arguments of ``__call__``, counting ``self`` as 0
      (e.g. ``(3,)`` for ``train`` in ``block(x, temb, train)``); pass them positionally.

  Returns:
    A module class with ``cls``'s attributes, names and outputs.
  """
  return _rematerialised(cls, tuple(static_argnums)) if remat else cls


# --- initialisers, normalisation, 1x1 / 3x3 layers ------------------------------------------------


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The original's ``default_init``: variance scaling (fan_avg, uniform); scale 0 means 1e-10."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Group count of GroupNorm for ``channels``: the largest divisor of C not above min(C // 4, 32)."""
  limit = max(1, min(channels // 4, max_groups))
  return max(g for g in range(1, limit + 1) if channels % g == 0)


class GroupNorm(nn.Module):
  """GroupNorm over the last axis, statistics per example and group, in float32.

  y = (x - mean) / sqrt(var + epsilon) * scale + bias, with mean and var over every axis but the
  first and the last, and over the C / num_groups channels of a group; var is the mean of squared
  deviations (two passes). Parameters ``scale`` (ones) and ``bias`` (zeros), shape (C,), as flax's
  ``nn.GroupNorm``. The sums run per channel first (over the spatial axes, keeping the channel axis
  contiguous) and then over the group's channels: the same numbers as a reduction over the grouped
  axes, to float32 round-off, at a fraction of the cost of that reduction and its gradient on a CPU.

  Attributes:
    num_groups: groups; must divide C.
    epsilon: added to the variance.
    dtype: output dtype (``None``: float32, or the input's if wider); the arithmetic is float32.
  """

  num_groups: int
  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, ..., C) -> (B, ..., C)."""
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm with {self.num_groups} groups needs a channel count divisible by "
                       f"{self.num_groups}, got {channels}; choose nf and ch_mult so that every level's "
                       f"channels are multiples of {self.num_groups}, or a group count that divides {channels} "
                       f"(layers.num_groups({channels}) = {num_groups(channels)}).")
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    h = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (channels // self.num_groups)
    per_channel = (x.shape[0],) + (1,) * len(axes) + (channels,)

    def group_mean(sums: Array) -> Array:  # (B, C) per-channel sums -> (B, 1.., C) group means
      groups = jnp.sum(sums.reshape(-1, self.num_groups, channels // self.num_groups), axis=-1) / count
      return jnp.repeat(groups, channels // self.num_groups, axis=-1).reshape(per_channel)

    deviation = h - group_mean(jnp.sum(h, axis=axes))
    variance = group_mean(jnp.sum(jnp.square(deviation), axis=axes))
    y = deviation * (jax.lax.rsqrt(variance + self.epsilon) * scale) + bias
    return y.astype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))


def group_norm(channels: int, groups: int | None = None, dtype: Any = None) -> GroupNorm:
  """GroupNorm over ``channels`` with ``groups`` groups (``None``: ``num_groups(channels)``), eps 1e-6.

  With a ``dtype`` the output has that dtype; statistics are reduced in float32 either way.
  """
  groups = num_groups(channels) if groups is None else groups
  return GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)


def conv3x3(x: Array, features: int, stride: int = 1, bias: bool = True, init_scale: float = 1.0,
            dtype: Any = None) -> Array:
  """A 'SAME' 3x3 convolution with DDPM's initialisation, created in the calling module's scope.

  (B, H, W, C) -> (B, H / stride, W / stride, features). Stride 2 pads one row and column after
  the image, as the PyTorch port's explicit (0, 1, 0, 1) padding. ``dtype``: compute dtype.
  """
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME", use_bias=bias,
                 kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros, dtype=dtype)(x)


def conv1x1(x: Array, features: int, bias: bool = True, init_scale: float = 1.0, dtype: Any = None) -> Array:
  """A 1x1 convolution with DDPM's initialisation: (B, H, W, C) -> (B, H, W, features)."""
  return nn.Conv(features, (1, 1), use_bias=bias, kernel_init=default_init(init_scale),
                 bias_init=nn.initializers.zeros, dtype=dtype)(x)


class NIN(nn.Module):
  """Network-in-network: a per-pixel linear map x W + b over the last axis.

  Attributes:
    num_units: output features.
    init_scale: ``default_init`` scale of ``W`` (C_in, num_units).
    dtype: compute dtype (``None``: the parameters' float32).
  """

  num_units: int
  init_scale: float = 0.1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(..., C_in) -> (..., num_units)."""
    w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
    b = self.param("b", nn.initializers.zeros, (self.num_units,))
    if self.dtype is not None:
      x, w, b = (a.astype(self.dtype) for a in (x, w, b))
    return jnp.tensordot(x, w, axes=1) + b


# --- noise-label embeddings -----------------------------------------------------------------------


def timestep_embedding(labels: Array, dim: int, max_positions: int = 10_000) -> Array:
  """DDPM's sinusoidal embedding of real-valued labels (B,) -> (B, dim).

  Frequencies are max_positions^(-k / (dim/2 - 1)) for k = 0..dim/2 - 1, rounded once to float32
  (a constant, not recomputed on device); the embedding is [sin(label f), cos(label f)],
  zero-padded when ``dim`` is odd.
  """
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (B,), got {labels.shape}.")
  half = dim // 2
  if half < 2:
    raise ValueError(f"The sinusoidal embedding needs dim >= 4, got {dim}.")
  exponents = np.arange(half, dtype=np.float32) * np.float32(-math.log(max_positions) / (half - 1))
  freqs = jnp.asarray(np.exp(exponents.astype(np.float64)).astype(np.float32))
  angles = labels.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W v), cos(2 pi W v)] of a scalar v per example.

  W ~ N(0, scale^2) of shape (embedding_size,) is a parameter (so the original's checkpoints map
  onto it) that never trains: it passes through ``stop_gradient``, so its gradient is zero. The
  product is formed as ((v W) 2) pi, the original's order (the arguments reach hundreds of radians).

  Attributes:
    embedding_size: number of frequencies; the output has 2 * embedding_size features.
    scale: standard deviation of the frequencies.
  """

  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, v: Array) -> Array:
    """(B,) -> (B, 2 * embedding_size)."""
    w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    angles = v[:, None] * jax.lax.stop_gradient(w)[None, :] * 2 * jnp.pi
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NoiseLabelEmbedding(nn.Module):
  """Embedding of the noise label: features of the label, then Dense -> SiLU -> Dense.

  Attributes:
    features: width of the output (the original uses 4 nf).
    embedding_type: ``fourier`` (Gaussian Fourier features of log(label); labels must be positive,
      i.e. continuous-time conventions) or ``positional`` (sinusoidal embedding of the label).
    embedding_size: frequencies of the Fourier features / width of the sinusoidal embedding.
    fourier_scale: standard deviation of the Fourier frequencies.
    dtype: compute dtype of the dense layers (the label features stay float32).
  """

  features: int
  embedding_type: str = "positional"
  embedding_size: int = 64
  fourier_scale: float = 16.0
  dtype: Any = None

  @nn.compact
  def __call__(self, labels: Array) -> Array:
    """(B,) float labels -> (B, features)."""
    if self.embedding_type == "fourier":
      emb = GaussianFourierProjection(self.embedding_size, self.fourier_scale)(jnp.log(labels))
    elif self.embedding_type == "positional":
      emb = timestep_embedding(labels, self.embedding_size)
    else:
      raise ValueError(f"Unknown embedding_type {self.embedding_type!r}; valid choices: {EMBEDDING_TYPES}.")
    emb = nn.Dense(self.features, kernel_init=default_init(), dtype=self.dtype)(emb)
    return nn.Dense(self.features, kernel_init=default_init(), dtype=self.dtype)(nn.silu(emb))


class ClassLabelEmbedding(nn.Module):
  """A learned vector per class label, added to the noise embedding of a class-conditional network.

  Row ``num_classes`` is the "null" class: the label of the unconditional score that classifier-free
  guidance (Ho & Salimans 2022) trains by label dropout. A label outside [0, num_classes] embeds as
  NaN, so bad data make a non-finite loss rather than a silently wrong row (``jnp.take`` wraps
  negative indices).

  Attributes:
    num_classes: number of classes C (the table has C + 1 rows).
    features: width of the embedding (that of the noise embedding it is added to).
  """

  num_classes: int
  features: int

  @nn.compact
  def __call__(self, y: Array) -> Array:
    """(B,) integer labels in [0, num_classes] -> (B, features) float32."""
    if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
      raise ValueError(f"Class labels must be integers, got dtype {jnp.asarray(y).dtype}.")
    valid = (y >= 0) & (y <= self.num_classes)
    emb = nn.Embed(self.num_classes + 1, self.features, embedding_init=nn.initializers.normal(1.0))(
        jnp.where(valid, y, 0))
    return jnp.where(valid[:, None], emb, jnp.nan)


def add_class_embedding(temb: Array | None, class_labels: Array | None, num_classes: int, features: int,
                        batch: int) -> Array | None:
  """``temb`` plus the class embedding of ``class_labels`` (None: the null class) when ``num_classes`` > 0.

  Args:
    temb: (B, features) noise embedding, or None for a network without one.
    class_labels: (B,) int labels in [0, num_classes], or None (every example gets the null class).
    num_classes: classes C of the network; 0 adds nothing (and creates no parameters).
    features: width of the embedding.
    batch: B.

  Returns:
    (B, features), or ``temb`` unchanged for ``num_classes == 0``.

  Raises:
    ValueError: for class labels given to an unconditional network (``num_classes == 0``).
  """
  if num_classes < 0 or int(num_classes) != num_classes:
    raise ValueError(f"num_classes must be a non-negative integer (0: unconditional), got {num_classes}.")
  if not num_classes:
    if class_labels is not None:
      raise ValueError("Class labels were given to an unconditional network (num_classes=0); train a "
                       "class-conditional one with config.model.num_classes set to the number of classes.")
    return temb
  if class_labels is None:
    class_labels = jnp.full((batch,), num_classes, jnp.int32)
  emb = ClassLabelEmbedding(num_classes, features)(class_labels)
  return emb if temb is None else temb + emb.astype(temb.dtype)


# --- blocks of this package's small networks ----------------------------------------------------


class ResidualMLPBlock(nn.Module):
  """x + Dense(dropout(SiLU(Dense(SiLU(x)) + Dense(SiLU(temb))))) on vectors (B, D).

  The skip path is a Dense projection when the width changes.

  Attributes:
    features: output width.
    dropout: dropout rate of the residual branch (active only when ``train``).
  """

  features: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
    """(B, D), (B, E) or None -> (B, features)."""
    h = nn.Dense(self.features, kernel_init=default_init())(nn.silu(x))
    if temb is not None:
      h = h + nn.Dense(self.features, kernel_init=default_init())(nn.silu(temb))
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
    h = nn.Dense(self.features, kernel_init=default_init())(h)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, kernel_init=default_init())(x)
    return x + h


class ResnetBlock(nn.Module):
  """The residual block of this package's small U-Net (``unet.UNet``) on NHWC images.

  h = Conv(SiLU(GN(x))) + Dense(SiLU(temb)); h = Conv0(dropout(SiLU(GN(h)))); returns skip(x) + h,
  with Conv0 initialised near zero and skip a Dense projection when the channels change.

  Attributes:
    out_ch: output channels (``None`` keeps the input's).
    dropout: dropout rate (active only when ``train``).
    dtype: compute dtype (``None``: the parameters' float32).
  """

  out_ch: int | None = None
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
    """(B, H, W, C), (B, E) or None -> (B, H, W, out_ch)."""
    channels, dtype = x.shape[-1], self.dtype
    out_ch = self.out_ch or channels
    h = nn.Conv(out_ch, (3, 3), kernel_init=default_init(), dtype=dtype)(nn.silu(group_norm(channels, dtype=dtype)(x)))
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(nn.silu(temb))[:, None, None, :]
    h = nn.Dropout(self.dropout)(nn.silu(group_norm(out_ch, dtype=dtype)(h)), deterministic=not train)
    h = nn.Conv(out_ch, (3, 3), kernel_init=default_init(0.0), dtype=dtype)(h)
    if channels != out_ch:
      x = nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(x)
    return x + h


# --- attention and resampling (DDPM, NCSN++ and the small U-Net) ----------------------------------


def residual_sum(x: Array, h: Array, skip_rescale: bool) -> Array:
  """x + h, divided by sqrt(2) when ``skip_rescale`` (the original's residual rescaling), in their dtype."""
  s = x + h
  return s / jnp.asarray(np.sqrt(2.0), s.dtype) if skip_rescale else s


class AttnBlock(nn.Module):
  """Single-head self-attention over all H * W positions, with NIN projections and a residual.

  q, k, v = NIN(GN(x)); out = x + NIN_3(softmax(q k^T / sqrt(C)) v), NIN_3 initialised with
  ``init_scale`` (0: near zero), the sum divided by sqrt(2) with ``skip_rescale``.

  Attributes:
    num_groups: GroupNorm groups (``None``: ``num_groups(C)``; DDPM uses 32).
    init_scale: initialisation scale of the output projection.
    skip_rescale: divide the residual sum by sqrt(2).
    dtype: compute dtype of the projections and products (``None``: float32); the softmax is
      always taken in float32.
  """

  num_groups: int | None = None
  init_scale: float = 0.0
  skip_rescale: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    b, height, width, channels = x.shape
    h = group_norm(channels, self.num_groups, self.dtype)(x)
    q, k, v = (NIN(channels, dtype=self.dtype)(h).reshape(b, height * width, channels) for _ in range(3))
    logits = jnp.einsum("bic,bjc->bij", q, k) * (int(channels) ** -0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(x.shape)
    return residual_sum(x, NIN(channels, init_scale=self.init_scale, dtype=self.dtype)(h), self.skip_rescale)


class AttnBlockpp(AttnBlock):
  """NCSN++'s attention block: ``AttnBlock`` under the original's NCSN++ name (``AttnBlockpp_k``)."""


class Upsample(nn.Module):
  """Doubles H and W.

  Without ``fir``: nearest-neighbour copies, then a 3x3 convolution (``Conv_0``) if ``with_conv``.
  With ``fir``: the FIR filter, fused with a 3x3 convolution (``Conv2d_0``) if ``with_conv``.

  Attributes:
    with_conv: add a learned 3x3 convolution.
    out_ch: output channels of the convolution (``None`` keeps the input's; needs ``with_conv``).
    fir: FIR upsampling (``up_or_down_sampling``) instead of nearest-neighbour copies.
    fir_kernel: the FIR filter.
    dtype: compute dtype of the convolution (``None``: float32).
  """

  with_conv: bool = True
  out_ch: int | None = None
  fir: bool = False
  fir_kernel: Sequence[int] = up_or_down_sampling.DEFAULT_KERNEL
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, 2H, 2W, out_ch or C)."""
    out_ch = self.out_ch or x.shape[-1]
    if not self.with_conv and out_ch != x.shape[-1]:
      raise ValueError(f"Upsample without a convolution keeps the {x.shape[-1]} channels; got out_ch={out_ch}.")
    if not self.fir:
      h = up_or_down_sampling.naive_upsample_2d(x, factor=2)
      return conv3x3(h, out_ch, dtype=self.dtype) if self.with_conv else h
    if not self.with_conv:
      return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
    return up_or_down_sampling.Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel,
                                      kernel_init=default_init(), dtype=self.dtype)(x)


class Downsample(nn.Module):
  """Halves H and W.

  Without ``fir``: a stride-2 3x3 convolution (``Conv_0``) if ``with_conv``, else 2x2 average
  pooling. With ``fir``: the FIR filter, fused with a 3x3 convolution (``Conv2d_0``) if ``with_conv``.

  Attributes:
    with_conv: resample with a learned 3x3 convolution.
    out_ch: output channels of the convolution (``None`` keeps the input's; needs ``with_conv``).
    fir: FIR downsampling (``up_or_down_sampling``) instead of pooling / strided convolution.
    fir_kernel: the FIR filter.
    dtype: compute dtype of the convolution (``None``: float32).
  """

  with_conv: bool = True
  out_ch: int | None = None
  fir: bool = False
  fir_kernel: Sequence[int] = up_or_down_sampling.DEFAULT_KERNEL
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H/2, W/2, out_ch or C)."""
    out_ch = self.out_ch or x.shape[-1]
    if not self.with_conv and out_ch != x.shape[-1]:
      raise ValueError(f"Downsample without a convolution keeps the {x.shape[-1]} channels; got out_ch={out_ch}.")
    if not self.fir:
      if self.with_conv:
        return conv3x3(x, out_ch, stride=2, dtype=self.dtype)
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if not self.with_conv:
      return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
    return up_or_down_sampling.Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel,
                                      kernel_init=default_init(), dtype=self.dtype)(x)


# --- residual blocks of DDPM and NCSN++ ------------------------------------------------------------


class ResnetBlockDDPM(nn.Module):
  """DDPM's residual block (Ho et al. 2020) on NHWC images.

  h = Conv_0(act(GN(x))) + Dense_0(act(temb)); h = Conv_1(dropout(act(GN(h)))), Conv_1 initialised
  with ``init_scale``; the skip is x, or a projection (NIN_0, or a 3x3 Conv_2 with
  ``conv_shortcut``) when the channels change; out = x + h (divided by sqrt(2) with ``skip_rescale``).

  Attributes:
    act: activation function.
    out_ch: output channels (``None`` keeps the input's).
    conv_shortcut: project the skip with a 3x3 convolution instead of NIN.
    dropout: dropout rate (active only when ``train``).
    num_groups: GroupNorm groups (DDPM: 32; ``None``: ``num_groups(C)``).
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: initialisation scale of Conv_1.
    dtype: compute dtype (``None``: the parameters' float32).
  """

  act: Activation = nn.swish
  out_ch: int | None = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  num_groups: int | None = 32
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    """(B, H, W, C), (B, E) or None -> (B, H, W, out_ch)."""
    channels, dtype = x.shape[-1], self.dtype
    out_ch = self.out_ch or channels
    h = conv3x3(self.act(group_norm(channels, self.num_groups, dtype)(x)), out_ch, dtype=dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch, self.num_groups, dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=dtype)
    if channels != out_ch:
      x = conv3x3(x, out_ch, dtype=dtype) if self.conv_shortcut else NIN(out_ch, dtype=dtype)(x)
    return residual_sum(x, h, self.skip_rescale)


class ResnetBlockDDPMpp(ResnetBlockDDPM):
  """NCSN++'s DDPM-style block (``resblock_type='ddpm'``): ``ResnetBlockDDPM`` with GroupNorm groups
  min(C // 4, 32), under the original's name (``ResnetBlockDDPMpp_k``)."""

  num_groups: int | None = None


class ResnetBlockBigGANpp(nn.Module):
  """NCSN++'s BigGAN-style block (``resblock_type='biggan'``), optionally resampling by 2.

  h = act(GN(x)); with ``up`` / ``down`` both h and x are resampled (FIR with ``fir``, else
  nearest-neighbour copies / average pooling); h = Conv_0(h) + Dense_0(act(temb));
  h = Conv_1(dropout(act(GN(h)))), Conv_1 initialised with ``init_scale``; x is projected by a
  1x1 Conv_2 when the channels change or the block resamples; out = x + h (divided by sqrt(2)
  with ``skip_rescale``).

  Attributes:
    act: activation function.
    up: upsample by 2.
    down: downsample by 2.
    out_ch: output channels (``None`` keeps the input's).
    dropout: dropout rate (active only when ``train``).
    fir: FIR resampling.
    fir_kernel: the FIR filter.
    skip_rescale: divide the residual sum by sqrt(2).
    init_scale: initialisation scale of Conv_1.
    dtype: compute dtype (``None``: the parameters' float32).
  """

  act: Activation = nn.swish
  up: bool = False
  down: bool = False
  out_ch: int | None = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = up_or_down_sampling.DEFAULT_KERNEL
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Any = None

  def _resample(self, x: Array) -> Array:
    if self.up:
      if self.fir:
        return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
      return up_or_down_sampling.naive_upsample_2d(x, factor=2)
    if self.down:
      if self.fir:
        return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
      return up_or_down_sampling.naive_downsample_2d(x, factor=2)
    return x

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    """(B, H, W, C), (B, E) or None -> (B, H', W', out_ch), H' = 2H (up), H/2 (down) or H."""
    if self.up and self.down:
      raise ValueError("A BigGAN block can upsample or downsample, not both; set up=False or down=False.")
    channels, dtype = x.shape[-1], self.dtype
    out_ch = self.out_ch or channels
    h = self.act(group_norm(channels, dtype=dtype)(x))
    h, x = self._resample(h), self._resample(x)
    h = conv3x3(h, out_ch, dtype=dtype)
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch, dtype=dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=dtype)
    if channels != out_ch or self.up or self.down:
      x = conv1x1(x, out_ch, dtype=dtype)
    return residual_sum(x, h, self.skip_rescale)


class Combine(nn.Module):
  """Merges a skip x into h (NCSN++'s ``progressive_input='input_skip'``).

  A 1x1 convolution (``Conv_0``) maps x to h's channels, then ``cat`` concatenates [x', h] on the
  channel axis or ``sum`` adds x' + h.

  Attributes:
    method: ``cat`` or ``sum``.
    dtype: compute dtype of the convolution (``None``: float32).
  """

  method: str = "cat"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, h: Array) -> Array:
    """(B, H, W, C_x), (B, H, W, C) -> (B, H, W, 2C) (cat) or (B, H, W, C) (sum)."""
    if self.method not in ("cat", "sum"):
      raise ValueError(f"Unknown combine method {self.method!r}; valid choices: ['cat', 'sum'].")
    x = conv1x1(x, h.shape[-1], dtype=self.dtype)
    return jnp.concatenate([x, h], axis=-1) if self.method == "cat" else x + h


# --- the noise level of a label (networks that divide their output by sigma) ------------------------


def smld_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
  """The original's descending SMLD table exp(linspace(log sigma_max, log sigma_min, N)), float64."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


def noise_levels(labels: Array, continuous: bool, sigma_min: float, sigma_max: float, num_scales: int) -> Array:
  """The VE noise level sigma (B,) that a score network was conditioned on with ``labels`` (B,).

  Continuous training passes sigma itself as the label; discrete training passes the index k of
  the descending table ``smld_sigmas`` (rounded, then clipped to [0, N - 1]), as the original's
  ``scale_by_sigma`` does.
  """
  dtype = labels.dtype if jnp.issubdtype(labels.dtype, jnp.floating) else jnp.float32
  if continuous:
    return labels.astype(dtype)
  index = jnp.clip(jnp.round(labels).astype(jnp.int32), 0, num_scales - 1)
  return jnp.asarray(smld_sigmas(sigma_min, sigma_max, num_scales), dtype)[index]


def check_image_shape(x: Array, ch_mult: Sequence[int], model: str) -> None:
  """ValueError unless x is NHWC with H and W divisible by 2^(len(ch_mult) - 1)."""
  if x.ndim != 4:
    raise ValueError(f"{model} takes NHWC images of shape (B, H, W, C), got {x.shape}; use the 'mlp' "
                     f"model for vectors.")
  factor = 2 ** (len(ch_mult) - 1)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"Images of {x.shape[1]}x{x.shape[2]} cannot be halved {len(ch_mult) - 1} times "
                     f"(ch_mult={tuple(ch_mult)}); use sizes divisible by {factor} or a shorter ch_mult.")
