"""The variational bound of the reverse SDE against closed-form values for Gaussian data.

For p_0 = N(mu, Sigma) every marginal is Gaussian, p_t = N(alpha_t mu, C_t), C_t = alpha_t^2 Sigma +
sigma_t^2 I, and a score c * grad log p_t is linear in x, so every term of the bound has a closed
form or a one-dimensional integral (float64 numpy here):

* exact score (c = 1): the path measures agree, so B(x) = E_{x' ~ N(alpha_eps x, sigma_eps^2 I)}
  [-log p_eps(x')] - D log alpha_eps + E_{x_T ~ N(alpha_T x, sigma_T^2 I)}[log p_T(x_T) - log pi(x_T)];
* any c: B(x) = E[-log pi(x_T)] + D log(sigma~_eps / sigma_T) + 1/2 int h(t) d log sigma~_t^2 with
  h = E ||sigma c s + z||^2 = ||sigma c C^-1 alpha (x - mu)||^2 + ||I - c sigma^2 C^-1||_F^2
  (g^2 / sigma^2 dt = d log sigma~^2 for every SDE here), by the trapezoid rule on a fine grid.

Monte-Carlo estimates are compared with these through the mean over examples of (estimate -
reference), whose standard error is the spread of that difference over the examples / sqrt(B).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic
from score_sde import bound
from score_sde import likelihood
from score_sde import losses
from tests.test_sampling_ode import SDES

EPS = 1e-5
DIM = 8
NUM_EXAMPLES, NUM_TIMES = 32, 512


def gaussian():
  """An anisotropic, rotated Gaussian (standard deviations 0.05 to 0.5) with mean of norm 0.8."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  sigma = (q * np.geomspace(0.05, 0.5, DIM) ** 2) @ q.T
  mu = rng.normal(size=DIM)
  mu *= 0.8 / np.linalg.norm(mu)
  return mu, sigma, analytic.GaussianMixture.create([1.0], mu[None], sigma[None])


def alpha_sigma64(sde, t):
  """(alpha_t, sigma_t) in float64, restating score_sde.sde's formulas."""
  t = np.asarray(t, np.float64)
  if hasattr(sde, "sigma_max"):
    return np.ones_like(t), sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
  log_alpha = -0.25 * t**2 * (sde.beta_1 - sde.beta_0) - 0.5 * t * sde.beta_0
  alpha = np.exp(log_alpha)
  return alpha, (-np.expm1(2 * log_alpha) if type(sde).__name__ == "SubVPSDE" else np.sqrt(-np.expm1(2 * log_alpha)))


def gaussian_cross_entropy(mean, var, m, cov):
  """E[-log N(y; m, cov)] for y ~ N(mean, var I): mean (B, D), returns (B,)."""
  inv = np.linalg.inv(cov)
  r = mean - m
  return 0.5 * (len(m) * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
                + np.einsum("bi,ij,bj->b", r, inv, r) + var * np.trace(inv))


def prior_cross_entropy64(sde, mean, std):
  tau = sde.sigma_max if hasattr(sde, "sigma_max") else 1.0
  return 0.5 * DIM * np.log(2 * np.pi * tau**2) + (np.sum(mean**2, 1) + DIM * std**2) / (2 * tau**2)


def exact_bound(sde, mu, sigma, x):
  """B(x) for the exact score: the cross-entropy at eps plus the prior's mismatch at T, (B,)."""
  (a_e, s_e), (a_T, s_T) = alpha_sigma64(sde, EPS), alpha_sigma64(sde, sde.T)
  cov = lambda a, s: a**2 * sigma + s**2 * np.eye(DIM)
  at_eps = gaussian_cross_entropy(a_e * x, s_e**2, a_e * mu, cov(a_e, s_e)) - DIM * np.log(a_e)
  mismatch = prior_cross_entropy64(sde, a_T * x, s_T) - gaussian_cross_entropy(a_T * x, s_T**2, a_T * mu, cov(a_T, s_T))
  return at_eps + mismatch


def residual_mean(sde, mu, sigma, x, c, t):
  """h(t) = E ||sigma_t c s(x_t, t) + z||^2 for the score c grad log p_t, (B, len(t))."""
  lam, vecs = np.linalg.eigh(sigma)
  alpha, sig = alpha_sigma64(sde, t)
  inv = 1.0 / (alpha[:, None] ** 2 * lam + sig[:, None] ** 2)  # (T, D) eigenvalues of C_t^-1
  y = (x - mu) @ vecs  # (B, D) in the eigenbasis
  mean_part = np.sum((sig[:, None] * c * inv * alpha[:, None])[None] ** 2 * y[:, None, :] ** 2, axis=-1)
  return mean_part + np.sum((1 - c * sig[:, None] ** 2 * inv) ** 2, axis=-1)[None]


