"""Runs side by side (docs/measurement.md): compare.md, compare.png, compare_diagnostics.png.

  python -m experiments.compare --workdirs=runs/hr_rafbo,runs/hr_simfbo --out=runs/cmp
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple, Sequence

from absl import app, flags

from bilevel import checkpoint
from bilevel.metrics import plot_records
from experiments import common

WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated run workdirs to compare.")
LABELS = flags.DEFINE_list("labels", None, "One label per workdir (default: the workdir's path).")
OUT = flags.DEFINE_string("out", None, "Folder of compare.png and compare.md (default: --workdir).")
PLOTS = {"compare.png": (("round", "test_accuracy", "test accuracy"),
                         ("cumulative_client_flops", "test_accuracy", "test accuracy")),
         "compare_diagnostics.png": (
             ("round", "diag_cosine", "cosine(estimate, true hypergradient)"),
             ("round", "diag_relative_error", "||estimate - true|| / ||true||"),
             ("round", "never_covered_x_share", "share of x never covered so far"))}


class Run(NamedTuple):
  label: str
  path: str
  figures: dict[str, Any] | None  # summary.json (--seeds: its means); None: unfinished
  std: dict[str, Any]  # --seeds: the std over seeds
  records: list[list[dict[str, Any]]]  # metrics.jsonl records per seed

  def logged(self) -> int:
    return self.records[0][-1]["round"] if self.records[0] else 0


def fmt(value: Any, spec: str = ".4g") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _text(run: Run, key: str) -> str:
  """A figure, with +- its std over seeds where there is one."""
  text, std = fmt(run.figures.get(key)), run.std.get(key)
  return text if std is None or text == "n/a" else f"{text} +- {fmt(std, '.2g')}"


def read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {what} {path!r} ({e}).") from None
  if not isinstance(value, dict):
    raise ValueError(f"{what} {path!r} does not hold a JSON object.")
  return value


def load_run(path: str, label: str) -> Run:
  """The run in workdir `path`; ValueError with a clear message when it cannot be read."""
  read = lambda d: checkpoint.read_metrics(os.path.join(d, "metrics.jsonl"), math.inf, False)
  if not os.path.isdir(path):
    raise ValueError(f"workdir {path!r} does not exist or is not a directory.")
  if not os.path.exists(os.path.join(path, "summary.json")):
    return Run(label, path, None, {}, [read(path)])
  summary = read_json(os.path.join(path, "summary.json"), "summary")
  dirs = [os.path.join(path, f"seed_{s}") for s in summary.get("per_seed", [])] or [path]
  read_json(os.path.join(dirs[0], "config.json"), "config")  # a run must have a readable one
  records = [read(d) for d in dirs]
  for d, r in zip(dirs, records):
    if not r:
      raise ValueError(f"workdir {d!r} has a summary but no metrics.jsonl records.")
  return Run(label, path, {**summary, **summary.get("mean", {})}, summary.get("std", {}), records)


def table(runs: Sequence[Run]) -> list[str]:
  """Markdown table rows (header first); FLOPs relative to the first run."""
  auc = any(r.figures.get("weight_auc") is not None for r in runs)
  header = ["run", "task", "algorithm", "seeds", "test accuracy", "rounds",
            "cumulative client FLOPs", "FLOPs vs first", "min coverage x", "min coverage y",
            "wall time (s)"] + (["weight AUC"] if auc else [])
  base = runs[0].figures.get("cumulative_client_flops")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in runs:
    f, flops = r.figures, r.figures.get("cumulative_client_flops")
    row = [r.label, fmt(f.get("task")), fmt(f.get("algorithm")), str(len(r.records)),
           _text(r, "test_accuracy"), fmt(f.get("rounds"), ".0f"), fmt(flops, ".3e"),
           fmt(flops / base if flops is not None and base else None, ".3f"),
           fmt(f.get("min_coverage_x")), fmt(f.get("min_coverage_y")),
           fmt(f.get("wall_time_s"), ".1f")] + ([_text(r, "weight_auc")] if auc else [])
    lines.append("| " + " | ".join(row) + " |")
  return lines


def markdown(runs: Sequence[Run], unfinished: Sequence[Run]) -> str:
  lines = ["# Run comparison", ""] + table(runs) + [
      "", "Test accuracy is a fraction; FLOPs are analytic client FLOPs of the submodels "
      "actually run, relative to the first row."]
  extra = [f"{r.label}: unweighted baseline {_text(r, 'unweighted_test_accuracy')}"
           for r in runs if r.figures.get("unweighted_test_accuracy") is not None]
  if extra:
    lines += ["", "Hyper-cleaning, the same run trained unweighted on the noisy labels: "
              + "; ".join(extra) + "."]
  if unfinished:
    lines += ["", "## Unfinished runs (no summary.json; not in the table or the figure)", ""]
    lines += [f"- {u.label} ({u.path}): {u.logged()} rounds logged so far" for u in unfinished]
  return "\n".join(lines + ["", "Workdirs: " + ", ".join(f"{r.label} = {r.path}" for r in runs),
                            ""])


def main(argv):
  del argv
  paths, out = WORKDIRS.value or [], OUT.value or common.WORKDIR.value
  labels = LABELS.value or paths
  checks = {"--workdirs is required: a comma-separated list of run workdirs.": paths,
            f"--labels has {len(labels)} entries but --workdirs has {len(paths)}; give one label "
            "per workdir.": len(labels) == len(paths),
            "--out (or --workdir) is required: the folder for compare.png and compare.md.": out}
  problems, loaded = [problem for problem, ok in checks.items() if not ok], []
  for path, label in zip(paths, labels):
    try:
      loaded.append(load_run(path, label))
    except ValueError as e:
      problems.append(str(e))
  common.fail(*problems)
  runs = [r for r in loaded if r.figures is not None]
  for u in (unfinished := [r for r in loaded if r.figures is None]):
    print(f"warning: {u.path} is unfinished (no summary.json; {u.logged()} rounds logged): "
          "listed as unfinished, left out of the comparison.")
  if not runs:
    common.fail("none of the workdirs holds a finished run (summary.json); nothing to compare.")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
    f.write(markdown(runs, unfinished))
  for name, panels in PLOTS.items():
    shown = [(r.label, r.records) for r in runs if name == "compare.png"
             or any("diag_cosine" in rec for seed in r.records for rec in seed)]
    if shown:
      plot_records(shown, os.path.join(out, name), panels=panels)
      print(f"wrote {os.path.join(out, name)}")
  print("\n".join(table(runs)))
  print(f"wrote {os.path.join(out, 'compare.md')}")


if __name__ == "__main__":
  app.run(main)
