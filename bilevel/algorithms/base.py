"""What every algorithm shares: the keywords it takes (`Options`), the defaults they share
(`SHARED`), how an algorithm is defined (`Spec`: its defaults, its round builder and how its
clients take part) and the configured algorithm (`Algorithm`: `init(x, y)` and a jitted
`step(state, data)`), resolved and validated by `build`. The algorithms themselves:
rafbo.py (rabo, rafbo), fednest.py, baselines.py; the registry: bilevel.algorithms.get.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs, federated, tree
from bilevel import masks as masks_lib
from bilevel.client import Sampler, full_batch
from bilevel.errors import ConfigError
from bilevel.masks import Level, UnitLayout
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
    submodel: "dense" (default) or "compact" (rafbo.make_round).
    sampling: "uniform" or "stratified" (default: make_round's choice for the submodel).
    available: group -> [M, K] units each client owns (rafbo.make_round).
    mesh: jax.sharding.Mesh to shard the clients of a round over (sharding.client_mesh).
    mask_fn: `(state, client_id, slot, round, rx, ry, key) -> (mask_x, mask_y)` replacing the
      mask policy (federated.MaskFn; dense submodels only; e.g. hyper-cleaning's rolling
      window over each client's own samples). Default None: the policy's masks.
    diagnostics: True adds the round's aggregated estimate and coverage counts to its metrics
      for loop.run's diagnose_fn (rafbo.make_round). Default None: off.
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


# Option -> where it lives in the federated.FederatedConfig an algorithm resolves to. The
# configuration types' field defaults (federated.FederatedConfig, client.ClientConfig,
# hypergrad.EstimatorOptions, masks.MaskConfig) are the library's defaults, defined there once.
CONFIG_PATHS: dict[str, tuple[str, ...]] = {
    "clients_per_round": ("clients_per_round",), "levels": ("levels",),
    "redraw_levels": ("redraw_levels",), "granularity": ("mask", "granularity"),
    "mask_policy": ("mask", "policy"), "allow_uncovered": ("allow_uncovered",),
    "local_steps": ("client", "local_steps"), "inner_steps": ("client", "inner_steps"),
    "inner_lr": ("client", "inner_lr"), "inner_step": ("client", "inner_step"),
    "outer_lr": ("client", "outer_lr"), "x_trust": ("client", "x_trust"),
    "x_trust_scope": ("client", "x_trust_scope"), "estimator": ("client", "estimator"),
    **{k: ("client", "estimator_options", f) for k, f in (
        ("num_steps", "num_steps"), ("v_lr", "step_size"), ("delta", "delta"),
        ("radius", "radius"), ("v_step", "v_step"), ("product", "product"))},
    "server_lr": ("server_lr",), "aggregation": ("aggregation",), "weighting": ("weighting",),
    "seed": ("seed",)}
RESOLVED = ("clients_per_round", "granularity")  # per algorithm and call, in `build`


def _get(t: Any, path: Sequence[str]) -> Any:
  for name in path:
    t = getattr(t, name)
  return t


def _set(t: Any, path: Sequence[str], value: Any) -> Any:
  head = path[0]
  return t._replace(**{head: value if len(path) == 1 else _set(getattr(t, head), path[1:], value)})


# What every algorithm shares: the configuration types' defaults, and the defaults of the
# round's keywords (rafbo.make_round and fednest.make_fednest_round take theirs from here).
_DEFAULT_CONFIG = federated.FederatedConfig(num_clients=1, clients_per_round=1)
SHARED = Options(
    **{k: _get(_DEFAULT_CONFIG, p) for k, p in CONFIG_PATHS.items() if k not in RESOLVED},
    sample=full_batch, flops_per_grad=federated.default_flops_per_grad, submodel="dense",
    fednest_neumann="code")


class Spec(NamedTuple):
  """What defines an algorithm: its defaults, its round and how its clients take part.

  make_round(problem, config, layout, x_like, **keywords) -> federated.Round: the round
  builder (rafbo.make_round, or fednest.make_fednest_round, which also takes `neumann`).
  """

  defaults: Options
  make_round: Callable[..., federated.Round]
  full_participation: bool = False  # clients_per_round defaults to num_clients
  full_model: bool = False  # every client runs the full model (levels ignored)
  only_full: bool = False  # only clients at level 1/1 take part
  round_kind: str = "local"  # federated.FederatedConfig.round_kind
  # (options, the keywords given) -> options: the algorithm's own rules over them (fednest:
  # one step size); raises ConfigError.
  resolve: Callable[[Options, Mapping[str, Any]], Options] | None = None


def _strongly_typed(t: PyTree) -> PyTree:
  """Every leaf as an array of its dtype, weak types dropped (jnp.array(1.0) is weakly typed;
  the round returns strongly typed arrays, and a weak input would retrace the second step)."""
  return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.result_type(a)), t)


@dataclasses.dataclass(frozen=True, eq=False)
class Algorithm:
  """A configured federated bilevel algorithm: `init(x, y)` and a jitted `step(state, data)`.

  Attributes:
    name: the algorithm's name (a key of bilevel.algorithms.names()).
    spec: what defines it (its defaults and round builder).
    problem: the BilevelProblem (inner and outer losses).
    num_clients: the population size M.
    options: every keyword, resolved (Options with no None left but optional ones): the
      algorithm's configuration. `config` is the same, as the round builders' structured view.
    optimizer: the server optimiser; `init` initialises its state, `step` applies it.
  """

  name: str
  spec: Spec
  problem: BilevelProblem
  num_clients: int
  options: Options
  optimizer: optax.GradientTransformation
  _rounds: dict[Any, federated.Round] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def config(self) -> federated.FederatedConfig:
    """The resolved federated.FederatedConfig: `options` placed at CONFIG_PATHS."""
    return _config(self.spec, self.num_clients, self.options)

  @property
  def layout(self) -> UnitLayout | None:
    """The model's UnitLayout (None for element masks)."""
    return self.options.layout

  def make_round(self, x_like: PyTree) -> federated.Round:
    """The federated.Round for parameters shaped like x_like (built once per shape, cached).

    Raises:
      ConfigError: make_round's checks that need x (e.g. static masks that leave outer
        coordinates uncovered forever).
    """
    key = tree.signature(x_like)  # the round is built once per signature
    if key not in self._rounds:
      o = self.options
      own = dict(neumann=o.fednest_neumann) if self.spec.round_kind == "fednest" else {}
      self._rounds[key] = self.spec.make_round(
          self.problem, self.config, self.layout, x_like, sample=o.sample,
          optimizer=self.optimizer, flops_per_grad=o.flops_per_grad, cost=o.cost,
          available=o.available,
          submodel=o.submodel, sampling=o.sampling, mesh=o.mesh, mask_fn=o.mask_fn,
          diagnostics=bool(o.diagnostics), **own)
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


