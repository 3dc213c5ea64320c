"""Federated hyper-representation (README, Expected results, task 1; FedNest setup).

x = the representation layer of an MLP (784-200 on MNIST), y = the linear head.
g_i = CE on client i's train split + l2/2 ||y||^2, f_i = CE on its validation split.
Metric: test accuracy of the global (x, y).

  python -m experiments.hyper_representation --workdir=runs/hr_rafbo
  python -m experiments.hyper_representation --workdir=runs/hr_simfbo --algorithm=simfbo
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from bilevel import data as data_lib
from bilevel import costs, federated, models
from bilevel.client import full_batch, minibatch_sampler
from bilevel.errors import ConfigError
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
    "feature_l2", 0.0, "Penalty feature_l2/2 * mean ||features||^2 on the representation's "
    "scale in the outer loss; 0 = off (docs/method.md, section 8).")
WIDTH_SCALE = flags.DEFINE_boolean(
    "width_scale", False, "Scale a submodel's features by K / k (full / kept units of x's last "
    "layer; HeteroFL's 1/r scaler) in g and f; off by default (docs/method.md, section 8).")


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(H, W, C) for the CNN: flat square grey images (MNIST, digits) become (s, s, 1)."""
  if len(input_shape) == 3:
    return tuple(input_shape)
  side = int(round(np.sqrt(np.prod(input_shape))))
  if side * side != int(np.prod(input_shape)):
    raise ConfigError(f"--model=cnn needs image inputs; input shape {input_shape} is not square.")
  return (side, side, 1)


def client_arrays(ds: data_lib.Dataset) -> tuple[federated.FederatedData, dict]:
  parts = data_lib.partition(ds.y_train, common.NUM_CLIENTS.value, common.PARTITION.value,
                             seed=common.SEED.value, alpha=common.ALPHA.value)
  cd = data_lib.make_client_data(ds.x_train, ds.y_train, parts,
                                 val_fraction=common.VAL_FRACTION.value, seed=common.SEED.value)
  if MODEL.value == "cnn":
    shape = image_shape(ds.input_shape)
    flat = lambda a: a.reshape(a.shape[:2] + shape)
  else:
    flat = lambda a: a.reshape(a.shape[:2] + (-1,))
  inner = {"inputs": jnp.asarray(flat(cd.train_x)), "labels": jnp.asarray(cd.train_y),
           "weight": jnp.asarray(cd.train_mask)}
  outer = {"inputs": jnp.asarray(flat(cd.val_x)), "labels": jnp.asarray(cd.val_y),
           "weight": jnp.asarray(cd.val_mask)}
  info = dict(train_per_client_max=int(cd.train_x.shape[1]), val_per_client_max=int(cd.val_x.shape[1]))
  return federated.FederatedData(inner, outer, jnp.asarray(cd.num_train)), info


def main(argv):
  del argv
  common.start_driver()
  common.for_each_seed(run_one, prepare_one)


def run_one() -> dict:
  """One run with --seed into --workdir; returns its summary."""
  return common.run_prepared(prepare_one())


@functools.partial(jax.jit, static_argnums=(3, 4))
def evaluate(state: federated.ServerState, x_test: jax.Array, y_test: jax.Array, model: str,
             activation: str) -> dict[str, jax.Array]:
  """Test accuracy and loss of the global (x, y) (the test set is an argument, so every seed
  of a --seeds run uses one compiled program)."""
  logits = models.LOGITS[model](state.x, state.y, x_test, activation)
  return {"test_accuracy": jnp.mean(jnp.argmax(logits, -1) == y_test),
          "test_loss": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_test))}


