"""The FID Inception-v3 network: pool3 features (2048) and logits (1008) of the 2015-12-05 graph.

FID, KID and the Inception score are only comparable across papers when they use this one network:
the Inception-v3 that TensorFlow released as ``inception-2015-12-05`` and that TTUR and pytorch-fid
use. It is not torchvision's ImageNet Inception-v3; it differs in

* 1008 output classes (ImageNet's 1000 plus unused slots) and no auxiliary classifier;
* the 3x3 average pools of the A, C and first E blocks (``Mixed_5b-d``, ``Mixed_6b-e``,
  ``Mixed_7b``) average only the pixels inside the image (torch's ``count_include_pad=False``);
* the last block (``Mixed_7c``) pools its fourth branch with a 3x3 *max* pool (stride 1, pad 1);
* its weights.

Every convolution is ``BasicConv2d``: bias-free conv, batch norm (eps 1e-3, running statistics),
ReLU. Inputs are images (B, H, W, C) with values in [0, 255] (uint8 or float; C = 1 is repeated to
three channels); they are scaled to [0, 1], resized bilinearly to 299x299 (half-pixel centres, no
antialiasing: pytorch-fid's ``F.interpolate(..., align_corners=False)``) and mapped to [-1, 1]. The
network returns the global average of ``Mixed_7c`` (the pool3 features, (B, 2048)) and the logits of
the ``fc`` layer on them ((B, 1008)). Convolutions run at ``Precision.HIGHEST`` by default, so
accelerators do not round the features through TF32/bf16. Features therefore match pytorch-fid's;
TensorFlow's graph resizes with its legacy bilinear kernel (no half-pixel centres) and scales by
(x - 128) / 128, so statistics made by TensorFlow tools (the original's ``assets/stats``) differ
slightly: compare FIDs against statistics made with this network (``--mode fid_stats``).

The module holds no device code: jit ``InceptionV3().apply`` (or use ``inception_fn``) and pass a
batch sharded over the mesh; the parameters are replicated by jit.

Weights. The weights cannot be downloaded by the framework; ``eval.inception_path`` names a local
``.npz`` keyed by pytorch-fid's ``state_dict`` names (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch_pool.bn.running_var``, ``fc.bias``, ...; torch layouts, OIHW kernels). To make it,
download pytorch-fid's port of the 2015-12-05 weights,

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

and, on any machine with PyTorch, convert it once:

    python -c "import numpy as np, torch; sd = torch.load('pt_inception-2015-12-05-6726825d.pth', \
        map_location='cpu'); np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in sd.items()})"

(``pth_to_npz`` does the same from Python). Where torch is importable, ``load_variables`` also reads
the ``.pth`` directly. Loading is strict: a key the network does not have, a missing key or a
misshapen array is an error that lists them (``num_batches_tracked`` entries are ignored).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Variables = dict[str, Any]

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")


class BasicConv2d(nn.Module):
  """relu(batch_norm(conv(x))): a bias-free convolution with frozen batch norm (eps 1e-3).

  Attributes:
    features: output channels.
    kernel: (kh, kw).
    stride: one stride for both spatial axes.
    padding: (ph, pw), zeros on both sides of each axis.
    precision: the convolution's precision.
  """
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  """3x3, stride 1, pad 1 average over the pixels inside the image only."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int, pad: int) -> Array:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b-d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (64 + 64 + 96 + pool_features)."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (stride 2): 3x3 | 1x1-3x3-3x3 | maxpool (384 + 96 + C_in)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 (4 x 192)."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (stride 2): 1x1-3x3 | 1x1-1x7-7x1-3x3 | maxpool (320 + 192 + C_in)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1 (320 + 768 + 768 + 192).

  Attributes:
    max_pool: pool the last branch with a 3x3 max (Mixed_7c of the FID network) instead of the
      in-image 3x3 average (Mixed_7b).
    precision: the convolutions' precision.
  """
  max_pool: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: Array, resize: bool = True) -> Array:
  """[0, 255] images (B, H, W, C), C in {1, 3} -> network inputs (B, 299, 299, 3) in [-1, 1].

  With ``resize=False`` the spatial size is kept (the network needs at least 75x75).
  """
  x = jnp.asarray(images, jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"Inception inputs need 1 or 3 channels, got images of shape {images.shape}.")
  if resize and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


class InceptionV3(nn.Module):
  """The FID Inception-v3: [0, 255] images (B, H, W, C) -> (pool3 (B, 2048), logits (B, 1008)).

  Attributes:
    resize: resize inputs to 299x299 as the reference does; False feeds them at their own size
      (at least 75x75), which changes the features and only serves tests and experiments.
    precision: precision of every convolution and of the logits layer.
  """
  resize: bool = True
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    p = dict(precision=self.precision)
    x = preprocess(images, self.resize)
    # Stem: 299 -> 35 pixels, 3 -> 192 channels.
    x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    x = conv(80, name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2, 0)
    # 35x35 -> 17x17 -> 8x8 Inception blocks.
    x = InceptionA(32, **p, name="Mixed_5b")(x)
    x = InceptionA(64, **p, name="Mixed_5c")(x)
    x = InceptionA(64, **p, name="Mixed_5d")(x)
    x = InceptionB(**p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, **p, name=name)(x)
    x = InceptionD(**p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, **p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, **p, name="Mixed_7c")(x)
    # pool3 and the classifier.
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")(pool3)
    return pool3, logits


# Flax leaf (collection, name) -> the torch state_dict suffix of the same tensor.
_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _to_flax(a: np.ndarray) -> np.ndarray:
  """Torch layout -> flax layout: OIHW conv kernels to HWIO, (out, in) linear weights to (in, out)."""
  if a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  return a.T if a.ndim == 2 else a


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


@functools.cache
def _layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch name -> (flax variable path, flax shape), from the network's own variables."""
  shapes = jax.eval_shape(InceptionV3(resize=False).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    collection, modules, name = keys[0], keys[1:-1], keys[-1]
    layout[".".join(modules + (_TORCH_LEAF[collection, name],))] = (keys, tuple(leaf.shape))
  return layout


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """pytorch-fid's state_dict of the FID Inception: every name with its torch-layout shape."""
  return {name: _to_torch_shape(shape) for name, (_, shape) in _layout().items()}


def _listing(what: str, names: list[str], limit: int = 20) -> str:
  shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
  return f"{len(names)} {what}: {shown}"


def from_state_dict(state_dict: Mapping[str, Any]) -> Variables:
  """pytorch-fid state_dict (name -> array in torch layout) -> flax variables of ``InceptionV3``.

  Args:
    state_dict: every tensor of the FID Inception, keyed by its pytorch-fid name; extra
      ``*.num_batches_tracked`` entries are ignored.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as float32 numpy arrays.

  Raises:
    ValueError: listing unknown names, missing names and arrays of the wrong shape.
  """
  expected = torch_shapes()
  given = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  unknown = sorted(set(given) - set(expected))
  missing = sorted(set(expected) - set(given))
  misshapen = sorted(f"{k} {given[k].shape} (expected {expected[k]})"
                     for k in set(given) & set(expected) if given[k].shape != expected[k])
  if unknown or missing or misshapen:
    problems = [_listing(what, names) for what, names in
                (("unknown keys", unknown), ("missing keys", missing), ("misshapen arrays", misshapen))
                if names]
    raise ValueError("The FID Inception weights do not match the network; " + "; ".join(problems))
  variables: Variables = {}
  for name, (path, _) in _layout().items():
    node = variables
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = _to_flax(given[name].astype(np.float32))
  return variables


def _read_pth(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"Reading {path!r} needs PyTorch, which is not installed; convert it to .npz on a machine "
        "with PyTorch (see the docstring of score_sde.models.inception) and point "
        "eval.inception_path at the .npz.") from e
  state_dict = torch.load(path, map_location="cpu")
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def pth_to_npz(pth_path: str, npz_path: str) -> None:
  """Converts pytorch-fid's ``.pth`` weights to the ``.npz`` that ``load_variables`` reads (needs torch)."""
  state_dict = _read_pth(pth_path)
  from_state_dict(state_dict)  # Refuse to write a file that would not load.
  np.savez(npz_path, **state_dict)


def load_variables(path: str) -> Variables:
  """Reads the FID Inception weights from a local ``.npz`` (or ``.pth`` where torch is importable).

  Args:
    path: the file of ``eval.inception_path``.

  Returns:
    Flax variables ``{"params": ..., "batch_stats": ...}`` for ``InceptionV3``.

  Raises:
    FileNotFoundError: no file at ``path``; the message says where to obtain it.
    ValueError: the file's names or shapes do not match the network.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"FID Inception weights not found at {path!r} (eval.inception_path). Download pytorch-fid's "
        f"2015-12-05 Inception weights from {WEIGHTS_URL}, convert them to .npz as described in "
        "score_sde/models/inception.py, and set --config.eval.inception_path to that file.")
  if path.endswith((".pth", ".pt")):
    return from_state_dict(_read_pth(path))
  with np.load(path) as data:
    return from_state_dict({k: data[k] for k in data.files})


def inception_fn(variables: Variables, resize: bool = True,
                 precision: Any = jax.lax.Precision.HIGHEST) -> Callable[[Array], tuple[Array, Array]]:
  """A jitted ``images -> (pool3, logits)`` with the weights bound.

  Args:
    variables: from ``load_variables``.
    resize: resize inputs to 299x299 (the reference protocol).
    precision: convolution precision.

  Returns:
    A function of [0, 255] images (B, H, W, C) returning pool3 features (B, 2048) and logits
    (B, 1008), float32. Pass a batch sharded over a mesh to run data-parallel; on several hosts,
    pass ``variables`` already replicated over the mesh (``parallel.replicate``). Samples in
    [0, 1] should be quantised first, as a saved image would be: ``round(clip(255 x, 0, 255))``.
  """
  apply = jax.jit(InceptionV3(resize=resize, precision=precision).apply)
  variables = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), variables)
  return functools.partial(apply, variables)
