"""bilevel.diagnostics and the run loop's diagnostics: the true hypergradient against the closed
form, estimate quality, the cumulative never-covered share, the driver's --diagnose_every."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from absl.testing import absltest

from bilevel import diagnostics, federated, loop, tree
from bilevel import algorithms
from bilevel.masks import Level
import quadratic  # tests/quadratic.py
from reliability_test import _main  # the in-process driver runner the tests share


class TrueHypergradientTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def test_matches_the_closed_form_of_the_global_problem(self):
    # Heterogeneous clients: G and F are client means, so grad Phi is the mean problem's.
    data = quadratic.make_quadratic(5, 4, 6, seed=3, heterogeneity=1.0)
    x = jnp.asarray([0.4, -1.0, 0.2, 0.7])
    true = diagnostics.true_hypergradient(quadratic.QUADRATIC, x, jnp.zeros(6), data, data,
                                          inner_tol=1e-10, max_inner_steps=200, cg_steps=20)
    # L-BFGS to ||grad_y G|| <= 1e-10 and CG exact in dim_y = 6 steps: float64 rounding only.
    np.testing.assert_allclose(true.hypergrad, quadratic.quadratic_hypergrad(x, data), rtol=1e-7)
    np.testing.assert_allclose(true.y_star, quadratic.quadratic_solution(x, data), rtol=1e-8)
    self.assertLessEqual(float(true.inner_grad_norm), 1e-10)
    self.assertLess(float(true.cg_residual), 1e-10)

  def test_estimate_quality(self):
    t = {"a": jnp.asarray([3.0, 4.0])}
    same = diagnostics.estimate_quality(t, t)
    self.assertAlmostEqual(float(same["cosine"]), 1.0, places=12)
    self.assertEqual(float(same["relative_error"]), 0.0)
    self.assertAlmostEqual(float(same["true_hypergrad_norm"]), 5.0, places=12)
    ortho = diagnostics.estimate_quality({"a": jnp.asarray([-4.0, 3.0])}, t)
    self.assertAlmostEqual(float(ortho["cosine"]), 0.0, places=12)
    self.assertAlmostEqual(float(ortho["relative_error"]), np.sqrt(2.0), places=12)

  def test_max_curvature_is_the_largest_eigenvalue(self):
    # g(x, y) = 1/2 y' diag(h) y - x'y: the Hessian in y is diag(h), lambda_max = 5 (gap 5:3).
    h = jnp.asarray([1.0, 3.0, 5.0, 0.5])
    inner = lambda x, y, b: 0.5 * jnp.sum(h * y * y) - jnp.sum(x * y)
    lam = diagnostics.max_curvature(inner, jnp.ones(4), jnp.zeros(4), None, jax.random.key(0),
                                    steps=100)
    self.assertAlmostEqual(float(lam), 5.0, places=10)  # error ~ (3/5)^200


class RunDiagnosticsTest(absltest.TestCase):

  def test_never_covered_share_and_diagnose_rounds(self):
    # Static element masks at ratio 0.5 with no full client: the leading half of every leaf is
    # kept by every client, the rest never (allowed explicitly), so the share is exactly 1/2.
    d = 8
    alg = algorithms.get("rafbo", problem=quadratic.QUADRATIC, num_clients=4, clients_per_round=2,
                         local_steps=1, levels=(Level(0.5, 0.5, 1.0),), mask_policy="static",
                         granularity="element", allow_uncovered=True, diagnostics=True)
    data = quadratic.make_quadratic(4, d, d, seed=0, separable=True, dtype=np.float32)
    fdata = federated.FederatedData(data, data, jnp.ones(4))
    x0 = jnp.zeros(d, jnp.float32)
    rnd = alg.make_round(x0)
    state = federated.init_state(x0, jnp.zeros(d, jnp.float32), optax.sgd(1.0))
    seen = []

    def diagnose(st, estimate):
      seen.append(int(st.round))  # the state the round started from
      return {"estimate_norm": tree.norm(estimate)}

    _, records = loop.run(rnd, state, fdata, 6, eval_every=2, diagnose_every=4,
                          diagnose_fn=diagnose)
    self.assertEqual(seen, [3])  # round 4 started from the state after 3 rounds
    self.assertEqual([r["round"] for r in records], [2, 4, 6])
    self.assertEqual([("diag_estimate_norm" in r) for r in records], [False, True, False])
    self.assertGreater(records[1]["diag_estimate_norm"], 0)
    for r in records:
      self.assertEqual(r["never_covered_x_share"], 0.5)
      self.assertEqual(r["never_covered_y_share"], 0.5)


class DriverTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()

  @pytest.mark.slow
  def test_records_the_estimate_quality(self):
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    code, err = _main(workdir=workdir, dataset="digits", num_clients=4,
                           clients_per_round=2, hidden=16, rounds=2, eval_every=1,
                           diagnose_every=2, compilation_cache="none")
    self.assertEqual(code, 0, err)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    self.assertNotIn("diag_cosine", records[0])
    last = records[1]
    self.assertBetween(last["diag_cosine"], -1.0, 1.0)
    self.assertGreater(last["diag_true_hypergrad_norm"], 0.0)
    self.assertLess(last["diag_cg_residual"], 0.1)
    self.assertIn("never_covered_x_share", last)

  def test_diagnose_every_must_be_a_multiple_of_eval_every(self):
    code, err = _main(workdir=tempfile.mkdtemp(), dataset="digits", rounds=2,
                           eval_every=2, diagnose_every=3)
    self.assertEqual(code, 2)
    self.assertIn("--diagnose_every=3 must be 0 or a positive multiple of --eval_every=2", err)


if __name__ == "__main__":
  absltest.main()
