"""The predictor-corrector sampler against closed-form Gaussian mixtures under VP, subVP and VE.

A check passes when the energy distance between the sampler's output and exact samples of the
right target is below the null threshold of ``tests/stats.py`` (exact-vs-exact samples of the
same size). Targets:
* With a predictor and ``denoise=True`` the last step goes from eps to t = 0 and lands on clean
  data (``sde.step_levels``), and its mean is returned: the target is p_0 itself. (Exact samples
  at t = eps would differ from it by sigma_eps ~ 0.01 noise, a bias far below the null noise.)
* Corrector-only samplers (predictor ``none``) stay at the last grid time: the target is p_eps
  with ``denoise=False`` (the last Langevin mean, x + eps s, is not a denoised sample: it
  contracts p_eps by a factor 1 - eps / Var). eps is where sigma_t / alpha_t = 0.2 for each SDE,
  so x_eps / alpha_eps has the same law, p_0 blurred by N(0, 0.2^2 I), under all three SDEs:
  the samples are compared after that rescaling, against one target.

Tolerance. The threshold is the gamma-fitted null quantile of ``stats.null_threshold``, with the
quantile Bonferroni-corrected for the distribution checks in this file (family-wise false-alarm
rate 1%). The sample sizes and step counts below keep the sampler's own bias (discretisation,
finite snr) below the null noise, as said next to each.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from score_sde import analytic
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde.sampling import correctors, pc
from tests import stats
from tests import helpers

# sigma_max of the VE SDE: 2-3 times the largest pairwise distance of the mixtures (3.7 in 2-D,
# 4.8 in 64-D), the original's rule for choosing it with some room.
SDES = helpers.SDES
PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none")
CORRECTORS = ("langevin", "ald", "none")
COMBOS_2D = [(p, c) for p in PREDICTORS for c in CORRECTORS if (p, c) != ("none", "none")]
# 64-D: each stepping predictor and each corrector once per SDE; Langevin with the per-sample
# step rule, which is meant for high dimension (the batch rule is checked in 2-D). Corrector-only
# sampling is checked in 2-D, where it is affordable.
COMBOS_64D = [("reverse_diffusion", "langevin"), ("euler_maruyama", "ald"), ("ancestral_sampling", "none")]

# Sample sizes and step counts. The sampler's bias must stay below the null noise of the check
# (experiments/bench_pc.py prints the error against num_steps for each predictor).
# 2-D, n = 2000: exact-vs-exact energy distance ~6e-4 on average (sd ~5e-4), threshold ~4e-3.
# At 200 steps the largest remaining bias, ancestral sampling's, adds ~2e-4 (6-seed mean), less
# than one null standard deviation; at 50 steps it adds ~3e-3.
N_2D, STEPS_2D = 2000, 200
# 64-D, n = 1000: exact-vs-exact ~5.3e-3, threshold ~8e-3. At 200 steps every predictor is within
# 3e-4 of that (3-seed means); at 100 steps reverse diffusion + Langevin is still 1.8e-3 above.
N_64D, STEPS_64D = 1000, 200
# Corrector-only: Langevin alone must track p_t as it sharpens, which a uniform time grid makes
# expensive near t = 0 (each step moves ~2 snr^2 Var, and Var shrinks to the data's, 0.003 here).
# It is checked down to the time where sigma_t / alpha_t = 0.2, with snr = 0.25 and 5 steps per
# grid point. There every variance of p_t is >= sigma_t^2, so Langevin's finite-step bias (the
# variance inflated by ~eps / (2 Var) <= snr^2 for ALD) is small, and the measured excess over
# the exact-vs-exact distance is ~2e-4 (n = 4000), against ~1e-3 (sd 5e-4) and a threshold of
# ~3.5e-3 at n = 2000. At snr = 0.16 or with 2 steps per grid point the excess is 2-10 times larger.
N_CORRECTOR, STEPS_CORRECTOR, NOISE_CORRECTOR = 2000, 200, 0.2
CORRECTOR_ONLY = dict(snr=0.25, n_steps=5, denoise=False)

CHECKS = 3 * len(COMBOS_2D) + 3 * len(COMBOS_64D) + 2
QUANTILE = 1.0 - 0.01 / CHECKS


class CallCounter:
  """Counts score evaluations as the compiled program runs them (a host callback per call)."""

  def __init__(self):
    self.calls = 0

  def add(self):
    self.calls += 1


COUNTER = CallCounter()


def _mixture_score(sde, count, scale, mixture, x, t):
  if count:
    jax.debug.callback(COUNTER.add)
  return scale * mixture.score(x, t, sde)


@functools.lru_cache(maxsize=None)
def score_family(name, count):
  """One static function per SDE; the scale and the mixture's arrays are traced leaves."""
  return functools.partial(_mixture_score, SDES[name], count)


