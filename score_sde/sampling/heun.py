"""EDM's second-order sampler (Karras et al. 2022, Alg. 2): Heun's method in the VE view, with churn.

In the VE view (``noise_levels``) the probability-flow ODE is dy / dsigma~ = eps^(y; sigma~), the
EDM ODE dx/dsigma = (x - D) / sigma with s = alpha, sigma = sigma~. Step i, from sigma~_i to
sigma~_{i+1}:

1. churn (optional): gamma_i = min(S_churn / M, sqrt(2) - 1) where S_tmin <= sigma~_i <= S_tmax,
   else 0; sigma^ = (1 + gamma_i) sigma~_i (capped at sigma~(T), where the SDE ends);
   y^ = y_i + sqrt(sigma^2 - sigma~_i^2) S_noise z: noise is added to climb to the level sigma^;
2. Euler: d = eps^(y^; sigma^), y' = y^ + (sigma~_{i+1} - sigma^) d;
3. Heun correction: y_{i+1} = y^ + (sigma~_{i+1} - sigma^) (d + eps^(y'; sigma~_{i+1})) / 2.

Two evaluations per step, second order. A budget of n evaluations gives ceil(n / 2) steps; when n
is odd the last step is a plain Euler step (as EDM's, whose last step to sigma = 0 is Euler: 18
steps make 35 NFE). Here the grid ends at eps > 0, so an even budget corrects every step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels, ode

Array = jax.Array


def get_heun_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 35, order: int = 2,
                     time_grid: str = "karras", rho: float = 7.0, eps: float = 1e-3,
                     denoise: bool = False, s_churn: float = 0.0, s_tmin: float = 0.0,
                     s_tmax: float = math.inf, s_noise: float = 1.0, **unknown) -> fixed_budget.Sampler:
  """EDM's Heun sampler: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  Defaults are EDM's for unconditional CIFAR-10: the Karras grid with rho = 7, 35 evaluations
  (18 steps), deterministic (``s_churn=0``). ImageNet-64 used s_churn=40, s_tmin=0.05, s_tmax=50,
  s_noise=1.003 with 511 evaluations.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations.
    order: 2 (Heun; first order is ``method="euler"``).
    time_grid: one of ``noise_levels.TIME_GRIDS``.
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend one evaluation on Tweedie's denoiser at eps.
    s_churn: total churn; 0 makes the sampler deterministic.
    s_tmin, s_tmax: churn only where s_tmin <= sigma~_i <= s_tmax (levels of the VE view).
    s_noise: scale of the added noise.
    **unknown: rejected with a ``ValueError`` naming the valid options.
  """
  ode.reject_unknown(get_heun_sampler, unknown, "the heun sampler")
  if order == 1:
    raise ValueError("order=1 is Euler's method: use method='euler'. heun has order=2 only; valid choices: (2,).")
  n = fixed_budget.solver_steps("heun", nfe, denoise, order, (2,))
  if not (s_churn >= 0 and s_noise >= 0 and 0 <= s_tmin <= s_tmax):
    raise ValueError(f"Need s_churn >= 0, s_noise >= 0 and 0 <= s_tmin <= s_tmax; got s_churn={s_churn}, "
                     f"s_noise={s_noise}, s_tmin={s_tmin}, s_tmax={s_tmax}.")
  steps = (n + 1) // 2
  euler_last = n % 2 == 1
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, time_grid, steps, eps, rho))
  s = lv.sigma_tilde

  # Churn: the raised levels sigma^_i and their times.
  in_range = (s[:-1] >= s_tmin) & (s[:-1] <= s_tmax)
  gamma = np.where(in_range, min(s_churn / steps, math.sqrt(2) - 1), 0.0)
  s_hat = np.minimum(s[:-1] * (1 + gamma), s[0])
  churned = s_hat > s[:-1]
  t_hat = np.where(churned, noise_levels.times_of_lambda(sde, -np.log(s_hat), eps, sde.T), lv.t[:-1])
  hat = noise_levels.levels(sde, t_hat)
  s_hat = np.where(churned, hat.sigma_tilde, s[:-1])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  coeffs = dict(index=jnp.arange(steps), t=f32(t_hat), alpha=f32(hat.alpha), sigma=f32(hat.sigma),
                noise=f32(s_noise * np.sqrt(np.maximum(s_hat**2 - s[:-1] ** 2, 0.0))),
                ds=f32(s[1:] - s_hat), t_next=f32(lv.t[1:]), alpha_next=f32(lv.alpha[1:]),
                sigma_next=f32(lv.sigma[1:]), s_next=f32(s[1:]))
  stochastic = bool(np.any(churned)) and s_noise > 0
  event_shape = tuple(shape[1:])

  def solve(score_fn: sde_lib.ScoreFn, y: Array, noise_keys: Array,
            project: fixed_budget.Project = fixed_budget.no_projection) -> Array:

    def step(y, c, correct: bool):
      # Churn: climb from sigma~_i to sigma^ by adding noise.
      if stochastic:
        y = y + c["noise"] * fixed_budget.step_noise(noise_keys, c["index"], event_shape)
      # Euler step from sigma^ to sigma~_{i+1}.
      d = noise_levels.noise_prediction(score_fn, y, c["t"], c["alpha"], c["sigma"])
      y_next = y + c["ds"] * d
      if correct:  # Heun correction with the slope at the end of the step.
        d_next = noise_levels.noise_prediction(score_fn, y_next, c["t_next"], c["alpha_next"], c["sigma_next"])
        y_next = y + c["ds"] * 0.5 * (d + d_next)
      return project(y_next, c["index"], c["s_next"])

    heun_steps = steps - 1 if euler_last else steps
    head = jax.tree.map(lambda a: a[:heun_steps], coeffs)
    y = jax.lax.scan(lambda y, c: (step(y, c, True), None), y, head)[0]
    if euler_last:
      y = step(y, jax.tree.map(lambda a: a[-1], coeffs), False)
    return y

  return fixed_budget.build_sampler(sde, shape, solve, nfe=nfe, eps=eps, denoise=denoise, stochastic=stochastic)


__all__ = ["get_heun_sampler"]
