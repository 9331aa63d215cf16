"""3x3 convolutions on XLA's CPU backend: XLA's convolution against two matmul formulations.

    python -m experiments.bench_conv [--repeats 6]
    XLA_FLAGS=--xla_cpu_use_xnnpack=false python -m experiments.bench_conv     # compare backend options
    python -m experiments.bench_conv --passes                                  # XLA's default: YNNPACK
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
        python -m experiments.bench_conv --passes                              # XLA's own kernels

The paper networks' train step on CPU is dominated by 3x3 convolutions (experiments/README.md,
"Paper networks"). This times forward + backward of a stack of four SAME 3x3 convolutions with
SiLU (batch 8, 32x32, 128 channels: the first resolution of DDPM++ cont.) written three ways, in
one process, alternating, so the ratios hold under any load:

* ``xla``: ``lax.conv_general_dilated`` (what flax's ``nn.Conv`` lowers to);
* ``im2col``: the nine shifted copies concatenated along channels, one (B HW, 9C) x (9C, C) matmul;
* ``shifted``: nine (B HW, C) x (C, C) matmuls of the shifted inputs, summed.

Printed: the minimum time of ``--repeats`` runs of each and the largest gradient difference from
``xla`` (all three compute the same function). Where PyTorch is installed, a ``torch`` row times the
same stack with ``torch.nn.functional.conv2d`` (NCHW, oneDNN) as a reference for this machine.

``--passes`` times instead the three passes of one SAME 3x3 convolution at batch 8 for the
resolutions and widths of DDPM++ / NCSN++ cont.: forward, input gradient and weight gradient, each
its own jitted program, alternating; printed as milliseconds and GFLOP/s (2 B H W 9 C_in C_out
floating-point operations per pass). This script does not import ``score_sde``, so ``XLA_FLAGS``
alone decides where XLA puts the convolutions (``score_sde/xla_cpu.py``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def conv_xla(h, w):
  return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifts(h):
  """The nine shifted copies of h (B, H, W, C) that a SAME 3x3 window sees."""
  _, height, width, _ = h.shape
  padded = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)]


def conv_im2col(h, w):
  return jnp.einsum("bhwk,kd->bhwd", jnp.concatenate(_shifts(h), -1), w.reshape(-1, w.shape[-1]))


def conv_shifted(h, w):
  taps = w.reshape(9, w.shape[2], w.shape[3])
  return sum(jnp.einsum("bhwc,cd->bhwd", s, taps[k]) for k, s in enumerate(_shifts(h)))


def gradient_fn(conv):
  def loss(w, x):
    h = x
    for _ in range(4):
      h = jax.nn.silu(conv(h, w))
    return jnp.mean(h**2)

  return jax.jit(jax.grad(loss))


def _torch_gradient_fn(w: np.ndarray, x: np.ndarray):
  """The same loss's gradient in PyTorch, as ``fn(w, x) -> HWIO gradient`` (the arguments are fixed)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  w_t = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # HWIO -> OIHW
  x_t = torch.tensor(x.transpose(0, 3, 1, 2))                       # NHWC -> NCHW

  class _Done:  # what the timing loop calls block_until_ready on
    def __init__(self, grad):
      self.grad = grad

    def block_until_ready(self):
      return self

    def __array__(self, dtype=None, copy=None):
      return self.grad.numpy().transpose(2, 3, 1, 0)

  def fn(*_):
    w_t.grad = None
    h = x_t
    for _ in range(4):
      h = torch.nn.functional.silu(torch.nn.functional.conv2d(h, w_t, padding=1))
    torch.mean(h**2).backward()
    return _Done(w_t.grad)

  return fn


# (resolution, input channels, output channels) of the 3x3 convolutions of DDPM++ / NCSN++ cont.
PASS_SHAPES = ((32, 128, 128), (32, 256, 256), (32, 384, 128), (16, 256, 256), (8, 256, 256), (4, 256, 256))


def time_passes(repeats: int) -> None:
  """Forward, input-gradient and weight-gradient times of one 3x3 convolution per shape."""
  passes = {
      "forward": lambda x, g, w: conv_xla(x, w),
      "input grad": lambda x, g, w: jax.vjp(lambda x: conv_xla(x, w), x)[1](g)[0],
      "weight grad": lambda x, g, w: jax.vjp(lambda w: conv_xla(x, w), w)[1](g)[0],
  }
  passes = {name: jax.jit(fn) for name, fn in passes.items()}
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.2f}")
  print(f"{'shape':<18} {'GFLOP':>5}" + "".join(f" {name + ' ms':>15} {'GF/s':>5}" for name in passes))
  for size, c_in, c_out in PASS_SHAPES:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (8, size, size, c_in))
    g = jax.random.normal(keys[1], (8, size, size, c_out))
    w = jax.random.normal(keys[2], (3, 3, c_in, c_out))
    for fn in passes.values():
      fn(x, g, w).block_until_ready()  # compiles
    best = {name: float("inf") for name in passes}
    for _ in range(repeats):
      for name, fn in passes.items():
        start = time.perf_counter()
        fn(x, g, w).block_until_ready()
        best[name] = min(best[name], time.perf_counter() - start)
    gflop = 2 * 8 * size * size * 9 * c_in * c_out / 1e9
    print(f"{size}x{size} {c_in:>3}->{c_out:<3}     {gflop:5.1f}" +
          "".join(f" {1e3 * best[name]:15.1f} {gflop / best[name]:5.0f}" for name in passes))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=6)
  parser.add_argument("--passes", action="store_true", help="time the three passes of one convolution per shape")
  args = parser.parse_args()
  if args.passes:
    time_passes(args.repeats)
    return
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 128))
  w = jax.random.normal(jax.random.key(1), (3, 3, 128, 128)) * 0.03
  fns = {"xla": gradient_fn(conv_xla), "im2col": gradient_fn(conv_im2col), "shifted": gradient_fn(conv_shifted)}
  try:
    fns["torch"] = _torch_gradient_fn(np.asarray(w), np.asarray(x))
  except ImportError:
    pass
  grads = {name: np.asarray(fn(w, x)) for name, fn in fns.items()}  # compiles each
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn(w, x).block_until_ready()
      times[name].append(time.perf_counter() - start)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.2f}")
  print(f"{'formulation':<10} {'min s':>7} {'max |grad - xla|':>17}")
  for name in fns:
    print(f"{name:<10} {min(times[name]):>7.3f} {np.max(np.abs(grads[name] - grads['xla'])):>17.2e}")


if __name__ == "__main__":
  main()
