"""Weight import from the original implementations' checkpoints (NCSN++ / DDPM++, DDPM, NCSNv2, NCSN).

    ckpt = convert.load_checkpoint(path, model, (1, 32, 32, 3))
    score_fn = wrapper.get_score_fn(sde, model, {"params": ckpt.ema_params}, continuous=True)
    state = convert.convert_checkpoint(path, config)   # {"params", "ema_params", "step", "has_ema"}
    result = convert.import_checkpoint(config, workdir, path)   # the workdir's first checkpoint (--mode import)

Sources:

* The PyTorch port (``score_sde_pytorch``): ``.pth`` files ``{"model": state_dict, "ema":
  {"decay", "num_updates", "shadow_params": [...]}, "optimizer", "step"}`` whose state_dict keys
  carry DataParallel's ``module.`` prefix, or a bare state_dict. Reading ``.pth`` needs torch,
  which this package does not depend on; ``pth_to_npz`` (run where torch is installed) writes an
  ``.npz`` that needs nothing. ``.npz`` files hold either a bare state_dict (tensor names as keys)
  or ``model/<name>`` and ``ema/<name>`` entries plus an optional ``step``.
* The original JAX code (``score_sde``): flax msgpack files of the whole training state
  (``checkpoint_<n>``): ``{"optimizer": {"target": params, ...}, "params_ema": params, "step", ...}``,
  or a bare parameter tree.
* NCSNv2 and NCSN networks (the ``ve/ncsnv2`` and ``ve/ncsn`` configs) load from state_dicts with
  the NCSN authors' tensor names (``begin_conv.weight``, ``res2.0.shortcut.conv.bias``, ...; see
  ``ncsnv2.authors_name``), which the PyTorch port's NCSN models keep: the port's ``.pth`` files,
  ``.npz`` exports, and the authors' own checkpoint lists ``[score state_dict, optimizer state_dict,
  epoch, step, EMA state_dict]`` (ermongroup/ncsnv2), whose EMA is named.

This package's NCSN++ and DDPM create their layers in the original's order, so their parameter
trees carry the original JAX code's Linen names (``ResnetBlockBigGANpp_3/Conv_0/kernel``) and a JAX
checkpoint maps one to one. The PyTorch port keeps its layers in one list, ``all_modules``, in the
order its constructor builds them; ``torch_layout`` lists the Linen names in that order, and the
tensors are converted: conv weights OIHW -> HWIO, Linear (out, in) -> kernel (in, out), GroupNorm
weight -> scale, ``NIN.W`` and ``GaussianFourierProjection.W`` as they are. The port's EMA is an
unnamed list of the trainable parameters in state_dict order (the frozen Fourier ``W`` is not in
it; the imported EMA tree takes the model's ``W``).

``params_to_torch_state_dict`` is the inverse map (this framework's parameters as a state_dict of
the port, to run it there).

Every import is strict, unlike the port's ``load_state_dict(strict=False)``: a key that maps to no
parameter, a parameter without a key, or a shape that differs is a ``ValueError`` listing them;
the ``sigmas`` buffer must equal the model's noise schedule. The result has exactly the structure
of ``wrapper.init_model(...)["params"]``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from score_sde import models
from score_sde.models import ddpm, layers, ncsnpp, ncsnv2, wrapper

Params = Any  # A nested dict of arrays, as ``init_model(...)["params"]``.

# NCSN v1 / NCSNv2 networks load by the NCSN authors' tensor names (``ncsnv2.from_authors_state_dict``).
_NCSN_MODELS = (ncsnv2.NCSN, ncsnv2.NCSNv2)
_BUFFERS = ("sigmas",)  # Non-parameter tensors of the port's NCSN++ / DDPM state_dicts.
_PREFIX = "module."  # DataParallel's prefix.


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Imported weights.

  Attributes:
    params: the trained parameters, structured as ``init_model(...)["params"]``.
    ema_params: their exponential moving average (what the original samples and evaluates with),
      or ``None`` if the file has none.
    step: the training step, or ``None`` if the file does not record it.
  """

  params: Params
  ema_params: Params | None
  step: int | None


