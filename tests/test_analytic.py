"""The closed-form Gaussian mixture is itself checked before it serves as ground truth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from score_sde import analytic
from score_sde import sde as sde_lib


@pytest.fixture(scope="module")
def mixture():
  return analytic.GaussianMixture.random(seed=0, dim=3, num_components=3)


@pytest.mark.parametrize("sde", [sde_lib.VPSDE(), sde_lib.SubVPSDE(), sde_lib.VESDE(sigma_max=4.0)],
                         ids=["vp", "subvp", "ve"])
@pytest.mark.slow
def test_log_prob_matches_scipy_and_score_is_its_gradient(mixture, sde):
  x = mixture.sample(jax.random.key(0), 7, 0.4, sde)
  t = jnp.full((7,), 0.4)
  alpha, sigma = (float(v) for v in sde.alpha_sigma(jnp.array(0.4)))
  covs = np.asarray(mixture.covariances(), np.float64)
  expected = np.log(sum(
      float(w) * scipy_stats.multivariate_normal(alpha * np.asarray(m), alpha**2 * c + sigma**2 * np.eye(3)).pdf(
          np.asarray(x, np.float64))
      for w, m, c in zip(mixture.weights, mixture.means, covs)))
  np.testing.assert_allclose(mixture.log_prob(x, t, sde), expected, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda x: mixture.log_prob(x, t, sde).sum())(x)
  np.testing.assert_allclose(mixture.score(x, t, sde), grad, rtol=1e-4, atol=1e-4)


def test_density_of_p0_integrates_to_one():
  gm = analytic.GaussianMixture.random(seed=1, dim=2, num_components=4)
  grid = jnp.linspace(-4, 4, 401)
  xx, yy = jnp.meshgrid(grid, grid)
  pts = jnp.stack([xx.ravel(), yy.ravel()], 1)
  mass = jnp.exp(gm.log_prob(pts)).sum() * (grid[1] - grid[0]) ** 2
  np.testing.assert_allclose(mass, 1.0, rtol=1e-3)


def test_samples_have_the_closed_form_moments(mixture):
  sde = sde_lib.SubVPSDE()
  n = 100000
  x = np.asarray(mixture.sample(jax.random.key(3), n, 0.3, sde), np.float64)
  mean, cov = (np.asarray(v) for v in mixture.mean_and_cov(0.3, sde))
  var = np.diag(cov)
  assert np.all(np.abs(x.mean(0) - mean) < 5 * np.sqrt(var / n))
  se_cov = np.sqrt((np.outer(var, var) + cov**2) / n)
  assert np.all(np.abs(np.cov(x.T) - cov) < 5 * se_cov)


def test_event_shape_and_validation():
  gm = analytic.GaussianMixture.create([0.5, 0.5], np.zeros((2, 12)), np.ones((2, 12)), event_shape=(2, 2, 3))
  x = gm.sample(jax.random.key(0), 4)
  assert x.shape == (4, 2, 2, 3) and gm.score(x).shape == x.shape and gm.log_prob(x).shape == (4,)
  with pytest.raises(ValueError, match="summing to 1"):
    analytic.GaussianMixture.create([0.5, 0.6], np.zeros((2, 2)), np.ones((2, 2)))
  with pytest.raises(ValueError, match="positive definite"):
    analytic.GaussianMixture.create([1.0], np.zeros((1, 2)), -np.ones((1, 2)))
  with pytest.raises(ValueError, match="event_shape"):
    analytic.GaussianMixture.create([1.0], np.zeros((1, 4)), np.ones((1, 4)), event_shape=(3,))
