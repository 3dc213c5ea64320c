"""Atomic checkpoints of a run: server state (any PyTree of arrays) plus JSON-able run totals,
and the run's metrics.jsonl records cut back to the checkpoint on resume (`read_metrics`).

A checkpoint is one `.npz` file written to a temporary name in the same folder and renamed, so a
process killed at any moment leaves either the previous checkpoint or the new one, never a torn
file. Restoring needs a template with the same tree structure (the freshly initialised state),
and fails with a clear message when the structure or shapes differ (a different config).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Mapping

import jax
import numpy as np

PyTree = Any
FILENAME = "checkpoint.npz"


class CheckpointError(ValueError):
  """A checkpoint does not match the run it is restored into, or is unreadable."""


def save(workdir: str, state: PyTree, meta: Mapping[str, Any]) -> str:
  """Write workdir/checkpoint.npz atomically; meta must be JSON-serialisable."""
  leaves, treedef = jax.tree.flatten(jax.device_get(state))
  path = os.path.join(workdir, FILENAME)
  tmp = f"{path}.tmp.{os.getpid()}.npz"
  arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  np.savez(tmp, __meta__=np.frombuffer(json.dumps(
      {"meta": dict(meta), "treedef": str(treedef)}).encode(), dtype=np.uint8), **arrays)
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def exists(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, FILENAME))


def restore(workdir: str, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
  """(state shaped like template, meta) from workdir/checkpoint.npz."""
  path = os.path.join(workdir, FILENAME)
  try:
    with np.load(path) as z:
      header = json.loads(bytes(z["__meta__"]).decode())
      leaves = [z[f"leaf_{i}"] for i in range(len(z.files) - 1)]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # torn, not a zip
    raise CheckpointError(f"cannot read checkpoint {path}: {e}. Delete it to start afresh.") from e
  t_leaves, treedef = jax.tree.flatten(template)
  if header["treedef"] != str(treedef) or len(leaves) != len(t_leaves) or any(
      np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype
      for a, b in zip(leaves, t_leaves)):
    raise CheckpointError(
        f"checkpoint {path} holds a state of another structure or shape than this run's "
        "(a different configuration?). Use a new --workdir, or delete the checkpoint.")
  return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in leaves]), header["meta"]


def read_metrics(path: str, up_to_round: int, rewrite: bool = True) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl with round <= up_to_round, a line torn by a kill and
  anything after it dropped; rewrite: the file is replaced (atomically) by exactly those
  records, so appending continues cleanly."""
  records, lines = [], []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          break
        if not line.endswith("\n") or record.get("round", up_to_round + 1) > up_to_round:
          break
        records.append(record)
        lines.append(line)
  if rewrite:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, path)
  return records
