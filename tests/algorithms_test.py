"""bilevel.algorithms: the user example for every algorithm, keywords, errors, and library
defaults = driver defaults (experiments/common.py make_algorithm)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from absl import flags
from absl.testing import absltest, flagsaver, parameterized

import bilevel
from bilevel import algorithms, costs, federated, hypergrad, loop, masks, models, server
from bilevel.algorithms import fednest
from bilevel.errors import ConfigError
from bilevel.masks import Level

# The example, verbatim; the tests run it with "rafbo" replaced by every name.
USER_EXAMPLE = '''
import jax, jax.numpy as jnp, bilevel

def inner(x, y, b):   # any differentiable losses over pytrees x, y and a batch
  return jnp.mean((b["a"] @ y["w"] - b["t"]) ** 2) + jnp.sum(jnp.exp(x["log_reg"]) * y["w"] ** 2)

def outer(x, y, b):
  return jnp.mean((b["a"] @ y["w"] - b["t"]) ** 2)

M, N, D = 8, 16, 5
k1, k2 = jax.random.split(jax.random.key(0))
split = lambda k: {"a": jax.random.normal(k, (M, N, D)), "t": jax.random.normal(k, (M, N))}
data = bilevel.FederatedData(inner=split(k1), outer=split(k2), num_examples=jnp.full((M,), N))
alg = bilevel.algorithms.get("rafbo", problem=bilevel.BilevelProblem(inner, outer),
                             num_clients=M, clients_per_round=4, levels="1/1:0.5,0.5/0.5:0.5",
                             granularity="element", seed=0)
state = alg.init({"log_reg": jnp.zeros(D)}, {"w": jnp.zeros(D)})
for _ in range(20):
  state, metrics = alg.step(state, data)     # jitted once
print(metrics["outer_loss"], metrics["coverage_x_min"], metrics["hypergrad_norm"])
'''

METRIC_KEYS = {"inner_loss", "outer_loss", "hypergrad_norm", "coverage_x_min", "coverage_x_mean",
               "uncovered_x_share", "coverage_y_min", "coverage_y_mean", "uncovered_y_share",
               "client_flops", "comm_bytes", "active_clients"}
FULL_MODEL = ("fednest", "lfednest", "simfbo", "memfbo")


def _regression(M=6, N=12, D=4, seed=1):
  """A ridge-regularised regression with signal: x = log ridge weight, y = (w, b)."""

  def inner(x, y, b):
    r = b["a"] @ y["w"] + y["b"] - b["t"]
    return 0.5 * jnp.mean(r ** 2) + 0.5 * jnp.exp(x["log_reg"]) * jnp.sum(y["w"] ** 2)

  def outer(x, y, b):
    return 0.5 * jnp.mean((b["a"] @ y["w"] + y["b"] - b["t"]) ** 2)

  ka, kb, kw = jax.random.split(jax.random.key(seed), 3)
  w_true = jax.random.normal(kw, (D,))

  def split(k):
    k1, k2 = jax.random.split(k)
    a = jax.random.normal(k1, (M, N, D))
    return {"a": a, "t": a @ w_true + 0.1 * jax.random.normal(k2, (M, N))}

  data = bilevel.FederatedData(split(ka), split(kb), jnp.full((M,), N))
  x0, y0 = {"log_reg": jnp.array(1.0)}, {"w": jnp.zeros(D), "b": jnp.zeros(())}
  return bilevel.BilevelProblem(inner, outer), data, x0, y0


def _problem():
  return bilevel.BilevelProblem(lambda x, y, b: jnp.sum((x - y) ** 2),
                                lambda x, y, b: jnp.sum(y ** 2))


def _traced_once_flops():
  """A gradient price (costs.PerGradient) that raises on its second traced call: every algorithm's round calls it once
  per trace (one client function; FedNest's metrics), so a retraced round raises."""
  chex.clear_trace_counter()
  return chex.assert_max_traces(costs.default_flops_per_grad, n=1)


def _assert_traced(test, flops):
  """flops (from _traced_once_flops) was traced: one more traced call is its second."""
  with test.assertRaisesRegex(AssertionError, "traced > 1 times"):
    jax.eval_shape(flops, 1.0, 1.0)


class UserExampleTest(parameterized.TestCase):

  @parameterized.named_parameters((n, n) for n in algorithms.names())
  def test_runs_as_written(self, name):
    # As written, with the algorithm's name and a FLOP model that checks "jitted once".
    scope = {"flops": _traced_once_flops()}
    scope["cost"] = costs.PerGradient(scope["flops"])
    example = USER_EXAMPLE.replace('"rafbo",', f"{name!r}, cost=cost,")
    exec(example, scope)  # pylint: disable=exec-used
    alg, state, metrics = scope["alg"], scope["state"], scope["metrics"]
    self.assertEqual(alg.name, name)
    # fednest also reports its analytic per-round operation counts (bilevel/algorithms/fednest.py).
    extra = set(fednest.COUNT_METRICS) if name == "fednest" else set()
    self.assertEqual(set(metrics), METRIC_KEYS | extra)
    for k, v in metrics.items():
      self.assertTrue(np.isfinite(v), f"{name}: {k} = {v}")
    self.assertEqual(int(state.round), 20)
    # 4 clients every round: rabo's clients_per_round was given; full_only samples the 4 of 8
    # clients at level 1/1.
    self.assertEqual(int(metrics["active_clients"]), 4)
    if name in FULL_MODEL + ("full_only",):  # 4 clients on the full model
      self.assertEqual(float(metrics["coverage_x_min"]), 4.0)
    else:
      self.assertBetween(float(metrics["coverage_x_min"]), 1.0, 4.0)
    # Jitted once: 20 steps, one trace.
    _assert_traced(self, scope["flops"])
    # No decrease is asserted here: in this example the inner and outer data are unrelated
    # random draws and y starts at w = 0, so for every algorithm the outer loss rises over the
    # first 20 rounds as y fits the inner data (KeywordsTest asserts the decrease on data with
    # signal).


class ComponentsTest(absltest.TestCase):
  """Estimators, mask policies and aggregators are values: a name and its value run the same
  round, and a user-written one is the one the round runs."""

  def _step(self, **kw):
    problem, data, x0, y0 = _regression()
    alg = algorithms.get("rafbo", problem=problem, num_clients=6, granularity="element",
                         levels="1/1:0.5,0.5/0.5:0.5", local_steps=2, **kw)
    return alg, alg.step(alg.init(x0, y0), data)

  def test_a_name_and_its_value_run_the_same_round(self):
    by_name, out = self._step(estimator="exact", num_steps=3, v_lr=0.2, v_step="fixed",
                              mask_policy="rolling", aggregation="zero_fill")
    by_value, same = self._step(estimator=hypergrad.exact(num_steps=3, step_size=0.2,
                                                          v_step="fixed"),
                                mask_policy=masks.rolling, aggregation=server.zero_fill_from_sums)
    chex.assert_trees_all_equal(out, same)
    self.assertEqual(by_name.estimator, by_value.estimator)
    o = by_value.options  # the flat options show the value's fields
    self.assertEqual((o.num_steps, o.v_lr, o.v_step), (3, 0.2, "fixed"))
    with self.assertRaisesRegex(ConfigError, "give num_steps to the estimator value"):
      self._step(estimator=hypergrad.fd(), num_steps=2)
    with self.assertRaisesRegex(ConfigError, "estimator=3 is neither"):
      self._step(estimator=3)

  def test_user_written_estimator_and_policy_are_used(self):
    seen = []

    def leading(key, round_idx, n, scores):  # static's order, recorded
      seen.append(n)
      return jnp.arange(n)

    class ZeroX:
      """fd's v with a zero hypergradient: x never moves."""
      product, delta, warm_start = "fd", 1e-3, True

      def __call__(self, *args):
        res = hypergrad.fd()(*args)
        return res._replace(hypergrad=jax.tree.map(jnp.zeros_like, res.hypergrad))

      def products(self):
        return hypergrad.fd().products()

    _, (state, metrics) = self._step(estimator=ZeroX(), mask_policy=leading)
    self.assertTrue(seen)
    self.assertEqual(float(metrics["hypergrad_norm"]), 0.0)
    np.testing.assert_array_equal(state.x["log_reg"], 1.0)
    # static's masks; the losses of the first local step, before x moves
    _, (_, static) = self._step(mask_policy="static")
    for key in ("coverage_x_mean", "coverage_y_min", "inner_loss", "outer_loss"):
      self.assertEqual(float(metrics[key]), float(static[key]), key)


class KeywordsTest(parameterized.TestCase):

  @parameterized.named_parameters((n, n) for n in algorithms.names())
  def test_same_form_other_problem_and_keywords(self, name):
    problem, data, x0, y0 = _regression()
    server_optimizer = optax.adam(0.01)
    # FedNest's round is its Neumann series by definition (another estimator: ConfigError).
    estimator = "neumann" if name == "fednest" else "exact"
    # FedNest has one step hlr (outer_lr): its Neumann step v_lr must equal it.
    hlr = dict(outer_lr=0.05) if name == "fednest" else {}
    flops = _traced_once_flops()
    alg = bilevel.algorithms.get(
        name, problem=problem, num_clients=6, levels=(Level(1, 1, 0.5), Level(0.5, 0.5, 0.5)),
        granularity="element", seed=3, local_steps=2, estimator=estimator, v_lr=0.05,
        server_optimizer=server_optimizer, cost=costs.PerGradient(flops), **hlr)
    o = alg.options
    self.assertEqual((o.local_steps, o.estimator, o.v_lr, o.seed), (2, estimator, 0.05, 3))
    self.assertIs(alg.optimizer, server_optimizer)
    state = alg.init(x0, y0)
    self.assertIsInstance(state.opt_state[0], optax.ScaleByAdamState)
    losses = []
    for _ in range(20):
      state, metrics = alg.step(state, data)
      losses.append(float(metrics["outer_loss"]))
    self.assertTrue(np.all(np.isfinite(losses)), losses)
    self.assertLess(losses[-1], losses[0])  # holds for every algorithm on this problem
    _assert_traced(self, flops)  # 20 steps, one trace

  def test_step_traces_once(self):
    problem, data, x0, y0 = _regression()
    flops = _traced_once_flops()
    alg = algorithms.rafbo.rafbo(problem=problem, num_clients=6, granularity="element",
                                 cost=costs.PerGradient(flops))
    state, _ = alg.step(alg.init(x0, y0), data)
    _assert_traced(self, flops)  # the first step traced; any retrace from now on raises
    for _ in range(5):
      state, _ = alg.step(state, data)

  def test_levels_string_and_sequence_agree(self):
    kw = dict(problem=_problem(), num_clients=4, granularity="element")
    a = algorithms.get("rafbo", levels="1/1:0.5,0.5/0.25:0.5", **kw)
    b = algorithms.get("rafbo", levels=[Level(1, 1, 0.5), (0.5, 0.25, 0.5)], **kw)
    self.assertEqual(a.options, b.options)
    self.assertEqual(a.options.levels, (Level(1, 1, 0.5), Level(0.5, 0.25, 0.5)))

  def test_defining_defaults(self):
    kw = dict(problem=_problem(), num_clients=8, granularity="element",
              levels="1/1:0.5,0.5/0.5:0.5")
    rabo = algorithms.get("rabo", **kw).options
    self.assertEqual((rabo.local_steps, rabo.clients_per_round), (1, 8))
    self.assertEqual(algorithms.get("rabo", clients_per_round=3, **kw).options.clients_per_round, 3)
    rafbo = algorithms.get("rafbo", **kw).options
    self.assertEqual((rafbo.local_steps, rafbo.clients_per_round), (5, 4))
    self.assertEqual(rafbo.levels, bilevel.parse_levels("1/1:0.5,0.5/0.5:0.5"))
    for name in FULL_MODEL:
      self.assertEqual(algorithms.get(name, **kw).options.levels, (Level(1, 1, 1),), name)
    lnest = algorithms.get("lfednest", **kw)
    self.assertEqual((lnest.spec.round_kind, lnest.options.estimator, lnest.options.inner_steps,
                      lnest.options.num_steps), ("local", "neumann", 5, 5))
    nest = algorithms.get("fednest", **kw)
    o = nest.options
    self.assertEqual((nest.spec.round_kind, o.local_steps, o.inner_steps, o.num_steps,
                      o.inner_lr, o.outer_lr, o.v_lr), ("fednest", 1, 5, 6, 0.01, 0.01, 0.01))
    self.assertEqual(algorithms.get("simfbo", **kw).options.estimator, "exact")
    self.assertTrue(algorithms.get("full_only", **kw).spec.only_full)
    self.assertEqual(algorithms.get("heterofl", **kw).options.mask_policy, "static")
    self.assertEqual(algorithms.get("fedrolex", **kw).options.mask_policy, "rolling")
    self.assertEqual(algorithms.get("fedrolex", mask_policy="random", **kw).options.mask_policy,
                     "random")
    default = algorithms.get("rafbo", problem=_problem(), num_clients=8, granularity="element")
    self.assertEqual(default.options.levels, (Level(1, 1, 1),))
    # Full-model algorithms need no layout: their masks keep everything.
    o = algorithms.get("simfbo", problem=_problem(), num_clients=2).options
    self.assertEqual((o.mask_policy, o.granularity), ("random", "element"))

  def test_constructors_equal_get(self):
    """Each algorithm's constructor (in its module: rafbo.py, fednest.py, baselines.py) builds
    what get builds."""
    kw = dict(problem=_problem(), num_clients=5, granularity="element", local_steps=3)
    modules = (algorithms.rafbo, algorithms.fednest, algorithms.baselines)
    for name in algorithms.names():
      (constructor,) = [getattr(m, name) for m in modules if callable(getattr(m, name, None))]
      self.assertEqual(constructor(**kw).options, algorithms.get(name, **kw).options)

  def test_bilevel_run_drives_an_algorithm(self):
    problem, data, x0, y0 = _regression()
    alg = algorithms.get("rabo", problem=problem, num_clients=6, granularity="element")
    state, records = bilevel.run(alg, alg.init(x0, y0), data, 3, log=None)
    self.assertEqual(int(state.round), 3)
    self.assertEqual([r["round"] for r in records], [1, 2, 3])

  @pytest.mark.slow
  def test_unit_granularity_with_layout(self):
    hidden, d_in, classes, M = 4, 3, 2, 4

    def logits(x, y, b):
      return models.mlp_logits(x, y, b["inputs"])

    problem = bilevel.BilevelProblem(
        lambda x, y, b: jnp.mean((logits(x, y, b) - b["target"]) ** 2)
        + 1e-2 * sum(jnp.sum(t ** 2) for t in jax.tree.leaves(y)),
        lambda x, y, b: jnp.mean((logits(x, y, b) - b["target"]) ** 2))
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = {"inputs": jax.random.normal(k1, (M, 8, d_in)),
             "target": jax.random.normal(k2, (M, 8, classes))}
    data = bilevel.FederatedData(batch, batch, jnp.full((M,), 8))
    x0, y0 = models.init_mlp(jax.random.key(1), d_in, hidden, classes)
    for submodel in ("dense", "compact"):
      alg = algorithms.get("rafbo", problem=problem, num_clients=M,
                           levels="1/1:0.5,0.5/0.5:0.5", layout=models.mlp_layout(hidden),
                           submodel=submodel, local_steps=2)
      self.assertEqual(alg.options.granularity, "unit")
      state, metrics = alg.step(alg.init(x0, y0), data)
      self.assertTrue(np.isfinite(metrics["outer_loss"]), submodel)


class ErrorsTest(parameterized.TestCase):

  def test_unknown_name(self):
    with self.assertRaisesRegex(ConfigError, "allowed values: rabo, rafbo, fednest, lfednest"):
      algorithms.get("fedavg", problem=_problem(), num_clients=2)

  def test_unknown_keyword(self):
    with self.assertRaisesRegex(ConfigError, r"unknown keyword\(s\) lr .*allowed keywords: "
                                r"problem, num_clients, clients_per_round, levels"):
      algorithms.get("rafbo", problem=_problem(), num_clients=2, granularity="element", lr=0.1)

  def test_unit_without_layout(self):
    with self.assertRaisesRegex(ConfigError, r"pass layout=.*mlp_layout.*granularity='element'"):
      algorithms.get("rafbo", problem=_problem(), num_clients=2)

  @parameterized.parameters(
      dict(levels="1/1:0.5"), dict(levels="1:1"), dict(levels=[(1, 1)]), dict(local_steps=0),
      dict(clients_per_round=9), dict(num_clients=0),
      dict(num_clients="eight"), dict(num_clients=2.5), dict(estimator="newton"),
      dict(mask_policy="sticky"), dict(granularity="row"), dict(v_lr=-1.0),
      dict(server_optimizer="adam"), dict(server_optimizer=optax.sgd(1.0), server_lr=0.5),
      dict(aggregation="median"), dict(problem=(None, None)))
  def test_bad_values(self, **bad):
    kw = dict(problem=_problem(), num_clients=4, granularity="element")
    kw.update(bad)
    with self.assertRaises(ConfigError):
      algorithms.get("rafbo", **kw)

  def test_full_only_needs_a_full_level(self):
    with self.assertRaisesRegex(ConfigError, "only_full"):
      algorithms.get("full_only", problem=_problem(), num_clients=4, granularity="element",
                     levels="0.5/0.5:1")

  def test_make_round_errors_are_config_errors(self):
    alg = algorithms.get("heterofl", problem=_problem(), num_clients=4, granularity="element",
                         levels="0.5/0.5:1")
    with self.assertRaisesRegex(ConfigError, "mask_policy='static'.*uncovered"):
      alg.init(jnp.zeros(4), jnp.zeros(4))
    alg = algorithms.get("rafbo", problem=_problem(), num_clients=4, granularity="element",
                         submodel="compact")
    with self.assertRaisesRegex(ConfigError, "submodel='compact'"):
      alg.init(jnp.zeros(4), jnp.zeros(4))


class DriverDefaultsTest(parameterized.TestCase):
  """get(name, ...).options equal what experiments/common.py resolves for --algorithm=name."""

  @parameterized.named_parameters((n, n) for n in algorithms.names())
  def test_library_defaults_are_driver_defaults(self, name):
    from experiments import common  # pylint: disable=g-import-not-at-top
    with flagsaver.flagsaver(algorithm=name):
      flags.FLAGS.mark_as_parsed()
      driver = common.make_algorithm(_problem(), models.mlp_layout(4)).options
      # The drivers' defaults that are not the library's: M = 20 clients and their level profile.
      alg = algorithms.get(name, problem=_problem(), num_clients=common.NUM_CLIENTS.value,
                           levels=common.LEVELS.value, layout=models.mlp_layout(4))
    lib = alg.options
    for field in lib._fields:
      self.assertEqual(getattr(lib, field), getattr(driver, field), field)
    self.assertEqual(lib, driver)

  def test_given_flags_win_and_own_defaults_win_over_flag_defaults(self):
    from experiments import common  # pylint: disable=g-import-not-at-top
    resolve = lambda: common.make_algorithm(_problem(), models.mlp_layout(4)).options
    with flagsaver.flagsaver():
      flags.FLAGS(["prog", "--algorithm=fednest", "--inner_lr=0.05"])
      cfg = resolve()
      self.assertEqual(cfg.inner_lr, 0.05)  # given on the command line
      self.assertEqual(cfg.outer_lr, 0.01)  # fednest's own, over the flag default 0.1
      flags.FLAGS["outer_lr"].value = 30.0  # a task default (set in code, not given)
      self.assertEqual(resolve().outer_lr, 0.01)
    with flagsaver.flagsaver():
      flags.FLAGS(["prog", "--algorithm=rafbo"])
      flags.FLAGS["outer_lr"].value = 30.0
      self.assertEqual(resolve().outer_lr, 30.0)  # rafbo sets no outer_lr of its own
    with flagsaver.flagsaver():
      flags.FLAGS(["prog", "--algorithm=rabo", "--num_clients=6"])
      self.assertEqual(resolve().clients_per_round, 6)  # rabo: every client, over the flag's 10
      flags.FLAGS(["prog", "--algorithm=rabo", "--num_clients=6", "--clients_per_round=3"])
      self.assertEqual(resolve().clients_per_round, 3)

  @parameterized.parameters("fednest", "lfednest", "simfbo", "memfbo")
  def test_drivers_ignore_levels_for_full_model_algorithms(self, name):
    from experiments import common  # pylint: disable=g-import-not-at-top
    with flagsaver.flagsaver():
      flags.FLAGS(["prog", f"--algorithm={name}", "--levels=1/1:0.5,0.5/0.5:0.5"])
      cfg = common.make_algorithm(_problem(), models.mlp_layout(4)).options
    self.assertEqual(cfg.levels, (algorithms.FULL_LEVEL,))


class ExportsTest(absltest.TestCase):

  def test_exports(self):
    for name in ("BilevelProblem", "FederatedData", "algorithms", "run", "hypergradient",
                 "coverage_mean", "coverage_stats", "Level", "UnitLayout", "Axes",
                 "parse_levels", "HypergradResult", "ESTIMATORS", "CoverageStats"):
      self.assertTrue(hasattr(bilevel, name), name)
      self.assertIn(name, bilevel.__all__)
    self.assertIs(bilevel.FederatedData, federated.FederatedData)
    self.assertIs(bilevel.run, loop.run)
    self.assertIn("docs/method.md", bilevel.__doc__)
    self.assertNotIn("SPEC.md", bilevel.__doc__)


if __name__ == "__main__":
  absltest.main()
