"""A small DDPM-style U-Net (Ho et al. 2020) for small images, e.g. 8x8 to 32x32 with 1-3 channels.

    h_0 = Conv3x3(x) (x mapped to [-1, 1] first unless the data are centred)
    down: per level l (resolution H / 2^l, nf * ch_mult[l] channels), num_res_blocks ResnetBlocks
          (each followed by attention at attn_resolutions), then a Downsample except at the last level
    middle: ResnetBlock, attention, ResnetBlock
    up: per level, num_res_blocks + 1 ResnetBlocks on [h, skip] (attention as on the way down),
        then an Upsample except at the first level
    out = Conv3x3_0(SiLU(GN(h)))  (initialised near zero: an untrained network outputs ~0)

Every ResnetBlock receives the noise-label embedding (when ``conditional``), plus a learned class
embedding when ``num_classes`` > 0 (``layers.ClassLabelEmbedding``; the null class C stands for no
label, the unconditional score of classifier-free guidance). GroupNorm's group
count divides the channels (``layers.num_groups``), so small ``nf`` works. This network never
divides its output by sigma (the original's ``scale_by_sigma``, which ``ncsnpp`` and ``ddpm`` offer).
``remat`` and ``dtype`` (off by default) trade memory or precision for speed without changing the
parameters; see ``ncsnpp``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_sde.models import layers

Array = jax.Array


class UNet(nn.Module):
  """Score network for NHWC images: (B, H, W, C) data and (B,) noise labels -> (B, H, W, C).

  Attributes:
    nf: channels of the first level.
    ch_mult: channel multiplier of each level; H and W must be divisible by 2^(len(ch_mult) - 1).
    num_res_blocks: ResnetBlocks per level on the way down (one more on the way up).
    attn_resolutions: resolutions (H of the feature map) that get self-attention.
    dropout: dropout rate of the ResnetBlocks (active only when ``train``).
    conditional: condition on the noise label (``False`` ignores it).
    embedding_type: ``positional`` (DDPM's sinusoidal embedding of the label) or ``fourier``
      (Gaussian Fourier features of log(label); continuous labels only).
    fourier_scale: standard deviation of the Fourier frequencies.
    centered: the data already lie in [-1, 1]; otherwise [0, 1] inputs are mapped to 2x - 1.
    resamp_with_conv: convolutional down/upsampling, else average pooling / plain nearest.
    remat: rematerialise every residual and attention block (``nn.remat``): less memory, more compute.
    dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters, label features, normalisation
      statistics, softmax and the output stay float32).
    num_classes: classes C of a class-conditional network (0: unconditional, no class embedding).
  """

  nf: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (8,)
  dropout: float = 0.1
  conditional: bool = True
  embedding_type: str = "positional"
  fourier_scale: float = 16.0
  centered: bool = False
  resamp_with_conv: bool = True
  remat: bool = False
  dtype: str = "float32"
  num_classes: int = 0

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False, class_labels: Array | None = None) -> Array:
    """Applies the network.

    Args:
      x: (B, H, W, C) noisy images.
      labels: (B,) float noise labels (see ``models.wrapper`` for their conventions).
      train: enables dropout (needs a ``dropout`` rng).
      class_labels: (B,) int classes in [0, num_classes] (num_classes: the null class), or None for
        the null class; only for ``num_classes > 0``.

    Returns:
      (B, H, W, C): predicted noise or score, depending on the SDE's convention.
    """
    if x.ndim != 4:
      raise ValueError(f"UNet takes NHWC images of shape (B, H, W, C), got {x.shape}; use the 'mlp' "
                       f"model for vectors.")
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"Images of {x.shape[1]}x{x.shape[2]} cannot be halved {len(self.ch_mult) - 1} "
                       f"times (ch_mult={tuple(self.ch_mult)}); use sizes divisible by {factor} or a "
                       f"shorter ch_mult.")
    dtype = layers.compute_dtype(self.dtype)
    block = functools.partial(layers.rematerialised(layers.ResnetBlock, self.remat, (3,)), dtype=dtype)
    attention = functools.partial(layers.rematerialised(layers.AttnBlock, self.remat), dtype=dtype)
    # Noise-label embedding, shared by every block.
    temb = None
    if self.conditional:
      temb = layers.NoiseLabelEmbedding(4 * self.nf, self.embedding_type, self.nf, self.fourier_scale,
                                        dtype=dtype)(labels)
    temb = layers.add_class_embedding(temb, class_labels, self.num_classes, 4 * self.nf, x.shape[0])
    # Downsampling path, keeping every activation for the skip connections.
    h = x if self.centered else 2.0 * x - 1.0
    h = h if dtype is None else h.astype(dtype)
    hs = [nn.Conv(self.nf, (3, 3), kernel_init=layers.default_init(), dtype=dtype)(h)]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = block(self.nf * mult, self.dropout)(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention()(h)
        hs.append(h)
      if level != len(self.ch_mult) - 1:
        hs.append(layers.Downsample(self.resamp_with_conv, dtype=dtype)(hs[-1]))
    # Middle.
    h = block(dropout=self.dropout)(hs[-1], temb, train)
    h = attention()(h)
    h = block(dropout=self.dropout)(h, temb, train)
    # Upsampling path, consuming the skips in reverse.
    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = block(self.nf * mult, self.dropout)(jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attention()(h)
      if level != 0:
        h = layers.Upsample(self.resamp_with_conv, dtype=dtype)(h)
    # Output, initialised near zero.
    h = nn.silu(layers.group_norm(h.shape[-1], dtype=dtype)(h))
    h = nn.Conv(x.shape[-1], (3, 3), kernel_init=layers.default_init(0.0), dtype=dtype)(h)
    return h if dtype is None else h.astype(jnp.float32)
