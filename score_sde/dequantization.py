"""Dequantisation of 8-bit data: bounds on the discrete log P(x) from a continuous density on y = s((x + u) / 256).

    log P(x) >= E log (1/K) sum_k w_k,   log w_k = log p(y_k) + log|dy/du|(u_k) - log q(u_k | x),   u_k ~ q(. | x)

Dequantisers ``dequantizer(key, x) -> (u, log q)``: ``uniform``, ``truncated_normal(std)`` (i-DODE), ``variational``
(a trained ``models.dequantizer.VariationalDequantizer``); log p from the PF-ODE or the variational bound
(``get_bpd_fn(estimator=...)``). ``docs/likelihood.md``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import struct

from score_sde import bound as bound_lib
from score_sde import likelihood
from score_sde import sde as sde_lib
from score_sde.models import dequantizer as dequantizer_lib

Array = jax.Array
Dequantizer = Callable[[Array, Array], tuple[Array, Array]]
"""``dequantizer(key, x (B, ...) ints) -> (u (B, ...) in [0, 1), log q(u | x) (B,))``."""
LogDensityFn = Callable[[Array, Array], Array]
"""``log_density_fn(key, y (B, ...)) -> (B,)``: (an estimate of) log p(y) in model space, nats."""

# Largest float32 below 1.
_ONE_MINUS = 1.0 - 2.0**-24


def _example_keys(key: Array, batch: int) -> Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def uniform(key: Array, x: Array) -> tuple[Array, Array]:
  """u ~ U[0, 1)^D and log q = 0; (x + u) / 256 equals ``likelihood.dequantize(key, x)``."""
  u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(_example_keys(key, x.shape[0]))
  return u, jnp.zeros((x.shape[0],), u.dtype)


def truncated_normal(std: float, mean: float = 0.5) -> Dequantizer:
  """u ~ N(mean, std^2) truncated to [0, 1) (i-DODE), with its log-density.

  log q(u) = sum_d [log phi((u - mean) / std) - log std] - D log(Phi((1 - mean) / std) - Phi(-mean / std)).
  """
  if not std > 0 or not 0 <= mean <= 1:
    raise ValueError(f"truncated_normal needs std > 0 and mean in [0, 1], got std={std}, mean={mean}.")
  lo, hi = -mean / std, (1.0 - mean) / std
  log_mass = math.log(0.5 * (math.erf(hi / math.sqrt(2)) - math.erf(lo / math.sqrt(2))))

  def dequantizer(key: Array, x: Array) -> tuple[Array, Array]:
    keys = _example_keys(key, x.shape[0])
    e = jax.vmap(lambda k: jax.random.truncated_normal(k, lo, hi, x.shape[1:]))(keys)
    u = jnp.clip(mean + std * e, 0.0, _ONE_MINUS)
    e = (u - mean) / std
    d = math.prod(x.shape[1:])
    log_q = (-0.5 * jnp.sum(e.reshape(x.shape[0], -1) ** 2, axis=1)
             - d * (0.5 * math.log(2 * math.pi) + math.log(std) + log_mass))
    return u, log_q

  return dequantizer


def matched_std(sde: sde_lib.SDE, eps: float, bin_width: float) -> float:
  """i-DODE's truncated-normal std: the noise level sigma~_eps = sigma_eps / alpha_eps in bins.

  Args:
    sde: the SDE of the score model.
    eps: the likelihood's starting time.
    bin_width: one quantisation level in model space (2 / 256 for data in [-1, 1]).
  """
  alpha, sigma = sde.alpha_sigma(jnp.asarray([eps], jnp.float32))
  return float(sigma[0] / alpha[0]) / bin_width


class Variational(struct.PyTreeNode):
  """A trained ``VariationalDequantizer`` as a dequantiser: ``variables`` are pytree leaves, ``module`` static."""

  module: dequantizer_lib.VariationalDequantizer = struct.field(pytree_node=False)
  variables: Any

  def __call__(self, key: Array, x: Array) -> tuple[Array, Array]:
    return self.module.apply(self.variables, key, x, method=self.module.sample_and_log_prob)


def variational(module: dequantizer_lib.VariationalDequantizer, variables: Any) -> Dequantizer:
  """The dequantiser of a trained ``VariationalDequantizer`` and its variables (a pytree, so jitted callers trace
  new variables instead of recompiling)."""
  return Variational(module=module, variables=variables)


# Dequantisers by name (a variational one is built from trained variables with ``variational``).
DEQUANTIZERS: dict[str, Callable[..., Dequantizer]] = {
    "uniform": lambda: uniform,
    "truncated_normal": truncated_normal,
}


def get_dequantizer(name: str, **kwargs) -> Dequantizer:
  """A dequantiser by name: ``uniform`` or ``truncated_normal`` (std=..., mean=0.5)."""
  if name not in DEQUANTIZERS:
    raise ValueError(f"Unknown dequantizer {name!r}; valid choices: {sorted(DEQUANTIZERS)} (a variational "
                     f"dequantiser is built with variational(module, variables)).")
  return DEQUANTIZERS[name](**kwargs)


def to_model_space(x: Array, u: Array, data_scaler: Callable[[Array], Array] | None = None) -> tuple[Array, Array]:
  """y = s((x + u) / 256) (B, ...) and log|dy/du| (B,) (elementwise scaler; -D log 256 included)."""
  scaler = (lambda v: v) if data_scaler is None else data_scaler
  v = (x.astype(u.dtype) + u) / 256.0
  y, dy_dv = jax.jvp(scaler, (v,), (jnp.ones_like(v),))
  d = math.prod(x.shape[1:])
  return y, jnp.sum(jnp.log(jnp.abs(dy_dv)).reshape(x.shape[0], -1), axis=1) - d * math.log(256.0)


def log_prob_bound(key: Array, log_density_fn: LogDensityFn, dequantizer: Dequantizer, x: Array,
                   num_samples: int = 1, data_scaler: Callable[[Array], Array] | None = None
                   ) -> tuple[Array, Array]:
  """(log (1/K) sum_k w_k <= log P(x) (B,) nats, log w (B, K)) for integers x (B, ...) in 0..255.

  ``log_density_fn(key, y) -> (B,)`` is (an estimate of) log p in model space. Sample k uses
  ``split(key_k)``, key_0 = key, key_k = fold_in(key, k): K = 1 with uniform noise and the ODE draws what
  ``likelihood.get_bpd_fn(key)`` draws.
  """
  log_w, _ = _log_weights(key, lambda k, y: (log_density_fn(k, y), None), dequantizer, x, num_samples, data_scaler)
  return jax.nn.logsumexp(log_w, axis=1) - math.log(num_samples), log_w


def _log_weights(key, log_density_fn, dequantizer, x, num_samples, data_scaler):
  """log w (B, K), and the second output of ``log_density_fn(key, y) -> (log p, other)`` per sample."""
  def log_weight(sample_key):
    k_deq, k_density = jax.random.split(sample_key)
    u, log_q = dequantizer(k_deq, x)
    y, log_det = to_model_space(x, u, data_scaler)
    log_p, other = log_density_fn(k_density, y)
    return log_p + log_det - log_q, other

  keys = jnp.concatenate([key[None], jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(1, num_samples))])
  log_w, other = jax.lax.map(log_weight, keys)
  return log_w.T, other


def _check_images(images: Array) -> Array:
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.integer):
    raise ValueError(f"Dequantisation needs 8-bit integer data (uint8, or ints in 0..255), got dtype "
                     f"{images.dtype}; for continuous data use likelihood.get_likelihood_fn or bound.get_bound_fn.")
  if images.ndim < 2:
    raise ValueError(f"images must have shape (B, ...), got {images.shape}.")
  return images


ESTIMATORS = ("ode", "bound")


def get_bpd_fn(sde: sde_lib.SDE, dequantizer: Dequantizer = uniform, estimator: str = "ode", num_samples: int = 1,
               data_scaler: Callable[[Array], Array] | None = None, **estimator_kwargs) -> Callable:
  """``bpd_fn(key, score_fn, integer images (B, ...)) -> (bits/dim (B,), aux)``: the K-sample bound on -log P(x).

  ``estimator``: ``ode`` (``likelihood.get_likelihood_fn``) or ``bound`` (``bound.get_bound_fn``), with
  ``estimator_kwargs``. aux: "log_weights" (B, K); "nfe" (ode, the most over the K solves) or "bound_se" (B, K).
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unknown estimator {estimator!r}; valid choices: {sorted(ESTIMATORS)}.")
  if int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer, got {num_samples}.")
  if estimator == "ode":
    lik = likelihood.get_likelihood_fn(sde, **estimator_kwargs)
    log_density = lambda score_fn, k, y: (lambda out: (out[0], out[2]))(lik(k, score_fn, y))
  else:
    bound_fn = bound_lib.get_bound_fn(sde, **estimator_kwargs)
    log_density = lambda score_fn, k, y: (lambda out: (-out[0], out[1]))(bound_fn(k, score_fn, y))

  @eqx.filter_jit
  def bpd(key, score_fn, dequantizer, images):
    images = eqx.error_if(images, (jnp.min(images) < 0) | (jnp.max(images) > 255),
                          "bits/dim needs 8-bit images with values in 0..255.")
    log_w, other = _log_weights(key, lambda k, y: log_density(score_fn, k, y), dequantizer, images, num_samples,
                                data_scaler)
    log_p = jax.nn.logsumexp(log_w, axis=1) - math.log(num_samples)
    aux = {"log_weights": log_w}
    aux.update({"nfe": jnp.max(other)} if estimator == "ode" else {"bound_se": other.T})
    return -log_p / (math.prod(images.shape[1:]) * math.log(2.0)), aux

  def bpd_fn(key: Array, score_fn: sde_lib.ScoreFn, images: Array) -> tuple[Array, dict[str, Array]]:
    return bpd(key, score_fn, dequantizer, _check_images(images))

  return bpd_fn


