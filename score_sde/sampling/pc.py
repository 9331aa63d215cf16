"""The predictor-corrector sampler (Song et al. 2021, Alg. 1), compiled as one program.

    sampler = get_pc_sampler(sde, (B, ...), predictor="reverse_diffusion", corrector="langevin")
    samples, nfe = sampler(key, score_fn)

Grid t_i = linspace(T, eps, num_steps); at each t_i the corrector, then the predictor to t_{i+1} (t_n = 0).
Sample i draws everything from fold_in(key, first_index + i). Grid, randomness, projection: ``docs/samplers.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from score_sde import sde as sde_lib
from score_sde.sampling import projection as projection_lib
from score_sde.sampling.correctors import CORRECTORS, STEP_RULES
from score_sde.sampling.predictors import PREDICTORS

Array = jax.Array
Sampler = Callable[..., tuple[Array, Array]]


def _split(keys: Array, num: int) -> tuple[Array, ...]:
  """Splits each of the per-sample keys (B,) into ``num`` per-sample keys (B,)."""
  return tuple(jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, num))(keys), 1, 0))


def _fields(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _build(table: dict[str, type], kind: str, name: str, options: dict):
  """``table[name]`` built with the options it declares (the others do not apply to it)."""
  if name not in table:
    raise ValueError(f"Unknown {kind} {name!r}; valid choices: {sorted(table)}.")
  return table[name](**{k: v for k, v in options.items() if k in _fields(table[name])})


def get_pc_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, predictor: str = "reverse_diffusion",
                   corrector: str = "langevin", snr: float = 0.16, n_steps: int = 1,
                   probability_flow: bool = False, denoise: bool = True, eps: float = 1e-3,
                   num_steps: int | None = None, step_rule: str = "batch") -> Sampler:
  """``sampler(key, score_fn, first_index=0, projection=None) -> (samples (B, ...), nfe)``.

  Args:
    predictor, corrector: names in ``PREDICTORS`` / ``CORRECTORS``, built with the options they declare:
      ``probability_flow`` (euler_maruyama, reverse_diffusion), ``snr`` and ``n_steps`` (corrector steps per grid
      point) of the correctors, ``step_rule`` (langevin: ``batch`` or ``per_sample``).
    denoise: return the last predictor's mean (no noise at t = 0).
    eps: the last grid time; num_steps: grid points (default ``sde.N``).
  """
  if predictor == "none" and corrector == "none":
    raise ValueError("predictor='none' with corrector='none' would not sample at all; choose a predictor "
                     f"from {sorted(PREDICTORS)} or a corrector from {sorted(CORRECTORS)}.")
  pred = _build(PREDICTORS, "predictor", predictor, {"probability_flow": bool(probability_flow)})
  if probability_flow and "probability_flow" not in _fields(type(pred)):
    takers = sorted(n for n, cls in PREDICTORS.items() if "probability_flow" in _fields(cls))
    raise ValueError(f"The predictor {predictor!r} has no probability_flow; set probability_flow=False, or choose "
                     f"a predictor that has it: {takers}.")
  if step_rule not in STEP_RULES:  # checked whichever corrector runs, so a misspelt setting cannot wait unseen
    raise ValueError(f"Unknown step_rule {step_rule!r}; valid choices: {STEP_RULES}.")
  corr = _build(CORRECTORS, "corrector", corrector, {"snr": snr, "n_steps": n_steps, "step_rule": step_rule})
  num_steps = sde.N if num_steps is None else num_steps
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  if not 0 < eps < sde.T:
    raise ValueError(f"eps (the last grid time) must lie in (0, T) = (0, {sde.T}), got {eps}.")
  shape = tuple(int(n) for n in shape)
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f"shape must be (B, ...) with a batch axis and an event shape, got {shape}.")
  num_steps = int(num_steps)
  # Grid times t_0 = T > ... > t_{n-1} = eps, and the step lengths t_i - t_{i+1} with t_n = 0.
  grid = jnp.linspace(sde.T, eps, num_steps)
  steps = grid - jnp.append(grid[1:], 0.0)
  batch = shape[0]

  @eqx.filter_jit
  def run(key: Array, score_fn: sde_lib.ScoreFn, first_index: Array,
          project: projection_lib.Projection | None) -> tuple[Array, Array]:
    # Sample b's key: its prior draw, then a chain of splits that gives each step its own keys.
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(batch))
    prior_keys, step_keys = _split(sample_keys, 2)
    x = jax.vmap(lambda k: sde.prior_sampling(k, (1,) + shape[1:])[0])(prior_keys)
    if project is not None:
      # Noise levels at t_i (after the corrector) and t_{i+1} (after the predictor; the last step
      # lands on clean data, alpha = 1, sigma = 0, as ``sde.step_levels`` has it).
      alpha_i, sigma_i = sde.alpha_sigma(grid)
      alpha_next, sigma_next = jnp.append(alpha_i[1:], 1.0), jnp.append(sigma_i[1:], 0.0)
      project_keys = projection_lib.stream(sample_keys)
      x = project.init(projection_lib.call_keys(project_keys, 0), x, alpha_i[0], sigma_i[0])

    def step(carry, i):
      x, _, nfe, keys = carry
      t = jnp.full((batch,), grid[i], x.dtype)
      keys, corrector_keys, predictor_keys = _split(keys, 3)
      # Corrector at t_i, then the predictor from t_i to t_{i+1}.
      x, _, nfe_c = corr.update(corrector_keys, x, t, steps[i], sde, score_fn)
      if project is not None and corrector != "none":
        x = project(projection_lib.call_keys(project_keys, 2 * i + 1), x, alpha_i[i], sigma_i[i])
      x, x_mean, nfe_p = pred.update(predictor_keys, x, t, steps[i], sde, score_fn)
      if project is not None and predictor != "none":
        call = projection_lib.call_keys(project_keys, 2 * i + 2)
        x = project(call, x, alpha_next[i], sigma_next[i])
        if denoise:
          x_mean = project(call, x_mean, alpha_next[i], 0.0)
      return (x, x_mean, nfe + nfe_c + nfe_p, keys), None

    init = (x, x, jnp.zeros((), jnp.int32), step_keys)
    (x, x_mean, nfe, _), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
    x = x_mean if denoise else x
    if project is not None:  # The constraint exactly, whatever the last update was.
      x = project(projection_lib.call_keys(project_keys, projection_lib.FINAL_CALL), x, 1.0, 0.0)
    return x, nfe

  def sampler(key: Array, score_fn: sde_lib.ScoreFn, first_index: int | Array = 0,
              projection: projection_lib.Projection | None = None) -> tuple[Array, Array]:
    return run(key, score_fn, jnp.asarray(first_index, jnp.int32), projection)

  return sampler
