"""Extract / scatter between full parameters and compact submodels for unit masks.

A client whose unit mask keeps k of K units of a group runs on arrays whose axes indexed by that
group have length k (`jnp.take` of the kept indices). `scatter_add` sums a stack of compact
client outputs into one full-size tree (the server's coverage sums) without a full-size copy
per client.

Compact clients (rafbo.make_round(..., submodel="compact")): a client at level (r_x, r_y)
keeps k_x = ceil(r_x K) units of a group only x indexes and k_y of a group only y indexes, static
per level (masks.host_keep_count). Groups both sides index (the MLP's hidden units) keep the
intersection on both sides (masks.unit_masks), min(k_x, k_y) units, extracted with the same
indices on both sides, so the hidden width matches and the numbers equal the dense masked
computation (only the summation order differs).
The loss functions must accept compact arrays (models.mlp_logits does); client data is not
extracted, so groups that index data (hyper-cleaning's per-sample weights) need the dense path.

Compact clients compute in units-major form (`to_units_major`: each leaf's unit axes moved to
the front, so the MLP's hidden kernel [D, K] is held as [K, D]); `units_major_problem` hands the
losses their arguments in the model's layout. A kept unit is then one contiguous row: extraction
gathers rows, the weight gradients come out row by row and the server's scatter-add writes
whole rows, with no transposes in memory (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from bilevel import tree
from bilevel.masks import Axes, UnitLayout, UnitMasks
from bilevel.problems import BilevelProblem

PyTree = Any
# group -> [k] int32 kept unit indices (static k); a group left out keeps all its units.
Indices = Mapping[str, jax.Array]


def extract(axes_tree: PyTree, params: PyTree, idx: Indices) -> PyTree:
  """Compact arrays: along every (group, axis) of a leaf keep only idx[group] (groups missing
  from idx keep all their units). The indices are sorted and in range by construction."""

  def leaf(axes: Axes, p: jax.Array) -> jax.Array:
    for g, ax in axes.pairs:
      if g in idx:
        p = p.at[(slice(None),) * ax + (idx[g],)].get(
            mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True)
    return p

  return jax.tree.map(leaf, axes_tree, params)


def _scatter_add_leaf(axes: Axes, c: jax.Array, idx_C: Indices, shape: tuple[int, ...],
                      weights: jax.Array | None):
  """sum_i w_i c[i] placed at idx_C[., i] along the leaf's group axes, into zeros(shape).

  One lax.scatter_add whose windows are the non-group axes; the scatter indices are
  [C, k_1, ..., k_n, n], one entry per kept index combination. (XLA:CPU still transposes the
  updates so that the window is minor: BENCHMARKS.md counts that cost.)
  """
  pairs = sorted(((g, ax) for g, ax in axes.pairs if g in idx_C), key=lambda pair: pair[1])
  weights = jnp.ones(c.shape[:1], c.dtype) if weights is None else weights.astype(c.dtype)
  if not pairs:  # every axis at full width: a plain weighted sum over clients
    return tree.weighted_sum(c, weights)
  c = weights.reshape((-1,) + (1,) * (c.ndim - 1)) * c
  clients, n = c.shape[0], len(pairs)
  ks = [idx_C[g].shape[1] for g, _ in pairs]
  columns = [jnp.broadcast_to(idx_C[g].reshape((clients,) + (1,) * i + (k,) + (1,) * (n - 1 - i)),
                              (clients, *ks)) for i, ((g, _), k) in enumerate(zip(pairs, ks))]
  group_axes = tuple(ax for _, ax in pairs)
  dnums = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(ax + 1 for ax in range(len(shape)) if ax not in group_axes),
      inserted_window_dims=group_axes, scatter_dims_to_operand_dims=group_axes)
  return jax.lax.scatter_add(jnp.zeros(shape, c.dtype), jnp.stack(columns, axis=-1), c, dnums,
                             mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def scatter_add(axes_tree: PyTree, compact_C: PyTree, idx_C: Indices, like: PyTree,
                weights: jax.Array | None = None) -> PyTree:
  """sum_c w_c (compact_C[c] put back at idx_C[c], zeros elsewhere) without materialising the
  [C, full] stack.

  compact_C: compact trees stacked on a leading client axis [C, ...]; idx_C: group -> [C, k];
  weights: [C] (ones by default). The work is C x (compact size), not C x (full size).
  """
  return jax.tree.map(lambda axes, c, full: _scatter_add_leaf(axes, c, idx_C, full.shape,
                                                              weights),
                      axes_tree, compact_C, like)


def scatter_add_units(axes_tree: PyTree, masks_C: PyTree, idx_C: Indices, like: PyTree,
                      weights: jax.Array | None = None) -> PyTree:
  """scatter_add for stacks that are constant along every axis no group indexes (unit masks
  and functions of them): summed on the group axes only, then broadcast to the full shape."""

  def leaf(axes: Axes, m: jax.Array, full: jax.Array) -> jax.Array:
    group_axes = {ax for _, ax in axes.pairs}
    keep = tuple(slice(None) if ax in group_axes else slice(0, 1) for ax in range(full.ndim))
    small = tuple(d if ax in group_axes else 1 for ax, d in enumerate(full.shape))
    out = _scatter_add_leaf(axes, m[(slice(None),) + keep], idx_C, small, weights)
    return jnp.broadcast_to(out.reshape(small), full.shape)

  return jax.tree.map(leaf, axes_tree, masks_C, like)


# ------------------------------------------------------------------ units-major form


def _unit_axes(axes: Axes) -> list[int]:
  return sorted(ax for _, ax in axes.pairs)


def units_major_layout(layout: UnitLayout) -> UnitLayout:
  """The layout of `to_units_major` trees: each leaf's unit axes first, in their axis order."""

  def leaf(axes: Axes) -> Axes:
    order = _unit_axes(axes)
    return Axes(tuple((g, order.index(ax)) for g, ax in axes.pairs))

  return UnitLayout(layout.groups, jax.tree.map(leaf, layout.x), jax.tree.map(leaf, layout.y))


