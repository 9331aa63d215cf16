"""Training: score matching on a device mesh, with exact resumption.

    result = train.train(config, workdir)      # trains to config.training.n_iters, or resumes
    sde, model, score_fn, step = train.restore_for_inference(config, workdir)
    sde, classifier, logit_fn, step = train.restore_classifier(config, classifier_workdir)

``training.objective`` picks what is trained: ``score`` (a score network, ``config.model``; with
``model.num_classes`` > 0 class-conditional, with ``training.label_dropout`` for classifier-free
guidance) or ``classifier`` (the noise-conditional classifier of ``config.classifier``, by
cross-entropy on perturbed data; its eval metrics are loss and accuracy). Both see batches of images
and labels and share everything else below.

The loop (Song et al. 2021, ``run_lib.train``) on ``jax.jit`` with a mesh over every device of
every host: the global batch is sharded over the mesh, the train state is replicated (or, with
``training.fsdp = k``, split k ways; see ``parallel``) and donated, and ``training.n_jitted_steps``
optimiser steps run per compiled call. The step's randomness is
``fold_in(key, step)`` of a key fixed by ``config.seed``, so the run is a function of the config
and the step alone: a run resumed from a checkpoint (train state, data-iterator positions and the
running metric sums) repeats, bit for bit, what the uninterrupted run would have done.

Workdir::

    config.json              the resolved config (rewritten on every start; changes are warned about)
    checkpoints/<step>       regular checkpoints (training.snapshot_freq, kept by keep_checkpoints)
    checkpoints-meta/<step>  the newest preemption checkpoint (training.snapshot_freq_for_preemption)
    tensorboard/             scalars training_loss, grad_norm, lr, eval_loss (+ eval_accuracy), skipped_steps (process 0)
    samples/step_<step>.png  snapshot samples (an image grid, or a scatter plot of 2-D data) and .npz

Every step count in logs, files and errors is the train state's step after the update: "step s" is
the update that took the state from s - 1 to s, and its loss is that update's loss.

The data scaler runs on device, inside the compiled step: the pipeline's [0, 1] batches are
sharded as they come, and the affine map fuses into the first layer's input at no cost, for any
mesh and on every host alike (host-side scaling would spend host CPU time on every example).

Training losses stay on the device until a log line, an eval or a checkpoint needs them; then all
of them are checked, so a non-finite loss stops the run (``FloatingPointError`` naming its step)
before anything computed after it is saved, without a device-to-host round trip per step. With
``training.nonfinite = "skip"`` the compiled step drops a non-finite update instead (the state
stays as it was), the checks count the skipped steps, and the run stops only after more than
``training.max_skipped`` of them in a row.

Faults. A SIGTERM (a preemption notice) makes the loop save the step of the call in progress and
return with ``preempted=True``; on many hosts every process stops at the same call
(``parallel.PreemptionNotice``). A checkpoint that cannot be written stops the run with an
``OSError`` naming its directory (``checkpoints``), the earlier checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import logging as logging_lib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from score_sde import checkpoints
from score_sde import datasets
from score_sde import losses
from score_sde import models
from score_sde import parallel
from score_sde import sampling
from score_sde import sde as sde_lib
from score_sde import visualize
from score_sde.models import classifier as classifier_lib
from score_sde.models import wrapper

Array = jax.Array

# What a run trains (``config.training.objective``).
OBJECTIVES = ("score", "classifier")

_FREQS = ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption")

# Sampler options per ``config.sampling.method``: {option of the sampler: key of config.sampling}.
_SAMPLER_OPTIONS = {
    "pc": {"predictor": "predictor", "corrector": "corrector", "snr": "snr", "n_steps": "n_steps_each",
           "probability_flow": "probability_flow", "denoise": "noise_removal", "eps": "eps",
           "num_steps": "num_steps", "step_rule": "step_rule"},
    "ode": {"rtol": "rtol", "atol": "atol", "eps": "eps", "denoise": "noise_removal"},
}


# --- Builders: the config stops here -------------------------------------------------------------


def build_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
  """The SDE ``config.training.sde`` with N = ``model.num_scales`` and its other arguments from ``config.model``."""
  name = config.training.sde.lower()
  if name not in sde_lib.SDES:
    raise ValueError(f"Unknown SDE {config.training.sde!r}; valid choices: {sorted(sde_lib.SDES)}. "
                     f"Set config.training.sde.")
  parameters = inspect.signature(sde_lib.SDES[name]).parameters
  kwargs = {p: config.model[p] for p in parameters if p != "N" and p in config.model}
  return sde_lib.get_sde(name, N=config.model.num_scales, **kwargs)


def build_network(config: ml_collections.ConfigDict):
  """The network of ``config.training.objective``: the score network ``config.model`` or the classifier
  ``config.classifier`` (``models.classifier.get_classifier``)."""
  objective = config.training.objective
  if objective not in OBJECTIVES:
    raise ValueError(f"Unknown training.objective {objective!r}; valid choices: {list(OBJECTIVES)}. Set "
                     f"config.training.objective.")
  return classifier_lib.get_classifier(config) if objective == "classifier" else models.get_model(config)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with warm-up and clipping from ``config.optim`` (``losses.get_optimizer``)."""
  o = config.optim
  return losses.get_optimizer(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay,
                              warmup=o.warmup, grad_clip=o.grad_clip, optimizer=o.optimizer)


