"""The noise-conditional Wide ResNet classifier p(y | x_sigma, sigma) of class-conditional sampling.

Song et al. (2021) guide VE sampling with grad_x log p(y | x, sigma) from a Wide ResNet (Zagoruyko &
Komodakis 2016) that sees noisy images and their noise level:

    x = (x - input_mean) / input_std            (optional per-channel normalisation)
    x = (x - mean) / max(std, 1 / sqrt(HWC))    (per-image standardisation)
    temb = Dense(4E, swish(Dense(4E, Fourier(log sigma))))   (E Gaussian Fourier frequencies, scale 16)
    h = conv3x3(x, 16)
    3 groups of n blocks, widths 16k, 32k, 64k, strides 1, 2, 2; each block:
        h + conv3x3(relu(GN(conv3x3(relu(GN(h))) + Dense(swish(temb)))))
    logits = Dense(num_classes, mean_hw(relu(GN(h))))

with depth = 6n + 4 and widen factor k. A block that changes the width adds its input average-pooled
and zero-padded in channels (no projection), and the first block of the first group activates its
input before the split (the AutoAugment WRN). GroupNorm replaces batch norm (min(C/4, 32) groups,
eps 1e-5), so the classifier is a pure function of each image. Convolutions have no bias and
He-normal (fan-out) kernels; the logits layer is U(+-1/sqrt(num_classes)).

The original hard-codes WRN-28-10 on 32x32x3 CIFAR-10 inputs with 10 classes and normalises the
inputs with CIFAR-10's channel statistics outside the network (``get_logit_fn``); here depth, width,
classes, embedding and the input normalisation are attributes (``CIFAR10_MEAN`` / ``CIFAR10_STD``
reproduce the original's), and any H, W divisible by 4 and any channel count work.
``small_wide_resnet`` is WRN-10-2 with a 32-frequency embedding, for 8x8 to 16x16 images.

``MLPClassifier`` is the same idea for vectors (the toy 2-D sets): residual MLP blocks conditioned on
the Fourier features of log sigma, then a linear layer to the logits.

Not score networks: they return logits (B, num_classes), not an array shaped like x, so they are not
in ``models.MODELS``; ``get_classifier(config)`` builds one from ``config.classifier`` (by the names
in ``CLASSIFIERS``); ``training.objective = "classifier"`` trains it (``score_sde.train``).

Parameter names are the original's (its checkpoints load as they are): ``GaussianFourierProjection_0/W``,
``Dense_0``, ``Dense_1`` (noise embedding), ``init_conv``, ``WideResnetGroup_{g}/WideResnetBlock_{b}/``
{``init_bn``, ``conv1``, ``Dense_0``, ``bn_2``, ``conv2``}, ``pre-pool-bn``, ``Dense_2`` (logits).
Given the same parameters, WRN-28-10 here returns the original's logits exactly; it has 38,913,242
parameters (``small_wide_resnet`` for 8x8x1 digits: 346,426).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from score_sde.models import layers

Array = jax.Array

# CIFAR-10 channel statistics in [0, 1] units: the original's input normalisation.
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _logits_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  bound = shape[1] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _norm_relu(x: Array, name: str) -> Array:
  return nn.relu(nn.GroupNorm(num_groups=layers.num_groups(x.shape[-1]), epsilon=1e-5, name=name)(x))


def per_image_standardization(x: Array) -> Array:
  """(x - mean) / max(std, 1 / sqrt(N)) over each image's N = H W C values; (B, H, W, C) -> same."""
  n = math.prod(x.shape[1:])
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) / jnp.maximum(std, 1.0 / math.sqrt(n))


