"""The samplers' per-step projection hook (inpainting, colourisation: ``score_sde.controllable``).

    x = projection.init(keys, x_T, alpha_T, sigma_T)     # once, on the prior draw
    x = projection(keys, x, alpha, sigma)                # after every update; last at (1, 0)

x (B, ...) has the kernel x = alpha x_0 + sigma z; keys (B,) come from each sample's own stream. ``docs/samplers.md``.
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
