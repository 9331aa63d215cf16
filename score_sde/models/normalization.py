"""Normalisation layers of NCSN and NCSNv2 (Song & Ermon 2019, 2020) on NHWC images (B, H, W, C).

With per-image, per-channel spatial statistics mu_bc = mean_hw x and s2_bc = var_hw x:

| layer                         | output                                                | parameters         |
|-------------------------------|-------------------------------------------------------|--------------------|
| InstanceNorm2d                | gamma (x - mu) / sqrt(s2 + eps) + beta                | scale, bias        |
| InstanceNorm2dPlus (IN++)     | gamma ((x - mu) / sqrt(s2 + eps) + alpha m_bc) + beta | alpha, gamma, beta |
| ConditionalInstanceNorm2dPlus | IN++ with (gamma, alpha, beta) from row y of a table  | Embed_0/embedding  |
| VarianceNorm2d                | gamma x / sqrt(v2 + eps)                              | scale              |
| GroupNorm                     | ``nn.GroupNorm``, 32 groups (fewer if 32 does not divide C) | scale, bias  |

where m_bc = (mu_bc - mean_c mu_bc) / sqrt(var_c mu_bc + eps) standardises the channel means of
each image (IN++ keeps the information about colour shifts that plain instance norm removes), eps is
1e-5 and K is the number of classes of the conditioning label: for NCSN, the number of noise levels.

Statistics follow the NCSNv2 authors' PyTorch code (ermongroup/ncsnv2), the source of the NCSN and
NCSNv2 weights this framework imports: s2 is the biased spatial variance (torch ``instance_norm``),
var_c of the channel means is unbiased (``torch.var``), and VarianceNorm's v2 is the unbiased spatial
variance. The JAX original used biased variances throughout (a factor C / (C - 1), resp.
HW / (HW - 1), inside the square roots); it released no NCSN checkpoints.

Initialisation as in both originals: scales (gamma, alpha) ~ N(1, 0.02^2), biases 0; InstanceNorm2d's
scale starts at 1. Parameters are vectors of shape (C,) (the JAX original stored (1, 1, 1, C); a
checkpoint converter reshapes), and the conditional table is one (K, 3C) embedding whose columns are
[gamma | alpha | beta], the layout of both originals' embedding.

Compute dtype. Every layer takes a ``dtype`` (``None``: float32, or e.g. bfloat16, see
``layers.compute_dtype``): the statistics, the parameters and the affine map stay float32 whatever the
input's dtype, and only the output is cast to ``dtype``, as flax's GroupNorm does.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
# A normaliser factory: ``normalizer(num_features, name=None)`` returns a fresh layer for C channels
# (computing in the dtype the factory was made for).
Normalizer = Callable[..., nn.Module]

EPS = 1e-5


def _scale_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """N(1, 0.02^2): the originals' initialisation of multiplicative normalisation parameters."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _instance_normalise(x: Array) -> tuple[Array, Array]:
  """((x - mu) / sqrt(s2 + eps), mu (B, C)) with biased spatial statistics of x (B, H, W, C), in float32."""
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, axis=(1, 2))
  s2 = jnp.var(x, axis=(1, 2))
  return (x - mu[:, None, None, :]) / jnp.sqrt(s2[:, None, None, :] + EPS), mu


def _standardised_channel_means(mu: Array) -> Array:
  """m = (mu - mean_c mu) / sqrt(var_c mu + eps) for channel means mu (B, C); var_c is unbiased."""
  return (mu - jnp.mean(mu, axis=-1, keepdims=True)) / jnp.sqrt(
      jnp.var(mu, axis=-1, ddof=1, keepdims=True) + EPS)


def _in_dtype(h: Array, dtype: Any) -> Array:
  """The float32 output ``h`` of a normalisation, cast to the compute ``dtype`` (``None``: kept float32)."""
  return h if dtype is None else h.astype(dtype)


