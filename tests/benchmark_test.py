"""The benchmark driver: its flag defaults, a tiny run's benchmark.json keys and --compare (timings
are not asserted: the CPU is shared). Its time_to_accuracy section: tests/time_to_accuracy_test.py;
the timing harness: tests/timing_test.py."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

from bilevel import metrics
from experiments import benchmark
from scripts import compare_revisions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}  # compiling dominates; times are not asserted


class HelpersTest(absltest.TestCase):

  def test_figures_flatten_numbers_and_skip_settings(self):
    result = {"versions": {"jax": "x"}, "settings": {"reps": 5}, "commit": {"sha": "abc"},
              "keep_ratio_time_ratio": {"0.5": 0.6, "0.25": 0.4}, "keep_ratio_devices": 2,
              "device": {"count": 2}, "note": "text", "flag": True}
    self.assertEqual(compare_revisions.figures(result),
                     {"keep_ratio_time_ratio.0.5": 0.6, "keep_ratio_time_ratio.0.25": 0.4,
                      "keep_ratio_devices": 2.0})

  def test_import_leaves_the_shared_flag_defaults(self):
    # The benchmark applies its own --cpu_devices / --clients_per_round / --local_steps (and the
    # time_to_accuracy section's --seed / --algorithms) in main(); importing it (as this file
    # does) must not change them for other drivers' tests.
    from absl import flags  # pylint: disable=g-import-not-at-top
    common_defaults = {"cpu_devices": 1, "clients_per_round": 10, "local_steps": 5,  # common.py
                       "seed": 0, "algorithms": None}
    self.assertEqual(set(common_defaults), set(benchmark.BENCH_DEFAULTS))
    for name, default in common_defaults.items():
      self.assertEqual(flags.FLAGS[name].default, default, name)

  def test_commit_is_this_checkout(self):
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False)
    if head.returncode != 0:
      self.skipTest("not a git checkout")
    self.assertEqual(metrics.commit(ROOT)["sha"], head.stdout.strip())


@pytest.mark.slow
class BenchmarkTest(absltest.TestCase):

  def test_tiny_run_writes_the_json_keys(self):
    workdir = tempfile.mkdtemp()
    argv = [sys.executable, "-m", "experiments.benchmark", f"--workdir={workdir}", "--reps=1",
            "--bench_in_dim=8", "--hidden=8", "--batch_size=4", "--clients_per_round=4",
            "--loop_clients=2,3", "--scaling_clients=2", "--estimator_rows=4",
            "--estimator_steps=1", "--cpu_devices=2", "--min_time_s=0",
            "--sections=keep_ratio,vmap_loop,estimators,scaling"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **FAST_XLA)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, "benchmark.json")) as f:
      result = json.load(f)
    self.assertEqual(set(result["keep_ratio_time_ratio"]), {"0.5", "0.25"})
    # The keep-ratio figure's rounds were sharded over the 2 CPU devices (--cpu_devices), with
    # the one-device rounds timed next to them; both give the same numbers up to float32
    # summation order.
    self.assertEqual(result["keep_ratio_devices"], 2)
    self.assertEqual(set(result["keep_ratio_one_device"]["time_ratio"]), {"0.5", "0.25"})
    self.assertEqual(set(result["keep_ratio_one_device"]["round_time_s"]), {"1.0", "0.5", "0.25"})
    diffs = result["keep_ratio_max_leaf_rel_diff"]
    self.assertEqual(set(diffs), {"1.0", "0.5", "0.25"})
    self.assertLess(max(diffs.values()), 1e-4)
    # Three keep ratios: the round-time model t(r) = a + b r is fitted per device count.
    for model in (result["keep_ratio_model"], result["keep_ratio_one_device"]["model"]):
      self.assertEqual(set(model), {"a_s", "b_s", "fixed_share_at_r1", "max_rel_residual"})
    self.assertEqual(set(result["vmap_over_loop_time_ratio"]), {"2", "3"})
    self.assertEqual(set(result["estimator_cost_grad_evals"]), {"fd", "exact", "neumann", "cg"})
    self.assertEqual(result["clients_scaling"][0]["clients_per_round"], 2)
    for key in ("versions", "device", "settings", "commit"):
      self.assertIn(key, result)
    self.assertIn("device_kind", result["device"])
    self.assertIn("jax", result["versions"])

  def test_compare_runs_both_sides(self):
    # The same commit on both sides: the FLOP ratios (exact, not timed) must agree, every
    # figure has one value per pass on each side, and the checked-out tree is removed.
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                      check=False).returncode != 0:
      self.skipTest("not a git checkout")
    workdir = tempfile.mkdtemp()
    # A relative --workdir: each side runs in its own tree, the results land in this one.
    workdir = os.path.relpath(workdir, ROOT)
    argv = [sys.executable, "-m", "experiments.benchmark", f"--workdir={workdir}", "--smoke",
            "--sections=keep_ratio", "--compare=HEAD", "--passes=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **FAST_XLA)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(ROOT, workdir, "compare.json")) as f:
      result = json.load(f)
    rows = result["figures"]
    self.assertEqual(rows["keep_ratio_flop_ratio.0.25"]["this_over_ref"], 1.0)
    for row in rows.values():
      self.assertEqual((len(row["ref_runs"]), len(row["this_runs"])), (1, 1))
    self.assertFalse(os.path.exists(os.path.join(ROOT, workdir, "ref_tree")))
    self.assertIn("this/ref", proc.stdout)

  def test_bad_flags_are_clear_errors(self):
    # --cpu_devices fails at the process start, the others together in the flag check.
    for flags, messages in ((["--cpu_devices=0"], ["--cpu_devices=0 must be >= 1"]),
                            (["--sections=warp_drive", "--batch_size=0"],
                             ["2 problems", "warp_drive", "--batch_size=0: the benchmark needs"])):
      argv = [sys.executable, "-m", "experiments.benchmark", "--workdir=" + tempfile.mkdtemp(),
              *flags]
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
      proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
      self.assertEqual(proc.returncode, 2, flags)
      for message in messages:
        self.assertIn(message, proc.stderr)


if __name__ == "__main__":
  absltest.main()
