"""Client batch samplers: valid rows only, and the population form draws the same batch."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from bilevel import algorithms, tree
from bilevel.client import client_update, full_batch, minibatch_sampler
from bilevel.client import population_sampler, trust_region
from bilevel.errors import ConfigError
from bilevel import hypergrad
import quadratic  # tests/quadratic.py


def _population(valid=(5, 3, 8), rows=8, dim=4):
  """[M, rows, ...] client data; client i has valid[i] rows (row ids encoded in the inputs)."""
  m = len(valid)
  weight = (np.arange(rows)[None, :] < np.array(valid)[:, None]).astype(np.float32)
  inputs = np.arange(m * rows * dim, dtype=np.float32).reshape(m, rows, dim)
  labels = np.arange(m * rows).reshape(m, rows)
  return {"inputs": jnp.asarray(inputs), "labels": jnp.asarray(labels),
          "weight": jnp.asarray(weight)}


class SamplerTest(absltest.TestCase):

  def test_minibatch_draws_only_valid_rows(self):
    data = _population()
    sample = minibatch_sampler(64)
    for cid, n in enumerate((5, 3, 8)):
      batch = sample(tree.index(data, cid), jax.random.key(cid))
      rows = np.asarray(batch["labels"]) - cid * 8
      self.assertEqual(rows.shape, (64,))
      self.assertTrue(np.all((rows >= 0) & (rows < n)))
      self.assertLen(np.unique(rows), n)  # 64 draws from <= 8 rows: every valid row appears
      np.testing.assert_array_equal(batch["weight"], 1.0)
      np.testing.assert_array_equal(batch["inputs"], np.asarray(data["inputs"])[cid][rows])

  def test_population_form_draws_the_same_batch(self):
    data = _population()
    sample = minibatch_sampler(16)
    ids = jnp.array([2, 0, 1, 2])
    keys = jax.random.split(jax.random.key(0), 4)
    # What a vmapped round does (one gather from the population) vs each client's own data.
    got = jax.vmap(lambda c, k: population_sampler(sample, c)(data, k))(ids, keys)
    for i, (cid, key) in enumerate(zip(ids, keys)):
      want = sample(tree.index(data, cid), key)
      for name in data:
        np.testing.assert_array_equal(got[name][i], want[name])

  def test_population_sampler_indexes_the_client_for_plain_samplers(self):
    data = _population()
    got = population_sampler(full_batch, jnp.asarray(1))(data, jax.random.key(0))
    for name in data:
      np.testing.assert_array_equal(got[name], data[name][1])


class TrustRegionTest(absltest.TestCase):
  """client.trust_region: the x delta's norm capped at radius * ||x_0|| (section 8)."""

  def test_caps_each_layer_at_its_radius_and_keeps_short_deltas(self):
    x0 = {"a": {"k": jnp.full((4,), 2.0), "b": jnp.zeros(2)}, "c": {"k": jnp.ones((9,))}}
    d = {"a": {"k": jnp.full((4,), 1.0), "b": jnp.ones(2)}, "c": {"k": jnp.full((9,), 0.01)}}
    out = trust_region(d, x0, 0.1, "layer")
    # layer a: ||x0|| = 4, ||d|| = sqrt(6) > 0.4: scaled to norm 0.4, direction kept
    self.assertAlmostEqual(float(tree.norm(out["a"])), 0.4, places=5)
    np.testing.assert_allclose(out["a"]["k"] / out["a"]["b"][0], 1.0, rtol=1e-6)
    # layer c: ||x0|| = 3, ||d|| = 0.03 < 0.3: unchanged
    np.testing.assert_array_equal(out["c"]["k"], d["c"]["k"])
    # scope model: one factor for all of x, ||x0|| = 5
    whole = trust_region(d, x0, 0.1, "model")
    self.assertAlmostEqual(float(tree.norm(whole)), 0.5, places=5)
    np.testing.assert_allclose(whole["c"]["k"] / d["c"]["k"], whole["a"]["k"][0] / d["a"]["k"][0],
                               rtol=1e-6)

  def test_client_update_applies_it_and_zero_is_off(self):
    data = tree.index(quadratic.make_quadratic(2, 6, 4, seed=0, dtype=np.float32), 0)
    x, y = jnp.full((6,), 0.5), jnp.zeros(4)
    run = lambda **kw: client_update(quadratic.QUADRATIC, x, y, jnp.zeros(4), data, data,
                                     None, None, jax.random.key(0), local_steps=3, inner_steps=1,
                                     inner_lr=0.1, outer_lr=0.5, estimator=hypergrad.fd(),
                                     inner_step="cauchy",
                                     x_trust_scope="layer", **kw)
    free = run(x_trust=0.0)
    radius = 0.1 * float(tree.norm(x))
    self.assertGreater(float(tree.norm(free.delta_x)), radius)  # the cap binds here
    capped = run(x_trust=0.1)
    self.assertAlmostEqual(float(tree.norm(capped.delta_x)), radius, places=5)
    np.testing.assert_allclose(capped.delta_x * float(tree.norm(free.delta_x)) / radius,
                               free.delta_x, rtol=1e-5)
    np.testing.assert_array_equal(capped.delta_y, free.delta_y)  # x's delta only

  def test_on_each_step_bounds_the_local_iterates(self):
    data = tree.index(quadratic.make_quadratic(2, 6, 4, seed=0, dtype=np.float32), 0)
    x, y = jnp.full((6,), 0.5), jnp.zeros(4)
    run = lambda k, **kw: client_update(quadratic.QUADRATIC, x, y, jnp.zeros(4), data, data,
                                        None, None, jax.random.key(0), local_steps=k,
                                        inner_steps=1, inner_lr=0.1, outer_lr=0.5,
                                        estimator=hypergrad.fd(), inner_step="cauchy",
                                        x_trust_scope="layer", **kw)
    # One local step: the step is the delta, so both placements agree.
    np.testing.assert_allclose(run(1, x_trust=0.1, x_trust_on="step").delta_x,
                               run(1, x_trust=0.1, x_trust_on="delta").delta_x, rtol=1e-6)
    # Three: each step is capped at 0.1 ||x_k||, so ||x_3 - x_0|| lies above the delta's cap
    # (0.1 ||x_0||) and below (1.1^3 - 1) ||x_0||; y and v are built on the capped iterates.
    free, stepped = run(3, x_trust=0.0), run(3, x_trust=0.1, x_trust_on="step")
    norm0 = float(tree.norm(x))
    self.assertGreater(float(tree.norm(free.delta_x)), (1.1 ** 3 - 1) * norm0)  # caps bind
    self.assertGreater(float(tree.norm(stepped.delta_x)), 0.1 * norm0 * 1.01)
    self.assertLessEqual(float(tree.norm(stepped.delta_x)), (1.1 ** 3 - 1) * norm0 * (1 + 1e-6))
    self.assertGreater(float(jnp.max(jnp.abs(stepped.delta_y - free.delta_y))), 1e-4)

  def test_rejects_negative_radius_and_unknown_scope(self):
    kw = dict(problem=quadratic.QUADRATIC, num_clients=2, granularity="element")
    with self.assertRaisesRegex(ConfigError, "x_trust=-1.0"):
      algorithms.get("rafbo", x_trust=-1.0, **kw)
    with self.assertRaisesRegex(ConfigError, "x_trust_scope='unit'"):
      algorithms.get("rafbo", x_trust=0.1, x_trust_scope="unit", **kw)
    with self.assertRaisesRegex(ConfigError, "x_trust_on='both'"):
      algorithms.get("rafbo", x_trust=0.1, x_trust_on="both", **kw)


if __name__ == "__main__":
  absltest.main()