# --- the PyTorch port's module order --------------------------------------------------------------


class _Namer:
  """Linen's automatic names: ``<Class>_<k>``, k counting the modules of that class created so far."""

  def __init__(self):
    self._counts = collections.Counter()

  def __call__(self, cls: str) -> str:
    name = f"{cls}_{self._counts[cls]}"
    self._counts[cls] += 1
    return name


def _ncsnpp_layout(model: ncsnpp.NCSNpp, image_size: int) -> list[str]:
  """Linen names of the port's ``NCSNpp.all_modules``, in order (its constructor, step by step)."""
  new, names = _Namer(), []
  block = "ResnetBlockDDPMpp" if model.resblock_type == "ddpm" else "ResnetBlockBigGANpp"
  resolution, last = image_size, len(model.ch_mult) - 1
  if model.embedding_type == "fourier":
    names.append(new("GaussianFourierProjection"))
  if model.conditional:
    names += [new("Dense"), new("Dense")]
  names.append(new("Conv"))
  for level in range(last + 1):
    for _ in range(model.num_res_blocks):
      names.append(new(block))
      if resolution in model.attn_resolutions:
        names.append(new("AttnBlockpp"))
    if level != last:
      names.append(new("Downsample") if model.resblock_type == "ddpm" else new(block))
      if model.progressive_input == "input_skip":
        new("Downsample")  # The input pyramid's resampler: an attribute of the port's model, not listed.
        names.append(new("Combine"))
      elif model.progressive_input == "residual":
        names.append(new("Downsample"))
      resolution //= 2
  names += [new(block), new("AttnBlockpp"), new(block)]
  for level in reversed(range(last + 1)):
    names += [new(block) for _ in range(model.num_res_blocks + 1)]
    if resolution in model.attn_resolutions:
      names.append(new("AttnBlockpp"))
    if model.progressive == "output_skip":
      if level != last:
        new("Upsample")  # The output pyramid's resampler: an attribute of the port's model, not listed.
      names += [new("GroupNorm"), new("Conv")]
    elif model.progressive == "residual":
      names += [new("GroupNorm"), new("Conv")] if level == last else [new("Upsample")]
    if level != 0:
      names.append(new("Upsample") if model.resblock_type == "ddpm" else new(block))
      resolution *= 2
  if model.progressive != "output_skip":
    names += [new("GroupNorm"), new("Conv")]
  return names


def _ddpm_layout(model: ddpm.DDPM, image_size: int) -> list[str]:
  """Linen names of the port's ``DDPM.all_modules``, in order."""
  new, names = _Namer(), []
  resolution, last = image_size, len(model.ch_mult) - 1
  if model.conditional:
    names += [new("Dense"), new("Dense")]
  names.append(new("Conv"))
  for level in range(last + 1):
    for _ in range(model.num_res_blocks):
      names.append(new("ResnetBlockDDPM"))
      if resolution in model.attn_resolutions:
        names.append(new("AttnBlock"))
    if level != last:
      names.append(new("Downsample"))
      resolution //= 2
  names += [new("ResnetBlockDDPM"), new("AttnBlock"), new("ResnetBlockDDPM")]
  for level in reversed(range(last + 1)):
    names += [new("ResnetBlockDDPM") for _ in range(model.num_res_blocks + 1)]
    if resolution in model.attn_resolutions:
      names.append(new("AttnBlock"))
    if level != 0:
      names.append(new("Upsample"))
      resolution *= 2
  return names + [new("GroupNorm"), new("Conv")]


# Networks with a PyTorch-port counterpart, and the order of its ``all_modules``.
TORCH_LAYOUTS: dict[type[nn.Module], Callable[[Any, int], list[str]]] = {
    ncsnpp.NCSNpp: _ncsnpp_layout,
    ddpm.DDPM: _ddpm_layout,
}


