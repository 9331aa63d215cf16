"""Inception features of data and of generated samples, for FID, KID and the Inception score.

    feature_fn = sample_quality.get_feature_fn(config, mesh)         # uint8 images -> (pool3, logits)
    path = sample_quality.fid_stats(config, out_path)                # reference statistics of a data set
    pool3, logits = sample_quality.sample_features(config, sampler, score_fn, key, mesh, round_dir)

The Inception network is ``models.inception.InceptionV3`` with weights from
``config.eval.inception_path`` (loaded before anything else runs, so a missing file fails in a
second). Images enter as uint8, as saved images would be: data pixels as they are stored, samples
quantised with ``round(clip(255 x, 0, 255))``. They are resized to ``config.eval.inception_size``
(299, the reference protocol; smaller values only for quick tests).

Sampling rounds are resumable and multi-host. Round r draws samples ``r B .. (r + 1) B - 1`` (B =
``sampling.batch_size``; sample i from ``fold_in(key, i)``), so the samples do not depend on the
batch size or the device count. Each host writes its own rows of each round to
``round_dir/round_<r>_host_<p>.npz`` (uint8 samples, pool3 features, logits) with an atomic
rename; a restarted evaluation loads the finished rounds instead of recomputing them, and every
host receives every row through a collective (``process_allgather``), not by reading other hosts'
files.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from score_sde import datasets
from score_sde import metrics
from score_sde import parallel
from score_sde.models import inception

Array = jax.Array


_FEATURE_FNS: dict[tuple, Callable] = {}


def get_feature_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> Callable[[Array], tuple[Array, Array]]:
  """``fn(images uint8 (B, H, W, C) sharded) -> (pool3 (B, 2048), logits (B, 1008))``, sharded like the batch.

  Built once per weight file (and its modification time), size and mesh, so later calls reuse the
  compiled network.

  Raises:
    FileNotFoundError: when ``config.eval.inception_path`` is unset or missing (with where to get it).
  """
  path = config.eval.inception_path
  key = (path, os.path.getmtime(path) if path and os.path.isfile(path) else None, int(config.eval.inception_size),
         mesh)
  if key not in _FEATURE_FNS:
    _FEATURE_FNS[key] = _build_feature_fn(config, mesh)
  return _FEATURE_FNS[key]


def _build_feature_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable:
  variables = parallel.replicate(inception.load_variables(config.eval.inception_path), mesh)
  size = int(config.eval.inception_size)
  net = inception.InceptionV3(resize=False)

  def features(images):
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear", antialias=False)
    return net.apply(variables, x)

  out = parallel.batch_sharding(mesh)
  return jax.jit(features, out_shardings=(out, out))


def quantise(x: Array) -> Array:
  """Samples in [0, 1] as the uint8 pixels a saved image would hold."""
  return jnp.round(jnp.clip(x * 255.0, 0.0, 255.0)).astype(jnp.uint8)


def _local_rows(x: Array) -> np.ndarray:
  """This host's rows of a batch-sharded array, in global order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # a row block may be replicated over several local devices
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


def _save_atomic(path: epath.Path, **arrays: np.ndarray) -> None:
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("wb") as f:
    np.savez(f, **arrays)
  os.replace(os.fspath(tmp), os.fspath(path))


