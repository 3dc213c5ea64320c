"""Algorithms as objects: one constructor per algorithm, each owning every default that defines it.

    alg = bilevel.algorithms.get("rafbo", problem=problem, num_clients=8, clients_per_round=4,
                                 levels="1/1:0.5,0.5/0.5:0.5", granularity="element")
    state = alg.init(x, y)                      # a federated.ServerState
    for _ in range(rounds):
      state, metrics = alg.step(state, data)    # data: a federated.FederatedData; jitted once

An `Algorithm` holds the resolved `federated.FederatedConfig` (`config`), its server optimiser
(used by both `init` and `step`, so the two cannot disagree) and the jitted round
(`build_round`: rounds.make_round, or fednest.make_fednest_round for fednest; built on the
first `init` or `step` for the shapes of x and cached). `bilevel.run(alg, state, data,
num_rounds, ...)` (loop.run) drives it like a `federated.Round`: it only calls `.step`.

Every constructor takes the same keywords (`Options`, or see `get`); a keyword that is not given
(or None) takes the algorithm's default. The drivers build every algorithm through `get`
(experiments/common.py, `make_algorithm`): a flag given on the command line is passed as its
keyword, and a flag left at its default is passed too unless the algorithm sets that option
itself (`own_options`). So the library's defaults are what the drivers resolve for
`--algorithm=NAME` with default flags, except the drivers' level profile
"1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5" (here one full level "1/1:1" unless given) and their
clients_per_round 10 (here num_clients // 2: the same for their 20 clients).

  name       local  inner  estimator          participation       masks
  rabo       1      1      fd                 every client        random, levels as given
  rafbo      5      1      fd                 half the clients    random, levels as given
  lfednest   5      5      neumann (5 terms)  half the clients    full model (levels ignored)
  fednest    1      5      FedNest's round    half the clients    full model (levels ignored)
             (tau)  (epochs (N = 5 products, its code's v; bilevel/fednest.py; hlr = outer_lr
                    of SVRG) = v_lr = 0.01, lr = inner_lr = 0.01: FedNest's own)
  simfbo     5      1      exact              half the clients    full model (levels ignored)
  memfbo     5      1      fd                 half the clients    full model (levels ignored)
  full_only  5      1      fd                 half the clients    only clients at level 1/1 train
  heterofl   5      1      fd                 half the clients    static (nested) masks
  fedrolex   5      1      fd                 half the clients    rolling masks

Shared defaults (fednest: its own, above): inner_lr 0.1, outer_lr 0.1, num_steps 1 (lfednest 5),
v_lr 0.1,
delta 1e-3, radius None, v_step "cauchy", granularity "unit" (needs `layout`), aggregation
"coverage", weighting "uniform", server optimiser optax.sgd(server_lr = 1.0), full-batch client
sampling, dense submodels, seed 0. "Half the clients" is max(1, num_clients // 2) (the drivers'
10 of 20).

Full-model algorithms (fednest, lfednest, simfbo, memfbo) run every client on the full model:
`levels` is accepted (and validated) so that every algorithm takes the same call, but ignored;
their config has the single level 1/1:1. To run one of their estimators on pruned submodels, use
rafbo with that estimator (e.g. `get("rafbo", ..., estimator="exact")`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs, federated, rounds, tree
from bilevel import fednest as fednest_lib  # `fednest` is this module's constructor
from bilevel import masks as masks_lib
from bilevel.client import ClientConfig, Sampler, full_batch
from bilevel.errors import ConfigError, check_choice
from bilevel.hypergrad import EstimatorOptions
from bilevel.masks import Level, MaskConfig, UnitLayout
from bilevel.problems import BilevelProblem

PyTree = Any
FULL_LEVEL = Level(1.0, 1.0, 1.0)


class Options(NamedTuple):
  """Every keyword an algorithm constructor takes; None = the algorithm's default.

  Attributes:
    clients_per_round: clients sampled per round C (rabo: num_clients; others: num_clients // 2).
    levels: resource levels, a profile "rx/ry:share,..." (masks.parse_levels) or a sequence of
      masks.Level (or (rx, ry, share) triples); default "1/1:1". Ignored by full-model algorithms.
    redraw_levels: draw each client's level anew every round (default False).
    granularity: "unit" (needs `layout`) or "element"; default "unit" (full-model algorithms
      without a layout: "element", their masks keep everything either way).
    layout: masks.UnitLayout of the model (e.g. bilevel.models.mlp_layout(hidden)).
    mask_policy: masks.POLICIES ("random", "rolling", "static", "magnitude").
    allow_uncovered: accept mask settings that never cover some outer coordinates.
    local_steps: local steps K per round.
    inner_steps: inner steps T per local step.
    inner_lr: inner step size beta.
    inner_step: "cauchy" (step min(beta, g'g / g'Hg), one product per inner step; the
      default) or "fixed" (beta always); inner.inner_solve. FedNest's round ignores it.
    outer_lr: outer (hypergradient) step size alpha.
    x_trust: trust region on each client's x delta, relative to its submodel's ||x|| (client
      .trust_region; 0 = off, the default). x_trust_scope: "layer" (default) or "model".
    estimator: hypergradient estimator (hypergrad.ESTIMATORS: fd, exact, neumann, cg).
    num_steps: v updates / Neumann terms / CG iterations.
    v_lr: step size eta of the v update and Neumann series (EstimatorOptions.step_size).
    delta: finite-difference probe length (fd).
    radius: optional projection radius for v.
    v_step: "cauchy" or "fixed" (fd / exact v update; hypergrad.EstimatorOptions).
    product: Hessian-vector product of neumann / cg ("exact" or "fd").
    server_optimizer: optax transformation the server steps x with; default
      optax.sgd(server_lr). Give this or server_lr, not both.
    server_lr: step of the default SGD server optimiser (default 1.0).
    aggregation: server.AGGREGATORS ("coverage", "zero_fill").
    weighting: "uniform" or "examples" (w_i = the client's example count).
    seed: the one seed every random stream derives from (default 0).
    sample: client batch sampler (client.Sampler); default client.full_batch.
    flops_per_grad: analytic FLOPs per gradient, (kept_x, kept_y) -> FLOPs; default
      federated.default_flops_per_grad. Used when no `cost` is given: a client's round then
      counts grad_evals_per_round gradients of that price.
    cost: costs.CostModel, the per-operation FLOP model (op prices of the model and the batch
      rows) a client's round is priced with instead (the drivers give it for their models).
    submodel: "dense" (default) or "compact" (rounds.make_round).
    sampling: "uniform" or "stratified" (default: make_round's choice for the submodel).
    available: group -> [M, K] units each client owns (rounds.make_round).
    mesh: jax.sharding.Mesh to shard the clients of a round over (sharding.client_mesh).
    mask_fn: `(state, client_id, slot, round, rx, ry, key) -> (mask_x, mask_y)` replacing the
      mask policy (federated.MaskFn; dense submodels only; e.g. hyper-cleaning's rolling
      window over each client's own samples). Default None: the policy's masks.
    diagnostics: True adds the round's aggregated estimate and coverage counts to its metrics
      for loop.run's diagnose_fn (rounds.make_round). Default None: off.
    fednest_neumann: fednest's v: "code" (FedNest's code's closed form, the default) or
      "series" (the series it intends; fednest.NEUMANN_FORMS). Other algorithms: "code" only.
  """

  clients_per_round: int | None = None
  levels: str | Sequence[Level] | None = None
  redraw_levels: bool | None = None
  granularity: str | None = None
  layout: UnitLayout | None = None
  mask_policy: str | None = None
  allow_uncovered: bool | None = None
  local_steps: int | None = None
  inner_steps: int | None = None
  inner_lr: float | None = None
  inner_step: str | None = None
  outer_lr: float | None = None
  x_trust: float | None = None
  x_trust_scope: str | None = None
  estimator: str | None = None
  num_steps: int | None = None
  v_lr: float | None = None
  delta: float | None = None
  radius: float | None = None
  v_step: str | None = None
  product: str | None = None
  server_optimizer: optax.GradientTransformation | None = None
  server_lr: float | None = None
  aggregation: str | None = None
  weighting: str | None = None
  seed: int | None = None
  sample: Sampler | None = None
  flops_per_grad: Callable[[PyTree, PyTree], jax.Array] | None = None
  cost: costs.CostModel | None = None
  submodel: str | None = None
  sampling: str | None = None
  available: Mapping[str, np.ndarray] | None = None
  mesh: jax.sharding.Mesh | None = None
  mask_fn: federated.MaskFn | None = None
  diagnostics: bool | None = None
  fednest_neumann: str | None = None


# What every algorithm shares (the drivers' flag defaults); clients_per_round and granularity
# are resolved per algorithm in `_build`.
_SHARED = Options(
    levels="1/1:1", redraw_levels=False, mask_policy="random", allow_uncovered=False,
    local_steps=5, inner_steps=1, inner_lr=0.1, inner_step="cauchy", outer_lr=0.1,
    x_trust=0.0, x_trust_scope="layer", estimator="fd", num_steps=1,
    v_lr=0.1, delta=1e-3, radius=None, v_step="cauchy", product="exact", server_lr=1.0,
    aggregation="coverage", weighting="uniform", seed=0, sample=full_batch,
    flops_per_grad=federated.default_flops_per_grad, submodel="dense", fednest_neumann="code")


class _Spec(NamedTuple):
  """What defines an algorithm: its defaults and how its clients take part."""

  defaults: Options
  full_participation: bool = False  # clients_per_round defaults to num_clients
  full_model: bool = False  # every client runs the full model (levels ignored)
  only_full: bool = False  # only clients at level 1/1 take part
  round_kind: str = "local"  # federated.FederatedConfig.round_kind


_NEUMANN = _SHARED._replace(estimator="neumann", inner_steps=5, num_steps=5)
# FedNest's own hyperparameters (config A, bilevel/fednest.py): outer_tau 1, local_ep 5 epochs
# of SVRG steps (inner_steps), 5 Neumann products (6 terms), hlr = lr = 0.01 (v_lr = outer_lr).
_FEDNEST = _SHARED._replace(estimator="neumann", local_steps=1, inner_steps=5, num_steps=6,
                            inner_lr=0.01, outer_lr=0.01, v_lr=0.01)
_SPECS: dict[str, _Spec] = {
    "rabo": _Spec(_SHARED._replace(local_steps=1), full_participation=True),
    "rafbo": _Spec(_SHARED),
    "fednest": _Spec(_FEDNEST, full_model=True, round_kind="fednest"),
    "lfednest": _Spec(_NEUMANN, full_model=True),
    "simfbo": _Spec(_SHARED._replace(estimator="exact"), full_model=True),
    "memfbo": _Spec(_SHARED, full_model=True),
    "full_only": _Spec(_SHARED, only_full=True),
    "heterofl": _Spec(_SHARED._replace(mask_policy="static")),
    "fedrolex": _Spec(_SHARED._replace(mask_policy="rolling")),
}


def _strongly_typed(t: PyTree) -> PyTree:
  """Every leaf as an array of its dtype, weak types dropped (jnp.array(1.0) is weakly typed;
  the round returns strongly typed arrays, and a weak input would retrace the second step)."""
  return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.result_type(a)), t)


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """A configured federated bilevel algorithm: `init(x, y)` and a jitted `step(state, data)`.

  Attributes:
    name: the algorithm's name (a key of `names()`).
    config: the resolved federated.FederatedConfig.
    problem: the BilevelProblem (inner and outer losses).
    layout: the model's UnitLayout (None for element masks).
    optimizer: the server optimiser; `init` initialises its state, `step` applies it.
    options: every keyword, resolved (Options with no None left but optional ones).
  """

  name: str
  config: federated.FederatedConfig
  problem: BilevelProblem
  layout: UnitLayout | None
  optimizer: optax.GradientTransformation
  options: Options
  _rounds: dict[Any, federated.Round] = dataclasses.field(default_factory=dict, repr=False)

  def make_round(self, x_like: PyTree) -> federated.Round:
    """The federated.Round for parameters shaped like x_like (built once per shape, cached).

    Raises:
      ConfigError: make_round's checks that need x (e.g. static masks that leave outer
        coordinates uncovered forever).
    """
    key = tree.signature(x_like)  # the round is built once per signature
    if key not in self._rounds:
      o = self.options
      self._rounds[key] = build_round(
          self.problem, self.config, self.layout, x_like, sample=o.sample,
          optimizer=self.optimizer, flops_per_grad=o.flops_per_grad, cost=o.cost,
          available=o.available,
          submodel=o.submodel, sampling=o.sampling, mesh=o.mesh, mask_fn=o.mask_fn,
          diagnostics=bool(o.diagnostics), fednest_neumann=o.fednest_neumann)
    return self._rounds[key]

  def init(self, x: PyTree, y: PyTree) -> federated.ServerState:
    """The server state at (x, y) (v = 0, round 0); builds and validates the round for x.

    Leaves of x and y become arrays of their dtype with weak types dropped (Python scalars,
    jnp.array(1.0)), so that the state `step` returns has the types it was given and `step`
    compiles once.
    """
    x, y = _strongly_typed(x), _strongly_typed(y)
    self.make_round(x)
    return federated.init_state(x, y, self.optimizer)

  def step(self, state: federated.ServerState,
           data: federated.FederatedData) -> tuple[federated.ServerState, dict[str, jax.Array]]:
    """One round: (next state, metrics). Compiled on the first call, not retraced after.

    Args:
      state: from `init` (or an earlier `step`, or a restored checkpoint).
      data: client data stacked on a leading [num_clients] axis.

    Returns:
      The next state and the round's metrics (outer_loss, inner_loss, hypergrad_norm,
      coverage_x_min / _mean, coverage_y_min / _mean, uncovered shares, client_flops,
      comm_bytes, active_clients), each a scalar jax.Array.
    """
    return self.make_round(state.x).step(state, data)


def build_round(problem: BilevelProblem, config: federated.FederatedConfig,
                layout: UnitLayout | None, x_like: PyTree, *, fednest_neumann: str = "code",
                **kwargs: Any) -> federated.Round:
  """The round config.round_kind names: rounds.make_round ("local") or
  fednest.make_fednest_round ("fednest", its v given by fednest_neumann), with make_round's
  keywords (`kwargs`)."""
  if config.round_kind != "fednest":
    return rounds.make_round(problem, config, layout, x_like, **kwargs)
  return fednest_lib.make_fednest_round(problem, config, layout, x_like,
                                        neumann=fednest_neumann, **kwargs)


def names() -> tuple[str, ...]:
  """The names `get` accepts."""
  return tuple(_SPECS)


def own_options(name: str) -> tuple[str, ...]:
  """The options whose default `name` sets itself: those that differ from what every
  algorithm shares (e.g. fednest's step sizes, heterofl's mask_policy) and, for algorithms
  where every client takes part, clients_per_round. The drivers pass a flag left at its
  default only for options not listed here, so an algorithm's own default wins over it."""
  check_choice("algorithm", name, names())
  spec = _SPECS[name]
  own = [f for f in Options._fields if getattr(spec.defaults, f) != getattr(_SHARED, f)]
  if spec.full_participation:
    own.append("clients_per_round")
  return tuple(own)


def _levels(levels: str | Sequence[Any]) -> tuple[Level, ...]:
  if isinstance(levels, str):
    return masks_lib.parse_levels(levels)
  try:
    out = tuple(lv if isinstance(lv, Level) else Level(*map(float, lv)) for lv in levels)
  except (TypeError, ValueError):
    raise ConfigError(f"levels={levels!r} is neither a profile 'rx/ry:share,...' nor a sequence "
                      "of masks.Level(rx, ry, share).") from None
  masks_lib.validate_levels(out)
  return out


def _fednest_steps(o: Options, given: Mapping[str, Any]) -> None:
  """FedNest has one step hlr (its Neumann step, the scale of v and the client x step):
  outer_lr. A v_lr given apart from it is a ConfigError; otherwise v_lr follows outer_lr."""
  if "v_lr" in given and given["v_lr"] != o.outer_lr:
    raise ConfigError(
        f"fednest has one step hlr (FedNest's --hlr: the Neumann step, the scale of v and the "
        f"client x step), outer_lr={o.outer_lr!r}; v_lr={given['v_lr']!r} cannot differ from it "
        "(give outer_lr only).")
  check_choice("fednest_neumann", o.fednest_neumann, fednest_lib.NEUMANN_FORMS)


def _build(name: str, problem: BilevelProblem, num_clients: int,
           options: Mapping[str, Any]) -> Algorithm:
  """Resolve `options` over the algorithm's defaults into an Algorithm (validated)."""
  unknown = sorted(set(options) - set(Options._fields))
  if unknown:
    raise ConfigError(f"unknown keyword(s) {', '.join(unknown)} for algorithm {name!r}; allowed "
                      f"keywords: problem, num_clients, {', '.join(Options._fields)}.")
  if not isinstance(problem, BilevelProblem):
    raise ConfigError(f"problem={problem!r} must be a bilevel.BilevelProblem(inner, outer).")
  try:
    bad = isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1
  except (TypeError, ValueError):
    bad = True
  if bad:
    raise ConfigError(f"num_clients={num_clients!r} must be an integer >= 1.")
  num_clients = int(num_clients)
  spec = _SPECS[name]
  given = {k: v for k, v in options.items() if v is not None}
  if "server_optimizer" in given and "server_lr" in given:
    raise ConfigError("give server_optimizer or server_lr, not both: server_lr is the step of the "
                      "default server optimiser optax.sgd(server_lr).")
  o = spec.defaults._replace(**given)
  if spec.round_kind == "fednest":
    _fednest_steps(o, given)
    o = o._replace(v_lr=o.outer_lr)  # one hlr
  elif o.fednest_neumann != "code":
    raise ConfigError(f"fednest_neumann={o.fednest_neumann!r} is fednest's option only.")
  levels = _levels(o.levels)  # validated even where ignored
  if spec.full_model:
    levels = (FULL_LEVEL,)
  granularity = o.granularity
  if granularity is None:
    granularity = "element" if spec.full_model and o.layout is None else "unit"
  # An unknown granularity is reported by validate_config below (as mask_granularity, the
  # config field and the drivers' flag).
  if granularity == "unit" and o.layout is None:
    raise ConfigError(
        "granularity='unit' needs the model's unit layout: pass layout= (a masks.UnitLayout, "
        "e.g. bilevel.models.mlp_layout(hidden)), or use granularity='element'.")
  clients_per_round = o.clients_per_round
  if clients_per_round is None:
    clients_per_round = num_clients if spec.full_participation else max(1, num_clients // 2)
  o = o._replace(clients_per_round=clients_per_round, levels=levels, granularity=granularity)
  client = ClientConfig(
      local_steps=o.local_steps, inner_steps=o.inner_steps, inner_lr=o.inner_lr,
      outer_lr=o.outer_lr, estimator=o.estimator, inner_step=o.inner_step,
      x_trust=o.x_trust, x_trust_scope=o.x_trust_scope,
      estimator_options=EstimatorOptions(
          num_steps=o.num_steps, step_size=o.v_lr, delta=o.delta, radius=o.radius,
          product=o.product, v_step=o.v_step))
  config = federated.FederatedConfig(
      num_clients=num_clients, clients_per_round=clients_per_round, client=client,
      mask=MaskConfig(o.mask_policy, granularity), levels=levels,
      redraw_levels=o.redraw_levels, only_full=spec.only_full, aggregation=o.aggregation,
      weighting=o.weighting, server_lr=o.server_lr, allow_uncovered=o.allow_uncovered,
      seed=o.seed, round_kind=spec.round_kind)
  federated.validate_config(config, o.layout)
  if o.server_optimizer is not None and not isinstance(o.server_optimizer,
                                                       optax.GradientTransformation):
    raise ConfigError(f"server_optimizer={o.server_optimizer!r} must be an optax "
                      "GradientTransformation (e.g. optax.adam(1e-2)).")
  optimizer = o.server_optimizer or optax.sgd(o.server_lr)
  return Algorithm(name, config, problem, o.layout, optimizer, o)


# ------------------------------------------------------------------ one constructor per algorithm


def rabo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """RABO: one local step (K = 1) per round, every client in every round, pruned submodels.

  Defaults: local_steps 1, clients_per_round num_clients, estimator fd, mask_policy random,
  levels "1/1:1" (give a profile to prune). Other keywords: see `Options`.
  """
  return _build("rabo", problem, num_clients, options)


def rafbo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """RAFBO: K = 5 local steps per round, partial participation, pruned submodels.

  Defaults: local_steps 5, clients_per_round max(1, num_clients // 2), estimator fd,
  mask_policy random, levels "1/1:1" (give a profile to prune). Other keywords: see `Options`.
  """
  return _build("rafbo", problem, num_clients, options)


def lfednest(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """LFedNest-style baseline: local Neumann hypergradients on the full model.

  Each client runs K local steps of T = 5 inner steps and a 5-term Neumann hypergradient
  (exact products); the server averages once per round (no extra communication rounds for the
  inner problem or the hypergradient).

  Defaults: local_steps 5, inner_steps 5, estimator neumann, num_steps 5, clients_per_round
  max(1, num_clients // 2). Full model: `levels` is ignored (config.levels is 1/1:1); for Neumann
  hypergradients on pruned submodels use rafbo with estimator="neumann".
  """
  return _build("lfednest", problem, num_clients, options)


def fednest(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """FedNest (Tarzanagh et al., 2022): its communicating round (bilevel/fednest.py).

  Per round: FedInn (SVRG inner steps, 2 communication rounds), FedIHGP (the Neumann series
  averaged on the server after every term, 1 + N rounds), FedOut (hypergradient mean, then tau
  SVRG x steps and their mean, 2 rounds): one outer update of x. config.round_kind is
  "fednest". Defaults, FedNest's own hyperparameters (config A): local_steps 1 (outer_tau),
  inner_steps 5 (local_ep: epochs of SVRG steps over each client's train split in batches of
  the sampler's batch_size), num_steps 6 (Neumann terms: 5 products), outer_lr 0.01 (hlr:
  also the Neumann step, so v_lr follows it; a different v_lr is a ConfigError), inner_lr
  0.01 (lr), fednest_neumann "code" (v as FedNest's code computes it; "series": the intended
  series), clients_per_round max(1, num_clients // 2). Full model: `levels` is ignored;
  submodel "compact", weighting "examples" and estimators other than neumann are ConfigErrors.
  """
  return _build("fednest", problem, num_clients, options)


def simfbo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """SimFBO-style baseline: exact Hessian-vector products for v, full model.

  Defaults: local_steps 5, estimator exact, num_steps 1, clients_per_round
  max(1, num_clients // 2). Full model: `levels` is ignored (config.levels is 1/1:1); for the
  exact estimator on pruned submodels use rafbo with estimator="exact".
  """
  return _build("simfbo", problem, num_clients, options)


def memfbo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """MemFBO-style baseline: the fd (Hessian-free) estimator, full model.

  Defaults: local_steps 5, estimator fd, clients_per_round max(1, num_clients // 2). Full
  model: `levels` is ignored (config.levels is 1/1:1); rafbo is the same with pruning.
  """
  return _build("memfbo", problem, num_clients, options)


def full_only(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """Resource-unaware baseline: only clients at level 1/1 take part (the others sit out).

  Defaults as rafbo; config.only_full is True. The population that can be sampled is the
  clients assigned level 1/1 (with "1/1:0.5,0.5/0.5:0.5" half of them), so a round has
  min(clients_per_round, that many) clients. A profile without a 1/1 level is a ConfigError.
  """
  return _build("full_only", problem, num_clients, options)


def heterofl(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """HeteroFL-style baseline: static nested masks (each client always keeps the first units).

  Defaults as rafbo with mask_policy "static". Static masks never reach units that no client
  keeps, so the profile needs a level with r_x = 1 (else `init` raises ConfigError, unless
  allow_uncovered=True).
  """
  return _build("heterofl", problem, num_clients, options)


def fedrolex(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """FedRolex-style baseline: rolling masks (the kept window moves by one unit per round).

  Defaults as rafbo with mask_policy "rolling".
  """
  return _build("fedrolex", problem, num_clients, options)


_CONSTRUCTORS: dict[str, Callable[..., Algorithm]] = {
    "rabo": rabo, "rafbo": rafbo, "fednest": fednest, "lfednest": lfednest, "simfbo": simfbo,
    "memfbo": memfbo, "full_only": full_only, "heterofl": heterofl, "fedrolex": fedrolex}
assert tuple(_CONSTRUCTORS) == names()


def get(name: str, *, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """The algorithm `name` (see `names()`) configured by keywords over its own defaults.

  Args:
    name: one of names().
    problem: bilevel.BilevelProblem(inner_loss, outer_loss); each loss (x, y, batch) -> scalar.
    num_clients: population size M (the leading axis of the FederatedData passed to `step`).
    **options: any field of `Options` (clients_per_round, levels, granularity, seed, layout,
      sample, local_steps, inner_steps, inner_lr, outer_lr, estimator, num_steps, v_lr, delta,
      radius, v_step, mask_policy, server_optimizer, server_lr, aggregation, weighting,
      submodel, flops_per_grad, ...); None or absent = the algorithm's default.

  Returns:
    An Algorithm with init(x, y), step(state, data), config and name.

  Raises:
    ConfigError: an unknown name or keyword (naming the allowed ones) or a value outside its
      range (federated.validate_config).
  """
  check_choice("algorithm", name, names())
  return _CONSTRUCTORS[name](problem=problem, num_clients=num_clients, **options)
