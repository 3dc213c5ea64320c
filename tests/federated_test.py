"""The federated round (rafbo.make_round, built by bilevel.algorithms.get): reduction to the unpruned algorithm, vmap vs the
Python-loop reference round (`loop_step`, the oracle), tracing, seeds, convergence on the toy
problem, and configuration errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

from bilevel import algorithms, costs, federated, hypergrad, inner, loop, server, tree
from bilevel import masks as masks_lib
from bilevel.errors import ConfigError
import quadratic  # tests/quadratic.py

M, D = 6, 5
LEVELS = masks_lib.parse_levels("1/1:0.34,0.5/0.5:0.33,0.25/0.25:0.33")


OPTS = dict(num_steps=2, step_size=0.2, delta=1e-4)


def _client(local_steps=3, estimator="fd"):
  """The local update's keywords (bilevel.algorithms.get)."""
  return dict(local_steps=local_steps, inner_steps=2, inner_lr=0.2, outer_lr=0.1,
              estimator=estimator, num_steps=OPTS["num_steps"], v_lr=OPTS["step_size"],
              delta=OPTS["delta"])


def _evals(local_steps=3, estimator="fd"):
  return costs.grad_evals_per_round(local_steps=local_steps, inner_steps=2, inner_step="cauchy",
                                    estimator=hypergrad.named(estimator, **OPTS))


def _round(cfg, x0, dim=D, name="rafbo", num_clients=M):
  """(the round of options cfg, its algorithm) on the quadratic of width dim."""
  alg = algorithms.get(name, problem=quadratic.QUADRATIC, num_clients=num_clients,
                       layout=quadratic.quadratic_layout(dim), **cfg)
  return alg.make_round(x0), alg


def _setup(heterogeneity=1.0, dtype=np.float64):
  d = quadratic.make_quadratic(M, D, D, seed=0, heterogeneity=heterogeneity, separable=True,
                              dtype=dtype)
  data = federated.FederatedData(d, d, jnp.arange(1, M + 1))
  x0 = jnp.full(D, 3.0, dtype)
  return d, data, x0, jnp.zeros(D, dtype)


def loop_step(rnd: federated.Round):
  """The reference round: rnd's own sample, client and server functions, with the clients of
  each group run one by one in a Python loop (inside one jit) instead of one vmap."""

  @jax.jit
  def step(state, data):
    q = state.round
    id_groups = rnd.sample_fn(q)
    if len(rnd.client_fns) == 1 and len(id_groups) > 1:  # dense, stratified: one group
      id_groups = [jnp.concatenate(id_groups)]
    outs, offset = [], 0
    for fn, ids in zip(rnd.client_fns, id_groups):
      slots = jnp.arange(offset, offset + ids.shape[0])
      offset += ids.shape[0]
      outs.append(tree.stack([fn(state, data, ids[i], slots[i], q)
                              for i in range(ids.shape[0])]))
    return rnd.server_fn(state, outs)

  return step


def _run(cfg, num_rounds, dtype=np.float64, reference_loop=False, heterogeneity=1.0,
         name="rafbo"):
  d, data, x0, y0 = _setup(heterogeneity, dtype)
  rnd, alg = _round(cfg, x0, name=name)
  if reference_loop:
    rnd = rnd._replace(step=loop_step(rnd))
  state = federated.init_state(x0, y0, alg.optimizer)
  state, records = loop.run(rnd, state, data, num_rounds, log=None,
                                 eval_fn=lambda s: {"true_hypergrad_norm": jnp.linalg.norm(
                                     quadratic.quadratic_hypergrad(s.x, d))})
  return state, records, rnd


class RoundTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  @parameterized.product(local_steps=(1, 3), estimator=tuple(hypergrad.ESTIMATORS))
  def test_keep_ratio_one_is_the_unpruned_algorithm(self, local_steps, estimator):
    state, _, _ = _run(dict(clients_per_round=M, **_client(local_steps, estimator)), 3)
    # Reference: the unpruned algorithm written out with the public pieces, no masks anywhere.
    d, _, x, y = _setup()
    v = jnp.zeros(D)
    est = hypergrad.named(estimator, **OPTS)

    @jax.jit
    def local(x, y, v, batch):
      for _ in range(local_steps):
        y = inner.inner_solve(quadratic.quadratic_inner, x, y, batch,
                              num_steps=2, step_size=0.2, step_rule="cauchy",
                              product=est.product, delta=est.delta)
        res = hypergrad.hypergradient(quadratic.QUADRATIC, x, y, batch, batch, v=v,
                                      estimator=estimator, **OPTS)
        x, v = x - 0.1 * res.hypergrad, res.v
      return x, y, v

    for _ in range(3):
      outs = [local(x, y, v, tree.index(d, i)) for i in range(M)]
      x, y, v = (s + np.mean([o[k] - s for o in outs], axis=0) for k, s in enumerate((x, y, v)))
    # Algebraically identical; the order of floating-point operations differs, and fd divides
    # rounding errors by the probe length (1e-4): 1e-16 / 1e-4 ~ 1e-12 per product.
    rtol = 1e-10 if estimator == "fd" else 1e-12
    chex.assert_trees_all_close((state.x, state.y, state.v), (x, y, v), rtol=rtol,
                                atol=rtol * 1e-2)

  @parameterized.parameters((np.float64, 1e-12), (np.float32, 1e-5))
  @pytest.mark.slow
  @pytest.mark.usefixtures("xla_optimised")  # the tolerances are of the optimised programs
  def test_vmap_equals_loop(self, dtype, rtol):
    cfg = dict(clients_per_round=4, **_client(), levels=LEVELS)
    a, ra, _ = _run(cfg, 3, dtype=dtype)
    b, rb, _ = _run(cfg, 3, dtype=dtype, reference_loop=True)
    chex.assert_trees_all_close((a.x, a.y, a.v), (b.x, b.y, b.v), rtol=rtol, atol=rtol * 1e-2)
    self.assertEqual(ra[-1]["coverage_x_min"], rb[-1]["coverage_x_min"])

  def test_round_is_traced_once(self):
    chex.clear_trace_counter()
    # The gradient price runs once in a trace of the round (one vmapped client function): a second
    # trace raises.
    flops = chex.assert_max_traces(costs.default_flops_per_grad, n=1)
    cfg = dict(clients_per_round=3, **_client(), levels=LEVELS, cost=costs.PerGradient(flops))
    _, records, _ = _run(cfg, 6)
    self.assertLen(records, 6)
    # ... and it was traced: one more traced call is its second.
    with self.assertRaisesRegex(AssertionError, "traced > 1 times"):
      jax.eval_shape(flops, 1.0, 1.0)

  def test_same_seed_same_metrics_other_seed_different(self):
    make = lambda seed: dict(clients_per_round=3, **_client(), levels=LEVELS, seed=seed)
    timing = ("wall_time_s", "first_round_s")  # seconds differ between runs; nothing else may
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]
    _, r1, _ = _run(make(0), 4)
    _, r2, _ = _run(make(0), 4)
    _, r3, _ = _run(make(1), 4)
    self.assertEqual(strip(r1), strip(r2))
    self.assertNotEqual(strip(r1), strip(r3))

  @parameterized.parameters("random", "rolling")
  def test_rafbo_with_pruning_converges_on_toy(self, policy):
    # Homogeneous clients: the fixed point of every submodel update is the stationary point, so
    # the true hypergradient norm must fall geometrically (client heterogeneity adds a noise floor
    # proportional to step size x heterogeneity; see WORKSPACE.md).
    cfg = dict(clients_per_round=3, **_client(local_steps=5), levels=LEVELS, mask_policy=policy)
    _, records, _ = _run(cfg, 300, heterogeneity=0.0)
    d, _, x0, _ = _setup(0.0)
    start = float(jnp.linalg.norm(quadratic.quadratic_hypergrad(x0, d)))
    self.assertLess(records[-1]["true_hypergrad_norm"], start / 100)
    self.assertLess(records[-1]["cx_star"], 3)  # pruning really left coordinates to fewer clients

  def test_metrics_count_coverage_flops_and_bytes(self):
    # static masks: the last coordinate is kept by the full-size clients alone
    cfg = dict(clients_per_round=M, **_client(), levels=LEVELS, mask_policy="static")
    _, records, rnd = _run(cfg, 2)
    rec = records[-1]
    kept = np.ceil(rnd.client_ratios * D - 1e-6)  # [M, 2] kept coordinates of x and y
    self.assertEqual(rec["comm_bytes"], 2 * 8 * np.sum(kept[:, 0] + 2 * kept[:, 1]))
    self.assertEqual(rec["coverage_x_min"], np.sum(rnd.client_ratios[:, 0] == 1))
    self.assertEqual(rec["cumulative_client_flops"], 2 * rec["client_flops"])
    # Hand count: per local step (3) the inner steps (2), each a gradient and the Cauchy
    # inner step's H g (an fd product, 2 grads), one grad of f, and fd products of 2 grads of
    # g each: num_steps (2) H v, the Cauchy step's warm-start H v, the final J v.
    evals = 3 * (2 * (1 + 2) + 1 + 2 * (2 + 1 + 1))
    self.assertEqual(_evals(), evals)
    # Every client's gradients cost 6 FLOPs per kept entry of x and y.
    self.assertEqual(rec["client_flops"], evals * 6 * np.sum(kept))

  @pytest.mark.slow
  def test_hypergrad_norm_is_the_coverage_mean_of_client_hypergradients(self):
    # The round derives the metric from the x deltas (-D_x / (alpha K)); here it is recomputed
    # from what the clients report as their mean hypergradient, with the public coverage_mean
    # (dense round; compact_test checks compact = dense for this metric).
    cfg = dict(clients_per_round=4, **_client(local_steps=3), levels=LEVELS, weighting="examples")
    d, data, x0, y0 = _setup()
    rnd, alg = _round(cfg, x0)
    state = federated.init_state(x0, y0, alg.optimizer)
    state, _ = rnd.step(state, data)  # a round in: v != 0
    _, metrics = rnd.step(state, data)
    hyper, masks, weights = [], [], []
    for fn, ids in zip(rnd.client_fns, rnd.sample_fn(state.round)):
      for slot, cid in enumerate(np.asarray(ids)):
        res = fn(state, data, jnp.asarray(cid), jnp.asarray(slot), state.round)
        hyper.append(res.out.hypergrad)
        masks.append(res.mask_x)
        weights.append(res.weight)
    want = tree.norm(server.coverage_mean(tree.stack(hyper), tree.stack(masks),
                                          jnp.stack(weights)))
    # K = 3 local steps of x - alpha h: the delta x_K - x_0 keeps x's absolute rounding (1e-16
    # |x|), so relative to alpha |h| it is larger by |x| / (alpha |h|); measured 1.04e-12 with
    # the Cauchy v step, so 1e-11 (float64).
    np.testing.assert_allclose(metrics["hypergrad_norm"], want, rtol=1e-11)

  def test_only_full_samples_full_clients(self):
    cfg = dict(clients_per_round=4, **_client(), levels=LEVELS)
    _, records, rnd = _run(cfg, 2, name="full_only")
    self.assertTrue(np.all(rnd.client_ratios[rnd.population] == 1))
    self.assertEqual(records[-1]["active_clients"], len(rnd.population))
    self.assertEqual(records[-1]["coverage_x_min"], len(rnd.population))

  def test_redrawn_levels_run(self):
    cfg = dict(clients_per_round=4, **_client(), levels=LEVELS, redraw_levels=True)
    _, records, _ = _run(cfg, 3)
    self.assertTrue(np.isfinite(records[-1]["outer_loss"]))


