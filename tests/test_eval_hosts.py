"""Evaluation samples on several hosts and devices: the same samples, whatever runs them.

Each case runs the evaluation's sampling path (``evaluate._sample_program`` drawing uint8 samples,
``sample_quality.sample_features`` with its rounds, files and collectives) in subprocesses: one
process with one device, and two processes on 127.0.0.1 (JAX's CPU collectives) with two devices
each. The features come from a fixed random projection of the pixels
standing in for the Inception network (tests/test_evaluate.py runs the real one), so the cases cost
seconds. The samples must be identical, also in rounds of another size; each host's round files must hold its own rows, which
concatenate to the single-host result; and a round that only one host finished is redone by both
(otherwise the host that skipped it would leave the other waiting in a collective forever).
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers

pytestmark = pytest.mark.slow  # left out by the fast command (README, "Tests")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import os
import sys
import jax
out, pid, nproc, port, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if nproc > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60)
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from configs.vp import digits_unet_continuous
from score_sde import builders, evaluate, models, parallel, sample_quality
from score_sde.models import wrapper

config = digits_unet_continuous.get_config()
config.model.name, config.model.hidden_dims = "mlp", (32,)
config.sampling.num_steps, config.sampling.batch_size = 3, batch
config.eval.num_samples = 10
mesh = parallel.make_mesh()
projection = jax.random.normal(jax.random.key(1), (64, 16))
features = jax.jit(lambda images: (images.reshape(len(images), -1) / 255.0 @ projection,
                                   images.reshape(len(images), -1)[:, :8] / 255.0),
                   out_shardings=(parallel.batch_sharding(mesh),) * 2)
sde = builders.build_sde(config)
model = models.get_model(config)
variables = wrapper.init_model(jax.random.key(0), model, (1,) + builders.example_shape(config))
score_fn = parallel.replicate(wrapper.get_score_fn(sde, model, variables, continuous=True), mesh)
run = evaluate._sample_program(config, sde, mesh, quantised=True)
score_fn_for = lambda first, size: (score_fn, None)
key = jax.random.key(7)
rounds = epath.Path(out) / "rounds"
for attempt in ("first", "again", "redo"):
  if attempt == "redo":  # host 1 (or the only host) loses its file of round 1
    if pid == nproc - 1:
      (rounds / f"round_1_host_{pid}.npz").unlink()
    multihost_utils.sync_global_devices("lost")
  before = {f.name: os.stat(f).st_mtime_ns for f in rounds.iterdir()} if rounds.exists() else {}
  result = sample_quality.sample_features(config, run, score_fn_for, key, mesh, rounds, features)
  result = {k: v for k, v in result.items() if v is not None}
  multihost_utils.sync_global_devices(attempt)
  if pid == 0:
    written = sorted(f.name for f in rounds.iterdir() if before.get(f.name) != os.stat(f).st_mtime_ns)
    np.savez(f"{out}/{attempt}.npz", written=np.array(written, dtype=str), **result)
  multihost_utils.sync_global_devices(attempt + " listed")  # no host touches the files while host 0 lists them
if nproc == 1:  # the same samples in rounds of 2
  config.sampling.batch_size = 2
  run = evaluate._sample_program(config, sde, mesh, quantised=True)
  result = sample_quality.sample_features(config, run, score_fn_for, key, mesh, epath.Path(out) / "rounds_of_2",
                                          features)
  np.savez(f"{out}/batch_2.npz", **{k: v for k, v in result.items() if v is not None})
print("OK", jax.process_count(), jax.device_count())
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out, nproc: int, devices_per_process: int, batch: int) -> list[tuple[subprocess.Popen, pathlib.Path]]:
  """Starts the processes; each one's stdout and stderr go to ``out/log_<pid>.txt``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} {helpers.FAST_COMPILE_FLAGS}")
  port = str(_free_port())
  launched = []
  for p in range(nproc):
    log = pathlib.Path(out) / f"log_{p}.txt"
    with open(log, "w") as stream:
      launched.append((subprocess.Popen([sys.executable, "-c", _WORKER, str(out), str(p), str(nproc), port, str(batch)],
                                        env=env, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, text=True), log))
  return launched


def _finish(launched: list[tuple[subprocess.Popen, pathlib.Path]], timeout: float = 240) -> None:
  """Waits for every process. A process that fails stops the others at once (they would wait for it
  in a collective until the timeout), and the test fails with its output."""
  deadline = time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p, _ in launched]  # every process polled, each time
      if None not in codes or any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    stopped = [p.poll() is None for p, _ in launched]
    for p, _ in launched:
      if p.poll() is None:
        p.kill()
        p.wait()
  # The process that failed first speaks first; those stopped here only waited for it.
  for (p, log), _ in sorted(zip(launched, stopped), key=lambda item: item[1]):
    output = log.read_text()
    assert p.returncode == 0 and "OK" in output, f"process exited with {p.returncode}:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_hosts")
  cases = {"one_device": (1, 1, 4), "two_hosts": (2, 2, 4)}
  for name, (nproc, devices, batch) in cases.items():  # one case at a time: the machine may have 2 cores
    (root / name).mkdir()
    _finish(_launch(root / name, nproc, devices, batch))
  return root


def _load(path):
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def test_samples_do_not_depend_on_devices_or_hosts(runs):
  reference, result = _load(runs / "one_device" / "first.npz"), _load(runs / "two_hosts" / "first.npz")
  assert result["samples"].shape == (10, 8, 8, 1)
  np.testing.assert_array_equal(result["samples"], reference["samples"])
  # The same pixels through the same projection, in batches split differently over devices (which
  # may change the matrix kernel's summation order): float32 rounding of a 64-term sum.
  for name in ("features", "logits"):
    np.testing.assert_allclose(result[name], reference[name], rtol=1e-5, atol=1e-5)


def test_samples_do_not_depend_on_the_batch_size(runs):
  reference, result = _load(runs / "one_device" / "first.npz"), _load(runs / "one_device" / "batch_2.npz")
  np.testing.assert_array_equal(result["samples"], reference["samples"])


def test_each_host_writes_its_own_rows(runs):
  reference = _load(runs / "one_device" / "first.npz")["samples"]
  rows = []
  for r in range(3):  # 10 samples in rounds of 4
    shares = [_load(runs / "two_hosts" / "rounds" / f"round_{r}_host_{p}.npz")["samples"] for p in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]
    rows.append(np.concatenate(shares))
  np.testing.assert_array_equal(np.concatenate(rows)[:10], reference)


def test_finished_rounds_are_loaded_not_recomputed(runs):
  for case in ("one_device", "two_hosts"):
    first, again = _load(runs / case / "first.npz"), _load(runs / case / "again.npz")
    assert len(first["written"]) == 3 * (1 + (case == "two_hosts")) and len(again["written"]) == 0
    for name in ("samples", "features", "logits"):
      np.testing.assert_array_equal(again[name], first[name])


@pytest.mark.parametrize("case", ["one_device", "two_hosts"])
def test_a_round_one_host_lacks_is_redone_by_every_host(runs, case):
  first, redo = _load(runs / case / "first.npz"), _load(runs / case / "redo.npz")
  hosts = (0, 1) if case == "two_hosts" else (0,)
  assert list(redo["written"]) == [f"round_1_host_{p}.npz" for p in hosts]
  for name in ("samples", "features", "logits"):
    np.testing.assert_array_equal(redo[name], first[name])
