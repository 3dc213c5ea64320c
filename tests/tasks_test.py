"""bilevel/tasks: hyper-cleaning's pieces (rank AUC, sample gate, kept-row sampler, owned
rolling window) against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from bilevel import federated
from bilevel import masks as masks_lib
from bilevel.client import MinibatchSampler, client_update, population_sampler
from bilevel import hypergrad
from bilevel.tasks import hyper_cleaning as task


class HyperCleaningPiecesTest(parameterized.TestCase):

  def test_rank_auc_matches_pairwise_count(self):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    brute = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    self.assertAlmostEqual(task.rank_auc(scores, positive), brute, places=12)
    self.assertEqual(task.rank_auc(np.arange(4.0), np.array([0, 0, 1, 1], bool)), 1.0)
    self.assertIsNone(task.rank_auc(np.arange(3.0), np.ones(3, bool)))

  def test_pruned_samples_leave_the_inner_loss(self):
    """g at the pruned point = g on the kept rows alone; the gate gets no hypergradient."""
    rng = np.random.default_rng(1)
    n, d, c = 6, 3, 4
    problem = task.cleaning_problem(task.linear_logits, reg=0.1)
    x = {"logits": jnp.asarray(rng.normal(size=n), jnp.float32), "gate": jnp.ones(n)}
    y = {"head": {"kernel": jnp.asarray(rng.normal(size=(d, c)), jnp.float32),
                  "bias": jnp.zeros(c)}}
    batch = {"inputs": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
             "labels": jnp.asarray(rng.integers(0, c, n)), "weight": jnp.ones(n),
             "index": jnp.arange(n)}
    keep = np.array([1, 0, 1, 1, 0, 0], np.float32)
    pruned = jax.tree.map(lambda t: t * keep, x)
    kept_rows = jax.tree.map(lambda t: t[keep > 0], batch)
    kept_rows["index"] = jnp.arange(int(keep.sum()))
    kept_x = jax.tree.map(lambda t: t[keep > 0], x)
    inner = jax.jit(problem.inner_loss)
    np.testing.assert_allclose(inner(pruned, y, batch), inner(kept_x, y, kept_rows), rtol=1e-6)
    grad_x = jax.jit(jax.grad(problem.inner_loss))(pruned, y, batch)
    np.testing.assert_array_equal(grad_x["gate"], np.zeros(n))
    np.testing.assert_array_equal(grad_x["logits"] * (1 - keep), np.zeros(n))

  def _cleaning_population(self):
    """3 clients owning 5, 3, 4 samples (5 padded rows each); the round keeps samples 1, 3 of
    client 0, 6 of client 1 and 8, 9, 11 of client 2 (gate = x["gate"] * m_x)."""
    rng = np.random.default_rng(2)
    counts, n_tr, d = np.array([5, 3, 4]), 5, 2
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(n_tr)[None, :]
    valid = pos < counts[:, None]
    data = {"inputs": jnp.asarray(rng.normal(size=(3, n_tr, d)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, 3, (3, n_tr))),
            "weight": jnp.asarray(valid, jnp.float32),
            "index": jnp.asarray(np.where(valid, offsets[:, None] + pos, 0), jnp.int32)}
    gate = np.zeros(12, np.float32)
    gate[[1, 3, 6, 8, 9, 11]] = 1.0
    return data, jnp.asarray(gate), {0: {1, 3}, 1: {6}, 2: {8, 9, 11}}

  def test_minibatches_are_drawn_from_the_kept_rows(self):
    """--batch_size=B: B rows, every one of them a row the client keeps this round (uniform with
    replacement), not B rows of the client gated afterwards; with every row kept, exactly
    MinibatchSampler's batch; validation batches are MinibatchSampler's."""
    data, gate, kept = self._cleaning_population()
    sampler = task.KeptRowSampler(64)
    resolve = jax.jit(sampler.resolve)
    for cid, want in kept.items():
      batch = resolve(gate, sampler.from_population(data, cid, jax.random.key(cid)))
      self.assertEqual(set(np.asarray(batch["index"]).tolist()), want)  # only and all kept rows
      np.testing.assert_array_equal(batch["weight"], np.ones(64))
    nothing = resolve(jnp.zeros(12), sampler.from_population(data, 0, jax.random.key(0)))
    np.testing.assert_array_equal(nothing["weight"], np.zeros(64))
    outer = {k: data[k] for k in ("inputs", "labels", "weight")}
    for cid in range(3):
      key = jax.random.key(10 + cid)
      reference = MinibatchSampler(64).from_population(data, cid, key)
      batch = resolve(jnp.ones(12), sampler.from_population(data, cid, key))
      for name in reference:
        np.testing.assert_array_equal(batch[name], reference[name], name)
      val = sampler.from_population(outer, cid, key)
      for name in outer:
        np.testing.assert_array_equal(val[name], reference[name], name)

  def test_pruned_rows_never_enter_a_client_minibatch(self):
    """Through client.client_update with the round's mask: NaN inputs on the client's pruned
    rows leave every output finite with KeptRowSampler; the former sampler (all valid rows,
    gated by the mask afterwards) reads them."""
    data, gate, _ = self._cleaning_population()
    pruned = (np.asarray(gate)[np.asarray(data["index"])] == 0) & (np.asarray(data["weight"]) > 0)
    inner = dict(data, inputs=jnp.where(pruned[..., None], jnp.nan, data["inputs"]))
    outer = {k: data[k] for k in ("inputs", "labels", "weight")}
    x = {"logits": jnp.zeros(12), "gate": jnp.ones(12)}
    y = {"head": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
    mask_x = {"logits": gate, "gate": gate}
    mask_y = jax.tree.map(jnp.ones_like, y)
    cfg = dict(local_steps=2, inner_steps=1, inner_lr=0.1, outer_lr=0.1,
               estimator=hypergrad.fd(), inner_step="cauchy", x_trust=0.0, x_trust_scope="layer")
    for sampler, finite in ((task.KeptRowSampler(8), True), (MinibatchSampler(8), False)):
      problem = task.cleaning_problem(
          task.linear_logits, 0.1,
          sampler if isinstance(sampler, task.KeptRowSampler) else None)
      out = jax.jit(lambda: client_update(problem, x, y, jax.tree.map(jnp.zeros_like, y),
                                          inner, outer, mask_x, mask_y, jax.random.key(0),
                                          sample=population_sampler(sampler, jnp.asarray(0)),
                                          **cfg))()
      leaves = jax.tree.leaves((out.delta_x, out.delta_y, out.inner_loss))
      self.assertEqual(all(bool(jnp.all(jnp.isfinite(t))) for t in leaves), finite, sampler)

  def test_owned_rolling_window_rolls_over_own_samples(self):
    counts, offsets = np.array([4, 6]), np.array([0, 4])
    lay = task.layout("linear", 10, 3, 1)
    x, y = task.init_params(jax.random.key(0), "linear", 10, 3, 1, 2)
    ownership = jnp.asarray(np.repeat(np.eye(2), counts, axis=1))
    mask_fn = task.owned_rolling_mask_fn(lay, offsets, counts, ownership)
    state = federated.init_state(x, y, optax.sgd(1.0))
    masks = jax.jit(mask_fn)
    kept = [np.flatnonzero(masks(state, 1, 0, q, 0.5, 1.0, jax.random.key(q))[0]["logits"])
            for q in range(7)]
    self.assertEqual([k.tolist() for k in kept[:4]],
                     [[4, 5, 6], [5, 6, 7], [6, 7, 8], [7, 8, 9]])
    self.assertEqual(kept[6].tolist(), [4, 5, 6])  # a full cycle over the client's 6 samples
    # Every sample of the client is kept in some round of a cycle.
    self.assertEqual(sorted(set(np.concatenate(kept[:6]).tolist())), list(range(4, 10)))


if __name__ == "__main__":
  absltest.main()
