"""Scale-out on one machine: FSDP over 8 fake devices, two processes under jax.distributed, SIGTERM, kill -9.

Every run is the toy config of ``tests/test_train.py`` in a subprocess (fake CPU devices must be
set before JAX starts; a process joins ``jax.distributed`` once), under a hard timeout so that a
missing peer fails the test instead of hanging the suite. The subprocesses share one persistent
compilation cache, and compile without XLA's backend optimisations (half the compile time; every
comparison is between programs compiled alike).

Tolerances. Two processes with one device each run the same global program as one process with
two devices on the same global batch (the hosts' rows are consecutive blocks of it): the only
cross-device arithmetic is the sum of two partial sums, which is commutative in floating point,
so the parameters are equal bitwise. Parameter sharding (steps 5 and 6 with fsdp = 4 on 8 devices
against 2 devices) reorders float32 sums: 8 partial sums combined by reduce-scatter instead of 2
by all-reduce, so each gradient differs relatively by a few ulps, delta ~ 1e-6. Adam's step
lr * m / (sqrt(v) + eps) is invariant to the gradients' scale, so a relative change delta moves
a parameter by about lr * delta = 1e-9 per step, ~2e-9 over 2 steps to first order; we allow
rtol = 1e-5, atol = 1e-6 (as tests/test_train.py does for 8 devices against 1), which leaves a
factor of ~500 for the steps' dependence on each other.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # left out by the fast command (README, "Tests")

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
TIMEOUT = 240  # seconds for any one group of processes


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _env(cache, devices=1):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Group:
  """Processes of one run, their logs in files, killed (all of them) when the test is done with them."""

  def __init__(self, tmp_path, name, workdir, overrides, *, processes=1, devices=1, cache=None, hang_after=0,
               sigterm_at=0):
    self.out = str(tmp_path / f"{name}.npz")
    port = _free_port()
    self.logs, self.procs = [], []
    for i in range(processes):
      log = open(tmp_path / f"{name}.{i}.log", "w")  # pylint: disable=consider-using-with
      args = [sys.executable, str(WORKER), str(workdir), self.out, "--num_processes", str(processes),
              "--process_id", str(i), "--port", str(port), "--overrides", json.dumps(overrides),
              "--hang_after", str(hang_after), "--sigterm_at", str(sigterm_at)]
      self.procs.append(subprocess.Popen(args, env=_env(cache, devices), cwd=ROOT, stdout=log, stderr=log))
      self.logs.append(log)

  def report(self):
    return "\n".join(pathlib.Path(log.name).read_text()[-3000:] for log in self.logs)

  def kill(self, i=None):
    for j, proc in enumerate(self.procs):
      if i is None or i == j:
        proc.kill()
        proc.wait()

  def wait(self, deadline):
    try:
      for proc in self.procs:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"timed out:\n{self.report()}")
    finally:
      for log in self.logs:
        log.close()
    assert all(p.returncode == 0 for p in self.procs), self.report()
    return dict(np.load(self.out))

  def wait_for(self, paths, deadline):
    while not all(os.path.exists(p) for p in paths):
      if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
        self.kill()
        pytest.fail(f"never reached {paths}:\n{self.report()}")
      time.sleep(0.2)


def _params(result):
  return [result[k] for k in sorted((k for k in result if k.startswith("arr_")), key=lambda k: int(k[4:]))]


OVERRIDES = {"training.snapshot_sampling": False, "training.eval_freq": 1000}

_EIGHT_DEVICES = """
import json
import shutil
import sys
import jax
import numpy as np
from jax.sharding import PartitionSpec as P
from score_sde import train
from tests.test_train import toy_config

assert jax.device_count() == 8, jax.devices()
base, path = json.loads(sys.argv[2]), sys.argv[1]
leaves = lambda result: [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result.state))]
# The reference: one process, two devices, pure data parallelism, 6 steps (checkpoints at 2, 4 and 6).
reference = train.train(toy_config(**base, **{"training.n_iters": 6}), path + "/reference", devices=jax.devices()[:2])
# Its checkpoint of step 4 restores on eight devices with fsdp = 4, which trains steps 5 and 6.
shutil.copytree(path + "/reference", path + "/fsdp")
shutil.rmtree(path + "/fsdp/checkpoints/6")
fsdp = train.train(toy_config(**base, **{"training.fsdp": 4, "training.n_iters": 6}), path + "/fsdp")
assert fsdp.step == 6 and [s for s, _ in fsdp.history["training_loss"]] == [6]
for tree in (fsdp.state.params, fsdp.state.ema_params, fsdp.state.opt_state):
  assert P(None, "fsdp") in {x.sharding.spec for x in jax.tree.leaves(tree)}, tree
