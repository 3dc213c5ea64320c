"""Masked inner solve: T gradient steps on y at the pruned point (lax.scan).

    y <- y - t * m_y * grad_y g(x * m_x, y * m_y)

with t = beta (step_rule="fixed") or t = min(beta, g'g / g'Hg) along the masked gradient g
(step_rule="cauchy", the default: the exact line-search step of g's local quadratic model,
capped at beta; H g is one product, fd by default, so no second-order autodiff).
The cap keeps t below 1 / (curvature of g along g): a fixed step diverges once
beta * lambda_max(H) > 2, which label-skewed clients reach as their features grow
(docs/method.md, section 8). When g'Hg <= 0 the step is beta.
Entries of y outside m_y are never read by g and stay exactly as sent.
"""

from __future__ import annotations

from typing import Any

import jax

from bilevel import tree
from bilevel.hypergrad import cauchy_step, fd_products
from bilevel.problems import Loss

PyTree = Any
STEP_RULES = ("cauchy", "fixed")


def inner_solve(inner_loss: Loss, x: PyTree, y: PyTree, batch: Any, *, num_steps: int,
                step_size: float, mask_x: PyTree | None = None,
                mask_y: PyTree | None = None, step_rule: str = "fixed",
                product: str = "fd", delta: float = 1e-3) -> PyTree:
  """num_steps masked gradient steps on y with step beta = step_size (see the module doc).

  step_rule="cauchy" evaluates H g with `product`: "fd" (central differences at y +- d g,
  d = delta / ||g||: first-order gradients only) or "exact" (the gradient linearised at y, so
  H g reuses the gradient's forward pass).
  """
  xm = tree.masked(x, mask_x)
  grad = lambda yy: jax.grad(inner_loss, argnums=1)(xm, yy, batch)

  def step(yk, _):
    ym = tree.masked(yk, mask_y)
    if step_rule == "cauchy" and product == "exact":
      g, hvp = jax.linearize(grad, ym)
    else:
      g = grad(ym)
    g = tree.masked(g, mask_y)
    t = step_size
    if step_rule == "cauchy":
      hg = hvp(g) if product == "exact" else fd_products(inner_loss, xm, ym, g, batch, delta,
                                                          False).hv
      hg = tree.masked(hg, mask_y)
      t = cauchy_step(step_size, tree.vdot(g, g), tree.vdot(g, hg))
    return tree.axpy(-t, g, yk), None

  y, _ = jax.lax.scan(step, y, None, length=num_steps)
  return y
