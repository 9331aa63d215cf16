"""SDEs: coefficients, marginals, discretisations and reversal, checked against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from score_sde import analytic
from score_sde import sde as sde_lib
from tests import helpers

SDES = helpers.sdes(ve_sigma_max=5.0)


@pytest.fixture(params=sorted(SDES))
def sde(request):
  return SDES[request.param]


def test_api_shapes(sde):
  x = jnp.ones((3, 4, 4, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  drift, diffusion = sde.sde(x, t)
  mean, std = sde.marginal_prob(x, t)
  f, G = sde.discretize(x, t)
  assert drift.shape == mean.shape == f.shape == x.shape
  assert diffusion.shape == std.shape == G.shape == (3,)
  z = sde.prior_sampling(jax.random.key(0), x.shape)
  assert z.shape == x.shape and sde.prior_logp(z).shape == (3,)
  assert sde.T == 1.0 and sde.N == 1000
  # A scalar time is broadcast over the batch.
  assert sde.marginal_prob(x, 0.5)[1].shape == (3,)


def test_diffusion_matches_marginal_variance(sde):
  """x_t = alpha_t x_0 + sigma_t eps solves dx = f x dt + g dw iff d sigma^2/dt = 2 f sigma^2 + g^2
  and d log alpha/dt = f, with f the drift coefficient. Checked by autodiff at many t."""
  t = jnp.linspace(0.02, 1.0, 50)
  one = jnp.ones((1, 1))
  f_coef = jax.vmap(lambda s: sde.sde(one, s[None])[0][0, 0])(t)
  g2 = jax.vmap(lambda s: sde.sde(one, s[None])[1][0] ** 2)(t)
  dlog_alpha = jax.vmap(jax.grad(lambda s: jnp.log(sde.alpha_sigma(s)[0])))(t)
  dsigma2 = jax.vmap(jax.grad(lambda s: sde.alpha_sigma(s)[1] ** 2))(t)
  _, sigma = sde.alpha_sigma(t)
  np.testing.assert_allclose(dlog_alpha, f_coef, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dsigma2, 2 * f_coef * sigma**2 + g2, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_marginals_match_monte_carlo_simulation(sde):
  """Euler-Maruyama simulation of the forward SDE from p_0 reproduces the closed-form marginals.

  The tolerance has two parts, both derived, not tuned: the Monte-Carlo standard error of the
  sample moments, and the Euler-Maruyama bias, computed exactly from the scheme's moment
  recursion (m <- (1 + f dt) m, v <- (1 + f dt)^2 v + g^2 dt) for this linear SDE.
  """
  gm = analytic.GaussianMixture.random(seed=3, dim=2, num_components=3)
  n, steps = 20000, 2000
  t_end = 0.6
  dt = t_end / steps
  # For VE the marginal at t = 0 carries sigma_min; start the SDE from that marginal.
  x0 = gm.sample(jax.random.key(1), n, 0.0, sde)

  def em(carry, i):
    x, scale, var = carry
    t = jnp.full((n,), i * dt)
    drift, g = sde.sde(x, t)
    z = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), x.shape)
    x = x + drift * dt + g[:, None] * jnp.sqrt(dt) * z
    f_coef = sde.sde(jnp.ones((1, 1)), t[:1])[0][0, 0]
    scale = scale * (1 + f_coef * dt)
    var = (1 + f_coef * dt) ** 2 * var + g[0] ** 2 * dt
    return (x, scale, var), None

  _, sigma0 = sde.alpha_sigma(jnp.zeros(()))
  (x, em_scale, em_var), _ = jax.lax.scan(em, (x0, 1.0, sigma0**2), jnp.arange(steps))
  mean0, cov0 = gm.mean_and_cov()
  exact_mean, exact_cov = gm.mean_and_cov(t_end, sde)
  em_mean = em_scale * mean0
  em_cov = em_scale**2 * cov0 + em_var * jnp.eye(2)
  x = np.asarray(x, np.float64)
  mc_mean, mc_cov = x.mean(0), np.cov(x.T)
  # Standard errors of the sample mean and covariance (Gaussian approximation of 4th moments).
  var = np.diag(np.asarray(em_cov))
  se_mean = np.sqrt(var / n)
  se_cov = np.sqrt((np.outer(var, var) + np.asarray(em_cov) ** 2) / n)
  bias_mean = np.abs(np.asarray(em_mean - exact_mean))
  bias_cov = np.abs(np.asarray(em_cov - exact_cov))
  assert np.all(np.abs(mc_mean - np.asarray(exact_mean)) <= 5 * se_mean + bias_mean + 1e-5)
  assert np.all(np.abs(mc_cov - np.asarray(exact_cov)) <= 5 * se_cov + bias_cov + 1e-5)
  # The EM bias itself is first order in dt: small here, so the check above has teeth.
  assert np.all(bias_cov <= 0.02 * np.abs(np.asarray(exact_cov)).max())


@pytest.mark.parametrize("num_steps", [5, 37])
def test_grid_chain_composes_to_marginals(sde, num_steps):
  """The grid discretisation's chain from t = 0 reproduces alpha_t and sigma_t exactly."""
  times = jnp.linspace(0.0, 1.0, num_steps + 1)[1:]
  dt = 1.0 / num_steps
  scale, var = 1.0, 0.0
  for t in times:
    a, v = sde.transition(jnp.array([t]), dt)
    scale, var = scale * a[0], a[0] ** 2 * var + v[0]
    alpha, sigma = sde.alpha_sigma(t)
    np.testing.assert_allclose(scale, alpha, rtol=1e-5)
    # The chain starts from clean data, so the accumulated variance telescopes to sigma_t^2.
    np.testing.assert_allclose(var, sigma**2, rtol=1e-4, atol=1e-7)


