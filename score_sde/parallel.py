"""Devices, meshes and shardings: the only module that knows about devices.

Training is data-parallel `jax.jit` over a `Mesh` of every device of every host: the batch axis
of each batch is sharded over the mesh axis ``"data"`` and the train state is replicated. The
library's maths never names a device axis; a batch mean is a plain `jnp.mean` over the sharded
batch, and XLA inserts the collectives.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh (``"data"``) over ``devices`` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


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
  """Shards axis ``batch_axis`` over the mesh (use 1 when axis 0 is ``n_jitted_steps``)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
  """Assembles each host's share of a batch (numpy pytree) into global, sharded jax Arrays.

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
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree: Any) -> Any:
  """Brings a pytree of (possibly sharded, fully replicated or addressable) arrays to numpy."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


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
