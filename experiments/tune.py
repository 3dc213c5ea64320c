"""One tuning protocol for every algorithm (docs/tools.md): grid, held-out score -> preset flagfile.

  python -m experiments.tune --task=hyper_representation --algorithm=rafbo --workdir=runs/tune
"""
import contextlib
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags

from experiments import common

GRIDS = {  # each step at the task's hand-set default and about a third of it
    "hyper_representation": dict(outer_lr=(0.03, 0.1), inner_lr=(0.03, 0.1), v_lr=(0.03, 0.1)),
    "hyper_cleaning": dict(outer_lr=(10.0, 30.0), inner_lr=(0.02, 0.05), v_lr=(0.02, 0.05)),
}
STEPS = ("outer_lr", "inner_lr", "v_lr")
TASK = flags.DEFINE_enum("task", "hyper_representation", list(GRIDS), "Task driver.")
GRID_FLAGS = {k: flags.DEFINE_list(f"grid_{k}", None, f"{k} values (default GRIDS[task]).")
              for k in STEPS}
PARTITIONS = flags.DEFINE_list("tune_partitions", ["iid", "dirichlet:0.1"], "Partitions to score.")
PRESET_OUT = flags.DEFINE_string("preset_out", None, "Flagfile to write (docs/tools.md).")
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
_OWN_FLAGS = STEPS + ("seeds", "seed", "workdir", "eval_split", "algorithm", "partition", "alpha")


def _positive(text: str) -> bool:
  try:
    return float(text) > 0
  except ValueError:
    return False


def partitions() -> dict[str, dict[str, Any]]:
  """--tune_partitions as {name: the driver flags that select it}."""
  out = {}
  for item in PARTITIONS.value or [""]:  # none: an error
    scheme, _, alpha = item.partition(":")
    if item in ("iid", "shards"):
      out[item] = dict(partition=item)
    elif scheme == "dirichlet" and _positive(alpha):
      out[f"dirichlet{float(alpha):g}"] = dict(partition=scheme, alpha=float(alpha))
    else:
      common.fail(f"--tune_partitions: {item!r} is not iid, shards or dirichlet:ALPHA with a "
                  "concentration ALPHA > 0, e.g. dirichlet:0.1.")
  return out


def finished_point(workdir: str, seeds: list[int], values: dict[str, Any]) -> dict | None:
  """The point's accuracies if its driver run in workdir finished with these seeds and flags."""
  read = lambda *path: json.loads(pathlib.Path(workdir, *path).read_text(encoding="utf-8"))
  with contextlib.suppress(OSError, ValueError, KeyError):  # missing or unreadable: not finished
    summary, run_flags = read("summary.json"), read(f"seed_{seeds[0]}", "config.json")["flags"]
    if summary["seeds"] == seeds and all(run_flags.get(k) == v for k, v in values.items()):
      return dict(values, mean_accuracy=summary["mean"]["test_accuracy"],
                  std_accuracy=summary["std"]["test_accuracy"], error=None,
                  per_seed={s: v["test_accuracy"] for s, v in summary["per_seed"].items()},
                  seconds=sum(v.get("wall_time_s", 0.0) for v in summary["per_seed"].values()),
                  command="(finished earlier)")
  return None


def run_point(workdir: str, seeds: list[int], values: dict[str, Any]) -> dict[str, Any]:
  """One grid point on one partition (values: its flags) over the seeds, in a driver process."""
  if done := finished_point(workdir, seeds, values):
    return done
  cmd = [sys.executable, "-m", f"experiments.{TASK.value}", *(f"--{k}={v}" for k, v in dict(
      workdir=workdir, algorithm=common.ALGORITHM.value, eval_split="holdout",
      holdout_fraction=common.HOLDOUT_FRACTION.value, seeds=",".join(map(str, seeds)),
      log_every=100000, **values).items()), *common.DRIVER_FLAGS.value,
      *([f"--rounds={common.ROUNDS.value}"] if flags.FLAGS["rounds"].present else []),
      *(["--smoke"] if common.SMOKE.value else [])]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  out = dict(values, seconds=time.perf_counter() - start, command=" ".join(cmd[1:]))
  if proc.returncode == 0 and (done := finished_point(workdir, seeds, values)):
    return dict(done, **out)
  lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
  return dict(out, mean_accuracy=None, std_accuracy=None, per_seed={}, error=lines[-1])


