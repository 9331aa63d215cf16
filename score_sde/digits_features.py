"""A feature network for sample quality on the embedded digits, trained by the framework in seconds.

    network = digits_features.load_or_train("digits", cache_dir)     # params cached as an .npz
    features, logits = network.apply(uint8 images (B, 8, 8, C))      # (B, 128), (B, 10)

The FID Inception weights cannot ship with the package, and 8x8 digits are far from ImageNet, so
sample quality on ``digits`` / ``digits_rgb`` is measured in the feature space of a small classifier of
the data set's own training split: the Fréchet distance of its penultimate features ("FD_digits",
computed like FID), KID in the same space, and the accuracy with which it recognises the class of
class-conditional samples. Training is deterministic (fixed seed, full-batch-free Adam on a fixed
schedule, one compiled program), so every evaluation uses the same network.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from score_sde import datasets

Array = jax.Array
FEATURES = 128
_STEPS, _BATCH, _LR, _SEED = 3000, 128, 1e-3, 0


class DigitsClassifier(nn.Module):
  """MLP on the flattened [0, 1] image: 256 -> FEATURES (the features) -> 10 logits."""

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    features = nn.relu(nn.Dense(FEATURES)(h))
    return features, nn.Dense(10)(features)


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A trained ``DigitsClassifier``: ``apply(uint8 images (B, H, W, C)) -> (features, logits)``."""

  params: Any
  test_accuracy: float

  def apply(self, images: Array) -> tuple[Array, Array]:
    return DigitsClassifier().apply({"params": self.params}, images.astype(jnp.float32) / 255.0)


def train(dataset: str) -> FeatureNetwork:
  """Trains the classifier on the training split of ``digits`` or ``digits_rgb`` (a few seconds on a CPU)."""
  source = datasets.IMAGE_DATASETS[dataset].source
  train_split, test_split = source("train", None), source("test", None)
  x, y = jnp.asarray(train_split.images), jnp.asarray(train_split.labels)
  model, optimizer = DigitsClassifier(), optax.adamw(_LR, weight_decay=1e-4)
  params = model.init(jax.random.key(_SEED), jnp.zeros((1,) + x.shape[1:]))["params"]

  def loss_fn(p, xb, yb):
    _, logits = model.apply({"params": p}, xb.astype(jnp.float32) / 255.0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def fit(params):
    def step(carry, key):
      p, opt_state = carry
      index = jax.random.choice(key, x.shape[0], (_BATCH,), replace=False)
      grads = jax.grad(loss_fn)(p, x[index], y[index])
      updates, opt_state = optimizer.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    keys = jax.random.split(jax.random.key(_SEED + 1), _STEPS)
    return jax.lax.scan(step, (params, optimizer.init(params)), keys)[0][0]

  params = fit(params)
  network = FeatureNetwork(params=params, test_accuracy=0.0)
  _, logits = network.apply(jnp.asarray(test_split.images))
  accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=1) == test_split.labels))
  return dataclasses.replace(network, test_accuracy=accuracy)


def load_or_train(dataset: str, cache_dir: str | epath.PathLike) -> FeatureNetwork:
  """The classifier of ``dataset`` from ``cache_dir/digits_classifier_<dataset>.npz``, trained and saved if absent."""
  if dataset not in ("digits", "digits_rgb"):
    raise ValueError(f"The digits feature network is trained on 'digits' or 'digits_rgb', not {dataset!r}; set "
                     f"--config.eval.feature_network=inception (with eval.inception_path) for other data sets.")
  path = epath.Path(cache_dir) / f"digits_classifier_{dataset}.npz"
  if path.exists():
    with path.open("rb") as f, np.load(f) as data:
      flat = {k: data[k] for k in data.files}
    accuracy = float(flat.pop("test_accuracy"))
    params = {}
    for name, value in flat.items():
      layer, leaf = name.split("/")
      params.setdefault(layer, {})[leaf] = jnp.asarray(value)
    return FeatureNetwork(params=params, test_accuracy=accuracy)
  network = train(dataset)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{layer}/{leaf}": np.asarray(v) for layer, leaves in network.params.items() for leaf, v in leaves.items()}
    with path.open("wb") as f:
      np.savez(f, test_accuracy=np.asarray(network.test_accuracy), **flat)
  return network
