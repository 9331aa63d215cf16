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

Rounding. The original looks the discrete VP std up at ``int(t (N - 1))``, which truncates: at
t = i / (N - 1) in float32 the product falls just below i for 170 of the 1000 levels of N = 1000
(first at i = 15, where it is 14.999999), which picks level i - 1, a std 5% too small there. Here
the index is round(t (N - 1)), so the discrete losses (which call the score at t_i = i / (N - 1))
and samplers see level i. The network label itself stays the real
number t (N - 1), as in the original (its sinusoidal embedding is smooth in the label).

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
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
  """

  variables: Variables
  model: nn.Module = struct.field(pytree_node=False)
  sde: sde_lib.SDE = struct.field(pytree_node=False)
  continuous: bool = struct.field(pytree_node=False)
  key: Array | None = None
  train: bool = struct.field(pytree_node=False, default=False)

  def __call__(self, x: Array, t: Array) -> Array:
    """The score s(x, t) for x (B, ...) and t (B,) (a scalar is broadcast); shaped like x."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    t = jnp.broadcast_to(jnp.asarray(t, dtype), x.shape[:1])
    param = get_parameterisation(self.sde)
    labels, sigma = (param.continuous if self.continuous else param.discrete)(self.sde, t)
    rngs = None if self.key is None else {"dropout": self.key}
    out = self.model.apply(self.variables, x, labels, train=self.train, rngs=rngs)
    if param.output == "noise":
      return sde_lib.batch_mul(-1.0 / sigma, out)
    return out


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, variables: Variables, *, continuous: bool,
                 train: bool = False, key: Array | None = None) -> ScoreFunction:
  """The score function of ``model`` with ``variables``, under the original's conventions.

  Args:
    sde: the SDE the network was trained with.
    model: a flax module, ``model.apply(variables, x, labels, train=...)``.
    variables: its full flax variables, e.g. ``init_model(...)`` or ``{"params": state.ema_params}``.
    continuous: the network was trained in continuous time (else on the discrete DDPM / SMLD table).
    train: training mode (dropout on); needs ``key``.
    key: dropout key.

  Returns:
    A pytree ``ScoreFunction``; ``score_fn(x (B, ...), t (B,))`` returns the score shaped like x.
  """
  _check(sde, model, continuous)
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be the flax variables dict {'params': params, ...}; wrap a bare "
                     "parameter tree as {'params': params}, or use get_score_fn_builder for losses.")
  if train and key is None:
    raise ValueError("train=True runs dropout and needs a PRNG key; pass key=..., or train=False.")
  return ScoreFunction(variables=variables, model=model, sde=sde, continuous=continuous,
                       key=key if train else None, train=train)


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
    ``train``. It returns a ``ScoreFunction``.
  """
  _check(sde, model, continuous)
  constants = {name: c for name, c in (variables or {}).items() if name != "params"}

  def build_score_fn(params: Params, key: Array | None, train: bool) -> ScoreFunction:
    if isinstance(params, Mapping) and "params" in params:
      raise ValueError("build_score_fn takes the trainable tree variables['params'], not the whole "
                       "variables dict; pass variables['params'].")
    return get_score_fn(sde, model, {**constants, "params": params}, continuous=continuous, train=train,
                        key=key)

  return build_score_fn


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


__all__ = ["PARAMETERISATIONS", "Parameterisation", "ScoreFunction", "count_params", "get_parameterisation",
           "get_score_fn", "get_score_fn_builder", "init_model"]
