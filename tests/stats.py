"""Two-sample statistics for tests, with thresholds calibrated on exact-vs-exact samples.

A sampler passes when its statistic against exact samples is no larger than what two sets of
exact samples of the same size produce: the threshold is the ``quantile`` of the null
distribution, estimated from ``reps`` independent exact-vs-exact pairs (deterministic seeds).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats


@jax.jit
def energy_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic) of samples (n, ...) and (m, ...)."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  y = y.reshape(y.shape[0], -1).astype(jnp.float32)

  def mean_dist(a, b):
    d2 = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2 * a @ b.T
    return jnp.mean(jnp.sqrt(jnp.maximum(d2, 0.0)))

  return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def null_threshold(exact_sample: Callable[[jax.Array, int], jax.Array], n: int, reps: int = 20,
                   quantile: float = 0.99, seed: int = 12345,
                   statistic: Callable = energy_distance) -> float:
  """The ``quantile`` of ``statistic`` between two independent exact sample sets of size ``n``.

  The null draws are non-negative and right-skewed, so the quantile is taken of a gamma
  distribution fitted to their mean and variance (a normal fit under-states the upper tail).
  """
  keys = jax.random.split(jax.random.key(seed), 2 * reps)
  null = np.array([float(statistic(exact_sample(keys[2 * i], n), exact_sample(keys[2 * i + 1], n)))
                   for i in range(reps)])
  m, v = null.mean(), null.var(ddof=1)
  return float(scipy_stats.gamma.ppf(quantile, m * m / v, scale=v / m))


def mean_logp_gap(logp: Callable[[jax.Array], jax.Array], generated: jax.Array,
                  exact: jax.Array) -> tuple[float, float]:
  """Difference of mean log-densities (generated - exact) and its standard error."""
  a, b = np.asarray(logp(generated)), np.asarray(logp(exact))
  se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
  return float(a.mean() - b.mean()), float(se)
