"""Building blocks of NCSN and NCSNv2 (Song & Ermon 2019, 2020): a dilated ResNet and RefineNet.

RefineNet (Lin et al. 2017) fuses the features of a ResNet from coarse to fine. Each RefineBlock:

    adapt: every input x_i -> RCU(x_i)                  (residual conv units, 2 blocks of 2 convs)
    fuse:  sum_i resize(conv3x3(h_i), size of x_0)       (MSF, multi-resolution fusion; skipped at the start)
    pool:  h = act(h); h += conv(pool(h)), twice         (CRP, chained residual pooling, 5x5 stride 1)
    out:   RCU(h)                                       (1 block, 3 at the end of the network)

The ``Cond*`` variants (NCSN v1) insert a normalisation conditioned on the noise index y before every
convolution (and before the pooling in CRP, which then averages instead of taking the maximum), as in
the originals. ResNet blocks are pre-activation: x + conv(act(norm(conv(act(norm(x)))))); a block
that downsamples ends with ConvMeanPool (conv, then 2x2 mean pooling) unless it is dilated, in which
case it keeps the resolution and widens the receptive field instead (both originals do this).

Conventions (those of the NCSNv2 authors' code, ermongroup/ncsnv2, whose weights this framework
imports): convolutions use PyTorch's default initialisation, weights and biases ~ U(+-1/sqrt(fan_in));
RCU and CRP convolutions have no bias; every convolution is "same"-padded (padding = dilation).
Images are NHWC (B, H, W, C); the label y is (B,) integer.

Compute dtype. Every block takes a ``dtype`` (``None``: float32, or bfloat16; ``layers.compute_dtype``):
the dtype of its convolutions, while their parameters stay float32. Activations between the layers,
the resizing of the fusion and the max and 2x2 mean pooling follow it; the normalisers (made for the
same dtype by the caller) compute their statistics in float32, and so does CondCRPBlock's 5x5 average
pooling (a 25-term sum).

Parameter names are flax's automatic names (``Conv_0``, ``RCUBlock_1``, ...), in the order the
original JAX implementation created them, except inside the residual blocks, whose submodules carry
the names of the PyTorch originals (``normalize1``, ``conv1``, ``normalize2``, ``conv2``,
``shortcut``): there the automatic order depends on the branch taken. ``models.ncsnv2.authors_name``
maps all of them to the authors' names.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import normalization

Array = jax.Array
Activation = Callable[[Array], Array]

ACTIVATIONS: dict[str, Activation] = {
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
    "swish": nn.swish,
}
INTERPOLATIONS = ("bilinear", "bilinear_align_corners", "nearest_neighbor")


def get_act(name: str) -> Activation:
  """The nonlinearity named ``name`` (case-insensitive): elu, relu, lrelu (slope 0.2) or swish."""
  if name.lower() not in ACTIVATIONS:
    raise ValueError(f"Unknown nonlinearity {name!r}; valid choices: {sorted(ACTIVATIONS)}. Set "
                     f"config.model.nonlinearity to one of them.")
  return ACTIVATIONS[name.lower()]


def conv(x: Array, features: int, kernel_size: int = 3, *, dilation: int = 1, use_bias: bool = True,
         name: str | None = None, dtype: Any = None) -> Array:
  """A stride-1, same-padded convolution with PyTorch's initialisation, created in the calling module.

  Args:
    x: (B, H, W, C_in).
    features: output channels.
    kernel_size: square kernel size (1 or 3).
    dilation: kernel dilation (same padding keeps H and W).
    use_bias: add a bias.
    name: the submodule's name (default: flax's automatic ``Conv_k``).
    dtype: compute dtype (``None``: the parameters' float32); the parameters stay float32.

  Returns:
    (B, H, W, features), in ``dtype``.
  """
  bound = (kernel_size**2 * x.shape[-1]) ** -0.5  # 1 / sqrt(fan_in), for the kernel and the bias

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nn.Conv(features, (kernel_size, kernel_size), padding="SAME", kernel_dilation=dilation,
                 use_bias=use_bias, kernel_init=init, bias_init=init, name=name, dtype=dtype)(x)


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of align-corners linear interpolation: output j samples input j (n_in - 1) / (n_out - 1)."""
  pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
  i0 = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  matrix = np.zeros((n_out, n_in))
  np.add.at(matrix, (np.arange(n_out), i0), 1.0 - (pos - i0))
  np.add.at(matrix, (np.arange(n_out), i1), pos - i0)
  return matrix


def resize(x: Array, size: Sequence[int], method: str) -> Array:
  """Resizes (B, H, W, C) images to (B, *size, C).

  Args:
    x: (B, H, W, C).
    size: (H', W').
    method: ``bilinear`` (half-pixel centres, ``jax.image.resize``; the JAX original),
      ``bilinear_align_corners`` (corner pixels aligned, PyTorch's ``align_corners=True``; the NCSN /
      NCSNv2 authors' code, so use it with their weights) or ``nearest_neighbor``.

  Returns:
    (B, H', W', C).
  """
  height, width = size
  if method == "bilinear":
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "bilinear")
  if method == "nearest_neighbor":
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "nearest")
  if method == "bilinear_align_corners":
    # Two small matrix products (rows, then columns): exact, and cheaper to differentiate than gathers.
    rows = jnp.asarray(_align_corners_matrix(x.shape[1], height), x.dtype)
    cols = jnp.asarray(_align_corners_matrix(x.shape[2], width), x.dtype)
    x = jnp.einsum("ph,bhwc->bpwc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("qw,bpwc->bpqc", cols, x, precision=jax.lax.Precision.HIGHEST)
  raise ValueError(f"Unknown interpolation {method!r}; valid choices: {INTERPOLATIONS}. Set "
                   f"config.model.interpolation to one of them.")


def mean_pool(x: Array) -> Array:
  """2x2 mean pooling with stride 2: (B, H, W, C) -> (B, H/2, W/2, C) for even H and W."""
  return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


class ConvMeanPool(nn.Module):
  """A same-padded convolution, then 2x2 mean pooling (downsampling by 2).

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    dtype: compute dtype (``None``: float32).
  """

  features: int
  kernel_size: int = 3
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H/2, W/2, features)."""
    return mean_pool(conv(x, self.features, self.kernel_size, dtype=self.dtype))


class RCUBlock(nn.Module):
  """Residual conv units: ``n_blocks`` times x += conv(act(...conv(act(x)))) with ``n_stages`` convs.

  Attributes:
    features: channels (of the input and the output).
    n_blocks: residual units.
    n_stages: convolutions per unit.
    act: nonlinearity.
    dtype: compute dtype (``None``: float32).
  """

  features: int
  n_blocks: int
  n_stages: int
  act: Activation = nn.relu
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, features) -> (B, H, W, features)."""
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        x = conv(self.act(x), self.features, use_bias=False, dtype=self.dtype)
      x = x + residual
    return x