def torch_layout(model: nn.Module, image_size: int) -> list[str]:
  """The Linen names of the top-level layers of ``model``, in the order of the port's ``all_modules``.

  Entry i is the layer stored under ``all_modules.i``; parameter-free entries (a resampler without
  convolution) are listed too, since they take an index.
  """
  if type(model) not in TORCH_LAYOUTS:
    raise ValueError(f"{type(model).__name__} has no PyTorch-port counterpart; PyTorch checkpoints load "
                     f"into {sorted(cls.__name__ for cls in TORCH_LAYOUTS)}.")
  return TORCH_LAYOUTS[type(model)](model, image_size)


# --- name and layout conversion -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
  """Where one torch tensor goes: the Linen path, the tensor's layout change, the Linen shape."""

  path: tuple[str, ...]
  transform: Callable[[np.ndarray], np.ndarray]
  shape: tuple[int, ...]


def _identity(a: np.ndarray) -> np.ndarray:
  return a


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)


def _linear_to_kernel(a: np.ndarray) -> np.ndarray:
  return a.T


def _torch_leaf(leaf: str, ndim: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """The torch tensor name and layout change of a Linen leaf (a conv, Dense, GroupNorm, NIN or W)."""
  if leaf == "kernel":
    return "weight", _oihw_to_hwio if ndim == 4 else _linear_to_kernel
  if leaf == "weight":  # up_or_down_sampling.Conv2d keeps the StyleGAN2 name.
    return "weight", _oihw_to_hwio
  if leaf == "scale":
    return "weight", _identity
  return leaf, _identity  # bias; NIN's W and b; the Fourier W.


@functools.lru_cache(maxsize=8)
def _param_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Params:
  return wrapper.init_model(jax.random.key(0), model, input_shape, shape_only=True)["params"]


def _paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Leaves of a nested mapping by their key paths."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_paths(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _torch_targets(model: nn.Module, input_shape: Sequence[int]) -> tuple[dict[str, _Target], frozenset[str]]:
  """Every parameter of ``model`` by the port's state_dict name, and the port's unused tensors.

  The port gives every residual block a time-embedding projection ``Dense_0``, also in unconditional
  networks, where nothing calls it (the original JAX code creates none); those tensors are known
  and discarded.
  """
  order = torch_layout(model, int(input_shape[1]))
  index = {name: i for i, name in enumerate(order)}
  targets = {}
  for path, leaf in _paths(_param_shapes(model, tuple(int(d) for d in input_shape))).items():
    top, *inner, name = path
    if top not in index:
      raise RuntimeError(f"Internal error: layer {top} of {type(model).__name__} is missing from its PyTorch "
                         f"layout {order}.")
    torch_name, transform = _torch_leaf(name, len(leaf.shape))
    key = ".".join(["all_modules", str(index[top]), *inner, torch_name])
    targets[key] = _Target(path, transform, tuple(leaf.shape))
  unused = set()
  if not model.conditional:
    unused = {f"all_modules.{i}.Dense_0.{leaf}" for i, name in enumerate(order) if name.startswith("ResnetBlock")
              for leaf in ("weight", "bias")}
  return targets, frozenset(unused)


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _mismatch_error(what: str, unexpected: Sequence[str], missing: Sequence[str],
                    wrong_shapes: Sequence[str], model: nn.Module) -> ValueError:
  parts = []
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected (no parameter of the model has them): {sorted(unexpected)}")
  if missing:
    parts.append(f"{len(missing)} missing (parameters of the model the file lacks): {sorted(missing)}")
  if wrong_shapes:
    parts.append(f"{len(wrong_shapes)} with other shapes: {sorted(wrong_shapes)}")
  return ValueError(f"{what} does not match {type(model).__name__}: " + "; ".join(parts) + ". Build the model "
                    f"from the checkpoint's training config (config.model: nf, ch_mult, num_res_blocks, "
                    f"attn_resolutions, resblock_type, progressive*, embedding_type, conditional, ...; "
                    f"config.data.image_size and num_channels).")


def _check_sigmas(sigmas: Any, model: nn.Module) -> None:
  """ValueError unless the port's ``sigmas`` buffer equals the model's SMLD table."""
  expected = layers.smld_sigmas(model.sigma_min, model.sigma_max, model.num_scales)
  sigmas = np.asarray(sigmas, np.float64)
  if sigmas.shape != expected.shape or not np.allclose(sigmas, expected, rtol=1e-5, atol=0.0):
    found = (f"{sigmas.size} levels from {sigmas.max():.6g} to {sigmas.min():.6g}" if sigmas.size
             else "no levels")
    raise ValueError(f"The checkpoint's sigmas buffer ({found}) differs from the model's schedule "
                     f"(sigma_max={model.sigma_max}, sigma_min={model.sigma_min}, num_scales={model.num_scales}); "
                     f"set config.model.sigma_min, sigma_max and num_scales to the checkpoint's.")


def torch_state_dict_to_params(state_dict: Mapping[str, Any], model: nn.Module, input_shape: Sequence[int], *,
                               check_buffers: bool = True) -> Params:
  """Parameters of ``model`` from a PyTorch state_dict (NCSN++ / DDPM++, DDPM; NCSNv2 / NCSN by the authors' names).

  Args:
    state_dict: tensor name -> array (numpy, or anything ``np.asarray`` takes), e.g.
      ``all_modules.3.Conv_0.weight``; a ``module.`` prefix on every key is removed.
    model: the matching network (``models.get_model(config)``).
    input_shape: (B, H, W, C) of the model's inputs (B is irrelevant).
    check_buffers: require the ``sigmas`` buffer and check it against the model's schedule
      (``False`` for EMA lists, which hold parameters only).

  Returns:
    The parameter tree, structured exactly as ``init_model(...)["params"]``, float32 leaves.

  Raises:
    ValueError: listing unexpected, missing or differently shaped tensors, or for a ``sigmas``
      buffer that differs from the model's noise schedule.
  """
  state_dict = _strip_prefix(state_dict)
  if isinstance(model, _NCSN_MODELS):  # the NCSN authors' names, which the port's NCSN models keep
    if check_buffers and "sigmas" not in state_dict and isinstance(model, ncsnv2.NCSNv2):
      raise _mismatch_error("The PyTorch state_dict", [], ["sigmas"], [], model)
    return ncsnv2.from_authors_state_dict(model, state_dict, input_shape)
  targets, unused = _torch_targets(model, input_shape)
  buffers = [name for name in _BUFFERS if name in state_dict]
  unexpected = [name for name in state_dict if name not in targets and name not in buffers and name not in unused]
  missing = [name for name in targets if name not in state_dict]
  if check_buffers:
    missing += [name for name in _BUFFERS if name not in state_dict]
  flat, wrong_shapes = {}, []
  for name, target in targets.items():
    if name in state_dict:
      value = target.transform(np.asarray(state_dict[name]))
      if value.shape != target.shape:
        wrong_shapes.append(f"{name}: {value.shape} (as {'/'.join(target.path)}) vs {target.shape}")
      flat[target.path] = jnp.asarray(value, jnp.float32)
  if unexpected or missing or wrong_shapes:
    raise _mismatch_error("The PyTorch state_dict", unexpected, missing, wrong_shapes, model)
  if check_buffers:
    _check_sigmas(state_dict["sigmas"], model)
  return _nest(flat)


def params_to_torch_state_dict(params: Params, model: nn.Module, input_shape: Sequence[int]) -> dict[str, np.ndarray]:
  """The PyTorch port's state_dict of ``params`` (the inverse of ``torch_state_dict_to_params``).

  Args:
    params: a parameter tree of ``model`` (``init_model(...)["params"]``).
    model: the network (NCSN++ / DDPM++ or DDPM).
    input_shape: (B, H, W, C) of the model's inputs.

  Returns:
    Tensor name -> float32 numpy array in the port's layouts (OIHW convs, (out, in) Linear), with
    the ``sigmas`` buffer of the model's schedule; an unconditional network's unused time
    projections are left out (the port's ``load_state_dict(strict=False)`` tolerates that).
  """
  targets, _ = _torch_targets(model, input_shape)
  inverse = {_identity: _identity, _oihw_to_hwio: lambda a: a.transpose(3, 2, 0, 1), _linear_to_kernel: np.transpose}
  flat = _paths(params)
  if set(flat) != {target.path for target in targets.values()}:
    raise ValueError(f"params do not have the structure of {type(model).__name__}'s parameters for inputs "
                     f"{tuple(input_shape)}; pass the tree of init_model(...)['params'] of this model.")
  state = {name: np.asarray(inverse[target.transform](np.asarray(flat[target.path], np.float32)))
           for name, target in targets.items()}
  state["sigmas"] = layers.smld_sigmas(model.sigma_min, model.sigma_max, model.num_scales).astype(np.float32)
  return state


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  if state_dict and all(name.startswith(_PREFIX) for name in state_dict):
    return {name[len(_PREFIX):]: value for name, value in state_dict.items()}
  return dict(state_dict)


def _frozen_names(model: nn.Module, image_size: int) -> list[str]:
  """State_dict names of the port's parameters that do not train (the Fourier features' W)."""
  if isinstance(model, _NCSN_MODELS):
    return []
  return [f"all_modules.{i}.W" for i, name in enumerate(torch_layout(model, image_size))
          if name.startswith("GaussianFourierProjection_")]


def _ema_by_name(model_state: Mapping[str, Any], shadow_params: Sequence[Any], frozen: Sequence[str]) -> dict[str, Any]:
  """Names the port's EMA list: its trainable parameters in state_dict order (buffers, ``frozen`` excluded)."""
  trainable = [name for name in model_state if name not in _BUFFERS and name not in frozen]
  if len(trainable) != len(shadow_params):
    raise ValueError(f"The checkpoint's EMA holds {len(shadow_params)} tensors but its model has {len(trainable)} "
                     f"trainable parameters; the file is damaged or its 'ema' belongs to another model.")
  named = {}
  for name, value in zip(trainable, shadow_params):
    value = np.asarray(value)
    if value.shape != np.shape(model_state[name]):
      raise ValueError(f"EMA tensor for {name} has shape {value.shape}, the parameter {np.shape(model_state[name])}; "
                       f"the checkpoint's 'ema' list does not follow its model's parameters.")
    named[name] = value
  return named


def convert_torch_state(state: Mapping[str, Any], model: nn.Module, input_shape: Sequence[int]) -> Checkpoint:
  """A ``Checkpoint`` from a loaded PyTorch-port checkpoint or state_dict (arrays as numpy).

  Args:
    state: ``{"model": state_dict, "ema": {"shadow_params": [...], ...}, "step": ...}`` (a training
      checkpoint), ``{"model": ..., "ema": {name: array}}`` (an ``.npz`` export) or a bare state_dict.
    model: the matching network.
    input_shape: (B, H, W, C) of the model's inputs.

  Returns:
    The parameters, the EMA parameters (``None`` for a bare state_dict) and the step.
  """
  if "model" not in state:
    return Checkpoint(torch_state_dict_to_params(state, model, input_shape), None, None)
  model_state = _strip_prefix(state["model"])
  params = torch_state_dict_to_params(model_state, model, input_shape)
  ema_params = None
  if state.get("ema") is not None:
    ema, frozen = state["ema"], _frozen_names(model, int(input_shape[1]))
    if "shadow_params" in ema:
      named = _ema_by_name(model_state, ema["shadow_params"], frozen)
    else:
      named = _strip_prefix(ema)
    # The EMA never tracks the frozen W; it is the model's.
    kept = {name: model_state[name] for name in frozen if name in model_state}
    ema_params = torch_state_dict_to_params({**kept, **named}, model, input_shape, check_buffers=False)
  step = state.get("step")
  return Checkpoint(params, ema_params, None if step is None else int(step))


def convert_jax_state(state: Mapping[str, Any], model: nn.Module, input_shape: Sequence[int]) -> Checkpoint:
  """A ``Checkpoint`` from a restored msgpack training state of the original JAX code.

  Args:
    state: ``{"optimizer": {"target": params, ...}, "params_ema": params, "step": ...}`` (the
      original's ``State``) or a bare parameter tree (optionally under a ``params`` key).
    model: the matching network.
    input_shape: (B, H, W, C) of the model's inputs.

  Returns:
    The parameters, the EMA parameters (``None`` for a bare tree) and the step.
  """
  if "optimizer" in state and "params_ema" in state:
    step = state.get("step")
    return Checkpoint(jax_params_to_params(state["optimizer"]["target"], model, input_shape),
                      jax_params_to_params(state["params_ema"], model, input_shape),
                      None if step is None else int(np.asarray(step)))
  return Checkpoint(jax_params_to_params(state, model, input_shape), None, None)


def jax_params_to_params(tree: Mapping[str, Any], model: nn.Module, input_shape: Sequence[int]) -> Params:
  """Parameters of ``model`` from a parameter tree keyed by the original's Linen names.

  Raises:
    ValueError: listing unexpected, missing or differently shaped leaves ('/'-joined paths).
  """
  if set(tree) == {"params"}:
    tree = tree["params"]
  expected = _paths(_param_shapes(model, tuple(int(d) for d in input_shape)))
  found = _paths(tree)
  unexpected = ["/".join(path) for path in found if path not in expected]
  missing = ["/".join(path) for path in expected if path not in found]
  wrong_shapes = [f"{'/'.join(path)}: {np.shape(found[path])} vs {tuple(leaf.shape)}"
                  for path, leaf in expected.items() if path in found and np.shape(found[path]) != tuple(leaf.shape)]
  if unexpected or missing or wrong_shapes:
    raise _mismatch_error("The JAX parameter tree", unexpected, missing, wrong_shapes, model)
  return _nest({path: jnp.asarray(found[path], jnp.float32) for path in expected})


# --- files ----------------------------------------------------------------------------------------


def read_npz(path: str | os.PathLike) -> dict[str, Any]:
  """An ``.npz`` export as a state mapping: a bare state_dict, or ``{"model", "ema", "step"}``."""
  with np.load(path, allow_pickle=False) as data:
    arrays = {name: data[name] for name in data.files}
  if not any(name.startswith(("model/", "ema/")) for name in arrays):
    return arrays
  state: dict[str, Any] = {"model": {}, "ema": {}}
  for name, value in arrays.items():
    section, _, key = name.partition("/")
    if section in ("model", "ema") and key:
      state[section][key] = value
    elif name == "step":
      state["step"] = int(value)
    else:
      raise ValueError(f"{os.fspath(path)}: entry {name!r} is neither model/<name>, ema/<name> nor step.")
  if not state["ema"]:
    state["ema"] = None
  return state


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading a PyTorch .pth checkpoint needs torch, which score_sde does not depend on. "
                      "Install it (pip install torch), or convert the file where torch is installed with "
                      "score_sde.convert.pth_to_npz(src, dst) and load the .npz instead.") from e
  return torch


