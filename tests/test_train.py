"""The training loop: smoke run, exact resumption, damaged checkpoints, sharding, clear errors.

Every run trains a small MLP on the 2-D ``mixture`` set for 8 steps (batch 16) from ``toy_config``.
The uninterrupted run (``straight``) is the reference the others must reproduce: bitwise where
the same programs run (resuming after a kill, resuming past a damaged checkpoint), within float
tolerance where the programs differ (two steps per call, 8 devices). Compilation dominates the
runtime, so the module shares one persistent compilation cache: a later ``train`` call that
builds the same programs loads them instead of compiling.
"""

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import default
from score_sde import builders
from score_sde import checkpoints
from score_sde import train
from score_sde import visualize

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_ITERS = 8


def toy_config(**overrides):
  """The shared tiny config; ``overrides`` maps dotted keys ("training.batch_size") to values."""
  c = default.get_default_configs()
  c.seed = 3
  c.data.dataset = "mixture"
  c.data.random_flip = False
  c.data.num_train = 512
  c.model.name = "mlp"
  c.model.hidden_dims = (32, 32)
  c.model.num_scales = 32
  c.model.dropout = 0.1      # dropout keys must resume exactly too
  c.model.ema_rate = 0.9
  t = c.training
  t.batch_size, t.n_iters, t.n_jitted_steps = 16, N_ITERS, 1
  t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption = 4, 2, 4, 2
  c.sampling.batch_size = 16
  c.sampling.num_steps = 8
  c.optim.lr, c.optim.warmup = 1e-3, 2
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module only."""
  old = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                    "jax_persistent_cache_min_compile_time_secs",
                                                    "jax_persistent_cache_min_entry_size_bytes")}
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted 8-step run."""
  return train.train(toy_config(), tmp_path_factory.mktemp("straight"))


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise_equal(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def read_scalars(directory):
  """{tag: [(step, value)]} from the TensorBoard event files under ``directory`` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top  (it imports PyTorch)
  scalars = {}
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


# --- The run and what it writes ------------------------------------------------------------------


@pytest.mark.slow
def test_one_step_smoke(tmp_path):
  result = train.train(toy_config(**{"training.n_iters": 1, "training.snapshot_sampling": False}), tmp_path)
  assert result.step == 1 and int(result.state.step) == 1
  (_, loss), = result.history["training_loss"]
  assert np.isfinite(loss) and loss > 0
  assert checkpoints.list_steps(tmp_path) == [1]  # the last step is always saved


@pytest.mark.slow
def test_straight_run_writes_config_tensorboard_samples_and_checkpoints(straight):
  workdir = pathlib.Path(straight.workdir)
  assert straight.step == N_ITERS
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["training"]["n_iters"] == N_ITERS and saved["model"]["hidden_dims"] == [32, 32]
  # TensorBoard: every scalar at its frequency, equal to the returned history.
  scalars = read_scalars(straight.tensorboard_dir)
  assert set(scalars) == {"training_loss", "grad_norm", "lr", "eval_loss"}
  assert [s for s, _ in scalars["training_loss"]] == [4, 8]
  assert [s for s, _ in scalars["eval_loss"]] == [2, 4, 6, 8]
  np.testing.assert_allclose([v for _, v in scalars["training_loss"]],
                             [v for _, v in straight.history["training_loss"]], rtol=1e-6)
  assert all(np.isfinite(v) for values in scalars.values() for _, v in values)
  np.testing.assert_allclose([v for _, v in scalars["lr"]], [1e-3, 1e-3])  # lr of steps 4 and 8 (warm-up 2)
  # Snapshots: a scatter PNG and the raw samples at every regular checkpoint.
  assert straight.samples == [str(workdir / "samples" / f"step_{s}.png") for s in (4, 8)]
  with PIL.Image.open(straight.samples[-1]) as image:
    assert image.format == "PNG" and image.size[0] == 512
  assert np.load(workdir / "samples" / "step_8.npz")["samples"].shape == (16, 2)
  # Checkpoints: regular at 4 and 8, the newest preemption checkpoint at 6.
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8]
  assert sorted(int(p.name) for p in (workdir / "checkpoints-meta").iterdir()) == [6]


def test_restore_gives_the_ema_score(straight):
  restored = builders.restore(toy_config(), straight.workdir)
  assert restored.step == N_ITERS and restored.sde.N == 32 and restored.network.hidden_dims == (32, 32)
  assert_bitwise_equal(restored.fn.variables["params"], straight.state.ema_params)
  x = np.zeros((5, 2), np.float32)
  assert restored.fn(x, np.full((5,), 0.5, np.float32)).shape == (5, 2)


# --- Exact resumption ----------------------------------------------------------------------------


class _Killed(Exception):
  pass


def test_resume_after_kill_is_bitwise_identical(straight, tmp_path, monkeypatch):
  """Killed right after the preemption checkpoint of step 6 (mid log window); a fresh call resumes."""
  save = checkpoints.Checkpointer.save

  def save_then_die(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == 6:
      raise _Killed()
    return saved

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_die)
  with pytest.raises(_Killed):
    train.train(toy_config(), tmp_path)
  monkeypatch.undo()
  assert checkpoints.list_steps(tmp_path) == [4, 6]
  resumed = train.train(toy_config(), tmp_path)
  assert resumed.step == N_ITERS
  assert_bitwise_equal(resumed.state, straight.state)
  # The window of steps 5..8 straddles the kill: its mean is still the uninterrupted one.
  assert resumed.history["training_loss"] == straight.history["training_loss"][1:]
  assert resumed.history["eval_loss"] == straight.history["eval_loss"][3:]


def _damage(step_dir):
  for path in pathlib.Path(step_dir).rglob("*"):
    if path.is_file():
      os.truncate(path, path.stat().st_size // 2)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(straight, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(straight.workdir, workdir)
  _damage(workdir / "checkpoints" / str(N_ITERS))
  resumed = train.train(toy_config(), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(f"checkpoints/{N_ITERS} could not be restored" in w for w in warnings), warnings
  assert any("Resuming from checkpoints-meta/6" in w for w in warnings), warnings
  assert [p.name.split("-")[:2] for p in (workdir / "checkpoints-damaged").iterdir()] == [["checkpoints", "8"]]
  # It resumed from step 6 and redid steps 7 and 8 exactly.
  assert [s for s, _ in resumed.history["eval_loss"]] == [8]
  assert_bitwise_equal(resumed.state, straight.state)
  assert checkpoints.list_steps(workdir) == [4, 6, 8]


def test_no_usable_checkpoint_is_a_clear_error(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight.workdir, workdir)
  for series in ("checkpoints", "checkpoints-meta"):
    for step_dir in (workdir / series).iterdir():
      _damage(step_dir)
  with pytest.raises(ValueError, match=r"(?s)None of the 3 checkpoint\(s\).*fresh workdir"):
    train.train(toy_config(), workdir)
  assert not (workdir / "checkpoints-damaged").exists()  # nothing is moved when nothing restores


# --- Same result, other programs -----------------------------------------------------------------


@pytest.mark.slow
def test_two_steps_per_call_match_one(straight, tmp_path):
  config = toy_config(**{"training.n_jitted_steps": 2, "training.snapshot_sampling": False})
  result = train.train(config, tmp_path)
  for a, b in zip(leaves(result.state), leaves(straight.state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([v for _, v in result.history["training_loss"]],
                             [v for _, v in straight.history["training_loss"]], rtol=1e-5)
  assert checkpoints.list_steps(tmp_path) == [4, 6, 8]


_EIGHT_DEVICES = """
import sys
import jax
import numpy as np
from score_sde import train
from tests.test_train import toy_config

assert jax.device_count() == 8, jax.devices()
# Refused before anything compiles, with the numbers.
compiled = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: compiled.append(event) if "compile" in event else None)
for key, value in (("training.batch_size", 12), ("sampling.batch_size", 20)):
  try:
    train.train(toy_config(**{key: value}), sys.argv[1] + "/refused")
  except ValueError as e:
    assert str(value) in str(e) and "(8," in str(e) and key in str(e), e
  else:
    raise SystemExit(f"{key}={value} was not refused")
