"""Correctors: Langevin MCMC steps that move x_t towards p_t at a fixed time t.

A corrector is a frozen dataclass holding its build-time options, with one pure method,

    x, x_mean, nfe = corrector.update(keys, x, t, dt, sde, score_fn)

where ``keys`` (B,) are per-sample PRNG keys, ``x`` (B, ...) is the state at time ``t`` (B,) and
``dt`` the sampler's grid step (the corrector stays at t; dt only sets the VP alpha_i). Each runs
``n_steps`` Langevin steps

    x_mean = x + eps s(x, t),    x = x_mean + sqrt(2 eps) z,    z ~ N(0, I),

and returns the last x, the last x_mean and the number of score evaluations (n_steps). The
Langevin step size carries the factor alpha_i = ``sde.langevin_alpha(t, dt)`` of the original
(1 - beta_i for VP, 1 for VE, the same a^2 of the grid chain for subVP).

Step-size rules (``step_rule``, Langevin only; ALD's step depends on t alone):
* ``"batch"`` (the original's): eps = 2 alpha_i (snr mean_b |z_b| / mean_b |s_b|)^2, one step
  for the whole batch. The mean is a plain ``jnp.mean`` over the batch axis; under a sharded
  ``jit`` it is the global batch mean, with no device axis named here.
* ``"per_sample"``: each sample its own eps_b, so a sample does not depend on the batch it is
  drawn in; with a guard for samples at a mode (see ``Langevin``).
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
  """The interface of every entry of ``CORRECTORS``."""

  def update(self, keys: Array, x: Array, t: Array, dt: Array | float, sde: sde_lib.SDE,
             score_fn: sde_lib.ScoreFn) -> tuple[Array, Array, int]:
    """n_steps Langevin steps at time t; returns (x, x_mean, score evaluations made)."""


def _check_options(snr: float, n_steps: int, step_rule: str) -> None:
  if not snr > 0:
    raise ValueError(f"snr must be positive (typically 0.05-0.2), got {snr}.")
  if int(n_steps) != n_steps or n_steps < 1:
    raise ValueError(f"n_steps (corrector steps per grid point) must be a positive integer, got {n_steps}.")
  if step_rule not in STEP_RULES:
    raise ValueError(f"Unknown step_rule {step_rule!r}; valid choices: {STEP_RULES}.")


def _flat_norm(v: Array) -> Array:
  """Per-sample L2 norm of v (B, ...); (B,)."""
  return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=1)


def _langevin_steps(keys: Array, x: Array, t: Array, n_steps: int, score_fn: sde_lib.ScoreFn,
                    step_size: Callable[[Array, Array], Array]) -> tuple[Array, Array]:
  """Runs n_steps of x <- x + eps s + sqrt(2 eps) z with eps = step_size(s, z) (B,)."""
  # The noise of all n_steps at once (one draw compiles faster than one per step; it holds
  # n_steps states), (n_steps, B, ...): row b of each from keys[b] alone.
  zs = jnp.moveaxis(per_sample_normal(keys, (n_steps,) + x.shape[1:], x.dtype), 1, 0)

  def body(carry, z):
    x, _ = carry
    s = score_fn(x, t)
    eps = step_size(s, z)
    x_mean = x + batch_mul(eps, s)
    return (x_mean + batch_mul(jnp.sqrt(2.0 * eps), z), x_mean), None

  return jax.lax.scan(body, (x, x), zs)[0]


def _mean_chi(d: int) -> float:
  """E|z| for z ~ N(0, I_d): sqrt(2) Gamma((d + 1) / 2) / Gamma(d / 2)."""
  return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


@dataclasses.dataclass(frozen=True)
class Langevin:
  """Langevin corrector with the signal-to-noise step size of Song et al. (2021), Alg. 4/5.

  eps = 2 alpha_i (snr |z| / |s|)^2 makes the score move |eps s| about snr times the noise
  |sqrt(2 eps) z|. The batch rule uses the batch means of |z_b| and |s_b| (the original).

  The per-sample rule is eps_b = alpha_i min(2 (snr E|z| / |s_b|)^2, sigma_t^2):
  * Numerator. The batch mean of |z_b| estimates E|z| = sqrt(2) Gamma((D+1)/2) / Gamma(D/2),
    which is known, so it is used as is: a step that grew with the sample's own |z_b|^2 would
    make the injected noise sqrt(2 eps_b) z_b heavy-tailed in low dimension.
  * Guard. At a mode of p_t, |s_b| -> 0 and the unguarded step is unbounded: the sample is
    thrown away. The cap comes from the noise level alone, for any data: since
    x_t = alpha_t x_0 + sigma_t eps, grad^2 log p_t = -I / sigma_t^2 + Cov[alpha_t x_0 | x_t] /
    sigma_t^4, so the curvature of -log p_t is at most 1 / sigma_t^2. With eps <= sigma_t^2 the
    drift step x + eps s never overshoots a mode (locally x - mu -> (I - eps H)(x - mu) with
    0 <= eps H <= I), and the noise std sqrt(2 eps) stays within sqrt(2) local std of p_t. The cap
    is the ALD step at snr = 1/sqrt(2); by Stam's inequality (E|s|^2 <= D / sigma_t^2) the batch
    rule never goes below 2 alpha_i snr^2 sigma_t^2, so the cap binds only where the score is
    atypically small (near modes) or p_t is much smoother than sigma_t. (A floor
    |s_b| >= sqrt(D) / S_t with S_t^2 = alpha_t^2 + sigma_t^2, the Cramér–Rao bound for unit-scale
    data, would bound eps_b by the largest step the batch rule can take; it was rejected because
    at a mode of any structure narrower than S_t that step is still many times the local
    variance: for a component of std 0.05 under VP at t = 0.01, 9 times, a kick of 4 local stds.)
  * Limitation. eps_b depends on the sample's position, and Langevin with a position-dependent
    step and no grad-eps drift has a biased stationary law. The bias vanishes in high dimension,
    where |s_b|^2 / E|s|^2 = 1 + O(D^-1/2) and the two rules agree; in low dimension use the batch
    rule or ALD.

  Attributes:
    snr: target signal-to-noise ratio (0.16 in the paper's CIFAR-10 VE runs).
    n_steps: Langevin steps per call.
    step_rule: ``"batch"`` or ``"per_sample"`` (see the module docstring).
  """

  snr: float = 0.16
  n_steps: int = 1
  step_rule: str = "batch"

  def __post_init__(self):
    _check_options(self.snr, self.n_steps, self.step_rule)

  def step_size(self, s: Array, z: Array, t: Array, dt: Array | float, sde: sde_lib.SDE) -> Array:
    """eps (B,) for scores s and noise z (B, ...) at times t (B,)."""
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
  """Annealed Langevin dynamics (NCSN; Song & Ermon 2019): eps = 2 alpha_i (snr sigma_t)^2.

  sigma_t is the std of the perturbation kernel x_t | x_0 (``sde.alpha_sigma``) for every SDE,
  including VP and subVP, where it is the level the original uses. It is the right level in the
  coordinates x_t the sampler moves in: -grad^2 log p_t <= I / sigma_t^2 for any data, so the
  step is stable whatever the data. (The level sigma_t / alpha_t of the rescaled variable
  x_t / alpha_t would be 1 / alpha_t^2 too large, ~2e4 at t = 1 for VP with beta_max = 20.)
  The step depends on t alone, so it is per-sample under either ``step_rule``.

  Attributes:
    snr: the step's scale relative to sigma_t.
    n_steps: Langevin steps per call.
    step_rule: accepted for a uniform interface; has no effect.
  """

  snr: float = 0.16
  n_steps: int = 1
  step_rule: str = "batch"

  def __post_init__(self):
    _check_options(self.snr, self.n_steps, self.step_rule)

  def step_size(self, t: Array, dt: Array | float, sde: sde_lib.SDE) -> Array:
    """eps (B,) at times t (B,)."""
    _, sigma_t = sde.alpha_sigma(t)
    return 2.0 * sde.langevin_alpha(t, dt) * (self.snr * sigma_t) ** 2

  def update(self, keys, x, t, dt, sde, score_fn):
    eps = self.step_size(t, dt, sde)
    x, x_mean = _langevin_steps(keys, x, t, self.n_steps, score_fn, lambda s, z: eps)
    return x, x_mean, self.n_steps


@dataclasses.dataclass(frozen=True)
class NoneCorrector:
  """No corrector: the state is unchanged and the score is not evaluated (predictor-only sampling)."""

  snr: float = 0.16
  n_steps: int = 1
  step_rule: str = "batch"

  def __post_init__(self):
    _check_options(self.snr, self.n_steps, self.step_rule)

  def update(self, keys, x, t, dt, sde, score_fn):
    del keys, t, dt, sde, score_fn
    return x, x, 0


# Corrector classes by name; each is built as CORRECTORS[name](snr=..., n_steps=..., step_rule=...).
CORRECTORS: dict[str, type] = {
    "langevin": Langevin,
    "ald": AnnealedLangevin,
    "none": NoneCorrector,
}
