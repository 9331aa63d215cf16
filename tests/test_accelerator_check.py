"""The prepared device check (experiments/accelerator_check.py) runs on the CPU at --small sizes, so it cannot rot."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _check(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.FAST_COMPILE_FLAGS, PYTHONPATH=str(ROOT))
  out = tmp_path / "table.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.accelerator_check", "--small", "--out", str(out),
                         "--compilation_cache", str(tmp_path / "cache"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # a subprocess compiling an NCSN++ train step
def test_train_step_row_and_json_table(tmp_path):
  table, stdout = _check(tmp_path, "--parts", "train,torch", "--networks", "ncsnpp", "--variants", "float32")
  assert table["device"].endswith("(cpu)") and "part" in stdout and "device peak memory" in stdout
  train, torch = table["rows"]
  assert (train["part"], train["name"], train["setting"], train["batch"]) == ("train", "ncsnpp", "float32", 2)
  assert train["compile_s"] > 0 and train["ms"] > 0 and train["per_s"] > 0 and train["memory_mib"] > 0
  assert torch["part"] == "torch" and torch["note"].startswith("not run")


@pytest.mark.slow  # every part at --small sizes (one network; NCSN++ trains in the test above): about 30 s on 2 cores
def test_every_part_at_small_sizes(tmp_path):
  table, _ = _check(tmp_path, "--networks", "ddpmpp")
  parts = [(r["part"], r["name"], r["setting"]) for r in table["rows"]]
  assert [p for p in parts if p[0] == "train"] == [("train", "ddpmpp", v) for v in ("float32", "bfloat16", "remat")]
  assert sum(p[0] == "sample" for p in parts) == 2 and sum(p[0] == "likelihood" for p in parts) == 2
  assert not any(r["note"].startswith("failed") for r in table["rows"]), table["rows"]
  samples = [r for r in table["rows"] if r["part"] == "sample"]
  assert all(r["nfe"] > 0 and r["per_s"] > 0 for r in samples)
  on_device, host = [r for r in table["rows"] if r["part"] == "likelihood"]
  assert on_device["note"].endswith("x the host loop") and host["nfe"] > 0
