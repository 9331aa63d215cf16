"""From a network to a score function: the only code that knows what a network predicts.

A network takes (x, labels) and returns an array shaped like x. What the labels are and how the
output becomes the score s(x, t) = grad_x log p_t(x) is fixed by the original's checkpoints
(Song et al. 2021, ``models/utils.get_score_fn``), and is matched here exactly:

| SDE    | training   | network label                     | score                   |
|--------|------------|-----------------------------------|-------------------------|
| VP     | continuous | 999 t                             | -out / sigma_t          |
| VP     | discrete   | t (N - 1)                         | -out / sqrt(1 - abar_i) |
| subVP  | continuous | 999 t                             | -out / sigma_t          |
| VE     | continuous | sigma_t                           | out                     |
| VE     | discrete   | round((T - t)(N - 1))             | out                     |

VP and subVP networks predict the noise eps (x_t = alpha_t x_0 + sigma_t eps); VE networks output
the score. sigma_t is the marginal std of ``sde.marginal_prob``; abar_i is the DDPM table
(``VPSDE.sqrt_1m_alphas_cumprod``). The continuous VP label 999 t ignores N: the original
hard-codes it, and its checkpoints were trained with it. The discrete VE label indexes the
*descending* SMLD table, sigma_desc[k] = ``VESDE.discrete_sigmas[N - 1 - k]``, as NCSN's did.
VE networks built with ``scale_by_sigma`` divide their output by that noise level themselves (sigma
is the continuous label, or the table entry of the discrete one), as the original's models did, so
the wrapper never rescales; a noise-predicting (VP / subVP) network must not set it.

Rounding (a departure from both originals). The JAX original (``int(labels)``) and the PyTorch port
(``.long()``) truncate the discrete VP index t (N - 1); here it is rounded. The reason holds for times
computed by XLA as t_i = i / (N - 1) in float32, as the discrete losses here do: t_i (N - 1) falls just
below i for 170 of the 1000 levels of N = 1000 (first at i = 15: 14.999999), and truncation would take
level i - 1, a std 5% too small. It does not hold for the originals' sampling times linspace(T, eps, N),
where t (N - 1) = N - 1 - j (1 - eps) has the fraction j eps: rounding takes the table entry above
truncation's wherever that fraction is at least 1/2 (for N = 1000 and eps = 1e-3, every step from
j = 500 on, measured in float32), so on those steps a discrete VP model sampled here sees the
neighbouring std of the table.
The network label itself stays the real number t (N - 1), as in the original.

Why a table keyed by SDE class rather than an SDE method: the parameterisation is a convention of
trained networks, not a property of the diffusion, so it belongs with the models (an SDE may serve
networks trained under other conventions); a single literal table keeps every convention in view.
A subclass of a listed SDE inherits its parent's entry.

Two forms of score function, both ``ScoreFunction`` objects (pytrees):
* ``get_score_fn(sde, model, variables, continuous=...)`` for samplers and likelihoods. The
  variables are pytree leaves and the model / SDE static fields, so a jitted sampler given new
  parameters of the same shapes traces them instead of recompiling (flax modules hash by their
  fields; an SDE hashes by identity, so reuse the same SDE object).
* ``get_score_fn_builder(...)`` returns ``build_score_fn(params, key, train)``, the form the losses
  take: ``params`` is the trainable pytree (``variables["params"]``), ``key`` feeds dropout.

Class-conditional networks (``num_classes`` C > 0: ``mlp``, ``unet``) take int class labels in
[0, C], C being the null class (no label: the unconditional score of classifier-free guidance).
``get_score_fn(..., class_labels=y)`` binds them as a pytree leaf, so s(x, t | y) keeps the sampler
interface ``score_fn(x, t)`` and new labels of the same shape do not recompile; a ``ScoreFunction``
also takes them per call, ``score_fn(x, t, y)`` (what ``guidance.classifier_free_guided_score``
uses). Without labels a class-conditional network gives the unconditional score.

Noise-conditional classifiers (``models.classifier``) become *logit functions* the same way,
``get_logit_fn(sde, classifier, variables)(x, t) -> (B, num_classes)``: the classifier sees the
marginal std sigma_t of the SDE at t (the original's ``ve_noise_scale``, for every SDE).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from score_sde import sde as sde_lib

Array = jax.Array
Params = Any  # A pytree of arrays.
Variables = Mapping[str, Any]  # Flax variables: {"params": ..., other collections}.
ScoreFnBuilder = sde_lib.ScoreFnBuilder

_VP_CONTINUOUS_LABEL_SCALE = 999.0  # The original's hard-coded continuous VP label 999 t.


def _vp_continuous(sde: sde_lib.SDE, t: Array) -> tuple[Array, Array]:
  return _VP_CONTINUOUS_LABEL_SCALE * t, sde.alpha_sigma(t)[1]


def _vp_discrete(sde: sde_lib.VPSDE, t: Array) -> tuple[Array, Array]:
  labels = t * (sde.N - 1)
  i = jnp.clip(jnp.round(labels).astype(jnp.int32), 0, sde.N - 1)
  return labels, jnp.asarray(sde.sqrt_1m_alphas_cumprod, t.dtype)[i]


def _ve_continuous(sde: sde_lib.SDE, t: Array) -> tuple[Array, Array]:
  sigma = sde.alpha_sigma(t)[1]
  return sigma, sigma


def _ve_discrete(sde: sde_lib.VESDE, t: Array) -> tuple[Array, Array]:
  k = jnp.clip(jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32), 0, sde.N - 1)
  return k.astype(t.dtype), jnp.asarray(sde.discrete_sigmas[::-1], t.dtype)[k]


@dataclasses.dataclass(frozen=True)
class Parameterisation:
  """How networks trained with one SDE family are conditioned and what they output.

  Attributes:
    output: ``noise`` (score = -out / sigma) or ``score`` (score = out).
    continuous: ``(sde, t (B,)) -> (labels (B,), sigma (B,))`` for continuously trained networks;
      sigma is the noise level of the network's input.
    discrete: the same for discretely trained networks, or ``None`` where there are none.
  """

  output: str
  continuous: Callable[[sde_lib.SDE, Array], tuple[Array, Array]]
  discrete: Callable[[sde_lib.SDE, Array], tuple[Array, Array]] | None


PARAMETERISATIONS: dict[type, Parameterisation] = {
    sde_lib.VPSDE: Parameterisation("noise", _vp_continuous, _vp_discrete),
    sde_lib.SubVPSDE: Parameterisation("noise", _vp_continuous, None),
    sde_lib.VESDE: Parameterisation("score", _ve_continuous, _ve_discrete),
}


def get_parameterisation(sde: sde_lib.SDE) -> Parameterisation:
  """The table entry of ``type(sde)`` or of its nearest listed base class."""
  for cls in type(sde).__mro__:
    if cls in PARAMETERISATIONS:
      return PARAMETERISATIONS[cls]
  raise ValueError(f"No score parameterisation for {type(sde).__name__}; supported SDEs: "
                   f"{[cls.__name__ for cls in PARAMETERISATIONS]}. Subclass one of them or add an "
                   f"entry to PARAMETERISATIONS.")


def _check(sde: sde_lib.SDE, model: nn.Module, continuous: bool) -> None:
  """Raises ValueError for a combination that has no parameterisation."""
  param = get_parameterisation(sde)
  if not continuous and param.discrete is None:
    raise ValueError(f"{type(sde).__name__} has no discretely trained networks; use continuous=True.")
  fourier = getattr(model, "embedding_type", None) == "fourier" and getattr(model, "conditional", True)
  if fourier and not continuous:
    raise ValueError("Fourier features embed log(label), and discrete labels reach 0; use "
                     "embedding_type='positional' for discretely trained networks.")
  if getattr(model, "scale_by_sigma", False):
    if param.output != "score":
      raise ValueError(f"scale_by_sigma makes a score-predicting (VE) network divide its output by sigma; "
                       f"{type(sde).__name__} networks predict noise, which the score divides by sigma_t. "
                       f"Set config.model.scale_by_sigma=False.")
    if model.continuous != continuous:
      raise ValueError(f"The network divides by the sigma of {'continuous' if model.continuous else 'discrete'} "
                       f"labels but is wrapped with continuous={continuous}; build it and wrap it with the same "
                       f"config.training.continuous.")


class ScoreFunction(struct.PyTreeNode):
  """A network turned into a score function, ``score_fn(x (B, ...), t (B,)) -> (B, ...)``.

  A pytree: ``variables`` and ``key`` are leaves; the model, SDE and options are static. Build it
  with ``get_score_fn`` (which validates the options); swap parameters with
  ``score_fn.replace(variables=new_variables)``.

  Attributes:
    variables: flax variables of ``model`` (``{"params": ...}`` plus any constant collections).
    model: the network, ``model.apply(variables, x, labels, train=...)``.
    sde: the SDE the network was trained with.
    continuous: the network was trained with continuous time (else on the discrete table).
    key: dropout key, used when ``train``.
    train: run the network in training mode (dropout on).
    class_labels: (B,) int class labels bound to a class-conditional network, or None.
  """

  variables: Variables
  model: nn.Module = struct.field(pytree_node=False)
  sde: sde_lib.SDE = struct.field(pytree_node=False)
  continuous: bool = struct.field(pytree_node=False)
  key: Array | None = None
  train: bool = struct.field(pytree_node=False, default=False)
  class_labels: Array | None = None

  def __call__(self, x: Array, t: Array, class_labels: Array | None = None) -> Array:
    """The score s(x, t [| y]) for x (B, ...) and t (B,) (a scalar is broadcast); shaped like x.

    ``class_labels`` (B,) (default: the bound ``self.class_labels``) condition a class-conditional
    network; None gives its unconditional score.
    """
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    t = jnp.broadcast_to(jnp.asarray(t, dtype), x.shape[:1])
    param = get_parameterisation(self.sde)
    labels, sigma = (param.continuous if self.continuous else param.discrete)(self.sde, t)
    rngs = None if self.key is None else {"dropout": self.key}
    y = self.class_labels if class_labels is None else class_labels
    kwargs = {} if y is None else {"class_labels": y}
    out = self.model.apply(self.variables, x, labels, train=self.train, rngs=rngs, **kwargs)
    if param.output == "noise":
      return sde_lib.batch_mul(-1.0 / sigma, out)
    return out


def num_classes_of(model: nn.Module) -> int:
  """The classes C of a class-conditional network (one whose ``__call__`` takes ``class_labels``), else 0.

  (NCSN's ``num_classes`` counts noise levels, not classes: it takes no class labels, so it is 0 here.)
  """
  if "class_labels" not in inspect.signature(type(model).__call__).parameters:
    return 0
  return int(getattr(model, "num_classes", 0))


def check_class_labels(labels: Any, num_classes: int, *, allow_null: bool = False,
                       what: str = "class labels") -> Array:
  """Class labels as an int32 array, checked where their values are known (not under a trace).

  Args:
    labels: (B,) integers.
    num_classes: C of the network or classifier; 0 (unconditional) is an error.
    allow_null: also accept the null class C (the unconditional score).
    what: how the error names the labels (e.g. the config key that sets them).

  Returns:
    The labels, (B,) int32.

  Raises:
    ValueError: for an unconditional network, non-integer or non-1-D labels, or values outside
      [0, C) ([0, C] with ``allow_null``).
  """
  if num_classes < 1:
    raise ValueError(f"{what} were given, but the network is unconditional (num_classes=0); train a "
                     f"class-conditional one with config.model.num_classes set to the number of classes.")
  if isinstance(labels, jax.core.Tracer):
    return labels.astype(jnp.int32)
  array = np.asarray(labels)
  if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
    raise ValueError(f"{what} must be a 1-D array of integers (one per example), got shape {array.shape} "
                     f"and dtype {array.dtype}.")
  top = num_classes if allow_null else num_classes - 1
  if array.size and (array.min() < 0 or array.max() > top):
    raise ValueError(f"{what} must lie in [0, {top}] ({num_classes} classes"
                     f"{f'; {num_classes} is the null class' if allow_null else ''}), got values from "
                     f"{array.min()} to {array.max()}.")
  return jnp.asarray(array, jnp.int32)


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, variables: Variables, *, continuous: bool,
                 train: bool = False, key: Array | None = None, class_labels: Any = None) -> ScoreFunction:
  """The score function of ``model`` with ``variables``, under the original's conventions.

  Args:
    sde: the SDE the network was trained with.
    model: a flax module, ``model.apply(variables, x, labels, train=...)``.
    variables: its full flax variables, e.g. ``init_model(...)`` or ``{"params": state.ema_params}``.
    continuous: the network was trained in continuous time (else on the discrete DDPM / SMLD table).
    train: training mode (dropout on); needs ``key``.
    key: dropout key.
    class_labels: (B,) int labels in [0, C] to bind to a class-conditional network (C: the null
      class); None leaves it unconditional.

  Returns:
    A pytree ``ScoreFunction``; ``score_fn(x (B, ...), t (B,))`` returns the score shaped like x.
  """
  _check(sde, model, continuous)
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be the flax variables dict {'params': params, ...}; wrap a bare "
                     "parameter tree as {'params': params}, or use get_score_fn_builder for losses.")
  if train and key is None:
    raise ValueError("train=True runs dropout and needs a PRNG key; pass key=..., or train=False.")
  if class_labels is not None:
    class_labels = check_class_labels(class_labels, num_classes_of(model), allow_null=True)
  return ScoreFunction(variables=variables, model=model, sde=sde, continuous=continuous,
                       key=key if train else None, train=train, class_labels=class_labels)


def get_score_fn_builder(sde: sde_lib.SDE, model: nn.Module, *, continuous: bool,
                         variables: Variables | None = None) -> ScoreFnBuilder:
  """``build_score_fn(params, key, train) -> score_fn``, the form ``score_sde.losses`` takes.

  Args:
    sde, model, continuous: as for ``get_score_fn``.
    variables: the model's initial variables, if it has collections besides ``params``; those are
      held constant (none of this package's networks has any).

  Returns:
    ``build_score_fn(params, key, train)``: ``params`` is the trainable tree
    (``variables["params"]``, e.g. ``TrainState.params``), ``key`` a dropout key used when
    ``train``, and the keyword ``class_labels`` (B,) binds class labels (see ``get_score_fn``).
    It returns a ``ScoreFunction``.
  """
  _check(sde, model, continuous)
  constants = {name: c for name, c in (variables or {}).items() if name != "params"}

  def build_score_fn(params: Params, key: Array | None, train: bool, class_labels: Any = None) -> ScoreFunction:
    if isinstance(params, Mapping) and "params" in params:
      raise ValueError("build_score_fn takes the trainable tree variables['params'], not the whole "
                       "variables dict; pass variables['params'].")
    return get_score_fn(sde, model, {**constants, "params": params}, continuous=continuous, train=train,
                        key=key, class_labels=class_labels)

  return build_score_fn


class LogitFunction(struct.PyTreeNode):
  """A noise-conditional classifier as ``logit_fn(x (B, ...), t (B,)) -> (B, num_classes)`` logits.

  The classifier sees the marginal std sigma_t of ``sde`` at t (the original's ``ve_noise_scale``,
  the right input for every SDE: x_t = alpha_t x_0 + sigma_t z). A pytree like ``ScoreFunction``:
  ``variables`` are leaves, ``model`` and ``sde`` static.

  Attributes:
    variables: flax variables of ``model``.
    model: the classifier, ``model.apply(variables, x, sigmas, train=...)``.
    sde: the SDE whose noise the classifier was trained on.
  """

  variables: Variables
  model: nn.Module = struct.field(pytree_node=False)
  sde: sde_lib.SDE = struct.field(pytree_node=False)

  def __call__(self, x: Array, t: Array) -> Array:
    """Logits (B, num_classes) of x (B, ...) at t (B,) (a scalar is broadcast)."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    t = jnp.broadcast_to(jnp.asarray(t, dtype), x.shape[:1])
    return self.model.apply(self.variables, x, self.sde.alpha_sigma(t)[1], train=False)


def get_logit_fn(sde: sde_lib.SDE, classifier: nn.Module, variables: Variables) -> LogitFunction:
  """The noise-conditional ``classifier`` with ``variables`` as a ``LogitFunction`` of (x, t) under ``sde``."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be the flax variables dict {'params': params, ...}.")
  return LogitFunction(variables=variables, model=classifier, sde=sde)


def get_logit_fn_builder(sde: sde_lib.SDE, classifier: nn.Module
                         ) -> Callable[[Params, Array | None, bool], LogitFunction]:
  """``build_logit_fn(params, key, train) -> logit_fn``, the form ``losses.get_classifier_loss_fn`` takes.

  ``key`` and ``train`` are accepted for a common signature with score-function builders; the
  classifier has no dropout.
  """

  def build_logit_fn(params: Params, key: Array | None, train: bool) -> LogitFunction:
    del key, train
    return get_logit_fn(sde, classifier, {"params": params})

  return build_logit_fn


def _init(key: Array, model: nn.Module, shape: tuple[int, ...]) -> Variables:
  # Labels of 1 are valid under every embedding (log 1 = 0).
  return model.init(key, jnp.zeros(shape, jnp.float32), jnp.ones(shape[:1], jnp.float32), train=False)


# Compiled once per (model, shape): equal modules hash alike, so re-initialising reuses the program.
_jit_init = jax.jit(_init, static_argnums=(1, 2))


def init_model(key: Array, model: nn.Module, input_shape: tuple[int, ...], *,
               shape_only: bool = False) -> Variables:
  """Initial variables of ``model`` for inputs of ``input_shape`` (B, ...), compiled with ``jax.jit``.

  Args:
    key: PRNG key of the initialisation.
    model: the network (hashable: sequence attributes must be tuples).
    input_shape: shape of one batch, (B, ...) (the batch size does not affect the variables).
    shape_only: return ``jax.ShapeDtypeStruct`` leaves via ``jax.eval_shape`` (nothing is computed).

  Returns:
    The flax variables, ``{"params": ...}``.
  """
  shape = tuple(int(d) for d in input_shape)
  if shape_only:
    return jax.eval_shape(lambda k: _init(k, model, shape), key)
  return _jit_init(key, model, shape)


def count_params(variables: Any) -> int:
  """Number of scalars in a pytree of arrays (or of ``jax.ShapeDtypeStruct``s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables))


__all__ = ["LogitFunction", "PARAMETERISATIONS", "Parameterisation", "ScoreFunction", "check_class_labels",
           "count_params", "get_logit_fn", "get_logit_fn_builder", "get_parameterisation", "get_score_fn",
           "get_score_fn_builder", "init_model", "num_classes_of"]
