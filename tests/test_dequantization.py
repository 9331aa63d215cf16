"""Dequantisation bounds against the exact discrete log-probability of discretised Gaussian mixtures.

The model density is a 2-D mixture of diagonal Gaussians p in model space y = s((x + u) / 256),
s(v) = 128 v - 64: bins 0.5 wide against component standard deviations 0.2-0.35, so p varies
strongly within a bin. Its discrete model P(x) = sum_k w_k prod_d [Phi((hi_d - mu_kd) / s_kd) -
Phi((lo_d - mu_kd) / s_kd)] is exact, so every bound's gap log P(x) - bound is measured directly;
its standard error is that of the mean over R independent repetitions (each the mean over the
examples).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from score_sde import analytic
from score_sde import bound
from score_sde import dequantization as dq
from score_sde import likelihood
from score_sde import losses
from score_sde import sde as sde_lib
from score_sde.models import dequantizer as dequantizer_lib
from tests.test_likelihood import pixel_mixture
from tests.test_sampling_ode import exact_score, score_family

WEIGHTS = np.array([0.4, 0.6])
MEANS = np.array([[0.1, -0.2], [0.7, 0.4]])
STDS = np.array([[0.3, 0.2], [0.25, 0.35]])
BIN = 0.5
REPS = 256


def scaler(v):
  return 256 * BIN * v - 128 * BIN


@pytest.fixture(scope="module")
def case():
  """(mixture, 64 data points x (64, 2) int32, exact log P(x) (64,))."""
  gm = analytic.GaussianMixture.create(WEIGHTS, MEANS, STDS**2)
  y = np.asarray(gm.sample(jax.random.key(0), 64), np.float64)
  x = np.clip(np.floor((y + 128 * BIN) / BIN), 0, 255).astype(np.int32)
  lo = (x * BIN - 128 * BIN)[:, None, :]
  mass = stats.norm.cdf((lo + BIN - MEANS) / STDS) - stats.norm.cdf((lo - MEANS) / STDS)
  return gm, jnp.asarray(x), np.log(np.sum(WEIGHTS * np.prod(mass, axis=-1), axis=1))


@eqx.filter_jit
def _bounds(key, dequantizer, num_samples, gm, x):
  log_density = lambda key, y: gm.log_prob(y)
  one = lambda r: dq.log_prob_bound(jax.random.fold_in(key, r), log_density, dequantizer, x, num_samples, scaler)[0]
  return jax.lax.map(one, jnp.arange(REPS))


def gap(case, dequantizer, num_samples):
  """Mean over examples of log P(x) - bound, and its standard error over REPS repetitions."""
  gm, x, log_p = case
  per_rep = np.mean(log_p[None] - np.asarray(_bounds(jax.random.key(1), dequantizer, num_samples, gm, x)), axis=1)
  return per_rep.mean(), per_rep.std(ddof=1) / math.sqrt(REPS)


@pytest.fixture(scope="module")
def uniform_gap(case):
  return gap(case, dq.uniform, 1)


def test_truncated_normal_samples_and_log_density():
  std, mean = 0.3, 0.4
  x = jnp.zeros((4000, 2), jnp.int32)
  u, log_q = dq.truncated_normal(std, mean)(jax.random.key(0), x)
  u = np.asarray(u, np.float64)
  assert np.all((u >= 0) & (u < 1))
  dist = stats.truncnorm(-mean / std, (1 - mean) / std, loc=mean, scale=std)
  np.testing.assert_allclose(log_q, dist.logpdf(u).sum(1), rtol=0, atol=1e-4)
  assert np.all(np.abs(u.mean(0) - dist.mean()) < 4 * dist.std() / math.sqrt(len(u)))
  # i-DODE's choice: the model's noise level at eps, in bins.
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  np.testing.assert_allclose(dq.matched_std(sde, 1e-5, 2 / 256), 0.01 * 5000**1e-5 * 128, rtol=1e-5)


def test_uniform_and_truncated_normal_bounds_lie_below_the_exact_log_probability(case, uniform_gap):
  for mean, se in (uniform_gap, gap(case, dq.truncated_normal(0.5), 1)):
    # A lower bound, and a loose one here: the density varies within the bins.
    assert mean > 20 * se, (mean, se)


def test_importance_weighting_tightens_the_bound_monotonically(case, uniform_gap):
  gaps = [uniform_gap] + [gap(case, dq.uniform, k) for k in (4, 16)]
  for (g_few, se_few), (g_many, se_many) in zip(gaps, gaps[1:]):
    assert g_many > -4 * se_many, gaps
    assert g_few - g_many > 4 * math.hypot(se_few, se_many), gaps


def test_an_untrained_flow_is_uniform_dequantisation():
  module = dequantizer_lib.VariationalDequantizer()
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (3, 4)), jnp.int32)

  @jax.jit
  def untrained(key):
    variables = module.init(jax.random.key(1), jnp.zeros(x.shape), x)
    return module.apply(variables, key, x, method=module.sample_and_log_prob)

  u, log_q = untrained(jax.random.key(2))
  np.testing.assert_allclose(log_q, 0.0, atol=1e-5)
  # The noise is the logistic draw of fold_in(key, i) for example i.
  eps = jax.random.logistic(jax.random.fold_in(jax.random.key(2), 1), (4,))
  np.testing.assert_allclose(u[1], jax.nn.sigmoid(eps), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 2, 3)], ids=["vector", "image"])
def test_flow_log_density_is_its_change_of_variables(shape):
  module = dequantizer_lib.VariationalDequantizer(features=8)
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, shape), jnp.int32)
  eps = jax.random.logistic(jax.random.key(0), shape)
  # Random weights everywhere (the output layers too): a flow far from the identity.
  rng = np.random.default_rng(2)
  variables = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape), jnp.float32),
                           jax.eval_shape(module.init, jax.random.key(1), eps, x))
  d = math.prod(shape[1:])

  @jax.jit
  def flow_and_change_of_variables(eps):
    def per_example(e, xi):
      # log p(eps) - log|det du/deps|, the Jacobian by autodiff.
      to_u = lambda e: module.apply(variables, e.reshape((1,) + shape[1:]), xi[None])[0].reshape(d)
      log_base = jnp.sum(-jax.nn.softplus(-e) - jax.nn.softplus(e))
      return log_base - jnp.linalg.slogdet(jax.jacfwd(to_u)(e.reshape(d)))[1]
    return module.apply(variables, eps, x), jax.vmap(per_example)(eps, x)

  (u, log_q), expected = flow_and_change_of_variables(eps)
  assert np.all(np.isfinite(np.asarray(log_q))) and np.abs(np.asarray(log_q)).max() > 0.1, log_q
  np.testing.assert_allclose(log_q, expected, rtol=1e-4, atol=1e-3)
  # Samples lie in [0, 1), also for extreme noise.
  (u, _), _ = flow_and_change_of_variables(jnp.full(shape, 40.0))
  assert np.all((np.asarray(u) >= 0) & (np.asarray(u) < 1))


def train(case, nll_fn, steps=200):
  gm, x, _ = case
  module = dequantizer_lib.VariationalDequantizer()
  optimizer = losses.get_optimizer(lr=3e-3, warmup=0, grad_clip=-1)
  state = losses.init_train_state(module.init(jax.random.key(0), jnp.zeros(x.shape), x), optimizer)
  step_fn = jax.jit(losses.get_step_fn(dq.get_loss_fn(module, nll_fn, scaler), optimizer, train=True, ema_rate=0.0))
  for _ in range(steps):
    state, metrics = step_fn(jax.random.key(2), state, x)
  assert np.isfinite(float(metrics["loss"]))
  return dq.variational(module, state.params)


@pytest.mark.slow
def test_a_variational_dequantiser_trained_on_the_density_beats_uniform(case, uniform_gap):
  gm = case[0]
  trained = train(case, lambda key, y: -gm.log_prob(y))
  g_var, se_var = gap(case, trained, 1)
  g_uniform, se_uniform = uniform_gap
  assert g_var > -4 * se_var, (g_var, se_var)
  assert g_uniform - g_var > 10 * math.hypot(se_var, se_uniform), (g_var, g_uniform)


@pytest.mark.slow  # trains a flow for 200 steps
def test_a_variational_dequantiser_trained_on_the_bound_of_a_frozen_score_beats_uniform(case, uniform_gap):
  # ScoreFlow's objective: the variational bound with the exact score of p under VP (the score
  # model, frozen), one time sample per example and step.
  gm = case[0]
  sde = sde_lib.VPSDE()
  trained = train(case, dq.bound_nll_fn(sde, gm.score_fn(sde)))
  g_var, se_var = gap(case, trained, 1)
  g_uniform, se_uniform = uniform_gap
  assert g_uniform - g_var > 5 * math.hypot(se_var, se_uniform), (g_var, g_uniform)


@pytest.mark.slow
def test_bpd_fn_reproduces_the_likelihood_modules_bits_per_dim():
  sde = sde_lib.VPSDE()
  gm = pixel_mixture(2.0, -1.0)
  images = jnp.clip(jnp.round(pixel_mixture(255.0, 0.0).sample(jax.random.key(1), 4)), 0, 255).astype(jnp.uint8)
  score_fn = exact_score(score_family(sde, (2, 2, 1)), gm)
  options = dict(divergence="exact", rtol=1e-5, atol=1e-5)
  center = lambda u: 2 * u - 1
  key = jax.random.key(2)
  bpd, aux = dq.get_bpd_fn(sde, dq.uniform, "ode", data_scaler=center, **options)(key, score_fn, images)
  expected, _, nfe = likelihood.get_bpd_fn(sde, data_scaler=center, **options)(key, score_fn, images)
  # Uniform dequantisation draws the noise of likelihood.dequantize, so the two agree exactly.
  np.testing.assert_allclose(bpd, expected, rtol=1e-5)
  assert aux["log_weights"].shape == (4, 1) and int(aux["nfe"]) == int(nfe)


@pytest.mark.slow
def test_bpd_fn_with_the_bound_and_importance_samples():
  sde = sde_lib.VPSDE()
  gm = pixel_mixture(2.0, -1.0)
  images = jnp.clip(jnp.round(pixel_mixture(255.0, 0.0).sample(jax.random.key(1), 4)), 0, 255).astype(jnp.uint8)
  score_fn = exact_score(score_family(sde, (2, 2, 1)), gm)
  center = lambda u: 2 * u - 1
  deq = dq.truncated_normal(0.4)
  bpd, aux = dq.get_bpd_fn(sde, deq, "bound", num_samples=3, data_scaler=center,
                           num_time_samples=4)(jax.random.key(5), score_fn, images)
  # The same samples by hand: dequantise, map to model space, bound, importance-weight.
  bound_fn = bound.get_bound_fn(sde, num_time_samples=4)
  log_w = []
  for k in range(3):
    sample_key = jax.random.key(5) if k == 0 else jax.random.fold_in(jax.random.key(5), k)
    k_deq, k_bound = jax.random.split(sample_key)
    u, log_q = deq(k_deq, images)
    y, log_det = dq.to_model_space(images, u, center)
    log_w.append(-bound_fn(k_bound, score_fn, y)[0] + log_det - log_q)
  log_w = jnp.stack(log_w, 1)
  np.testing.assert_allclose(aux["log_weights"], log_w, rtol=1e-5)
  np.testing.assert_allclose(bpd, -(jax.nn.logsumexp(log_w, 1) - math.log(3)) / (4 * math.log(2)), rtol=1e-5)
  assert aux["bound_se"].shape == (4, 3)


def test_bad_inputs_raise_value_errors():
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match="valid choices: \\['bound', 'ode'\\]"):
    dq.get_bpd_fn(sde, estimator="exact")
  with pytest.raises(ValueError, match="valid choices: \\['truncated_normal', 'uniform'\\]"):
    dq.get_dequantizer("logistic")
  with pytest.raises(ValueError, match="std > 0"):
    dq.truncated_normal(0.0)
  with pytest.raises(ValueError, match="integer"):
    dq.get_bpd_fn(sde)(jax.random.key(0), lambda x, t: -x, jnp.zeros((2, 3), jnp.float32))
