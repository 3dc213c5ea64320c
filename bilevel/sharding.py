"""Device placement of a round: the client mesh (GSPMD partitions the vmapped clients, the
server's sums become cross-device sums), replicated arguments, the sharded client axis; the
writer process and barriers of a multi-process run; whether an accelerator may be used."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


def client_mesh(num_devices: int | None = None, axis: str = "clients") -> Mesh:
  """A 1-D mesh over the first num_devices devices (all by default) with an Auto client axis
  (multi-host: after jax.distributed.initialize(), every host's devices; BENCHMARKS.md)."""
  devices = jax.devices()[: num_devices or len(jax.devices())]
  return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """tree placed whole on every device of mesh (unchanged without a mesh): do it once for the
  data and state, or every sharded call copies them to each device (BENCHMARKS.md)."""
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


def is_writer() -> bool:
  """True in the one process that writes results (process 0)."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across the processes of a multi-process run (nothing otherwise)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def accelerator_possible() -> bool:
  """Whether JAX may run on an accelerator, without starting it: JAX_PLATFORMS names one, or it
  is unset and an accelerator plugin or libtpu is installed."""
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return any(p != "cpu" for p in platforms)
  return bool(importlib.metadata.entry_points(group="jax_plugins")) or any(
      importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))
