"""Server aggregation (docs/method.md, section 5) and the server step.

Coverage mean, per coordinate j over the clients i of a round:

    agg[j] = sum_i w_i m_i[j] D_i[j] / sum_i w_i m_i[j]   where sum_i w_i m_i[j] > 0, else 0

so the server update new = old + s * agg leaves uncovered coordinates unchanged. Zero-filled
FedAvg divides by sum_i w_i instead (an ablation: it shrinks rarely covered coordinates).
Trees with suffix _C carry a leading client axis [C, ...]; weights_C is [C] (1 or example counts).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bilevel import tree

PyTree = Any


def _weights(masks_C: PyTree, weights_C: jax.Array | None) -> jax.Array:
  if weights_C is not None:
    return jnp.asarray(weights_C)
  return jnp.ones(jax.tree.leaves(masks_C)[0].shape[:1])


def masked_sums(deltas_C: PyTree, masks_C: PyTree,
                weights_C: jax.Array | None = None) -> tuple[PyTree, PyTree]:
  """(sum_i w_i m_i D_i, sum_i w_i m_i) per coordinate: what every aggregator divides."""
  w = _weights(masks_C, weights_C)
  return tree.weighted_sum(tree.mul(masks_C, deltas_C), w), tree.weighted_sum(masks_C, w)


def coverage_from_sums(num: PyTree, den: PyTree, total_weight: jax.Array) -> PyTree:
  """num / den where den > 0, else 0 (total_weight unused: the coverage mean ignores it)."""
  del total_weight
  return jax.tree.map(
      lambda n, d: jnp.where(d > 0, n / jnp.where(d > 0, d, 1), 0).astype(n.dtype), num, den)


def zero_fill_from_sums(num: PyTree, den: PyTree, total_weight: jax.Array) -> PyTree:
  """num / sum_i w_i (FedAvg of zero-filled deltas)."""
  del den
  total = jnp.maximum(total_weight, 1e-30)
  return jax.tree.map(lambda n: (n / total).astype(n.dtype), num)


def coverage_mean(deltas_C: PyTree, masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """Per-coordinate weighted mean over the clients that keep the coordinate; 0 if none does."""
  return coverage_from_sums(*masked_sums(deltas_C, masks_C, weights_C), None)


def zero_fill_mean(deltas_C: PyTree, masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """FedAvg with zero-filled deltas: sum_i w_i m_i D_i / sum_i w_i (ablation)."""
  num, den = masked_sums(deltas_C, masks_C, weights_C)
  return zero_fill_from_sums(num, den, jnp.sum(_weights(masks_C, weights_C)))


# The round aggregates from sums (federated.RoundSums): compact clients add their deltas into one
# full-size sum and never build the per-client [C, ...] stacks the functions above read.
Aggregator = Callable[[PyTree, PyTree, jax.Array], PyTree]
AGGREGATORS: dict[str, Aggregator] = {"coverage": coverage_from_sums,
                                      "zero_fill": zero_fill_from_sums}


def covered(masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """1 where some client with positive weight keeps the coordinate."""
  return covered_from_sums(tree.weighted_sum(masks_C, _weights(masks_C, weights_C)))


def covered_from_sums(den: PyTree) -> PyTree:
  """1 where sum_i w_i m_i > 0."""
  return jax.tree.map(lambda d: (d > 0).astype(d.dtype), den)


def server_step(params: PyTree, agg_delta: PyTree, cover: PyTree,
                optimizer: optax.GradientTransformation,
                opt_state: optax.OptState) -> tuple[PyTree, optax.OptState]:
  """params + (optimiser update of the pseudo-gradient -agg), zeroed where nothing is covered.

  optax.sgd(s) gives new = old + s * agg (docs/method.md, section 5); any optax optimiser may
  stand in.
  A stateful optimiser's per-coordinate state (momentum, Adam's mu and nu) keeps its old value
  where nothing is covered: the zero pseudo-gradient there is no observation, and decaying the
  moments of a frozen coordinate would distort its next covered step. State leaves that are not
  shaped like the parameters (step counts) advance as usual.
  """
  pseudo_grad = jax.tree.map(jnp.negative, agg_delta)
  updates, new_state = optimizer.update(pseudo_grad, opt_state, params)
  updates = jax.tree.map(lambda u, c: jnp.where(c > 0, u, 0).astype(u.dtype), updates, cover)
  return optax.apply_updates(params, updates), keep_uncovered_state(optimizer, new_state,
                                                                    opt_state, cover)


def keep_uncovered_state(optimizer: optax.GradientTransformation, new_state: optax.OptState,
                         old_state: optax.OptState, cover: PyTree) -> optax.OptState:
  """new_state, with old_state's value at uncovered coordinates of every param-shaped tree."""
  # The cover, placed at every param-shaped subtree of the state (True elsewhere: keep new).
  select = optax.tree_utils.tree_map_params(
      optimizer, lambda _, c: c > 0, new_state, cover,
      transform_non_params=lambda t: jax.tree.map(lambda _: True, t))
  return jax.tree.map(lambda s, n, o: jnp.where(s, n, o), select, new_state, old_state)
