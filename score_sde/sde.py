"""Forward SDEs dx = f(x, t) dt + g(t) dw with Gaussian kernels x_t = alpha_t x_0 + sigma_t z, and their reverses.

``VPSDE``, ``SubVPSDE`` and ``VESDE`` on t in [0, T], T = 1; ``discretize`` gives the one-step chain that
predictors and correctors use (``discretization="grid"``: from the marginals between grid times;
``"table"``: the original's DDPM / SMLD tables). Shapes: x (B, ...), t (B,), per-example scalars (B,).
Formulas and the discretisations: ``docs/sde.md``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
"""``score_fn(x (B, ...), t (B,)) -> score (B, ...)``: an estimate of grad_x log p_t(x)."""
ScoreFnBuilder = Callable[[Any, Array, bool], ScoreFn]
"""``build_score_fn(params, key, train) -> score_fn``: a network turned into a score function; the
losses differentiate through ``params`` (a pytree of arrays) and ``key`` feeds dropout."""

_DISCRETIZATIONS = ("grid", "table")


def batch_mul(v: Array, x: Array) -> Array:
  """Multiplies each example of ``x`` (B, ...) by the matching entry of ``v`` (B,)."""
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) * x


def _time(t, x: Array) -> Array:
  """Returns ``t`` as a float array of shape (B,) for a batch ``x`` of shape (B, ...)."""
  t = jnp.asarray(t, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
  return jnp.broadcast_to(t, x.shape[:1]) if t.ndim == 0 else t


def tweedie(x: Array, score: Array, alpha: Array, sigma: Array) -> Array:
  """Tweedie's E[x_0 | x_t] = (x + sigma_t^2 s) / alpha_t for x (B, ...), its score, and alpha, sigma (B,)."""
  return batch_mul(1.0 / alpha, x + batch_mul(sigma**2, score))


def _gaussian_cross_entropy(mean: Array, std: Array, tau: float) -> Array:
  """E[-log N(x; 0, tau^2 I)] for x ~ N(mean, std^2 I): mean (B, ...), std (B,); returns (B,)."""
  d = math.prod(mean.shape[1:])
  sq = jnp.sum(mean.reshape(mean.shape[0], -1) ** 2, axis=1)
  return 0.5 * d * math.log(2 * math.pi * tau**2) + (sq + d * std**2) / (2 * tau**2)


def _standard_normal_logp(z: Array) -> Array:
  """log N(z; 0, I) summed over all but the batch axis; (B,)."""
  d = math.prod(z.shape[1:])
  return -0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, axis=1)


