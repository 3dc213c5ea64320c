"""Compare finished runs: one figure and one markdown table over several workdirs.

  python -m experiments.compare --workdirs=runs/hr_rafbo,runs/hr_simfbo --out=runs/cmp

Reads each workdir's config.json, metrics.jsonl and summary.json and writes to --out (or
--workdir) compare.png (test accuracy against the round and against cumulative client FLOPs) and
compare.md (per run: task, algorithm, test accuracy, rounds, client FLOPs absolute and relative
to the first run, min coverage C_x* and C_y*, wall time, the weight AUC of hyper-cleaning runs).
A --seeds workdir is one row of means over its seeds (accuracy and AUC as mean +- std), drawn as
its mean curve with a min-max band. Runs made with --diagnose_every add
compare_diagnostics.png (estimate quality and never-covered share against the round). A workdir
without summary.json is listed as unfinished, with its logged rounds, and left out otherwise.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple, Sequence

from absl import app, flags
import numpy as np

from experiments import common

WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated run workdirs to compare.")
LABELS = flags.DEFINE_list("labels", None, "Optional comma-separated labels, one per workdir "
                           "(default: each workdir's path).")
OUT = flags.DEFINE_string("out", None, "Output directory for compare.png and compare.md "
                          "(default: --workdir).")

ACCURACY_PANELS = (("round", "test_accuracy", "test accuracy"),
                   ("cumulative_client_flops", "test_accuracy", "test accuracy"))
DIAGNOSTIC_PANELS = (("round", "diag_cosine", "cosine(estimate, true hypergradient)"),
                     ("round", "diag_relative_error", "||estimate - true|| / ||true||"),
                     ("round", "never_covered_x_share", "share of x never covered so far"))


class Run(NamedTuple):
  label: str
  path: str
  summary: dict[str, Any]  # a multi-seed run: its combined summary (mean / std / per_seed)
  records: list[list[dict[str, Any]]]  # per seed (one list for a single-seed run)

  def value(self, key: str) -> Any:
    """The summary figure (its mean over seeds for a multi-seed run)."""
    if "per_seed" in self.summary:
      return self.summary["mean"].get(key, self.summary.get(key))
    return self.summary.get(key)

  def text(self, key: str, spec: str = ".4g") -> str:
    """The figure formatted, with +- its std over seeds for a multi-seed run."""
    text = _fmt(self.value(key), spec)
    std = self.summary["std"].get(key) if "per_seed" in self.summary else None
    return text if std is None or text == "n/a" else f"{text} +- {_fmt(std, '.2g')}"


class Unfinished(NamedTuple):
  label: str
  path: str
  logged_rounds: int


def read_records(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl records; a torn last line (a killed run) is skipped."""
  records = []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:
          break
  return records


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read {what} {path!r} ({e}).") from None
  if not isinstance(value, dict):
    raise ValueError(f"{what} {path!r} does not hold a JSON object.")
  return value


def load_run(path: str, label: str) -> Run | Unfinished:
  """A finished run, or Unfinished; ValueError with a clear message when it cannot be read."""
  if not os.path.isdir(path):
    raise ValueError(f"workdir {path!r} does not exist or is not a directory.")
  if not os.path.exists(os.path.join(path, "summary.json")):
    records = read_records(os.path.join(path, "metrics.jsonl"))
    return Unfinished(label, path, records[-1]["round"] if records else 0)
  summary = _read_json(os.path.join(path, "summary.json"), "summary")
  # --seeds: one workdir per seed below this one
  dirs = [os.path.join(path, f"seed_{s}") for s in summary.get("per_seed", [])] or [path]
  _read_json(os.path.join(dirs[0], "config.json"), "config")  # a run must have a readable one
  records = [read_records(os.path.join(d, "metrics.jsonl")) for d in dirs]
  for d, r in zip(dirs, records):
    if not r:
      raise ValueError(f"workdir {d!r} has a summary but no metrics.jsonl records.")
  return Run(label, path, summary, records)


