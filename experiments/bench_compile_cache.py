"""Time to the first step of a first and a second launch, with the persistent compilation cache.

    python -m experiments.bench_compile_cache [--configs toy/vp_8gaussians,vp/digits_unet_continuous,
                                              vp/cifar10_ddpmpp_continuous] [--rounds 1]

Each config trains one compiled call in a fresh process, twice, sharing a fresh cache folder
(``score_sde.compilation_cache.configure``, as ``main.py`` sets it): the first launch compiles
every program and writes it, the second loads them. Columns: the training loop's
``time_to_first_step`` (set-up, initialisation, tracing, compilation or loading, and the first
call), the same counted from the launch of the process (imports included), and the programs
compiled and loaded from the cache (``jax.monitoring`` events).

Image sets that need a download are read from ``tfds.testing.mock_data`` (random examples of the
set's shapes, read in the training process); a config's ``--batch`` and ``--n_jitted_steps``
overrides apply to the paper configs only, which are otherwise too large for a CPU (DDPM++ at batch
8, one step per call: on XLA's CPU backend a ``lax.scan`` of convolutional steps runs far slower, see
"Training throughput of the small configs").
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

PAPER = ("cifar10", "celeba", "lsun/bedroom", "lsun/church_outdoor")
DEFAULT_CONFIGS = "toy/vp_8gaussians,vp/digits_unet_continuous,vp/cifar10_ddpmpp_continuous"


def launch(name: str, cache: str, workdir: str, launched: float, batch: int, n_jitted_steps: int) -> dict:
  """One launch (in this process): train one compiled call of config ``name``."""
  from score_sde import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.configure()
  import jax  # pylint: disable=import-outside-toplevel

  from score_sde import compilation_cache  # pylint: disable=import-outside-toplevel
  from score_sde import train  # pylint: disable=import-outside-toplevel

  compilation_cache.configure(cache)
  events = collections.Counter()
  jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event.rsplit("/", 1)[-1]]))
  config = importlib.import_module(f"configs.{name.replace('/', '.')}").get_config()
  t = config.training
  mock = config.data.dataset.lower() in PAPER
  if mock:
    t.batch_size, t.n_jitted_steps = batch, n_jitted_steps
    config.data.num_workers = 0  # mock data lives in this process
  t.n_iters = t.n_jitted_steps
  t.snapshot_sampling = t.final_evaluation = False
  called = time.time()
  if mock:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
      result = train.train(config, workdir)
  else:
    result = train.train(config, workdir)
  return {"first_step": result.time_to_first_step, "from_launch": called - launched + result.time_to_first_step,
          "compiled": events["cache_misses"], "loaded": events["cache_hits"], "batch": t.batch_size,
          "steps_per_call": t.n_jitted_steps}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=DEFAULT_CONFIGS)
  parser.add_argument("--batch", type=int, default=8, help="global batch of the paper configs")
  parser.add_argument("--n_jitted_steps", type=int, default=1, help="steps per call of the paper configs")
  parser.add_argument("--rounds", type=int, default=1, help="first + second launch pairs per config")
  parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # name cache workdir launched: one launch
  args = parser.parse_args()
  if args.one:
    name, cache, workdir, launched = args.one
    print(json.dumps(launch(name, cache, workdir, float(launched), args.batch, args.n_jitted_steps)))
    return
  print(f"cpu cores: {os.cpu_count()}; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'config':<30}{'batch':>9}{'launch':>8}{'first step s':>14}{'from launch s':>15}{'compiled':>10}"
        f"{'loaded':>8}{'speed-up':>10}", flush=True)
  for name in args.configs.split(","):
    for _ in range(args.rounds):
      with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i in (1, 2):
          proc = subprocess.run([sys.executable, "-m", "experiments.bench_compile_cache", "--batch", str(args.batch),
                                 "--n_jitted_steps", str(args.n_jitted_steps), "--one", name,
                                 os.path.join(tmp, "cache"), os.path.join(tmp, f"run{i}"), str(time.time())],
                                capture_output=True, text=True, check=False)
          if proc.returncode:
            raise RuntimeError(f"{name} launch {i} failed:\n{proc.stderr[-3000:]}")
          r = json.loads(proc.stdout.strip().splitlines()[-1])
          rows.append(r)
          speedup = f"{rows[0]['first_step'] / r['first_step']:.1f}x" if i == 2 else ""
          print(f"{name:<30}{str(r['steps_per_call']) + 'x' + str(r['batch']):>9}{i:>8}{r['first_step']:>14.1f}"
                f"{r['from_launch']:>15.1f}{r['compiled']:>10}{r['loaded']:>8}{speedup:>10}", flush=True)
  print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
