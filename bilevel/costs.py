"""Per-operation FLOP model of one client's round (docs/method.md, section 3, "FLOP model per
operation": what each op is, the prices, the check against XLA and what is not modelled).

    client FLOPs = sum over (op, batch) of  count(op) * price(op, kept counts) * rows(batch)

`round_ops` counts a round's ops (client.client_update: K local steps of T inner steps and one
hypergradient estimate); `op_prices` prices each kind per example from a `ModelCosts` (the
tasks': bilevel/tasks/hyper_representation.py, hyper_cleaning.py) and the client's kept
entries (matmul / convolution FLOPs only). Counts per round (N = num_steps; the estimator's
`products()` gives its H v count):

    op         batch   count
    forward_x  inner   K          (x's own layers; every op on that batch reuses it)
    forward_x  outer   K
    grad_y     inner   K T
    forward_y  inner   K with exact products or all steps in one scan, else 1
    hv         inner   K x (fd / exact: N with v_step="fixed", N + 1 with "cauchy" (+ N with
                            a radius); neumann: N - 1; cg: N + 1), + K T with the Cauchy
                            inner step (H g per inner step)
    jv         inner   K
    grad_xy    outer   K
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from bilevel import masks as masks_lib
from bilevel import server
from bilevel.hypergrad import PRODUCT_GRAD_EVALS, Estimator

PyTree = Any
Number = Any  # a float or a traced scalar (kept counts are traced in a round)

OPS = ("forward_x", "forward_y", "grad_y", "grad_xy", "hv", "jv")
INNER, OUTER = "inner", "outer"


def round_ops(*, local_steps: int, inner_steps: int, inner_step: str, estimator: Estimator,
              first_step_apart: bool = True) -> tuple[tuple[str, str, int], ...]:
  """(op, batch, count) of one client's round (K local steps): the table of the module
  docstring (first_step_apart: as client.client_update ran)."""
  k, t = int(local_steps), int(inner_steps)
  hv, jv = estimator.products()
  exact = estimator.product == "exact"
  cauchy_inner = k * t if inner_step == "cauchy" else 0  # H g per inner step
  return (("forward_x", INNER, k), ("forward_x", OUTER, k),
          ("grad_y", INNER, k * t),
          ("forward_y", INNER, k if exact or not first_step_apart else 1),
          ("hv", INNER, k * hv + cauchy_inner),
          ("jv", INNER, k * jv),
          ("grad_xy", OUTER, k))


def grad_evals_per_round(**work: Any) -> float:
  """round_ops (work: its keywords) in gradient evaluations: a gradient (grad_y, grad_xy) one,
  a product (hv, jv) PRODUCT_GRAD_EVALS, a forward none. What PerGradient prices; with
  local_steps=1, inner_steps=0 the cost of one estimate."""
  product = PRODUCT_GRAD_EVALS[work["estimator"].product]
  per = dict(grad_y=1.0, grad_xy=1.0, hv=product, jv=product)
  return sum(count * per.get(op, 0.0) for op, _, count in round_ops(**work))


class ModelCosts(NamedTuple):
  """Per-example matmul FLOPs of a model: x's part, then y's dense layers on its features.

  x_forward(kept_x), x_backward(kept_x): forward of x's part, and its backward from the
    features' cotangent to x's weights (0 when x is no layer).
  y_layers(kept_y): kept kernel entries of y's dense layers, input side first.
  x_in_features: True when y's input features depend on x (a representation: gradients and
    J v pass back into x's layers); False when x enters the loss elementwise only (sample
    weights: the x side of every gradient is elementwise).
  """

  x_forward: Callable[[PyTree], Number]
  x_backward: Callable[[PyTree], Number]
  y_layers: Callable[[PyTree], Sequence[Number]]
  x_in_features: bool


def op_prices(model: ModelCosts, product: str, kept_x: PyTree, kept_y: PyTree
              ) -> dict[str, Number]:
  """Per-example FLOPs of each op kind (OPS) with "fd" or "exact" products.

  y's layers hold P_1 (on the features), P_2, ... kept kernel entries; a pass over a layer
  (forward, weight gradient, input gradient) costs 2 P_i. Forward-over-reverse doubles the
  passes of the layers whose input has a tangent (all but the first).
  """
  layers = list(model.y_layers(kept_y))
  first, rest = layers[0], sum(layers[1:])
  dep = model.x_in_features
  fwd = 2 * first + 2 * rest
  back_y = 2 * rest  # input gradients between y's layers
  into_x = (2 * first + model.x_backward(kept_x)) if dep else 0  # y's input grad, x's weights
  grad_y = 2 * fwd + back_y  # forward, weight gradients, inner input gradients
  tangent_fwd = 2 * first + 4 * rest
  if product == "fd":
    hv = 2 * grad_y
    jv = 2 * fwd + ((2 * back_y + 2 * 2 * first + model.x_backward(kept_x)) if dep else 0)
  else:  # exact: jvp of the gradient, primal forward shared with forward_y
    hv = 4 * first + 12 * rest
    jv = tangent_fwd + ((4 * rest + 4 * first + model.x_backward(kept_x)) if dep else 0)
  return dict(forward_x=model.x_forward(kept_x), forward_y=fwd, grad_y=grad_y,
              grad_xy=grad_y + into_x, hv=hv, jv=jv)


def client_flops(kept_x: PyTree, kept_y: PyTree, batch_sizes: tuple[Number, Number],
                 model: ModelCosts, **work: Any) -> Number:
  """Modelled FLOPs of one client's round; work: round_ops's keywords (local_steps,
  inner_steps, inner_step, estimator, first_step_apart).

  kept_x, kept_y: trees like x and y holding each leaf's kept-entry count (masks.kept_counts;
    the full sizes for an unpruned client). batch_sizes: (rows of an inner batch, rows of an
    outer batch) the client computes on (a minibatch size, or its kept training / validation
    rows with full batches). Works on traced counts (inside the round).
  """
  prices = op_prices(model, work["estimator"].product, kept_x, kept_y)
  rows = {INNER: batch_sizes[0], OUTER: batch_sizes[1]}
  return sum(count * prices[op] * rows[batch]
             for op, batch, count in round_ops(**work) if count)


def default_flops_per_grad(kept_x: PyTree, kept_y: PyTree) -> jax.Array:
  """6 FLOPs per kept parameter (forward + backward of a dense layer, per example)."""
  return 6.0 * sum(jax.tree.leaves(kept_x) + jax.tree.leaves(kept_y))


class PerGradient(NamedTuple):
  """The FLOP model without op prices (a user's own problem; the algorithms' default `cost`):
  grad_evals_per_round gradients at price(kept_x, kept_y) each (kept counts as client_flops')."""

  price: Callable[[PyTree, PyTree], Number] = default_flops_per_grad

  def client_flops(self, kept_x: PyTree, kept_y: PyTree, **work: Any) -> Number:
    return grad_evals_per_round(**work) * self.price(kept_x, kept_y)


class CostModel(NamedTuple):
  """What a round needs to price its clients' work: the model's op prices and the batch rows.

  rows(kept_x) -> (rows of an inner batch, rows of an outer batch) a client computes on: a
  minibatch size, or its training / validation rows with full batches (hyper-cleaning: the
  rows whose weights the client keeps, kept_x["gate"]).
  """

  model: ModelCosts
  rows: Callable[[PyTree], tuple[Number, Number]]

  def client_flops(self, kept_x: PyTree, kept_y: PyTree, **work: Any) -> Number:
    """client_flops of one client's round on its kept entries (work: round_ops's keywords)."""
    return client_flops(kept_x, kept_y, self.rows(kept_x), self.model, **work)


def result_fn(*, weighting: str, cost: CostModel | PerGradient,
              **work: Any) -> Callable[..., server.ClientResult]:
  """`finish(data, cid, out, mask_x, mask_y, active, idx=None, kept=None) -> ClientResult`
  for a client of the local round (bilevel/algorithms/rafbo.py) running the local update
  `work` (round_ops's keywords): its weight (1, or its example count with weighting
  "examples") and analytic costs (`cost`'s client_flops, parameters sent)."""
  # Parameters a client receives and returns: x and y, and v if the estimator reads it.
  y_copies = 2 if work["estimator"].warm_start else 1

  def finish(data, cid, out, mask_x, mask_y, active, idx=None, kept=None) -> server.ClientResult:
    """kept = per-leaf kept counts (computed from the masks if None; compact clients count
    from unit masks rather than reduce full-size broadcast masks)."""
    weight = active * (data.num_examples[cid].astype(jnp.float32)
                       if weighting == "examples" else 1.0)
    kept_x, kept_y = kept or (masks_lib.kept_counts(mask_x), masks_lib.kept_counts(mask_y))
    sent = sum(jax.tree.leaves(kept_x)) + y_copies * sum(jax.tree.leaves(kept_y))
    stats = dict(flops=cost.client_flops(kept_x, kept_y, **work), params_sent=sent)
    return server.ClientResult(out, mask_x, mask_y, weight, stats, idx)

  return finish
