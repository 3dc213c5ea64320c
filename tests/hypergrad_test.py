"""Estimators vs the closed form, fd bias order, masked vs extracted subproblem.

Every estimator check runs twice (chex.variants): the estimator jitted and called eagerly.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized

from bilevel import hypergrad, models, problems, submodel, tree
from bilevel import masks as masks_lib
from bilevel.errors import ConfigError
import quadratic  # tests/quadratic.py
from inner_submodel_test import kept_indices, scatter  # test helpers

# Settings under which each estimator reaches its own accuracy on the quadratic (spectrum [1, 4]):
# v-iteration / Neumann contract by (1 - 0.25 * 1)^N, CG is exact in dim_y steps.
SETTINGS = {
    "cg": dict(num_steps=30),
    "exact": dict(num_steps=200, step_size=0.25),
    "neumann": dict(num_steps=200, step_size=0.25),
    "fd": dict(num_steps=200, step_size=0.25, delta=1e-3),
}
RTOL = {"cg": 1e-6, "exact": 1e-6, "neumann": 1e-6, "fd": 1e-4}


def _toy(seed=0, dx=6, dy=8):
  data = quadratic.make_quadratic(4, dx, dy, seed=seed)
  x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=dx))
  return data, quadratic.quadratic_mean(data), x


def _mlp_problem():
  """A smooth (tanh) MLP classification problem in float64."""
  rng = np.random.default_rng(0)
  x, y = models.init_mlp(jax.random.key(0), 5, 7, 3, dtype=jnp.float64)
  y = jax.tree.map(lambda t: t + 0.3 * rng.normal(size=t.shape), y)  # nonzero head
  batch = {"inputs": jnp.asarray(rng.normal(size=(16, 5))),
           "labels": jnp.asarray(rng.integers(0, 3, 16)), "weight": jnp.ones(16)}
  return models.hyper_representation_problem("tanh", l2=0.1), x, y, batch


def _estimator(variant, problem, **options):
  """hypergrad.hypergradient for `problem` as the test variant runs it (jitted or not):
  (x, y, inner_batch, outer_batch, v=, mask_x=, mask_y=) -> result; options are static."""
  return variant(lambda x, y, inner_batch, outer_batch, **arrays: hypergrad.hypergradient(
      problem, x, y, inner_batch, outer_batch, **options, **arrays))


class EstimatorTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def test_registry_is_covered(self):
    self.assertEqual(set(hypergrad.ESTIMATORS), set(SETTINGS))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SETTINGS)
  def test_matches_closed_form(self, estimator):
    data, mean, x = _toy()
    y = quadratic.quadratic_solution(x, data)
    estimate = _estimator(self.variant, quadratic.QUADRATIC, estimator=estimator,
                          **SETTINGS[estimator])
    res = estimate(x, y, mean, mean)
    np.testing.assert_allclose(res.hypergrad, quadratic.quadratic_hypergrad(x, data),
                               rtol=RTOL[estimator])
    v_star = jnp.linalg.solve(mean.A, y - mean.c)
    np.testing.assert_allclose(res.v, v_star, rtol=RTOL[estimator] * 10)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SETTINGS)
  def test_masked_equals_extracted_subproblem(self, estimator):
    data, mean, x = _toy()
    y = quadratic.quadratic_solution(x, data) + 0.1
    rng = np.random.default_rng(3)
    keep_x, keep_y = np.sort(rng.choice(6, 4, replace=False)), np.sort(rng.choice(8, 5, replace=False))
    mx, my = jnp.zeros(6).at[keep_x].set(1.0), jnp.zeros(8).at[keep_y].set(1.0)
    v0 = jnp.asarray(rng.normal(size=8))
    kw = dict(estimator=estimator, **SETTINGS[estimator])
    kw["num_steps"] = 5  # a partial solve: equality must hold step by step, not only at the limit
    full = _estimator(self.variant, quadratic.QUADRATIC, **kw)(x, y, mean, mean, v=v0, mask_x=mx,
                                                             mask_y=my)
    embed = lambda sub, idx, n: jnp.zeros(n, sub.dtype).at[idx].set(sub)
    sub_problem = problems.BilevelProblem(
        lambda xs, ys, b: quadratic.quadratic_inner(embed(xs, keep_x, 6), embed(ys, keep_y, 8), b),
        lambda xs, ys, b: quadratic.quadratic_outer(embed(xs, keep_x, 6), embed(ys, keep_y, 8), b))
    sub = _estimator(self.variant, sub_problem, **kw)(x[keep_x], y[keep_y], mean, mean,
                                                      v=v0[keep_y])
    np.testing.assert_allclose(full.hypergrad[keep_x], sub.hypergrad, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(np.delete(full.hypergrad, keep_x), 0.0)
    np.testing.assert_allclose(full.v[keep_y], sub.v, rtol=1e-12, atol=1e-14)
    # v outside the mask comes back as it was sent
    np.testing.assert_array_equal(np.delete(full.v, keep_y), np.delete(v0, keep_y))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("fd", "exact", "cg")
  def test_unit_masked_mlp_equals_compact_submodel(self, estimator):
    problem, x, y, batch = _mlp_problem()
    layout = models.mlp_layout(7)
    umx = {"hidden": jnp.array([1., 0, 1, 1, 0, 1, 0])}
    umy = {"hidden": jnp.array([1., 0, 1, 0, 0, 1, 0])}
    mx, my = masks_lib.expand_unit_masks(layout, umx, umy, x, y)
    v0 = jax.tree.map(lambda t: jnp.asarray(np.random.default_rng(1).normal(size=t.shape)), y)
    kw = dict(estimator=estimator, num_steps=4, step_size=0.3, delta=1e-4)
    full = _estimator(self.variant, problem, **kw)(x, y, batch, batch, v=v0, mask_x=mx, mask_y=my)
    # The compact y keeps the head rows of units kept on both sides; x keeps its own units.
    ix = kept_indices(umx["hidden"], 4)
    iy = kept_indices(umy["hidden"], 3)
    xs = submodel.extract(layout.x, x, {"hidden": ix})
    ys = submodel.extract(layout.y, y, {"hidden": iy})
    vs = submodel.extract(layout.y, v0, {"hidden": iy})
    # x units kept but whose head row is pruned still feed the head through no row: embed y rows.
    def sub_loss(loss):
      return lambda xs_, ys_, b: loss(
          scatter(layout.x, xs_, {"hidden": ix}, x),
          scatter(layout.y, ys_, {"hidden": iy}, y), b)
    sub_problem = problems.BilevelProblem(sub_loss(problem.inner_loss), sub_loss(problem.outer_loss))
    sub = _estimator(self.variant, sub_problem, **kw)(xs, ys, batch, batch, v=vs)
    back = scatter(layout.x, sub.hypergrad, {"hidden": ix}, x)
    chex.assert_trees_all_close(full.hypergrad, back, rtol=1e-10, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_products_on_quadratic_are_exact(self):
    _, mean, x = _toy()
    v = jnp.asarray(np.random.default_rng(5).normal(size=8))
    y = jnp.asarray(np.random.default_rng(6).normal(size=8))
    for name, product in hypergrad.PRODUCTS.items():
      out = self.variant(lambda x, y, v, batch, product=product: product(
          quadratic.quadratic_inner, x, y, v, batch, 1e-2, True))(x, y, v, mean)
      # g is quadratic in y, so central differences are exact up to rounding.
      np.testing.assert_allclose(out.hv, mean.A @ v, rtol=1e-9, err_msg=name)
      np.testing.assert_allclose(out.jv, -mean.B.T @ v, rtol=1e-9, err_msg=name)

  @pytest.mark.slow
  def test_fd_bias_shrinks_fourfold_when_delta_halves(self):
    problem, x, y, batch = _mlp_problem()
    v = jax.tree.map(lambda t: jnp.asarray(np.random.default_rng(2).normal(size=t.shape)), y)
    exact = hypergrad.exact_products(problem.inner_loss, x, y, v, batch, 0.0, True)
    errs = []
    for delta in (0.2, 0.1, 0.05):
      fd = hypergrad.fd_products(problem.inner_loss, x, y, v, batch, delta, True)
      errs.append(float(tree.norm(tree.sub(fd.hv, exact.hv)) + tree.norm(tree.sub(fd.jv, exact.jv))))
    for big, small in zip(errs, errs[1:]):
      self.assertBetween(big / small, 3.5, 4.5)  # O(delta^2) bias: ratio 4

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("neumann", "cg")
  @pytest.mark.slow
  def test_fd_products_match_exact_products(self, estimator):
    # Central differences with delta 1e-4 on a smooth (tanh) problem in float64: O(delta^2) =
    # 1e-8 bias times the third derivatives, plus 1e-16 / 1e-4 rounding; rtol 1e-6 leaves room.
    problem, x, y, batch = _mlp_problem()
    kw = dict(estimator=estimator, num_steps=4, step_size=0.2, delta=1e-4)
    exact = _estimator(self.variant, problem, product="exact", **kw)(x, y, batch, batch)
    fd = _estimator(self.variant, problem, product="fd", **kw)(x, y, batch, batch)
    chex.assert_trees_all_close((fd.hypergrad, fd.v), (exact.hypergrad, exact.v), rtol=1e-6,
                                atol=1e-9)
    # ... and the fd products were really used (they round differently from the exact ones).
    self.assertGreater(float(tree.norm(tree.sub(fd.hypergrad, exact.hypergrad))), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_projection_bounds_v(self):
    data, mean, x = _toy()
    y = quadratic.quadratic_solution(x, data)
    kw = dict(estimator="exact", num_steps=50, step_size=0.25)
    res = _estimator(self.variant, quadratic.QUADRATIC, radius=0.1, **kw)(x, y, mean, mean)
    free = _estimator(self.variant, quadratic.QUADRATIC, **kw)(x, y, mean, mean)
    self.assertGreater(float(jnp.linalg.norm(free.v)), 0.2)  # the constraint is active
    # Projected onto the ball: on its boundary (a v = 0 or an unprojected v fails), and in the
    # direction of the projected fixed point's gradient step, i.e. not v = 0.
    self.assertAlmostEqual(float(jnp.linalg.norm(res.v)), 0.1, delta=1e-9)
    self.assertGreater(float(jnp.vdot(res.v, free.v)), 0.0)

  def test_bad_options_raise(self):
    _, mean, x = _toy()
    y = jnp.zeros(8)
    for kw, text in [(dict(estimator="newton"), "'newton'"), (dict(step_size=0.0), "step_size=0.0"),
                     (dict(delta=-1.0), "delta=-1.0"), (dict(num_steps=-2), "num_steps=-2")]:
      with self.assertRaisesRegex(ConfigError, text):
        hypergrad.hypergradient(quadratic.QUADRATIC, x, y, mean, mean, **kw)

  def test_estimator_cost_model(self):
    # grad f + 2 gradients per product: fd with the Cauchy step does H v0, 3 H r and the final
    # J v (5 products); with the fixed step 3 H v and J v (4); neumann 2 H p and J v (3).
    self.assertEqual(hypergrad.fd(num_steps=3).products(), (4, 1))
    self.assertEqual(hypergrad.fd(num_steps=3, v_step="fixed").products(), (3, 1))
    self.assertEqual(hypergrad.neumann(num_steps=3).products(), (2, 1))

  @parameterized.parameters(*SETTINGS)
  def test_a_name_and_its_value_are_the_same_estimator(self, estimator):
    data, mean, x = _toy()
    y = quadratic.quadratic_solution(x, data) + 0.1
    v = jnp.asarray(np.random.default_rng(4).normal(size=8))
    est = lambda **kw: hypergrad.hypergradient(quadratic.QUADRATIC, x, y, mean, mean, v=v, **kw)
    by_value = est(estimator=hypergrad.ESTIMATORS[estimator](**SETTINGS[estimator]))
    chex.assert_trees_all_equal(est(estimator=estimator, **SETTINGS[estimator]), by_value)
    with self.assertRaisesRegex(ConfigError, "num_steps"):
      est(estimator=hypergrad.ESTIMATORS[estimator](), num_steps=3)

  def test_a_user_written_estimator_is_used(self):
    data, mean, x = _toy()
    y = quadratic.quadratic_solution(x, data)
    res = hypergrad.hypergradient(quadratic.QUADRATIC, x, y, mean, mean, estimator=Direct())
    np.testing.assert_allclose(res.hypergrad, quadratic.quadratic_hypergrad(x, data), rtol=1e-10)


class Direct:
  """A user's estimator (hypergrad.Estimator): H v = grad_y f solved with the dense Hessian."""

  product, delta, warm_start = "exact", 1e-3, False

  def __call__(self, problem, x, y, inner_batch, outer_batch, v=None, mask_x=None, mask_y=None):
    gxf, gyf = jax.grad(problem.outer_loss, argnums=(0, 1))(x, y, outer_batch)
    v = jnp.linalg.solve(jax.hessian(problem.inner_loss, argnums=1)(x, y, inner_batch), gyf)
    jv = hypergrad.exact_products(problem.inner_loss, x, y, v, inner_batch, 0.0, True).jv
    return hypergrad.HypergradResult(gxf - jv, v)

  def products(self):
    return 0, 1

if __name__ == "__main__":
  absltest.main()
