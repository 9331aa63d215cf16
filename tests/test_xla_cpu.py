"""XLA CPU options set on import: convolutions on XLA's own kernels, a user's own choice kept."""

import os
import subprocess
import sys

from score_sde import xla_cpu

# Compiles one 3x3 convolution after importing the package; prints how many YNNPACK fusions hold it.
_PROBE = """
import score_sde
import jax, jax.numpy as jnp
x, w = jnp.ones((8, 32, 32, 128)), jnp.ones((3, 3, 128, 128))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(jax.jit(conv).lower(x, w).compile().as_text().count("__ynn_fusion"))
"""


def test_configure_adds_the_option_once_and_keeps_other_flags():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.configure(environ)
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {xla_cpu.CONVOLUTIONS_TO_XLA}"
  assert not xla_cpu.configure(environ)  # already there
  empty = {}
  assert xla_cpu.configure(empty) and empty["XLA_FLAGS"] == xla_cpu.CONVOLUTIONS_TO_XLA


def test_a_users_own_ynn_option_is_left_alone():
  environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"}
  assert not xla_cpu.configure(environ)
  assert environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"


def _ynn_convolutions(xla_flags: str) -> int:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                       check=True)
  return int(out.stdout.split()[-1])


def test_importing_the_package_moves_convolutions_off_ynnpack():
  assert _ynn_convolutions("") == 0
  # XLA's default, restored by the user's own option, puts the convolution in a YNNPACK fusion.
  assert _ynn_convolutions("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution") == 1


def test_importing_after_the_cpu_backend_started_warns_with_the_fix():
  probe = "import jax.numpy as jnp; jnp.ones(1).block_until_ready(); import score_sde"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  run = subprocess.run([sys.executable, "-c", probe], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120, check=True)
  assert "started before score_sde was imported" in run.stderr and xla_cpu.CONVOLUTIONS_TO_XLA in run.stderr
  quiet = subprocess.run([sys.executable, "-c", "import score_sde, jax.numpy as jnp; jnp.ones(1)"],
                         env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120, check=True)
  assert "started before" not in quiet.stderr
