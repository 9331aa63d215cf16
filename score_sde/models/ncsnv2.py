"""NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): RefineNets on a dilated ResNet.

    h = conv3x3(x) (x mapped to [-1, 1] first unless the data are centred)
    ResNet: stages of two residual blocks; the first block of a stage may downsample (mean pooling)
            or, when dilated, keep the resolution; layer_k is the output of stage k
    RefineNet: ref = RefineBlock([layer_K]); ref = RefineBlock([layer_k, ref]) for k = K-1 .. 1
    out = conv3x3(act(norm(ref)))

| model (name)           | stages: (width / nf, downsample, dilation)          | RefineBlocks / nf | H, W by |
|------------------------|-----------------------------------------------------|-------------------|---------|
| NCSNv2 (``ncsnv2_64``) | (1,-,1) (2,down,1) (2,down,2) (2,down,4)            | 2 2 1 1           | 2       |
| NCSNv2_128             | (1,-,1) (2,down,1) (2,down,1) (4,down,2) (4,down,4) | 4 2 2 1 1         | 4       |
| NCSNv2_256             | as 128, with a third (2,down,1) stage               | 4 2 2 2 1 1       | 8       |
| NCSN (``ncsn``, v1)    | as NCSNv2 (64), normalisations conditioned on y     | 2 2 1 1           | 2       |

("down" in a dilated stage keeps the resolution, as in both originals; the last column is what H and
W must be multiples of.) NCSNv2 is unconditional: its labels only set the sigma it divides by. NCSN
v1 conditions every normalisation on the integer noise index y (an embedding table with one row per
noise level: ``num_classes`` rows, ``num_scales`` unless set), so it needs discrete labels: index k
is the k-th largest sigma (the wrapper's discrete VE labels).

Dividing by sigma. With ``scale_by_sigma`` the output is divided by the noise level of the label,
inside the network as in the originals: for discrete labels (``continuous=False``) by the k-th entry
of the descending table exp(linspace(log sigma_max, log sigma_min, num_scales)), for continuous
labels by the label itself, which is sigma (``layers.noise_levels``, shared with NCSN++). The
original's bedroom config, with its ``continuouse`` typo, looked the table up with float sigmas;
here the ``continuous`` flag (``config.training.continuous``) says what the labels are.

Which original. Three implementations exist: the NCSN / NCSNv2 authors' PyTorch code
(ermongroup/ncsnv2, whose trained weights are public), the PyTorch port of score_sde (the same
networks, but it cannot build them: an unguarded ``bias`` access and padding 1 on dilated convolutions)
and the JAX original (which does not initialise on flax >= 0.7). These networks follow the authors'
code, and reproduce its outputs to float32 round-off given the same weights (tests hold reference
outputs). The JAX original differs in three places: its third RefineBlock in the 64 px network and
NCSN v1 has 2 nf channels instead of nf (33,970,563 parameters instead of 29,694,083 for NCSNv2 with
nf = 128), it uses biased variances (see ``models.normalization``), and its ``bilinear`` upsampling
has half-pixel centres; ``interpolation='bilinear_align_corners'`` is the authors' (the paper
configs use it). The authors' 28 px padding tweak only touches dilated blocks, where it has no effect,
and is omitted.

Memory and speed options (off by default, which is the authors' arithmetic): ``remat`` recomputes
each residual block's and RefineBlock's activations on the backward pass, and ``dtype='bfloat16'``
computes the convolutions and the activations between them in bfloat16, with float32 parameters,
normalisation statistics (see ``models.normalization``) and output; neither changes the parameters,
so the authors' weights load either way.

Parameter counts with nf = 128 (equal to the authors' networks): NCSNv2 29,694,083; NCSNv2_128
83,445,379; NCSNv2_256 94,132,611; NCSN v1 30,117,635 with 10 noise levels (each level adds one row,
3C values, to each of its conditional normalisations: 39,750,659 with 232 levels, 51,379,715 with 500).

Parameter names. Top level: ``Conv_0`` (first conv), ``ResidualBlock_i`` (ResNet blocks in order,
two per stage; ``ConditionalResidualBlock_i`` for v1), ``RefineBlock_j`` (coarsest first;
``CondRefineBlock_j``), ``<Norm>_0`` (final normalisation, e.g. ``InstanceNorm2dPlus_0``), ``Conv_1``
(last conv). ``authors_name`` maps each to the authors' PyTorch state_dict key, and
``from_authors_state_dict`` imports their weights (conv weights OIHW -> HWIO by
``w.transpose(2, 3, 1, 0)``; ``sigmas`` is a buffer, not a parameter; b, s count from 1):

| PyTorch (ermongroup/ncsnv2)                | here                                                   |
|--------------------------------------------|--------------------------------------------------------|
| begin_conv, end_conv, normalizer           | Conv_0, Conv_1, <Norm>_0                               |
| res{1, 2, 3, [31,] 4, [5]}.{j}, in order    | ResidualBlock_{2 * (position of the stage) + j}        |
|   normalize1/2, conv1/2, shortcut          |   the same names (ConvMeanPool's ``conv`` is Conv_0)   |
| refine{1, 2, [31,] 3, 4, [5]}, in order     | RefineBlock_{position}                                 |
|   adapt_convs.{i}.{b}_{s}_conv             |   RCUBlock_{i}/Conv_{2 (b - 1) + s - 1}                |
|   msf.convs.{i}, crp.convs.{i}             |   MSFBlock_0/Conv_{i}, CRPBlock_0/Conv_{i}             |
|   output_convs.{b}_{s}_conv                |   RCUBlock_{number of inputs}/Conv_{2 (b - 1) + s - 1} |
| InstanceNorm++ alpha, gamma, beta          | alpha, gamma, beta, shape (C,)                         |
| VarianceNorm alpha                         | scale                                                  |
| v1: ``*.embed.weight`` (K, 3C)             | ``*/Embed_0/embedding``                                |
| v1: {b}_{s}_norm, msf.norms.{i}, crp.norms.{i} | ConditionalInstanceNorm2dPlus_{k}, k as for Conv_{k} |

(The authors' InstanceNorm has no affine parameters; here it has a scale and a bias, as in the JAX
original; GroupNorm is the JAX original's only.) The JAX original's automatic names are the same
except inside residual blocks, numbered by creation: normalize1, normalize2 = ``<Norm>_0``,
``<Norm>_1``; conv1, conv2, shortcut = ``Conv_0``, ``Conv_1``, ``Conv_2``, except that a
non-resampling block with a shortcut conv created it first (shortcut, conv1, conv2 = ``Conv_0``,
``Conv_1``, ``Conv_2``), and an undilated downsampling block named its ConvMeanPools
``ConvMeanPool_0`` (conv2) and ``ConvMeanPool_1`` (shortcut). Its normalisation parameters had shape (1, 1, 1, C).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models import layers, ncsn_layers
from score_sde.models import normalization as normalization_lib

Array = jax.Array
# One ResNet stage: (width as a multiple of nf, first block downsamples, dilation).
Stage = tuple[int, bool, int]


def _check_input(x: Array, stages: tuple[Stage, ...], name: str) -> None:
  factor = 2 ** sum(down and dilation == 1 for _, down, dilation in stages)
  if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(f"{name} takes NHWC images whose height and width are multiples of {factor}, got "
                     f"shape {x.shape}; pad or resize the images, or pick the NCSNv2 variant for their size.")


def _output(module: nn.Module, h: Array, labels: Array) -> Array:
  """h (B, H, W, C) in float32, divided by the sigma of ``labels`` (B,) if ``module.scale_by_sigma``."""
  h = h.astype(jnp.float32)
  if not module.scale_by_sigma:
    return h
  sigma = layers.noise_levels(labels, module.continuous, module.sigma_min, module.sigma_max,
                              module.num_scales)
  return h / sigma[:, None, None, None].astype(h.dtype)


class NCSNv2(nn.Module):
  """NCSNv2 for images up to about 64 px (CIFAR-10, CelebA 64): (B, H, W, C), (B,) -> (B, H, W, C).

  Attributes:
    nf: channels of the first stage.
    normalization: ``InstanceNorm++``, ``InstanceNorm``, ``VarianceNorm`` or ``GroupNorm``.
    nonlinearity: ``elu``, ``relu``, ``lrelu`` or ``swish``.
    interpolation: upsampling of the RefineNet fusion: ``bilinear``, ``bilinear_align_corners``
      (the NCSNv2 authors' code) or ``nearest_neighbor``.
    centered: the data already lie in [-1, 1]; otherwise [0, 1] inputs are mapped to 2x - 1.
    scale_by_sigma: divide the output by the noise level sigma of the label (the NCSNv2 default).
    sigma_min, sigma_max, num_scales: the VE schedule, for sigma of a discrete label (defaults: the
      original's CIFAR-10 NCSNv2 config).
    continuous: labels are sigma itself rather than indices of the descending table.
    remat: rematerialise every residual block and RefineBlock (``nn.remat``): the backward pass
      recomputes their activations (less memory, more compute; same parameters and outputs).
    dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters, normalisation statistics and the
      output stay float32).
  """

  nf: int = 128
  normalization: str = "InstanceNorm++"
  nonlinearity: str = "elu"
  interpolation: str = "bilinear"
  centered: bool = False
  scale_by_sigma: bool = True
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 232
  continuous: bool = False
  remat: bool = False
  dtype: str = "float32"

  stages: ClassVar[tuple[Stage, ...]] = ((1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4))
  refine_widths: ClassVar[tuple[int, ...]] = (2, 2, 1, 1)  # coarsest RefineBlock first

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    """Applies the network.

    Args:
      x: images (B, H, W, C).
      labels: noise labels (B,): indices of the descending sigma table, or sigma if ``continuous``;
        only used to divide by sigma (NCSNv2 is otherwise unconditional).
      train: unused (no dropout); kept for the common network signature.

    Returns:
      (B, H, W, C), divided by sigma if ``scale_by_sigma``.
    """
    del train
    _check_input(x, self.stages, type(self).__name__)
    act = ncsn_layers.get_act(self.nonlinearity)
    dtype = layers.compute_dtype(self.dtype)
    norm = normalization_lib.get_normalization(self.normalization, dtype=dtype)
    h = x if self.centered else 2 * x - 1
    h = h if dtype is None else h.astype(dtype)
    h = ncsn_layers.conv(h, self.nf, dtype=dtype)
    # ResNet backbone.
    features = []
    for width, down, dilation in self.stages:
      block = functools.partial(layers.rematerialised(ncsn_layers.ResidualBlock, self.remat), width * self.nf, norm,
                                act=act, dilation=dilation, dtype=dtype)
      h = block(resample="down" if down else None)(h)
      h = block(resample=None)(h)
      features.append(h)
    # RefineNet, from the coarsest features to the finest.
    h = None
    for i, (skip, width) in enumerate(zip(reversed(features), self.refine_widths)):
      h = layers.rematerialised(ncsn_layers.RefineBlock, self.remat)(
          width * self.nf, act, self.interpolation, start=i == 0, end=i == len(features) - 1, dtype=dtype)(
              [skip] if h is None else [skip, h])
    h = act(norm(h.shape[-1])(h))
    return _output(self, ncsn_layers.conv(h, x.shape[-1], dtype=dtype), labels)


class NCSNv2_128(NCSNv2):  # pylint: disable=invalid-name
  """NCSNv2 for 96-128 px images (the authors' ``NCSNv2Deeper``; LSUN 128); attributes as ``NCSNv2``."""

  stages: ClassVar[tuple[Stage, ...]] = (
      (1, False, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4))
  refine_widths: ClassVar[tuple[int, ...]] = (4, 2, 2, 1, 1)


class NCSNv2_256(NCSNv2):  # pylint: disable=invalid-name
  """NCSNv2 for 129-256 px images (the authors' ``NCSNv2Deepest``; FFHQ 256); attributes as ``NCSNv2``."""

  stages: ClassVar[tuple[Stage, ...]] = (
      (1, False, 1), (2, True, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4))
  refine_widths: ClassVar[tuple[int, ...]] = (4, 2, 2, 2, 1, 1)


class NCSN(nn.Module):
  """NCSN v1: the 64 px NCSNv2 layout with every normalisation conditioned on the noise index.

  Attributes:
    nf: channels of the first stage.
    num_classes: number of noise levels the conditional normalisations distinguish; 0 means
      ``num_scales`` (the original's configs never set it). If set, it must equal ``num_scales``.
    normalization: ``InstanceNorm++`` (the only conditional normalisation).
    nonlinearity: ``elu``, ``relu``, ``lrelu`` or ``swish``.
    interpolation: upsampling of the RefineNet fusion (see ``NCSNv2``).
    centered: the data already lie in [-1, 1]; otherwise [0, 1] inputs are mapped to 2x - 1.
    scale_by_sigma: divide the output by sigma of the label (off in the original's v1 configs).
    sigma_min, sigma_max, num_scales: the VE schedule; num_scales is the number of noise levels N
      (defaults: the original's CIFAR-10 NCSN config).
    continuous: must be False: NCSN conditions on the noise index, so it trains discretely.
    remat: rematerialise every residual block and RefineBlock (see ``NCSNv2``).
    dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters, the conditional normalisations'
      tables and statistics, the 5x5 average pooling and the output stay float32).
  """

  nf: int = 128
  num_classes: int = 0
  normalization: str = "InstanceNorm++"
  nonlinearity: str = "elu"
  interpolation: str = "bilinear"
  centered: bool = False
  scale_by_sigma: bool = False
  sigma_min: float = 0.01
  sigma_max: float = 1.0
  num_scales: int = 10
  continuous: bool = False
  remat: bool = False
  dtype: str = "float32"

  stages: ClassVar[tuple[Stage, ...]] = NCSNv2.stages
  refine_widths: ClassVar[tuple[int, ...]] = NCSNv2.refine_widths

  @property
  def num_levels(self) -> int:
    """Rows of the conditional normalisations' tables: ``num_classes``, or ``num_scales`` if 0."""
    if self.num_classes not in (0, self.num_scales):
      raise ValueError(f"NCSN conditions on the noise index, so num_classes must equal num_scales "
                       f"({self.num_scales}), got {self.num_classes}; set config.model.num_classes = 0 to "
                       f"derive it.")
    return self.num_classes or self.num_scales

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    """Applies the network.

    Args:
      x: images (B, H, W, C).
      labels: noise indices (B,) in [0, num_levels), index 0 the largest sigma; integers or whole
        floats (rounded). Out-of-range indices give NaN outputs.
      train: unused (no dropout); kept for the common network signature.

    Returns:
      (B, H, W, C), divided by sigma if ``scale_by_sigma``.
    """
    del train
    _check_input(x, self.stages, "NCSN")
    if self.continuous:
      raise ValueError("NCSN conditions its normalisations on the integer noise index and cannot take "
                       "continuous sigma labels; train it discretely (config.training.continuous = "
                       "False), or use ncsnv2_* or ncsnpp for continuous training.")
    y = jnp.round(labels).astype(jnp.int32) if jnp.issubdtype(labels.dtype, jnp.floating) else labels
    act = ncsn_layers.get_act(self.nonlinearity)
    dtype = layers.compute_dtype(self.dtype)
    norm = normalization_lib.get_normalization(self.normalization, conditional=True,
                                               num_classes=self.num_levels, dtype=dtype)
    h = x if self.centered else 2 * x - 1
    h = h if dtype is None else h.astype(dtype)
    h = ncsn_layers.conv(h, self.nf, dtype=dtype)
    features = []
    for width, down, dilation in self.stages:
      block = functools.partial(layers.rematerialised(ncsn_layers.ConditionalResidualBlock, self.remat),
                                width * self.nf, norm, act=act, dilation=dilation, dtype=dtype)
      h = block(resample="down" if down else None)(h, y)
      h = block(resample=None)(h, y)
      features.append(h)
    h = None
    for i, (skip, width) in enumerate(zip(reversed(features), self.refine_widths)):
      h = layers.rematerialised(ncsn_layers.CondRefineBlock, self.remat)(
          width * self.nf, norm, act, self.interpolation, start=i == 0, end=i == len(features) - 1,
          dtype=dtype)([skip] if h is None else [skip, h], y)
    h = act(norm(h.shape[-1])(h, y))
    return _output(self, ncsn_layers.conv(h, x.shape[-1], dtype=dtype), labels)


# --- The NCSN authors' parameter names ---------------------------------------------------------------


def _authors_blocks(n_stages: int) -> tuple[list[str], list[str]]:
  """The authors' ResNet stage names, finest first, and RefineBlock names, coarsest first."""
  if n_stages == 6:  # NCSNv2_256: the extra stage and its RefineBlock are numbered 31.
    return ["res1", "res2", "res3", "res31", "res4", "res5"], ["refine1", "refine2", "refine31", "refine3",
                                                               "refine4", "refine5"]
  return [f"res{i + 1}" for i in range(n_stages)], [f"refine{i + 1}" for i in range(n_stages)]


def _rcu_unit(index: int) -> str:
  """``{b}_{s}`` of the k-th convolution (or normalisation) of an RCU block, 2 per unit."""
  return f"{index // 2 + 1}_{index % 2 + 1}"


def _index(name: str) -> int:
  return int(name.rsplit("_", 1)[1])


def authors_name(model: nn.Module, path: str) -> str:
  """The key in the NCSN authors' PyTorch state_dict (ermongroup/ncsnv2) of one parameter of ``model``.

  Args:
    model: an ``NCSN``, ``NCSNv2``, ``NCSNv2_128`` or ``NCSNv2_256`` with ``InstanceNorm++`` or
      ``VarianceNorm`` normalisation (the authors' InstanceNorm and GroupNorm have no parameters or no
      counterpart).
    path: the parameter's '/'-joined path in ``variables["params"]``, e.g.
      ``ResidualBlock_2/conv2/Conv_0/kernel``.

  Returns:
    The authors' key, e.g. ``res2.0.conv2.conv.weight``. Values correspond one to one except conv
    kernels, which the authors store OIHW: ``kernel = weight.transpose(2, 3, 1, 0)``.

  Raises:
    ValueError: for a path that has no counterpart.
  """
  top, *inner, leaf = path.split("/")
  stages, refines = _authors_blocks(len(model.stages))
  leaves = {"kernel": "weight", "bias": "bias", "alpha": "alpha", "gamma": "gamma", "beta": "beta",
            "embedding": "weight", "scale": "alpha" if model.normalization == "VarianceNorm" else None}
  if leaves.get(leaf) is None:
    raise ValueError(f"{path} has no counterpart in the NCSN authors' networks (their {model.normalization} "
                     f"has no parameter {leaf!r}).")
  inner = ["embed" if part == "Embed_0" else part for part in inner]
  if top in ("Conv_0", "Conv_1"):
    key = ["begin_conv" if top == "Conv_0" else "end_conv"]
  elif top.endswith("Norm2dPlus_0") or top.endswith("Norm2d_0"):
    key = ["normalizer", *inner]
  elif "ResidualBlock_" in top:
    i = _index(top)
    key = [stages[i // 2], str(i % 2), inner[0], *(["conv"] if inner[1:2] == ["Conv_0"] else inner[1:])]
  elif "RefineBlock_" in top:
    j = _index(top)
    block, layer, rest = inner[0], inner[1], inner[2:]
    if "RCUBlock_" in block:
      k = _index(block)
      part = ["output_convs"] if k == (1 if j == 0 else 2) else ["adapt_convs", str(k)]
      key = [refines[j], *part, f"{_rcu_unit(_index(layer))}_{'conv' if layer.startswith('Conv') else 'norm'}", *rest]
    else:  # MSFBlock_0 / CRPBlock_0 (or their conditional versions): convs.i and norms.i.
      key = [refines[j], "msf" if "MSF" in block else "crp", "convs" if layer.startswith("Conv") else "norms",
             str(_index(layer)), *rest]
  else:
    raise ValueError(f"{path} is not a parameter path of {type(model).__name__}.")
  return ".".join([*key, leaves[leaf]])


def from_authors_state_dict(model: nn.Module, state_dict: Mapping[str, Any], input_shape: Sequence[int]) -> dict:
  """``variables["params"]`` of ``model`` from the NCSN authors' PyTorch state_dict (numpy or torch tensors).

  Strict: a key that maps to no parameter, a parameter without a key, or a shape that differs is a
  ``ValueError`` listing them. DataParallel's ``module.`` prefix is dropped; the ``sigmas`` buffer of
  NCSNv2 must equal the model's descending table (``num_scales``, ``sigma_min``, ``sigma_max``).

  Args:
    model: the network the weights are for (see ``authors_name``).
    state_dict: the authors' ``score.state_dict()`` (the first entry of their checkpoint list), or
      their EMA helper's state_dict (its last entry: the same keys, without the buffer).
    input_shape: (B, H, W, C) of the model's inputs.

  Returns:
    The parameter tree, structured as ``wrapper``'s ``init_model(...)["params"]``.
  """
  shapes = flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tuple(input_shape)),
                                        jnp.zeros(input_shape[:1])))["params"], sep="/")
  tensors = {k.removeprefix("module."): v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
             for k, v in state_dict.items()}  # torch tensors (on any device) or arrays
  sigmas = tensors.pop("sigmas", None)
  if sigmas is not None:
    expected = layers.smld_sigmas(model.sigma_min, model.sigma_max, model.num_scales)
    if sigmas.shape != expected.shape or not np.allclose(sigmas, expected, rtol=1e-5):
      raise ValueError(f"The checkpoint's {sigmas.size} noise levels from {sigmas.max():g} to {sigmas.min():g} "
                       f"differ from the model's {model.num_scales} from {model.sigma_max:g} to {model.sigma_min:g}.")
  keys = {path: authors_name(model, path) for path in shapes}
  missing = sorted(key for key in keys.values() if key not in tensors)
  unexpected = sorted(set(tensors) - set(keys.values()))
  params, wrong = {}, []
  for path, key in keys.items():
    if key in tensors:
      value = tensors[key].transpose(2, 3, 1, 0) if path.endswith("/kernel") else tensors[key]
      if value.shape != shapes[path].shape:
        wrong.append(f"{key} {value.shape} -> {path} {shapes[path].shape}")
      params[path] = jnp.asarray(value, jnp.float32)
  if missing or unexpected or wrong:
    raise ValueError(f"The state_dict does not fit {type(model).__name__}: missing {missing}, unexpected "
                     f"{unexpected}, shapes that differ {wrong}.")
  return flax.traverse_util.unflatten_dict(params, sep="/")


__all__ = ["NCSN", "NCSNv2", "NCSNv2_128", "NCSNv2_256", "authors_name", "from_authors_state_dict"]
