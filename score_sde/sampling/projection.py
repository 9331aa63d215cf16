"""The per-step projection hook of the samplers: constrain part of the state while sampling.

Conditional generation from an unconditional score model (inpainting, colourisation; see
``score_sde.controllable``) replaces the known part of the state after every update by a copy of
the data at the current noise level. A sampler given ``projection=`` calls

    x = projection.init(keys, x_T, alpha_T, sigma_T)     # once, on the prior draw at T
    x = projection(keys, x, alpha, sigma)                # after every update

where the state ``x`` (B, ...) has the kernel x = alpha x_0 + sigma eps at that point, ``alpha`` and
``sigma`` are scalars and ``keys`` (B,) are fresh per-sample PRNG keys for the call. The PC sampler
calls it in x with the SDE's (alpha_t, sigma_t) after each corrector and predictor update; the
fixed-budget solvers call it in their VE view y = x / alpha_t, with (1, sigma~_t), after each step.
Both end with a call at (1, 0), on the returned samples: a constraint is then met exactly. Calls at
noise 0 (that one, and the PC sampler's projection of its predictor mean) pass ``sigma`` as the
Python number 0.0, so a projection can skip drawing noise there.

Randomness. Sample i's projection keys come from their own stream, fold_in(k_i, 2) with k_i the
sample's key (the PC sampler draws from split(k_i, 2) = (fold_in(k_i, 0), fold_in(k_i, 1)), the
fixed-budget solvers from k_i and fold_in(k_i, 1)), and call c of a run uses
fold_in(fold_in(k_i, 2), c): c = 0 for ``init``, 1, 2, ... for the updates in order, and
``FINAL_CALL`` for the last. So a projection leaves the sampler's own noise as it is, and sample i
still depends on nothing but its own key.

A projection is passed at call time as a pytree (for example a dataclass registered with
``jax.tree_util.register_dataclass``): its arrays are traced, so new data reuse the compiled
program.
"""

from __future__ import annotations

from typing import Protocol

import jax

Array = jax.Array

# The stream of projection keys: fold_in(sample key, PROJECTION_STREAM).
PROJECTION_STREAM = 2
# The call number of the last projection, at (1, 0), of every sampler.
FINAL_CALL = 2**31 - 1


class Projection(Protocol):
  """The interface of a sampler's ``projection=`` argument."""

  def init(self, keys: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """The initial state from the prior draw ``x`` (B, ...) at T, with its (alpha_T, sigma_T)."""

  def __call__(self, keys: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """The state ``x`` (B, ...), whose kernel is (alpha, sigma), with the constraint imposed."""


def stream(sample_keys: Array) -> Array:
  """The per-sample projection keys (B,) of per-sample keys (B,)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, PROJECTION_STREAM))(sample_keys)


def call_keys(stream_keys: Array, call: Array | int) -> Array:
  """The keys (B,) of call number ``call`` from the projection stream (B,)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, call))(stream_keys)


__all__ = ["FINAL_CALL", "PROJECTION_STREAM", "Projection", "call_keys", "stream"]
