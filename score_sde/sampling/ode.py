"""Probability-flow ODE sampler, solved on device with diffrax, one step size sequence per sample.

The probability-flow ODE of a forward SDE dx = f dt + g dw has the same marginals p_t:

    dx/dt = f(x, t) - g(t)^2 / 2 * s(x, t),    s = grad_x log p_t,

and sampling integrates it from x_T ~ p_T back to t = eps with an adaptive Runge-Kutta method
and a PID step-size controller, compiled as one program (``equinox.filter_jit``: a plain Python
score function is static, arrays inside a pytree callable such as ``jax.tree_util.Partial(apply,
params)`` are traced). The solve is ``jax.vmap``-ed over samples, so each sample has its own
steps and error control: a hard sample does not shrink the others' steps, and sample i does not
depend on the rest of the batch (bit for bit across batch sizes >= 2 on CPU; a batch of one,
which XLA compiles differently, agrees to solver tolerance, since at rtol ~ 1e-5 in float32 the
accept/reject decisions follow rounding). The batched score function is still called once per
solver stage for the whole batch, and samples that have finished idle while the others go on, so
the number of score evaluations made is the maximum over samples of the per-sample count.

Failure. A sample that needs more than ``max_steps`` steps makes the call raise (diffrax
``throw=True``: "The maximum number of solver steps was reached. Try increasing `max_steps`."),
for the whole batch, rather than return a silently wrong sample.

    sampler = get_ode_sampler(sde, (B, D), rtol=1e-5, atol=1e-5, eps=1e-3)
    samples, nfe = sampler(key, score_fn)           # from the prior
    x, nfe = sampler(None, score_fn, z=latents)     # decode given latents at T

The per-sample solve (``solve_per_sample``) and the solver table are shared with
``score_sde.likelihood``.
"""

from __future__ import annotations

import inspect
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


def reject_unknown(builder: Callable, unknown: dict, what: str) -> None:
  """Raises ``ValueError`` naming ``builder``'s valid keyword options if ``unknown`` is not empty."""
  if unknown:
    valid = [name for name, p in inspect.signature(builder).parameters.items()
             if p.default is not inspect.Parameter.empty]
    raise ValueError(f"Unknown option(s) {sorted(unknown)} for {what}; valid options: {valid}.")


def _evals(solver: diffrax.AbstractAdaptiveSolver, num_steps: Array) -> Array:
  """Vector-field evaluations of an explicit RK solve with ``num_steps`` attempted steps.

  Every attempted step (accepted or rejected) evaluates each stage once, except that an FSAL
  method reuses its last stage as the next step's first, and evaluates f(t0, y0) once at the
  start. (With an explicit ``dt0`` diffrax makes no evaluation to pick the first step.) The test
  suite checks this count against a vector field that counts its own calls.
  """
  tableau = solver.tableau
  if tableau.fsal:
    return 1 + (tableau.num_stages - 1) * num_steps
  return tableau.num_stages * num_steps


def solve_per_sample(vector_field: Callable[[Array, Any, Any], Any], y0: Any, args: Any,
                     t0: float, t1: float, *, solver: diffrax.AbstractAdaptiveSolver,
                     rtol: float, atol: float, max_steps: int) -> tuple[Any, Array]:
  """Solves dy/dt = vector_field(t, y, args) from t0 to t1 for each sample, with its own steps.

  Args:
    vector_field: (t scalar, y one sample's state pytree, args one sample's args) -> dy/dt.
      It is called under ``jax.vmap``, so a batched model inside it runs once per stage for the
      whole batch.
    y0: pytree of initial states, each leaf (B, ...).
    args: pytree of per-sample arguments, each leaf (B, ...) (or None).
    t0, t1: start and end times (t1 < t0 integrates backwards).
    solver: an explicit adaptive diffrax solver.
    rtol, atol: tolerances of the PID controller (RMS norm over one sample's state).
    max_steps: step budget per sample.

  Returns:
    (y1, nfe): the states at t1 (like y0) and the per-sample vector-field evaluation counts (B,)
    int32. A solve that exhausts ``max_steps`` (or fails otherwise) raises a runtime error
    (diffrax ``throw=True``) when the result is computed, rather than returning a wrong value.
  """
  controller = diffrax.PIDController(rtol=rtol, atol=atol)
  # First trial step: 1% of the interval; the controller adapts from there.
  dt0 = 0.01 * (t1 - t0)

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
                    solver: str = "tsit5", max_steps: int = MAX_STEPS, **unknown) -> Callable:
  """Builds a probability-flow ODE sampler ``sampler(key, score_fn, z=None, first_index=0)``.

  Args:
    sde: the forward SDE the score function belongs to.
    shape: (B, ...) the shape of one batch of samples.
    rtol, atol: per-sample tolerances of the adaptive solver.
    eps: the time the solve stops at (the samples follow p_eps).
    denoise: apply one Tweedie denoising step at eps, x_0 = (x + sigma_eps^2 s) / alpha_eps (the
      mean of ``sde.ancestral_step`` from eps to 0 under the default grid discretisation, computed
      from the marginals so that it holds for every discretisation); costs one more score
      evaluation. (The original used one reverse-diffusion predictor step here.)
    solver: one of ``SOLVERS``.
    max_steps: step budget per sample; exhausting it raises a runtime error.
    **unknown: rejected with a ``ValueError`` naming the valid options.

  Returns:
    ``sampler(key, score_fn, z=None, first_index=0) -> (samples (B, ...), nfe int32 scalar)``.
    Without ``z`` sample i starts from a prior draw with key ``fold_in(key, first_index + i)``,
    so it does not depend on the batch size (use ``first_index`` to continue a sequence across
    batches); with ``z`` (B, ...) the sampler decodes those latents (``key`` may be None), by
    the same compiled program. ``nfe`` is the number of batched score evaluations made: the
    maximum over samples of each sample's count (+1 with ``denoise``), since the vmapped solve
    runs until its slowest sample is done.
  """
  reject_unknown(get_ode_sampler, unknown, "the ODE sampler")
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
    if denoise:  # Tweedie: E[x_0 | x_eps] = (x + sigma_eps^2 s) / alpha_eps.
      t_eps = jnp.full((shape[0],), eps, x.dtype)
      alpha, sigma = sde.alpha_sigma(t_eps)
      x = sde_lib.batch_mul(1.0 / alpha, x + sde_lib.batch_mul(sigma**2, score_fn(x, t_eps)))
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


__all__ = ["MAX_STEPS", "SOLVERS", "check_tolerances", "get_ode_sampler", "get_solver", "reject_unknown",
           "single", "solve_per_sample"]
