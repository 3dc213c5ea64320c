r"""Federated data hyper-cleaning (README, Expected results, task 2): the driver.

The task (data, model, problem, sampler, masks, heterofl's and fedrolex's readings, metrics,
op prices) is bilevel/tasks/hyper_cleaning.py; this driver reads the flags, builds it and runs
it. Clients run the dense computation (--submodel=compact is rejected: the compact path does
not take client-owned units). Explicit --mask_policy=static with r_x < 1 is rejected
(masks.check_coverable) unless --allow_uncovered.

--baseline_unweighted also trains the classifier on the noisy labels with every weight 1 (the
same rounds, algorithm, masks and seeds) into WORKDIR/unweighted/ and adds
`unweighted_test_accuracy` and `accuracy_gain` to the summary (the same compiled round started
from logits task.BASELINE_LOGIT).

Task defaults (bilevel.tasks.hyper_cleaning.DEFAULTS) apply to the shared flags not given; an --algorithm preset still
sets its own values (e.g. fednest's inner steps).

  python -m experiments.hyper_cleaning --workdir=runs/hc_rafbo --baseline_unweighted
  python -m experiments.hyper_cleaning --flagfile=experiments/presets/hyper_cleaning_default.cfg \
      --workdir=runs/hc
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bilevel import data as data_lib
from bilevel import algorithms, federated
from bilevel.errors import ConfigError
from bilevel.masks import UnitLayout
from bilevel.problems import BilevelProblem
from bilevel.tasks import hyper_cleaning as task
from experiments import common

PyTree = Any

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


def _given(name: str) -> bool:
  """Parsed (command line, flagfile) or assigned in code (FLAGS.name = v, absl's flagsaver)."""
  flag = flags.FLAGS[name]
  return bool(flag.present) or not flag.using_default_value


def apply_task_defaults() -> dict[str, Any]:
  """Set task.DEFAULTS on the shared flags that were not given; return what was set.

  Setting Flag.value directly leaves the flag "not given", so a second call is idempotent.
  """
  applied = {}
  for name, value in task.DEFAULTS.items():
    if not _given(name):
      flags.FLAGS[name].value = value
      applied[name] = value
  return applied



def task_overrides(cfg: federated.FederatedConfig, algorithm: str,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Task-specific readings of an algorithm (module docstring), as bilevel.algorithms keywords
  that replace its resolved ones: heterofl prunes only y (levels with r_x = 1)."""
  if cfg.mask.granularity != "unit":
    raise ConfigError(f"mask_granularity={cfg.mask.granularity!r}: hyper-cleaning's outer units "
                      "are the samples each client owns, which only unit masks know about; use "
                      "--mask_granularity=unit.")
  if _given("submodel") and common.SUBMODEL.value != "dense":
    raise ConfigError(f"--submodel={common.SUBMODEL.value}: hyper-cleaning runs the dense "
                      "(masked full-size) client computation only: its outer units are the "
                      "samples each client owns, which the compact path does not support; use "
                      "--submodel=dense or leave the flag unset.")
  if algorithm == "heterofl":
    levels = task.heterofl_levels(cfg.levels, cfg.mask.policy, cfg.allow_uncovered, log)
    if levels is not None:
      return dict(levels=levels)
  return {}


def resolve_algorithm(problem: BilevelProblem, lay: UnitLayout
                      ) -> tuple[algorithms.Algorithm, dict[str, Any]]:
  """--algorithm for this task (validated) and the task's overrides of it (task_overrides)."""
  alg = common.make_algorithm(problem, lay)
  overrides = task_overrides(alg.config, common.ALGORITHM.value)
  return (common.make_algorithm(problem, lay, **overrides) if overrides else alg), overrides


# ------------------------------------------------------------------ driver


def check_task_flags() -> list[str]:
  problems = common.check_shared_flags()
  if not 0.0 <= NOISE.value < 1.0:
    problems.append(f"--noise={NOISE.value} is outside the allowed range [0, 1).")
  if not REG.value >= 0.0:
    problems.append(f"--reg={REG.value} is outside the allowed range [0, inf).")
  if HIDDEN.value < 1:
    problems.append(f"--hidden={HIDDEN.value} must be >= 1.")
  return problems


def build(cfg: federated.FederatedConfig, overrides: Mapping[str, Any], setting: task.Setting,
          ds: data_lib.Dataset, cd: task.CleaningData
          ) -> tuple[algorithms.Algorithm, federated.Round, PyTree, PyTree]:
  """The algorithm (bilevel.algorithms.get with the task's keywords), its round and the initial
  (x, y); cfg: the resolved configuration (resolve_algorithm), overrides: the task's keywords."""
  in_dim = int(np.prod(ds.input_shape))
  lay = task.layout(CLASSIFIER.value, cd.num_samples, in_dim, HIDDEN.value)
  x0, y0 = task.init_params(jax.random.fold_in(federated.stream_key(cfg.seed, "init"), 0),
                            CLASSIFIER.value, cd.num_samples, in_dim, HIDDEN.value,
                            ds.num_classes)
  alg = common.make_algorithm(
      setting.problem, lay, **overrides, diagnostics=common.DIAGNOSE_EVERY.value > 0,
      sample=setting.sample, mesh=common.client_mesh(),
      **task.round_keywords(cd, lay, CLASSIFIER.value, common.BATCH_SIZE.value, cfg.mask))
  return alg, alg.make_round(x0), x0, y0


def summarize(last: Mapping[str, Any], weighted: bool = True) -> dict[str, Any]:
  return dict(common.run_summary("hyper_cleaning", last, "weight_auc", "weight_precision",
                                 "weight_recall", "mean_weight_clean", "mean_weight_noisy",
                                 "samples_updated_share"), weighted=weighted)


def main(argv):
  del argv
  common.start_driver()
  common.for_each_seed(run_one, prepare_one)


def run_one() -> dict:
  """One run (and its unweighted baseline) with --seed into --workdir; returns its summary."""
  summary = {}
  for run in prepare_one():
    summary = common.run_prepared(run)
  return summary


def prepare_one() -> list[common.SeedRun]:
  """The runs of --seed into --workdir (the weighted run, then with --baseline_unweighted its
  baseline in WORKDIR/unweighted), built and not started (common.SeedRun); the last one's
  finish gives the seed's summary."""
  task_defaults = apply_task_defaults()
  problems = check_task_flags()
  shape_free = task.layout(CLASSIFIER.value, 1, 1, max(HIDDEN.value, 1))  # for validation only
  setting = task.setting(CLASSIFIER.value, ACTIVATION.value, common.BATCH_SIZE.value, REG.value)
  (alg, overrides), ds = common.gather(
      problems, lambda: resolve_algorithm(setting.problem, shape_free), common.load_data)
  cfg = alg.config
  try:
    cd = task.build_data(ds, common.NUM_CLIENTS.value, common.PARTITION.value, noise=NOISE.value,
                    val_fraction=common.VAL_FRACTION.value, alpha=common.ALPHA.value,
                    seed=cfg.seed)
    alg, rnd, x0, y0 = build(cfg, overrides, setting, ds, cd)
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
  specs = [(workdir, True, x0)]
  if BASELINE_UNWEIGHTED.value:
    print("baseline: the same round with every sample weight fixed to 1 (noisy labels), in "
          f"{os.path.join(workdir, 'unweighted')}")
    specs.append((os.path.join(workdir, "unweighted"), False,
                  dict(x0, logits=jnp.full_like(x0["logits"], task.BASELINE_LOGIT))))
  summary: dict[str, Any] = {}  # the seed's summary, filled by its runs' finish in order
  runs = []
  for i, (run_dir, weighted, x_start) in enumerate(specs):
    os.makedirs(run_dir, exist_ok=True)
    resume = common.start_run(run_dir, dict(common.config_dict(cfg), weighted=weighted,
                                            **task_config))
    init_logit = float(np.asarray(x_start["logits"])[0])
    title = ("hyper-cleaning" if weighted else "hyper-cleaning, unweighted baseline")
    finish = functools.partial(finish_run, workdir, run_dir, weighted, summary,
                               i == len(specs) - 1)
    runs.append(common.SeedRun(
        run_dir, rnd, alg.init(x_start, y0), cd.fed,
        functools.partial(evaluate, init_logit=init_logit),
        f"{title}, {common.ALGORITHM.value}", resume, finish,
        task.cleaning_problem(setting.logits_fn, REG.value)))
  return runs


def finish_run(workdir: str, run_dir: str, weighted: bool, summary: dict[str, Any], last: bool,
               records: list[dict[str, Any]]) -> dict[str, Any]:
  """A finished run's part of the seed's summary (weighted run: its figures; the unweighted
  baseline: its own summary.json and unweighted_test_accuracy / accuracy_gain in the seed's).
  The seed's summary.json is written after each run, the final table after the last."""
  if weighted:
    summary.update(summarize(records[-1], True))
  else:
    base = summarize(records[-1], False)
    common.write_summary(run_dir, base)
    summary.update(unweighted_test_accuracy=base["test_accuracy"],
                   unweighted_wall_time_s=base["wall_time_s"],
                   accuracy_gain=summary["test_accuracy"] - base["test_accuracy"])
  common.write_summary(workdir, summary)
  if last:
    print("final:")
    common.print_table({k: v for k, v in summary.items() if v is not None})
  return dict(summary)


if __name__ == "__main__":
  app.run(main)
