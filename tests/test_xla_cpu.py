"""XLA CPU options: importing the package changes nothing; ``configure`` (the entry points') moves convolutions
to XLA's own kernels and keeps a user's own choice."""

import os
import subprocess
import sys

import pytest

from score_sde import xla_cpu

# Compiles one 3x3 convolution after importing the package; prints how many YNNPACK fusions hold it.
_PROBE = """
import os, sys
import score_sde
from score_sde import xla_cpu
assert os.environ.get("XLA_FLAGS", "") == sys.argv[1], "importing score_sde changed XLA_FLAGS"
if sys.argv[2] == "configure":
  xla_cpu.configure()
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


def _ynn_convolutions(xla_flags: str, configure: bool) -> int:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  out = subprocess.run([sys.executable, "-c", _PROBE, xla_flags, "configure" if configure else "no"], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.slow  # a fresh Python process
def test_importing_changes_nothing_and_configure_moves_convolutions_off_ynnpack():
  assert _ynn_convolutions("", configure=False) == 1   # XLA's default: the convolution is a YNNPACK fusion
  assert _ynn_convolutions("", configure=True) == 0
  # The user's own option wins over configure().
  assert _ynn_convolutions("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", configure=True) == 1