def sample_features(config: ml_collections.ConfigDict, draw: Callable, score_fn: Any, key: Array,
                    mesh: jax.sharding.Mesh, round_dir: str | epath.PathLike,
                    feature_fn: Callable | None = None) -> dict[str, np.ndarray]:
  """Generates ``config.eval.num_samples`` samples in resumable rounds and returns their features.

  Args:
    config: reads ``sampling.batch_size`` and ``eval.num_samples``.
    draw: ``draw(key, score_fn, first_index) -> uint8 samples`` (B, H, W, C), batch-sharded, for
      batches of B = ``sampling.batch_size`` (the sampler, inverse scaler and ``quantise``).
    score_fn: the score function (a pytree callable, e.g. the EMA network's).
    key: the sampling key of this checkpoint.
    mesh: the device mesh.
    round_dir: where the rounds' files go (one folder per checkpoint).
    feature_fn: ``get_feature_fn(config, mesh)`` (built here if None).

  Returns:
    {"pool3": (N, 2048), "logits": (N, 1008), "samples": (N, H, W, C) uint8} of all N samples, on
    every host.
  """
  feature_fn = feature_fn or get_feature_fn(config, mesh)
  batch = config.sampling.batch_size
  parallel.check_batch_size(batch, mesh, "sampling.batch_size")
  rounds = math.ceil(config.eval.num_samples / batch)
  round_dir = epath.Path(round_dir)
  round_dir.mkdir(parents=True, exist_ok=True)
  sharding = parallel.batch_sharding(mesh)
  gathered = {"samples": [], "pool3": [], "logits": []}
  for r in range(rounds):
    path = round_dir / f"round_{r}_host_{jax.process_index()}.npz"
    if parallel.all_processes(path.exists()):  # finished before an interruption, on every host: rebuild
      # the global arrays from each host's own rows (a round that some host lacks is redone by all).
      with path.open("rb") as f, np.load(f) as data:
        local = {name: data[name] for name in gathered}
      arrays = {name: jax.make_array_from_process_local_data(
          sharding, value, (batch,) + value.shape[1:]) for name, value in local.items()}
    else:
      images = draw(key, score_fn, jnp.int32(r * batch))
      pool3, logits = feature_fn(images)
      arrays = {"samples": images, "pool3": pool3, "logits": logits}
      _save_atomic(path, **{name: _local_rows(value) for name, value in arrays.items()})
    for name, value in arrays.items():
      gathered[name].append(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
    logging.info("sampling round %d/%d done (%d samples).", r + 1, rounds, (r + 1) * batch)
  n = config.eval.num_samples
  return {name: np.concatenate(chunks)[:n] for name, chunks in gathered.items()}


def fid_stats(config: ml_collections.ConfigDict, out_path: str | epath.PathLike, *, split: str = "train",
              devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Reference statistics of every example of a data set split, from its uint8 pixels.

  No dequantisation, no flips, no example dropped (the padded last batch is masked). Writes
  ``mu``, ``sigma`` and the pool3 ``features`` (for KID) to ``out_path``.

  Returns:
    {"path", "num_examples", "mu", "sigma"}.
  """
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  feature_fn = get_feature_fn(config, mesh)
  train_ds, test_ds = datasets.get_dataset(config, evaluation=True, uniform_dequantization=False)
  ds = train_ds if split == "train" else test_ds
  if not ds.eight_bit:
    raise ValueError(f"FID statistics need 8-bit images; {ds.name} is not an image set.")
  features = []
  for j, batch in enumerate(ds.make_iterator()):
    sharded = parallel.shard_batch({"image": np.round(batch["image"] * 255.0).astype(np.uint8),
                                    "mask": batch["mask"]}, mesh)
    pool3, _ = feature_fn(sharded["image"])
    mask = np.asarray(multihost_utils.process_allgather(sharded["mask"], tiled=True))
    features.append(np.asarray(multihost_utils.process_allgather(pool3, tiled=True))[mask])
    if j % 20 == 0:
      logging.info("fid_stats: %d/%d batches", j + 1, ds.num_batches)
  features = np.concatenate(features)
  stats = metrics.FeatureStats.from_features(features)
  out_path = epath.Path(out_path)
  if jax.process_index() == 0:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metrics.save_reference_stats(os.fspath(out_path), stats.mu, stats.sigma, features)
  logging.info("reference statistics of %d %s examples: %s", len(features), ds.name, out_path)
  return {"path": str(out_path), "num_examples": len(features), "mu": stats.mu, "sigma": stats.sigma}
