"""The benchmark's time_to_accuracy section (experiments/time_to_accuracy.py): the metrics scan
it polls with, and a --smoke run (two driver subprocesses, cold and warm cache, then the main
job's five seed timings) writing benchmark.json. Times are not asserted beyond being positive:
the CPU is shared."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
from absl.testing import absltest

from experiments import time_to_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, records, torn_tail=""):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    f.write(torn_tail)


class ScanMetricsTest(absltest.TestCase):

  def test_first_record_at_or_above_target(self):
    path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    _write(path, [{"round": 5, "test_accuracy": 0.80}, {"round": 7, "outer_loss": 1.0},
                  {"round": 10, "test_accuracy": 0.895}, {"round": 15, "test_accuracy": 0.93}],
           torn_tail='{"round": 20, "test_acc')
    reached, last = time_to_accuracy.scan_metrics(path, 0.895)
    self.assertEqual(reached["round"], 10)  # equal to the target counts
    self.assertEqual(last["round"], 10)

  def test_not_reached_gives_none_and_the_last_accuracy(self):
    path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    _write(path, [{"round": 5, "test_accuracy": 0.80}, {"round": 10, "test_accuracy": 0.85}],
           torn_tail='{"round": 15, "test_accuracy": 0.99}')  # no newline yet: not read
    reached, last = time_to_accuracy.scan_metrics(path, 0.895)
    self.assertIsNone(reached)
    self.assertEqual(last["test_accuracy"], 0.85)

  def test_missing_or_empty_file(self):
    folder = tempfile.mkdtemp()
    self.assertEqual(time_to_accuracy.scan_metrics(os.path.join(folder, "none.jsonl"), 0.5),
                     (None, None))
    path = os.path.join(folder, "metrics.jsonl")
    _write(path, [])
    self.assertEqual(time_to_accuracy.scan_metrics(path, 0.5), (None, None))


class UserEnvTest(absltest.TestCase):

  def test_a_driver_started_with_user_env_uses_the_cache_folder_under_home(self):
    from experiments import common  # pylint: disable=g-import-not-at-top
    home = tempfile.mkdtemp()
    with absltest.mock.patch.dict(os.environ, {"XDG_CACHE_HOME": "/elsewhere"}):
      env = time_to_accuracy.user_env(home)
    self.assertNotIn("XDG_CACHE_HOME", env)
    with absltest.mock.patch.dict(os.environ, env, clear=True):
      self.assertEqual(common.default_cache_dir(), common.default_cache_dir(home))
    self.assertTrue(common.default_cache_dir(home).startswith(home + os.sep))


@pytest.mark.slow
class DriverTest(absltest.TestCase):

  def test_smoke_run_times_cold_and_warm(self):
    workdir = tempfile.mkdtemp()
    argv = [sys.executable, "-m", "experiments.benchmark", "--sections=time_to_accuracy",
            f"--workdir={workdir}", "--algorithms=rafbo", "--smoke"]
    # Compiling dominates the 7 driver processes; times are not asserted.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(os.path.join(workdir, "benchmark.json")) as f:
      everything = json.load(f)
    for key in ("versions", "device", "settings", "commit"):
      self.assertIn(key, everything)
    result = everything["time_to_accuracy"]
    for key in ("settings", "target", "seed", "fednest_reference_s"):
      self.assertIn(key, result)
    self.assertEqual(result["failed"], [])
    self.assertEqual(result["seed"], 1)
    self.assertEqual(result["target"], 0.0)
    self.assertEqual(result["fednest_reference_s"], 66.0)
    self.assertEqual(set(result["results"]), {"rafbo"})
    self.assertEqual(set(result["results"]["rafbo"]), {"cold", "warm"})
    for state, r in result["results"]["rafbo"].items():
      self.assertGreater(r["seconds_to_target"], 0, state)
      self.assertEqual(r["round_reached"], time_to_accuracy.SMOKE_EVAL_EVERY, state)
      self.assertAlmostEqual(r["speedup"], 66.0 / r["seconds_to_target"], msg=state)
      self.assertIsNone(r["error"], state)
    # Each run started with HOME=a new folder (cold) or that folder again (warm) and used the
    # compilation cache under it: the cold run filled it, the warm one loaded every program.
    runs = result["results"]["rafbo"]
    self.assertGreater(runs["cold"]["cache_files"], 0)
    self.assertEqual(runs["warm"]["cache_files"], runs["cold"]["cache_files"])
    self.assertIn("--algorithm=rafbo", runs["cold"]["command"])
    self.assertNotIn("--flagfile", runs["cold"]["command"])
    self.assertIn("rafbo", proc.stdout)
    main = result["main_job"]  # the README main job, --smoke: 2 rounds, the first 2 seeds
    self.assertNotIn("errors", main)
    for name in ("one_seed_cold", "one_seed_warm", "seeds_batched_cold", "seeds_batched_warm",
                 "seeds_sequential_warm"):
      self.assertGreater(main[f"{name}_s"], 0, name)
      self.assertGreater(main[f"{name}_time_to_first_round_s"], 0, name)
    self.assertIn("--nobatch_seeds", main["commands"]["seeds_sequential_warm"])
    self.assertAlmostEqual(main["seeds_batched_warm_over_one_seed"],
                           main["seeds_batched_warm_s"] / main["one_seed_warm_s"])
    # Each run's folder and each HOME were removed: only the results are left.
    self.assertEqual(os.listdir(workdir), ["benchmark.json"])
    self.assertIn("README main job", proc.stdout)

  def test_bad_flags_are_one_error(self):
    argv = [sys.executable, "-m", "experiments.benchmark", "--sections=time_to_accuracy",
            f"--workdir={tempfile.mkdtemp()}", "--algorithms=rafbo,warp", "--target=1.5"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("2 problems", proc.stderr)
    self.assertIn("'warp'", proc.stderr)


if __name__ == "__main__":
  absltest.main()
