"""Results writers: JSON lines, JSON files, plots, summaries over seeds, what a result was
measured on (versions, commit, devices, process age); conversion to Python floats at the writer."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from typing import Any, Mapping, Sequence

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


PLOT_PANELS = (("round", "test_accuracy", "test accuracy"),
               ("cumulative_client_flops", "test_accuracy", "test accuracy"),
               ("round", "hypergrad_norm", "hypergrad norm"),
               ("round", "coverage_x_min", "coverage x min"))


def plot_records(runs: Sequence[tuple[str, Sequence[Sequence[Mapping[str, Any]]]]], path: str,
                 title: str = "", panels: Sequence[tuple[str, str, str]] = PLOT_PANELS) -> None:
  """One PNG (headless backend), a panel per (x key, y key, y label) that the records have: each
  run (label, its seeds' records) as the mean over its seeds at the x values every seed logged,
  with a min-max band when it has several."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  panels = [p for p in panels if any(p[0] in r and p[1] in r for _, seeds in runs
                                     for records in seeds for r in records)]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
  for ax, (xkey, ykey, ylabel) in zip(axes[0], panels):
    for label, seeds in runs:
      curves = [{r[xkey]: r[ykey] for r in records if xkey in r and r.get(ykey) is not None}
                for records in seeds]
      xs = sorted(set.intersection(*(set(c) for c in curves)))
      if xs:
        ys = np.array([[c[x] for x in xs] for c in curves])
        line, = ax.plot(xs, ys.mean(axis=0), marker=".", label=label if len(seeds) == 1
                        else f"{label} (mean of {len(seeds)} seeds)")
        if len(seeds) > 1:
          ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel=xkey.replace("_", " "), ylabel=ylabel,
           yscale="log" if ykey == "hypergrad_norm" else "linear")
    ax.grid(alpha=0.3)
    if xkey == "cumulative_client_flops":
      ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
  if any(label for label, _ in runs):
    axes[0][0].legend(fontsize=8)
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


def commit(path: str) -> dict[str, Any] | None:
  """{"sha", "dirty"} of the git checkout holding path (None outside one)."""
  git = lambda *a: subprocess.run(["git", "-C", path, *a], capture_output=True, text=True,
                                  timeout=60, check=True).stdout.strip()
  try:
    return {"sha": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
  except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
    return None


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
