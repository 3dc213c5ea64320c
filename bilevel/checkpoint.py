"""Atomic checkpoints of a run: server state (any PyTree of arrays) plus JSON-able run totals,
the run's metrics.jsonl cut back to the checkpoint on resume (`read_metrics`), and a run's files
kept by the run loop's callbacks (`RunFiles`). A checkpoint is written to a temporary name and
renamed (a kill leaves the old or the new one, never a torn file); restoring needs a template
of the same structure and shapes (the freshly initialised state), else a clear CheckpointError."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

from bilevel.metrics import JsonlWriter, plot_records, process_age_s

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


class RunFiles:
  """A run's files in workdir for loop.run's callbacks: the checkpoint it resumes from (state,
  totals, metrics.jsonl cut back), records appended to metrics.jsonl (earlier wall time added),
  checkpoints (each followed by on_saved()), curves.png; writer=False: nothing written."""

  def __init__(self, workdir: str, state: PyTree, resume: bool, writer: bool = True,
               title: str = "", on_saved: Callable[[], None] | None = None):
    self.workdir, self.writer, self.title = workdir, writer, title
    self.started_s = process_age_s()  # start-up before the first round: imports, data, setup
    self.state, self.earlier, self.totals, self.elapsed = state, [], None, 0.0
    self.on_saved, path = on_saved, os.path.join(workdir, "metrics.jsonl")
    if resume:
      self.state, meta = restore(workdir, state)
      self.earlier = read_metrics(path, meta["round"], rewrite=writer)
      self.totals, self.elapsed = meta["totals"], meta["wall_time_s"]
    self.wall_offset, self.jsonl = self.elapsed, JsonlWriter(path) if writer else None

  def on_record(self, record: dict[str, Any]) -> None:
    record["wall_time_s"] += self.wall_offset
    record["time_to_first_round_s"] = self.started_s + record["first_round_s"]
    self.elapsed = record["wall_time_s"]
    if self.jsonl is not None:
      self.jsonl(record)

  def on_checkpoint(self, state: PyTree, totals: dict[str, Any], done: int) -> None:
    if self.writer:
      save(self.workdir, state, {"round": done, "totals": totals, "wall_time_s": self.elapsed})
    if self.on_saved is not None:
      self.on_saved()

  def close(self, records: list[dict[str, Any]], plot: bool = True) -> list[dict[str, Any]]:
    """Close metrics.jsonl, (plot) draw every record of the run; return them."""
    if self.jsonl is not None:
      self.jsonl.close()
    records = self.earlier + records
    if plot and self.writer and records:
      plot_records([("", [records])], os.path.join(self.workdir, "curves.png"), self.title)
    return records
