"""JAX's persistent compilation cache, switched on by entry points: ``compilation_cache.configure(setting, workdir)``.

    path = compilation_cache.configure("auto", workdir)   # <workdir>/compilation_cache/<machine>, or None

A relaunch (resume after preemption, ``--mode sample`` after training, each evaluation) then loads
its compiled programs from disk instead of compiling them again. Where the cache lives and why,
and what it saves: ``docs/training.md`` ("Compilation cache"). Importing this module changes
nothing; ``configure`` must run before the first compilation (``main.py`` calls it after joining a
multi-host run, before building anything).
"""

from __future__ import annotations

import hashlib
import os
import re

import jax
from etils import epath
from jax.experimental.compilation_cache import compilation_cache as jax_cache

AUTO, OFF = "auto", "off"
FOLDER = "compilation_cache"   # under the workdir
ENV = "JAX_COMPILATION_CACHE_DIR"


def resolve(setting: str, workdir: str | os.PathLike | None, environ: dict[str, str] | None = None) -> str | None:
  """The cache root of ``setting``: ``"off"`` -> None; ``"auto"`` -> ``$JAX_COMPILATION_CACHE_DIR`` if set, else
  ``<workdir>/compilation_cache`` (None without a workdir); anything else is the root itself."""
  environ = os.environ if environ is None else environ
  if setting == OFF:
    return None
  if setting == AUTO:
    if environ.get(ENV):
      return environ[ENV]
    return str(epath.Path(workdir) / FOLDER) if workdir else None
  return setting


def machine_tag(device: jax.Device | None = None) -> str:
  """A folder name for the kind of machine the programs are compiled for, e.g. ``gpu-nvidia-h100-80gb-hbm3``.

  CPU programs are compiled for the host's instruction set, so on a CPU the tag adds a hash of
  ``/proc/cpuinfo``'s model name and flags: hosts of different CPUs sharing a workdir keep apart.
  """
  device = device or jax.devices()[0]
  tag = f"{device.platform}-{device.device_kind}"
  if device.platform == "cpu":
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
      tag += "-" + hashlib.sha256("".join(lines).encode()).hexdigest()[:8]
    except OSError:
      pass
  return re.sub(r"[^a-z0-9.]+", "-", tag.lower()).strip("-")


def configure(setting: str = AUTO, workdir: str | os.PathLike | None = None) -> str | None:
  """Points JAX's persistent compilation cache at ``resolve(setting, workdir)/<machine_tag()>``.

  Every program is cached, however quick to compile (a relaunch then compiles nothing). ``"off"``
  disables the cache, even one set through ``$JAX_COMPILATION_CACHE_DIR``. Programs compiled before the
  call are not in it; a cache JAX already opened is closed and the new folder opened at the next compilation.

  Returns:
    The cache folder, or None when the cache is off.

  Raises:
    OSError: when a folder given as ``setting`` cannot be created (the message names it and the flag).
  """
  root = resolve(setting, workdir)
  if root is None:
    if setting == OFF:
      jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = epath.Path(root) / machine_tag()
  if setting != AUTO:  # a folder given explicitly is checked now; the workdir's is made by JAX when it first writes
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise OSError(f"the compilation cache folder {path} cannot be created ({e}); pass --compilation_cache=<a "
                    f"writable folder> or --compilation_cache=off.") from e
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax_cache.reset_cache()  # a cache opened by an earlier compilation (e.g. at $JAX_COMPILATION_CACHE_DIR) reopens here
  return str(path)
