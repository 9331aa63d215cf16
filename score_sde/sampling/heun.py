"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2): Heun's method on dy / dsigma~ = eps^(y; sigma~) with churn.

Two evaluations per step, second order; an odd budget ends with an Euler step (docs/samplers.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp  # noqa: F401  (shared/tools/refcheck swaps each solver module's jnp)
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels

Array = jax.Array


class Step(NamedTuple):
  """Constants of step i: the churned point ``hat`` (level sigma^), the std of the noise that climbs to
  it, S_noise sqrt(sigma^2 - sigma~_i^2), dsigma_tilde = sigma~_{i+1} - sigma^, and the point ``next``."""

  index: Array
  hat: noise_levels.Levels
  noise_std: Array
  dsigma_tilde: Array
  next: noise_levels.Levels
  sigma_tilde_next: Array


def get_heun_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 35, order: int = 2,
                     time_grid: str = "karras", rho: float = 7.0, eps: float = 1e-3,
                     denoise: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
                     s_tmax: float = math.inf, s_noise: float = 1.0) -> fixed_budget.Sampler:
  """EDM's Heun sampler: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  EDM's CIFAR-10 grid (Karras, rho = 7) and budget, deterministic; but ``nfe=35`` is 17 Heun steps and an
  Euler step ending at eps, while EDM's 35-evaluation sampler (last step to sigma = 0) is
  ``nfe=35, denoise=True``. EDM's ImageNet-64: ``nfe=511, s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003``.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations.
    order: 2 (Heun; first order is ``method="euler"``).
    time_grid: one of ``noise_levels.TIME_GRIDS``.
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend one evaluation on Tweedie's denoiser at eps (EDM's Euler step to sigma = 0).
    s_churn: total churn; 0 makes the sampler deterministic.
    s_tmin, s_tmax: churn only where s_tmin <= sigma~_i <= s_tmax (levels of the VE view).
    s_noise: scale of the added noise.
  """
  if order == 1:
    raise ValueError("order=1 is Euler's method: use method='euler'. heun has order=2 only; valid choices: (2,).")
  n = fixed_budget.solver_steps("heun", nfe, denoise, order, (2,))
  if not (s_churn >= 0 and s_noise >= 0 and 0 <= s_tmin <= s_tmax):
    raise ValueError(f"Need s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax; got s_churn={s_churn}, "
                     f"s_noise={s_noise}, s_tmin={s_tmin}, s_tmax={s_tmax}.")
  steps, euler_last = (n + 1) // 2, n % 2 == 1
  lv = fixed_budget.grid(sde, time_grid, steps, eps, rho)
  sigma_tilde = lv.sigma_tilde
  sigma_tilde_i = sigma_tilde[:-1]
  # Churn: gamma_i, the raised levels sigma^ = (1 + gamma_i) sigma~_i (at most sigma~(T)) and their times.
  in_range = (sigma_tilde_i >= s_tmin) & (sigma_tilde_i <= s_tmax)
  gamma = np.where(in_range, min(s_churn / steps, math.sqrt(2) - 1), 0.0)
  sigma_hat = np.minimum(sigma_tilde_i * (1 + gamma), sigma_tilde[0])
  churned = sigma_hat > sigma_tilde_i
  t_hat = np.where(churned, noise_levels.times_of_lambda(sde, -np.log(sigma_hat), eps, sde.T), lv.t[:-1])
  hat = noise_levels.levels(sde, t_hat)
  sigma_hat = np.where(churned, hat.sigma_tilde, sigma_tilde_i)
  constants = Step(np.arange(steps), hat, s_noise * np.sqrt(np.maximum(sigma_hat**2 - sigma_tilde_i**2, 0.0)),
                   sigma_tilde[1:] - sigma_hat, lv.take(np.s_[1:]), sigma_tilde[1:])
  stochastic = bool(np.any(churned)) and s_noise > 0

  def solve(score_fn: sde_lib.ScoreFn, y: Array, constants: Step, noise_keys: Array,
            project: fixed_budget.Project) -> Array:

    def step(y, c: Step, correct: bool):
      # Increase noise temporarily, from sigma~_i to sigma^.
      if stochastic:
        y = y + c.noise_std * fixed_budget.step_noise(noise_keys, c.index, y.shape[1:])
      # Euler step from sigma^ to sigma~_{i+1}.
      d = noise_levels.noise_prediction(score_fn, y, c.hat)
      y_next = y + c.dsigma_tilde * d
      # Second-order correction.
      if correct:
        d_prime = noise_levels.noise_prediction(score_fn, y_next, c.next)
        y_next = y + c.dsigma_tilde * 0.5 * (d + d_prime)
      return project(y_next, c.index, c.sigma_tilde_next)

    heun_steps = steps - 1 if euler_last else steps
    y = jax.lax.scan(lambda y, c: (step(y, c, True), None), y, jax.tree.map(lambda a: a[:heun_steps], constants))[0]
    if euler_last:
      y = step(y, jax.tree.map(lambda a: a[-1], constants), False)
    return y

  return fixed_budget.make_sampler(sde, shape, solve, constants, nfe=nfe, eps=eps, denoise=denoise,
                                    stochastic=stochastic)


__all__ = ["Step", "get_heun_sampler"]
