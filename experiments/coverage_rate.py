r"""Theory check: convergence against the outer coverage C_x* and the rounds Q (docs/method.md,
section 10), in four parts (--parts: rate, step_rules, uneven, bias). The sweep (problems,
algorithm settings, step rules, the compiled runner, the parts, the summary) is
bilevel/tasks/coverage_rate.py; this driver reads the flags, runs the parts and writes:

  config.json; metrics.jsonl, one line per run; summary.json (`summarize` of those lines, with
  the wall time per part); coverage_rate.png (the rate part, log-log, one line per C).

The inner and v steps are "fixed" unless --inner_step / --v_step say otherwise (the affine
argument of bilevel/theory.py holds with K = 1); the other shared federated flags are fixed per
algorithm and rejected here.

    python -m experiments.coverage_rate --workdir=/tmp/coverage_rate --quick
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from bilevel.errors import ConfigError
from bilevel.metrics import JsonlWriter, to_python
from bilevel.tasks import coverage_rate as sweep
from experiments import common

DEFAULT_ALGORITHMS = ("rabo", "rafbo")  # --algorithms (experiments/common.py) when not given
COVERAGES = flags.DEFINE_list("coverages", ["1", "2", "4", "8"],
                              "Outer coverages C_x* to sweep, each in 1..8 (clients per round).")
ROUNDS_LIST = flags.DEFINE_list("rounds_list", ["64", "128", "256", "512", "1024", "2048", "4096"],
                                "Numbers of rounds Q to sweep (at least two distinct values).")
NUM_SEEDS = flags.DEFINE_integer("num_seeds", 5, "Runs per (algorithm, C, Q), averaged.")
GRAD_NOISE = flags.DEFINE_float("grad_noise", 3.0, "Std sigma of the Gaussian noise on every "
                                 "first-order gradient of the synthetic problem.")
HETEROGENEITY = flags.DEFINE_float("heterogeneity", 0.5, "Client heterogeneity of the synthetic "
                                   "problem, in [0, 1].")
DIM = flags.DEFINE_integer("dim", 32, "Coordinates of x (= of y); a multiple of 8.")
ALPHA0 = flags.DEFINE_float("alpha0", 0.5, "alpha = alpha0 * sqrt(C / Q) (RAFBO: / K per local "
                            "step); alpha0 * sqrt(max C / min Q) must be <= 1.")
PARTS_FLAG = flags.DEFINE_list("parts", list(sweep.PARTS), "Parts to run "
                               "(bilevel/tasks/coverage_rate.py): "
                               f"{', '.join(sweep.PARTS)}. --quick runs only rate unless given.")
FIXED_ALPHA = flags.DEFINE_float("fixed_alpha", 0.05, "The step_rules part's fixed outer step "
                                 "(RAFBO: / K per local step), the same for every C and Q.")
UNEVEN_PATTERNS = flags.DEFINE_list(
    "uneven_patterns", ["4/4/4/4", "2/6/2/6", "1/7/1/7", "1/1/1/1", "1/3/1/3", "1/7/7/7"],
    "Coverage patterns of the uneven part: c1/c2/... per block of 8 coordinates, rotating by "
    "round (theory.pattern_schedule); each entry in 1..8, the length dividing --dim / 8.")
PART_ROUNDS = flags.DEFINE_list("part_rounds", ["256", "1024", "4096"], "Numbers of rounds Q of "
                                "the step_rules and uneven parts (at least two distinct values).")
PART_SEEDS = flags.DEFINE_integer("part_seeds", 3, "Runs per point of the step_rules and uneven "
                                  "parts, averaged.")
BIAS_DELTAS = flags.DEFINE_list("bias_deltas", ["0.001", "0.1", "0.3", "1"],
                                "fd probe lengths delta of the bias part.")
BIAS_HETEROGENEITY = flags.DEFINE_float("bias_heterogeneity", 0.0, "Client heterogeneity of the "
                                        "bias part's problems, in [0, 1].")

# --quick (common.QUICK): rounds 64..1024, 3 seeds and the rate part only unless those flags
# are given (under a minute on 2 CPU cores); with --parts naming step_rules or uneven, these Q.
QUICK_ROUNDS, QUICK_SEEDS, QUICK_PART_ROUNDS = (64, 128, 256, 512, 1024), 3, (64, 256, 1024)
# --smoke (common.SMOKE, for tests): these two Q, one seed, the first two coverages asked for,
# the first two patterns, two deltas and short bias runs.
SMOKE_ROUNDS = (16, 32)
# Shared flags this driver reads; giving another is an error rather than silently ignored.
_SHARED_FLAGS_USED = ("workdir", "seed", "resume", "quick", "smoke", "v_step", "inner_step")


def _parse(name: str, values: Sequence[str], convert: Callable[[str], Any], what: str) -> tuple:
  try:
    return tuple(convert(v) for v in values)
  except ValueError:
    raise ConfigError(f"--{name}={','.join(values)} must be {what}.") from None


def config_from_flags() -> sweep.SweepConfig:
  ignored = sorted(f.name for f in flags.FLAGS.flags_by_module_dict().get("experiments.common", [])
                   if f.present and f.name not in _SHARED_FLAGS_USED)
  if ignored:
    raise ConfigError(f"{', '.join('--' + n for n in ignored)} not used by coverage_rate: its "
                      "federated settings are fixed per algorithm (see its docstring); sweep with "
                      "--coverages, --rounds_list, --num_seeds, --grad_noise, --alpha0.")
  given = lambda name: flags.FLAGS[name].present
  quick = common.QUICK.value
  ints = lambda name, values: tuple(sorted(set(_parse(
      name, values, int, "a comma-separated list of integers"))))
  rounds = ints("rounds_list", QUICK_ROUNDS if quick and not given("rounds_list")
                else ROUNDS_LIST.value)
  part_rounds = ints("part_rounds", QUICK_PART_ROUNDS if quick and not given("part_rounds")
                     else PART_ROUNDS.value)
  seeds = QUICK_SEEDS if quick and not given("num_seeds") else NUM_SEEDS.value
  parts = ["rate"] if quick and not given("parts") else PARTS_FLAG.value
  coverages = ints("coverages", COVERAGES.value)
  patterns = tuple(dict.fromkeys(_parse("uneven_patterns", UNEVEN_PATTERNS.value,
                                        lambda v: tuple(int(c) for c in v.split("/")),
                                        "coverages like 1/7/1/7 separated by commas")))
  deltas = tuple(sorted(set(_parse("bias_deltas", BIAS_DELTAS.value, float,
                                   "a comma-separated list of numbers"))))
  part_seeds, bias_rounds = PART_SEEDS.value, sweep.BIAS_ROUNDS
  if common.SMOKE.value:
    rounds, seeds, coverages = SMOKE_ROUNDS, 1, coverages[:2]
    part_rounds, part_seeds = rounds, 1
    patterns, deltas = patterns[:2], deltas[:2]
    bias_rounds = (2 * sweep.BIAS_TAIL // 8, sweep.BIAS_TAIL // 2)
  for name, values in (("coverages", coverages), ("rounds_list", rounds),
                       ("part_rounds", part_rounds)):
    if not values:
      raise ConfigError(f"--{name} is empty; give at least one value.")
  cfg = sweep.SweepConfig(
      algorithms=tuple(dict.fromkeys(common.algorithm_list(DEFAULT_ALGORITHMS))),
      coverages=coverages, rounds_list=rounds, num_seeds=seeds, grad_noise=GRAD_NOISE.value,
      heterogeneity=HETEROGENEITY.value, dim=DIM.value, alpha0=ALPHA0.value,
      seed=common.SEED.value, parts=tuple(dict.fromkeys(parts)),
      v_step=common.V_STEP.value if given("v_step") else "fixed",
      inner_step=common.INNER_STEP.value if given("inner_step") else "fixed",
      fixed_alpha=FIXED_ALPHA.value, uneven_patterns=patterns, bias_deltas=deltas,
      bias_heterogeneity=BIAS_HETEROGENEITY.value, bias_rounds=tuple(sorted(set(bias_rounds))),
      part_rounds=part_rounds, part_seeds=part_seeds)
  sweep.validate(cfg)
  return cfg


# ------------------------------------------------------------------ plot and tables


def plot(path: str, cfg: sweep.SweepConfig, means: dict, slopes: dict) -> None:
  import matplotlib  # imported here: only the driver plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(cfg.algorithms), figsize=(5 * len(cfg.algorithms), 4),
                           squeeze=False, sharey=True)
  q = np.array(cfg.rounds_list, dtype=float)
  for ax, alg in zip(axes[0], cfg.algorithms):
    for c in cfg.coverages:
      ax.loglog(q, [means[alg][str(c)][str(int(r))] for r in q], "o-",
                label=f"C_x*={c} (slope {slopes[alg][str(c)]:.2f})")
    ref = means[alg][str(cfg.coverages[0])][str(cfg.rounds_list[0])] * (q / q[0]) ** -0.5
    ax.loglog(q, ref, "k--", lw=1, label="Q^-1/2")
    ax.set_title(f"{alg.upper()}: alpha = {cfg.alpha0:g} sqrt(C_x*/Q)")
    ax.set_xlabel("rounds Q")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("(1/Q) sum_q ||grad Phi(x_q)||^2")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _short(tree: Any) -> Any:
  """tree with its floats to 4 significant digits (for printing)."""
  if isinstance(tree, dict):
    return {k: _short(v) for k, v in tree.items()}
  return float(f"{tree:.4g}") if isinstance(tree, float) else tree


def print_tables(cfg: sweep.SweepConfig, summary: dict) -> None:
  """The rate part's table and each part's fitted exponents (summary.json holds everything)."""
  show = lambda tree: json.dumps(_short(tree))
  if "rate" in cfg.parts:
    print("alg    C_x* " + "".join(f"{'Q=' + str(q):>11}" for q in cfg.rounds_list) +
          "      slope")
    for alg in cfg.algorithms:
      for c in cfg.coverages:
        row = "".join(f"{summary['avg_sq_grad_norm'][alg][str(c)][str(q)]:11.4g}"
                      for q in cfg.rounds_list)
        print(f"{alg:6s} {c:4d} {row} {summary['slopes'][alg][str(c)]:10.3f}")
      r = summary["coverage_ratio"][alg]
      print(f"{alg}: at Q={r['rounds']} avg(C={r['coverage_low']}) / avg(C={r['coverage_high']}) "
            f"= {r['measured']:.3f} (1/sqrt(C) predicts {r['predicted']:.3f}); exponent of C at "
            f"each Q {show(summary['c_exponents'][alg])}; joint "
            f"{show(summary['joint_exponents'][alg])}; checks {show(summary['checks'][alg])}")
  for rule, per_alg in summary.get("step_rules", {}).items():
    for alg, st in per_alg.items():
      print(f"step rule {rule} {alg}: exponent of C at each Q " + show(
          {label: st[f"{label}_exponents"]["c_exponents"]
           for label in ("noisy", "noise_free", "noise_term")}))
  q = str(cfg.part_rounds[-1])
  for alg, st in summary.get("uneven", {}).items():
    print(f"uneven {alg} at Q={q}: noise term per pattern "
          f"{show({n: p['noise_term'][q] for n, p in st['patterns'].items()})}; exponents "
          f"{show(st['exponents'][q])}")
  if "bias" in summary:
    b = summary["bias"]
    print(f"bias floor {show(b['floor'])}; exponents in C {show(b['c_exponents'])}; in delta "
          f"{show(b['delta_exponents'])}")


def main(argv: Sequence[str]) -> None:
  common.start_driver()
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    cfg = config_from_flags()
  except ConfigError as e:
    common.fail(str(e))
  workdir = common.require_workdir()
  common.start_run(workdir, cfg._asdict())  # removes earlier results, writes config.json
  start = time.perf_counter()
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  records, part_times = [], {}

  def emit(record: dict) -> None:
    record = to_python(record)
    records.append(record)
    writer(record)

  with jax.enable_x64(True), contextlib.closing(writer):
    for part in cfg.parts:
      t0 = time.perf_counter()
      sweep.sweep_part(cfg, part, emit, log=lambda line: print(line, flush=True))
      part_times[part] = time.perf_counter() - t0
  summary = sweep.summarize(cfg, records)
  summary["part_wall_time_s"] = part_times
  summary["wall_time_s"] = time.perf_counter() - start
  if "rate" in cfg.parts:
    plot(os.path.join(workdir, "coverage_rate.png"), cfg, summary["avg_sq_grad_norm"],
         summary["slopes"])
  print_tables(cfg, summary)
  common.write_summary(workdir, summary)


if __name__ == "__main__":
  app.run(main)