def _cost_metrics(estimator, dim, levels, dtype=np.float32):
  """One round's metrics on the separable quadratic of width dim, every client taking part."""
  d = quadratic.make_quadratic(3, dim, dim, seed=0, separable=True, dtype=dtype)
  cfg = dict(clients_per_round=3, **_client(1, estimator), levels=levels)
  x0 = jnp.zeros(dim, dtype)
  rnd, _ = _round(cfg, x0, dim, num_clients=3)
  state = federated.init_state(x0, jnp.zeros(dim, dtype), optax.sgd(1.0))
  return rnd.step(state, federated.FederatedData(d, d, jnp.ones(3)))[1]


class CostTest(parameterized.TestCase):
  """FLOPs and bytes from exact keep counts (float32 rounds: ratios are float32 inside)."""

  @parameterized.parameters((200, (60, 120, 140)), (100, (30, 60, 70)))
  def test_costs_use_exact_keep_counts(self, dim, kept):
    metrics = _cost_metrics("fd", dim, "0.3/0.3:0.34,0.6/0.6:0.33,0.7/0.7:0.33")
    evals = _evals(1)
    # x and y keep k coordinates each (one shared group); fd sends x, y and v down and up.
    self.assertEqual(float(metrics["client_flops"]), evals * 6.0 * 2 * sum(kept))
    self.assertEqual(float(metrics["comm_bytes"]), 2 * 4 * 3 * sum(kept))
    self.assertAlmostEqual(float(metrics["coverage_x_mean"]), sum(kept) / dim, places=6)

  @parameterized.parameters(("fd", 3), ("exact", 3), ("cg", 3), ("neumann", 2))
  def test_v_is_charged_only_to_estimators_that_read_it(self, estimator, trees):
    # neumann (FedNest) starts its series from grad_y f: v is neither received nor returned.
    metrics = _cost_metrics(estimator, 10, "1/1:0.34,0.5/0.5:0.33,0.3/0.3:0.33")
    self.assertEqual(float(metrics["comm_bytes"]), 2 * 4 * trees * (10 + 5 + 3))


class ConfigErrorTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("too_many_clients", dict(clients_per_round=M + 1), r"clients_per_round=7 .*\[1, num_clients=6\]"),
      ("policy", dict(mask_policy="lottery"), "mask_policy='lottery'.*random"),
      ("granularity", dict(granularity="block"), "mask_granularity='block'"),
      ("estimator", dict(estimator="hessian"), "estimator='hessian'.*fd"),
      ("aggregation", dict(aggregation="median"), "aggregation='median'"),
      ("uncovered", dict(mask_policy="static", levels="0.5/0.5:1"), "static.*uncovered"),
      ("keep_ratio", dict(levels=(masks_lib.Level(1.2, 1.0, 1.0),)), r"rx=1\.2.*\(0, 1\]"),
      ("shares", dict(levels=(masks_lib.Level(1, 1, 0.5),)), "sum to 0.5"),
      ("server_lr", dict(server_lr=0.0), "server_lr=0.0"),
      ("local_steps", dict(local_steps=0), "local_steps=0"),
  )
  def test_bad_config_raises_one_clear_error(self, override, message):
    x0 = jnp.zeros(D)
    with self.assertRaisesRegex(ConfigError, message):
      _round(dict(dict(clients_per_round=3), **override), x0)


if __name__ == "__main__":
  absltest.main()
