"""The probability-flow ODE sampler against closed-form Gaussian-mixture marginals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic
from score_sde import sampling
from score_sde.sampling import ode
from tests import stats
from tests import helpers

# sigma_max of the VE SDE: a few times the largest pairwise distance of the mixtures used here
# (means at norm 1, per-axis std at most 0.5), the original's rule for choosing it.
SDES = helpers.SDES
EPS = 1e-3


def _mixture_score(sde, event_shape, weights, means, eigvals, eigvecs, x, t):
  return analytic.GaussianMixture(weights, means, eigvals, eigvecs, event_shape).score(x, t, sde)


@functools.lru_cache(maxsize=None)
def score_family(sde, event_shape):
  """One static function per (SDE, event shape); the mixture's arrays are passed as traced leaves."""
  return functools.partial(_mixture_score, sde, tuple(event_shape))


@functools.lru_cache(maxsize=None)
def ode_sampler(name, dim, n):
  """The sampler of the distribution tests (eps=1e-3, tolerances 1e-5), compiled once per session."""
  return sampling.get_sampler(SDES[name], (n, dim), method="ode", rtol=1e-5, atol=1e-5, eps=EPS)


def exact_score(family, gm):
  """The exact score of ``gm`` as a pytree callable, so a new mixture reuses the compiled sampler."""
  return jax.tree_util.Partial(family, gm.weights, gm.means, gm.eigvals, gm.eigvecs)


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 64])
@pytest.mark.parametrize("name", sorted(SDES))
def test_samples_follow_the_exact_marginal_at_eps_and_a_wrong_score_fails(name, dim):
  sde, n = SDES[name], 512
  gm = analytic.GaussianMixture.random(seed=dim, dim=dim)
  family = score_family(sde, (dim,))
  sampler = ode_sampler(name, dim, n)
  threshold = stats.null_threshold(lambda k, m: gm.sample(k, m, EPS, sde), n)
  exact = gm.sample(jax.random.key(7), n, EPS, sde)

  x, nfe = sampler(jax.random.key(0), exact_score(family, gm))
  assert x.shape == (n, dim) and nfe.dtype == jnp.int32 and 0 < int(nfe) < ode.MAX_STEPS
  assert float(stats.energy_distance(x, exact)) < threshold

  # Meta-test: the score of a mildly different mixture (means moved by 30%) fails the same check.
  wrong = analytic.GaussianMixture(gm.weights, 1.3 * gm.means, gm.eigvals, gm.eigvecs, gm.event_shape)
  x_wrong, _ = sampler(jax.random.key(0), exact_score(family, wrong))
  assert float(stats.energy_distance(x_wrong, exact)) > threshold


def solver_error_bound(nfe, x, z, rtol, atol, stages=6):
  """Per-sample bound (B,) on the difference of two solves between x and z at (rtol, atol).

  The controller keeps each step's local error below atol + rtol |y|, with |y| at most the larger
  of the endpoints' magnitudes; there are at most nfe / stages steps, and each solve's global error
  is at most their sum where the flow does not amplify errors, so two solves differ by at most
  twice that. (Near a separatrix between modes the flow does amplify them: see the round trip.)
  """
  flat = lambda a: np.abs(np.asarray(a)).reshape(len(a), -1).max(1)
  return 2 * (int(nfe) / stages) * (atol + rtol * np.maximum(flat(x), flat(z)))


