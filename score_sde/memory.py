"""Device memory of the compiled train step, from XLA's buffer assignment, without running a step.

    rows = memory.variant_memory(config, mesh)                  # as configured, remat, bfloat16, both
    batch, row = memory.largest_batch(config, mesh, 16 * 2**30)  # the largest per-device batch in 16 GiB

The step is the training loop's own program (``builders.build_programs``): ``train_fn`` under ``jax.jit``
over the mesh, state donated, ``training.n_jitted_steps`` optimiser steps per call. It is
lowered on abstract arguments and compiled for this process's backend; figures are per device.
Buffer assignment differs between CPU, GPU and TPU, so figures hold for the backend that made them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from score_sde import builders

# Model options the report compares, as config.model overrides: {name: overrides}.
VARIANTS: dict[str, dict[str, object]] = {
    "as configured": {},
    "remat": {"remat": True},
    "bfloat16": {"dtype": "bfloat16"},
    "remat + bfloat16": {"remat": True, "dtype": "bfloat16"},
}


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled train step (``CompiledMemoryStats``), or why it was not compiled.

  ``total`` is the peak XLA plans for: arguments + outputs + temporaries - donated (aliased) buffers.
  """

  name: str
  per_device_batch: int
  arguments: int = 0
  outputs: int = 0
  temporaries: int = 0
  aliased: int = 0
  refused: str = ""

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased


def backend_note() -> str:
  """Which backend the figures come from, e.g. ``cpu (1 x cpu)``."""
  devices = jax.devices()
  return f"{jax.default_backend()} ({len(devices)} x {devices[0].device_kind})"


def with_model_options(config: ml_collections.ConfigDict, **options) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``config.model`` options replaced."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.update(options)
  return out


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, per_device_batch: int):
  """The loop's train step (``builders.build_programs``) lowered on abstract (key, state, batch) for
  ``per_device_batch`` examples per device."""
  example = builders.example_shape(config)
  key = jax.eval_shape(lambda: jax.random.key(0))
  programs = builders.build_programs(config, mesh, builders.build_sde(config), builders.build_network(config),
                                     example, key)
  k = config.training.n_jitted_steps
  lead = (k,) if k > 1 else ()
  batch = {"image": jax.ShapeDtypeStruct(lead + (per_device_batch * mesh.devices.size,) + example, jnp.float32),
           "label": jax.ShapeDtypeStruct(lead + (per_device_batch * mesh.devices.size,), jnp.int32)}
  return programs.train.lower(key, programs.state_shapes, batch)


def step_memory(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, per_device_batch: int | None = None,
                name: str = "as configured") -> StepMemory:
  """The compiled train step's memory per device (default batch: ``training.batch_size`` / devices).

  A network that refuses the config's model options (``builders.build_network``) gives a row whose
  ``refused`` says why, instead of an error.
  """
  per_device_batch = per_device_batch or max(1, config.training.batch_size // mesh.devices.size)
  try:
    builders.build_network(config)
  except ValueError as e:
    return StepMemory(name, per_device_batch, refused=str(e).split(" Set it with")[0])
  stats = lower_train_step(config, mesh, per_device_batch).compile().memory_analysis()
  return StepMemory(name, per_device_batch, arguments=stats.argument_size_in_bytes,
                    outputs=stats.output_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                    aliased=stats.alias_size_in_bytes)


def variant_memory(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   per_device_batch: int | None = None) -> list[StepMemory]:
  """``step_memory`` of the config as it is and with ``model.remat`` and / or ``model.dtype=bfloat16``."""
  rows = []
  for name, options in VARIANTS.items():
    if config.training.objective != "score" and options:
      rows.append(StepMemory(name, per_device_batch or 0, refused="model options apply to score networks only"))
      continue
    rows.append(step_memory(with_model_options(config, **options), mesh, per_device_batch, name))
  return rows


def largest_fitting(total_bytes: Callable[[int], int], limit: int, guess: int) -> int:
  """The largest b >= 1 with ``total_bytes(b) <= limit`` (0 if none), for a ``total_bytes`` rising with b.

  Each evaluation is a compilation, and memory is close to affine in the batch, so each b is where the
  line through the last two evaluations meets ``limit`` (from b = ``guess`` and 2 ``guess``), kept
  inside the bracket (largest b that fits, smallest that does not). A step that lands on the bracket's
  edge, or leaves more than half of it, is followed by one that halves it (doubles b while nothing is
  known not to fit), so the search also ends on curves far from a line.
  """
  seen: dict[int, int] = {}
  lo, hi = 0, None  # largest b known to fit, smallest b known not to fit

  def evaluate(b: int) -> None:
    nonlocal lo, hi
    seen[b] = total_bytes(b)
    if seen[b] <= limit:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)

  evaluate(1)
  if lo == 0:
    return 0
  guess = max(2, guess)
  for b in (guess, 2 * guess):
    if hi is None:
      evaluate(b)
  (b1, b2), halve = sorted(seen)[-2:], False
  while hi is None or hi - lo > 1:
    width = None if hi is None else hi - lo
    if halve:
      b = 2 * lo if hi is None else (int((lo * hi) ** 0.5) if hi > 2 * lo else (lo + hi) // 2)
    else:
      b = b2 + int((limit - seen[b2]) // max((seen[b2] - seen[b1]) / (b2 - b1), 1.0))
    clamped = max(b, lo + 1) if hi is None else min(max(b, lo + 1), hi - 1)
    evaluate(clamped)
    b1, b2 = b2, clamped
    halve = not halve and (clamped != b or (width is not None and hi is not None and hi - lo > width / 2))
  return lo


def largest_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, limit_bytes: int,
                  known: StepMemory | None = None) -> tuple[int, StepMemory | None]:
  """The largest per-device batch whose train step fits in ``limit_bytes`` per device, and its memory row.

  ``known``: a row of this config already compiled (its batch is not compiled again).
  """
  rows: dict[int, StepMemory] = {known.per_device_batch: known} if known and not known.refused else {}

  def total(b: int) -> int:
    if b not in rows:
      rows[b] = step_memory(config, mesh, b)
    return rows[b].total

  guess = max(1, config.training.batch_size // mesh.devices.size)
  batch = largest_fitting(total, limit_bytes, guess)
  return batch, rows.get(batch)


def format_report(rows: list[StepMemory], *, limit_gb: float | None = None, largest: int | None = None) -> str:
  """The report as text: one line per variant, in MiB per device."""
  mib = 2.0**20
  lines = [f"train step memory per device, from XLA's buffer assignment on {backend_note()} (GPU and TPU "
           f"assign buffers differently; compile on the target backend for its figures):",
           f"  {'variant':<18}{'batch/device':>13}{'arguments':>11}{'outputs':>9}{'temporaries':>13}{'donated':>9}"
           f"{'total MiB':>11}"]
  for r in rows:
    if r.refused:
      lines.append(f"  {r.name:<18}not available: {r.refused}")
      continue
    lines.append(f"  {r.name:<18}{r.per_device_batch:>13}{r.arguments / mib:>11.1f}{r.outputs / mib:>9.1f}"
                 f"{r.temporaries / mib:>13.1f}{r.aliased / mib:>9.1f}{r.total / mib:>11.1f}")
  if limit_gb is not None:
    lines.append(f"largest per-device batch within {limit_gb:g} GiB (as configured): {largest}")
  return "\n".join(lines)


__all__ = ["StepMemory", "VARIANTS", "backend_note", "format_report", "largest_batch", "largest_fitting",
           "lower_train_step", "step_memory", "variant_memory", "with_model_options"]
