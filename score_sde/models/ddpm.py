"""The DDPM U-Net (Ho et al. 2020), as the original's ``models/ddpm.py`` (registered ``ddpm``).

    temb = Dense(act(Dense(sinusoidal(label, nf))))              when ``conditional``
    h_0  = Conv3x3(x)        (x mapped to 2x - 1 first unless ``centered``)
    down:   per level l (nf * ch_mult[l] channels), num_res_blocks ResnetBlockDDPMs (each followed
            by attention at attn_resolutions), then a Downsample except at the last level
    middle: ResnetBlockDDPM, AttnBlock, ResnetBlockDDPM
    up:     per level, num_res_blocks + 1 ResnetBlockDDPMs on [h, skip] (attention once at the end
            of the level), then an Upsample except at the first level
    out  = Conv3x3(act(GN(h))), initialised near zero; divided by sigma with ``scale_by_sigma``

Every GroupNorm has 32 groups, so every level's channel count must be a multiple of 32. The label
embedding is always sinusoidal (the original ignores ``embedding_type`` for this model). Sub-modules
are created in the original's order, so parameters carry the original's Flax names. ``remat`` and
``dtype`` (off by default) trade the original's arithmetic for memory or speed without changing
the parameters; see ``ncsnpp``.

Shapes: x (B, H, W, C) NHWC; labels (B,); output (B, H, W, C).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers

Array = jax.Array

GROUPS = 32  # GroupNorm groups of every DDPM normalisation.


class DDPM(nn.Module):
  """DDPM score network: (B, H, W, C) images and (B,) noise labels -> (B, H, W, C).

  Defaults are the paper's DDPM CIFAR-10 settings.

  Attributes:
    nf: channels of the first level (a multiple of 32); the label embedding has 4 nf features.
    ch_mult: channel multiplier of each level.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: resolutions (H of the feature map) that get self-attention.
    dropout: dropout rate of the residual blocks (active only when ``train``).
    resamp_with_conv: convolutional down/upsampling, else average pooling / nearest copies.
    conditional: condition on the noise label.
    nonlinearity: ``swish``, ``elu``, ``relu`` or ``lrelu``.
    scale_by_sigma: divide the output by the noise level sigma of the label (VE networks).
    centered: the data already lie in [-1, 1]; otherwise [0, 1] inputs are mapped to 2x - 1.
    sigma_min, sigma_max, num_scales: the VE schedule, for sigma of a discrete label.
    continuous: labels are continuous (sigma itself for VE) rather than indices of the table.
    remat: rematerialise every residual and attention block (``nn.remat``): less memory, more compute.
    dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters, normalisation statistics, softmax
      and the output stay float32).
  """

  nf: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  nonlinearity: str = "swish"
  scale_by_sigma: bool = False
  centered: bool = False
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = 1000
  continuous: bool = True
  remat: bool = False
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    """Applies the network.

    Args:
      x: (B, H, W, C) noisy images; H and W divisible by 2^(len(ch_mult) - 1).
      labels: (B,) float noise labels (see ``models.wrapper`` for their conventions).
      train: enables dropout (needs a ``dropout`` rng).

    Returns:
      (B, H, W, C): the predicted noise (VP) or the score (VE), per the training convention.
    """
    layers.check_image_shape(x, self.ch_mult, "DDPM")
    act = layers.get_act(self.nonlinearity)
    dtype = layers.compute_dtype(self.dtype)
    nf, num_levels = self.nf, len(self.ch_mult)
    block = functools.partial(layers.rematerialised(layers.ResnetBlockDDPM, self.remat, (3,)), act=act,
                              dropout=self.dropout, num_groups=GROUPS, dtype=dtype)
    attention = functools.partial(layers.rematerialised(layers.AttnBlock, self.remat), num_groups=GROUPS, dtype=dtype)

    # Noise-label embedding.
    temb = None
    if self.conditional:
      temb = layers.timestep_embedding(labels, nf)
      temb = nn.Dense(4 * nf, kernel_init=layers.default_init(), dtype=dtype)(temb)
      temb = nn.Dense(4 * nf, kernel_init=layers.default_init(), dtype=dtype)(act(temb))

    # Downsampling path, keeping every activation for the skip connections.
    h = x if self.centered else 2 * x - 1.0
    h = h if dtype is None else h.astype(dtype)
    hs = [layers.conv3x3(h, nf, dtype=dtype)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(out_ch=nf * mult)(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention()(h)
        hs.append(h)
      if level != num_levels - 1:
        hs.append(layers.Downsample(with_conv=self.resamp_with_conv, dtype=dtype)(hs[-1]))

    # Middle.
    h = block()(hs[-1], temb, train)
    h = attention()(h)
    h = block()(h, temb, train)

    # Upsampling path, consuming the skips in reverse.
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = block(out_ch=nf * self.ch_mult[level])(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attention()(h)
      if level != 0:
        h = layers.Upsample(with_conv=self.resamp_with_conv, dtype=dtype)(h)

    # Output, initialised near zero.
    h = layers.conv3x3(act(layers.group_norm(h.shape[-1], GROUPS, dtype)(h)), x.shape[-1], init_scale=0.0, dtype=dtype)
    h = h if dtype is None else h.astype(jnp.float32)
    if self.scale_by_sigma:
      sigma = layers.noise_levels(labels, self.continuous, self.sigma_min, self.sigma_max, self.num_scales)
      h = h / sigma[:, None, None, None]
    return h