def _to_numpy(obj: Any, torch: Any) -> Any:
  if isinstance(obj, torch.Tensor):
    return obj.detach().cpu().numpy()
  if isinstance(obj, Mapping):
    return {key: _to_numpy(value, torch) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_to_numpy(value, torch) for value in obj]
  return obj


def read_pth(path: str | os.PathLike) -> dict[str, Any]:
  """A ``.pth`` checkpoint of the PyTorch port as numpy (needs torch; tensors only, no pickled code)."""
  torch = _import_torch()
  state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  state = _to_numpy(state, torch)
  if isinstance(state, (list, tuple)) and state and isinstance(state[0], Mapping):
    # The NCSN authors' list: [score state_dict, optimizer state_dict, epoch, step(, EMA state_dict)].
    return {"model": state[0], "ema": state[4] if len(state) > 4 else None,
            "step": state[3] if len(state) > 3 else None}
  if not isinstance(state, Mapping):
    raise ValueError(f"{os.fspath(path)} holds a {type(state).__name__}, not a checkpoint or state_dict.")
  return dict(state)


def read_msgpack(path: str | os.PathLike) -> dict[str, Any]:
  """A flax msgpack file (the original JAX code's ``checkpoint_<n>``) as nested dicts of numpy arrays."""
  with open(path, "rb") as f:
    state = serialization.msgpack_restore(f.read())
  if not isinstance(state, Mapping):
    raise ValueError(f"{os.fspath(path)} holds a {type(state).__name__}, not a training state or parameter tree.")
  return dict(state)


