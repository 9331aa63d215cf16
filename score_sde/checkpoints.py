"""Checkpoints of a training run: Orbax, two series, resume from the newest usable step.

    ckpt = checkpoints.Checkpointer(workdir, snapshot_freq=50_000, preemption_freq=10_000, keep=0)
    restored = ckpt.restore_latest(abstract_state)     # (state, host_state, step) or None
    ckpt.save(step, state, host_state)                 # asynchronous; a no-op off the two schedules
    ckpt.close()                                       # waits for the saves in flight

Every process of a multi-host run makes the same calls: each writes its shards of the arrays,
process 0 the JSON item and the directory renames (Orbax's primary host).

Layout (as in the original). ``workdir/checkpoints/<step>`` holds the regular series, saved every
``snapshot_freq`` steps (and on ``force``) and kept by ``keep`` (0 keeps every one);
``workdir/checkpoints-meta/<step>`` holds the frequent preemption checkpoint, saved every
``preemption_freq`` steps, of which only the newest is kept. A step on both schedules goes to the
regular series only. Each step stores two items: ``state``, the train-state pytree
(``args.StandardSave``, sharded arrays written by every host), and ``host``, a JSON dict of
everything else that exact resumption needs (data-iterator positions, running metric sums).

Robustness. Orbax writes a step into a temporary directory and renames it when complete, so a
killed process loses only the steps since the last finished save (unfinished temporaries are
deleted on the next start). ``restore_latest`` tries the steps of both series from the newest
down: a step that fails to restore (truncated or missing files, unreadable metadata) is reported
with a warning, and once an older step restores, the failed newer steps are moved to
``workdir/checkpoints-damaged/`` (kept for inspection, and out of the way of the resumed run's
next saves). If no step restores, nothing is moved and the error names each step's failure
(usually a config that changed the shapes of the train state). A save that fails (a full disk, an
unwritable directory) raises ``OSError`` naming the step, its directory and what to do; the steps
saved before it stay as they were, and a restart resumes from the newest of them. The arrays
restore onto whatever shardings the abstract state names, so a run checkpointed with one mesh (or
``training.fsdp``) resumes on another.
"""

from __future__ import annotations

import contextlib
import json
import logging as logging_lib
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

PyTree = Any
HostState = dict[str, Any]  # JSON-serialisable.

REGULAR_DIR = "checkpoints"
PREEMPTION_DIR = "checkpoints-meta"
DAMAGED_DIR = "checkpoints-damaged"
_SERIES = (REGULAR_DIR, PREEMPTION_DIR)
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes step s into "s.orbax-checkpoint-tmp..." and renames it to "s"


def absolute(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an absolute path (Orbax refuses relative ones); URLs such as ``gs://...`` stay as they are."""
  text = os.fspath(workdir)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _manager(directory: epath.Path, keep: int | None, writer: bool = True) -> ocp.CheckpointManager:
  """An asynchronous manager of one series that keeps the newest ``keep`` steps (None: all).

  A reader (``writer=False``) creates nothing and leaves unfinished temporaries alone, so it can
  run beside the training process that writes them; it also writes no root metadata, which keeps
  it free of cross-process barriers (processes may see a directory appear at different times).
  """
  policy = preservation_policy.PreserveAll() if keep is None else preservation_policy.LatestN(keep)
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=writer, create=writer, save_root_metadata=writer)
  return ocp.CheckpointManager(directory, options=options)


def _remove_unfinished(workdir: epath.Path) -> None:
  """Deletes the unfinished step directories a killed or failed save left (process 0; all processes wait).

  Orbax deletes them too, but in the background, where a new save of the same step (the resumed run
  redoing it) can collide with the deletion; this deletes them before any save starts.
  """
  if jax.process_index() == 0:
    for series in _SERIES:
      if (workdir / series).exists():
        for path in (workdir / series).iterdir():
          if _TMP_SUFFIX in path.name and path.name.split(".")[0].isdigit():
            logging.info("Removing %s, an unfinished checkpoint.", path)
            path.rmtree()
  ocp.multihost.sync_global_processes("score_sde_remove_unfinished")


def _newest_first(managers: dict[str, ocp.CheckpointManager]) -> list[tuple[int, str]]:
  """(step, series) of every step of every series, newest first (the regular series first on ties)."""
  order = {name: i for i, name in enumerate(_SERIES)}
  candidates = [(step, name) for name, manager in managers.items() for step in manager.all_steps()]
  return sorted(candidates, key=lambda c: (-c[0], order[c[1]]))


