"""DPM-Solver++ (Lu et al. 2022b): multistep exponential integrators on the denoiser, 2M / 3M, ODE or SDE.

In the VE view (``noise_levels``), with lambda = -log sigma~ and kappa = 1 + eta, the family of
reverse processes with the marginals of the SDE (eta = 0: the probability-flow ODE; eta = 1: the
reverse SDE, "SDE-DPM-Solver++") has the exact step from s to t, h = lambda_t - lambda_s,

    y_t = e^{-kappa h} y_s + int_{lambda_s}^{lambda_t} kappa e^{-kappa (lambda_t - l)} D(y_l, l) dl
          + sigma~_t sqrt(1 - e^{-2 eta h}) z.

Expanding the denoiser D in lambda around lambda_s, the k-th derivative carries the weight
c_k = kappa h^{k+1} phi_{k+1}(-kappa h) (``noise_levels.phi``). A multistep method of order q
takes the derivatives of the polynomial through its last q denoiser values
(lambda_{i-j}, D_{i-j}), j < q, so each step costs one evaluation and is linear in the history:

    y_{i+1} = e^{-kappa h} y_i + sum_{j<q} w_{ij} D_{i-j} + sigma~_{i+1} sqrt(1 - e^{-2 eta h}) z_i.

q = 1 is DPM-Solver++(1) (DDIM); q = 2 is 2M, whose slope weight is by default the authors'
``midpoint`` form c_1 = (1 - e^{-kappa h}) h / 2 (``solver_type="taylor"`` uses the exact
kappa h^2 phi_2(-kappa h)); q = 3 is 3M (exact phi weights). The first steps warm up with orders
1, 2, ...; with ``lower_order_final`` and fewer than 10 steps the last steps drop to the number of
steps left (the authors' rule, which steadies very short runs). All weights are computed once in
float64; the run is one ``lax.scan`` with a history of the last ``order`` denoiser values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels, ode

Array = jax.Array

ORDERS = (1, 2, 3)
SOLVER_TYPES = ("midpoint", "taylor")
# lower_order_final applies to runs shorter than this many steps (the authors' threshold).
LOWER_ORDER_FINAL_BELOW = 10


def multistep_orders(steps: int, order: int, lower_order_final: bool,
                     below: int | None = LOWER_ORDER_FINAL_BELOW) -> np.ndarray:
  """The order of each of ``steps`` multistep steps: warm-up 1, 2, ..., then ``order``; with
  ``lower_order_final`` (for runs shorter than ``below`` steps; ``None``: always) at most the
  number of steps left, so the last step is first order."""
  i = np.arange(steps)
  q = np.minimum(order, i + 1)
  if lower_order_final and (below is None or steps < below):
    q = np.minimum(q, steps - i)
  return q


def derivative_weights(lams: np.ndarray) -> np.ndarray:
  """Weights of the derivatives at lams[0] of the polynomial through (lams[j], f_j), j < q.

  Returns (q, q) float64 ``V^-1`` with f^(k)(lams[0]) = sum_j V^-1[k, j] f_j, where
  V[j, k] = (lams[j] - lams[0])^k / k!.
  """
  q = len(lams)
  d = np.asarray(lams, np.float64) - lams[0]
  V = np.stack([d**k / math.factorial(k) for k in range(q)], axis=1)
  return np.linalg.inv(V)


def _weights(lv: noise_levels.Levels, orders: np.ndarray, width: int, eta: float,
             solver_type: str) -> dict[str, np.ndarray]:
  """Per-step float64 constants: e^{-kappa h}, history weights (steps, width), noise std."""
  kappa = 1.0 + eta
  steps = len(orders)
  decay, hist_w, noise = np.zeros(steps), np.zeros((steps, width)), np.zeros(steps)
  for i, q in enumerate(orders):
    h = lv.lam[i + 1] - lv.lam[i]
    c = np.array([kappa * h ** (k + 1) * noise_levels.phi(k + 1, -kappa * h) for k in range(q)])
    if q == 2 and solver_type == "midpoint":
      c[1] = -math.expm1(-kappa * h) * h / 2
    hist_w[i, :q] = c @ derivative_weights(lv.lam[i - np.arange(q)])
    decay[i] = math.exp(-kappa * h)
    noise[i] = lv.sigma_tilde[i + 1] * math.sqrt(-math.expm1(-2 * eta * h))
  return dict(decay=decay, hist_w=hist_w, noise=noise)


def get_dpm_solver_pp_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 20, order: int = 3,
                              time_grid: str = "logsnr", rho: float = 7.0, eps: float = 1e-3,
                              denoise: bool = False, eta: float = 0.0, solver_type: str = "midpoint",
                              lower_order_final: bool = True, **unknown) -> fixed_budget.Sampler:
  """Multistep DPM-Solver++: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  Defaults are the authors' for unconditional sampling: multistep order 3 (3M) on the log-SNR grid
  with lower-order final steps; 20 evaluations. ``order=2`` is DPM-Solver++(2M) (their choice for
  guided sampling); ``eta=1`` gives the SDE variants (SDE-DPM-Solver++(2M) / (3M)).

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations: one per step (plus one with ``denoise``).
    order: 1, 2 (2M) or 3 (3M).
    time_grid: one of ``noise_levels.TIME_GRIDS``.
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend one evaluation on Tweedie's denoiser at eps.
    eta: >= 0; 0 is the probability-flow ODE, 1 the reverse SDE (noise from per-sample keys).
    solver_type: the 2M slope weight, ``midpoint`` (the authors' default) or ``taylor``.
    lower_order_final: lower the order of the last steps of runs under 10 steps.
    **unknown: rejected with a ``ValueError`` naming the valid options.
  """
  ode.reject_unknown(get_dpm_solver_pp_sampler, unknown, "the dpm_solver++ sampler")
  steps = fixed_budget.solver_steps("dpm_solver++", nfe, denoise, order, ORDERS)
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"Unknown solver_type {solver_type!r}; valid choices: {SOLVER_TYPES}.")
  if not eta >= 0:
    raise ValueError(f"eta must be >= 0 (0: the probability-flow ODE, 1: the reverse SDE), got {eta}.")
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, time_grid, steps, eps, rho))
  w = _weights(lv, multistep_orders(steps, order, lower_order_final), order, eta, solver_type)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  coeffs = dict(index=jnp.arange(steps), t=f32(lv.t[:-1]), alpha=f32(lv.alpha[:-1]), sigma=f32(lv.sigma[:-1]),
                decay=f32(w["decay"]), hist_w=f32(w["hist_w"]), noise=f32(w["noise"]),
                s_next=f32(lv.sigma_tilde[1:]))
  stochastic = eta > 0
  event_shape = tuple(shape[1:])

  def solve(score_fn: sde_lib.ScoreFn, y: Array, noise_keys: Array,
            project: fixed_budget.Project = fixed_budget.no_projection) -> Array:

    def step(carry, c):
      y, hist = carry
      # Denoise at t_i and push the value into the history (newest first).
      d = noise_levels.denoiser(score_fn, y, c["t"], c["alpha"], c["sigma"])
      hist = jnp.concatenate([d[None], hist[:-1]])
      # The exponential-integrator step (plus the SDE's fresh noise).
      y = c["decay"] * y + jnp.tensordot(c["hist_w"], hist, axes=1)
      if stochastic:
        y = y + c["noise"] * fixed_budget.step_noise(noise_keys, c["index"], event_shape)
      return (project(y, c["index"], c["s_next"]), hist), None

    hist = jnp.zeros((order,) + y.shape, y.dtype)
    return jax.lax.scan(step, (y, hist), coeffs)[0][0]

  return fixed_budget.build_sampler(sde, shape, solve, nfe=nfe, eps=eps, denoise=denoise, stochastic=stochastic)


__all__ = ["ORDERS", "SOLVER_TYPES", "derivative_weights", "get_dpm_solver_pp_sampler", "multistep_orders"]