class SDE(abc.ABC):
  """A forward SDE with Gaussian perturbation kernel x_t = alpha_t x_0 + sigma_t z.

  Subclasses are frozen dataclasses (equal parameters: equal SDEs, usable as static arguments of
  compiled programs) that give ``alpha_sigma``, ``sde`` and the prior; the rest follows from these.
  """

  N: int
  discretization: str

  def __post_init__(self):
    if int(self.N) != self.N or self.N < 1:
      raise ValueError(f"N (the number of discretisation steps) must be a positive integer, got {self.N}.")
    if self.discretization not in _DISCRETIZATIONS:
      raise ValueError(f"Unknown discretization {self.discretization!r}; valid choices: {_DISCRETIZATIONS}.")
    if self.discretization == "table" and type(self)._table_levels is SDE._table_levels:
      raise ValueError(f"{type(self).__name__} has no fixed discretisation table; use discretization='grid'.")

  @property
  def T(self) -> float:
    """End time of the forward SDE."""
    return 1.0

  # --- what each SDE defines -------------------------------------------------------------------

  @abc.abstractmethod
  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    """Marginal coefficients (alpha_t, sigma_t), each shaped like ``t``."""

  @abc.abstractmethod
  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Drift f(x, t) (shaped like x) and diffusion g(t) (B,)."""

  @abc.abstractmethod
  def prior_sampling(self, key: Array, shape: tuple[int, ...]) -> Array:
    """Samples of shape ``shape`` from the prior p_T."""

  @abc.abstractmethod
  def prior_logp(self, z: Array) -> Array:
    """Natural-log density of the prior at ``z`` (B, ...); returns (B,)."""

  @abc.abstractmethod
  def prior_cross_entropy(self, mean: Array, std: Array) -> Array:
    """E[-log p_T(x)] for x ~ N(mean, std^2 I), in closed form: mean (B, ...), std (B,); returns (B,).

    The prior term of the variational bound (``score_sde.bound``).
    """

  def _table_levels(self, t: Array) -> tuple[Array, Array, Array, Array]:
    """(a, sigma_s, sigma_t, v) of the original's fixed table at index round(t (N - 1))."""
    raise ValueError(f"{type(self).__name__} has no fixed discretisation table; use discretization='grid'.")

  # --- derived ----------------------------------------------------------------------------------

  def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Mean (like x) and std (B,) of p_t(x_t | x_0 = x)."""
    alpha, sigma = self.alpha_sigma(_time(t, x))
    return batch_mul(alpha, x), sigma

  def step_levels(self, t: Array, dt: Array | float | None = None) -> tuple[Array, Array, Array, Array]:
    """Noise levels of one step of the chain from s = t - dt to t.

    Args:
      t: (B,) end times of the step.
      dt: positive step length (scalar or (B,)); defaults to T / N.

    Returns:
      (a, sigma_s, sigma_t, v), each (B,): x_t = a x_s + sqrt(v) z with a = alpha_t / alpha_s and
      v = sigma_t^2 - a^2 sigma_s^2. A step that reaches s <= 0 lands on clean data (alpha = 1,
      sigma = 0).
    """
    t = jnp.asarray(t)
    if self.discretization == "table":
      return self._table_levels(t)
    dt = self.T / self.N if dt is None else dt
    s = t - dt
    alpha_t, sigma_t = self.alpha_sigma(t)
    alpha_s, sigma_s = self.alpha_sigma(jnp.maximum(s, 0.0))
    alpha_s = jnp.where(s > 0, alpha_s, 1.0)
    sigma_s = jnp.where(s > 0, sigma_s, 0.0)
    a = alpha_t / alpha_s
    return a, sigma_s, sigma_t, jnp.maximum(sigma_t**2 - (a * sigma_s) ** 2, 0.0)

  def transition(self, t: Array, dt: Array | float | None = None) -> tuple[Array, Array]:
    """(a, v), each (B,): one step of the chain from t - dt to t is x_t = a x_s + sqrt(v) z."""
    a, _, _, v = self.step_levels(t, dt)
    return a, v

  def discretize(self, x: Array, t: Array, dt: Array | float | None = None) -> tuple[Array, Array]:
    """Discretised forward step x_t = x_{t-dt} + f + G z.

    Args:
      x: (B, ...) state.
      t: (B,) or scalar time at the end of the step.
      dt: positive step length; defaults to T / N.

    Returns:
      f shaped like x and G of shape (B,).
    """
    a, v = self.transition(_time(t, x), dt)
    return batch_mul(a - 1.0, x), jnp.sqrt(v)

  def langevin_alpha(self, t: Array, dt: Array | float | None = None) -> Array:
    """The per-step alpha_i of the Langevin corrector's step size: a^2 of ``transition`` (B,).

    It is 1 - beta_i for VP (as in the original) and 1 for VE.
    """
    a, _ = self.transition(jnp.asarray(t), dt)
    return a**2

  def ancestral_step(self, x: Array, t: Array, score: Array,
                     dt: Array | float | None = None) -> tuple[Array, Array]:
    """Mean and std of ancestral sampling, p(x_{t-dt} | x_t), with x_0 from Tweedie's formula.

    The posterior mean of the Gaussian chain is (x + v s) / a; its std is the posterior std
    sqrt(v sigma_s^2 / sigma_t^2) (the SMLD rule of the original; the original's VP table used
    sqrt(beta_i), kept under ``discretization="table"``).

    Returns:
      x_mean shaped like x and std of shape (B,).
    """
    a, sigma_s, sigma_t, v = self.step_levels(_time(t, x), dt)
    x_mean = batch_mul(1.0 / a, x + batch_mul(v, score))
    std = jnp.sqrt(v) * sigma_s / jnp.maximum(sigma_t, jnp.finfo(x.dtype).tiny)
    return x_mean, std

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
    """The reverse-time SDE (or, with ``probability_flow``, the probability-flow ODE).

    Args:
      score_fn: callable (x (B, ...), t (B,)) -> score shaped like x.
      probability_flow: build the deterministic ODE with the same marginals.
    """
    return ReverseSDE(self, score_fn, probability_flow)


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
  """dx = [f - g^2 s] dt + g dw-bar (or dx = [f - g^2 s / 2] dt for the probability-flow ODE).

  Times run from T down to 0: a step of length dt goes from t to t - dt.
  """

  forward: SDE
  score_fn: ScoreFn
  probability_flow: bool = False

  @property
  def T(self) -> float:
    return self.forward.T

  @property
  def N(self) -> int:
    return self.forward.N

  def _weight(self) -> float:
    return 0.5 if self.probability_flow else 1.0

  def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Reverse drift (like x) and diffusion (B,); the diffusion is 0 for the ODE."""
    t = _time(t, x)
    drift, diffusion = self.forward.sde(x, t)
    drift = drift - batch_mul(diffusion**2 * self._weight(), self.score_fn(x, t))
    return drift, jnp.zeros_like(diffusion) if self.probability_flow else diffusion

  def discretize(self, x: Array, t: Array, dt: Array | float | None = None) -> tuple[Array, Array]:
    """Reverse discretised step: x_{t-dt} = x_t - rev_f + rev_G z."""
    t = _time(t, x)
    f, G = self.forward.discretize(x, t, dt)
    rev_f = f - batch_mul(G**2 * self._weight(), self.score_fn(x, t))
    return rev_f, jnp.zeros_like(G) if self.probability_flow else G