def build(name: str, spec: Spec, problem: BilevelProblem, num_clients: int,
          options: Mapping[str, Any]) -> Algorithm:
  """Resolve `options` over the defaults of `spec` into the Algorithm `name` (validated)."""
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
  given = {k: v for k, v in options.items() if v is not None}
  if "server_optimizer" in given and "server_lr" in given:
    raise ConfigError("give server_optimizer or server_lr, not both: server_lr is the step of the "
                      "default server optimiser optax.sgd(server_lr).")
  o = spec.defaults._replace(**given)
  if spec.resolve is not None:
    o = spec.resolve(o, given)
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
  federated.validate_config(_config(spec, num_clients, o), o.layout)
  if o.server_optimizer is not None and not isinstance(o.server_optimizer,
                                                       optax.GradientTransformation):
    raise ConfigError(f"server_optimizer={o.server_optimizer!r} must be an optax "
                      "GradientTransformation (e.g. optax.adam(1e-2)).")
  optimizer = o.server_optimizer or optax.sgd(o.server_lr)
  return Algorithm(name, spec, problem, num_clients, o, optimizer)


def _config(spec: Spec, num_clients: int, o: Options) -> federated.FederatedConfig:
  """The FederatedConfig of resolved options `o` (CONFIG_PATHS) for `spec`."""
  config = federated.FederatedConfig(num_clients=num_clients, clients_per_round=0,
                                     only_full=spec.only_full, round_kind=spec.round_kind)
  for k, path in CONFIG_PATHS.items():
    config = _set(config, path, getattr(o, k))
  return config
