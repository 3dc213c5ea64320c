"""What every algorithm shares: the keywords it takes and their defaults (`Options`, the one
configuration; `SHARED = Options()`), how an algorithm is defined (`Spec`: its defaults, its
round builder and how its clients take part) and the configured algorithm (`Algorithm`:
`init(x, y)` and a jitted `step(state, data)`), resolved and validated by `build`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import client as client_lib
from bilevel import costs, federated, hypergrad, server, tree
from bilevel import masks as masks_lib
from bilevel.client import Sampler, full_batch
from bilevel.errors import ConfigError, check_choice
from bilevel.inner import STEP_RULES as INNER_STEP_RULES
from bilevel.masks import Level, UnitLayout
from bilevel.problems import BilevelProblem

PyTree = Any
FULL_LEVEL = Level(1.0, 1.0, 1.0)
_FD = hypergrad.fd  # the estimators' defaults are defined with them


class Options(NamedTuple):
  """Every keyword an algorithm constructor takes, at the defaults every algorithm shares
  (SHARED; each algorithm's Spec replaces its own; a keyword given as None keeps the default).
  The one place each default is defined (an estimator's: its class in hypergrad).

  estimator: a hypergrad.Estimator value (hypergrad.fd(num_steps=3), exact, neumann, cg, or
  one's own), or a name of hypergrad.ESTIMATORS built from the flat options num_steps, v_lr
  (its step_size), delta, radius, v_step and product (those it has; hypergrad documents them).
  With an estimator value leave those unset: they then show the value's fields.
  """

  clients_per_round: int | None = None  # C (None: rabo num_clients, others num_clients // 2)
  # A profile "rx/ry:share,..." (masks.parse_levels) or a sequence of masks.Level (or (rx, ry,
  # share) triples). Ignored by full-model algorithms.
  levels: str | Sequence[Level] = (FULL_LEVEL,)
  redraw_levels: bool = False  # draw each client's level anew every round
  # "unit" (needs `layout`) or "element"; None: "unit", but "element" for full-model
  # algorithms without a layout (their masks keep everything either way).
  granularity: str | None = None
  layout: UnitLayout | None = None  # the model's units (e.g. bilevel.models.mlp_layout(hidden))
  mask_policy: str | masks_lib.Policy = "random"  # a masks.Policy or its name (masks.POLICIES)
  allow_uncovered: bool = False  # accept masks that never cover some outer coordinates
  local_steps: int = 5  # K per round
  inner_steps: int = 1  # T per local step
  inner_lr: float = 0.1  # beta
  # "cauchy" (step min(beta, g'g / g'Hg), one product per inner step) or "fixed" (beta);
  # inner.inner_solve. FedNest's round ignores it.
  inner_step: str = "cauchy"
  outer_lr: float = 0.1  # alpha
  # Trust region on each client's x delta relative to its submodel's ||x|| (0 = off), per
  # "layer" or whole "model" (client.trust_region).
  x_trust: float = 0.0
  x_trust_scope: str = "layer"
  x_trust_on: str = "delta"  # on the returned delta, or on each local "step" (client.TRUST_ON)
  estimator: str | hypergrad.Estimator = "fd"
  num_steps: int = _FD.num_steps
  v_lr: float = _FD.step_size
  delta: float = _FD.delta
  radius: float | None = _FD.radius
  v_step: str = _FD.v_step
  product: str = hypergrad.cg.product
  # The optax transformation the server steps x with; None: optax.sgd(server_lr). Give
  # server_optimizer or server_lr, not both.
  server_optimizer: optax.GradientTransformation | None = None
  server_lr: float = 1.0
  aggregation: str | server.Aggregator = "coverage"  # a server.Aggregator or its name
  weighting: str = "uniform"  # or "examples" (w_i = the client's example count)
  seed: int = 0  # the one seed every random stream derives from
  sample: Sampler = full_batch  # the client batch sampler (client.Sampler)
  # The FLOP model a client's round is priced with: costs.CostModel (the model's op prices and
  # batch rows; the drivers give one) or None: costs.PerGradient() (6 FLOPs per kept entry).
  cost: costs.CostModel | costs.PerGradient | None = None
  submodel: str = "dense"  # or "compact" (rafbo.make_round)
  sampling: str | None = None  # "uniform" or "stratified" (None: make_round's choice)
  available: Mapping[str, np.ndarray] | None = None  # group -> [M, K] units a client owns
  mesh: jax.sharding.Mesh | None = None  # shards a round's clients (sharding.client_mesh)
  # `(state, client_id, slot, round, rx, ry, key) -> (mask_x, mask_y)` in place of the mask
  # policy (federated.MaskFn; dense submodels only; e.g. hyper-cleaning's owned rolling window).
  mask_fn: federated.MaskFn | None = None
  # True: the round's aggregated estimate and coverage counts join its metrics (loop.run's
  # diagnose_fn).
  diagnostics: bool | None = None
  # fednest's v: "code" (its code's closed form) or "series" (fednest.NEUMANN_FORMS).
  fednest_neumann: str = "code"


# The defaults every algorithm starts from (each algorithm's Spec replaces its own).
SHARED = Options()


class Spec(NamedTuple):
  """What defines an algorithm: its defaults, its round and how its clients take part.

  make_round(problem, x_like, **keywords) -> federated.Round: the round builder
  (rafbo.make_round or fednest.make_fednest_round); it declares the options it reads as
  keyword parameters and gets those (num_clients, only_full, optimizer and the estimator
  value among them).
  """

  defaults: Options
  make_round: Callable[..., federated.Round]
  full_participation: bool = False  # clients_per_round defaults to num_clients
  full_model: bool = False  # every client runs the full model (levels ignored)
  only_full: bool = False  # only clients at level 1/1 take part
  round_kind: str = "local"  # "local" (rafbo.make_round) or "fednest" (FedNest's round)
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
      algorithm's configuration.
    optimizer: the server optimiser; `init` initialises its state, `step` applies it.
    estimator: the hypergrad.Estimator value its clients run (options.estimator, or the one
      it names, built from the options).
  """

  name: str
  spec: Spec
  problem: BilevelProblem
  num_clients: int
  options: Options
  optimizer: optax.GradientTransformation
  estimator: hypergrad.Estimator
  _rounds: dict[Any, federated.Round] = dataclasses.field(default_factory=dict, repr=False)

  def make_round(self, x_like: PyTree, **extra: Any) -> federated.Round:
    """The federated.Round for parameters shaped like x_like (built once per shape and cached;
    `extra`: further keywords of the round builder, e.g. jit=False, not cached). ConfigError:
    make_round's checks that need x (e.g. static masks that never cover some units)."""
    key = tree.signature(x_like)  # the round is built once per signature
    if extra or key not in self._rounds:
      given = dict(self.options._asdict(), num_clients=self.num_clients,
                   only_full=self.spec.only_full, optimizer=self.optimizer,
                   estimator=self.estimator, **extra)
      takes = _round_keywords(self.spec)
      rnd = self.spec.make_round(self.problem, x_like,
                                 **{k: v for k, v in given.items() if k in takes})
      if extra:
        return rnd
      self._rounds[key] = rnd
    return self._rounds[key]

  def init(self, x: PyTree, y: PyTree) -> federated.ServerState:
    """The server state at (x, y) (v = 0, round 0); builds and validates the round for x.
    Weak types are dropped (_strongly_typed), so that `step` compiles once."""
    x, y = _strongly_typed(x), _strongly_typed(y)
    self.make_round(x)
    return federated.init_state(x, y, self.optimizer)

  def step(self, state: federated.ServerState,
           data: federated.FederatedData) -> tuple[federated.ServerState, dict[str, jax.Array]]:
    """One round on client data stacked on [num_clients]: (next state, the round's scalar
    metrics; WORKSPACE.md, Results schema). Compiled on the first call, not retraced after."""
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


def _round_keywords(spec: Spec) -> set[str]:
  """The keywords spec.make_round declares: the options its round reads."""
  return set(inspect.signature(spec.make_round).parameters)


# Options build itself reads for every algorithm (levels: validated, and ignored by full-model
# algorithms, so that every algorithm takes the same call).
_BUILD_OPTIONS = ("levels", "server_optimizer", "server_lr")
# A named estimator's options (flat, as the drivers' flags) -> its fields (hypergrad.named).
ESTIMATOR_FIELDS = dict(num_steps="num_steps", v_lr="step_size", delta="delta", radius="radius",
                        v_step="v_step", product="product")


def _resolve(spec: Spec, num_clients: int, given: Mapping[str, Any]) -> Options:
  """The options `given` over spec's defaults, with the algorithm's rules (spec.resolve), the
  levels parsed (one full level for full-model algorithms), granularity and clients_per_round
  resolved."""
  o = spec.defaults._replace(**given)
  if not isinstance(o.estimator, str):  # a value: the flat options show its fields
    if set(given) & set(ESTIMATOR_FIELDS):
      raise ConfigError(f"give {', '.join(sorted(set(given) & set(ESTIMATOR_FIELDS)))} to the "
                        f"estimator value {o.estimator!r}, not to the algorithm.")
    o = o._replace(**{k: getattr(o.estimator, f) for k, f in ESTIMATOR_FIELDS.items()
                      if hasattr(o.estimator, f)})
  if spec.resolve is not None:
    o = spec.resolve(o, given)
  levels = _levels(o.levels)  # validated even where ignored
  if spec.full_model:
    levels = (FULL_LEVEL,)
  granularity = o.granularity
  if granularity is None:
    granularity = "element" if spec.full_model and o.layout is None else "unit"
  clients_per_round = o.clients_per_round
  if clients_per_round is None:
    clients_per_round = num_clients if spec.full_participation else max(1, num_clients // 2)
  return o._replace(clients_per_round=clients_per_round, levels=levels, granularity=granularity)


def build(name: str, spec: Spec, problem: BilevelProblem, num_clients: int,
          options: Mapping[str, Any]) -> Algorithm:
  """Resolve `options` over the defaults of `spec` into the Algorithm `name` (validated).

  An option the algorithm's round does not read (not a keyword of spec.make_round, nor one
  build reads) is a ConfigError unless giving it changes nothing (its default, e.g. a driver's
  flag left at the shared default).
  """
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
  o = _resolve(spec, num_clients, given)
  reads = _round_keywords(spec).union(_BUILD_OPTIONS)
  if "estimator" in reads:
    reads |= set(ESTIMATOR_FIELDS)
  for k in sorted(set(given) - reads):
    without = _resolve(spec, num_clients, {j: v for j, v in given.items() if j != k})
    if getattr(o, k) != getattr(without, k):
      raise ConfigError(f"algorithm {name!r} does not use option {k}={given[k]!r}; leave it "
                        f"unset (its default: {getattr(without, k)!r}).")
  # An unknown granularity is reported by masks.validate_masks below (as mask_granularity, the
  # drivers' flag).
  if o.granularity == "unit" and o.layout is None:
    raise ConfigError(
        "granularity='unit' needs the model's unit layout: pass layout= (a masks.UnitLayout, "
        "e.g. bilevel.models.mlp_layout(hidden)), or use granularity='element'.")
  # Every range and name check, with the value and the allowed range.
  if not 1 <= o.clients_per_round <= num_clients:
    raise ConfigError(f"clients_per_round={o.clients_per_round!r} is outside the allowed range "
                      f"[1, num_clients={num_clients}].")
  for field, low in (("local_steps", 1), ("inner_steps", 0)):
    value = getattr(o, field)
    if int(value) != value or value < low:
      raise ConfigError(f"{field}={value!r} must be an integer >= {low}.")
  for field in ("inner_lr", "outer_lr"):
    if not getattr(o, field) > 0:
      raise ConfigError(f"{field}={getattr(o, field)!r} is outside the allowed range (0, inf).")
  check_choice("inner_step", o.inner_step, INNER_STEP_RULES)
  if not o.x_trust >= 0:
    raise ConfigError(f"x_trust={o.x_trust!r} is outside the allowed range [0, inf) (0 = off).")
  check_choice("x_trust_scope", o.x_trust_scope, client_lib.TRUST_SCOPES)
  check_choice("x_trust_on", o.x_trust_on, client_lib.TRUST_ON)
  estimator = o.estimator
  if isinstance(estimator, str):
    estimator = hypergrad.named(estimator, **{f: getattr(o, k)
                                              for k, f in ESTIMATOR_FIELDS.items()})
  elif not (callable(estimator) and hasattr(estimator, "products")):
    raise ConfigError(f"estimator={estimator!r} is neither a name of hypergrad.ESTIMATORS nor "
                      "a hypergrad.Estimator value (e.g. hypergrad.fd(num_steps=3)).")
  masks_lib.validate_masks(o.layout, policy=o.mask_policy, granularity=o.granularity)
  if not callable(o.aggregation):
    check_choice("aggregation", o.aggregation, server.AGGREGATORS)
  check_choice("weighting", o.weighting, ("uniform", "examples"))
  if not o.server_lr > 0:
    raise ConfigError(f"server_lr={o.server_lr!r} is outside the allowed range (0, inf).")
  if spec.only_full and not any(lv.rx == 1 and lv.ry == 1 for lv in o.levels):
    raise ConfigError("only_full=True but no resource level is 1/1: no client could take part.")
  if o.server_optimizer is not None and not isinstance(o.server_optimizer,
                                                       optax.GradientTransformation):
    raise ConfigError(f"server_optimizer={o.server_optimizer!r} must be an optax "
                      "GradientTransformation (e.g. optax.adam(1e-2)).")
  optimizer = o.server_optimizer or optax.sgd(o.server_lr)
  return Algorithm(name, spec, problem, num_clients, o, optimizer, estimator)
