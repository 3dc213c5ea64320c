r"""Theory check (docs/method.md, section 10): flags -> bilevel/tasks/coverage_rate.py's parts
(--parts) -> config.json, metrics.jsonl (one line per run), summary.json (computed from those
lines, with the wall time per part), coverage_rate.png (the rate part, log-log). Inner and v steps
are "fixed" unless --inner_step / --v_step say otherwise; the other shared federated flags are
fixed per algorithm and rejected here.

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
GRAD_NOISE = flags.DEFINE_float("grad_noise", 3.0, "Std of the noise on each first-order gradient.")
HETEROGENEITY = flags.DEFINE_float("heterogeneity", 0.5, "Client heterogeneity, in [0, 1].")
DIM = flags.DEFINE_integer("dim", 32, "Coordinates of x (= of y); a multiple of 8.")
ALPHA0 = flags.DEFINE_float("alpha0", 0.5, "alpha = alpha0 * sqrt(C / Q) (RAFBO: / K per local "
                            "step); alpha0 * sqrt(max C / min Q) must be <= 1.")
PARTS = flags.DEFINE_list("parts", list(sweep.PARTS), f"Parts to run: {', '.join(sweep.PARTS)}. "
                          "--quick runs only rate unless given.")
FIXED_ALPHA = flags.DEFINE_float("fixed_alpha", 0.05, "The step_rules part's fixed outer step "
                                 "(RAFBO: / K per local step).")
UNEVEN_PATTERNS = flags.DEFINE_list(
    "uneven_patterns", ["4/4/4/4", "2/6/2/6", "1/7/1/7", "1/1/1/1", "1/3/1/3", "1/7/7/7"],
    "Coverage patterns of the uneven part: c1/c2/... per block of 8 coordinates, rotating by "
    "round (theory.pattern_schedule); each entry in 1..8, the length dividing --dim / 8.")
PART_ROUNDS = flags.DEFINE_list("part_rounds", ["256", "1024", "4096"],
                                "Numbers of rounds Q of the step_rules and uneven parts.")
PART_SEEDS = flags.DEFINE_integer("part_seeds", 3, "Runs per point of step_rules and uneven.")
BIAS_DELTAS = flags.DEFINE_list("bias_deltas", ["0.001", "0.1", "0.3", "1"],
                                "fd probe lengths delta of the bias part.")
BIAS_HETEROGENEITY = flags.DEFINE_float("bias_heterogeneity", 0.0,
                                        "Client heterogeneity of the bias part, in [0, 1].")
# --quick: these Q, 3 seeds and the rate part only, unless those flags are given (under a minute
# on 2 CPU cores). --smoke (tests): Q = 16, 32, one seed, the first two coverages, patterns and
# deltas, and short bias runs.
QUICK_ROUNDS, QUICK_SEEDS, QUICK_PART_ROUNDS = (64, 128, 256, 512, 1024), 3, (64, 256, 1024)
SMOKE_ROUNDS = (16, 32)
_SHARED_FLAGS_USED = ("workdir", "seed", "resume", "quick", "smoke", "algorithms", "v_step",
                      "inner_step")


def _flag(flag: Any, quick: Any = None, convert: Callable[[str], Any] | None = None,
          what: str = "") -> Any:
  """The flag's value (its --quick default under --quick when not given), each entry converted."""
  values = quick if quick is not None and common.QUICK.value and not flag.present else flag.value
  try:
    return values if convert is None else tuple(convert(v) for v in values)
  except ValueError:
    raise ConfigError(f"--{flag.name}={','.join(map(str, values))} must be {what}.") from None