@pytest.mark.slow
def test_each_sample_has_its_own_steps_and_does_not_depend_on_the_batch():
  sde, dim, b = SDES["vp"], 2, 8
  # A broad component and a narrow one (std 0.003): latents that flow into the narrow one are hard.
  gm = analytic.GaussianMixture.create([0.7, 0.3], [[-0.5, 0.0], [1.0, 0.5]], [[0.1, 0.2], [1e-5, 1e-5]])
  score_fn = exact_score(score_family(sde, (dim,)), gm)
  batch = ode.get_ode_sampler(sde, (b, dim), eps=EPS)
  one = ode.get_ode_sampler(sde, (1, dim), eps=EPS)
  key = jax.random.key(3)

  # Each latent alone: the 8 easiest of 16 prior draws, and the same batch with sample 5 replaced
  # by the hardest, which needs more than twice the evaluations of any easy one.
  pool = sde.prior_sampling(jax.random.key(5), (2 * b, dim))
  alone = [one(None, score_fn, z=pool[i:i + 1]) for i in range(2 * b)]
  order = np.argsort([int(nfe) for _, nfe in alone], kind="stable")
  easy, hard = order[:b], order[-1]
  assert int(alone[hard][1]) > 2 * max(int(alone[i][1]) for i in easy)
  z_easy = pool[easy]
  z_mixed = z_easy.at[5].set(pool[hard])

  # In a batch, the easy samples decode bit for bit alike with or without the hard one (so they
  # took the same steps); the hard one only raises the reported count to its own.
  x_easy, nfe_easy = batch(None, score_fn, z=z_easy)
  x_mixed, nfe_mixed = batch(None, score_fn, z=z_mixed)
  others = np.arange(b) != 5
  np.testing.assert_array_equal(x_mixed[others], x_easy[others])
  assert int(nfe_mixed) > 2 * int(nfe_easy)
  # Alone (a batch of one, which XLA compiles differently) each sample agrees to solver tolerance.
  x_alone = np.concatenate([alone[i][0] for i in easy])
  bound = solver_error_bound(max(int(alone[i][1]) for i in easy), x_alone, z_easy, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_less(np.abs(x_alone - np.asarray(x_easy)).max(1), bound)

  # Prior draws follow the global index: sample i starts from the draw with key fold_in(key, i),
  # so shifting first_index shifts the batch bit for bit, and a batch of one matches it.
  x0, _ = batch(key, score_fn)
  x3, _ = batch(key, score_fn, first_index=3)
  np.testing.assert_array_equal(x3[:b - 3], x0[3:])
  for i in (0, 5):
    z_i = sde.prior_sampling(jax.random.fold_in(key, i), (1, dim))
    x_i, nfe_i = one(key, score_fn, first_index=i)
    np.testing.assert_array_equal(x_i, one(None, score_fn, z=z_i)[0])
    bound = solver_error_bound(nfe_i, x_i, z_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_less(np.abs(np.asarray(x_i[0] - x0[i])).max(), bound)


@pytest.mark.slow
def test_nfe_counts_the_batched_score_evaluations_made_and_denoise_is_one_tweedie_step():
  sde, b, dim = SDES["subvp"], 3, 2
  gm = analytic.GaussianMixture.random(seed=5, dim=dim)
  z = sde.prior_sampling(jax.random.key(2), (b, dim))
  calls = []

  def counting_score(x, t):
    # Under the per-sample vmap the callback runs once per sample of one batched evaluation.
    jax.debug.callback(lambda v: calls.append(v.shape), x)
    return gm.score(x, t, sde)

  outputs = {}
  # Tsit5 (FSAL, 6 new stages a step), the same with denoising, and Dopri8 (13 new stages a step).
  for solver, denoise in [("tsit5", False), ("tsit5", True), ("dopri8", False)]:
    calls.clear()
    sampler = ode.get_ode_sampler(sde, (b, dim), eps=EPS, solver=solver, denoise=denoise)
    x, nfe = sampler(None, counting_score, z=z)
    jax.block_until_ready(x)
    per_sample = sum(s == (1, dim) for s in calls)  # one batched evaluation -> b per-sample calls
    batched = sum(s == (b, dim) for s in calls)     # the denoising step, outside the solve
    assert per_sample % b == 0 and batched == int(denoise)
    assert int(nfe) == per_sample // b + batched, solver
    outputs[solver, denoise] = x, int(nfe)

  # denoise=True returns Tweedie's x_0 = (x + sigma_eps^2 s) / alpha_eps of the undenoised sample.
  (x, nfe), (x0, nfe0) = outputs["tsit5", False], outputs["tsit5", True]
  alpha, sigma = sde.alpha_sigma(jnp.full((b,), EPS))
  tweedie = (x + sigma[:, None] ** 2 * gm.score(x, EPS, sde)) / alpha[:, None]
  np.testing.assert_allclose(x0, tweedie, rtol=1e-6, atol=1e-6)
  assert nfe0 == nfe + 1


def test_arrays_in_a_pytree_score_are_traced_not_baked_in():
  sde, n = SDES["vp"], 256
  traces = []

  def gaussian_score(c, x, t):  # data N(0, c I), so p_t = N(0, (alpha_t^2 c + sigma_t^2) I)
    traces.append(None)
    alpha, sigma = sde.alpha_sigma(t)
    return -x / (alpha**2 * c + sigma**2)[:, None]

  sampler = ode.get_ode_sampler(sde, (n, 2), rtol=1e-4, atol=1e-4, eps=EPS)
  for c in (0.25, 1.0):
    x, _ = sampler(jax.random.key(0), jax.tree_util.Partial(gaussian_score, jnp.float32(c)))
    traces_after_first = len(traces) if c == 0.25 else traces_after_first
    # The sample std of n Gaussian draws has a standard error of about std / sqrt(2 n).
    std = float(jnp.sqrt(c + sde.alpha_sigma(jnp.array(EPS))[1] ** 2))
    assert abs(float(jnp.std(x)) - std) < 4 * std / np.sqrt(2 * 2 * n)
  assert len(traces) == traces_after_first > 0  # the new c reused the compiled program


def test_exhausting_max_steps_raises_instead_of_returning_a_wrong_sample():
  sde = SDES["vp"]
  gm = analytic.GaussianMixture.random(seed=0, dim=2)
  sampler = ode.get_ode_sampler(sde, (4, 2), max_steps=5)
  with pytest.raises(Exception, match="maximum number of solver steps"):
    jax.block_until_ready(sampler(jax.random.key(0), gm.score_fn(sde)))


def test_bad_options_raise_value_errors_naming_the_choices():
  sde = SDES["vp"]
  with pytest.raises(ValueError, match="valid choices: \\['dopri5', 'dopri8', 'tsit5'\\]"):
    ode.get_ode_sampler(sde, (4, 2), solver="rk45")
  with pytest.raises(ValueError, match="valid options: .*rtol"):
    sampling.get_sampler(sde, (4, 2), method="ode", predictor="euler_maruyama")
  with pytest.raises(ValueError, match="eps"):
    ode.get_ode_sampler(sde, (4, 2), eps=0.0)
  with pytest.raises(ValueError, match="rtol and atol must be positive"):
    ode.get_ode_sampler(sde, (4, 2), rtol=0.0)
  with pytest.raises(ValueError, match="max_steps"):
    ode.get_ode_sampler(sde, (4, 2), max_steps=0)
  with pytest.raises(ValueError, match="shape must be"):
    ode.get_ode_sampler(sde, (4,))
  sampler = ode.get_ode_sampler(sde, (4, 2))
  with pytest.raises(ValueError, match="z must have the sampler's shape \\(4, 2\\)"):
    sampler(None, lambda x, t: x, z=jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="floating-point"):
    sampler(None, lambda x, t: x, z=jnp.zeros((4, 2), jnp.int32))
