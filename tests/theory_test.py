"""Theory check: the synthetic problem's closed forms (bilevel/tasks/theory.py), the
controlled-coverage schedule, and the sweep (bilevel/tasks/coverage_rate.py) through a tiny run
of its driver."""

import json
import math
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

from bilevel import federated, hypergrad
from bilevel.client import client_update
from bilevel.errors import ConfigError
from bilevel.tasks import coverage_rate as sweep
from bilevel.tasks import theory
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

  @parameterized.parameters(1, 3, 8)
  def test_coverage_read_from_the_traced_keep_ratio(self, coverage):
    slots, dim = 8, 16
    mask_fn = theory.coverage_schedule(slots)
    state = federated.init_state(jnp.zeros(dim), jnp.zeros(dim), optax.sgd(1.0))
    masks = jax.jit(lambda rx, q: jnp.stack([mask_fn(state, p, p, q, rx, rx, None)[0]
                                             for p in range(slots)]))
    for q in range(3):
      np.testing.assert_array_equal(np.sum(masks(coverage / slots, q), axis=0), coverage)

  @parameterized.parameters(((1, 7, 1, 7), 32), ((4, 4), 16), ((1, 7, 7, 7), 32), ((2, 6), 32),
                            ((3,), 8))
  def test_uneven_pattern_counts_by_brute_force(self, pattern, dim):
    slots = 8
    mask_fn = theory.pattern_schedule(slots, pattern)
    state = federated.init_state(jnp.zeros(dim), jnp.zeros(dim), optax.sgd(1.0))
    counts = []
    for q in range(2 * slots + 1):
      masks = [mask_fn(state, 100 + p, p, q, 0.0, 0.0, None) for p in range(slots)]
      for mx, my in masks:  # x_j and y_j are pruned together
        np.testing.assert_array_equal(mx, my)
      count = sum(np.asarray(mx) for mx, _ in masks)
      want = [pattern[(j // slots + q) % len(pattern)] for j in range(dim)]  # brute force
      np.testing.assert_array_equal(count, want)
      counts.append(count)
    self.assertEqual(np.min(counts), min(pattern))  # C_x* = min(pattern)
    np.testing.assert_allclose(np.mean(counts, axis=1), np.mean(pattern), rtol=1e-12)

  @parameterized.parameters(((),), ((0, 2),), ((9,),), ((1.5,),))
  def test_bad_pattern_is_rejected(self, pattern):
    with self.assertRaises(ConfigError):
      theory.pattern_schedule(8, pattern)


class CoupledProblemTest(parameterized.TestCase):
  """The non-separable problems: Phi's gradient and the inner solution; and that a submodel's
  update and the fd products are exact on the separable problem with fixed steps, not otherwise."""

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))
    self.xs = jnp.asarray(np.random.default_rng(0).normal(0.0, 2.0, (3, D)))

  @parameterized.parameters((0.0, 0), (0.3, 0), (0.0, 16), (0.3, 16))
  def test_grad_phi_matches_central_differences_and_inner_solution_is_stationary(
      self, coupling, rows):
    coeffs = theory.make_coupled(M, D, seed=3, heterogeneity=1.0, coupling=coupling,
                                 logistic_rows=rows)
    zero = jnp.zeros(D)
    big_g = lambda x, y: jnp.mean(jax.vmap(lambda c: theory.coupled_inner_loss(
        x, y, theory.SyntheticBatch(c, jnp.ones(()), zero, zero)))(coeffs))
    h = 1e-5
    central = jax.jit(jax.vmap(lambda x, e: (theory.coupled_phi(x + h * e, coeffs) -
                                             theory.coupled_phi(x - h * e, coeffs)) / (2 * h),
                               (None, 0)))
    for x in self.xs:
      # Central differences of Phi: error O(h^2) + O(eps / h), about 1e-9 here.
      np.testing.assert_allclose(theory.coupled_phi_grad(x, coeffs), central(x, jnp.eye(D)),
                                 rtol=1e-7, atol=1e-8)
      ys = theory.coupled_solution(x, coeffs)
      np.testing.assert_allclose(jax.grad(big_g, argnums=1)(x, ys), 0.0, atol=1e-12)

  def test_without_coupling_it_is_the_separable_problem(self):
    sep = theory.make_synthetic(M, D, seed=3, heterogeneity=1.0)
    coeffs = theory.make_coupled(M, D, seed=3, heterogeneity=1.0)
    for x in self.xs:
      np.testing.assert_allclose(theory.coupled_phi_grad(x, coeffs), theory.phi_grad(x, sep),
                                 rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(theory.coupled_phi(x, coeffs), theory.phi(x, sep), rtol=1e-12)

  def test_identical_clients_without_heterogeneity(self):
    coeffs = theory.make_coupled(M, D, seed=3, heterogeneity=0.0, coupling=0.3, logistic_rows=8)
    for field in coeffs:
      np.testing.assert_array_equal(field, jnp.broadcast_to(field[:1], field.shape))

  @parameterized.parameters(0.5, -0.1)
  def test_bad_coupling_is_rejected(self, coupling):
    with self.assertRaisesRegex(ConfigError, "coupling"):
      theory.make_coupled(M, D, seed=0, coupling=coupling)

  @parameterized.named_parameters(("coupled_quadratic", 0), ("logistic", 16))
  def test_fd_products_exact_only_for_the_quadratic(self, rows):
    coeffs = theory.make_coupled(M, D, seed=3, heterogeneity=1.0, coupling=0.3,
                                 logistic_rows=rows)
    rng = np.random.default_rng(5)
    x, y, v = (jnp.asarray(rng.normal(size=D)) for _ in range(3))
    batch = _batch(coeffs, 1)
    exact = hypergrad.exact_products(theory.coupled_inner_loss, x, y, v, batch, 0.0, True)
    errs = []
    for delta in (0.2, 0.1):
      fd = hypergrad.fd_products(theory.coupled_inner_loss, x, y, v, batch, delta, True)
      errs.append(float(jnp.linalg.norm(fd.hv - exact.hv)))
      np.testing.assert_allclose(fd.jv, exact.jv, atol=1e-12)  # g is linear in x: J v exact
    if rows == 0:
      self.assertLess(max(errs), 1e-12)  # quadratic in y: central differences are exact
    else:
      self.assertGreater(errs[1], 1e-8)
      self.assertAlmostEqual(errs[0] / errs[1], 4.0, delta=0.2)  # bias O(delta^2)

  @parameterized.named_parameters(
      ("separable_fixed", "separable", "fixed", True),
      ("separable_cauchy", "separable", "cauchy", False),
      ("coupled_fixed", "coupled", "fixed", False))
  def test_submodel_computes_the_full_update_of_its_kept_coordinates(self, problem, step,
                                                                     exact):
    """bilevel/tasks/theory.py: with fixed steps, on the separable problem, a client's masked
    update equals its full-model update on the kept coordinates; not under the Cauchy steps (one
    scalar step over the kept set) and not on the coupled problem."""
    if problem == "separable":
      coeffs, prob = theory.make_synthetic(M, D, seed=3, heterogeneity=1.0), theory.SYNTHETIC
    else:
      coeffs = theory.make_coupled(M, D, seed=3, heterogeneity=1.0, coupling=0.3)
      prob = theory.COUPLED
    rng = np.random.default_rng(2)
    x, y, v = (jnp.asarray(rng.normal(size=D)) for _ in range(3))
    mask = jnp.asarray(np.arange(D) % 3 != 0, jnp.float64)
    # Steps 5: the Cauchy steps r'r / r'Hr (<= 1 / lambda_min = 2) are then below the cap.
    cfg = _client_cfg(step, step_size=5.0 if step == "cauchy" else 0.5)
    full = _client(prob, cfg, coeffs, 2, x, y, v, None)
    pruned = _client(prob, cfg, coeffs, 2, x, y, v, mask)
    diffs = [float(jnp.max(jnp.abs(p - f * mask))) for p, f in zip(pruned, full)]
    if exact:
      self.assertLess(max(diffs), 1e-10)  # fd on a quadratic: rounding of the quotient only
    else:
      self.assertGreater(max(diffs), 1e-4)

  @parameterized.named_parameters(("fixed", "fixed", True), ("cauchy", "cauchy", False))
  def test_one_step_update_is_affine_in_the_coefficients(self, step, affine):
    """K = 1: the mean of the clients' updates is the update of the mean client (fixed steps)."""
    coeffs = theory.make_synthetic(M, D, seed=3, heterogeneity=1.0)
    rng = np.random.default_rng(4)
    x, y, v = (jnp.asarray(rng.normal(size=D)) for _ in range(3))
    cfg = _client_cfg(step, step_size=5.0 if step == "cauchy" else 0.5)
    # One compiled client update serves the M clients and the mean client (same shapes).
    update = jax.jit(lambda batch: client_update(theory.SYNTHETIC, x, y, v, batch, batch, None,
                                                 None, jax.random.key(0), **cfg))
    deltas = lambda c, i: (lambda out: (out.delta_x, out.delta_y, out.delta_v))(
        update(_batch(c, i)))
    mean_of_updates = [sum(parts) / M for parts in zip(*[deltas(coeffs, i) for i in range(M)])]
    mean_client = jax.tree.map(lambda z: jnp.mean(z, axis=0, keepdims=True), coeffs)
    update_of_mean = deltas(mean_client, 0)
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(mean_of_updates, update_of_mean)]
    if affine:
      self.assertLess(max(diffs), 1e-10)
    else:
      self.assertGreater(max(diffs), 1e-4)


def _client_cfg(step, step_size):
  return dict(local_steps=1, inner_steps=1, inner_lr=step_size, outer_lr=0.3,
              inner_step=step, x_trust=0.0, x_trust_scope="layer",
              estimator=hypergrad.fd(num_steps=1, step_size=step_size, delta=1e-3, v_step=step))


def _client(problem, cfg, coeffs, i, x, y, v, mask):
  """(delta_x, delta_y, delta_v) of client i without noise."""
  batch = _batch(coeffs, i)
  out = client_update(problem, x, y, v, batch, batch, mask, mask, jax.random.key(0), **cfg)
  return out.delta_x, out.delta_y, out.delta_v


TINY_RATE = dict(algorithms=["rabo"], coverages=["1", "2"], rounds_list=["8", "16"],
                 num_seeds=2, dim=8, alpha0=0.5, quick=False, parts=["rate"])
TINY_ALL = dict(algorithms=["rabo", "rafbo"], coverages=["1", "2", "8"], rounds_list=["8", "16"],
                num_seeds=2, part_rounds=["8", "16"], part_seeds=2, dim=16, alpha0=0.5,
                quick=False, parts=["rate", "step_rules", "uneven", "bias"],
                uneven_patterns=["2/2", "1/3", "1/1"], bias_deltas=["0.001", "0.5"])


def _run_driver(test, overrides, **patches):
  workdir = test.enter_context(tempfile.TemporaryDirectory())
  for name, value in patches.items():
    test.enter_context(mock.patch.object(sweep, name, value))
  with flagsaver.flagsaver(workdir=workdir, **overrides):
    cfg = coverage_rate.config_from_flags()
    coverage_rate.main(["coverage_rate"])
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return workdir, cfg, summary, records


def _slope(xs, ys):
  """The test's own log-log least-squares slope (not the driver's)."""
  return np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0]


