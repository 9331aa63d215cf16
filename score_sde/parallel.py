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
