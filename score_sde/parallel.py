"""Devices, meshes, shardings and hosts: the only module that knows about devices.

    parallel.initialize_distributed()             # multi-host runs: before anything touches a device
    mesh = parallel.make_mesh(fsdp=2)              # ("data", "fsdp") over every device of every host
    shardings = parallel.state_sharding(abstract_state, mesh)

Training is `jax.jit` over a `Mesh` of every device of every host, with two axes: ``"data"`` and
``"fsdp"``, of shape (devices / fsdp, fsdp). The batch axis of each batch is sharded over both
axes (every device holds global_batch / devices examples). With ``fsdp = 1`` (the default) the
train state is replicated: pure data parallelism. With ``fsdp = k`` every array of the train state
(parameters, EMA, optimiser moments) is split k ways along its largest dimension that k divides
(replicated when none does), as in fully sharded data parallelism: XLA gathers each parameter
where it is used and reduce-scatters its gradient. The library's maths never names a device axis;
a batch mean is a plain `jnp.mean` over the sharded batch, and XLA inserts the collectives.

Hosts. A multi-host run starts one process per host (or per accelerator) and calls
``initialize_distributed`` first, which wraps ``jax.distributed.initialize``: from explicit
arguments, from ``JAX_COORDINATOR_ADDRESS``, or detected from the launcher (SLURM ``srun`` and
Open MPI ``mpirun`` with more than one task, TPU workers on GKE); ``mode="on"`` leaves every
unset value to JAX's own detection (Cloud TPU VM pod slices, Kubernetes, mpi4py). On CPU the
cross-process collectives are gloo's (``jax_cpu_collectives_implementation``).

Preemption. ``PreemptionNotice`` turns SIGTERM, a scheduler's notice before eviction, into a
decision that every process takes at the same call of the training loop: a SIGTERM handler's
flag, combined over the processes by a one-element all-reduce per call that never stalls the
devices.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODES = ("auto", "on", "off")


# --- Hosts ---------------------------------------------------------------------------------------


def _count(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


# Launchers that ``mode="auto"`` recognises: {name: this process's environment -> number of processes}.
# JAX's own detection then fills in the coordinator, the process count and the process id.
_LAUNCHERS = {
    "SLURM": lambda env: _count(env.get("SLURM_NTASKS")) if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env else 0,
    "Open MPI": lambda env: (_count(env.get("OMPI_COMM_WORLD_SIZE")) if "OMPI_MCA_orte_hnp_uri" in env else 0),
    "Cloud TPU (GKE)": lambda env: len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]),
}


def detect_launcher(environ: dict[str, str] | None = None) -> str | None:
  """The launcher of a multi-process job this process belongs to (a key of ``_LAUNCHERS``), or None."""
  environ = os.environ if environ is None else environ
  return next((name for name, processes in _LAUNCHERS.items() if processes(environ) > 1), None)


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           cluster_detection_method: str | None = None,
                           initialization_timeout: int = 300) -> bool:
  """Joins this process to a multi-process run (``jax.distributed.initialize``), if it is one.

  Call it before anything touches a device. ``mode``:

  * ``"auto"``: initialise when any argument is given, when ``JAX_COORDINATOR_ADDRESS`` is set, or
    when ``detect_launcher`` recognises a multi-process launch; a single process (any number of
    local devices) stays as it is.
  * ``"on"``: always initialise; unset values come from JAX's cluster detection (SLURM, Open MPI,
    Cloud TPU VMs and GKE, Kubernetes with ``jax[k8s]``, ``cluster_detection_method="mpi4py"``).
  * ``"off"``: never (one process).

  Args:
    mode: one of ``MODES``.
    coordinator_address: ``host:port`` of process 0's coordinator, the same for every process.
    num_processes: the number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: the local accelerators this process uses (default: JAX's choice).
    cluster_detection_method: passed to JAX (e.g. ``"mpi4py"``).
    initialization_timeout: seconds to wait for the other processes.

  Returns:
    Whether ``jax.distributed`` is initialised (by this call, or before it).

  Raises:
    ValueError: for an unknown ``mode``, or values JAX refuses (with what to set).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown distributed mode {mode!r}; valid choices: {list(MODES)} (--distributed).")
  if jax.distributed.is_initialized():
    return True
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id,
              "local_device_ids": list(local_device_ids) if local_device_ids else None,
              "cluster_detection_method": cluster_detection_method}
  explicit = {name: value for name, value in explicit.items() if value is not None}
  if mode == "off":
    if explicit:
      raise ValueError(f"--distributed=off contradicts {sorted(explicit)}; drop them or use --distributed=auto.")
    return False
  launcher = detect_launcher()
  if mode == "auto" and not explicit and not os.environ.get("JAX_COORDINATOR_ADDRESS") and launcher is None:
    return False
  try:
    jax.distributed.initialize(initialization_timeout=initialization_timeout, **explicit)
  except ValueError as e:
    raise ValueError(f"jax.distributed.initialize could not find its settings ({e}). Pass --coordinator_address="
                     f"<host of process 0>:<port>, --num_processes and --process_id to every process (or set "
                     f"JAX_COORDINATOR_ADDRESS), or launch under SLURM, Open MPI or a TPU pod slice, whose "
                     f"settings are detected.") from e
  logging.info("jax.distributed: process %d of %d%s, %d local and %d global devices.", jax.process_index(),
               jax.process_count(), f" ({launcher})" if launcher else "", jax.local_device_count(),
               jax.device_count())
  return True


