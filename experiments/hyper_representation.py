"""Federated hyper-representation (README, Expected results, task 1; FedNest setup): the driver.

The task (client arrays, initial parameters, evaluation, op prices) is
bilevel/tasks/hyper_representation.py; this driver reads the flags, builds it and runs it.

  python -m experiments.hyper_representation --workdir=runs/hr_rafbo
  python -m experiments.hyper_representation --workdir=runs/hr_simfbo --algorithm=simfbo
"""

from __future__ import annotations

import jax
from absl import app, flags

from bilevel import data as data_lib
from bilevel import federated, models
from bilevel.client import full_batch, minibatch_sampler
from bilevel.errors import ConfigError
from bilevel.tasks import hyper_representation as task
from experiments import common

MODEL = flags.DEFINE_enum("model", "mlp", ["mlp", "cnn"], "mlp: 784-200 MLP representation; "
                          "cnn: two 3x3 stride-2 conv layers (channel units) for image data.")
CHANNELS = flags.DEFINE_list("channels", ["16", "32"], "Output channels of conv1, conv2 (cnn).")
# --hidden (mlp) and --activation are defined once in common.py: hyper_cleaning shares them.
HIDDEN = common.HIDDEN
ACTIVATION = common.ACTIVATION
L2 = flags.DEFINE_float("l2", 1e-3, "L2 penalty on the head in the inner loss.")
OUTER_L2 = flags.DEFINE_float("outer_l2", 0.0, "L2 penalty (weight decay) on the representation "
                              "x in the outer loss; 0 = off (docs/method.md, section 8).")
FEATURE_L2 = flags.DEFINE_float(
    "feature_l2", models.FEATURE_L2, "Penalty feature_l2/2 * mean ||features||^2 on the "
    "representation's scale in the outer loss (task 1's default); 0 = off (docs/method.md, "
    "section 8).")
WIDTH_SCALE = flags.DEFINE_boolean(
    "width_scale", False, "Scale a submodel's features by K / k (full / kept units of x's last "
    "layer; HeteroFL's 1/r scaler) in g and f; off by default (docs/method.md, section 8).")


def main(argv):
  del argv
  common.start_driver()
  common.for_each_seed(prepare_one)


def prepare_one() -> common.SeedRun:
  """The run of --seed into --workdir, built and not started (common.SeedRun)."""
  problems = common.check_shared_flags()
  try:
    channels = tuple(int(c) for c in CHANNELS.value)
    assert len(channels) == 2 and min(channels) >= 1
  except (ValueError, AssertionError):
    problems.append(f"--channels={','.join(CHANNELS.value)} must be two integers >= 1.")
    channels = (1, 1)
  layout = (models.cnn_layout(channels) if MODEL.value == "cnn"
            else models.mlp_layout(max(HIDDEN.value, 1)))
  problem = models.hyper_representation_problem(
      ACTIVATION.value, L2.value, MODEL.value, OUTER_L2.value, FEATURE_L2.value,
      (channels[1] if MODEL.value == "cnn" else HIDDEN.value) if WIDTH_SCALE.value else 0)
  alg, ds = common.gather(problems, lambda: common.make_algorithm(problem, layout),
                          common.load_data)  # validated before any work; rebuilt below
  resolved, o = alg, alg.options
  try:
    init_key = jax.random.fold_in(federated.stream_key(o.seed, "init"), 0)
    x0, y0 = task.init_params(init_key, MODEL.value, ds.input_shape, ds.num_classes,
                              hidden=HIDDEN.value, channels=channels)
    batch = common.BATCH_SIZE.value
    sample = minibatch_sampler(batch) if batch else full_batch
    data, info = task.client_arrays(
        ds, common.NUM_CLIENTS.value, common.PARTITION.value, model=MODEL.value,
        val_fraction=common.VAL_FRACTION.value, alpha=common.ALPHA.value, seed=common.SEED.value)
    # compact (the default) needs unit masks and fixed levels (and the local round: FedNest's
    # round is dense); an unset flag falls back to dense where those do not hold, an explicit
    # --submodel=compact reports the conflict.
    submodel = common.SUBMODEL.value
    if not flags.FLAGS["submodel"].present and (o.redraw_levels or o.granularity != "unit" or
                                                alg.spec.round_kind == "fednest"):
      submodel = "dense"
    alg = common.make_algorithm(
        problem, layout, sample=sample, submodel=submodel, mesh=common.client_mesh(),
        cost=task.cost_model(MODEL.value, ds.input_shape, batch, info),
        diagnostics=common.DIAGNOSE_EVERY.value > 0)
    rnd = alg.make_round(x0)  # the checks that need x (coverage) run here
  except (ConfigError, data_lib.DataError) as e:
    common.fail(str(e))
  workdir = common.require_workdir()
  resume = common.start_run(workdir, dict(
      common.config_dict(resolved), task="hyper_representation", model=MODEL.value,
      hidden=HIDDEN.value, channels=list(channels),
      activation=ACTIVATION.value, l2=L2.value,
      **{k: v for k, v in (("outer_l2", OUTER_L2.value), ("feature_l2", FEATURE_L2.value),
                           ("width_scale", WIDTH_SCALE.value)) if v},
      dataset=data_lib.dataset_summary(ds), **info))
  print(data_lib.dataset_summary(ds))
  x_test, y_test = task.test_arrays(ds, MODEL.value)
  eval_fn = lambda st: task.evaluate(st, x_test, y_test, MODEL.value, ACTIVATION.value)
  title = f"hyper-representation, {common.ALGORITHM.value}"
  finish = lambda records: summarize(workdir, records)
  return common.SeedRun(workdir, rnd, alg.init(x0, y0), data, eval_fn, title, resume, finish,
                        problem)


def summarize(workdir: str, records: list[dict]) -> dict:
  """The run's summary from its records: written to workdir/summary.json and printed."""
  summary = common.run_summary("hyper_representation", records[-1])
  common.write_summary(workdir, summary)
  common.print_final(summary)
  return summary


if __name__ == "__main__":
  app.run(main)
