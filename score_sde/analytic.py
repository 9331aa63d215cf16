"""Closed-form ground truth: Gaussian mixtures diffused by any SDE of ``score_sde.sde``.

For p_0 = sum_k w_k N(mu_k, Sigma_k) and a perturbation kernel x_t = alpha_t x_0 + sigma_t eps,
the marginal is again a mixture,

    p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I),

so log p_t, the score grad log p_t and exact samples are known at every t. Each Sigma_k is
diagonalised once, Sigma_k = U_k diag(lambda_k) U_k^T; then the covariance at time t is
U_k diag(alpha_t^2 lambda_k + sigma_t^2) U_k^T and every evaluation costs O(B K D^2).

Shapes: x is (B, *event_shape) with prod(event_shape) = D; t is (B,) or a scalar.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sde as sde_lib

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """A Gaussian mixture with precomputed eigendecompositions of its covariances.

  Attributes:
    weights: (K,) mixture weights, summing to 1.
    means: (K, D) component means.
    eigvals: (K, D) eigenvalues of each covariance.
    eigvecs: (K, D, D) eigenvectors of each covariance, as columns.
    event_shape: the shape of one example (prod = D).

  The mixture is a pytree (its arrays are leaves, ``event_shape`` is static), so it can be passed
  to jitted functions and held in a ``jax.tree_util.Partial``.
  """

  weights: Array
  means: Array
  eigvals: Array
  eigvecs: Array
  event_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def create(cls, weights, means, covs, event_shape: tuple[int, ...] | None = None) -> "GaussianMixture":
    """Builds a mixture from weights (K,), means (K, D) and covariances (K, D, D) or (K, D) (diagonal)."""
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    covs = np.asarray(covs, np.float64)
    if means.ndim != 2:
      raise ValueError(f"means must have shape (K, D), got {means.shape}.")
    k, d = means.shape
    if weights.shape != (k,) or np.any(weights < 0) or not np.isclose(weights.sum(), 1.0):
      raise ValueError(f"weights must be {k} non-negative numbers summing to 1, got {weights}.")
    if covs.shape == (k, d):
      covs = np.eye(d)[None] * covs[:, None, :]
    if covs.shape != (k, d, d):
      raise ValueError(f"covs must have shape (K, D, D) = {(k, d, d)} or (K, D), got {covs.shape}.")
    eigvals, eigvecs = np.linalg.eigh(0.5 * (covs + np.swapaxes(covs, 1, 2)))
    if np.any(eigvals <= 0):
      raise ValueError("Every covariance must be positive definite.")
    event_shape = (d,) if event_shape is None else tuple(event_shape)
    if math.prod(event_shape) != d:
      raise ValueError(f"event_shape {event_shape} does not hold D={d} values.")
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return cls(f32(weights), f32(means), f32(eigvals), f32(eigvecs), event_shape)

  @classmethod
  def random(cls, seed: int, dim: int, num_components: int = 4, spread: float = 1.0,
             scale_range: tuple[float, float] = (0.05, 0.5)) -> "GaussianMixture":
    """A reproducible mixture with anisotropic, randomly rotated covariances.

    Args:
      seed: numpy seed.
      dim: dimension D.
      num_components: K.
      spread: the component means are drawn from N(0, spread^2 I / D) scaled to norm ~spread.
      scale_range: the per-axis standard deviations are log-uniform in this range.
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_components, 5.0))
    means = rng.normal(size=(num_components, dim))
    means *= spread / np.linalg.norm(means, axis=1, keepdims=True)
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    covs = []
    for _ in range(num_components):
      q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
      std = np.exp(rng.uniform(lo, hi, size=dim))
      covs.append((q * std**2) @ q.T)
    return cls.create(weights, means, np.stack(covs))

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def covariances(self) -> Array:
    """(K, D, D) covariances of p_0."""
    return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

  # --- p_t ------------------------------------------------------------------------------------

  def _coeffs(self, sde: sde_lib.SDE | None, t, batch: int) -> tuple[Array, Array]:
    if sde is None:
      return jnp.ones((batch,)), jnp.zeros((batch,))
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    return sde.alpha_sigma(t)

  def _components(self, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array, Array]:
    """Per-component Gaussian log-densities (B, K), whitened residuals y/c (B, K, D), and c."""
    x = x.reshape(x.shape[0], -1)
    c = alpha[:, None, None] ** 2 * self.eigvals[None] + sigma[:, None, None] ** 2  # (B, K, D)
    diff = x[:, None, :] - alpha[:, None, None] * self.means[None]  # (B, K, D)
    y = jnp.einsum("ked,bke->bkd", self.eigvecs, diff)
    log_n = -0.5 * jnp.sum(y**2 / c + jnp.log(c), axis=-1) - 0.5 * self.dim * jnp.log(2 * jnp.pi)
    return log_n, y / c, c

  def log_prob(self, x: Array, t=None, sde: sde_lib.SDE | None = None) -> Array:
    """log p_t(x) in nats, (B,); with ``sde=None`` the density of p_0."""
    alpha, sigma = self._coeffs(sde, t, x.shape[0])
    log_n, _, _ = self._components(x, alpha, sigma)
    return jax.nn.logsumexp(log_n + jnp.log(self.weights)[None], axis=1)

  def component_logits(self, x: Array, t=None, sde: sde_lib.SDE | None = None) -> Array:
    """log w_k + log N(x; alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I), (B, K).

    The logits of the posterior over components: softmax over k is p_t(k | x), the exact
    noise-conditional classifier of the component label.
    """
    alpha, sigma = self._coeffs(sde, t, x.shape[0])
    log_n, _, _ = self._components(x, alpha, sigma)
    return log_n + jnp.log(self.weights)[None]

  def component(self, k: int) -> "GaussianMixture":
    """Component k alone, as a one-component mixture (its score is the class-conditional score of k)."""
    return dataclasses.replace(self, weights=jnp.ones((1,), jnp.float32), means=self.means[k:k + 1],
                               eigvals=self.eigvals[k:k + 1], eigvecs=self.eigvecs[k:k + 1])

  def score(self, x: Array, t=None, sde: sde_lib.SDE | None = None) -> Array:
    """grad_x log p_t(x), shaped like x."""
    alpha, sigma = self._coeffs(sde, t, x.shape[0])
    log_n, y_over_c, _ = self._components(x, alpha, sigma)
    resp = jax.nn.softmax(log_n + jnp.log(self.weights)[None], axis=1)  # (B, K)
    per_component = jnp.einsum("ked,bkd->bke", self.eigvecs, y_over_c)
    return -jnp.einsum("bk,bke->be", resp, per_component).reshape(x.shape)

  def score_fn(self, sde: sde_lib.SDE):
    """The exact score as a ``score_fn(x, t)`` for samplers and likelihoods.

    It is a ``jax.tree_util.Partial`` holding the mixture's arrays as leaves, so jitted samplers
    trace them rather than baking them in as constants.
    """
    return jax.tree_util.Partial(_score_of(sde), self)

  def sample(self, key: Array, n: int, t=None, sde: sde_lib.SDE | None = None) -> Array:
    """Exact samples of p_t (or of p_0 with ``sde=None``), (n, *event_shape)."""
    k_comp, k_x0, k_noise = jax.random.split(key, 3)
    comp = jax.random.categorical(k_comp, jnp.log(self.weights), shape=(n,))
    z = jax.random.normal(k_x0, (n, self.dim))
    x0 = self.means[comp] + jnp.einsum("bij,bj->bi", self.eigvecs[comp], jnp.sqrt(self.eigvals[comp]) * z)
    alpha, sigma = self._coeffs(sde, t, n)
    xt = alpha[:, None] * x0 + sigma[:, None] * jax.random.normal(k_noise, (n, self.dim))
    return xt.reshape((n,) + self.event_shape)

  def mean_and_cov(self, t=None, sde: sde_lib.SDE | None = None) -> tuple[Array, Array]:
    """Mean (D,) and covariance (D, D) of p_t."""
    alpha, sigma = self._coeffs(sde, t, 1)
    a, s = alpha[0], sigma[0]
    mean = self.weights @ self.means
    centred = self.means - mean
    cov = jnp.einsum("k,kij->ij", self.weights, self.covariances() + centred[:, :, None] * centred[:, None, :])
    return a * mean, a**2 * cov + s**2 * jnp.eye(self.dim)


def _mixture_score(sde: sde_lib.SDE, mixture: GaussianMixture, x: Array, t: Array) -> Array:
  return mixture.score(x, t, sde)


@functools.lru_cache(maxsize=None)
def _score_of(sde: sde_lib.SDE):
  """One function object per SDE, so repeated ``score_fn(sde)`` calls reuse compiled programs."""
  return functools.partial(_mixture_score, sde)