class PreemptionNotice:
  """A SIGTERM (a preemption notice) as a decision every process takes at the same training call.

  Use as a context manager around the loop and ask ``reached()`` once per compiled call, on every
  process::

      with parallel.PreemptionNotice() as notice:
        for ...:
          state, metrics = p_train(...)
          if notice.reached():  # save, then stop

  One process decides at once. Several processes combine their flags with a one-element
  all-reduce per call, dispatched after the call's step and read at the next call (by then it is
  done), so the devices never wait for the host; all of them stop one call after the first
  process that got the signal. The flag is this module's own: JAX's preemption service
  (``multihost_utils.reached_preemption_sync_point``) requires a step counter that grows by one
  per query, which Orbax's own queries with the checkpoint's step break when
  ``n_jitted_steps`` > 1. Its SIGTERM handler is therefore replaced during training.
  """

  def __init__(self):
    self._received = threading.Event()
    self._previous = None
    self._pending = None  # multi-process: the all-reduce of the flags, dispatched at the previous call
    self._reduce, self._sharding = None, None  # built at the first multi-process call

  def __enter__(self) -> PreemptionNotice:
    if threading.current_thread() is threading.main_thread():
      previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._previous = signal.SIG_DFL if previous is None else previous  # None: a handler installed outside Python
    else:
      logging.warning("Training outside the main thread: SIGTERM is not turned into a preemption checkpoint.")
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._received.set()

  def _dispatch(self, flag: bool) -> jax.Array:
    """Starts the all-reduce (max over every device of every process) of this process's flag."""
    if self._reduce is None:
      mesh = Mesh(np.asarray(jax.devices()), ("devices",))
      self._sharding = NamedSharding(mesh, P("devices"))
      self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    local = np.full((jax.local_device_count(),), flag, np.int32)
    return self._reduce(jax.make_array_from_process_local_data(self._sharding, local, (jax.device_count(),)))

  def reached(self) -> bool:
    """Whether every process stops after this call (the same answer on all of them)."""
    if jax.process_count() == 1:
      return self._received.is_set()
    agreed = self._pending is not None and bool(self._pending)
    self._pending = self._dispatch(self._received.is_set())
    return agreed


# --- Meshes and shardings ------------------------------------------------------------------------


def make_mesh(devices: list[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
  """A (devices / fsdp, fsdp) mesh with axes ``("data", "fsdp")``.

  Args:
    devices: the devices, in process-major order (default: every device of every host).
    fsdp: the parameter-sharding factor (``training.fsdp``); it must divide the device count.
  """
  devices = jax.devices() if devices is None else devices
  if int(fsdp) != fsdp or fsdp < 1 or len(devices) % fsdp:
    divisors = [d for d in range(1, len(devices) + 1) if len(devices) % d == 0]
    raise ValueError(f"training.fsdp={fsdp} must divide the number of devices ({len(devices)}, over "
                     f"{jax.process_count()} host(s)); use one of {divisors}, e.g. --config.training.fsdp=1.")
  return Mesh(np.asarray(devices).reshape(len(devices) // int(fsdp), int(fsdp)), (DATA_AXIS, FSDP_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "training.batch_size") -> None:
  """Refuses a global batch that the devices (and hosts) cannot split evenly, before compiling."""
  num_devices = mesh.devices.size
  if batch_size <= 0 or batch_size % num_devices:
    lower = max(num_devices, batch_size // num_devices * num_devices)
    raise ValueError(
        f"{what}={batch_size} is not divisible by the number of devices ({num_devices}, over "
        f"{jax.process_count()} host(s)); use a multiple of {num_devices}, e.g. "
        f"--config.{what}={lower} or {lower + num_devices}.")


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Shards axis ``batch_axis`` over every axis of the mesh (use 1 when axis 0 is ``n_jitted_steps``)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp: int) -> P:
  """The FSDP partition of an array of ``shape``: its largest dimension that ``fsdp`` divides (the last on ties)."""
  if fsdp == 1:
    return P()
  divisible = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not divisible:
    return P()
  _, axis = max(divisible)
  return P(*([None] * axis), FSDP_AXIS)


def state_sharding(tree: Any, mesh: Mesh) -> Any:
  """The ``NamedSharding`` of every leaf of a train state (arrays or ``jax.ShapeDtypeStruct``s).

  Every leaf is split along ``param_spec`` over the mesh's ``"fsdp"`` axis, replicated over
  ``"data"``: parameters, EMA and the optimiser's moments alike (they share shapes); scalars
  (the step, Adam's count) and leaves no factor divides are replicated.
  """
  fsdp = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
  """Assembles each host's share of a batch (numpy pytree) into global, sharded jax Arrays.

  Host h's rows become the h-th block of rows of the global batch (the mesh's devices are in
  process-major order), so a global batch is the same array whatever the number of hosts.

  Args:
    batch: this host's examples; along ``batch_axis`` each leaf holds global_batch / hosts rows.
    mesh: the mesh from ``make_mesh``.
    batch_axis: the axis that holds examples.
  """
  sharding = batch_sharding(mesh, batch_axis)

  def to_global(x):
    x = np.asarray(x)
    global_shape = list(x.shape)
    global_shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

  return jax.tree.map(to_global, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of arrays, the same on every host, on every device of the mesh (of every host)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda index, x=np.asarray(x): x[index]), tree)


# --- Agreement between processes ------------------------------------------------------------------
# Resumable work reads records (files) to skip finished parts. Every process must take the same
# branch, or the collectives of the part one of them runs wait forever for the others: these turn a
# per-process record check into one answer shared by all (each is itself a collective, so call it on
# every process).


def all_processes(flag: bool) -> bool:
  """True on every process if ``flag`` is true on every process, else False on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def process0_says(flag: bool) -> bool:
  """Process 0's ``flag``, on every process (for records that only process 0 writes)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
