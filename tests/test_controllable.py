"""Inpainting and colourisation against closed-form mixtures whose known and unknown parts are independent.

For p_0(x) = p_K(x_K) p_U(x_U) every SDE's p_t factorises too, so the score of the unknown part
depends on x_U alone: replacing the known part changes nothing there, and the unknown part of an
inpainted sample must follow the sampler's law for p_U, whatever the data. p_U is the 2-D mixture
of tests/test_sampling_pc.py (``analytic.GaussianMixture.random(seed=0, dim=2)``), so the step
counts calibrated there carry over: at 200 PC steps every predictor's bias in the energy distance
(at most ~2e-4) is below one standard deviation of the exact-vs-exact distance at n = 2000, and
n = 1000 here doubles that standard deviation. Colourisation is checked the same way in the
decoupled colour basis: a Gaussian grey coordinate independent of the two chroma coordinates ~ p_U.

Tolerance: the gamma-fitted null quantile of ``stats.null_threshold``, Bonferroni-corrected over the
distribution checks of this file (family-wise false-alarm rate 1%). The fixed-budget solver's check
adds its known discretisation error: its output differs from the exact probability-flow map by at
most ``FAST_ERROR`` per sample (RMS), and moving each of the n samples by delta_i changes the
energy-distance V-statistic by at most 4 mean |delta_i| <= 4 RMS.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic, controllable, sampling
from score_sde.sampling import pc
from tests import stats
from tests import helpers

SDES = helpers.SDES
FAST_COMPILE = helpers.FAST_COMPILE

# p_U, and the 4-D product: coordinates (0, 2) known, ~ N(M_K, diag(V_K)); (1, 3) unknown, ~ p_U.
P_U = analytic.GaussianMixture.random(seed=0, dim=2)
KNOWN, UNKNOWN = [0, 2], [1, 3]
M_K, V_K = np.array([0.4, -0.3]), np.array([0.2, 0.1]) ** 2


def product_mixture(known, known_mean, known_var, basis=None, event_shape=None):
  """N(known_mean, diag(known_var)) on coordinates ``known`` times p_U on the others, as one mixture;
  with ``basis`` (D, D) orthonormal, the law of x = u basis^T for u drawn from it."""
  k = P_U.num_components
  d = len(known) + P_U.dim
  unknown = [i for i in range(d) if i not in known]
  means, covs = np.zeros((k, d)), np.zeros((k, d, d))
  means[:, known] = known_mean
  means[:, unknown] = np.asarray(P_U.means)
  covs[:, known, known] = known_var
  covs[np.ix_(range(k), unknown, unknown)] = np.asarray(P_U.covariances())
  if basis is not None:
    means, covs = means @ basis.T, basis @ covs @ basis.T
  return analytic.GaussianMixture.create(np.asarray(P_U.weights), means, covs, event_shape)


P_4D = product_mixture(KNOWN, M_K, V_K)
# Colour pixels (1, 1, 3): grey coordinate u_0 ~ N(G_MEAN, G_STD^2), chroma (u_1, u_2) ~ p_U.
G_MEAN, G_STD = 0.5, 0.3
P_RGB = product_mixture([0], np.array([G_MEAN]), np.array([G_STD**2]), controllable.COLOR_BASIS, (1, 1, 3))

N, STEPS, EPS = 1000, 200, 1e-3
# The fixed-budget checks: UniPC-3 with 50 evaluations under VP. Its output from given latents is
# within RMS 7.7e-5 of a Dopri8 solve of the probability-flow ODE at rtol = atol = 1e-8 (256 latents
# of p_U; the unknown part evolves exactly as for p_U alone, and so do the chroma coordinates, the
# flow commuting with the orthonormal basis change), rounded up here: 4 x 1e-4 is a twentieth of
# the null threshold.
FAST_METHOD, FAST_OPTIONS, FAST_ERROR = "unipc", dict(nfe=50), 1e-4
# (sde name, method, options) of the inpainting checks. PC runs denoise down to t = 0 (target p_U);
# the fixed-budget solver stops at EPS (target p_U at EPS).
INPAINT_CHECKS = {
    "pc-vp-reverse_diffusion-langevin": ("vp", "pc", dict(predictor="reverse_diffusion", corrector="langevin")),
    "pc-ve-ancestral_sampling-ald": ("ve", "pc", dict(predictor="ancestral_sampling", corrector="ald")),
    f"{FAST_METHOD}-vp": ("vp", FAST_METHOD, FAST_OPTIONS),
}
QUANTILE = 1.0 - 0.01 / (len(INPAINT_CHECKS) + 1)


def jit_fast(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


# N exact samples of p_U at time t under VP (t = 0: p_U itself, alpha = 1 and sigma = 0 exactly).
_exact_vp = jit_fast(lambda key, t: P_U.sample(key, N, t, SDES["vp"]))


def exact(key, t=0.0):
  return _exact_vp(key, jnp.float32(t))


@functools.lru_cache(maxsize=None)
def threshold(t=0.0):
  """The null threshold of the energy distance between N samples of p_U at time t under VP."""
  return stats.null_threshold(lambda key, m: exact(key, t), N, reps=25, quantile=QUANTILE)


def _scaled_score(sde, scale, mixture, x, t):
  return scale * mixture.score(x, t, sde)


@functools.lru_cache(maxsize=None)
def _scaled_score_of(name):
  return functools.partial(_scaled_score, SDES[name])


def scaled_score(name, mixture, scale=1.0):
  """scale x the exact score of ``mixture``; the scale is a traced leaf, so a new one reuses the program."""
  return jax.tree_util.Partial(_scaled_score_of(name), jnp.asarray(scale, jnp.float32), mixture)


def options_of(method, options):
  return dict(num_steps=STEPS, **options) if method == "pc" else dict(time_grid="logsnr", eps=EPS, **options)


@functools.lru_cache(maxsize=None)
def inpainting_program(case):
  name, method, options = INPAINT_CHECKS[case]
  inpainter = controllable.get_inpainter(SDES[name], (N, 4), method=method, **options_of(method, options))
  mask = jnp.zeros((1, 4), bool).at[0, jnp.array(KNOWN)].set(True)
  return jit_fast(lambda score_fn, data: inpainter(jax.random.key(0), score_fn, data, mask))


# Data: the known coordinates drawn from p_K (the unknown ones are ignored: left at 0).
DATA_4D = np.zeros((N, 4), np.float32)
DATA_4D[:, KNOWN] = M_K + np.sqrt(V_K) * np.random.default_rng(11).normal(size=(N, 2))


@functools.lru_cache(maxsize=None)
def inpaint(case, scale=(1.0, 1.0, 1.0, 1.0)):
  """(samples, nfe) of one inpainting check with the score scaled per coordinate, computed once."""
  x, nfe = inpainting_program(case)(scaled_score(INPAINT_CHECKS[case][0], P_4D, scale), DATA_4D)
  return np.asarray(x), int(nfe)


@pytest.mark.parametrize("case", sorted(INPAINT_CHECKS))
def test_inpainting_samples_the_unknown_part_exactly(case):
  _, method, _ = INPAINT_CHECKS[case]
  x, nfe = inpaint(case)
  np.testing.assert_array_equal(x[:, KNOWN], DATA_4D[:, KNOWN])
  if method == "pc":
    assert nfe == 2 * STEPS
    target, limit = exact(jax.random.key(2024)), threshold()
  else:
    assert nfe == FAST_OPTIONS["nfe"]
    target, limit = exact(jax.random.key(2024), EPS), threshold(EPS) + 4 * FAST_ERROR
  assert float(stats.energy_distance(x[:, UNKNOWN], target)) < limit


def test_a_wrong_score_fails_the_inpainting_check():
  """Meta-test: the unknown part's score scaled by 0.8 (same compiled program) is caught."""
  x, _ = inpaint("pc-vp-reverse_diffusion-langevin", (1.0, 0.8, 1.0, 0.8))
  assert float(stats.energy_distance(x[:, UNKNOWN], exact(jax.random.key(2024)))) > threshold()


