"""Centralised reference for task 1's models: the whole network (x and y together) trained with
plain Adam on all training images, no clients, no bilevel split. It states what the model can
reach on the data, the yardstick for the federated runs (README, "Non-IID clients and the CNN").

  python -m experiments.centralised --model=cnn --seeds=0,1,2
  python -m experiments.centralised --model=mlp --seeds=0,1,2

Prints the test accuracy every --report_every epochs and writes summary.json (per seed and
mean +- std at the last epoch) into --workdir.
"""

from __future__ import annotations

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


def train(seed: int, ds, shape) -> float:
  """One seed's run; its final test accuracy."""
  params = hr_task.init_params(jax.random.key(seed), task.MODEL.value, ds.input_shape,
                               ds.num_classes, hidden=task.HIDDEN.value,
                               channels=tuple(int(c) for c in task.CHANNELS.value))
  logits = lambda p, inputs: models.LOGITS[task.MODEL.value](*p, inputs, task.ACTIVATION.value)
  x_train, y_train = jnp.asarray(ds.x_train.reshape((-1,) + shape)), jnp.asarray(ds.y_train)
  x_test, y_test = jnp.asarray(ds.x_test.reshape((-1,) + shape)), jnp.asarray(ds.y_test)
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
  del argv
  common.start_driver()
  if EPOCHS.value < 1 or LR.value <= 0 or common.BATCH_SIZE.value < 1:
    common.fail("--epochs and --batch_size must be >= 1 and --lr > 0.")
  ds = common.load_data()
  shape = (hr_task.image_shape(ds.input_shape) if task.MODEL.value == "cnn"
           else (int(np.prod(ds.input_shape)),))
  seeds = common.parse_seeds() or [common.SEED.value]
  final = {s: train(s, ds, shape) for s in seeds}
  values = np.asarray(list(final.values()))
  summary = dict(model=task.MODEL.value, epochs=EPOCHS.value, lr=LR.value,
                 batch_size=common.BATCH_SIZE.value, per_seed=final,
                 mean_test_accuracy=float(values.mean()),
                 std_test_accuracy=float(values.std(ddof=1)) if len(values) > 1 else 0.0)
  common.write_summary(common.require_workdir(), summary)
  print(f"{task.MODEL.value}: test accuracy {summary['mean_test_accuracy']:.4f} +- "
        f"{summary['std_test_accuracy']:.4f} over seeds {seeds} after {EPOCHS.value} epochs")


if __name__ == "__main__":
  app.run(main)
