"""Euler's method on the probability-flow ODE in the VE view: DDIM (eta = 0).

With y = x / alpha_t and sigma~ = sigma_t / alpha_t (``noise_levels``) the ODE is
dy / dsigma~ = eps^(y; sigma~), and one Euler step from sigma~_i to sigma~_{i+1} is

    y_{i+1} = y_i + (sigma~_{i+1} - sigma~_i) eps^(y_i; sigma~_i)
            = (sigma~_{i+1} / sigma~_i) y_i + (1 - sigma~_{i+1} / sigma~_i) D(y_i; sigma~_i),

which is DDIM with eta = 0 (Song, Meng & Ermon 2021), DPM-Solver-1 and DPM-Solver++(1) (Lu et
al. 2022) at once; in x it reads x_{i+1} = (alpha_{i+1} / alpha_i) x_i - sigma_{i+1} (e^h - 1)
eps^ with h = lambda_{i+1} - lambda_i. First order: the error at eps is O(max step).
One score evaluation per step, so ``nfe`` steps (``nfe`` - 1 with the final denoising step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels, ode

Array = jax.Array


def get_euler_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 50, order: int = 1,
                      time_grid: str = "quadratic", rho: float = 7.0, eps: float = 1e-3,
                      denoise: bool = False, **unknown) -> fixed_budget.Sampler:
  """DDIM / Euler: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations (default 50, a common DDIM budget).
    order: 1 (the only order of this method).
    time_grid: one of ``noise_levels.TIME_GRIDS``; default ``quadratic``, DDIM's choice for
      CIFAR-10 (uniform in sqrt(t)).
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend the last evaluation on Tweedie's denoiser at eps.
    **unknown: rejected with a ``ValueError`` naming the valid options.
  """
  ode.reject_unknown(get_euler_sampler, unknown, "the euler sampler")
  steps = fixed_budget.solver_steps("euler", nfe, denoise, order, (1,))
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, time_grid, steps, eps, rho))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  coeffs = dict(index=jnp.arange(steps), t=f32(lv.t[:-1]), alpha=f32(lv.alpha[:-1]), sigma=f32(lv.sigma[:-1]),
                dsigma=f32(lv.sigma_tilde[1:] - lv.sigma_tilde[:-1]), s_next=f32(lv.sigma_tilde[1:]))

  def solve(score_fn: sde_lib.ScoreFn, y: Array, noise_keys: Array,
            project: fixed_budget.Project = fixed_budget.no_projection) -> Array:
    del noise_keys  # Deterministic.

    def step(y, c):
      eps_hat = noise_levels.noise_prediction(score_fn, y, c["t"], c["alpha"], c["sigma"])
      return project(y + c["dsigma"] * eps_hat, c["index"], c["s_next"]), None

    return jax.lax.scan(step, y, coeffs)[0]

  return fixed_budget.build_sampler(sde, shape, solve, nfe=nfe, eps=eps, denoise=denoise)


__all__ = ["get_euler_sampler"]
