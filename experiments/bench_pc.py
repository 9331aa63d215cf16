"""Predictor-corrector samplers on a Gaussian mixture: throughput, compile time, error versus NFE.

Run from the repository root (about 1.5-3 minutes on 2 shared CPU cores with the defaults):

    python -m experiments.bench_pc                       # 64-D mixture, VP SDE
    python -m experiments.bench_pc --dim 2 --n 3000 --sde ve

Table 1: throughput of the compiled sampler with the analytic score (compile time, run time,
score evaluations per second counted per sample, samples per second) for a few combinations and
batch sizes. Table 2: error against exact samples of p_0 for a range of num_steps: the energy
distance (next to its exact-vs-exact floor at the same n) and the mean log-density gap
E_gen[log p_0] - E_exact[log p_0] with its standard error (negative: too spread out; positive:
too concentrated); the last column is the seconds of the call, compile included. Every sampler
uses denoise=True, eps=1e-3 and snr=0.16.

Expected (64-D, VP, 2 shared CPU cores): ~6e5 score evaluations per second (per sample) at
batch 1024 and 1.3-3 s of compile time per sampler, depending on the load; the energy distance
reaches its exact-vs-exact floor (~6e-3 at n=1000) by 200 steps, while the log-density gap, a
sharper test, still shows the first-order bias there (about -4 for reverse diffusion, -1.5 for
Euler–Maruyama, +5.5 for ancestral sampling, each +-0.3) and shrinks roughly as 1/num_steps.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from score_sde import analytic
from score_sde import sde as sde_lib
from score_sde.sampling import pc
from tests import stats

SDES = {
    "vp": lambda: sde_lib.VPSDE(),
    "subvp": lambda: sde_lib.SubVPSDE(),
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0),
}
THROUGHPUT_COMBOS = [("reverse_diffusion", "langevin"), ("euler_maruyama", "none"),
                     ("ancestral_sampling", "ald")]
ERROR_COMBOS = [("euler_maruyama", "none"), ("reverse_diffusion", "none"), ("ancestral_sampling", "none"),
                ("reverse_diffusion", "langevin")]


def timed(sampler, score_fn, key):
  """(first-call seconds, second-call seconds, samples, nfe) of a sampler."""
  start = time.perf_counter()
  jax.block_until_ready(sampler(key, score_fn))
  first = time.perf_counter() - start
  start = time.perf_counter()
  x, nfe = jax.block_until_ready(sampler(jax.random.fold_in(key, 1), score_fn))
  return first, time.perf_counter() - start, x, int(nfe)


def throughput_table(sde, gm, batches: list[int], num_steps: int) -> None:
  score_fn = gm.score_fn(sde)
  print(f"\nThroughput: {gm.dim}-D mixture, analytic score, num_steps={num_steps}")
  print(f"{'predictor':>20} {'corrector':>9} {'batch':>6} {'nfe':>5} {'compile s':>9} {'run s':>7} "
        f"{'evals/s':>10} {'samples/s':>10}")
  for predictor, corrector in THROUGHPUT_COMBOS:
    for batch in batches:
      sampler = pc.get_pc_sampler(sde, (batch, gm.dim), predictor=predictor, corrector=corrector,
                                  num_steps=num_steps)
      first, run, _, nfe = timed(sampler, score_fn, jax.random.key(0))
      print(f"{predictor:>20} {corrector:>9} {batch:>6} {nfe:>5} {first - run:>9.2f} {run:>7.3f} "
            f"{nfe * batch / run:>10.3g} {batch / run:>10.3g}")


def error_table(sde, gm, n: int, steps: list[int]) -> None:
  score_fn = gm.score_fn(sde)
  exact = gm.sample(jax.random.key(1), n)
  floor = np.mean([float(stats.energy_distance(gm.sample(jax.random.key(10 + i), n),
                                               gm.sample(jax.random.key(20 + i), n))) for i in range(5)])
  print(f"\nError versus NFE: {gm.dim}-D mixture, n={n}; exact-vs-exact energy distance {floor:.2e} "
        "(mean of 5)")
  print(f"{'predictor':>20} {'corrector':>9} {'steps':>5} {'nfe':>5} {'energy dist':>11} {'logp gap':>9} "
        f"{'+-se':>6} {'s':>6}")
  for predictor, corrector in ERROR_COMBOS:
    for num_steps in steps:
      sampler = pc.get_pc_sampler(sde, (n, gm.dim), predictor=predictor, corrector=corrector,
                                  num_steps=num_steps)
      start = time.perf_counter()
      x, nfe = jax.block_until_ready(sampler(jax.random.key(2), score_fn))
      seconds = time.perf_counter() - start
      gap, se = stats.mean_logp_gap(gm.log_prob, x, exact)
      print(f"{predictor:>20} {corrector:>9} {num_steps:>5} {int(nfe):>5} "
            f"{float(stats.energy_distance(x, exact)):>11.2e} {gap:>9.3f} {se:>6.3f} {seconds:>6.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sde", choices=sorted(SDES), default="vp")
  parser.add_argument("--dim", type=int, default=64, help="dimension of the mixture")
  parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="throughput batch sizes")
  parser.add_argument("--throughput-steps", type=int, default=200)
  parser.add_argument("--n", type=int, default=1000, help="samples per error measurement")
  parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 200, 500, 1000])
  parser.add_argument("--skip-throughput", action="store_true")
  args = parser.parse_args()

  sde = SDES[args.sde]()
  gm = analytic.GaussianMixture.random(seed=0, dim=args.dim)
  print(f"{sde!r} on {jax.devices()[0].platform}; mixture: 4 components, per-axis std 0.05-0.5")
  jax.block_until_ready(jax.jit(lambda v: v + 1)(1.0))  # Backend start-up is not a compile time.
  if not args.skip_throughput:
    throughput_table(sde, gm, args.batches, args.throughput_steps)
  error_table(sde, gm, args.n, args.steps)


if __name__ == "__main__":
  main()
