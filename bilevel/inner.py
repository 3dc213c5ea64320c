"""Masked inner solve: T gradient steps on y at the pruned point (lax.scan).

    y <- y - beta * m_y * grad_y g(x * m_x, y * m_y)

Entries of y outside m_y are never read by g and stay exactly as sent.
"""

from __future__ import annotations

from typing import Any

import jax

from bilevel import tree
from bilevel.problems import Loss

PyTree = Any


def inner_solve(inner_loss: Loss, x: PyTree, y: PyTree, batch: Any, *, num_steps: int,
                step_size: float, mask_x: PyTree | None = None,
                mask_y: PyTree | None = None) -> PyTree:
  """num_steps masked gradient steps on y with step size beta = step_size."""
  xm = tree.masked(x, mask_x)

  def step(yk, _):
    ym = tree.masked(yk, mask_y)
    g = jax.grad(inner_loss, argnums=1)(xm, ym, batch)
    g = tree.masked(g, mask_y)
    return tree.axpy(-step_size, g, yk), None

  y, _ = jax.lax.scan(step, y, None, length=num_steps)
  return y
