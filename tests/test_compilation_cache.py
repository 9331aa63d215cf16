"""The persistent compilation cache of the entry points: where it goes, and that a second launch compiles nothing."""

import collections

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from configs import default
from score_sde import compilation_cache
from score_sde import train

_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")


@pytest.fixture
def restore_jax_cache_settings():
  old = {name: getattr(jax.config, name) for name in _SETTINGS}
  jax_cache.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()


def test_where_the_cache_goes():
  assert compilation_cache.resolve("off", "runs/a", {}) is None
  assert compilation_cache.resolve("auto", "runs/a", {}) == "runs/a/compilation_cache"
  assert compilation_cache.resolve("auto", None, {}) is None
  assert compilation_cache.resolve("auto", "runs/a", {"JAX_COMPILATION_CACHE_DIR": "/c"}) == "/c"
  assert compilation_cache.resolve("/shared/cache", "runs/a", {"JAX_COMPILATION_CACHE_DIR": "/c"}) == "/shared/cache"
  tag = compilation_cache.machine_tag()
  assert tag.startswith("cpu-cpu-") and tag == tag.lower() and "/" not in tag and " " not in tag


def test_configure_sets_the_folder_and_off_disables(tmp_path, restore_jax_cache_settings):
  path = compilation_cache.configure("auto", tmp_path)
  assert path == str(tmp_path / "compilation_cache" / compilation_cache.machine_tag())
  assert jax.config.jax_compilation_cache_dir == path and jax.config.jax_persistent_cache_min_compile_time_secs == 0
  assert compilation_cache.configure("off", tmp_path) is None and not jax.config.jax_enable_compilation_cache
  with pytest.raises(OSError, match="--compilation_cache=off"):
    (tmp_path / "file").write_text("")
    compilation_cache.configure(str(tmp_path / "file"))


def _tiny_config():
  c = default.get_default_configs()
  c.data.dataset, c.data.random_flip, c.data.num_train = "mixture", False, 256
  c.model.name, c.model.hidden_dims = "mlp", (16,)
  t = c.training
  t.batch_size, t.n_iters, t.n_jitted_steps, t.snapshot_sampling = 16, 2, 1, False
  t.log_freq = t.snapshot_freq = t.snapshot_freq_for_preemption = 2
  t.eval_freq = 4  # no eval step: fewer programs to compile
  return c


@pytest.mark.slow  # two launches of a run
def test_a_second_launch_loads_every_program_from_the_cache(tmp_path, restore_jax_cache_settings):
  cache = compilation_cache.configure("auto", tmp_path / "run1")
  events = collections.Counter()
  listener = lambda event, **kwargs: events.update([event.rsplit("/", 1)[-1]])
  jax.monitoring.register_event_listener(listener)
  try:
    jax.clear_caches()  # a fresh process: no program in memory from the tests that ran before in this one
    train.train(_tiny_config(), tmp_path / "run1")
    first = dict(events)
    entries = sorted(p.name for p in (tmp_path / "run1" / "compilation_cache").rglob("*-cache"))
    jax.clear_caches()  # what a new process starts with: no compiled program in memory
    events.clear()
    train.train(_tiny_config(), tmp_path / "run2")
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert cache and first.get("cache_misses", 0) > 0 and len(entries) >= first["cache_misses"]
  assert events.get("cache_hits", 0) > 0 and events.get("cache_misses", 0) == 0, dict(events)
  assert sorted(p.name for p in (tmp_path / "run1" / "compilation_cache").rglob("*-cache")) == entries
