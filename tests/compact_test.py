"""Compact submodels: the extracted-array round equals the dense masked round, is traced once,
rejects what it cannot run, and gives the same numbers sharded over 4 forced host devices."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from absl.testing import absltest, parameterized

from bilevel import algorithms, costs, federated, hypergrad, models, sampling
from bilevel import masks as masks_lib
from bilevel.errors import ConfigError

M, N, DIN, H, CL = 8, 10, 12, 16, 4
# Nested levels with r_y < r_x (0.5/0.25) exercise y's mask inside the compact arrays.
LEVELS = "1/1:0.375,0.5/0.25:0.375,0.25/0.25:0.25"


def _setup(dtype):
  rng = np.random.default_rng(0)

  def split():
    return {"inputs": jnp.asarray(rng.normal(size=(M, N, DIN)), dtype),
            "labels": jnp.asarray(rng.integers(0, CL, (M, N))), "weight": jnp.ones((M, N), dtype)}

  data = federated.FederatedData(split(), split(), jnp.full((M,), N))
  x0, y0 = models.init_mlp(jax.random.key(0), DIN, H, CL, dtype)
  return data, x0, y0


def _cfg(policy="random", estimator="fd", levels=LEVELS):
  # delta 1e-2: fd divides rounding differences by delta (1e-16 / 1e-2 stays below 1e-12).
  return dict(clients_per_round=6, local_steps=2, inner_steps=2, inner_lr=0.2, outer_lr=0.2,
              estimator=estimator, num_steps=2, v_lr=0.2, delta=1e-2, mask_policy=policy,
              levels=masks_lib.parse_levels(levels))


def _make(problem, cfg, layout, x0, **kw):
  """rafbo's round of options cfg and kw (bilevel.algorithms.get) for parameters like x0."""
  return algorithms.get("rafbo", problem=problem, num_clients=M, layout=layout, **cfg,
                        **kw).make_round(x0)


def _run(cfg, dtype, num_rounds=2, **kw):
  data, x0, y0 = _setup(dtype)
  rnd = _make(models.hyper_representation_problem("tanh"), cfg,
                          models.mlp_layout(H), x0, **kw)
  state = federated.init_state(x0, y0, optax.sgd(1.0))
  for _ in range(num_rounds):
    state, metrics = rnd.step(state, data)
  return state, metrics, rnd


def _assert_same(test, a, b, rtol, atol=0.0, leaf_scale=False):
  """States and metrics agree. leaf_scale: also allow rtol x max|leaf| per entry (an entry far
  below its leaf's largest carries the rounding of the leaf's sums, not its own)."""
  (sa, ma), (sb, mb) = a, b
  got, want = (sa.x, sa.y, sa.v), (sb.x, sb.y, sb.v)
  if leaf_scale:  # chex takes one atol per call: one call per leaf
    chex.assert_trees_all_equal_structs(got, want)
    jax.tree.map(lambda g, w: chex.assert_trees_all_close(
        g, w, rtol=rtol, atol=max(atol, rtol * float(np.max(np.abs(w))))), got, want)
  else:
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)
  keys = ("outer_loss", "inner_loss", "hypergrad_norm")
  chex.assert_trees_all_close({k: ma[k] for k in keys}, {k: mb[k] for k in keys}, rtol=rtol)
  for k in ("coverage_x_min", "coverage_y_mean", "client_flops", "comm_bytes", "active_clients"):
    test.assertEqual(float(ma[k]), float(mb[k]), k)


