"""PF-ODE likelihoods, latents and bits/dim against closed-form Gaussian-mixture densities.

The likelihood uses the prior N(0, I) (VE: N(0, sigma_max^2 I)) for p_T, as the original does, so
its logp is log p_T^prior(z) + int div. The closed form gives the true p_T, so the tests compare
logp - log p_T^prior(z) + log p_T(z) with log p_eps(x): what remains is the solver's error.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic
from score_sde import likelihood
from tests import test_sampling_ode
from tests.test_sampling_ode import SDES, exact_score, ode_sampler, score_family, solver_error_bound

EPS = 1e-5  # the likelihood's default starting time
TOL = 1e-5  # rtol = atol of every solve here


def true_prior_logp(sde, gm, logp, z):
  """Swaps the likelihood's prior term log p_T^prior(z) for the closed-form log p_T(z)."""
  return logp - sde.prior_logp(z) + gm.log_prob(z, sde.T, sde)


@functools.lru_cache(maxsize=None)
def exact_case(name, dim):
  """(mixture, x at eps, logp, z, nfe) of the exact-divergence likelihood, shared by the tests."""
  sde, n = SDES[name], (64 if dim == 2 else 32)
  gm = analytic.GaussianMixture.random(seed=dim, dim=dim)
  x = gm.sample(jax.random.key(11), n, EPS, sde)
  lik = likelihood.get_likelihood_fn(sde, divergence="exact", rtol=TOL, atol=TOL, eps=EPS)
  logp, z, nfe = lik(None, exact_score(score_family(sde, (dim,)), gm), x)
  return gm, x, logp, z, nfe


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 64])
@pytest.mark.parametrize("name", sorted(SDES))
def test_exact_likelihood_matches_the_analytic_log_density_at_eps(name, dim):
  sde = SDES[name]
  gm, x, logp, z, nfe = exact_case(name, dim)
  assert logp.shape == (x.shape[0],) and z.shape == x.shape and nfe.dtype == jnp.int32
  error = np.abs(np.asarray(true_prior_logp(sde, gm, logp, z) - gm.log_prob(x, EPS, sde)))
  assert error.max() / dim < 1e-3, f"max error {error.max() / dim:.2e} nats/dim"


@pytest.mark.parametrize("divergence,name,dim,probe_counts", [("rademacher", "vp", 64, (1, 4)),
                                                             ("gaussian", "ve", 2, (1,))])
@pytest.mark.slow
def test_hutchinson_estimates_are_unbiased_and_num_probes_averages(divergence, name, dim, probe_counts):
  sde, points, reps = SDES[name], 4, 64
  gm, x, exact, _, _ = exact_case(name, dim)
  score_fn = exact_score(score_family(sde, (dim,)), gm)
  x_rep = jnp.repeat(x[:points], reps, axis=0)  # every point `reps` times: independent probes each
  spread = {}
  for num_probes in probe_counts:
    lik = likelihood.get_likelihood_fn(sde, divergence=divergence, rtol=TOL, atol=TOL, eps=EPS,
                                       num_probes=num_probes)
    logp, _, _ = lik(jax.random.key(num_probes), score_fn, x_rep)
    est = np.asarray(logp).reshape(points, reps)
    mean, sd = est.mean(1), est.std(1, ddof=1)
    # Unbiased: the mean of `reps` estimates is within 4 standard errors of the exact-divergence
    # value, plus the solver error allowed above (1e-3 nats per dimension).
    bound = 4 * sd / math.sqrt(reps) + 1e-3 * dim
    np.testing.assert_array_less(np.abs(mean - np.asarray(exact[:points])), bound)
    spread[num_probes] = sd
  if 4 in spread:
    # Averaging 4 probes divides the variance by 4: the ratio of variances pooled over the points
    # has a relative standard error of about sqrt(4 / (points (reps - 1))) = 13%.
    ratio = np.mean(spread[1] ** 2) / np.mean(spread[4] ** 2)
    assert 2.2 < ratio < 7.3, ratio


@pytest.mark.slow
@pytest.mark.parametrize("name,dim", [("vp", 64), ("ve", 2)])
def test_decode_of_encode_returns_the_data(name, dim):
  sde, eps = SDES[name], test_sampling_ode.EPS
  gm = analytic.GaussianMixture.random(seed=dim, dim=dim)
  score_fn = exact_score(score_family(sde, (dim,)), gm)
  x = gm.sample(jax.random.key(12), 512, eps, sde)
  z, nfe_enc = likelihood.get_encode_fn(sde, rtol=TOL, atol=TOL, eps=eps)(score_fn, x)
  x_back, nfe_dec = ode_sampler(name, dim, 512)(None, score_fn, z=z)  # the sampler of test_sampling_ode
  # Latents follow the prior's scale (a wrong direction or time would not).
  prior_std = float(jnp.std(sde.prior_sampling(jax.random.key(0), (4096,))))
  assert 0.7 < float(jnp.std(z)) / prior_std < 1.3
  # Each sample returns within the accumulated local tolerances of the two solves, except where the
  # PF-ODE map is ill-conditioned (latents near a separatrix between modes, about 1% of them),
  # which still return within ten times that.
  ratio = np.abs(np.asarray(x_back - x)).reshape(len(x), -1).max(1) / solver_error_bound(
      int(nfe_enc) + int(nfe_dec), x, z, rtol=TOL, atol=TOL)
  assert np.mean(ratio < 1) >= 0.98 and ratio.max() < 10, np.sort(ratio)[-8:]


