"""Samplers that share one score function: predictor-corrector, probability-flow ODE, fast solvers.

    sampler = get_sampler(sde, shape, method="pc", predictor="reverse_diffusion",
                          corrector="langevin", snr=0.16, n_steps=1, ...)
    sampler = get_sampler(sde, shape, method="unipc", nfe=10, order=3, time_grid="logsnr")
    samples, nfe = sampler(key, score_fn)

The fixed-budget solvers (``euler``, ``heun``, ``dpm_solver``, ``dpm_solver++``, ``unipc``) work in
the VE view of ``noise_levels`` for every SDE and take ``nfe`` (the exact number of score
evaluations), ``order``, ``time_grid`` (``noise_levels.TIME_GRIDS``), ``eps`` and ``denoise``.

Every sampler but ``ode`` takes an optional ``projection=`` at call time, a per-step constraint on
part of the state (``sampling.projection``; inpainting and colourisation in
``score_sde.controllable``).

Every sampler is compiled as one program. ``score_fn(x, t)`` may be any callable; arrays held
in a pytree callable (for example ``jax.tree_util.Partial(apply_fn, params)``) are traced, so new
parameters do not trigger a recompilation.
"""

from __future__ import annotations

import inspect
from typing import Callable

from score_sde import sde as sde_lib
from score_sde.sampling import dpm_solver, dpm_solver_pp, euler, heun, ode, pc, unipc
from score_sde.sampling.correctors import CORRECTORS
from score_sde.sampling.predictors import PREDICTORS

# The sampler families by ``method`` name.
METHODS: dict[str, Callable] = {
    "pc": pc.get_pc_sampler,
    "ode": ode.get_ode_sampler,
    "euler": euler.get_euler_sampler,
    "heun": heun.get_heun_sampler,
    "dpm_solver": dpm_solver.get_dpm_solver_sampler,
    "dpm_solver++": dpm_solver_pp.get_dpm_solver_pp_sampler,
    "unipc": unipc.get_unipc_sampler,
}


def get_sampler(sde: sde_lib.SDE, shape: tuple[int, ...], method: str = "pc", **kwargs) -> Callable:
  """Builds a sampler ``(key, score_fn, ...) -> (samples, nfe)`` for samples of ``shape`` (B, ...).

  Args:
    sde: the forward SDE the score function belongs to.
    shape: the shape of one batch of samples, (B, ...).
    method: one of ``METHODS``.
    **kwargs: the method's options (see each builder); unknown options raise ``ValueError``.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; valid choices: {sorted(METHODS)}.")
  builder = METHODS[method]
  options = inspect.signature(builder).parameters
  if not any(p.kind is p.VAR_KEYWORD for p in options.values()):  # pc and ode check their own.
    ode.reject_unknown(builder, {k: v for k, v in kwargs.items() if k not in options}, f"the {method} sampler")
  return builder(sde, tuple(shape), **kwargs)


__all__ = ["CORRECTORS", "METHODS", "PREDICTORS", "get_sampler"]
