"""Theory check: the synthetic problem's closed forms, the controlled-coverage schedule and a tiny
sweep of the coverage_rate driver."""

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from absl import flags
from absl.testing import absltest, flagsaver, parameterized

from bilevel import federated, theory
from bilevel.errors import ConfigError
from experiments import coverage_rate

M, D = 6, 8


def _batch(coeffs, i, scale=1.0, noise_x=None, noise_y=None):
  one = jax.tree.map(lambda z: z[i], coeffs)
  zeros = jnp.zeros(D)
  return theory.SyntheticBatch(one, jnp.asarray(scale), zeros if noise_x is None else noise_x,
                               zeros if noise_y is None else noise_y)


class ProblemTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))
    self.coeffs = theory.make_synthetic(M, D, seed=3, heterogeneity=1.0)
    self.xs = jnp.asarray(np.random.default_rng(0).normal(0.0, 2.0, (4, D)))

  def test_grad_phi_matches_central_differences_of_phi(self):
    h = 1e-5
    for x in self.xs:
      fd = jnp.stack([(theory.phi(x + h * e, self.coeffs) - theory.phi(x - h * e, self.coeffs))
                      / (2 * h) for e in jnp.eye(D)])
      np.testing.assert_allclose(theory.phi_grad(x, self.coeffs), fd, rtol=1e-7, atol=1e-9)

  def test_solution_is_the_global_inner_minimiser_and_phi_the_outer_mean(self):
    batches = [_batch(self.coeffs, i) for i in range(M)]
    for x in self.xs:
      ys = theory.solution(x, self.coeffs)
      grad_g = sum(jax.grad(theory.inner_loss, argnums=1)(x, ys, b) for b in batches) / M
      np.testing.assert_allclose(grad_g, 0.0, atol=1e-12)
      outer = sum(theory.outer_loss(x, ys, b) for b in batches) / M
      np.testing.assert_allclose(theory.phi(x, self.coeffs), outer, rtol=1e-12)

  def test_same_phi_for_every_number_of_clients(self):
    other = theory.make_synthetic(2 * M, D, seed=3, heterogeneity=1.0)
    for x in self.xs:
      np.testing.assert_allclose(theory.phi_grad(x, other), theory.phi_grad(x, self.coeffs),
                                 rtol=1e-12)

  def test_noise_enters_the_gradients_linearly(self):
    rng = np.random.default_rng(1)
    x, y, nx, ny = (jnp.asarray(rng.normal(size=D)) for _ in range(4))
    clean, noisy = _batch(self.coeffs, 2, 0.7), _batch(self.coeffs, 2, 0.7, nx, ny)
    gx = jax.jit(lambda b: jax.grad(theory.outer_loss, argnums=(0, 1))(x, y, b))
    (cx, cy), (nx_, ny_) = gx(clean), gx(noisy)
    np.testing.assert_allclose(nx_ - cx, 0.7 * nx, rtol=1e-12)
    np.testing.assert_allclose(ny_ - cy, 0.7 * ny, rtol=1e-12)
    gy = jax.jit(lambda b: jax.grad(theory.inner_loss, argnums=1)(x, y, b))
    np.testing.assert_allclose(gy(noisy) - gy(clean), -ny, rtol=1e-12)

  def test_sampler_noise_level_and_salt(self):
    wide = theory.make_synthetic(2, 2000, seed=0)
    one = jax.tree.map(lambda z: z[0], theory.make_clients(wide, noise_std=2.0, salt=0))
    key = jax.random.key(0)
    batch = theory.sample(one, key)
    for noise in (batch.noise_x, batch.noise_y):
      self.assertAlmostEqual(float(jnp.mean(noise)), 0.0, delta=0.15)
      self.assertAlmostEqual(float(jnp.std(noise)), 2.0, delta=0.1)
    salted = theory.sample(one._replace(salt=jnp.asarray(1, jnp.uint32)), key)
    self.assertFalse(np.allclose(batch.noise_x, salted.noise_x))

  def test_bad_heterogeneity_is_rejected(self):
    with self.assertRaisesRegex(ConfigError, "heterogeneity"):
      theory.make_synthetic(M, D, seed=0, heterogeneity=1.5)


