"""The paper's networks: train-step time and memory of DDPM++ cont. and NCSN++ cont., by model option.

    python -m experiments.bench_models [--steps 5] [--batch 8] [--configs vp/cifar10_ddpmpp_continuous,...]
                                       [--variants default,remat,bf16]

A train step is ``builders.build_step_fns``'s ``train_fn`` under ``jax.jit`` with the state donated:
data scaling, the continuous DSM loss, forward and backward pass, gradient clipping, the Adam update
and the EMA. Each (config, variant) runs in a fresh subprocess, so its peak resident memory is its
own. Columns:

* compile s: ``jit(train_fn).lower(...).compile()``, tracing included.
* step s: median of ``--steps`` timed steps after one warm-up step (each waited for).
* fwd+bwd s: the network's forward and backward pass alone, the quantity of the PyTorch port's
  published timings and of ``experiments/bench_torch_port.py``: the gradient of the mean square of
  the network's output with respect to its parameters (training mode, dropout on), median of
  ``--steps`` after a warm-up.
* XLA MiB: the compiled program's own estimate of its memory, temporaries + arguments + outputs
  minus the donated (aliased) buffers, and temp MiB: the temporaries alone (activations kept for the
  backward pass, workspace).
* max RSS MiB: the process's peak resident memory (``resource.getrusage``) up to the end of the
  train steps: Python, XLA's compiler and the program together.

Variants: ``default`` (the paper's float32 networks), ``remat`` (``model.remat``: every residual and
attention block recomputed on the backward pass) and ``bf16`` (``model.dtype='bfloat16'``: bfloat16
compute, float32 parameters). For reference, the PyTorch port of the original takes about 3.1-3.6 s
(DDPM++ cont.) and 4.3-4.5 s (NCSN++ cont.) for forward + backward at batch 8 on two CPU cores.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {"vp/cifar10_ddpmpp_continuous": "DDPM++ cont.", "ve/cifar10_ncsnpp_continuous": "NCSN++ cont."}
VARIANTS = {"default": {}, "remat": {"remat": True}, "bf16": {"dtype": "bfloat16"}}
MIB = 2.0**20


def _timed(run, steps: int) -> tuple[float, float, float]:
  """(median, min, max) seconds of ``steps`` calls of ``run`` (which waits for its result)."""
  times = []
  for i in range(steps):
    start = time.perf_counter()
    run(i)
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)


def measure(name: str, variant: str, batch: int, steps: int) -> dict:
  """Compiles and times one train step of config ``name`` with the model options of ``variant``."""
  from score_sde import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.configure()  # before JAX starts: XLA's own convolutions on a CPU, as main.py has them
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from score_sde import builders, models  # pylint: disable=import-outside-toplevel
  from score_sde.models import wrapper  # pylint: disable=import-outside-toplevel

  config = importlib.import_module(f"configs.{name.replace('/', '.')}").get_config()
  config.training.batch_size, config.training.n_jitted_steps = batch, 1
  for key, value in VARIANTS[variant].items():
    config.model[key] = value
  sde, model = builders.build_sde(config), models.get_model(config)
  shape = builders.example_shape(config)
  init_state, train_fn, _ = builders.build_step_fns(config, sde, model, shape)
  state = jax.jit(init_state)(jax.random.key(0))
  images = {"image": jax.random.uniform(jax.random.key(1), (batch, *shape)), "label": jnp.zeros((batch,), jnp.int32)}
  step = jax.jit(train_fn, donate_argnums=1)
  # Compilation, timed apart from the steps.
  start = time.perf_counter()
  compiled = step.lower(jax.random.key(2), state, images).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # One warm-up step, then the timed ones, each waited for.
  state, metrics = compiled(jax.random.key(3), state, images)
  jax.block_until_ready(metrics)
  def train_step(i):
    nonlocal state, metrics
    state, metrics = compiled(jax.random.fold_in(jax.random.key(4), i), state, images)
    jax.block_until_ready(metrics)

  step_s, min_s, max_s = _timed(train_step, steps)
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before the second program
  # The network's forward + backward pass alone, as the port's timings.
  variables = wrapper.init_model(jax.random.key(5), model, (1, *shape))
  x, t = jax.random.normal(jax.random.key(6), (batch, *shape)), jnp.linspace(0.1, 0.9, batch)

  def mean_square(params):
    out = model.apply({**variables, "params": params}, x, t, train=True, rngs={"dropout": jax.random.key(7)})
    return jnp.mean(jnp.square(out))

  grad = jax.jit(jax.grad(mean_square)).lower(variables["params"]).compile()
  jax.block_until_ready(grad(variables["params"]))
  fwd_bwd_s = _timed(lambda i: jax.block_until_ready(grad(variables["params"])), steps)[0]
  loss = float(jnp.asarray(metrics["loss"]))
  xla = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes - \
      memory.alias_size_in_bytes
  return {"config": name, "variant": variant, "params": sum(x.size for x in jax.tree.leaves(state.params)),
          "compile_s": compile_s, "step_s": step_s, "min_s": min_s, "max_s": max_s, "fwd_bwd_s": fwd_bwd_s,
          "xla_mib": xla / MIB, "temp_mib": memory.temp_size_in_bytes / MIB,
          "rss_mib": rss_mib, "loss": loss,
          "device": f"{jax.device_count()} x {jax.devices()[0].platform}"}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # config:variant, run in this process
  args = parser.parse_args()
  if args.one:
    name, variant = args.one.split(":")
    print(json.dumps(measure(name, variant, args.batch, args.steps)))
    return
  print(f"batch {args.batch}, {args.steps} timed steps after one warm-up; cpu cores: {os.cpu_count()}; "
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'network':<14} {'variant':<8} {'params':>11} {'compile s':>10} {'step s':>7} {'(min-max)':>12} "
        f"{'fwd+bwd s':>9} {'XLA MiB':>8} {'temp MiB':>9} {'max RSS MiB':>12}", flush=True)
  for name in args.configs.split(","):
    for variant in args.variants.split(","):
      if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; valid choices: {sorted(VARIANTS)}.")
      run = subprocess.run([sys.executable, "-m", "experiments.bench_models", "--one", f"{name}:{variant}",
                            "--batch", str(args.batch), "--steps", str(args.steps)],
                           capture_output=True, text=True, check=False)
      if run.returncode:
        raise RuntimeError(f"{name} ({variant}) failed:\n{run.stderr[-3000:]}")
      r = json.loads(run.stdout.strip().splitlines()[-1])
      print(f"{CONFIGS.get(name, name):<14} {variant:<8} {r['params']:>11,} {r['compile_s']:>10.1f} "
            f"{r['step_s']:>7.2f} {r['min_s']:>5.2f}-{r['max_s']:<5.2f} {r['fwd_bwd_s']:>9.2f} {r['xla_mib']:>8.0f} {r['temp_mib']:>9.0f} "
            f"{r['rss_mib']:>12.0f}", flush=True)
  print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