def prepare_one() -> common.SeedRun:
  """The run of --seed into --workdir, built and not started (common.SeedRun)."""
  problems = common.check_shared_flags()
  if HIDDEN.value < 1:
    problems.append(f"--hidden={HIDDEN.value} must be >= 1.")
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
  cfg = alg.config
  try:
    init_key = jax.random.fold_in(federated.stream_key(cfg.seed, "init"), 0)
    if MODEL.value == "cnn":
      x0, y0 = models.init_cnn(init_key, image_shape(ds.input_shape), channels, ds.num_classes)
      model_costs = costs.cnn_costs(image_shape(ds.input_shape))
    else:
      x0, y0 = models.init_mlp(init_key, int(np.prod(ds.input_shape)), HIDDEN.value,
                               ds.num_classes)
      model_costs = costs.mlp_costs()
    batch = common.BATCH_SIZE.value
    sample = minibatch_sampler(batch) if batch else full_batch
    data, info = client_arrays(ds)
    # Rows a client computes on: its minibatch, or its (padded) training / validation split.
    rows = ((batch, batch) if batch else
            (info["train_per_client_max"], info["val_per_client_max"]))
    # compact (the default) needs unit masks and fixed levels (and the local round: FedNest's
    # round is dense); an unset flag falls back to dense where those do not hold, an explicit
    # --submodel=compact reports the conflict.
    submodel = common.SUBMODEL.value
    if not flags.FLAGS["submodel"].present and (cfg.redraw_levels or
                                                cfg.mask.granularity != "unit" or
                                                cfg.round_kind == "fednest"):
      submodel = "dense"
    alg = common.make_algorithm(
        problem, layout, sample=sample, submodel=submodel, mesh=common.client_mesh(),
        cost=costs.CostModel(model_costs, lambda kept_x: rows),
        diagnostics=common.DIAGNOSE_EVERY.value > 0)
    rnd = alg.make_round(x0)  # the checks that need x (coverage) run here
  except (ConfigError, data_lib.DataError) as e:
    common.fail(str(e))
  workdir = common.require_workdir()
  resume = common.start_run(workdir, dict(
      common.config_dict(cfg), task="hyper_representation", model=MODEL.value,
      hidden=HIDDEN.value, channels=list(channels),
      activation=ACTIVATION.value, l2=L2.value,
      **{k: v for k, v in (("outer_l2", OUTER_L2.value), ("feature_l2", FEATURE_L2.value),
                           ("width_scale", WIDTH_SCALE.value)) if v},
      dataset=data_lib.dataset_summary(ds), **info))
  print(data_lib.dataset_summary(ds))
  test_shape = image_shape(ds.input_shape) if MODEL.value == "cnn" else (-1,)
  x_test = jnp.asarray(ds.x_test.reshape((len(ds.x_test),) + tuple(test_shape)))
  y_test = jnp.asarray(ds.y_test)
  eval_fn = lambda st: evaluate(st, x_test, y_test, MODEL.value, ACTIVATION.value)
  title = f"hyper-representation, {common.ALGORITHM.value}"
  finish = lambda records: summarize(workdir, records)
  return common.SeedRun(workdir, rnd, alg.init(x0, y0), data, eval_fn, title, resume, finish,
                        problem)


def summarize(workdir: str, records: list[dict]) -> dict:
  """The run's summary from its records: written to workdir/summary.json and printed."""
  last = records[-1]
  summary = dict(
      task="hyper_representation", algorithm=common.ALGORITHM.value,
      test_accuracy=last["test_accuracy"], test_loss=last["test_loss"], rounds=last["round"],
      wall_time_s=last["wall_time_s"], first_round_s=last["first_round_s"],
      time_to_first_round_s=last["time_to_first_round_s"],
      cumulative_client_flops=last["cumulative_client_flops"],
      cumulative_comm_bytes=last["cumulative_comm_bytes"],
      min_coverage_x=last["cx_star"], min_coverage_y=last["cy_star"],
      final_outer_loss=last["outer_loss"], final_inner_loss=last["inner_loss"],
      final_hypergrad_norm=last["hypergrad_norm"])
  common.write_summary(workdir, summary)
  print("final:")
  common.print_table(summary)
  return summary


if __name__ == "__main__":
  app.run(main)
