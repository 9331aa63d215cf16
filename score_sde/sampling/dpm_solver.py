"""DPM-Solver (Lu et al. 2022): single-step exponential integrators of orders 1-3, noise prediction.

In the VE view (``noise_levels``) the probability-flow ODE in lambda = -log sigma~ reads
dy/dlambda = -sigma~ eps^(y, lambda), so with h = lambda_t - lambda_s the exact step is

    y_t = y_s - int_{lambda_s}^{lambda_t} e^{-lambda} eps^(y_lambda, lambda) dlambda,

and expanding eps^ in lambda around lambda_s gives
y_t = y_s - sum_k sigma~_t h^{k+1} phi_{k+1}(h) eps^{(k)}(lambda_s), phi_k the exponential-integrator
weights (``noise_levels.phi``). A step of order q evaluates eps^ at q points of [s, t):

* DPM-Solver-1: y_t = y_s - sigma~_t h phi_1(h) eps_s (= DDIM);
* DPM-Solver-2 (r_1 = 1/2): u = first-order step to s_1 = s + r_1 h (in lambda),
  y_t = y_s - sigma~_t h phi_1(h) eps_s - sigma~_t h^2 phi_2(h) (eps(u, s_1) - eps_s) / (r_1 h);
* DPM-Solver-3 (r_1 = 1/3, r_2 = 2/3): u_1 as above to s_1; u_2 = the second-order step to s_2
  with the slope (eps(u_1, s_1) - eps_s) / (r_1 h); then
  y_t = y_s - sigma~_t h phi_1(h) eps_s - sigma~_t h^2 phi_2(h) (eps(u_2, s_2) - eps_s) / (r_2 h),
  third order because r_2 = 2/3 cancels the phi_3 term.

The second-order terms use phi_2 exactly (the authors' ``solver_type="taylor"``). A budget of n
evaluations is spent as the authors' "DPM-Solver-fast": order 3 gives steps of orders
[3, ..., 3, 2, 1] (n = 0 mod 3), [3, ..., 3, 1] (1 mod 3) or [3, ..., 3, 2] (2 mod 3); order 2
gives [2, ..., 2] or [2, ..., 2, 1]; order 1 gives n steps. So the last steps have lower order and
the count is exact. Each run of equal orders is one ``lax.scan``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels, ode

Array = jax.Array

ORDERS = (1, 2, 3)
# Intermediate points (fractions of the step in lambda) of the order-q steps.
_R = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def step_orders(n: int, order: int) -> list[int]:
  """The orders of the steps that spend exactly ``n`` evaluations (DPM-Solver-fast's pattern)."""
  if order == 1:
    return [1] * n
  if order == 2:
    return [2] * (n // 2) + [1] * (n % 2)
  tail = {0: [2, 1], 1: [1], 2: [2]}[n % 3]
  return [3] * ((n - sum(tail)) // 3) + tail


def _coefficients(sde: sde_lib.SDE, grid: np.ndarray, orders: list[int], eps: float) -> list[dict]:
  """Per-step float64 constants: the nodes where eps^ is evaluated and the update weights."""
  lv = noise_levels.levels(sde, grid)
  out = []
  for i, q in enumerate(orders):
    lam_s, lam_t = lv.lam[i], lv.lam[i + 1]
    h = lam_t - lam_s
    r = _R[q]
    mid = noise_levels.levels(sde, noise_levels.times_of_lambda(sde, lam_s + np.array(r) * h, eps, sde.T)) if r else None
    c = dict(index=i, s_next=lv.sigma_tilde[i + 1], t=lv.t[i], alpha=lv.alpha[i], sigma=lv.sigma[i],
             a0=lv.sigma_tilde[i + 1] * h * noise_levels.phi(1, h))
    if q >= 2:
      # First-order move to s_1, and the final slope weight (through s_1 for order 2, s_2 for order 3).
      c.update(t1=mid.t[0], alpha1=mid.alpha[0], sigma1=mid.sigma[0],
               b0=mid.sigma_tilde[0] * r[0] * h * noise_levels.phi(1, r[0] * h),
               a1=lv.sigma_tilde[i + 1] * h**2 * noise_levels.phi(2, h) / (r[-1] * h))
    if q == 3:
      r1, r2 = r
      c.update(t2=mid.t[1], alpha2=mid.alpha[1], sigma2=mid.sigma[1],
               c0=mid.sigma_tilde[1] * r2 * h * noise_levels.phi(1, r2 * h),
               c1=mid.sigma_tilde[1] * (r2 * h) ** 2 * noise_levels.phi(2, r2 * h) / (r1 * h))
    out.append(c)
  return out


def _step(score_fn: sde_lib.ScoreFn, y: Array, c: dict, order: int) -> Array:
  """One DPM-Solver step of ``order`` from s to t (constants ``c``)."""
  eps_s = noise_levels.noise_prediction(score_fn, y, c["t"], c["alpha"], c["sigma"])
  if order == 1:
    return y - c["a0"] * eps_s
  u1 = y - c["b0"] * eps_s
  eps_1 = noise_levels.noise_prediction(score_fn, u1, c["t1"], c["alpha1"], c["sigma1"])
  if order == 2:
    return y - c["a0"] * eps_s - c["a1"] * (eps_1 - eps_s)
  u2 = y - c["c0"] * eps_s - c["c1"] * (eps_1 - eps_s)
  eps_2 = noise_levels.noise_prediction(score_fn, u2, c["t2"], c["alpha2"], c["sigma2"])
  return y - c["a0"] * eps_s - c["a1"] * (eps_2 - eps_s)


def get_dpm_solver_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 20, order: int = 3,
                           time_grid: str = "logsnr", rho: float = 7.0, eps: float = 1e-3,
                           denoise: bool = False, **unknown) -> fixed_budget.Sampler:
  """Single-step DPM-Solver: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  Defaults are the authors' for unconditional pixel-space sampling: order 3 ("DPM-Solver-fast") on
  the log-SNR grid; 20 evaluations.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations (at least ``order``, plus one with ``denoise``).
    order: 1, 2 or 3.
    time_grid: one of ``noise_levels.TIME_GRIDS`` (of the steps; intermediate points lie uniformly
      in lambda inside each step).
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend one evaluation on Tweedie's denoiser at eps.
    **unknown: rejected with a ``ValueError`` naming the valid options.
  """
  ode.reject_unknown(get_dpm_solver_sampler, unknown, "the dpm_solver sampler")
  n = fixed_budget.solver_steps("dpm_solver", nfe, denoise, order, ORDERS)
  orders = step_orders(n, order)
  grid = noise_levels.time_grid(sde, time_grid, len(orders), eps, rho)
  per_step = _coefficients(sde, grid, orders, eps)
  # Runs of equal order, each a scan over its stacked constants.
  runs, start = [], 0
  for q, group in itertools.groupby(orders):
    size = len(list(group))
    stacked = {k: jnp.asarray(np.array([c[k] for c in per_step[start:start + size]]),
                              jnp.int32 if k == "index" else jnp.float32)
               for k in per_step[start]}
    runs.append((q, stacked))
    start += size

  def solve(score_fn: sde_lib.ScoreFn, y: Array, noise_keys: Array,
            project: fixed_budget.Project = fixed_budget.no_projection) -> Array:
    del noise_keys  # Deterministic.
    for q, stacked in runs:
      y = jax.lax.scan(lambda y, c, q=q: (project(_step(score_fn, y, c, q), c["index"], c["s_next"]), None),
                       y, stacked)[0]
    return y

  return fixed_budget.build_sampler(sde, shape, solve, nfe=nfe, eps=eps, denoise=denoise)


__all__ = ["ORDERS", "get_dpm_solver_sampler", "step_orders"]