def to_units_major(axes_tree: PyTree, params: PyTree) -> PyTree:
  """Move every leaf's unit axes to the front (the MLP's hidden kernel [D, K] becomes [K, D])."""
  return jax.tree.map(lambda a, p: jnp.moveaxis(p, _unit_axes(a), list(range(len(a.pairs)))),
                      axes_tree, params)


def from_units_major(axes_tree: PyTree, params: PyTree) -> PyTree:
  """Inverse of `to_units_major` (any widths: full or compact)."""
  return jax.tree.map(lambda a, p: jnp.moveaxis(p, list(range(len(a.pairs))), _unit_axes(a)),
                      axes_tree, params)


def units_major_problem(problem: BilevelProblem, layout: UnitLayout) -> BilevelProblem:
  """The same losses of units-major (x, y): they see their arguments in the model's layout."""
  back = lambda x, y: (from_units_major(layout.x, x), from_units_major(layout.y, y))
  return BilevelProblem(lambda x, y, b: problem.inner_loss(*back(x, y), b),
                        lambda x, y, b: problem.outer_loss(*back(x, y), b))


# ------------------------------------------------------------------ compact clients


def group_keep_counts(layout: UnitLayout, kx: Mapping[str, int],
                      ky: Mapping[str, int]) -> dict[str, int]:
  """Static compact width per group: k_x for groups only x indexes, k_y for groups only y
  indexes, min(k_x, k_y) for shared groups (both sides keep the intersection: masks.unit_masks).
  kx, ky: masks.host_keep_count per group."""
  in_x, in_y = layout.groups_of(layout.x), layout.groups_of(layout.y)
  width = lambda g: min(kx[g], ky[g]) if g in in_x and g in in_y else kx[g] if g in in_x else ky[g]
  return {g: int(width(g)) for g in sorted(layout.groups)}


def compact_indices(layout: UnitLayout, umx: UnitMasks, umy: UnitMasks,
                    counts: Mapping[str, int]) -> dict[str, jax.Array]:
  """Kept unit indices per group, in increasing order: x's kept units where x indexes the group,
  else y's (counts[g] static: the mask keeps exactly that many).

  Groups kept at full width (counts[g] = K) are left out: their indices would be 0..K-1, so
  extract and scatter_add leave those axes as they are.
  """
  kept = lambda m, k: jnp.nonzero(m, size=k, fill_value=0)[0].astype(jnp.int32)
  return {g: kept(umx[g] if g in umx else umy[g], counts[g]) for g in counts
          if counts[g] < layout.groups[g]}


def compact_unit_masks(umx: UnitMasks, umy: UnitMasks,
                       idx: Indices) -> tuple[UnitMasks, UnitMasks]:
  """The unit masks read at the kept indices (all ones: shared groups keep the same units on
  both sides, and every other group is extracted with its own side's indices)."""
  cut = lambda um: {g: jnp.take(m, idx[g]) if g in idx else m for g, m in um.items()}
  return cut(umx), cut(umy)
