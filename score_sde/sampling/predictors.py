"""Predictors: one step of a reverse-time sampler, from time t to t - dt.

A predictor is a frozen dataclass holding its build-time options, with one pure method,

    x, x_mean, nfe = predictor.update(keys, x, t, dt, sde, score_fn)

where ``keys`` (B,) are per-sample PRNG keys (sample b's noise comes from ``keys[b]`` alone),
``x`` (B, ...) is the state at time ``t`` (B,), ``dt > 0`` is the step length (scalar or (B,)),
``x_mean`` is the new state before its noise was added (what ``denoise`` returns after the last
step) and ``nfe`` is the number of score evaluations the step made (a Python int).

All steps use the SDE's discretisation between t - dt and t (``sde.discretize``,
``sde.ancestral_step``), so one predictor serves VP, subVP and VE, and a step that reaches
t - dt <= 0 lands on clean data.
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
  """The interface of every entry of ``PREDICTORS``."""

  def update(self, keys: Array, x: Array, t: Array, dt: Array | float, sde: sde_lib.SDE,
             score_fn: sde_lib.ScoreFn) -> tuple[Array, Array, int]:
    """One step from t to t - dt; returns (x, x_mean, score evaluations made)."""


@dataclasses.dataclass(frozen=True)
class EulerMaruyama:
  """Euler–Maruyama on the reverse SDE, with the sampler's own step length dt.

  x_mean = x - [f(x, t) - g(t)^2 s(x, t)] dt,  x = x_mean + g(t) sqrt(dt) z.

  With ``probability_flow`` the drift is f - g^2 s / 2 and no noise is added. (The original
  used dt = 1/N whatever the grid; here dt is the grid spacing.)
  """

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
  """The reverse of the SDE's discretised forward chain (Song et al. 2021, eq. 46).

  With x_t = x_{t-dt} + f_i + G_i z the forward step, x_mean = x - f_i + G_i^2 s(x, t) and
  x = x_mean + G_i z; with ``probability_flow``, x = x - f_i + G_i^2 s / 2 and no noise.
  """

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
  """Ancestral sampling of the discretised chain: x_{t-dt} ~ p(x_{t-dt} | x_t) with x_0 from Tweedie.

  The posterior mean and std come from ``sde.ancestral_step`` (DDPM's rule for VP, SMLD's for VE,
  the same construction for subVP). The step is stochastic by definition, so it has no
  probability-flow form.
  """

  probability_flow: bool = False

  def __post_init__(self):
    if self.probability_flow:
      raise ValueError("Ancestral sampling has no probability-flow form; use predictor='reverse_diffusion' "
                       "or 'euler_maruyama' with probability_flow=True, or set probability_flow=False.")

  def update(self, keys, x, t, dt, sde, score_fn):
    x_mean, std = sde.ancestral_step(x, t, score_fn(x, t), dt)
    noise = per_sample_normal(keys, x.shape[1:], x.dtype)
    return x_mean + batch_mul(std, noise), x_mean, 1


@dataclasses.dataclass(frozen=True)
class NonePredictor:
  """No predictor: the state is unchanged and the score is not evaluated (corrector-only sampling)."""

  probability_flow: bool = False

  def update(self, keys, x, t, dt, sde, score_fn):
    del keys, t, dt, sde, score_fn
    return x, x, 0


# Predictor classes by name; each is built as PREDICTORS[name](probability_flow=...).
PREDICTORS: dict[str, type] = {
    "euler_maruyama": EulerMaruyama,
    "reverse_diffusion": ReverseDiffusion,
    "ancestral_sampling": AncestralSampling,
    "none": NonePredictor,
}
