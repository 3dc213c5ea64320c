"""Coverage-mean aggregation and the server step against brute-force loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from bilevel import server

import bilevel


def _sums(deltas_C, masks_C, weights_C=None):
  """(sum_i w_i m_i D_i, sum_i w_i m_i, sum_i w_i): what the round's aggregators divide."""
  w = jnp.ones(jax.tree.leaves(masks_C)[0].shape[:1]) if weights_C is None else weights_C
  w = jnp.asarray(w)
  num = jax.tree.map(lambda m, d: jnp.tensordot(w, m * d, axes=1), masks_C, deltas_C)
  return num, jax.tree.map(lambda m: jnp.tensordot(w, m, axes=1), masks_C), jnp.sum(w)


def covered_by_some(masks_C, weights_C=None):
  """1 where some client with positive weight keeps the coordinate (sum_i w_i m_i > 0)."""
  return jax.tree.map(lambda d: (d > 0).astype(d.dtype), _sums(masks_C, masks_C, weights_C)[1])


def zero_fill_mean(deltas_C, masks_C, weights_C=None):
  """FedAvg with zero-filled deltas, sum_i w_i m_i D_i / sum_i w_i: the round's zero_fill
  aggregator on the stacked clients' sums."""
  return server.zero_fill_from_sums(*_sums(deltas_C, masks_C, weights_C))


def _case(seed=0, c=6):
  rng = np.random.default_rng(seed)
  deltas = {"w": rng.normal(size=(c, 4, 3)), "b": rng.normal(size=(c, 5))}
  masks = {"w": (rng.random((c, 4, 3)) < 0.4).astype(np.float64),
           "b": (rng.random((c, 5)) < 0.5).astype(np.float64)}
  weights = rng.integers(1, 10, c).astype(np.float64)
  return deltas, masks, weights


class CoverageMeanTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(jax.enable_x64(True))

  @parameterized.parameters(True, False)
  def test_matches_brute_force(self, weighted):
    deltas, masks, weights = _case()
    w = weights if weighted else np.ones(6)
    got = bilevel.coverage_mean(jax.tree.map(jnp.asarray, deltas), jax.tree.map(jnp.asarray, masks),
                                jnp.asarray(w) if weighted else None)
    for name in deltas:
      d, m = deltas[name], masks[name]
      for j in np.ndindex(d.shape[1:]):
        num = sum(w[i] * m[(i,) + j] * d[(i,) + j] for i in range(6))
        den = sum(w[i] * m[(i,) + j] for i in range(6))
        expected = num / den if den > 0 else 0.0
        np.testing.assert_allclose(got[name][j], expected, rtol=1e-12, atol=1e-15)

  def test_uncovered_coordinates_do_not_move(self):
    deltas, masks, _ = _case(1)
    masks["b"][:, 2] = 0.0
    params = {"w": jnp.ones((4, 3)), "b": jnp.arange(5.0)}
    agg = server.coverage_mean(deltas, masks)
    cover = covered_by_some(masks)
    for opt in (optax.sgd(1.0), optax.adam(0.1)):
      new, _ = server.server_step(params, agg, cover, opt, opt.init(params))
      self.assertEqual(float(new["b"][2]), 2.0)
      moved = np.asarray(cover["w"]) > 0
      self.assertTrue(np.all(np.asarray(new["w"])[~moved] == 1.0))
    new, _ = server.server_step(params, agg, cover, optax.sgd(1.0), optax.sgd(1.0).init(params))
    np.testing.assert_allclose(new["w"], params["w"] + agg["w"], rtol=1e-15)

  @parameterized.parameters("adam", "momentum")
  def test_uncovered_coordinates_keep_their_optimiser_state(self, name):
    # A zero pseudo-gradient at an uncovered coordinate is no observation: Adam's mu and nu (and
    # a momentum trace) must not decay there while the parameter is frozen.
    deltas, masks, _ = _case(6)
    masks["b"][:, 2] = 0.0
    params = {"w": jnp.ones((4, 3)), "b": jnp.arange(5.0)}
    agg, cover = server.coverage_mean(deltas, masks), covered_by_some(masks)
    opt = optax.adam(0.1) if name == "adam" else optax.sgd(0.1, momentum=0.9)
    state = opt.init(params)
    # A round in: nonzero moments everywhere (every coordinate covered once).
    ones = jax.tree.map(jnp.ones_like, params)
    params, state = server.server_step(params, ones, ones, opt, state)
    _, new = jax.jit(lambda p, s: server.server_step(p, agg, cover, opt, s))(params, state)
    # The state leaves of "b" (Adam's mu and nu, or the momentum trace), in leaf order.
    moments = [(np.asarray(o), np.asarray(n))
               for o, n in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True)
               if o.shape == (5,)]
    self.assertLen(moments, 2 if name == "adam" else 1)
    covered = np.asarray(cover["b"]) > 0
    self.assertFalse(covered[2])
    for o, n in moments:
      np.testing.assert_array_equal(n[~covered], o[~covered])  # uncovered: exactly unchanged
      self.assertTrue(np.all(n[covered] != o[covered]))
    if name == "adam":
      self.assertEqual(int(new[0].count), int(state[0].count) + 1)  # counts advance as usual

  def test_permutation_invariant(self):
    deltas, masks, weights = _case(2)
    perm = np.random.default_rng(0).permutation(6)
    a = server.coverage_mean(deltas, masks, weights)
    b = server.coverage_mean(jax.tree.map(lambda t: t[perm], deltas),
                             jax.tree.map(lambda t: t[perm], masks), weights[perm])
    chex.assert_trees_all_close(a, b, rtol=1e-12)

  def test_all_ones_masks_give_the_plain_mean(self):
    deltas, masks, _ = _case(3)
    ones = jax.tree.map(np.ones_like, masks)
    got = server.coverage_mean(deltas, ones)
    chex.assert_trees_all_close(got, jax.tree.map(lambda d: d.mean(axis=0), deltas), rtol=1e-12)

  def test_zero_fill_divides_by_all_clients(self):
    deltas, masks, weights = _case(4)
    got = zero_fill_mean(deltas, masks, weights)
    for name in deltas:
      expected = np.tensordot(weights, masks[name] * deltas[name], axes=1) / weights.sum()
      np.testing.assert_allclose(got[name], expected, rtol=1e-12)

  def test_coverage_stats_is_public(self):
    _, masks, _ = _case(5)
    stats = bilevel.coverage_stats(masks)
    self.assertEqual(set(stats._fields), {"min", "mean", "uncovered_share"})



class ZeroWeightTest(absltest.TestCase):

  def test_zero_weight_clients_move_nothing(self):
    # Client 0 has weight 0 (no examples with weighting="examples", or inactive) and huge
    # deltas; coordinate 3 is kept by client 0 alone.
    rng = np.random.default_rng(0)
    deltas = {"a": jnp.asarray(rng.normal(size=(3, 4)))}
    deltas["a"] = deltas["a"].at[0].set(1e6)
    masks = {"a": jnp.asarray([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]])}
    weights = jnp.asarray([0.0, 2.0, 3.0])
    got = server.coverage_mean(deltas, masks, weights)["a"]
    d, m, w = np.asarray(deltas["a"]), np.asarray(masks["a"]), np.asarray(weights)
    # The weighted mean over clients 1 and 2 where they keep the coordinate, else 0.
    want = [(w[1:] * m[1:, j] * d[1:, j]).sum() / (w[1:] * m[1:, j]).sum() for j in range(3)]
    want.append(0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    self.assertEqual(float(got[3]), 0.0)  # kept only by the zero-weight client: no step
    np.testing.assert_array_equal(covered_by_some(masks, weights)["a"], [1, 1, 1, 0])
    zero = zero_fill_mean(deltas, masks, weights)["a"]
    np.testing.assert_allclose(zero, (w[1:, None] * m[1:] * d[1:]).sum(0) / w[1:].sum(),
                               rtol=1e-6)

if __name__ == "__main__":
  absltest.main()
