"""UniPC (Zhao et al. 2023): a multistep predictor (UniP-p) and corrector (UniC-p) on the denoiser.

In the VE view (``noise_levels``), with h = lambda_t - lambda_s and the denoiser values m_0 = D at
s, m_{-k} at earlier nodes, r_k = (lambda_{-k} - lambda_s) / h and D1_k = (m_{-k} - m_0) / r_k,
both share one form (data prediction):

    y_t = e^{-h} y_s + (1 - e^{-h}) m_0 - B(h) sum_k rho_k D1_k,

with B(h) = -h (``bh1``) or e^{-h} - 1 (``bh2``). The weights rho solve sum_k rho_k r_k^{j-1} =
b_j = -h phi_{j+1}(-h) j! / B(h), j = 1..n, which matches the Taylor expansion of the exact step
(``noise_levels.phi``) up to the n-th derivative. The predictor of order q uses the q - 1 earlier
nodes (rho = 1/2 for q = 2, as the authors); the corrector adds the new point r = 1 with
m_t = D(y_t^pred, t) (rho = 1/2 for q = 1). m_t is also the value the next step needs, so the
corrector raises the order by one (UniPC-p has order p + 1) at no extra evaluation; the final step
is not corrected (that would cost one). ``corrector="trapezoid"`` uses the new value alone (UniC-1,
rho = 1/2; with bh2 the exponential trapezoidal rule y_t = e^{-h} y_s + (1 - e^{-h})(m_0 + m_t) / 2),
which keeps the predictor's order but damps its extrapolation over long steps; ``"none"`` leaves
UniP-p alone (UniP-2 with bh2 is DPM-Solver++(2M)). Evaluations: one at T, then one per step but the last, so
``nfe`` steps. The first steps warm up with orders 1, 2, ...; with ``lower_order_final`` (the
authors' default, applied whatever the number of steps, unlike DPM-Solver++'s rule) the last steps
use at most the number of steps left, so the final step is a first-order (DDIM) step: steadier at
few steps, at the price of a first-order term in the global error (the order tests turn it off).
All weights are computed once in float64; the run is one ``lax.scan`` plus the last step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import dpm_solver_pp, fixed_budget, noise_levels, ode

Array = jax.Array

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")
# The corrector: UniC-p (the earlier nodes and the new value: order p + 1), UniC-1 on the new value
# alone (rho = 1/2: the exponential trapezoidal rule, which keeps the predictor's order but damps its
# extrapolation), or none (UniP-p alone; UniP-2 with bh2 is DPM-Solver++(2M)).
CORRECTORS = ("unic", "trapezoid", "none")


def _rhos(r: np.ndarray, h: float, B: float) -> np.ndarray:
  """rho solving sum_k rho_k r_k^{j-1} = -h phi_{j+1}(-h) j! / B, j = 1..len(r) (1/2 for one point)."""
  n = len(r)
  if n == 1:
    return np.array([0.5])
  R = np.stack([r**j for j in range(n)])
  b = np.array([-h * noise_levels.phi(j + 1, -h) * math.factorial(j) / B for j in range(1, n + 1)])
  return np.linalg.solve(R, b)


def _weights(lv: noise_levels.Levels, orders: np.ndarray, width: int, variant: str,
             corrector: str) -> dict[str, np.ndarray]:
  """Per-step float64 weights of the predictor and corrector on the history [m_i, m_{i-1}, ...] (newest
  first) and, for the corrector, on the new value m_{i+1}."""
  steps = len(orders)
  decay, pred_w, corr_w, corr_new = np.zeros(steps), np.zeros((steps, width)), np.zeros((steps, width)), np.zeros(steps)
  for i, q in enumerate(orders):
    h = lv.lam[i + 1] - lv.lam[i]
    B = -h if variant == "bh1" else math.expm1(-h)
    r = (lv.lam[i - np.arange(1, q)] - lv.lam[i]) / h  # Earlier nodes: r_k < 0.
    base = np.zeros(width)
    base[0] = -math.expm1(-h)
    decay[i] = math.exp(-h)
    # Predictor: -B sum_k rho_k (m_{-k} - m_0) / r_k over the q - 1 earlier nodes.
    pred_w[i] = base
    if q >= 2:
      rho = _rhos(r, h, B)
      pred_w[i, 1:q] -= B * rho / r
      pred_w[i, 0] += B * np.sum(rho / r)
    # Corrector: the same with the new point r = 1 added (or the new point alone, or nothing).
    if corrector == "none":
      corr_w[i] = pred_w[i]
      continue
    if corrector == "trapezoid":
      rho_c = np.append(np.zeros(q - 1), 0.5)
    else:
      rho_c = _rhos(np.append(r, 1.0), h, B)
    corr_w[i] = base
    corr_w[i, 1:q] -= B * rho_c[:-1] / r
    corr_w[i, 0] += B * np.sum(rho_c[:-1] / r) + B * rho_c[-1]
    corr_new[i] = -B * rho_c[-1]
  return dict(decay=decay, pred_w=pred_w, corr_w=corr_w, corr_new=corr_new)


def get_unipc_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 10, order: int = 3,
                      time_grid: str = "logsnr", rho: float = 7.0, eps: float = 1e-3, denoise: bool = False,
                      variant: str = "bh1", lower_order_final: bool = True, corrector: str = "unic",
                      **unknown) -> fixed_budget.Sampler:
  """UniPC: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  Defaults are the authors' unconditional pixel-space settings: UniPC-3 with ``bh1`` on the
  log-SNR grid, data prediction, lower-order final steps; 10 evaluations (their headline budget).

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    nfe: the exact number of score evaluations: one per step (plus one with ``denoise``).
    order: 1, 2 or 3 (the predictor's order; the corrector adds one).
    time_grid: one of ``noise_levels.TIME_GRIDS``.
    rho: exponent of the ``karras`` grid.
    eps: the last grid time.
    denoise: spend one evaluation on Tweedie's denoiser at eps.
    variant: B(h), ``bh1`` or ``bh2``.
    lower_order_final: lower the order of the last steps (of every run, as the authors do).
    corrector: one of ``CORRECTORS``: ``unic`` (UniPC), ``trapezoid`` (UniC-1 after UniP-p) or
      ``none`` (UniP-p alone).
    **unknown: rejected with a ``ValueError`` naming the valid options.
  """
  ode.reject_unknown(get_unipc_sampler, unknown, "the unipc sampler")
  steps = fixed_budget.solver_steps("unipc", nfe, denoise, order, ORDERS)
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; valid choices: {VARIANTS}.")
  if corrector not in CORRECTORS:
    raise ValueError(f"Unknown corrector {corrector!r}; valid choices: {CORRECTORS}.")
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, time_grid, steps, eps, rho))
  w = _weights(lv, dpm_solver_pp.multistep_orders(steps, order, lower_order_final, below=None), order, variant,
               corrector)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  coeffs = dict(index=jnp.arange(steps), t_next=f32(lv.t[1:]), alpha_next=f32(lv.alpha[1:]),
                sigma_next=f32(lv.sigma[1:]), s_next=f32(lv.sigma_tilde[1:]), **{k: f32(v) for k, v in w.items()})
  first = tuple(float(a[0]) for a in (lv.t, lv.alpha, lv.sigma))

  def solve(score_fn: sde_lib.ScoreFn, y: Array, noise_keys: Array,
            project: fixed_budget.Project = fixed_budget.no_projection) -> Array:
    del noise_keys  # Deterministic.

    def step(carry, c):
      y, hist = carry
      # UniP: predict y_{i+1}; evaluate the denoiser there (the next step's m_0 as well).
      y_pred = c["decay"] * y + jnp.tensordot(c["pred_w"], hist, axes=1)
      d = noise_levels.denoiser(score_fn, y_pred, c["t_next"], c["alpha_next"], c["sigma_next"])
      # UniC: correct y_{i+1} with that value.
      y = c["decay"] * y + jnp.tensordot(c["corr_w"], hist, axes=1) + c["corr_new"] * d
      return (project(y, c["index"], c["s_next"]), jnp.concatenate([d[None], hist[:-1]])), None

    d0 = noise_levels.denoiser(score_fn, y, *first)
    hist = jnp.zeros((order,) + y.shape, y.dtype).at[0].set(d0)
    y, hist = jax.lax.scan(step, (y, hist), jax.tree.map(lambda a: a[:-1], coeffs))[0]
    # The last step: predictor only.
    y = coeffs["decay"][-1] * y + jnp.tensordot(coeffs["pred_w"][-1], hist, axes=1)
    return project(y, coeffs["index"][-1], coeffs["s_next"][-1])

  return fixed_budget.build_sampler(sde, shape, solve, nfe=nfe, eps=eps, denoise=denoise)


__all__ = ["CORRECTORS", "ORDERS", "VARIANTS", "get_unipc_sampler"]
