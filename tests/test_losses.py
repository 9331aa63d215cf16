"""Losses, optimiser, EMA and step functions, checked against closed forms.

Analytic DSM loss of the true score. For p_0 = N(mu, Sigma) and x_t = alpha_t x_0 + sigma_t z, the
marginal is N(alpha_t mu, C_t) with C_t = alpha_t^2 Sigma + sigma_t^2 I and the score is
s(x) = -C_t^{-1} (x - alpha_t mu). Writing e = alpha_t (x_0 - mu) ~ N(0, alpha_t^2 Sigma) = N(0, C_t - sigma_t^2 I),

    sigma s + z = -sigma C^{-1} e + (I - sigma^2 C^{-1}) z,
    E|| sigma s + z ||^2 = sigma^2 tr(C^{-1} (C - sigma^2 I) C^{-1}) + tr((I - sigma^2 C^{-1})^2)
                         = D - sigma_t^2 tr(C_t^{-1}) = sum_d alpha^2 l_d / (alpha^2 l_d + sigma^2),

with l_d the eigenvalues of Sigma; the likelihood-weighted loss multiplies this by g^2 / sigma^2.
The expected loss integrates it over t ~ U(eps, T) (Gauss-Legendre in log t) or averages it over
the discrete levels. Monte-Carlo estimates must agree within Z_TOL standard errors, estimated
from the per-example losses of the same batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_sde import analytic
from score_sde import losses
from score_sde import sde as sde_lib
from tests import helpers

Z_TOL = 5.0  # Two-sided 5-sigma: a false failure has probability ~6e-7 per comparison.
BATCH = 2**16

SDES = helpers.sdes(ve_sigma_max=50.0)
# A single anisotropic Gaussian with event shape (2, 2), so reductions see a non-flat example.
GAUSSIAN = analytic.GaussianMixture.create(
    [1.0], [[0.5, -0.3, 0.2, 1.0]],
    [[[0.30, 0.05, 0.00, 0.02], [0.05, 0.80, 0.10, 0.00], [0.00, 0.10, 0.10, 0.01], [0.02, 0.00, 0.01, 1.50]]],
    event_shape=(2, 2))
D = GAUSSIAN.dim
LAMBDAS = np.asarray(GAUSSIAN.eigvals[0], np.float64)


def exact_builder(coeffs):
  """A score-function builder that ignores params and returns the true score under ``coeffs``."""
  return lambda params, key, train: GAUSSIAN.score_fn(coeffs)


class _Table:
  """Duck-typed coefficients alpha_i, sigma_i of a discrete table at t_i = i / (N - 1)."""

  def __init__(self, alphas, sigmas):
    self.alphas = jnp.asarray(alphas, jnp.float32)
    self.sigmas = jnp.asarray(sigmas, jnp.float32)

  def alpha_sigma(self, t):
    i = jnp.round(t * (self.alphas.shape[0] - 1)).astype(jnp.int32)
    return self.alphas[i], self.sigmas[i]


def expected_residual(alpha, sigma):
  """E|| sigma s + z ||^2 = sum_d alpha^2 l_d / (alpha^2 l_d + sigma^2), per time (numpy)."""
  a2l = np.asarray(alpha, np.float64)[:, None] ** 2 * LAMBDAS[None]
  return np.sum(a2l / (a2l + np.asarray(sigma, np.float64)[:, None] ** 2), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _coefficients(sde, t):
  alpha, sigma = sde.alpha_sigma(t)
  _, g = sde.sde(jnp.zeros((t.shape[0], 1)), t)
  return alpha, sigma, (g / sigma) ** 2


def coefficients(sde, t):
  """(alpha, sigma, g^2 / sigma^2) at times t (numpy)."""
  return tuple(np.asarray(a, np.float64) for a in _coefficients(sde, jnp.asarray(t, jnp.float32)))


def expected_dsm(sde, t, likelihood_weighting=False):
  """E|| sigma s + z ||^2 at times t, times g^2 / sigma^2 under likelihood weighting (numpy)."""
  alpha, sigma, ratio = coefficients(sde, t)
  return expected_residual(alpha, sigma) * (ratio if likelihood_weighting else 1.0)


def time_average(f, eps, T=1.0, panels=64, order=20):
  """(1 / (T - eps)) int_eps^T f(t) dt by composite Gauss-Legendre in u = log t."""
  nodes, weights = np.polynomial.legendre.leggauss(order)
  edges = np.linspace(np.log(eps), np.log(T), panels + 1)
  half = 0.5 * np.diff(edges)[:, None]
  u = (0.5 * (edges[1:] + edges[:-1]))[:, None] + half * nodes[None]
  t = np.exp(u).ravel()
  return float(np.sum((half * weights[None]).ravel() * t * f(t)) / (T - eps))


def assert_matches(aux, expected, rel_power=0.02):
  """The batch mean of aux['per_example'] equals ``expected`` within Z_TOL standard errors."""
  per_example = np.asarray(aux["per_example"], np.float64)
  mean, se = per_example.mean(), per_example.std(ddof=1) / np.sqrt(per_example.size)
  assert se < rel_power * abs(expected), f"test has no power: se={se}, expected={expected}"
  assert abs(mean - expected) < Z_TOL * se, f"MC {mean} +- {se} vs analytic {expected}"
  return per_example


@pytest.fixture(params=sorted(SDES))
def sde(request):
  return SDES[request.param]


@pytest.fixture(scope="module")
def x0():
  return jax.jit(lambda key: GAUSSIAN.sample(key, BATCH))(jax.random.key(0))


# --- losses of the true score --------------------------------------------------------------------


def test_dsm_loss_of_true_score(sde, x0):
  """Default weighting: E||sigma s + z||^2 = D - sigma^2 tr C^{-1}, integrated over t ~ U(eps, T)."""
  eps = 1e-5
  loss_fn = losses.get_sde_loss_fn(sde, exact_builder(sde), train=True, eps=eps)
  loss, aux = jax.jit(loss_fn)(jax.random.key(1), None, x0)
  per_example = assert_matches(aux, time_average(lambda t: expected_dsm(sde, t), eps) / D)
  np.testing.assert_allclose(loss, per_example.mean(), rtol=1e-5)
  assert np.all((aux["t"] >= eps) & (aux["t"] <= sde.T))


def test_reduction_and_discrete_time_grid(x0):
  """reduce_mean=False is 0.5 * sum over dimensions (the same residuals under the same key, so
  exactly 0.5 D times the mean); continuous=False draws t from the grid i / (N - 1) and matches the
  level average of the closed form."""
  sde, key = sde_lib.VPSDE(), jax.random.key(1)
  build = exact_builder(sde)
  _, aux_mean = jax.jit(losses.get_sde_loss_fn(sde, build, train=True))(key, None, x0)
  _, aux_sum = jax.jit(losses.get_sde_loss_fn(sde, build, train=True, reduce_mean=False))(key, None, x0)
  np.testing.assert_allclose(aux_sum["per_example"], 0.5 * D * aux_mean["per_example"], rtol=1e-5)

  _, aux_grid = jax.jit(losses.get_sde_loss_fn(sde, build, train=True, continuous=False))(key, None, x0)
  labels = np.asarray(aux_grid["t"]) * (sde.N - 1)
  np.testing.assert_allclose(labels, np.round(labels), atol=1e-3)
  assert_matches(aux_grid, np.mean(expected_dsm(sde, np.arange(sde.N) / (sde.N - 1))) / D)


@pytest.mark.slow
def test_likelihood_and_importance_weighting(sde, x0):
  """lambda = g^2: the plain and the importance-sampled estimators both match
  int g^2/sigma^2 (D - sigma^2 tr C^{-1}) dt / (T - eps); importance sampling has far lower variance
  (VP, subVP; for VE g^2/sigma^2 is constant, so the proposal is uniform)."""
  eps = 3e-3  # The plain estimator's variance grows like 1 / eps for VP; keep its SE estimable.
  key = jax.random.key(2)
  build = exact_builder(sde)
  expected = time_average(lambda t: expected_dsm(sde, t, likelihood_weighting=True), eps) / D
  variances = {}
  for importance in (False, True):
    loss_fn = losses.get_sde_loss_fn(sde, build, train=True, eps=eps, likelihood_weighting=True,
                                     importance_weighting=importance)
    _, aux = jax.jit(loss_fn)(key, None, x0)
    variances[importance] = assert_matches(aux, expected).var(ddof=1)
  if isinstance(sde, sde_lib.VESDE):
    np.testing.assert_allclose(variances[True], variances[False], rtol=0.05)
  else:
    assert variances[True] < 0.25 * variances[False], variances


def test_importance_proposal_is_normalised_and_proportional(sde):
  """q(t) = (g^2/sigma^2) / Z: h(t) / q(t) is constant and equals Z = int_eps^T h by quadrature."""
  eps = 1e-5
  t, q = losses.likelihood_importance_proposal(sde, eps)(jax.random.key(3), 4096)
  assert np.all((np.asarray(t) >= eps) & (np.asarray(t) <= 1.0))
  _, _, h = coefficients(sde, t)
  z = (1.0 - eps) * time_average(lambda s: coefficients(sde, s)[2], eps)
  np.testing.assert_allclose(h / np.asarray(q, np.float64), z, rtol=2e-3)


def test_importance_weighting_at_default_eps(x0):
  """At the original's eps = 1e-5 (where the plain estimator is hopeless) importance sampling is
  still unbiased with a small standard error."""
  sde, eps = sde_lib.VPSDE(), 1e-5
  loss_fn = losses.get_sde_loss_fn(sde, exact_builder(sde), train=True, eps=eps,
                                   likelihood_weighting=True, importance_weighting=True, reduce_mean=False)
  _, aux = jax.jit(loss_fn)(jax.random.key(4), None, x0)
  assert_matches(aux, 0.5 * time_average(lambda t: expected_dsm(sde, t, likelihood_weighting=True), eps))


@pytest.mark.parametrize("kind", ["ddpm", "smld"])
def test_discrete_loss_of_true_score(kind, x0):
  """DDPM / SMLD losses of the true score of the discrete marginals N(a_i mu, a_i^2 Sigma + sigma_i^2 I)
  equal the level average of sum_d a_i^2 l_d / (a_i^2 l_d + sigma_i^2); the score is called at
  t_i = i / (N - 1). Default reductions: DDPM mean over dims, SMLD 0.5 * sum."""
  if kind == "ddpm":
    sde = sde_lib.VPSDE()
    alphas, sigmas = sde.sqrt_alphas_cumprod, sde.sqrt_1m_alphas_cumprod
    loss_fn, scale = losses.get_ddpm_loss_fn(sde, exact_builder(_Table(alphas, sigmas)), train=True), 1.0 / D
  else:
    sde = sde_lib.VESDE()
    alphas, sigmas = np.ones(sde.N), sde.discrete_sigmas
    loss_fn, scale = losses.get_smld_loss_fn(sde, exact_builder(_Table(alphas, sigmas)), train=True), 0.5
  _, aux = jax.jit(loss_fn)(jax.random.key(5), None, x0)
  labels = np.asarray(aux["t"]) * (sde.N - 1)
  np.testing.assert_allclose(labels, np.round(labels), atol=1e-3)
  assert len(np.unique(np.round(labels))) > 0.99 * sde.N  # All levels are drawn.
  assert_matches(aux, scale * np.mean(expected_residual(alphas, sigmas)))
  # The config entry point picks the same loss: the traced programs are identical.
  picked = losses.get_loss_fn(sde, exact_builder(_Table(alphas, sigmas)), train=True, continuous=False,
                              reduce_mean=kind == "ddpm")
  program = lambda f: str(jax.make_jaxpr(f)(jax.random.key(5), None, x0[:8]))
  assert program(picked) == program(loss_fn)


# --- optimiser ------------------------------------------------------------------------------------------


def test_lr_schedule():
  schedule = losses.get_lr_schedule(2e-4, 100)
  steps = np.array([0, 1, 37, 99, 100, 101, 10_000])
  np.testing.assert_allclose([schedule(s) for s in steps], 2e-4 * np.minimum(steps / 100, 1), rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(losses.get_lr_schedule(3e-4, 0)(0), 3e-4)


def test_optimizer_warmup_clipping_and_weight_decay():
  g = {"w": jnp.array([1.0, -2.0, 3.0])}
  p = {"w": jnp.array([1.0, 2.0, -4.0])}
  adam_direction = g["w"] / (jnp.abs(g["w"]) + 1e-8)  # m_hat / (sqrt(v_hat) + eps) for a constant gradient.

  # Warm-up through the real chain: the k-th update is -lr min(k / warmup, 1) sign(g); lr 0 at step 0.
  opt = losses.get_optimizer(lr=0.1, warmup=4, grad_clip=-1.0)
  state = opt.init(p)
  for k in range(7):
    updates, state = opt.update(g, state, p)
    np.testing.assert_allclose(updates["w"], -0.1 * min(k / 4, 1.0) * adam_direction, rtol=1e-4, atol=1e-9)

  # Clipping to global norm 1 happens before Adam: its first moment is (1 - beta1) g / max(|g|, 1).
  norm = float(jnp.linalg.norm(g["w"]))
  for clip, factor in [(1.0, 1.0 / norm), (10.0, 1.0), (-1.0, 1.0)]:
    opt = losses.get_optimizer(lr=0.1, beta1=0.8, grad_clip=clip)
    _, state = opt.update(g, opt.init(p), p)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["w"], 0.2 * factor * g["w"], rtol=1e-6)

  # Decoupled weight decay: p <- p - lr (adam + wd p), as flax.optim.Adam.
  opt = losses.get_optimizer(lr=0.1, warmup=0, weight_decay=0.01, grad_clip=-1.0)
  updates, _ = opt.update(g, opt.init(p), p)
  np.testing.assert_allclose(updates["w"], -0.1 * (adam_direction + 0.01 * p["w"]), rtol=1e-5)


# --- train state and steps ------------------------------------------------------------------------------


def _quadratic_loss(key, params, batch):
  """A deterministic loss whose gradient is known: mean over the batch of |w - x|^2 / 2."""
  del key
  per_example = 0.5 * jnp.sum((params["w"][None] - batch) ** 2, axis=1)
  return jnp.mean(per_example), {"per_example": per_example}


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_update(warmup):
  """ema_n = d_n ema_{n-1} + (1 - d_n) params_n from ema_0 = params_0, with d_n = rate, or
  min(rate, (1 + n) / (10 + n)) under warm-up (n = 1 for the first update)."""
  rate, lr = 0.9, 0.5
  params = {"w": jnp.array([1.0, -1.0])}
  batch = jnp.array([[0.0, 0.0], [2.0, 2.0]])  # Gradient w - (1, 1).
  state = losses.init_train_state(params, optax.sgd(lr))
  step = jax.jit(losses.get_step_fn(_quadratic_loss, optax.sgd(lr), train=True, ema_rate=rate, ema_warmup=warmup))
  w, ema = np.array([1.0, -1.0]), np.array([1.0, -1.0])
  for n in range(1, 5):
    state, metrics = step(jax.random.key(0), state, batch)
    grad = w - 1.0
    w = w - lr * grad
    d = min(rate, (1 + n) / (10 + n)) if warmup else rate
    ema = d * ema + (1 - d) * w
    assert int(state.step) == n
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(grad), rtol=1e-6)


class GaussianScoreModel:
  """A linear score model that contains the true score of N(mu, diag(l)):
  s(x, t) = -(x - alpha_t m) / (alpha_t^2 exp(log_l) + sigma_t^2), params {m, log_l} of shape (D,)."""

  def __init__(self, sde):
    self.sde = sde

  def build(self, params, key, train):
    del key, train

    def score_fn(x, t):
      alpha, sigma = self.sde.alpha_sigma(t)
      var = alpha[:, None] ** 2 * jnp.exp(params["log_l"])[None] + sigma[:, None] ** 2
      return -(x - alpha[:, None] * params["m"][None]) / var

    return score_fn


TRUE_PARAMS = {"m": jnp.array([1.0, -0.5]), "log_l": jnp.log(jnp.array([0.5, 0.1]))}
INIT_PARAMS = {"m": jnp.zeros(2), "log_l": jnp.zeros(2)}


@functools.partial(jax.jit, static_argnums=1)
def gaussian_data(key, n):
  return TRUE_PARAMS["m"] + jnp.sqrt(jnp.exp(TRUE_PARAMS["log_l"])) * jax.random.normal(key, (n, 2))


@pytest.mark.slow
def test_jitted_steps_equal_single_steps_and_eval_leaves_state():
  """n_jitted_steps=k scans exactly the k single steps (same fold_in keys); eval uses ema_params,
  changes nothing, and its key is fold_in(base_key, step)."""
  sde = sde_lib.VPSDE()
  model = GaussianScoreModel(sde)
  loss_fn = losses.get_sde_loss_fn(sde, model.build, train=True)
  opt = losses.get_optimizer(lr=1e-2, warmup=2)
  k, base = 3, jax.random.key(7)
  batches = gaussian_data(jax.random.key(8), k * 64).reshape(k, 64, 2)
  state0 = losses.init_train_state(INIT_PARAMS, opt)

  single = jax.jit(losses.get_step_fn(loss_fn, opt, train=True, ema_warmup=True))
  state, single_losses = state0, []
  for j in range(k):
    state, metrics = single(base, state, batches[j])
    single_losses.append(metrics["loss"])
  scanned = jax.jit(losses.get_step_fn(loss_fn, opt, train=True, ema_warmup=True, n_jitted_steps=k))
  state_scan, metrics_scan = scanned(base, state0, batches)
  assert metrics_scan["loss"].shape == (k,)
  np.testing.assert_allclose(metrics_scan["loss"], single_losses, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, state, state_scan)
  assert int(state_scan.step) == k
  assert not np.allclose(state.params["m"], state0.params["m"])  # The steps did something.

  # Training step n draws its noise from fold_in(base, n).
  jit_loss = jax.jit(loss_fn)
  np.testing.assert_allclose(single_losses[0], jit_loss(jax.random.fold_in(base, 0), INIT_PARAMS, batches[0])[0],
                             rtol=1e-6)

  # Eval: the loss of ema_params (made different from params here) under fold_in(base, step).
  state = state.replace(ema_params=jax.tree.map(lambda a: a + 0.3, state.params))
  eval_step = jax.jit(losses.get_step_fn(losses.get_sde_loss_fn(sde, model.build, train=False), opt, train=False))
  new_state, metrics = eval_step(base, state, batches[0])
  jax.tree.map(np.testing.assert_array_equal, new_state, state)
  np.testing.assert_allclose(metrics["loss"], jit_loss(jax.random.fold_in(base, k), state.ema_params, batches[0])[0],
                             rtol=1e-5)


def test_training_reaches_the_true_score():
  """Adam on the continuous VP loss drives a linear Gaussian score model to the true parameters:
  the excess loss over the true score (same key, same batch) falls by orders of magnitude."""
  sde = sde_lib.VPSDE()
  model = GaussianScoreModel(sde)
  loss_fn = losses.get_sde_loss_fn(sde, model.build, train=True)
  opt = losses.get_optimizer(lr=3e-2, warmup=20)
  n_steps, per_call = 400, 100
  step = jax.jit(losses.get_step_fn(loss_fn, opt, train=True, ema_rate=0.9, n_jitted_steps=per_call))
  state = losses.init_train_state(INIT_PARAMS, opt)
  eval_batch = gaussian_data(jax.random.key(9), 8192)

  @jax.jit
  def excess(params):
    key = jax.random.key(10)
    return loss_fn(key, params, eval_batch)[0] - loss_fn(key, TRUE_PARAMS, eval_batch)[0]

  start = excess(state.ema_params)
  for c in range(n_steps // per_call):
    data = gaussian_data(jax.random.fold_in(jax.random.key(11), c), per_call * 256).reshape(per_call, 256, 2)
    state, metrics = step(jax.random.key(12), state, data)
    assert np.all(np.isfinite(metrics["loss"]))
  assert int(state.step) == n_steps
  assert excess(state.ema_params) < 1e-2 * start, (start, excess(state.ema_params), state.ema_params)
  np.testing.assert_allclose(state.ema_params["m"], TRUE_PARAMS["m"], atol=0.05)
  np.testing.assert_allclose(state.ema_params["log_l"], TRUE_PARAMS["log_l"], atol=0.1)


# --- bad arguments ------------------------------------------------------------------------------------


def _build(params, key, train):
  return lambda x, t: x


@pytest.mark.parametrize("make, match", [
    (lambda: losses.get_sde_loss_fn(sde_lib.VPSDE(), _build, train=True, importance_weighting=True),
     "likelihood_weighting=True"),
    (lambda: losses.get_sde_loss_fn(sde_lib.VPSDE(), _build, train=True, eps=0.0), r"eps must lie in \(0, T"),
    (lambda: losses.get_sde_loss_fn(sde_lib.VPSDE(), _build, train=True, continuous=False,
                                    likelihood_weighting=True), "continuous=True"),
    (lambda: losses.get_loss_fn(sde_lib.SubVPSDE(), _build, train=True, continuous=False),
     r"VPSDE \(DDPM.*VESDE \(SMLD"),
    (lambda: losses.get_loss_fn(sde_lib.VPSDE(), _build, train=True, continuous=False, likelihood_weighting=True),
     "continuous=True"),
    (lambda: losses.get_ddpm_loss_fn(sde_lib.VESDE(), _build, train=True), r"VPSDE \(DDPM"),
    (lambda: losses.get_smld_loss_fn(sde_lib.SubVPSDE(), _build, train=True), r"VESDE \(SMLD"),
    (lambda: losses.get_ddpm_loss_fn(sde_lib.VPSDE(N=1), _build, train=True), "N >= 2"),
    (lambda: losses.get_optimizer(optimizer="sgd"), r"valid choices: \('adam',\)"),
    (lambda: losses.get_optimizer(grad_clip=0.0), "negative"),
    (lambda: losses.get_optimizer(warmup=-1), "non-negative"),
    (lambda: losses.get_optimizer(weight_decay=-0.1), ">= 0"),
    (lambda: losses.get_step_fn(_quadratic_loss, optax.sgd(0.1), train=True, ema_rate=1.5), r"\[0, 1\]"),
    (lambda: losses.get_step_fn(_quadratic_loss, optax.sgd(0.1), train=True, n_jitted_steps=0), "positive integer"),
])
def test_bad_arguments_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_scanned_step_rejects_batch_without_step_axis():
  opt = optax.sgd(0.1)
  step = losses.get_step_fn(_quadratic_loss, opt, train=True, n_jitted_steps=2)
  state = losses.init_train_state({"w": jnp.zeros(2)}, opt)
  with pytest.raises(ValueError, match="leading axis of that size"):
    step(jax.random.key(0), state, jnp.zeros((3, 2)))


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from score_sde import losses, sde as sde_lib
from tests.test_losses import GaussianScoreModel, INIT_PARAMS, gaussian_data
assert jax.device_count() == 4, jax.devices()
sde = sde_lib.VPSDE()
loss_fn = losses.get_sde_loss_fn(sde, GaussianScoreModel(sde).build, train=True,
                                 likelihood_weighting=True, importance_weighting=True)
opt = losses.get_optimizer(lr=1e-2, warmup=0)
step = jax.jit(losses.get_step_fn(loss_fn, opt, train=True, n_jitted_steps=2), donate_argnums=1)
batch = gaussian_data(jax.random.key(0), 2 * 64).reshape(2, 64, 2)
mesh = Mesh(np.asarray(jax.devices()), ("data",))
sharded = jax.device_put(batch, NamedSharding(mesh, P(None, "data")))
replicated = NamedSharding(mesh, P())
# Donation deletes the buffers handed in, so each run gets its own copy of the parameters.
init = lambda: jax.device_put(losses.init_train_state(jax.tree.map(jnp.copy, INIT_PARAMS), opt), replicated)
state_1, metrics_1 = step(jax.random.key(1), init(), jax.device_put(batch, replicated))
donated = init()
state_4, metrics_4 = step(jax.random.key(1), donated, sharded)
assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated.params)), "the state was not donated"
np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-5)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state_4, state_1)
print("OK")
"""


@pytest.mark.slow
def test_step_runs_unchanged_on_a_sharded_batch():
  """The train step, jitted with the state donated (params and EMA do not share buffers), gives the
  same result when its batch is sharded over 4 (fake CPU) devices: the library names no device axis."""
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(root))
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
