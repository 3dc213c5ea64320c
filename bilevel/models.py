"""Models as flax linen modules with explicit layer names, split into outer x and inner y.

MLP (hyper-representation, FedNest): x = {"hidden": Dense(K)}, y = {"head": Dense(classes)}.
Unit correspondence: hidden unit j owns x.hidden.kernel[:, j], x.hidden.bias[j] and the head's
input row y.head.kernel[j, :]; the head bias and output columns are never pruned.
The forward pass is written on the parameter arrays so a compact submodel (fewer hidden units)
runs through the same function.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bilevel.masks import Axes, UnitLayout
from bilevel.problems import BilevelProblem

PyTree = Any
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


class MLP(nn.Module):
  hidden: int
  classes: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.activation](nn.Dense(self.hidden, name="hidden")(inputs))
    return nn.Dense(self.classes, name="head")(h)


def init_mlp(key: jax.Array, in_dim: int, hidden: int, classes: int,
             dtype: Any = jnp.float32) -> tuple[PyTree, PyTree]:
  """(x, y) = ({"hidden": ...}, {"head": ...}) from the flax initialisers."""
  params = MLP(hidden, classes).init(key, jnp.zeros((1, in_dim), dtype))["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  return {"hidden": params["hidden"]}, {"head": params["head"]}


def mlp_logits(x: PyTree, y: PyTree, inputs: jax.Array, activation: str = "relu") -> jax.Array:
  """Same numbers as MLP.apply, for any hidden width (compact submodels)."""
  h = ACTIVATIONS[activation](dense(x["hidden"], inputs))
  return dense(y["head"], h)


def dense(params: PyTree, inputs: jax.Array) -> jax.Array:
  """inputs @ kernel + bias with explicit broadcasting (as flax.linen.Dense)."""
  return inputs @ params["kernel"] + params["bias"][None, :]


def mlp_layout(hidden: int) -> UnitLayout:
  unit = lambda ax: Axes((("hidden", ax),))
  return UnitLayout(
      groups={"hidden": hidden},
      x={"hidden": {"kernel": unit(1), "bias": unit(0)}},
      y={"head": {"kernel": unit(0), "bias": Axes()}})


def weighted_ce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  """sum_n w_n CE_n / max(sum_n w_n, 1e-12). Shapes: logits [N, classes], labels/weight [N]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1e-12)


def hyper_representation_problem(activation: str = "relu", l2: float = 1e-3) -> BilevelProblem:
  """g_i = CE(train) + l2/2 ||y||^2, f_i = CE(val); batches {"inputs", "labels", "weight"}."""

  def inner(x, y, b):
    ce = weighted_ce(mlp_logits(x, y, b["inputs"], activation), b["labels"], b["weight"])
    return ce + 0.5 * l2 * sum(jnp.sum(t ** 2) for t in jax.tree.leaves(y))

  def outer(x, y, b):
    return weighted_ce(mlp_logits(x, y, b["inputs"], activation), b["labels"], b["weight"])

  return BilevelProblem(inner, outer)
