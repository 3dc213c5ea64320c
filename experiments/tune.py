"""One tuning protocol for every algorithm: the same grid, selection on held-out training data.

  python -m experiments.tune --task=hyper_representation --algorithm=rafbo --workdir=runs/tune

Every point of the task's grid (GRIDS, the same for every algorithm; outer_lr x inner_lr x v_lr,
v_lr being the series step of the Neumann algorithms) runs the task driver in a fresh process
with --eval_split=holdout (a class-stratified share of the training data stands in for the test
set, which is never read) over --seeds on every partition of --tune_partitions. A point scores
its worst partition's mean held-out accuracy, so one flagfile serves every partition
(docs/method.md, section 7). Selection is the one-standard-error rule (`select`); a point where
any seed diverged is never chosen. The chosen steps are written as a flagfile
(experiments/presets/TASK_ALGORITHM.cfg by default) and every point's mean, std, per-seed
accuracy and cost in seconds to WORKDIR/summary.json.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags

from experiments import common

TASK = flags.DEFINE_enum("task", "hyper_representation", ["hyper_representation",
                                                          "hyper_cleaning"], "Task driver.")
GRID_OUTER = flags.DEFINE_list("grid_outer_lr", None, "outer_lr values (default: GRIDS[task]).")
GRID_INNER = flags.DEFINE_list("grid_inner_lr", None, "inner_lr values (default: GRIDS[task]).")
GRID_V = flags.DEFINE_list("grid_v_lr", None, "v_lr values: v step or Neumann step (default: "
                           "GRIDS[task]).")
PARTITIONS = flags.DEFINE_list(
    "tune_partitions", ["iid", "dirichlet:0.1"],
    "Data partitions every grid point runs on: iid, shards, or dirichlet:ALPHA; a point scores "
    "its worst partition's mean held-out accuracy.")
PRESET_OUT = flags.DEFINE_string("preset_out", None, "Flagfile to write (default "
                                 "experiments/presets/TASK_ALGORITHM.cfg).")
# --seeds (common.py): every point's seeds, passed on to the driver (at least 2; default below).
# --driver_flags (common.py): further flags passed to every driver run.
DEFAULT_SEEDS = ["0", "1"]
EXTRA = common.DRIVER_FLAGS

# The one grid per task: each step at the task's hand-set default (task 1: 0.1 everywhere; task
# 2: outer 30, inner 0.05, v 0.05) and about a third of it, 8 points. It looks downward only: 3x
# larger outer steps (task 1: 0.3) blew up on some seeds and never won by more than the seed
# noise in a 12-point trial (docs/method.md, 7).
GRIDS = {
    "hyper_representation": dict(outer_lr=(0.03, 0.1), inner_lr=(0.03, 0.1), v_lr=(0.03, 0.1)),
    "hyper_cleaning": dict(outer_lr=(10.0, 30.0), inner_lr=(0.02, 0.05), v_lr=(0.02, 0.05)),
}
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
# Flags the driver gets from tune itself; --driver_flags must not set them.
_OWN_FLAGS = ("outer_lr", "inner_lr", "v_lr", "seeds", "seed", "workdir", "eval_split",
              "algorithm", "partition", "alpha")


def partitions() -> dict[str, dict[str, Any]]:
  """--tune_partitions as {name: the driver flags that select it}."""
  out = {}
  for item in PARTITIONS.value:
    scheme, _, alpha = item.partition(":")
    if scheme in ("iid", "shards") and not alpha:
      out[scheme] = dict(partition=scheme)
    elif scheme == "dirichlet":
      try:
        value = float(alpha)
        assert value > 0
      except (ValueError, AssertionError):
        common.fail(f"--tune_partitions: {item!r} needs a concentration > 0, e.g. dirichlet:0.1.")
      out[f"dirichlet{value:g}"] = dict(partition="dirichlet", alpha=value)
    else:
      common.fail(f"--tune_partitions: {item!r} is not iid, shards or dirichlet:ALPHA.")
  if not out:
    common.fail("--tune_partitions is empty.")
  return out


def grid() -> dict[str, tuple[float, ...]]:
  out = {}
  for name, flag in (("outer_lr", GRID_OUTER), ("inner_lr", GRID_INNER), ("v_lr", GRID_V)):
    try:
      values = tuple(float(v) for v in flag.value) if flag.value else GRIDS[TASK.value][name]
    except ValueError:
      common.fail(f"--grid_{name}={','.join(flag.value)} must be a list of numbers.")
    if not values or min(values) <= 0:
      common.fail(f"--grid_{name} must hold numbers > 0; got {list(values)}.")
    out[name] = values
  return out


def combine_partitions(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """A point's score from its runs on each partition: the worst partition's mean held-out
  accuracy and that partition's std (None if a run on any partition diverged or failed)."""
  first = next(iter(results.values()))
  out = {k: first[k] for k in ("outer_lr", "inner_lr", "v_lr")}
  out.update(seconds=sum(r["seconds"] for r in results.values()), per_partition=results)
  failed = [name for name, r in results.items() if r["mean_accuracy"] is None]
  if failed:
    return dict(out, mean_accuracy=None, std_accuracy=None, worst_partition=failed[0],
                error=results[failed[0]]["error"])
  worst = min(results, key=lambda name: results[name]["mean_accuracy"])
  return dict(out, mean_accuracy=results[worst]["mean_accuracy"],
              std_accuracy=results[worst]["std_accuracy"], worst_partition=worst, error=None)