def _means(records, *keys):
  groups = {}
  for r in records:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r["avg_sq_grad_norm"])
  return {k: float(np.mean(v)) for k, v in groups.items()}


class DriverTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # pytest never parses absl flags

  def _check_summary_is_a_function_of_the_records(self, cfg, summary, records):
    again = sweep.summarize(cfg, records)  # the records as read back from the file
    written = {k: v for k, v in summary.items() if k not in ("wall_time_s", "part_wall_time_s")}
    self.assertEqual(json.loads(json.dumps(again)), written)

  def test_tiny_rate_sweep_summary_is_recomputed_from_its_records(self):
    workdir, cfg, summary, records = _run_driver(self, TINY_RATE)
    self.assertLen(records, 2 * 2 * 2)  # (C, Q, seed)
    for r in records:
      self.assertEqual(r["cx_star"], r["coverage"])  # measured C_x* = scheduled C
      self.assertEqual(r["cy_star"], r["coverage"])
      self.assertAlmostEqual(r["cx_mean"], r["coverage"], places=12)
      self.assertAlmostEqual(r["alpha"], 0.5 * math.sqrt(r["coverage"] / r["rounds"]), places=15)
    seeds = [r["avg_sq_grad_norm"] for r in records if (r["coverage"], r["rounds"]) == (1, 16)]
    self.assertNotAlmostEqual(seeds[0], seeds[1])  # the seeds really differ
    self.assertEqual((summary["v_step"], summary["inner_step"]), ("fixed", "fixed"))
    self.assertIn("affine", summary["step_note"])
    means = _means(records, "coverage", "rounds")
    got = summary["avg_sq_grad_norm"]["rabo"]
    for (c, q), m in means.items():
      self.assertAlmostEqual(got[str(c)][str(q)], m, places=12)
    for c in (1, 2):
      self.assertAlmostEqual(summary["slopes"]["rabo"][str(c)],
                             _slope([8, 16], [means[c, 8], means[c, 16]]), places=9)
    for q in (8, 16):
      self.assertAlmostEqual(summary["c_exponents"]["rabo"][str(q)],
                             _slope([1, 2], [means[1, q], means[2, q]]), places=9)
    # Two C and two Q: the joint fit log v = a + p log C + s log Q has residuals, and its
    # exponents are the means of the two per-Q and per-C slopes.
    joint = summary["joint_exponents"]["rabo"]
    self.assertAlmostEqual(joint["c"], np.mean([_slope([1, 2], [means[1, q], means[2, q]])
                                                for q in (8, 16)]), places=9)
    self.assertAlmostEqual(joint["q"], np.mean([_slope([8, 16], [means[c, 8], means[c, 16]])
                                                for c in (1, 2)]), places=9)
    measured = means[1, 16] / means[2, 16]
    self.assertAlmostEqual(summary["coverage_ratio"]["rabo"]["measured"], measured, places=12)
    lo, hi = summary["slope_range"]
    self.assertEqual(summary["checks"]["rabo"], dict(
        slopes_in_range=all(lo <= s <= hi for s in summary["slopes"]["rabo"].values()),
        monotone_in_coverage_at_largest_rounds=bool(means[2, 16] < means[1, 16]),
        ratio_within_factor_2=bool(0.5 <= measured / math.sqrt(2) <= 2.0)))
    self.assertLen(summary["table"], 2 * 2)
    self._check_summary_is_a_function_of_the_records(cfg, summary, records)
    self.assertTrue(os.path.exists(os.path.join(workdir, "coverage_rate.png")))
    self.assertTrue(os.path.exists(os.path.join(workdir, "config.json")))

  @pytest.mark.slow
  def test_tiny_sweep_of_every_part_is_recomputed_from_its_records(self):
    _, cfg, summary, records = _run_driver(self, TINY_ALL, BIAS_ROUNDS=(32, 64), BIAS_TAIL=32)
    part = lambda p: [r for r in records if r["part"] == p]
    # step_rules: the noise term (noisy minus noise-free mean) and its exponent of C per rule.
    sr = part("step_rules")
    means = _means(sr, "step_rule", "grad_noise", "algorithm", "coverage", "rounds")
    for rule in ("sqrt_c_over_q", "fixed", "inv_sqrt_q"):
      for alg in ("rabo", "rafbo"):
        got = summary["step_rules"][rule][alg]
        for q in (8, 16):
          term = {c: means[rule, 3.0, alg, c, q] - means[rule, 0.0, alg, c, q] for c in (1, 2, 8)}
          self.assertAlmostEqual(got["noise_term"]["8"][str(q)], term[8], places=10)
          want = (_slope([1, 2, 8], [term[c] for c in (1, 2, 8)])
                  if all(v > 0 for v in term.values()) else None)
          have = got["noise_term_exponents"]["c_exponents"][str(q)]
          self.assertEqual(have is None, want is None)
          if want is not None:
            self.assertAlmostEqual(have, want, places=9)
    for r in sr:
      want = {"sqrt_c_over_q": 0.5 * math.sqrt(r["coverage"] / r["rounds"]), "fixed": 0.05,
              "inv_sqrt_q": 0.5 / math.sqrt(r["rounds"])}[r["step_rule"]]
      self.assertAlmostEqual(r["alpha"], want, places=15)
    # uneven: measured coverage, and the exponents against min, mean and mean(1/c).
    un = part("uneven")
    for r in un:
      pattern = [int(c) for c in r["pattern"].split("/")]
      self.assertEqual(r["cx_star"], min(pattern))
      self.assertAlmostEqual(r["cx_mean"], np.mean(pattern), places=12)
    means = _means(un, "algorithm", "pattern", "grad_noise", "rounds")
    for alg in ("rabo", "rafbo"):
      fit = summary["uneven"][alg]["exponents"]["16"]
      v = {p: means[alg, p, 3.0, 16] for p in ("2/2", "1/3", "1/1")}
      self.assertAlmostEqual(fit["value_vs_min_at_equal_mean"]["2"],
                             _slope([2, 1], [v["2/2"], v["1/3"]]), places=9)
      self.assertAlmostEqual(fit["value_vs_mean_at_equal_min"]["1"],
                             _slope([2, 1], [v["1/3"], v["1/1"]]), places=9)
      self.assertAlmostEqual(fit["value_vs_inverse_mean"],
                             _slope([0.5, 2 / 3, 1.0], [v["2/2"], v["1/3"], v["1/1"]]), places=9)
    # bias: the floor is the last tail's average; separable with identical clients: pruning
    # changes nothing, so every C runs the same trajectory; the coupled quadratic: fd is exact
    # (both deltas agree) and pruning moves the floor.
    bias = {(r["problem"], r["delta"], r["coverage"], r["rounds"]): r for r in part("bias")}
    floor = summary["bias"]["floor"]
    for (name, delta, c, q), r in bias.items():
      self.assertIsNone(r["avg_sq_grad_norm"])
      if q == 64:
        self.assertEqual(floor[name][f"{delta:g}"][str(c)], r["tail_sq_grad_norm"])
    sep = [floor["separable"]["0.001"][str(c)] for c in (1, 2, 8)]
    np.testing.assert_allclose(sep, sep[0], rtol=1e-9)
    coupled = floor["coupled_quadratic"]
    for c in ("1", "2", "8"):
      self.assertAlmostEqual(coupled["0.001"][c] / coupled["0.5"][c], 1.0, places=6)
    self.assertGreater(abs(coupled["0.001"]["1"] / coupled["0.001"]["8"] - 1), 0.01)
    logistic = floor["logistic"]
    self.assertAlmostEqual(summary["bias"]["c_exponents"]["logistic"]["0.5"],
                           _slope([1, 2], [logistic["0.5"]["1"], logistic["0.5"]["2"]]), places=9)
    self._check_summary_is_a_function_of_the_records(cfg, summary, records)

  @parameterized.named_parameters(
      ("unknown_algorithm", dict(algorithms=["fednest"]), "algorithms"),
      ("coverage_too_large", dict(coverages=["1", "9"]), "coverages"),
      ("one_q", dict(rounds_list=["64"]), "rounds_list"),
      ("not_integers", dict(rounds_list=["64", "x"]), "rounds_list"),
      ("negative_noise", dict(grad_noise=-1.0), "grad_noise"),
      ("no_noise_for_noise_terms", dict(grad_noise=0.0, parts=["rate", "uneven"]), "grad_noise"),
      ("dim", dict(dim=12), "dim"),
      ("step_too_large", dict(alpha0=4.0), "alpha0"),
      ("unknown_part", dict(parts=["rate", "theory"]), "parts"),
      ("one_part_q", dict(part_rounds=["64"]), "part_rounds"),
      ("pattern_length", dict(dim=16, uneven_patterns=["1/7/1/7", "4/4/4/4"]), "uneven_patterns"),
      ("pattern_range", dict(uneven_patterns=["0/8", "4/4"]), "uneven_patterns"),
      ("bias_delta", dict(bias_deltas=["0", "0.1"]), "bias_deltas"))
  def test_bad_flags_are_rejected(self, overrides, match):
    with flagsaver.flagsaver(**overrides):
      with self.assertRaisesRegex(ConfigError, match):
        coverage_rate.config_from_flags()

  def test_summaries_recover_known_exponents(self):
    """The summary functions on records built from known power laws (no JAX)."""
    cfg = sweep.SweepConfig(
        algorithms=("rabo",), coverages=(1, 2, 4, 8), rounds_list=(64, 256), num_seeds=1,
        grad_noise=3.0, heterogeneity=0.5, dim=32, alpha0=0.5, seed=0,
        parts=("step_rules", "uneven", "bias"), part_rounds=(64, 256, 1024), part_seeds=1,
        uneven_patterns=((4, 4, 4, 4), (1, 7, 1, 7), (1, 1, 1, 1), (1, 3, 1, 3)),
        bias_deltas=(0.01, 0.1))
    records = []
    for rule in ("sqrt_c_over_q", "fixed", "inv_sqrt_q"):
      for c in cfg.coverages:
        for q in cfg.part_rounds:
          clean = 2.0 * q ** -0.5
          records += [dict(part="step_rules", step_rule=rule, algorithm="rabo", coverage=c,
                           rounds=q, grad_noise=n, avg_sq_grad_norm=clean + (n > 0) * c ** -1.0)
                      for n in (3.0, 0.0)]
    for p in cfg.uneven_patterns:
      inv = float(np.mean([1.0 / c for c in p]))
      for q in cfg.part_rounds:
        records += [dict(part="uneven", algorithm="rabo", pattern=sweep.pattern_name(p),
                         rounds=q, grad_noise=n, avg_sq_grad_norm=1.0 + (n > 0) * 5.0 * inv)
                    for n in (3.0, 0.0)]
    for c in cfg.coverages:
      for d in cfg.bias_deltas:
        floor = 0.3 * c ** -0.8 if c < 8 else d ** 4
        records.append(dict(part="bias", problem="logistic", delta=d, coverage=c, rounds=128,
                            tail_sq_grad_norm=floor, tail_rounds=64, alpha=0.1, heterogeneity=0.0))
    summary = sweep.summarize(cfg, records)
    for rule in ("sqrt_c_over_q", "fixed", "inv_sqrt_q"):
      e = summary["step_rules"][rule]["rabo"]
      self.assertAlmostEqual(e["noise_term_exponents"]["joint"]["c"], -1.0, places=12)
      self.assertAlmostEqual(e["noise_free_exponents"]["joint"]["q"], -0.5, places=12)
      self.assertAlmostEqual(e["noise_free_exponents"]["c_exponents"]["1024"], 0.0, places=12)
    fit = summary["uneven"]["rabo"]["exponents"]["1024"]
    self.assertAlmostEqual(fit["noise_term_vs_inverse_mean"], 1.0, places=12)
    # 4/4/4/4 and 1/7/1/7 (mean 4): mean(1/c) 1/4 -> 4/7 as the minimum goes 4 -> 1.
    self.assertAlmostEqual(fit["noise_term_vs_min_at_equal_mean"]["4"],
                           math.log((4 / 7) / (1 / 4)) / math.log(1 / 4), places=12)
    # Minimum 1: 1/1/1/1, 1/3/1/3 and 1/7/1/7 (4/4/4/4 is alone at minimum 4).
    self.assertEqual(set(fit["noise_term_vs_mean_at_equal_min"]), {"1"})
    b = summary["bias"]
    self.assertAlmostEqual(b["c_exponents"]["logistic"]["0.01"], -0.8, places=12)
    self.assertAlmostEqual(b["delta_exponents"]["logistic"]["8"], 4.0, places=12)
    self.assertEqual(b["floor"]["logistic"]["0.1"]["8"], 0.1 ** 4)


if __name__ == "__main__":
  absltest.main()
