"""Server aggregation (docs/method.md, section 5) and the server step.

Coverage mean, per coordinate j over the clients i of a round:

    agg[j] = sum_i w_i m_i[j] D_i[j] / sum_i w_i m_i[j]   where sum_i w_i m_i[j] > 0, else 0

so the server update new = old + s * agg leaves uncovered coordinates unchanged. Zero-filled
FedAvg divides by sum_i w_i instead (an ablation: it shrinks rarely covered coordinates).
Trees with suffix _C carry a leading client axis [C, ...]; weights_C is [C] (1 or example counts).
The round's server step (`server_update`) reads the clients' results only through their sums
(`round_sums`), divides them (an `Aggregator`) and steps x with the server optimiser.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from bilevel import masks as masks_lib
from bilevel import submodel as submodel_lib
from bilevel import tree
from bilevel.masks import UnitLayout

PyTree = Any


def coverage_from_sums(num: PyTree, den: PyTree, total_weight: jax.Array) -> PyTree:
  """num / den where den > 0, else 0 (total_weight unused: the coverage mean ignores it)."""
  del total_weight
  return jax.tree.map(
      lambda n, d: jnp.where(d > 0, n / jnp.where(d > 0, d, 1), 0).astype(n.dtype), num, den)


def zero_fill_from_sums(num: PyTree, den: PyTree, total_weight: jax.Array) -> PyTree:
  """num / sum_i w_i (FedAvg of zero-filled deltas)."""
  del den
  total = jnp.maximum(total_weight, 1e-30)
  return jax.tree.map(lambda n: (n / total).astype(n.dtype), num)


# An aggregator divides the round's sums (num = sum_i w_i m_i D_i, den = sum_i w_i m_i, sum_i w_i)
# (a value, or its name in AGGREGATORS): compact clients add their deltas into one full-size
# sum, never a per-client [C, ...] stack.
Aggregator = Callable[[PyTree, PyTree, jax.Array], PyTree]
AGGREGATORS: dict[str, Aggregator] = {"coverage": coverage_from_sums,
                                      "zero_fill": zero_fill_from_sums}


def coverage_mean(deltas_C: PyTree, masks_C: PyTree, weights_C: jax.Array | None = None) -> PyTree:
  """Per-coordinate weighted mean over the clients that keep the coordinate; 0 if none does."""
  w = jnp.ones(jax.tree.leaves(masks_C)[0].shape[:1]) if weights_C is None else weights_C
  num = tree.weighted_sum(tree.mul(masks_C, deltas_C), jnp.asarray(w))
  return coverage_from_sums(num, tree.weighted_sum(masks_C, jnp.asarray(w)), None)


def server_step(params: PyTree, agg_delta: PyTree, cover: PyTree,
                optimizer: optax.GradientTransformation,
                opt_state: optax.OptState) -> tuple[PyTree, optax.OptState]:
  """params + (optimiser update of the pseudo-gradient -agg), zeroed where nothing is covered.

  optax.sgd(s) gives new = old + s * agg (docs/method.md, section 5); any optax optimiser may
  stand in. A stateful optimiser's per-coordinate state (momentum, Adam's mu and nu) keeps its
  old value where nothing is covered: the zero pseudo-gradient there is no observation, and
  decaying the moments of a frozen coordinate would distort its next covered step. State leaves
  that are not shaped like the parameters (step counts) advance as usual.
  """
  pseudo_grad = jax.tree.map(jnp.negative, agg_delta)
  updates, new_state = optimizer.update(pseudo_grad, opt_state, params)
  updates = jax.tree.map(lambda u, c: jnp.where(c > 0, u, 0).astype(u.dtype), updates, cover)
  # The cover, placed at every param-shaped subtree of the state (True elsewhere: keep new).
  select = optax.tree_utils.tree_map_params(
      optimizer, lambda _, c: c > 0, new_state, cover,
      transform_non_params=lambda t: jax.tree.map(lambda _: True, t))
  new_state = jax.tree.map(lambda s, n, o: jnp.where(s, n, o), select, new_state, opt_state)
  return optax.apply_updates(params, updates), new_state


# ------------------------------------------------------------------ the round's server step


class ClientResult(NamedTuple):
  """One client's round, as the server reads it (stacked on a leading [C] axis per group).

  Dense clients return full-size outputs and masks; compact clients return compact ones in
  units-major form (submodel.to_units_major) and the kept unit indices `idx`, and the server
  adds them into full-size sums in the model's layout (`round_sums`).
  """

  out: Any  # client.ClientOutput (masked deltas, hypergradient, losses)
  mask_x: PyTree
  mask_y: PyTree
  weight: jax.Array  # w_i: 0 for an inactive client, else 1 or its example count
  stats: dict[str, jax.Array]  # analytic FLOPs and parameters sent
  idx: dict[str, jax.Array] | None = None  # compact only: group -> kept unit indices


class RoundSums(NamedTuple):
  """A round's client results summed over clients: full-size trees and scalars, nothing [C]."""

  dx: PyTree  # sum_i w_i m_x,i D_x,i
  dy: PyTree
  dv: PyTree
  den_x: PyTree  # sum_i w_i m_x,i
  den_y: PyTree
  count_x: PyTree  # number of clients keeping each coordinate (int32)
  count_y: PyTree
  weight: jax.Array  # sum_i w_i
  inner_loss: jax.Array  # sum_i w_i g_i
  outer_loss: jax.Array
  flops: jax.Array
  params_sent: jax.Array
  active: jax.Array  # clients with w_i > 0