kernel = fsdp.state.params["ResidualMLPBlock_0"]["Dense_0"]["kernel"]  # (32, 32): 8 columns per device
assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (32, 8)
last = fsdp.state.params["Dense_1"]  # kernel (32, 2): split along its 32 rows; bias (2,): replicated
assert last["kernel"].sharding.spec == P("fsdp") and last["bias"].sharding.is_fully_replicated
np.savez(path + "/reference.npz", *leaves(reference))
np.savez(path + "/fsdp.npz", *leaves(fsdp))
print("OK")
"""


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, cache):
  """One process with 8 fake devices: the 2-device reference run (6 steps), and steps 5, 6 again with fsdp = 4."""
  path = tmp_path_factory.mktemp("eight")
  run = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(path), json.dumps(OVERRIDES)],
                       env=_env(cache, devices=8), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
  assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-4000:]
  return {name: _params(np.load(path / f"{name}.npz")) for name in ("reference", "fsdp")}


def test_fsdp_restores_a_data_parallel_checkpoint_and_matches_data_parallel(eight_devices):
  for a, b in zip(eight_devices["fsdp"], eight_devices["reference"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_processes_survive_kill_stop_together_and_match_two_devices(tmp_path, cache, eight_devices):
  """Two processes (one device each) under jax.distributed, against one process with two devices.

  1. They are killed -9 (process 1 first) after saving step 4.
  2. Restarted, they resume from step 4; process 1 alone gets SIGTERM during its first call (step 5),
     and both save step 6 (one call later) and exit 0, bitwise equal to the reference's step 6.
  (Training is a function of the config and the step: n_iters = 8 here only sets where it would stop.)
  """
  deadline = time.monotonic() + TIMEOUT
  workdir = tmp_path / "two"
  killed = _Group(tmp_path, "killed", workdir, OVERRIDES, processes=2, cache=cache, hang_after=4)
  killed.wait_for([f"{killed.out}.hang0", f"{killed.out}.hang1"], deadline)
  killed.kill(1)  # one host dies; the scheduler then stops and restarts the whole job
  killed.kill()
  resumed = _Group(tmp_path, "resumed", workdir, OVERRIDES, processes=2, cache=cache, sigterm_at=1).wait(deadline)
  assert resumed["devices"] == 2 and resumed["start"] == 4 and resumed["step"] == 6 and resumed["preempted"]
  for a, b in zip(_params(resumed), eight_devices["reference"], strict=True):
    np.testing.assert_array_equal(a, b)


# --- Set-up, in this process ---------------------------------------------------------------------


def test_param_spec_splits_the_largest_divisible_dimension():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from score_sde import parallel  # pylint: disable=g-import-not-at-top
  assert parallel.param_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert parallel.param_spec((128, 64), 4) == P("fsdp")
  assert parallel.param_spec((6, 10), 4) == P() and parallel.param_spec((), 4) == P()
  assert parallel.param_spec((128, 64), 1) == P()


def test_launchers_are_detected_from_their_environment():
  from score_sde import parallel  # pylint: disable=g-import-not-at-top
  slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
  assert parallel.detect_launcher(slurm) == "SLURM"
  assert parallel.detect_launcher(dict(slurm, SLURM_NTASKS="1")) is None  # one task: a single process
  assert parallel.detect_launcher({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}) \
      == "Open MPI"
  assert parallel.detect_launcher({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}) == "Cloud TPU (GKE)"
  assert parallel.detect_launcher({}) is None


def test_bad_settings_are_refused_with_what_to_set():
  import jax  # pylint: disable=g-import-not-at-top
  from score_sde import parallel  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"valid choices: \['auto', 'on', 'off'\]"):
    parallel.initialize_distributed("yes")
  with pytest.raises(ValueError, match=r"--distributed=off contradicts \['num_processes'\]"):
    parallel.initialize_distributed("off", num_processes=2)
  assert not parallel.initialize_distributed("auto")  # one process, no launcher: nothing to join
  n = jax.device_count()
  with pytest.raises(ValueError, match=rf"training\.fsdp={n + 1} must divide the number of devices \({n},.*"
                                       rf"--config\.training\.fsdp=1"):
    parallel.make_mesh(fsdp=n + 1)