def quadrature_bound(sde, mu, sigma, x, c, decoder="noisy"):
  """B(x) for the score c grad log p_t, by the trapezoid rule in log sigma~^2, (B,)."""
  t = np.geomspace(EPS, sde.T, 4001)  # error < 1e-5 nats
  alpha, sig = alpha_sigma64(sde, t)
  nu = np.log((sig / alpha) ** 2)
  h = residual_mean(sde, mu, sigma, x, c, t)
  path = 0.5 * np.sum(0.5 * (h[:, 1:] + h[:, :-1]) * np.diff(nu), axis=1)
  (a_e, s_e), (a_T, s_T) = alpha_sigma64(sde, EPS), alpha_sigma64(sde, sde.T)
  value = prior_cross_entropy64(sde, a_T * x, s_T) + DIM * np.log(s_e / (a_e * s_T)) + path
  if decoder == "tweedie":
    value += 0.5 * residual_mean(sde, mu, sigma, x, c, np.array([EPS]))[:, 0] - 0.5 * DIM
  return value


def scaled_score(sde):
  """c * the exact score, with c a traced leaf (one compilation for every c)."""
  return lambda c, gm, x, t: c * gm.score(x, t, sde)


def mean_and_se(diff):
  diff = np.asarray(diff, np.float64)
  return diff.mean(), diff.std(ddof=1) / math.sqrt(diff.size)


def test_closed_forms_agree():
  # The two references are derived differently; for the exact score they must agree.
  mu, sigma, gm = gaussian()
  x = np.asarray(gm.sample(jax.random.key(1), 8), np.float64)
  for sde in SDES.values():
    np.testing.assert_allclose(quadrature_bound(sde, mu, sigma, x, 1.0), exact_bound(sde, mu, sigma, x),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("sigma_data", [0.5, math.inf, None])
@pytest.mark.parametrize("name", sorted(SDES))
def test_control_variate_integral_is_its_quadrature(name, sigma_data):
  # 1/2 int c_t^2 g^2 / sigma^2 dt = 1/2 [F(sigma~_T^2) - F(sigma~_eps^2)], the mean added back.
  sde = SDES[name]
  t = np.geomspace(EPS, sde.T, 20_001)
  h = np.asarray(losses._g2_over_sigma2(sde, jnp.asarray(t, jnp.float32)), np.float64)
  alpha, sig = alpha_sigma64(sde, t)
  c2 = np.asarray(bound._cv_weight(jnp.asarray(sig / alpha, jnp.float32), sigma_data), np.float64)
  quadrature = 0.5 * np.sum(0.5 * (c2 * h)[1:] * np.diff(t) + 0.5 * (c2 * h)[:-1] * np.diff(t))
  ends = jnp.asarray([sig[0] / alpha[0], sig[-1] / alpha[-1]], jnp.float32)
  f = np.asarray(bound._cv_integral(ends, sigma_data), np.float64)
  np.testing.assert_allclose(0.5 * (f[1] - f[0]), quadrature, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def estimates():
  """Per SDE: x ~ p_0, and the noisy-decoder bound with the exact and the 0.8-scaled score."""
  mu, sigma, gm = gaussian()
  x = gm.sample(jax.random.key(1), NUM_EXAMPLES)
  out = {}
  for name, sde in SDES.items():
    bound_fn = bound.get_bound_fn(sde, eps=EPS, num_time_samples=NUM_TIMES)
    score = lambda c: jax.tree_util.Partial(scaled_score(sde), jnp.float32(c), gm)
    out[name] = (np.asarray(x, np.float64), bound_fn(jax.random.key(0), score(1.0), x),
                 bound_fn(jax.random.key(0), score(0.8), x))
  return mu, sigma, out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SDES))
def test_bound_of_the_exact_score_matches_the_closed_form(estimates, name):
  mu, sigma, out = estimates
  x, (nll, se), _ = out[name]
  assert nll.shape == se.shape == (NUM_EXAMPLES,)
  diff = np.asarray(nll) - exact_bound(SDES[name], mu, sigma, x)
  mean, se_mean = mean_and_se(diff)
  assert abs(mean) < 5 * se_mean, (mean, se_mean)
  # The per-example standard errors describe the per-example errors (|N(0, 1)| has median 0.67).
  assert 0.4 < np.median(np.abs(diff) / np.asarray(se)) < 1.1