def mixture_score(name, gm, scale=1.0, count=False):
  """scale x the exact score of ``gm``, as a pytree callable (a new scale reuses the program).

  With ``count`` every evaluation is counted on the host (2-D runs only: it costs a callback).
  """
  return jax.tree_util.Partial(score_family(name, count), jnp.float32(scale), gm)


MIXTURES = {dim: analytic.GaussianMixture.random(seed=0, dim=dim) for dim in (2, 64)}


@functools.lru_cache(maxsize=None)
def time_at_noise(name, noise):
  """The t at which sigma_t / alpha_t = noise under SDES[name]."""
  sde = SDES[name]
  ratio = lambda t: float(np.divide(*sde.alpha_sigma(jnp.float32(t))[::-1]))
  return optimize.brentq(lambda t: ratio(t) - noise, 1e-4, 1.0, xtol=1e-7)


def settings(name, dim, predictor, corrector):
  """(n, sampler options, target time or None for p_0) of the distribution check."""
  if predictor == "none":
    eps = time_at_noise(name, NOISE_CORRECTOR)
    return N_CORRECTOR, dict(num_steps=STEPS_CORRECTOR, eps=eps, **CORRECTOR_ONLY), eps
  n, steps = (N_2D, STEPS_2D) if dim == 2 else (N_64D, STEPS_64D)
  return n, dict(num_steps=steps), None


@functools.lru_cache(maxsize=None)
def get_sampler(name, dim, predictor, corrector, step_rule):
  n, options, _ = settings(name, dim, predictor, corrector)
  return pc.get_pc_sampler(SDES[name], (n, dim), predictor=predictor, corrector=corrector,
                           step_rule=step_rule, **options)


@functools.lru_cache(maxsize=None)
def run(name, dim, predictor, corrector, step_rule, scale):
  """(samples, nfe, score evaluations counted (2-D)) of one configuration, computed once."""
  sampler = get_sampler(name, dim, predictor, corrector, step_rule)
  COUNTER.calls = 0
  x, nfe = sampler(jax.random.key(0), mixture_score(name, MIXTURES[dim], scale, count=dim == 2))
  x.block_until_ready()
  jax.effects_barrier()
  return np.asarray(x), int(nfe), COUNTER.calls


@functools.lru_cache(maxsize=None)
def target(dim, n, noise=None):
  """(exact samples, null threshold) of p_0 blurred by N(0, noise^2 I) (p_0 when None), n samples."""
  gm = MIXTURES[dim]
  blur = None if noise is None else SDES["ve"]
  t = None if noise is None else time_at_noise("ve", noise)
  exact_sample = lambda key, m: gm.sample(key, m, t, blur)
  threshold = stats.null_threshold(exact_sample, n, reps=25, quantile=QUANTILE)
  return np.asarray(exact_sample(jax.random.key(2024), n)), threshold


def check(name, dim, predictor, corrector, step_rule="batch", scale=1.0):
  """(energy distance to the exact target, its null threshold)."""
  n, _, t = settings(name, dim, predictor, corrector)
  x, _, _ = run(name, dim, predictor, corrector, step_rule, scale)
  if t is None:
    exact, threshold = target(dim, n)
  else:  # x_t / alpha_t ~ p_0 blurred by N(0, (sigma_t / alpha_t)^2 I).
    exact, threshold = target(dim, n, NOISE_CORRECTOR)
    x = x / float(SDES[name].alpha_sigma(jnp.float32(t))[0])
  assert x.shape == exact.shape and np.all(np.isfinite(x))
  return float(stats.energy_distance(x, exact)), threshold


