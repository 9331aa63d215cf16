"""Inference on a trained run: samples, likelihoods and the full-split eval loss.

    result = evaluate.sample(config, workdir, out_dir)        # .npz + PNG of EMA samples
    result = evaluate.likelihood(config, workdir, out_dir)    # per-example values + mean and s.e.
    result = evaluate.eval_loss(config, workdir)              # the loss over the whole eval split
    result = evaluate.evaluate(config, workdir, out_dir)      # every checkpoint: loss, bpd, FID/KID/IS

Every function reads the EMA parameters of the newest usable checkpoint of ``workdir`` (or of
``step``) and works on a mesh over every device: batches are sharded, the parameters replicated,
and the results gathered on every host; process 0 writes the files.

Units. Likelihoods are bits/dim of uniformly dequantised 8-bit images for image sets, and the
log-density log p(x) in nats per example for 2-D sets. A toy set with a closed-form density also
reports the exact mean log p of the same points, the value a perfect model would reach.

Randomness. Sample i of a run is drawn from ``fold_in(key, i)`` of the sampling key (see
``sampling.get_sampler``), so the samples depend on the seed and the checkpoint only, not on the
batch size or the number of devices. Likelihood batch j draws its dequantisation noise and probes
from ``fold_in(key, j)``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from score_sde import builders
from score_sde import checkpoints
from score_sde import datasets
from score_sde import parallel
from score_sde import visualize

Array = jax.Array

# Base keys of the three purposes: fold_in(key(config.seed), purpose).
_SAMPLE, _LIKELIHOOD, _LOSS = 1, 2, 3


class _Progress:
  """Logs ``what: i/n | rate | ETA`` at most every ``every`` seconds (and at the end)."""

  def __init__(self, what: str, total: int, unit: str, every: float = 10.0):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.start = self.last = time.perf_counter()

  def update(self, done: int, extra: str = "") -> None:
    now = time.perf_counter()
    if now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate else float("nan")
    logging.info("%s: %d/%d %s | %.1f %s/s | ETA %.0f s%s", self.what, done, self.total, self.unit, rate,
                 self.unit, eta, f" | {extra}" if extra else "")


_PROGRAMS: dict[tuple, Callable] = {}


def _program(key: tuple, build: Callable[[], Callable]) -> Callable:
  """The program ``build()`` made once per ``key``: later passes and checkpoints reuse its compilation."""
  if key not in _PROGRAMS:
    _PROGRAMS[key] = build()
  return _PROGRAMS[key]


def _sample_program(config: ml_collections.ConfigDict, sde, mesh: jax.sharding.Mesh, quantised: bool = False
                    ) -> Callable:
  """``run(key, score_fn, first_index) -> (samples, nfe)``: the configured sampler, compiled once per setting.

  Samples are batch-sharded, in data space ([0, 1] images), or uint8 pixels with ``quantised``.
  """
  shape = (config.sampling.batch_size,) + builders.example_shape(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)

  def build():
    from score_sde import sample_quality  # pylint: disable=g-import-not-at-top

    sampler = builders.build_sampler(config, sde, shape)

    def run(key, fn, first):
      x, nfe = sampler(key, fn, first_index=first)
      x = inverse_scaler(x)
      return (sample_quality.quantise(x) if quantised else x), nfe

    return jax.jit(run, out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))

  return _program(("sample", sde, shape, config.sampling.to_json(), config.data.centered, quantised, mesh),
                  build)


def _gather(x: Array) -> np.ndarray:
  """A sharded global array as one numpy array on every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _key(config: ml_collections.ConfigDict, purpose: int) -> Array:
  return jax.random.fold_in(jax.random.key(config.seed), purpose)


def _write_npz(path: epath.Path, **arrays: np.ndarray) -> None:
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
      np.savez(f, **arrays)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
  return {prefix[:-1]: tree}


def _earlier(path: epath.Path, settings: dict[str, Any]) -> dict[str, np.ndarray] | None:
  """The arrays of an earlier result at ``path`` made with ``settings``, or None when there is none.

  Raises:
    FileExistsError: when ``path`` holds a result of other settings (it is kept, never replaced).
  """
  if not parallel.process0_says(path.exists()):
    return None
  with path.open("rb") as f, np.load(f) as data:
    arrays = {name: data[name] for name in data.files}
  stored = json.loads(str(arrays.pop("settings", "{}")))
  new = json.loads(json.dumps(settings, default=str))
  if stored != new:
    old_flat, new_flat = _flat(stored), _flat(new)
    changed = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    raise FileExistsError(f"{path} holds a result of other settings ({', '.join(changed[:5])} differ); it is kept. "
                          f"Pass --tag=<name> to write this one beside it, or move that file away.")
  return arrays


