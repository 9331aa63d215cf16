"""score_sde: train, sample from and evaluate score-based generative models.

    python main.py --config configs/toy/vp_8gaussians.py --workdir runs/toy                  # train
    python main.py --config configs/toy/vp_8gaussians.py --workdir runs/toy --mode sample \
        --config.sampling.method=unipc --config.sampling.nfe=10
    python main.py --config configs/vp/digits_unet_continuous.py --mode summary

Modes: ``train`` (resumes from the newest checkpoint; with ``training.final_evaluation`` it then
samples and computes the held-out likelihood), ``sample``, ``likelihood``, ``eval`` (every checkpoint:
eval loss, likelihood, samples and their quality, for each sampler of ``eval.samplers``), ``summary``
(parameters and the resolved config, nothing compiled; with ``--memory`` / ``--memory_gb`` also the compiled train
step's memory per device), ``import`` (an original checkpoint,
``--source``, becomes the workdir's first checkpoint) and ``fid_stats``. Any config field can be
overridden, e.g. ``--config.training.batch_size=64``. A mistake in the command, the config or the
files it names is reported in a few lines and a non-zero exit status (``--show_traceback`` for the
traceback). Many hosts: the README's "Launching on many devices and hosts".
"""

from __future__ import annotations

import difflib
import logging as logging_lib
import pathlib
import runpy
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from score_sde import builders
from score_sde import checkpoints
from score_sde import compilation_cache
from score_sde import convert
from score_sde import evaluate
from score_sde import memory
from score_sde import parallel
from score_sde import sample_quality
from score_sde import train
from score_sde import xla_cpu
from score_sde.models import wrapper

MODES = ("train", "eval", "sample", "likelihood", "summary", "import", "fid_stats")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Configuration file (configs/...).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_SOURCE = flags.DEFINE_string("source", None, "--mode=import: a checkpoint of the original implementation (.pth of "
                              "the PyTorch port, an .npz export, or an original JAX checkpoint_<n> file).")
_EVAL_FOLDER = flags.DEFINE_string("eval_folder", "eval", "Folder of the workdir for sample, likelihood and eval "
                                   "outputs.")
_TAG = flags.DEFINE_string("tag", None, "--mode=sample / likelihood: names the output files (default: the "
                           "sampler or likelihood setting).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", compilation_cache.AUTO, "Where compiled programs are kept for later launches: auto "
    "($JAX_COMPILATION_CACHE_DIR if set, else <workdir>/compilation_cache), a folder (shared by the hosts of a run), "
    "or off.")
_MEMORY = flags.DEFINE_bool("memory", False, "--mode=summary: also compile the train step (without running it) and "
                            "print its memory per device, with and without model.remat and model.dtype=bfloat16 "
                            "(seconds for small networks, minutes for the paper's on a CPU).")
_MEMORY_GB = flags.DEFINE_float("memory_gb", None, "--mode=summary: also find the largest per-device batch whose "
                                "train step fits in this many GiB per device (implies --memory; a few more "
                                "compilations).")
_SHOW_TRACEBACK = flags.DEFINE_bool("show_traceback", False, "Show the traceback of an error in the command, the "
                                    "config or its files, instead of the short message.")
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

# Errors of the command, the config or the files it names: a short message, no traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, TimeoutError, ImportError, app.UsageError)


class UserError(Exception):
  """A mistake in the command line, reported as its message alone."""


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# --- Reading the command line ------------------------------------------------------------------------


def _config_path(argv: list[str]) -> str | None:
  """The value of the last ``--config`` flag (absl's), or None."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _missing_config_file(path: str) -> str:
  """The message for a config file that does not exist, with the nearest shipped config."""
  shipped = [str(p) for p in pathlib.Path("configs").rglob("*.py") if not p.name.startswith("_")]
  near = difflib.get_close_matches(path, shipped, n=1, cutoff=0.6)
  return (f"config file {path} does not exist{f'; did you mean {near[0]}?' if near else '.'} Pass a file under "
          f"configs/ (e.g. --config=configs/toy/vp_8gaussians.py).")


def _unknown_override(argv: list[str]) -> str | None:
  """The message for the first ``--config.<field>`` override that names no field of the config."""
  path = _config_path(argv)
  if not path or not pathlib.Path(path).is_file():
    return None
  config = runpy.run_path(path)["get_config"]()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    field = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in field.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        near = difflib.get_close_matches(part, keys, n=1)
        suggestion = f"; did you mean {'.'.join(walked + [near[0]])}?" if near else ""
        return (f"unknown config field {field}{suggestion} (the fields and their defaults are in configs/default.py"
                f"; `--mode summary` lists this config's).")
      node, walked = node[part], walked + [part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with the command-line mistakes turned into ``UserError``s."""
  path = _config_path(argv)
  if path and ":" not in path and not pathlib.Path(path).is_file():
    raise UserError(_missing_config_file(path))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(f"{e}\nSee `python main.py --helpshort` for the flags.") from e
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = _unknown_override(argv)
    raise UserError(message or f"the config override could not be applied: {e}") from e


