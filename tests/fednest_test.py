"""FedNest's communicating round (bilevel/algorithms/fednest.py) against FedNest's own code.

The expected counts are numbers read from FedNest's code (github.com/ucr-optml/FedNest), not
from fednest.py: utils/options.py defaults local_ep 5, neumann 5, frac 0.1; reproduce/fig2.sh
(config A: --iid --hlr 0.01 --lr 0.01 --outer_tau 1 --local_bs 64); utils/sampling.py's
mnist_iid_normal gives a client 60000 / 100 = 600 images, half of them (300) validation.
Per round, with C = 10 clients per phase:
- FedInn (core/ClientManage_hr.py fed_in, core/SVRGClient_hr.py train_epoch): a snapshot
  gradient over the train split (batch_grad), then local_ep epochs over a DataLoader of batch
  64, two gradients per step: ceil(300 / 64) = 5 batches, 25 SVRG steps and 1 + 2 x 5 = 11
  sweeps of the split per client (250 steps, 110 sweeps). The README setting (20 clients of
  200 embedded images, 100 train rows): ceil(100 / 64) = 2 batches, 10 steps per client.
- FedOut (fed_out, fedIHGP, hyper_grad, hyper_svrg_update): grad_d_out_d_y, the first
  hvp_iter's grad_d_in_d_y, hyper_grad's grad_d_in_d_y and grad_d_out_d_x, 2 grad_d_out_d_x
  per outer_tau step: 6 sweeps per client (60); neumann 5 Hessian-vector products and one
  cross product per client (50, 10); comm_round += 2 + (1 + 5) + 1 + 1 = 10.
- Its Neumann loop (fedIHGP, hvp_iter): a per-client counter and a message list never
  cleared, so v = hlr [c0 + sum_k (1/k) mean_i (I - hlr H_i)^k c0]: checked on a one-dimensional
  case by hand and against a literal transcription of that loop.
The tests also check that an epoch's batches partition a client's train split, the FLOPs
of whole-split passes at the split's rows, the one step hlr, and the drivers.
"""

import collections
import contextlib
import inspect
import io
import json
import os
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from absl import flags
from absl.testing import absltest, flagsaver, parameterized

from bilevel import algorithms, costs, federated, hypergrad, models, problems, server
from bilevel.algorithms import fednest
from bilevel import tree
from bilevel.client import minibatch_sampler
from bilevel.errors import ConfigError
from bilevel.tasks import hyper_representation as hr_task
import quadratic  # tests/quadratic.py

def _config(num_clients, per_round, *, inner_steps=5, num_steps=6, local_steps=1, lr=0.01,
            **kw):
  return dict(num_clients=num_clients, clients_per_round=per_round, local_steps=local_steps,
              inner_steps=inner_steps, inner_lr=lr, outer_lr=lr, v_lr=lr, num_steps=num_steps,
              **kw)


def _make(problem, cfg, layout, x0, **kw):
  """fednest.make_fednest_round of options cfg and kw over FedNest's defaults (SGD(1) server)."""
  takes = inspect.signature(fednest.make_fednest_round).parameters
  given = dict(fednest.FEDNEST.defaults._asdict(), layout=layout, optimizer=optax.sgd(1.0),
               **cfg, **kw)
  return fednest.make_fednest_round(problem, x0, **{k: v for k, v in given.items() if k in takes})


def _mlp_data(num_clients, rows=6, dim=5, classes=3, seed=0):
  rng = np.random.default_rng(seed)

  def split():
    return {"inputs": jnp.asarray(rng.normal(size=(num_clients, rows, dim)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, classes, (num_clients, rows))),
            "weight": jnp.ones((num_clients, rows), jnp.float32)}

  return federated.FederatedData(split(), split(), jnp.full((num_clients,), rows))


class _PerClient(list):
  """Values kept per client by `_loop_clients` (pullbacks of different traces do not stack)."""


def _loop_clients(num_clients):
  """A fednest.ClientMap that runs the phase's clients one by one in a Python loop, so that a
  counting oracle sees every client's calls (one vmap traces each call once). stack=False keeps
  the per-client values in a _PerClient list, and a _PerClient argument is read per client."""

  def cmap(fn, stack=True):
    pick = lambda a, i: a[i] if isinstance(a, _PerClient) else tree.index(a, i)

    def mapped(*args):
      outs = [fn(*(pick(a, i) for a in args)) for i in range(num_clients)]
      return tree.stack(outs) if stack else _PerClient(outs)

    return mapped

  return cmap