def _restore_newest(managers: dict[str, ocp.CheckpointManager], make_args, what: str, step: int | None = None
                    ) -> tuple[Any, int, str, list[tuple[int, str]]] | None:
  """Restores the newest step that restores (or ``step``): (items, step, series, failed newer steps).

  Raises:
    ValueError: when steps exist but none restores (or ``step`` does not exist or fails).
  """
  candidates = _newest_first(managers)
  if step is not None:
    candidates = [c for c in candidates if c[0] == step]
    if not candidates:
      steps = sorted({s for s, _ in _newest_first(managers)})
      raise ValueError(f"No checkpoint of step {step} in {what}; available steps: {steps}.")
  if not candidates:
    return None
  failures = []
  for candidate_step, series in candidates:
    try:
      items = managers[series].restore(candidate_step, args=make_args())
    except Exception as e:  # pylint: disable=broad-except  (any failure to read means "damaged")
      message = f"{type(e).__name__}: {str(e)[:400]}"
      logging.warning("Checkpoint %s/%d could not be restored (%s); trying the previous one.",
                      managers[series].directory, candidate_step, message)
      failures.append((candidate_step, series, message))
      continue
    return items, candidate_step, series, [(s, name) for s, name, _ in failures]
  details = "\n".join(f"  {name}/{s}: {message}" for s, name, message in failures)
  raise ValueError(
      f"None of the {len(failures)} checkpoint(s) in {what} could be restored:\n{details}\n"
      f"If the config changed the model or optimiser (so the saved arrays no longer match), train in "
      f"a fresh workdir or restore the old config; if the files are damaged, move them away to start "
      f"from scratch.")


class Checkpointer:
  """The regular and the preemption series of one workdir (see the module docstring).

  Args:
    workdir: the run's directory (local path or any ``etils.epath`` URL, e.g. ``gs://...``).
    snapshot_freq: steps between regular checkpoints.
    preemption_freq: steps between preemption checkpoints.
    keep: regular checkpoints kept (the newest ones); 0 keeps all.
  """

  def __init__(self, workdir: str | epath.PathLike, *, snapshot_freq: int, preemption_freq: int, keep: int = 0):
    for name, value in (("snapshot_freq", snapshot_freq), ("preemption_freq", preemption_freq)):
      if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive number of steps, got {value}.")
    if int(keep) != keep or keep < 0:
      raise ValueError(f"keep (training.keep_checkpoints) must be a non-negative integer (0: keep all), got {keep}.")
    self.workdir = absolute(workdir)
    self.snapshot_freq, self.preemption_freq = int(snapshot_freq), int(preemption_freq)
    _remove_unfinished(self.workdir)
    self._managers = {REGULAR_DIR: _manager(self.workdir / REGULAR_DIR, int(keep) or None),
                      PREEMPTION_DIR: _manager(self.workdir / PREEMPTION_DIR, 1)}
    self._in_flight: dict[str, int] = {}  # series -> the step of its newest save started
    self._failed: set[str] = set()  # series whose failure was reported

  def directory_of(self, step: int) -> epath.Path:
    """The directory of ``step`` (in the series that saved it; the regular one when it is in neither)."""
    for series in _SERIES:
      if step in self._managers[series].all_steps():
        return self.workdir / series / str(step)
    return self.workdir / REGULAR_DIR / str(step)

  def _save_error(self, series: str, step: int | None, error: Exception) -> OSError:
    """The error of a failed save: which step, where, what is left, and what to do."""
    directory = self.workdir / series
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    self._failed.add(series)
    return OSError(
        f"Saving {what} to {directory} failed ({type(error).__name__}: {str(error)[:300]}). The checkpoints "
        f"saved before it are untouched (steps {list_steps(self.workdir)}), and the run stops rather than "
        f"train on without checkpoints. Free space on that file system or make {directory} writable (or "
        f"move the run to a --workdir that is), then run the same command again: training resumes from the "
        f"newest of those checkpoints.")

  def save(self, step: int, state: PyTree, host_state: HostState, *, force: bool = False) -> bool:
    """Starts an asynchronous save of ``step`` if a schedule (or ``force``) asks for one.

    The arrays are copied off the devices before this returns, so ``state`` may be donated right
    after; the files are written in the background (``wait``).

    Args:
      step: the train state's step.
      state: the train-state pytree (sharded ``jax.Array`` leaves).
      host_state: JSON-serialisable host-side state, restored verbatim.
      force: save to the regular series whatever the schedules say (e.g. the last step).

    Returns:
      Whether a save was started.
    """
    if force or step % self.snapshot_freq == 0:
      series = REGULAR_DIR
    elif step % self.preemption_freq == 0:
      series = PREEMPTION_DIR
    else:
      return False
    if step in self._managers[series].all_steps():
      return False
    self.wait()  # the previous saves (of both series) must have succeeded before a new one starts
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state))
    try:
      started = self._managers[series].save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise many types)
      raise self._save_error(series, step, e) from e
    if started:
      self._in_flight[series] = step
    return started

  def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, HostState, int] | None:
    """Restores the newest usable step of either series into ``abstract_state``'s shardings.

    Damaged newer steps are reported with a warning and moved to ``workdir/checkpoints-damaged``.

    Args:
      abstract_state: the train state's structure as ``jax.ShapeDtypeStruct`` leaves, each with
        the ``sharding`` to restore onto (e.g. replicated over the mesh).

    Returns:
      ``(state, host_state, step)``, or None when there is no checkpoint.

    Raises:
      ValueError: when checkpoints exist but none can be restored (nothing is moved then).
    """
    make_args = lambda: ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                           host=ocp.args.JsonRestore())
    found = _restore_newest(self._managers, make_args, str(self.workdir))
    if found is None:
      return None
    items, step, series, damaged = found
    for bad_step, bad_series in damaged:
      self._quarantine(bad_step, bad_series)
    if damaged:
      logging.warning("Resuming from %s/%d instead of the newer damaged checkpoint(s) %s, which were moved to %s.",
                      series, step, [f"{name}/{s}" for s, name in damaged], self.workdir / DAMAGED_DIR)
    return items.state, items.host, step

  def _quarantine(self, step: int, series: str) -> None:
    """Moves a damaged step out of its series (host 0), so that the resumed run can save it anew."""
    manager = self._managers[series]
    if jax.process_index() == 0:
      target = self.workdir / DAMAGED_DIR / f"{series}-{step}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      (manager.directory / str(step)).rename(target)
    ocp.multihost.sync_global_processes(f"score_sde_quarantine_{series}_{step}")
    manager.reload()

  def wait(self) -> None:
    """Blocks until every save in flight is written.

    Raises:
      OSError: when a save failed (see ``_save_error``).
    """
    for series, manager in sorted(self._managers.items(), key=lambda item: self._in_flight.get(item[0], 0)):
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        raise self._save_error(series, self._in_flight.get(series), e) from e

  def close(self) -> None:
    """Waits for the saves in flight, then releases the managers (all of them, even after a failure).

    Raises:
      OSError: when a save failed (and was not reported before).
    """
    failure = None
    for series, manager in sorted(self._managers.items(), key=lambda item: self._in_flight.get(item[0], 0)):
      try:
        manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if series not in self._failed:
          failure = failure or (series, e)
    if failure is not None:
      series, e = failure
      raise self._save_error(series, self._in_flight.get(series), e) from e


