"""The continuous-time variational bound on -log p of the reverse SDE (ScoreFlow's Theorem 1), on device.

    bound_fn = get_bound_fn(sde, eps=1e-5, num_time_samples=K)
    nll, se = bound_fn(key, score_fn, x)     # B(x) (B,) nats, and its Monte-Carlo standard error (B,)

B(x) = E[-log pi(x_T)] + D log(sigma~_eps / sigma_T) + 1/2 int_eps^T g^2 E||s(x_t, t) + z / sigma_t||^2 dt + R(x),
sigma~ = sigma / alpha; t by the likelihood-weighted loss's importance proposal; terms and estimator:
``docs/likelihood.md``. Example i draws from ``fold_in(key, i)``, so it does not depend on its batch.
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from score_sde import likelihood
from score_sde import losses
from score_sde import sde as sde_lib
from score_sde.sde import batch_mul

Array = jax.Array

DECODERS = ("noisy", "tweedie")


def get_bound_fn(sde: sde_lib.SDE, eps: float = 1e-5, num_time_samples: int = 1, decoder: str = "noisy",
                 sigma_data: float | None = 0.5, time_batch: int | None = None) -> Callable:
  """``bound_fn(key, score_fn, x (B, ...)) -> (nll (B,), se (B,))``: B(x) >= -log p_theta(x) in nats, K samples.

  Args:
    num_time_samples: K importance-sampled times (each with its own z) per example; se is NaN for K = 1.
    decoder: ``noisy`` (R = 0: bounds p_eps of x perturbed to eps) or ``tweedie`` (ScoreFlow's, clean data).
    sigma_data: the control variate c_t^2 ||z||^2, c_t = sigma_d^2 / (sigma_d^2 + sigma~_t^2), subtracted and
      integrated back in closed form (unbiased for any value; ``inf``: ScoreFlow's c_t = 1; None: none).
    time_batch: time samples per (vmapped) score call; None: one at a time.
  """
  if not 0 < eps < sde.T:
    raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}.")
  if int(num_time_samples) != num_time_samples or num_time_samples < 1:
    raise ValueError(f"num_time_samples must be a positive integer, got {num_time_samples}.")
  if decoder not in DECODERS:
    raise ValueError(f"Unknown decoder {decoder!r}; valid choices: {list(DECODERS)}.")
  if sigma_data is not None and not sigma_data > 0:
    raise ValueError(f"sigma_data must be positive (or inf, or None for no control variate), got {sigma_data}.")
  if time_batch is not None and (int(time_batch) != time_batch or time_batch < 1):
    raise ValueError(f"time_batch must be a positive integer or None, got {time_batch}.")
  proposal = losses.likelihood_importance_proposal(sde, eps)
  num = int(num_time_samples)

  @eqx.filter_jit
  def bound(key, score_fn, x):
    b, shape = x.shape[0], x.shape[1:]
    d = math.prod(shape)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
    alpha_T, sigma_T = sde.alpha_sigma(jnp.full((b,), sde.T, x.dtype))
    alpha_e, sigma_e = sde.alpha_sigma(jnp.full((b,), eps, x.dtype))
    # Closed form: the prior cross-entropy at T, the entropy term and the control variate's integral.
    const = (sde.prior_cross_entropy(batch_mul(alpha_T, x), sigma_T) + d * jnp.log(sigma_e / (alpha_e * sigma_T))
             + 0.5 * d * (_cv_integral(sigma_T / alpha_T, sigma_data) - _cv_integral(sigma_e / alpha_e, sigma_data)))
    if decoder == "tweedie":
      const = const - 0.5 * d * (1.0 - _cv_weight(sigma_e / alpha_e, sigma_data))

    def sample(k):
      ks = jax.vmap(lambda kk: jax.random.split(jax.random.fold_in(kk, k), 3))(keys)
      k_t, k_z, k_dec = ks[:, 0], ks[:, 1], ks[:, 2]
      normal = lambda ks: jax.vmap(lambda kk: jax.random.normal(kk, shape, x.dtype))(ks)
      # Path term: 1/2 g^2 / (sigma^2 q(t)) (|| sigma_t s(x_t, t) + z ||^2 - c_t^2 ||z||^2), t ~ q.
      t, q = jax.vmap(lambda kk: proposal(kk, 1))(k_t)
      t, q = t[:, 0].astype(x.dtype), q[:, 0]
      z = normal(k_z)
      alpha, sigma = sde.alpha_sigma(t)
      score = score_fn(batch_mul(alpha, x) + batch_mul(sigma, z), t)
      weight = 0.5 * losses._g2_over_sigma2(sde, t) / q
      out = weight * _residual(batch_mul(sigma, score), z, _cv_weight(sigma / alpha, sigma_data))
      if decoder == "tweedie":
        # Reconstruction: 1/2 (|| sigma_eps s(x_eps, eps) + z' ||^2 - c_eps^2 ||z'||^2).
        z_dec = normal(k_dec)
        x_eps = batch_mul(alpha_e, x) + batch_mul(sigma_e, z_dec)
        score_e = score_fn(x_eps, jnp.full((b,), eps, x.dtype))
        out = out + 0.5 * _residual(batch_mul(sigma_e, score_e), z_dec, _cv_weight(sigma_e / alpha_e, sigma_data))
      return out

    terms = jax.lax.map(sample, jnp.arange(num), batch_size=time_batch)  # (K, B)
    se = jnp.std(terms, axis=0, ddof=1) / math.sqrt(num) if num > 1 else jnp.full((b,), jnp.nan, x.dtype)
    return const + jnp.mean(terms, axis=0), se

  def bound_fn(key: Array, score_fn: sde_lib.ScoreFn, x: Array) -> tuple[Array, Array]:
    return bound(key, score_fn, likelihood._check_data(x, "x"))

  return bound_fn


def _cv_weight(sigma_tilde: Array, sigma_data: float | None) -> Array:
  """c_t^2 = (sigma_d^2 / (sigma_d^2 + sigma~_t^2))^2: the control variate's coefficient (1 for inf, 0 for None)."""
  if sigma_data is None:
    return jnp.zeros_like(sigma_tilde)
  if math.isinf(sigma_data):
    return jnp.ones_like(sigma_tilde)
  return (sigma_data**2 / (sigma_data**2 + sigma_tilde**2)) ** 2


def _cv_integral(sigma_tilde: Array, sigma_data: float | None) -> Array:
  """F(sigma~^2) with 1/2 int c_t^2 g^2 / sigma^2 dt = 1/2 [F(sigma~_T^2) - F(sigma~_eps^2)].

  (g^2 / sigma^2 dt = d log sigma~^2 for every SDE with a linear drift.)
  """
  u = sigma_tilde**2
  if sigma_data is None:
    return jnp.zeros_like(u)
  if math.isinf(sigma_data):
    return jnp.log(u)
  a = sigma_data**2
  return jnp.log(u) - jnp.log(a + u) + a / (a + u)


def _residual(sigma_score: Array, z: Array, c2: Array) -> Array:
  """||sigma s + z||^2 - c^2 ||z||^2 per example (B,), for c2 = c^2 (B,)."""
  flat = lambda a: a.reshape(z.shape[0], -1)
  return jnp.sum(flat(sigma_score + z) ** 2, axis=1) - c2 * jnp.sum(flat(z) ** 2, axis=1)


def to_bpd(nll: Array, se: Array, dim: int, offset: float) -> tuple[Array, Array]:
  """(bits/dim, its standard error) of a bound in nats: nll / (D ln 2) + offset, se / (D ln 2).

  ``offset`` as in ``likelihood.nats_to_bpd`` (8 for data in [0, 1], 7 for [-1, 1]), for a bound on
  uniformly dequantised data.
  """
  return likelihood.nats_to_bpd(-nll, dim, offset), se / (dim * math.log(2.0))


__all__ = ["DECODERS", "get_bound_fn", "to_bpd"]
