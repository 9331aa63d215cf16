"""The PyTorch port of the original: train-step time of DDPM++ cont. and NCSN++ cont. on this machine.

    git clone https://github.com/yang-song/score_sde_pytorch /tmp/score_sde_pytorch
    pip install torch ml_collections
    python -m experiments.bench_torch_port --port_dir /tmp/score_sde_pytorch [--steps 5] [--batch 8]

The reference for ``experiments.bench_models``, measured the same way on the same machine: the
port's own ``NCSNpp`` network built from its own configs (vp/cifar10_ddpmpp_continuous,
ve/cifar10_ncsnpp_continuous) in training mode, at batch 8, 32x32, with PyTorch's default threads
(one per core). Per row, the median (and range) of ``--steps`` timed steps after one warm-up step:

* fwd+bwd: the network on a batch, a mean-square loss, ``backward()`` (the quantity the port's
  published CPU timings measure).
* +adam+ema: the same followed by the port's optimiser step (Adam, gradient clipping at 1) and its
  EMA update (``models.ema.ExponentialMovingAverage``), i.e. what this framework's train step does.

The port's FIR up/down-sampling (NCSN++) builds a CUDA extension when ``op`` is imported; on a CPU
the port calls its pure-PyTorch ``upfirdn2d_native`` only, so the extension build is skipped here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import types

CONFIGS = {"vp.cifar10_ddpmpp_continuous": "DDPM++ cont.", "ve.cifar10_ncsnpp_continuous": "NCSN++ cont."}


def import_port(port_dir: str) -> None:
  """Makes the port importable on a CPU: its ``op`` package without the CUDA extension build."""
  import torch.utils.cpp_extension as cpp_extension  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, port_dir)
  build = cpp_extension.load
  cpp_extension.load = lambda *args, **kwargs: types.SimpleNamespace()
  try:
    importlib.import_module("op")
  finally:
    cpp_extension.load = build


def measure(name: str, batch: int, steps: int, device: str = "cpu") -> dict:
  """Times the port's network ``name`` (a config module under the port's ``configs``) on ``device``."""
  import torch  # pylint: disable=import-outside-toplevel

  ncsnpp = importlib.import_module("models.ncsnpp")
  ema_lib = importlib.import_module("models.ema")
  config = importlib.import_module(f"configs.{name}").get_config()
  config.device = torch.device(device)
  torch.manual_seed(0)
  model = ncsnpp.NCSNpp(config).to(config.device).train()
  ema = ema_lib.ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
  optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr, betas=(config.optim.beta1, 0.999),
                               eps=config.optim.eps, weight_decay=config.optim.weight_decay)
  x = torch.randn(batch, config.data.num_channels, config.data.image_size, config.data.image_size,
                  device=config.device)
  labels = torch.rand(batch, device=config.device) * 999.0
  synchronize = torch.cuda.synchronize if config.device.type == "cuda" else lambda: None

  def step(update: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = model(x, labels).square().mean()
    loss.backward()
    if update:
      torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=config.optim.grad_clip)
      optimizer.step()
      ema.update(model.parameters())

  row = {"name": CONFIGS.get(name, name), "params": sum(p.numel() for p in model.parameters()),
         "threads": torch.get_num_threads()}
  for key, update in (("fwd_bwd", False), ("full", True)):
    step(update)
    synchronize()
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      step(update)
      synchronize()
      times.append(time.perf_counter() - start)
    row[key] = (statistics.median(times), min(times), max(times))
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--port_dir", required=True, help="a checkout of yang-song/score_sde_pytorch")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.port_dir, "models", "ncsnpp.py")):
    raise SystemExit(f"{args.port_dir} is not a checkout of score_sde_pytorch (no models/ncsnpp.py); clone it "
                     f"with `git clone https://github.com/yang-song/score_sde_pytorch {args.port_dir}`.")
  import_port(args.port_dir)
  print(f"batch {args.batch}, {args.steps} timed steps after one warm-up; cpu cores: {os.cpu_count()}; "
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'network':14s} {'params':>11s} {'threads':>7s}  {'fwd+bwd s':>9s} {'(min-max)':>11s}  "
        f"{'+adam+ema s':>11s} {'(min-max)':>11s}")
  for name in args.configs.split(","):
    row = measure(name, args.batch, args.steps)
    (fb, fb_lo, fb_hi), (full, lo, hi) = row["fwd_bwd"], row["full"]
    print(f"{row['name']:14s} {row['params']:11,d} {row['threads']:7d}  {fb:9.2f} {fb_lo:5.2f}-{fb_hi:5.2f}  "
          f"{full:11.2f} {lo:5.2f}-{hi:5.2f}", flush=True)
  print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