class CondRCUBlock(nn.Module):
  """RCUBlock with a conditional normalisation before each nonlinearity (NCSN v1).

  Attributes:
    features, n_blocks, n_stages, act, dtype: as for ``RCUBlock``.
    normalizer: conditional normaliser factory (``normalization.get_normalization``).
  """

  features: int
  n_blocks: int
  n_stages: int
  normalizer: normalization.Normalizer
  act: Activation = nn.relu
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    """(B, H, W, features), labels (B,) -> (B, H, W, features)."""
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        x = conv(self.act(self.normalizer(x.shape[-1])(x, y)), self.features, use_bias=False, dtype=self.dtype)
      x = x + residual
    return x


class CRPBlock(nn.Module):
  """Chained residual pooling: x = act(x), then ``n_stages`` times path = conv(maxpool5(path)); x += path.

  Attributes:
    features: channels.
    n_stages: pooling stages.
    act: nonlinearity.
    dtype: compute dtype (``None``: float32).
  """

  features: int
  n_stages: int
  act: Activation = nn.relu
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, features) -> (B, H, W, features)."""
    x = path = self.act(x)
    for _ in range(self.n_stages):
      path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
      path = conv(path, self.features, use_bias=False, dtype=self.dtype)
      x = x + path
    return x


class CondCRPBlock(nn.Module):
  """CRPBlock with a conditional normalisation before each pooling, and 5x5 average pooling (NCSN v1).

  Average pooling pads with zeros and divides by 25, as PyTorch's ``AvgPool2d`` does by default; it
  sums in float32 whatever the compute dtype.

  Attributes:
    features, n_stages, act, dtype: as for ``CRPBlock``.
    normalizer: conditional normaliser factory.
  """

  features: int
  n_stages: int
  normalizer: normalization.Normalizer
  act: Activation = nn.relu
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    """(B, H, W, features), labels (B,) -> (B, H, W, features)."""
    x = path = self.act(x)
    for _ in range(self.n_stages):
      path = self.normalizer(path.shape[-1])(path, y)
      path = nn.avg_pool(path.astype(jnp.float32), (5, 5), strides=(1, 1), padding="SAME",
                         count_include_pad=True).astype(path.dtype)
      path = conv(path, self.features, use_bias=False, dtype=self.dtype)
      x = x + path
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion: sum_i resize(conv3x3(x_i), shape).

  Attributes:
    features: output channels.
    interpolation: resize method (see ``resize``).
    dtype: compute dtype (``None``: float32).
  """

  features: int
  interpolation: str = "bilinear"
  dtype: Any = None

  @nn.compact
  def __call__(self, xs: Sequence[Array], shape: Sequence[int]) -> Array:
    """Inputs (B, H_i, W_i, C_i), output size (H, W) -> (B, H, W, features)."""
    return sum(resize(conv(x, self.features, dtype=self.dtype), shape, self.interpolation) for x in xs)


