"""Device placement of a round: the client mesh, replicated arguments, the sharded client axis.

A round's sampled clients can be spread over the devices of a 1-D mesh (GSPMD partitions the
vmapped clients; the server's sums become cross-device sums). The data and the server state are
placed whole on every device once (`replicate`), so no call copies them again.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


def client_mesh(num_devices: int | None = None, axis: str = "clients") -> Mesh:
  """A 1-D mesh over the first num_devices devices (all by default) with an Auto client axis.

  Multi-host: call jax.distributed.initialize() first on every host; jax.devices() then lists
  every host's devices and the same program runs on each (see BENCHMARKS.md).
  """
  devices = jax.devices()[: num_devices or len(jax.devices())]
  return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """tree placed whole on every device of mesh (unchanged without a mesh).

  Place the population data and the server state this way once before running sharded rounds:
  an argument that lives on one device is copied to every device of the mesh on every call
  (with 2 CPU devices that halved the main job's rounds per second; BENCHMARKS.md).
  """
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def client_sharding(mesh: Mesh | None, axis: str) -> Callable[[PyTree], PyTree]:
  """Constrain the leading (client) axis of every leaf to the mesh axis (identity without mesh)."""
  if mesh is None:
    return lambda t: t

  def constrain(t):
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
        a, NamedSharding(mesh, PartitionSpec(axis, *([None] * (a.ndim - 1))))), t)

  return constrain
