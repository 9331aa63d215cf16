"""The fixed-budget samplers against closed-form Gaussian mixtures: convergence orders, exact NFE,
per-sample randomness, the stochastic variants' distributions, and option checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde import analytic, sampling
from score_sde.sampling import dpm_solver, noise_levels
from tests import stats
from tests import helpers

# The original's VE default sigma_max = 50: at T the VE view is then as close to pure noise as
# VP's (sigma~_T ~ 150), so a multistep method's first-order warm-up step is as harmless (see
# ORDER_CASES).
SDES = helpers.sdes(ve_sigma_max=50.0)
EPS = 1e-3
# A smooth 2-D mixture (per-axis std 0.25-0.5): the flow is smooth, so the step counts below are
# in the asymptotic regime of every solver.
GM = analytic.GaussianMixture.create([0.3, 0.7], [[-0.6, 0.2], [0.5, -0.3]], [[0.09, 0.16], [0.25, 0.06]])
B = 32


# Test programs are small and run once: compile them without XLA's expensive passes.
FAST_COMPILE = helpers.FAST_COMPILE


@functools.lru_cache(maxsize=None)
def reference(name):
  """Latents z (B, 2) at T and the PF-ODE solution from them at EPS, (B, 2) float64.

  Dopri8 at rtol = atol = 1e-8 on a float64 state (the mixture's score is float32, so the
  reference is good to ~1e-7).
  """
  sde = SDES[name]
  z = sde.prior_sampling(jax.random.key(1), (B, 2))
  with jax.enable_x64(True):
    solver = sampling.get_sampler(sde, (B, 2), method="ode", rtol=1e-8, atol=1e-8, eps=EPS,
                                  solver="dopri8", max_steps=20000)
    solve = jax.jit(lambda score_fn, z: solver(None, score_fn, z=z)[0], compiler_options=FAST_COMPILE)
    x = solve(GM.score_fn(sde), jnp.asarray(z, jnp.float64))
  return z, np.asarray(x, np.float64)


def errors(name, method, budgets, **options):
  """RMS over samples of |x - x_ref| at EPS from the reference's latents, for each budget.

  The samplers of all budgets run in one program (one compilation); each returns its budget.
  """
  sde = SDES[name]
  z, ref = reference(name)
  samplers = [sampling.get_sampler(sde, (B, 2), method=method, nfe=n, time_grid="logsnr", eps=EPS, **options)
              for n in budgets]
  run = jax.jit(lambda score_fn, z: [s(None, score_fn, z=z) for s in samplers], compiler_options=FAST_COMPILE)
  out = []
  for n, (x, used) in zip(budgets, run(GM.score_fn(sde), z)):
    assert int(used) == n
    out.append(float(np.sqrt(np.mean(np.sum((np.asarray(x, np.float64) - ref) ** 2, axis=1)))))
  return np.array(out)


# Rounding floor of these measurements: float32 solvers differ from their float64 runs by ~3e-7
# here, and the reference is good to ~1e-7; every error used in a fit must be 10x above 1e-6.
FLOOR = 1e-6

# (method, options, budgets n, 2n, 4n (twice and four times the steps, so h, h/2, h/4 on the
# log-SNR grid), and the interval the fitted order must lie in). A method of order p has error
# C h^p (1 + O(h)), so the least-squares slope of log e against log n must round to p: it lies
# within 1/2 of p.
# * dpm_solver order 3: budgets = 2 (mod 3), whose step orders are [3, ..., 3, 2] (a budget
#   = 0 or 1 mod 3 ends with a first-order step, which caps the global order at 2).
# * Multistep methods start with lower-order steps (nothing to extrapolate from yet): the first
#   step of dpm_solver++ 3M has local error O(h^2) and that of unipc-3 O(h^3), so strictly their
#   orders are 2 and 3, but those terms carry the denoiser's lambda-derivative at T, which is
#   ~ 1 / sigma~_T^2 small. 3M must show its order 3 (within 1/2); unipc-3 must lie between its
#   guaranteed 3 and nominal 4 (its corrector raises UniP-p to order p + 1). UniPC's default
#   lower_order_final makes every run's last step first order (the authors' rule), which caps the
#   global order at 2; the order tests turn it off.
# * unipc-2 with the trapezoidal corrector keeps order 2, but its leading error term starts out
#   small (its error is 3-5x below 2M's), so it reaches the asymptotic slope only from ~64 steps.
ORDER_CASES = [
    ("euler", {}, (16, 32, 64), (0.5, 1.5)),
    ("heun", {}, (32, 64, 128), (1.5, 2.5)),
    ("dpm_solver", {"order": 2}, (16, 32, 64), (1.5, 2.5)),
    ("dpm_solver", {"order": 2, "solver_type": "midpoint"}, (16, 32, 64), (1.5, 2.5)),
    ("dpm_solver", {"order": 3}, (29, 59, 119), (2.5, 3.5)),
    ("dpm_solver++", {"order": 2}, (16, 32, 64), (1.5, 2.5)),
    ("dpm_solver++", {"order": 3}, (16, 32, 64), (2.5, 3.5)),
    ("unipc", {"order": 1, "lower_order_final": False}, (16, 32, 64), (1.5, 2.5)),
    ("unipc", {"order": 2, "lower_order_final": False}, (16, 32, 64), (2.5, 3.5)),
    ("unipc", {"order": 3, "lower_order_final": False}, (12, 24, 48), (2.5, 4.5)),
    ("unipc", {"order": 2, "variant": "bh2", "corrector": "trapezoid", "lower_order_final": False},
     (64, 128, 256), (1.5, 2.5)),
]


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("method,options,budgets,bounds", ORDER_CASES,
                         ids=[f"{m}-{o.get('order', '')}{o.get('corrector', '')}{o.get('solver_type', '')}"
                              for m, o, _, _ in ORDER_CASES])
@pytest.mark.slow
def test_each_solver_converges_with_its_order(name, method, options, budgets, bounds):
  errors_ = errors(name, method, budgets, **options)
  measured = -np.polyfit(np.log(budgets), np.log(errors_), 1)[0]
  assert bounds[0] < measured < bounds[1], (errors_, measured)
  assert errors_.min() > 10 * FLOOR, errors_


def test_dpm_solver_1_is_ddim():
  np.testing.assert_allclose(errors("vp", "dpm_solver", (16,), order=1), errors("vp", "euler", (16,)), rtol=1e-4)


def gaussian_score(sde, calls):
  """The score of p_0 = N(0, I) under ``sde``, -x / (alpha^2 + sigma^2), counting its runtime calls."""
  def score_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    alpha, sigma = sde.alpha_sigma(t)
    return -x / (alpha**2 + sigma**2)[:, None]
  return score_fn


def test_dpm_solver_midpoint_is_the_papers_dpm_solver_2():
  # Lu et al. (2022), Alg. 1 in x on the log-SNR grid, with s1 halfway in lambda (float64 throughout):
  # u = (alpha_s1 / alpha_s) x - sigma_s1 (e^{h/2} - 1) epsilon(x, s),
  # x_t = (alpha_t / alpha_s) x - sigma_t (e^h - 1) epsilon(u, s1).
  sde, steps = SDES["vp"], 3
  z = np.asarray(sde.prior_sampling(jax.random.key(1), (B, 2)), np.float64)
  score_fn = gaussian_score(sde, [])  # float64 under x64, unlike the mixture's.
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, "logsnr", steps, EPS))
  with jax.enable_x64(True):
    noise = lambda x, t, sigma: -sigma * np.asarray(score_fn(jnp.asarray(x), jnp.full((B,), t)))
    x = z
    for i in range(steps):
      h = lv.lam[i + 1] - lv.lam[i]
      mid = noise_levels.levels(sde, noise_levels.times_of_lambda(sde, [lv.lam[i] + h / 2], EPS, sde.T))
      u = mid.alpha[0] / lv.alpha[i] * x - mid.sigma[0] * np.expm1(h / 2) * noise(x, lv.t[i], lv.sigma[i])
      x = lv.alpha[i + 1] / lv.alpha[i] * x - lv.sigma[i + 1] * np.expm1(h) * noise(u, mid.t[0], mid.sigma[0])
    run = lambda **o: np.asarray(sampling.get_sampler(sde, (B, 2), method="dpm_solver", time_grid="logsnr",
                                                      eps=EPS, **o)(None, score_fn, z=jnp.asarray(z))[0])
    np.testing.assert_allclose(run(nfe=2 * steps, order=2, solver_type="midpoint"), x, rtol=1e-9, atol=1e-9)
    assert np.max(np.abs(run(nfe=2 * steps, order=2) - x)) > 1e-3  # taylor: another second-order step.
    # The option changes the order-2 steps only: [3, 3, 1] is the same for both, [3, 3, 2] is not.
    np.testing.assert_array_equal(run(nfe=7, order=3, solver_type="midpoint"), run(nfe=7, order=3))
    assert np.max(np.abs(run(nfe=8, order=3, solver_type="midpoint") - run(nfe=8, order=3))) > 1e-4


def test_heun_with_denoise_is_edms_deterministic_sampler():
  # Karras et al. (2022), Alg. 1 in the VE view: N levels sigma~(T) ... sigma~(eps), then 0, so N - 1 Heun steps
  # and an Euler step to 0 (= the denoiser): 2N - 1 evaluations. heun's default (no denoise) ends at eps instead.
  sde, levels_n = SDES["vp"], 6
  z = np.asarray(sde.prior_sampling(jax.random.key(1), (B, 2)), np.float64)
  score_fn = gaussian_score(sde, [])  # float64 under x64, unlike the mixture's.
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, "karras", levels_n - 1, EPS))
  sigma_tilde = lv.sigma_tilde
  with jax.enable_x64(True):
    denoise = lambda y, i: y + lv.sigma[i] ** 2 / lv.alpha[i] * np.asarray(
        score_fn(jnp.asarray(lv.alpha[i] * y), jnp.full((B,), lv.t[i])))
    y = z / lv.alpha[0]
    for i in range(levels_n - 1):
      d_cur = (y - denoise(y, i)) / sigma_tilde[i]
      y_next = y + (sigma_tilde[i + 1] - sigma_tilde[i]) * d_cur
      d_prime = (y_next - denoise(y_next, i + 1)) / sigma_tilde[i + 1]
      y = y + (sigma_tilde[i + 1] - sigma_tilde[i]) * (0.5 * d_cur + 0.5 * d_prime)
    x = denoise(y, levels_n - 1)
    run = lambda **o: np.asarray(sampling.get_sampler(sde, (B, 2), method="heun", nfe=2 * levels_n - 1, eps=EPS,
                                                      **o)(None, score_fn, z=jnp.asarray(z))[0])
    np.testing.assert_allclose(run(denoise=True), x, rtol=1e-9, atol=1e-9)
    assert np.max(np.abs(run() - x)) > 1e-2


def test_a_float64_state_keeps_float64_constants():
  # DDIM on p_0 = N(0, I) under VP, in float64 on the host: y += (sigma~_{i+1} - sigma~_i) sigma_i alpha_i y.
  sde = SDES["vp"]
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.key(0), (4, 2), jnp.float64)
    x = sampling.get_sampler(sde, (4, 2), method="euler", nfe=8, eps=EPS)(None, gaussian_score(sde, []), z=z)[0]
    assert x.dtype == jnp.float64
  lv = noise_levels.levels(sde, noise_levels.time_grid(sde, "quadratic", 8, EPS))
  y = np.asarray(z) / lv.alpha[0]
  for i in range(8):
    y = y + (lv.sigma_tilde[i + 1] - lv.sigma_tilde[i]) * lv.sigma[i] * lv.alpha[i] * y
  np.testing.assert_allclose(x, lv.alpha[-1] * y, rtol=1e-12)


def test_unipc_2_bh2_predictor_alone_is_dpm_solver_pp_2m():
  # UniP-2 with B(h) = e^{-h} - 1 and a = 1/2 has DPM-Solver++(2M)'s midpoint weights.
  sde = SDES["ve"]
  z, _ = reference("ve")
  options = dict(nfe=12, order=2, time_grid="logsnr", lower_order_final=False)
  unip = sampling.get_sampler(sde, (B, 2), method="unipc", variant="bh2", corrector="none", **options)
  dpmpp = sampling.get_sampler(sde, (B, 2), method="dpm_solver++", **options)
  np.testing.assert_allclose(unip(None, GM.score_fn(sde), z=z)[0], dpmpp(None, GM.score_fn(sde), z=z)[0],
                             rtol=1e-4, atol=1e-5)


NFE_CASES = [
    ("euler", dict(nfe=5)), ("euler", dict(nfe=6, denoise=True)),
    ("heun", dict(nfe=5)), ("heun", dict(nfe=6, denoise=True)), ("heun", dict(nfe=8, s_churn=5.0)),
    ("dpm_solver", dict(nfe=5, order=3)), ("dpm_solver", dict(nfe=6, order=3, denoise=True)),
    ("dpm_solver", dict(nfe=7, order=2)),
    ("dpm_solver++", dict(nfe=5, order=3)), ("dpm_solver++", dict(nfe=6, order=2, eta=1.0, denoise=True)),
    ("unipc", dict(nfe=1, order=1)), ("unipc", dict(nfe=5, order=3)), ("unipc", dict(nfe=6, order=2, denoise=True)),
    ("unipc", dict(nfe=7, order=2, corrector="trapezoid")), ("unipc", dict(nfe=4, order=3, corrector="none")),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,options", NFE_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(NFE_CASES)])
def test_nfe_is_exactly_the_budget(method, options):
  sde, calls = SDES["vp"], []
  sampler = sampling.get_sampler(sde, (4, 2), method=method, **options)
  x, nfe = sampler(jax.random.key(0), gaussian_score(sde, calls))
  jax.block_until_ready(x)
  assert int(nfe) == options["nfe"] == len(calls)
  assert x.shape == (4, 2) and bool(jnp.all(jnp.isfinite(x)))


STOCHASTIC = {
    "heun-churn": ("heun", dict(nfe=64, s_churn=10.0)),
    "dpm_solver++-2M-SDE": ("dpm_solver++", dict(nfe=50, order=2, eta=1.0)),
}


@pytest.mark.parametrize("case", sorted(STOCHASTIC))
def test_stochastic_solvers_follow_the_marginal_with_per_sample_noise(case):
  method, options = STOCHASTIC[case]
  sde, n = SDES["vp"], 512
  sampler = sampling.get_sampler(sde, (n, 2), method=method, **options)
  key = jax.random.key(4)
  x, _ = sampler(key, GM.score_fn(sde))
  threshold = stats.null_threshold(lambda k, m: GM.sample(k, m, EPS, sde), n)
  assert float(stats.energy_distance(x, GM.sample(jax.random.key(7), n, EPS, sde))) < threshold
  # Sample i draws its latent and noise from fold_in(key, first_index + i) alone.
  x3, _ = sampler(key, GM.score_fn(sde), first_index=3)
  np.testing.assert_allclose(x3[:n - 3], x[3:], rtol=1e-6, atol=1e-6)
  x_other, _ = sampler(jax.random.key(5), GM.score_fn(sde))
  assert not np.allclose(x_other, x)
  with pytest.raises(ValueError, match="key"):
    sampler(None, GM.score_fn(sde), z=x)


def test_time_grids_span_T_to_eps_and_are_what_they_say():
  sde = SDES["vp"]
  for name in noise_levels.TIME_GRIDS:
    t = noise_levels.time_grid(sde, name, 8, EPS)
    assert t[0] == sde.T and t[-1] == EPS and np.all(np.diff(t) < 0)
  lam = noise_levels.levels(sde, noise_levels.time_grid(sde, "logsnr", 8, EPS)).lam
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
  s = noise_levels.levels(sde, noise_levels.time_grid(sde, "karras", 8, EPS, rho=3.0)).sigma_tilde
  np.testing.assert_allclose(np.diff(s ** (1 / 3)), np.diff(s ** (1 / 3))[0], rtol=1e-9)
  np.testing.assert_allclose(np.diff(np.sqrt(noise_levels.time_grid(sde, "quadratic", 8, EPS))),
                             (np.sqrt(EPS) - 1) / 8, rtol=1e-9)
  # The inverse of lambda_t, on device and on the host, for every SDE.
  for sde in SDES.values():
    t = np.array([EPS, 0.1, 0.5, 1.0])
    lam = noise_levels.levels(sde, t).lam
    np.testing.assert_allclose(noise_levels.times_of_lambda(sde, lam, 0.0, 1.0), t, rtol=1e-9)
    np.testing.assert_allclose(noise_levels.t_of_lambda(sde, jnp.asarray(lam, jnp.float32)), t, rtol=1e-4)


@pytest.mark.parametrize("method,options,match", [
    ("rk4", dict(nfe=10), "valid choices"),
    ("unipc", dict(nfe=10, time_grid="cosine"), "valid choices"),
    ("dpm_solver", dict(nfe=2, order=3), "too small"),
    ("unipc", dict(nfe=3, order=3, denoise=True), "too small"),
    ("heun", dict(nfe=1), "too small"),
    ("dpm_solver++", dict(nfe=10, order=4), "valid choices"),
    ("heun", dict(nfe=10, order=1), "euler"),
    ("euler", dict(nfe=10, order=2), "valid choices"),
    ("unipc", dict(nfe=10, variant="bh3"), "valid choices"),
    ("unipc", dict(nfe=10, corrector="heun"), "valid choices"),
    ("dpm_solver++", dict(nfe=10, solver_type="heun"), "valid choices"),
    ("dpm_solver", dict(nfe=10, solver_type="dpmsolver"), "valid choices"),
    ("dpm_solver++", dict(nfe=10, eta=-1.0), "eta"),
    ("heun", dict(nfe=10, s_churn=-1.0), "s_churn"),
    ("euler", dict(nfe=2.5), "integer"),
    ("dpm_solver", dict(nfe=10, eps=0.0), "eps"),
    ("dpm_solver", dict(nfe=10, steps=4), "valid options"),
])
def test_bad_names_and_combinations_raise(method, options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler(SDES["vp"], (4, 2), method=method, **options)


def test_dpm_solver_fast_orders_spend_the_budget_exactly():
  for n in range(1, 20):
    for order in (1, 2, 3):
      orders = dpm_solver.step_orders(n, order)
      assert sum(orders) == n and max(orders) <= order and orders == sorted(orders, reverse=True)
