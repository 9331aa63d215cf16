"""What many test files share: the three SDEs, and compiling small test programs quickly."""

import jax

from score_sde import sde as sde_lib

# XLA's expensive optimisation passes off: test programs are small, so compiling dominates their time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # XLA_FLAGS form


def sdes(ve_sigma_max: float = 10.0, **kwargs) -> dict[str, sde_lib.SDE]:
  """{"vp", "subvp", "ve"}: VP and sub-VP with the paper's betas, VE from sigma_min = 0.01 to ``ve_sigma_max``."""
  return {"vp": sde_lib.VPSDE(**kwargs), "subvp": sde_lib.SubVPSDE(**kwargs),
          "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=ve_sigma_max, **kwargs)}


SDES = sdes()


def fast_jit(fn, **kwargs):
  """``jax.jit`` with ``FAST_COMPILE``."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)
