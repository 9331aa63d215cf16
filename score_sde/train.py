"""The training loop: score matching (or a noise-conditional classifier) on a device mesh, resumable exactly.

    result = train.train(config, workdir)      # trains to config.training.n_iters, or resumes

Programs come from ``builders``; this module runs them. The step's randomness is ``fold_in(key, step)``
of a key fixed by ``config.seed``, and the data-iterator positions and running metric sums are
checkpointed with the train state, so a resumed run repeats bit for bit what the uninterrupted run
would have done. Workdir layout, faults and the non-finite policies: ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from score_sde import builders
from score_sde import checkpoints
from score_sde import datasets
from score_sde import losses
from score_sde import parallel
from score_sde import visualize
from score_sde.models import wrapper

Array = jax.Array


def due(step: int, every: int) -> bool:
  """Whether a task run every ``every`` steps runs after ``step``."""
  return step % every == 0


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What ``train`` did.

  Attributes:
    step: the final step.
    state: the final ``losses.TrainState``.
    history: {"training_loss" | "grad_norm" | "lr" | "eval_loss" | ...: [(step, value), ...]} of this call.
    preempted: a SIGTERM stopped the run after saving ``step``.
    skipped_steps: non-finite steps skipped by this call (``training.nonfinite = "skip"``).
    workdir: the run's directory.
    samples: the snapshot PNGs written by this call.
    time_to_first_step: seconds from the call to the end of the first compiled call (None: no step ran).
    steps_per_second: after the first call, logging, evals and checkpoints included (None: too few steps).
  """

  step: int
  state: losses.TrainState
  history: dict[str, list[tuple[int, float]]]
  preempted: bool
  skipped_steps: int
  workdir: str
  samples: list[str]
  time_to_first_step: float | None = None
  steps_per_second: float | None = None

  def last(self, name: str) -> float | None:
    """The last value of ``history[name]`` logged by this call, or None."""
    return self.history[name][-1][1] if self.history.get(name) else None

  @property
  def training_loss(self) -> float | None:
    return self.last("training_loss")

  @property
  def eval_loss(self) -> float | None:
    return self.last("eval_loss")

  @property
  def config_path(self) -> str:
    return str(epath.Path(self.workdir) / "config.json")

  @property
  def tensorboard_dir(self) -> str:
    return str(epath.Path(self.workdir) / "tensorboard")

  @property
  def checkpoint_dir(self) -> str:
    return str(epath.Path(self.workdir) / checkpoints.REGULAR_DIR)


# --- Host-side bookkeeping -------------------------------------------------------------------------