FORMATS = ("pth", "npz", "msgpack")


def load_checkpoint(path: str | os.PathLike, model: nn.Module, input_shape: Sequence[int], *,
                    format: str | None = None) -> Checkpoint:  # pylint: disable=redefined-builtin
  """Imports a checkpoint of the original implementations into ``model``'s parameter trees.

  Args:
    path: a PyTorch-port ``.pth`` (needs torch), an ``.npz`` export of one, or a flax msgpack
      training state of the original JAX code (any other name, e.g. ``checkpoint_26``).
    model: the matching network, e.g. ``models.get_model(config)`` of the checkpoint's config.
    input_shape: (B, H, W, C) of the model's inputs (B is irrelevant).
    format: ``pth``, ``npz`` or ``msgpack``; by default from the file name (``.pth`` / ``.pt``,
      ``.npz``, anything else msgpack).

  Returns:
    ``Checkpoint(params, ema_params, step)``; each tree is structured as ``init_model(...)["params"]``.

  Raises:
    ValueError: for keys that do not match the model (all listed) or a mismatched noise schedule.
    ImportError: for a ``.pth`` file without torch installed.
  """
  if format is None:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    format = {".pth": "pth", ".pt": "pth", ".npz": "npz"}.get(suffix, "msgpack")
  if format == "pth":
    return convert_torch_state(read_pth(path), model, input_shape)
  if format == "npz":
    return convert_torch_state(read_npz(path), model, input_shape)
  if format == "msgpack":
    return convert_jax_state(read_msgpack(path), model, input_shape)
  raise ValueError(f"Unknown checkpoint format {format!r}; valid choices: {list(FORMATS)}.")


