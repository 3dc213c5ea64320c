"""Masked inner solve and compact-submodel extraction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from bilevel import inner, models, submodel
from bilevel import masks as masks_lib
from bilevel.masks import Axes
import quadratic  # tests/quadratic.py


def kept_indices(unit_mask, k):
  """The k kept unit indices in increasing order (what submodel.compact_indices gathers)."""
  return jnp.nonzero(unit_mask, size=k, fill_value=0)[0].astype(jnp.int32)


def scatter(axes_tree, compact, idx, like):
  """Inverse of submodel.extract: full-size arrays (shapes of `like`), zero outside the kept
  indices (so masked-full and compact computations can be compared)."""

  def leaf(axes: Axes, c: jax.Array, full: jax.Array) -> jax.Array:
    for g, ax in axes.pairs:
      if g not in idx:
        continue
      shape = list(c.shape)
      shape[ax] = full.shape[ax]
      c = jnp.zeros(shape, c.dtype).at[(slice(None),) * ax + (idx[g],)].set(c)
    return c

  return jax.tree.map(leaf, axes_tree, compact, like)


class InnerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  def test_converges_to_closed_form(self):
    data = quadratic.make_quadratic(3, 4, 5, seed=0)
    x = jnp.arange(4.0)
    y = inner.inner_solve(quadratic.quadratic_inner, x, jnp.zeros(5), quadratic.quadratic_mean(data),
                          num_steps=300, step_size=0.25)
    np.testing.assert_allclose(y, quadratic.quadratic_solution(x, data), rtol=1e-10)

  def test_off_mask_entries_stay_exactly(self):
    data = quadratic.make_quadratic(3, 4, 5, seed=0)
    y0 = jnp.asarray(np.random.default_rng(0).normal(size=5))
    my = jnp.array([1.0, 0, 1, 0, 1])
    y = inner.inner_solve(quadratic.quadratic_inner, jnp.ones(4), y0, quadratic.quadratic_mean(data),
                          num_steps=7, step_size=0.1, mask_y=my)
    np.testing.assert_array_equal(np.asarray(y)[[1, 3]], np.asarray(y0)[[1, 3]])
    self.assertTrue(np.all(np.asarray(y)[[0, 2, 4]] != np.asarray(y0)[[0, 2, 4]]))


class SubmodelTest(absltest.TestCase):

  def test_compact_network_computes_the_masked_network(self):
    layout = models.mlp_layout(10)
    x, y = models.init_mlp(jax.random.key(0), 6, 10, 4)
    y = jax.tree.map(lambda t: t + 0.1, y)
    um = {"hidden": jnp.array([1.0, 0, 0, 1, 1, 0, 1, 0, 0, 1])}
    mx, my = masks_lib.expand_unit_masks(layout, um, um, x, y)
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
    idx = {"hidden": kept_indices(um["hidden"], 5)}
    xs, ys = submodel.extract(layout.x, x, idx), submodel.extract(layout.y, y, idx)
    self.assertEqual(xs["hidden"]["kernel"].shape, (6, 5))
    self.assertEqual(ys["head"]["kernel"].shape, (5, 4))
    masked = models.mlp_logits(jax.tree.map(jnp.multiply, x, mx), jax.tree.map(jnp.multiply, y, my),
                               inputs)
    np.testing.assert_allclose(models.mlp_logits(xs, ys, inputs), masked, rtol=1e-5, atol=1e-6)
    # flax module and the array-level forward pass agree
    params = {"params": {**x, **y}}
    np.testing.assert_allclose(models.MLP(10, 4).apply(params, inputs),
                               models.mlp_logits(x, y, inputs), rtol=1e-6)

  @pytest.mark.slow
  def test_compact_cnn_computes_the_masked_cnn(self):
    layout = models.cnn_layout((6, 8))
    x, y = models.init_cnn(jax.random.key(2), (8, 8, 3), (6, 8), 5)
    um = {"conv1": jnp.array([1.0, 0, 1, 1, 0, 0]), "conv2": jnp.array([0.0, 1, 1, 0, 1, 0, 0, 1])}
    mx, my = masks_lib.expand_unit_masks(layout, um, um, x, y)
    idx = {"conv1": kept_indices(um["conv1"], 3),
           "conv2": kept_indices(um["conv2"], 4)}
    xs, ys = submodel.extract(layout.x, x, idx), submodel.extract(layout.y, y, idx)
    self.assertEqual(xs["conv2"]["kernel"].shape, (3, 3, 3, 4))
    inputs = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
    masked = models.cnn_logits(jax.tree.map(jnp.multiply, x, mx), jax.tree.map(jnp.multiply, y, my),
                               inputs)
    np.testing.assert_allclose(models.cnn_logits(xs, ys, inputs), masked, rtol=1e-5, atol=1e-6)
    # flax's Dense keeps the head kernel as [positions * channels, classes]
    flax_head = dict(y["head"], kernel=y["head"]["kernel"].reshape(-1, 5))
    np.testing.assert_allclose(models.CNN((6, 8), 5).apply({"params": {**x, "head": flax_head}},
                                                           inputs),
                               models.cnn_logits(x, y, inputs), rtol=1e-5, atol=1e-6)

  def test_scatter_inverts_extract_on_kept_entries(self):
    layout = models.mlp_layout(10)
    x, _ = models.init_mlp(jax.random.key(1), 6, 10, 4)
    um = jnp.array([0.0, 1, 1, 0, 0, 0, 1, 0, 0, 0])
    idx = {"hidden": kept_indices(um, 3)}
    back = scatter(layout.x, submodel.extract(layout.x, x, idx), idx, x)
    mx, _ = masks_lib.expand_unit_masks(layout, {"hidden": um}, {"hidden": um}, x, {"head": {
        "kernel": jnp.zeros((10, 4)), "bias": jnp.zeros(4)}})
    chex.assert_trees_all_equal(back, jax.tree.map(lambda a, m: a * m, x, mx))

  @pytest.mark.slow
  def test_scatter_add_equals_sum_of_scatters(self):
    # The CNN layout has a leaf indexed by two groups (conv2's kernel: in and out channels) and
    # a leaf indexed by none (the head bias): every branch of scatter_add.
    layout = models.cnn_layout((6, 8))
    x, y = models.init_cnn(jax.random.key(3), (8, 8, 3), (6, 8), 5)
    keys = jax.random.split(jax.random.key(4), 5)
    idx_C = {g: jnp.stack([jnp.sort(jax.random.permutation(k, n)[:kk]) for k in keys])
             for g, n, kk in (("conv1", 6, 4), ("conv2", 8, 3))}
    for axes, like in ((layout.x, x), (layout.y, y)):
      # client c sends (c + 1) x its extracted parameters
      c = jax.vmap(lambda s, i: submodel.extract(axes, jax.tree.map(lambda a: s * a, like), i))(
          jnp.arange(1.0, 6.0), idx_C)
      want = jax.tree.map(lambda *a: sum(a), *[
          scatter(axes, jax.tree.map(lambda t: t[i], c),
                           {g: v[i] for g, v in idx_C.items()}, like) for i in range(5)])
      got = submodel.scatter_add(axes, c, idx_C, like)
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    # Masks of compact arrays vary along group axes only: the per-unit sum equals the full one.
    w = jnp.array([1.0, 0.0, 2.0, 3.0, 0.5])
    units = {g: (jax.random.uniform(k, idx_C[g].shape) < 0.7).astype(jnp.float32)
             for g, k in zip(idx_C, jax.random.split(jax.random.key(5)))}
    masks_C = jax.vmap(lambda u, i: masks_lib.expand_unit_masks(
        layout, u, u, submodel.extract(layout.x, x, i), submodel.extract(layout.y, y, i)))(
            units, idx_C)
    for axes, m, like in ((layout.x, masks_C[0], x), (layout.y, masks_C[1], y)):
      jax.tree.map(np.testing.assert_array_equal,
                   submodel.scatter_add_units(axes, m, idx_C, like, w),
                   submodel.scatter_add(axes, m, idx_C, like, w))

  def test_units_major_form_is_the_same_submodel(self):
    # CNN: conv2's kernel [3, 3, 6, 8] has two unit axes (2, 3), neither leading.
    layout = models.cnn_layout((6, 8))
    um = submodel.units_major_layout(layout)
    x, y = models.init_cnn(jax.random.key(6), (8, 8, 3), (6, 8), 5)
    xu = submodel.to_units_major(layout.x, x)
    self.assertEqual(xu["conv2"]["kernel"].shape, (6, 8, 3, 3))
    self.assertEqual(um.x["conv2"]["kernel"].pairs, (("conv1", 0), ("conv2", 1)))
    self.assertEqual(xu["conv1"]["kernel"].shape, (6, 3, 3, 3))
    jax.tree.map(np.testing.assert_array_equal, submodel.from_units_major(layout.x, xu), x)
    # Extracting units-major, then moving back, extracts the same entries.
    idx = {"conv1": jnp.array([0, 2, 5]), "conv2": jnp.array([1, 4])}
    jax.tree.map(np.testing.assert_array_equal,
                 submodel.from_units_major(layout.x, submodel.extract(um.x, xu, idx)),
                 submodel.extract(layout.x, x, idx))
    # The losses of units-major arguments are the model's losses.
    problem = models.hyper_representation_problem(model="cnn")
    um_problem = submodel.units_major_problem(problem, layout)
    batch = {"inputs": jax.random.normal(jax.random.key(7), (4, 8, 8, 3)),
             "labels": jnp.array([0, 1, 2, 3]), "weight": jnp.ones(4)}
    yu = submodel.to_units_major(layout.y, y)
    self.assertEqual(um_problem.inner_loss(xu, yu, batch), problem.inner_loss(x, y, batch))
    self.assertEqual(um_problem.outer_loss(xu, yu, batch), problem.outer_loss(x, y, batch))


class CnnShapesTest(absltest.TestCase):

  def test_cnn_parameter_shapes(self):
    # 8x8x3 input, 3x3 convs with stride 2 (SAME): the head reads the flattened 2x2x8 features,
    # stored [positions, channels, classes].
    x, y = models.init_cnn(jax.random.key(0), (8, 8, 3), (6, 8), 5)
    self.assertEqual(x["conv1"]["kernel"].shape, (3, 3, 3, 6))
    self.assertEqual(x["conv2"]["kernel"].shape, (3, 3, 6, 8))
    self.assertEqual(y["head"]["kernel"].shape, (4, 8, 5))


if __name__ == "__main__":
  absltest.main()
