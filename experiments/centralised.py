"""Centralised reference for task 1's models (README, "Non-IID clients and the CNN"): the whole
network trained with plain Adam on all training images; summary.json: per seed, mean +- std.

  python -m experiments.centralised --model=cnn --seeds=0,1,2
  python -m experiments.centralised --model=mlp --seeds=0,1,2
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from bilevel import models
from bilevel.tasks import hyper_representation as hr_task
from experiments import common
from experiments import hyper_representation as task

EPOCHS = flags.DEFINE_integer("epochs", 20, "Passes over the training images.")
LR = flags.DEFINE_float("lr", 1e-3, "Adam step size.")
REPORT_EVERY = flags.DEFINE_integer("report_every", 5, "Print the test accuracy every N epochs.")


def train(seed: int, ds) -> float:
  """One seed's run; its final test accuracy."""
  model = task.MODEL.value
  params = hr_task.init_params(jax.random.key(seed), model, ds.input_shape, ds.num_classes,
                               hidden=common.HIDDEN.value,
                               channels=tuple(int(c) for c in task.CHANNELS.value))
  logits = lambda p, inputs: models.LOGITS[model](*p, inputs, common.ACTIVATION.value)
  x_train, y_train = hr_task.test_arrays(ds._replace(x_test=ds.x_train, y_test=ds.y_train), model)
  x_test, y_test = hr_task.test_arrays(ds, model)
  opt = optax.adam(LR.value)

  @jax.jit
  def step(p, state, rows):
    loss = lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits(q, x_train[rows]), y_train[rows]))
    updates, state = opt.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(logits(p, x_test), -1) == y_test))
  state, rng, batch = opt.init(params), np.random.default_rng(seed), common.BATCH_SIZE.value
  for epoch in range(EPOCHS.value):
    order = rng.permutation(len(y_train))
    for start in range(0, len(order) - batch + 1, batch):
      params, state = step(params, state, jnp.asarray(order[start:start + batch]))
    if (epoch + 1) % REPORT_EVERY.value == 0 or epoch + 1 == EPOCHS.value:
      print(f"seed {seed} epoch {epoch + 1}: test accuracy {accuracy(params):.4f}", flush=True)
  return float(accuracy(params))


def main(argv):
  common.start_driver(argv=argv)
  if EPOCHS.value < 1 or LR.value <= 0 or common.BATCH_SIZE.value < 1:
    common.fail("--epochs and --batch_size must be >= 1 and --lr > 0.")
  ds, seeds = common.load_data(), common.parse_seeds() or [common.SEED.value]
  values = np.asarray([train(s, ds) for s in seeds])
  mean, std = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
  common.write_summary(common.require_workdir(), dict(
      model=task.MODEL.value, epochs=EPOCHS.value, lr=LR.value, batch_size=common.BATCH_SIZE.value,
      per_seed=dict(zip(seeds, values.tolist())), mean_test_accuracy=mean, std_test_accuracy=std))
  print(f"{task.MODEL.value}: test accuracy {mean:.4f} +- {std:.4f} over seeds {seeds} after "
        f"{EPOCHS.value} epochs")


if __name__ == "__main__":
  app.run(main)
