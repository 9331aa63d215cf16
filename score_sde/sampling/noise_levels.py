"""The VE view shared by the fixed-budget samplers: noise levels, log-SNR time, time grids, Tweedie.

y = x / alpha_t = x_0 + sigma~_t epsilon with sigma~_t = sigma_t / alpha_t = exp(-lambda_t); the PF-ODE of every
SDE is then dy / dsigma~ = (y - D(y; sigma~)) / sigma~. Derivation and grids: docs/samplers.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib

Array = jax.Array

TIME_GRIDS = ("uniform", "quadratic", "logsnr", "karras")

_BISECTION_STEPS = 60  # Halves [0, T] down to 2^-60 T, below float64 resolution.


def log_snr(sde: sde_lib.SDE, t: Array) -> Array:
  """Half log-SNR lambda_t = log(alpha_t / sigma_t), shaped like ``t``."""
  alpha, sigma = sde.alpha_sigma(t)
  return jnp.log(alpha) - jnp.log(sigma)


def t_of_lambda(sde: sde_lib.SDE, lam: Array, t_min: float = 0.0, t_max: float | None = None) -> Array:
  """The t in [t_min, t_max] (default [0, T]) with lambda_t = ``lam``, any shape, by bisection (host or traced).

  ``lam`` outside the range of lambda on [t_min, t_max] gives the nearer end.
  """
  lam = jnp.asarray(lam)
  dtype = lam.dtype if jnp.issubdtype(lam.dtype, jnp.floating) else jnp.float32
  lam = lam.astype(dtype)
  lo = jnp.full(lam.shape, t_min, dtype)
  hi = jnp.full(lam.shape, sde.T if t_max is None else t_max, dtype)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = log_snr(sde, mid) > lam  # lambda still too large: the root lies at later times.
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))
  return 0.5 * (lo + hi)


class Levels(NamedTuple):
  """Times ``t`` with the SDE's ``alpha``, ``sigma`` and ``lam`` = log(alpha / sigma) there, arrays of one shape.

  Float64 host arrays when built by ``levels``; a pytree, so the solvers carry them to the device.
  """

  t: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  lam: np.ndarray

  @property
  def sigma_tilde(self) -> np.ndarray:
    """sigma~_t = sigma_t / alpha_t = exp(-lambda_t), the noise level of the VE view."""
    return self.sigma / self.alpha

  def take(self, index) -> "Levels":
    """The levels at ``index`` (a numpy index) of every array."""
    return Levels(*(a[index] for a in self))

  def point(self, i: int) -> "Levels":
    """The levels at index ``i`` as Python floats (weakly typed constants in a traced program)."""
    return Levels(*(float(a[i]) for a in self))


_HOST_CHUNK = 256  # Host computations pad to a multiple of this: one compiled program per SDE.


@functools.partial(jax.jit, static_argnums=0)
def _host_levels(sde: sde_lib.SDE, t: Array) -> tuple[Array, Array, Array]:
  alpha, sigma = sde.alpha_sigma(t)
  return alpha, sigma, log_snr(sde, t)


@functools.partial(jax.jit, static_argnums=0)
def _host_bisection(sde: sde_lib.SDE, lam: Array, t_min: Array, t_max: Array) -> Array:
  return t_of_lambda(sde, lam, t_min, t_max)


def _on_host(fn, sde: sde_lib.SDE, values: np.ndarray, fill: float, *args):
  """Runs a jitted float64 function of ``sde`` on ``values`` padded to a multiple of _HOST_CHUNK."""
  flat = np.asarray(values, np.float64).ravel()
  size = -(-max(flat.size, 1) // _HOST_CHUNK) * _HOST_CHUNK
  padded = np.full(size, fill, np.float64)
  padded[:flat.size] = flat
  with jax.enable_x64(True):
    out = fn(sde, jnp.asarray(padded), *(jnp.asarray(a, jnp.float64) for a in args))
  return [np.array(o, np.float64)[:flat.size].reshape(np.shape(values)) for o in jax.tree.leaves(out)]


def levels(sde: sde_lib.SDE, t) -> Levels:
  """``Levels`` of ``sde`` at host times ``t`` (any shape), computed in float64."""
  t = np.asarray(t, np.float64)
  alpha, sigma, lam = _on_host(_host_levels, sde, t, sde.T)
  if not (np.all(sigma > 0) and np.all(np.isfinite(lam))):
    raise ValueError(f"{sde!r} has sigma_t = 0 at some of the times {t.ravel()[:8]}...; the samplers need "
                     f"t >= eps > 0.")
  return Levels(t.copy(), alpha, sigma, lam)


def times_of_lambda(sde: sde_lib.SDE, lam, t_min: float, t_max: float) -> np.ndarray:
  """Host (float64) ``t_of_lambda`` for grids and intermediate points; a fresh array."""
  return _on_host(_host_bisection, sde, lam, 0.0, t_min, t_max)[0]


def check_time_grid(name: str) -> None:
  """Raises ``ValueError`` naming the valid grids unless ``name`` is one."""
  if name not in TIME_GRIDS:
    raise ValueError(f"Unknown time_grid {name!r}; valid choices: {TIME_GRIDS}.")


def time_grid(sde: sde_lib.SDE, name: str, num_steps: int, eps: float, rho: float = 7.0) -> np.ndarray:
  """The ``num_steps`` + 1 float64 times T = t_0 > ... > t_M = eps of grid ``name`` (``TIME_GRIDS``).

  ``rho`` is the exponent of the ``karras`` grid, sigma~_i^(1/rho) uniform in i.
  """
  check_time_grid(name)
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  if not 0 < eps < sde.T:
    raise ValueError(f"eps (the last grid time) must lie in (0, T={sde.T}), got {eps}.")
  if name == "karras" and not rho > 0:
    raise ValueError(f"rho of the karras grid must be positive, got {rho}.")
  u = np.linspace(0.0, 1.0, int(num_steps) + 1)
  T = float(sde.T)
  if name == "uniform":
    t = T + u * (eps - T)
  elif name == "quadratic":
    t = (math.sqrt(T) + u * (math.sqrt(eps) - math.sqrt(T))) ** 2
  else:
    ends = levels(sde, np.array([T, eps]))
    if name == "logsnr":
      lam = ends.lam[0] + u * (ends.lam[1] - ends.lam[0])
    else:  # karras
      st_max, st_min = ends.sigma_tilde  # sigma~(T), sigma~(eps)
      lam = -rho * np.log(st_max ** (1 / rho) + u * (st_min ** (1 / rho) - st_max ** (1 / rho)))
    t = times_of_lambda(sde, lam, eps, T)
  t[0], t[-1] = T, eps  # Exact ends, whatever the bisection's last digit.
  if not np.all(np.diff(t) < 0):
    raise ValueError(f"The {name} grid of {num_steps} steps on [eps={eps}, T] is not strictly decreasing; "
                     f"use fewer steps or a larger eps.")
  return t


def phi(k: int, z: np.ndarray) -> np.ndarray:
  """phi_k(z) = int_0^1 e^((1 - u) z) u^(k-1) / (k-1)! du, float64 (phi_0 = e^z, phi_{k+1} = (phi_k - 1/k!) / z)."""
  z = np.asarray(z, np.float64)
  series = sum(z**j / math.factorial(j + k) for j in range(20))
  value = np.exp(z)
  for j in range(k):
    value = (value - 1.0 / math.factorial(j)) / np.where(z == 0, 1.0, z)
  return np.where(np.abs(z) < 0.1, series, value)  # The recursion cancels near 0: the series there.


def denoiser(score_fn: sde_lib.ScoreFn, y: Array, at: Levels) -> Array:
  """Tweedie's D(y; sigma~) = E[x_0 | x_t] = (x + sigma_t^2 s(x, t)) / alpha_t at x = alpha_t y, (B, ...).

  Args:
    score_fn: ``score_fn(x (B, ...), t (B,))``.
    y: (B, ...) the VE-view state.
    at: the point: scalar ``t``, ``alpha``, ``sigma`` (``lam`` unused).
  """
  score = score_fn(at.alpha * y, jnp.full(y.shape[:1], at.t, y.dtype))
  return y + (at.sigma**2 / at.alpha) * score


def noise_prediction(score_fn: sde_lib.ScoreFn, y: Array, at: Levels) -> Array:
  """epsilon^(y; sigma~) = (y - D) / sigma~ = -sigma_t s(alpha_t y, t), (B, ...) (arguments as ``denoiser``)."""
  return -at.sigma * score_fn(at.alpha * y, jnp.full(y.shape[:1], at.t, y.dtype))


__all__ = ["TIME_GRIDS", "Levels", "check_time_grid", "denoiser", "levels", "log_snr", "noise_prediction",
           "phi", "t_of_lambda", "time_grid", "times_of_lambda"]
