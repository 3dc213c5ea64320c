"""Models as flax linen modules with explicit layer names, split into outer x and inner y.

CNN (hyper-representation on images, e.g. CIFAR-10): x = {"conv1", "conv2"} (3x3 convolutions,
stride 2, SAME padding), y = {"head": Dense(classes)} on the flattened conv2 features, its kernel
stored as [positions, channels, classes]. Unit groups: output channels of conv1 ("conv1": its
kernel's last axis, its bias, conv2's input-channel axis) and of conv2 ("conv2": its kernel's last
axis, its bias, the head kernel's channel axis 1). No
BatchNorm (docs/method.md, section 4: it fails under heterogeneous submodels).

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


def mlp_features(x: PyTree, inputs: jax.Array, activation: str = "relu") -> jax.Array:
  """The representation x computes: the hidden activations [N, K]."""
  return ACTIVATIONS[activation](dense(x["hidden"], inputs))


def mlp_logits(x: PyTree, y: PyTree, inputs: jax.Array, activation: str = "relu") -> jax.Array:
  """Same numbers as MLP.apply, for any hidden width (compact submodels)."""
  return dense(y["head"], mlp_features(x, inputs, activation))


def dense(params: PyTree, inputs: jax.Array) -> jax.Array:
  """inputs @ kernel + bias with explicit broadcasting (as flax.linen.Dense)."""
  return inputs @ params["kernel"] + params["bias"][None, :]


def mlp_layout(hidden: int) -> UnitLayout:
  unit = lambda ax: Axes((("hidden", ax),))
  return UnitLayout(
      groups={"hidden": hidden},
      x={"hidden": {"kernel": unit(1), "bias": unit(0)}},
      y={"head": {"kernel": unit(0), "bias": Axes()}})


class CNN(nn.Module):
  channels: tuple[int, int] = (16, 32)
  classes: int = 10
  activation: str = "relu"

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    h = act(nn.Conv(self.channels[0], (3, 3), strides=2, name="conv1")(inputs))
    h = act(nn.Conv(self.channels[1], (3, 3), strides=2, name="conv2")(h))
    return nn.Dense(self.classes, name="head")(h.reshape(h.shape[0], -1))


def init_cnn(key: jax.Array, input_shape: tuple[int, int, int], channels: tuple[int, int],
             classes: int, dtype: Any = jnp.float32) -> tuple[PyTree, PyTree]:
  """(x, y) = ({"conv1", "conv2"}, {"head"}) from the flax initialisers. input_shape: (H, W, C)."""
  params = CNN(tuple(channels), classes).init(key, jnp.zeros((1,) + tuple(input_shape), dtype))
  params = jax.tree.map(lambda p: p.astype(dtype), params["params"])
  # The head's kernel [positions * channels, classes] as [positions, channels, classes]: NHWC
  # flattening puts conv2's channel c at rows p * channels + c, so axis 1 is the channel unit.
  head = dict(params["head"], kernel=params["head"]["kernel"].reshape(-1, channels[1], classes))
  return {"conv1": params["conv1"], "conv2": params["conv2"]}, {"head": head}


def _conv(params: PyTree, inputs: jax.Array) -> jax.Array:
  """3x3 stride-2 SAME convolution, NHWC x HWIO (as flax.linen.Conv)."""
  out = jax.lax.conv_general_dilated(inputs, params["kernel"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + params["bias"][None, None, None, :]


def cnn_features(x: PyTree, inputs: jax.Array, activation: str = "relu") -> jax.Array:
  """The representation x computes: conv2's activations as [N, positions, channels]."""
  act = ACTIVATIONS[activation]
  h = act(_conv(x["conv2"], act(_conv(x["conv1"], inputs))))
  return h.reshape(h.shape[0], -1, h.shape[-1])


def _cnn_head(y: PyTree, h: jax.Array) -> jax.Array:
  return jnp.einsum("npc,pck->nk", h, y["head"]["kernel"]) + y["head"]["bias"][None, :]