def round_sums(res: ClientResult, layout: UnitLayout | None, state: Any) -> RoundSums:
  """Sum stacked client results over the client axis (scatter-adds for compact results)."""
  w, out = res.weight, res.out
  if res.idx is None:  # dense: full-size stacks; masks may weigh coordinates arbitrarily
    add_x = add_y = units_x = units_y = tree.weighted_sum
    masked = tree.mul
  else:
    # Compact: scatter-adds of units-major outputs (whole rows), moved back to the model's
    # layout once summed. Masks are 0/1 and the outputs already masked (w m D = w D), and
    # masks vary along unit axes only, so their sums are taken per unit and broadcast.
    um = submodel_lib.units_major_layout(layout)

    def summed(add, side):
      axes, um_axes, full = getattr(layout, side), getattr(um, side), getattr(state, side)
      like = submodel_lib.to_units_major(axes, full)
      return lambda t, wt: submodel_lib.from_units_major(axes, add(um_axes, t, res.idx, like, wt))

    add_x, add_y = summed(submodel_lib.scatter_add, "x"), summed(submodel_lib.scatter_add, "y")
    units_x = summed(submodel_lib.scatter_add_units, "x")
    units_y = summed(submodel_lib.scatter_add_units, "y")
    masked = lambda m, d: d
  ones = jnp.ones_like(w)
  nonzero = lambda m: jax.tree.map(lambda a: (a != 0).astype(a.dtype), m)
  as_count = lambda t: jax.tree.map(lambda a: jnp.round(a).astype(jnp.int32), t)
  return RoundSums(
      dx=add_x(masked(res.mask_x, out.delta_x), w), dy=add_y(masked(res.mask_y, out.delta_y), w),
      dv=add_y(masked(res.mask_y, out.delta_v), w),
      den_x=units_x(res.mask_x, w), den_y=units_y(res.mask_y, w),
      count_x=as_count(units_x(nonzero(res.mask_x), ones)),
      count_y=as_count(units_y(nonzero(res.mask_y), ones)),
      weight=jnp.sum(w), inner_loss=jnp.sum(w * out.inner_loss),
      outer_loss=jnp.sum(w * out.outer_loss), flops=jnp.sum(res.stats["flops"]),
      params_sent=jnp.sum(res.stats["params_sent"]),
      # Counted in w's float type, like count_x: sharded over devices, every sum here is then
      # one cross-device all-reduce (an int sum was a second one, which stalled a device's
      # thread while the other ran its clients alone: BENCHMARKS.md, keep ratio).
      active=as_count(jnp.sum((w > 0).astype(w.dtype))))


def server_update(state: Any, results: Sequence[ClientResult], layout: UnitLayout | None, *,
                  aggregate: Aggregator, optimizer: optax.GradientTransformation,
                  outer_lr: jax.Array, local_steps: int
                  ) -> tuple[Any, dict[str, jax.Array], dict[str, PyTree]]:
  """One round's server step from the round's starting state and each client group's stacked
  ClientResults: (next state, metrics, diagnostics). The aggregated deltas move x through the
  optimiser (server_step) and are added to y and v where some client kept the coordinate.
  diagnostics: {"estimate": the coverage mean of the clients' mean hypergradients (like x),
  "count_x" / "count_y": clients per coordinate}.
  """
  sums = [round_sums(res, layout, state) for res in results]
  t = jax.tree.map(lambda *a: sum(a[1:], a[0]), *sums)  # over the client groups
  dx = aggregate(t.dx, t.den_x, t.weight)
  dy = aggregate(t.dy, t.den_y, t.weight)
  dv = aggregate(t.dv, t.den_y, t.weight)
  # The coverage mean of the clients' mean hypergradients: a client moves x by -alpha h_k in
  # each of its K local steps, so its mean h is -D_x / (alpha K) (0/1 masks): no extra sum.
  hyper = tree.scale(-1.0 / (outer_lr * local_steps),
                     coverage_from_sums(t.dx, t.den_x, t.weight))
  cover_x, cover_y = (jax.tree.map(lambda d: (d > 0).astype(d.dtype), den)
                      for den in (t.den_x, t.den_y))
  x, opt_state = server_step(state.x, dx, cover_x, optimizer, state.opt_state)
  y = tree.add(state.y, tree.mul(dy, cover_y))
  v = tree.add(state.v, tree.mul(dv, cover_y))
  cov_x = masks_lib.coverage_stats_from_counts(t.count_x)
  cov_y = masks_lib.coverage_stats_from_counts(t.count_y)
  wsum = jnp.maximum(t.weight, 1e-30)
  itemsize = jax.tree.leaves(state.x)[0].dtype.itemsize  # comm_bytes: x's item size
  metrics = dict(
      inner_loss=t.inner_loss / wsum,
      outer_loss=t.outer_loss / wsum,
      hypergrad_norm=tree.norm(hyper),
      coverage_x_min=cov_x.min, coverage_x_mean=cov_x.mean,
      uncovered_x_share=cov_x.uncovered_share,
      coverage_y_min=cov_y.min, coverage_y_mean=cov_y.mean,
      uncovered_y_share=cov_y.uncovered_share,
      client_flops=t.flops,
      comm_bytes=2.0 * itemsize * t.params_sent,  # down + up
      active_clients=t.active)
  diagnostics = dict(estimate=hyper, count_x=t.count_x, count_y=t.count_y)
  new = state._replace(x=x, y=y, v=v, opt_state=opt_state, round=state.round + 1)
  return new, metrics, diagnostics
