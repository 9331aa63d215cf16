"""XLA's CPU backend options for convolutional networks, set when the package is imported.

XLA's CPU compiler hands every convolution to YNNPACK by default (the ``individual_convolution``
YNNPACK fusion). On x86 CPUs YNNPACK runs the 3x3 convolutions of the paper's U-Nets 1.5-7x
slower than XLA's own (Eigen) convolutions, worst for the weight gradient at 32x32 with 256
channels, which doubles the train step of DDPM++ / NCSN++ (``experiments/README.md``, "XLA CPU
convolutions"). Importing ``score_sde`` therefore adds
``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to ``XLA_FLAGS``: convolutions
go back to XLA's own kernels, and the other YNNPACK fusions (dots, reductions) stay on.

``XLA_FLAGS`` is read once, when JAX starts its first backend, so the option applies when
``score_sde`` is imported before anything runs on a device (``main.py``, the tests and the
notebooks do). A ``--xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is left as it
is: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`` keeps XLA's
default. The option only concerns the CPU backend.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CONVOLUTIONS_TO_XLA = f"{YNN_FLAG}=-individual_convolution"


def configure(environ: dict[str, str] | None = None) -> bool:
  """Adds ``CONVOLUTIONS_TO_XLA`` to ``XLA_FLAGS`` unless the YNNPACK fusion option is already set.

  Args:
    environ: the environment to edit (default ``os.environ``).

  Returns:
    Whether ``XLA_FLAGS`` was changed.
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FLAG in flags:
    return False
  environ["XLA_FLAGS"] = f"{flags} {CONVOLUTIONS_TO_XLA}".strip()
  return True
