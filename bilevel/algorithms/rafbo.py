"""RAFBO and RABO (docs/method.md, section 6): the local round, top to bottom.

One round q is one jitted call of step(args, state, data) (args: federated.RoundArgs, the
per-run values: the seed's keys, the level assignment and the step sizes):
  1. sample the round's clients from the population: uniformly without replacement, or a fixed
     count per resource level (stratified; bilevel/sampling.py);
  2. per client, vmapped (and optionally sharded over devices): its keep ratios and keys
     (sampling.make_context_fn), its masks (masks.make_masks, or a mask_fn) and
     client.client_update at the pruned point: K local steps of y, v and x, deltas masked;
  3. the server step (server.server_update): the clients' weighted masked deltas summed,
     divided by the coverage (server.AGGREGATORS), x stepped by the optax server optimiser,
     y and v moved where some client kept the coordinate; the round's metrics.
RABO = one local step with every client; RAFBO = K local steps with partial participation.
The dense client (masked full-size arrays) is the reference; the compact client
(bilevel/compact.py) computes the same update on extracted submodels (tests/compact_test.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import compact, costs
from bilevel import masks as masks_lib
from bilevel import sampling as sampling_lib
from bilevel import server, tree
from bilevel.algorithms.base import SHARED, Algorithm, Spec, build
from bilevel.client import Sampler, client_update, population_sampler
from bilevel.errors import ConfigError, check_choice
from bilevel.federated import DIAGNOSTICS, SAMPLINGS, SUBMODELS, FederatedData
from bilevel.federated import MaskFn, Round, RoundArgs, ServerState
from bilevel.hypergrad import Estimator
from bilevel.masks import Level, UnitLayout
from bilevel.problems import BilevelProblem
from bilevel.sharding import client_sharding

PyTree = Any


def make_round(problem: BilevelProblem, x_like: PyTree, *, num_clients: int,
               clients_per_round: int, levels: tuple[Level, ...], redraw_levels: bool,
               only_full: bool, layout: UnitLayout | None, granularity: str,
               mask_policy: str | masks_lib.Policy, allow_uncovered: bool, local_steps: int,
               inner_steps: int, inner_lr: float, inner_step: str, outer_lr: float,
               x_trust: float, x_trust_scope: str, x_trust_on: str, estimator: Estimator,
               optimizer: optax.GradientTransformation, aggregation: str | server.Aggregator,
               weighting: str, seed: int, sample: Sampler,
               cost: costs.CostModel | costs.PerGradient | None,
               available: Mapping[str, np.ndarray] | None, mask_fn: MaskFn | None,
               submodel: str, sampling: str | None, mesh: jax.sharding.Mesh | None,
               diagnostics: bool, jit: bool = True, mesh_axis: str = "clients") -> Round:
  """The local round `step(state, data) -> (state, metrics)` of resolved options (base.Options
  documents each; Algorithm.make_round passes them); checks its own combinations (check_round).

  diagnostics: metrics[DIAGNOSTICS] = {"estimate": the aggregated hypergradient estimate at the
  round's starting state, "count_x" / "count_y": clients keeping each coordinate}.
  submodel "compact" needs unit masks, fixed levels, stratified sampling, no `available`, no
  mask_fn and losses that accept compact arrays; it equals "dense" in float64 to 1e-12
  (tests/compact_test.py). mesh: the sampled ids and every client output are sharded over
  `mesh_axis`; place data and state with `sharding.replicate(tree, mesh)` first, or every call
  copies them. jit: False returns the traced-per-call step (for callers that jit a larger
  program).
  """
  sampling = check_round(redraw_levels=redraw_levels, granularity=granularity,
                         submodel=submodel, sampling=sampling, mask_fn=mask_fn,
                         available=available)
  ratios, population = sampling_lib.client_levels(levels, num_clients, seed, only_full=only_full,
                                                  redraw_levels=redraw_levels)
  coverable = ratios[population] if not redraw_levels else np.array(
      [[lv.rx, lv.ry] for lv in levels])  # redrawn: the levels the population can hold
  owned = None if available is None or redraw_levels else {
      g: np.asarray(a)[population] for g, a in available.items()}
  masks_lib.check_coverable(layout, x_like, coverable, owned, policy=mask_policy,
                            granularity=granularity, allow_uncovered=allow_uncovered)
  num_sampled = min(clients_per_round, len(population))
  strata = () if sampling == "uniform" else sampling_lib.make_strata(
      ratios, population, num_sampled, layout if granularity == "unit" else None)
  per_run_v = hasattr(estimator, "step_size")  # a per-run value (RoundArgs), as the other steps
  steps = dict(outer_lr=outer_lr, inner_lr=inner_lr, v_lr=getattr(estimator, "step_size", 0.0))
  args = sampling_lib.round_args(seed, steps, ratios, population, strata,
                                 jax.tree.leaves(x_like)[0].dtype)
  sample_fn = sampling_lib.make_sample_fn(sampling, num_sampled, strata)
  context = sampling_lib.make_context_fn(levels, redraw_levels, only_full)
  work = dict(local_steps=local_steps, inner_steps=inner_steps, inner_step=inner_step)
  finish = costs.result_fn(weighting=weighting, cost=cost or costs.PerGradient(),
                           first_step_apart=submodel == "dense", estimator=estimator, **work)
  aggregate = server.AGGREGATORS[aggregation] if isinstance(aggregation, str) else aggregation
  shard = client_sharding(mesh, mesh_axis)

  def update(a: RoundArgs, problem: BilevelProblem, *arrays: Any, **kw: Any):
    """client_update with this round's options and the step sizes of `a` (traced)."""
    steps = a.steps
    est = dataclasses.replace(estimator, step_size=steps["v_lr"]) if per_run_v else estimator
    return client_update(problem, *arrays, **work, inner_lr=steps["inner_lr"],
                         outer_lr=steps["outer_lr"], x_trust=x_trust, x_trust_scope=x_trust_scope,
                         x_trust_on=x_trust_on,
                         estimator=est, **kw)

  def dense_client(a: RoundArgs, state: ServerState, data: FederatedData, cid: jax.Array,
                   slot: jax.Array, q: jax.Array) -> server.ClientResult:
    """One client on masked full-size arrays (slot: its position 0..C-1 in the round)."""
    c = context(a, data, cid, q)
    if mask_fn is None:
      mask_x, mask_y = masks_lib.make_masks(layout, state.x, state.y, c.rx, c.ry, c.mask_key, q,
                                            c.available, policy=mask_policy,
                                            granularity=granularity)
    else:
      mask_x, mask_y = mask_fn(state, cid, slot, q, c.rx, c.ry, c.mask_key)
    mask_x, mask_y = tree.scale(c.active, mask_x), tree.scale(c.active, mask_y)
    out = update(a, problem, state.x, state.y, state.v, data.inner, data.outer, mask_x, mask_y,
                 c.batch_key, sample=population_sampler(sample, cid))
    return finish(data, cid, out, mask_x, mask_y, c.active)

  client_fns = ((dense_client,) if submodel == "dense" else
                compact.compact_client_fns(problem, mask_policy, layout, strata, context, finish,
                                           sample, update))

  def server_fn(a: RoundArgs, state: ServerState, results):
    state, metrics, diag = server.server_update(
        state, results, layout, aggregate=aggregate, optimizer=optimizer,
        outer_lr=a.steps["outer_lr"], local_steps=local_steps)
    if diagnostics:
      metrics[DIAGNOSTICS] = diag
    return state, metrics

  def step(a: RoundArgs, state: ServerState, data: FederatedData):
    q = state.round
    id_groups = sample_fn(a, q)  # 1. the round's clients (one group per stratum)
    if len(client_fns) == 1 and len(id_groups) > 1:  # dense, stratified: one vmap (full size)
      id_groups = [jnp.concatenate(id_groups)]
    outs, offset = [], 0
    for fn, ids in zip(client_fns, id_groups):  # 2. masks and local update, vmapped
      ids = shard(ids)
      slots = jnp.arange(offset, offset + ids.shape[0])
      offset += ids.shape[0]
      outs.append(shard(jax.vmap(fn, (None, None, None, 0, 0, None))(a, state, data, ids,
                                                                    slots, q)))
    return server_fn(a, state, outs)  # 3. coverage mean and server step

  apply = jax.jit(step) if jit else step
  bind = lambda fn: functools.partial(fn, args)
  return Round(bind(apply), population, ratios, num_sampled, strata, bind(sample_fn),
               tuple(map(bind, client_fns)), bind(server_fn),
               seed_constants=mask_fn is not None, hyper=args, apply=apply)


# ------------------------------------------------------------------ the algorithms


RAFBO = Spec(SHARED, make_round)
RABO = Spec(SHARED._replace(local_steps=1), make_round, full_participation=True)


def rabo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """RABO: one local step (K = 1) per round, every client in every round, pruned submodels
  (give `levels` to prune; keywords: base.Options, defaults: bilevel.algorithms)."""
  return build("rabo", RABO, problem, num_clients, options)


def rafbo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """RAFBO: K = 5 local steps per round, partial participation, pruned submodels (give
  `levels` to prune; keywords: base.Options, defaults: bilevel.algorithms)."""
  return build("rafbo", RAFBO, problem, num_clients, options)


# ------------------------------------------------------------------ validation


def check_round(*, redraw_levels: bool, granularity: str, submodel: str, sampling: str | None,
                mask_fn: MaskFn | None, available: Mapping[str, np.ndarray] | None) -> str:
  """make_round's checks of its option combinations (ConfigError); returns the resolved
  sampling."""
  check_choice("submodel", submodel, SUBMODELS)
  sampling = sampling or ("stratified" if submodel == "compact" else "uniform")
  check_choice("sampling", sampling, SAMPLINGS)
  if sampling == "stratified" and redraw_levels:
    raise ConfigError("sampling='stratified' (and submodel='compact') needs fixed client levels; "
                      "redraw_levels=True draws a level per round: use submodel='dense' with "
                      "sampling='uniform'.")
  if submodel == "compact":
    problems = []
    if granularity != "unit":
      problems.append(f"mask_granularity={granularity!r} (needs 'unit')")
    if sampling != "stratified":
      problems.append(f"sampling={sampling!r} (needs 'stratified': static group sizes)")
    if mask_fn is not None:
      problems.append("a mask_fn (masks must come from the unit policies)")
    if available is not None:
      problems.append("client-owned units `available` (they index the client's data)")
    if problems:
      raise ConfigError("submodel='compact' cannot run with " + "; ".join(problems) +
                        "; use submodel='dense'.")
  return sampling