# --- Modes ---------------------------------------------------------------------------------------------


def summary(config, *, memory_report: bool = False, memory_gb: float | None = None) -> int:
  """Prints ``parameters: N`` and the resolved config; returns N (shapes only, nothing compiles).

  With ``memory_report`` (or ``memory_gb``) it then compiles the train step for the configured global batch
  on this process's devices and prints its memory per device (``score_sde.memory``), and with
  ``memory_gb`` the largest per-device batch that fits in that many GiB.
  """
  network = builders.build_network(config)
  count = wrapper.count_params(builders.abstract_params(network, builders.example_shape(config)))
  name = {"classifier": config.classifier.name, "dequantizer": "variational dequantizer"}.get(
      config.training.objective, config.model.name)
  _say(f"model: {name}\nparameters: {count}\n\nconfig:\n{config}")
  if memory_report or memory_gb is not None:
    if memory_gb is not None and memory_gb <= 0:
      raise UserError(f"--memory_gb={memory_gb} must be positive (GiB per device).")
    mesh = parallel.make_mesh(fsdp=config.training.fsdp)
    parallel.check_batch_size(config.training.batch_size, mesh, "training.batch_size")
    rows = memory.variant_memory(config, mesh)
    largest = None
    if memory_gb is not None:
      largest, _ = memory.largest_batch(config, mesh, int(memory_gb * 2**30), known=rows[0])
    _say("\n" + memory.format_report(rows, limit_gb=memory_gb, largest=largest))
  return count


def _report_likelihood(result) -> None:
  """The likelihood table: one row per estimator and dequantiser, with the settings that change the number."""
  e = result["settings"]["eval"]
  ode = f"divergence {e['divergence']}, rtol {e['rtol']:g}, atol {e['atol']:g}"
  bound = f"{e['bound_time_samples']} time sample(s), {e['bound_decoder']} decoder"
  settings = [f"eps {e['eps']:g}"] + [{"ode": ode, "bound": bound}[est] for est in e["likelihood_estimators"]]
  if result["unit"] == "bits/dim":
    settings.append(f"{e['importance_samples']} dequantiser sample(s) per image")
  source = f" ({result['source']})" if result.get("source") else ""
  kept = " (kept from an earlier run with these settings)" if result.get("kept") else ""
  value = "bits/dim" if result["unit"] == "bits/dim" else "log p (nats)"
  lines = [f"likelihood of {len(result['values'])} {result['split']} examples{source} at step {result['step']}"
           f"{kept}; {'; '.join(settings)}",
           f"  {'estimator':<10}{'dequantizer':<18}{value:>13}{'s.e.':>9}{'vs first':>11}{'s.e.':>9}"
           f"{'NFE/example':>13}{'examples/s':>12}"]
  firsts = {}
  for row in result["rows"]:
    first = firsts.setdefault(row["estimator"], row) is row  # the estimator's first dequantiser: the baseline
    versus = f"{'':>11}{'':>9}" if first else f"{row['difference']:>+11.4f}{row['difference_sem']:>9.4f}"
    lines.append(f"  {row['estimator']:<10}{row['dequantizer'] or '-':<18}{row['mean']:>13.4f}{row['sem']:>9.4f}"
                 f"{versus}{row['nfe']:>13.1f}{row['examples_per_second']:>12.1f}")
  if result["exact_mean"] is not None:
    lines.append(f"  the data's exact density: {result['exact_mean']:.4f} nats")
  if len(result["rows"]) > 1:
    lines.append("  vs first: the paired difference to the estimator's first dequantiser on the same examples and "
                 "noise, with its standard error")
  lines.append(f"  per-example values: {result['npz']}")
  _say("\n".join(lines))


def _report_samples(result) -> None:
  kept = " (kept from an earlier run with these settings)" if result.get("kept") else ""
  _say(f"{len(result['samples'])} samples ({result['nfe']} score evaluations each, {result['non_finite']} "
       f"non-finite){kept}\n  picture: {result['png']}\n  arrays: {result['npz']}")


