"""Fast samplers on closed-form Gaussian mixtures: error against NFE for every solver and SDE.

    python experiments/bench_fast.py                       # 2-D and 64-D, NFE 5 6 8 10 15 20 50
    python experiments/bench_fast.py --dims 2 --batch 500  # quicker

For each mixture (``GaussianMixture.random(seed=D, dim=D)``, as the ODE sampler's tests) and each
SDE (VP, subVP, VE with the defaults of ``score_sde.sde``), a batch of latents z ~ p_T is decoded
to t = eps = 1e-3 by an accurate reference, the probability-flow ODE solved in float64 with Dopri8
at rtol = atol = 1e-8 (the ``ode`` method), and by every fixed-budget sampler from the same z with
exactly NFE score evaluations. Two errors per sampler and NFE:

* ``dist``: the mean Euclidean distance |x - x_ref| of each sample to the exact ODE solution from
  the same latent;
* ``gap``: the cross-entropy gap, mean -log p_0(x) of the generated samples minus that of the
  exact ODE solutions (which are exact samples of p_eps), in nats; the pairing by latent makes it
  precise. 0 is perfect; a sampler that blurs or sharpens the modes moves it either way, so the
  comparison is by |gap|.

The bar is DPM-Solver++(2M) on the log-SNR grid at 10 NFE; the summary gives, for each mixture and
SDE, the 10-NFE deterministic sampler with the lowest distance and every sampler that beats the
bar on both measures (lower distance and lower |gap|). (The SDE variant is listed for completeness: it samples the right marginals but not the
ODE's map from z, so its distance is not a solver error.)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import analytic, sampling
from score_sde import sde as sde_lib

EPS = 1e-3
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE()}
BAR = "dpm++ 2M logsnr"
# label: (method, options). Defaults of each method are its authors' (see the method's builder).
SAMPLERS = {
    "ddim quadratic": ("euler", {}),
    "heun karras": ("heun", {}),
    "dpm-solver-2 logsnr": ("dpm_solver", {"order": 2}),
    "dpm-solver-3 logsnr": ("dpm_solver", {"order": 3}),
    BAR: ("dpm_solver++", {"order": 2}),
    "dpm++ 3M logsnr": ("dpm_solver++", {"order": 3}),
    "dpm++ 3M karras": ("dpm_solver++", {"order": 3, "time_grid": "karras"}),
    "unipc-2 bh1 logsnr": ("unipc", {"order": 2}),
    "unipc-2 bh2 logsnr": ("unipc", {"order": 2, "variant": "bh2"}),
    "unipc-2 bh2 trap logsnr": ("unipc", {"order": 2, "variant": "bh2", "corrector": "trapezoid"}),
    "unipc-3 bh1 logsnr": ("unipc", {"order": 3}),
    "unipc-3 bh2 logsnr": ("unipc", {"order": 3, "variant": "bh2"}),
    "unipc-3 bh2 karras": ("unipc", {"order": 3, "variant": "bh2", "time_grid": "karras"}),
    "dpm++ 2M SDE logsnr": ("dpm_solver++", {"order": 2, "eta": 1.0}),
}
STOCHASTIC = ("dpm++ 2M SDE logsnr",)


def reference(sde, gm, z):
  """Exact PF-ODE solutions at EPS from the latents z (float64 Dopri8, tolerances 1e-8)."""
  with jax.enable_x64(True):
    solver = sampling.get_sampler(sde, z.shape, method="ode", rtol=1e-8, atol=1e-8, eps=EPS,
                                  solver="dopri8", max_steps=50000)
    x, nfe = solver(None, gm.score_fn(sde), z=jnp.asarray(z, jnp.float64))
    return np.asarray(x, np.float64), int(nfe)


def run_sampler(sde, gm, z, method, options, nfes, key):
  """Samples from z at every budget, compiled as one program; checks each returned NFE."""
  samplers = [sampling.get_sampler(sde, z.shape, method=method, nfe=n, eps=EPS, **options) for n in nfes]
  run = jax.jit(lambda score_fn, z, key: [s(key, score_fn, z=z) for s in samplers])
  out = run(gm.score_fn(sde), z, key)
  for n, (_, used) in zip(nfes, out):
    assert int(used) == n, (method, options, n, int(used))
  return [np.asarray(x, np.float64) for x, _ in out]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dims", default="2,64")
  parser.add_argument("--nfes", default="5,6,8,10,15,20,50")
  parser.add_argument("--batch", type=int, default=1000)
  args = parser.parse_args()
  dims = [int(d) for d in args.dims.split(",")]
  nfes = [int(n) for n in args.nfes.split(",")]
  summary = []
  for dim in dims:
    gm = analytic.GaussianMixture.random(seed=dim, dim=dim)
    nll = jax.jit(lambda x: -gm.log_prob(jnp.asarray(x, jnp.float32)))
    for name, sde in SDES.items():
      t0 = time.time()
      z = sde.prior_sampling(jax.random.key(dim), (args.batch, dim))
      ref, ref_nfe = reference(sde, gm, z)
      ref_nll = float(np.mean(nll(ref)))
      rows = {}
      for label, (method, options) in SAMPLERS.items():
        xs = run_sampler(sde, gm, z, method, options, nfes, jax.random.key(0))
        rows[label] = [(float(np.mean(np.linalg.norm(x - ref, axis=1))), float(np.mean(nll(x))) - ref_nll)
                       for x in xs]
      print(f"\n## D={dim}, {name.upper()} (batch {args.batch}; reference: {ref_nfe} NFE, mean -log p0 "
            f"{ref_nll:.4f} nats; {time.time() - t0:.0f} s)")
      for measure, index, fmt in (("dist", 0, "{:9.2e}"), ("gap", 1, "{:+9.1e}")):
        print(f"{measure:26s}" + "".join(f"{n:>10d}" for n in nfes))
        for label, values in rows.items():
          print(f"  {label:24s}" + "".join(" " + fmt.format(v[index]) for v in values))
      at10 = nfes.index(10) if 10 in nfes else None
      if at10 is not None:
        det = {k: v[at10] for k, v in rows.items() if k not in STOCHASTIC}
        bar = det[BAR]
        best = min(det, key=lambda k: det[k][0])
        winners = [k for k, (d, g) in det.items() if k != BAR and d < bar[0] and abs(g) < abs(bar[1])]
        summary.append(f"| {dim} | {name} | {bar[0]:.2e} / {bar[1]:+.1e} | {best}: {det[best][0]:.2e} / "
                       f"{det[best][1]:+.1e} | {', '.join(winners) or 'none'} |")
  if summary:
    print("\n## At 10 NFE: the bar, DPM-Solver++(2M) logsnr, against the framework's deterministic samplers")
    print("| D | SDE | bar dist / gap | lowest dist: dist / gap | better than the bar on both dist and abs(gap) |")
    print("|---|---|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
  main()