def select(points: Sequence[dict[str, Any]], num_seeds: int) -> dict[str, Any]:
  """One-standard-error rule: the smallest steps (outer, then inner, then v) among the finished
  points whose mean accuracy is within one standard error (std / sqrt(seeds)) of the best one's.
  Two seeds do not tell such points apart, and smaller steps hold on seeds tuning never saw."""
  finished = [p for p in points if p["mean_accuracy"] is not None]
  if not finished:
    common.fail("every grid point diverged or failed; widen the grid (--grid_*) towards "
                "smaller steps.")
  best = max(finished, key=lambda p: p["mean_accuracy"])
  bar = best["mean_accuracy"] - best["std_accuracy"] / math.sqrt(num_seeds)
  return min((p for p in finished if p["mean_accuracy"] >= bar),
             key=lambda p: (p["outer_lr"], p["inner_lr"], p["v_lr"]))


def _accuracies(summary: dict[str, Any]) -> dict[str, Any]:
  """A point's accuracy fields from its driver's combined summary.json."""
  return dict(mean_accuracy=summary["mean"]["test_accuracy"],
              std_accuracy=summary["std"]["test_accuracy"],
              per_seed={s: v["test_accuracy"] for s, v in summary["per_seed"].items()},
              error=None)


def finished_point(workdir: str, seeds: list[int], values: dict[str, float]
                   ) -> dict[str, Any] | None:
  """A grid point an earlier tune run finished in `workdir` (same seeds and steps), or None: a
  killed or repeated tuning run costs only the points it has not finished yet."""
  try:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
    with open(os.path.join(workdir, f"seed_{seeds[0]}", "config.json"), encoding="utf-8") as f:
      run_flags = json.load(f)["flags"]
  except (OSError, ValueError, KeyError):
    return None
  if summary.get("seeds") != seeds or any(run_flags.get(k) != v for k, v in values.items()):
    return None
  # The earlier run's seconds: its seeds' wall times (process start-up not included).
  seconds = sum(v.get("wall_time_s", 0.0) for v in summary["per_seed"].values())
  return dict(values, seconds=seconds, command="(finished earlier)", **_accuracies(summary))


def run_point(workdir: str, seeds: list[int], values: dict[str, Any]) -> dict[str, Any]:
  """One grid point on one partition (values: the steps and the partition's driver flags) over
  the seeds in a driver process; its per-seed held-out accuracy."""
  cmd = [sys.executable, "-m", f"experiments.{TASK.value}", f"--workdir={workdir}",
         f"--algorithm={common.ALGORITHM.value}", "--eval_split=holdout",
         f"--holdout_fraction={common.HOLDOUT_FRACTION.value}",
         f"--seeds={','.join(map(str, seeds))}", "--log_every=100000",
         *(f"--{k}={v}" for k, v in values.items()), *EXTRA.value]
  if flags.FLAGS["rounds"].present:
    cmd.append(f"--rounds={common.ROUNDS.value}")
  if common.SMOKE.value:
    cmd.append("--smoke")
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  out = dict(values, seconds=time.perf_counter() - start, command=" ".join(cmd[1:]))
  summary_path = os.path.join(workdir, "summary.json")
  if proc.returncode == 0 and os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      out.update(_accuracies(json.load(f)))
  else:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    out.update(mean_accuracy=None, std_accuracy=None, per_seed={},
               error=lines[-1] if lines else f"exit code {proc.returncode}")
  return out


