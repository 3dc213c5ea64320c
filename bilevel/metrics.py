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
