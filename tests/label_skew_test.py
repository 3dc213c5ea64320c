"""Remedies measured under label skew (docs/method.md, section 8): the representation penalties
of the hyper-representation problem (feature_l2, task 1's default; outer_l2, opt-in), the width
scaler and the client x-delta trust region (opt-in), the same on the compact and dense paths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from bilevel import federated, models
from bilevel import algorithms
from bilevel import masks as masks_lib

from compact_test import CL, DIN, H, M, N  # the compact = dense test's sizes and data
from compact_test import _setup as _round_setup


def _batch(dtype=np.float32, seed=1):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.normal(size=(N, DIN)), dtype),
          "labels": jnp.asarray(rng.integers(0, CL, N)),
          "weight": jnp.asarray((np.arange(N) < N - 2).astype(dtype))}  # 2 padding rows


class ProblemTermsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x, self.y = models.init_mlp(jax.random.key(0), DIN, H, CL)
    self.x["hidden"]["bias"] = jnp.linspace(-0.5, 0.5, H)
    self.b = _batch()

  def test_default_is_feature_l2_only_bit_for_bit(self):
    default = models.hyper_representation_problem()
    explicit = models.hyper_representation_problem(outer_l2=0.0, feature_l2=models.FEATURE_L2,
                                                   width_scale_units=0)
    off = models.hyper_representation_problem(feature_l2=0.0)
    self.assertGreater(models.FEATURE_L2, 0.0)
    for loss in ("inner_loss", "outer_loss"):
      self.assertEqual(float(getattr(explicit, loss)(self.x, self.y, self.b)),
                       float(getattr(default, loss)(self.x, self.y, self.b)))
    self.assertEqual(float(off.inner_loss(self.x, self.y, self.b)),
                     float(default.inner_loss(self.x, self.y, self.b)))
    self.assertGreater(float(default.outer_loss(self.x, self.y, self.b)),
                       float(off.outer_loss(self.x, self.y, self.b)))

  def test_feature_l2_adds_the_weighted_mean_squared_feature_norm(self):
    base = models.hyper_representation_problem(feature_l2=0.0)
    pen = models.hyper_representation_problem(feature_l2=0.3)
    h = models.mlp_features(self.x, self.b["inputs"])
    w = self.b["weight"]
    want = 0.15 * float(jnp.sum(w * jnp.sum(h ** 2, -1)) / jnp.sum(w))  # padding rows left out
    got = float(pen.outer_loss(self.x, self.y, self.b) - base.outer_loss(self.x, self.y, self.b))
    self.assertAlmostEqual(got, want, places=5)
    self.assertGreater(want, 0.01)
    # g is untouched (the penalty is on the upper level only)
    self.assertEqual(float(pen.inner_loss(self.x, self.y, self.b)),
                     float(base.inner_loss(self.x, self.y, self.b)))
    # its x-gradient pulls the features' scale down: one small step on the penalty alone
    g = jax.grad(lambda x: pen.outer_loss(x, self.y, self.b) - base.outer_loss(x, self.y, self.b))
    x1 = jax.tree.map(lambda p, d: p - 0.01 * d, self.x, g(self.x))
    self.assertLess(float(jnp.sum(models.mlp_features(x1, self.b["inputs"]) ** 2)),
                    float(jnp.sum(h ** 2)))

  def test_outer_l2_adds_half_the_squared_norm_of_x(self):
    base = models.hyper_representation_problem()
    pen = models.hyper_representation_problem(outer_l2=0.2)
    sq = sum(float(jnp.sum(t ** 2)) for t in jax.tree.leaves(self.x))
    self.assertAlmostEqual(float(pen.outer_loss(self.x, self.y, self.b) -
                                 base.outer_loss(self.x, self.y, self.b)), 0.1 * sq, places=4)

  def test_width_scale_gives_a_submodel_the_full_models_scale(self):
    # without the feature penalty: it reads the (scaled) features, the head x4 does not
    scaled = models.hyper_representation_problem(feature_l2=0.0, width_scale_units=H)
    base = models.hyper_representation_problem(feature_l2=0.0)
    keep = (jnp.arange(H) < H // 4).astype(jnp.float32)  # a quarter-width submodel
    xm = {"hidden": {"kernel": self.x["hidden"]["kernel"] * keep[None, :], "bias":
                     self.x["hidden"]["bias"] * keep}}
    y4 = {"head": {"kernel": self.y["head"]["kernel"] * 4.0, "bias": self.y["head"]["bias"]}}
    for loss in ("inner_loss", "outer_loss"):
      # features x4 at the submodel = head x4 (the l2 term of g differs: compare f only there)
      if loss == "outer_loss":
        self.assertAlmostEqual(float(scaled.outer_loss(xm, self.y, self.b)),
                               float(base.outer_loss(xm, y4, self.b)), places=5)
      # the full model is unchanged
      self.assertEqual(float(getattr(scaled, loss)(self.x, self.y, self.b)),
                       float(getattr(base, loss)(self.x, self.y, self.b)))



class CompactEqualsDenseTest(absltest.TestCase):
  """The options read a client's kept arrays: compact (extracted) and dense (masked) agree."""

  def test_feature_l2_and_trust_region_compact_equals_dense_float64(self):
    with jax.enable_x64(True):
      # A full and a pruned level: the options act per client on its kept arrays, and each
      # further level is one more compact client program to compile.
      cfg = dict(clients_per_round=6, local_steps=2, inner_steps=1, inner_lr=0.2, outer_lr=0.5,
                 num_steps=1, v_lr=0.2, delta=1e-2, x_trust=0.01, x_trust_scope="layer",
                 levels="1/1:0.5,0.5/0.5:0.5")
      problem = models.hyper_representation_problem("tanh", feature_l2=0.05)
      out = {}
      for submodel in ("compact", "dense"):
        data, x0, y0 = _round_setup(np.float64)
        rnd = algorithms.get("rafbo", problem=problem, num_clients=M, layout=models.mlp_layout(H),
                             submodel=submodel, sampling="stratified", **cfg).make_round(x0)
        state = federated.init_state(x0, y0, optax.sgd(1.0))
        first, _ = rnd.step(state, data)
        state, _ = rnd.step(first, data)
        out[submodel], out[submodel + "_1"] = state, first
      chex.assert_trees_all_close((out["compact"].x, out["compact"].y),
                                  (out["dense"].x, out["dense"].y), rtol=1e-10, atol=1e-12)
      # the trust region bound: no client moves x by more than 1% of its submodel's norm
      # (<= ||x||), and |coverage mean_j| <= max_i |D_ij|, so one round moves x by at most
      # sqrt(C) x 1% of ||x|| (checked over the first round)
      moved = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
          jax.tree.leaves(out["dense_1"].x), jax.tree.leaves(x0)))))
      self.assertGreater(moved, 0.0)
      self.assertLessEqual(moved, np.sqrt(6) * 0.01 * float(jnp.sqrt(sum(
          jnp.sum(t ** 2) for t in jax.tree.leaves(x0)))) + 1e-12)

  def test_width_scaler_and_step_trust_region_compact_equals_dense_float64(self):
    # The CNN's defaults (tasks.hyper_representation.CNN_DEFAULTS), here on the MLP: the scaler
    # counts a client's kept units, the trust region reads its local iterates.
    with jax.enable_x64(True):
      cfg = dict(clients_per_round=6, local_steps=3, inner_steps=1, inner_lr=0.2, outer_lr=0.5,
                 num_steps=1, v_lr=0.2, delta=1e-2, x_trust=0.01, x_trust_on="step",
                 levels="1/1:0.5,0.5/0.5:0.5")
      problem = models.hyper_representation_problem("tanh", width_scale_units=H)
      out = {}
      for submodel in ("compact", "dense"):
        data, x0, y0 = _round_setup(np.float64)
        rnd = algorithms.get("rafbo", problem=problem, num_clients=M, layout=models.mlp_layout(H),
                             submodel=submodel, sampling="stratified", **cfg).make_round(x0)
        out[submodel], _ = rnd.step(federated.init_state(x0, y0, optax.sgd(1.0)), data)
      chex.assert_trees_all_close((out["compact"].x, out["compact"].y, out["compact"].v),
                                  (out["dense"].x, out["dense"].y, out["dense"].v),
                                  rtol=1e-10, atol=1e-12)
      # each of a client's 3 steps moves x by at most 1% of its local iterate's norm, so it
      # returns a delta of at most (1.01^3 - 1) ||x||, and the coverage mean no more than
      # sqrt(C) times that
      moved = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(
          jax.tree.leaves(out["dense"].x), jax.tree.leaves(x0)))))
      self.assertGreater(moved, 0.0)
      self.assertLessEqual(moved, np.sqrt(6) * (1.01 ** 3 - 1) * float(jnp.sqrt(sum(
          jnp.sum(t ** 2) for t in jax.tree.leaves(x0)))) + 1e-12)


if __name__ == "__main__":
  absltest.main()
