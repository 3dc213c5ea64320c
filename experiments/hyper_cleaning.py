r"""Federated data hyper-cleaning (README, Expected results, task 2): the driver.

The task (data, model, problem, sampler, masks, heterofl's and fedrolex's readings, metrics,
op prices) is bilevel/tasks/hyper_cleaning.py; this driver reads the flags, builds it and runs
it with dense clients (the compact path does not take client-owned units). Task defaults
(task.DEFAULTS) apply to the shared flags not given; an --algorithm preset still sets its own.
--baseline_unweighted also runs the same round from logits task.BASELINE_LOGIT (every weight 1)
into WORKDIR/unweighted/ and adds `unweighted_test_accuracy` and `accuracy_gain` to the summary.

  python -m experiments.hyper_cleaning --workdir=runs/hc_rafbo --baseline_unweighted
  python -m experiments.hyper_cleaning --flagfile=experiments/presets/hyper_cleaning_default.cfg \
      --workdir=runs/hc
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bilevel import data as data_lib
from bilevel import algorithms
from bilevel.errors import ConfigError
from bilevel.masks import UnitLayout
from bilevel.problems import BilevelProblem
from bilevel.tasks import hyper_cleaning as task
from experiments import common

NOISE = flags.DEFINE_float("noise", 0.5, "Probability that a training label is replaced by a "
                           "uniformly random label (in [0, 1)).")
CLASSIFIER = flags.DEFINE_enum("classifier", "linear", ["linear", "mlp"],
                               "Inner model y: linear (multinomial logistic regression) or mlp.")
# --hidden and --activation (of --classifier=mlp) are defined once in common.py: the
# hyper-representation driver shares them (this task's default width, 100: task.DEFAULTS).
HIDDEN = common.HIDDEN
ACTIVATION = common.ACTIVATION
REG = flags.DEFINE_float("reg", 1e-3, "c in g_i: + c ||y||^2 (>= 0).")
BASELINE_UNWEIGHTED = flags.DEFINE_boolean(
    "baseline_unweighted", False, "Also train y on the noisy labels with all weights 1 (same "
    "rounds and settings) into WORKDIR/unweighted/; the summary gets unweighted_test_accuracy.")


def _given(name: str) -> bool:  # parsed, or assigned in code (FLAGS.name = v, flagsaver)
  return bool(flags.FLAGS[name].present) or not flags.FLAGS[name].using_default_value


def apply_task_defaults() -> dict[str, Any]:
  """Set task.DEFAULTS on the shared flags not given; return what was set (as Flag.value, which
  leaves a flag "not given": a second call is idempotent)."""
  applied = {name: value for name, value in task.DEFAULTS.items() if not _given(name)}
  for name, value in applied.items():
    flags.FLAGS[name].value = value
  return applied


def resolve_algorithm(problem: BilevelProblem, lay: UnitLayout
                      ) -> tuple[algorithms.Algorithm, dict[str, Any]]:
  """--algorithm for this task (validated) and the task's keywords that replace its resolved
  ones: heterofl prunes only y (task.heterofl_levels). The outer units are the samples each
  client owns: unit masks and dense clients only."""
  alg = common.make_algorithm(problem, lay)
  o = alg.options
  if o.granularity != "unit":
    raise ConfigError(f"mask_granularity={o.granularity!r}: hyper-cleaning's outer units "
                      "are the samples each client owns, which only unit masks know about; use "
                      "--mask_granularity=unit.")
  if _given("submodel") and common.SUBMODEL.value != "dense":
    raise ConfigError(f"--submodel={common.SUBMODEL.value}: hyper-cleaning runs dense clients "
                      "only (the compact path does not take the samples each client owns as "
                      "units); use --submodel=dense or leave the flag unset.")
  levels = (task.heterofl_levels(o.levels, o.mask_policy, o.allow_uncovered)
            if common.ALGORITHM.value == "heterofl" else None)
  if levels is None:
    return alg, {}
  return common.make_algorithm(problem, lay, levels=levels), dict(levels=levels)


def main(argv):
  del argv
  common.start_driver()
  common.for_each_seed(prepare_one)


def prepare_one() -> list[common.SeedRun]:
  """The runs of --seed into --workdir, built and not started: the weighted run, then with
  --baseline_unweighted its baseline in WORKDIR/unweighted (the last one's finish gives the
  seed's summary)."""
  task_defaults = apply_task_defaults()
  problems = common.check_shared_flags()
  if not 0.0 <= NOISE.value < 1.0:
    problems.append(f"--noise={NOISE.value} is outside the allowed range [0, 1).")
  if not REG.value >= 0.0:
    problems.append(f"--reg={REG.value} is outside the allowed range [0, inf).")
  shape_free = task.layout(CLASSIFIER.value, 1, 1, max(HIDDEN.value, 1))  # for validation only
  setting = task.setting(CLASSIFIER.value, ACTIVATION.value, common.BATCH_SIZE.value, REG.value)
  (alg, overrides), ds = common.gather(
      problems, lambda: resolve_algorithm(setting.problem, shape_free), common.load_data)
  resolved, o = alg, alg.options
  try:
    cd = task.build_data(ds, common.NUM_CLIENTS.value, common.PARTITION.value, noise=NOISE.value,
                         val_fraction=common.VAL_FRACTION.value, alpha=common.ALPHA.value,
                         seed=o.seed)
    lay, x0, y0 = task.model(CLASSIFIER.value, cd.num_samples, ds, HIDDEN.value, o.seed)
    alg = common.make_algorithm(
        setting.problem, lay, **overrides, diagnostics=common.DIAGNOSE_EVERY.value > 0,
        sample=setting.sample, mesh=common.client_mesh(),
        **task.round_keywords(cd, lay, CLASSIFIER.value, common.BATCH_SIZE.value,
                              mask_policy=o.mask_policy, granularity=o.granularity))
    rnd = alg.make_round(x0)
  except (ConfigError, data_lib.DataError) as e:
    common.fail(str(e))
  workdir = common.require_workdir()
  task_config = dict(task="hyper_cleaning", noise=NOISE.value, classifier=CLASSIFIER.value,
                     hidden=HIDDEN.value, activation=ACTIVATION.value, reg=REG.value,
                     dataset=data_lib.dataset_summary(ds), num_samples=cd.num_samples,
                     clean_share=float(cd.clean.mean()), replaced_share=float(cd.replaced.mean()),
                     submodel="dense", task_defaults_applied=task_defaults)
  print(data_lib.dataset_summary(ds))
  print(f"{cd.num_samples} training samples, {1 - cd.clean.mean():.1%} with a wrong label "
        f"(noise {NOISE.value}); classifier {CLASSIFIER.value}")
  evaluate = task.make_evaluate(ds, cd, setting.logits_fn)
  specs = [(workdir, True, x0, "hyper-cleaning")]
  if BASELINE_UNWEIGHTED.value:
    specs.append((os.path.join(workdir, "unweighted"), False,
                  dict(x0, logits=jnp.full_like(x0["logits"], task.BASELINE_LOGIT)),
                  "hyper-cleaning, unweighted baseline"))
    print(f"baseline: every sample weight fixed to 1 (noisy labels), in {specs[-1][0]}")
  summary: dict[str, Any] = {}  # the seed's summary, filled by its runs' finish in order
  runs = []
  for i, (run_dir, weighted, x_start, title) in enumerate(specs):
    os.makedirs(run_dir, exist_ok=True)
    resume = common.start_run(run_dir, dict(common.config_dict(resolved), weighted=weighted,
                                            **task_config))
    init_logit = float(np.asarray(x_start["logits"])[0])
    runs.append(common.SeedRun(
        run_dir, rnd, alg.init(x_start, y0), cd.fed,
        functools.partial(evaluate, init_logit=init_logit), f"{title}, {common.ALGORITHM.value}",
        resume, functools.partial(finish_run, workdir, run_dir, weighted, summary,
                                  i == len(specs) - 1),
        task.cleaning_problem(setting.logits_fn, REG.value)))
  return runs


def finish_run(workdir: str, run_dir: str, weighted: bool, summary: dict[str, Any], last: bool,
               records: list[dict[str, Any]]) -> dict[str, Any]:
  """A finished run's part of the seed's summary.json (written after each run; the unweighted
  baseline writes its own and adds unweighted_test_accuracy / accuracy_gain to the seed's)."""
  figures = dict(common.run_summary("hyper_cleaning", records[-1], *task.WEIGHT_METRICS),
                 weighted=weighted)
  if weighted:
    summary.update(figures)
  else:
    common.write_summary(run_dir, figures)
    summary.update(unweighted_test_accuracy=figures["test_accuracy"],
                   unweighted_wall_time_s=figures["wall_time_s"],
                   accuracy_gain=summary["test_accuracy"] - figures["test_accuracy"])
  common.write_summary(workdir, summary)
  if last:
    common.print_final(summary)
  return dict(summary)


if __name__ == "__main__":
  app.run(main)
