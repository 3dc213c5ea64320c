"""Compare finished runs: one figure and one markdown table over several workdirs.

Reads each workdir's config.json, metrics.jsonl and summary.json (written by the task drivers)
and writes to --out (or --workdir):
  compare.png : test accuracy against the round and against cumulative client FLOPs, one line
                per run;
  compare.md  : a table with run, task, algorithm, test accuracy, rounds, cumulative client
                FLOPs, FLOPs relative to the first run, min coverage of x and y (C_x*, C_y*),
                wall time and, where a run has one, the weight AUC (hyper-cleaning).
A workdir written with --seeds (summary.json with per-seed summaries, one run per seed in
WORKDIR/seed_S) is one row: every figure is its mean over the seeds, accuracy and AUC shown as
mean +- std with the number of seeds, and the figure draws the mean curve with a min-max band.
Runs made with --diagnose_every also get compare_diagnostics.png: the cosine and relative error
of each round's aggregated hypergradient estimate against the true one, and the share of x never
covered so far, against the round.
A workdir without summary.json is an unfinished (or killed) run: it is listed as unfinished,
with how many rounds it logged, and left out of the figure and the table.

  python -m experiments.compare --workdirs=runs/hr_rafbo,runs/hr_simfbo --out=runs/cmp
  python -m experiments.compare --workdirs=runs/hc,runs/hc/unweighted --labels=weighted,unweighted \
      --workdir=runs/hc_cmp
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


class Run(NamedTuple):
  label: str
  path: str
  config: dict[str, Any]
  summary: dict[str, Any]  # a multi-seed run: its combined summary (mean / std / per_seed)
  records: list[list[dict[str, Any]]]  # per seed (one list for a single-seed run)

  @property
  def num_seeds(self) -> int:
    return len(self.records)

  def value(self, key: str) -> Any:
    """The summary figure (its mean over seeds for a multi-seed run)."""
    if "per_seed" in self.summary:
      return self.summary["mean"].get(key, self.summary.get(key))
    return self.summary.get(key)

  def spread(self, key: str) -> float | None:
    """Std over seeds (None for a single-seed run)."""
    return self.summary["std"].get(key) if "per_seed" in self.summary else None


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
  summary_path = os.path.join(path, "summary.json")
  if not os.path.exists(summary_path):
    records = read_records(os.path.join(path, "metrics.jsonl"))
    return Unfinished(label, path, records[-1]["round"] if records else 0)
  summary = _read_json(summary_path, "summary")
  if "per_seed" in summary:  # --seeds: one workdir per seed below this one
    dirs = [os.path.join(path, f"seed_{s}") for s in summary["per_seed"]]
    config = _read_json(os.path.join(dirs[0], "config.json"), "config")
  else:
    dirs = [path]
    config = _read_json(os.path.join(path, "config.json"), "config")
  records = [read_records(os.path.join(d, "metrics.jsonl")) for d in dirs]
  for d, r in zip(dirs, records):
    if not r:
      raise ValueError(f"workdir {d!r} has a summary but no metrics.jsonl records.")
  return Run(label, path, config, summary, records)


def _fmt(value: Any, spec: str = ".4g") -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _mean_std(run: Run, key: str, spec: str = ".4g") -> str:
  std = run.spread(key)
  text = _fmt(run.value(key), spec)
  return text if std is None or text == "n/a" else f"{text} +- {_fmt(std, '.2g')}"


def table(runs: Sequence[Run]) -> list[str]:
  """Markdown table rows (header first); FLOPs relative to the first run; mean +- std over
  seeds for multi-seed runs."""
  with_auc = any(r.value("weight_auc") is not None for r in runs)
  header = ["run", "task", "algorithm", "seeds", "test accuracy", "rounds",
            "cumulative client FLOPs", "FLOPs vs first", "min coverage x", "min coverage y",
            "wall time (s)"]
  if with_auc:
    header.append("weight AUC")
  base = runs[0].value("cumulative_client_flops") if runs else None
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in runs:
    flops = r.value("cumulative_client_flops")
    rel = flops / base if flops is not None and base else None
    row = [r.label, _fmt(r.value("task")), _fmt(r.value("algorithm")), str(r.num_seeds),
           _mean_std(r, "test_accuracy"), _fmt(r.value("rounds"), ".0f"), _fmt(flops, ".3e"),
           _fmt(rel, ".3f"), _fmt(r.value("min_coverage_x")), _fmt(r.value("min_coverage_y")),
           _fmt(r.value("wall_time_s"), ".1f")]
    if with_auc:
      row.append(_mean_std(r, "weight_auc"))
    lines.append("| " + " | ".join(row) + " |")
  return lines


def write_markdown(path: str, runs: Sequence[Run], unfinished: Sequence[Unfinished]) -> None:
  lines = ["# Run comparison", ""]
  if runs:
    lines += table(runs) + [""]
    lines.append("Test accuracy is a fraction; FLOPs are analytic client FLOPs of the submodels "
                 "actually run, relative to the first row.")
    extra = [f"{r.label}: unweighted baseline {_mean_std(r, 'unweighted_test_accuracy')}"
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


def seed_curves(run: Run, xkey: str, ykey: str) -> tuple[list[float], np.ndarray]:
  """(x values logged by every seed, ykey at them [seeds, points]); x may be empty."""
  curves = [{rec[xkey]: rec[ykey] for rec in seed if xkey in rec and rec.get(ykey) is not None}
            for seed in run.records]
  xs = sorted(set.intersection(*(set(c) for c in curves)))
  return xs, np.array([[c[x] for x in xs] for c in curves])


def plot(path: str, runs: Sequence[Run]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for xkey, ax in zip(("round", "cumulative_client_flops"), axes):
    for r in runs:
      xs, ys = seed_curves(r, xkey, "test_accuracy")
      if not xs:
        continue
      label = r.label if r.num_seeds == 1 else f"{r.label} (mean of {r.num_seeds} seeds)"
      line, = ax.plot(xs, ys.mean(axis=0), marker=".", label=label)
      if r.num_seeds > 1:
        ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xkey.replace("_", " "))
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
  axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


DIAGNOSTIC_PANELS = (("diag_cosine", "cosine(estimate, true hypergradient)"),
                     ("diag_relative_error", "||estimate - true|| / ||true||"),
                     ("never_covered_x_share", "share of x never covered so far"))


def plot_diagnostics(path: str, runs: Sequence[Run]) -> bool:
  """Estimate quality against rounds (runs made with --diagnose_every); False if none has it."""
  with_diag = [r for r in runs if any("diag_cosine" in rec for seed in r.records for rec in seed)]
  if not with_diag:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(DIAGNOSTIC_PANELS), figsize=(5 * len(DIAGNOSTIC_PANELS), 3.8))
  for (key, label), ax in zip(DIAGNOSTIC_PANELS, axes):
    for r in with_diag:
      xs, ys = seed_curves(r, "round", key)
      if xs:
        ax.plot(xs, ys.mean(axis=0), marker=".", label=r.label)
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv):
  del argv
  problems = []
  paths = WORKDIRS.value or []
  if not paths:
    problems.append("--workdirs is required: a comma-separated list of run workdirs.")
  labels = LABELS.value or paths
  if LABELS.value and len(LABELS.value) != len(paths):
    problems.append(f"--labels has {len(LABELS.value)} entries but --workdirs has {len(paths)}; "
                    "give one label per workdir.")
  out = OUT.value or common.WORKDIR.value
  if not out:
    problems.append("--out (or --workdir) is required: the directory for compare.png and "
                    "compare.md.")
  loaded = []
  if not (LABELS.value and len(LABELS.value) != len(paths)):
    for path, label in zip(paths, labels):
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
  plot(os.path.join(out, "compare.png"), runs)
  if plot_diagnostics(os.path.join(out, "compare_diagnostics.png"), runs):
    print(f"wrote {os.path.join(out, 'compare_diagnostics.png')} (estimate quality)")
  print("\n".join(table(runs)))
  print(f"wrote {os.path.join(out, 'compare.md')} and {os.path.join(out, 'compare.png')}")


if __name__ == "__main__":
  app.run(main)
