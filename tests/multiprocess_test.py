"""A 2-process run on JAX's distributed runtime (two CPU processes on 127.0.0.1, gloo) gives the
metrics of a 1-process run; process 0 alone writes the workdir; a rerun resumes on both.

The sampled clients are sharded over the two processes' devices, so the aggregation sums in
another order: float32 metrics agree to rtol 1e-5 (WORKSPACE.md's float32 vmap-vs-loop tolerance;
measured differences are ~1e-6).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--dataset=digits", "--num_clients=4", "--clients_per_round=4", "--hidden=16",
        "--rounds=3", "--eval_every=1", "--checkpoint_every=1"]
KEYS = ("outer_loss", "inner_loss", "hypergrad_norm", "test_accuracy", "test_loss",
        "cumulative_client_flops", "coverage_x_min")
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _driver(workdir, *extra):
  return [sys.executable, "-m", "experiments.hyper_representation", f"--workdir={workdir}",
          *ARGS, *extra]


def _env():
  # Compilation dominates these tiny runs: every run (1 and 2 processes) compiles with most XLA
  # optimisations off, so the comparison is between programs compiled the same way.
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              JAX_DISABLE_MOST_OPTIMIZATIONS="true")


def _two_processes(workdir):
  """Start processes 1 and 0 of a 2-process run; return their (returncode, stdout) pairs."""
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _driver(workdir, "--num_processes=2", f"--coordinator_address={address}",
              f"--process_id={i}"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
  out = []
  try:
    for p in procs:
      out.append((p.wait(timeout=TIMEOUT_S), p.stdout.read()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
class TwoProcessTest(absltest.TestCase):

  def test_two_processes_match_one_and_resume(self):
    root = tempfile.mkdtemp()
    one, two = os.path.join(root, "one"), os.path.join(root, "two")
    subprocess.run(_driver(one), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=TIMEOUT_S)
    for code, text in _two_processes(two):
      self.assertEqual(code, 0, text[-3000:])
    with open(os.path.join(two, "config.json")) as f:
      self.assertEqual(json.load(f)["device"]["count"], 2)  # the mesh spans both processes
    want, got = _records(one), _records(two)
    self.assertEqual([r["round"] for r in got], [1, 2, 3])  # one writer: no duplicate lines
    for w, g in zip(want, got):
      for key in KEYS:
        np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"round {w['round']} {key}")
    with open(os.path.join(two, "summary.json")) as f:
      summary = json.load(f)
    # The same command again: both processes resume from process 0's last checkpoint.
    for code, text in _two_processes(two):
      self.assertEqual(code, 0, text[-3000:])
      self.assertIn("resuming from", text)
    with open(os.path.join(two, "summary.json")) as f:
      again = json.load(f)
    for key in ("test_accuracy", "final_outer_loss", "cumulative_client_flops"):
      self.assertEqual(again[key], summary[key])
    self.assertEqual(_records(two), got)

  def test_bad_process_flags_are_one_clear_error(self):
    proc = subprocess.run(_driver(tempfile.mkdtemp(), "--num_processes=2", "--process_id=5"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    self.assertEqual(proc.returncode, 2)
    self.assertTrue(proc.stderr.startswith("error: "), proc.stderr)
    self.assertIn("--coordinator_address", proc.stderr)
    self.assertIn("--process_id=5 is outside the allowed range [0, 1]", proc.stderr)


if __name__ == "__main__":
  absltest.main()
