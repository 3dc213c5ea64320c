"""Client batch samplers: valid rows only, and the population form draws the same batch."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from bilevel import tree
from bilevel.client import full_batch, minibatch_sampler, population_sampler


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


if __name__ == "__main__":
  absltest.main()
