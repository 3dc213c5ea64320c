"""Federated hyper-representation (README, task 1): flags -> bilevel.tasks.hyper_representation
-> --algorithm -> run -> records.

  python -m experiments.hyper_representation --workdir=runs/hr_rafbo
  python -m experiments.hyper_representation --workdir=runs/hr_simfbo --algorithm=simfbo
"""
import jax
from absl import app, flags

from bilevel import data as data_lib
from bilevel import algorithms, federated, metrics, models
from bilevel.client import full_batch, minibatch_sampler
from bilevel.tasks import hyper_representation as task
from experiments import common

MODEL = flags.DEFINE_enum("model", "mlp", ["mlp", "cnn"], "mlp (784-200) or cnn (2 conv layers).")
CHANNELS = flags.DEFINE_list("channels", ["16", "32"], "Output channels of conv1, conv2 (cnn).")
L2 = flags.DEFINE_float("l2", 1e-3, "L2 penalty on the head in the inner loss.")
OUTER_L2 = flags.DEFINE_float("outer_l2", 0.0, "Weight decay on x in the outer loss; 0 = off.")
FEATURE_L2 = flags.DEFINE_float("feature_l2", models.FEATURE_L2, "Feature scale penalty; 0 = off.")
WIDTH_SCALE = flags.DEFINE_boolean(
    "width_scale", False, "Scale a submodel's features by K / k (HeteroFL's scaler); default: on "
    "for --model=cnn (with --x_trust=0.1 --x_trust_on=step where not given), off for the mlp.")


def cnn_defaults() -> dict[str, object]:
  """The flag defaults of --model=cnn (task.CNN_DEFAULTS; the trust region only for algorithms
  whose round reads it, not fednest's); none for the mlp. common.start_driver sets them."""
  if MODEL.value != "cnn":
    return {}
  reads = algorithms.reads(common.ALGORITHM.value)
  return {k: v for k, v in task.CNN_DEFAULTS.items() if k == "width_scale" or k in reads}


def main(argv):
  common.start_driver(cnn_defaults(), argv)
  common.for_each_seed(lambda: [prepare_one()])


def prepare_one() -> common.SeedRun:
  """The run of --seed into --workdir, built and not started."""
  problems, model = common.check_shared_flags(), MODEL.value
  hidden, activation = common.HIDDEN.value, common.ACTIVATION.value
  channels = tuple(int(c) for c in CHANNELS.value if c.isdecimal())
  if len(channels) != len(CHANNELS.value) or len(channels) != 2 or min(channels) < 1:
    problems.append(f"--channels={','.join(CHANNELS.value)} must be two integers >= 1.")
    channels = (1, 1)
  cnn = model == "cnn"
  layout = models.cnn_layout(channels) if cnn else models.mlp_layout(max(hidden, 1))
  problem = models.hyper_representation_problem(
      activation, L2.value, model, OUTER_L2.value, FEATURE_L2.value,
      (channels[1] if cnn else hidden) if WIDTH_SCALE.value else 0)
  resolved, ds = common.gather(problems, lambda: common.make_algorithm(problem, layout),
                               common.load_data)
  o, batch = resolved.options, common.BATCH_SIZE.value
  x0, y0 = task.init_params(jax.random.fold_in(federated.stream_key(o.seed, "init"), 0), model,
                            ds.input_shape, ds.num_classes, hidden=hidden, channels=channels)
  data, info = task.client_arrays(
      ds, common.NUM_CLIENTS.value, common.PARTITION.value, model=model,
      val_fraction=common.VAL_FRACTION.value, alpha=common.ALPHA.value, seed=common.SEED.value)
  # compact needs unit masks, fixed levels, the local round (docs/drivers.md)
  dense = o.redraw_levels or o.granularity != "unit" or resolved.spec.round_kind == "fednest"
  alg = common.make_algorithm(
      problem, layout, sample=minibatch_sampler(batch) if batch else full_batch,
      submodel="dense" if dense and not flags.FLAGS["submodel"].present else common.SUBMODEL.value,
      mesh=common.client_mesh(), cost=task.cost_model(model, ds.input_shape, batch, info),
      diagnostics=common.DIAGNOSE_EVERY.value > 0)
  rnd = alg.make_round(x0)  # the checks that need x (coverage) run here
  workdir = common.require_workdir()
  extra = dict(outer_l2=OUTER_L2.value, feature_l2=FEATURE_L2.value, width_scale=WIDTH_SCALE.value)
  config = dict(
      common.config_dict(resolved), task="hyper_representation", model=model, hidden=hidden,
      channels=list(channels), activation=activation, l2=L2.value,
      **{k: v for k, v in extra.items() if v}, dataset=data_lib.dataset_summary(ds), **info)
  if cnn:
    config["task_defaults_applied"] = common.defaults_applied(cnn_defaults())
  resume = common.start_run(workdir, config)
  print(data_lib.dataset_summary(ds))
  x_test, y_test = task.test_arrays(ds, model)
  return common.SeedRun(
      workdir, rnd, alg.init(x0, y0), data,
      lambda st: task.evaluate(st, x_test, y_test, model, activation),
      f"hyper-representation, {common.ALGORITHM.value}", resume,
      lambda records: common.write_summary(workdir, metrics.run_summary(
          records[-1], task="hyper_representation", algorithm=common.ALGORITHM.value), show=True),
      problem)


if __name__ == "__main__":
  app.run(main)
