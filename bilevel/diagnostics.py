"""Diagnostics on the global problem: the true full-model hypergradient and how far a round's
aggregated estimate is from it (what pruning costs in hypergradient quality).

For client data stacked on a leading [M] axis, the global losses are the client means
(docs/method.md, section 2):

    G(x, y) = (1/M) sum_i g_i(x, y),   F(x, y) = (1/M) sum_i f_i(x, y).

`true_hypergradient` solves the inner problem y* = argmin_y G(x, y) by L-BFGS from a warm start
until ||grad_y G|| <= inner_tol (or max_inner_steps), then the linear system H v = grad_y F by
conjugate gradients (exact Hessian-vector products, cg_steps iterations from v = 0), and returns
grad Phi(x) = grad_x F - J v together with the tolerances it reached.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel import hypergrad, tree
from bilevel.problems import BilevelProblem

PyTree = Any


class TrueHypergradient(NamedTuple):
  hypergrad: PyTree  # grad Phi(x), like x
  y_star: PyTree  # the inner solution reached
  inner_grad_norm: jax.Array  # ||grad_y G(x, y_star)||: the inner tolerance reached
  inner_steps: jax.Array  # L-BFGS iterations used
  cg_residual: jax.Array  # ||H v - grad_y F|| / ||grad_y F||: the linear-system tolerance


def solve_inner(inner_loss, x: PyTree, y0: PyTree, batch: Any, *, tol: float,
                max_steps: int) -> tuple[PyTree, jax.Array, jax.Array]:
  """L-BFGS (optax, zoom line search) on y -> inner_loss(x, y, batch) from y0."""
  fun = lambda y: inner_loss(x, y, batch)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    y, state = carry
    value, grad = value_and_grad(y, state=state)
    updates, state = opt.update(grad, state, y, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(y, updates), state

  def unfinished(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad_norm = tree.norm(optax.tree_utils.tree_get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

  y, state = jax.lax.while_loop(unfinished, step, (y0, opt.init(y0)))
  grad_norm = tree.norm(jax.grad(fun)(y))
  return y, grad_norm, optax.tree_utils.tree_get(state, "count")


def true_hypergradient(problem: BilevelProblem, x: PyTree, y0: PyTree, inner_data: Any,
                       outer_data: Any, *, inner_tol: float = 1e-5, max_inner_steps: int = 500,
                       cg_steps: int = 100) -> TrueHypergradient:
  """grad Phi(x) of the global problem over client data stacked on [M] (see module doc)."""
  mean_over = lambda loss: lambda x, y, b: jnp.mean(jax.vmap(loss, (None, None, 0))(x, y, b))
  glob = BilevelProblem(mean_over(problem.inner_loss), mean_over(problem.outer_loss))  # G, F
  y_star, grad_norm, steps = solve_inner(glob.inner_loss, x, y0, inner_data, tol=inner_tol,
                                         max_steps=max_inner_steps)
  res = hypergrad.hypergradient(glob, x, y_star, inner_data, outer_data, estimator="cg",
                                num_steps=cg_steps)
  gyf = jax.grad(glob.outer_loss, argnums=1)(x, y_star, outer_data)
  hv = hypergrad.exact_products(glob.inner_loss, x, y_star, res.v, inner_data, 0.0, False).hv
  residual = tree.norm(tree.sub(hv, gyf)) / jnp.maximum(tree.norm(gyf), 1e-30)
  return TrueHypergradient(res.hypergrad, y_star, grad_norm, steps, residual)


def estimate_quality(estimate: PyTree, true: PyTree) -> dict[str, jax.Array]:
  """Cosine and relative error of an estimate against the true hypergradient, and its norm."""
  true_norm = tree.norm(true)
  return dict(true_hypergrad_norm=true_norm,
              cosine=tree.vdot(estimate, true) / jnp.maximum(tree.norm(estimate) * true_norm,
                                                               1e-30),
              relative_error=tree.norm(tree.sub(estimate, true)) / jnp.maximum(true_norm, 1e-30))
