"""Guided class-conditional sampling: score functions of p(x | y) that any sampler takes.

    score_fn = guidance.classifier_guided_score(score_fn, logit_fn, labels, scale=1.0)
    score_fn = guidance.classifier_free_guided_score(cond_score_fn, labels, scale=1.0, null_label=C)
    samples, nfe = sampler(key, score_fn)

Classifier guidance (Song et al. 2021, Sec. 5; the scale gamma of Dhariwal & Nichol 2021). By
Bayes, p_t(x | y) ~ p_t(x) p_t(y | x), so

    s_gamma(x, t | y) = s(x, t) + gamma grad_x log p_t(y | x),

with p_t(y | x) = softmax(f(x, t))_y from a noise-conditional classifier (``logit_fn``). gamma = 1
is the conditional score itself (exactly so for an exact s and classifier); gamma > 1 samples
p_t(x) p_t(y | x)^gamma, sharper classes. One ``jax.grad`` of the classifier per evaluation.

Classifier-free guidance (Ho & Salimans 2022). One network trained with label dropout gives both
s(x, t | y) and the unconditional s(x, t) (the null label); with guidance weight w,

    s_w(x, t | y) = (1 + w) s(x, t | y) - w s(x, t) = s(x, t | y) + w (s(x, t | y) - s(x, t)).

Convention: w = 0 is the conditional model, w > 0 strengthens the class (w = gamma - 1 of an
implicit classifier p(y | x) ~ p(x | y) / p(x)), w = -1 is the unconditional model. The network is
called once per evaluation, on the doubled batch [x; x] with labels [y; null].

Both guided score functions are pytrees (``flax.struct``): the wrapped functions' arrays, the labels
and the scale are leaves, so a jitted sampler given new labels or a new scale does not recompile.

From a config (``--mode sample``): ``builders.build_guided_score_fns``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from score_sde import sde as sde_lib

Array = jax.Array
ScoreFn = sde_lib.ScoreFn
LogitFn = Callable[[Array, Array], Array]
"""``logit_fn(x (B, ...), t (B,)) -> (B, num_classes)``, each example classified on its own."""
ConditionalScoreFn = Callable[[Array, Array, Array], Array]
"""``cond_score_fn(x (B, ...), t (B,), labels (B,) int) -> (B, ...)``; the null label gives s(x, t)."""

# Guidance by ``config.sampling.guidance``.
GUIDANCES = ("none", "classifier", "classifier_free")


def _scaled(scale: Array, v: Array) -> Array:
  """scale () or (B,) times v (B, ...)."""
  return jnp.reshape(scale, scale.shape + (1,) * (v.ndim - scale.ndim)) * v


def _check_batch(labels: Array, x: Array) -> None:
  if labels.shape != x.shape[:1]:
    raise ValueError(f"The guided score function holds {labels.shape[0]} labels but was called on a batch of "
                     f"{x.shape[0]}; build it with one label per sample.")


class ClassifierGuidedScore(struct.PyTreeNode):
  """s(x, t) + scale grad_x log softmax(logit_fn(x, t))_y; build with ``classifier_guided_score``.

  Attributes:
    score_fn: the unconditional score ``score_fn(x, t)``.
    logit_fn: the noise-conditional classifier ``logit_fn(x, t) -> (B, C)``.
    labels: (B,) int32 target classes.
    scale: () or (B,) float32 guidance scale gamma.
  """

  score_fn: Any
  logit_fn: Any
  labels: Array
  scale: Array

  def __call__(self, x: Array, t: Array) -> Array:
    """The guided score for x (B, ...) and t (B,) (a scalar is broadcast); shaped like x."""
    _check_batch(self.labels, x)
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])

    def log_p_y(x_: Array) -> Array:  # sum_i log p_t(y_i | x_i): example i's gradient is its own term's
      log_probs = jax.nn.log_softmax(self.logit_fn(x_, t).astype(jnp.float32), axis=-1)
      return jnp.sum(jnp.take_along_axis(log_probs, self.labels[:, None], axis=1))

    return self.score_fn(x, t) + _scaled(self.scale, jax.grad(log_p_y)(x)).astype(x.dtype)


class ClassifierFreeGuidedScore(struct.PyTreeNode):
  """(1 + w) s(x, t | y) - w s(x, t) from one call on [x; x]; build with ``classifier_free_guided_score``.

  Attributes:
    cond_score_fn: ``cond_score_fn(x, t, labels)``; ``null_label`` gives the unconditional score.
    labels: (B,) int32 classes y.
    scale: () or (B,) float32 guidance weight w.
    null_label: the label of the unconditional score (C for a network of C classes).
  """

  cond_score_fn: Any
  labels: Array
  scale: Array
  null_label: int = struct.field(pytree_node=False)

  def __call__(self, x: Array, t: Array) -> Array:
    """The guided score for x (B, ...) and t (B,) (a scalar is broadcast); shaped like x."""
    _check_batch(self.labels, x)
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (b,))
    # One network call: conditional scores on the first half, unconditional on the second.
    labels = jnp.concatenate([self.labels, jnp.full((b,), self.null_label, self.labels.dtype)])
    s = self.cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), labels)
    s_cond, s_uncond = s[:b], s[b:]
    return s_cond + _scaled(self.scale, s_cond - s_uncond).astype(x.dtype)


def _labels(labels: Any) -> Array:
  array = np.asarray(labels)
  if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or np.any(array < 0):
    raise ValueError(f"labels must be a 1-D array of non-negative integers (one class per sample), got shape "
                     f"{array.shape}, dtype {array.dtype}.")
  return jnp.asarray(array, jnp.int32)


def _scale(scale: Any, what: str) -> Array:
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim > 1:
    raise ValueError(f"The {what} must be a number or one per sample (B,), got shape {scale.shape}.")
  return scale


def classifier_guided_score(score_fn: ScoreFn, logit_fn: LogitFn, labels: Any, scale: Any = 1.0
                            ) -> ClassifierGuidedScore:
  """The classifier-guided score s(x, t) + scale grad_x log p_t(y | x), for every SDE.

  Args:
    score_fn: the unconditional score ``score_fn(x (B, ...), t (B,))``.
    logit_fn: ``logit_fn(x, t) -> (B, C)`` logits of p_t(y | x), each example classified on its own
      (``models.wrapper.get_logit_fn``: the classifier sees the SDE's marginal std at t).
    labels: (B,) int target classes in [0, C).
    scale: guidance scale gamma, () or (B,); 1 gives p(x | y), larger values sharper classes.

  Returns:
    A pytree ``score_fn(x, t)`` for samplers, for batches of B samples.
  """
  return ClassifierGuidedScore(score_fn=score_fn, logit_fn=logit_fn, labels=_labels(labels),
                               scale=_scale(scale, "guidance scale"))


def classifier_free_guided_score(cond_score_fn: ConditionalScoreFn, labels: Any, scale: Any = 0.0, *,
                                 null_label: int) -> ClassifierFreeGuidedScore:
  """The classifier-free guided score (1 + w) s(x, t | y) - w s(x, t), one network call per evaluation.

  Args:
    cond_score_fn: ``cond_score_fn(x, t, labels)``, e.g. the ``ScoreFunction`` of a network trained
      with ``training.label_dropout`` (``models.wrapper.get_score_fn``); ``null_label`` must give the
      unconditional score s(x, t).
    labels: (B,) int classes y in [0, null_label).
    scale: guidance weight w, () or (B,); 0 is the conditional model, -1 the unconditional one.
    null_label: the unconditional label (``models.wrapper.num_classes_of(model)`` for this package's
      networks).

  Returns:
    A pytree ``score_fn(x, t)`` for samplers, for batches of B samples.
  """
  labels = _labels(labels)
  if null_label < 1 or (labels.size and int(jnp.max(labels)) >= null_label):
    raise ValueError(f"labels must lie in [0, null_label={null_label}); null_label is the class count C of the "
                     f"network, which must be >= 1.")
  return ClassifierFreeGuidedScore(cond_score_fn=cond_score_fn, labels=labels,
                                   scale=_scale(scale, "guidance weight"), null_label=int(null_label))


__all__ = ["ClassifierFreeGuidedScore", "ClassifierGuidedScore", "GUIDANCES", "classifier_free_guided_score",
           "classifier_guided_score"]
