"""The frame of the fixed-budget samplers (``euler``, ``heun``, ``dpm_solver``, ``dpm_solver++``, ``unipc``).

A solver integrates y = x / alpha_t from T to eps in the VE view (``noise_levels``) with per-step constants
computed once in float64; the frame draws x_T, maps in and out, denoises, projects and compiles (docs/samplers.md).
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib
from score_sde.sampling import noise_levels
from score_sde.sampling import projection as projection_lib

Array = jax.Array
Project = Callable[[Array, Array, Array], Array]
"""``project(y (B, ...), j (int scalar), sigma~_{j+1}) -> y``: the constraint after step j (identity without one)."""
Solve = Callable[[sde_lib.ScoreFn, Array, Any, Array, Project], Array]
"""``solve(score_fn, y_T (B, ...), constants, noise_keys (B,), project) -> y_eps (B, ...)``, in the VE view."""
Sampler = Callable[..., tuple[Array, Array]]


def no_projection(y: Array, step: Array, sigma_tilde: Array) -> Array:
  """The ``Project`` of an unconstrained run: y as it is."""
  del step, sigma_tilde
  return y


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """``shape`` as a tuple of ints; raises ``ValueError`` unless it is (B, ...) with positive sizes."""
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f"shape must be (B, ...) with positive sizes and at least 2 axes, got {shape}.")
  return shape


def solver_steps(method: str, nfe: int, denoise: bool, order: int, orders: tuple[int, ...]) -> int:
  """The evaluations left to the solver, ``nfe`` - ``denoise``; ``ValueError`` unless ``order`` is in
  ``orders`` and that leaves at least ``order``."""
  if order not in orders:
    raise ValueError(f"order={order!r} is not available for method={method!r}; valid choices: {orders}.")
  if isinstance(nfe, bool) or int(nfe) != nfe:
    raise ValueError(f"nfe (the number of score evaluations) must be an integer, got {nfe!r}.")
  left = int(nfe) - int(bool(denoise))
  if left < order:
    raise ValueError(f"nfe={nfe} is too small for method={method!r} with order={order}"
                     f"{' and denoise=True (one evaluation)' if denoise else ''}: it needs at least "
                     f"{order + int(bool(denoise))} evaluations.")
  return left


def grid(sde: sde_lib.SDE, time_grid: str, steps: int, eps: float, rho: float) -> noise_levels.Levels:
  """Float64 ``Levels`` at the ``steps`` + 1 times T = t_0 > ... > t_M = eps of ``time_grid``."""
  return noise_levels.levels(sde, noise_levels.time_grid(sde, time_grid, steps, eps, rho))


def multistep_orders(steps: int, order: int, lower_order_final: bool, below: int | None = None) -> np.ndarray:
  """Order of each multistep step: min(order, i + 1) (warm-up), and with ``lower_order_final`` for runs
  shorter than ``below`` steps (``None``: all) at most the steps left, steps - i."""
  i = np.arange(steps)
  q = np.minimum(order, i + 1)
  if lower_order_final and (below is None or steps < below):
    q = np.minimum(q, steps - i)
  return q


def stack(per_step: list) -> Any:
  """One pytree of host arrays (steps, ...) from a list of pytrees of the same structure, one per step."""
  return jax.tree.map(lambda *a: np.stack(a), *per_step)


def on_device(constants: Any, dtype) -> Any:
  """Host constants as arrays: floating ones in ``dtype``, integers as they are."""
  cast = lambda a: jnp.asarray(a, dtype if np.issubdtype(np.asarray(a).dtype, np.floating) else None)
  return jax.tree.map(cast, constants)


def step_noise(noise_keys: Array, step: Array | int, event_shape: tuple[int, ...]) -> Array:
  """Standard normal noise of one step, (B, *event_shape): sample b's from fold_in(noise_keys[b], step)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), event_shape))(noise_keys)


def make_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], solve: Solve, constants: Any, *, nfe: int,
                  eps: float, denoise: bool, stochastic: bool = False) -> Sampler:
  """``sampler(key, score_fn, z=None, first_index=0, projection=None) -> (samples, nfe)`` around ``solve``.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    solve: the solver in the VE view, from T to ``eps`` (see ``Solve``).
    constants: its per-step constants, float64 host arrays; held in float32, or float64 for a float64 state.
    nfe: the total number of score evaluations (the solver's plus one with ``denoise``).
    eps: the last grid time.
    denoise: return Tweedie's E[x_0 | x_eps] (one more evaluation) instead of x_eps.
    stochastic: the solver draws noise, so a key is needed even with given latents.

  Returns:
    The sampler. Sample i starts from the prior draw of fold_in(key, first_index + i), or from ``z`` (B, ...)
    (then a deterministic solver accepts ``key=None``); ``projection``: a ``sampling.projection.Projection``.
  """
  shape = check_shape(shape)
  event_shape = shape[1:]
  ends = noise_levels.levels(sde, [sde.T, eps])
  alpha_T, alpha_eps = (float(a) for a in ends.alpha)
  sigma_T = float(ends.sigma[0])
  at_eps = ends.point(1)

  @eqx.filter_jit
  def run(score_fn, z, key, first_index, projection):
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(shape[0]))
    if z is None:
      z = jax.vmap(lambda k: sde.prior_sampling(k, (1,) + event_shape)[0])(sample_keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(sample_keys)
    project = no_projection
    if projection is not None:
      project_keys = projection_lib.stream(sample_keys)
      z = projection.init(projection_lib.call_keys(project_keys, 0), z, alpha_T, sigma_T)
      # Step j's projection is call j + 1, in the VE view (kernel (1, sigma~)).
      project = lambda y, j, sigma_tilde: projection(projection_lib.call_keys(project_keys, j + 1), y, 1.0,
                                                      sigma_tilde)
    # Into the VE view, the solver from T to eps, and back (or Tweedie's denoiser at eps).
    y = z / alpha_T
    y = solve(score_fn, y, on_device(constants, jnp.promote_types(y.dtype, jnp.float32)), noise_keys, project)
    x = noise_levels.denoiser(score_fn, y, at_eps) if denoise else alpha_eps * y
    if projection is not None:  # The constraint exactly on the returned samples.
      x = projection(projection_lib.call_keys(project_keys, projection_lib.FINAL_CALL), x, 1.0, 0.0)
    return x, jnp.int32(nfe)

  def sampler(key: Array | None, score_fn: sde_lib.ScoreFn, z: Array | None = None,
              first_index: int | Array = 0,
              projection: projection_lib.Projection | None = None) -> tuple[Array, Array]:
    if z is not None:
      z = jnp.asarray(z)
      if z.shape != shape or not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"z must be a floating-point array of the sampler's shape {shape}, got "
                         f"{z.dtype} {z.shape}.")
    if key is None:
      if z is None or stochastic or projection is not None:
        raise ValueError("Pass a PRNG key: it draws the latents (unless given as z=), the noise of a "
                         "stochastic solver and that of a projection.")
      key = jax.random.key(0)  # A deterministic solver with given latents draws nothing.
    return run(score_fn, z, key, jnp.asarray(first_index, jnp.int32), projection)

  return sampler


__all__ = ["Project", "Solve", "check_shape", "grid", "multistep_orders", "no_projection",
           "make_sampler", "on_device", "solver_steps", "stack", "step_noise"]