@dataclasses.dataclass
class _MetricWindow:
  """Training metrics since the last log line: device values until ``check``, then host sums.

  The sums are part of the checkpoint, so a run resumed between two log lines logs the same means.
  Steps skipped for a non-finite loss (``training.nonfinite = "skip"``) are counted, not summed;
  ``consecutive`` is the current run of skipped steps (it carries over log lines and restarts).
  """

  sums: dict[str, float] = dataclasses.field(default_factory=dict)
  count: int = 0
  skipped: int = 0
  consecutive: int = 0
  pending: list[tuple[int, dict[str, Array]]] = dataclasses.field(default_factory=list)

  def add(self, step: int, metrics: dict[str, Array]) -> None:
    """Metrics of the call that ended at ``step`` (leaves () or (n_jitted_steps,)), still on device."""
    self.pending.append((step, metrics))

  def check(self, last_saved: int | None, max_skipped: int) -> int:
    """Fetches the pending metrics and adds them up, step by step; returns how many steps were skipped.

    Raises:
      FloatingPointError: at a non-finite loss that was not skipped, or at the step that makes
        more than ``max_skipped`` skipped steps in a row.
    """
    fetched = jax.device_get([metrics for _, metrics in self.pending])
    skipped_before = self.skipped
    saved = f"step {last_saved}" if last_saved is not None else "none yet"
    advice = ("Lower config.optim.lr, raise config.optim.warmup, keep config.optim.grad_clip positive, or check "
              "the data; a restart resumes from the newest checkpoint.")
    for (end, _), metrics in zip(self.pending, fetched):
      metrics = {name: np.atleast_1d(np.asarray(value, np.float64)) for name, value in metrics.items()}
      size = metrics["loss"].size
      skipped = metrics.pop("skipped", np.zeros(size))
      for i in range(size):
        step = end - size + 1 + i
        if skipped[i]:
          self.skipped += 1
          self.consecutive += 1
          if self.consecutive > max_skipped:
            raise FloatingPointError(
                f"Steps {step - self.consecutive + 1}..{step} all had a non-finite loss or gradient norm and were "
                f"skipped: more than config.training.max_skipped={max_skipped} in a row, so the run stops "
                f"(the train state is that of step {step - self.consecutive}; newest checkpoint: {saved}). {advice}")
          continue
        if not np.isfinite(metrics["loss"][i]):
          raise FloatingPointError(
              f"Non-finite training loss ({metrics['loss'][i]}) at step {step}; the run stops. Nothing after step "
              f"{step - 1} was saved (newest checkpoint: {saved}). {advice} With "
              f"--config.training.nonfinite=skip such steps are skipped instead.")
        self.consecutive = 0
        for name, value in metrics.items():
          self.sums[name] = self.sums.get(name, 0.0) + float(value[i])
        self.count += 1
    self.pending = []
    return self.skipped - skipped_before

  def pop_means(self) -> tuple[dict[str, float], int]:
    """The means over the window's applied steps (NaN when every step was skipped), and the skipped count."""
    means = {name: total / self.count for name, total in self.sums.items()} if self.count else {}
    skipped = self.skipped
    self.sums, self.count, self.skipped = {}, 0, 0
    return means, skipped

  def to_json(self) -> dict[str, Any]:
    return {"sums": self.sums, "count": self.count, "skipped": self.skipped, "consecutive": self.consecutive}