class CondMSFBlock(nn.Module):
  """MSFBlock with a conditional normalisation of each input before its convolution (NCSN v1).

  Attributes:
    features, interpolation, dtype: as for ``MSFBlock``.
    normalizer: conditional normaliser factory.
  """

  features: int
  normalizer: normalization.Normalizer
  interpolation: str = "bilinear"
  dtype: Any = None

  @nn.compact
  def __call__(self, xs: Sequence[Array], y: Array, shape: Sequence[int]) -> Array:
    """Inputs (B, H_i, W_i, C_i), labels (B,), output size (H, W) -> (B, H, W, features)."""
    return sum(resize(conv(self.normalizer(x.shape[-1])(x, y), self.features, dtype=self.dtype), shape,
                      self.interpolation)
               for x in xs)


class RefineBlock(nn.Module):
  """RefineNet block: adapt each input (RCU), fuse them (MSF), pool (CRP), output RCU.

  The output has the resolution of the first input (the finer one).

  Attributes:
    features: output channels.
    act: nonlinearity.
    interpolation: resize method of the fusion.
    start: a single input, no fusion (the coarsest block).
    end: three output residual units instead of one (the finest block).
    dtype: compute dtype (``None``: float32).
  """

  features: int
  act: Activation = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, xs: Sequence[Array]) -> Array:
    """Inputs (B, H_i, W_i, C_i), finest first -> (B, H_0, W_0, features)."""
    hs = [RCUBlock(x.shape[-1], n_blocks=2, n_stages=2, act=self.act, dtype=self.dtype)(x) for x in xs]
    if self.start:
      h = hs[0]
    else:
      h = MSFBlock(self.features, self.interpolation, dtype=self.dtype)(hs, xs[0].shape[1:3])
    h = CRPBlock(self.features, n_stages=2, act=self.act, dtype=self.dtype)(h)
    return RCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2, act=self.act, dtype=self.dtype)(h)


