"""Samplers that share one score function: predictor-corrector, probability-flow ODE, fast solvers.

    sampler = get_sampler(sde, shape, method="pc", predictor="reverse_diffusion", corrector="langevin")
    sampler = get_sampler(sde, shape, method="unipc", nfe=10, order=3, time_grid="logsnr")
    samples, nfe = sampler(key, score_fn)     # one compiled program; arrays in a pytree score_fn are traced

Every method but ``ode`` takes ``projection=`` at call time (``sampling.projection``). ``docs/samplers.md``.
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
  valid = [name for name, p in inspect.signature(builder).parameters.items() if p.default is not p.empty]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for the {method} sampler; valid options: {valid}.")
  return builder(sde, tuple(shape), **kwargs)


__all__ = ["CORRECTORS", "METHODS", "PREDICTORS", "get_sampler"]