def test_colorization_keeps_the_grey_and_samples_the_chroma_exactly():
  sde = SDES["vp"]
  colorizer = controllable.get_colorizer(sde, (N, 1, 1, 3), method=FAST_METHOD,
                                         **options_of(FAST_METHOD, FAST_OPTIONS))
  # Grey values g = u_0 / sqrt(3), u_0 ~ N(G_MEAN, G_STD^2), as one channel.
  gray = (G_MEAN + G_STD * np.random.default_rng(12).normal(size=(N, 1, 1, 1))) / math.sqrt(3)
  x, nfe = jit_fast(lambda score_fn, gray: colorizer(jax.random.key(0), score_fn, gray))(
      scaled_score("vp", P_RGB), jnp.asarray(gray, jnp.float32))
  x = np.asarray(x)
  assert x.shape == (N, 1, 1, 3) and int(nfe) == FAST_OPTIONS["nfe"]
  np.testing.assert_allclose(x.mean(-1, keepdims=True), gray, rtol=0, atol=2e-6)
  chroma = (x @ controllable.COLOR_BASIS)[:, 0, 0, 1:]
  limit = threshold(EPS) + 4 * FAST_ERROR
  assert float(stats.energy_distance(chroma, exact(jax.random.key(2024), EPS))) < limit


