"""FedNest's communicating round (bilevel/fednest.py).

- At FedNest's config A shape (100 clients, 10 per phase, T = 5, N = 5, tau = 1) one round makes
  110 first-order passes in FedInn, 60 in FedOut, 50 HVPs, 10 cross products, 10 server
  averagings (communication rounds) and one x update: counted call by call (client loop,
  jax.disable_jit, every oracle call and loss evaluation counted), and equal to the metrics.
- On the quadratic toy the server-averaged Neumann hypergradient equals the centralised
  Neumann hypergradient of the mean problem (rtol 1e-10, float64).
- A few rounds on the toy reduce the true hypergradient norm.
- The drivers run --algorithm=fednest and --algorithm=lfednest.
"""

import collections
import contextlib
import io
import os
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from absl import flags
from absl.testing import absltest, flagsaver

from bilevel import algorithms, federated, fednest, hypergrad, models, problems, rounds, server
from bilevel import tree
from bilevel.client import ClientConfig, minibatch_sampler
from bilevel.errors import ConfigError
from bilevel.hypergrad import EstimatorOptions
from bilevel.masks import Level, MaskConfig

def _config(num_clients, per_round, *, inner_steps=5, num_steps=6, local_steps=1, lr=0.01,
            **kw):
  client = ClientConfig(local_steps=local_steps, inner_steps=inner_steps, inner_lr=lr,
                        outer_lr=lr, estimator="neumann",
                        estimator_options=EstimatorOptions(num_steps=num_steps, step_size=lr))
  return federated.FederatedConfig(num_clients, per_round, client,
                                   mask=MaskConfig("random", "element"), round_kind="fednest",
                                   **kw)


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