class WideResnetBlock(nn.Module):
  """Pre-activation residual block with the noise embedding added after the first convolution.

  Attributes:
    channels: output channels.
    stride: stride of the first convolution (1 or 2).
    activate_before_residual: normalise and activate the input before the residual split.
  """

  channels: int
  stride: int = 1
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    """(B, H, W, C), (B, E) -> (B, H / stride, W / stride, channels)."""
    if self.activate_before_residual:
      x = h = _norm_relu(x, "init_bn")
    else:
      h = _norm_relu(x, "init_bn")
    conv = functools.partial(nn.Conv, self.channels, (3, 3), padding="SAME", use_bias=False,
                             kernel_init=_conv_init)
    h = conv(strides=self.stride, name="conv1")(h)
    h = h + nn.Dense(self.channels, name="Dense_0")(nn.swish(temb))[:, None, None, :]
    h = _norm_relu(h, "bn_2")
    h = conv(name="conv2")(h)
    if x.shape[-1] != self.channels:  # Average-pool to the new resolution, zero-pad the new channels.
      x = nn.avg_pool(x, (self.stride, self.stride), (self.stride, self.stride))
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.channels - x.shape[-1])))
    return h + x


class WideResnetGroup(nn.Module):
  """``blocks`` WideResnetBlocks; the first one strides and changes the width.

  Attributes:
    blocks: number of blocks.
    channels: output channels.
    stride: stride of the first block.
    activate_before_residual: passed to the first block.
  """

  blocks: int
  channels: int
  stride: int = 1
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    """(B, H, W, C), (B, E) -> (B, H / stride, W / stride, channels)."""
    for i in range(self.blocks):
      first = i == 0
      x = WideResnetBlock(self.channels, self.stride if first else 1, self.activate_before_residual and first,
                          name=f"WideResnetBlock_{i}")(x, temb)
    return x


class WideResnet(nn.Module):
  """Noise-conditional WRN-depth-widen_factor: (B, H, W, C) images, (B,) sigmas -> (B, num_classes) logits.

  Attributes:
    depth: 6 n + 4 for n blocks per group (28: the original).
    widen_factor: width multiplier k of the groups' 16, 32, 64 channels (10: the original).
    num_classes: number of classes.
    embedding_size: Gaussian Fourier frequencies of log sigma; the embedding MLP has 4x as many units.
    fourier_scale: standard deviation of the frequencies.
    input_mean, input_std: per-channel normalisation of the inputs, or () for none
      (``CIFAR10_MEAN`` / ``CIFAR10_STD`` with [0, 1] data reproduce the original).
  """

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  embedding_size: int = 128
  fourier_scale: float = 16.0
  input_mean: Sequence[float] = ()
  input_std: Sequence[float] = ()

  def _validate(self, x: Array, sigmas: Array) -> None:
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"A Wide ResNet has depth 6 n + 4 with n >= 1 blocks per group (10, 16, 22, 28, ...), "
                       f"got {self.depth}.")
    if x.ndim != 4 or x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f"WideResnet halves NHWC images twice, so H and W must be multiples of 4; got shape "
                       f"{x.shape}. Pad or resize the images.")
    if sigmas.shape != x.shape[:1]:
      raise ValueError(f"sigmas must have shape (B,) = {x.shape[:1]}, got {sigmas.shape}.")
    if len(self.input_mean) != len(self.input_std) or len(self.input_mean) not in (0, x.shape[-1]):
      raise ValueError(f"input_mean and input_std need one value per channel ({x.shape[-1]}) or none, got "
                       f"{len(self.input_mean)} and {len(self.input_std)}.")

  @nn.compact
  def __call__(self, x: Array, sigmas: Array, train: bool = False) -> Array:
    """Applies the classifier.

    Args:
      x: noisy images (B, H, W, C), H and W divisible by 4.
      sigmas: the noise level of each image (B,), positive: VE sigma(t), or the marginal std sigma_t
        of another SDE (the embedding sees log sigma).
      train: unused (no dropout or batch statistics); kept for a common signature.

    Returns:
      Logits (B, num_classes).
    """
    del train
    self._validate(x, sigmas)
    if self.input_mean:
      x = (x - jnp.asarray(self.input_mean, x.dtype)) / jnp.asarray(self.input_std, x.dtype)
    x = per_image_standardization(x)
    width = 4 * self.embedding_size
    temb = layers.GaussianFourierProjection(self.embedding_size, self.fourier_scale,
                                            name="GaussianFourierProjection_0")(jnp.log(sigmas))
    temb = nn.Dense(width, name="Dense_0")(temb)
    temb = nn.Dense(width, name="Dense_1")(nn.swish(temb))
    h = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init, name="init_conv")(x)
    blocks = (self.depth - 4) // 6
    for g, (multiple, stride) in enumerate(((1, 1), (2, 2), (4, 2))):
      h = WideResnetGroup(blocks, 16 * multiple * self.widen_factor, stride, activate_before_residual=g == 0,
                          name=f"WideResnetGroup_{g}")(h, temb)
    h = jnp.mean(_norm_relu(h, "pre-pool-bn"), axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_logits_init, name="Dense_2")(h)