def config_from_flags() -> sweep.SweepConfig:
  ignored = sorted(f.name for f in flags.FLAGS.flags_by_module_dict().get("experiments.common", [])
                   if f.present and f.name not in _SHARED_FLAGS_USED)
  if ignored:
    raise ConfigError(f"{', '.join('--' + n for n in ignored)} not used by coverage_rate: its "
                      "federated settings are fixed per algorithm (see its docstring); sweep with "
                      "--coverages, --rounds_list, --num_seeds, --grad_noise, --alpha0.")
  ints = lambda flag, quick=None: tuple(sorted(set(_flag(
      flag, quick, int, "a comma-separated list of integers"))))
  steps = {n: flags.FLAGS[n].value if flags.FLAGS[n].present else "fixed"  # not the library's
           for n in ("v_step", "inner_step")}
  cfg = sweep.SweepConfig(
      algorithms=tuple(dict.fromkeys(common.algorithm_list(DEFAULT_ALGORITHMS))),
      coverages=ints(COVERAGES), rounds_list=ints(ROUNDS_LIST, QUICK_ROUNDS),
      num_seeds=_flag(NUM_SEEDS, QUICK_SEEDS), grad_noise=GRAD_NOISE.value,
      heterogeneity=HETEROGENEITY.value, dim=DIM.value, alpha0=ALPHA0.value,
      seed=common.SEED.value, parts=tuple(dict.fromkeys(_flag(PARTS, ["rate"]))), **steps,
      fixed_alpha=FIXED_ALPHA.value,
      uneven_patterns=tuple(dict.fromkeys(_flag(
          UNEVEN_PATTERNS, convert=lambda v: tuple(int(c) for c in v.split("/")),
          what="coverages like 1/7/1/7 separated by commas"))),
      bias_deltas=tuple(sorted(set(_flag(BIAS_DELTAS, convert=float,
                                         what="a comma-separated list of numbers")))),
      bias_heterogeneity=BIAS_HETEROGENEITY.value, bias_rounds=sweep.BIAS_ROUNDS,
      part_rounds=ints(PART_ROUNDS, QUICK_PART_ROUNDS), part_seeds=PART_SEEDS.value)
  if common.SMOKE.value:
    cfg = cfg._replace(
        rounds_list=SMOKE_ROUNDS, num_seeds=1, coverages=cfg.coverages[:2],
        part_rounds=SMOKE_ROUNDS, part_seeds=1, uneven_patterns=cfg.uneven_patterns[:2],
        bias_deltas=cfg.bias_deltas[:2], bias_rounds=(sweep.BIAS_TAIL // 4, sweep.BIAS_TAIL // 2))
  sweep.validate(cfg)
  return cfg


def plot(path: str, cfg: sweep.SweepConfig, means: dict, slopes: dict) -> None:
  import matplotlib  # imported here: only the driver plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(cfg.algorithms), figsize=(5 * len(cfg.algorithms), 4),
                           squeeze=False, sharey=True)
  q = np.array(cfg.rounds_list, dtype=float)
  for ax, alg in zip(axes[0], cfg.algorithms):
    for c in cfg.coverages:
      ax.loglog(q, [means[alg][str(c)][str(r)] for r in cfg.rounds_list], "o-",
                label=f"C_x*={c} (slope {slopes[alg][str(c)]:.2f})")
    ref = means[alg][str(cfg.coverages[0])][str(cfg.rounds_list[0])] * (q / q[0]) ** -0.5
    ax.loglog(q, ref, "k--", lw=1, label="Q^-1/2")
    ax.set(title=f"{alg.upper()}: alpha = {cfg.alpha0:g} sqrt(C_x*/Q)", xlabel="rounds Q")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("(1/Q) sum_q ||grad Phi(x_q)||^2")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def print_tables(cfg: sweep.SweepConfig, summary: dict) -> None:
  """The rate part's table, then each part's main fits (summary.json holds everything)."""
  if "rate" in cfg.parts:
    print("alg    C_x* " + "".join(f"{'Q=' + str(q):>11}" for q in cfg.rounds_list) + "      slope")
    for alg in cfg.algorithms:
      for c in cfg.coverages:
        row = "".join(f"{summary['avg_sq_grad_norm'][alg][str(c)][str(q)]:11.4g}"
                      for q in cfg.rounds_list)
        print(f"{alg:6s} {c:4d} {row} {summary['slopes'][alg][str(c)]:10.3f}")
  fits = dict(
      rate=lambda: {k: summary[k] for k in ("coverage_ratio", "c_exponents", "joint_exponents")},
      step_rules=lambda: {rule: {alg: st["noise_term_exponents"]["c_exponents"]  # noise term vs C
                                 for alg, st in per_alg.items()}
                          for rule, per_alg in summary["step_rules"].items()},
      uneven=lambda: {alg: st["exponents"] for alg, st in summary["uneven"].items()},
      bias=lambda: {k: summary["bias"][k] for k in ("floor", "c_exponents", "delta_exponents")})
  short = lambda t: ({k: short(v) for k, v in t.items()} if isinstance(t, dict) else
                     float(f"{t:.4g}") if isinstance(t, float) else t)  # 4 significant digits
  for part in cfg.parts:
    print(f"{part}:", json.dumps(short(fits[part]())))


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
  records, part_times = [], {}

  def emit(record: dict) -> None:
    records.append(to_python(record))
    writer(records[-1])

  with jax.enable_x64(True), contextlib.closing(
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"))) as writer:
    for part in cfg.parts:
      t0 = time.perf_counter()
      sweep.sweep_part(cfg, part, emit, log=lambda line: print(line, flush=True))
      part_times[part] = time.perf_counter() - t0
  summary = dict(sweep.summarize(cfg, records), part_wall_time_s=part_times,
                 wall_time_s=time.perf_counter() - start)
  if "rate" in cfg.parts:
    plot(os.path.join(workdir, "coverage_rate.png"), cfg, summary["avg_sq_grad_norm"],
         summary["slopes"])
  print_tables(cfg, summary)
  common.write_summary(workdir, summary)


if __name__ == "__main__":
  app.run(main)
