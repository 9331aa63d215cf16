"""The probability-flow ODE sampler dx/dt = f(x, t) - g(t)^2 s(x, t) / 2 from T to eps, on device (diffrax).

    sampler = get_ode_sampler(sde, (B, D), rtol=1e-5, atol=1e-5, eps=1e-3)
    samples, nfe = sampler(key, score_fn)           # from the prior
    x, nfe = sampler(None, score_fn, z=latents)     # decode given latents at T

Each sample has its own adaptive steps (``solve_per_sample``, shared with ``score_sde.likelihood``);
nfe is the maximum over samples. Why per sample, and failure on ``max_steps``: ``docs/samplers.md``.
"""

from __future__ import annotations

from typing import Any, Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib

Array = jax.Array

# Explicit adaptive Runge-Kutta methods by name. All are explicit, so their cost per step is the
# number of new stages (see ``_evals``).
SOLVERS: dict[str, Callable[[], diffrax.AbstractAdaptiveSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}

# Default step budget per sample. Hitting it raises (see ``solve_per_sample``).
MAX_STEPS = 4096


def get_solver(name: str) -> diffrax.AbstractAdaptiveSolver:
  """The diffrax solver called ``name`` (one of ``SOLVERS``)."""
  if name not in SOLVERS:
    raise ValueError(f"Unknown ODE solver {name!r}; valid choices: {sorted(SOLVERS)}.")
  return SOLVERS[name]()


def check_tolerances(rtol: float, atol: float, eps: float, max_steps: int, T: float) -> None:
  """Raises ``ValueError`` unless 0 < rtol, atol; 0 < eps < T; max_steps a positive integer."""
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}.")
  if not 0 < eps < T:
    raise ValueError(f"eps (the smallest time) must lie in (0, T={T}), got {eps}.")
  if int(max_steps) != max_steps or max_steps < 1:
    raise ValueError(f"max_steps must be a positive integer, got {max_steps}.")


def _evals(solver: diffrax.AbstractAdaptiveSolver, num_steps: Array) -> Array:
  """Vector-field evaluations of ``num_steps`` attempted explicit RK steps: stages per step, FSAL's reused last
  stage counted once plus the first f(t0, y0)."""
  tableau = solver.tableau
  if tableau.fsal:
    return 1 + (tableau.num_stages - 1) * num_steps
  return tableau.num_stages * num_steps


def solve_per_sample(vector_field: Callable[[Array, Any, Any], Any], y0: Any, args: Any,
                     t0: float, t1: float, *, solver: diffrax.AbstractAdaptiveSolver,
                     rtol: float, atol: float, max_steps: int) -> tuple[Any, Array]:
  """(y1, nfe (B,)): dy/dt = vector_field(t, y, args) from t0 to t1, ``jax.vmap``-ed so each sample (leaves of
  y0 and args, (B, ...)) has its own steps (PID controller, RMS norm over the sample); exhausting
  ``max_steps`` raises rather than returning a wrong value."""
  controller = diffrax.PIDController(rtol=rtol, atol=atol)
  dt0 = 0.01 * (t1 - t0)  # the first trial step

  def one(y, a):
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), solver, t0, t1, dt0, y, a,
                              stepsize_controller=controller, max_steps=max_steps, throw=True)
    y1 = jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys)
    return y1, _evals(solver, sol.stats["num_steps"])

  y1, nfe = jax.vmap(one)(y0, args)
  return y1, nfe.astype(jnp.int32)


def single(fn: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
  """Turns a batched ``fn(x (B, ...), t (B,))`` into a per-sample ``fn(x (...), t scalar)``."""
  return lambda x, t: fn(x[None], jnp.reshape(t, (1,)))[0]


def get_ode_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, rtol: float = 1e-5,
                    atol: float = 1e-5, eps: float = 1e-3, denoise: bool = False,
                    solver: str = "tsit5", max_steps: int = MAX_STEPS) -> Callable:
  """``sampler(key, score_fn, z=None, first_index=0) -> (samples (B, ...), nfe)``: the PF-ODE from T to eps.

  Sample i starts from the prior draw ``fold_in(key, first_index + i)``, or from ``z`` (B, ...) when given.

  Args:
    rtol, atol: per-sample tolerances of the adaptive ``solver`` (one of ``SOLVERS``).
    denoise: end with Tweedie's E[x_0 | x_eps] (``sde.tweedie``), one more score evaluation.
    max_steps: step budget per sample; exhausting it raises.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f"shape must be (B, ...) with positive sizes and at least 2 axes, got {shape}.")
  check_tolerances(rtol, atol, eps, max_steps, sde.T)
  ode_solver = get_solver(solver)
  event_shape = shape[1:]

  @jax.jit
  def draw(key, first_index):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(shape[0]))
    return jax.vmap(lambda k: sde.prior_sampling(k, (1,) + event_shape)[0])(keys)

  # Sampling and decoding share this program; only the latents differ.
  @eqx.filter_jit
  def decode(score_fn, z):
    drift = single(lambda x, t: sde.reverse(score_fn, probability_flow=True).sde(x, t)[0])
    x, nfe = solve_per_sample(lambda t, x, _: drift(x, t), z, None, sde.T, eps,
                              solver=ode_solver, rtol=rtol, atol=atol, max_steps=max_steps)
    nfe = jnp.max(nfe)
    if denoise:
      t_eps = jnp.full((shape[0],), eps, x.dtype)
      x = sde_lib.tweedie(x, score_fn(x, t_eps), *sde.alpha_sigma(t_eps))
      nfe = nfe + 1
    return x, nfe

  def sampler(key: Array | None, score_fn: sde_lib.ScoreFn, z: Array | None = None,
              first_index: int | Array = 0) -> tuple[Array, Array]:
    if z is None:
      if key is None:
        raise ValueError("Pass a PRNG key to draw the latents from the prior, or the latents as z=.")
      return decode(score_fn, draw(key, jnp.asarray(first_index, jnp.int32)))
    z = jnp.asarray(z)
    if z.shape != shape:
      raise ValueError(f"z must have the sampler's shape {shape}, got {z.shape}.")
    if not jnp.issubdtype(z.dtype, jnp.floating):
      raise ValueError(f"z must be a floating-point array, got dtype {z.dtype}.")
    return decode(score_fn, z)

  return sampler


__all__ = ["MAX_STEPS", "SOLVERS", "check_tolerances", "get_ode_sampler", "get_solver",
           "single", "solve_per_sample"]
