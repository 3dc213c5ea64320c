"""The timing harness (bilevel/timing.py): pass counts and medians on a fake clock, the line fit,
XLA's memory plan, leaf differences, synthetic rows, estimators' costs, and the round figures on a
stand-in round builder. No wall time is asserted."""

import functools
import math
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from bilevel import costs, hypergrad, models, timing


class FakeClock:
  """Each (start, end) pair of readings is one timed call lasting the next of durations."""

  def __init__(self, durations):
    self.durations, self.now, self.running = iter(durations), 0.0, False

  def __call__(self):
    if self.running:
      self.now += next(self.durations)
    self.running = not self.running
    return self.now


def counters(*names):
  calls = {name: 0 for name in names}

  def fn(name):
    def call():
      calls[name] += 1
      return jnp.zeros(())
    return call
  return calls, {name: fn(name) for name in names}


class MedianTimesTest(absltest.TestCase):

  def test_medians_of_interleaved_passes_after_a_warm_up(self):
    # Passes call a then b: a lasts 3, 1, 2 and b 10, 50, 20 -> medians 2 and 20; one untimed
    # warm-up call each first.
    calls, fns = counters("a", "b")
    clock = FakeClock([3.0, 10.0, 1.0, 50.0, 2.0, 20.0])
    times = timing.median_times(fns, reps=3, min_time_s=0.0, clock=clock)
    self.assertEqual(times, {"a": 2.0, "b": 20.0})
    self.assertEqual(calls, {"a": 4, "b": 4})

  def test_passes_grow_to_min_time_and_stop_at_max_passes(self):
    # The fastest first pass took 0.25: min_time_s=1 needs ceil(1 / 0.25) = 4 passes (> reps=2).
    calls, fns = counters("a", "b")
    timing.median_times(fns, reps=2, min_time_s=1.0, clock=FakeClock([0.25, 0.5] * 10))
    self.assertEqual(calls, {"a": 1 + 4, "b": 1 + 4})
    calls, fns = counters("a")
    timing.median_times(fns, reps=2, min_time_s=100.0, max_passes=6, clock=FakeClock([0.25] * 10))
    self.assertEqual(calls, {"a": 1 + 6})

  def test_real_clock(self):
    times = timing.median_times(counters("a")[1], reps=2, min_time_s=0.0)
    self.assertGreaterEqual(times["a"], 0.0)


class HelpersTest(absltest.TestCase):

  def test_linear_time_model_recovers_a_line(self):
    # t(r) = 0.06 + 0.25 r exactly: the fit returns a and b and no residual; t(0.25)/t(1)
    # then reads (a + b/4) / (a + b).
    times = {r: 0.06 + 0.25 * r for r in (1.0, 0.5, 0.25, 0.125)}
    model = timing.linear_time_model(times)
    self.assertAlmostEqual(model["a_s"], 0.06, places=12)
    self.assertAlmostEqual(model["b_s"], 0.25, places=12)
    self.assertAlmostEqual(model["fixed_share_at_r1"], 0.06 / 0.31, places=12)
    self.assertLess(model["max_rel_residual"], 1e-12)
    # A point off the line shows in the residual.
    times[0.5] *= 1.2
    self.assertGreater(timing.linear_time_model(times)["max_rel_residual"], 0.05)

  def test_compile_with_memory_plan_runs_the_jitted_function(self):
    fn = jax.jit(lambda a, b: jnp.tanh(a @ b) + a.sum())
    a, b = jnp.arange(64.0).reshape(8, 8) / 64, jnp.ones((8, 8))
    run, peak, temp = timing.compile_with_memory_plan(fn, a, b)
    np.testing.assert_array_equal(run(), fn(a, b))
    self.assertGreaterEqual(temp, 0)
    self.assertGreaterEqual(peak, 3 * 8 * 8 * 4)  # two arguments and the output, float32

  def test_max_leaf_rel_diff(self):
    a = {"u": jnp.array([1.0, 2.0]), "v": jnp.array([3.0]), "w": jnp.zeros(2)}
    b = {"u": jnp.array([1.0, 4.0]), "v": jnp.array([3.0]), "w": jnp.zeros(2)}
    self.assertEqual(timing.max_leaf_rel_diff(a, b), 0.5)  # |2 - 4| / 4 on u
    self.assertEqual(timing.max_leaf_rel_diff(b, b), 0.0)  # zero leaves divide by 1e-30, not 0

  def test_synthetic_rows(self):
    rows = timing.synthetic_rows(np.random.default_rng(0), (3, 5), in_dim=4, classes=2)
    self.assertEqual(rows["inputs"].shape, (3, 5, 4))
    self.assertEqual(rows["inputs"].dtype, jnp.float32)
    self.assertEqual(rows["labels"].shape, (3, 5))
    self.assertTrue(set(np.unique(rows["labels"])) <= {0, 1})
    np.testing.assert_array_equal(rows["weight"], np.ones((3, 5)))
    again = timing.synthetic_rows(np.random.default_rng(0), (3, 5), in_dim=4, classes=2)
    np.testing.assert_array_equal(rows["inputs"], again["inputs"])

  def test_estimator_costs(self):
    problem = models.hyper_representation_problem()
    x, y = models.init_mlp(jax.random.key(0), 4, 3, 2)
    batch = timing.synthetic_rows(np.random.default_rng(0), (6,), in_dim=4, classes=2)
    ests = {name: hypergrad.named(name, num_steps=2) for name in ("fd", "cg")}
    per, grad_s = timing.estimator_costs(problem, ests, x, y, y, batch, reps=1, min_time_s=0.0)
    self.assertEqual(set(per), {"fd", "cg"})
    self.assertGreater(grad_s, 0)
    for name, cost in per.items():
      measured = cost["measured_grad_evals"]
      self.assertTrue(math.isfinite(measured) and measured > 0, name)
      self.assertEqual(cost["analytic_grad_evals"], costs.grad_evals_per_round(
          local_steps=1, inner_steps=0, inner_step="fixed", estimator=ests[name]))
    figures = timing.estimator_figures(problem, ests, x, y, y, batch, num_steps=2, reps=1,
                                       min_time_s=0.0)
    self.assertEqual(set(figures["estimator_cost_grad_evals"]), {"fd", "cg"})
    detail = figures["estimator_costs"]
    self.assertEqual((detail["rows"], detail["num_steps"]), (6, 2))
    self.assertEqual(set(detail["per_estimator"]), {"fd", "cg"})


