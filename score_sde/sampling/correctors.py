"""Correctors: Langevin steps at a fixed time t, ``x, x_mean, nfe = corrector.update(keys, x, t, dt, sde,
score_fn)``: x_mean = x + step s(x, t), x = x_mean + sqrt(2 step) z, n_steps times (dt only sets the VP alpha_i).
Step-size rules and their derivation: ``docs/samplers.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling.predictors import per_sample_normal

Array = jax.Array
batch_mul = sde_lib.batch_mul

STEP_RULES = ("batch", "per_sample")


class Corrector(Protocol):
  """The interface of every entry of ``CORRECTORS``; each holds only its own options."""

  def update(self, keys: Array, x: Array, t: Array, dt: Array | float, sde: sde_lib.SDE,
             score_fn: sde_lib.ScoreFn) -> tuple[Array, Array, int]:
    """n_steps Langevin steps at time t; returns (x, x_mean, score evaluations made)."""


def _check_options(snr: float, n_steps: int) -> None:
  if not snr > 0:
    raise ValueError(f"snr must be positive (typically 0.05-0.2), got {snr}.")
  if int(n_steps) != n_steps or n_steps < 1:
    raise ValueError(f"n_steps (corrector steps per grid point) must be a positive integer, got {n_steps}.")


def _flat_norm(v: Array) -> Array:
  """Per-sample L2 norm of v (B, ...); (B,)."""
  return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=1)


def _langevin_steps(keys: Array, x: Array, t: Array, n_steps: int, score_fn: sde_lib.ScoreFn,
                    step_size: Callable[[Array, Array], Array]) -> tuple[Array, Array]:
  """n_steps of x <- x + step s + sqrt(2 step) z, step = step_size(s, z) (B,); returns (x, x_mean)."""
  # All the noise at once, (n_steps, B, ...), row b from keys[b] alone (one draw compiles faster).
  zs = jnp.moveaxis(per_sample_normal(keys, (n_steps,) + x.shape[1:], x.dtype), 1, 0)

  def body(carry, z):
    x, _ = carry
    s = score_fn(x, t)
    step = step_size(s, z)
    x_mean = x + batch_mul(step, s)
    return (x_mean + batch_mul(jnp.sqrt(2.0 * step), z), x_mean), None

  return jax.lax.scan(body, (x, x), zs)[0]


def _mean_chi(d: int) -> float:
  """E|z| for z ~ N(0, I_d): sqrt(2) Gamma((d + 1) / 2) / Gamma(d / 2)."""
  return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


@dataclasses.dataclass(frozen=True)
class Langevin:
  """Langevin with the signal-to-noise step of Song et al. (2021), Alg. 4/5: step = 2 alpha_i (snr |z| / |s|)^2.

  ``step_rule``: ``batch`` (the original's: batch means of |z_b| and |s_b|, one step for the batch) or
  ``per_sample`` (alpha_i min(2 (snr E|z| / |s_b|)^2, sigma_t^2), derived in ``docs/samplers.md``).
  """

  snr: float = 0.16
  n_steps: int = 1
  step_rule: str = "batch"

  def __post_init__(self):
    _check_options(self.snr, self.n_steps)
    if self.step_rule not in STEP_RULES:
      raise ValueError(f"Unknown step_rule {self.step_rule!r}; valid choices: {STEP_RULES}.")

  def step_size(self, s: Array, z: Array, t: Array, dt: Array | float, sde: sde_lib.SDE) -> Array:
    """The step (B,) for scores s and noise z (B, ...) at times t (B,)."""
    alpha_i = sde.langevin_alpha(t, dt)
    s_norm = _flat_norm(s)
    if self.step_rule == "batch":
      return 2.0 * alpha_i * (self.snr * jnp.mean(_flat_norm(z)) / jnp.mean(s_norm)) ** 2
    _, sigma_t = sde.alpha_sigma(t)
    unguarded = 2.0 * (self.snr * _mean_chi(math.prod(s.shape[1:])) / s_norm) ** 2
    return alpha_i * jnp.minimum(unguarded, sigma_t**2)

  def update(self, keys, x, t, dt, sde, score_fn):
    x, x_mean = _langevin_steps(keys, x, t, self.n_steps, score_fn,
                                lambda s, z: self.step_size(s, z, t, dt, sde))
    return x, x_mean, self.n_steps


@dataclasses.dataclass(frozen=True)
class AnnealedLangevin:
  """Annealed Langevin dynamics (NCSN; Song & Ermon 2019): step = 2 alpha_i (snr sigma_t)^2, sigma_t the kernel's
  std (per sample: it depends on t alone)."""

  snr: float = 0.16
  n_steps: int = 1

  def __post_init__(self):
    _check_options(self.snr, self.n_steps)

  def step_size(self, t: Array, dt: Array | float, sde: sde_lib.SDE) -> Array:
    """The step (B,) at times t (B,)."""
    _, sigma_t = sde.alpha_sigma(t)
    return 2.0 * sde.langevin_alpha(t, dt) * (self.snr * sigma_t) ** 2

  def update(self, keys, x, t, dt, sde, score_fn):
    step = self.step_size(t, dt, sde)
    x, x_mean = _langevin_steps(keys, x, t, self.n_steps, score_fn, lambda s, z: step)
    return x, x_mean, self.n_steps


@dataclasses.dataclass(frozen=True)
class NoneCorrector:
  """No corrector: the state is unchanged and the score is not evaluated (predictor-only sampling)."""

  def update(self, keys, x, t, dt, sde, score_fn):
    del keys, t, dt, sde, score_fn
    return x, x, 0


# Corrector classes by name, each built with the options it declares.
CORRECTORS: dict[str, type] = {
    "langevin": Langevin,
    "ald": AnnealedLangevin,
    "none": NoneCorrector,
}
