"""The federated loop: ServerState, one jitted round vmapped over the sampled clients, run loop.

Round q (docs/method.md, section 6), jitted once (state.round is traced, shapes are static):
  1. sample C clients from the population (partial participation; without replacement);
  2. per client: keep ratios (fixed per client or redrawn), masks (masks.make_masks), the local
     update on its submodel (client.client_update), all vmapped over the client axis;
  3. sum the weighted masked deltas and masks over the clients (`round_sums`: one full-size sum
     per quantity, scatter-adds for compact clients), coverage-mean them (server.AGGREGATORS
     divide the sums); step x with the server
     optimiser and add the mean deltas to y and v; coordinates no client kept do not move;
  4. metrics: losses, norm of the aggregated hypergradient, coverage of x and y, analytic client
     FLOPs and communicated bytes of the submodels actually run.

Randomness (WORKSPACE.md, Seed streams): one seed; named streams fold_in(key(seed),
STREAMS[name]); per-round key
fold_in(stream, round); per-client key fold_in(round key, client id).

RABO = local_steps 1 with every client in every round; RAFBO = local_steps K > 1 with partial
participation. Baselines are presets (ALGORITHMS) over the same code.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bilevel import masks as masks_lib
from bilevel import server, tree
from bilevel import submodel as submodel_lib
from bilevel.client import ClientConfig, Sampler, client_update, full_batch, population_sampler
from bilevel.client import grad_evals_per_round, validate_client_config
from bilevel.errors import ConfigError, check_choice
from bilevel.masks import Level, MaskConfig, UnitLayout
from bilevel.metrics import to_python
from bilevel.problems import BilevelProblem

PyTree = Any
STREAMS = {"init": 0, "sample": 1, "masks": 2, "batches": 3, "levels": 4}
DIAGNOSTICS = "_diagnostics"  # metrics key of make_round(diagnostics=True)'s per-round trees


def stream_key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), STREAMS[name])


class FederatedConfig(NamedTuple):
  num_clients: int
  clients_per_round: int
  client: ClientConfig = ClientConfig()
  mask: MaskConfig = MaskConfig()
  levels: tuple[Level, ...] = (Level(1.0, 1.0, 1.0),)
  redraw_levels: bool = False  # draw each client's level anew every round
  only_full: bool = False  # resource-unaware baseline: only full-size clients take part
  aggregation: str = "coverage"
  weighting: str = "uniform"  # or "examples": w_i = the client's example count
  server_lr: float = 1.0
  allow_uncovered: bool = False
  seed: int = 0
  # "local": the round above (K local steps per client, one aggregation); "fednest": FedNest's
  # communicating round (bilevel/fednest.py: FedInn, FedIHGP, FedOut; full model only).
  round_kind: str = "local"


# Presets over the same code (docs/method.md, section 7): overrides of FederatedConfig /
# ClientConfig.
# "prune": False drops the level profile (every client runs the full model);
# "full_participation": every client takes part in every round.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "rabo": dict(local_steps=1, estimator="fd", full_participation=True),
    "rafbo": dict(estimator="fd"),
    # FedNest at its config A (bilevel/fednest.py): SVRG FedInn with 5 local steps at lr 0.01,
    # 5 server-averaged Neumann products (6 terms) at step 0.01, outer_tau 1 at lr 0.01.
    "fednest": dict(round_kind="fednest", estimator="neumann", prune=False, local_steps=1,
                    inner_steps=5, num_steps=6, inner_lr=0.01, outer_lr=0.01, v_lr=0.01),
    # LFedNest-style: the local round with a local Neumann hypergradient (no extra rounds).
    "lfednest": dict(estimator="neumann", prune=False, inner_steps=5, num_steps=5),
    "simfbo": dict(estimator="exact", prune=False),
    "memfbo": dict(estimator="fd", prune=False),
    "full_only": dict(estimator="fd", only_full=True),
    "heterofl": dict(estimator="fd", policy="static"),
    "fedrolex": dict(estimator="fd", policy="rolling"),
}


ROUND_KINDS = ("local", "fednest")


def validate_config(cfg: FederatedConfig, layout: UnitLayout | None = None) -> None:
  """Every range and name check of the configuration, with the value and the allowed range."""
  if int(cfg.num_clients) != cfg.num_clients or cfg.num_clients < 1:
    raise ConfigError(f"num_clients={cfg.num_clients!r} must be an integer >= 1.")
  if not 1 <= cfg.clients_per_round <= cfg.num_clients:
    raise ConfigError(f"clients_per_round={cfg.clients_per_round!r} is outside the allowed range "
                      f"[1, num_clients={cfg.num_clients}].")
  validate_client_config(cfg.client)
  masks_lib.validate_mask_config(cfg.mask, layout)
  masks_lib.validate_levels(cfg.levels)
  check_choice("aggregation", cfg.aggregation, server.AGGREGATORS)
  check_choice("weighting", cfg.weighting, ("uniform", "examples"))
  check_choice("round_kind", cfg.round_kind, ROUND_KINDS)
  if not cfg.server_lr > 0:
    raise ConfigError(f"server_lr={cfg.server_lr!r} is outside the allowed range (0, inf).")
  if cfg.only_full and not any(lv.rx == 1 and lv.ry == 1 for lv in cfg.levels):
    raise ConfigError("only_full=True but no resource level is 1/1: no client could take part.")


class FederatedData(NamedTuple):
  """Client data stacked on a leading client axis [M, ...]."""

  inner: Any  # what g_i is evaluated on (or sampled from)
  outer: Any  # what f_i is evaluated on
  num_examples: jax.Array  # [M] example counts (aggregation weights with weighting="examples")
  available: Mapping[str, jax.Array] | None = None  # group -> [M, K] units a client owns


class ServerState(NamedTuple):
  x: PyTree
  y: PyTree
  v: PyTree
  opt_state: optax.OptState
  round: jax.Array  # int32 scalar: rounds completed


def init_state(x: PyTree, y: PyTree, optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(x, y, tree.zeros_like(y), optimizer.init(x), jnp.zeros((), jnp.int32))


def default_flops_per_grad(kept_x: PyTree, kept_y: PyTree) -> jax.Array:
  """6 FLOPs per kept parameter (forward + backward of a dense layer, per example).

  kept_x, kept_y: per leaf of x and y the number of kept entries (masks.kept_counts), the
  argument every `flops_per_grad` takes.
  """
  return 6.0 * sum(jax.tree.leaves(kept_x) + jax.tree.leaves(kept_y))


MaskFn = Callable[..., tuple[PyTree, PyTree]]
SUBMODELS = ("dense", "compact")
SAMPLINGS = ("uniform", "stratified")


class Stratum(NamedTuple):
  """Clients of one resource level: the compact path vmaps each stratum with its own shapes."""

  rx: float
  ry: float
  clients: np.ndarray  # population ids at this level
  per_round: int  # clients sampled from it per round (stratified sampling)
  counts: dict[str, int]  # static compact width per unit group


class RoundArgs(NamedTuple):
  """What differs between runs of one compiled round: jit arguments, not constants.

  The seed's random streams, its level assignment and the tuned step sizes enter the traced
  round as arrays, so every seed and every step-size grid point of a configuration runs one
  executable (one compilation per process, then JAX's persistent compilation cache).
  """

  keys: dict[str, jax.Array]  # stream name -> typed key (stream_key(seed, name))
  ratios: jax.Array  # [M, 2] client keep ratios
  population: jax.Array  # ids that may be sampled
  strata: tuple[jax.Array, ...]  # per stratum, its client ids
  steps: dict[str, jax.Array]  # outer_lr, inner_lr, v_lr as scalars of x's dtype


def with_steps(cfg: ClientConfig, steps: Mapping[str, Any]) -> ClientConfig:
  """cfg with outer_lr, inner_lr and the v / Neumann step taken from `steps` (traced)."""
  opts = cfg.estimator_options._replace(step_size=steps["v_lr"])
  return cfg._replace(outer_lr=steps["outer_lr"], inner_lr=steps["inner_lr"],
                      estimator_options=opts)


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
  """A round's client results summed over clients: full-size trees and scalars, nothing [C].

  The server step needs only these (server.AGGREGATORS divide num by den or by the weight).
  """

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


def round_sums(res: ClientResult, layout: UnitLayout | None, state: ServerState) -> RoundSums:
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
      params_sent=jnp.sum(res.stats["params_sent"]), active=jnp.sum(w > 0))


class Round(NamedTuple):
  """The jitted round and what the host needs to drive it.

  The unjitted pieces `step` is made of are exposed for benchmarks and tests:
  `sample_fn(round) -> [ids per stratum]` (one array with uniform sampling),
  `client_fns[s](state, data, client_id, slot, round) -> ClientResult` (per stratum; one
  function on the dense path) and `server_fn(state, [ClientResult stacked on [C] per client
  function]) -> (state, metrics)`.
  """

  step: Callable[..., tuple[ServerState, dict[str, jax.Array]]]
  population: np.ndarray  # client ids that may be sampled
  client_ratios: np.ndarray  # [M, 2] fixed keep ratios (ignored with redraw_levels)
  clients_per_round: int
  strata: tuple[Stratum, ...] = ()
  sample_fn: Callable[[jax.Array], list[jax.Array]] | None = None
  client_fns: tuple[Callable[..., Any], ...] = ()
  server_fn: Callable[..., tuple[ServerState, dict[str, jax.Array]]] | None = None


def make_strata(ratios: np.ndarray, population: np.ndarray, clients_per_round: int,
                layout: UnitLayout | None) -> tuple[Stratum, ...]:
  """Population split by resource level (largest r first); per-round counts by largest remainder.

  Compact widths are masks.host_keep_count's exact integers, the counts the traced round's
  masks.keep_count gives (the ratio read to 6 decimals, float32 or float64 alike).
  """
  pairs = ratios[population]
  levels = sorted({tuple(p) for p in pairs.tolist()}, reverse=True)
  members = [population[np.all(pairs == np.array(lv), axis=1)] for lv in levels]
  per_round = masks_lib.largest_remainder(clients_per_round, np.array([len(m) for m in members]))
  strata = []
  for (rx, ry), ids, c in zip(levels, members, per_round):
    counts = {}
    if layout is not None:
      kx = {g: masks_lib.host_keep_count(rx, n) for g, n in layout.groups.items()}
      ky = {g: masks_lib.host_keep_count(ry, n) for g, n in layout.groups.items()}
      counts = submodel_lib.group_keep_counts(layout, kx, ky)
    if c > 0:
      strata.append(Stratum(rx, ry, ids, int(c), counts))
  return tuple(strata)


def client_mesh(num_devices: int | None = None, axis: str = "clients") -> Mesh:
  """A 1-D mesh over the first num_devices devices (all by default) with an Auto client axis.

  Multi-host: call jax.distributed.initialize() first on every host; jax.devices() then lists
  every host's devices and the same program runs on each (see BENCHMARKS.md).
  """
  devices = jax.devices()[: num_devices or len(jax.devices())]
  return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """tree placed whole on every device of mesh (unchanged without a mesh).

  Place the population data and the server state this way once before running sharded rounds:
  an argument that lives on one device is copied to every device of the mesh on every call
  (with 2 CPU devices that halved the main job's rounds per second; BENCHMARKS.md).
  """
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def client_sharding(mesh: Mesh | None, axis: str) -> Callable[[PyTree], PyTree]:
  """Constrain the leading (client) axis of every leaf to the mesh axis (identity without mesh)."""
  if mesh is None:
    return lambda t: t

  def constrain(t):
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
        a, NamedSharding(mesh, PartitionSpec(axis, *([None] * (a.ndim - 1))))), t)

  return constrain


def make_round(problem: BilevelProblem, cfg: FederatedConfig, layout: UnitLayout | None,
               x_like: PyTree, *, sample: Sampler = full_batch,
               optimizer: optax.GradientTransformation | None = None,
               flops_per_grad: Callable[[PyTree, PyTree], jax.Array] = default_flops_per_grad,
               client_map: str = "vmap", jit: bool = True,
               available: Mapping[str, np.ndarray] | None = None,
               mask_fn: MaskFn | None = None, submodel: str = "dense",
               sampling: str | None = None, mesh: Mesh | None = None,
               mesh_axis: str = "clients", diagnostics: bool = False) -> Round:
  """Build the round function `step(state, data) -> (state, metrics)` (validated up front).

  diagnostics: metrics[DIAGNOSTICS] = {"estimate": the round's aggregated hypergradient estimate
  (like x, evaluated at the state the round started from), "count_x" / "count_y": clients
  keeping each coordinate} for `run(..., diagnose_fn=...)`.

  mask_fn: optional `(state, client_id, slot, round, rx, ry, key) -> (mask_x, mask_y)` replacing
  the policy masks (slot = the client's position 0..C-1 in this round), e.g. schedules with a
  controlled coverage for the theory check.

  client_map: "vmap" (default) or "loop" (a Python loop over clients inside the same jit: the
  reference the vmapped round is tested against).

  submodel: "dense" (masked full-size arrays: the reference) or "compact" (unit masks only: each
  client runs on extracted arrays of static width k = ceil(r K) per level, held units-major
  (submodel.py); the server scatter-adds the compact outputs of a level into full-size sums
  (`round_sums`), so no full-size array per client is ever built, and aggregates them as on
  the dense path). Compact needs fixed levels, no `available` units and no mask_fn, and loss
  functions that accept compact arrays.

  sampling: "uniform" (C clients without replacement from the population; dense default) or
  "stratified" (per resource level a fixed count, the largest-remainder split of C by level
  sizes, without replacement within the level; required by compact, where every level's group
  needs a static size). With one level both draw the same clients.

  mesh: optional jax.sharding.Mesh; the client axis of the sampled ids and of every client
  output is sharded over `mesh_axis` (GSPMD partitions the vmapped clients; the aggregation
  becomes a cross-device sum). The same numbers as one device up to summation order. Place
  the data and state with `replicate(tree, mesh)` first, or every call copies them.
  """
  if cfg.round_kind == "fednest":  # FedNest's communicating round (full model only)
    from bilevel import fednest  # pylint: disable=g-import-not-at-top (fednest imports us)
    return fednest.make_fednest_round(
        problem, cfg, layout, x_like, sample=sample, optimizer=optimizer,
        flops_per_grad=flops_per_grad, client_map=client_map, jit=jit, available=available,
        mask_fn=mask_fn, submodel=submodel, sampling=sampling, mesh=mesh,
        diagnostics=diagnostics)
  validate_config(cfg, layout)
  check_choice("client_map", client_map, ("vmap", "loop"))
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
  optimizer = optimizer or optax.sgd(cfg.server_lr)
  ratios = masks_lib.assign_levels(cfg.levels, cfg.num_clients, cfg.seed)
  population = np.arange(cfg.num_clients)
  if cfg.only_full and not cfg.redraw_levels:
    population = population[(ratios[:, 0] == 1) & (ratios[:, 1] == 1)]
  if cfg.redraw_levels:
    profile_ratios = np.array([[lv.rx, lv.ry] for lv in cfg.levels])
    masks_lib.check_coverable(cfg.mask, layout, x_like, profile_ratios, None,
                              allow_uncovered=cfg.allow_uncovered)
  else:
    masks_lib.check_coverable(
        cfg.mask, layout, x_like, ratios[population],
        None if available is None else {g: np.asarray(a)[population] for g, a in available.items()},
        allow_uncovered=cfg.allow_uncovered)
  num_sampled = min(cfg.clients_per_round, len(population))
  aggregate = server.AGGREGATORS[cfg.aggregation]
  evals = grad_evals_per_round(cfg.client)
  # Parameters a client receives and returns: x and y, plus v for estimators that read the warm
  # start (neumann starts its series from grad_y f: v never travels).
  y_copies = 1 if cfg.client.estimator == "neumann" else 2
  level_table = jnp.array([[lv.rx, lv.ry] for lv in cfg.levels])
  level_p = jnp.array([lv.share for lv in cfg.levels])
  strata = () if sampling == "uniform" else make_strata(
      ratios, population, num_sampled, layout if cfg.mask.granularity == "unit" else None)
  shard = client_sharding(mesh, mesh_axis)
  dtype = jax.tree.leaves(x_like)[0].dtype
  args = RoundArgs(
      keys={name: stream_key(cfg.seed, name) for name in ("sample", "levels", "masks", "batches")},
      ratios=jnp.asarray(ratios), population=jnp.asarray(population),
      strata=tuple(jnp.asarray(st.clients) for st in strata),
      steps={name: jnp.asarray(value, dtype) for name, value in (
          ("outer_lr", cfg.client.outer_lr), ("inner_lr", cfg.client.inner_lr),
          ("v_lr", cfg.client.estimator_options.step_size))})

  def sample_fn(a: RoundArgs, q: jax.Array) -> list[jax.Array]:
    key = jax.random.fold_in(a.keys["sample"], q)
    if sampling == "uniform":
      return [jax.random.choice(key, a.population, (num_sampled,), replace=False)]
    return [jax.random.choice(key if len(strata) == 1 else jax.random.fold_in(key, s),
                              a.strata[s], (st.per_round,), replace=False)
            for s, st in enumerate(strata)]

  def context(a: RoundArgs, data: FederatedData, cid: jax.Array, q: jax.Array):
    """The client's keep ratios, activity, mask key, owned units and batch key this round."""
    if cfg.redraw_levels:
      lvl = jax.random.choice(jax.random.fold_in(jax.random.fold_in(a.keys["levels"], q), cid),
                              len(cfg.levels), p=level_p)
      rx, ry = level_table[lvl, 0], level_table[lvl, 1]
    else:
      rx, ry = a.ratios[cid, 0], a.ratios[cid, 1]
    active = jnp.asarray(1.0)
    if cfg.only_full:
      active = ((rx == 1) & (ry == 1)).astype(jnp.float32)
    mkey = jax.random.fold_in(jax.random.fold_in(a.keys["masks"], q), cid)
    avail = None if data.available is None else {g: t[cid] for g, t in data.available.items()}
    bkey = jax.random.fold_in(jax.random.fold_in(a.keys["batches"], q), cid)
    return rx, ry, active, mkey, avail, bkey

  def finish(data, cid, out, mask_x, mask_y, active, idx=None, kept=None) -> ClientResult:
    """Weight and analytic costs; kept = per-leaf kept counts (computed from the masks if None;
    compact clients count from unit masks rather than reduce full-size broadcast masks)."""
    weight = active * (data.num_examples[cid].astype(jnp.float32)
                       if cfg.weighting == "examples" else 1.0)
    kept_x, kept_y = kept or (masks_lib.kept_counts(mask_x), masks_lib.kept_counts(mask_y))
    sent = sum(jax.tree.leaves(kept_x)) + y_copies * sum(jax.tree.leaves(kept_y))
    stats = dict(flops=evals * flops_per_grad(kept_x, kept_y), params_sent=sent)
    return ClientResult(out, mask_x, mask_y, weight, stats, idx)

  def dense_client(a: RoundArgs, state: ServerState, data: FederatedData, cid: jax.Array,
                   slot: jax.Array, q: jax.Array):
    rx, ry, active, mkey, avail, bkey = context(a, data, cid, q)
    if mask_fn is None:
      mask_x, mask_y = masks_lib.make_masks(cfg.mask, layout, state.x, state.y, rx, ry, mkey, q,
                                            avail)
    else:
      mask_x, mask_y = mask_fn(state, cid, slot, q, rx, ry, mkey)
    mask_x, mask_y = tree.scale(active, mask_x), tree.scale(active, mask_y)
    out = client_update(problem, with_steps(cfg.client, a.steps), state.x, state.y, state.v,
                        data.inner, data.outer, mask_x, mask_y, bkey,
                        population_sampler(sample, cid))
    return finish(data, cid, out, mask_x, mask_y, active)

  def compact_client(counts: dict[str, int]):
    def client(a: RoundArgs, state: ServerState, data: FederatedData, cid: jax.Array,
               slot: jax.Array, q: jax.Array):
      del slot
      rx, ry, active, mkey, _, bkey = context(a, data, cid, q)
      umx, umy = masks_lib.unit_masks(layout, cfg.mask.policy, rx, ry, mkey, q, state.x, state.y)
      idx = submodel_lib.compact_indices(layout, umx, umy, counts)
      # Units-major (submodel.to_units_major): the kept units are whole rows, gathered here
      # and scatter-added as rows by the server; the losses see the model's layout.
      take = lambda side, t: submodel_lib.extract(
          getattr(um_layout, side), submodel_lib.to_units_major(getattr(layout, side), t), idx)
      x_c, y_c, v_c = take("x", state.x), take("y", state.y), take("y", state.v)
      cux, cuy = submodel_lib.compact_unit_masks(umx, umy, idx)
      cux, cuy = tree.scale(active, cux), tree.scale(active, cuy)
      cmx, cmy = masks_lib.expand_unit_masks(um_layout, cux, cuy, x_c, y_c)
      kept = (masks_lib.unit_kept_counts(cux, um_layout.x, x_c),
              masks_lib.unit_kept_counts(cuy, um_layout.y, y_c))
      # x's compact mask is all ones: the client computes on exactly its kept x units (active
      # is 1 for every client a compact round samples: only_full restricts the population).
      out = client_update(um_problem, with_steps(cfg.client, a.steps), x_c, y_c, v_c,
                          data.inner, data.outer, None, cmy, bkey,
                          population_sampler(sample, cid))
      return finish(data, cid, out, cmx, cmy, active, idx, kept)  # the server scatter-adds

    return client

  if submodel == "dense":
    client_fns = (dense_client,)
  else:
    um_layout = submodel_lib.units_major_layout(layout)
    um_problem = submodel_lib.units_major_problem(problem, layout)
    client_fns = tuple(compact_client(st.counts) for st in strata)

  def server_fn(a: RoundArgs, state: ServerState, results: Sequence[ClientResult]):
    sums = [round_sums(res, layout, state) for res in results]
    t = jax.tree.map(lambda *a: sum(a[1:], a[0]), *sums)  # over the client groups
    dx = aggregate(t.dx, t.den_x, t.weight)
    dy = aggregate(t.dy, t.den_y, t.weight)
    dv = aggregate(t.dv, t.den_y, t.weight)
    # The coverage mean of the clients' mean hypergradients: a client moves x by -alpha h_k in
    # each of its K local steps, so its mean h is -D_x / (alpha K) (0/1 masks): no extra sum.
    hyper = tree.scale(-1.0 / (a.steps["outer_lr"] * cfg.client.local_steps),
                       server.coverage_from_sums(t.dx, t.den_x, t.weight))
    cover_x, cover_y = server.covered_from_sums(t.den_x), server.covered_from_sums(t.den_y)
    x, opt_state = server.server_step(state.x, dx, cover_x, optimizer, state.opt_state)
    y = tree.add(state.y, tree.mul(dy, cover_y))
    v = tree.add(state.v, tree.mul(dv, cover_y))
    cov_x = masks_lib.coverage_stats_from_counts(t.count_x)
    cov_y = masks_lib.coverage_stats_from_counts(t.count_y)
    wsum = jnp.maximum(t.weight, 1e-30)
    itemsize = jax.tree.leaves(state.x)[0].dtype.itemsize
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
    if diagnostics:
      metrics[DIAGNOSTICS] = dict(estimate=hyper, count_x=t.count_x, count_y=t.count_y)
    return ServerState(x, y, v, opt_state, state.round + 1), metrics

  def step(a: RoundArgs, state: ServerState, data: FederatedData):
    q = state.round
    id_groups = sample_fn(a, q)
    if submodel == "dense" and len(id_groups) > 1:
      id_groups = [jnp.concatenate(id_groups)]  # one vmap: every client has full-size arrays
    outs, offset = [], 0
    for fn, ids in zip(client_fns, id_groups):
      ids = shard(ids)
      slots = jnp.arange(offset, offset + ids.shape[0])
      offset += ids.shape[0]
      if client_map == "vmap":
        outs.append(shard(jax.vmap(fn, (None, None, None, 0, 0, None))(a, state, data, ids,
                                                                      slots, q)))
      else:
        outs.append(tree.stack([fn(a, state, data, ids[i], slots[i], q)
                                for i in range(ids.shape[0])]))
    return server_fn(a, state, outs)

  bind = lambda fn: functools.partial(fn, args)
  return Round(bind(jax.jit(step) if jit else step), population, ratios, num_sampled, strata,
               bind(sample_fn), tuple(map(bind, client_fns)), bind(server_fn))


# ------------------------------------------------------------------ run loop


class DivergenceError(RuntimeError):
  """A loss, the hypergradient estimate or a parameter became NaN or infinite, or a loss or the
  hypergradient norm grew past `blowup_factor` times its early value (a finite blow-up)."""


# Per-round quantities whose non-finite value stops a run.
GUARDED_METRICS = ("inner_loss", "outer_loss", "hypergrad_norm")
# Per-round quantities whose finite blow-up stops a run, and the rounds that set their early
# value (the median over rounds 1..BLOWUP_WARMUP of the run).
BLOWUP_METRICS = ("outer_loss", "hypergrad_norm")
BLOWUP_WARMUP = 10
BLOWUP_FACTOR = 100.0


class BlowupGuard:
  """Raises DivergenceError when a BLOWUP_METRICS value exceeds factor x its early value.

  The early value of a quantity is its median over rounds 1..BLOWUP_WARMUP of the run (a median,
  so a blow-up that starts inside those rounds does not raise its own reference); later rounds
  are checked against it. It is kept in the run totals (`early_*`; the warm-up values under
  `_early_values_*` until the median is final), so a resumed run uses the same reference.
  factor None or 0 turns the guard off.
  """

  def __init__(self, factor: float | None, totals: dict[str, Any]):
    self.factor, self.totals = factor, totals

  def __call__(self, done: int, metrics: Mapping[str, Any]) -> None:
    if not self.factor:
      return
    for k in BLOWUP_METRICS:
      key, values_key = f"early_{k}", f"_early_values_{k}"
      if done <= BLOWUP_WARMUP:
        values = self.totals.setdefault(values_key, []) + [float(metrics[k])]
        self.totals[values_key] = values
        self.totals[key] = float(np.median(values))
        if done == BLOWUP_WARMUP:
          del self.totals[values_key]
      elif metrics[k] > self.factor * self.totals.get(key, float("inf")):
        raise DivergenceError(
            f"round {done}: {k} = {metrics[k]:.4g} grew past {self.factor:g} x its early value "
            f"{self.totals[key]:.4g} (median over rounds 1-{BLOWUP_WARMUP}); the run stopped as "
            "diverged. Lower the step sizes (--outer_lr, --inner_lr, --v_lr); the last "
            "checkpoint holds the last good state; --divergence_factor=0 turns this guard off.")


def _ever_covered(ever: dict[str, PyTree] | None, diag: Mapping[str, PyTree]
                  ) -> dict[str, PyTree]:
  """Per coordinate of x and y: kept by some client in some round so far (numpy bool trees)."""
  now = {side: jax.tree.map(lambda c: np.asarray(c) > 0, diag[f"count_{side}"])
         for side in ("x", "y")}
  if ever is None:
    return now
  return {side: jax.tree.map(np.logical_or, ever[side], now[side]) for side in ("x", "y")}


@jax.jit
def _finite_parts(state: ServerState) -> jax.Array:
  """[x, y, v] all finite."""
  ok = lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(t)]))
  return jnp.stack([ok(state.x), ok(state.y), ok(state.v)])


