"""NCSN++ and DDPM++ (Song et al. 2021): the U-Net family of the paper's best models.

One module with the original's options (its ``models/ncsnpp.py``); the paper's two architectures
are settings of it:

* DDPM++: ``resblock_type='biggan'``, ``fir=False``, ``progressive='none'``,
  ``progressive_input='none'``, ``embedding_type='positional'``, ``skip_rescale=True``.
* NCSN++: ``fir=True`` and ``progressive_input='residual'`` (``output_skip`` / ``input_skip`` at
  256 px and above), Fourier features for continuous VE training.

The network, for L = len(ch_mult) levels at resolutions H / 2^l:

    temb   = Dense(act(Dense(embed(label))))                       when ``conditional``
    h_0    = Conv3x3(x)      (x mapped to 2x - 1 first unless ``centered``)
    down:  per level, num_res_blocks blocks (each followed by attention at attn_resolutions), then,
           except at the last level, a resampling step (a BigGAN block with down=True, or a
           ``Downsample``); with ``progressive_input`` the input image, repeatedly downsampled,
           joins here (``input_skip``: Combine; ``residual``: (conv-downsampled pyramid + h), the sum
           becoming h)
    middle: block, attention, block
    up:    per level, num_res_blocks + 1 blocks on [h, skip] (attention once at the end of the
           level), then the ``progressive`` output path (``output_skip``: an image pyramid of
           Conv3x3(act(GN(h))) outputs, upsampled and summed; ``residual``: a feature pyramid added
           to h), then upsampling except at the first level
    out    = Conv3x3(act(GN(h)))   (or the output pyramid with ``output_skip``)
    out   /= sigma                 with ``scale_by_sigma`` (VE: the network outputs the score)

sigma is the label itself for continuous training and the entry of the descending SMLD table for a
discrete label (an index). The original looked sigma up in the table whenever the embedding was
positional, which turns a continuous VE label into a meaningless index; here ``continuous`` decides.

Residual sums are divided by sqrt(2) with ``skip_rescale``. Two options trade exactness of the
defaults for memory or speed, and leave the parameters as they are (checkpoints load either way):
``remat`` recomputes each residual and attention block's activations on the backward pass, and
``dtype='bfloat16'`` computes in bfloat16 with float32 parameters and a float32 output. Sub-modules are created in the
original's order, so every parameter has the original's Flax name (``ResnetBlockBigGANpp_3``,
``Conv_0``, ...) and its checkpoints load one to one (``score_sde.convert``).

Shapes: x (B, H, W, C) NHWC; labels (B,); output (B, H, W, C).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers
from score_sde.models import up_or_down_sampling

Array = jax.Array

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {option} {value!r}; valid choices: {list(choices)}.")


class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ score network: (B, H, W, C) images and (B,) noise labels -> (B, H, W, C).

  Defaults are the paper's NCSN++ (continuous VE, CIFAR-10) settings, except ``scale_by_sigma``.

  Attributes:
    nf: channels of the first level; the label embedding has 4 nf features.
    ch_mult: channel multiplier of each level.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: resolutions (H of the feature map) that get self-attention.
    dropout: dropout rate of the residual blocks (active only when ``train``).
    resamp_with_conv: learned convolutions in ``Upsample`` / ``Downsample`` (``resblock_type='ddpm'``).
    conditional: condition on the noise label (the Fourier ``W`` exists either way, as in the original).
    fir: FIR resampling (``up_or_down_sampling``) instead of nearest copies / average pooling.
    fir_kernel: the FIR filter.
    skip_rescale: divide residual sums by sqrt(2).
    resblock_type: ``ddpm`` (``ResnetBlockDDPMpp``, separate resampling layers) or ``biggan``
      (``ResnetBlockBigGANpp``, resampling inside the block).
    progressive: output path: ``none``, ``output_skip`` (sum of upsampled per-level images) or
      ``residual`` (feature pyramid added to h).
    progressive_input: input path: ``none``, ``input_skip`` (downsampled input merged by
      ``progressive_combine``) or ``residual`` (conv-downsampled pyramid added to h).
    progressive_combine: ``sum`` or ``cat`` (for ``input_skip``).
    embedding_type: ``fourier`` (Gaussian Fourier features of log(label); continuous only) or
      ``positional`` (sinusoidal embedding of the label).
    fourier_scale: standard deviation of the Fourier frequencies.
    init_scale: initialisation scale of each residual branch's last layer and of the output
      convolution (0: near zero).
    nonlinearity: ``swish``, ``elu``, ``relu`` or ``lrelu``.
    scale_by_sigma: divide the output by the noise level sigma of the label (VE networks).
    centered: the data already lie in [-1, 1]; otherwise [0, 1] inputs are mapped to 2x - 1.
    sigma_min, sigma_max, num_scales: the VE schedule, for sigma of a discrete label.
    continuous: labels are continuous (sigma itself for VE) rather than indices of the table.
    remat: rematerialise every residual and attention block (``nn.remat``): less memory, more compute.
    dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters, label features, normalisation
      statistics, softmax and the output stay float32).
  """

  nf: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  fir: bool = True
  fir_kernel: Sequence[int] = up_or_down_sampling.DEFAULT_KERNEL
  skip_rescale: bool = True
  resblock_type: str = "biggan"
  progressive: str = "none"
  progressive_input: str = "residual"
  progressive_combine: str = "sum"
  embedding_type: str = "fourier"
  fourier_scale: float = 16.0
  init_scale: float = 0.0
  nonlinearity: str = "swish"
  scale_by_sigma: bool = False
  centered: bool = False
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  continuous: bool = True
  remat: bool = False
  dtype: str = "float32"

  def _validate(self, x: Array) -> None:
    layers.check_image_shape(x, self.ch_mult, "NCSNpp")
    _check_choice("resblock_type", self.resblock_type, RESBLOCK_TYPES)
    _check_choice("progressive", self.progressive, PROGRESSIVE)
    _check_choice("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
    _check_choice("progressive_combine", self.progressive_combine, PROGRESSIVE_COMBINE)
    _check_choice("embedding_type", self.embedding_type, layers.EMBEDDING_TYPES)
    if self.embedding_type == "fourier" and not self.continuous:
      raise ValueError("Fourier features embed log(sigma) and serve continuous training only; use "
                       "embedding_type='positional' for discrete training.")

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    """Applies the network.

    Args:
      x: (B, H, W, C) noisy images; H and W divisible by 2^(len(ch_mult) - 1).
      labels: (B,) float noise labels (see ``models.wrapper`` for their conventions).
      train: enables dropout (needs a ``dropout`` rng).

    Returns:
      (B, H, W, C): the score (VE) or the predicted noise (VP), per the training convention.
    """
    self._validate(x)
    act = layers.get_act(self.nonlinearity)
    dtype = layers.compute_dtype(self.dtype)
    nf, num_levels, channels = self.nf, len(self.ch_mult), x.shape[-1]
    combine = functools.partial(layers.Combine, method=self.progressive_combine, dtype=dtype)
    attention = functools.partial(layers.rematerialised(layers.AttnBlockpp, self.remat), init_scale=self.init_scale,
                                  skip_rescale=self.skip_rescale, dtype=dtype)
    resample = dict(fir=self.fir, fir_kernel=self.fir_kernel, dtype=dtype)
    if self.resblock_type == "ddpm":
      block = functools.partial(layers.rematerialised(layers.ResnetBlockDDPMpp, self.remat, (3,)), act=act,
                                dropout=self.dropout, init_scale=self.init_scale, skip_rescale=self.skip_rescale,
                                dtype=dtype)
    else:
      block = functools.partial(layers.rematerialised(layers.ResnetBlockBigGANpp, self.remat, (3,)), act=act,
                                dropout=self.dropout, **resample, init_scale=self.init_scale,
                                skip_rescale=self.skip_rescale)

    def norm_act(h: Array) -> Array:
      return act(layers.group_norm(h.shape[-1], dtype=dtype)(h))

    # Noise-label embedding.
    if self.embedding_type == "fourier":
      temb = layers.GaussianFourierProjection(nf, self.fourier_scale)(jnp.log(labels))
    else:
      temb = layers.timestep_embedding(labels, nf)
    if self.conditional:
      temb = nn.Dense(4 * nf, kernel_init=layers.default_init(), dtype=dtype)(temb)
      temb = nn.Dense(4 * nf, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
    else:
      temb = None

    # Downsampling path, keeping every activation for the skip connections.
    x = x if self.centered else 2 * x - 1.0
    x = x if dtype is None else x.astype(dtype)
    input_pyramid = x
    hs = [layers.conv3x3(x, nf, dtype=dtype)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(out_ch=nf * mult)(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention()(h)
        hs.append(h)
      if level != num_levels - 1:
        if self.resblock_type == "ddpm":
          h = layers.Downsample(with_conv=self.resamp_with_conv, **resample)(hs[-1])
        else:
          h = block(down=True)(hs[-1], temb, train)
        if self.progressive_input == "input_skip":
          input_pyramid = layers.Downsample(with_conv=False, **resample)(input_pyramid)
          h = combine()(input_pyramid, h)
        elif self.progressive_input == "residual":
          input_pyramid = layers.Downsample(with_conv=True, out_ch=h.shape[-1], **resample)(input_pyramid)
          h = input_pyramid = layers.residual_sum(input_pyramid, h, self.skip_rescale)
        hs.append(h)

    # Middle.
    h = block()(hs[-1], temb, train)
    h = attention()(h)
    h = block()(h, temb, train)

    # Upsampling path, consuming the skips in reverse, with the progressive output path.
    pyramid = None
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = block(out_ch=nf * self.ch_mult[level])(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attention()(h)
      if self.progressive == "output_skip":
        if level != num_levels - 1:
          pyramid = layers.Upsample(with_conv=False, **resample)(pyramid)
        image = layers.conv3x3(norm_act(h), channels, init_scale=self.init_scale, dtype=dtype)
        pyramid = image if pyramid is None else pyramid + image
      elif self.progressive == "residual":
        if level == num_levels - 1:
          pyramid = layers.conv3x3(norm_act(h), h.shape[-1], dtype=dtype)
        else:
          pyramid = layers.Upsample(with_conv=True, out_ch=h.shape[-1], **resample)(pyramid)
          h = pyramid = layers.residual_sum(pyramid, h, self.skip_rescale)
      if level != 0:
        if self.resblock_type == "ddpm":
          h = layers.Upsample(with_conv=self.resamp_with_conv, **resample)(h)
        else:
          h = block(up=True)(h, temb, train)

    # Output.
    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = layers.conv3x3(norm_act(h), channels, init_scale=self.init_scale, dtype=dtype)
    h = h if dtype is None else h.astype(jnp.float32)
    if self.scale_by_sigma:
      sigma = layers.noise_levels(labels, self.continuous, self.sigma_min, self.sigma_max, self.num_scales)
      h = h / sigma[:, None, None, None]
    return h
