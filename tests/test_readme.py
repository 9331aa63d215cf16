"""The README cannot rot: every shell command it shows runs, in README order, on tiny settings.

Each ``python main.py ...`` line of the README's ``bash`` blocks runs from a temporary directory
that stands in for the checkout (its own ``runs/``), with overrides for steps and sizes appended
(absl takes the last value of a flag). The few commands that need what a test machine lacks (a
cluster launcher, downloaded weights or data, a nested test run) are listed in ``NOT_RUN`` with the
reason; every README command is either run or listed, and every listed entry must still be in the
README, so a new command is run as soon as it is written.
"""

import os
import pathlib
import re
import shlex

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Commands that cannot run here: {a substring of the command: why}.
NOT_RUN = {
    "python -m pytest": "the test suite itself",
    "srun ": "a SLURM cluster",
    "gcloud compute tpus": "a Cloud TPU pod slice",
    "--source checkpoint_24.pth": "a published checkpoint, downloaded by the user",
    "--workdir runs/ncsnpp --mode": "the imported CIFAR-10 checkpoint and the FID Inception weights",
}

_TOY = ("--config.training.n_iters=20", "--config.training.n_jitted_steps=2", "--config.training.log_freq=10",
        "--config.training.eval_freq=10", "--config.training.snapshot_freq=20",
        "--config.training.snapshot_freq_for_preemption=10", "--config.training.batch_size=64",
        "--config.model.hidden_dims=(32,32)", "--config.classifier.hidden_dims=(16,16)",
        "--config.sampling.num_steps=20", "--config.sampling.batch_size=50", "--config.eval.num_samples=50",
        "--config.eval.batch_size=50", "--config.eval.likelihood_examples=50", "--config.data.num_train=1000")
_DIGITS = ("--config.training.n_iters=4", "--config.training.n_jitted_steps=1", "--config.training.log_freq=2",
           "--config.training.eval_freq=2", "--config.training.snapshot_freq=4",
           "--config.training.snapshot_freq_for_preemption=2", "--config.training.batch_size=16",
           "--config.model.name=mlp", "--config.model.hidden_dims=(32,)", "--config.sampling.num_steps=10",
           "--config.sampling.batch_size=20", "--config.eval.num_samples=20", "--config.eval.batch_size=64",
           "--config.eval.likelihood_examples=64", "--config.eval.rtol=1e-2", "--config.eval.atol=1e-2",
           "--config.sampling.rtol=1e-2", "--config.sampling.atol=1e-2")
TINY = {"configs/toy/": _TOY, "configs/classifier/toy_": _TOY, "configs/vp/digits": _DIGITS,
        "configs/dequantizer/digits": _DIGITS + ("--config.dequantizer.features=8",)}


def readme_commands() -> list[str]:
  """The README's shell commands, one per line of its bash blocks (continuations joined, comments dropped)."""
  text = (ROOT / "README.md").read_text()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
      line = re.sub(r"\s+#.*$", "", line).strip()
      if line.startswith("python3 -m venv"):  # the set-up of a fresh machine (venv, install), then the command
        line = line.split(" && ")[-1]
      if line:
        commands.append(line)
  return commands


def _not_run(command: str) -> str | None:
  return next((key for key in NOT_RUN if key in command), None)


def test_every_readme_command_is_run_or_listed_with_a_reason():
  commands = readme_commands()
  assert len(commands) > 10
  for command in commands:
    assert _not_run(command) or command.startswith("python main.py "), command
  for key in NOT_RUN:
    assert any(key in command for command in commands), f"NOT_RUN lists {key!r}, which the README no longer has"


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
  (tmp_path / "main.py").symlink_to(ROOT / "main.py")
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  commands, argvs = [], []
  for command in readme_commands():
    if _not_run(command):
      continue
    args = shlex.split(command)
    config = next(a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                  if a.startswith("--config") and not a.startswith("--config."))
    tiny = next((overrides for prefix, overrides in TINY.items() if config.startswith(prefix)), ())
    if "--mode" in args and args[args.index("--mode") + 1] == "summary":
      tiny = ()
    commands.append(command)
    argvs.append([*args[2:], *tiny])
  assert len(commands) >= 12
  # One compilation cache for every workdir (main.py's "auto" reads the variable), so a program compiles once.
  env = dict(os.environ, XLA_FLAGS=helpers.FAST_COMPILE_FLAGS, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  results = list(helpers.run_entry_point({str(i): argv for i, argv in enumerate(argvs)}, cwd=tmp_path, env=env,
                                         stop_on_failure=True, timeout=900).values())
  for command, result in zip(commands, results):
    assert result["code"] == 0, f"{command}\n{result['stderr'][-3000:]}"
  assert len(results) == len(commands)
