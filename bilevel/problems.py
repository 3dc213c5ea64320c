"""Bilevel problems: the `BilevelProblem` container.

A bilevel problem is a pair of scalar losses of the outer variable x and the
inner variable y (each an arbitrary PyTree) and a batch (an arbitrary PyTree):

    min_x  Phi(x) = f(x, y*(x)),   y*(x) = argmin_y g(x, y)     (g strongly convex in y)

The federated objective averages client losses (docs/method.md, section 2); the library only ever
sees one client's (f_i, g_i) through the client's batch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any
Batch = Any
Loss = Callable[[PyTree, PyTree, Batch], jax.Array]


class BilevelProblem(NamedTuple):
  """Inner loss g(x, y, batch) and outer loss f(x, y, batch), both scalar."""

  inner_loss: Loss
  outer_loss: Loss
