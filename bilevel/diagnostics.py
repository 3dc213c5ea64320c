"""Diagnostics on the global problem: the true full-model hypergradient and how far a round's
aggregated estimate is from it (what pruning costs in hypergradient quality).

For client data stacked on a leading [M] axis, the global losses are the client means
(docs/method.md, section 2):

    G(x, y) = (1/M) sum_i g_i(x, y),   F(x, y) = (1/M) sum_i f_i(x, y).

`true_hypergradient` solves the inner problem y* = argmin_y G(x, y) by L-BFGS from a warm start
until ||grad_y G|| <= inner_tol (or max_inner_steps), then the linear system H v = grad_y F by
conjugate gradients (exact Hessian-vector products, cg_steps iterations from v = 0), and returns
grad Phi(x) = grad_x F - J v together with the tolerances it reached. The probes' figures
(experiments/probe.py): `max_curvature` of the inner Hessian, `unit_round` per hidden unit.
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


def max_curvature(inner_loss, x: PyTree, y: PyTree, batch: Any, key: jax.Array,
                  steps: int) -> jax.Array:
  """lambda_max of the inner Hessian d^2 g / dy^2 at (x, y): `steps` power iterations with exact
  products from a normal start drawn with key."""
  hv = lambda p: hypergrad.exact_products(inner_loss, x, y, p, batch, 0.0, False).hv
  p0 = jax.tree.map(lambda t: jax.random.normal(key, t.shape, t.dtype), y)

  def power(p, _):
    hp = hv(p)
    return tree.scale(1.0 / jnp.maximum(tree.norm(hp), 1e-30), hp), None

  p, _ = jax.lax.scan(power, p0, None, length=steps)
  return tree.vdot(p, hv(p))


def unit_round(rnd, data: Any, state: Any) -> tuple[Any, dict, dict[str, jax.Array]]:
  """One round of a dense MLP round `rnd` -> (new state, metrics, per hidden unit j; C clients, K
  units): c [K] clients keeping j; agg_dx / agg_dy, rad_x / rad_y [K] norm and radial part of its
  aggregated x column / head row delta; align [K] agg_dx / mean ||D_ij|| over the keeping clients;
  dxc [C, K] ||D_ij||; m [C, K] masks; level [C] keep ratios; wn / hn [K] norms after the round."""
  ids = jnp.concatenate(rnd.sample_fn(state.round))
  res = jax.vmap(rnd.client_fns[0], (None, None, 0, 0, None))(
      state, data, ids, jnp.arange(ids.shape[0]), state.round)
  new, metrics = rnd.server_fn(state, [res])
  m, delta = res.mask_x["hidden"]["bias"], res.out.delta_x["hidden"]
  c = m.sum(0)
  dxc = jnp.sqrt(jnp.sum(delta["kernel"] ** 2, 1) + delta["bias"] ** 2)
  w, head = state.x["hidden"]["kernel"], state.y["head"]["kernel"]
  dw, dhead = new.x["hidden"]["kernel"] - w, new.y["head"]["kernel"] - head
  agg_dx = jnp.sqrt(jnp.sum(dw ** 2, 0))
  align = agg_dx / jnp.maximum(jnp.sum(dxc * m, 0) / jnp.maximum(c, 1), 1e-12)
  return new, metrics, dict(
      c=c, agg_dx=agg_dx, rad_x=jnp.sum(dw * w, 0) / jnp.linalg.norm(w, axis=0),
      agg_dy=jnp.sqrt(jnp.sum(dhead ** 2, -1)), align=align, dxc=dxc, m=m,
      rad_y=jnp.sum(dhead * head, -1) / jnp.linalg.norm(head, axis=-1),
      level=jnp.asarray(rnd.client_ratios)[ids, 0],
      wn=jnp.linalg.norm(new.x["hidden"]["kernel"], axis=0),
      hn=jnp.linalg.norm(new.y["head"]["kernel"], axis=-1))