@pytest.mark.slow
@pytest.mark.parametrize("predictor, corrector", COMBOS_2D)
@pytest.mark.parametrize("name", sorted(SDES))
def test_every_combination_samples_the_exact_2d_mixture(name, predictor, corrector):
  """All predictor x corrector pairs, including subVP's correctors and ancestral steps."""
  distance, threshold = check(name, 2, predictor, corrector)
  assert distance < threshold


@pytest.mark.slow
@pytest.mark.parametrize("predictor, corrector", COMBOS_64D)
@pytest.mark.parametrize("name", sorted(SDES))
def test_representative_combinations_sample_the_exact_64d_mixture(name, predictor, corrector):
  distance, threshold = check(name, 64, predictor, corrector, step_rule="per_sample")
  assert distance < threshold


def test_a_wrong_score_fails_the_same_check():
  """Meta-test: the score scaled by 0.8 (same compiled sampler, traced scale) is caught."""
  distance, threshold = check("vp", 2, "reverse_diffusion", "langevin")
  wrong, _ = check("vp", 2, "reverse_diffusion", "langevin", scale=0.8)
  assert distance < threshold < wrong
  wrong_64d, threshold_64d = check("ve", 64, "euler_maruyama", "ald", step_rule="per_sample", scale=0.8)
  assert wrong_64d > threshold_64d


@pytest.mark.parametrize("predictor, corrector", COMBOS_2D)
@pytest.mark.parametrize("name", sorted(SDES))
def test_nfe_is_the_number_of_score_evaluations_made(name, predictor, corrector):
  _, options, _ = settings(name, 2, predictor, corrector)
  _, nfe, calls = run(name, 2, predictor, corrector, "batch", 1.0)
  per_step = (corrector != "none") * options.get("n_steps", 1) + (predictor != "none")
  assert nfe == calls == options["num_steps"] * per_step


