"""Inference on a trained run: samples, likelihoods and the full-split eval loss.

    result = evaluate.sample(config, workdir, out_dir)        # .npz + PNG of EMA samples
    result = evaluate.likelihood(config, workdir, out_dir)    # per-example values + mean and s.e.
    result = evaluate.eval_loss(config, workdir)              # the loss over the whole eval split
    result = evaluate.evaluate(config, workdir, out_dir)      # loss and likelihood, summary JSON

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

from score_sde import datasets
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
  points for 2-D data).

  Returns:
    {"samples": (N, ...) numpy, "nfe": score evaluations per sample, "step", "npz", "png",
    "non_finite": samples with a non-finite entry}.
  """
  mesh = parallel.make_mesh(devices)
  batch = config.sampling.batch_size
  parallel.check_batch_size(batch, mesh, "sampling.batch_size")
  num_samples = int(num_samples or config.eval.num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be positive, got {num_samples}; set --config.eval.num_samples.")
  sde, _, score_fn, step = train.restore_for_inference(config, workdir, step=step, devices=devices)
  shape = (batch,) + train.example_shape(config)
  sampler = train.build_sampler(config, sde, shape)
  run = jax.jit(lambda key, fn, first: sampler(key, fn, first_index=first), out_shardings=(
      parallel.batch_sharding(mesh), parallel.replicated(mesh)))
  key = _key(config, _SAMPLE)
  rounds = math.ceil(num_samples / batch)
  progress, chunks, nfe = _Progress("sampling", rounds * batch, "samples"), [], 0
  for r in range(rounds):
    x, nfe = run(key, score_fn, jnp.int32(r * batch))
    chunks.append(_gather(x))
    progress.update((r + 1) * batch)
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
  samples = np.asarray(inverse_scaler(np.concatenate(chunks)[:num_samples]))
  out_dir = epath.Path(out_dir)
  npz, png = out_dir / f"samples_{step}.npz", out_dir / f"samples_{step}.png"
  _write_npz(npz, samples=samples)
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
  return {"samples": samples, "nfe": int(nfe), "step": step, "npz": str(npz), "png": str(png),
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
               devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The PF-ODE likelihood of every example of a split (``config.eval.bpd_dataset`` by default).

  Solver settings are ``config.eval.{divergence, rtol, atol, eps}``; batches of
  ``config.eval.batch_size`` are sharded over the devices; the last, partial batch is padded and
  its padding dropped, so every example counts once. Writes ``out_dir/likelihood_<split>_<step>.npz``
  (``values`` (N,), ``labels`` (N,)).

  Args:
    max_examples: stop after this many examples (default ``config.eval.likelihood_examples``; 0: the
      whole split).

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
  sde, _, score_fn, step = train.restore_for_inference(config, workdir, step=step, devices=devices)
  train_ds, test_ds = datasets.get_dataset(config, evaluation=True, uniform_dequantization=False)
  ds = train_ds if split == "train" else test_ds
  fn = jax.jit(_likelihood_fn(config, sde, ds.eight_bit), out_shardings=parallel.batch_sharding(mesh))
  unit = "bits/dim" if ds.eight_bit else "nats"
  key = _key(config, _LIKELIHOOD)
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
  npz = epath.Path(out_dir) / f"likelihood_{split}_{step}.npz"
  _write_npz(npz, values=values, labels=labels)
  logging.info("likelihood of %d %s examples at step %d: %.5f +- %.5f %s%s; %s", len(values), split, step, mean,
               sem, unit, "" if exact_mean is None else f" (exact density: {exact_mean:.5f} nats)", npz)
  return {"values": values, "mean": mean, "sem": sem, "unit": unit, "split": split, "step": step,
          "npz": str(npz), "exact_mean": exact_mean}


# --- Eval loss -----------------------------------------------------------------------------------------


def eval_loss(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *, split: str = "test",
              step: int | None = None, devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The training objective of the EMA network over every example of ``split``.

  Each example's time and noise are drawn from ``fold_in(key, batch index)``; padding is masked
  out, so the value is the mean over exactly the split's examples.

  Returns:
    {"loss": mean per-example loss, "sem": its standard error, "num_examples", "split", "step"}.
  """
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  sde, model, score_fn, step = train.restore_for_inference(config, workdir, step=step, devices=devices)
  t = config.training
  build_score_fn = wrapper.get_score_fn_builder(sde, model, continuous=t.continuous)
  loss_fn = losses.get_loss_fn(sde, build_score_fn, train=False, continuous=t.continuous,
                               reduce_mean=t.reduce_mean, likelihood_weighting=t.likelihood_weighting,
                               importance_weighting=t.importance_weighting, eps=t.eps)
  scaler = datasets.get_data_scaler(config.data.centered)
  per_example = jax.jit(lambda key, params, x: loss_fn(key, params, scaler(x))[1]["per_example"],
                        out_shardings=parallel.batch_sharding(mesh))
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


def evaluate(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, out_dir: str | epath.PathLike, *,
             step: int | None = None, devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """The eval loss (``eval.enable_loss``) and the likelihood (``eval.enable_bpd``, always for 2-D data).

  Writes ``out_dir/eval_<step>.json`` with the results (without per-example arrays).
  """
  results: dict[str, Any] = {}
  if config.eval.enable_loss:
    results["loss"] = eval_loss(config, workdir, step=step, devices=devices)
  if config.eval.enable_bpd or train.example_shape(config) == (2,):
    lik = likelihood(config, workdir, out_dir, step=step, devices=devices)
    results["likelihood"] = {k: v for k, v in lik.items() if k != "values"}
  if not results:
    raise ValueError("Nothing to evaluate: set --config.eval.enable_loss=True or --config.eval.enable_bpd=True.")
  step = next(iter(results.values()))["step"]
  path = epath.Path(out_dir) / f"eval_{step}.json"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
  results["json"] = str(path)
  return results