def _mean_and_sem(values: np.ndarray) -> tuple[float, float]:
  """The mean of ``values`` (N,) and its standard error std / sqrt(N)."""
  values = np.asarray(values, np.float64)
  sem = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
  return float(np.mean(values)), sem


# --- Samples -----------------------------------------------------------------------------------------


def sample(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, out_dir: str | epath.PathLike, *,
           num_samples: int | None = None, step: int | None = None, tag: str | None = None,
           devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Draws ``num_samples`` (default ``config.eval.num_samples``) samples of the EMA network.

  The sampler is ``config.sampling`` (method and options, guidance: ``builders.build_guided_score_fns``);
  batches of ``config.sampling.batch_size`` are sharded over the devices. Writes
  ``out_dir/samples_<step>_<tag>.npz`` (``samples`` in data space (N, ...), ``labels`` (N,) of guided
  samples, and the settings) and a ``.png`` (an image grid, or a scatter plot over held-out points for
  2-D data); ``tag`` defaults to ``builders.sampler_tag(config)``. An earlier result of the same settings
  is returned as it is (``kept``); one of other settings is never replaced.

  Returns:
    {"samples": (N, ...) numpy, "labels": (N,) classes or None, "nfe": score evaluations per sample,
    "step", "npz", "png", "non_finite": samples with a non-finite entry, "kept": read from an earlier run}.
  """
  mesh = parallel.make_mesh(devices)
  batch = config.sampling.batch_size
  parallel.check_batch_size(batch, mesh, "sampling.batch_size")
  num_samples = int(num_samples or config.eval.num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}; set --config.eval.num_samples.")
  restored = builders.restore_score_model(config, workdir, step=step, devices=devices)
  sde, step = restored.sde, restored.step
  out_dir = epath.Path(out_dir)
  name = f"samples_{step}_{tag or builders.sampler_tag(config)}"
  npz, png = out_dir / f"{name}.npz", out_dir / f"{name}.png"
  settings = {"sampling": config.sampling.to_dict(), "num_samples": num_samples, "seed": config.seed, "step": step}
  earlier = _earlier(npz, settings)
  if earlier is not None:
    samples = earlier["samples"]
    return {"samples": samples, "labels": earlier.get("labels"), "nfe": int(earlier["nfe"]), "step": step,
            "npz": str(npz), "png": str(png), "non_finite": _non_finite(samples), "kept": True}
  score_fn_for = builders.build_guided_score_fns(config, restored, devices=devices)
  run = _sample_program(config, sde, mesh)
  key = _key(config, _SAMPLE)
  rounds = math.ceil(num_samples / batch)
  progress, chunks, label_chunks, nfe = _Progress("sampling", rounds * batch, "samples"), [], [], 0
  for r in range(rounds):
    fn, labels = score_fn_for(r * batch, batch)
    x, nfe = run(key, fn, jnp.int32(r * batch))
    chunks.append(_gather(x))
    label_chunks.append(labels)
    progress.update((r + 1) * batch)
  samples = np.concatenate(chunks)[:num_samples]
  labels = None if label_chunks[0] is None else np.concatenate(label_chunks)[:num_samples]
  _write_npz(npz, samples=samples, nfe=np.asarray(int(nfe)), settings=np.asarray(json.dumps(settings, default=str)),
             **({} if labels is None else {"labels": labels}))
  if jax.process_index() == 0:
    if samples.ndim == 4:
      visualize.save_image_grid(png, samples[:min(len(samples), 256)])
    else:
      _, eval_ds = datasets.get_dataset(config, evaluation=True)
      reference = next(eval_ds.make_iterator())["image"]
      visualize.save_scatter(png, samples.reshape(len(samples), -1), reference=reference)
  non_finite = _non_finite(samples)
  logging.info("%d samples of step %d (%d score evaluations each, %d non-finite): %s, %s", len(samples), step,
               int(nfe), non_finite, npz, png)
  return {"samples": samples, "labels": labels, "nfe": int(nfe), "step": step, "npz": str(npz), "png": str(png),
          "non_finite": non_finite, "kept": False}


def _non_finite(samples: np.ndarray) -> int:
  """Samples with a non-finite entry."""
  return int(np.sum(~np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)))


# --- Likelihoods ---------------------------------------------------------------------------------------


_LIKELIHOOD_FIELDS = ("divergence", "rtol", "atol", "eps", "likelihood_estimators", "dequantizers", "importance_samples",
                      "bound_time_samples", "bound_decoder", "dequantizer_workdir")


def likelihood(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, out_dir: str | epath.PathLike,
               *, split: str | None = None, max_examples: int | None = None, step: int | None = None,
               key: Array | None = None, name: str | None = None, tag: str | None = None,
               restored: builders.Restored | None = None, devices: list[jax.Device] | None = None
               ) -> dict[str, Any]:
  """The likelihood of every example of a split (``eval.bpd_dataset``) by each estimator and dequantiser.

  One row per (estimator, dequantiser) of ``builders.likelihood_rows``: bits/dim of 8-bit images (a bound on
  -log P(x) / D), or log p in nats of 2-D data, with its standard error over the examples, the score
  evaluations per example and the examples per second (compilation excluded). Batches of
  ``eval.batch_size`` are sharded over the devices, padding dropped, so every example counts once; batch j
  draws its noise from ``fold_in(key, j)``, the same for every row. Writes
  ``out_dir/likelihood_<split>_<step>_<tag>.npz`` (each row's ``values_<row>`` (N,), ``labels``, the table and
  the settings); ``tag`` defaults to ``builders.likelihood_tag(config)``. An earlier result of the same
  settings is returned as it is (``kept``); one of other settings is kept.

  Args:
    max_examples: stop after this many examples (default ``eval.likelihood_examples``; 0: the whole split).
    key: the base key of the pass (default: from ``config.seed``).
    name: the output file's name, replacing the default (then written whatever is there).
    restored: ``builders.restore``'s result for ``step``, if the caller has it already.

  Returns:
    {"rows": [{"estimator", "dequantizer", "mean", "sem", "difference" and "difference_sem" (paired, against the
    same estimator's first dequantiser), "nfe", "examples_per_second", "compile_seconds"}],
    "values" / "mean" / "sem" of the first row, "unit" ("bits/dim" or "nats"), "split", "step", "npz",
    "settings", "kept", "source" (where the split's examples come from), "exact_mean" (the true density's
    mean log p of the same points for toy sets with one, else None), "row_values" {row name: (N,)} when computed}.
  """
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  split = split or config.eval.bpd_dataset
  max_examples = config.eval.likelihood_examples if max_examples is None else max_examples
  if split not in ("train", "test"):
    raise ValueError(f"Unknown split {split!r}; set --config.eval.bpd_dataset to 'train' or 'test'.")
  restored = restored or builders.restore_score_model(config, workdir, step=step, devices=devices)
  sde, score_fn, step = restored.sde, restored.fn, restored.step
  train_ds, test_ds = datasets.get_dataset(config, evaluation=True, uniform_dequantization=False)
  ds = train_ds if split == "train" else test_ds
  e = config.eval
  npz = epath.Path(out_dir) / (name or f"likelihood_{split}_{step}_{tag or builders.likelihood_tag(config)}.npz")
  settings = {"eval": {k: e[k] for k in _LIKELIHOOD_FIELDS}, "max_examples": max_examples, "split": split,
              "seed": config.seed, "step": step}
  settings = json.loads(json.dumps(settings, default=str))
  unit = "bits/dim" if ds.eight_bit else "nats"
  earlier = None if name else _earlier(npz, settings)
  if earlier is not None:
    rows = json.loads(str(earlier["table"]))
    exact = float(earlier["exact_mean"]) if "exact_mean" in earlier else None
    return {"rows": rows, "values": earlier["values"], "mean": rows[0]["mean"], "sem": rows[0]["sem"], "unit": unit,
            "split": split, "step": step, "npz": str(npz), "settings": settings, "exact_mean": exact, "kept": True,
            "source": ds.source_note}

  pairs = builders.likelihood_rows(config)
  dequantizers = {d: builders.build_dequantizer(config, sde, d, devices=devices) for d in {d for _, d in pairs if d}}
  sharding = (parallel.batch_sharding(mesh), parallel.replicated(mesh))
  programs = {est: _program(("likelihood", sde, est, json.dumps(settings["eval"]), config.data.centered,
                             ds.eight_bit, mesh),
                            lambda est=est: jax.jit(builders.build_likelihood_fn(config, sde, ds.eight_bit, est),
                                                    out_shardings=sharding))
              for est in {est for est, _ in pairs}}
  key = _key(config, _LIKELIHOOD) if key is None else key
  total = min(ds.num_examples, max_examples) if max_examples else ds.num_examples
  progress = _Progress(f"likelihood ({split})", total, "examples")
  values, nfes, seconds = {p: [] for p in pairs}, {p: [] for p in pairs}, {p: 0.0 for p in pairs}
  compiled, compile_seconds, labels, points = {}, {}, [], []
  for j, batch in enumerate(ds.make_iterator()):
    sharded = parallel.shard_batch({k: batch[k] for k in ("image", "mask", "label")}, mesh)
    mask = _gather(sharded["mask"])
    for pair in pairs:
      args = (jax.random.fold_in(key, j), score_fn, sharded["image"], dequantizers.get(pair[1]))
      if pair not in compiled:  # compiled ahead of time (once per program and shapes): the rate counts solves only
        started = time.perf_counter()
        signature = (id(programs[pair[0]]), jax.tree.structure(args), tuple(jax.tree.map(
            lambda a: (a.shape, a.dtype), jax.tree.leaves(args))))
        compiled[pair] = _program(("likelihood-compiled", signature), lambda: programs[pair[0]].lower(*args).compile())
        compile_seconds[pair] = time.perf_counter() - started
      started = time.perf_counter()
      out, nfe = jax.block_until_ready(compiled[pair](*args))
      seconds[pair] += time.perf_counter() - started
      values[pair].append(_gather(out)[mask])
      nfes[pair].append(float(nfe))
    labels.append(_gather(sharded["label"])[mask])
    if ds.density is not None:
      points.append(_gather(sharded["image"])[mask])
    done = sum(len(v) for v in values[pairs[0]])
    progress.update(min(done, total), f"mean {np.mean(np.concatenate(values[pairs[0]])):.4f} {unit}")
    if done >= total:
      break
  rows, arrays = [], {}
  for pair in pairs:
    v = np.concatenate(values[pair])[:total]
    mean, sem = _mean_and_sem(v)
    # Against the same estimator's first dequantiser, on the same examples and noise: the paired difference.
    base = next(p for p in pairs if p[0] == pair[0])
    difference, difference_sem = _mean_and_sem(v - np.concatenate(values[base])[:total])
    rows.append({"estimator": pair[0], "dequantizer": pair[1], "mean": mean, "sem": sem,
                 "difference": difference, "difference_sem": difference_sem,
                 "nfe": float(np.mean(nfes[pair])), "examples_per_second": len(v) / max(seconds[pair], 1e-9),
                 "compile_seconds": compile_seconds[pair]})
    arrays[f"values_{_row_name(pair)}"] = v
  exact_mean = None
  if ds.density is not None:
    exact_mean = float(np.mean(np.asarray(ds.density.log_prob(jnp.asarray(np.concatenate(points)[:total])))))
  first = arrays[f"values_{_row_name(pairs[0])}"]
  extra = {} if exact_mean is None else {"exact_mean": np.asarray(exact_mean)}
  _write_npz(npz, values=first, labels=np.concatenate(labels)[:total], unit=np.asarray(unit),
             table=np.asarray(json.dumps(rows)), settings=np.asarray(json.dumps(settings)), **arrays, **extra)
  for row in rows:
    logging.info("likelihood of %d %s examples at step %d (%s, %s): %.5f +- %.5f %s", len(first), split, step,
                 row["estimator"], row["dequantizer"] or "-", row["mean"], row["sem"], unit)
  return {"rows": rows, "values": first, "mean": rows[0]["mean"], "sem": rows[0]["sem"], "unit": unit,
          "split": split, "step": step, "npz": str(npz), "settings": settings, "exact_mean": exact_mean,
          "kept": False, "source": ds.source_note, "row_values": {k[len("values_"):]: v for k, v in arrays.items()}}


def _row_name(pair: tuple[str, str | None]) -> str:
  """``ode``, ``bound`` (2-D data) or ``ode_uniform``, ``bound_variational``, ... (8-bit images)."""
  return pair[0] if pair[1] is None else f"{pair[0]}_{pair[1]}"


# --- Eval loss -----------------------------------------------------------------------------------------


def eval_loss(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *, split: str = "test",
              step: int | None = None, restored: builders.Restored | None = None,
              devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The training objective of the EMA network over every example of ``split``.

  Each example's time and noise are drawn from ``fold_in(key, batch index)``; padding is masked
  out, so the value is the mean over exactly the split's examples.

  ``restored`` is ``builders.restore``'s result for ``step``, if the caller has it.

  Returns:
    {"loss": mean per-example loss, "sem": its standard error, "num_examples", "split", "step"}.
  """
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  restored = restored or builders.restore_score_model(config, workdir, step=step, devices=devices)
  sde, network, score_fn, step = restored.sde, restored.network, restored.fn, restored.step
  per_example = _program(("loss", sde, network, config.training.to_json(), config.data.centered, mesh),
                         lambda: jax.jit(builders.build_eval_loss_fn(config, sde, network),
                                         out_shardings=parallel.batch_sharding(mesh)))
  train_ds, test_ds = datasets.get_dataset(config, evaluation=True)
  ds = train_ds if split == "train" else test_ds
  key, params = _key(config, _LOSS), score_fn.variables["params"]
  progress, values = _Progress(f"eval loss ({split})", ds.num_examples, "examples"), []
  for j, batch in enumerate(ds.make_iterator()):
    sharded = parallel.shard_batch({k: batch[k] for k in ("image", "label", "mask")}, mesh)
    values.append(_gather(per_example(jax.random.fold_in(key, j), params, sharded))[_gather(sharded["mask"])])
    progress.update(sum(len(v) for v in values))
  values = np.concatenate(values)
  mean, sem = _mean_and_sem(values)
  logging.info("eval loss over the %d %s examples at step %d: %.5g +- %.2g", len(values), split, step, mean, sem)
  return {"loss": mean, "sem": sem, "num_examples": len(values), "split": split, "step": step}


def _wait_for_step(workdir: epath.Path, step: int, timeout: float) -> None:
  """Returns once ``workdir`` holds a checkpoint of ``step``; raises TimeoutError after ``timeout`` s."""
  deadline = time.time() + timeout
  while step not in checkpoints.list_steps(workdir):
    remaining = deadline - time.time()
    if remaining <= 0:
      raise TimeoutError(f"No checkpoint of step {step} appeared in {workdir} within {timeout:.0f} s; raise "
                         f"--config.eval.wait_timeout, or lower --config.eval.end_ckpt.")
    logging.info("waiting for the checkpoint of step %d (%.0f s left)", step, remaining)
    time.sleep(min(10.0, remaining))


def _checkpoint_list(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[int]:
  """Checkpoint numbers n of the evaluation: begin_ckpt..end_ckpt, or every regular one present (end_ckpt=0)."""
  e, freq = config.eval, config.training.snapshot_freq
  if e.end_ckpt:
    if e.end_ckpt < e.begin_ckpt:
      raise ValueError(f"eval.end_ckpt={e.end_ckpt} is before eval.begin_ckpt={e.begin_ckpt}; set "
                       f"--config.eval.end_ckpt to {e.begin_ckpt} or more, or to 0 for every checkpoint present.")
    return list(range(e.begin_ckpt, e.end_ckpt + 1))
  present = [s // freq for s in checkpoints.list_steps(workdir) if s % freq == 0 and s // freq >= e.begin_ckpt]
  if not present:
    raise FileNotFoundError(f"No regular checkpoint (a step multiple of training.snapshot_freq={freq}) from "
                            f"eval.begin_ckpt={e.begin_ckpt} on in {workdir}; train first, or set eval.end_ckpt "
                            f"and eval.wait_timeout to wait for a running training.")
  return present


def evaluate(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, out_dir: str | epath.PathLike, *,
             devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Evaluates checkpoints ``eval.begin_ckpt..end_ckpt`` of a training run, resumably.

  For checkpoint n (step n ``training.snapshot_freq``), each as enabled: the eval loss over the
  whole test split (``eval.enable_loss``); the likelihood of every example of ``eval.bpd_dataset`` in
  ``eval.bpd_repeats`` passes with fresh dequantisation noise (``eval.enable_bpd``; always for 2-D
  data); and for each sampler setting of ``eval.samplers`` (or the config's own), ``eval.num_samples``
  samples with their quality (``eval.feature_network``: FID / KID / IS with the FID Inception, or FD /
  KID in a digits classifier's feature space and the accuracy of generated classes), the score
  evaluations per sample and the samples per second (``eval.enable_sampling``). Checkpoints not
  written yet are waited for (``eval.wait_timeout``), so this can run beside training.

  Progress is kept in ``out_dir/ckpt_<n>/`` (the loss, each bits/dim pass, each sampler's rounds and
  row), so a killed evaluation resumes without recomputing finished parts; ``out_dir/ckpt_<n>.json``
  holds a finished checkpoint's rows; ``out_dir/summary.json`` and ``summary.csv`` hold one row per
  checkpoint and sampler, and TensorBoard scalars go to ``out_dir/tensorboard`` (``eval/<sampler>/<metric>``).

  Multi-host: every process runs this with the same arguments; each generates its share of every
  sampling round; results reach every process through collectives; process 0 writes the shared files
  and decides, for every process, which finished parts to skip.

  Returns:
    {"rows": [result dicts, one per checkpoint and sampler], "json": path, "csv": path}; on processes
    other than 0 a row holds only what that process computed in this call.

  Raises:
    FileNotFoundError: for missing Inception weights or reference statistics, before anything runs.
  """
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from score_sde import sample_quality  # pylint: disable=g-import-not-at-top
  e = config.eval
  workdir, out_dir = epath.Path(workdir), epath.Path(out_dir)
  mesh = parallel.make_mesh(devices)
  is_host0 = jax.process_index() == 0
  samplers = builders.eval_sampler_configs(config) if e.enable_sampling else {}
  features = sample_quality.get_feature_network(config, mesh, out_dir) if samplers else None  # fail now
  with_likelihood = e.enable_bpd or not builders.is_image_set(config)
  if not (e.enable_loss or with_likelihood or samplers):
    raise ValueError("Nothing to evaluate: enable eval.enable_loss, eval.enable_bpd or eval.enable_sampling.")
  writer = tensorboardX.SummaryWriter(str(out_dir / "tensorboard")) if is_host0 else None
  rows = []
  try:
    for n in _checkpoint_list(config, workdir):
      step = n * config.training.snapshot_freq
      final = out_dir / f"ckpt_{n}.json"
      if parallel.process0_says(final.exists()):
        rows.extend(json.loads(final.read_text()) if is_host0 else [{"ckpt": n, "step": step}])
        logging.info("checkpoint %d (step %d) was evaluated before: %s", n, step, final)
        continue
      _wait_for_step(workdir, step, e.wait_timeout)
      part = out_dir / f"ckpt_{n}"
      if is_host0:
        part.mkdir(parents=True, exist_ok=True)
      cache: dict[str, builders.Restored] = {}

      def restored() -> builders.Restored:  # the checkpoint is read once, by the first part that needs it
        if "ema" not in cache:
          cache["ema"] = builders.restore_score_model(config, workdir, step=step, devices=devices)
        return cache["ema"]

      common: dict[str, Any] = {"ckpt": n, "step": step}
      if e.enable_loss:
        common.update(_checkpoint_loss(config, workdir, part / "loss.json", step, restored, devices))
      if with_likelihood:
        common.update(_checkpoint_likelihood(config, workdir, out_dir, n, step, restored, devices))
      checkpoint_rows = []
      for tag, sampler_config in samplers.items():
        row = {**common, "sampler": tag, **_sampler_row(sampler_config, part / f"{tag}.json",
                                                         part / f"samples_{tag}", step, restored, features, mesh)}
        checkpoint_rows.append(row)
      checkpoint_rows = checkpoint_rows or [common]
      checkpoint_rows = [{k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in row.items()}
                         for row in checkpoint_rows]
      if is_host0:
        final.write_text(json.dumps(checkpoint_rows, indent=2) + "\n")
        for row in checkpoint_rows:
          prefix = f"eval/{row['sampler']}/" if "sampler" in row else "eval/"
          for k, v in row.items():
            if isinstance(v, float):
              writer.add_scalar(prefix + k, v, step)
      rows.extend(checkpoint_rows)
      for row in checkpoint_rows:
        logging.info("checkpoint %d (step %d): %s", n, step, row)
  finally:
    if writer is not None:
      writer.close()
  paths = {"json": str(out_dir / "summary.json"), "csv": str(out_dir / "summary.csv")}
  if is_host0:
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    (out_dir / "summary.csv").write_text("\n".join(lines) + "\n")
  return {"rows": rows, **paths}


def _checkpoint_loss(config: ml_collections.ConfigDict, workdir: epath.Path, path: epath.Path, step: int,
                     restored: Callable[[], builders.Restored], devices) -> dict[str, float]:
  """{"eval_loss": ...} of one checkpoint, computed once and kept in ``path``."""
  if parallel.process0_says(path.exists()):
    return {"eval_loss": json.loads(path.read_text())["loss"]} if jax.process_index() == 0 else {}
  loss = eval_loss(config, workdir, step=step, restored=restored(), devices=devices)
  if jax.process_index() == 0:
    path.write_text(json.dumps({"loss": loss["loss"], "sem": loss["sem"]}))
  return {"eval_loss": loss["loss"]}


def _checkpoint_likelihood(config: ml_collections.ConfigDict, workdir: epath.Path, out_dir: epath.Path, n: int,
                           step: int, restored: Callable[[], builders.Restored], devices) -> dict[str, float]:
  """Each likelihood row's mean (bits/dim or log p in nats), standard error, NFE and rate over ``eval.bpd_repeats``
  passes: ``bpd`` for the first row, ``bpd_<estimator>_<dequantizer>`` for the others."""
  pairs = builders.likelihood_rows(config)
  values: dict[tuple, list] = {pair: [] for pair in pairs}
  stats: dict[tuple, list] = {pair: [] for pair in pairs}
  for r in range(config.eval.bpd_repeats):
    name = f"ckpt_{n}/likelihood_{r}.npz"
    if not parallel.process0_says((out_dir / name).exists()):
      key = jax.random.fold_in(jax.random.fold_in(_key(config, _LIKELIHOOD), step), r)
      result = likelihood(config, workdir, out_dir, step=step, key=key, name=name, restored=restored(),
                          devices=devices)
      table = result["rows"]
      arrays = {pair: result["row_values"][_row_name(pair)] for pair in pairs}
    elif jax.process_index() == 0:
      with (out_dir / name).open("rb") as f, np.load(f) as data:
        table = json.loads(str(data["table"]))
        arrays = {pair: data[f"values_{_row_name(pair)}"] for pair in pairs}
    else:
      continue
    for pair, row in zip(pairs, table):
      values[pair].append(arrays[pair])
      stats[pair].append((row["nfe"], row["examples_per_second"]))
  if len(values[pairs[0]]) < config.eval.bpd_repeats:  # another process read the resumed passes
    return {}
  unit = "bpd" if builders.is_image_set(config) else "logp_nats"
  out = {}
  for i, pair in enumerate(pairs):
    column = unit if i == 0 else f"{unit}_{_row_name(pair)}"
    out[column], out[f"{column}_sem"] = _mean_and_sem(np.concatenate(values[pair]))
    out[f"{column}_nfe"] = float(np.mean([nfe for nfe, _ in stats[pair]]))
    out[f"{column}_examples_per_second"] = float(np.mean([rate for _, rate in stats[pair]]))
  return out


def _sampler_row(config: ml_collections.ConfigDict, path: epath.Path, round_dir: epath.Path, step: int,
                 restored: Callable[[], builders.Restored], features, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """One sampler's samples of a checkpoint: their quality, NFE and rate, computed once and kept in ``path``."""
  from score_sde import sample_quality  # pylint: disable=g-import-not-at-top
  if parallel.process0_says(path.exists()):
    return json.loads(path.read_text()) if jax.process_index() == 0 else {}
  run = _sample_program(config, restored().sde, mesh, quantised=builders.is_image_set(config))
  score_fn_for = builders.build_guided_score_fns(config, restored(), devices=list(mesh.devices.flat))
  key = jax.random.fold_in(_key(config, _SAMPLE), step)
  out = sample_quality.sample_features(config, run, score_fn_for, key, mesh, round_dir, features.fn)
  e = config.eval
  row = {"nfe": out["nfe"], "samples_per_second": out["samples_per_second"],
         **features.scores(out, kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size, seed=config.seed)}
  row = {k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in row.items()}
  if jax.process_index() == 0:
    picture = round_dir.parent / f"{round_dir.name}.png"
    if out["samples"].ndim == 4:
      visualize.save_image_grid(picture, out["samples"][:64] / 255.0)
    else:
      visualize.save_scatter(picture, out["samples"], reference=features.reference.features)
    path.write_text(json.dumps(row, indent=2) + "\n")
  return row