def _counting_oracle(oracle, counts):
  """Every oracle call counted under its name."""
  def wrap(name, fn):
    def counted(*a):
      counts[name] += 1
      return fn(*a)
    return counted
  return fednest.Oracle(*(wrap(n, f) for n, f in zip(fednest.Oracle._fields, oracle)))


def _counted_problem(loss_calls):
  """The tanh hyper-representation problem with every loss evaluation counted."""
  base = models.hyper_representation_problem("tanh")

  def counted(name, loss):
    def fn(x, y, b):
      loss_calls[name] += 1
      return loss(x, y, b)
    return fn

  return problems.BilevelProblem(counted("g", base.inner_loss), counted("f", base.outer_loss))


def _rows_data(num_clients, train_rows, val_rows, dim=5, classes=3, pad=None):
  """MLP data whose "row" entry names each training row (client * N + position); client i has
  train_rows[i] valid rows of N = pad (default the largest), then padding of weight 0."""
  rng = np.random.default_rng(0)
  train_rows = np.broadcast_to(train_rows, (num_clients,))
  n = pad or int(train_rows.max())

  def split(rows, valid):
    return {"inputs": jnp.asarray(rng.normal(size=(num_clients, rows, dim)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, classes, (num_clients, rows))),
            "weight": jnp.asarray(valid, jnp.float32)}

  inner = split(n, np.arange(n)[None, :] < train_rows[:, None])
  inner["row"] = jnp.arange(num_clients * n).reshape(num_clients, n)
  outer = split(val_rows, np.ones((num_clients, val_rows)))
  return federated.FederatedData(inner, outer, jnp.asarray(train_rows))


# What FedNest's code counts per round with 10 clients per phase (module docstring), for any
# split size; svrg_steps depends on the train rows.
FEDNEST_COUNTS = dict(first_order_passes_inner=110, first_order_passes_outer=60,
                      first_order_passes=170, hvp_products=50, cross_products=10,
                      communication_rounds=10, messages=200)


