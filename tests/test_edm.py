"""EDM preconditioning, the denoiser <-> score <-> noise conversions and the EDM loss, on closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from score_sde import analytic, losses
from score_sde import sde as sde_lib
from score_sde.models import edm
from tests import helpers

SDES = helpers.SDES


def posterior_mean(gm, x, alpha, sigma):
  """E[x_0 | x_t] of a Gaussian mixture in float64, from each component's Gaussian posterior.

  Independent of the score code: component k gives mu_k + alpha S_k C_k^-1 (x - alpha mu_k) with
  C_k = alpha^2 S_k + sigma^2 I, weighted by the responsibilities w_k N(x; alpha mu_k, C_k).
  """
  covs = np.asarray(gm.covariances(), np.float64)
  means, weights = np.asarray(gm.means, np.float64), np.asarray(gm.weights, np.float64)
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    a, s = float(alpha[b]), float(sigma[b])
    logs, posts = [], []
    for mu, cov, w in zip(means, covs, weights):
      c = a**2 * cov + s**2 * np.eye(len(mu))
      logs.append(np.log(w) + scipy_stats.multivariate_normal(a * mu, c).logpdf(x[b]))
      posts.append(mu + a * cov @ np.linalg.solve(c, x[b] - a * mu))
    resp = np.exp(np.array(logs) - np.max(logs))
    out[b] = (resp / resp.sum()) @ np.array(posts)
  return out


@pytest.mark.parametrize("name", sorted(SDES))
def test_conversions_give_the_closed_form_posterior_mean_and_round_trip(name):
  sde = SDES[name]
  gm = analytic.GaussianMixture.random(seed=3, dim=3, num_components=3)
  t = jnp.array([0.02, 0.1, 0.3, 0.6, 0.9])
  x = gm.sample(jax.random.key(0), 5, t, sde)
  alpha, sigma = sde.alpha_sigma(t)
  score = gm.score(x, t, sde)
  denoised = edm.denoiser_from_score(score, x, alpha, sigma)
  # Tweedie's D is E[x_0 | x_t]; float32 rounding of the score, magnified by sigma^2 / alpha.
  scale = np.asarray(sigma**2 / alpha)[:, None]
  np.testing.assert_array_less(np.abs(np.asarray(denoised) - posterior_mean(gm, x, alpha, sigma)),
                               1e-5 * (1 + scale * np.abs(np.asarray(score))))
  noise = edm.noise_from_score(score, sigma)
  # Every route between the three parameterisations agrees.
  np.testing.assert_allclose(edm.score_from_denoiser(denoised, x, alpha, sigma), score, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(edm.score_from_noise(noise, sigma), score, rtol=1e-6)
  np.testing.assert_allclose(edm.denoiser_from_noise(noise, x, alpha, sigma), denoised, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(edm.noise_from_denoiser(denoised, x, alpha, sigma), noise, rtol=1e-4, atol=1e-4)


def test_preconditioning_gives_unit_variances_and_minimises_the_target_variance():
  p = edm.EDMPreconditioning(sigma_data=0.5)
  s = jnp.geomspace(0.002, 80.0, 50)
  # For data of std sigma_d: Var(c_in (y + sigma n)) = c_in^2 (sigma_d^2 + sigma^2) = 1, and the
  # effective target (y - c_skip (y + sigma n)) / c_out has variance
  # ((1 - c_skip)^2 sigma_d^2 + c_skip^2 sigma^2) / c_out^2 = 1.
  np.testing.assert_allclose(p.c_in(s) ** 2 * (0.25 + s**2), 1.0, rtol=1e-5)
  target_var = lambda c_skip: ((1 - c_skip) ** 2 * 0.25 + c_skip**2 * s**2) / p.c_out(s) ** 2
  np.testing.assert_allclose(target_var(p.c_skip(s)), 1.0, rtol=1e-5)
  # c_skip minimises it: perturbed, it grows (in float64: at sigma = 80 the growth, 2.5e-3 c_skip^2 sigma^2 /
  # c_out^2 ~ 1e-9, is below float32's resolution).
  s64, c_skip64, c_out64 = (np.asarray(a, np.float64) for a in (s, p.c_skip(s), p.c_out(s)))
  target_var64 = lambda c_skip: ((1 - c_skip) ** 2 * 0.25 + c_skip**2 * s64**2) / c_out64**2
  assert np.all(target_var64(c_skip64 * 1.05) > target_var64(c_skip64))
  assert np.all(target_var64(c_skip64 * 0.95) > target_var64(c_skip64))
  np.testing.assert_allclose(p.loss_weight(s), 1.0 / p.c_out(s) ** 2, rtol=1e-5)
  np.testing.assert_allclose(p.c_noise(s), 0.25 * np.log(np.asarray(s)), rtol=1e-5, atol=1e-7)


class OracleNet(nn.Module):
  """The ideal EDM network F* = (D* - c_skip y) / c_out of a mixture, reading sigma~ from c_noise.

  It checks that the preconditioner hands the network c_in y and c_noise, and assembles D from its
  output with c_skip and c_out; ``params["gain"]`` scales F (1 is exact).
  """

  gm: analytic.GaussianMixture
  sigma_data: float

  @nn.compact
  def __call__(self, inp, labels, train=False):
    gain = self.param("gain", nn.initializers.ones, ())
    p = edm.EDMPreconditioning(self.sigma_data)
    s = jnp.exp(4.0 * labels)  # c_noise = log(sigma~) / 4.
    y = sde_lib.batch_mul(1.0 / p.c_in(s), inp)
    # The exact denoiser of the VE view: alpha = 1, sigma = sigma~.
    ve_score = _ve_score(self.gm, y, s)
    d = edm.denoiser_from_score(ve_score, y, jnp.ones_like(s), s)
    return gain * sde_lib.batch_mul(1.0 / p.c_out(s), d - sde_lib.batch_mul(p.c_skip(s), y))


def _ve_score(gm, y, s):
  """Score of the mixture convolved with N(0, s^2 I) (per-example s): the VE marginal at level s."""
  ve = sde_lib.VESDE(sigma_min=1.0, sigma_max=np.e)  # sigma(t) = e^t, so t = log s.
  return gm.score(y, jnp.log(s), ve)


@pytest.mark.parametrize("name", sorted(SDES))
def test_edm_score_function_of_the_ideal_network_is_the_exact_score(name):
  sde = SDES[name]
  gm = analytic.GaussianMixture.random(seed=1, dim=2)
  net = OracleNet(gm, 0.5)
  t = jnp.array([0.05, 0.2, 0.5, 0.8])
  x = gm.sample(jax.random.key(2), 4, t, sde)
  variables = net.init(jax.random.key(0), x, jnp.zeros(4))
  score_fn = edm.get_edm_score_fn(sde, net, variables, sigma_data=0.5)
  exact = gm.score(x, t, sde)
  np.testing.assert_allclose(score_fn(x, t), exact, rtol=2e-3, atol=2e-3 * float(jnp.abs(exact).max()))
  with pytest.raises(ValueError, match="dropout"):
    edm.get_edm_score_fn(sde, net, variables, train=True)


def test_edm_loss_of_the_exact_denoiser_on_gaussian_data_is_one_per_dimension():
  # For data N(0, sigma_d^2 I) the exact denoiser leaves posterior variance v = sigma_d^2 s^2 /
  # (sigma_d^2 + s^2) per dimension, and lambda(s) v = 1 at every level s: the per-example loss
  # (mean over D dims) is 1 in expectation, with variance 2 / D (a chi-square mean).
  sde, dim, b, sigma_d = SDES["vp"], 4, 4096, 0.5
  family = lambda std: analytic.GaussianMixture(jnp.ones(1), jnp.zeros((1, dim)), jnp.full((1, dim), std**2),
                                                jnp.eye(dim)[None], (dim,))
  exact = family(sigma_d)
  build = lambda params, key, train: (lambda x, t: family(params["std"]).score(x, t, sde))
  loss_fn = jax.jit(losses.get_edm_loss_fn(sde, build, train=True, sigma_data=sigma_d))
  batch = exact.sample(jax.random.key(1), b)
  key = jax.random.key(5)
  loss, aux = loss_fn(key, {"std": sigma_d}, batch)
  assert aux["per_example"].shape == (b,) and aux["t"].shape == (b,)
  assert np.all((aux["t"] >= 1e-5) & (aux["t"] <= 1.0))
  assert abs(float(loss) - 1.0) < 4 * np.sqrt(2 / dim / b)
  # A mis-specified denoiser (the wrong data scale) costs more on the same draws.
  for wrong in (0.6 * sigma_d, 1.5 * sigma_d):
    assert float(loss_fn(key, {"std": wrong}, batch)[0]) > float(loss) + 4 * np.sqrt(2 / dim / b)


@pytest.mark.slow
def test_edm_loss_trains_the_preconditioned_network_through_the_builder():
  sde, gm = SDES["ve"], analytic.GaussianMixture.random(seed=4, dim=2)
  net = OracleNet(gm, 0.5)
  variables = net.init(jax.random.key(0), jnp.zeros((2, 2)), jnp.zeros(2))
  build = edm.get_edm_score_fn_builder(sde, net, sigma_data=0.5)
  loss_fn = jax.jit(losses.get_edm_loss_fn(sde, build, train=False, sigma_data=0.5))
  batch = gm.sample(jax.random.key(1), 1024)
  key = jax.random.key(2)
  at = lambda g: loss_fn(key, {"gain": jnp.float32(g)}, batch)[0]
  # The oracle (gain 1) minimises the loss. L is a parabola in the gain, so with its curvature 2A
  # from three values and the slope G = L'(1) from autodiff, the minimiser on these draws is
  # 1 - G / (2A); its Monte-Carlo scatter (the mean of 1024 products of zero-mean residuals with F*)
  # is a few per cent.
  l_lo, l_1, l_hi = float(at(0.8)), float(at(1.0)), float(at(1.2))
  assert l_lo > l_1 < l_hi
  curvature = (l_lo + l_hi - 2 * l_1) / 0.2**2
  grad = float(jax.grad(at)(jnp.float32(1.0)))
  assert abs(grad / curvature) < 0.1
  with pytest.raises(ValueError, match="eps"):
    losses.get_edm_loss_fn(sde, build, train=False, eps=0.0)