def input_shape_of(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """(1, H, W, C) of a config's images: ``config.data.image_size`` and ``num_channels``."""
  size = int(config.data.image_size)
  return (1, size, size, int(config.data.num_channels))


def convert_checkpoint(src_path: str | os.PathLike, config: ml_collections.ConfigDict, *,
                       format: str | None = None) -> dict[str, Any]:  # pylint: disable=redefined-builtin
  """Imports an original checkpoint for the network of ``config`` (the command-line import's entry point).

  Args:
    src_path: a PyTorch-port ``.pth`` (needs torch), an ``.npz`` export, or an original JAX msgpack
      training state (``checkpoint_<n>``).
    config: the checkpoint's training config in this framework (e.g. ``configs/ve/cifar10_ncsnpp_continuous.py``);
      ``config.model`` builds the network, ``config.data.image_size`` / ``num_channels`` give its input shape.
    format: ``pth``, ``npz`` or ``msgpack``; by default from the file name (see ``load_checkpoint``).

  Returns:
    ``{"params": tree, "ema_params": tree, "step": int, "has_ema": bool}``, trees structured as
    ``init_model(...)["params"]`` of ``models.get_model(config)``. A file without EMA weights (a bare
    state_dict or parameter tree) gives ``ema_params`` = ``params``, ``has_ema=False``, and ``step`` 0
    when the file does not record one.

  Raises:
    ValueError: listing every unknown, missing or differently shaped key; for a noise schedule that
      differs from ``config.model``'s; for an unknown format.
    ImportError: for a ``.pth`` file without torch installed.
  """
  ckpt = load_checkpoint(src_path, models.get_model(config), input_shape_of(config), format=format)
  if ckpt.ema_params is None:
    logging.warning("%s holds no EMA weights; the imported EMA parameters are copies of the parameters.",
                    os.fspath(src_path))
  return {"params": ckpt.params,
          "ema_params": ckpt.params if ckpt.ema_params is None else ckpt.ema_params,
          "step": 0 if ckpt.step is None else ckpt.step,
          "has_ema": ckpt.ema_params is not None}


def pth_to_npz(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Writes a PyTorch-port ``.pth`` as an ``.npz`` that loads without torch (needs torch itself).

  The EMA list is named after the model's trainable parameters, so the export is self-describing:
  entries ``model/<name>``, ``ema/<name>`` and ``step``; a bare state_dict is written as it is.
  """
  state = read_pth(src)
  if "model" not in state:
    np.savez(dst, **_strip_prefix(state))
    return
  model_state = _strip_prefix(state["model"])
  arrays = {f"model/{name}": value for name, value in model_state.items()}
  if state.get("ema") is not None:
    ema = state["ema"]
    if "shadow_params" in ema:
      # The port's only frozen parameter is the Fourier W, which its NCSN++ stores first.
      frozen = [name for name in ("all_modules.0.W",) if name in model_state]
      named = _ema_by_name(model_state, ema["shadow_params"], frozen)
    else:
      named = _strip_prefix(ema)
    arrays.update({f"ema/{name}": value for name, value in named.items()})
  if state.get("step") is not None:
    arrays["step"] = np.asarray(int(state["step"]))
  np.savez(dst, **arrays)


def import_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike, source: str | os.PathLike, *,
                      devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Writes an original checkpoint (``convert_checkpoint``) as the first checkpoint of ``workdir``.

  The optimiser state starts afresh; the step is the checkpoint's. Every mode then reads the workdir
  like a trained run's, and training resumes from it.

  Returns:
    {"step", "has_ema", "checkpoint_dir", "parameters"}.

  Raises:
    ValueError: when ``workdir`` already holds checkpoints (nothing is overwritten), or for weights
      that do not fit the config's network.
    FileNotFoundError: for a missing ``source``.
  """
  from score_sde import builders, checkpoints, losses, parallel  # pylint: disable=g-import-not-at-top
  workdir = checkpoints.absolute(workdir)
  existing = checkpoints.list_steps(workdir)
  if existing:
    raise ValueError(f"--workdir {workdir} already holds checkpoints (steps {existing}); import into an empty "
                     f"workdir.")
  if not os.path.exists(source):
    raise FileNotFoundError(f"--source {source} does not exist; pass the path of the original checkpoint file.")
  imported = convert_checkpoint(source, config)
  mesh = parallel.make_mesh(devices)
  state = losses.init_train_state(imported["params"], builders.build_optimizer(config))
  state = state.replace(step=jnp.asarray(imported["step"], state.step.dtype),
                        ema_params=jax.tree.map(jnp.asarray, imported["ema_params"]))
  state = parallel.replicate(state, mesh)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_config(config, workdir)
  t = config.training
  with checkpoints.quiet_orbax():
    ckpt = checkpoints.Checkpointer(workdir, snapshot_freq=t.snapshot_freq,
                                    preemption_freq=t.snapshot_freq_for_preemption, keep=t.keep_checkpoints)
    try:
      ckpt.save(imported["step"], state, {}, force=True)
    finally:
      ckpt.close()
  return {"step": imported["step"], "has_ema": imported["has_ema"], "parameters": wrapper.count_params(state.params),
          "checkpoint_dir": str(workdir / checkpoints.REGULAR_DIR)}


__all__ = ["Checkpoint", "FORMATS", "TORCH_LAYOUTS", "convert_checkpoint", "convert_jax_state", "convert_torch_state",
           "import_checkpoint", "input_shape_of", "jax_params_to_params", "load_checkpoint", "params_to_torch_state_dict", "pth_to_npz",
           "read_msgpack", "read_npz", "read_pth", "torch_layout", "torch_state_dict_to_params"]
