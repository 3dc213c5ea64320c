"""The local round (docs/method.md, section 6): the dense and the compact client step, and
`make_round`, which validates a configuration and assembles the round.

One round is one jitted function of (federated.RoundArgs, state, data) made of
  - sampling (bilevel/sampling.py): which clients take part, and each one's keep ratios, keys
    and owned units this round;
  - the client step, dense or compact (below), vmapped over each group of sampled clients and
    optionally sharded over a device mesh (bilevel/sharding.py);
  - the server step (server.server_update): sums, aggregation, optimiser, metrics.
FedNest's communicating round (round_kind "fednest") is fednest.make_fednest_round;
bilevel.algorithms builds whichever round an algorithm runs.

Client steps (each returns a server.ClientResult):
  dense    masks of the policy (masks.make_masks, or a mask_fn) on full-size arrays, and
           client.client_update at the pruned point;
  compact  unit masks only: the kept units are extracted units-major
           (submodel.to_units_major: a kept unit is a contiguous row) into arrays of the
           level's static width ceil(r K), client.client_update runs on them, and the server
           scatter-adds the rows into full-size sums (server.round_sums).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs
from bilevel import masks as masks_lib
from bilevel import sampling as sampling_lib
from bilevel import server, tree
from bilevel import submodel as submodel_lib
from bilevel.client import Sampler, client_update, full_batch, grad_evals_per_round
from bilevel.client import population_sampler
from bilevel.errors import ConfigError, check_choice
from bilevel.federated import DIAGNOSTICS, SAMPLINGS, SUBMODELS, FederatedConfig, FederatedData
from bilevel.federated import MaskFn, Round, RoundArgs, ServerState, default_flops_per_grad
from bilevel.federated import validate_config, with_steps
from bilevel.masks import UnitLayout
from bilevel.problems import BilevelProblem
from bilevel.sampling import ContextFn, Stratum
from bilevel.sharding import client_sharding

PyTree = Any
# (args, state, data, client_id, slot, round) -> server.ClientResult; slot = the client's
# position 0..C-1 in this round.
ClientFn = Callable[..., server.ClientResult]
FinishFn = Callable[..., server.ClientResult]


# ------------------------------------------------------------------ validation


def check_round(cfg: FederatedConfig, layout: UnitLayout | None, *, submodel: str,
                sampling: str | None, mask_fn: MaskFn | None,
                available: Mapping[str, np.ndarray] | None) -> str:
  """make_round's configuration checks (ConfigError); returns the resolved sampling."""
  validate_config(cfg, layout)
  if cfg.round_kind != "local":
    raise ConfigError(f"round_kind={cfg.round_kind!r} is not the local round: FedNest's "
                      "communicating round is built by fednest.make_fednest_round "
                      "(bilevel.algorithms.get('fednest', ...) does so).")
  check_choice("submodel", submodel, SUBMODELS)
  sampling = sampling or ("stratified" if submodel == "compact" else "uniform")
  check_choice("sampling", sampling, SAMPLINGS)
  if sampling == "stratified" and cfg.redraw_levels:
    raise ConfigError("sampling='stratified' (and submodel='compact') needs fixed client levels; "
                      "redraw_levels=True draws a level per round: use submodel='dense' with "
                      "sampling='uniform'.")
  if submodel == "compact":
    problems = []
    if cfg.mask.granularity != "unit":
      problems.append(f"mask_granularity={cfg.mask.granularity!r} (needs 'unit')")
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


def check_coverable(cfg: FederatedConfig, layout: UnitLayout | None, x_like: PyTree,
                    ratios: np.ndarray, population: np.ndarray,
                    available: Mapping[str, np.ndarray] | None) -> None:
  """masks.check_coverable for the levels the population can hold (the profile when redrawn)."""
  if cfg.redraw_levels:
    profile_ratios = np.array([[lv.rx, lv.ry] for lv in cfg.levels])
    masks_lib.check_coverable(cfg.mask, layout, x_like, profile_ratios, None,
                              allow_uncovered=cfg.allow_uncovered)
  else:
    masks_lib.check_coverable(
        cfg.mask, layout, x_like, ratios[population],
        None if available is None else {g: np.asarray(a)[population] for g, a in available.items()},
        allow_uncovered=cfg.allow_uncovered)


# ------------------------------------------------------------------ client steps


