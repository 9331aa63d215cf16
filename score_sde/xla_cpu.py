"""XLA's CPU option for convolutional networks, set by entry points: ``xla_cpu.configure()``.

Adds ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` to ``XLA_FLAGS``, which moves
convolutions from YNNPACK back to XLA's own kernels (2x faster train steps of the paper's U-Nets on x86
CPUs; ``experiments/README.md``, "XLA CPU convolutions"). ``XLA_FLAGS`` is read when JAX starts its
first backend, so call it before anything runs on a device; a YNNPACK option already in ``XLA_FLAGS``
is kept. Importing ``score_sde`` does not call it: ``main.py``, the notebooks and the tests do.
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
