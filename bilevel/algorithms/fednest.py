"""FedNest (Tarzanagh et al., ICML 2022) as its authors' code runs it: FedInn, FedIHGP, FedOut.

The per-round computation of github.com/ucr-optml/FedNest, `main_hr.py --optim svrg
--hvp_method global_batch` (FedNest's algorithm), full model, one round = one outer update of x.
Its hyperparameters and ours: hlr = outer_lr (ONE step: the Neumann step, the scale of v and
the client x step; v_lr must equal it), lr = inner_lr (FedInn's SVRG step), local_ep =
inner_steps (FedInn epochs), local_bs = the sampler's batch_size (a full split without one),
neumann = num_steps - 1 = N products, outer_tau = local_steps = tau. C clients per phase, drawn
independently for FedInn (S_in) and FedOut (S_out); every server mean is a plain mean over the
phase's clients; n_i rows in client i's train split.

FedInn (S_in, 2 communication rounds):
    1. client i: s_i = grad_y g_i(x, y0) on its whole train split;      server: s = mean s_i
    2. client i: local_ep epochs; an epoch shuffles the split and steps through it in
       ceil(n_i / B) batches of B = local_bs rows (the last one short):
         y <- y - lr (grad_y g_i(x, y; B_t) - grad_y g_i(x, y0; B_t) + s)
       server: y+ = mean y_i.  (Config A, 300-row splits: 5 x 5 = 25 SVRG steps per client.)
FedIHGP (S_out, 1 + N communication rounds), hlr = eta:
    3. client i: grad_y f_i(x, y+) (validation split);                  server: c0 = mean
    4. FedNest's code keeps a Neumann counter per client, c_i <- (I - eta H_i) c_i from c_i =
       c0 (H_i = hess_yy g_i(x, y+), whole train split), and each of the N server averagings
       averages every message received so far (its message list is never cleared), where
       client i's message in averaging k is p_{k-1} + c_i. So p_k = p_{k-1} + mean_i c_i / k:
         v = eta p_N = eta [c0 + sum_{k=1..N} (1/k) mean_i (I - eta H_i)^k c0]    ("code")
       With neumann="series" the counter is the server's (the paper's algorithm, and the
       centralised series of the mean problem; H, grad_y f client means):
         v = eta sum_{n=0..N} (I - eta H)^n c0                                   ("series")
FedOut (same clients, 2 communication rounds):
    5. client i: h_i = grad_x f_i(x, y+) - J_i v, J_i v = d/dy[grad_x g_i](x, y+) v;
       server: h = mean h_i (the hypergradient estimate)
    6. client i: tau steps x_i <- x_i - eta (grad_x f_i(x_i, y+) - grad_x f_i(x, y+) + h)
       from x_i = x; server: x <- x + server step of mean (x_i - x)  (SGD(1): x - eta h at tau 1)

Products are reverse-over-reverse (jax.vjp of the gradient, replayed N times, as torch's double
backward on a retained graph). The passes and what differs from FedNest's code: docs/method.md,
section 7.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs, federated, server, tree
from bilevel import sampling as sampling_lib
from bilevel.algorithms import base
from bilevel.client import Sampler, full_batch, population_sampler
from bilevel.errors import ConfigError, check_choice
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
  grad_g = jax.grad(g, argnums=1)

  def cross_point(x, y, b):
    # grad_y g as a function of x: its pullback along p is (d/dx grad_y g)' p = J p.
    gy_of_x = lambda xx: jax.value_and_grad(g, argnums=1)(xx, y, b)[::-1]
    _, pull, value = jax.vjp(gy_of_x, x, has_aux=True)
    return value, pull

  replay = lambda pull, p: pull(p)[0]
  return Oracle(grad_g=grad_g, grad_f_y=jax.value_and_grad(f, argnums=1),
                grad_f_x=jax.grad(f, argnums=0),
                hvp_point=lambda x, y, b: jax.vjp(lambda yy: grad_g(x, yy, b), y)[1],
                hvp=replay, cross_point=cross_point, cross=replay)


# Metrics FedNest's round reports besides the local round's keys (per round, all clients).
COUNT_METRICS = ("messages", "first_order_passes", "first_order_passes_inner",
                 "first_order_passes_outer", "svrg_steps", "hvp_products", "cross_products",
                 "communication_rounds")
# FedIHGP's v: FedNest's code's closed form, or the series it intends (module docstring).
NEUMANN_FORMS = ("code", "series")


class Counts(NamedTuple):
  """Operations of one round (all sampled clients together) that do not depend on the data."""

  first_order_inner: int  # sweeps of a whole train split in FedInn
  first_order_outer: int  # sweeps of a whole split in FedIHGP + FedOut
  hvp_products: int
  cross_products: int
  communication_rounds: int
  messages: int  # one per client, direction and communication round


def round_counts(num_sampled: int, *, inner_steps: int, local_steps: int,
                 num_steps: int) -> Counts:
  """The round's analytic counts (tests/fednest_test.py checks them against FedNest's code's) of
  C = num_sampled clients, local_ep = inner_steps, tau = local_steps, N = num_steps - 1:
  first-order passes (sweeps of a whole split) C (1 + 2 local_ep) in FedInn (a snapshot, then
  two gradients per SVRG step) and C (3 + [N > 0] + 2 tau) in FedOut; C N Hessian-vector and
  C cross products; 2 + (1 + N) + 2 communication rounds, 2 C messages in each."""
  c, epochs, tau = num_sampled, inner_steps, local_steps
  n = max(num_steps - 1, 0)
  rounds = 2 + (1 + n) + 2
  return Counts(c * (1 + 2 * epochs), c * (3 + (n > 0) + 2 * tau), c * n, c, rounds,
                2 * c * rounds)


# cmap(fn, stack=True) -> fn mapped over a leading client axis of every argument. stack=False
# marks values a mapper may keep per client instead of stacking them (the products' points:
# pullbacks of different traces do not stack); vmap stacks them anyway. tests/fednest_test.py
# passes a Python-loop ClientMap to count the oracle's calls per client.
ClientMap = Callable[..., Callable[..., Any]]


def vmap_clients(fn: Callable[..., Any], stack: bool = True) -> Callable[..., Any]:
  """The round's ClientMap: one jax.vmap over the phase's clients."""
  del stack
  return jax.vmap(fn)


def _mean(t_C: PyTree) -> PyTree:
  """The server's plain mean over the client axis."""
  return jax.tree.map(lambda a: jnp.mean(a, axis=0), t_C)