def test_vp_table_is_the_original_ddpm_chain():
  sde = sde_lib.VPSDE(N=1000, discretization="table")
  betas = np.linspace(0.1 / 1000, 20 / 1000, 1000)
  x = jnp.ones((3, 2))
  t = jnp.array([0.0, 0.5, 1.0])
  idx = np.round(np.asarray(t) * 999).astype(int)
  f, G = sde.discretize(x, t)
  np.testing.assert_allclose(G, np.sqrt(betas[idx]), rtol=1e-6)
  np.testing.assert_allclose(f[:, 0], np.sqrt(1 - betas[idx]) - 1, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(sde.langevin_alpha(t), 1 - betas[idx], rtol=1e-6)
  # The original's ancestral rule: mean (x + beta s) / sqrt(1 - beta), std sqrt(beta).
  score = -x
  mean, std = sde.ancestral_step(x, t, score)
  np.testing.assert_allclose(mean[:, 0], (1 - betas[idx]) / np.sqrt(1 - betas[idx]), rtol=1e-6)
  np.testing.assert_allclose(std, np.sqrt(betas[idx]), rtol=1e-6)


def test_ve_table_is_the_original_smld_chain():
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50, N=100, discretization="table")
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50), 100))
  t = jnp.array([0.0, 0.5, 1.0])
  idx = np.round(np.asarray(t) * 99).astype(int)
  prev = np.where(idx > 0, sigmas[np.maximum(idx - 1, 0)], 0.0)
  f, G = sde.discretize(jnp.ones((3, 2)), t)
  np.testing.assert_allclose(G, np.sqrt(sigmas[idx] ** 2 - prev**2), rtol=1e-5)
  assert np.all(f == 0)
  _, std = sde.ancestral_step(jnp.ones((3, 2)), t, jnp.zeros((3, 2)))
  np.testing.assert_allclose(std, np.sqrt(prev**2 * (sigmas[idx] ** 2 - prev**2) / sigmas[idx] ** 2),
                             rtol=1e-5)