class InstanceNorm2d(nn.Module):
  """Instance normalisation with a learned per-channel scale and (optionally) bias.

  Attributes:
    bias: learn an additive bias.
    dtype: dtype of the output (``None``: float32); statistics and parameters stay float32.
  """

  bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    channels = x.shape[-1]
    h = _instance_normalise(x)[0] * self.param("scale", nn.initializers.ones, (channels,))
    if self.bias:
      h = h + self.param("bias", nn.initializers.zeros, (channels,))
    return _in_dtype(h, self.dtype)


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ (NCSN): instance norm plus a learned multiple of the standardised channel means.

  Attributes:
    bias: learn an additive bias beta.
    dtype: dtype of the output (``None``: float32); statistics and parameters stay float32.
  """

  bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    channels = x.shape[-1]
    h, mu = _instance_normalise(x)
    alpha = self.param("alpha", _scale_init, (channels,))
    gamma = self.param("gamma", _scale_init, (channels,))
    h = gamma * (h + _standardised_channel_means(mu)[:, None, None, :] * alpha)
    if self.bias:
      h = h + self.param("beta", nn.initializers.zeros, (channels,))
    return _in_dtype(h, self.dtype)


class ConditionalInstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ whose gamma, alpha (and beta) are looked up by an integer label per image.

  Attributes:
    num_classes: number of label values K (for NCSN: the number of noise levels).
    bias: learn an additive bias beta per class.
    dtype: dtype of the output (``None``: float32); statistics and the table stay float32.
  """

  num_classes: int
  bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    """(B, H, W, C) and integer labels y (B,) in [0, num_classes) -> (B, H, W, C).

    Labels outside [0, num_classes) give NaN (``jnp.take``'s fill mode), never a silent wrong row.
    """
    channels = x.shape[-1]
    n_params = 3 if self.bias else 2

    def init_table(key, shape, dtype=jnp.float32):
      table = _scale_init(key, shape, dtype)
      return table.at[:, 2 * channels:].set(0.0) if self.bias else table

    rows = nn.Embed(self.num_classes, n_params * channels, embedding_init=init_table)(y)
    gamma, alpha = rows[:, :channels], rows[:, channels:2 * channels]
    h, mu = _instance_normalise(x)
    m = _standardised_channel_means(mu)
    h = gamma[:, None, None, :] * (h + m[:, None, None, :] * alpha[:, None, None, :])
    if self.bias:
      h = h + rows[:, None, None, 2 * channels:]
    return _in_dtype(h, self.dtype)


class VarianceNorm2d(nn.Module):
  """Divides by the (unbiased) spatial standard deviation, without centring; learned scale.

  Attributes:
    bias: learn an additive bias.
    dtype: dtype of the output (``None``: float32); statistics and parameters stay float32.
  """

  bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    channels = x.shape[-1]
    x = x.astype(jnp.float32)
    v2 = jnp.var(x, axis=(1, 2), ddof=1, keepdims=True)
    h = x / jnp.sqrt(v2 + EPS) * self.param("scale", _scale_init, (channels,))
    if self.bias:
      h = h + self.param("bias", nn.initializers.zeros, (channels,))
    return _in_dtype(h, self.dtype)


def _group_norm(num_features: int, name: str | None = None, dtype: Any = None) -> nn.GroupNorm:
  # The original used flax's default of 32 groups, which fails unless 32 divides C; fall back to the
  # largest divisor of C below 32 (the same layer wherever the original works). Flax computes the
  # statistics in float32 and casts the output to ``dtype``.
  groups = max(g for g in range(1, 33) if num_features % g == 0)
  return nn.GroupNorm(num_groups=groups, name=name, dtype=dtype)


# Unconditional normalisers by ``config.model.normalization`` (the original's names), as
# ``layer(num_features, name, dtype)``.
NORMALIZATIONS: dict[str, Callable[..., nn.Module]] = {
    "InstanceNorm": lambda num_features, name=None, dtype=None: InstanceNorm2d(name=name, dtype=dtype),
    "InstanceNorm++": lambda num_features, name=None, dtype=None: InstanceNorm2dPlus(name=name, dtype=dtype),
    "VarianceNorm": lambda num_features, name=None, dtype=None: VarianceNorm2d(name=name, dtype=dtype),
    "GroupNorm": _group_norm,
}
# Normalisers conditioned on an integer label (NCSN v1), by the same names.
CONDITIONAL_NORMALIZATIONS: dict[str, type[nn.Module]] = {
    "InstanceNorm++": ConditionalInstanceNorm2dPlus,
}


def get_normalization(name: str, *, conditional: bool = False, num_classes: int = 0,
                      dtype: Any = None) -> Normalizer:
  """The normaliser factory named ``name``: ``normalizer(num_features, name=None) -> nn.Module``.

  Args:
    name: ``InstanceNorm``, ``InstanceNorm++``, ``VarianceNorm`` or ``GroupNorm``; a conditional
      normaliser exists for ``InstanceNorm++`` only.
    conditional: condition on an integer label (the layer is then called as ``layer(x, y)``).
    num_classes: number of label values, for a conditional normaliser.
    dtype: dtype of the layers' outputs (``None``: float32; see ``layers.compute_dtype``); their
      statistics and parameters stay float32.

  Raises:
    ValueError: for an unknown name, or a conditional normaliser without ``num_classes``.
  """
  table = CONDITIONAL_NORMALIZATIONS if conditional else NORMALIZATIONS
  if name not in table:
    kind = "conditional normalization" if conditional else "normalization"
    raise ValueError(f"Unknown {kind} {name!r}; valid choices: {sorted(table)}. Set "
                     f"config.model.normalization to one of them.")
  if not conditional:
    layer = table[name]
    return lambda num_features, name=None: layer(num_features, name=name, dtype=dtype)
  if num_classes < 1:
    raise ValueError(f"A conditional normalization needs num_classes >= 1 label values, got "
                     f"{num_classes}.")
  cls = table[name]
  return lambda num_features, name=None: cls(num_classes=num_classes, name=name, dtype=dtype)


__all__ = ["CONDITIONAL_NORMALIZATIONS", "ConditionalInstanceNorm2dPlus", "InstanceNorm2d",
           "InstanceNorm2dPlus", "NORMALIZATIONS", "Normalizer", "VarianceNorm2d", "get_normalization"]
