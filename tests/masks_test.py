"""Mask policies, unit expansion, resource levels, coverage checks and statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from bilevel import models
from bilevel import masks as masks_lib
from bilevel.errors import ConfigError

K = 12
LAYOUT = models.mlp_layout(K)


def _params():
  return models.init_mlp(jax.random.key(0), 5, K, 3)


def _units(policy, rx, ry, key=0, q=0, available=None):
  x, y = _params()
  return masks_lib.unit_masks(LAYOUT, policy, rx, ry, jax.random.key(key), q, x, y, available)


class PolicyTest(parameterized.TestCase):

  @parameterized.product(policy=tuple(masks_lib.POLICIES), rx=(1.0, 0.5, 0.3), ry=(1.0, 0.25))
  def test_keep_ratio_and_nesting(self, policy, rx, ry):
    umx, umy = _units(policy, rx, ry, key=3, q=5)
    # The hidden group is shared (x's hidden layer, y's head rows): both sides keep the
    # intersection, min(rx, ry) of the units.
    k = masks_lib.host_keep_count(min(rx, ry), K)
    self.assertEqual(int(umx["hidden"].sum()), k)
    np.testing.assert_array_equal(umx["hidden"], umy["hidden"])

  def test_x_only_and_y_only_groups_keep_their_own_ratio(self):
    layout = masks_lib.UnitLayout({"a": 10, "b": 20}, x={"w": masks_lib.Axes((("a", 0),))},
                                  y={"u": masks_lib.Axes((("b", 0),))})
    x, y = {"w": jnp.ones(10)}, {"u": jnp.ones(20)}
    for policy in masks_lib.POLICIES:
      umx, umy = masks_lib.unit_masks(layout, policy, 0.3, 0.6, jax.random.key(0), 1, x, y)
      self.assertEqual((int(umx["a"].sum()), int(umy["b"].sum())), (3, 12), policy)

  def test_shared_group_with_ry_below_rx_keeps_the_intersection_on_both_sides(self):
    # Level 1/0.5: x would keep every hidden unit, but a unit whose head row y prunes gets an
    # exactly zero hypergradient; both sides keep the same ceil(0.5 K) units.
    for policy in masks_lib.POLICIES:
      umx, umy = _units(policy, 1.0, 0.5, key=2, q=3)
      self.assertEqual(int(umx["hidden"].sum()), math.ceil(0.5 * K), policy)
      np.testing.assert_array_equal(umx["hidden"], umy["hidden"])
    x, _ = _params()
    cfg = dict(policy="static", granularity="unit")
    with self.assertRaisesRegex(ConfigError, r"r_y=0\.5.*6 of 12 .*uncovered"):
      masks_lib.check_coverable(LAYOUT, x, np.array([[1.0, 0.5], [0.5, 0.5]]), **cfg)

  def test_a_policy_is_a_value_and_its_name_the_same(self):
    for name, policy in masks_lib.POLICIES.items():
      for a, b in zip(_units(name, 0.5, 0.5, key=4, q=7), _units(policy, 0.5, 0.5, key=4, q=7)):
        np.testing.assert_array_equal(a["hidden"], b["hidden"])
    # A user's own policy: the trailing units (the reverse of static).
    trailing = lambda key, q, n, scores: jnp.arange(n)[::-1]
    umx, _ = _units(trailing, 0.25, 1.0)
    np.testing.assert_array_equal(umx["hidden"], (jnp.arange(K) >= K - 3).astype(jnp.float32))
    masks_lib.validate_masks(LAYOUT, policy=trailing, granularity="unit")
    with self.assertRaisesRegex(ConfigError, "mask_policy=3"):
      masks_lib.validate_masks(LAYOUT, policy=3, granularity="unit")

  @parameterized.parameters(*masks_lib.POLICIES)
  def test_element_keep_ratio(self, policy):
    x, y = _params()
    mx, my = masks_lib.element_masks(policy, 0.3, 0.6, jax.random.key(1), 2, x, y)
    for m, r in ((mx, 0.3), (my, 0.6)):
      for leaf in jax.tree.leaves(m):
        self.assertEqual(int(leaf.sum()), masks_lib.host_keep_count(r, leaf.size))


# ceil(r n) for the ratios and widths (float32 ceil(r n - 1e-6) gave 61, 121, 141 at 200).
EXACT = {(0.3, 200): 60, (0.6, 200): 120, (0.7, 200): 140, (0.3, 100): 30, (0.6, 100): 60,
         (0.7, 100): 70}


_TRACED_UNIT_MASKS = {}  # (n, policy) -> jitted unit_masks(avail, r) on init_mlp(key 0)'s x, y


class KeepCountTest(parameterized.TestCase):

  def test_host_and_traced_counts_are_exact(self):
    traced = jax.jit(masks_lib.keep_count)
    for (r, n), k in EXACT.items():
      self.assertEqual(masks_lib.host_keep_count(r, n), k)
      self.assertEqual(int(traced(jnp.float32(r), jnp.int32(n))), k)
      self.assertEqual(int(traced(jnp.float32(r), jnp.float32(n))), k)  # a sum of 0/1 units
    rng = np.random.default_rng(0)
    ratios = rng.integers(1, 10**6 + 1, 300) / 10**6  # every 6-decimal ratio is exact
    ns = rng.integers(1, 2**31 - 1, 300)
    got = jax.jit(jax.vmap(masks_lib.keep_count))(jnp.asarray(ratios, jnp.float32),
                                                  jnp.asarray(ns, jnp.int32))
    want = [min(max(-(-round(r * 10**6) * int(n) // 10**6), 1), int(n)) for r, n in zip(ratios, ns)]
    np.testing.assert_array_equal(got, want)
    self.assertEqual(masks_lib.host_keep_count(0.3, 10), 3)  # 0.3 * 10 = 3.0000000000000004
    self.assertEqual(masks_lib.host_keep_count(1e-9, 10), 1)
    self.assertEqual(masks_lib.host_keep_count(1.0, 7), 7)

  @parameterized.parameters(0.3, 0.6, 0.7)
  def test_masks_and_kept_counts_are_exact(self, r):
    ratio = r
    r = jnp.float32(r)  # as the round passes it (float32 client ratios)
    for n in (200, 100):
      k = EXACT[(ratio, n)]
      x, y = models.init_mlp(jax.random.key(0), 5, n, 3)
      for policy in masks_lib.POLICIES:
        umx, umy = masks_lib.unit_masks(models.mlp_layout(n), policy, r, r, jax.random.key(1), 2,
                                        x, y)
        self.assertEqual((int(umx["hidden"].sum()), int(umy["hidden"].sum())), (k, k), policy)
        kept = masks_lib.unit_kept_counts(umx, models.mlp_layout(n).x, x)
        self.assertEqual(float(kept["hidden"]["kernel"]), 5 * k)
        avail = {"hidden": jnp.ones(n)}  # owned units: a traced count of n
        if (n, policy) not in _TRACED_UNIT_MASKS:  # r traced, as the round passes it: one
          # program per (n, policy) serves every ratio
          _TRACED_UNIT_MASKS[n, policy] = jax.jit(
              lambda a, r, n=n, x=x, y=y, policy=policy: masks_lib.unit_masks(
                  models.mlp_layout(n), policy, r, r, jax.random.key(1), 2, x, y, a))
        umx, _ = _TRACED_UNIT_MASKS[n, policy](avail, r)
        self.assertEqual(int(umx["hidden"].sum()), k, policy)
      mx, my = masks_lib.element_masks("random", r, r, jax.random.key(1), 2, {"a": jnp.ones(n)},
                                       {"b": jnp.ones((n // 10, 10))})
      self.assertEqual((int(mx["a"].sum()), int(my["b"].sum())), (k, k))
      self.assertEqual(float(masks_lib.kept_counts(mx)["a"]), k)

  @parameterized.parameters(0.3, 0.6, 0.7)
  def test_check_coverable_agrees_with_the_masks(self, r):
    lay = masks_lib.UnitLayout({"u": 200}, x={"w": masks_lib.Axes((("u", 0),))}, y={})
    cfg = dict(policy="static", granularity="unit")
    with self.assertRaisesRegex(ConfigError, f"{200 - EXACT[(r, 200)]} of 200 outer units"):
      masks_lib.check_coverable(lay, {"w": jnp.ones(200)}, np.array([[r, r]]), **cfg)
    # Owned units: a client owning 100 keeps EXACT[(r, 100)] of them.
    own = {"u": np.ones((1, 200))}
    with self.assertRaisesRegex(ConfigError, "client-owned"):
      masks_lib.check_coverable(lay, {"w": jnp.ones(200)}, np.array([[r, r]]), own, **cfg)

  def test_static_is_prefix(self):
    umx, _ = _units("static", 0.25, 0.25, key=7, q=9)
    np.testing.assert_array_equal(umx["hidden"], (np.arange(K) < 3).astype(np.float32))

  def test_rolling_shifts_by_one_and_covers_every_unit_over_a_cycle(self):
    masks = [np.asarray(_units("rolling", 0.25, 0.25, q=q)[0]["hidden"]) for q in range(K)]
    for q in range(K - 1):
      np.testing.assert_array_equal(np.roll(masks[q], 1), masks[q + 1])
    np.testing.assert_array_equal(masks[0], (np.arange(K) < 3).astype(np.float32))
    self.assertTrue(np.all(np.sum(masks, axis=0) >= 1))

  @parameterized.parameters("random", "magnitude")
  def test_same_key_same_mask_other_key_other_mask(self, policy):
    a = _units(policy, 0.5, 0.5, key=1)[0]["hidden"]
    b = _units(policy, 0.5, 0.5, key=1)[0]["hidden"]
    np.testing.assert_array_equal(a, b)
    if policy == "random":
      others = [_units(policy, 0.5, 0.5, key=k)[0]["hidden"] for k in range(2, 6)]
      self.assertTrue(any(np.any(o != a) for o in others))

  def test_magnitude_keeps_largest_units(self):
    x, y = _params()
    scale = jnp.arange(1, K + 1, dtype=jnp.float32)
    x = {"hidden": {"kernel": jnp.broadcast_to(scale, (5, K)), "bias": scale}}
    umx, _ = masks_lib.unit_masks(LAYOUT, "magnitude", 0.25, 0.25, jax.random.key(0), 0, x, y)
    np.testing.assert_array_equal(umx["hidden"], (np.arange(K) >= K - 3).astype(np.float32))

  def test_pruned_unit_removes_incoming_bias_and_outgoing(self):
    x, y = _params()
    um = {"hidden": (jnp.arange(K) % 3 == 0).astype(jnp.float32)}
    mx, my = masks_lib.expand_unit_masks(LAYOUT, um, um, x, y)
    pruned = np.flatnonzero(np.asarray(um["hidden"]) == 0)
    self.assertTrue(np.all(mx["hidden"]["kernel"][:, pruned] == 0))  # incoming
    self.assertTrue(np.all(mx["hidden"]["bias"][pruned] == 0))  # bias
    self.assertTrue(np.all(my["head"]["kernel"][pruned, :] == 0))  # outgoing
    self.assertTrue(np.all(my["head"]["bias"] == 1))  # outputs are never pruned
    kept = np.flatnonzero(np.asarray(um["hidden"]))
    self.assertTrue(np.all(mx["hidden"]["kernel"][:, kept] == 1))

  def test_available_units_restrict_the_choice(self):
    avail = {"hidden": (jnp.arange(K) < 8).astype(jnp.float32)}
    for policy in masks_lib.POLICIES:
      umx, _ = _units(policy, 0.5, 0.5, available=avail)
      self.assertEqual(int(umx["hidden"].sum()), 4, policy)
      self.assertTrue(np.all(np.asarray(umx["hidden"])[8:] == 0), policy)


class LevelsTest(parameterized.TestCase):

  def test_parse(self):
    levels = masks_lib.parse_levels("1/1:0.2, 0.5/0.75:0.3,0.25/0.5:0.5")
    self.assertEqual(levels[1], masks_lib.Level(0.5, 0.75, 0.3))

  @parameterized.parameters(
      ("1/1:0.5,0.5/0.5:0.4", "sum to"),
      ("1.5/1:1", r"rx=1\.5 .*\(0, 1\]"),
      ("1/0:1", r"ry=0\.0 .*\(0, 1\]"),
      ("1-1:1", "not of the form"),
      ("", "empty"),
  )
  def test_bad_profiles(self, profile, message):
    with self.assertRaisesRegex(ConfigError, message):
      masks_lib.parse_levels(profile)

  def test_assign_levels_counts_and_seed(self):
    levels = masks_lib.parse_levels("1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5")
    r = masks_lib.assign_levels(levels, 20, seed=0)
    self.assertEqual(sorted(np.unique(r[:, 0], return_counts=True)[1].tolist()), [4, 6, 10])
    np.testing.assert_array_equal(r, masks_lib.assign_levels(levels, 20, seed=0))
    self.assertFalse(np.array_equal(r, masks_lib.assign_levels(levels, 20, seed=1)))

  def test_static_without_full_client_is_rejected(self):
    x, _ = _params()
    cfg = dict(policy="static", granularity="unit")
    with self.assertRaisesRegex(ConfigError, r"static.*r_x=0\.5.*uncovered"):
      masks_lib.check_coverable(LAYOUT, x, np.array([[0.5, 0.5], [0.25, 0.25]]), **cfg)
    masks_lib.check_coverable(LAYOUT, x, np.array([[0.5, 0.5]]), allow_uncovered=True, **cfg)
    # The hidden group is shared with y: the full client needs r_y = 1 too (1/0.5 keeps only
    # half of it on both sides: PolicyTest's intersection test).
    masks_lib.check_coverable(LAYOUT, x, np.array([[1.0, 1.0], [0.25, 0.25]]), **cfg)
    masks_lib.check_coverable(LAYOUT, x, np.array([[0.5, 0.5]]), policy="rolling",
                              granularity="unit")

  def test_magnitude_without_full_client_is_accepted(self):
    # Magnitude masks rank by the current global model, which moves as it trains: a unit no
    # client keeps now can enter later, so only static masks are never-coverable.
    x, _ = _params()
    cfg = dict(policy="magnitude", granularity="unit")
    masks_lib.check_coverable(LAYOUT, x, np.array([[0.5, 0.5], [0.25, 0.25]]), **cfg)
    masks_lib.check_coverable(LAYOUT, x, np.array([[0.5, 0.5]]), {"hidden": np.ones((1, K))},
                              **cfg)
    masks_lib.check_coverable(LAYOUT, x, np.array([[0.5, 0.5]]), policy="magnitude",
                              granularity="element")


class CoverageTest(parameterized.TestCase):

  def test_stats_match_brute_force(self):
    rng = np.random.default_rng(0)
    masks_C = {"a": (rng.random((5, 4, 3)) < 0.3).astype(np.float32),
               "b": (rng.random((5, 7)) < 0.6).astype(np.float32)}
    counts = []
    for leaf in masks_C.values():
      for j in np.ndindex(leaf.shape[1:]):
        counts.append(sum(int(leaf[(i,) + j] != 0) for i in range(5)))
    stats = masks_lib.coverage_stats(jax.tree.map(jnp.asarray, masks_C))
    self.assertEqual(int(stats.min), min(counts))
    self.assertAlmostEqual(float(stats.mean), np.mean(counts), places=5)
    self.assertAlmostEqual(float(stats.uncovered_share), np.mean(np.array(counts) == 0), places=6)


if __name__ == "__main__":
  absltest.main()