def test_vp_small_n_grid_is_finite_and_table_refuses():
  """The original's DDPM table has beta = 1 at N = 20 (non-finite ancestral steps)."""
  with pytest.raises(ValueError, match="discretization='grid'"):
    sde_lib.VPSDE(N=20, discretization="table")
  sde = sde_lib.VPSDE(N=20)
  t = jnp.linspace(1.0, 1e-3, 20)
  a, v = sde.transition(t, (1 - 1e-3) / 19)
  assert np.all(np.isfinite(a)) and np.all(a > 0) and np.all((v > 0) & (v < 1))
  mean, std = sde.ancestral_step(jnp.ones((20, 2)), t, -jnp.ones((20, 2)), (1 - 1e-3) / 19)
  assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std))


@pytest.mark.slow
def test_ancestral_mean_is_the_exact_posterior_mean(sde):
  """With the exact score of a Gaussian p_0, (x + v s)/a equals E[x_s | x_t] in closed form."""
  gm = analytic.GaussianMixture.create([1.0], [[0.3, -0.2]], [[[0.5, 0.1], [0.1, 0.2]]])
  x = gm.sample(jax.random.key(0), 6, 0.5, sde)
  t, dt = jnp.full((6,), 0.5), 0.1
  mean, _ = sde.ancestral_step(x, t, gm.score(x, t, sde), dt)
  # Joint Gaussian of (x_s, x_t): x_t = a x_s + sqrt(v) z.
  a, v = sde.transition(t[:1], dt)
  m_s, c_s = gm.mean_and_cov(0.5 - dt, sde)
  m_t, c_t = gm.mean_and_cov(0.5, sde)
  gain = a[0] * c_s @ jnp.linalg.inv(c_t)
  expected = m_s + (x - m_t) @ gain.T
  np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-4)


def test_reverse_sde_and_probability_flow(sde):
  x = jax.random.normal(jax.random.key(0), (4, 3))
  t = jnp.linspace(0.1, 0.9, 4)
  score_fn = lambda x, t: -2.0 * x
  drift, g = sde.sde(x, t)
  rev_drift, rev_g = sde.reverse(score_fn).sde(x, t)
  ode_drift, ode_g = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  np.testing.assert_allclose(rev_drift, drift + 2 * g[:, None] ** 2 * x, rtol=1e-6)
  np.testing.assert_allclose(ode_drift, drift + g[:, None] ** 2 * x, rtol=1e-6)
  np.testing.assert_allclose(rev_g, g)
  assert np.all(ode_g == 0)
  f, G = sde.discretize(x, t, 0.01)
  rev_f, rev_G = sde.reverse(score_fn).discretize(x, t, 0.01)
  np.testing.assert_allclose(rev_f, f + 2 * G[:, None] ** 2 * x, rtol=1e-6)
  np.testing.assert_allclose(rev_G, G)
  rsde = sde.reverse(score_fn)
  assert rsde.T == sde.T and rsde.N == sde.N


def test_prior(sde):
  z = sde.prior_sampling(jax.random.key(0), (20000, 3))
  scale = sde.alpha_sigma(jnp.ones(()))[1] if isinstance(sde, sde_lib.VESDE) else 1.0
  np.testing.assert_allclose(z.std(), scale, rtol=0.02)
  expected = scipy_stats.multivariate_normal(np.zeros(3), float(scale) ** 2 * np.eye(3)).logpdf(
      np.asarray(z[:5], np.float64))
  np.testing.assert_allclose(sde.prior_logp(z[:5]), expected, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="valid choices"):
    sde_lib.VPSDE(discretization="ddpm")
  with pytest.raises(ValueError, match="positive integer"):
    sde_lib.VESDE(N=0)
  with pytest.raises(ValueError, match="beta_min"):
    sde_lib.SubVPSDE(beta_min=2.0, beta_max=1.0)
  with pytest.raises(ValueError, match="sigma_min"):
    sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5)
  with pytest.raises(ValueError, match="grid"):
    sde_lib.SubVPSDE(discretization="table")
  with pytest.raises(ValueError, match="valid choices"):
    sde_lib.get_sde("vp_sde")
  assert isinstance(sde_lib.get_sde("VESDE", sigma_max=10.0), sde_lib.VESDE)
