"""Single-step DPM-Solver-1, -2, -3 (Lu et al. 2022, Alg. 1 and 2) on the noise prediction, in the VE view.

With h = lambda_t - lambda_s: y_t = y_s - sigma~_t (e^h - 1) epsilon^_s - (higher-order terms through the
intermediate points s_k = t_lambda(lambda_s + r_k h)). A budget is spent as the authors' DPM-Solver-fast.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp  # noqa: F401  (shared/tools/refcheck swaps each solver module's jnp)
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels
from score_sde.sampling.noise_levels import phi

Array = jax.Array

ORDERS = (1, 2, 3)
SOLVER_TYPES = ("taylor", "midpoint")
R = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}  # r_k of the intermediate points of an order-q step.


class Step(NamedTuple):
  """Constants of one step from s to t: the points s, s1, s2 and the weights of the update (float64 on the host).

  phi_1 = sigma~_t (e^h - 1); phi_11 = sigma~_s1 (e^{r1 h} - 1); phi_12 = sigma~_s2 (e^{r2 h} - 1);
  phi_22 = sigma~_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1); phi_2 = sigma~_t ((e^h - 1) / h - 1) / r_last
  (taylor; order 3 always) or sigma~_t (e^h - 1) / (2 r1) (midpoint, order 2).
  """

  index: Array
  sigma_tilde_t: Array
  s: noise_levels.Levels
  phi_1: Array
  s1: noise_levels.Levels | None = None
  phi_11: Array | None = None
  phi_2: Array | None = None
  s2: noise_levels.Levels | None = None
  phi_12: Array | None = None
  phi_22: Array | None = None


def step_orders(n: int, order: int) -> list[int]:
  """The orders of the steps that spend exactly ``n`` evaluations (DPM-Solver-fast's pattern)."""
  if order == 1:
    return [1] * n
  if order == 2:
    return [2] * (n // 2) + [1] * (n % 2)
  tail = {0: [2, 1], 1: [1], 2: [2]}[n % 3]
  return [3] * ((n - sum(tail)) // 3) + tail


def _constants(sde: sde_lib.SDE, lv: noise_levels.Levels, orders: list[int], eps: float,
               solver_type: str) -> list[Step]:
  """The ``Step`` of each step, float64."""
  out = []
  for i, q in enumerate(orders):
    h = lv.lam[i + 1] - lv.lam[i]
    sigma_tilde_t = lv.sigma_tilde[i + 1]
    c = Step(i, sigma_tilde_t, lv.take(i), phi_1=sigma_tilde_t * h * phi(1, h))
    if q >= 2:
      r = R[q]
      mid = noise_levels.levels(sde, noise_levels.times_of_lambda(sde, lv.lam[i] + np.array(r) * h, eps, sde.T))
      if solver_type == "midpoint" and q == 2:
        phi_2 = sigma_tilde_t * h * phi(1, h) / (2 * r[0])
      else:
        phi_2 = sigma_tilde_t * h**2 * phi(2, h) / (r[-1] * h)
      c = c._replace(s1=mid.take(0), phi_11=mid.sigma_tilde[0] * r[0] * h * phi(1, r[0] * h), phi_2=phi_2)
    if q == 3:
      r1, r2 = r
      c = c._replace(s2=mid.take(1), phi_12=mid.sigma_tilde[1] * r2 * h * phi(1, r2 * h),
                     phi_22=mid.sigma_tilde[1] * (r2 * h) ** 2 * phi(2, r2 * h) / (r1 * h))
    out.append(c)
  return out


def _step(score_fn: sde_lib.ScoreFn, y: Array, c: Step, order: int) -> Array:
  """DPM-Solver-``order`` from s to t."""
  model_s = noise_levels.noise_prediction(score_fn, y, c.s)
  if order == 1:
    return y - c.phi_1 * model_s
  u_1 = y - c.phi_11 * model_s
  model_s1 = noise_levels.noise_prediction(score_fn, u_1, c.s1)
  if order == 2:
    return y - c.phi_1 * model_s - c.phi_2 * (model_s1 - model_s)
  u_2 = y - c.phi_12 * model_s - c.phi_22 * (model_s1 - model_s)
  model_s2 = noise_levels.noise_prediction(score_fn, u_2, c.s2)
  return y - c.phi_1 * model_s - c.phi_2 * (model_s2 - model_s)


def get_dpm_solver_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 20, order: int = 3,
                           time_grid: str = "logsnr", rho: float = 7.0, eps: float = 1e-3,
                           denoise: bool = False, solver_type: str = "taylor") -> fixed_budget.Sampler:
  """Single-step DPM-Solver: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  The authors' unconditional defaults: order 3 ("DPM-Solver-fast"), log-SNR grid, 20 evaluations. Departures:
  the default ``solver_type="taylor"`` is the authors' ``taylor`` at order 2 but their ``dpmsolver`` form for
  order-3 steps (no one authors' setting); ``"midpoint"`` is their default ``dpmsolver`` at every order. On
  grids other than ``logsnr`` the steps and intermediate points differ from theirs (docs/samplers.md).

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations (at least ``order``, plus one with ``denoise``).
    order: 1, 2 or 3.
    time_grid: one of ``noise_levels.TIME_GRIDS`` (of the steps; intermediate points uniform in lambda).
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend one evaluation on Tweedie's denoiser at eps.
    solver_type: the order-2 steps' weight phi_2, ``taylor`` (exact) or ``midpoint`` (the paper's DPM-Solver-2).
  """
  n = fixed_budget.solver_steps("dpm_solver", nfe, denoise, order, ORDERS)
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"Unknown solver_type {solver_type!r}; valid choices: {SOLVER_TYPES} ('midpoint' is the "
                     f"authors' 'dpmsolver').")
  orders = step_orders(n, order)
  per_step = _constants(sde, fixed_budget.grid(sde, time_grid, len(orders), eps, rho), orders, eps, solver_type)
  # Runs of equal order, each a scan over its stacked constants.
  run_orders = [q for q, _ in itertools.groupby(orders)]
  ends = np.cumsum([0] + [len(list(g)) for _, g in itertools.groupby(orders)])
  constants = tuple(fixed_budget.stack(per_step[a:b]) for a, b in zip(ends[:-1], ends[1:]))

  def solve(score_fn: sde_lib.ScoreFn, y: Array, constants: tuple[Step, ...], noise_keys: Array,
            project: fixed_budget.Project) -> Array:
    del noise_keys  # Deterministic.
    for q, run in zip(run_orders, constants):
      y = jax.lax.scan(lambda y, c, q=q: (project(_step(score_fn, y, c, q), c.index, c.sigma_tilde_t), None),
                       y, run)[0]
    return y

  return fixed_budget.make_sampler(sde, shape, solve, constants, nfe=nfe, eps=eps, denoise=denoise)


__all__ = ["ORDERS", "SOLVER_TYPES", "get_dpm_solver_sampler", "step_orders"]
