"""One device check: train steps, samplers, likelihood, compile times and memory on this machine's first device.

    python -m experiments.accelerator_check --out accelerator_check.json [--parts train,sample,likelihood,torch]
        [--networks ddpmpp,ncsnpp] [--variants float32,bfloat16,remat] [--port_dir /tmp/score_sde_pytorch]
    python -m experiments.accelerator_check --small      # tiny networks and batches: the CPU smoke run of the suite

Every part is optional (``--parts``); the table is printed part by part as the parts finish and written
as JSON (``--out``). With the default sizes it is meant for one GPU (or TPU core),
about 5-8 minutes on an H100, most of it compilation (a rerun loads the programs from
``--compilation_cache``). Parts:

* train: the training loop's step (``builders.build_step_fns``, state donated, one optimiser step per
  call) of DDPM++ cont. (vp/cifar10_ddpmpp_continuous) and NCSN++ cont. (ve/cifar10_ncsnpp_continuous)
  at the paper's batch per device (128), in float32, bfloat16 (``model.dtype``) and with ``model.remat``:
  compile seconds, milliseconds per step (median of ``--steps`` after one warm-up), examples per second,
  and XLA's planned memory (arguments + outputs + temporaries - donated).
* sample: the config's PC sampler (``num_scales`` steps) and UniPC with 10 evaluations, batch 128,
  on the network with its initial weights (the cost of a step does not depend on the weights).
* likelihood: bits/dim-style PF-ODE likelihood of a batch of 128 (the original's 1024 over 8 devices),
  Hutchinson divergence, rtol = atol = 1e-5, on device (``likelihood.get_likelihood_fn``) against the
  original's host-driven scipy RK45 loop (``experiments/bench_likelihood.py``), with the same score
  function and probes; wall seconds, NFE and the speed-up.
* torch: the PyTorch port's train step (``experiments/bench_torch_port.py``) on the same device, when torch
  with CUDA is importable and ``--port_dir`` holds the port (its CUDA ops build with ``nvcc``).

The last line gives the device's peak memory in use (``Device.memory_stats``, where the backend has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

from score_sde import xla_cpu

xla_cpu.configure()  # before JAX starts: XLA's own convolutions on a CPU, as main.py has them

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

from score_sde import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from score_sde import compilation_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
from score_sde import likelihood  # pylint: disable=g-import-not-at-top,wrong-import-position
from score_sde import memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from score_sde import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from score_sde.models import wrapper  # pylint: disable=g-import-not-at-top,wrong-import-position

NETWORKS = {"ddpmpp": "vp/cifar10_ddpmpp_continuous", "ncsnpp": "ve/cifar10_ncsnpp_continuous"}
VARIANTS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "remat": {"remat": True}}
PARTS = ("train", "sample", "likelihood", "torch")
# --small: 8x8 images, one level of 16 channels, batches of 2, 4 sampler steps, loose tolerances.
SMALL = {"image_size": 8, "nf": 16, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (), "batch": 2,
         "num_scales": 4, "discretization": "grid", "tol": 1e-2}
MIB = 2.0**20


@dataclasses.dataclass
class Row:
  """One line of the table."""

  part: str
  name: str
  setting: str
  batch: int
  compile_s: float | None = None
  ms: float | None = None            # per step (train, torch), per batch (sample, likelihood)
  per_s: float | None = None         # examples (train, torch) or samples (sample) per second
  nfe: int | None = None
  memory_mib: float | None = None
  note: str = ""


def _config(name: str, small: bool, **model) -> ml_collections.ConfigDict:
  config = importlib.import_module(f"configs.{NETWORKS[name].replace('/', '.')}").get_config()
  config.training.n_jitted_steps = 1
  if small:
    config.data.image_size = SMALL["image_size"]
    config.model.update({k: SMALL[k] for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions",
                                               "num_scales", "discretization")})
  config.model.update(model)
  return config


def _median_ms(run: Callable[[int], Any], steps: int) -> float:
  times = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run(i))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def train_rows(networks: list[str], variants: list[str], batch: int, steps: int, small: bool) -> list[Row]:
  rows = []
  mesh = parallel.make_mesh(jax.devices()[:1])
  for name in networks:
    for variant in variants:
      config = _config(name, small, **VARIANTS[variant])
      config.training.batch_size = batch
      try:
        builders.build_network(config)
      except ValueError as e:
        rows.append(Row("train", name, variant, batch, note=f"not available: {e}"))
        continue
      start = time.perf_counter()
      compiled = memory.lower_train_step(config, mesh, batch).compile()
      compile_s = time.perf_counter() - start
      stats = compiled.memory_analysis()
      planned = memory.StepMemory(variant, batch, stats.argument_size_in_bytes, stats.output_size_in_bytes,
                                  stats.temp_size_in_bytes, stats.alias_size_in_bytes).total
      sde, network = builders.build_sde(config), builders.build_network(config)
      init_state, _, _ = builders.build_step_fns(config, sde, network)
      state = jax.jit(init_state)(jax.random.key(0))
      shape = builders.example_shape(config)
      images = {"image": jax.random.uniform(jax.random.key(1), (batch, *shape)),
                "label": jnp.zeros((batch,), jnp.int32)}
      holder = {"state": state}

      def step(i, holder=holder, compiled=compiled, images=images):
        holder["state"], metrics = compiled(jax.random.key(i), holder["state"], images)
        return metrics

      step(0)
      ms = _median_ms(lambda i: step(i + 1), steps)
      rows.append(Row("train", name, variant, batch, compile_s, ms, 1e3 * batch / ms, memory_mib=planned / MIB))
  return rows


def _score_fn(config):
  sde, network = builders.build_sde(config), builders.build_network(config)
  variables = wrapper.init_model(jax.random.key(0), network, (1, *builders.example_shape(config)))
  return sde, wrapper.get_score_fn(sde, network, variables, continuous=config.training.continuous)


def sample_rows(networks: list[str], batch: int, small: bool) -> list[Row]:
  rows = []
  for name in networks:
    config = _config(name, small)
    sde, score_fn = _score_fn(config)
    shape = (batch, *builders.example_shape(config))
    for setting, overrides in (("pc", {}), ("unipc nfe=10", {"method": "unipc", "nfe": 10})):
      config.sampling.update({"method": "pc", **overrides})
      sampler = builders.build_sampler(config, sde, shape)
      run = jax.jit(lambda key, score_fn, sampler=sampler: sampler(key, score_fn))
      start = time.perf_counter()
      compiled = run.lower(jax.random.key(0), score_fn).compile()
      compile_s = time.perf_counter() - start
      _, nfe = jax.block_until_ready(compiled(jax.random.key(1), score_fn))
      ms = _median_ms(lambda i: compiled(jax.random.key(2 + i), score_fn), 1 if not small else 2)
      label = f"{setting} ({config.sampling.predictor}, {config.sampling.corrector})" if setting == "pc" else setting
      rows.append(Row("sample", name, label, batch, compile_s, ms, 1e3 * batch / ms, int(nfe)))
  return rows


def likelihood_rows(batch: int, small: bool) -> list[Row]:
  from experiments import bench_likelihood  # pylint: disable=import-outside-toplevel

  config = _config("ddpmpp", small)
  sde, score_fn = _score_fn(config)
  tol = SMALL["tol"] if small else 1e-5
  x = jax.random.uniform(jax.random.key(3), (batch, *builders.example_shape(config)), minval=-1.0, maxval=1.0)
  key, rows, walls = jax.random.key(4), [], {}
  methods = {"on device (tsit5)": likelihood.get_likelihood_fn(sde, "rademacher", tol, tol, 1e-5),
             "host scipy RK45 (original)": bench_likelihood.baseline_likelihood_fn(
                 sde, x.shape, "rademacher", {}, rtol=tol, atol=tol)}
  for setting, lik in methods.items():
    start = time.perf_counter()
    _, _, nfe = jax.block_until_ready(lik(key, score_fn, x))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(lik(key, score_fn, x))
    walls[setting] = time.perf_counter() - start
    rows.append(Row("likelihood", "ddpmpp", setting, batch, max(first - walls[setting], 0.0), 1e3 * walls[setting],
                    batch / walls[setting], int(nfe)))
  base = walls["host scipy RK45 (original)"]
  rows[0].note = f"{base / walls['on device (tsit5)']:.1f}x the host loop"
  return rows


_PORT_SNIPPET = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the port's configs and models come first; its CUDA ops build (nvcc) on import
from experiments import bench_torch_port
print(json.dumps(bench_torch_port.measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), device="cuda")))
"""


