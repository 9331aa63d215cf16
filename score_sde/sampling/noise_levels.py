"""The noise-level core shared by the fixed-budget samplers: the VE view, log-SNR time, time grids.

Every SDE of ``score_sde.sde`` has the kernel x_t = alpha_t x_0 + sigma_t eps. Dividing by alpha_t
gives the *VE view* (Karras et al. 2022; Lu et al. 2022)

    y = x / alpha_t,    y = x_0 + sigma~_t eps,    sigma~_t = sigma_t / alpha_t = exp(-lambda_t),

with lambda_t = log(alpha_t / sigma_t) the half log-SNR. In this view the probability-flow ODE of
VP, subVP and VE alike is

    dy / dsigma~ = (y - D(y; sigma~)) / sigma~ = eps^(y; sigma~),

with the denoiser D = E[x_0 | x_t] = (x + sigma_t^2 s(x, t)) / alpha_t (Tweedie) and the noise
prediction eps^ = -sigma_t s(x, t). So every solver here is written once, on (y, lambda), and
serves every SDE; the SDE enters only through ``alpha_sigma`` and the inverse lambda -> t, which
``t_of_lambda`` computes by bisection on ``alpha_sigma`` (lambda_t is strictly decreasing in t for
every SDE here), so no SDE needs a method of its own.

Grids (``time_grid``), t_0 = T > t_1 > ... > t_M = eps:
* ``uniform``: uniform in t;
* ``quadratic``: uniform in sqrt(t) (the DPM-Solver "time_quadratic" grid; DDIM's quadratic
  skipping for CIFAR-10), denser near eps;
* ``logsnr``: uniform in lambda (DPM-Solver's "logSNR" grid, k-diffusion's "exponential");
* ``karras``: sigma~_i = (sigma~_max^(1/rho) + i / M (sigma~_min^(1/rho) - sigma~_max^(1/rho)))^rho
  (EDM, rho = 7 by default), between sigma~(T) and sigma~(eps).

Grids and every per-step coefficient are computed once, when a sampler is built, in float64
(``jax.enable_x64`` on the host) from the SDE's own ``alpha_sigma``; the compiled program holds
them as constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib

Array = jax.Array

TIME_GRIDS = ("uniform", "quadratic", "logsnr", "karras")

# Bisection steps of ``t_of_lambda``: halves [0, T] down to 2^-60 T, below float64 resolution.
_BISECTION_STEPS = 60


def log_snr(sde: sde_lib.SDE, t: Array) -> Array:
  """Half log-SNR lambda_t = log(alpha_t / sigma_t), shaped like ``t``."""
  alpha, sigma = sde.alpha_sigma(t)
  return jnp.log(alpha) - jnp.log(sigma)


def t_of_lambda(sde: sde_lib.SDE, lam: Array, t_min: float = 0.0, t_max: float | None = None) -> Array:
  """The inverse of ``log_snr``: the t in [t_min, t_max] with lambda_t = lam, by bisection.

  Works on host values and inside traced code alike (a fixed number of vectorised halvings); a
  ``lam`` outside the range of lambda on [t_min, t_max] gives the nearer end.

  Args:
    sde: any SDE whose lambda_t decreases strictly in t.
    lam: target log-SNRs, any shape.
    t_min, t_max: the search interval (default [0, T]).

  Returns:
    Times shaped like ``lam``, in its dtype.
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


@dataclasses.dataclass(frozen=True)
class Levels:
  """Noise levels at given times, float64 host arrays of one shape.

  Attributes:
    t: the times.
    alpha, sigma: the SDE's marginal coefficients at ``t``.
    lam: lambda_t = log(alpha_t / sigma_t).
  """

  t: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  lam: np.ndarray

  @property
  def sigma_tilde(self) -> np.ndarray:
    """sigma~_t = sigma_t / alpha_t = exp(-lambda_t), the noise level of the VE view."""
    return self.sigma / self.alpha


# Host computations pad their times to a multiple of this, so one compiled program per SDE serves
# every grid size.
_HOST_CHUNK = 256


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
  """The M + 1 = ``num_steps`` + 1 grid times t_0 = T > ... > t_M = eps, float64.

  Args:
    sde: the forward SDE.
    name: one of ``TIME_GRIDS``.
    num_steps: M >= 1.
    eps: the last time, 0 < eps < T.
    rho: the exponent of the ``karras`` grid.
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
      s_max, s_min = ends.sigma_tilde
      lam = -rho * np.log(s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho)))
    t = times_of_lambda(sde, lam, eps, T)
  t[0], t[-1] = T, eps  # Exact ends, whatever the bisection's last digit.
  if not np.all(np.diff(t) < 0):
    raise ValueError(f"The {name} grid of {num_steps} steps on [eps={eps}, T] is not strictly decreasing; "
                     f"use fewer steps or a larger eps.")
  return t


def phi(k: int, z: np.ndarray) -> np.ndarray:
  """phi_k(z) = int_0^1 exp((1 - u) z) u^(k-1) / (k-1)! du, the exponential-integrator weights.

  phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z; near z = 0 (where that recursion cancels)
  the Taylor series sum_j z^j / (j + k)! is used. float64, elementwise.
  """
  z = np.asarray(z, np.float64)
  series = sum(z**j / math.factorial(j + k) for j in range(20))
  value = np.exp(z)
  for j in range(k):
    value = (value - 1.0 / math.factorial(j)) / np.where(z == 0, 1.0, z)
  return np.where(np.abs(z) < 0.1, series, value)


def denoiser(score_fn: sde_lib.ScoreFn, y: Array, t: Array, alpha: Array, sigma: Array) -> Array:
  """D(y; sigma~) = E[x_0 | x_t] from a score function, in the VE view.

  Args:
    score_fn: ``score_fn(x (B, ...), t (B,))``.
    y: (B, ...) the VE-view state x / alpha_t.
    t, alpha, sigma: scalars, the time and its marginal coefficients.

  Returns:
    (B, ...): (x + sigma^2 s(x, t)) / alpha = y + (sigma^2 / alpha) s(alpha y, t).
  """
  score = score_fn(alpha * y, jnp.full(y.shape[:1], t, y.dtype))
  return y + (sigma**2 / alpha) * score


def noise_prediction(score_fn: sde_lib.ScoreFn, y: Array, t: Array, alpha: Array, sigma: Array) -> Array:
  """eps^(y; sigma~) = (y - D) / sigma~ = -sigma_t s(alpha y, t), (B, ...) (arguments as ``denoiser``)."""
  return -sigma * score_fn(alpha * y, jnp.full(y.shape[:1], t, y.dtype))


__all__ = ["TIME_GRIDS", "Levels", "check_time_grid", "denoiser", "levels", "log_snr", "noise_prediction",
           "phi", "t_of_lambda", "time_grid", "times_of_lambda"]