def select(points: Sequence[dict[str, Any]], num_seeds: int) -> dict[str, Any]:
  """The one-standard-error rule: the smallest steps within std / sqrt(seeds) of the best."""
  finished = [p for p in points if p["mean_accuracy"] is not None]
  if not finished:
    common.fail("every grid point diverged or failed; widen the grid (--grid_*) towards "
                "smaller steps.")
  best = max(finished, key=lambda p: p["mean_accuracy"])
  bar = best["mean_accuracy"] - best["std_accuracy"] / math.sqrt(num_seeds)
  return min((p for p in finished if p["mean_accuracy"] >= bar),
             key=lambda p: tuple(p[k] for k in STEPS))


def main(argv: Sequence[str]) -> None:
  common.start_driver(argv=argv)
  seeds, alg = common.parse_seeds() or [0, 1], common.ALGORITHM.value
  clash = [f for f in common.DRIVER_FLAGS.value if f.lstrip("-").split("=")[0] in _OWN_FLAGS]
  common.fail(*[message for bad, message in (
      (len(seeds) < 2, f"--seeds={seeds[0]}: the protocol selects over at least 2 seeds."),
      (alg == "fednest", "fednest is not tuned: its presets hold FedNest's own hyperparameters, "
       "and its one step hlr (outer_lr = v_lr) cannot take the grid's separate outer and v steps."),
      (clash, f"--driver_flags may not set {', '.join(clash)}: tune sets those itself."),
      *((not all(map(_positive, f.value or [])), f"--grid_{k}={','.join(f.value or [])} must be "
         "a list of numbers > 0.") for k, f in GRID_FLAGS.items())) if bad])
  grid = {k: tuple(map(float, f.value)) if f.value else GRIDS[TASK.value][k]
          for k, f in GRID_FLAGS.items()}  # --grid_* where given
  values, parts, workdir, points = grid, partitions(), common.require_workdir(), []
  if common.SMOKE.value:  # a tiny run for tests: two grid points, still a real selection
    values = {k: v[:2] if k == "outer_lr" else v[:1] for k, v in values.items()}
  combos = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
  for i, point in enumerate(combos, 1):
    name = "point_" + "_".join(f"{k}{v:g}" for k, v in point.items())  # reused if the grid moves
    runs = {part: run_point(os.path.join(workdir, name, part), seeds, dict(point, **part_flags))
            for part, part_flags in parts.items()}
    failed = [part for part, r in runs.items() if r["mean_accuracy"] is None]
    worst = failed[0] if failed else min(runs, key=lambda part: runs[part]["mean_accuracy"])
    points.append(p := dict(  # a point scores its worst partition (a failed one's first)
        {k: runs[worst][k] for k in STEPS + ("mean_accuracy", "std_accuracy", "error")},
        seconds=sum(r["seconds"] for r in runs.values()), per_partition=runs,
        worst_partition=worst))
    acc = "diverged/failed" if failed else f"{p['mean_accuracy']:.4f} +- {p['std_accuracy']:.4f}"
    print(f"[{i}/{len(combos)}] {point}: {acc} (worst: {worst}, {p['seconds']:.0f} s)", flush=True)
  best, cost = select(points, len(seeds)), sum(p["seconds"] for p in points)
  preset = PRESET_OUT.value or (os.path.join(workdir, "preset.cfg") if common.SMOKE.value
                                else os.path.join(PRESETS_DIR, f"{TASK.value}_{alg}.cfg"))
  pathlib.Path(preset).write_text("\n".join([
      f"# Tuned by experiments.tune for --task={TASK.value} --algorithm={alg}:",
      f"# grid {json.dumps(grid)}, seeds {seeds}, partitions {','.join(PARTITIONS.value)} "
      f"(score: the worst partition), selected on held-out training data",
      f"# (--eval_split=holdout --holdout_fraction={common.HOLDOUT_FRACTION.value}); held-out "
      f"accuracy {best['mean_accuracy']:.4f} +- {best['std_accuracy']:.4f} "
      f"({best['worst_partition']}); tuning cost {cost:.0f} s.",
      f"# Driver flags during tuning: {' '.join(common.DRIVER_FLAGS.value) or '(none)'}",
      f"--algorithm={alg}", *(f"--{k}={best[k]:g}" for k in STEPS)]) + "\n", encoding="utf-8")
  summary = common.write_summary(workdir, dict(
      task=TASK.value, algorithm=alg, seeds=seeds, grid=values, points=points,
      partitions=list(parts), best={k: best[k] for k in values}, preset=preset,
      best_mean_accuracy=best["mean_accuracy"], cost_s=cost))
  print(f"best {summary['best']}: held-out accuracy {best['mean_accuracy']:.4f}; wrote {preset}")


if __name__ == "__main__":
  app.run(main)
