"""Faults during training: SIGTERM, a failing save, non-finite losses under the "skip" policy.

A damaged newest checkpoint (fall back to the previous one) is tested in tests/test_train.py. The
in-process runs use the toy config of tests/test_train.py with one shared setting (so they share
compiled programs through a persistent compilation cache) and inject their faults from outside:
NaN data at a chosen step, or a checkpoint writer that raises ``ENOSPC`` from a chosen step on.
"""

import errno
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import orbax.checkpoint as ocp

from score_sde import checkpoints
from score_sde import losses
from score_sde import parallel
from score_sde import train
from tests.test_train import compilation_cache_dir  # noqa: F401  (autouse: a compilation cache for this module)
from tests.test_train import toy_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAULTY = {"training.snapshot_sampling": False, "training.eval_freq": 1000, "training.nonfinite": "skip",
          "training.max_skipped": 2}  # checkpoints: regular at 4 and 8, preemption at 2 and 6



# --- Non-finite losses ---------------------------------------------------------------------------


def _quadratic_step(n_jitted_steps=1):
  """A step on loss = mean((w x)^2) with Adam: a batch holding a NaN makes the loss NaN."""
  loss_fn = lambda key, params, x: (jnp.mean((params["w"] * x) ** 2), {})
  optimizer = losses.get_optimizer(lr=0.1, warmup=0, grad_clip=1.0)
  step = losses.get_step_fn(loss_fn, optimizer, train=True, ema_rate=0.5, n_jitted_steps=n_jitted_steps,
                            nonfinite="skip")
  state = losses.init_train_state({"w": jnp.arange(1.0, 4.0)}, optimizer)
  return jax.jit(step), state


def test_skip_keeps_params_optimiser_state_and_ema_of_a_non_finite_step():
  step, state = _quadratic_step()
  key, good, bad = jax.random.key(0), jnp.ones(3), jnp.array([1.0, jnp.nan, 1.0])
  after_good, metrics = step(key, state, good)
  assert int(metrics["skipped"]) == 0 and int(after_good.step) == 1
  assert not np.array_equal(after_good.params["w"], state.params["w"])
  after_bad, metrics = step(key, after_good, bad)
  assert int(metrics["skipped"]) == 1 and not np.isfinite(metrics["loss"]) and int(after_bad.step) == 2
  for a, b in zip(jax.tree.leaves(after_bad.replace(step=after_good.step)), jax.tree.leaves(after_good), strict=True):
    np.testing.assert_array_equal(a, b)  # unchanged, bit for bit: Adam's count and moments included
  # Inside one compiled call of three steps: the middle one is skipped, the others apply as single steps do.
  scan, state = _quadratic_step(n_jitted_steps=3)
  final, metrics = scan(key, state, jnp.stack([good, bad, good]))
  np.testing.assert_array_equal(metrics["skipped"], [0, 1, 0])
  expected, _ = step(key, after_bad, good)
  np.testing.assert_allclose(final.params["w"], expected.params["w"], rtol=1e-6)
  np.testing.assert_allclose(final.ema_params["w"], expected.ema_params["w"], rtol=1e-6)


def test_unknown_policy_is_refused():
  with pytest.raises(ValueError, match=r"valid choices: \['stop', 'skip'\].*training\.nonfinite"):
    losses.get_step_fn(lambda *a: (0.0, {}), optax.sgd(0.1), train=True, nonfinite="ignore")


def _nan_from(monkeypatch, first, last=None):
  """Training batches of steps first..last (inclusive; None: to the end) get a NaN (no eval batches are read)."""
  shard_batch, calls = parallel.shard_batch, [0]

  def with_nan(batch, mesh, batch_axis=0):
    calls[0] += 1
    if first <= calls[0] <= (last or calls[0]):
      image = np.array(batch["image"])
      image[0, 0] = np.nan
      batch = {**batch, "image": image}
    return shard_batch(batch, mesh, batch_axis)

  monkeypatch.setattr(parallel, "shard_batch", with_nan)


@pytest.mark.slow
def test_skip_policy_in_the_loop_counts_and_logs_skipped_steps(tmp_path, monkeypatch, caplog):
  _nan_from(monkeypatch, 3, 3)
  caplog.set_level(logging.INFO, logger="absl")
  result = train.train(toy_config(**FAULTY), tmp_path)
  assert result.step == 8 and result.skipped_steps == 1
  assert result.history["skipped_steps"] == [(4, 1), (8, 0)]
  assert all(np.isfinite(v) for _, v in result.history["training_loss"])  # the mean of steps 1, 2, 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(result.state)))
  assert any("step 4/8" in r.getMessage() and "1 step(s) skipped" in r.getMessage() for r in caplog.records)
  assert checkpoints.list_steps(tmp_path) == [4, 6, 8]


@pytest.mark.slow
def test_more_than_max_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
  _nan_from(monkeypatch, 3)
  with pytest.raises(FloatingPointError, match=r"Steps 3\.\.5 .*max_skipped=2 in a row.*state is that of step 2"):
    train.train(toy_config(**FAULTY), tmp_path)
  assert checkpoints.list_steps(tmp_path) == [2, 4]  # checked before each save: step 6 was not saved


# --- A failing save ------------------------------------------------------------------------------


@pytest.mark.slow  # a run stopped by a failing save, then resumed
def test_failed_save_names_the_directory_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
  """The disk is full from step 6 on: the run stops naming the directory, and resumes from step 4.

  The write fails as the save starts (a save that fails in Orbax's background threads is reported
  the same way by the next save or by ``close``; the resumed run here must not race such threads).
  """
  save = ocp.CheckpointManager.save

  def save_or_fail(self, step, *args, **kwargs):
    if step >= 6:
      raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step)))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_or_fail)
  with pytest.raises(OSError, match=rf"(?s)step 6 to {tmp_path}/checkpoints-meta failed .*No space left.*steps "
                                    rf"\[2, 4\].*Free space"):
    train.train(toy_config(**FAULTY), tmp_path)
  monkeypatch.undo()
  assert checkpoints.list_steps(tmp_path) == [2, 4]
  resumed = train.train(toy_config(**FAULTY), tmp_path)
  assert resumed.step == 8 and [s for s, _ in resumed.history["training_loss"]] == [8]
  assert checkpoints.list_steps(tmp_path) == [4, 6, 8]


# --- SIGTERM -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  """main.py trains (for ever, as far as it knows); SIGTERM after its first step: a checkpoint, exit 0."""
  workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
  flags = {"n_iters": 1_000_000, "n_jitted_steps": 1, "batch_size": 16, "log_freq": 10, "eval_freq": 100_000,
           "snapshot_freq": 100_000, "snapshot_freq_for_preemption": 100_000, "snapshot_sampling": False,
           "final_evaluation": False}
  args = [sys.executable, "main.py", "--config", "configs/toy/vp_8gaussians.py", f"--workdir={workdir}",
          "--config.model.hidden_dims=(16,16)"] + [f"--config.training.{k}={v}" for k, v in flags.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_backend_optimization_level=0")
  with open(log, "w") as stderr:
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
      deadline = time.monotonic() + 180
      while "done, " not in log.read_text():  # "Step 1 done, ... s after the start"
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
      proc.send_signal(signal.SIGTERM)
      stdout, _ = proc.communicate(timeout=120)
    finally:
      proc.kill()
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  (step,) = checkpoints.list_steps(workdir)
  assert 1 <= step < flags["n_iters"]
  assert f"Preemption notice (SIGTERM): saved step {step} to {workdir}/checkpoints/{step}" in text
  assert f"preempted (SIGTERM): saved step {step}" in stdout
