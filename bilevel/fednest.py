"""FedNest (Tarzanagh et al., ICML 2022): FedInn, FedIHGP and FedOut in one jitted round.

The algorithm of the authors' code (github.com/ucr-optml/FedNest, main_hr.py with
--optim svrg --hvp_method global_batch), full model, one round = one outer update of x.
C clients per phase; T = inner_steps (FedNest's local epochs), N = num_steps - 1 Neumann
products (FedNest's --neumann; the series has N + 1 terms, as the library's neumann estimator
with num_steps terms), tau = local_steps (FedNest's outer_tau); beta = inner_lr, eta = v_lr
(Neumann step), alpha = outer_lr. Every server mean is a plain mean over the phase's clients.

FedInn (clients S_in, 2 communication rounds):
    1. client i: s_i = grad_y g_i(x, y0) on its whole train split;      server: s = mean s_i
    2. client i: T SVRG steps from y0 on batches B_t (both gradients on the same batch):
         y <- y - beta (grad_y g_i(x, y; B_t) - grad_y g_i(x, y0; B_t) + s)
       server: y+ = mean y_i
FedIHGP (clients S_out, drawn independently of S_in; 1 + N communication rounds):
    3. client i: grad_y f_i(x, y+) (validation split);                  server: c_0 = p = mean
    4. n = 1..N: client i: H_i c_{n-1}, H_i = hess_yy g_i(x, y+) on its train split;
       server: c_n = c_{n-1} - eta mean_i H_i c_{n-1},  p <- p + c_n
       v = eta p = eta sum_{n=0..N} (I - eta H)^n grad_y f   (H and grad_y f: client means)
FedOut (same clients, 2 communication rounds):
    5. client i: h_i = grad_x f_i(x, y+) - J_i v, J_i v = d/dy[grad_x g_i](x, y+) v;
       server: h = mean h_i (the hypergradient estimate)
    6. client i: tau steps x_i <- x_i - alpha (grad_x f_i(x_i, y+) - grad_x f_i(x, y+) + h)
       from x_i = x; server: x <- x + server step of mean (x_i - x)  (SGD(1): x - alpha h at tau 1)

Per round (analytic metrics, equal to the counted calls in tests/fednest_test.py):
    first-order passes  C (1 + 2T)  in FedInn,  C (3 + [N > 0] + 2 tau)  in FedOut
    Hessian-vector products C N,  cross (Jacobian-vector) products C,
    communication rounds 2 + (1 + N) + 2,  messages 2 C x communication rounds (down + up).
At FedNest's config A (C = 10, T = 5, N = 5, tau = 1): 110, 60, 50, 10 and 10 rounds.

The FedOut passes mirror the paper's code: grad_y f (a), the linearisation of grad_y g that
the N products replay (b; skipped when N = 0), a second linearisation for the cross product
(c), grad_x f (d), and two grad_x f per SVRG x step. Products are reverse-over-reverse
(jax.vjp of the gradient, replayed N times, as torch's double backward on a retained graph);
the library's forward-over-reverse PRODUCTS["exact"] would recompute the gradient per product.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs, federated, server, tree
from bilevel import sampling as sampling_lib
from bilevel.client import Sampler, full_batch, population_sampler
from bilevel.errors import ConfigError
from bilevel.hypergrad import PRODUCT_GRAD_EVALS
from bilevel.masks import UnitLayout, coverage_stats_from_counts, unit_kept_counts
from bilevel.problems import BilevelProblem

PyTree = Any


class Oracle(NamedTuple):
  """The derivative calls a FedNest client makes; each is one counted operation.

  grad_g(x, y, b) -> grad_y g                       one first-order pass of g
  grad_f_y(x, y, b) -> (f, grad_y f)                one first-order pass of f
  grad_f_x(x, y, b) -> grad_x f                     one first-order pass of f
  hvp_point(x, y, b) -> P                           one first-order pass of g, kept for products
  hvp(P, p) -> H p,  H = hess_yy g at P's point     one Hessian-vector product (no new pass)
  cross_point(x, y, b) -> (g, Q)                    one first-order pass of g, kept for products
  cross(Q, p) -> J p,  J = d/dy grad_x g            one cross product (no new pass)
  P and Q are pytrees (jax.vjp pullbacks), so they stack over clients and cross jit.
  """

  grad_g: Callable[..., PyTree]
  grad_f_y: Callable[..., tuple[jax.Array, PyTree]]
  grad_f_x: Callable[..., PyTree]
  hvp_point: Callable[..., Any]
  hvp: Callable[[Any, PyTree], PyTree]
  cross_point: Callable[..., tuple[jax.Array, Any]]
  cross: Callable[[Any, PyTree], PyTree]


def make_oracle(problem: BilevelProblem) -> Oracle:
  """The Oracle of `problem` (reverse-over-reverse products: H p = d/dy <grad_y g, p>)."""
  g, f = problem.inner_loss, problem.outer_loss

  def hvp_point(x, y, b):
    return jax.vjp(lambda yy: jax.grad(g, argnums=1)(x, yy, b), y)[1]

  def cross_point(x, y, b):
    # grad_y g as a function of x: its pullback along p is (d/dx grad_y g)' p = J p.
    def gy_of_x(xx):
      value, gy = jax.value_and_grad(g, argnums=1)(xx, y, b)
      return gy, value

    _, pull, value = jax.vjp(gy_of_x, x, has_aux=True)
    return value, pull

  return Oracle(
      grad_g=lambda x, y, b: jax.grad(g, argnums=1)(x, y, b),
      grad_f_y=lambda x, y, b: jax.value_and_grad(f, argnums=1)(x, y, b),
      grad_f_x=lambda x, y, b: jax.grad(f, argnums=0)(x, y, b),
      hvp_point=hvp_point, hvp=lambda point, p: point(p)[0],
      cross_point=cross_point, cross=lambda point, p: point(p)[0])


# Metrics FedNest's round reports besides the local round's keys (per round, all clients).
COUNT_METRICS = ("messages", "first_order_passes", "first_order_passes_inner",
                 "first_order_passes_outer", "hvp_products", "cross_products",
                 "communication_rounds")


class Counts(NamedTuple):
  """Operations of one round (all sampled clients together)."""

  first_order_inner: int  # first-order passes in FedInn
  first_order_outer: int  # first-order passes in FedIHGP + FedOut
  hvp_products: int
  cross_products: int
  communication_rounds: int
  messages: int  # one per client, direction and communication round


def round_counts(cfg: federated.FederatedConfig, num_sampled: int) -> Counts:
  """Analytic per-round counts (module docstring); num_sampled = C."""
  c, t, tau = num_sampled, cfg.client.inner_steps, cfg.client.local_steps
  n = neumann_products(cfg)
  rounds = 2 + (1 + n) + 2
  return Counts(c * (1 + 2 * t), c * (3 + (n > 0) + 2 * tau), c * n, c, rounds, 2 * c * rounds)


def neumann_products(cfg: federated.FederatedConfig) -> int:
  """N = num_steps - 1: the series has num_steps terms (hypergrad.neumann_estimator's count)."""
  return max(cfg.client.estimator_options.num_steps - 1, 0)


def comm_floats(nx: int, ny: int, n: int) -> int:
  """Floats one FedInn client and one FedOut client send and receive in a round.

  FedInn: model down + s_i up, s down + y_i up.  FedOut: model down + grad_y f_i up,
  N x (c down + H_i c up), v down + h_i up, h down + x_i - x up.
  """
  return (nx + ny + ny) + (ny + ny) + (nx + ny + ny) + n * 2 * ny + (ny + nx) + 2 * nx


def validate(cfg: federated.FederatedConfig, *, submodel: str, mask_fn: Any, mesh: Any) -> None:
  """FedNest runs the full model with uniform weights and exact Neumann products only."""
  problems = []
  if any(lv.rx != 1 or lv.ry != 1 for lv in cfg.levels):
    problems.append("pruning levels " + ",".join(f"{lv.rx:g}/{lv.ry:g}" for lv in cfg.levels)
                    + " (needs the single level 1/1)")
  for name, bad in (("submodel='compact'", submodel == "compact"),
                    ("a mask_fn", mask_fn is not None), ("a device mesh", mesh is not None),
                    (f"weighting={cfg.weighting!r} (needs 'uniform')", cfg.weighting != "uniform"),
                    (f"estimator={cfg.client.estimator!r} (needs 'neumann')",
                     cfg.client.estimator != "neumann"),
                    (f"product={cfg.client.estimator_options.product!r} (needs 'exact')",
                     cfg.client.estimator_options.product != "exact")):
    if bad:
      problems.append(name)
  if problems:
    raise ConfigError("round_kind='fednest' (FedNest's communicating round, full model) cannot "
                      "run with " + "; ".join(problems) + "; use --algorithm=lfednest or a "
                      "pruning algorithm for these.")


# cmap(fn, stack=True) -> fn mapped over a leading client axis of every argument. stack=False
# marks values a mapper may keep per client instead of stacking them (the products' points:
# pullbacks of different traces do not stack); vmap stacks them anyway.
ClientMap = Callable[..., Callable[..., Any]]


def vmap_clients(fn: Callable[..., Any], stack: bool = True) -> Callable[..., Any]:
  """The ClientMap of the round: one jax.vmap over the phase's clients. (tests/fednest_test.py
  passes a Python-loop ClientMap to count the oracle's calls per client.)"""
  del stack
  return jax.vmap(fn)


def _mean(t_C: PyTree) -> PyTree:
  """The server's plain mean over the client axis."""
  return jax.tree.map(lambda a: jnp.mean(a, axis=0), t_C)


def fed_inn(oracle: Oracle, cfg: federated.FederatedConfig, x: PyTree, y0: PyTree,
            data: federated.FederatedData, ids: jax.Array, keys: jax.Array, sample: Sampler,
            cmap: Callable) -> PyTree:
  """FedInn with SVRG (steps 1-2 of the module docstring); returns y+ = mean_i y_i.

  s = mean_i grad_y g_i(x, y0) (whole train split; communication round 1), then per client
  T steps y <- y - beta (grad_y g_i(x, y; B_t) - grad_y g_i(x, y0; B_t) + s) on batches
  B_t = sample(...) (communication round 2: the server averages the y_i).
  """
  whole = lambda cid: population_sampler(full_batch, cid)(data.inner, None)
  s = _mean(cmap(lambda cid: oracle.grad_g(x, y0, whole(cid)))(ids))
  beta = cfg.client.inner_lr

  def client(cid, key):
    draw = population_sampler(sample, cid)

    def step(y, t):
      batch = draw(data.inner, jax.random.fold_in(key, t))
      d = tree.add(tree.sub(oracle.grad_g(x, y, batch), oracle.grad_g(x, y0, batch)), s)
      return tree.axpy(-beta, d, y), None

    return jax.lax.scan(step, y0, jnp.arange(cfg.client.inner_steps))[0]

  return _mean(cmap(client)(ids, keys))


def fed_ihgp(oracle: Oracle, cfg: federated.FederatedConfig, x: PyTree, y: PyTree,
             data: federated.FederatedData, ids: jax.Array, cmap: Callable):
  """FedIHGP (steps 3-4): v = eta sum_{n=0..N} c_n, c_0 = mean_i grad_y f_i,
  c_n = c_{n-1} - eta mean_i H_i c_{n-1}: the server averages after every term.

  Returns (v, mean_i f_i(x, y)). 1 + N communication rounds.
  """
  eta, n = cfg.client.estimator_options.step_size, neumann_products(cfg)
  outer = lambda cid: population_sampler(full_batch, cid)(data.outer, None)
  inner = lambda cid: population_sampler(full_batch, cid)(data.inner, None)
  f_i, gyf_i = cmap(lambda cid: oracle.grad_f_y(x, y, outer(cid)))(ids)
  c0 = _mean(gyf_i)
  if n == 0:
    return tree.scale(eta, c0), jnp.mean(f_i)
  points = cmap(lambda cid: oracle.hvp_point(x, y, inner(cid)), stack=False)(ids)

  def term(carry, _):
    c, p = carry
    hc = _mean(cmap(lambda pt: oracle.hvp(pt, c))(points))  # one communication round
    c = tree.axpy(-eta, hc, c)
    return (c, tree.add(p, c)), None

  (_, p), _ = jax.lax.scan(term, (c0, c0), None, length=n)
  return tree.scale(eta, p), jnp.mean(f_i)


def fed_out(oracle: Oracle, cfg: federated.FederatedConfig, x: PyTree, y: PyTree, v: PyTree,
            data: federated.FederatedData, ids: jax.Array, cmap: Callable):
  """FedOut (steps 5-6): h = mean_i (grad_x f_i - J_i v) (communication round 1), then tau
  SVRG steps x_i <- x_i - alpha (grad_x f_i(x_i) - grad_x f_i(x) + h) per client and the mean
  of x_i - x (communication round 2). Returns (mean delta, h, mean_i g_i(x, y))."""
  outer = lambda cid: population_sampler(full_batch, cid)(data.outer, None)
  inner = lambda cid: population_sampler(full_batch, cid)(data.inner, None)

  def hypergrad(cid):
    g_val, point = oracle.cross_point(x, y, inner(cid))
    return tree.sub(oracle.grad_f_x(x, y, outer(cid)), oracle.cross(point, v)), g_val

  h_i, g_i = cmap(hypergrad)(ids)
  h = _mean(h_i)
  alpha = cfg.client.outer_lr

  def client(cid):
    def step(xi, _):
      d = tree.add(tree.sub(oracle.grad_f_x(xi, y, outer(cid)),
                            oracle.grad_f_x(x, y, outer(cid))), h)
      return tree.axpy(-alpha, d, xi), None

    xi = jax.lax.scan(step, x, None, length=cfg.client.local_steps)[0]
    return tree.sub(xi, x)

  return _mean(cmap(client)(ids)), h, jnp.mean(g_i)


def _grad_evals(counts: Counts) -> tuple[int, int]:
  """Gradient evaluations in FedInn and in FedIHGP + FedOut (a product counts as
  PRODUCT_GRAD_EVALS["exact"] gradients, as in the local round's FLOPs)."""
  per = PRODUCT_GRAD_EVALS["exact"]
  return (counts.first_order_inner,
          counts.first_order_outer + per * (counts.hvp_products + counts.cross_products))


def _op_prices(cfg: federated.FederatedConfig, cost: costs.CostModel, kept_x: PyTree,
               kept_y: PyTree) -> tuple[jax.Array, jax.Array]:
  """(FLOPs of a FedInn client, of a FedIHGP + FedOut client) with the per-operation model: a
  FedInn pass is x's forward and a gradient in y (inner batch); a FedOut pass x's forward and a
  gradient in x and y (outer batch); products are exact (hv) and cross (jv) products on the
  inner batch. Every pass is priced on the rows cost.rows gives (a minibatch, or the client's
  split), also FedNest's full-split snapshot and FedOut passes when minibatches are used."""
  counts = round_counts(cfg, 1)
  prices = costs.op_prices(cost.model, "exact", kept_x, kept_y)
  rows = dict(zip((costs.INNER, costs.OUTER), cost.rows(kept_x)))
  op = lambda kind, batch: prices[kind] * rows[batch]
  inner = counts.first_order_inner * (op("forward_x", costs.INNER) + op("grad_y", costs.INNER))
  outer = (counts.first_order_outer * (op("forward_x", costs.OUTER) + op("grad_xy", costs.OUTER))
           + counts.hvp_products * op("hv", costs.INNER)
           + counts.cross_products * op("jv", costs.INNER))
  return inner, outer


def client_flops(cfg: federated.FederatedConfig, layout: UnitLayout | None, state, data,
                 s_in: jax.Array, s_out: jax.Array, flops_per_grad,
                 cost: costs.CostModel | None = None) -> jax.Array:
  """Analytic client FLOPs of one round: gradient evaluations x flops_per_grad(held_x, held_y),
  or with `cost` the per-operation model (_op_prices).

  Without owned units (data.available None, e.g. hyper-representation) every client holds all
  of x and y. With them (hyper-cleaning: a client owns the weight logits of its own samples)
  a client holds only its own units of an owned group, what a local-round client at keep
  ratio 1 holds (masks.unit_masks keeps available units only), and is priced on those
  counts. A FedInn client (S_in) makes 1 + 2T gradient evaluations, a FedIHGP / FedOut client
  (S_out) the rest of round_counts(cfg, 1).
  """
  sizes = lambda t: jax.tree.map(lambda a: jnp.asarray(a.size, jnp.float32), t)
  c = s_in.shape[0]
  if cost is not None:
    price = lambda kx, ky: _op_prices(cfg, cost, kx, ky)
  else:
    inner_evals, outer_evals = _grad_evals(round_counts(cfg, 1))
    price = lambda kx, ky: (inner_evals * flops_per_grad(kx, ky),
                            outer_evals * flops_per_grad(kx, ky))
  if data.available is None or layout is None:
    if cost is None:
      evals = sum(_grad_evals(round_counts(cfg, c)))
      return evals * flops_per_grad(sizes(state.x), sizes(state.y))
    inner, outer = price(sizes(state.x), sizes(state.y))
    return c * (inner + outer)
  in_x, in_y = layout.groups_of(layout.x), layout.groups_of(layout.y)

  def held(cid, part):
    units = {g: (data.available[g][cid] if g in data.available else jnp.ones((n,)))
             for g, n in layout.groups.items()}
    return price(unit_kept_counts({g: units[g] for g in in_x}, layout.x, state.x),
                 unit_kept_counts({g: units[g] for g in in_y}, layout.y, state.y))[part]

  return (jnp.sum(jax.vmap(lambda cid: held(cid, 0))(s_in))
          + jnp.sum(jax.vmap(lambda cid: held(cid, 1))(s_out)))


def _metrics(cfg, state, counts: Counts, h, f_val, g_val, flops, num_sampled):
  """The generic round's metric keys (full model: coverage = C everywhere) plus the counts."""
  full = lambda t: jax.tree.map(lambda a: jnp.full(a.shape, num_sampled, jnp.int32), t)
  cov_x = coverage_stats_from_counts(full(state.x))
  cov_y = coverage_stats_from_counts(full(state.y))
  itemsize = jax.tree.leaves(state.x)[0].dtype.itemsize
  floats = comm_floats(tree.size(state.x), tree.size(state.y), neumann_products(cfg))
  return dict(
      inner_loss=g_val, outer_loss=f_val, hypergrad_norm=tree.norm(h),
      coverage_x_min=cov_x.min, coverage_x_mean=cov_x.mean, uncovered_x_share=cov_x.uncovered_share,
      coverage_y_min=cov_y.min, coverage_y_mean=cov_y.mean, uncovered_y_share=cov_y.uncovered_share,
      client_flops=flops,
      comm_bytes=jnp.asarray(float(itemsize * num_sampled * floats), jnp.float32),
      active_clients=jnp.asarray(num_sampled, jnp.int32),
      messages=jnp.asarray(counts.messages, jnp.int32),
      first_order_passes=jnp.asarray(counts.first_order_inner + counts.first_order_outer,
                                     jnp.int32),
      first_order_passes_inner=jnp.asarray(counts.first_order_inner, jnp.int32),
      first_order_passes_outer=jnp.asarray(counts.first_order_outer, jnp.int32),
      hvp_products=jnp.asarray(counts.hvp_products, jnp.int32),
      cross_products=jnp.asarray(counts.cross_products, jnp.int32),
      communication_rounds=jnp.asarray(counts.communication_rounds, jnp.int32))


def phase_samples(a: federated.RoundArgs, q: jax.Array, c: int) -> list[jax.Array]:
  """S_in and S_out of round q: C clients each, drawn independently (FedNest samples per
  phase)."""
  key = jax.random.fold_in(a.keys["sample"], q)
  return [jax.random.choice(jax.random.fold_in(key, k), a.population, (c,), replace=False)
          for k in (0, 1)]


def make_fednest_round(problem: BilevelProblem, cfg: federated.FederatedConfig, layout: Any,
                       x_like: PyTree, *, sample: Sampler = full_batch,
                       optimizer: optax.GradientTransformation | None = None,
                       flops_per_grad: Callable[[PyTree, PyTree], jax.Array] = (
                           federated.default_flops_per_grad),
                       cost: costs.CostModel | None = None,
                       client_map: ClientMap = vmap_clients, jit: bool = True,
                       available: Any = None, mask_fn: Any = None, submodel: str = "dense",
                       sampling: str | None = None,
                       mesh: Any = None, oracle: Oracle | None = None,
                       diagnostics: bool = False, **unused: Any) -> federated.Round:
  """FedNest's round `step(state, data) -> (state, metrics)` (module docstring), as a
  federated.Round; rounds.make_round's keywords (what FedNest cannot use is a ConfigError).

  sample draws FedInn's SVRG batches (FedOut and the snapshot use each client's whole split,
  as FedNest's code); `available` is accepted and unused: FedNest averages over all sampled
  clients, and the client FLOPs read the owned units from data.available as the local round's
  masks do (`client_flops`); oracle replaces make_oracle(problem) (tests count calls through it);
  diagnostics as in rounds.make_round (the estimate is FedOut's averaged h at x); client_map
  maps a phase's client function over its clients (ClientMap; default one vmap).
  """
  del sampling, available, unused
  federated.validate_config(cfg, layout)
  validate(cfg, submodel=submodel, mask_fn=mask_fn, mesh=mesh)
  optimizer = optimizer or optax.sgd(cfg.server_lr)
  oracle = oracle or make_oracle(problem)
  population = np.arange(cfg.num_clients)
  c = min(cfg.clients_per_round, cfg.num_clients)
  counts = round_counts(cfg, c)

  def step(a: federated.RoundArgs, state: federated.ServerState,
           data: federated.FederatedData):
    q = state.round
    s_in, s_out = phase_samples(a, q, c)
    bkey = jax.random.fold_in(a.keys["batches"], q)
    keys = jax.vmap(lambda cid: jax.random.fold_in(bkey, cid))(s_in)
    cfg_q = cfg._replace(client=federated.with_steps(cfg.client, a.steps))  # traced steps
    y = fed_inn(oracle, cfg_q, state.x, state.y, data, s_in, keys, sample, client_map)
    v, f_val = fed_ihgp(oracle, cfg_q, state.x, y, data, s_out, client_map)
    dx, h, g_val = fed_out(oracle, cfg_q, state.x, y, v, data, s_out, client_map)
    x, opt_state = server.server_step(state.x, dx, tree.ones_like(dx), optimizer,
                                      state.opt_state)
    flops = client_flops(cfg, layout, state, data, s_in, s_out, flops_per_grad, cost)
    metrics = _metrics(cfg, state, counts, h, f_val, g_val, flops, c)
    if diagnostics:  # full model: every coordinate held by the C sampled clients
      held = lambda t: jax.tree.map(lambda a: jnp.full(a.shape, c, jnp.int32), t)
      metrics[federated.DIAGNOSTICS] = dict(estimate=h, count_x=held(state.x),
                                            count_y=held(state.y))
    return federated.ServerState(x, y, v, opt_state, q + 1), metrics

  # Seed streams and step sizes as jit arguments (RoundArgs): one program for every seed and
  # step size (sampling_lib.ROUND_STREAMS holds the streams FedNest reads).
  ratios = np.ones((cfg.num_clients, 2))
  args = sampling_lib.round_args(cfg, ratios, population, (), jax.tree.leaves(x_like)[0].dtype)
  return federated.Round(functools.partial(jax.jit(step) if jit else step, args), population,
                         ratios, c, (), functools.partial(phase_samples, args, c=c))