class State(NamedTuple):
  x: jax.Array
  y: jax.Array
  v: jax.Array
  round: jax.Array


class StandInRound(NamedTuple):  # the parts of federated.Round the figures use
  step: Any
  sample_fn: Any
  client_fns: tuple[Any, ...]
  server_fn: Any


def client(scale, state, data, client_id, slot, rnd):
  del slot, rnd
  return jnp.tanh(scale * state.x * data[client_id])


def server(state, results):
  return state._replace(x=state.x + results[0].mean(0), round=state.round + 1), {}


def apply(scale, state, data):
  ids = jnp.arange(data.shape[0])
  results = jax.vmap(client, (None, None, None, 0, 0, None))(scale, state, data, ids, ids,
                                                             state.round)
  return server(state, [results])


class StandInBuild:
  """A timing.Build whose round is a jitted function of small arrays; records each call."""

  def __init__(self):
    self.calls = []

  def __call__(self, clients, levels, submodel="compact", per_round=None, mesh=None):
    self.calls.append((clients, levels, submodel, per_round, mesh))
    state = State(jnp.ones(4), jnp.zeros(2), jnp.zeros(1), jnp.zeros((), jnp.int32))
    data = jnp.arange(clients * 4.0).reshape(clients, 4) / (4 * clients)
    ids = jnp.arange(per_round or clients)
    rnd = StandInRound(functools.partial(jax.jit(apply), 0.5), lambda r: [ids],
                       (functools.partial(client, 0.5),), server)
    return timing.compile_round(rnd, state, data)