class ScheduleTest(parameterized.TestCase):

  @parameterized.parameters((8, 1, 16), (8, 2, 16), (8, 5, 16), (8, 8, 16), (3, 2, 7), (1, 1, 4))
  def test_every_coordinate_has_exactly_c_clients_every_round(self, slots, coverage, dim):
    mask_fn = theory.coverage_schedule(slots, coverage)
    state = federated.init_state({"w": jnp.zeros(dim), "u": jnp.zeros((2, 3))}, jnp.zeros(dim),
                                 optax.sgd(1.0))
    for q in range(2 * slots + 1):
      masks = [mask_fn(state, 100 + p, p, q, 0.0, 0.0, None) for p in range(slots)]
      for side in (0, 1):
        count = jax.tree.map(lambda *m: sum(np.asarray(t) for t in m), *[m[side] for m in masks])
        for c in jax.tree.leaves(count):
          np.testing.assert_array_equal(c, coverage)
      for mx, my in masks:  # x_j and y_j are pruned together
        np.testing.assert_array_equal(mx["w"], my)
        if dim % slots == 0:
          self.assertEqual(int(np.sum(mx["w"])), dim * coverage // slots)

  @parameterized.parameters((4, 0), (4, 5), (0, 1), (4, 1.5))
  def test_bad_schedule_is_rejected(self, slots, coverage):
    with self.assertRaises(ConfigError):
      theory.coverage_schedule(slots, coverage)


TINY = dict(algorithms=["rabo", "rafbo"], coverages=["1", "2"], rounds_list=["8", "16"],
            num_seeds=2, dim=8, alpha0=0.5, quick=False)


class DriverTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # pytest never parses absl flags

  @pytest.mark.slow
  def test_tiny_sweep_writes_summary_with_required_keys(self):
    workdir = self.enter_context(tempfile.TemporaryDirectory())
    with flagsaver.flagsaver(workdir=workdir, **TINY):
      coverage_rate.main(["coverage_rate"])
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    for alg in TINY["algorithms"]:
      self.assertEqual(set(summary["slopes"][alg]), {"1", "2"})
      self.assertTrue(all(math.isfinite(s) for s in summary["slopes"][alg].values()))
      for c in ("1", "2"):
        values = summary["avg_sq_grad_norm"][alg][c]
        self.assertEqual(set(values), {"8", "16"})
        self.assertTrue(all(math.isfinite(v) and v > 0 for v in values.values()))
      # The summary's slopes, ratio and checks are those of its own means (recomputed here).
      means = summary["avg_sq_grad_norm"][alg]
      for c in ("1", "2"):
        want = np.polyfit(np.log([8, 16]), np.log([means[c]["8"], means[c]["16"]]), 1)[0]
        self.assertAlmostEqual(summary["slopes"][alg][c], want, places=9)
      measured = means["1"]["16"] / means["2"]["16"]
      self.assertAlmostEqual(summary["coverage_ratio"][alg]["measured"], measured, places=12)
      lo, hi = summary["slope_range"]
      self.assertEqual(summary["checks"][alg], dict(
          slopes_in_range=all(lo <= s <= hi for s in summary["slopes"][alg].values()),
          monotone_in_coverage_at_largest_rounds=bool(means["2"]["16"] < means["1"]["16"]),
          ratio_within_factor_2=bool(0.5 <= measured / math.sqrt(2) <= 2.0)))
    self.assertLen(summary["table"], 2 * 2 * 2)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [json.loads(line) for line in f]
    self.assertLen(lines, 2 * 2 * 2 * 2)  # (algorithm, C, Q, seed)
    for line in lines:
      self.assertEqual(line["cx_star"], line["coverage"])  # measured C_x* = scheduled C
      self.assertEqual(line["cy_star"], line["coverage"])
    seeds = [line["avg_sq_grad_norm"] for line in lines if line["rounds"] == 16
             and line["coverage"] == 1 and line["algorithm"] == "rabo"]
    self.assertNotAlmostEqual(seeds[0], seeds[1])  # the seeds really differ
    self.assertAlmostEqual(float(np.mean(seeds)), summary["avg_sq_grad_norm"]["rabo"]["1"]["16"],
                           places=12)  # the summary's mean is the mean over the seeds
    self.assertTrue(os.path.exists(os.path.join(workdir, "coverage_rate.png")))
    self.assertTrue(os.path.exists(os.path.join(workdir, "config.json")))

  @parameterized.named_parameters(
      ("unknown_algorithm", dict(algorithms=["fednest"]), "algorithms"),
      ("coverage_too_large", dict(coverages=["1", "9"]), "coverages"),
      ("one_q", dict(rounds_list=["64"]), "rounds_list"),
      ("not_integers", dict(rounds_list=["64", "x"]), "rounds_list"),
      ("negative_noise", dict(grad_noise=-1.0), "grad_noise"),
      ("dim", dict(dim=12), "dim"),
      ("step_too_large", dict(alpha0=4.0), "alpha0"))
  def test_bad_flags_are_rejected(self, overrides, match):
    with flagsaver.flagsaver(**overrides):
      with self.assertRaisesRegex(ConfigError, match):
        coverage_rate.config_from_flags()


if __name__ == "__main__":
  absltest.main()