class CompactTest(parameterized.TestCase):

  # Every policy and every estimator appears once (pairs keep the suite fast on 2 cores).
  @parameterized.parameters(zip(masks_lib.POLICIES, hypergrad.ESTIMATORS))
  @pytest.mark.slow
  def test_compact_equals_dense_float64(self, policy, estimator):
    with jax.enable_x64(True):
      cfg = _cfg(policy, estimator)
      compact = _run(cfg, np.float64, submodel="compact")[:2]
      dense = _run(cfg, np.float64, submodel="dense", sampling="stratified")[:2]
      _assert_same(self, compact, dense, rtol=1e-12)

  @pytest.mark.slow
  def test_compact_equals_dense_float32(self):
    cfg = _cfg("rolling", "exact")
    compact = _run(cfg, np.float32, submodel="compact")[:2]
    dense = _run(cfg, np.float32, submodel="dense", sampling="stratified")[:2]
    _assert_same(self, compact, dense, rtol=1e-5, atol=1e-7)

  def test_compact_clients_run_on_extracted_widths(self):
    _, x0, _ = _setup(np.float32)
    rnd = _make(models.hyper_representation_problem(), _cfg(),
                            models.mlp_layout(H), x0, submodel="compact")
    widths = {(st.rx, st.ry): st.counts["hidden"] for st in rnd.strata}
    # hidden is shared by x and y: both keep the intersection, ceil(min(r_x, r_y) H) units.
    self.assertEqual(widths, {(1.0, 1.0): 16, (0.5, 0.25): 4, (0.25, 0.25): 4})
    self.assertEqual(sum(st.per_round for st in rnd.strata), 6)
    data, x0, y0 = _setup(np.float32)
    state = federated.init_state(x0, y0, optax.sgd(1.0))
    jaxpr = str(jax.make_jaxpr(rnd.step)(state, data))
    # The 0.25 clients' hidden kernel really is 4 kept units x 12 inputs (held units-major).
    self.assertIn(f"f32[4,{DIN}]", jaxpr)

  @pytest.mark.slow
  def test_shared_group_with_ry_below_rx_runs_at_the_intersection_width(self):
    # Level 1/0.5: x and y both keep ceil(0.5 H) hidden units, compact = dense.
    cfg = _cfg("random", "fd", levels="1/0.5:0.5,0.5/0.5:0.5")
    _, x0, _ = _setup(np.float32)
    rnd = _make(models.hyper_representation_problem(), cfg,
                            models.mlp_layout(H), x0, submodel="compact")
    self.assertEqual({(st.rx, st.ry): st.counts["hidden"] for st in rnd.strata},
                     {(1.0, 0.5): H // 2, (0.5, 0.5): H // 2})
    with jax.enable_x64(True):
      compact = _run(cfg, np.float64, submodel="compact")[:2]
      dense = _run(cfg, np.float64, submodel="dense", sampling="stratified")[:2]
      _assert_same(self, compact, dense, rtol=1e-12)
      # x and y keep the same hidden units (dense round, one client at the 1/0.5 level).
      data, x0, y0 = _setup(np.float64)
      rnd = _make(models.hyper_representation_problem("tanh"), cfg,
                              models.mlp_layout(H), x0, submodel="dense", sampling="stratified")
      state = federated.init_state(x0, y0, optax.sgd(1.0))
      full = rnd.strata[0]
      res = rnd.client_fns[0](state, data, jnp.asarray(full.clients[0]), jnp.asarray(0),
                              state.round)
    kept_x = np.asarray(res.mask_x["hidden"]["bias"]) != 0
    kept_y = np.asarray(res.mask_y["head"]["kernel"][:, 0]) != 0
    self.assertEqual(kept_x.sum(), H // 2)
    np.testing.assert_array_equal(kept_x, kept_y)

  @parameterized.parameters(np.float32, np.float64)
  def test_compact_widths_are_exact_keep_counts(self, dtype):
    # ceil(r K) for K = 200 and 100 (float32 ceil(r K - 1e-6) gave 61 and 121 at K = 200).
    ratios = np.array([[0.3, 0.3], [0.6, 0.6], [0.7, 0.7]], dtype)
    for k, want in ((200, (140, 120, 60)), (100, (70, 60, 30))):
      strata = sampling.make_strata(ratios, np.arange(3), 3, models.mlp_layout(k))
      self.assertEqual(tuple(st.counts["hidden"] for st in strata), want)

  @pytest.mark.slow
  def test_compact_equals_dense_at_non_dyadic_ratios(self):
    # Width 200 at 0.3 / 0.6 / 0.7: the static compact widths and the traced masks' counts are
    # the same exact integers (60 / 120 / 140), so costs agree and no index is padded.
    rng = np.random.default_rng(1)
    hidden = 200
    split = lambda: {"inputs": jnp.asarray(rng.normal(size=(M, N, DIN)), jnp.float32),
                     "labels": jnp.asarray(rng.integers(0, CL, (M, N))),
                     "weight": jnp.ones((M, N), jnp.float32)}
    data = federated.FederatedData(split(), split(), jnp.full((M,), N))
    x0, y0 = models.init_mlp(jax.random.key(0), DIN, hidden, CL)
    cfg = _cfg("random", "exact", levels="1/1:0.25,0.7/0.7:0.25,0.6/0.6:0.25,0.3/0.3:0.25")
    results = []
    for kw in (dict(submodel="compact"), dict(submodel="dense", sampling="stratified")):
      rnd = _make(models.hyper_representation_problem("tanh"), cfg,
                              models.mlp_layout(hidden), x0, **kw)
      results.append(rnd.step(federated.init_state(x0, y0, optax.sgd(1.0)), data))
    self.assertEqual(sorted(st.counts["hidden"] for st in rnd.strata), [60, 120, 140, 200])
    _assert_same(self, results[0], results[1], rtol=1e-5, atol=1e-6)

  def test_stratified_sampling_keeps_level_counts(self):
    _, x0, _ = _setup(np.float32)
    rnd = _make(models.hyper_representation_problem(), _cfg(),
                            models.mlp_layout(H), x0, submodel="compact")
    for q in range(4):
      ids = [np.asarray(i) for i in rnd.sample_fn(jnp.asarray(q))]
      for st, got in zip(rnd.strata, ids):
        self.assertLen(set(got.tolist()), st.per_round)
        self.assertTrue(set(got.tolist()) <= set(st.clients.tolist()))

  @pytest.mark.slow
  def test_round_is_traced_once(self):
    chex.clear_trace_counter()
    # The gradient price runs once per level group (one client function each) in a trace of the
    # round: the first round's trace makes `groups` traced calls, a second trace would add more.
    groups = len(_cfg()["levels"])
    flops = chex.assert_max_traces(costs.default_flops_per_grad, n=groups)
    data, x0, y0 = _setup(np.float32)
    rnd = _make(models.hyper_representation_problem(), _cfg(),
                            models.mlp_layout(H), x0, submodel="compact",
                            cost=costs.PerGradient(flops))
    self.assertLen(rnd.strata, groups)
    state = federated.init_state(x0, y0, optax.sgd(1.0))
    state, _ = rnd.step(state, data)
    # The first trace made all `groups` calls: one more traced call goes over the limit, and
    # from then on so would any retrace of the round.
    with self.assertRaisesRegex(AssertionError, f"traced > {groups} times"):
      jax.eval_shape(flops, 1.0, 1.0)
    for _ in range(3):
      state, _ = rnd.step(state, data)

  def test_rejects_what_compact_cannot_run(self):
    _, x0, _ = _setup(np.float32)
    layout, problem = models.mlp_layout(H), models.hyper_representation_problem()
    cases = [(dict(_cfg(), redraw_levels=True), {}, "fixed client levels"),
             (dict(_cfg(), granularity="element"), {}, "unit"),
             (_cfg(), dict(sampling="uniform"), "stratified"),
             (_cfg(), dict(mask_fn=lambda *a: None), "mask_fn")]
    for cfg, kw, msg in cases:
      with self.assertRaisesRegex(ConfigError, msg):
        _make(problem, cfg, layout, x0, submodel="compact", **kw)
    with self.assertRaisesRegex(ConfigError, "submodel"):
      _make(problem, _cfg(), layout, x0, submodel="sparse")

  @pytest.mark.slow
  def test_single_level_stratified_equals_uniform(self):
    cfg = _cfg(levels="1/1:1")
    with jax.enable_x64(True):
      _assert_same(self, _run(cfg, np.float64, submodel="compact")[:2],
                   _run(cfg, np.float64, submodel="dense")[:2], rtol=1e-12)

  @pytest.mark.slow
  def test_sharded_over_four_host_devices_equals_one_device(self):
    script = textwrap.dedent("""
        import jax, numpy as np
        from bilevel import sharding
        from tests import compact_test as ct
        assert len(jax.devices()) == 4, jax.devices()
        mesh = sharding.client_mesh()
        # fd estimator, float64: WORKSPACE.md's tolerance table: rtol 1e-12, per leaf's largest
        # entry (the sharded
        # sums round differently and fd divides that by 2 delta = 0.02, so an entry 400x below
        # its leaf's largest differs at 1.6e-12 of itself).
        with jax.enable_x64(True):
          one = ct._run(ct._cfg(), np.float64, submodel="compact")
          four = ct._run(ct._cfg(), np.float64, submodel="compact", mesh=mesh)
          ct._assert_same(ct.absltest.TestCase(), one[:2], four[:2], rtol=1e-12, leaf_scale=True)
        # replicate: a whole copy on each of the 4 devices (placed once, not on every call).
        rep = sharding.replicate(one[0], mesh)
        for leaf in jax.tree.leaves(rep):
          assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
        assert sharding.replicate(one[0], None) is one[0]
        # The sharded round ran on all 4 devices: its outputs live on each of them.
        for leaf in jax.tree.leaves((four[0].x, four[0].y, four[0].v)):
          assert len(leaf.sharding.device_set) == 4, leaf.sharding
        print("SHARDED_OK")
        """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn("SHARDED_OK", proc.stdout)


if __name__ == "__main__":
  absltest.main()