def _workdir(mode: str) -> epath.Path:
  if not _WORKDIR.value:
    raise UserError(f"--mode={mode} needs --workdir (the directory of the run).")
  workdir = epath.Path(_WORKDIR.value)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a directory; pass a directory for the run.")
  waits = mode == "eval" and _CONFIG.value.eval.wait_timeout > 0
  if mode not in ("train", "import") and not waits and not checkpoints.list_steps(workdir):
    raise UserError(f"--workdir {workdir} holds no checkpoint, so there is nothing to {mode}; train there first "
                    f"(--mode=train), import a checkpoint (--mode=import), or pass the workdir of a trained run.")
  return workdir


def run(mode: str, config) -> None:
  """Runs ``mode`` on ``config``."""
  if _COMPILATION_CACHE.value == compilation_cache.OFF:
    compilation_cache.configure(compilation_cache.OFF)  # before the checks compile their first small programs
  builders.validate(config)
  if mode in ("summary", "fid_stats"):
    compilation_cache.configure(_COMPILATION_CACHE.value, _WORKDIR.value)
  if mode == "summary":
    summary(config, memory_report=_MEMORY.value, memory_gb=_MEMORY_GB.value)
    return
  if mode == "fid_stats":
    path = config.eval.fid_stats_path or str(epath.Path(_WORKDIR.value or ".") /
                                             f"{config.data.dataset.lower().replace('/', '_')}_stats.npz")
    result = sample_quality.fid_stats(config, path)
    _say(f"reference statistics of {result['num_examples']} examples: {result['path']}")
    return
  workdir = _workdir(mode)
  compilation_cache.configure(_COMPILATION_CACHE.value, workdir)  # before anything compiles
  out_dir = workdir / _EVAL_FOLDER.value
  if mode == "import":
    if not _SOURCE.value:
      raise UserError("--mode=import needs --source=<checkpoint file of the original implementation>.")
    result = convert.import_checkpoint(config, workdir, _SOURCE.value)
    _say(f"imported {_SOURCE.value} ({result['parameters']} parameters, step {result['step']}, "
         f"{'with' if result['has_ema'] else 'without'} EMA weights) into {result['checkpoint_dir']}")
    return
  if mode == "train":
    result = train.train(config, workdir)
    if result.preempted:
      _say(f"preempted (SIGTERM): saved step {result.step} in {workdir} and stopped; run the same command to "
           f"resume.")
      return
    _say(f"trained to step {result.step}: training loss {result.training_loss}, eval loss {result.eval_loss}\n"
         f"  checkpoints: {result.checkpoint_dir}\n  TensorBoard: tensorboard --logdir {result.tensorboard_dir}\n"
         f"  resolved config: {result.config_path}")
    if not config.training.final_evaluation:
      return
  if mode in ("sample", "train"):
    _report_samples(evaluate.sample(config, workdir, out_dir, tag=_TAG.value))
  if mode in ("likelihood", "train"):
    _report_likelihood(evaluate.likelihood(config, workdir, out_dir, tag=_TAG.value))
  if mode == "eval":
    result = evaluate.evaluate(config, workdir, out_dir)
    for row in result["rows"]:
      _say("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    _say(f"  summary: {result['csv']}, {result['json']}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; config fields are set with --config.<field>=<value>.")
  # Quiet normal runs: JAX's probe of absent backends, and Orbax's INFO records.
  logging_lib.getLogger("jax._src.xla_bridge").setLevel(logging_lib.WARNING)
  logging.get_absl_logger().addFilter(checkpoints.QuietOrbax())
  parallel.initialize_distributed(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      local_device_ids=[int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # progress lines come from process 0
  try:
    config = _CONFIG.value
  except OSError as e:
    raise UserError(_missing_config_file(_config_path(sys.argv) or "?")) from e
  run(_MODE.value, config)


def _exit_with_message(error: BaseException) -> None:
  """Prints ``error`` as a short paragraph on stderr and exits with status 2 (command line) or 1."""
  print(f"error: {error}\n(--show_traceback shows where it was raised)", file=sys.stderr, flush=True)
  sys.exit(2 if isinstance(error, (UserError, app.UsageError)) else 1)


def entry_point() -> None:
  """``app.run(main)`` with user errors reported in a few lines."""
  xla_cpu.configure()
  show = "--show_traceback" in sys.argv or "--show_traceback=true" in [a.lower() for a in sys.argv]

  def parser(argv: list[str]) -> list[str]:
    try:
      return parse_flags(argv)
    except UserError as e:
      if show:
        raise
      _exit_with_message(e)

  def guarded_main(argv: list[str]) -> None:
    try:
      main(argv)
    except (UserError, *USER_ERRORS) as e:
      if _SHOW_TRACEBACK.value:
        raise
      _exit_with_message(e)

  app.run(guarded_main, flags_parser=parser)


if __name__ == "__main__":
  entry_point()