def test_color_basis_is_orthonormal_with_the_grey_direction_first():
  m = controllable.COLOR_BASIS
  np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-15)
  np.testing.assert_allclose(m[:, 0], np.ones(3) / math.sqrt(3), atol=1e-15)
  # The grey coordinate of a pixel is sqrt(3) times its channel mean.
  pixel = np.array([0.2, -0.5, 0.9])
  np.testing.assert_allclose((pixel @ m)[0], math.sqrt(3) * pixel.mean(), atol=1e-15)


# Tiny runs of what the other tests do not run: with them (which assert the same), every predictor,
# corrector and fixed-budget solver returns the data, bit for bit, in the known part.
TINY = [
    ("subvp", "pc", dict(predictor="none", corrector="langevin", num_steps=3, step_rule="per_sample")),
    ("ve", "euler", dict(nfe=3)),
    ("subvp", "heun", dict(nfe=4, s_churn=2.0)),
    ("vp", "dpm_solver", dict(nfe=4, order=3)),
    ("ve", "dpm_solver++", dict(nfe=3, order=2, eta=1.0)),
]


@pytest.mark.parametrize("name,method,options", TINY, ids=[f"{m}-{o.get('predictor', '')}-{o.get('corrector', '')}"
                                                             for _, m, o in TINY])
def test_every_method_returns_the_data_in_the_known_part(name, method, options):
  sde, shape = SDES[name], (3, 2, 2)
  data = jax.random.normal(jax.random.key(1), shape)
  mask = jax.random.bernoulli(jax.random.key(2), 0.5, shape)
  inpainter = controllable.get_inpainter(sde, shape, method=method, perturb_known=name == "ve", **options)
  score_fn = lambda x, t: -x / (sde.alpha_sigma(t)[0] ** 2 + sde.alpha_sigma(t)[1] ** 2)[:, None, None]
  x, nfe = jit_fast(lambda data, mask: inpainter(jax.random.key(0), score_fn, data, mask))(data, mask)
  x, mask = np.asarray(x), np.asarray(mask)
  np.testing.assert_array_equal(x[mask], np.asarray(data)[mask])
  assert np.all(np.isfinite(x)) and not np.allclose(x[~mask], np.asarray(data)[~mask], atol=1e-3)
  assert int(nfe) > 0


def test_denoise_returns_the_predictor_mean_in_the_unknown_part():
  """The original's defect: there denoising left the generated part as it was.

  One reverse-diffusion step from T to 0, reproduced from the PC sampler's key convention: its
  mean from x_T (sample i's prior draw, with the data in the known part) is what the denoised run
  returns in the unknown part; without denoising it returns that mean plus G z, with G = sigma_T and
  z the step's noise.
  """
  sde, shape, key = SDES["vp"], (16, 4), jax.random.key(3)
  data = jax.random.normal(jax.random.key(4), shape)
  mask = jnp.array([True, False, True, False])
  score_fn = lambda x, t: (0.3 - x) / (0.5 * sde.alpha_sigma(t)[0] ** 2 + sde.alpha_sigma(t)[1] ** 2)[:, None]
  build = lambda denoise: controllable.get_inpainter(sde, shape, predictor="reverse_diffusion", corrector="none",
                                                     num_steps=1, denoise=denoise)
  denoised, noisy = build(True), build(False)

  @jit_fast
  def run(data):
    sample_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(shape[0]))
    prior_keys, step_keys = pc._split(sample_keys, 2)
    _, _, predictor_keys = pc._split(step_keys, 3)
    x_T = jnp.where(mask, data, jax.vmap(lambda k: sde.prior_sampling(k, (1, 4))[0])(prior_keys))
    t = jnp.full((shape[0],), sde.T)
    _, mean, _ = sampling.PREDICTORS["reverse_diffusion"]().update(predictor_keys, x_T, t, sde.T, sde, score_fn)
    z = sampling.predictors.per_sample_normal(predictor_keys, (4,))
    return denoised(key, score_fn, data, mask)[0], noisy(key, score_fn, data, mask)[0], mean, z

  x_d, x_n, mean, z = (np.asarray(v) for v in run(data))
  known = np.asarray(mask)
  np.testing.assert_array_equal(x_d[:, known], np.asarray(data)[:, known])
  np.testing.assert_array_equal(x_n[:, known], np.asarray(data)[:, known])
  np.testing.assert_allclose(x_d[:, ~known], mean[:, ~known], rtol=1e-5, atol=1e-5)
  sigma_T = float(sde.alpha_sigma(jnp.float32(sde.T))[1])
  np.testing.assert_allclose(x_n[:, ~known], (mean + sigma_T * z)[:, ~known], rtol=1e-5, atol=1e-5)
  assert np.abs(x_n - x_d)[:, ~known].min() > 0


