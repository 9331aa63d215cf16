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

import dataclasses
import math
import os
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


# Feature networks of sample quality by ``config.eval.feature_network`` ("" picks by data set: ``feature_network_of``).
FEATURE_NETWORKS = ("inception", "digits", "points")
_REFERENCE_POINTS = 2000  # held-out points of a 2-D set the energy distance compares samples with


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """Features of uint8 images, ``fn(images (B, H, W, C)) -> (features (B, d), logits (B, K))`` (batch-sharded),
  with the reference statistics of the data set in the same space."""

  name: str
  fn: Callable[[Array], tuple[Array, Array]]
  reference: metrics.ReferenceStats
  density: Any = None

  def scores(self, out: dict[str, Any], *, kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, float]:
    """FID / KID / IS (``inception``); FD / KID in the digits classifier's space and the accuracy of the
    classes of class-conditional samples (``digits``); or the energy distance to held-out points and the
    exact mean log-density of the samples where the set has one (``points``), of ``sample_features``' output."""
    if self.name == "points":
      scores = {"energy_distance": metrics.energy_distance(out["features"], self.reference.features)}
      if self.density is not None:
        scores["sample_logp"] = float(np.mean(np.asarray(self.density.log_prob(jnp.asarray(out["features"])))))
      return scores
    size = min(kid_subset_size, len(out["features"]))
    if self.name == "inception":
      return metrics.compute_metrics(out["features"], out["logits"], self.reference, kid_subsets=kid_subsets,
                                     kid_subset_size=size, seed=seed)
    found = metrics.compute_metrics(out["features"], None, self.reference, kid_subsets=kid_subsets,
                                    kid_subset_size=size, seed=seed)
    scores = {"fd_digits": found["fid"], "kid_digits": found["kid"], "kid_digits_std": found["kid_std"]}
    if out.get("labels") is not None:
      scores["class_accuracy"] = float(np.mean(np.argmax(out["logits"], axis=1) == out["labels"]))
    return scores


def feature_network_of(config: ml_collections.ConfigDict) -> str:
  """``config.eval.feature_network``, or when "": ``points`` for 2-D sets, ``digits`` for the digits sets, else
  ``inception``."""
  name, dataset = config.eval.feature_network, config.data.dataset.lower()
  if name:
    if name not in FEATURE_NETWORKS:
      raise ValueError(f"config.eval.feature_network={name!r} is not one of {list(FEATURE_NETWORKS)}; set "
                       f"--config.eval.feature_network (or leave it empty to choose by data set).")
    return name
  if dataset in datasets.TOY_DATASETS:
    return "points"
  return "digits" if dataset in ("digits", "digits_rgb") else "inception"


def get_feature_network(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                        cache_dir: str | epath.PathLike) -> FeatureNetwork:
  """The feature network ``config.eval.feature_network`` with its reference statistics.

  ``inception``: the FID Inception (``eval.inception_path``) and ``eval.fid_stats_path``. ``digits``: a
  classifier of the data set's training split (``digits_features``, trained once and kept in ``cache_dir``),
  referenced to the features of that split.

  Raises:
    FileNotFoundError: for missing Inception weights or reference statistics (with where to get them).
  """
  name = feature_network_of(config)
  if name == "points":
    dataset = config.data.dataset.lower()
    points = datasets.toy_source(dataset, "test").images[:_REFERENCE_POINTS]
    density = datasets.toy_density(dataset) if dataset in datasets.TOY_DENSITIES else None
    fn = jax.jit(lambda x: (x.reshape(x.shape[0], -1), jnp.zeros((x.shape[0], 1))),
                 out_shardings=(parallel.batch_sharding(mesh),) * 2)
    return FeatureNetwork(name, fn, metrics.ReferenceStats(mu=points.mean(0), sigma=np.cov(points.T),
                                                            features=points), density)
  if name == "inception":
    return FeatureNetwork(name, get_feature_fn(config, mesh), metrics.load_reference_stats(config.eval.fid_stats_path))
  from score_sde import digits_features  # pylint: disable=g-import-not-at-top
  dataset = config.data.dataset.lower()
  network = digits_features.load_or_train(dataset, cache_dir)
  logging.info("digits feature network: %.1f%% accuracy on the %s test split.", 100 * network.test_accuracy,
               dataset)
  train_images = datasets.IMAGE_DATASETS[dataset].source("train", None).images
  features = np.asarray(network.apply(jnp.asarray(train_images))[0], np.float64)
  stats = metrics.FeatureStats.from_features(features)
  sharding = parallel.batch_sharding(mesh)
  fn = jax.jit(network.apply, out_shardings=(sharding, sharding))
  return FeatureNetwork(name, fn, metrics.ReferenceStats(mu=stats.mu, sigma=stats.sigma, features=features))


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


