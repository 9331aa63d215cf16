"""The predictor-corrector sampler (Song et al. 2021, Alg. 1), compiled as one program.

    sampler = get_pc_sampler(sde, (B, ...), predictor="reverse_diffusion", corrector="langevin")
    samples, nfe = sampler(key, score_fn)

Time grid. t_i = linspace(T, eps, num_steps); at each t_i the corrector runs first, then the
predictor steps from t_i to t_{i+1}, with t_{num_steps} = 0: every step has the grid spacing
dt = (T - eps) / (num_steps - 1) except the last, eps -> 0, which lands on clean data (for the
chain predictors this is what ``sde.step_levels`` does for any step reaching t <= 0; for
Euler–Maruyama it stops the last step from running past t = 0). With ``num_steps == 1`` the
single step goes from T straight to 0. ``denoise`` returns the last predictor's mean (the last
noise injection dropped); with predictor ``none`` there is no predictor mean and the last state is
returned as it is (as in the original: a Langevin mean x + eps s is not a denoiser and would
shrink the samples).

Randomness. Sample i of a call with ``first_index`` f draws everything (its prior sample, then
the noise of every step from a chain of splits) from fold_in(key, f + i) alone. So, unless the
batch-averaged Langevin step couples the samples (use ``step_rule="per_sample"``), sample i is
the same whatever the batch size, and drawing a large set in chunks with
``first_index = 0, B, 2B, ...`` reproduces one big batch (bitwise, if the score function is itself
batch-invariant).

Projection. ``sampler(..., projection=p)`` (``sampling.projection``) constrains part of the state,
for inpainting and colourisation: p.init on the prior draw, then p after each corrector update (at
t_i) and each predictor update (at t_{i+1}, clean data after the last step); the predictor's mean
is projected at noise 0 (its known part is alpha_{t_{i+1}} times the data), so ``denoise`` returns
the mean in the free part and the constraint in the rest. A ``none`` update is not followed by a
projection. The returned samples get a last projection at (1, 0).
"""

from __future__ import annotations

import inspect
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


def get_pc_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], *, predictor: str = "reverse_diffusion",
                   corrector: str = "langevin", snr: float = 0.16, n_steps: int = 1,
                   probability_flow: bool = False, denoise: bool = True, eps: float = 1e-3,
                   num_steps: int | None = None, step_rule: str = "batch", **unknown) -> Sampler:
  """Builds ``sampler(key, score_fn, first_index=0, projection=None) -> (samples, nfe)``.

  Args:
    sde: the forward SDE the score function belongs to.
    shape: shape of one batch of samples, (B, ...).
    predictor: a name in ``PREDICTORS``.
    corrector: a name in ``CORRECTORS``.
    snr: the corrector's signal-to-noise ratio.
    n_steps: corrector steps per grid point.
    probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
    denoise: return the mean of the last step (no noise added at t = 0).
    eps: the last grid time; the sampler then steps from eps to 0.
    num_steps: grid points (predictor steps); defaults to ``sde.N``.
    step_rule: the Langevin step-size rule, ``"batch"`` (the original's) or ``"per_sample"``.
    **unknown: rejected with a ``ValueError`` naming the valid options.

  Returns:
    ``sampler(key, score_fn, first_index=0, projection=None)``: ``key`` a PRNG key,
    ``score_fn(x (B, ...), t (B,))`` any score function (arrays inside a pytree callable such as
    ``jax.tree_util.Partial`` are traced, so new parameters reuse the compiled program),
    ``first_index`` the global index of the first sample, ``projection`` an optional
    ``sampling.projection.Projection`` (a pytree; see the module docstring). Returns samples of
    ``shape`` and ``nfe``, the int32 number of score evaluations made (the same for every sample).
  """
  if unknown:
    valid = [p for p in inspect.signature(get_pc_sampler).parameters if p not in ("sde", "shape", "unknown")]
    raise ValueError(f"Unknown option(s) {sorted(unknown)} for the PC sampler; valid options: {valid}.")
  if predictor not in PREDICTORS:
    raise ValueError(f"Unknown predictor {predictor!r}; valid choices: {sorted(PREDICTORS)}.")
  if corrector not in CORRECTORS:
    raise ValueError(f"Unknown corrector {corrector!r}; valid choices: {sorted(CORRECTORS)}.")
  if predictor == "none" and corrector == "none":
    raise ValueError("predictor='none' with corrector='none' would not sample at all; choose a predictor "
                     f"from {sorted(PREDICTORS)} or a corrector from {sorted(CORRECTORS)}.")
  if step_rule not in STEP_RULES:
    raise ValueError(f"Unknown step_rule {step_rule!r}; valid choices: {STEP_RULES}.")
  num_steps = sde.N if num_steps is None else num_steps
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps}.")
  if not 0 < eps < sde.T:
    raise ValueError(f"eps (the last grid time) must lie in (0, T) = (0, {sde.T}), got {eps}.")
  shape = tuple(int(n) for n in shape)
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f"shape must be (B, ...) with a batch axis and an event shape, got {shape}.")
  num_steps = int(num_steps)
  pred = PREDICTORS[predictor](probability_flow=bool(probability_flow))
  corr = CORRECTORS[corrector](snr=snr, n_steps=n_steps, step_rule=step_rule)
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