class _LinearBetaSDE(SDE):
  """Shared by VP and subVP: beta(t) = beta_min + t (beta_max - beta_min), log alpha_t = -int_0^t beta / 2."""

  beta_min: float
  beta_max: float

  def __post_init__(self):
    super().__post_init__()
    if not 0 <= self.beta_min <= self.beta_max:
      raise ValueError(f"Need 0 <= beta_min <= beta_max, got beta_min={self.beta_min}, beta_max={self.beta_max}.")

  @property
  def beta_0(self) -> float:
    return float(self.beta_min)

  @property
  def beta_1(self) -> float:
    return float(self.beta_max)

  def beta(self, t: Array) -> Array:
    return self.beta_0 + t * (self.beta_1 - self.beta_0)

  def log_alpha(self, t: Array) -> Array:
    return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def prior_cross_entropy(self, mean, std):
    return _gaussian_cross_entropy(mean, std, 1.0)


@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBetaSDE):
  """Variance-preserving SDE (the continuous limit of DDPM): f = -beta(t) x / 2, g = sqrt(beta(t))."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000
  discretization: str = "grid"

  def __post_init__(self):
    super().__post_init__()
    if self.discretization == "table" and self.discrete_betas.max() >= 1:
      raise ValueError(
          f"The DDPM table has beta_i = beta_max / N = {self.beta_max / self.N:g} >= 1 at N={self.N}, which makes "
          f"the chain singular; use discretization='grid' (valid for every N) or N > {self.beta_max:g}.")

  # The original's DDPM table (also the noise levels of discretely trained VP models).
  @functools.cached_property
  def discrete_betas(self) -> np.ndarray:
    return np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

  @functools.cached_property
  def alphas(self) -> np.ndarray:
    return 1.0 - self.discrete_betas

  @functools.cached_property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(self.alphas)

  @property
  def sqrt_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(self.alphas_cumprod)

  @property
  def sqrt_1m_alphas_cumprod(self) -> np.ndarray:
    return np.sqrt(1.0 - self.alphas_cumprod)

  def alpha_sigma(self, t):
    log_alpha = self.log_alpha(t)
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))

  def sde(self, x, t):
    beta_t = self.beta(_time(t, x))
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t)

  def _table_levels(self, t):
    i = jnp.clip(jnp.round(t * (self.N - 1)).astype(jnp.int32), 0, self.N - 1)
    sqrt_1m = jnp.asarray(self.sqrt_1m_alphas_cumprod, dtype=jnp.float32)
    a = jnp.asarray(np.sqrt(self.alphas), dtype=jnp.float32)[i]
    sigma_s = jnp.where(i > 0, sqrt_1m[jnp.maximum(i - 1, 0)], 0.0)
    return a, sigma_s, sqrt_1m[i], jnp.asarray(self.discrete_betas, dtype=jnp.float32)[i]

  def ancestral_step(self, x, t, score, dt=None):
    if self.discretization == "table":  # The original's DDPM rule, with std sqrt(beta_i).
      a, v = self.transition(_time(t, x), dt)
      return batch_mul(1.0 / a, x + batch_mul(v, score)), jnp.sqrt(v)
    return super().ancestral_step(x, t, score, dt)


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearBetaSDE):
  """Sub-VP SDE: VP's drift, g^2 = beta(t) (1 - alpha_t^4), so sigma_t = 1 - alpha_t^2."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  N: int = 1000
  discretization: str = "grid"

  def alpha_sigma(self, t):
    log_alpha = self.log_alpha(t)
    return jnp.exp(log_alpha), -jnp.expm1(2.0 * log_alpha)

  def sde(self, x, t):
    t = _time(t, x)
    beta_t = self.beta(t)
    discount = -jnp.expm1(4.0 * self.log_alpha(t))  # 1 - exp(-2 beta_0 t - (beta_1 - beta_0) t^2)
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t * discount)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """Variance-exploding SDE (the continuous limit of SMLD / NCSN): sigma(t) = sigma_min (sigma_max / sigma_min)^t,
  f = 0, g = sigma(t) sqrt(2 log(sigma_max / sigma_min))."""

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  N: int = 1000
  discretization: str = "grid"

  def __post_init__(self):
    super().__post_init__()
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                       f"sigma_max={self.sigma_max}.")

  # The original's SMLD table, ascending in t (also the levels of discretely trained VE models).
  @functools.cached_property
  def discrete_sigmas(self) -> np.ndarray:
    return np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))

  def sigma(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def alpha_sigma(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def sde(self, x, t):
    sigma = self.sigma(_time(t, x))
    return jnp.zeros_like(x), sigma * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

  def prior_sampling(self, key, shape):
    return jax.random.normal(key, shape) * self.sigma_max

  def prior_logp(self, z):
    d = math.prod(z.shape[1:])
    return _standard_normal_logp(z / self.sigma_max) - d * math.log(self.sigma_max)

  def prior_cross_entropy(self, mean, std):
    return _gaussian_cross_entropy(mean, std, self.sigma_max)

  def _table_levels(self, t):
    i = jnp.clip(jnp.round(t * (self.N - 1)).astype(jnp.int32), 0, self.N - 1)
    sigmas = jnp.asarray(self.discrete_sigmas, dtype=jnp.float32)
    sigma_s = jnp.where(i > 0, sigmas[jnp.maximum(i - 1, 0)], 0.0)
    prev = np.concatenate([[0.0], self.discrete_sigmas[:-1]])
    v = jnp.asarray(self.discrete_sigmas**2 - prev**2, dtype=jnp.float32)[i]
    return jnp.ones_like(sigma_s), sigma_s, sigmas[i], v


SDES = {"vpsde": VPSDE, "subvpsde": SubVPSDE, "vesde": VESDE}


def get_sde(name: str, **kwargs) -> SDE:
  """Builds an SDE by name (``vpsde``, ``subvpsde``, ``vesde``)."""
  if name.lower() not in SDES:
    raise ValueError(f"Unknown SDE {name!r}; valid choices: {sorted(SDES)}.")
  return SDES[name.lower()](**kwargs)
