"""The continuous-time variational bound on -log p of the reverse SDE, estimated on device.

For x (B, ...) in model space and x_t = alpha_t x + sigma_t z, the ELBO of the reverse SDE (run from
the prior pi at T down to eps, then decoded to time 0 by a Gaussian r(x | x_eps)) is, in the form
of ScoreFlow's Theorem 1 (Song, Durkan, Murray & Ermon 2021; VDM's continuous-time VLB),

    -log p_theta(x) <= B(x) = E[-log pi(x_T)] + D log(sigma~_eps / sigma_T)
                              + 1/2 int_eps^T g(t)^2 E_z || s_theta(x_t, t) + z / sigma_t ||^2 dt + R(x),

sigma~_t = sigma_t / alpha_t. Terms (derived in docs/likelihood.md):

* prior: the cross-entropy of x perturbed to T under pi, in closed form (``sde.prior_cross_entropy``);
* entropy: D log(sigma~_eps / sigma_T) = H(N(0, sigma~_eps^2 I)) - H(p_0T(. | x)) + D / 2, i.e. the
  Theorem's -1/2 int (g^2 ||grad log p_0t||^2 + 2 div f) dt plus the decoder's -D log alpha_eps;
* path: denoising score matching with likelihood weighting against grad log p_0t(x_t | x) =
  -z / sigma_t, t drawn from ``losses.likelihood_importance_proposal`` (the likelihood-weighted
  loss's q(t) ~ g^2 / sigma^2): one score evaluation per time sample. The control variate
  c_t^2 ||z||^2, c_t = sigma_d^2 / (sigma_d^2 + sigma~_t^2), is subtracted and its integral added
  back in closed form (g^2 / sigma^2 dt = d log sigma~^2): same mean, far less variance;
* reconstruction R, by ``decoder``:
  - ``noisy`` (default): r = N(x_eps / alpha_eps, sigma~_eps^2 I), R = 0. B(x) + D log alpha_eps then
    also bounds E_{x' ~ p_0eps(. | x)}[-log p_eps(x')], the density at eps (that of
    ``likelihood.get_likelihood_fn(eps=...)``, there for the PF-ODE and at x itself) of x perturbed
    to eps; with the exact score and pi = p_T the two are equal.
  - ``tweedie``: ScoreFlow's ``eps_offset``, r = N(E[x | x_eps] by Tweedie, sigma~_eps^2 I), a bound
    on clean data: R = E 1/2 ||sigma_eps s_theta(x_eps, eps) + z'||^2 - D / 2 (a second score
    evaluation per time sample).

    bound_fn = get_bound_fn(sde, eps=1e-5, num_time_samples=K)
    nll, se = bound_fn(key, score_fn, x)     # (B,) nats, and the Monte-Carlo standard error (B,)

Example i draws sample k's time and noise from ``fold_in(fold_in(key, i), k)``, so its estimate does
not depend on the batch it is in; ``se`` is the standard error of the mean of its K per-sample
estimates (NaN for K = 1).
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
  """Builds ``bound_fn(key, score_fn, x) -> (nll, se)``: the bound B(x) >= -log p_theta(x) in nats.

  Args:
    sde: the forward SDE the score function belongs to (with ``prior_cross_entropy``).
    eps: lower end of the time integral, 0 < eps < T (the likelihood's eps, 1e-5 by default).
    num_time_samples: K importance-sampled times (each with its own z) per example.
    decoder: one of ``DECODERS``: ``noisy`` (no score call at eps) or ``tweedie`` (ScoreFlow).
    sigma_data: data scale sigma_d of the control variate c_t^2 ||z||^2 subtracted from the path
      term, c_t = sigma_d^2 / (sigma_d^2 + sigma~_t^2) (its integral is added back in closed form):
      unbiased for any value, lowest variance near the data's per-dimension scale; ``inf``:
      c_t = 1 (ScoreFlow's estimator); None: no control variate (the plain DSM estimator).
    time_batch: time samples evaluated together in one (vmapped) score call; None: one at a time.

  Returns:
    ``bound_fn(key, score_fn, x)`` with x (B, ...) floating-point data in model space, returning
    nll (B,), the K-sample estimate of B(x), and se (B,), its standard error.
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