class RoundFiguresTest(absltest.TestCase):
  """Each figure's keys, the builds it asks for, and its ratios from the times it measured."""

  def setUp(self):
    super().setUp()
    self.build, self.measured, median_times = StandInBuild(), [], timing.median_times

    def spy(fns, reps, min_time_s):
      self.measured.append(median_times(fns, reps, min_time_s))
      return self.measured[-1]
    self.enter_context(mock.patch.object(timing, "median_times", spy))

  def test_compile_round(self):
    m = self.build(3, "1/1:1")
    self.assertEqual(set(m), {"run", "round", "state", "data", "peak_bytes", "temp_bytes"})
    state, metrics = m["run"]()
    self.assertEqual((int(state.round), metrics), (1, {}))
    ref = apply(0.5, m["state"], m["data"])[0]
    np.testing.assert_allclose(state.x, ref.x, rtol=1e-6)

  def test_keep_ratio_on_one_device(self):
    ratios, params = [1.0, 0.5, 0.25], lambda r: 8 * r + 2
    out = timing.keep_ratio_figures(self.build, ratios, 3, reps=1, min_time_s=0.0, quick=False,
                                    params=params)
    self.assertEqual(self.build.calls, [(3, f"{r:g}/{r:g}:1", "compact", None, None)
                                        for r in ratios])
    (t,) = self.measured
    self.assertEqual(out["keep_ratio_round_time_s"], {str(r): t[f"1:{r}"] for r in ratios})
    self.assertEqual(out["keep_ratio_time_ratio"], {str(r): t[f"1:{r}"] / t["1:1.0"]
                                                    for r in (0.5, 0.25)})
    self.assertEqual(out["keep_ratio_model"], timing.linear_time_model(
        {r: t[f"1:{r}"] for r in ratios}))
    self.assertEqual(out["keep_ratio_flop_ratio"], {"0.5": 6 / 10, "0.25": 4 / 10})
    self.assertEqual(out["keep_ratio_devices"], 1)
    self.assertEqual(out["keep_ratio_one_device"], {
        k[len("keep_ratio_"):]: out[k] for k in ("keep_ratio_round_time_s",
                                                 "keep_ratio_time_ratio", "keep_ratio_model")})
    self.assertEqual(out["keep_ratio_max_leaf_rel_diff"], {})

  def test_keep_ratio_over_devices_times_one_device_alongside(self):
    # Two devices (patched): every ratio on the mesh; quick: the first and last on one device.
    self.enter_context(mock.patch.object(timing.jax, "devices", lambda: ["d0", "d1"]))
    self.enter_context(mock.patch.object(timing.sharding, "client_mesh", lambda: "mesh"))
    out = timing.keep_ratio_figures(self.build, [1.0, 0.5, 0.25], 3, reps=1, min_time_s=0.0,
                                    quick=True, params=lambda r: r)
    self.assertEqual([(c[1], c[4]) for c in self.build.calls],
                     [("1/1:1", "mesh"), ("0.5/0.5:1", "mesh"), ("0.25/0.25:1", "mesh"),
                      ("1/1:1", None), ("0.25/0.25:1", None)])
    (t,) = self.measured
    self.assertEqual(out["keep_ratio_devices"], 2)
    self.assertEqual(out["keep_ratio_one_device"]["time_ratio"], {"0.25": t["1:0.25"] / t["1:1.0"]})
    self.assertNotIn("model", out["keep_ratio_one_device"])  # two ratios: no line fit
    self.assertEqual(out["keep_ratio_max_leaf_rel_diff"], {"1.0": 0.0, "0.25": 0.0})

  def test_compact_dense(self):
    out = timing.compact_dense_figures(self.build, 3, "0.25", "1/1:0.5,0.5/0.5:0.5", reps=1,
                                       min_time_s=0.0, quick=False)
    self.assertEqual(out["compact_over_dense"]["levels"],
                     {"profile": "1/1:0.5,0.5/0.5:0.5", "0.25": "0.25/0.25:1"})
    for name, t in zip(("profile", "0.25"), self.measured):
      self.assertEqual(out["compact_over_dense"][name], dict(
          compact_s=t["compact"], dense_s=t["dense"], ratio=t["compact"] / t["dense"]))
      self.assertEqual(out["compact_over_dense_time_ratio"][name], t["compact"] / t["dense"])
    self.assertEqual([c[2] for c in self.build.calls], ["compact", "dense"] * 2)
    quick = timing.compact_dense_figures(self.build, 3, "0.25", "1/1:1", reps=1, min_time_s=0.0,
                                         quick=True)
    self.assertEqual(set(quick["compact_over_dense_time_ratio"]), {"0.25"})

  def test_vmap_loop(self):
    out = timing.vmap_loop_figures(self.build, [2, 3], reps=1, min_time_s=0.0)
    self.assertEqual(self.build.calls, [(3, "1/1:1", "compact", c, None) for c in (2, 3)])
    for c, t in zip(("2", "3"), self.measured):
      self.assertEqual(out["vmap_loop_detail"][c], dict(vmap_s=t["vmap"], loop_s=t["loop"]))
      self.assertEqual(out["vmap_over_loop_time_ratio"][c], t["vmap"] / t["loop"])

  def test_scaling(self):
    out = timing.scaling_figures(self.build, [2, 5], "0.5", "1/1:1", reps=1, min_time_s=0.0,
                                 quick=False)
    for row, c, t in zip(out["clients_scaling"], (2, 5), self.measured):
      m = self.build(c, "1/1:1")  # XLA's plan for the same program: the row's bytes
      self.assertEqual(row, dict(clients_per_round=c, levels="1/1:1", round_time_s=t[""],
                                 rounds_per_s=1 / t[""], peak_bytes=m["peak_bytes"],
                                 temp_bytes=m["temp_bytes"],
                                 peak_bytes_per_client=m["peak_bytes"] and m["peak_bytes"] / c))
    quick = timing.scaling_figures(self.build, (), "0.5", "1/1:1", reps=1, min_time_s=0.0,
                                   quick=True)  # no counts: 100 clients; quick: one level 0.5
    self.assertEqual([(r["clients_per_round"], r["levels"]) for r in quick["clients_scaling"]],
                     [(100, "0.5/0.5:1")])


if __name__ == "__main__":
  absltest.main()