def test_samples_do_not_depend_on_the_batch_and_an_empty_mask_is_the_plain_sampler():
  """Sample i is bitwise the same in batches of 4 and 8 and in a chunk drawn with first_index (the
  score is elementwise, so itself batch-invariant); where the mask is empty the inpainter returns
  the unconditional sampler's sample for the same key: the projection draws its own noise."""
  sde, key = SDES["ve"], jax.random.key(5)
  options = dict(predictor="reverse_diffusion", corrector="none", num_steps=5)
  data = jax.random.normal(jax.random.key(6), (8, 3))
  mask = jnp.array([[1, 0, 1]] * 6 + [[0, 0, 0]] * 2, bool)
  score_fn = lambda x, t: -x / (1.0 + sde.alpha_sigma(t)[1] ** 2)[:, None]
  small = controllable.get_inpainter(sde, (4, 3), **options)
  large = controllable.get_inpainter(sde, (8, 3), **options)
  plain = sampling.get_sampler(sde, (8, 3), **options)

  run_large = jit_fast(lambda data, mask: (large(key, score_fn, data, mask)[0], plain(key, score_fn)[0]))
  run_small = jit_fast(lambda data, mask, first: small(key, score_fn, data, mask, first_index=first)[0])
  x8, unconditional = (np.asarray(v) for v in run_large(data, mask))
  x4, rest = np.asarray(run_small(data[:4], mask[:4], 0)), np.asarray(run_small(data[4:], mask[4:], 4))
  np.testing.assert_array_equal(x8[np.asarray(mask)], np.asarray(data)[np.asarray(mask)])
  np.testing.assert_array_equal(x4, x8[:4])
  np.testing.assert_array_equal(rest, x8[4:])
  np.testing.assert_allclose(x8[6:], unconditional[6:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(x8[:6], unconditional[:6], atol=1e-3)


def test_the_two_initialisations_of_the_known_part():
  """Default (the original's): the clean data; ``perturb_known``: alpha_T y + sigma_T z."""
  data = jnp.arange(6.0).reshape(2, 3)
  mask = jnp.array([True, False, True])
  x_T = jnp.full((2, 3), -7.0)
  keys = jax.random.split(jax.random.key(0), 2)
  clean = controllable.Replacement(data, mask).init(keys, x_T, 0.5, 2.0)
  perturbed = controllable.Replacement(data, mask, perturb_known=True).init(keys, x_T, 0.5, 2.0)
  z = sampling.predictors.per_sample_normal(keys, (3,))
  np.testing.assert_array_equal(clean, jnp.where(mask, data, x_T))
  np.testing.assert_allclose(perturbed, jnp.where(mask, 0.5 * data + 2.0 * z, x_T), rtol=1e-6)


def test_bad_input_raises_errors_that_say_what_to_do():
  sde = SDES["vp"]
  inpainter = controllable.get_inpainter(sde, (2, 3), num_steps=2)
  data, score_fn = jnp.zeros((2, 3)), lambda x, t: -x
  with pytest.raises(ValueError, match=r"get_inpainter\(sde, data.shape"):
    inpainter(jax.random.key(0), score_fn, jnp.zeros((2, 4)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="broadcasts to it"):
    inpainter(jax.random.key(0), score_fn, data, jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="threshold a soft mask"):
    inpainter(jax.random.key(0), score_fn, data, jnp.full((2, 3), 0.5))
  with pytest.raises(ValueError, match="valid choices"):
    controllable.get_inpainter(sde, (2, 3), method="langevin")
  with pytest.raises(ValueError, match="fixed-budget solver"):
    controllable.get_inpainter(sde, (2, 3), method="ode")
  with pytest.raises(ValueError, match="valid choices"):
    controllable.get_inpainter(sde, (2, 3), predictor="heun")
  with pytest.raises(ValueError, match="valid options"):
    controllable.get_inpainter(sde, (2, 3), method="unipc", num_steps=3)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    controllable.get_colorizer(sde, (2, 4, 4, 1))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    controllable.get_colorizer(sde, (2, 4, 3))
  colorizer = controllable.get_colorizer(sde, (2, 4, 4, 3), num_steps=2)
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 1\)"):
    colorizer(jax.random.key(0), score_fn, jnp.zeros((2, 4, 4, 2)))
