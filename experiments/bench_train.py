"""Training throughput: time to the first step and steps per second of the shipped small configs.

    python -m experiments.bench_train [--steps N] [--configs toy/vp_8gaussians,vp/digits_unet_continuous]

Each config trains from scratch in a fresh temporary workdir for ``--steps`` steps (default 2000
for the toy configs, 200 for digits; rounded to a multiple of its ``n_jitted_steps``), with its own batch size, ``n_jitted_steps`` and checkpoint,
eval and log frequencies, and without snapshot sampling. Columns: the global batch, optimiser
steps per compiled call, the seconds from the start of the loop's set-up to the end of the first
compiled call (data pipeline, initialisation and compilation of the train step included), steps
per second after it (logging, eval losses and checkpoints included), and examples per second.

Expected on the 2 CPU cores of the development machine: the toy MLP (batch 512) runs 120-160
steps/s after 5-10 s to the first step; the digits U-Net (batch 128) runs 4-6 steps/s after
30-80 s, most of it XLA compiling the U-Net's backward pass. Both move with the load of other jobs.
"""

from __future__ import annotations

import argparse
import importlib
import logging as py_logging
import tempfile

from score_sde import xla_cpu

xla_cpu.configure()  # before JAX starts: XLA's own convolutions on a CPU, as main.py has them

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from score_sde import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from score_sde import train  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_CONFIGS = {"toy/vp_8gaussians": 2000, "toy/ve_checkerboard": 2000, "vp/digits_unet_continuous": 200}


def bench(name: str, steps: int) -> dict:
  config = importlib.import_module(f"configs.{name.replace('/', '.')}").get_config()
  t = config.training
  k = t.n_jitted_steps
  t.n_iters = max(k, steps // k * k)
  t.snapshot_sampling = False
  builders.validate(config)
  with tempfile.TemporaryDirectory() as workdir:
    result = train.train(config, workdir)
  rate = result.steps_per_second
  return {"config": name, "batch": t.batch_size, "k": k, "first": result.time_to_first_step, "rate": rate,
          "examples": rate * t.batch_size if rate else float("nan")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=0, help="steps per config (0: the defaults above)")
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
  args = parser.parse_args()
  py_logging.getLogger("absl").setLevel(py_logging.WARNING)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
  print(f"{'config':<28} {'batch':>6} {'steps/call':>10} {'first step (s)':>15} {'steps/s':>9} {'examples/s':>11}")
  for name in args.configs.split(","):
    r = bench(name, args.steps or DEFAULT_CONFIGS.get(name, 1000))
    print(f"{r['config']:<28} {r['batch']:>6} {r['k']:>10} {r['first']:>15.1f} {r['rate']:>9.1f} "
          f"{r['examples']:>11.0f}", flush=True)


if __name__ == "__main__":
  main()