class CountTest(parameterized.TestCase):

  @pytest.mark.slow
  def test_config_a_counts_call_by_call(self):
    """Config A (100 clients, 10 per phase, 300-row train splits, batch 64): FedNest's counts,
    every oracle call counted in a Python loop over clients, and each epoch's batches a
    partition of the client's split."""
    calls, loss_calls, batches = collections.Counter(), collections.Counter(), []
    problem = _counted_problem(loss_calls)
    oracle = _counting_oracle(fednest.make_oracle(problem), calls)
    grad_g = oracle.grad_g

    def recorded(x, y, b):  # the valid rows of every grad_g batch, in call order
      batches.append(np.asarray(b["row"])[np.asarray(b["weight"]) > 0])
      return grad_g(x, y, b)

    oracle = oracle._replace(grad_g=recorded)
    cfg = _config(100, 10)  # FedNest's defaults: 5 epochs, 5 products, tau 1, steps 0.01
    x0, y0 = models.init_mlp(jax.random.key(0), 5, 4, 3)
    # The plain builder dispatches to FedNest's round; the counting one is the test's.
    rnd = _make(problem, cfg, None, x0, sample=minibatch_sampler(64),
                client_map=_loop_clients(10), jit=False, oracle=oracle)
    means, steps = [0], [0]
    real_mean, real_step = fednest._mean, server.server_step

    def mean(t):
      means[0] += 1
      return real_mean(t)

    def step(*a):
      steps[0] += 1
      return real_step(*a)

    state = federated.init_state(x0, y0, optax.sgd(1.0))
    with jax.disable_jit(), mock.patch.object(fednest, "_mean", mean), \
        mock.patch.object(server, "server_step", step):
      new, metrics = rnd.step(state, _rows_data(100, 300, 300))
    # FedInn: per client 1 snapshot gradient + 2 gradients x 25 SVRG steps.
    self.assertEqual(calls["grad_g"], 10 * (1 + 2 * 25))
    outer_passes = (calls["grad_f_y"] + calls["hvp_point"] + calls["cross_point"]
                    + calls["grad_f_x"])
    self.assertEqual((outer_passes, calls["hvp"], calls["cross"], means[0], steps[0]),
                     (60, 50, 10, 10, 1))
    # Each first-order pass evaluates its loss once; products replay a pass (no evaluation).
    self.assertEqual(loss_calls["g"], calls["grad_g"] + calls["hvp_point"] + calls["cross_point"])
    self.assertEqual(loss_calls["f"], calls["grad_f_y"] + calls["grad_f_x"])
    s_in = [int(i) for i in rnd.sample_fn(state.round)[0]]
    self.assertEqual([len(b) for b in batches[:10]], [300] * 10)  # snapshots: whole splits
    for k, cid in enumerate(s_in):
      own = batches[10 + 50 * k:10 + 50 * (k + 1)]
      for j in range(25):  # the y and y0 gradients of a step share its batch
        np.testing.assert_array_equal(own[2 * j], own[2 * j + 1])
      sweeps = [own[10 * e:10 * (e + 1):2] for e in range(5)]  # 5 epochs of 5 steps
      for sweep in sweeps:
        self.assertEqual([len(b) for b in sweep], [64, 64, 64, 64, 44])
        np.testing.assert_array_equal(np.sort(np.concatenate(sweep)),
                                      cid * 300 + np.arange(300))
      self.assertFalse(np.array_equal(sweeps[0][0], sweeps[1][0]))  # reshuffled per epoch
    m = {k: int(v) for k, v in metrics.items() if k in fednest.COUNT_METRICS}
    self.assertEqual(m, dict(FEDNEST_COUNTS, svrg_steps=250))
    self.assertEqual(int(metrics["active_clients"]), 10)
    self.assertEqual(float(metrics["coverage_x_min"]), 10.0)
    self.assertEqual(float(metrics["uncovered_y_share"]), 0.0)
    self.assertEqual(int(new.round), 1)
    self.assertEqual(fednest.round_counts(10, inner_steps=5, local_steps=1, num_steps=6)[:5],
                     (110, 60, 50, 10, 10))

  @parameterized.named_parameters(
      # config A on full MNIST: 300 train rows, ceil(300 / 64) = 5 batches x 5 epochs per client
      ("config_a", 100, 300, 250),
      # the README's task 1 (20 clients, 200 embedded images each, val_fraction 0.5): 100 train
      # rows, ceil(100 / 64) = 2 batches x 5 epochs
      ("readme", 20, 100, 100),
      # config A on the embedded 4,000-image subset: 20 train rows, one batch x 5 epochs
      ("config_a_embedded", 100, 20, 50))
  def test_round_metrics_are_fednest_codes_counts(self, num_clients, train_rows, svrg):
    cfg = _config(num_clients, 10)
    x0, y0 = models.init_mlp(jax.random.key(0), 5, 4, 3)
    rnd = _make(models.hyper_representation_problem("tanh"), cfg, None,
                                     x0, sample=minibatch_sampler(64))
    state = federated.init_state(x0, y0, optax.sgd(1.0))
    _, metrics = rnd.step(state, _rows_data(num_clients, train_rows, 8))
    m = {k: int(v) for k, v in metrics.items() if k in fednest.COUNT_METRICS}
    self.assertEqual(m, dict(FEDNEST_COUNTS, svrg_steps=svrg))
    self.assertEqual(5 * -(-train_rows // 64) * 10, svrg)  # local_ep x ceil(n_i / B) x C

  def test_flops_price_whole_split_passes_at_the_split_rows(self):
    """4 clients in both phases with 100, 70, 30 and 100 train rows (padded to 100) and 60
    validation rows, batch 64, the driver's cost model (64-row batches): FedInn pays 11 sweeps
    of each client's own train rows, FedOut its passes at 60 or n_i rows; a client with 30 rows
    takes 1 SVRG step per epoch, the others 2."""
    counts = np.array([100, 70, 30, 100])
    cfg = _config(4, 4)
    x0, y0 = models.init_mlp(jax.random.key(0), 5, 4, 3)
    cost = costs.CostModel(hr_task.mlp_costs(), lambda kept_x: (64, 64))
    rnd = _make(models.hyper_representation_problem("tanh"), cfg, None,
                                     x0, sample=minibatch_sampler(64), cost=cost)
    state = federated.init_state(x0, y0, optax.sgd(1.0))
    _, metrics = rnd.step(state, _rows_data(4, counts, 60))
    self.assertEqual(int(metrics["svrg_steps"]), 5 * (2 + 2 + 1 + 2))
    kept = (jax.tree.map(jnp.size, x0), jax.tree.map(jnp.size, y0))  # an unpruned client
    p = costs.op_prices(hr_task.mlp_costs(), "exact", *kept)
    g_y, g_xy = p["forward_x"] + p["grad_y"], p["forward_x"] + p["grad_xy"]
    inner = sum((1 + 2 * 5) * n * g_y for n in counts)  # snapshot + 5 epochs x 2 gradients
    outer = sum((1 + 1 + 2) * 60 * g_xy  # grad_y f, grad_x f, 2 per SVRG x step (validation)
                + 2 * n * g_xy + 5 * n * p["hv"] + n * p["jv"]  # on the train split
                for n in counts)
    # float32 sums of eight terms: relative rounding ~1e-7.
    self.assertLess(abs(float(metrics["client_flops"]) / (inner + outer) - 1.0), 1e-5)

  @parameterized.parameters(dict(submodel="compact"), dict(weighting="examples"),
                            dict(estimator="cg"), dict(product="fd"), dict(x_trust=0.5),
                            dict(aggregation="zero_fill"), dict(inner_step="fixed"))
  def test_rejects_options_its_round_does_not_read(self, **option):
    (name, value), = option.items()
    with self.assertRaisesRegex(ConfigError, f"algorithm 'fednest' does not use option {name}="
                                f"{value!r}"):
      algorithms.get("fednest", problem=quadratic.QUADRATIC, num_clients=4, **option)
    # The default of an option it does not read is accepted (the drivers pass their flags').
    default = getattr(fednest.FEDNEST.defaults, name)
    algorithms.get("fednest", problem=quadratic.QUADRATIC, num_clients=4, **{name: default})


class HyperCleaningFlopsTest(absltest.TestCase):
  """Task 2: a client is charged for its own samples' weight logits, not every client's."""

  def _step(self, per_round, owned):
    from bilevel.tasks import hyper_cleaning  # pylint: disable=g-import-not-at-top
    counts, n_tr, d, classes = np.array([2, 3, 4]), 4, 2, 3
    n = int(counts.sum())
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(n_tr)[None, :]
    valid = pos < counts[:, None]
    rng = np.random.default_rng(0)
    inner = {"inputs": jnp.asarray(rng.normal(size=(3, n_tr, d)), jnp.float32),
             "labels": jnp.asarray(rng.integers(0, classes, (3, n_tr))),
             "weight": jnp.asarray(valid, jnp.float32),
             "index": jnp.asarray(np.where(valid, offsets[:, None] + pos, 0), jnp.int32)}
    outer = {k: inner[k] for k in ("inputs", "labels", "weight")}
    ownership = np.repeat(np.eye(3, dtype=np.float32), counts, axis=1)  # [3, 9]
    data = federated.FederatedData(inner, outer, jnp.asarray(counts),
                                   {"samples": jnp.asarray(ownership)} if owned else None)
    lay = hyper_cleaning.layout("linear", n, d, 1)
    x0, y0 = hyper_cleaning.init_params(jax.random.key(0), "linear", n, d, 1, classes)
    cfg = _config(3, per_round, inner_steps=2, num_steps=3, local_steps=1)
    # The driver's full-batch count: 6 FLOPs per y parameter (here 2 x 3 + 3 = 9) per kept row.
    price = lambda kx, ky: 6.0 * kx["gate"] * sum(jax.tree.leaves(ky))
    rnd = _make(hyper_cleaning.cleaning_problem(hyper_cleaning.linear_logits, 0.1), cfg, lay, x0,
                cost=costs.PerGradient(price), available=data.available)
    state = federated.init_state(x0, y0, optax.sgd(1.0))
    _, metrics = rnd.step(state, data)
    s_in, s_out = (np.asarray(ids) for ids in rnd.sample_fn(state.round))
    return float(metrics["client_flops"]), counts, s_in, s_out

  def test_clients_are_charged_for_their_own_samples(self):
    # T = 2, N = 2 products, tau = 1: a FedInn client makes 1 + 2T = 5 gradient evaluations, a
    # FedOut client 3 + 1 + 2 = 6 first-order passes and N + 1 = 3 products (2 gradients each),
    # 12 in all. Clients own 2, 3 and 4 samples; a gradient costs 6 x 9 x (own samples).
    flops, _, _, _ = self._step(3, owned=True)
    self.assertEqual(flops, (5 + 12) * 6 * 9 * (2 + 3 + 4))  # 8262: every client in both phases
    flops, counts, s_in, s_out = self._step(2, owned=True)
    self.assertEqual(flops, 5 * 6 * 9 * counts[s_in].sum() + 12 * 6 * 9 * counts[s_out].sum())
    # Without owned units (task 1's rule: x shared by all) every client pays for all 9 logits.
    flops, _, _, _ = self._step(3, owned=False)
    self.assertEqual(flops, 3 * (5 + 12) * 6 * 9 * 9)


class QuadraticTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))  # float64 here only (a global switch would leak)

  def _round(self, heterogeneity, **kw):
    d = quadratic.make_quadratic(6, 3, 4, seed=1, heterogeneity=heterogeneity)
    cfg = _config(6, 6, lr=0.2, **kw)
    data = federated.FederatedData(d, d, jnp.ones(6))
    x = jnp.asarray([0.3, -0.2, 0.5])
    state = federated.init_state(x, jnp.zeros(4), optax.sgd(1.0))
    new, metrics = _make(quadratic.QUADRATIC, cfg, None, x,
                         fednest_neumann="series").step(state, data)
    return d, state, new, metrics

  def test_server_averaged_series_is_the_centralised_one(self):
    for heterogeneity in (0.0, 1.0):  # quadratic: every client mean is the mean problem's
      d, state, new, metrics = self._round(heterogeneity)
      h = (state.x - new.x) / 0.2  # tau = 1, server SGD(1): x+ = x - alpha h
      mean = quadratic.quadratic_mean(d)
      ref = hypergrad.hypergradient(quadratic.QUADRATIC, state.x, new.y, mean, mean,
                                    estimator="neumann", num_steps=6, step_size=0.2)
      np.testing.assert_allclose(h, ref.hypergrad, rtol=1e-10, atol=0)
      np.testing.assert_allclose(new.v, ref.v, rtol=1e-10, atol=0)
      np.testing.assert_allclose(float(metrics["hypergrad_norm"]),
                                 float(jnp.linalg.norm(ref.hypergrad)), rtol=1e-10)

  def test_rounds_reduce_the_true_hypergradient(self):
    d = quadratic.make_quadratic(10, 3, 4, seed=2, heterogeneity=1.0)
    cfg = _config(10, 5, lr=0.2, num_steps=15)
    data = federated.FederatedData(d, d, jnp.ones(10))
    x = jnp.asarray([1.0, -1.0, 2.0])
    state = federated.init_state(x, jnp.zeros(4), optax.sgd(1.0))
    rnd = _make(quadratic.QUADRATIC, cfg, None, x)
    for _ in range(30):
      state, _ = rnd.step(state, data)
    before = float(jnp.linalg.norm(quadratic.quadratic_hypergrad(x, d)))
    after = float(jnp.linalg.norm(quadratic.quadratic_hypergrad(state.x, d)))
    self.assertLess(after, 0.5 * before)