def sample_features(config: ml_collections.ConfigDict, draw: Callable, score_fn_for: Callable, key: Array,
                    mesh: jax.sharding.Mesh, round_dir: str | epath.PathLike,
                    feature_fn: Callable) -> dict[str, Any]:
  """Generates ``config.eval.num_samples`` samples in resumable rounds and returns their features.

  Args:
    config: reads ``sampling.batch_size`` and ``eval.num_samples``.
    draw: ``draw(key, score_fn, first_index) -> (uint8 samples (B, H, W, C) batch-sharded, nfe)`` for
      batches of B = ``sampling.batch_size`` (the sampler, inverse scaler and ``quantise``).
    score_fn_for: ``score_fn_for(first, size) -> (score_fn, labels (size,) or None)``, the score
      function of samples first..first+size-1 (``builders.build_guided_score_fns``).
    key: the sampling key of this checkpoint.
    mesh: the device mesh.
    round_dir: where the rounds' files go (one folder per checkpoint and sampler).
    feature_fn: ``images -> (features (B, d), logits (B, K))``, batch-sharded (``FeatureNetwork.fn``).

  Returns:
    {"features": (N, d), "logits": (N, K), "samples": (N, H, W, C) uint8, "labels": (N,) or None,
    "nfe": score evaluations per sample, "samples_per_second": of the rounds computed here (after the
    first, compiling one when there are several; None when every round was read back)}, on every host.
  """
  batch = config.sampling.batch_size
  parallel.check_batch_size(batch, mesh, "sampling.batch_size")
  rounds = math.ceil(config.eval.num_samples / batch)
  round_dir = epath.Path(round_dir)
  round_dir.mkdir(parents=True, exist_ok=True)
  sharding = parallel.batch_sharding(mesh)
  gathered = {"samples": [], "features": [], "logits": []}
  labels, nfe, timed = [], 0, []
  for r in range(rounds):
    path = round_dir / f"round_{r}_host_{jax.process_index()}.npz"
    fn, round_labels = score_fn_for(r * batch, batch)
    if parallel.all_processes(path.exists()):  # finished before an interruption, on every host: rebuild
      # the global arrays from each host's own rows (a round that some host lacks is redone by all).
      with path.open("rb") as f, np.load(f) as data:
        local = {name: data[name] for name in gathered}
        nfe = int(data["nfe"])
      arrays = {name: jax.make_array_from_process_local_data(
          sharding, value, (batch,) + value.shape[1:]) for name, value in local.items()}
    else:
      started = time.perf_counter()
      images, round_nfe = draw(key, fn, jnp.int32(r * batch))
      features, logits = feature_fn(images)
      arrays = {"samples": images, "features": features, "logits": logits}
      jax.block_until_ready(arrays)
      if r > 0 or rounds == 1:
        timed.append((batch, time.perf_counter() - started))
      nfe = int(round_nfe)
      _save_atomic(path, nfe=np.asarray(nfe), **{name: _local_rows(value) for name, value in arrays.items()})
    for name, value in arrays.items():
      gathered[name].append(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
    labels.append(round_labels)
    logging.info("sampling round %d/%d done (%d samples).", r + 1, rounds, (r + 1) * batch)
  n = config.eval.num_samples
  out = {name: np.concatenate(chunks)[:n] for name, chunks in gathered.items()}
  out["labels"] = None if labels[0] is None else np.concatenate(labels)[:n]
  out["nfe"] = nfe
  out["samples_per_second"] = (sum(b for b, _ in timed) / sum(t for _, t in timed)) if timed else None
  return out


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
