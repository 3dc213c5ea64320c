r"""Federated data hyper-cleaning (README, task 2): flags (defaults: task.DEFAULTS, then an
--algorithm's own) -> bilevel.tasks.hyper_cleaning -> --algorithm (dense clients) -> run -> records.

  python -m experiments.hyper_cleaning --workdir=runs/hc_rafbo --baseline_unweighted
  python -m experiments.hyper_cleaning --flagfile=experiments/presets/hyper_cleaning_default.cfg \
      --workdir=runs/hc
"""
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
CLASSIFIER = flags.DEFINE_enum("classifier", "linear", ["linear", "mlp"], "Inner model y.")
REG = flags.DEFINE_float("reg", 1e-3, "c in g_i: + c ||y||^2 (>= 0).")
BASELINE_UNWEIGHTED = flags.DEFINE_boolean("baseline_unweighted", False, "Also weights 1.")


def main(argv):
  common.start_driver(task.DEFAULTS, argv)
  common.for_each_seed(prepare_one)


def prepare_one() -> list[common.SeedRun]:
  """The runs of --seed into --workdir, built and not started: weighted, unweighted baseline."""
  hidden, batch = common.HIDDEN.value, common.BATCH_SIZE.value
  problems = common.check_shared_flags()
  problems += [f"--{f.name}={f.value} is outside the allowed range {bounds}." for f, ok, bounds in (
      (NOISE, 0.0 <= NOISE.value < 1.0, "[0, 1)"), (REG, REG.value >= 0.0, "[0, inf)")) if not ok]
  if not flags.FLAGS["submodel"].using_default_value and common.SUBMODEL.value != "dense":
    problems.append(f"--submodel={common.SUBMODEL.value}: hyper-cleaning runs dense clients only "
                    "(its units are samples); use --submodel=dense or leave it unset.")
  shape_free = task.layout(CLASSIFIER.value, 1, 1, max(hidden, 1))  # for validation only
  setting = task.setting(CLASSIFIER.value, common.ACTIVATION.value, batch, REG.value)

  def resolve():  # the options for config.json; heterofl: y pruned only
    alg = common.make_algorithm(setting.problem, shape_free)
    o = alg.options
    if o.granularity != "unit":
      raise ConfigError(f"mask_granularity={o.granularity!r}: hyper-cleaning's outer units are "
                        "the samples each client owns; use --mask_granularity=unit.")
    levels = alg.name == "heterofl" and task.heterofl_levels(
        o.levels, o.mask_policy, o.allow_uncovered)
    return common.make_algorithm(setting.problem, shape_free, levels=levels) if levels else alg

  resolved, ds = common.gather(problems, resolve, common.load_data)
  o = resolved.options
  cd = task.build_data(ds, common.NUM_CLIENTS.value, common.PARTITION.value, noise=NOISE.value,
                       val_fraction=common.VAL_FRACTION.value, alpha=common.ALPHA.value,
                       seed=o.seed)
  lay, x0, y0 = task.model(CLASSIFIER.value, cd.num_samples, ds, hidden, o.seed)
  alg = common.make_algorithm(
      setting.problem, lay, levels=o.levels, diagnostics=common.DIAGNOSE_EVERY.value > 0,
      sample=setting.sample, mesh=common.client_mesh(), **task.round_keywords(
          cd, lay, CLASSIFIER.value, batch, mask_policy=o.mask_policy, granularity=o.granularity))
  rnd = alg.make_round(x0)
  workdir = common.require_workdir()
  config = dict(
      common.config_dict(resolved), task="hyper_cleaning", noise=NOISE.value, reg=REG.value,
      classifier=CLASSIFIER.value, hidden=hidden, activation=common.ACTIVATION.value,
      dataset=data_lib.dataset_summary(ds), num_samples=cd.num_samples, submodel="dense",
      clean_share=float(cd.clean.mean()), replaced_share=float(cd.replaced.mean()),
      task_defaults_applied=common.defaults_applied(task.DEFAULTS))
  print(data_lib.dataset_summary(ds))
  print(f"{cd.num_samples} training samples, {1 - cd.clean.mean():.1%} with a wrong label "
        f"(noise {NOISE.value}); classifier {CLASSIFIER.value}")
  evaluate = task.make_evaluate(ds, cd, setting.logits_fn)
  seed_summary: dict[str, Any] = {}  # filled by the runs' finish, in order

  def finish(weighted: bool, records: list[dict[str, Any]]) -> dict[str, Any]:
    figures = metrics.run_summary(records[-1], *task.WEIGHT_METRICS, task="hyper_cleaning",
                                  algorithm=common.ALGORITHM.value, weighted=weighted)
    if not weighted:  # the baseline's own summary, and its figures in the seed's
      common.write_summary(os.path.join(workdir, "unweighted"), figures)
      figures = dict(unweighted_test_accuracy=figures["test_accuracy"],
                     unweighted_wall_time_s=figures["wall_time_s"],
                     accuracy_gain=seed_summary["test_accuracy"] - figures["test_accuracy"])
    seed_summary.update(figures)
    return dict(common.write_summary(workdir, seed_summary,
                                     show=not weighted or not BASELINE_UNWEIGHTED.value))

  def seed_run(weighted: bool) -> common.SeedRun:
    run_dir = workdir if weighted else os.path.join(workdir, "unweighted")
    logit = 0.0 if weighted else task.BASELINE_LOGIT
    x = x0 if weighted else dict(x0, logits=jnp.full_like(x0["logits"], logit))
    os.makedirs(run_dir, exist_ok=True)
    return common.SeedRun(
        run_dir, rnd, alg.init(x, y0), cd.fed, functools.partial(evaluate, init_logit=logit),
        "hyper-cleaning, " + ("" if weighted else "unweighted baseline, ") + common.ALGORITHM.value,
        common.start_run(run_dir, dict(config, weighted=weighted)),
        functools.partial(finish, weighted), task.cleaning_problem(setting.logits_fn, REG.value))

  if BASELINE_UNWEIGHTED.value:
    print(f"baseline: every sample weight fixed to 1 (noisy labels), in {workdir}/unweighted")
  return [seed_run(True)] + ([seed_run(False)] if BASELINE_UNWEIGHTED.value else [])


if __name__ == "__main__":
  app.run(main)