def whole_split(split: Any, cid: jax.Array) -> Any:
  """Client cid's whole split (FedNest's snapshot, FedIHGP and FedOut passes)."""
  return population_sampler(full_batch, cid)(split, None)


def split_rows(split: Any, cid: jax.Array) -> jax.Array:
  """Rows of client cid's split: its valid rows ("weight" > 0, valid rows first, the
  MinibatchSampler convention), else every row of its padded split."""
  if isinstance(split, Mapping) and "weight" in split:
    return jnp.sum(split["weight"][cid] > 0)
  return jnp.asarray(jax.tree.leaves(split)[0].shape[1])


def sweep_batch_size(sample: Sampler, split: Any) -> int | None:
  """Rows of FedInn's SVRG batches: the sampler's batch_size (FedNest's local_bs), capped at the
  padded split; the whole split for a sampler without one. None when the split has no "weight"
  rows to sweep: then every epoch is one step on a batch of `sample`."""
  if not (isinstance(split, Mapping) and "weight" in split):
    return None
  n_pad = split["weight"].shape[1]
  return min(int(getattr(sample, "batch_size", 0) or n_pad), n_pad)


def epoch_batch(split: Any, cid: jax.Array, key: jax.Array, b: jax.Array,
                batch_size: int) -> Any:
  """Batch b of one epoch of client cid (key: the epoch's): positions b B .. b B + B - 1 of a
  random order of its valid rows; positions past its n_i rows get weight 0 (the short last
  batch). FedNest's DataLoader(shuffle=True) batches. One row gather from [M * N, ...]."""
  valid = split["weight"][cid] > 0
  n_pad = valid.shape[0]
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, (n_pad,)), 2.0))
  pos = b * batch_size + jnp.arange(batch_size)
  rows = cid * n_pad + order[jnp.minimum(pos, n_pad - 1)]
  batch = jax.tree.map(lambda t: t.reshape(-1, *t.shape[2:]).at[rows].get(
      mode="promise_in_bounds"), split)
  return dict(batch, weight=batch["weight"] * (pos < jnp.sum(valid)))


