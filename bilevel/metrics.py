"""Results writers: JSON lines, JSON files, plots, summaries over seeds, what a result was
measured on (versions, devices, process age); conversion to Python floats at the writer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from typing import Any, Mapping

import numpy as np

_LOADED_AT = time.perf_counter()


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


def combine_summaries(summaries: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
  """One summary over seeds {seed: summary}: mean, std (ddof 1; 0 for one seed), min and max of
  every numeric figure that every seed has; text fields shared by all seeds; each seed's."""
  first = next(iter(summaries.values()))
  values = {k: np.array([float(s[k]) for s in summaries.values()]) for k, v in first.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(isinstance(s.get(k), (int, float)) for s in summaries.values())}
  shared = {k: v for k, v in first.items() if k not in values and
            all(s.get(k) == v for s in summaries.values())}
  return dict(shared, seeds=list(summaries), num_seeds=len(summaries),
              mean={k: float(v.mean()) for k, v in values.items()},
              std={k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
              min={k: float(v.min()) for k, v in values.items()},
              max={k: float(v.max()) for k, v in values.items()},
              per_seed={str(s): dict(v) for s, v in summaries.items()})


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "optax", "flax", "chex", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "missing"
  return out


def device_info() -> dict[str, Any]:
  import jax  # imported late so JAX_PLATFORMS set by a caller takes effect
  devices = jax.devices()
  return dict(platform=devices[0].platform, device_kind=devices[0].device_kind,
              count=len(devices))


def process_age_s() -> float:
  """Seconds since this process started (Linux /proc; else since this module loaded)."""
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as f:
      return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _LOADED_AT


def run_summary(last: Mapping[str, Any], *keys: str, **fields: Any) -> dict[str, Any]:
  """A run's summary from its last record: `fields`, what every task reports, `keys` of it."""
  return dict(
      **fields, rounds=last["round"], wall_time_s=last["wall_time_s"],
      first_round_s=last["first_round_s"], time_to_first_round_s=last["time_to_first_round_s"],
      min_coverage_x=last["cx_star"], min_coverage_y=last["cy_star"],
      final_outer_loss=last["outer_loss"], final_inner_loss=last["inner_loss"],
      final_hypergrad_norm=last["hypergrad_norm"], **{k: last[k] for k in (
          "test_accuracy", "test_loss", "cumulative_client_flops", "cumulative_comm_bytes") + keys})