def cnn_logits(x: PyTree, y: PyTree, inputs: jax.Array, activation: str = "relu") -> jax.Array:
  """Same numbers as CNN.apply, for any channel widths (compact submodels). inputs [N, H, W, C]."""
  return _cnn_head(y, cnn_features(x, inputs, activation))


def cnn_layout(channels: tuple[int, int]) -> UnitLayout:
  return UnitLayout(
      groups={"conv1": channels[0], "conv2": channels[1]},
      x={"conv1": {"kernel": Axes((("conv1", 3),)), "bias": Axes((("conv1", 0),))},
         "conv2": {"kernel": Axes((("conv1", 2), ("conv2", 3))), "bias": Axes((("conv2", 0),))}},
      y={"head": {"kernel": Axes((("conv2", 1),)), "bias": Axes()}})


def weighted_ce(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  """sum_n w_n CE_n / max(sum_n w_n, 1e-12). Shapes: logits [N, classes], labels/weight [N]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(weight * ce) / jnp.maximum(jnp.sum(weight), 1e-12)


LOGITS = {"mlp": mlp_logits, "cnn": cnn_logits}
FEATURES = {"mlp": mlp_features, "cnn": cnn_features}


# Task 1's penalty on the representation's scale (docs/method.md, section 8): without it, pruned
# models under label skew inflate their features until the inner curvature blows the run up.
FEATURE_L2 = 3e-3


def hyper_representation_problem(activation: str = "relu", l2: float = 1e-3,
                                 model: str = "mlp", outer_l2: float = 0.0,
                                 feature_l2: float = FEATURE_L2,
                                 width_scale_units: int = 0) -> BilevelProblem:
  """g_i = CE(train) + l2/2 ||y||^2, f_i = CE(val) + feature_l2/2 mean_rows ||features||^2.

  Batches {"inputs", "labels", "weight"}. feature_l2 (default FEATURE_L2; 0 drops the term
  from the traced loss) penalises the representation's scale in function space: the mean over
  the batch rows of the squared norm of a row's features (the MLP's hidden activations, the
  CNN's flattened conv2 activations), at each client's pruned point (docs/method.md, section 8).

  Opt-in terms (each off at 0, the default, adding nothing to the traced losses):
    outer_l2     f_i += outer_l2/2 ||x||^2 (weight decay on the representation);
    width_scale_units  K, the full model's units of the last x layer (the MLP's hidden units,
                 the CNN's conv2 channels): a submodel's features are multiplied by K / k, k its
                 kept units (columns of that layer's kernel that are not all zero), in g and f:
                 the 1/r scaler of HeteroFL / dropout, so a submodel's logits have the full
                 model's scale. The full model (k = K) is unchanged.
  """
  feats_of = FEATURES[model]
  head = _cnn_head if model == "cnn" else lambda y, h: dense(y["head"], h)

  def features(x, inputs):
    h = feats_of(x, inputs, activation)
    if width_scale_units:
      kernel = x["conv2" if model == "cnn" else "hidden"]["kernel"]
      live = jnp.any(jax.lax.stop_gradient(kernel) != 0,
                     axis=tuple(range(kernel.ndim - 1)))
      h = h * (width_scale_units / jnp.maximum(jnp.sum(live), 1)).astype(h.dtype)
    return h

  def inner(x, y, b):
    ce = weighted_ce(head(y, features(x, b["inputs"])), b["labels"], b["weight"])
    return ce + 0.5 * l2 * sum(jnp.sum(t ** 2) for t in jax.tree.leaves(y))

  def outer(x, y, b):
    h = features(x, b["inputs"])
    ce = weighted_ce(head(y, h), b["labels"], b["weight"])
    if feature_l2:  # a Python float: 0 adds nothing to the traced loss
      sq = jnp.sum(h.reshape(h.shape[0], -1) ** 2, -1)
      w = b["weight"]
      ce = ce + 0.5 * feature_l2 * jnp.sum(w * sq) / jnp.maximum(jnp.sum(w), 1e-12)
    if outer_l2:
      ce = ce + 0.5 * outer_l2 * sum(jnp.sum(t ** 2) for t in jax.tree.leaves(x))
    return ce

  return BilevelProblem(inner, outer)
