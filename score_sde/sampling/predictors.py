"""Predictors: one reverse-time step from t to t - dt, ``x, x_mean, nfe = predictor.update(keys, x, t, dt, sde,
score_fn)``, with per-sample keys (B,); x_mean is the state before its noise. Each uses the SDE's discretisation.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib

Array = jax.Array
batch_mul = sde_lib.batch_mul


def per_sample_normal(keys: Array, event_shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Standard normal noise (B, *event_shape), row b drawn from ``keys[b]`` (B,) alone."""
  return jax.vmap(lambda k: jax.random.normal(k, event_shape, dtype))(keys)


class Predictor(Protocol):
  """The interface of every entry of ``PREDICTORS``; each holds only its own options."""

  def update(self, keys: Array, x: Array, t: Array, dt: Array | float, sde: sde_lib.SDE,
             score_fn: sde_lib.ScoreFn) -> tuple[Array, Array, int]:
    """One step from t to t - dt; returns (x, x_mean, score evaluations made)."""


@dataclasses.dataclass(frozen=True)
class EulerMaruyama:
  """x_mean = x - [f(x, t) - g(t)^2 s(x, t)] dt, x = x_mean + g(t) sqrt(dt) z, dt the grid spacing (the original
  used 1/N); ``probability_flow``: drift f - g^2 s / 2, no noise."""

  probability_flow: bool = False

  def update(self, keys, x, t, dt, sde, score_fn):
    dt = jnp.broadcast_to(jnp.asarray(dt, x.dtype), x.shape[:1])
    drift, g = sde.reverse(score_fn, self.probability_flow).sde(x, t)
    x_mean = x - batch_mul(dt, drift)
    if self.probability_flow:
      return x_mean, x_mean, 1
    noise = per_sample_normal(keys, x.shape[1:], x.dtype)
    return x_mean + batch_mul(g * jnp.sqrt(dt), noise), x_mean, 1


@dataclasses.dataclass(frozen=True)
class ReverseDiffusion:
  """The reverse of the forward chain x_t = x_{t-dt} + f_i + G_i z (Song et al. 2021, eq. 46): x_mean = x - f_i +
  G_i^2 s(x, t), x = x_mean + G_i z; ``probability_flow``: x - f_i + G_i^2 s / 2, no noise."""

  probability_flow: bool = False

  def update(self, keys, x, t, dt, sde, score_fn):
    rev_f, rev_G = sde.reverse(score_fn, self.probability_flow).discretize(x, t, dt)
    x_mean = x - rev_f
    if self.probability_flow:
      return x_mean, x_mean, 1
    noise = per_sample_normal(keys, x.shape[1:], x.dtype)
    return x_mean + batch_mul(rev_G, noise), x_mean, 1


@dataclasses.dataclass(frozen=True)
class AncestralSampling:
  """x_{t-dt} ~ p(x_{t-dt} | x_t) of the discretised chain, mean and std from ``sde.ancestral_step`` (stochastic
  by definition: no probability-flow form)."""

  def update(self, keys, x, t, dt, sde, score_fn):
    x_mean, std = sde.ancestral_step(x, t, score_fn(x, t), dt)
    noise = per_sample_normal(keys, x.shape[1:], x.dtype)
    return x_mean + batch_mul(std, noise), x_mean, 1


@dataclasses.dataclass(frozen=True)
class NonePredictor:
  """No predictor: the state is unchanged and the score is not evaluated (corrector-only sampling)."""

  def update(self, keys, x, t, dt, sde, score_fn):
    del keys, t, dt, sde, score_fn
    return x, x, 0


# Predictor classes by name, each built with the options it declares.
PREDICTORS: dict[str, type] = {
    "euler_maruyama": EulerMaruyama,
    "reverse_diffusion": ReverseDiffusion,
    "ancestral_sampling": AncestralSampling,
    "none": NonePredictor,
}