def _check_finite(done: int, metrics: Mapping[str, Any], state: ServerState) -> None:
  bad = [k for k in GUARDED_METRICS if not np.isfinite(metrics[k])]
  bad += [name for name, ok in zip(("x", "y", "v"), np.asarray(_finite_parts(state))) if not ok]
  if bad:
    raise DivergenceError(
        f"round {done}: {', '.join(bad)} became NaN or infinite; the run stopped. Lower the step "
        "sizes (--outer_lr, --inner_lr, --v_lr) or the fd probe (--delta); the last checkpoint "
        "holds the last good state.")


def run(rnd: Round, state: ServerState, data: FederatedData, num_rounds: int, *,
        eval_fn: Callable[[ServerState], Mapping[str, Any]] | None = None, eval_every: int = 1,
        on_record: Callable[[dict[str, Any]], None] | None = None,
        log: Callable[[str], None] | None = None, log_every: int = 10,
        start_totals: Mapping[str, float] | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[ServerState, dict[str, float], int], None] | None = None,
        blowup_factor: float | None = BLOWUP_FACTOR,
        diagnose_fn: Callable[[ServerState, PyTree], Mapping[str, Any]] | None = None,
        diagnose_every: int = 0,
        ) -> tuple[ServerState, list[dict[str, Any]]]:
  """Run rounds state.round .. num_rounds - 1; return the final state and the logged records.

  A record is logged every `eval_every` rounds and after the last one. It holds the round's
  metrics, cumulative client FLOPs and communicated bytes, the running C_x* (min over rounds of
  the minimum outer coverage), wall time, the time of this call's first round (first_round_s:
  compilation included) and whatever eval_fn returns. Every round the losses, the hypergradient
  norm and x, y, v are checked: a NaN or inf raises DivergenceError naming the round and the
  quantity, and so does an outer loss or hypergradient norm above blowup_factor times its early
  value (BlowupGuard; None or 0 turns that check off). `on_checkpoint(state, totals, round)` is
  called every `checkpoint_every` rounds and after the last one, after that round's record was
  passed on. `log(line)`, if given, receives a progress line every `log_every` rounds (the
  library prints nothing itself; the drivers pass absl logging).

  Diagnostics (a round built with make_round(diagnostics=True)): every round the cumulative
  share of coordinates no client has kept so far goes to never_covered_x_share /
  never_covered_y_share (counted from this call's first round); every `diagnose_every` rounds
  `diagnose_fn(state the round started from, the round's aggregated estimate)` returns figures
  (e.g. bilevel.diagnostics.estimate_quality) that go into that round's record, which is
  logged then (diagnose_every must be a multiple of eval_every).
  """
  totals = dict(cumulative_client_flops=0.0, cumulative_comm_bytes=0.0, cx_star=float("inf"),
                cy_star=float("inf"))
  totals.update(start_totals or {})
  guard = BlowupGuard(blowup_factor, totals)
  records, ever = [], None
  start, first = time.perf_counter(), int(state.round)
  for q in range(first, num_rounds):
    step_start = time.perf_counter()
    before = state
    state, metrics = rnd.step(state, data)
    diag = metrics.pop(DIAGNOSTICS, None)
    metrics = to_python(jax.device_get(metrics))
    if q == first:  # this process's first round: compilation (or a cache load) included
      totals["first_round_s"] = time.perf_counter() - step_start
    done = q + 1
    _check_finite(done, metrics, state)
    guard(done, metrics)
    extra = {}
    if diag is not None:
      ever = _ever_covered(ever, diag)
      for side in ("x", "y"):
        flat = np.concatenate([np.ravel(e) for e in jax.tree.leaves(ever[side])])
        totals[f"never_covered_{side}_share"] = float(np.mean(~flat))
      if diagnose_fn is not None and diagnose_every and done % diagnose_every == 0:
        extra = {f"diag_{k}": v for k, v in to_python(
            jax.device_get(dict(diagnose_fn(before, diag["estimate"])))).items()}
    totals["cumulative_client_flops"] += metrics["client_flops"]
    totals["cumulative_comm_bytes"] += metrics["comm_bytes"]
    totals["cx_star"] = min(totals["cx_star"], metrics["coverage_x_min"])
    totals["cy_star"] = min(totals["cy_star"], metrics["coverage_y_min"])
    if done % eval_every == 0 or done == num_rounds:
      record = dict(round=done, **metrics,
                    **{k: v for k, v in totals.items() if not k.startswith("_")}, **extra,
                    wall_time_s=time.perf_counter() - start)
      if eval_fn is not None:
        record.update(to_python(dict(eval_fn(state))))
      records.append(record)
      if on_record is not None:
        on_record(record)
    if on_checkpoint is not None and checkpoint_every and (
        done % checkpoint_every == 0 or done == num_rounds):
      on_checkpoint(state, dict(totals), done)
    if log is not None and (done % log_every == 0 or done == num_rounds):
      elapsed = time.perf_counter() - start
      rate = (done - first) / max(elapsed, 1e-9)
      log(f"round {done}/{num_rounds}  outer_loss {metrics['outer_loss']:.4f}  "
          f"|hypergrad| {metrics['hypergrad_norm']:.3e}  C_x* {totals['cx_star']:g}  "
          f"{rate:.2f} rounds/s  ETA {(num_rounds - done) / max(rate, 1e-9):.0f}s")
  return state, records