def build_sampler(config: ml_collections.ConfigDict, sde: sde_lib.SDE, shape: tuple[int, ...]) -> Callable:
  """The sampler of ``config.sampling`` (method and its options) for batches of ``shape`` (B, ...).

  ``sampling.num_steps = 0`` means ``sde.N`` steps.

  Returns:
    ``sampler(key, score_fn) -> (samples (B, ...), nfe)`` (see ``sampling.get_sampler``).
  """
  method = config.sampling.method
  if method not in _SAMPLER_OPTIONS:
    raise ValueError(f"Training snapshots support sampling.method in {sorted(_SAMPLER_OPTIONS)}, got "
                     f"{method!r}; set config.sampling.method.")
  kwargs = {option: config.sampling[key] for option, key in _SAMPLER_OPTIONS[method].items()}
  if method == "pc":
    kwargs["num_steps"] = kwargs["num_steps"] or None
  return sampling.get_sampler(sde, shape, method=method, **kwargs)


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One example's shape: (2,) for toy sets, else (image_size, image_size, num_channels)."""
  if config.data.dataset.lower() in datasets.TOY_DATASETS:
    return (2,)
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Refuses what cannot run, before any data is read or anything compiles.

  Raises:
    ValueError: for a step frequency that is not a positive multiple of ``n_jitted_steps``, a
      negative ``keep_checkpoints``, fewer steps than one call, or a batch (training, or snapshot
      sampling) that does not divide over the mesh's devices.
  """
  t = config.training
  k = t.n_jitted_steps
  if t.nonfinite not in losses.NONFINITE_POLICIES:
    raise ValueError(f"training.nonfinite={t.nonfinite!r} is not one of {list(losses.NONFINITE_POLICIES)}; set "
                     f"--config.training.nonfinite=stop (stop at a non-finite loss) or skip (drop that update).")
  if t.objective not in OBJECTIVES:
    raise ValueError(f"Unknown training.objective {t.objective!r}; valid choices: {list(OBJECTIVES)}.")
  if t.objective == "classifier" and t.snapshot_sampling:
    raise ValueError("A classifier run has no samples to snapshot; set config.training.snapshot_sampling=False.")
  if int(k) != k or k < 1:
    raise ValueError(f"training.n_jitted_steps must be a positive integer, got {k}.")
  for name in _FREQS:
    value = t[name]
    if int(value) != value or value < 1 or value % k:
      raise ValueError(f"training.{name}={value} must be a positive multiple of training.n_jitted_steps={k} "
                       f"(the loop only stops every {k} steps); use e.g. --config.training.{name}="
                       f"{max(k, value // k * k)}.")
  if t.n_iters < k:
    raise ValueError(f"training.n_iters={t.n_iters} is less than one call of training.n_jitted_steps={k} steps.")
  if int(t.keep_checkpoints) != t.keep_checkpoints or t.keep_checkpoints < 0:
    raise ValueError(f"training.keep_checkpoints must be >= 0 (0 keeps all), got {t.keep_checkpoints}.")
  parallel.check_batch_size(t.batch_size, mesh, "training.batch_size")
  if t.snapshot_sampling:
    parallel.check_batch_size(config.sampling.batch_size, mesh, "sampling.batch_size")


def build_step_fns(config: ml_collections.ConfigDict, sde: sde_lib.SDE, model, example: tuple[int, ...]
                   ) -> tuple[Callable, Callable, Callable]:
  """The pure programs of training, before any sharding: ``(init_state, train_fn, eval_fn)``.

  ``init_state(key) -> TrainState``; ``train_fn(key, state, batch) -> (state, metrics)`` and
  ``eval_fn(key, state, batch) -> {"loss": mean eval loss, ...}`` (a classifier's also
  ``accuracy``) take batches {"image": [0, 1] data (B, *example), "label": int (B,)}, or with a
  leading axis n_jitted_steps, and apply the data scaler themselves. Labels are used by classifiers
  and class-conditional score networks (``model.num_classes`` > 0) and ignored otherwise.
  """
  t = config.training
  optimizer = build_optimizer(config)
  scaler = datasets.get_data_scaler(config.data.centered)
  if t.objective == "classifier":
    build_logit_fn = wrapper.get_logit_fn_builder(sde, model)
    make_loss = lambda train: losses.get_classifier_loss_fn(sde, build_logit_fn, train=train, eps=t.eps)
    labelled = True
  else:
    build_score_fn = wrapper.get_score_fn_builder(sde, model, continuous=t.continuous)
    loss_options = dict(continuous=t.continuous, reduce_mean=t.reduce_mean,
                        likelihood_weighting=t.likelihood_weighting, importance_weighting=t.importance_weighting,
                        eps=t.eps)
    make_loss = lambda train: losses.get_loss_fn(sde, build_score_fn, train=train, **loss_options)
    num_classes = wrapper.num_classes_of(model)
    labelled = num_classes > 0
    if labelled:
      make_loss = lambda train: losses.get_class_conditional_loss_fn(
          lambda builder: losses.get_loss_fn(sde, builder, train=train, **loss_options), build_score_fn,
          num_classes=num_classes, label_dropout=t.label_dropout)
  train_step = losses.get_step_fn(make_loss(True), optimizer, train=True, ema_rate=config.model.ema_rate,
                                  ema_warmup=config.model.ema_warmup, n_jitted_steps=t.n_jitted_steps,
                                  nonfinite=t.nonfinite)
  eval_step = losses.get_step_fn(make_loss(False), optimizer, train=False, n_jitted_steps=t.n_jitted_steps)
  input_shape = (1,) + tuple(example)

  def init_state(key: Array) -> losses.TrainState:
    return losses.init_train_state(wrapper.init_model(key, model, input_shape)["params"], optimizer)

  def inputs(batch: dict[str, Array]) -> Any:
    x = scaler(batch["image"])
    return {"image": x, "label": batch["label"]} if labelled else x

  def train_fn(key: Array, state: losses.TrainState, batch: dict[str, Array]):
    return train_step(key, state, inputs(batch))

  def eval_fn(key: Array, state: losses.TrainState, batch: dict[str, Array]) -> dict[str, Array]:
    return jax.tree.map(jnp.mean, eval_step(key, state, inputs(batch))[1])

  return init_state, train_fn, eval_fn


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


class _QuietOrbax(logging_lib.Filter):
  """Drops Orbax's INFO records (a dozen per save), which would drown the progress lines."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_orbax():
  quiet = _QuietOrbax()
  logging.get_absl_logger().addFilter(quiet)
  try:
    yield
  finally:
    logging.get_absl_logger().removeFilter(quiet)