class CountTest(absltest.TestCase):

  @pytest.mark.slow
  def test_config_a_counts(self):
    calls, loss_calls = collections.Counter(), collections.Counter()
    base = models.hyper_representation_problem("tanh")

    def counted(name, loss):
      def fn(x, y, b):
        loss_calls[name] += 1
        return loss(x, y, b)
      return fn

    problem = problems.BilevelProblem(counted("g", base.inner_loss),
                                      counted("f", base.outer_loss))
    cfg = _config(100, 10)
    x0, y0 = models.init_mlp(jax.random.key(0), 5, 4, 3)
    oracle = _counting_oracle(fednest.make_oracle(problem), calls)
    rnd = algorithms.build_round(problem, cfg, None, x0, sample=minibatch_sampler(4),
                                 client_map=_loop_clients(10), jit=False)
    # Same builder, counting oracle: the test's round; the plain one above checks dispatch.
    rnd = fednest.make_fednest_round(problem, cfg, None, x0, sample=minibatch_sampler(4),
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
      new, metrics = rnd.step(state, _mlp_data(100))
    inner_passes = calls["grad_g"]
    outer_passes = (calls["grad_f_y"] + calls["hvp_point"] + calls["cross_point"]
                    + calls["grad_f_x"])
    self.assertEqual((inner_passes, outer_passes, calls["hvp"], calls["cross"], means[0],
                      steps[0]), (110, 60, 50, 10, 10, 1))
    # Each first-order pass evaluates its loss once; products replay a pass (no evaluation).
    self.assertEqual(loss_calls["g"], inner_passes + calls["hvp_point"] + calls["cross_point"])
    self.assertEqual(loss_calls["f"], calls["grad_f_y"] + calls["grad_f_x"])
    m = {k: int(v) for k, v in metrics.items() if k in fednest.COUNT_METRICS}
    self.assertEqual(m, dict(first_order_passes_inner=110, first_order_passes_outer=60,
                             first_order_passes=170, hvp_products=50, cross_products=10,
                             communication_rounds=10, messages=200))
    self.assertEqual(int(metrics["active_clients"]), 10)
    self.assertEqual(float(metrics["coverage_x_min"]), 10.0)
    self.assertEqual(float(metrics["uncovered_y_share"]), 0.0)
    self.assertEqual(int(new.round), 1)
    self.assertEqual(fednest.round_counts(cfg, 10)[:5], (110, 60, 50, 10, 10))

  def test_rejects_pruning_and_compact(self):
    x0 = jnp.zeros(3)
    with self.assertRaisesRegex(ConfigError, "round_kind='fednest'.*pruning levels"):
      fednest.make_fednest_round(problems.QUADRATIC,
                                 _config(4, 2, levels=(Level(1, 1, 0.5), Level(0.5, 0.5, 0.5))),
                                 None, x0)
    with self.assertRaisesRegex(ConfigError, "submodel='compact'"):
      fednest.make_fednest_round(problems.QUADRATIC, _config(4, 2), None, x0, submodel="compact")
    # The local round's builder does not build FedNest's (bilevel.algorithms chooses).
    with self.assertRaisesRegex(ConfigError, "fednest.make_fednest_round"):
      rounds.make_round(problems.QUADRATIC, _config(4, 2), None, x0)
    with self.assertRaisesRegex(ConfigError, "round_kind='bogus' is not known"):
      federated.validate_config(_config(4, 2)._replace(round_kind="bogus"))


class HyperCleaningFlopsTest(absltest.TestCase):
  """Task 2: a client is charged for its own samples' weight logits, not every client's."""

  def _step(self, per_round, owned):
    from experiments import hyper_cleaning  # pylint: disable=g-import-not-at-top
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
    flops_per_grad = lambda kx, ky: 6.0 * kx["gate"] * sum(jax.tree.leaves(ky))
    rnd = fednest.make_fednest_round(
        hyper_cleaning.cleaning_problem(hyper_cleaning.linear_logits, 0.1), cfg, lay, x0,
        flops_per_grad=flops_per_grad)
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
    d = problems.make_quadratic(6, 3, 4, seed=1, heterogeneity=heterogeneity)
    cfg = _config(6, 6, lr=0.2, **kw)
    data = federated.FederatedData(d, d, jnp.ones(6))
    x = jnp.asarray([0.3, -0.2, 0.5])
    state = federated.init_state(x, jnp.zeros(4), optax.sgd(1.0))
    new, metrics = fednest.make_fednest_round(problems.QUADRATIC, cfg, None, x).step(state, data)
    return d, state, new, metrics

  def test_server_averaged_neumann_is_the_centralised_one(self):
    for heterogeneity in (0.0, 1.0):  # quadratic: every client mean is the mean problem's
      d, state, new, metrics = self._round(heterogeneity)
      h = (state.x - new.x) / 0.2  # tau = 1, server SGD(1): x+ = x - alpha h
      mean = problems.quadratic_mean(d)
      ref = hypergrad.hypergradient(problems.QUADRATIC, state.x, new.y, mean, mean,
                                    estimator="neumann", num_steps=6, step_size=0.2)
      np.testing.assert_allclose(h, ref.hypergrad, rtol=1e-10, atol=0)
      np.testing.assert_allclose(new.v, ref.v, rtol=1e-10, atol=0)
      np.testing.assert_allclose(float(metrics["hypergrad_norm"]),
                                 float(jnp.linalg.norm(ref.hypergrad)), rtol=1e-10)

  def test_rounds_reduce_the_true_hypergradient(self):
    d = problems.make_quadratic(10, 3, 4, seed=2, heterogeneity=1.0)
    cfg = _config(10, 5, lr=0.2, num_steps=15)
    data = federated.FederatedData(d, d, jnp.ones(10))
    x = jnp.asarray([1.0, -1.0, 2.0])
    state = federated.init_state(x, jnp.zeros(4), optax.sgd(1.0))
    rnd = fednest.make_fednest_round(problems.QUADRATIC, cfg, None, x)
    for _ in range(30):
      state, _ = rnd.step(state, data)
    before = float(jnp.linalg.norm(problems.quadratic_hypergrad(x, d)))
    after = float(jnp.linalg.norm(problems.quadratic_hypergrad(state.x, d)))
    self.assertLess(after, 0.5 * before)


class DriverTest(absltest.TestCase):

  @pytest.mark.slow
  def test_fednest_and_lfednest_run(self):
    from experiments import common, hyper_representation  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    for algorithm in ("fednest", "lfednest"):
      with tempfile.TemporaryDirectory() as workdir, \
          mock.patch.object(common, "plot_records"), \
          flagsaver.flagsaver(algorithm=algorithm, dataset="digits", num_clients=4,
                              clients_per_round=2, hidden=16, rounds=2, workdir=workdir,
                              checkpoint_every=0), \
          contextlib.redirect_stdout(io.StringIO()):
        hyper_representation.main([])
        self.assertTrue(os.path.exists(os.path.join(workdir, "summary.json")), algorithm)


if __name__ == "__main__":
  absltest.main()