def write_preset(path: str, best: dict[str, Any], seeds: list[int], cost_s: float) -> None:
  lines = [
      f"# Tuned by experiments.tune for --task={TASK.value} --algorithm={common.ALGORITHM.value}:",
      f"# grid {json.dumps(grid())}, seeds {seeds}, partitions {','.join(PARTITIONS.value)} "
      f"(score: the worst partition), selected on held-out training data",
      f"# (--eval_split=holdout --holdout_fraction={common.HOLDOUT_FRACTION.value}); held-out "
      f"accuracy {best['mean_accuracy']:.4f} +- {best['std_accuracy']:.4f} "
      f"({best['worst_partition']}); tuning cost {cost_s:.0f} s.",
      f"# Driver flags during tuning: {' '.join(EXTRA.value) or '(none)'}",
      f"--algorithm={common.ALGORITHM.value}",
      *(f"--{k}={best[k]:g}" for k in ("outer_lr", "inner_lr", "v_lr")),
  ]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> None:
  common.start_driver()
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  given = common.SEEDS.value or DEFAULT_SEEDS
  try:
    seeds = [int(s) for s in given]
  except ValueError:
    common.fail(f"--seeds={','.join(given)} must be integers.")
  if len(set(seeds)) < 2:
    common.fail(f"--seeds={','.join(given)}: the protocol selects over at least 2 distinct "
                "seeds.")
  if common.ALGORITHM.value == "fednest":
    common.fail("fednest is not tuned: its presets hold FedNest's own hyperparameters, and its "
                "one step hlr (outer_lr = v_lr) cannot take the grid's separate outer and v "
                "steps (docs/method.md, section 7).")
  clash = [f for f in EXTRA.value if f.lstrip("-").split("=")[0] in _OWN_FLAGS]
  if clash:
    common.fail(f"--driver_flags may not set {', '.join(clash)}: tune sets those itself.")
  values = grid()
  if common.SMOKE.value:  # a tiny run for tests: two grid points, still a real selection
    values = {k: v[:2] if k == "outer_lr" else v[:1] for k, v in values.items()}
  parts = partitions()
  workdir = common.require_workdir()
  points = []
  combos = list(itertools.product(*values.values()))
  for i, combo in enumerate(combos):
    point = dict(zip(values, combo))
    # A point's folder is named by its steps, so a changed grid reuses the matching points.
    name = "point_" + "_".join(f"{k}{v:g}" for k, v in point.items())
    runs = {}
    for part, part_flags in parts.items():
      pdir, run_values = os.path.join(workdir, name, part), dict(point, **part_flags)
      runs[part] = finished_point(pdir, seeds, run_values) or run_point(pdir, seeds, run_values)
    result = combine_partitions(runs)
    points.append(result)
    acc = (f"diverged/failed on {result['worst_partition']}" if result["mean_accuracy"] is None
           else f"{result['mean_accuracy']:.4f} +- {result['std_accuracy']:.4f} (worst: "
           f"{result['worst_partition']})")
    print(f"[{i + 1}/{len(combos)}] {point}: {acc} ({result['seconds']:.0f} s)", flush=True)
  cost = sum(p["seconds"] for p in points)  # with the seed wall times of reused points
  best = select(points, len(seeds))
  preset = PRESET_OUT.value or (
      os.path.join(workdir, "preset.cfg") if common.SMOKE.value  # never a smoke-tuned preset
      else os.path.join(PRESETS_DIR, f"{TASK.value}_{common.ALGORITHM.value}.cfg"))
  write_preset(preset, best, seeds, cost)
  common.write_summary(workdir, dict(task=TASK.value, algorithm=common.ALGORITHM.value,
                                     seeds=seeds, grid=values, points=points,
                                     partitions=list(parts),
                                     best={k: best[k] for k in values}, preset=preset,
                                     best_mean_accuracy=best["mean_accuracy"], cost_s=cost))
  print(f"best {dict((k, best[k]) for k in values)}: held-out accuracy "
        f"{best['mean_accuracy']:.4f}; wrote {preset}")


if __name__ == "__main__":
  app.run(main)
