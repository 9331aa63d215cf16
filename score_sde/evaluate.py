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

from score_sde import checkpoints
from score_sde import datasets
from score_sde import guidance
from score_sde import likelihood as likelihood_lib
from score_sde import losses
from score_sde import parallel
from score_sde import train
from score_sde import visualize
from score_sde.models import wrapper

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
  shape = (config.sampling.batch_size,) + train.example_shape(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)

  def build():
    from score_sde import sample_quality  # pylint: disable=g-import-not-at-top

    sampler = train.build_sampler(config, sde, shape)

    def run(key, fn, first):
      x, nfe = sampler(key, fn, first_index=first)
      x = inverse_scaler(x)
      return (sample_quality.quantise(x) if quantised else x), nfe

    return jax.jit(run, out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh)))

  return _program(("sample", repr(sde), shape, config.sampling.to_json(), config.data.centered, quantised, mesh),
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


def _mean_and_sem(values: np.ndarray) -> tuple[float, float]:
  """The mean of ``values`` (N,) and its standard error std / sqrt(N)."""
  values = np.asarray(values, np.float64)
  sem = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
  return float(np.mean(values)), sem


# --- Samples -----------------------------------------------------------------------------------------


def sample(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, out_dir: str | epath.PathLike, *,
           num_samples: int | None = None, step: int | None = None,
           devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Draws ``num_samples`` (default ``config.eval.num_samples``) samples of the EMA network.

  The sampler is ``config.sampling`` (method and options); batches of ``config.sampling.batch_size``
  are sharded over the devices. Writes ``out_dir/samples_<step>.npz`` (``samples`` in data space,
  (N, ...)) and ``out_dir/samples_<step>.png`` (an image grid, or a scatter plot over held-out
  points for 2-D data). Class-conditional sampling (``sampling.guidance``, ``sampling.class_labels``;
  see ``guidance.sampling_score_fns``) also writes the classes, ``labels`` (N,), to the .npz.

  Returns:
    {"samples": (N, ...) numpy, "labels": (N,) classes or None, "nfe": score evaluations per sample,
    "step", "npz", "png", "non_finite": samples with a non-finite entry}.
  """
  mesh = parallel.make_mesh(devices)
  batch = config.sampling.batch_size
  parallel.check_batch_size(batch, mesh, "sampling.batch_size")
  num_samples = int(num_samples or config.eval.num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}; set --config.eval.num_samples.")
  sde, model, score_fn, step = train.restore_for_inference(config, workdir, step=step, devices=devices)
  score_fn_for = guidance.sampling_score_fns(config, sde, model, score_fn, devices=devices)
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
  out_dir = epath.Path(out_dir)
  npz, png = out_dir / f"samples_{step}.npz", out_dir / f"samples_{step}.png"
  _write_npz(npz, samples=samples, **({} if labels is None else {"labels": labels}))
  if jax.process_index() == 0:
    if samples.ndim == 4:
      visualize.save_image_grid(png, samples[:min(len(samples), 256)])
    else:
      _, eval_ds = datasets.get_dataset(config, evaluation=True)
      reference = next(eval_ds.make_iterator())["image"]
      visualize.save_scatter(png, samples.reshape(len(samples), -1), reference=reference)
  non_finite = int(np.sum(~np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)))
  logging.info("%d samples of step %d (%d score evaluations each, %d non-finite): %s, %s", len(samples), step,
               int(nfe), non_finite, npz, png)
  return {"samples": samples, "labels": labels, "nfe": int(nfe), "step": step, "npz": str(npz), "png": str(png),
          "non_finite": non_finite}


# --- Likelihoods ---------------------------------------------------------------------------------------


def _likelihood_fn(config: ml_collections.ConfigDict, sde, eight_bit: bool) -> Callable:
  """``fn(key, score_fn, batch) -> per-example values``: bits/dim of 8-bit images, else log p in nats."""
  e = config.eval
  options = dict(divergence=e.divergence, rtol=e.rtol, atol=e.atol, eps=e.eps)
  scaler = datasets.get_data_scaler(config.data.centered)
  if eight_bit:
    bpd_fn = likelihood_lib.get_bpd_fn(sde, scaler, **options)

    def images_bpd(key, score_fn, images):
      return bpd_fn(key, score_fn, jnp.round(images * 255.0).astype(jnp.uint8))[0]

    return images_bpd
  lik = likelihood_lib.get_likelihood_fn(sde, **options)

  def points_logp(key, score_fn, points):
    # log p(u) = log p(x) + log|dx/du| for the elementwise data scaler x = s(u).
    x, dx_du = jax.jvp(scaler, (points,), (jnp.ones_like(points),))
    log_det = jnp.sum(jnp.log(jnp.abs(dx_du)).reshape(points.shape[0], -1), axis=1)
    return lik(key, score_fn, x)[0] + log_det

  return points_logp


def likelihood(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, out_dir: str | epath.PathLike,
               *, split: str | None = None, max_examples: int | None = None, step: int | None = None,
               key: Array | None = None, name: str | None = None, restored: tuple | None = None,
               devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The PF-ODE likelihood of every example of a split (``config.eval.bpd_dataset`` by default).

  Solver settings are ``config.eval.{divergence, rtol, atol, eps}``; batches of
  ``config.eval.batch_size`` are sharded over the devices; the last, partial batch is padded and
  its padding dropped, so every example counts once. Writes ``out_dir/likelihood_<split>_<step>.npz``
  (``values`` (N,), ``labels`` (N,)).

  Args:
    max_examples: stop after this many examples (default ``config.eval.likelihood_examples``; 0: the
      whole split).
    key: the base key of the pass (default: from ``config.seed``).
    name: the output file's name (default ``likelihood_<split>_<step>.npz``).
    restored: ``train.restore_for_inference``'s result for ``step``, if the caller has it already.

  Returns:
    {"values": (N,), "mean", "sem" (standard error), "unit" ("bits/dim" or "nats"), "split",
    "step", "npz", and "exact_mean" (the true density's mean log p of the same points, for toy sets
    with a closed form; else None)}.
  """
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  split = split or config.eval.bpd_dataset
  max_examples = config.eval.likelihood_examples if max_examples is None else max_examples
  if split not in ("train", "test"):
    raise ValueError(f"Unknown split {split!r}; set --config.eval.bpd_dataset to 'train' or 'test'.")
  restored = restored or train.restore_for_inference(config, workdir, step=step, devices=devices)
  sde, _, score_fn, step = restored
  train_ds, test_ds = datasets.get_dataset(config, evaluation=True, uniform_dequantization=False)
  ds = train_ds if split == "train" else test_ds
  e = config.eval
  fn = _program(("likelihood", repr(sde), e.divergence, e.rtol, e.atol, e.eps, config.data.centered, ds.eight_bit,
                 mesh), lambda: jax.jit(_likelihood_fn(config, sde, ds.eight_bit),
                                        out_shardings=parallel.batch_sharding(mesh)))
  unit = "bits/dim" if ds.eight_bit else "nats"
  key = _key(config, _LIKELIHOOD) if key is None else key
  total = min(ds.num_examples, max_examples) if max_examples else ds.num_examples
  progress, values, labels, points = _Progress(f"likelihood ({split})", total, "examples"), [], [], []
  for j, batch in enumerate(ds.make_iterator()):
    sharded = parallel.shard_batch({k: batch[k] for k in ("image", "mask", "label")}, mesh)
    out = fn(jax.random.fold_in(key, j), score_fn, sharded["image"])
    mask = _gather(sharded["mask"])
    values.append(_gather(out)[mask])
    labels.append(_gather(sharded["label"])[mask])
    if ds.density is not None:
      points.append(_gather(sharded["image"])[mask])
    done = sum(len(v) for v in values)
    progress.update(min(done, total), f"mean {np.mean(np.concatenate(values)):.4f} {unit}")
    if done >= total:
      break
  values, labels = np.concatenate(values)[:total], np.concatenate(labels)[:total]
  mean, sem = _mean_and_sem(values)
  exact_mean = None
  if ds.density is not None:
    exact_mean = float(np.mean(np.asarray(ds.density.log_prob(jnp.asarray(np.concatenate(points)[:total])))))
  npz = epath.Path(out_dir) / (name or f"likelihood_{split}_{step}.npz")
  _write_npz(npz, values=values, labels=labels)
  logging.info("likelihood of %d %s examples at step %d: %.5f +- %.5f %s%s; %s", len(values), split, step, mean,
               sem, unit, "" if exact_mean is None else f" (exact density: {exact_mean:.5f} nats)", npz)
  return {"values": values, "mean": mean, "sem": sem, "unit": unit, "split": split, "step": step,
          "npz": str(npz), "exact_mean": exact_mean}


# --- Eval loss -----------------------------------------------------------------------------------------


def eval_loss(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *, split: str = "test",
              step: int | None = None, restored: tuple | None = None,
              devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The training objective of the EMA network over every example of ``split``.

  Each example's time and noise are drawn from ``fold_in(key, batch index)``; padding is masked
  out, so the value is the mean over exactly the split's examples.

  ``restored`` is ``train.restore_for_inference``'s result for ``step``, if the caller has it.

  Returns:
    {"loss": mean per-example loss, "sem": its standard error, "num_examples", "split", "step"}.
  """
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  restored = restored or train.restore_for_inference(config, workdir, step=step, devices=devices)
  sde, model, score_fn, step = restored
  t = config.training

  def build():
    build_score_fn = wrapper.get_score_fn_builder(sde, model, continuous=t.continuous)
    loss_fn = losses.get_loss_fn(sde, build_score_fn, train=False, continuous=t.continuous,
                                 reduce_mean=t.reduce_mean, likelihood_weighting=t.likelihood_weighting,
                                 importance_weighting=t.importance_weighting, eps=t.eps)
    scaler = datasets.get_data_scaler(config.data.centered)
    return jax.jit(lambda key, params, x: loss_fn(key, params, scaler(x))[1]["per_example"],
                   out_shardings=parallel.batch_sharding(mesh))

  per_example = _program(("loss", repr(sde), model, t.to_json(), config.data.centered, mesh), build)
  train_ds, test_ds = datasets.get_dataset(config, evaluation=True)
  ds = train_ds if split == "train" else test_ds
  key, params = _key(config, _LOSS), score_fn.variables["params"]
  progress, values = _Progress(f"eval loss ({split})", ds.num_examples, "examples"), []
  for j, batch in enumerate(ds.make_iterator()):
    sharded = parallel.shard_batch({k: batch[k] for k in ("image", "mask")}, mesh)
    values.append(_gather(per_example(jax.random.fold_in(key, j), params, sharded["image"]))[_gather(sharded["mask"])])
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
  whole test split (``eval.enable_loss``); the likelihood of every example of
  ``eval.bpd_dataset`` in ``eval.bpd_repeats`` passes with fresh dequantisation noise
  (``eval.enable_bpd``; always for 2-D data); ``eval.num_samples`` samples of the configured
  sampler with FID, KID and Inception score against ``eval.fid_stats_path`` (``eval.enable_sampling``).
  Checkpoints not written yet are waited for (``eval.wait_timeout``), so this can run beside training.

  Progress is kept in ``out_dir/ckpt_<n>/`` (the loss, each bits/dim pass, each sampling round), so a
  killed evaluation resumes without recomputing finished parts; a finished checkpoint's results are
  ``out_dir/ckpt_<n>.npz``; ``out_dir/summary.json`` and ``summary.csv`` hold one row per checkpoint,
  and TensorBoard scalars go to ``out_dir/tensorboard``.

  Multi-host: every process runs this with the same arguments; each generates its share of every
  sampling round; results reach every process through collectives; process 0 writes the shared files
  and decides, for every process, which finished parts to skip.

  Returns:
    {"rows": [per-checkpoint result dicts], "json": path, "csv": path}; on processes other than 0 a
    row holds only what that process computed in this call.

  Raises:
    FileNotFoundError: for missing Inception weights or reference statistics, before anything runs.
  """
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from score_sde import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from score_sde import sample_quality  # pylint: disable=g-import-not-at-top
  e = config.eval
  workdir, out_dir = epath.Path(workdir), epath.Path(out_dir)
  mesh = parallel.make_mesh(devices)
  is_host0 = jax.process_index() == 0
  feature_fn = reference = None
  if e.enable_sampling:  # fail now, not after hours of sampling
    feature_fn = sample_quality.get_feature_fn(config, mesh)
    reference = metrics_lib.load_reference_stats(e.fid_stats_path)
  with_likelihood = e.enable_bpd or train.example_shape(config) == (2,)
  if not (e.enable_loss or with_likelihood or e.enable_sampling):
    raise ValueError("Nothing to evaluate: enable eval.enable_loss, eval.enable_bpd or eval.enable_sampling.")
  writer = tensorboardX.SummaryWriter(str(out_dir / "tensorboard")) if is_host0 else None
  rows = []
  try:
    for n in _checkpoint_list(config, workdir):
      step = n * config.training.snapshot_freq
      final = out_dir / f"ckpt_{n}.json"
      if parallel.process0_says(final.exists()):
        rows.append(json.loads(final.read_text()) if is_host0 else {"ckpt": n, "step": step})
        logging.info("checkpoint %d (step %d) was evaluated before: %s", n, step, final)
        continue
      _wait_for_step(workdir, step, e.wait_timeout)
      part = out_dir / f"ckpt_{n}"
      if is_host0:
        part.mkdir(parents=True, exist_ok=True)
      row: dict[str, Any] = {"ckpt": n, "step": step}
      cache: dict[str, tuple] = {}

      def restored() -> tuple:  # the checkpoint is read once, by the first part that needs it
        if "ema" not in cache:
          cache["ema"] = train.restore_for_inference(config, workdir, step=step, devices=devices)
        return cache["ema"]

      if e.enable_loss:
        path = part / "loss.json"
        if not parallel.process0_says(path.exists()):
          loss = eval_loss(config, workdir, step=step, restored=restored(), devices=devices)
          row["eval_loss"] = loss["loss"]
          if is_host0:
            path.write_text(json.dumps({"loss": loss["loss"], "sem": loss["sem"]}))
        elif is_host0:
          row["eval_loss"] = json.loads(path.read_text())["loss"]
      if with_likelihood:
        values = []
        for r in range(e.bpd_repeats):
          name = f"ckpt_{n}/likelihood_{r}.npz"
          if not parallel.process0_says((out_dir / name).exists()):
            key = jax.random.fold_in(jax.random.fold_in(_key(config, _LIKELIHOOD), step), r)
            values.append(likelihood(config, workdir, out_dir, step=step, key=key, name=name, restored=restored(),
                                     devices=devices)["values"])
          elif is_host0:
            with (out_dir / name).open("rb") as f, np.load(f) as data:
              values.append(data["values"])
        unit = "bpd" if train.example_shape(config) != (2,) else "logp_nats"
        if len(values) == e.bpd_repeats:  # on process 0 always; elsewhere when no pass was resumed
          row[unit], row[f"{unit}_sem"] = _mean_and_sem(np.concatenate(values))
      if e.enable_sampling:
        sde, _, score_fn, _ = restored()
        run = _sample_program(config, sde, mesh, quantised=True)
        key = jax.random.fold_in(_key(config, _SAMPLE), step)
        out = sample_quality.sample_features(config, lambda k, fn, first: run(k, fn, first)[0], score_fn, key, mesh,
                                             part / "samples", feature_fn)
        row.update(metrics_lib.compute_metrics(out["pool3"], out["logits"], reference, kid_subsets=e.kid_subsets,
                                               kid_subset_size=min(e.kid_subset_size, len(out["pool3"])),
                                               seed=config.seed))
        if is_host0:
          visualize.save_image_grid(part / "samples.png", out["samples"][:64] / 255.0)
      row = {k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in row.items()}
      if is_host0:
        final.write_text(json.dumps(row, indent=2) + "\n")
        for k, v in row.items():
          if k not in ("ckpt", "step"):
            writer.add_scalar(f"eval/{k}", v, step)
      rows.append(row)
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
