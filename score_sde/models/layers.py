"""Layers shared by the score networks: noise-label embeddings, residual blocks, initialisers.

Conventions follow the original's DDPM / NCSN++ models (Ho et al. 2020; Song et al. 2021):

* Noise labels are embedded either with Gaussian Fourier features of log(label) (random, frozen
  frequencies W ~ N(0, scale^2); NCSN++'s choice for continuous VE, where the label is sigma) or
  with DDPM's sinusoidal position embedding of the label itself; either is followed by
  Dense -> SiLU -> Dense.
* Residual blocks add a projection of the embedding after their first layer, use SiLU (swish),
  optional dropout, and initialise their last layer near zero ("init_scale 0", variance 1e-10 as
  in the original) so every block starts as the identity.
* GroupNorm uses NCSN++'s group count min(C / 4, 32), lowered to a divisor of C when needed, so it
  also works for the small channel counts of toy U-Nets.

Shapes: labels are (B,); images are NHWC; vectors are (B, D); embeddings are (B, E).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

EMBEDDING_TYPES = ("fourier", "positional")


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """The original's ``default_init``: variance scaling (fan_avg, uniform); scale 0 means 1e-10."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Group count of GroupNorm for ``channels``: the largest divisor of C not above min(C // 4, 32)."""
  limit = max(1, min(channels // 4, max_groups))
  return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
  """GroupNorm with ``num_groups(channels)`` groups and the original's epsilon 1e-6."""
  return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-6)


def timestep_embedding(labels: Array, dim: int, max_positions: int = 10_000) -> Array:
  """DDPM's sinusoidal embedding of real-valued labels (B,) -> (B, dim).

  Frequencies are max_positions^(-k / (dim/2 - 1)) for k = 0..dim/2 - 1; the embedding is
  [sin(label f), cos(label f)], zero-padded when ``dim`` is odd.
  """
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (B,), got {labels.shape}.")
  half = dim // 2
  if half < 2:
    raise ValueError(f"The sinusoidal embedding needs dim >= 4, got {dim}.")
  freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  angles = labels.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W v), cos(2 pi W v)] of a scalar v per example.

  W ~ N(0, scale^2) of shape (embedding_size,) is a parameter (so the original's checkpoints map
  onto it) that never trains: it passes through ``stop_gradient``, so its gradient is zero.

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
    angles = v[:, None] * jax.lax.stop_gradient(w)[None, :] * (2 * jnp.pi)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NoiseLabelEmbedding(nn.Module):
  """Embedding of the noise label: features of the label, then Dense -> SiLU -> Dense.

  Attributes:
    features: width of the output (the original uses 4 nf).
    embedding_type: ``fourier`` (Gaussian Fourier features of log(label); labels must be positive,
      i.e. continuous-time conventions) or ``positional`` (sinusoidal embedding of the label).
    embedding_size: frequencies of the Fourier features / width of the sinusoidal embedding.
    fourier_scale: standard deviation of the Fourier frequencies.
  """

  features: int
  embedding_type: str = "positional"
  embedding_size: int = 64
  fourier_scale: float = 16.0

  @nn.compact
  def __call__(self, labels: Array) -> Array:
    """(B,) float labels -> (B, features)."""
    if self.embedding_type == "fourier":
      emb = GaussianFourierProjection(self.embedding_size, self.fourier_scale)(jnp.log(labels))
    elif self.embedding_type == "positional":
      emb = timestep_embedding(labels, self.embedding_size)
    else:
      raise ValueError(f"Unknown embedding_type {self.embedding_type!r}; valid choices: {EMBEDDING_TYPES}.")
    emb = nn.Dense(self.features, kernel_init=default_init())(emb)
    return nn.Dense(self.features, kernel_init=default_init())(nn.silu(emb))


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
  """DDPM's residual block on NHWC images.

  h = Conv(SiLU(GN(x))) + Dense(SiLU(temb)); h = Conv0(dropout(SiLU(GN(h)))); returns skip(x) + h,
  with Conv0 initialised near zero and skip a 1x1 projection (NIN) when the channels change.

  Attributes:
    out_ch: output channels (``None`` keeps the input's).
    dropout: dropout rate (active only when ``train``).
  """

  out_ch: int | None = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, temb: Array | None, train: bool) -> Array:
    """(B, H, W, C), (B, E) or None -> (B, H, W, out_ch)."""
    channels = x.shape[-1]
    out_ch = self.out_ch or channels
    h = nn.Conv(out_ch, (3, 3), kernel_init=default_init())(nn.silu(group_norm(channels)(x)))
    if temb is not None:
      h = h + nn.Dense(out_ch, kernel_init=default_init())(nn.silu(temb))[:, None, None, :]
    h = nn.Dropout(self.dropout)(nn.silu(group_norm(out_ch)(h)), deterministic=not train)
    h = nn.Conv(out_ch, (3, 3), kernel_init=default_init(0.0))(h)
    if channels != out_ch:
      x = nn.Dense(out_ch, kernel_init=default_init())(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H * W positions, with a residual connection."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    b, height, width, channels = x.shape
    h = group_norm(channels)(x)
    q, k, v = (nn.Dense(channels, kernel_init=default_init())(h).reshape(b, height * width, channels)
               for _ in range(3))
    weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * channels**-0.5, axis=-1)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(x.shape)
    return x + nn.Dense(channels, kernel_init=default_init(0.0))(h)


class Downsample(nn.Module):
  """Halves H and W: a stride-2 3x3 conv (``with_conv``) or 2x2 average pooling."""

  with_conv: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H/2, W/2, C)."""
    if self.with_conv:
      return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), kernel_init=default_init())(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour upsampling, followed by a 3x3 conv if ``with_conv``."""

  with_conv: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, 2H, 2W, C)."""
    b, height, width, channels = x.shape
    x = jax.image.resize(x, (b, 2 * height, 2 * width, channels), method="nearest")
    if self.with_conv:
      x = nn.Conv(channels, (3, 3), kernel_init=default_init())(x)
    return x