@pytest.mark.parametrize("name", sorted(SDES))
def test_a_wrong_score_raises_the_bound_by_the_expected_margin(estimates, name):
  mu, sigma, out = estimates
  sde = SDES[name]
  x, (nll, se), (nll_wrong, se_wrong) = out[name]
  # Unbiased for a score that is not the exact one (0.8 times it): the quadrature's value.
  mean, se_mean = mean_and_se(np.asarray(nll_wrong) - quadrature_bound(sde, mu, sigma, x, 0.8))
  assert abs(mean) < 5 * se_mean, (mean, se_mean)
  # The wrong score's mean bound exceeds the exact score's by far more than the Monte-Carlo
  # standard error of the two means (from the returned per-example errors, as if independent).
  margin = np.mean(np.asarray(nll_wrong) - np.asarray(nll))
  se_margin = np.sqrt(np.sum(np.asarray(se) ** 2 + np.asarray(se_wrong) ** 2)) / NUM_EXAMPLES
  assert margin > 8 * se_margin, (margin, se_margin)
  # And, averaged over x ~ p_0, it lies above the exact -log p_eps of x perturbed to eps (Gibbs).
  a_e, s_e = alpha_sigma64(sde, EPS)
  exact_ce = gaussian_cross_entropy(a_e * x, s_e**2, a_e * mu, a_e**2 * sigma + s_e**2 * np.eye(DIM))
  excess, se_excess = mean_and_se(np.asarray(nll_wrong) + DIM * np.log(a_e) - exact_ce)
  assert excess > 5 * se_excess, (excess, se_excess)


def test_tweedie_decoder_bounds_the_log_density_of_clean_data():
  mu, sigma, gm = gaussian()
  sde = SDES["vp"]
  x = gm.sample(jax.random.key(1), NUM_EXAMPLES)
  bound_fn = bound.get_bound_fn(sde, eps=EPS, num_time_samples=NUM_TIMES, decoder="tweedie")
  nll, _ = bound_fn(jax.random.key(3), gm.score_fn(sde), x)
  x64 = np.asarray(x, np.float64)
  mean, se_mean = mean_and_se(np.asarray(nll) - quadrature_bound(sde, mu, sigma, x64, 1.0, decoder="tweedie"))
  assert abs(mean) < 5 * se_mean, (mean, se_mean)
  # With the exact score it is close above -log p_0(x) (ScoreFlow's bound on clean data), and
  # much tighter there than the noisy decoder, which bounds a density smoothed by sigma~_eps.
  neg_logp0 = -np.asarray(gm.log_prob(x), np.float64)
  gap, se_gap = mean_and_se(np.asarray(nll) - neg_logp0)
  assert -3 * se_gap < gap < 0.1, (gap, se_gap)


def test_estimates_do_not_depend_on_the_batch_or_on_time_batching():
  _, _, gm = gaussian()
  sde = SDES["ve"]
  x = gm.sample(jax.random.key(1), 6)
  a = bound.get_bound_fn(sde, num_time_samples=8)(jax.random.key(4), gm.score_fn(sde), x)
  b = bound.get_bound_fn(sde, num_time_samples=8, time_batch=3)(jax.random.key(4), gm.score_fn(sde), x[:2])
  np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a[0][:2]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(b[1]), np.asarray(a[1][:2]), rtol=1e-4)


def test_bits_per_dim_and_bad_options():
  bpd, se = bound.to_bpd(jnp.array([12 * math.log(2)]), jnp.array([4 * math.log(2)]), 4, 7.0)
  np.testing.assert_allclose(bpd, [10.0], rtol=1e-6)
  np.testing.assert_allclose(se, [1.0], rtol=1e-6)
  np.testing.assert_allclose(bpd, likelihood.nats_to_bpd(jnp.array([-12 * math.log(2)]), 4, 7.0))
  sde = SDES["vp"]
  with pytest.raises(ValueError, match="valid choices: \\['noisy', 'tweedie'\\]"):
    bound.get_bound_fn(sde, decoder="gaussian")
  with pytest.raises(ValueError, match="eps"):
    bound.get_bound_fn(sde, eps=0.0)
  with pytest.raises(ValueError, match="num_time_samples"):
    bound.get_bound_fn(sde, num_time_samples=0)
  with pytest.raises(ValueError, match="sigma_data"):
    bound.get_bound_fn(sde, sigma_data=-1.0)
  with pytest.raises(ValueError, match="get_bpd_fn"):
    bound.get_bound_fn(sde)(jax.random.key(0), lambda x, t: -x, jnp.zeros((2, 3), jnp.uint8))
