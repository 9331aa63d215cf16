"""XLA's CPU backend options for convolutional networks, set when the package is imported.

XLA's CPU compiler hands every convolution to YNNPACK by default (the ``individual_convolution``
YNNPACK fusion). On x86 CPUs YNNPACK computes the weight gradients of the paper's U-Nets' 3x3
convolutions 2-3.4x slower than XLA's own (Eigen) kernels, worst at 32x32 with 256 channels, and its
forward passes about 10% slower, which more than doubles the train step of DDPM++ / NCSN++
(``experiments/README.md``, "XLA CPU convolutions"). Importing ``score_sde`` therefore adds
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to ``XLA_FLAGS``: convolutions
go back to XLA's own kernels, and the other YNNPACK fusions (dots, reductions) stay on.

``XLA_FLAGS`` is read once, when JAX starts its first backend, so the option applies when
``score_sde`` is imported before anything runs on a device (``main.py``, the tests and the
notebooks do); imported later, on a CPU backend that has already started, it warns with the fix.
A ``--xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is left as it
is: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`` keeps XLA's
default. The option only concerns the CPU backend.
"""

from __future__ import annotations

import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CONVOLUTIONS_TO_XLA = f"{YNN_FLAG}=-individual_convolution"


def _cpu_backend_started() -> bool:
  """Whether JAX has already started its backends, with the CPU as the default one."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  started = getattr(xla_bridge, "backends_are_initialized", lambda: False)()
  return started and xla_bridge.default_backend() == "cpu"


def configure(environ: dict[str, str] | None = None) -> bool:
  """Adds ``CONVOLUTIONS_TO_XLA`` to ``XLA_FLAGS`` unless the YNNPACK fusion option is already set.

  With ``os.environ``, warns when JAX's CPU backend has already started, since the option can then
  no longer take effect in this process.

  Args:
    environ: the environment to edit (default ``os.environ``).

  Returns:
    Whether ``XLA_FLAGS`` was changed.
  """
  process = environ is None
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {CONVOLUTIONS_TO_XLA}".strip()
  if process and _cpu_backend_started():
    warnings.warn("JAX's CPU backend started before score_sde was imported, so XLA keeps its default "
                  "(YNNPACK) convolutions, about 2x slower for the networks' train steps on a CPU. Import "
                  "score_sde before running anything with JAX, or start Python with "
                  f"XLA_FLAGS={CONVOLUTIONS_TO_XLA}.", stacklevel=3)
  return True