class CondRefineBlock(nn.Module):
  """RefineBlock built from the conditional RCU, MSF and CRP blocks (NCSN v1).

  Attributes:
    features, act, interpolation, start, end, dtype: as for ``RefineBlock``.
    normalizer: conditional normaliser factory.
  """

  features: int
  normalizer: normalization.Normalizer
  act: Activation = nn.relu
  interpolation: str = "bilinear"
  start: bool = False
  end: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, xs: Sequence[Array], y: Array) -> Array:
    """Inputs (B, H_i, W_i, C_i), finest first, labels (B,) -> (B, H_0, W_0, features)."""
    dtype = self.dtype
    hs = [CondRCUBlock(x.shape[-1], 2, 2, self.normalizer, self.act, dtype)(x, y) for x in xs]
    if self.start:
      h = hs[0]
    else:
      h = CondMSFBlock(self.features, self.normalizer, self.interpolation, dtype)(hs, y, xs[0].shape[1:3])
    h = CondCRPBlock(self.features, 2, self.normalizer, self.act, dtype)(h, y)
    return CondRCUBlock(self.features, 3 if self.end else 1, 2, self.normalizer, self.act, dtype)(h, y)


def _residual(module: nn.Module, x: Array, norm: Callable[[str, Array], Array]) -> Array:
  """The pre-activation residual block shared by ``ResidualBlock`` and ``ConditionalResidualBlock``.

  ``norm(name, h)`` applies the block's normaliser named ``name`` (with the label, if conditional).
  """
  channels, out, dilation, act, dtype = x.shape[-1], module.features, module.dilation, module.act, module.dtype
  if module.resample not in (None, "down"):
    raise ValueError(f"resample must be None or 'down', got {module.resample!r}.")
  down = module.resample == "down"
  h = act(norm("normalize1", x))
  # Downsampling keeps the input width in the first conv; a dilated block keeps the resolution.
  h = conv(h, channels if down else out, dilation=dilation, name="conv1", dtype=dtype)
  h = act(norm("normalize2", h))
  if down and dilation == 1:
    h = ConvMeanPool(out, name="conv2", dtype=dtype)(h)
    shortcut = ConvMeanPool(out, kernel_size=1, name="shortcut", dtype=dtype)(x)
  else:
    h = conv(h, out, dilation=dilation, name="conv2", dtype=dtype)
    if not down and channels == out:
      shortcut = x
    else:  # A dilated shortcut is a 3x3 conv (as in the originals); an undilated one is 1x1.
      shortcut = conv(x, out, 1 if dilation == 1 else 3, dilation=dilation, name="shortcut", dtype=dtype)
  return h + shortcut


class ResidualBlock(nn.Module):
  """Pre-activation residual block of the NCSNv2 ResNet.

  Attributes:
    features: output channels.
    normalizer: normaliser factory (``normalization.get_normalization``).
    resample: ``None`` or ``"down"`` (halve H and W, unless dilated).
    act: nonlinearity.
    dilation: dilation of the 3x3 convolutions.
    dtype: compute dtype of the convolutions (``None``: float32).
  """

  features: int
  normalizer: normalization.Normalizer
  resample: str | None = None
  act: Activation = nn.elu
  dilation: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H', W', features), H' = H/2 for an undilated ``down`` block, else H."""
    return _residual(self, x, lambda name, h: self.normalizer(h.shape[-1], name=name)(h))


class ConditionalResidualBlock(nn.Module):
  """ResidualBlock whose normalisations are conditioned on an integer label (NCSN v1).

  Attributes:
    features, resample, act, dilation, dtype: as for ``ResidualBlock``.
    normalizer: conditional normaliser factory.
  """

  features: int
  normalizer: normalization.Normalizer
  resample: str | None = None
  act: Activation = nn.elu
  dilation: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    """(B, H, W, C), labels (B,) -> (B, H', W', features), H' as for ``ResidualBlock``."""
    return _residual(self, x, lambda name, h: self.normalizer(h.shape[-1], name=name)(h, y))


__all__ = ["ACTIVATIONS", "CRPBlock", "CondCRPBlock", "CondMSFBlock", "CondRCUBlock", "CondRefineBlock",
           "ConditionalResidualBlock", "ConvMeanPool", "INTERPOLATIONS", "MSFBlock", "RCUBlock",
           "RefineBlock", "ResidualBlock", "conv", "get_act", "mean_pool", "resize"]
