"""Extract / scatter between full parameters and compact submodels for unit masks.

A client whose unit mask keeps k of K units of a group runs on arrays whose axes indexed by that
group have length k (`jnp.take` of the kept indices). `scatter` puts a compact tree back at those
indices (zeros elsewhere), so masked-full and compact computations can be compared and a compact
client's delta can be coverage-averaged with everybody else's.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bilevel.masks import Axes

PyTree = Any
Indices = Mapping[str, jax.Array]  # group -> [k] int32 kept unit indices (static k)


def kept_indices(unit_mask: jax.Array, k: int) -> jax.Array:
  """The k kept unit indices in increasing order (k static; the mask must keep exactly k)."""
  return jnp.nonzero(unit_mask, size=k, fill_value=0)[0].astype(jnp.int32)


def extract(axes_tree: PyTree, params: PyTree, idx: Indices) -> PyTree:
  """Compact arrays: along every (group, axis) of a leaf keep only idx[group]."""

  def leaf(axes: Axes, p: jax.Array) -> jax.Array:
    for g, ax in axes.pairs:
      p = jnp.take(p, idx[g], axis=ax)
    return p

  return jax.tree.map(leaf, axes_tree, params)


def scatter(axes_tree: PyTree, compact: PyTree, idx: Indices, like: PyTree) -> PyTree:
  """Inverse of `extract`: full-size arrays (shapes of `like`), zero outside the kept indices."""

  def leaf(axes: Axes, c: jax.Array, full: jax.Array) -> jax.Array:
    for g, ax in axes.pairs:
      shape = list(c.shape)
      shape[ax] = full.shape[ax]
      c = jnp.zeros(shape, c.dtype).at[(slice(None),) * ax + (idx[g],)].set(c)
    return c

  return jax.tree.map(leaf, axes_tree, compact, like)
