"""EDM preconditioning (Karras et al. 2022) and the denoiser <-> score <-> noise conversions.

Every SDE here has x_t = alpha_t x_0 + sigma_t eps. Three equivalent outputs of a model are

* the score s = grad_x log p_t(x);
* the noise prediction epsilon^ = E[eps | x_t] = -sigma_t s;
* the denoiser D = E[x_0 | x_t] = (x + sigma_t^2 s) / alpha_t (Tweedie's formula),

and the functions below convert between them (``alpha``, ``sigma`` of shape (B,), arrays (B, ...)).

EDM writes the denoiser of the VE view y = x / alpha_t, noise level sigma~ = sigma_t / alpha_t, as

    D_theta(y; sigma~) = c_skip(sigma~) y + c_out(sigma~) F_theta(c_in(sigma~) y; c_noise(sigma~)),

    c_skip = sigma_d^2 / (sigma~^2 + sigma_d^2),  c_out = sigma~ sigma_d / sqrt(sigma~^2 + sigma_d^2),
    c_in = 1 / sqrt(sigma~^2 + sigma_d^2),         c_noise = log(sigma~) / 4,

so that for data of standard deviation sigma_d the network's input and its effective training
target (y_0 - c_skip y) / c_out both have unit variance, and c_skip minimises the target's variance.
``EDMScoreFunction`` turns such a network into a score function of any SDE of ``score_sde.sde``, so
every sampler and likelihood takes it; ``losses.get_edm_loss_fn`` is its training loss (log-normal
sigma~, weight lambda = 1 / c_out^2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from score_sde import sde as sde_lib

Array = jax.Array
Params = Any
Variables = Mapping[str, Any]

# --- conversions ---------------------------------------------------------------------------------


def denoiser_from_score(score: Array, x: Array, alpha: Array, sigma: Array) -> Array:
  """D = (x + sigma^2 s) / alpha (Tweedie, ``sde.tweedie``), shaped like x."""
  return sde_lib.tweedie(x, score, alpha, sigma)


def score_from_denoiser(denoised: Array, x: Array, alpha: Array, sigma: Array) -> Array:
  """s = (alpha D - x) / sigma^2, shaped like x."""
  return sde_lib.batch_mul(1.0 / sigma**2, sde_lib.batch_mul(alpha, denoised) - x)


def noise_from_score(score: Array, sigma: Array) -> Array:
  """epsilon^ = -sigma s."""
  return sde_lib.batch_mul(-sigma, score)


def score_from_noise(noise: Array, sigma: Array) -> Array:
  """s = -epsilon^ / sigma."""
  return sde_lib.batch_mul(-1.0 / sigma, noise)


def denoiser_from_noise(noise: Array, x: Array, alpha: Array, sigma: Array) -> Array:
  """D = (x - sigma epsilon^) / alpha."""
  return sde_lib.batch_mul(1.0 / alpha, x - sde_lib.batch_mul(sigma, noise))


def noise_from_denoiser(denoised: Array, x: Array, alpha: Array, sigma: Array) -> Array:
  """epsilon^ = (x - alpha D) / sigma."""
  return sde_lib.batch_mul(1.0 / sigma, x - sde_lib.batch_mul(alpha, denoised))


# --- preconditioning -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EDMPreconditioning:
  """The coefficients of EDM's preconditioning for data of standard deviation ``sigma_data``.

  Every method takes the VE-view noise level sigma~ (any shape) and returns the same shape.
  """

  sigma_data: float = 0.5

  def c_skip(self, sigma: Array) -> Array:
    return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

  def c_out(self, sigma: Array) -> Array:
    return sigma * self.sigma_data * jax.lax.rsqrt(sigma**2 + self.sigma_data**2)

  def c_in(self, sigma: Array) -> Array:
    return jax.lax.rsqrt(sigma**2 + self.sigma_data**2)

  def c_noise(self, sigma: Array) -> Array:
    return 0.25 * jnp.log(sigma)

  def loss_weight(self, sigma: Array) -> Array:
    """lambda(sigma~) = 1 / c_out^2 = (sigma~^2 + sigma_d^2) / (sigma~ sigma_d)^2."""
    return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

  def denoise(self, net: Callable[[Array, Array], Array], y: Array, sigma: Array) -> Array:
    """D(y; sigma~) = c_skip y + c_out F(c_in y; c_noise) for y (B, ...) and sigma~ (B,)."""
    out = net(sde_lib.batch_mul(self.c_in(sigma), y), self.c_noise(sigma))
    return sde_lib.batch_mul(self.c_skip(sigma), y) + sde_lib.batch_mul(self.c_out(sigma), out)


class EDMScoreFunction(struct.PyTreeNode):
  """An EDM-preconditioned network as a score function of an SDE, ``score_fn(x (B, ...), t (B,))``.

  At (x, t): y = x / alpha_t, sigma~ = sigma_t / alpha_t, D = ``precond.denoise`` with
  F = ``model.apply(variables, c_in y, c_noise, train=...)``, and the score (alpha_t D - x) / sigma_t^2.
  A pytree: ``variables`` and ``key`` are leaves, the rest static (as ``wrapper.ScoreFunction``).
  """

  variables: Variables
  model: nn.Module = struct.field(pytree_node=False)
  sde: sde_lib.SDE = struct.field(pytree_node=False)
  precond: EDMPreconditioning = struct.field(pytree_node=False)
  key: Array | None = None
  train: bool = struct.field(pytree_node=False, default=False)

  def __call__(self, x: Array, t: Array) -> Array:
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    t = jnp.broadcast_to(jnp.asarray(t, dtype), x.shape[:1])
    alpha, sigma = self.sde.alpha_sigma(t)
    rngs = None if self.key is None else {"dropout": self.key}
    net = lambda inp, labels: self.model.apply(self.variables, inp, labels, train=self.train, rngs=rngs)
    denoised = self.precond.denoise(net, sde_lib.batch_mul(1.0 / alpha, x), sigma / alpha)
    return score_from_denoiser(denoised, x, alpha, sigma)


def get_edm_score_fn(sde: sde_lib.SDE, model: nn.Module, variables: Variables, *, sigma_data: float = 0.5,
                     train: bool = False, key: Array | None = None) -> EDMScoreFunction:
  """The score function of an EDM-preconditioned ``model`` under ``sde``.

  Args:
    sde: the SDE whose times t the samplers pass (any of ``score_sde.sde``).
    model: a flax module, ``model.apply(variables, x, labels, train=...)``; its labels are c_noise.
    variables: its flax variables, ``{"params": ...}``.
    sigma_data: the data's standard deviation sigma_d.
    train: dropout on (needs ``key``).
    key: dropout key.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be the flax variables dict {'params': params, ...}.")
  if train and key is None:
    raise ValueError("train=True runs dropout and needs a PRNG key; pass key=..., or train=False.")
  if not sigma_data > 0:
    raise ValueError(f"sigma_data must be positive, got {sigma_data}.")
  return EDMScoreFunction(variables=variables, model=model, sde=sde, precond=EDMPreconditioning(sigma_data),
                          key=key if train else None, train=train)


def get_edm_score_fn_builder(sde: sde_lib.SDE, model: nn.Module, *, sigma_data: float = 0.5,
                             variables: Variables | None = None) -> sde_lib.ScoreFnBuilder:
  """``build_score_fn(params, key, train) -> EDMScoreFunction``, the form the losses take.

  ``variables``: the initial variables, if the model has collections besides ``params`` (held fixed).
  """
  constants = {name: c for name, c in (variables or {}).items() if name != "params"}

  def build_score_fn(params: Params, key: Array | None, train: bool) -> EDMScoreFunction:
    return get_edm_score_fn(sde, model, {**constants, "params": params}, sigma_data=sigma_data, train=train,
                            key=key)

  return build_score_fn


__all__ = ["EDMPreconditioning", "EDMScoreFunction", "denoiser_from_noise", "denoiser_from_score",
           "get_edm_score_fn", "get_edm_score_fn_builder", "noise_from_denoiser", "noise_from_score",
           "score_from_denoiser", "score_from_noise"]
