"""The benchmark at a git revision and at this checkout, side by side: a maintainer tool over this
repository's history, run by the benchmark's --compare (docs/measurement.md). Both sides get the
benchmark's other flags; WORKDIR/compare.json holds the medians and their ratio.

  python -m experiments.benchmark --quick --compare=HEAD~1 --passes=2 --workdir=runs/cmp
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Any

from bilevel.metrics import commit, write_json
from experiments import common
from experiments.compare import fmt, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  """Benchmark processes of `ref` (checked out in WORKDIR/ref_tree) and of this checkout,
  alternating; every figure's medians and their ratio to WORKDIR/compare.json."""
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
