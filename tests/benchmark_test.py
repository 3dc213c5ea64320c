"""Smoke test of the benchmark driver: a tiny run writes benchmark.json with the promised keys
(timings are not asserted: the CPU is shared)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
class BenchmarkTest(absltest.TestCase):

  def test_tiny_run_writes_the_json_keys(self):
    workdir = tempfile.mkdtemp()
    argv = [sys.executable, "-m", "experiments.benchmark", f"--workdir={workdir}", "--reps=1",
            "--bench_in_dim=8", "--hidden=8", "--batch_size=4", "--clients_per_round=4",
            "--loop_clients=2,3", "--scaling_clients=2", "--estimator_rows=4",
            "--estimator_steps=1", "--bench_devices=0", "--cpu_devices=2",
            "--sections=keep_ratio,vmap_loop,estimators,scaling"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, "benchmark.json")) as f:
      result = json.load(f)
    self.assertEqual(set(result["keep_ratio_time_ratio"]), {"0.5", "0.25"})
    # The keep-ratio figure's rounds were sharded over the 2 CPU devices (--cpu_devices), with
    # the one-device rounds timed next to them.
    self.assertEqual(result["keep_ratio_devices"], 2)
    self.assertEqual(set(result["keep_ratio_one_device"]["time_ratio"]), {"0.5", "0.25"})
    self.assertEqual(set(result["keep_ratio_one_device"]["round_time_s"]), {"1.0", "0.5", "0.25"})
    self.assertEqual(set(result["vmap_over_loop_time_ratio"]), {"2", "3"})
    self.assertEqual(set(result["estimator_cost_grad_evals"]), {"fd", "exact", "neumann", "cg"})
    self.assertEqual(result["clients_scaling"][0]["clients_per_round"], 2)
    for key in ("versions", "device", "settings"):
      self.assertIn(key, result)
    self.assertIn("device_kind", result["device"])
    self.assertIn("jax", result["versions"])

  def test_bad_flags_are_clear_errors(self):
    for flag, message in (("--sections=warp_drive", "warp_drive"),
                          ("--cpu_devices=0", "--cpu_devices=0 must be >= 1"),
                          ("--batch_size=0", "--batch_size=0: the benchmark needs")):
      argv = [sys.executable, "-m", "experiments.benchmark", "--workdir=" + tempfile.mkdtemp(),
              flag]
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
      proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
      self.assertEqual(proc.returncode, 2, flag)
      self.assertIn(message, proc.stderr)


if __name__ == "__main__":
  absltest.main()