def _fmt(value: Any, spec: str = ".4g") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def table(runs: Sequence[Run]) -> list[str]:
  """Markdown table rows (header first); FLOPs relative to the first run."""
  with_auc = any(r.value("weight_auc") is not None for r in runs)
  header = ["run", "task", "algorithm", "seeds", "test accuracy", "rounds",
            "cumulative client FLOPs", "FLOPs vs first", "min coverage x", "min coverage y",
            "wall time (s)"] + (["weight AUC"] if with_auc else [])
  base = runs[0].value("cumulative_client_flops") if runs else None
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in runs:
    flops = r.value("cumulative_client_flops")
    rel = flops / base if flops is not None and base else None
    row = [r.label, _fmt(r.value("task")), _fmt(r.value("algorithm")), str(len(r.records)),
           r.text("test_accuracy"), _fmt(r.value("rounds"), ".0f"), _fmt(flops, ".3e"),
           _fmt(rel, ".3f"), _fmt(r.value("min_coverage_x")), _fmt(r.value("min_coverage_y")),
           _fmt(r.value("wall_time_s"), ".1f")] + ([r.text("weight_auc")] if with_auc else [])
    lines.append("| " + " | ".join(row) + " |")
  return lines


def write_markdown(path: str, runs: Sequence[Run], unfinished: Sequence[Unfinished]) -> None:
  lines = ["# Run comparison", ""]
  if runs:
    lines += table(runs) + ["", "Test accuracy is a fraction; FLOPs are analytic client FLOPs "
                            "of the submodels actually run, relative to the first row."]
    extra = [f"{r.label}: unweighted baseline {r.text('unweighted_test_accuracy')}"
             for r in runs if r.value("unweighted_test_accuracy") is not None]
    if extra:
      lines += ["", "Hyper-cleaning, the same run trained unweighted on the noisy labels: "
                + "; ".join(extra) + "."]
  if unfinished:
    lines += ["", "## Unfinished runs (no summary.json; not in the table or the figure)", ""]
    lines += [f"- {u.label} ({u.path}): {u.logged_rounds} rounds logged so far" for u in unfinished]
  lines += ["", "Workdirs: " + ", ".join(f"{r.label} = {r.path}" for r in runs), ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def plot(path: str, runs: Sequence[Run], panels: Sequence[tuple[str, str, str]]) -> None:
  """One panel per (x key, y key, y label): each run's mean curve over its seeds at the x values
  every seed logged, with a min-max band for a multi-seed run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
  for (xkey, ykey, ylabel), ax in zip(panels, axes):
    for r in runs:
      curves = [{rec[xkey]: rec[ykey] for rec in seed
                 if xkey in rec and rec.get(ykey) is not None} for seed in r.records]
      xs = sorted(set.intersection(*(set(c) for c in curves)))
      if not xs:
        continue
      ys = np.array([[c[x] for x in xs] for c in curves])
      label = r.label if len(curves) == 1 else f"{r.label} (mean of {len(curves)} seeds)"
      line, = ax.plot(xs, ys.mean(axis=0), marker=".", label=label)
      if len(curves) > 1:
        ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xkey.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if xkey == "cumulative_client_flops":
      ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  paths, out = WORKDIRS.value or [], OUT.value or common.WORKDIR.value
  problems = [] if paths else ["--workdirs is required: a comma-separated list of run workdirs."]
  if LABELS.value and len(LABELS.value) != len(paths):
    problems.append(f"--labels has {len(LABELS.value)} entries but --workdirs has {len(paths)}; "
                    "give one label per workdir.")
  if not out:
    problems.append("--out (or --workdir) is required: the directory for compare.png and "
                    "compare.md.")
  loaded = []
  if not (LABELS.value and len(LABELS.value) != len(paths)):
    for path, label in zip(paths, LABELS.value or paths):
      try:
        loaded.append(load_run(path, label))
      except ValueError as e:
        problems.append(str(e))
  if problems:
    common.fail(" ".join(problems))
  runs = [r for r in loaded if isinstance(r, Run)]
  unfinished = [r for r in loaded if isinstance(r, Unfinished)]
  for u in unfinished:
    print(f"warning: {u.path} is unfinished (no summary.json; {u.logged_rounds} rounds logged): "
          "listed as unfinished, left out of the comparison.")
  if not runs:
    common.fail("none of the workdirs holds a finished run (summary.json); nothing to compare.")
  os.makedirs(out, exist_ok=True)
  write_markdown(os.path.join(out, "compare.md"), runs, unfinished)
  plot(os.path.join(out, "compare.png"), runs, ACCURACY_PANELS)
  with_diag = [r for r in runs if any("diag_cosine" in rec for seed in r.records for rec in seed)]
  if with_diag:
    plot(os.path.join(out, "compare_diagnostics.png"), with_diag, DIAGNOSTIC_PANELS)
    print(f"wrote {os.path.join(out, 'compare_diagnostics.png')} (estimate quality)")
  print("\n".join(table(runs)))
  print(f"wrote {os.path.join(out, 'compare.md')} and {os.path.join(out, 'compare.png')}")


if __name__ == "__main__":
  app.run(main)
