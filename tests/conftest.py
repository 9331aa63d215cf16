"""Test set-up, before JAX starts: the entry points' CPU convolution option (``score_sde.xla_cpu``), and one
persistent compilation cache per test process, so a program compiled again (a resumed run, a second
evaluation) is read back instead of recompiled."""

import atexit
import shutil
import tempfile

import jax

from score_sde import xla_cpu

xla_cpu.configure()
_CACHE = tempfile.mkdtemp(prefix="score_sde_test_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