def torch_rows(networks: list[str], port_dir: str | None, batch: int, steps: int) -> list[Row]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return [Row("torch", "-", "-", batch, note="not run: torch is not installed")]
  if not torch.cuda.is_available():
    return [Row("torch", "-", "-", batch, note="not run: torch has no CUDA device here")]
  if not port_dir or not os.path.isfile(os.path.join(port_dir, "models", "ncsnpp.py")):
    return [Row("torch", "-", "-", batch, note="not run: --port_dir holds no checkout of score_sde_pytorch")]
  rows = []
  for name in networks:  # a process of its own: the port's ``configs`` package shadows ours
    proc = subprocess.run([sys.executable, "-c", _PORT_SNIPPET, os.path.abspath(port_dir),
                           NETWORKS[name].replace("/", "."), str(batch), str(steps)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      rows.append(Row("torch", name, "-", batch, note=f"failed: {proc.stderr.strip().splitlines()[-1:]}"))
      continue
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.append(Row("torch", name, "float32 +adam+ema", batch, ms=1e3 * result["full"][0],
                    per_s=batch / result["full"][0], note=f"fwd+bwd {1e3 * result['fwd_bwd'][0]:.1f} ms"))
  return rows


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _line(r: Row) -> str:
  return (f"{r.part:<11}{r.name:<8}{r.setting:<44}{r.batch:>6}{_fmt(r.compile_s, '.1f'):>10}{_fmt(r.ms, '.1f'):>11}"
          f"{_fmt(r.per_s, '.1f'):>10}{_fmt(r.nfe, 'd'):>6}{_fmt(r.memory_mib, '.0f'):>9}  {r.note}")


HEADER = (f"{'part':<11}{'network':<8}{'setting':<44}{'batch':>6}{'compile s':>10}{'ms':>11}{'per s':>10}"
          f"{'NFE':>6}{'MiB':>9}  note")


def run(parts: list[str], networks: list[str], variants: list[str], *, small: bool, steps: int,
        port_dir: str | None = None) -> dict[str, Any]:
  """Runs the selected parts; returns {"device", "rows", "peak_memory_mib", "seconds"}."""
  device = jax.devices()[0]
  batch = SMALL["batch"] if small else 128
  print(f"device: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}); parts: {','.join(parts)}"
        f"{'; --small sizes' if small else ''}\n{HEADER}", flush=True)
  start, rows = time.perf_counter(), []
  for part in parts:
    try:
      if part == "train":
        new = train_rows(networks, variants, batch, steps, small)
      elif part == "sample":
        new = sample_rows(networks, batch, small)
      elif part == "likelihood":
        new = likelihood_rows(batch, small)
      else:
        new = torch_rows(networks, port_dir, batch, steps)
    except Exception as e:  # pylint: disable=broad-except  (one failing part, e.g. out of memory, leaves the rest)
      traceback.print_exc()
      new = [Row(part, "-", "-", batch, note=f"failed: {type(e).__name__}: {e}"[:300])]
    for row in new:
      print(_line(row), flush=True)
    rows += new
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return {"device": f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()})",
          "rows": [dataclasses.asdict(r) for r in rows], "seconds": time.perf_counter() - start,
          "peak_memory_mib": None if peak is None else peak / MIB}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--networks", default=",".join(NETWORKS))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--steps", type=int, default=10, help="timed train steps after one warm-up")
  parser.add_argument("--small", action="store_true", help="tiny networks and batches (CPU smoke run)")
  parser.add_argument("--port_dir", default=None, help="a checkout of yang-song/score_sde_pytorch (torch part)")
  parser.add_argument("--out", default=None, help="write the table as JSON here")
  parser.add_argument("--compilation_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "score_sde",
                                                                  "accelerator_check"),
                      help="persistent compilation cache folder, or off")
  args = parser.parse_args(argv)
  for given, valid, what in ((args.networks, NETWORKS, "network"), (args.variants, VARIANTS, "variant"),
                             (args.parts, PARTS, "part")):
    unknown = set(given.split(",")) - set(valid)
    if unknown:
      parser.error(f"unknown {what}(s) {sorted(unknown)}; valid choices: {list(valid)}")
  compilation_cache.configure(args.compilation_cache)
  result = run(args.parts.split(","), args.networks.split(","), args.variants.split(","), small=args.small,
               steps=2 if args.small else args.steps, port_dir=args.port_dir)
  peak = result["peak_memory_mib"]
  print(f"device peak memory in use: {'-' if peak is None else f'{peak:.0f} MiB'}; {result['seconds']:.0f} s")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"table written to {args.out}")
  return result


if __name__ == "__main__":
  main()