def small_wide_resnet(num_classes: int = 10, **overrides) -> WideResnet:
  """WRN-10-2 with 32 Fourier frequencies: the classifier for 8x8 to 16x16 images (``overrides`` win)."""
  return WideResnet(**{"depth": 10, "widen_factor": 2, "num_classes": num_classes, "embedding_size": 32,
                       **overrides})


class MLPClassifier(nn.Module):
  """Noise-conditional classifier for vectors: (B, D) data, (B,) sigmas -> (B, num_classes) logits.

      temb = Dense(SiLU(Dense(Fourier(log sigma))))    (B, 4 E)
      h = Dense(x); h = ResidualMLPBlock(h, temb) per width; logits = Dense(SiLU(h))

  Attributes:
    hidden_dims: width of each residual block.
    num_classes: number of classes.
    embedding_size: Gaussian Fourier frequencies E of log sigma.
    fourier_scale: standard deviation of the frequencies.
  """

  hidden_dims: Sequence[int] = (128, 128)
  num_classes: int = 10
  embedding_size: int = 32
  fourier_scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array, sigmas: Array, train: bool = False) -> Array:
    """(B, ...) data (flattened), (B,) positive noise levels -> (B, num_classes) logits."""
    if not self.hidden_dims:
      raise ValueError("hidden_dims must name at least one width, e.g. (128, 128); set "
                       "config.classifier.hidden_dims.")
    temb = layers.NoiseLabelEmbedding(4 * self.embedding_size, "fourier", self.embedding_size,
                                      self.fourier_scale)(sigmas)
    h = nn.Dense(self.hidden_dims[0], kernel_init=layers.default_init())(x.reshape(x.shape[0], -1))
    for width in self.hidden_dims:
      h = layers.ResidualMLPBlock(width)(h, temb, train)
    return nn.Dense(self.num_classes, kernel_init=_logits_init)(nn.silu(h))


# Classifiers by ``config.classifier.name``.
CLASSIFIERS: dict[str, type[nn.Module]] = {"wideresnet": WideResnet, "mlp": MLPClassifier}


def get_classifier(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the classifier named ``config.classifier.name`` from the keys of ``config.classifier``.

  Every attribute of the classifier with a key of the same name in ``config.classifier`` is passed
  explicitly (sequences as tuples, so the module hashes); the others keep their defaults.

  Raises:
    ValueError: for an unknown name.
  """
  section = config.classifier
  name = section.name.lower()
  if name not in CLASSIFIERS:
    raise ValueError(f"Unknown classifier {section.name!r}; valid choices: {sorted(CLASSIFIERS)}. Set "
                     f"config.classifier.name to one of them.")
  cls = CLASSIFIERS[name]
  kwargs = {}
  for field in cls.__dataclass_fields__.values():
    if field.name not in ("parent", "name") and field.name in section:
      value = section[field.name]
      kwargs[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
  return cls(**kwargs)


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CLASSIFIERS", "MLPClassifier", "WideResnet", "WideResnetBlock",
           "WideResnetGroup", "get_classifier", "per_image_standardization", "small_wide_resnet"]