# ------------------------------------------------------------------ the three phases


def fed_inn(oracle: Oracle, epochs: int, x: PyTree, y0: PyTree,
            data: federated.FederatedData, ids: jax.Array, keys: jax.Array, sample: Sampler,
            cmap: ClientMap, lr: jax.Array) -> tuple[PyTree, jax.Array]:
  """FedInn with SVRG (steps 1-2); returns y+ = mean_i y_i and the SVRG steps the clients took,
  sum_i local_ep ceil(n_i / B).

  The scan runs ceil(N / B) steps per epoch for the padded N rows; a client's steps past its
  own ceil(n_i / B) leave y as it is. Without "weight" rows an epoch is one step on sample's
  batch.
  """
  s = _mean(cmap(lambda cid: oracle.grad_g(x, y0, whole_split(data.inner, cid)))(ids))
  bsz = sweep_batch_size(sample, data.inner)
  per_epoch = 1 if bsz is None else -(-data.inner["weight"].shape[1] // bsz)

  def client(cid, key):
    draw = population_sampler(sample, cid)
    n = split_rows(data.inner, cid)

    def step(y, t):
      if bsz is None:
        batch, active = draw(data.inner, jax.random.fold_in(key, t)), None
      else:
        e, b = t // per_epoch, t % per_epoch
        batch = epoch_batch(data.inner, cid, jax.random.fold_in(key, e), b, bsz)
        active = b * bsz < n
      d = tree.add(tree.sub(oracle.grad_g(x, y, batch), oracle.grad_g(x, y0, batch)), s)
      new = tree.axpy(-lr, d, y)
      if active is not None:
        new = jax.tree.map(lambda a, o: jnp.where(active, a, o), new, y)
      return new, None

    steps = jnp.asarray(epochs) if bsz is None else epochs * ((n + bsz - 1) // bsz)
    return jax.lax.scan(step, y0, jnp.arange(epochs * per_epoch))[0], steps

  y_C, steps = cmap(client)(ids, keys)
  return _mean(y_C), jnp.sum(steps).astype(jnp.int32)


def fed_ihgp(oracle: Oracle, n: int, x: PyTree, y: PyTree, data: federated.FederatedData,
             ids: jax.Array, cmap: ClientMap, eta: jax.Array, neumann: str
             ) -> tuple[PyTree, jax.Array]:
  """FedIHGP (steps 3-4): v from c0 = mean_i grad_y f_i and N = n rounds of products H_i c, in
  FedNest's code's form (neumann="code": a counter per client) or the series ("series": the
  server's counter). Returns (v, mean_i f_i(x, y))."""
  f_i, gyf_i = cmap(lambda cid: oracle.grad_f_y(x, y, whole_split(data.outer, cid)))(ids)
  c0 = _mean(gyf_i)
  if n == 0:
    return tree.scale(eta, c0), jnp.mean(f_i)
  points = cmap(lambda cid: oracle.hvp_point(x, y, whole_split(data.inner, cid)),
                stack=False)(ids)

  if neumann == "series":
    def term(carry, _):  # c <- c - eta mean_i H_i c, p <- p + c; one communication round
      c, p = carry
      c = tree.axpy(-eta, _mean(cmap(lambda pt: oracle.hvp(pt, c))(points)), c)
      return (c, tree.add(p, c)), None

    (_, p), _ = jax.lax.scan(term, (c0, c0), None, length=n)
  else:
    def term(carry, k):  # c_i <- c_i - eta H_i c_i, p <- p + mean_i c_i / k; one round
      c_C, p = carry
      c_C = cmap(lambda pt, c: tree.axpy(-eta, oracle.hvp(pt, c), c))(points, c_C)
      return (c_C, tree.axpy(1.0 / k, _mean(c_C), p)), None

    dtype = jax.tree.leaves(c0)[0].dtype
    c_C = jax.tree.map(lambda a: jnp.broadcast_to(a, (ids.shape[0],) + a.shape), c0)
    (_, p), _ = jax.lax.scan(term, (c_C, c0), jnp.arange(1, n + 1).astype(dtype))
  return tree.scale(eta, p), jnp.mean(f_i)


def fed_out(oracle: Oracle, tau: int, x: PyTree, y: PyTree, v: PyTree,
            data: federated.FederatedData, ids: jax.Array, cmap: ClientMap, eta: jax.Array
            ) -> tuple[PyTree, PyTree, jax.Array]:
  """FedOut (steps 5-6): h = mean_i (grad_x f_i - J_i v), then tau SVRG steps of x per client.
  Returns (mean_i (x_i - x), h, mean_i g_i(x, y))."""

  def hypergrad(cid):
    g_val, point = oracle.cross_point(x, y, whole_split(data.inner, cid))
    return tree.sub(oracle.grad_f_x(x, y, whole_split(data.outer, cid)),
                    oracle.cross(point, v)), g_val

  h_i, g_i = cmap(hypergrad)(ids)
  h = _mean(h_i)

  def client(cid):
    outer = whole_split(data.outer, cid)

    def step(xi, _):
      d = tree.add(tree.sub(oracle.grad_f_x(xi, y, outer), oracle.grad_f_x(x, y, outer)), h)
      return tree.axpy(-eta, d, xi), None

    return tree.sub(jax.lax.scan(step, x, None, length=tau)[0], x)

  return _mean(cmap(client)(ids)), h, jnp.mean(g_i)


# ------------------------------------------------------------------ what a round costs


def client_flops(epochs: int, tau: int, n: int, layout: UnitLayout | None,
                 available: Mapping[str, Any] | None, state: federated.ServerState,
                 data: federated.FederatedData, s_in: jax.Array, s_out: jax.Array,
                 cost: costs.CostModel | costs.PerGradient, sample: Sampler) -> jax.Array:
  """Client FLOPs of one round (docs/method.md, section 7): a FedInn client (S_in) pays
  FedInn's work, a FedOut client (S_out) the rest, each pass at the rows it runs on. A client
  holds all of x and y, or with owned units (`available`) its own units of an owned group.
  """
  sizes = lambda t: jax.tree.map(lambda a: jnp.asarray(a.size, jnp.float32), t)
  owned = available is not None and layout is not None

  def held(cid):
    if not owned:
      return sizes(state.x), sizes(state.y)
    in_x, in_y = layout.groups_of(layout.x), layout.groups_of(layout.y)
    units = {g: (data.available[g][cid] if g in data.available else jnp.ones((k,)))
             for g, k in layout.groups.items()}
    return (unit_kept_counts({g: units[g] for g in in_x}, layout.x, state.x),
            unit_kept_counts({g: units[g] for g in in_y}, layout.y, state.y))

  if isinstance(cost, costs.PerGradient):
    c = round_counts(1, inner_steps=epochs, local_steps=tau, num_steps=n + 1)
    per = PRODUCT_GRAD_EVALS["exact"]
    evals = (c.first_order_inner,
             c.first_order_outer + per * (c.hvp_products + c.cross_products))
    if not owned:
      return (s_in.shape[0] * evals[0] + s_out.shape[0] * evals[1]) * cost.price(*held(None))
    price = lambda cid: [e * cost.price(*held(cid)) for e in evals]
  else:
    sweep = sweep_batch_size(sample, data.inner) is not None

    def price(cid):
      kx, ky = held(cid)
      n_in = split_rows(data.inner, cid).astype(jnp.float32)
      n_out = split_rows(data.outer, cid).astype(jnp.float32)
      epoch_rows = n_in if sweep else cost.rows(kx)[0]
      prices = costs.op_prices(cost.model, "exact", kx, ky)
      g_y = prices["forward_x"] + prices["grad_y"]
      g_xy = prices["forward_x"] + prices["grad_xy"]
      inner = n_in * g_y + 2 * epochs * epoch_rows * g_y
      outer = (((2 + 2 * tau) * n_out + (1 + (n > 0)) * n_in) * g_xy
               + n * n_in * prices["hv"] + n_in * prices["jv"])
      return inner, outer

  return (jnp.sum(jax.vmap(lambda cid: price(cid)[0])(s_in))
          + jnp.sum(jax.vmap(lambda cid: price(cid)[1])(s_out)))


def _metrics(state: federated.ServerState, counts: Counts, num_sampled: int, n: int
             ) -> dict[str, jax.Array]:
  """The round's metrics that do not depend on the data: coverage (full model: all C clients
  hold every coordinate), bytes sent and received, and the analytic counts."""
  i32, f32 = lambda k: jnp.asarray(k, jnp.int32), lambda k: jnp.asarray(k, jnp.float32)
  coverage = {}
  for side, t in (("x", state.x), ("y", state.y)):  # the float32 mean of C counts, as reported
    cov = coverage_stats_from_counts(_held(t, num_sampled))
    coverage.update({f"coverage_{side}_min": cov.min, f"coverage_{side}_mean": cov.mean,
                     f"uncovered_{side}_share": cov.uncovered_share})
  nx, ny = tree.size(state.x), tree.size(state.y)
  # Floats per FedInn client and FedOut client: FedInn: model down + s_i up, s down + y_i up.
  # FedOut: model down + grad_y f_i up, N x (p down + message up), v down + h_i up, h down +
  # x_i - x up.
  floats = (nx + ny + ny) + (ny + ny) + (nx + ny + ny) + n * 2 * ny + (ny + nx) + 2 * nx
  itemsize = jax.tree.leaves(state.x)[0].dtype.itemsize
  return dict(
      coverage, comm_bytes=f32(float(itemsize * num_sampled * floats)),
      active_clients=i32(num_sampled), messages=i32(counts.messages),
      first_order_passes=i32(counts.first_order_inner + counts.first_order_outer),
      first_order_passes_inner=i32(counts.first_order_inner),
      first_order_passes_outer=i32(counts.first_order_outer),
      hvp_products=i32(counts.hvp_products), cross_products=i32(counts.cross_products),
      communication_rounds=i32(counts.communication_rounds))


def _held(t: PyTree, num_sampled: int) -> PyTree:
  """Clients holding each coordinate: all C (full model)."""
  return jax.tree.map(lambda a: jnp.full(a.shape, num_sampled, jnp.int32), t)


# ------------------------------------------------------------------ the round


def phase_samples(a: federated.RoundArgs, q: jax.Array, c: int) -> list[jax.Array]:
  """S_in and S_out of round q: C clients each, drawn independently (FedNest samples per
  phase)."""
  key = jax.random.fold_in(a.keys["sample"], q)
  return [jax.random.choice(jax.random.fold_in(key, k), a.population, (c,), replace=False)
          for k in (0, 1)]


def make_fednest_round(problem: BilevelProblem, x_like: PyTree, *, num_clients: int,
                       clients_per_round: int, layout: UnitLayout | None, local_steps: int,
                       inner_steps: int, inner_lr: float, outer_lr: float, num_steps: int,
                       optimizer: optax.GradientTransformation, seed: int, sample: Sampler,
                       cost: costs.CostModel | costs.PerGradient | None,
                       available: Mapping[str, Any] | None, diagnostics: bool | None,
                       fednest_neumann: str, client_map: ClientMap = vmap_clients,
                       jit: bool = True, oracle: Oracle | None = None) -> federated.Round:
  """FedNest's round `step(state, data) -> (state, metrics)` (module docstring: how its
  hyperparameters map onto the options) as a federated.Round. available: the clients' own units,
  priced in client_flops; diagnostics as in rafbo.make_round (the estimate is FedOut's h at x).
  client_map maps a phase's client function over its clients; oracle replaces
  make_oracle(problem) (tests count calls).
  """
  oracle = oracle or make_oracle(problem)
  population = np.arange(num_clients)
  c, epochs, tau = clients_per_round, inner_steps, local_steps
  counts = round_counts(c, inner_steps=epochs, local_steps=tau, num_steps=num_steps)
  n = max(num_steps - 1, 0)

  def step(a: federated.RoundArgs, state: federated.ServerState,
           data: federated.FederatedData):
    q = state.round
    s_in, s_out = phase_samples(a, q, c)
    bkey = jax.random.fold_in(a.keys["batches"], q)
    keys = jax.vmap(lambda cid: jax.random.fold_in(bkey, cid))(s_in)
    hlr, lr = a.steps["outer_lr"], a.steps["inner_lr"]  # traced: one program for every step
    y, steps = fed_inn(oracle, epochs, state.x, state.y, data, s_in, keys, sample, client_map, lr)
    v, f_val = fed_ihgp(oracle, n, state.x, y, data, s_out, client_map, hlr, fednest_neumann)
    dx, h, g_val = fed_out(oracle, tau, state.x, y, v, data, s_out, client_map, hlr)
    x, opt_state = server.server_step(state.x, dx, tree.ones_like(dx), optimizer,
                                      state.opt_state)
    metrics = dict(
        _metrics(state, counts, c, n), inner_loss=g_val, outer_loss=f_val,
        hypergrad_norm=tree.norm(h), svrg_steps=steps,
        client_flops=client_flops(epochs, tau, n, layout, available, state, data, s_in, s_out,
                                  cost or costs.PerGradient(), sample))
    if diagnostics:
      metrics[federated.DIAGNOSTICS] = dict(estimate=h, count_x=_held(state.x, c),
                                            count_y=_held(state.y, c))
    return federated.ServerState(x, y, v, opt_state, q + 1), metrics

  # Seed streams and step sizes as jit arguments (RoundArgs): one program for every seed and
  # step size (v_lr is outer_lr: FedNest's one step hlr).
  ratios = np.ones((num_clients, 2))
  args = sampling_lib.round_args(seed, dict(outer_lr=outer_lr, inner_lr=inner_lr,
                                            v_lr=outer_lr),
                                 ratios, population, (), jax.tree.leaves(x_like)[0].dtype)
  apply = jax.jit(step) if jit else step
  return federated.Round(functools.partial(apply, args), population, ratios, c, (),
                         functools.partial(phase_samples, args, c=c), hyper=args, apply=apply)


# ------------------------------------------------------------------ the algorithm


def _one_step_size(o: base.Options, given: Mapping[str, Any]) -> base.Options:
  """FedNest has one step hlr (its Neumann step, the scale of v and the client x step):
  outer_lr. A v_lr given apart from it is a ConfigError; otherwise v_lr follows outer_lr."""
  if "v_lr" in given and given["v_lr"] != o.outer_lr:
    raise ConfigError(
        f"fednest has one step hlr (FedNest's --hlr: the Neumann step, the scale of v and the "
        f"client x step), outer_lr={o.outer_lr!r}; v_lr={given['v_lr']!r} cannot differ from it "
        "(give outer_lr only).")
  check_choice("fednest_neumann", o.fednest_neumann, NEUMANN_FORMS)
  return o._replace(v_lr=o.outer_lr)


# FedNest's own hyperparameters (config A): outer_tau 1, local_ep 5 epochs of SVRG steps
# (inner_steps), 5 Neumann products (6 terms), hlr = lr = 0.01 (v_lr = outer_lr). Full model,
# uniform weights, exact products: options it does not read keep these defaults (base.build).
FEDNEST = base.Spec(
    base.SHARED._replace(estimator="neumann", local_steps=1, inner_steps=5, num_steps=6,
                         inner_lr=0.01, outer_lr=0.01, v_lr=0.01),
    make_fednest_round, full_model=True, round_kind="fednest", resolve=_one_step_size)


def fednest(*, problem: BilevelProblem, num_clients: int, **options: Any) -> base.Algorithm:
  """FedNest (Tarzanagh et al., 2022): its communicating round (module docstring), at its
  own hyperparameters (FEDNEST). Full model: `levels` is ignored; an option its round does not
  read (submodel "compact", weighting "examples", another estimator, ...) is a ConfigError.
  """
  return base.build("fednest", FEDNEST, problem, num_clients, options)
