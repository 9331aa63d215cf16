"""UniPC (Zhao et al. 2023): multistep predictor UniP-p and corrector UniC-p on the denoiser, in the VE view.

With h = lambda_t - lambda_s, denoiser values m_0 at s and m_{-k} at lambda_{-k}, r_k = (lambda_{-k} - lambda_s) / h:
y_t = e^{-h} y_s + (1 - e^{-h}) m_0 - B(h) sum_k a_k (m_{-k} - m_0) / r_k, B(h) = -h (bh1) or e^{-h} - 1 (bh2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import fixed_budget, noise_levels
from score_sde.sampling.noise_levels import phi

Array = jax.Array

ORDERS = (1, 2, 3)
VARIANTS = ("bh1", "bh2")
# UniC-p (order p + 1), UniC-1 on the new value alone (the exponential trapezoidal rule), or UniP-p alone.
UNIC_FORMS = ("unic", "trapezoid", "none")


class Step(NamedTuple):
  """Constants of step i, h = lambda_{i+1} - lambda_i (float64 on the host): ``decay`` = e^{-h}; the weights
  of the denoiser values m_i, m_{i-1}, ... (newest first) in UniP and in UniC, and UniC's ``new_weight`` of
  the new value m_{i+1}."""

  index: Array
  next: noise_levels.Levels
  decay: Array
  predictor_weights: Array
  corrector_weights: Array
  new_weight: Array
  sigma_tilde_next: Array


def _unipc_a(r: np.ndarray, h: float, B_h: float) -> np.ndarray:
  """a solving sum_k a_k r_k^{j-1} = -h phi_{j+1}(-h) j! / B(h), j = 1..len(r) (a = 1/2 for one point)."""
  n = len(r)
  if n == 1:
    return np.array([0.5])
  R = np.stack([r**j for j in range(n)])
  g = np.array([-h * phi(j + 1, -h) * math.factorial(j) / B_h for j in range(1, n + 1)])
  return np.linalg.solve(R, g)


def _constants(lv: noise_levels.Levels, orders: np.ndarray, width: int, variant: str, corrector: str) -> Step:
  """The stacked ``Step`` constants, float64."""
  steps = len(orders)
  decay, predictor_weights, corrector_weights, new_weight = (np.zeros(steps), np.zeros((steps, width)),
                                                            np.zeros((steps, width)), np.zeros(steps))
  for i, q in enumerate(orders):
    h = lv.lam[i + 1] - lv.lam[i]
    B_h = -h if variant == "bh1" else math.expm1(-h)
    r = (lv.lam[i - np.arange(1, q)] - lv.lam[i]) / h  # The q - 1 earlier nodes: r_k < 0.
    first_order = np.zeros(width)
    first_order[0] = -math.expm1(-h)
    decay[i] = math.exp(-h)
    # UniP: -B(h) sum_k a_k (m_{-k} - m_0) / r_k over the earlier nodes.
    predictor_weights[i] = first_order
    if q >= 2:
      a = _unipc_a(r, h, B_h)
      predictor_weights[i, 1:q] -= B_h * a / r
      predictor_weights[i, 0] += B_h * np.sum(a / r)
    # UniC: the same with the new point r = 1 (or the new point alone, or nothing).
    if corrector == "none":
      corrector_weights[i] = predictor_weights[i]
      continue
    a_c = np.append(np.zeros(q - 1), 0.5) if corrector == "trapezoid" else _unipc_a(np.append(r, 1.0), h, B_h)
    corrector_weights[i] = first_order
    corrector_weights[i, 1:q] -= B_h * a_c[:-1] / r
    corrector_weights[i, 0] += B_h * np.sum(a_c[:-1] / r) + B_h * a_c[-1]
    new_weight[i] = -B_h * a_c[-1]
  return Step(np.arange(steps), lv.take(np.s_[1:]), decay, predictor_weights, corrector_weights, new_weight,
              lv.sigma_tilde[1:])


def get_unipc_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, nfe: int = 10, order: int = 3,
                      time_grid: str = "logsnr", rho: float = 7.0, eps: float = 1e-3, denoise: bool = False,
                      variant: str = "bh1", lower_order_final: bool = True,
                      corrector: str = "unic") -> fixed_budget.Sampler:
  """UniPC: ``sampler(key, score_fn, z=None, first_index=0) -> (samples, nfe)``.

  The authors' unconditional pixel-space settings: UniPC-3, ``bh1``, log-SNR grid, data prediction, lower-order
  final steps (whatever the number of steps); 10 evaluations. One evaluation at T, then one per step but the last.

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
    lower_order_final: at most the number of steps left as the order of the last steps.
    corrector: one of ``UNIC_FORMS``: ``unic`` (UniPC), ``trapezoid`` (UniC-1 after UniP-p) or
      ``none`` (UniP-p alone).
  """
  steps = fixed_budget.solver_steps("unipc", nfe, denoise, order, ORDERS)
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; valid choices: {VARIANTS}.")
  if corrector not in UNIC_FORMS:
    raise ValueError(f"Unknown corrector {corrector!r}; valid choices: {UNIC_FORMS}.")
  lv = fixed_budget.grid(sde, time_grid, steps, eps, rho)
  orders = fixed_budget.multistep_orders(steps, order, lower_order_final)
  constants = _constants(lv, orders, order, variant, corrector)
  at_T = lv.point(0)

  def solve(score_fn: sde_lib.ScoreFn, y: Array, constants: Step, noise_keys: Array,
            project: fixed_budget.Project) -> Array:
    del noise_keys  # Deterministic.

    def step(carry, c: Step):
      y, history = carry
      # UniP: predict y_{i+1}; the denoiser there is m_{i+1}, for UniC and the next step.
      y_pred = c.decay * y + jnp.tensordot(c.predictor_weights, history, axes=1)
      m_next = noise_levels.denoiser(score_fn, y_pred, c.next)
      # UniC: correct y_{i+1} with m_{i+1}.
      y = c.decay * y + jnp.tensordot(c.corrector_weights, history, axes=1) + c.new_weight * m_next
      return (project(y, c.index, c.sigma_tilde_next), jnp.concatenate([m_next[None], history[:-1]])), None

    history = jnp.zeros((order,) + y.shape, y.dtype).at[0].set(noise_levels.denoiser(score_fn, y, at_T))
    y, history = jax.lax.scan(step, (y, history), jax.tree.map(lambda a: a[:-1], constants))[0]
    # The last step: UniP alone.
    last = jax.tree.map(lambda a: a[-1], constants)
    y = last.decay * y + jnp.tensordot(last.predictor_weights, history, axes=1)
    return project(y, last.index, last.sigma_tilde_next)

  return fixed_budget.make_sampler(sde, shape, solve, constants, nfe=nfe, eps=eps, denoise=denoise)


__all__ = ["UNIC_FORMS", "ORDERS", "Step", "VARIANTS", "get_unipc_sampler"]