class NeumannTest(absltest.TestCase):
  """FedIHGP's v on g_i = y'H_i y / 2 + x'y, f_i = c_i'y: grad_y f = c_i, H_i constant, J = I,
  so the hypergradient is h = -v and one round moves x by +hlr v (tau 1, float64)."""

  PROBLEM = problems.BilevelProblem(lambda x, y, b: 0.5 * y @ (b["h"] @ y) + x @ y,
                                    lambda x, y, b: b["c"] @ y)

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def _round(self, h, c, num_steps, hlr, neumann):
    h, c = jnp.asarray(h, jnp.float64), jnp.asarray(c, jnp.float64)
    m, d = c.shape
    split = {"h": h, "c": c}
    data = federated.FederatedData(split, split, jnp.ones(m))
    cfg = _config(m, m, inner_steps=1, num_steps=num_steps, lr=hlr)
    x = jnp.zeros(d)
    state = federated.init_state(x, jnp.zeros(d), optax.sgd(1.0))
    rnd = _make(self.PROBLEM, cfg, None, x, fednest_neumann=neumann)
    new, metrics = rnd.step(state, data)
    np.testing.assert_allclose(new.x, hlr * new.v, rtol=1e-12)  # x + hlr v from x = 0
    np.testing.assert_allclose(float(metrics["hypergrad_norm"]), float(jnp.linalg.norm(new.v)),
                               rtol=1e-12)
    return np.asarray(new.v)

  def test_one_dimensional_case_by_hand(self):
    # H_1 = 1, H_2 = 3, c0 = 1, hlr 0.1, N = 2 products: (I - hlr H_i) = 0.9, 0.7.
    # Code: v = 0.1 (1 + (0.9 + 0.7) / 2 + (0.81 + 0.49) / 2 / 2) = 0.1 (1 + 0.8 + 0.325).
    # Series on the mean H = 2: v = 0.1 (1 + 0.8 + 0.64).
    args = ([[[1.0]], [[3.0]]], [[1.0], [1.0]], 3, 0.1)
    np.testing.assert_allclose(self._round(*args, "code"), [0.2125], rtol=1e-12)
    np.testing.assert_allclose(self._round(*args, "series"), [0.244], rtol=1e-12)

  def test_code_form_is_fednest_loop(self):
    """Against a transcription of FedNest's fedIHGP (global_batch) and hvp_iter loops: a
    counter per client, started from the averaged p at its first product, and one message
    list for all N averagings."""
    rng = np.random.default_rng(3)
    m, d, n, hlr = 3, 4, 4, 0.2
    q = [np.linalg.qr(rng.normal(size=(d, d)))[0] for _ in range(m)]
    h = np.stack([qi @ np.diag(rng.uniform(0.5, 4.0, d)) @ qi.T for qi in q])
    c = rng.normal(size=(m, d))
    p = c.mean(axis=0)
    counters, messages = [None] * m, []
    for _ in range(n):
      for i in range(m):
        if counters[i] is None:
          counters[i] = p.copy()
        counters[i] = counters[i] - hlr * h[i] @ counters[i]
        messages.append(p + counters[i])
      p = np.mean(messages, axis=0)
    ours = self._round(h, c, n + 1, hlr, "code")
    np.testing.assert_allclose(ours, hlr * p, rtol=1e-12)
    series = self._round(h, c, n + 1, hlr, "series")
    self.assertGreater(np.linalg.norm(series - ours) / np.linalg.norm(ours), 0.05)


