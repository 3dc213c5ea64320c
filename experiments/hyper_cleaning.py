r"""Federated data hyper-cleaning (README, task 2): flags (defaults: task.DEFAULTS, then an
--algorithm's own) -> bilevel.tasks.hyper_cleaning -> --algorithm (dense clients) -> run -> records.

  python -m experiments.hyper_cleaning --workdir=runs/hc_rafbo --baseline_unweighted
  python -m experiments.hyper_cleaning --flagfile=experiments/presets/hyper_cleaning_default.cfg \
      --workdir=runs/hc
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax.numpy as jnp
from absl import app, flags

from bilevel import data as data_lib
from bilevel import metrics
from bilevel.errors import ConfigError
from bilevel.tasks import hyper_cleaning as task
from experiments import common

NOISE = flags.DEFINE_float("noise", 0.5, "Probability that a training label is made random.")
CLASSIFIER = flags.DEFINE_enum("classifier", "linear", ["linear", "mlp"],
                               "Inner model y: linear (multinomial logistic regression) or mlp.")
HIDDEN, ACTIVATION = common.HIDDEN, common.ACTIVATION  # of --classifier=mlp
REG = flags.DEFINE_float("reg", 1e-3, "c in g_i: + c ||y||^2 (>= 0).")
BASELINE_UNWEIGHTED = flags.DEFINE_boolean("baseline_unweighted", False, "Also train y with every "
                                           "weight 1 into WORKDIR/unweighted/.")


def main(argv):
  del argv
  common.start_driver(task.DEFAULTS)
  common.for_each_seed(prepare_one)


def prepare_one() -> list[common.SeedRun]:
  """The runs of --seed into --workdir, built and not started: weighted, unweighted baseline."""
  problems = common.check_shared_flags()
  problems += [f"--{f.name}={f.value} is outside the allowed range {bounds}." for f, ok, bounds in (
      (NOISE, 0.0 <= NOISE.value < 1.0, "[0, 1)"), (REG, REG.value >= 0.0, "[0, inf)")) if not ok]
  shape_free = task.layout(CLASSIFIER.value, 1, 1, max(HIDDEN.value, 1))  # for validation only
  setting = task.setting(CLASSIFIER.value, ACTIVATION.value, common.BATCH_SIZE.value, REG.value)

  def resolve():  # the options (for config.json) and the keywords that replace them
    alg = common.make_algorithm(setting.problem, shape_free)
    o = alg.options
    if o.granularity != "unit":
      raise ConfigError(f"mask_granularity={o.granularity!r}: hyper-cleaning's outer units are "
                        "the samples each client owns; use --mask_granularity=unit.")
    if not flags.FLAGS["submodel"].using_default_value and common.SUBMODEL.value != "dense":
      raise ConfigError(f"--submodel={common.SUBMODEL.value}: hyper-cleaning runs dense clients "
                        "only (its units are samples); use --submodel=dense or leave it unset.")
    levels = (task.heterofl_levels(o.levels, o.mask_policy, o.allow_uncovered)  # y pruned only
              if alg.name == "heterofl" else None)
    if levels is None:
      return alg, {}
    return common.make_algorithm(setting.problem, shape_free, levels=levels), dict(levels=levels)

  (resolved, overrides), ds = common.gather(problems, resolve, common.load_data)
  o = resolved.options
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
  config = dict(
      common.config_dict(resolved), task="hyper_cleaning", noise=NOISE.value, reg=REG.value,
      classifier=CLASSIFIER.value, hidden=HIDDEN.value, activation=ACTIVATION.value,
      dataset=data_lib.dataset_summary(ds), num_samples=cd.num_samples, submodel="dense",
      clean_share=float(cd.clean.mean()), replaced_share=float(cd.replaced.mean()),
      task_defaults_applied={k: v for k, v in task.DEFAULTS.items()
                             if flags.FLAGS[k].using_default_value})
  print(data_lib.dataset_summary(ds))
  print(f"{cd.num_samples} training samples, {1 - cd.clean.mean():.1%} with a wrong label "
        f"(noise {NOISE.value}); classifier {CLASSIFIER.value}")
  evaluate = task.make_evaluate(ds, cd, setting.logits_fn)
  seed_summary: dict[str, Any] = {}  # filled by the runs' finish, in order

  def finish(run_dir: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    figures = metrics.run_summary(records[-1], *task.WEIGHT_METRICS, task="hyper_cleaning",
                                  algorithm=common.ALGORITHM.value, weighted=run_dir == workdir)
    if run_dir == workdir:
      seed_summary.update(figures)
    else:  # the baseline's own summary, and its figures in the seed's
      common.write_summary(run_dir, figures)
      seed_summary.update(unweighted_test_accuracy=figures["test_accuracy"],
                          unweighted_wall_time_s=figures["wall_time_s"],
                          accuracy_gain=seed_summary["test_accuracy"] - figures["test_accuracy"])
    return dict(common.write_summary(workdir, seed_summary,
                                     show=run_dir != workdir or not BASELINE_UNWEIGHTED.value))

  def seed_run(run_dir: str, init_logit: float, x_start, title: str) -> common.SeedRun:
    os.makedirs(run_dir, exist_ok=True)
    return common.SeedRun(
        run_dir, rnd, alg.init(x_start, y0), cd.fed,
        functools.partial(evaluate, init_logit=init_logit), f"{title}, {common.ALGORITHM.value}",
        common.start_run(run_dir, dict(config, weighted=run_dir == workdir)),
        functools.partial(finish, run_dir), task.cleaning_problem(setting.logits_fn, REG.value))

  runs = [seed_run(workdir, 0.0, x0, "hyper-cleaning")]
  if BASELINE_UNWEIGHTED.value:
    print(f"baseline: every sample weight fixed to 1 (noisy labels), in {workdir}/unweighted")
    runs.append(seed_run(os.path.join(workdir, "unweighted"), task.BASELINE_LOGIT,
                         dict(x0, logits=jnp.full_like(x0["logits"], task.BASELINE_LOGIT)),
                         "hyper-cleaning, unweighted baseline"))
  return runs


if __name__ == "__main__":
  app.run(main)
