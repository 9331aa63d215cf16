"""Inpainting and colourisation with an unconditional score model (Song et al. 2021, sec. 5 / app. I).

    inpainter = get_inpainter(sde, (B, H, W, C), method="pc", predictor="reverse_diffusion",
                              corrector="langevin", snr=0.16)
    samples, nfe = inpainter(key, score_fn, data, mask)      # mask: 1 = known, 0 = to generate
    colorizer = get_colorizer(sde, (B, H, W, 3), method="unipc", nfe=20)
    samples, nfe = colorizer(key, score_fn, gray)            # gray: (B, H, W, 1) or (B, H, W, 3)

Both run a sampler of ``score_sde.sampling`` (``method="pc"`` with any predictor and corrector, or
a fixed-budget solver: ``euler``, ``heun``, ``dpm_solver``, ``dpm_solver++``, ``unipc``, with their
options) and constrain it through the samplers' projection hook (``sampling.projection``): after
every predictor and corrector update (every step of a fixed-budget solver) the known part of the
state x_t is replaced by a forward-perturbed copy of the data at the current time,

    x_t[known] = alpha_t y + sigma_t z,    z ~ N(0, I) fresh at each replacement,

so the generated part is steered by the score of an x_t whose known part is typical of p_t given
y. The fixed-budget solvers do the same in their VE view x_t / alpha_t (y + sigma~_t z). The last
update of a PC run lands on t = 0, where the replacement is y itself, and every run ends with the
known part set to y: the output equals the data there exactly. The probability-flow ODE sampler
(``method="ode"``) is not offered: its adaptive solver has no step at which to replace, and a
replacement inside the vector field would break its error control.

Compared with the original implementation:
* ``denoise`` acts on the generated part. The predictor's mean x_mean is projected with the
  data's mean alpha_t y in the known part (the original rebuilt x_mean from the already noised x,
  so denoising changed nothing where it matters).
* After a predictor step the data are perturbed to the step's end time t_{i+1} (the original used
  its start, t_i, one grid step too noisy, and so never reached the clean data at the end).
* Initialisation. By default (``perturb_known=False``, the original's) the known part of x_T is
  the clean data y and the rest a prior draw. With ``perturb_known=True`` the known part starts
  at its forward-perturbed value alpha_T y + sigma_T z, a draw of p_T given y, consistent with the
  rest of x_T (for VE, the original's init puts clean pixels next to noise of std sigma_max).

Colourisation is inpainting in a decoupled colour basis. ``COLOR_BASIS`` is an orthonormal 3 x 3
matrix M whose first column is the grey direction (1, 1, 1) / sqrt(3); a pixel x (3,) has the
coordinates u = x M, u_0 = sqrt(3) g the grey coordinate (g the mean of the channels) and u_1,
u_2 the two chroma coordinates. Since M is orthonormal the forward process commutes with it
(x_t M = alpha_t x_0 M + sigma_t z M, and z M ~ N(0, I)), so u_0 has the marginal alpha_t u_0 +
sigma_t z of its own: it is the known coordinate and is replaced as above, then x = u M^T.

Randomness. Sample i draws everything from fold_in(key, first_index + i) (see the samplers and
``sampling.projection``), so sample i does not depend on the batch it is drawn in, unless the PC
sampler's batch-averaged Langevin step couples the samples (``step_rule="per_sample"`` avoids it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde.sampling.predictors import per_sample_normal

Array = jax.Array
Inpainter = Callable[..., tuple[Array, Array]]

# The samplers that take a projection: every ``sampling.METHODS`` entry but the adaptive ODE solver.
METHODS = tuple(m for m in sampling.METHODS if m != "ode")

# M: the decoupled colour basis, columns grey (1, 1, 1) / sqrt(3), red against green and blue
# (2, -1, -1) / sqrt(6), green against blue (0, 1, -1) / sqrt(2). Orthonormal: M^-1 = M^T.
COLOR_BASIS = np.stack([np.array([1.0, 1.0, 1.0]) / math.sqrt(3.0),
                        np.array([2.0, -1.0, -1.0]) / math.sqrt(6.0),
                        np.array([0.0, 1.0, -1.0]) / math.sqrt(2.0)], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Replacement:
  """The inpainting projection (``sampling.projection.Projection``): known coordinates replaced.

  Attributes:
    data: (B, ...) the data y, in the coordinates u of ``basis`` (in x itself without one).
    mask: bool, broadcastable to ``data``: True where u is known.
    basis: None, or a (C, C) orthonormal matrix acting on the last axis: u = x basis.
    perturb_known: ``init`` puts the known part at alpha_T y + sigma_T z instead of y.
  """

  data: Array
  mask: Array
  basis: Array | None = None
  perturb_known: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def init(self, keys: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """x_T (B, ...), a prior draw, with its known part set (see the module docstring)."""
    if self.perturb_known:
      return self(keys, x, alpha, sigma)
    return self(keys, x, 1.0, 0.0)

  def __call__(self, keys: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """x (B, ...) with its known part replaced by alpha y + sigma z (z from ``keys`` (B,)).

    A ``sigma`` given as the Python number 0 (the samplers' noise-free calls) draws no z.
    """
    u = x if self.basis is None else x @ self.basis.astype(x.dtype)
    known = alpha * self.data
    if not (isinstance(sigma, (int, float)) and sigma == 0):
      known = known + sigma * per_sample_normal(keys, x.shape[1:], x.dtype)
    u = jnp.where(self.mask, known, u)
    return u if self.basis is None else u @ self.basis.T.astype(x.dtype)


def _constrained_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], method: str, options: dict):
  """The sampler of ``method`` for ``shape``, with the checks (see ``get_inpainter``)."""
  if method not in METHODS:
    extra = (" (the adaptive ODE solver has no step to replace after; use a fixed-budget solver such "
             "as 'dpm_solver++' or 'unipc' for deterministic sampling)") if method == "ode" else ""
    raise ValueError(f"Unknown or unsupported method {method!r} for conditional sampling{extra}; valid "
                     f"choices: {METHODS}.")
  return sampling.get_sampler(sde, shape, method=method, **options)


def _float_array(value) -> Array:
  value = jnp.asarray(value)
  if not jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(jnp.float32)
  return value


def _mask(mask, shape: tuple[int, ...]) -> Array:
  """The mask as bool, checked to broadcast to ``shape`` and (when concrete) to hold only 0 and 1."""
  mask = jnp.asarray(mask)
  try:
    broadcast = np.broadcast_shapes(mask.shape, shape)
  except ValueError:
    broadcast = None
  if broadcast != shape:
    raise ValueError(f"mask of shape {mask.shape} does not match data of shape {shape}: pass a mask of "
                     f"the data's shape (B, ...) or one that broadcasts to it, e.g. {(1,) + shape[1:]}.")
  if not isinstance(mask, jax.core.Tracer) and mask.dtype != jnp.bool_:
    values = np.asarray(mask)
    if not np.all((values == 0) | (values == 1)):
      raise ValueError("mask must hold only 0 (generate) and 1 (known); threshold a soft mask first, e.g. "
                       "mask > 0.5.")
  return mask.astype(bool)


def get_inpainter(sde: sde_lib.SDE, shape: tuple[int, ...], method: str = "pc", perturb_known: bool = False,
                  **sampler_options) -> Inpainter:
  """Builds ``inpainter(key, score_fn, data, mask, first_index=0) -> (samples, nfe)``.

  Args:
    sde: the forward SDE the score function belongs to.
    shape: (B, ...) the shape of one batch.
    method: one of ``METHODS``: ``"pc"`` or a fixed-budget solver.
    perturb_known: start the known part at alpha_T y + sigma_T z instead of the clean data y (the
      original's; see the module docstring).
    **sampler_options: the sampler's options (``sampling.get_sampler``), e.g. ``predictor``,
      ``corrector``, ``snr``, ``num_steps``, ``denoise`` for PC; ``nfe``, ``order``, ``time_grid``
      for the fixed-budget solvers. Unknown options raise ``ValueError``.

  Returns:
    ``inpainter(key, score_fn, data, mask, first_index=0)``: ``data`` (B, ...) in the score model's
    data space (values under an unknown part are ignored), ``mask`` of shape (B, ...) or
    broadcastable to it, 1 (or True) where the data are known and 0 where they are generated.
    Returns the samples (B, ...), equal to ``data`` where ``mask`` is 1, and the sampler's int32
    ``nfe``. One compiled program per inpainter; new data and masks reuse it.
  """
  shape = tuple(int(n) for n in shape)
  sampler = _constrained_sampler(sde, shape, method, sampler_options)
  perturb_known = bool(perturb_known)

  def inpainter(key: Array, score_fn: sde_lib.ScoreFn, data: Array, mask: Array,
                first_index: int | Array = 0) -> tuple[Array, Array]:
    data = _float_array(data)
    if data.shape != shape:
      raise ValueError(f"data must have the inpainter's shape {shape}, got {data.shape}; build the inpainter "
                       f"with get_inpainter(sde, data.shape, ...).")
    projection = Replacement(data, _mask(mask, shape), None, perturb_known)
    return sampler(key, score_fn, first_index=first_index, projection=projection)

  return inpainter


def to_gray(images: Array) -> Array:
  """The grey value g = (r + g + b) / 3 of images (B, H, W, 3) (or g itself, (B, H, W, 1)); (B, H, W, 1)."""
  return jnp.mean(images, axis=-1, keepdims=True)


def get_colorizer(sde: sde_lib.SDE, shape: tuple[int, ...], method: str = "pc", perturb_known: bool = False,
                  **sampler_options) -> Inpainter:
  """Builds ``colorizer(key, score_fn, gray, first_index=0) -> (samples, nfe)`` for RGB images.

  Args:
    sde: the forward SDE the score function belongs to.
    shape: (B, H, W, 3), the shape of one batch of colour images.
    method, perturb_known, **sampler_options: as for ``get_inpainter``.

  Returns:
    ``colorizer(key, score_fn, gray, first_index=0)``: ``gray`` (B, H, W, 1), the grey value
    g = (r + g + b) / 3 of each pixel in the model's data space, or (B, H, W, 3), whose channel
    mean is taken (a grey image replicated over the channels, or a colour image to recolour).
    Returns colour images (B, H, W, 3) whose channel mean equals g (to float rounding of the
    basis change) and the sampler's int32 ``nfe``.
  """
  shape = tuple(int(n) for n in shape)
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"Colourisation needs RGB images of shape (B, H, W, 3), got shape {shape}; for other "
                     f"layouts use get_inpainter with a mask.")
  sampler = _constrained_sampler(sde, shape, method, sampler_options)
  basis = jnp.asarray(COLOR_BASIS, jnp.float32)
  # Only u_0 is known: sqrt(3) g, the grey coordinate (the chroma coordinates' data are ignored).
  mask = jnp.array([True, False, False])
  perturb_known = bool(perturb_known)

  def colorizer(key: Array, score_fn: sde_lib.ScoreFn, gray: Array,
                first_index: int | Array = 0) -> tuple[Array, Array]:
    gray = _float_array(gray)
    if gray.shape not in (shape[:3] + (1,), shape):
      raise ValueError(f"gray must have shape {shape[:3] + (1,)} (the grey value) or {shape} (its channel "
                       f"mean is used), got {gray.shape}.")
    data = jnp.concatenate([math.sqrt(3.0) * to_gray(gray), jnp.zeros(shape[:3] + (2,), gray.dtype)], axis=-1)
    projection = Replacement(data, mask, basis, perturb_known)
    return sampler(key, score_fn, first_index=first_index, projection=projection)

  return colorizer


__all__ = ["COLOR_BASIS", "METHODS", "Replacement", "get_colorizer", "get_inpainter", "to_gray"]