def list_steps(workdir: str | epath.PathLike) -> list[int]:
  """Every checkpointed step of ``workdir`` (both series), ascending; [] when there is none."""
  workdir = absolute(workdir)
  steps = set()
  for series in _SERIES:
    if (workdir / series).exists():
      manager = _manager(workdir / series, None, writer=False)
      steps.update(manager.all_steps())
      manager.close()
  return sorted(steps)


def restore_ema_params(workdir: str | epath.PathLike, abstract_params: PyTree, *,
                       step: int | None = None) -> tuple[PyTree, int]:
  """Only the EMA parameters of a checkpoint (for sampling and evaluation), read-only.

  Args:
    workdir: the training run's directory.
    abstract_params: the parameters' structure as ``jax.ShapeDtypeStruct`` leaves with shardings.
    step: the step to restore; None takes the newest one that restores (damaged newer steps are
      skipped with a warning and left in place).

  Returns:
    ``(ema_params, step)``.

  Raises:
    FileNotFoundError: when ``workdir`` holds no checkpoint.
    ValueError: when ``step`` does not exist, or no checkpoint restores.
  """
  workdir = absolute(workdir)
  managers = {series: _manager(workdir / series, None, writer=False)
              for series in _SERIES if (workdir / series).exists()}
  make_args = lambda: ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"ema_params": abstract_params}, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args({"ema_params": abstract_params})))
  try:
    found = _restore_newest(managers, make_args, str(workdir), step)
  finally:
    for manager in managers.values():
      manager.close()
  if found is None:
    raise FileNotFoundError(f"No checkpoint in {workdir} (looked in {list(_SERIES)}); train first, or "
                            f"pass the workdir of a training run.")
  items, restored_step, _, _ = found
  return items.state["ema_params"], restored_step


class QuietOrbax(logging_lib.Filter):
  """Drops Orbax's INFO records (a dozen per save or restore), which would drown the progress lines."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Within the block, Orbax logs warnings and errors only."""
  quiet = QuietOrbax()
  logging.get_absl_logger().addFilter(quiet)
  try:
    yield
  finally:
    logging.get_absl_logger().removeFilter(quiet)


def write_config(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> epath.Path:
  """Writes the resolved config to ``workdir/config.json``, warning about keys changed since the last start."""
  path = absolute(workdir) / "config.json"
  new = json.loads(config.to_json_best_effort(sort_keys=True))
  if path.exists():
    flat = lambda d, prefix="": ({k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
                                 if isinstance(d, dict) else {prefix[:-1]: d})
    old_flat, new_flat = flat(json.loads(path.read_text())), flat(new)
    changed = sorted(key for key in old_flat.keys() | new_flat.keys() if old_flat.get(key) != new_flat.get(key))
    if changed:
      logging.warning("The config differs from the previous start's %s in: %s. The run continues with the new "
                      "values.", path, ", ".join(f"{k} ({old_flat.get(k)!r} -> {new_flat.get(k)!r})" for k in changed))
  path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
  return path