class OneStepTest(absltest.TestCase):
  """hlr: one step for the Neumann series, the scale of v and the x step (outer_lr)."""

  KW = dict(problem=quadratic.QUADRATIC, num_clients=4)

  def test_v_lr_follows_outer_lr(self):
    o = algorithms.get("fednest", outer_lr=0.1, **self.KW).options
    self.assertEqual((o.outer_lr, o.v_lr), (0.1, 0.1))
    self.assertEqual(algorithms.get("fednest", outer_lr=0.1, v_lr=0.1, **self.KW).options.v_lr,
                     0.1)
    with self.assertRaisesRegex(ConfigError, "one step hlr"):
      algorithms.get("fednest", outer_lr=0.1, v_lr=0.03, **self.KW)

  def test_neumann_form_is_fednests_option(self):
    self.assertEqual(algorithms.get("fednest", **self.KW).options.fednest_neumann, "code")
    with self.assertRaisesRegex(ConfigError, "allowed values: code, series"):
      algorithms.get("fednest", fednest_neumann="bogus", **self.KW)
    with self.assertRaisesRegex(ConfigError, "'rafbo' does not use option fednest_neumann"):
      algorithms.get("rafbo", fednest_neumann="series", granularity="element", **self.KW)


class DriverTest(absltest.TestCase):

  @pytest.mark.slow
  def test_fednest_and_lfednest_run(self):
    from experiments import common, hyper_representation  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    for algorithm, neumann in (("fednest", "code"), ("fednest", "series"), ("lfednest", "code")):
      with tempfile.TemporaryDirectory() as workdir, \
          mock.patch("bilevel.checkpoint.plot_records"), \
          flagsaver.flagsaver(algorithm=algorithm, dataset="digits", num_clients=4,
                              clients_per_round=2, hidden=16, rounds=2, workdir=workdir,
                              checkpoint_every=0, fednest_neumann=neumann), \
          contextlib.redirect_stdout(io.StringIO()):
        hyper_representation.main([])
        self.assertTrue(os.path.exists(os.path.join(workdir, "summary.json")), algorithm)
        with open(os.path.join(workdir, "config.json")) as f:  # the series is named in records
          self.assertEqual(json.load(f)["flags"]["fednest_neumann"], neumann)


if __name__ == "__main__":
  absltest.main()
