"""A variational dequantiser q(u | x) for 8-bit data: a small conditional flow (Flow++-style, affine).

    n ~ Logistic(0, 1)^D,   v = f_L o ... o f_1(n; x),   u = sigmoid(v) in [0, 1)^D,
    log q(u | x) = log p(n) - sum_l log|det df_l / dv| - sum log sigmoid'(v).

Each of ``num_steps`` steps is an elementwise affine map conditioned on x, v <- v exp(a(x)) + b(x),
then an affine coupling, v <- m v + (1 - m)(v exp(a(x, m v)) + b(x, m v)), with the mask m the
parity of the flattened index (alternating between steps). The conditioners see x / 127.5 - 1: for
image-shaped data (B, H, W, C) they are 3x3 convolutions, otherwise MLPs on the flattened vector.
Their output layers start at zero, so an untrained dequantiser is the identity flow and, with the
logistic base, exactly uniform (log q = 0): training starts from uniform dequantisation.

    deq = VariationalDequantizer()
    variables = deq.init(key, jnp.zeros(shape), x)              # x (B, ...) integers 0..255
    u, log_q = deq.apply(variables, key, x, method=deq.sample_and_log_prob)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Largest float32 below 1: keeps u in [0, 1) where sigmoid rounds to 1.
_ONE_MINUS = 1.0 - 2.0**-24


class _Conditioner(nn.Module):
  """Maps inputs (each (B, *event)) to ``num_outputs`` arrays shaped (B, *event), zero at init."""

  features: int
  num_outputs: int

  @nn.compact
  def __call__(self, *inputs: Array) -> tuple[Array, ...]:
    batch, event = inputs[0].shape[0], inputs[0].shape[1:]
    if len(event) == 3:  # images: convolutions over (H, W), inputs stacked on channels
      h = jnp.concatenate(inputs, axis=-1)
      for _ in range(2):
        h = nn.silu(nn.Conv(self.features, (3, 3))(h))
      out = nn.Conv(event[-1] * self.num_outputs, (3, 3), kernel_init=nn.initializers.zeros)(h)
      out = out.reshape((batch,) + event[:-1] + (self.num_outputs, event[-1]))
      return tuple(jnp.moveaxis(out, -2, 0))
    h = jnp.concatenate([a.reshape(batch, -1) for a in inputs], axis=-1)
    for _ in range(2):
      h = nn.silu(nn.Dense(self.features)(h))
    out = nn.Dense(math.prod(event) * self.num_outputs, kernel_init=nn.initializers.zeros)(h)
    return tuple(out.reshape((batch, self.num_outputs) + event).swapaxes(0, 1))


def _logistic_logp(v: Array) -> Array:
  """Summed log density of Logistic(0, 1) (= log sigmoid'(v)) per example, (B,)."""
  return jnp.sum((-jax.nn.softplus(-v) - jax.nn.softplus(v)).reshape(v.shape[0], -1), axis=1)


def _sum(a: Array) -> Array:
  return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


class VariationalDequantizer(nn.Module):
  """q(u | x): a conditional flow from logistic noise to u in [0, 1)^D.

  Attributes:
    features: width of every conditioner (channels for images, units for vectors).
    num_steps: number of (elementwise affine, affine coupling) steps.
    max_log_scale: coupling log-scales are soft-clamped to (-max_log_scale, max_log_scale).
  """

  features: int = 32
  num_steps: int = 2
  max_log_scale: float = 3.0

  @nn.compact
  def __call__(self, noise: Array, x: Array) -> tuple[Array, Array]:
    """u = sigmoid(flow(noise; x)) (B, ...) and log q(u | x) (B,), for logistic noise (B, ...) and integer x."""
    x_in = x.astype(jnp.float32) / 127.5 - 1.0
    parity = (jnp.arange(math.prod(x.shape[1:])) % 2).reshape(x.shape[1:]).astype(jnp.float32)
    v, log_q = noise, _logistic_logp(noise)
    clamp = lambda a: self.max_log_scale * jnp.tanh(a / self.max_log_scale)
    for step in range(self.num_steps):
      # Elementwise affine map conditioned on x.
      a, b = _Conditioner(self.features, 2)(x_in)
      v, log_q = v * jnp.exp(a) + b, log_q - _sum(a)
      # Affine coupling: the unmasked half conditioned on x and the masked half.
      m = parity if step % 2 == 0 else 1.0 - parity
      a, b = _Conditioner(self.features, 2)(x_in, m * v)
      a = (1.0 - m) * clamp(a)
      v, log_q = v * jnp.exp(a) + (1.0 - m) * b, log_q - _sum(a)
    # u = sigmoid(v), with its log-Jacobian.
    u = jnp.minimum(jax.nn.sigmoid(v), _ONE_MINUS)
    return u, log_q - _logistic_logp(v)

  def sample_and_log_prob(self, key: Array, x: Array) -> tuple[Array, Array]:
    """(u (B, ...) in [0, 1), log q(u | x) (B,)); example i draws its noise from ``fold_in(key, i)``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    noise = jax.vmap(lambda k: jax.random.logistic(k, x.shape[1:]))(keys)
    return self(noise, x)


__all__ = ["VariationalDequantizer"]
