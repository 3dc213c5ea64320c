"""Small PyTree linear-algebra helpers shared by estimators, clients and the server.

scale, norm, zeros_like, ones_like and size are optax.tree_utils' functions. The rest are
written here because optax's differ: its tree_add sums from a Python 0 (eagerly -0.0 + -0.0
gives +0.0), its sub, mul and add_scale return jax.Arrays for NumPy leaves, its vdot may sum in
another order, and its where takes a mask per leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

PyTree = Any


def add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


scale = otu.tree_scale  # (s, a) -> s * a


def axpy(s: jax.typing.ArrayLike, a: PyTree, b: PyTree) -> PyTree:
  """s * a + b."""
  return jax.tree.map(lambda u, w: s * u + w, a, b)


def mul(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.multiply, a, b)


def masked(a: PyTree, mask: PyTree | None) -> PyTree:
  """a * mask leafwise; a itself when mask is None (keep every coordinate)."""
  return a if mask is None else mul(a, mask)


def where(mask: PyTree, a: PyTree, b: PyTree) -> PyTree:
  """a where mask != 0, else b (leafwise)."""
  return jax.tree.map(lambda m, u, w: jnp.where(m != 0, u, w), mask, a, b)


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(jax.tree.map(lambda u, w: jnp.sum(u * w), a, b))
  return sum(leaves, jnp.zeros((), leaves[0].dtype)) if leaves else jnp.zeros(())


norm = otu.tree_norm  # Euclidean norm: sqrt of the sum over leaves of sum(t ** 2)
zeros_like = otu.tree_zeros_like
ones_like = otu.tree_ones_like
size = otu.tree_size  # total number of entries (a Python int)


def weighted_sum(t_C: PyTree, weights: jax.Array) -> PyTree:
  """sum_c weights[c] * t_C[c] over the leading (client) axis of every leaf.

  Written as a dot, not jnp.sum(w * t, axis=0): XLA:CPU reduces a leading axis of a large
  array ~100x slower than it runs the same GEMV (0.31 s vs 3 ms for [100, 784, 200] on the
  2-core CPU). HIGHEST precision: no TF32 rounding of the aggregate on GPUs.
  """
  return jax.tree.map(lambda a: jnp.tensordot(weights.astype(a.dtype), a, axes=1,
                                              precision=jax.lax.Precision.HIGHEST), t_C)


def stack(trees: list[PyTree]) -> PyTree:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def index(tree: PyTree, i: int) -> PyTree:
  return jax.tree.map(lambda t: t[i], tree)


def signature(t: PyTree) -> tuple[Any, ...]:
  """Tree structure, shapes and dtypes of t (what a jitted function is traced for)."""
  leaves, treedef = jax.tree.flatten(t)
  return (treedef,) + tuple((jnp.shape(a), str(jnp.result_type(a))) for a in leaves)
