"""One tuning protocol for every algorithm (docs/method.md, section 7; docs/tools.md): the task's
grid of steps, scored on held-out data over seeds and partitions -> a preset flagfile.

  python -m experiments.tune --task=hyper_representation --algorithm=rafbo --workdir=runs/tune
"""
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

# Each step at the task's hand-set default and about a third of it (docs/method.md, section 7).
GRIDS = {
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
_OWN_FLAGS = STEPS + ("seeds", "seed", "workdir", "eval_split", "algorithm", "partition",
                      "alpha")  # set by tune; --driver_flags may not


def _positive(text: str) -> bool:
  try:
    return float(text) > 0
  except ValueError:
    return False


def grid() -> dict[str, tuple[float, ...]]:
  """--grid_* where given, else GRIDS[task]."""
  common.fail(*[f"--grid_{k}={','.join(f.value)} must be a list of numbers > 0."
                for k, f in GRID_FLAGS.items() if not all(map(_positive, f.value or []))])
  return {k: tuple(map(float, f.value)) if f.value else GRIDS[TASK.value][k]
          for k, f in GRID_FLAGS.items()}


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
  try:
    summary, run_flags = read("summary.json"), read(f"seed_{seeds[0]}", "config.json")["flags"]
  except (OSError, ValueError, KeyError):
    return None
  if summary.get("seeds") != seeds or any(run_flags.get(k) != v for k, v in values.items()):
    return None
  return dict(values, mean_accuracy=summary["mean"]["test_accuracy"],
              std_accuracy=summary["std"]["test_accuracy"], error=None,
              per_seed={s: v["test_accuracy"] for s, v in summary["per_seed"].items()},
              seconds=sum(v.get("wall_time_s", 0.0) for v in summary["per_seed"].values()),
              command="(finished earlier)")


def run_point(workdir: str, seeds: list[int], values: dict[str, Any]) -> dict[str, Any]:
  """One grid point on one partition (values: its flags) over the seeds, in a driver process."""
  if done := finished_point(workdir, seeds, values):
    return done
  cmd = [sys.executable, "-m", f"experiments.{TASK.value}", f"--workdir={workdir}",
         f"--algorithm={common.ALGORITHM.value}", "--eval_split=holdout",
         f"--holdout_fraction={common.HOLDOUT_FRACTION.value}",
         f"--seeds={','.join(map(str, seeds))}", "--log_every=100000",
         *(f"--{k}={v}" for k, v in values.items()), *common.DRIVER_FLAGS.value,
         *([f"--rounds={common.ROUNDS.value}"] if flags.FLAGS["rounds"].present else []),
         *(["--smoke"] if common.SMOKE.value else [])]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True)
  out = dict(values, seconds=time.perf_counter() - start, command=" ".join(cmd[1:]))
  if proc.returncode == 0 and (done := finished_point(workdir, seeds, values)):
    return dict(done, **out)
  lines = (proc.stderr or proc.stdout).strip().splitlines()
  return dict(out, mean_accuracy=None, std_accuracy=None, per_seed={},
              error=lines[-1] if lines else f"exit code {proc.returncode}")


def combine_partitions(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """A point's score: its worst partition's (a failed one's first)."""
  failed = [name for name, r in results.items() if r["mean_accuracy"] is None]
  worst = failed[0] if failed else min(results, key=lambda n: results[n]["mean_accuracy"])
  return dict({k: results[worst][k] for k in STEPS + ("mean_accuracy", "std_accuracy", "error")},
              seconds=sum(r["seconds"] for r in results.values()), per_partition=results,
              worst_partition=worst)


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


def write_preset(path: str, best: dict[str, Any], seeds: list[int], cost_s: float) -> None:
  alg = common.ALGORITHM.value
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join([
        f"# Tuned by experiments.tune for --task={TASK.value} --algorithm={alg}:",
        f"# grid {json.dumps(grid())}, seeds {seeds}, partitions {','.join(PARTITIONS.value)} "
        f"(score: the worst partition), selected on held-out training data",
        f"# (--eval_split=holdout --holdout_fraction={common.HOLDOUT_FRACTION.value}); held-out "
        f"accuracy {best['mean_accuracy']:.4f} +- {best['std_accuracy']:.4f} "
        f"({best['worst_partition']}); tuning cost {cost_s:.0f} s.",
        f"# Driver flags during tuning: {' '.join(common.DRIVER_FLAGS.value) or '(none)'}",
        f"--algorithm={alg}", *(f"--{k}={best[k]:g}" for k in STEPS)]) + "\n")


def main(argv: Sequence[str]) -> None:
  common.start_driver(argv=argv)
  seeds, alg = common.parse_seeds() or [0, 1], common.ALGORITHM.value
  clash = [f for f in common.DRIVER_FLAGS.value if f.lstrip("-").split("=")[0] in _OWN_FLAGS]
  common.fail(*[message for bad, message in (
      (len(seeds) < 2, f"--seeds={seeds[0]}: the protocol selects over at least 2 seeds."),
      (alg == "fednest", "fednest is not tuned: its presets hold FedNest's own hyperparameters, "
       "and its one step hlr (outer_lr = v_lr) cannot take the grid's separate outer and v steps "
       "(docs/method.md, section 7)."),
      (clash, f"--driver_flags may not set {', '.join(clash)}: tune sets those itself.")) if bad])
  values, parts, workdir, points = grid(), partitions(), common.require_workdir(), []
  if common.SMOKE.value:  # a tiny run for tests: two grid points, still a real selection
    values = {k: v[:2] if k == "outer_lr" else v[:1] for k, v in values.items()}
  combos = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
  for i, point in enumerate(combos):
    name = "point_" + "_".join(f"{k}{v:g}" for k, v in point.items())  # reused if the grid moves
    points.append(p := combine_partitions({
        part: run_point(os.path.join(workdir, name, part), seeds, dict(point, **part_flags))
        for part, part_flags in parts.items()}))
    acc = ("diverged/failed" if p["mean_accuracy"] is None else
           f"{p['mean_accuracy']:.4f} +- {p['std_accuracy']:.4f}")
    print(f"[{i + 1}/{len(combos)}] {point}: {acc} (worst: {p['worst_partition']}, "
          f"{p['seconds']:.0f} s)", flush=True)
  best, cost = select(points, len(seeds)), sum(p["seconds"] for p in points)
  preset = PRESET_OUT.value or (
      os.path.join(workdir, "preset.cfg") if common.SMOKE.value  # never a smoke-tuned preset
      else os.path.join(PRESETS_DIR, f"{TASK.value}_{alg}.cfg"))
  write_preset(preset, best, seeds, cost)
  common.write_summary(workdir, dict(
      task=TASK.value, algorithm=alg, seeds=seeds, grid=values, points=points,
      partitions=list(parts), best={k: best[k] for k in values}, preset=preset,
      best_mean_accuracy=best["mean_accuracy"], cost_s=cost))
  print(f"best {dict((k, best[k]) for k in values)}: held-out accuracy "
        f"{best['mean_accuracy']:.4f}; wrote {preset}")


if __name__ == "__main__":
  app.run(main)