def result_fn(cfg: FederatedConfig, flops_per_grad: Callable[[PyTree, PyTree], jax.Array],
              cost: costs.CostModel | None = None, first_step_apart: bool = True) -> FinishFn:
  """`finish(data, cid, out, mask_x, mask_y, active, idx=None, kept=None) -> ClientResult`:
  the client's weight and analytic costs (FLOPs, parameters sent). FLOPs: the per-operation
  model `cost` if given (first_step_apart: how the client step runs, client.client_update),
  else grad_evals_per_round gradients at flops_per_grad each."""
  evals = grad_evals_per_round(cfg.client)
  if cost is None:
    flops_of = lambda kx, ky: evals * flops_per_grad(kx, ky)
  else:
    flops_of = lambda kx, ky: cost.client_flops(cfg.client, kx, ky, first_step_apart)
  # Parameters a client receives and returns: x and y, plus v for estimators that read the warm
  # start (neumann starts its series from grad_y f: v never travels).
  y_copies = 1 if cfg.client.estimator == "neumann" else 2

  def finish(data, cid, out, mask_x, mask_y, active, idx=None, kept=None) -> server.ClientResult:
    """kept = per-leaf kept counts (computed from the masks if None; compact clients count
    from unit masks rather than reduce full-size broadcast masks)."""
    weight = active * (data.num_examples[cid].astype(jnp.float32)
                       if cfg.weighting == "examples" else 1.0)
    kept_x, kept_y = kept or (masks_lib.kept_counts(mask_x), masks_lib.kept_counts(mask_y))
    sent = sum(jax.tree.leaves(kept_x)) + y_copies * sum(jax.tree.leaves(kept_y))
    stats = dict(flops=flops_of(kept_x, kept_y), params_sent=sent)
    return server.ClientResult(out, mask_x, mask_y, weight, stats, idx)

  return finish


def dense_client_fn(problem: BilevelProblem, cfg: FederatedConfig, layout: UnitLayout | None,
                    context: ContextFn, finish: FinishFn, sample: Sampler,
                    mask_fn: MaskFn | None) -> ClientFn:
  """The dense client step: masked full-size arrays (mask_fn, if given, replaces the policy)."""

  def dense_client(a: RoundArgs, state: ServerState, data: FederatedData, cid: jax.Array,
                   slot: jax.Array, q: jax.Array) -> server.ClientResult:
    c = context(a, data, cid, q)
    if mask_fn is None:
      mask_x, mask_y = masks_lib.make_masks(cfg.mask, layout, state.x, state.y, c.rx, c.ry,
                                            c.mask_key, q, c.available)
    else:
      mask_x, mask_y = mask_fn(state, cid, slot, q, c.rx, c.ry, c.mask_key)
    mask_x, mask_y = tree.scale(c.active, mask_x), tree.scale(c.active, mask_y)
    out = client_update(problem, with_steps(cfg.client, a.steps), state.x, state.y, state.v,
                        data.inner, data.outer, mask_x, mask_y, c.batch_key,
                        population_sampler(sample, cid))
    return finish(data, cid, out, mask_x, mask_y, c.active)

  return dense_client


