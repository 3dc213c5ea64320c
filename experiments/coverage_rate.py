"""Theory check (docs/method.md, section 10; docs/tools.md): flags -> the parts of
bilevel.tasks.coverage_rate -> config.json, metrics.jsonl, summary.json, coverage_rate.png.

    python -m experiments.coverage_rate --workdir=/tmp/coverage_rate --quick
"""
import contextlib
import os
import time
from typing import Any, Callable, Sequence

from absl import app, flags
import jax

from bilevel.errors import ConfigError
from bilevel.metrics import JsonlWriter, to_python
from bilevel.tasks import coverage_rate as sweep
from experiments import common

flags.DEFINE_list("coverages", ["1", "2", "4", "8"], "Outer coverages C_x* to sweep, in 1..8.")
flags.DEFINE_list("rounds_list", ["64", "128", "256", "512", "1024", "2048", "4096"], "Q to sweep.")
flags.DEFINE_integer("num_seeds", 5, "Runs per (algorithm, C, Q), averaged.")
flags.DEFINE_float("grad_noise", 3.0, "Std of the noise on each first-order gradient.")
flags.DEFINE_float("heterogeneity", 0.5, "Client heterogeneity, in [0, 1].")
flags.DEFINE_integer("dim", 32, "Coordinates of x (= of y); a multiple of 8.")
flags.DEFINE_float("alpha0", 0.5, "alpha = alpha0 sqrt(C / Q) (RAFBO: / K per local step).")
flags.DEFINE_list("parts", list(sweep.PARTS), f"Parts to run: {', '.join(sweep.PARTS)}.")
flags.DEFINE_float("fixed_alpha", 0.05, "The step_rules part's fixed outer step (RAFBO: / K).")
flags.DEFINE_list("uneven_patterns", ["4/4/4/4", "2/6/2/6", "1/7/1/7", "1/1/1/1", "1/3/1/3",
                                      "1/7/7/7"], "The uneven part's coverages c1/c2/...")
flags.DEFINE_list("part_rounds", ["256", "1024", "4096"], "Q of the step_rules and uneven parts.")
flags.DEFINE_integer("part_seeds", 3, "Runs per point of step_rules and uneven.")
flags.DEFINE_list("bias_deltas", ["0.001", "0.1", "0.3", "1"], "The bias part's fd deltas.")
flags.DEFINE_float("bias_heterogeneity", 0.0, "Client heterogeneity of the bias part, in [0, 1].")
_SHARED_FLAGS_USED = ("workdir", "seed", "resume", "quick", "smoke", "algorithms", "v_step",
                      "inner_step")


def _value(name: str, convert: Callable[[Any], Any],
           what: str = "a comma-separated list of integers") -> Any:
  """--name converted (--quick: sweep.QUICK's value if the flag is not given)."""
  quick = common.QUICK.value and not flags.FLAGS[name].present and name in sweep.QUICK
  values = sweep.QUICK[name] if quick else flags.FLAGS[name].value
  try:
    return convert(values)
  except ValueError:
    raise ConfigError(f"--{name}={','.join(map(str, values))} must be {what}.") from None


def config_from_flags() -> sweep.SweepConfig:
  ignored = sorted(f.name for f in flags.FLAGS.flags_by_module_dict().get("experiments.common", [])
                   if f.present and f.name not in _SHARED_FLAGS_USED)
  if ignored:
    raise ConfigError(f"{', '.join('--' + n for n in ignored)} not used by coverage_rate: its "
                      "federated settings are fixed per algorithm (docs/tools.md); sweep with "
                      "--coverages, --rounds_list, --num_seeds, --grad_noise, --alpha0.")
  ints = lambda values: tuple(sorted({int(v) for v in values}))
  distinct = lambda values: tuple(dict.fromkeys(values))
  pattern = lambda v: tuple(int(c) for c in v.split("/"))
  given = common.ALGORITHM_LIST.value  # --algorithms; default rabo, rafbo
  cfg = sweep.SweepConfig(
      algorithms=distinct(("rabo", "rafbo") if given is None else given), seed=common.SEED.value,
      coverages=_value("coverages", ints), rounds_list=_value("rounds_list", ints),
      part_rounds=_value("part_rounds", ints), num_seeds=_value("num_seeds", int),
      parts=_value("parts", distinct), uneven_patterns=_value(
          "uneven_patterns", lambda values: distinct(map(pattern, values)),
          "coverages like 1/7/1/7 separated by commas"),
      bias_deltas=_value("bias_deltas", lambda values: tuple(sorted({float(v) for v in values})),
                         "a comma-separated list of numbers"),
      bias_rounds=sweep.BIAS_ROUNDS,  # read here: tests shorten it
      **{n: flags.FLAGS[n].value for n in ("grad_noise", "heterogeneity", "dim", "alpha0",
                                           "fixed_alpha", "bias_heterogeneity", "part_seeds")},
      **{n: flags.FLAGS[n].value if flags.FLAGS[n].present else "fixed"  # not the library's
         for n in ("v_step", "inner_step")})
  cfg = sweep.smoke(cfg) if common.SMOKE.value else cfg
  sweep.validate(cfg)
  return cfg


def main(argv: Sequence[str]) -> None:
  common.start_driver(argv=argv)
  cfg = common.gather([], config_from_flags)[0]
  workdir = common.require_workdir()
  common.start_run(workdir, cfg._asdict())  # removes earlier results, writes config.json
  start, records, part_times = time.perf_counter(), [], {}

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
    sweep.plot_rate(os.path.join(workdir, "coverage_rate.png"), cfg, summary)
  print(sweep.report(cfg, summary))
  common.write_summary(workdir, summary)


if __name__ == "__main__":
  app.run(main)