def bound_nll_fn(sde: sde_lib.SDE, score_fn: sde_lib.ScoreFn, **bound_kwargs) -> Callable[[Array, Array], Array]:
  """``nll_fn(key, y) -> (B,)``: the variational bound B(y) of a frozen score model, for ``get_loss_fn``.

  ``bound_kwargs`` go to ``bound.get_bound_fn`` (eps, num_time_samples (1 by default: one score
  evaluation per example), decoder, sigma_data).
  """
  bound_fn = bound_lib.get_bound_fn(sde, **bound_kwargs)
  return lambda key, y: bound_fn(key, score_fn, y)[0]


def get_loss_fn(module: dequantizer_lib.VariationalDequantizer, nll_fn: Callable[[Array, Array], Array],
                data_scaler: Callable[[Array], Array] | None = None) -> Callable:
  """``loss_fn(key, params, images) -> (loss, aux)``: E_q[nll(y(u)) - log|dy/du| + log q(u | x)] >= -log P(x),
  nats per dimension; ``nll_fn(key, y) -> (B,)`` (ScoreFlow: ``bound_nll_fn``, the frozen score model's bound).
  aux: "per_example" (B,) nats, "metrics" {"bpd"}. ``k_deq, k_nll = split(key)``."""
  def loss_fn(key: Array, params: Any, images: Array) -> tuple[Array, dict[str, Any]]:
    k_deq, k_nll = jax.random.split(key)
    u, log_q = module.apply(params, k_deq, images, method=module.sample_and_log_prob)
    y, log_det = to_model_space(images, u, data_scaler)
    per_example = nll_fn(k_nll, y) - log_det + log_q
    d = math.prod(images.shape[1:])
    return jnp.mean(per_example) / d, {"per_example": per_example,
                                       "metrics": {"bpd": jnp.mean(per_example) / (d * math.log(2.0))}}

  return loss_fn


__all__ = ["DEQUANTIZERS", "ESTIMATORS", "Dequantizer", "bound_nll_fn", "get_bpd_fn", "get_dequantizer",
           "get_loss_fn", "log_prob_bound", "matched_std", "to_model_space", "truncated_normal", "uniform",
           "variational"]
