"""Results writers: JSON lines, JSON files, the log line; conversion to Python floats at the writer."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def to_python(value: Any) -> Any:
  """jax/numpy scalars and arrays -> Python floats, ints and lists (JSON-ready)."""
  if isinstance(value, Mapping):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter:
  """Append one JSON object per line, flushed at once (a killed run loses at most one line)."""

  def __init__(self, path: str):
    self._f = open(path, "a", encoding="utf-8")

  def __call__(self, record: Mapping[str, Any]) -> None:
    self._f.write(json.dumps(record, sort_keys=True) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def write_json(path: str, obj: Mapping[str, Any]) -> None:
  """Write atomically: a temporary file in the same folder, then rename."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(to_python(obj), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


PLOT_PANELS = (("round", "test_accuracy"), ("cumulative_client_flops", "test_accuracy"),
               ("round", "hypergrad_norm"), ("round", "coverage_x_min"))


def plot_records(records: list[Mapping[str, Any]], path: str, title: str = "") -> None:
  """One PNG with the panels of PLOT_PANELS that the records have (headless backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [(a, b) for a, b in PLOT_PANELS if records and a in records[0] and b in records[0]]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  for ax, (xk, yk) in zip(axes[0], panels):
    ax.plot([r[xk] for r in records], [r[yk] for r in records], marker=".")
    ax.set_xlabel(xk.replace("_", " "))
    ax.set_ylabel(yk.replace("_", " "))
    if yk == "hypergrad_norm":
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
