"""score_sde: train, sample from and evaluate score-based generative models.

    python main.py --config configs/toy/vp_8gaussians.py --workdir runs/toy --mode train
    python main.py --config configs/vp/digits_unet_continuous.py --workdir runs/digits --mode sample
    python main.py --config configs/toy/vp_8gaussians.py --workdir runs/toy --mode likelihood \
        --config.eval.divergence=exact
    python main.py --config configs/classifier/digits_wrn.py --workdir runs/digits_classifier   # classifier
    python main.py --config configs/vp/digits_unet_continuous.py --workdir runs/digits --mode sample \
        --config.sampling.guidance=classifier --config.sampling.classifier_workdir=runs/digits_classifier

Modes: ``train`` (resumes from the newest checkpoint of the workdir; with
``training.final_evaluation`` it then samples and computes the held-out likelihood), ``eval`` (the
eval loss over the whole split and the likelihood), ``sample``, ``likelihood`` and ``summary``
(the parameter count and the resolved config, without compiling anything), and ``import`` (an
original checkpoint, ``--source``, becomes the workdir's first checkpoint) and ``fid_stats`` (Inception
reference statistics of the data set, to ``eval.fid_stats_path`` or the workdir). Any config field can
be overridden on the command line, e.g. ``--config.training.batch_size=64``.

Many hosts: start the same command in one process per host (or per accelerator); the processes
find each other from the launcher (SLURM, Open MPI, TPU pods on GKE), from ``--distributed=on``
(JAX's own detection, e.g. on Cloud TPU VMs), or from ``--coordinator_address``,
``--num_processes`` and ``--process_id``. Only process 0 writes logs below WARNING, the config,
TensorBoard and pictures. A SIGTERM (preemption notice) during training saves a checkpoint and
exits with status 0; rerunning the command resumes.
"""

from __future__ import annotations

import jax
from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from score_sde import evaluate
from score_sde import parallel
from score_sde import sample_quality
from score_sde import train
from score_sde import validation
from score_sde.models import wrapper

MODES = ("train", "eval", "sample", "likelihood", "summary", "import", "fid_stats")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file (configs/...).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_SOURCE = flags.DEFINE_string("source", None, "--mode=import: a checkpoint of the original implementation (.pth of "
                              "the PyTorch port, an .npz export, or an original JAX checkpoint_<n> file).")
_EVAL_FOLDER = flags.DEFINE_string("eval_folder", "eval", "Folder of the workdir for sample, likelihood and eval "
                                   "outputs.")
# Multi-host set-up (parallel.initialize_distributed); none is needed on a single machine.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", parallel.MODES, "auto: join a multi-process run when the "
                                 "flags below, JAX_COORDINATOR_ADDRESS or the launcher (SLURM, Open MPI, GKE TPU) "
                                 "say there is one; on: always, detecting the settings with JAX (e.g. Cloud TPU VM "
                                 "pod slices); off: one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (every process "
                                   "passes the same).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Local accelerators this process uses, e.g. 0,1.")
flags.mark_flags_as_required(["config"])


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def summary(config) -> int:
  """Prints ``parameters: N`` and the resolved config; returns N (shapes only, nothing compiles)."""
  model = train.build_network(config)
  shapes = wrapper.init_model(jax.random.key(0), model, (1,) + train.example_shape(config), shape_only=True)
  count = wrapper.count_params(shapes["params"])
  name = config.classifier.name if config.training.objective == "classifier" else config.model.name
  _say(f"model: {name}\nparameters: {count}\n\nconfig:\n{config}")
  return count


def _report_likelihood(result) -> None:
  exact = "" if result["exact_mean"] is None else f" (the data's exact density: {result['exact_mean']:.4f} nats)"
  _say(f"likelihood of {len(result['values'])} {result['split']} examples: {result['mean']:.4f} +- "
       f"{result['sem']:.4f} {result['unit']}{exact}\n  per-example values: {result['npz']}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; config fields are set with --config.<field>=<value>.")
  parallel.initialize_distributed(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      local_device_ids=[int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # progress lines come from process 0
  config = _CONFIG.value
  validation.validate(config)
  mode = _MODE.value
  if mode == "summary":
    summary(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError(f"--mode={mode} needs --workdir (the directory of the run).")
  workdir = epath.Path(_WORKDIR.value)
  out_dir = workdir / _EVAL_FOLDER.value

  if mode == "import":
    if not _SOURCE.value:
      raise app.UsageError("--mode=import needs --source=<checkpoint file of the original implementation>.")
    result = train.import_checkpoint(config, workdir, _SOURCE.value)
    _say(f"imported {_SOURCE.value} ({result['parameters']} parameters, step {result['step']}, "
         f"{'with' if result['has_ema'] else 'without'} EMA weights) into {result['checkpoint_dir']}")
    return
  if mode == "train":
    result = train.train(config, workdir)
    if result["preempted"]:
      _say(f"preempted (SIGTERM): saved step {result['step']} in {workdir} and stopped; run the same command to "
           f"resume.")
      return
    _say(f"trained to step {result['step']}: training loss {result['training_loss']}, eval loss "
         f"{result['eval_loss']}\n  checkpoints: {result['checkpoint_dir']}\n  TensorBoard: tensorboard --logdir "
         f"{result['tensorboard_dir']}\n  resolved config: {result['config_path']}")
    if not config.training.final_evaluation:
      return
    mode = "final"
  if mode in ("sample", "final"):
    result = evaluate.sample(config, workdir, out_dir)
    _say(f"{len(result['samples'])} samples ({result['nfe']} score evaluations each, {result['non_finite']} "
         f"non-finite)\n  picture: {result['png']}\n  arrays: {result['npz']}")
  if mode in ("likelihood", "final"):
    _report_likelihood(evaluate.likelihood(config, workdir, out_dir))
  if mode == "eval":
    result = evaluate.evaluate(config, workdir, out_dir)
    for row in result["rows"]:
      _say("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    _say(f"  summary: {result['csv']}, {result['json']}")
  if mode == "fid_stats":
    path = config.eval.fid_stats_path or str(workdir / f"{config.data.dataset.lower().replace('/', '_')}_stats.npz")
    result = sample_quality.fid_stats(config, path)
    _say(f"reference statistics of {result['num_examples']} examples: {result['path']}")


if __name__ == "__main__":
  app.run(main)