def compact_client_fns(problem: BilevelProblem, cfg: FederatedConfig, layout: UnitLayout,
                       strata: Sequence[Stratum], context: ContextFn, finish: FinishFn,
                       sample: Sampler) -> tuple[ClientFn, ...]:
  """One compact client step per stratum (its static widths `counts`), on the units-major
  model (submodel.units_major_layout / units_major_problem)."""
  um_layout = submodel_lib.units_major_layout(layout)
  um_problem = submodel_lib.units_major_problem(problem, layout)

  def compact_client(counts: dict[str, int]) -> ClientFn:
    def client(a: RoundArgs, state: ServerState, data: FederatedData, cid: jax.Array,
               slot: jax.Array, q: jax.Array) -> server.ClientResult:
      del slot
      c = context(a, data, cid, q)
      umx, umy = masks_lib.unit_masks(layout, cfg.mask.policy, c.rx, c.ry, c.mask_key, q,
                                      state.x, state.y)
      idx = submodel_lib.compact_indices(layout, umx, umy, counts)
      # Units-major (submodel.to_units_major): the kept units are whole rows, gathered here
      # and scatter-added as rows by the server; the losses see the model's layout.
      take = lambda side, t: submodel_lib.extract(
          getattr(um_layout, side), submodel_lib.to_units_major(getattr(layout, side), t), idx)
      x_c, y_c, v_c = take("x", state.x), take("y", state.y), take("y", state.v)
      cux, cuy = submodel_lib.compact_unit_masks(umx, umy, idx)
      cux, cuy = tree.scale(c.active, cux), tree.scale(c.active, cuy)
      cmx, cmy = masks_lib.expand_unit_masks(um_layout, cux, cuy, x_c, y_c)
      kept = (masks_lib.unit_kept_counts(cux, um_layout.x, x_c),
              masks_lib.unit_kept_counts(cuy, um_layout.y, y_c))
      # x's compact mask is all ones: the client computes on exactly its kept x units (active
      # is 1 for every client a compact round samples: only_full restricts the population).
      out = client_update(um_problem, with_steps(cfg.client, a.steps), x_c, y_c, v_c,
                          data.inner, data.outer, None, cmy, c.batch_key,
                          population_sampler(sample, cid), first_step_apart=False)
      return finish(data, cid, out, cmx, cmy, c.active, idx, kept)  # the server scatter-adds

    return client

  return tuple(compact_client(st.counts) for st in strata)


# ------------------------------------------------------------------ assembly


def _server_fn(cfg: FederatedConfig, layout: UnitLayout | None,
               optimizer: optax.GradientTransformation, diagnostics: bool) -> Callable[..., Any]:
  """`server_fn(args, state, results) -> (state, metrics)` (server.server_update)."""
  aggregate = server.AGGREGATORS[cfg.aggregation]

  def server_fn(a: RoundArgs, state: ServerState, results: Sequence[server.ClientResult]):
    state, metrics, diag = server.server_update(
        state, results, layout, aggregate=aggregate, optimizer=optimizer,
        outer_lr=a.steps["outer_lr"], local_steps=cfg.client.local_steps)
    if diagnostics:
      metrics[DIAGNOSTICS] = diag
    return state, metrics

  return server_fn


def _step_fn(sample_fn: sampling_lib.SampleFn, client_fns: Sequence[ClientFn],
             server_fn: Callable[..., Any], shard: Callable[[PyTree], PyTree]
             ) -> Callable[..., tuple[ServerState, dict[str, jax.Array]]]:
  """`step(args, state, data)`: sample, run each client group vmapped (and sharded), serve."""

  def step(a: RoundArgs, state: ServerState, data: FederatedData):
    q = state.round
    id_groups = sample_fn(a, q)
    if len(client_fns) == 1 and len(id_groups) > 1:  # dense, stratified: one vmap (full size)
      id_groups = [jnp.concatenate(id_groups)]
    outs, offset = [], 0
    for fn, ids in zip(client_fns, id_groups):
      ids = shard(ids)
      slots = jnp.arange(offset, offset + ids.shape[0])
      offset += ids.shape[0]
      outs.append(shard(jax.vmap(fn, (None, None, None, 0, 0, None))(a, state, data, ids,
                                                                    slots, q)))
    return server_fn(a, state, outs)

  return step


