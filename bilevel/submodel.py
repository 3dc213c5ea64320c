"""Extract / scatter between full parameters and compact submodels for unit masks.

A client whose unit mask keeps k of K units of a group runs on arrays whose axes indexed by that
group have length k (`jnp.take` of the kept indices). `scatter` puts a compact tree back at those
indices (zeros elsewhere), so masked-full and compact computations can be compared and a compact
client's delta can be coverage-averaged with everybody else's.

Compact clients (federated.make_round(..., submodel="compact")): a client at level (r_x, r_y)
keeps k_x = ceil(r_x K) units of a group x indexes and k_y of a group only y indexes, static per
level. Groups both sides index (the MLP's hidden units) are extracted with x's indices on both
sides, and y's compact mask zeroes the rows x keeps but y does not, so the hidden width matches
and the numbers equal the dense masked computation (only the summation order differs).
The loss functions must accept compact arrays (models.mlp_logits does); client data is not
extracted, so groups that index data (hyper-cleaning's per-sample weights) need the dense path.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bilevel.masks import Axes, UnitLayout, UnitMasks, expand_unit_masks

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


# ------------------------------------------------------------------ compact clients


def group_keep_counts(layout: UnitLayout, kx: Mapping[str, int],
                      ky: Mapping[str, int]) -> dict[str, int]:
  """Static compact width per group: k_x for groups x indexes (y's kept set is nested in x's
  there), k_y for groups only y indexes."""
  in_x = layout.groups_of(layout.x)
  return {g: int(kx[g] if g in in_x else ky[g]) for g in sorted(layout.groups)}


def compact_indices(layout: UnitLayout, umx: UnitMasks, umy: UnitMasks,
                    counts: Mapping[str, int]) -> dict[str, jax.Array]:
  """Kept unit indices per group: x's kept units where x indexes the group, else y's."""
  return {g: kept_indices(umx[g] if g in umx else umy[g], counts[g]) for g in counts}


def compact_masks(layout: UnitLayout, umx: UnitMasks, umy: UnitMasks, idx: Indices,
                  x_c: PyTree, y_c: PyTree) -> tuple[PyTree, PyTree]:
  """Parameter masks of the compact arrays: the unit masks read at the kept indices.

  x's compact mask is all ones; y's is zero on the head rows x keeps but y does not (shared
  groups extract y with x's indices so that the hidden width matches on both sides).
  """
  cut = lambda um: {g: jnp.take(m, idx[g]) for g, m in um.items()}
  return expand_unit_masks(layout, cut(umx), cut(umy), x_c, y_c)
