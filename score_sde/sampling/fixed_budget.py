"""The frame every fixed-budget sampler (``euler``, ``heun``, ``dpm_solver``, ``dpm_solver++``,
``unipc``) shares: option checks, latents, the VE view, the final denoising step, one compiled program.

A solver supplies ``solve(score_fn, y, noise_keys, project) -> y_eps``: it integrates the
probability-flow ODE (or a reverse SDE) in the VE view y = x / alpha_t from the grid's first time T
to its last, eps (``noise_levels``), making exactly the number of score evaluations it was built
for, and calls ``project(y, j, sigma~)`` on its state after each step j (``Project``). The frame
draws x_T, maps it to y_T = x_T / alpha_T, runs ``solve`` and maps back, x_eps = alpha_eps y; with
``denoise`` it returns Tweedie's E[x_0 | x_eps] = D(y_eps; sigma~_eps) instead, one more
evaluation. With a ``projection`` (``sampling.projection``) the frame applies its ``init`` to x_T,
the projection after every solver step in the VE view (kernel (1, sigma~)), and a last one at
(1, 0) to the returned samples; without one, ``project`` is the identity.

Randomness. Sample i of a call with ``first_index`` f starts from the prior draw with key
k_i = fold_in(key, f + i), the same latent as ``method="ode"`` draws, so deterministic solvers
and the adaptive ODE solver can be compared sample by sample; a stochastic solver draws the noise
of its step j from fold_in(fold_in(k_i, 1), j). So sample i never depends on the batch size.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling import noise_levels
from score_sde.sampling import projection as projection_lib

Array = jax.Array
Project = Callable[[Array, Array, Array], Array]
"""``project(y (B, ...), step (int32 scalar), sigma_tilde (scalar)) -> y``: called by a solver on its
state after each step, with the step's index j (0, 1, ...) and the noise level sigma~ of the state
(the level of grid point j + 1)."""
Solve = Callable[[sde_lib.ScoreFn, Array, Array, Project], Array]
"""``solve(score_fn, y_T (B, ...), noise_keys (B,), project) -> y_eps (B, ...)``, in the VE view."""


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
  """The evaluations left for the solver after the final denoising step, with the checks.

  Raises ``ValueError`` unless ``order`` is one of ``orders`` and ``nfe`` is an integer that pays
  for at least ``order`` solver evaluations (plus one with ``denoise``).
  """
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


def step_noise(noise_keys: Array, step: Array | int, event_shape: tuple[int, ...]) -> Array:
  """Standard normal noise of one step, (B, *event_shape): sample b's from fold_in(noise_keys[b], step)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), event_shape))(noise_keys)


def build_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], solve: Solve, *, nfe: int, eps: float,
                  denoise: bool, stochastic: bool = False) -> Sampler:
  """Wraps a solver into ``sampler(key, score_fn, z=None, first_index=0, projection=None) -> (samples, nfe)``.

  Args:
    sde: the forward SDE.
    shape: (B, ...) the shape of one batch.
    solve: the solver in the VE view, from T to ``eps`` (see ``Solve``).
    nfe: the total number of score evaluations made (the solver's plus one with ``denoise``).
    eps: the last grid time.
    denoise: return E[x_0 | x_eps] (one more evaluation) instead of x_eps.
    stochastic: the solver draws noise, so a key is needed even with given latents.

  Returns:
    ``sampler(key, score_fn, z=None, first_index=0, projection=None)``. Without ``z`` sample i
    starts from a prior draw with key fold_in(key, first_index + i); with ``z`` (B, ...) it
    integrates from those latents at T (a stochastic solver still takes its noise from ``key``; a
    deterministic one accepts ``key=None``). ``projection``: an optional
    ``sampling.projection.Projection`` (it needs ``key``). Returns the samples and ``nfe`` (int32),
    exactly the budget asked for.
  """
  shape = check_shape(shape)
  event_shape = shape[1:]
  ends = noise_levels.levels(sde, [sde.T, eps])
  alpha_T, alpha_eps = (float(a) for a in ends.alpha)
  sigma_T, sigma_eps = (float(s) for s in ends.sigma)

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
      project = lambda y, j, s: projection(projection_lib.call_keys(project_keys, j + 1), y, 1.0, s)
    # Into the VE view, the solver from T to eps, and back (or Tweedie's denoiser at eps).
    y = solve(score_fn, z / alpha_T, noise_keys, project)
    x = noise_levels.denoiser(score_fn, y, eps, alpha_eps, sigma_eps) if denoise else alpha_eps * y
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


__all__ = ["Project", "Solve", "build_sampler", "check_shape", "no_projection", "solver_steps", "step_noise"]