class _Progress:
  """Steps per second and ETA between log lines, timed from the end of the first (compiling) call."""

  def __init__(self, last_step: int):
    self.last_step = last_step
    self.step, self.time = None, None

  def start(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()

  def line(self, step: int) -> str:
    now = time.perf_counter()
    rate = (step - self.step) / max(now - self.time, 1e-9) if self.step is not None and step > self.step else 0.0
    self.step, self.time = step, now
    eta = datetime.timedelta(seconds=round((self.last_step - step) / rate)) if rate else "?"
    return f"{100.0 * step / self.last_step:5.1f}% | {rate:.2f} steps/s | ETA {eta}"


class _Trace:
  """A ``jax.profiler`` trace of ``training.profile_steps`` steps into ``<workdir>/tensorboard/plugins/profile/``.

  It starts after the call that ends at or past ``training.profile_start`` (0: after this launch's first,
  compiling call) while that window is still ahead, and stops after the call that covers the steps, once
  the device finished them. Each process traces its own host (TensorBoard's profile plugin, or the
  ``perfetto_trace.json.gz`` beside it in https://ui.perfetto.dev).
  """

  def __init__(self, directory: epath.Path, steps: int, start: int, steps_per_call: int):
    self.directory, self.steps, self.start, self.steps_per_call = directory, steps, start, steps_per_call
    self.stop_at, self.done = None, steps <= 0

  def after_call(self, step: int, first_step: int, outputs: Any) -> None:
    """Called after every compiled call; ``step`` ends it, ``first_step`` ended this launch's first call."""
    if self.done:
      return
    if self.stop_at is None:
      begin = self.start or first_step
      if begin <= step < begin + self.steps:
        jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
        self.stop_at = step + -(-self.steps // self.steps_per_call) * self.steps_per_call
        logging.info("Profiling steps %d..%d into %s.", step + 1, self.stop_at, self.directory / "plugins" / "profile")
      elif step >= begin + self.steps:
        self.done = True
    elif step >= self.stop_at:
      self.close(outputs)

  def close(self, outputs: Any = None) -> None:
    """Stops a trace in progress (after the device finished ``outputs``)."""
    if self.stop_at is not None and not self.done:
      if outputs is not None:
        jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      logging.info("Profile trace written to %s.", self.directory / "plugins" / "profile")
    self.done = True


class _Scalars:
  """Scalars of this call: kept in ``history`` and written to TensorBoard (process 0)."""

  def __init__(self, writer: Any, names: tuple[str, ...] = ("training_loss", "grad_norm", "lr", "eval_loss")):
    self.writer, self.history = writer, {name: [] for name in names}

  def add(self, name: str, step: int, value: float) -> None:
    self.history.setdefault(name, []).append((step, value))
    if self.writer is not None:
      self.writer.add_scalar(name, value, step)


# --- Training ------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
          devices: list[jax.Device] | None = None) -> TrainResult:
  """Trains (or resumes training) to ``config.training.n_iters`` steps, writing into ``workdir``.

  Args:
    config: the full config (``configs/default.py`` keys).
    workdir: the run's directory (local path or ``etils.epath`` URL); created if missing.
    devices: the devices to train on (default: every device of every host).

  Raises:
    ValueError: for a config that cannot run (before anything compiles), or unusable checkpoints.
    FloatingPointError: when a training loss is not finite (the message names the step), or
      more than ``training.max_skipped`` steps in a row were skipped.
    OSError: when a checkpoint cannot be written (the message names the directory).
  """
  t = config.training
  mesh = parallel.make_mesh(devices, fsdp=t.fsdp)
  builders.validate(config, mesh)
  workdir = checkpoints.absolute(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise FileExistsError(f"--workdir {workdir} is a file, not a directory; pass a directory for the run (it is "
                          f"created if missing).")
  data = datasets.get_dataset(config)  # missing data (or score model) is reported before the workdir is touched
  score_config = builders.score_run_config(config) if t.objective == "dequantizer" else None
  is_host0 = jax.process_index() == 0
  if is_host0:
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_config(config, workdir)
    if score_config is not None:  # the frozen score model's config travels with the run
      (workdir / builders.SCORE_CONFIG).write_text(score_config.to_json_best_effort(indent=2))
  with checkpoints.quiet_orbax():
    writer = None
    if is_host0:  # imported here: tensorboardX imports PyTorch when it is installed (seconds), other hosts skip it
      import tensorboardX  # pylint: disable=g-import-not-at-top
      writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    ckpt = checkpoints.Checkpointer(workdir, snapshot_freq=t.snapshot_freq,
                                    preemption_freq=t.snapshot_freq_for_preemption, keep=t.keep_checkpoints)
    try:
      with parallel.PreemptionNotice() as notice:  # SIGTERM: save at the end of the current call, then return
        names = ("training_loss", "grad_norm", "lr", "eval_loss") + (("skipped_steps",) if t.nonfinite == "skip"
                                                                     else ())
        return _train_loop(config, mesh, workdir, data, ckpt, _Scalars(writer, names), notice)
    finally:
      ckpt.close()  # waits for the saves in flight
      if writer is not None:
        writer.close()


def _train_loop(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: epath.Path,
                data: tuple[datasets.Pipeline, datasets.Pipeline], ckpt: checkpoints.Checkpointer, scalars: _Scalars,
                notice: parallel.PreemptionNotice) -> TrainResult:
  """``train`` after its checks: builds, compiles, resumes and runs the loop."""
  t = config.training
  k = t.n_jitted_steps
  started = time.perf_counter()
  last_step = t.n_iters // k * k
  if last_step != t.n_iters:
    logging.warning("training.n_iters=%d is not a multiple of n_jitted_steps=%d; training stops at step %d.",
                    t.n_iters, k, last_step)

  # SDE, network, data, and one base key per purpose (folded with the step inside the programs).
  sde, network = builders.build_sde(config), builders.build_network(config)
  lr_schedule = losses.get_lr_schedule(config.optim.lr, config.optim.warmup)
  train_ds, eval_ds = data
  init_key, train_key, eval_key, sample_key = jax.jit(  # made on every device (device_put cannot reach other hosts)
      lambda: tuple(jax.random.split(jax.random.key(config.seed), 4)), out_shardings=parallel.replicated(mesh))()
  programs = builders.build_programs(config, mesh, sde, network, tuple(train_ds.element_shape), init_key)
  snapshot = None
  if t.snapshot_sampling:
    snapshot = _snapshot_fn(config, sde, network, mesh, sample_key, train_ds, eval_ds, workdir)

  # Resume from the newest usable checkpoint, else initialise.
  abstract_state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                programs.state_shapes, programs.state_sharding)
  restored = ckpt.restore_latest(abstract_state)
  if restored is None:
    state, host_state, start = programs.init(init_key), {}, 0
    logging.info("Starting from scratch: %s parameters.", f"{wrapper.count_params(state.params):,}")
  else:
    state, host_state, start = restored
    logging.info("Resuming from the checkpoint of step %d%s.", start,
                 " (training.n_iters reached: nothing to do)" if start >= last_step else "")
  if start % k:
    raise ValueError(f"The checkpoint of step {start} is not at a multiple of training.n_jitted_steps={k}; "
                     f"resume with the n_jitted_steps of the run that wrote it.")
  train_it = train_ds.make_iterator(host_state.get("train_data"))
  eval_it = eval_ds.make_iterator(host_state.get("eval_data"))
  window = _MetricWindow(**host_state.get("window", {}))
  host_state_of = lambda: {"train_data": train_ds.iterator_state(train_it),
                           "eval_data": eval_ds.iterator_state(eval_it), "window": window.to_json()}
  batch_of = lambda it: parallel.shard_batch(_step_inputs(next(it)), mesh, 0 if k == 1 else 1)

  skip = t.nonfinite == "skip"
  skipped_total, first = 0, None
  progress = _Progress(last_step)
  trace = _Trace(workdir / "tensorboard", t.profile_steps, t.profile_start, k)
  last_saved, sample_paths, preempted = (start if restored else None), [], False
  try:
    for step in range(start + k, last_step + 1, k):
      # One compiled call: k optimiser steps on a sharded global batch.
      state, metrics = programs.train(train_key, state, batch_of(train_it))
      window.add(step, metrics)
      if first is None:
        jax.block_until_ready(metrics)
        first = (step, time.perf_counter())
        logging.info("Step %d done, %.1f s after the start (compilation included).", step, first[1] - started)
        progress.start(step)
      trace.after_call(step, first[0], metrics)
      preempted, final = notice.reached(), step == last_step
      save = preempted or final or due(step, t.snapshot_freq) or due(step, t.snapshot_freq_for_preemption)
      # Check the losses since the last check before anything is logged or saved.
      if save or due(step, t.log_freq) or due(step, t.eval_freq):
        skipped_total += window.check(last_saved, t.max_skipped)
      if due(step, t.log_freq) or final:
        _log_window(step, last_step, window, scalars, float(lr_schedule(step - 1)), skip, progress)
      if due(step, t.eval_freq):  # the EMA's loss (and a classifier's accuracy) on a held-out batch
        metrics = jax.device_get(programs.eval(eval_key, state, batch_of(eval_it)))
        for name, value in metrics.items():
          scalars.add(f"eval_{name}", step, float(value))
        logging.info("step %d: %s", step, ", ".join(f"eval_{name} {float(v):.5g}" for name, v in metrics.items()))
      if save and ckpt.save(step, state, host_state_of(), force=preempted or final):  # asynchronous
        last_saved = step
      if snapshot is not None and due(step, t.snapshot_freq):
        sample_paths.append(snapshot(step, state))
      if preempted:
        ckpt.wait()
        logging.warning("Preemption notice (SIGTERM): saved step %d to %s and stopped; run the same command again "
                        "to resume.", step, ckpt.directory_of(step))
        break
    trace.close(state)
  finally:
    trace.close()  # after an error: stops a trace in progress

  step = int(jax.device_get(state.step))
  timing = {}
  if first is not None:
    timing["time_to_first_step"] = first[1] - started
    if step > first[0]:
      timing["steps_per_second"] = (step - first[0]) / (time.perf_counter() - first[1])
  return TrainResult(step=step, state=state, history=scalars.history, preempted=preempted,
                     skipped_steps=skipped_total, workdir=str(workdir), samples=sample_paths, **timing)


def _log_window(step: int, last_step: int, window: _MetricWindow, scalars: _Scalars, lr: float, skip: bool,
                progress: _Progress) -> None:
  """One log line: the window's mean loss and gradient norm, the learning rate, steps per second and ETA."""
  means, skipped = window.pop_means()
  loss, grad_norm = means.get("loss", float("nan")), means.get("grad_norm", float("nan"))
  for name, value in (("training_loss", loss), ("grad_norm", grad_norm), ("lr", lr)):
    scalars.add(name, step, value)
  note = ""
  if skip:
    scalars.add("skipped_steps", step, skipped)
    note = f", {skipped} step(s) skipped (non-finite)" if skipped else ""
  logging.info("step %d/%d: training_loss %.5g, grad_norm %.4g, lr %.3g%s | %s", step, last_step, loss, grad_norm,
               lr, note, progress.line(step))


def _step_inputs(element: dict[str, Any]) -> dict[str, Any]:
  """The parts of a pipeline element the train and eval programs take."""
  return {"image": element["image"], "label": element["label"]}


def _snapshot_fn(config: ml_collections.ConfigDict, sde, network, mesh: jax.sharding.Mesh, sample_key: Array,
                 train_ds: datasets.Pipeline, eval_ds: datasets.Pipeline, workdir: epath.Path
                 ) -> Callable[[int, losses.TrainState], str]:
  """``snapshot(step, state) -> png path``: samples of the EMA network, written by process 0.

  The samples are sharded over the mesh; the key is ``fold_in(sample key of config.seed, step)``.
  Images become a grid, points (D >= 2) a scatter plot over a held-out batch.
  """
  shape = (config.sampling.batch_size,) + tuple(train_ds.element_shape)
  if len(shape) not in (2, 4) or (len(shape) == 2 and shape[1] < 2):
    raise ValueError(f"Snapshot pictures exist for images (H, W, C) and points (D >= 2), not examples of shape "
                     f"{shape[1:]}; set config.training.snapshot_sampling=False.")
  sampler = builders.build_sampler(config, sde, shape)
  p_sample = jax.jit(lambda key, score_fn: sampler(key, score_fn)[0], out_shardings=parallel.batch_sharding(mesh))
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
  reference = None
  if len(shape) == 2:  # the first held-out batch, in data space
    reference = np.asarray(next(eval_ds.make_iterator())["image"]).reshape(-1, shape[1])
  num_classes = wrapper.num_classes_of(network)  # a class-conditional network draws sample i of class i mod C
  class_labels = np.arange(shape[0]) % num_classes if num_classes else None

  def snapshot(step: int, state: losses.TrainState) -> str:
    score_fn = wrapper.get_score_fn(sde, network, {"params": state.ema_params},
                                    continuous=config.training.continuous, class_labels=class_labels)
    samples = p_sample(jax.random.fold_in(sample_key, step), score_fn)
    samples = np.asarray(inverse_scaler(multihost_utils.process_allgather(samples, tiled=True)))
    path = workdir / "samples" / f"step_{step}.png"
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      with (workdir / "samples" / f"step_{step}.npz").open("wb") as f:
        np.savez(f, samples=samples)
      if len(shape) == 4:
        visualize.save_image_grid(path, samples)
      else:
        visualize.save_scatter(path, samples, reference=reference)
    non_finite = int(np.sum(~np.all(np.isfinite(samples.reshape(len(samples), -1)), axis=1)))
    logging.info("step %d: %d samples written to %s (%d non-finite).", step, len(samples), path, non_finite)
    return str(path)

  return snapshot