def pixel_mixture(scale, shift):
  """A 4-pixel (2, 2, 1) mixture in model space s(u) = scale u + shift, for u in [0, 1]."""
  means = np.array([[0.3, 0.5, 0.6, 0.4], [0.7, 0.6, 0.3, 0.5]])
  stds = np.array([[0.08, 0.05, 0.1, 0.06], [0.05, 0.07, 0.06, 0.09]])
  return analytic.GaussianMixture.create([0.4, 0.6], scale * means + shift, (scale * stds) ** 2,
                                         event_shape=(2, 2, 1))


@pytest.mark.slow
@pytest.mark.parametrize("scale,shift,offset", [(1.0, 0.0, 8.0), (2.0, -1.0, 7.0)], ids=["[0,1]", "[-1,1]"])
def test_bits_per_dim_of_dequantised_8bit_images(scale, shift, offset):
  sde = SDES["vp"]
  gm = pixel_mixture(scale, shift)
  pixels = pixel_mixture(255.0, 0.0).sample(jax.random.key(1), 16)
  images = jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8)
  bpd_fn = likelihood.get_bpd_fn(sde, data_scaler=lambda u: scale * u + shift, divergence="exact",
                                 rtol=TOL, atol=TOL)
  key = jax.random.key(2)
  bpd, z, nfe = bpd_fn(key, exact_score(score_family(sde, (2, 2, 1)), gm), images)
  assert bpd.shape == (16,) and z.shape == images.shape and int(nfe) > 0

  # The documented dequantisation: u = (x + U[0, 1)) / 256 with the first half of split(key).
  u = likelihood.dequantize(jax.random.split(key)[0], images)
  x = scale * u + shift
  # The model's log-density: the closed form with the prior in place of p_T (see the module doc).
  logp_x = gm.log_prob(x, EPS, sde) - gm.log_prob(z, sde.T, sde) + sde.prior_logp(z)
  expected = likelihood.nats_to_bpd(logp_x, 4, offset)  # offset = 8 - log2(scale)
  np.testing.assert_allclose(bpd, expected, rtol=0, atol=1e-3 / math.log(2))


def test_dequantize_fills_each_level_uniformly():
  images = jnp.broadcast_to(jnp.array([0, 17, 255], jnp.uint8), (4000, 3))
  u = np.asarray(likelihood.dequantize(jax.random.key(0), images))
  level = np.array([0, 17, 255]) / 256
  assert np.all(u >= level) and np.all(u < level + 1 / 256)
  # U[0, 1) noise: mean 1/2 and variance 1/12, within 4 standard errors.
  noise = (u - level) * 256
  assert np.all(np.abs(noise.mean(0) - 0.5) < 4 * math.sqrt(1 / 12 / 4000))
  # Per-image keys: image i gets the same noise whatever the batch.
  np.testing.assert_array_equal(likelihood.dequantize(jax.random.key(0), images[:5]), u[:5])


def test_bad_inputs_and_options_raise_value_errors():
  sde = SDES["vp"]
  bpd_fn = likelihood.get_bpd_fn(sde)
  with pytest.raises(ValueError, match="8-bit integer images.*get_likelihood_fn.*nats"):
    bpd_fn(jax.random.key(0), lambda x, t: -x, jnp.zeros((2, 4, 4, 3), jnp.float32))
  with pytest.raises(Exception, match="0..255"):
    jax.block_until_ready(bpd_fn(jax.random.key(0), lambda x, t: -x, jnp.full((2, 2, 2, 1), 300, jnp.int32)))
  with pytest.raises(ValueError, match="valid choices: \\['exact', 'gaussian', 'rademacher'\\]"):
    likelihood.get_likelihood_fn(sde, divergence="hutchinson")
  with pytest.raises(ValueError, match="valid choices: \\['dopri5', 'dopri8', 'tsit5'\\]"):
    likelihood.get_likelihood_fn(sde, solver="RK45")
  with pytest.raises(TypeError, match="unexpected keyword argument 'hutchinson_type'"):
    likelihood.get_likelihood_fn(sde, hutchinson_type="Rademacher")
  with pytest.raises(TypeError, match="unexpected keyword argument 'method'"):
    likelihood.get_encode_fn(sde, method="RK45")
  with pytest.raises(ValueError, match="num_probes"):
    likelihood.get_likelihood_fn(sde, divergence="exact", num_probes=4)
  with pytest.raises(ValueError, match="num_probes must be a positive integer"):
    likelihood.get_likelihood_fn(sde, num_probes=0)
  with pytest.raises(ValueError, match="eps"):
    likelihood.get_likelihood_fn(sde, eps=1.5)
  lik = likelihood.get_likelihood_fn(sde)
  with pytest.raises(ValueError, match="get_bpd_fn"):
    lik(jax.random.key(0), lambda x, t: -x, jnp.zeros((2, 3), jnp.uint8))
  with pytest.raises(ValueError, match="shape \\(B, ...\\)"):
    lik(jax.random.key(0), lambda x, t: -x, jnp.zeros((3,)))
  np.testing.assert_allclose(likelihood.nats_to_bpd(jnp.array([-math.log(2) * 12]), 4, 7.0), [10.0])
