"""One client's pure update on its submodel: K local steps of (y, v, x) (RABO: K = 1).

Local step k, everything at the pruned point (docs/method.md, sections 3-4):
    y <- T masked inner steps from y                         (inner.inner_solve)
    (h, v) <- estimator(x, y, v; m_x, m_y)                   (a hypergrad.Estimator)
    x <- x - alpha * h                                       (h is zero outside m_x)
The client returns masked deltas D = (x_K - x_0, y_K - y_0, v_K - v_0) * mask; the server adds
their coverage mean (server.py).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bilevel import tree
from bilevel.hypergrad import Estimator
from bilevel.inner import inner_solve
from bilevel.problems import BilevelProblem

PyTree = Any
# (client data, key) -> batch; the identity (full batch) by default. A sampler may also define
# `from_population(data, client_id, key)`, the same batch drawn straight from the stacked
# population data [M, ...] (see `population_sampler`).
Sampler = Callable[[Any, jax.Array], Any]


def full_batch(data: Any, key: jax.Array) -> Any:
  del key
  return data


class MinibatchSampler(NamedTuple):
  """Sample batch_size rows uniformly (with replacement) from the valid rows of a client.

  Client data is a dict of arrays [N, ...] whose "weight" entry is 1 for valid rows (which come
  first) and 0 for padding; the sampled batch has the same keys and all weights 1.
  """

  batch_size: int

  def __call__(self, data: Any, key: jax.Array) -> Any:
    return self.from_population(jax.tree.map(lambda t: t[None], data), 0, key)

  def from_population(self, data: Any, client_id: jax.Array, key: jax.Array) -> Any:
    """The same batch from population data [M, N, ...]: one gather of the batch rows (no copy
    of the client's N rows; vmapped over clients, one gather for the whole round)."""
    n = jnp.maximum(jnp.sum(data["weight"][client_id] > 0), 1)
    rows = client_id * data["weight"].shape[1] + jax.random.randint(key, (self.batch_size,), 0, n)
    # A gather of whole rows from [M * N, ...] (XLA:CPU copies rows; indexing [M, N, ...] with
    # (client, row) pairs ran 3-4x slower).
    return jax.tree.map(lambda t: t.reshape(-1, *t.shape[2:]).at[rows].get(
        mode="promise_in_bounds"), data)


minibatch_sampler = MinibatchSampler  # minibatch_sampler(batch_size)


def population_sampler(sample: Sampler, client_id: jax.Array) -> Sampler:
  """A sampler over the stacked population data [M, ...] that draws client_id's batch.

  Uses sample.from_population where the sampler has it, else indexes the client's data first.
  """
  if hasattr(sample, "from_population"):
    return lambda data, key: sample.from_population(data, client_id, key)
  return lambda data, key: sample(tree.index(data, client_id), key)


TRUST_SCOPES = ("layer", "model")
# Where the trust region acts: on the x delta a client returns ("delta"), or on each of its local
# x steps ("step"), relative to that step's local iterate, so the local iterates stay bounded.
TRUST_ON = ("delta", "step")


def trust_region(delta: PyTree, x0: PyTree, radius: float, scope: str = "layer") -> PyTree:
  """delta scaled by min(1, radius ||x0|| / ||delta||): over all of x (scope "model") or per
  top-level entry of x (scope "layer": each layer's kernel and bias together). x0 and delta are
  the client's masked (or compact) trees, so the radius is relative to its submodel's norm."""
  def clip(d, x):
    scale = jnp.minimum(1.0, radius * tree.norm(x) / jnp.maximum(tree.norm(d), 1e-30))
    return tree.scale(scale.astype(jax.tree.leaves(d)[0].dtype), d)

  if scope == "model" or not isinstance(delta, dict):
    return clip(delta, x0)
  return {k: clip(delta[k], x0[k]) for k in delta}


class ClientOutput(NamedTuple):
  delta_x: PyTree
  delta_y: PyTree
  delta_v: PyTree
  hypergrad: PyTree  # mean over local steps of the masked hypergradient estimates
  inner_loss: jax.Array  # g and f at the pruned point after the first inner solve
  outer_loss: jax.Array


def client_update(problem: BilevelProblem, x: PyTree, y: PyTree, v: PyTree,
                  inner_data: Any, outer_data: Any, mask_x: PyTree | None, mask_y: PyTree | None,
                  key: jax.Array, *, local_steps: int, inner_steps: int, inner_lr: Any,
                  outer_lr: Any, estimator: Estimator, inner_step: str, x_trust: float,
                  x_trust_scope: str, x_trust_on: str = "delta", sample: Sampler = full_batch,
                  first_step_apart: bool = True) -> ClientOutput:
  """K = local_steps local steps on the submodel given by (mask_x, mask_y); see the module
  docstring. T = inner_steps inner steps of inner_lr (inner_step: inner.STEP_RULES; the Cauchy
  step uses the estimator's products), the estimator, x steps of outer_lr, then the trust
  region x_trust (0 = off) over x_trust_scope (trust_region), on the returned x delta or on each
  local x step (x_trust_on, TRUST_ON). Step sizes may be traced.

  A mask of None keeps every coordinate (compact clients pass None for x). Batches are
  sample(inner_data, key) and sample(outer_data, key): the client's own data, or the
  population's with a `population_sampler` (only the batch rows are gathered). With
  first_step_apart the first step runs outside the scan (see below); without it all K steps are
  one scan, which compiles in about two thirds of the time: the compact round's choice, whose
  clients' x are their own extracted arrays, so keeping the first step apart shares nothing.
  """
  def local_step(carry, k):
    xk, yk, vk = carry
    step_key = jax.random.fold_in(key, k)
    inner_batch = sample(inner_data, jax.random.fold_in(step_key, 0))
    outer_batch = sample(outer_data, jax.random.fold_in(step_key, 1))
    yk = inner_solve(problem.inner_loss, xk, yk, inner_batch, num_steps=inner_steps,
                     step_size=inner_lr, mask_x=mask_x, mask_y=mask_y,
                     step_rule=inner_step, product=estimator.product, delta=estimator.delta)
    res = estimator(problem, xk, yk, inner_batch, outer_batch, vk, mask_x, mask_y)
    xm, ym = tree.masked(xk, mask_x), tree.masked(yk, mask_y)
    losses = (problem.inner_loss(xm, ym, inner_batch), problem.outer_loss(xm, ym, outer_batch))
    if x_trust and x_trust_on == "step":
      step = trust_region(tree.scale(-outer_lr, res.hypergrad), tree.masked(xk, mask_x),
                          x_trust, x_trust_scope)
      xk = tree.add(xk, step)
    else:
      xk = tree.axpy(-outer_lr, res.hypergrad, xk)
    return (xk, yk, res.v), (res.hypergrad, losses)

  # The first step runs outside the scan: x is still the server's (shared by the clients of a
  # vmapped round, so their first forward passes are one large matmul, not per-client ones).
  if first_step_apart:
    carry, first = local_step((x, y, v), 0)
    steps = jax.tree.map(lambda t: t[None], first)
    if local_steps > 1:
      carry, rest = jax.lax.scan(local_step, carry, jnp.arange(1, local_steps))
      steps = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), steps, rest)
  else:
    carry, steps = jax.lax.scan(local_step, (x, y, v), jnp.arange(local_steps))
  (xK, yK, vK), (grads, (g_loss, f_loss)) = carry, steps
  delta_x = tree.masked(tree.sub(xK, x), mask_x)
  if x_trust and x_trust_on == "delta":  # a Python float: 0 (off) traces nothing
    delta_x = trust_region(delta_x, tree.masked(x, mask_x), x_trust, x_trust_scope)
  return ClientOutput(
      delta_x=delta_x,
      delta_y=tree.masked(tree.sub(yK, y), mask_y),
      delta_v=tree.masked(tree.sub(vK, v), mask_y),
      hypergrad=jax.tree.map(lambda t: jnp.mean(t, axis=0), grads),
      inner_loss=g_loss[0], outer_loss=f_loss[0])