assert not compiled, compiled
result = train.train(toy_config(), sys.argv[1] + "/run")
assert compiled, "the listener saw no compilation, so it proves nothing"
assert "tensorflow" not in sys.modules, "training imported TensorFlow"
np.savez(sys.argv[1] + "/result.npz", *jax.tree.leaves(jax.device_get(result.state)),
         losses=np.array([v for _, v in result.history["training_loss"]]))
print("OK")
"""


@pytest.mark.slow
def test_eight_devices_match_one(straight, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  run = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-4000:]
  result = np.load(tmp_path / "result.npz")
  for i, expected in enumerate(leaves(straight.state)):
    np.testing.assert_allclose(result[f"arr_{i}"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result["losses"], [v for _, v in straight.history["training_loss"]], rtol=1e-5)
  assert (tmp_path / "run" / "samples" / "step_8.png").exists()


# --- Bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption"])
def test_frequency_not_a_multiple_of_n_jitted_steps_is_refused(name, tmp_path):
  config = toy_config(**{"training.n_jitted_steps": 2, f"training.{name}": 3})
  with pytest.raises(ValueError, match=rf"training\.{name}=3 must be a positive multiple of "
                                       rf"training\.n_jitted_steps=2.*--config\.training\.{name}=2"):
    train.train(config, tmp_path)
  assert not any(tmp_path.iterdir())  # refused before anything was written


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
  config = toy_config(**{"optim.lr": 1e30, "optim.warmup": 0, "training.snapshot_sampling": False})
  with pytest.raises(FloatingPointError, match=r"Non-finite training loss .* at step 2;.*newest checkpoint: none"):
    train.train(config, tmp_path)
  assert checkpoints.list_steps(tmp_path) == []  # step 2 was due a preemption checkpoint


def test_image_grid():
  images = np.zeros((5, 3, 4, 1), np.float32)
  images[1] = 1.0
  grid = visualize.image_grid(images)
  assert grid.shape == (2 * (3 + 2) + 2, 3 * (4 + 2) + 2, 1) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[2:5, 8:12], 255)  # image 1: row 0, column 1
  assert grid.sum() == 255 * 12
  with pytest.raises(ValueError, match="C in"):
    visualize.image_grid(np.zeros((2, 3, 3, 2)))


def test_save_image_grid_enlarges_small_grids(tmp_path):
  images = np.random.default_rng(0).random((5, 3, 4, 1), np.float32)
  visualize.save_image_grid(tmp_path / "grid.png", images)
  with PIL.Image.open(tmp_path / "grid.png") as image:
    assert image.mode == "L" and image.size == (20 * 13, 12 * 13)  # 20 px wide -> x13 to reach 256
    pixels = np.asarray(image)
  np.testing.assert_array_equal(pixels[::13, ::13], visualize.image_grid(images)[..., 0])


@pytest.mark.parametrize("method", sorted(builders.SAMPLER_FIELDS))
def test_snapshot_sampler_takes_its_options_from_the_config(method):
  config = toy_config(**{"sampling.method": method})
  sampler = builders.build_sampler(config, builders.build_sde(config), (4, 2))  # an unknown option would raise
  assert callable(sampler)
  with pytest.raises(ValueError, match=r"config\.sampling\.method='ddim' is not one of \['dpm_solver', "
                                       r"'dpm_solver\+\+', 'euler', 'heun', 'ode', 'pc', 'unipc'\]"):
    builders.build_sampler(toy_config(**{"sampling.method": "ddim"}), builders.build_sde(config), (4, 2))


def test_a_relative_workdir_works(straight, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  result = train.train(toy_config(), "runs/relative")
  assert result.workdir == str(tmp_path / "runs" / "relative")
  assert checkpoints.list_steps("runs/relative") == [4, 6, 8]
  assert_bitwise_equal(result.state, straight.state)


@pytest.mark.slow  # a run with the profiler
def test_profile_steps_write_a_trace_into_the_tensorboard_folder(tmp_path):
  no_snapshots = {"training.snapshot_sampling": False}
  config = toy_config(**{"training.profile_steps": 2, "training.n_iters": 4}, **no_snapshots)
  train.train(config, tmp_path)
  runs = list((tmp_path / "tensorboard" / "plugins" / "profile").iterdir())
  assert len(runs) == 1, runs
  files = {p.name: p.stat().st_size for p in runs[0].iterdir()}
  assert any(name.endswith(".xplane.pb") for name in files) and "perfetto_trace.json.gz" in files, files
  assert all(size > 0 for size in files.values()), files
  # A resumed launch past profile_start + profile_steps traces nothing more.
  config = toy_config(**{"training.profile_steps": 2, "training.profile_start": 1, "training.n_iters": 6},
                      **no_snapshots)
  shutil.copytree(tmp_path, tmp_path / "again", ignore=shutil.ignore_patterns("tensorboard"))
  train.train(config, tmp_path / "again")
  assert not (tmp_path / "again" / "tensorboard" / "plugins").exists()
