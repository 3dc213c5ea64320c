"""Server aggregation (SPEC section 6) and the server step.

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

PyTree = Any


def _weights(masks_C: PyTree, weights_C: jax.Array | None) -> jax.Array:
  if weights_C is not None:
    return jnp.asarray(weights_C)
  return jnp.ones(jax.tree.leaves(masks_C)[0].shape[:1])


def _bcast(w: jax.Array, t: jax.Array) -> jax.Array:
  return w.reshape(w.shape + (1,) * (t.ndim - 1)).astype(t.dtype)


def coverage_mean(deltas_C: PyTree, masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """Per-coordinate weighted mean over the clients that keep the coordinate; 0 if none does."""
  w = _weights(masks_C, weights_C)

  def leaf(d, m):
    wm = _bcast(w, m) * m
    num, den = jnp.sum(wm * d, axis=0), jnp.sum(wm, axis=0)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0).astype(d.dtype)

  return jax.tree.map(leaf, deltas_C, masks_C)


def zero_fill_mean(deltas_C: PyTree, masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """FedAvg with zero-filled deltas: sum_i w_i m_i D_i / sum_i w_i (ablation)."""
  w = _weights(masks_C, weights_C)
  total = jnp.maximum(jnp.sum(w), 1e-30)
  return jax.tree.map(lambda d, m: (jnp.sum(_bcast(w, m) * m * d, axis=0) / total).astype(d.dtype),
                      deltas_C, masks_C)


Aggregator = Callable[[PyTree, PyTree, jax.Array | None], PyTree]
AGGREGATORS: dict[str, Aggregator] = {"coverage": coverage_mean, "zero_fill": zero_fill_mean}


def covered(masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """1 where some client with positive weight keeps the coordinate."""
  w = _weights(masks_C, weights_C)
  return jax.tree.map(lambda m: (jnp.sum(_bcast(w, m) * m, axis=0) > 0).astype(m.dtype), masks_C)


def server_step(params: PyTree, agg_delta: PyTree, cover: PyTree,
                optimizer: optax.GradientTransformation,
                opt_state: optax.OptState) -> tuple[PyTree, optax.OptState]:
  """params + (optimiser update of the pseudo-gradient -agg), zeroed where nothing is covered.

  optax.sgd(s) gives new = old + s * agg (SPEC section 6); any optax optimiser may stand in.
  """
  pseudo_grad = jax.tree.map(jnp.negative, agg_delta)
  updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
  updates = jax.tree.map(lambda u, c: jnp.where(c > 0, u, 0).astype(u.dtype), updates, cover)
  return optax.apply_updates(params, updates), opt_state
