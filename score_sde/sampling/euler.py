"""Euler's method on the probability-flow ODE in the VE view: DDIM (eta = 0), DPM-Solver-1, DPM-Solver++(1).

y_{i+1} = y_i + (sigma~_{i+1} - sigma~_i) epsilon^(y_i; sigma~_i); first order, one evaluation per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp  # noqa: F401  (shared/tools/refcheck swaps each solver module's jnp)
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels

Array = jax.Array


class Step(NamedTuple):
  """Constants of step i: the point t_i, dsigma_tilde = sigma~_{i+1} - sigma~_i, and sigma~_{i+1}."""

  index: Array
  at: noise_levels.Levels
  dsigma_tilde: Array
  sigma_tilde_next: Array


def get_euler_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 50, order: int = 1,
                      time_grid: str = "quadratic", rho: float = 7.0, eps: float = 1e-3,
                      denoise: bool = False) -> fixed_budget.Sampler:
  """DDIM / Euler: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations (default 50, a common DDIM budget).
    order: 1 (the only order of this method).
    time_grid: one of ``noise_levels.TIME_GRIDS``; ``quadratic`` (uniform in sqrt(t)) is DDIM's for CIFAR-10.
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend the last evaluation on Tweedie's denoiser at eps.
  """
  steps = fixed_budget.solver_steps("euler", nfe, denoise, order, (1,))
  lv = fixed_budget.grid(sde, time_grid, steps, eps, rho)
  sigma_tilde = lv.sigma_tilde
  constants = Step(np.arange(steps), lv.take(np.s_[:-1]), sigma_tilde[1:] - sigma_tilde[:-1], sigma_tilde[1:])

  def solve(score_fn: sde_lib.ScoreFn, y: Array, constants: Step, noise_keys: Array,
            project: fixed_budget.Project) -> Array:
    del noise_keys  # Deterministic.

    def step(y, c: Step):
      d = noise_levels.noise_prediction(score_fn, y, c.at)
      return project(y + c.dsigma_tilde * d, c.index, c.sigma_tilde_next), None

    return jax.lax.scan(step, y, constants)[0]

  return fixed_budget.make_sampler(sde, shape, solve, constants, nfe=nfe, eps=eps, denoise=denoise)


__all__ = ["Step", "get_euler_sampler"]
