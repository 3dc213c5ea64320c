"""Federated hyper-representation (README, Expected results, task 1; FedNest setup).

x = the representation (an MLP's hidden layer, 784-200 on MNIST, or two 3x3 stride-2 conv
layers), y = the linear head. g_i = CE on client i's train split + l2/2 ||y||^2, f_i = CE on its
validation split (models.hyper_representation_problem). Metric: test accuracy of the global
(x, y). Units: the MLP's hidden units, the CNN's channels (models.mlp_layout, models.cnn_layout).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs, federated, models
from bilevel import data as data_lib
from bilevel.errors import ConfigError


# The CNN's defaults (docs/method.md, section 8, "The CNN"): HeteroFL's width scaler on its
# conv2 features, made safe under label skew by a trust region on every local x step (each at
# most 0.1 of its layer's norm). The drivers use them for --model=cnn where a flag is not given
# (experiments.hyper_representation.cnn_defaults).
CNN_DEFAULTS = dict(width_scale=True, x_trust=0.1, x_trust_on="step")


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(H, W, C) for the CNN: flat square grey images (MNIST, digits) become (s, s, 1)."""
  if len(input_shape) == 3:
    return tuple(input_shape)
  side = int(round(np.sqrt(np.prod(input_shape))))
  if side * side != int(np.prod(input_shape)):
    raise ConfigError(f"--model=cnn needs image inputs; input shape {input_shape} is not square.")
  return (side, side, 1)


def client_arrays(ds: data_lib.Dataset, num_clients: int, partition: str, *, model: str,
                  val_fraction: float, alpha: float, seed: int
                  ) -> tuple[federated.FederatedData, dict[str, int]]:
  """The clients' stacked train (inner) and validation (outer) splits, inputs shaped for
  `model`, and their padded sizes (train_per_client_max, val_per_client_max)."""
  parts = data_lib.partition(ds.y_train, num_clients, partition, seed=seed, alpha=alpha)
  cd = data_lib.make_client_data(ds.x_train, ds.y_train, parts, val_fraction=val_fraction,
                                 seed=seed)
  if model == "cnn":
    shape = image_shape(ds.input_shape)
    flat = lambda a: a.reshape(a.shape[:2] + shape)
  else:
    flat = lambda a: a.reshape(a.shape[:2] + (-1,))
  inner = {"inputs": jnp.asarray(flat(cd.train_x)), "labels": jnp.asarray(cd.train_y),
           "weight": jnp.asarray(cd.train_mask)}
  outer = {"inputs": jnp.asarray(flat(cd.val_x)), "labels": jnp.asarray(cd.val_y),
           "weight": jnp.asarray(cd.val_mask)}
  info = dict(train_per_client_max=int(cd.train_x.shape[1]),
              val_per_client_max=int(cd.val_x.shape[1]))
  return federated.FederatedData(inner, outer, jnp.asarray(cd.num_train)), info


@functools.partial(jax.jit, static_argnums=(3, 4))
def evaluate(state: federated.ServerState, x_test: jax.Array, y_test: jax.Array, model: str,
             activation: str) -> dict[str, jax.Array]:
  """Test accuracy and loss of the global (x, y) (the test set is an argument, so every seed
  of a --seeds run uses one compiled program)."""
  logits = models.LOGITS[model](state.x, state.y, x_test, activation)
  return {"test_accuracy": jnp.mean(jnp.argmax(logits, -1) == y_test),
          "test_loss": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_test))}


# ------------------------------------------------------------------ op prices (bilevel/costs.py)


def mlp_costs() -> costs.ModelCosts:
  """The MLP (models.mlp_logits): x = hidden (D x K), y = head (K x C)."""
  return costs.ModelCosts(
      x_forward=lambda kx: 2 * kx["hidden"]["kernel"],
      x_backward=lambda kx: 2 * kx["hidden"]["kernel"],  # weight gradient (inputs are data)
      y_layers=lambda ky: [ky["head"]["kernel"]],
      x_in_features=True)


def _valid_taps(size: int, kernel: int = 3, stride: int = 2) -> int:
  """Sum over output positions of in-bounds kernel taps, one axis, SAME padding (as XLA)."""
  out = -(-size // stride)
  lo = max((out - 1) * stride + kernel - size, 0) // 2
  return sum(0 <= o * stride + k - lo < size for o in range(out) for k in range(kernel))


def cnn_costs(input_shape: tuple[int, int, int]) -> costs.ModelCosts:
  """The CNN (models.cnn_logits): x = conv1, conv2 (3x3, stride 2, SAME), y = head on the
  flattened conv2 features (its kept kernel entries count every position). A convolution
  costs 2 x (kept kernel entries / 9) x in-bounds taps."""
  h, w = input_shape[0], input_shape[1]
  h1, w1 = -(-h // 2), -(-w // 2)
  taps1 = _valid_taps(h) * _valid_taps(w) / 9
  taps2 = _valid_taps(h1) * _valid_taps(w1) / 9
  conv1 = lambda kx: 2 * kx["conv1"]["kernel"] * taps1
  conv2 = lambda kx: 2 * kx["conv2"]["kernel"] * taps2
  return costs.ModelCosts(
      x_forward=lambda kx: conv1(kx) + conv2(kx),
      # conv2's weight and input gradients, conv1's weight gradient (its input is data)
      x_backward=lambda kx: 2 * conv2(kx) + conv1(kx),
      y_layers=lambda ky: [ky["head"]["kernel"]],
      x_in_features=True)


def cost_model(model: str, input_shape: tuple[int, ...], batch_size: int,
               info: dict[str, int]) -> costs.CostModel:
  """The FLOP model of a client's round: `model`'s op prices on the rows a client computes on,
  its minibatch or (batch_size 0) its padded training / validation split (client_arrays' info)."""
  prices = cnn_costs(image_shape(input_shape)) if model == "cnn" else mlp_costs()
  rows = ((batch_size, batch_size) if batch_size else
          (info["train_per_client_max"], info["val_per_client_max"]))
  return costs.CostModel(prices, lambda kept_x: rows)


def init_params(key: jax.Array, model: str, input_shape: tuple[int, ...], classes: int, *,
                hidden: int, channels: tuple[int, int]) -> tuple[Any, Any]:
  """The initial (x, y) of `model` (flax initialisers)."""
  if model == "cnn":
    return models.init_cnn(key, image_shape(input_shape), channels, classes)
  return models.init_mlp(key, math.prod(input_shape), hidden, classes)


def test_arrays(ds: data_lib.Dataset, model: str) -> tuple[jax.Array, jax.Array]:
  """The test inputs shaped for `model` and the test labels."""
  shape = image_shape(ds.input_shape) if model == "cnn" else (-1,)
  return jnp.asarray(ds.x_test.reshape((len(ds.x_test),) + tuple(shape))), jnp.asarray(ds.y_test)
