"""Finished runs side by side (compare.md, compare.png, compare_diagnostics.png), and the
benchmark at two revisions (`revisions`: benchmark --compare). docs/measurement.md.

  python -m experiments.compare --workdirs=runs/hr_rafbo,runs/hr_simfbo --out=runs/cmp
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from typing import Any, NamedTuple, Sequence

from absl import app, flags

from bilevel import checkpoint
from bilevel.metrics import commit, plot_records, write_json
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Run(NamedTuple):
  label: str
  path: str
  figures: dict[str, Any] | None  # summary.json (--seeds: its means); None: unfinished
  std: dict[str, Any]  # --seeds: the std over seeds
  records: list[list[dict[str, Any]]]  # metrics.jsonl records per seed


def fmt(value: Any, spec: str = ".4g") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _text(run: Run, key: str) -> str:
  """A figure, with +- its std over seeds where there is one."""
  text, std = fmt(run.figures.get(key)), run.std.get(key)
  return text if std is None or text == "n/a" else f"{text} +- {fmt(std, '.2g')}"


def read_json(path: str, what: str) -> dict[str, Any]:
  """The JSON object in path; ValueError naming `what` and path when it cannot be read."""
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


def _logged(run: Run) -> int:
  return run.records[0][-1]["round"] if run.records[0] else 0


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
    lines += [f"- {u.label} ({u.path}): {_logged(u)} rounds logged so far" for u in unfinished]
  return "\n".join(lines + ["", "Workdirs: " + ", ".join(f"{r.label} = {r.path}" for r in runs),
                            ""])


def figures(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numbers of a benchmark.json flattened to "a.b.c" names (versions, settings aside)."""
  out: dict[str, float] = {}
  for key, value in result.items():
    if isinstance(value, dict) and (prefix or key not in ("versions", "device", "settings",
                                                          "commit")):
      out.update(figures(value, f"{prefix}{key}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[prefix + key] = float(value)
  return out


def revisions(ref: str, passes: int, workdir: str) -> None:
  """Benchmark processes of revision `ref` (in WORKDIR/ref_tree) and of this checkout, with this
  one's other flags, alternating; every figure's medians and their ratio to compare.json."""
  workdir = os.path.abspath(workdir)  # the sides run in their own trees
  tree = os.path.join(workdir, "ref_tree")
  git = lambda *a: subprocess.run(["git", "-C", ROOT, "worktree", *a], capture_output=True,
                                  text=True, check=False)
  git("remove", "--force", tree)
  if (made := git("add", "--detach", tree, ref)).returncode != 0:
    common.fail(f"--compare={ref}: cannot check it out into {tree}: {made.stderr.strip()}")
  argv = [a for a in sys.argv[1:] if a.lstrip("-").removeprefix("no").split("=")[0]
          not in ("compare", "passes", "workdir")]
  runs: dict[str, list[dict[str, float]]] = {"ref": [], "this": []}
  try:
    for i in range(passes):
      for side in ("ref", "this") if i % 2 == 0 else ("this", "ref"):
        root, out = (tree if side == "ref" else ROOT), os.path.join(workdir, f"{side}_{i}")
        print(f"=== pass {i + 1}/{passes}: {side} ({ref if side == 'ref' else 'this checkout'})",
              flush=True)
        code = subprocess.run([sys.executable, "-m", "experiments.benchmark", *argv,
                               f"--workdir={out}"], cwd=root, env=dict(os.environ, PYTHONPATH=root),
                              check=False).returncode
        if code != 0:
          common.fail(f"--compare: the {side} benchmark process failed (exit {code}); its output "
                      "is above.")
        runs[side].append(figures(read_json(os.path.join(out, "benchmark.json"), "benchmark")))
  finally:
    git("remove", "--force", tree)
  rows = {n: {"ref_runs": [r[n] for r in runs["ref"]], "this_runs": [r[n] for r in runs["this"]]}
          for n in runs["this"][0] if all(n in r for r in runs["ref"] + runs["this"])}
  print(f"{'figure':<52} {ref[:12]:>12} {'this':>12} {'this/ref':>9}")
  for n, row in rows.items():
    a, b = statistics.median(row["ref_runs"]), statistics.median(row["this_runs"])
    row.update(ref=a, this=b, this_over_ref=b / a if a else None)
    if not n.endswith("total_time_s"):
      print(f"{n[:52]:<52} {a:>12.4g} {b:>12.4g} {fmt(row['this_over_ref'], '.3f'):>9}")
  path = os.path.join(workdir, "compare.json")
  write_json(path, dict(ref=ref, this=commit(ROOT), passes=passes, argv=sys.argv, figures=rows))
  print(f"wrote {path}")


def main(argv):
  del argv
  paths, out = WORKDIRS.value or [], OUT.value or common.WORKDIR.value
  labels = LABELS.value or paths
  checks = {"--workdirs is required: a comma-separated list of run workdirs.": paths,
            f"--labels has {len(labels)} entries but --workdirs has {len(paths)}; give one label "
            "per workdir.": len(labels) == len(paths),
            "--out (or --workdir) is required: the folder for compare.png and compare.md.": out}
  problems = [problem for problem, ok in checks.items() if not ok]
  loaded = []
  for path, label in zip(paths, labels):
    try:
      loaded.append(load_run(path, label))
    except ValueError as e:
      problems.append(str(e))
  if problems:
    common.fail(" ".join(problems))
  runs = [r for r in loaded if r.figures is not None]
  unfinished = [r for r in loaded if r.figures is None]
  for u in unfinished:
    print(f"warning: {u.path} is unfinished (no summary.json; {_logged(u)} rounds logged): "
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
