"""The timing harness (bilevel/timing.py): pass counts and medians on a fake clock, the line fit,
XLA's memory plan, leaf differences, synthetic rows, estimators' costs. No wall time is asserted."""

import math

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


if __name__ == "__main__":
  absltest.main()