def test_vp_ancestral_sampling_with_20_steps_is_finite_and_close():
  """The original's DDPM table is singular at N = 20 (beta_max / N = 1); the grid chain is not.

  With 20 steps the discretisation bias is visible, so "close" means: nearer to p_0 than the
  exact marginal two grid steps away (t = 2 dt) is.
  """
  sde, n, gm = sde_lib.VPSDE(N=20), N_2D, MIXTURES[2]
  sampler = pc.get_pc_sampler(sde, (n, 2), predictor="ancestral_sampling", corrector="none")
  x, nfe = sampler(jax.random.key(0), gm.score_fn(sde))
  exact, _ = target(2, n)
  assert int(nfe) == 20 and np.all(np.isfinite(np.asarray(x)))
  two_steps = gm.sample(jax.random.key(1), n, 2 * (1 - 1e-3) / 19, sde)
  assert float(stats.energy_distance(x, exact)) < float(stats.energy_distance(two_steps, exact))


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_the_original_tables_also_sample_the_mixture(name):
  """discretization="table" (indexing round(t (N - 1)); N = 200 grid points on the same grid)."""
  sde = {"vp": sde_lib.VPSDE(N=200, discretization="table"),
         "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=200, discretization="table")}[name]
  n, gm = N_CORRECTOR, MIXTURES[2]
  sampler = pc.get_pc_sampler(sde, (n, 2), predictor="ancestral_sampling", corrector="langevin")
  x, nfe = sampler(jax.random.key(0), gm.score_fn(sde))
  exact, threshold = target(2, n)
  assert int(nfe) == 400
  assert float(stats.energy_distance(x, exact)) < threshold


def test_per_sample_rule_does_not_depend_on_the_batch():
  """Sample i is bitwise the same in batches of 4 and 8, and in a chunk drawn with first_index.

  The score here is elementwise (a diagonal Gaussian), hence itself batch-invariant: with a
  matmul-based score the compiler may round differently for different batch sizes, which no
  sampler can prevent.
  """
  sde = SDES["vp"]
  mu, var = jnp.array([0.3, -0.5]), jnp.array([0.02, 0.3])

  def score_fn(x, t):
    alpha, sigma = sde.alpha_sigma(t)
    return (alpha[:, None] * mu - x) / (alpha[:, None] ** 2 * var + sigma[:, None] ** 2)

  build = lambda b: pc.get_pc_sampler(sde, (b, 2), num_steps=20, step_rule="per_sample")
  small, large = build(4), build(8)
  x8, _ = large(jax.random.key(5), score_fn)
  x4, _ = small(jax.random.key(5), score_fn)
  rest, _ = small(jax.random.key(5), score_fn, first_index=4)
  np.testing.assert_array_equal(x4, x8[:4])
  np.testing.assert_array_equal(rest, x8[4:])


def test_per_sample_guard_keeps_a_sample_at_a_mode():
  """Pathology: at a mode |s_b| = 0 and an unguarded per-sample step is infinite. The unguarded
  rule is exactly the original's batch rule on a batch of one, which sends the sample to NaN.

  The guard caps the step at alpha_i sigma_t^2, so the sample moves by at most sqrt(2) local stds
  of p_t. Data: one component of std 0.05 (narrow on the unit scale) under VP at t = 0.01.
  """
  sde, d, n = SDES["vp"], 2, 2000
  gm = analytic.GaussianMixture.create([1.0], [[0.3, -0.2]], [[0.05**2, 0.05**2]])
  t, dt = jnp.full((n,), 0.01), 1e-3
  alpha_t, sigma_t = (float(v) for v in sde.alpha_sigma(jnp.float32(0.01)))
  local_std = math.sqrt(alpha_t**2 * 0.05**2 + sigma_t**2)
  x = jnp.broadcast_to(alpha_t * gm.means[0], (n, d))  # The mode of p_t.
  keys = jax.random.split(jax.random.key(0), n)
  score_fn = gm.score_fn(sde)
  per_sample = correctors.Langevin(snr=0.16, step_rule="per_sample")
  batch_rule = correctors.Langevin(snr=0.16, step_rule="batch")

  @jax.jit
  def correct(x):
    s = score_fn(x, t)
    eps = per_sample.step_size(s, jnp.ones_like(x), t, dt, sde)
    moved, _, _ = per_sample.update(keys, x, t, dt, sde, score_fn)
    alone, _, _ = batch_rule.update(keys[:1], x[:1], t[:1], dt, sde, score_fn)
    return jnp.abs(s).max(), eps, moved, alone

  score_max, eps, moved, alone = (np.asarray(v) for v in correct(x))
  assert score_max < 1e-5
  assert not np.all(np.isfinite(alone)) or np.abs(alone - x[:1]).max() > 100 * local_std
  np.testing.assert_allclose(eps, sde.langevin_alpha(t, dt) * sigma_t**2, rtol=1e-6)
  assert np.all(np.isfinite(moved))
  rms = math.sqrt(np.mean(np.sum((moved - np.asarray(x)) ** 2, axis=1)) / d)
  np.testing.assert_allclose(rms, math.sqrt(2 * eps[0]), rtol=0.05)
  assert rms <= math.sqrt(2) * local_std


def test_denoise_drops_exactly_the_last_noise_and_get_sampler_builds_pc():
  """``sampling.get_sampler(method="pc")`` without ``denoise``, against the cached denoised run:
  the same key gives outputs that differ by the last reverse-diffusion noise, G z with
  G^2 = sigma_eps^2 (the step from eps to 0)."""
  sde, gm = SDES["vp"], MIXTURES[2]
  x_mean, _, _ = run("vp", 2, "reverse_diffusion", "none", "batch", 1.0)
  sampler = sampling.get_sampler(sde, (N_2D, 2), method="pc", predictor="reverse_diffusion",
                                 corrector="none", num_steps=STEPS_2D, denoise=False)
  x, nfe = sampler(jax.random.key(0), mixture_score("vp", gm))
  assert x.shape == (N_2D, 2) and nfe.dtype == jnp.int32 and int(nfe) == STEPS_2D
  sigma_eps = float(sde.alpha_sigma(jnp.float32(1e-3))[1])
  np.testing.assert_allclose(np.std(np.asarray(x) - x_mean), sigma_eps, rtol=0.05)


def test_a_single_step_goes_from_the_prior_to_clean_data():
  """num_steps = 1: one corrector step at T, then one predictor step from T straight to t = 0."""
  sde, gm = SDES["ve"], MIXTURES[2]
  sampler = pc.get_pc_sampler(sde, (256, 2), predictor="ancestral_sampling", corrector="ald", num_steps=1)
  x, nfe = sampler(jax.random.key(0), mixture_score("ve", gm))
  # From sigma_max to 0 in one step the ancestral mean is Tweedie's E[x_0 | x_T], ~ the data mean.
  mean, _ = gm.mean_and_cov()
  assert int(nfe) == 2 and np.all(np.isfinite(np.asarray(x)))
  np.testing.assert_allclose(np.asarray(x).mean(0), mean, atol=0.1)


@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion"])
def test_probability_flow_predictors_are_deterministic_with_half_the_score(predictor):
  """With probability_flow the step is the ODE's: no noise, and g^2 s / 2 instead of g^2 s."""
  sde, dt = SDES["vp"], 0.01
  x, t = jax.random.normal(jax.random.key(0), (4, 3)), jnp.linspace(0.2, 0.9, 4)
  score_fn = lambda x, t: -2.0 * x
  keys = [jax.random.split(jax.random.key(i), 4) for i in (1, 2)]
  ode = sampling.PREDICTORS[predictor](probability_flow=True)
  x_a, mean_a, nfe = ode.update(keys[0], x, t, dt, sde, score_fn)
  x_b, _, _ = ode.update(keys[1], x, t, dt, sde, score_fn)
  _, mean_sde, _ = sampling.PREDICTORS[predictor]().update(keys[0], x, t, dt, sde, score_fn)
  np.testing.assert_array_equal(x_a, x_b)
  np.testing.assert_array_equal(x_a, mean_a)
  # The two means differ by the half score term: g(t)^2 dt s / 2 (EM), G_i^2 s / 2 (chain).
  g2 = sde.sde(x, t)[1] ** 2 * dt if predictor == "euler_maruyama" else sde.discretize(x, t, dt)[1] ** 2
  np.testing.assert_allclose(mean_sde - mean_a, 0.5 * g2[:, None] * score_fn(x, t), rtol=1e-4, atol=1e-7)
  assert nfe == 1


def test_bad_options_raise_errors_naming_the_valid_choices():
  sde, shape = SDES["vp"], (4, 2)
  cases = [
      (dict(predictor="heun"), "valid choices"),
      (dict(corrector="mala"), "valid choices"),
      (dict(step_rule="global"), "valid choices"),
      (dict(corrector="ald", step_rule="global"), "valid choices"),   # checked whichever corrector runs
      (dict(predictor="none", corrector="none"), "choose a predictor"),
      (dict(predictor="ancestral_sampling", probability_flow=True), "reverse_diffusion"),
      (dict(num_steps=0), "positive integer"),
      (dict(n_steps=0), "positive integer"),
      (dict(snr=0.0), "snr"),
      (dict(eps=1.5), "eps"),
  ]
  for options, message in cases:
    with pytest.raises(ValueError, match=message):
      pc.get_pc_sampler(sde, shape, **options)
  with pytest.raises(ValueError, match="shape"):
    pc.get_pc_sampler(sde, (4,))
  with pytest.raises(ValueError, match="valid choices"):
    sampling.get_sampler(sde, shape, method="pc", predictor="Euler")
  with pytest.raises(ValueError, match="valid options"):
    sampling.get_sampler(sde, shape, method="pc", n_steps_each=2)