def make_round(problem: BilevelProblem, cfg: FederatedConfig, layout: UnitLayout | None,
               x_like: PyTree, *, sample: Sampler = full_batch,
               optimizer: optax.GradientTransformation | None = None,
               flops_per_grad: Callable[[PyTree, PyTree], jax.Array] = default_flops_per_grad,
               cost: costs.CostModel | None = None, jit: bool = True,
               available: Mapping[str, np.ndarray] | None = None,
               mask_fn: MaskFn | None = None, submodel: str = "dense",
               sampling: str | None = None, mesh: jax.sharding.Mesh | None = None,
               mesh_axis: str = "clients", diagnostics: bool = False) -> Round:
  """The local round `step(state, data) -> (state, metrics)` (validated up front; ConfigError).

  diagnostics: metrics[DIAGNOSTICS] = {"estimate": the round's aggregated hypergradient
  estimate (like x, at the state the round started from), "count_x" / "count_y": clients
  keeping each coordinate} for `loop.run(..., diagnose_fn=...)`.
  mask_fn: `(state, client_id, slot, round, rx, ry, key) -> (mask_x, mask_y)` replacing the
  policy masks (dense only), e.g. the theory check's controlled-coverage schedules.
  submodel: "dense" (masked full-size arrays: the reference) or "compact" (module docstring;
  needs unit masks, fixed levels, no `available` units, no mask_fn, and losses that accept
  compact arrays). Compact = dense in float64 to 1e-12 (tests/compact_test.py).
  sampling: "uniform" (dense default) or "stratified" (required by compact); see
  bilevel/sampling.py. With one level both draw the same clients.
  mesh: shard the client axis of the sampled ids and of every client output over `mesh_axis`
  (sharding.client_mesh); the same numbers as one device up to summation order. Place the
  data and state with `sharding.replicate(tree, mesh)` first, or every call copies them.
  jit: False returns the traced-per-call step (for callers that jit a larger program).
  cost: the per-operation FLOP model (costs.CostModel) client FLOPs are priced with; without
  it a client's round counts grad_evals_per_round gradients at flops_per_grad each.
  """
  sampling = check_round(cfg, layout, submodel=submodel, sampling=sampling, mask_fn=mask_fn,
                         available=available)
  optimizer = optimizer or optax.sgd(cfg.server_lr)
  ratios, population = sampling_lib.client_levels(cfg)
  check_coverable(cfg, layout, x_like, ratios, population, available)
  num_sampled = min(cfg.clients_per_round, len(population))
  strata = () if sampling == "uniform" else sampling_lib.make_strata(
      ratios, population, num_sampled, layout if cfg.mask.granularity == "unit" else None)
  args = sampling_lib.round_args(cfg, ratios, population, strata,
                                 jax.tree.leaves(x_like)[0].dtype)
  context = sampling_lib.make_context_fn(cfg)
  finish = result_fn(cfg, flops_per_grad, cost, first_step_apart=submodel == "dense")
  if submodel == "dense":
    client_fns = (dense_client_fn(problem, cfg, layout, context, finish, sample, mask_fn),)
  else:
    client_fns = compact_client_fns(problem, cfg, layout, strata, context, finish, sample)
  sample_fn = sampling_lib.make_sample_fn(sampling, num_sampled, strata)
  server_fn = _server_fn(cfg, layout, optimizer, diagnostics)
  step = _step_fn(sample_fn, client_fns, server_fn, client_sharding(mesh, mesh_axis))
  bind = lambda fn: functools.partial(fn, args)
  return Round(bind(jax.jit(step) if jit else step), population, ratios, num_sampled, strata,
               bind(sample_fn), tuple(map(bind, client_fns)), bind(server_fn),
               seed_constants=mask_fn is not None)


def seeds_step(rnds: Sequence[Round]) -> Callable[..., tuple[ServerState, dict[str, jax.Array]]]:
  """`step(state, data)` running the rounds of several seeds as one program: the round vmapped
  over a leading seed axis of its RoundArgs, state and data ([S, ...]; metrics come back [S]).

  rnds: Rounds of one configuration that differ only in the seed (the drivers
  check the configurations); each seed's RoundArgs carry what the seed changes, so the round
  traced for the first serves every seed. Seed s of the result is the round of rnds[s] to
  float32 rounding (to 1e-10 in float64; tests/seeds_test.py). FedNest's round qualifies
  too. Raises ConfigError when a round has no bound RoundArgs or a mask_fn
  (Round.seed_constants), or the rounds differ in a static shape.
  """
  if not all(isinstance(r.step, functools.partial) and len(r.step.args) == 1 for r in rnds):
    raise ConfigError("seeds_step needs rounds whose step binds its RoundArgs (rounds."
                      "make_round, fednest.make_fednest_round); run these seeds one after "
                      "another.")
  if any(r.seed_constants for r in rnds):
    raise ConfigError("seeds_step: a round built with a mask_fn may hold constants of its own "
                      "seed; run its seeds one after another.")
  shapes = lambda r: (tree.signature(r.step.args[0]), r.clients_per_round,
                      [(st.rx, st.ry, st.per_round, st.counts) for st in r.strata])
  first = shapes(rnds[0])
  if any(shapes(r) != first for r in rnds[1:]):
    raise ConfigError("seeds_step: the seeds' rounds differ in a static shape (levels, strata "
                      "or client counts); run them one after another.")
  args = tree.stack([r.step.args[0] for r in rnds])
  return functools.partial(jax.jit(jax.vmap(rnds[0].step.func)), args)