def _write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """Writes the resolved config to workdir/config.json, warning about keys that changed since the last start."""
  path = workdir / "config.json"
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


# --- Training ------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
          devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Trains (or resumes training) to ``config.training.n_iters`` steps, writing into ``workdir``.

  Args:
    config: the full config (``configs/default.py`` keys).
    workdir: the run's directory (local path or ``etils.epath`` URL); created if missing.
    devices: the devices to train on (default: every device of every host).

  Returns:
    A dict: ``step`` (the final step), ``state`` (the final ``losses.TrainState``), ``history``
    ({"training_loss" | "grad_norm" | "lr" | "eval_loss" (| "eval_accuracy" of a classifier):
    [(step, value), ...]} of this call),
    ``training_loss`` and ``eval_loss`` (the last logged values, or None), ``preempted`` (a SIGTERM
    stopped the run after saving ``step``), ``skipped_steps`` (non-finite steps skipped by this
    call; "skipped_steps" is then also in ``history``, with ``training.nonfinite = "skip"``), the
    paths ``workdir``, ``config_path``, ``tensorboard_dir``, ``checkpoint_dir`` and ``samples``
    (the snapshot PNGs written by this call), and, when a step ran, ``time_to_first_step`` (seconds
    from the call to the end of the first compiled call) and ``steps_per_second`` (after it,
    including logging, evals, checkpoints and snapshots).

  Raises:
    ValueError: for a config that cannot run (before anything compiles), or unusable checkpoints.
    FloatingPointError: when a training loss is not finite (the message names the step), or
      more than ``training.max_skipped`` steps in a row were skipped.
    OSError: when a checkpoint cannot be written (the message names the directory).
  """
  t = config.training
  k = t.n_jitted_steps
  # Mesh, and every check that needs no data and no compilation.
  mesh = parallel.make_mesh(devices, fsdp=t.fsdp)
  check_config(config, mesh)
  last_step = t.n_iters // k * k
  if last_step != t.n_iters:
    logging.warning("training.n_iters=%d is not a multiple of n_jitted_steps=%d; training stops at step %d.",
                    t.n_iters, k, last_step)
  is_host0 = jax.process_index() == 0
  workdir = checkpoints.absolute(workdir)

  # Workdir: the resolved config, TensorBoard (process 0) and the checkpoint series.
  if is_host0:
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
  with _quiet_orbax():
    writer = None
    if is_host0:  # imported here: tensorboardX imports PyTorch when it is installed (seconds), other hosts skip it
      import tensorboardX  # pylint: disable=g-import-not-at-top
      writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    ckpt = checkpoints.Checkpointer(workdir, snapshot_freq=t.snapshot_freq,
                                    preemption_freq=t.snapshot_freq_for_preemption, keep=t.keep_checkpoints)
    try:
      with parallel.PreemptionNotice() as notice:  # SIGTERM: save at the end of the current call, then return
        return _train_loop(config, mesh, workdir, last_step, ckpt, writer, notice)
    finally:
      ckpt.close()  # waits for the saves in flight
      if writer is not None:
        writer.close()


def _train_loop(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: epath.Path, last_step: int,
                ckpt: checkpoints.Checkpointer, writer: Any,
                notice: parallel.PreemptionNotice) -> dict[str, Any]:
  """``train`` after its checks: builds, compiles, resumes and runs the loop (see ``train``)."""
  t = config.training
  k = t.n_jitted_steps
  started = time.perf_counter()

  # SDE, network, optimiser, losses and data.
  sde = build_sde(config)
  model = build_network(config)
  lr_schedule = losses.get_lr_schedule(config.optim.lr, config.optim.warmup)
  train_ds, eval_ds = datasets.get_dataset(config)
  inverse_scaler = datasets.get_data_inverse_scaler(config.data.centered)
  init_state, train_fn, eval_fn = build_step_fns(config, sde, model, tuple(train_ds.element_shape))

  # Keys: one base key per purpose, folded with the step inside the programs.
  replicated = parallel.replicated(mesh)
  init_key, train_key, eval_key, sample_key = jax.jit(  # made on every device (device_put cannot reach other hosts)
      lambda: tuple(jax.random.split(jax.random.key(config.seed), 4)), out_shardings=replicated)()

  # Compiled programs: state replicated, or split over "fsdp" (and donated to the train step), batches
  # sharded over the whole mesh.
  batch_axis = 0 if k == 1 else 1  # with k > 1, axis 0 holds the k batches of one call
  batch_sharding = parallel.batch_sharding(mesh, batch_axis)
  state_shapes = jax.eval_shape(init_state, init_key)
  state_sharding = parallel.state_sharding(state_shapes, mesh)
  p_init = jax.jit(init_state, out_shardings=state_sharding)
  p_train = jax.jit(train_fn, in_shardings=(replicated, state_sharding, batch_sharding),
                    out_shardings=(state_sharding, replicated), donate_argnums=1)
  p_eval = jax.jit(eval_fn, in_shardings=(replicated, state_sharding, batch_sharding), out_shardings=replicated)
  snapshot = None
  if t.snapshot_sampling:
    snapshot = _snapshot_fn(config, sde, model, mesh, sample_key, train_ds, eval_ds, inverse_scaler, workdir)

  # Resume from the newest usable checkpoint, else initialise.
  abstract_state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                state_shapes, state_sharding)
  restored = ckpt.restore_latest(abstract_state)
  if restored is None:
    state, host_state, start = p_init(init_key), {}, 0
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
  history = {name: [] for name in ("training_loss", "grad_norm", "lr", "eval_loss")}
  skip = t.nonfinite == "skip"
  if skip:
    history["skipped_steps"] = []
  skipped_total = 0
  progress = _Progress(last_step)
  last_saved, sample_paths, preempted = (start if restored else None), [], False
  host_state_of = lambda: {"train_data": train_ds.iterator_state(train_it),
                           "eval_data": eval_ds.iterator_state(eval_it), "window": window.to_json()}

  def scalar(name: str, step: int, value: float) -> None:
    history.setdefault(name, []).append((step, value))
    if writer is not None:
      writer.add_scalar(name, value, step)

  for step in range(start + k, last_step + 1, k):
    # One compiled call: k optimiser steps on a sharded global batch.
    batch = parallel.shard_batch(_step_inputs(next(train_it)), mesh, batch_axis)
    state, metrics = p_train(train_key, state, batch)
    window.add(step, metrics)
    if progress.step is None:
      jax.block_until_ready(metrics)
      first_step, first_done = step, time.perf_counter()
      logging.info("Step %d done, %.1f s after the start (compilation included).", step, first_done - started)
      progress.start(step)
    preempted = notice.reached()
    save_due = preempted or step % t.snapshot_freq == 0 or step % t.snapshot_freq_for_preemption == 0
    # Check the losses since the last check before anything is logged or saved.
    if step % t.log_freq == 0 or step % t.eval_freq == 0 or save_due or step == last_step:
      skipped_total += window.check(last_saved, t.max_skipped)
    # Log: window means, steps per second, ETA.
    if step % t.log_freq == 0 or step == last_step:
      means, skipped = window.pop_means()
      loss, grad_norm = means.get("loss", float("nan")), means.get("grad_norm", float("nan"))
      lr = float(lr_schedule(step - 1))
      for name, value in (("training_loss", loss), ("grad_norm", grad_norm), ("lr", lr)):
        scalar(name, step, value)
      skipped_note = ""
      if skip:
        scalar("skipped_steps", step, skipped)
        skipped_note = f", {skipped} step(s) skipped (non-finite)" if skipped else ""
      logging.info("step %d/%d: training_loss %.5g, grad_norm %.4g, lr %.3g%s | %s", step, last_step,
                   loss, grad_norm, lr, skipped_note, progress.line(step))
    # Eval: the EMA's loss (and a classifier's accuracy) on a held-out batch.
    if step % t.eval_freq == 0:
      eval_batch = parallel.shard_batch(_step_inputs(next(eval_it)), mesh, batch_axis)
      eval_metrics = {f"eval_{name}": float(value)
                      for name, value in jax.device_get(p_eval(eval_key, state, eval_batch)).items()}
      for name, value in eval_metrics.items():
        scalar(name, step, value)
      logging.info("step %d: %s", step, ", ".join(f"{name} {value:.5g}" for name, value in eval_metrics.items()))
    # Checkpoints: the regular and preemption series (asynchronous).
    if (save_due or step == last_step) and ckpt.save(step, state, host_state_of(),
                                                     force=preempted or step == last_step):
      last_saved = step
    # Snapshot: samples of the EMA network, as a PNG.
    if snapshot is not None and step % t.snapshot_freq == 0:
      sample_paths.append(snapshot(step, state))
    if preempted:
      ckpt.wait()
      logging.warning("Preemption notice (SIGTERM): saved step %d to %s and stopped; run the same command again "
                      "to resume.", step, ckpt.directory_of(step))
      break
  step = int(jax.device_get(state.step))
  timing = {}
  if progress.step is not None:
    elapsed = time.perf_counter() - first_done
    timing = {"time_to_first_step": first_done - started,
              "steps_per_second": (step - first_step) / elapsed if step > first_step else None}
  last = lambda name: history[name][-1][1] if history[name] else None
  return {"step": step, "state": state, "history": history, "training_loss": last("training_loss"),
          "eval_loss": last("eval_loss"), "preempted": preempted, "skipped_steps": skipped_total,
          "workdir": str(workdir),
          "config_path": str(workdir / "config.json"), "tensorboard_dir": str(workdir / "tensorboard"),
          "checkpoint_dir": str(workdir / checkpoints.REGULAR_DIR), "samples": sample_paths, **timing}


def _step_inputs(element: dict[str, Any]) -> dict[str, Any]:
  """The parts of a pipeline element the train and eval programs take."""
  return {"image": element["image"], "label": element["label"]}


def _snapshot_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, model, mesh: jax.sharding.Mesh,
                 sample_key: Array, train_ds: datasets.Pipeline, eval_ds: datasets.Pipeline, inverse_scaler: Callable,
                 workdir: epath.Path) -> Callable[[int, losses.TrainState], str]:
  """``snapshot(step, state) -> png path``: samples of the EMA network, written by process 0.

  The samples are sharded over the mesh; the key is ``fold_in(sample key of config.seed, step)``.
  Images become a grid, points (D >= 2) a scatter plot over a held-out batch.
  """
  shape = (config.sampling.batch_size,) + tuple(train_ds.element_shape)
  if len(shape) not in (2, 4) or (len(shape) == 2 and shape[1] < 2):
    raise ValueError(f"Snapshot pictures exist for images (H, W, C) and points (D >= 2), not examples of shape "
                     f"{shape[1:]}; set config.training.snapshot_sampling=False.")
  sampler = build_sampler(config, sde, shape)
  p_sample = jax.jit(lambda key, score_fn: sampler(key, score_fn)[0], out_shardings=parallel.batch_sharding(mesh))
  reference = None
  if len(shape) == 2:  # the first held-out batch, in data space
    reference = np.asarray(next(eval_ds.make_iterator())["image"]).reshape(-1, shape[1])
  is_host0 = jax.process_index() == 0

  num_classes = wrapper.num_classes_of(model)  # a class-conditional network draws sample i of class i mod C
  class_labels = np.arange(shape[0]) % num_classes if num_classes else None

  def snapshot(step: int, state: losses.TrainState) -> str:
    score_fn = wrapper.get_score_fn(sde, model, {"params": state.ema_params}, continuous=config.training.continuous,
                                    class_labels=class_labels)
    samples = p_sample(jax.random.fold_in(sample_key, step), score_fn)
    samples = np.asarray(inverse_scaler(multihost_utils.process_allgather(samples, tiled=True)))
    path = workdir / "samples" / f"step_{step}.png"
    if is_host0:
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


# --- Inference -----------------------------------------------------------------------------------------


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
                          step: int | None = None, devices: list[jax.Device] | None = None
                          ) -> tuple[sde_lib.SDE, Any, wrapper.ScoreFunction, int]:
  """The SDE, network and EMA score function of a training run's checkpoint.

  Only the EMA parameters are read (replicated over the mesh of ``devices``).

  Args:
    config: the run's config (shapes must match the checkpoint's).
    workdir: the training run's directory.
    step: the checkpoint's step; None takes the newest one that restores.
    devices: where to place the parameters (default: every device of every host).

  Returns:
    ``(sde, model, score_fn, step)``; ``score_fn(x (B, ...), t (B,))`` is a ``wrapper.ScoreFunction``.
  """
  if config.training.objective != "score":
    raise ValueError(f"{workdir} holds a {config.training.objective} run, not a score model; guide a score model's "
                     f"sampling with it through config.sampling.classifier_workdir, or restore it with "
                     f"train.restore_classifier.")
  sde = build_sde(config)
  model = models.get_model(config)
  replicated = parallel.replicated(parallel.make_mesh(devices))
  shapes = wrapper.init_model(jax.random.key(0), model, (1,) + example_shape(config), shape_only=True)["params"]
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  with _quiet_orbax():
    ema_params, restored_step = checkpoints.restore_ema_params(workdir, abstract, step=step)
  score_fn = wrapper.get_score_fn(sde, model, {"params": ema_params}, continuous=config.training.continuous)
  return sde, model, score_fn, restored_step


def restore_classifier(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, *,
                       step: int | None = None, devices: list[jax.Device] | None = None
                       ) -> tuple[sde_lib.SDE, Any, wrapper.LogitFunction, int]:
  """The SDE, classifier and EMA logit function of a classifier run's checkpoint (``objective="classifier"``).

  Args:
    config: the classifier run's config (shapes must match the checkpoint's).
    workdir: the classifier run's directory.
    step: the checkpoint's step; None takes the newest one that restores.
    devices: where to place the parameters (default: every device of every host).

  Returns:
    ``(sde, classifier, logit_fn, step)``; ``logit_fn(x (B, ...), t (B,)) -> (B, num_classes)``.

  Raises:
    ValueError: for a config whose ``training.objective`` is not ``classifier``.
    FileNotFoundError: for a workdir without checkpoints.
  """
  if config.training.objective != "classifier":
    raise ValueError(f"restore_classifier needs a classifier run's config (training.objective='classifier'), got "
                     f"{config.training.objective!r}.")
  sde = build_sde(config)
  classifier = build_network(config)
  replicated = parallel.replicated(parallel.make_mesh(devices))
  shapes = wrapper.init_model(jax.random.key(0), classifier, (1,) + example_shape(config), shape_only=True)["params"]
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)
  with _quiet_orbax():
    ema_params, restored_step = checkpoints.restore_ema_params(workdir, abstract, step=step)
  return sde, classifier, wrapper.get_logit_fn(sde, classifier, {"params": ema_params}), restored_step


def import_checkpoint(config: ml_collections.ConfigDict, workdir: str | epath.PathLike, source: str, *,
                      devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Writes an original implementation's checkpoint as this framework's first checkpoint of ``workdir``.

  The weights (and EMA weights) are read by ``convert.convert_checkpoint`` (PyTorch-port ``.pth``,
  ``.npz`` exports, original JAX msgpack), strictly: every unknown or missing tensor is an error.
  The optimiser state starts afresh; the step is the checkpoint's. Sampling, likelihood and eval
  modes then read the workdir like a trained run's, and training resumes from it.

  Returns:
    {"step", "has_ema", "checkpoint_dir", "parameters"}.

  Raises:
    ValueError: when ``workdir`` already holds checkpoints (nothing is overwritten), or for
      weights that do not fit the config's network.
  """
  from score_sde import convert  # pylint: disable=g-import-not-at-top  (only this mode needs it)
  workdir = checkpoints.absolute(workdir)
  existing = checkpoints.list_steps(workdir)
  if existing:
    raise ValueError(f"{workdir} already holds checkpoints (steps {existing}); import into an empty workdir.")
  imported = convert.convert_checkpoint(source, config)
  mesh = parallel.make_mesh(devices)
  state = losses.init_train_state(imported["params"], build_optimizer(config))
  state = state.replace(step=jnp.asarray(imported["step"], state.step.dtype),
                        ema_params=jax.tree.map(jnp.asarray, imported["ema_params"]))
  state = parallel.replicate(state, mesh)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
  t = config.training
  with _quiet_orbax():
    ckpt = checkpoints.Checkpointer(workdir, snapshot_freq=t.snapshot_freq,
                                    preemption_freq=t.snapshot_freq_for_preemption, keep=t.keep_checkpoints)
    try:
      ckpt.save(imported["step"], state, {}, force=True)
    finally:
      ckpt.close()
  return {"step": imported["step"], "has_ema": imported["has_ema"], "parameters": wrapper.count_params(state.params),
          "checkpoint_dir": str(workdir / checkpoints.REGULAR_DIR)}
