"""Checkpoint / resume after SIGKILL, torn metrics lines, divergence guard, determinism and
one clear error (no traceback) for each of many bad inputs."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags
from absl.testing import absltest, flagsaver, parameterized

from bilevel import checkpoint
from experiments import common, hyper_representation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="digits", num_clients=6, clients_per_round=3, hidden=16, eval_every=5,
            log_every=1000, checkpoint_every=10)


def setUpModule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _tmpdir(test):
  d = tempfile.TemporaryDirectory()
  test.addCleanup(d.cleanup)
  return d.name


def _main(**overrides):
  """Run the driver in-process; return (exit code or 0, stderr text)."""
  err = io.StringIO()
  with flagsaver.flagsaver(**overrides), contextlib.redirect_stderr(err), \
      contextlib.redirect_stdout(io.StringIO()):
    for name in overrides:  # as if given on the command line: they win over --algorithm presets
      flags.FLAGS[name].present = 1
    try:
      hyper_representation.main([])
      code = 0
    except SystemExit as e:
      code = e.code
  return code, err.getvalue()


def _strip(path):
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"} for line in f]


class ResumeTest(absltest.TestCase):

  def test_sigkill_then_rerun_gives_the_uninterrupted_result(self):
    root = _tmpdir(self)
    args = [f"--{k}={v}" for k, v in dict(TINY, rounds=300).items()]
    cmd = [sys.executable, "-m", "experiments.hyper_representation"] + args
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    full, killed = os.path.join(root, "full"), os.path.join(root, "killed")
    subprocess.run(cmd + [f"--workdir={full}"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    proc = subprocess.Popen(cmd + [f"--workdir={killed}"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and os.path.getsize(metrics) > 0 and checkpoint.exists(killed):
        with open(metrics) as f:
          if sum(1 for _ in f) >= 12:
            break
      time.sleep(0.05)
    self.assertIsNone(proc.poll(), "the run finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertFalse(os.path.exists(os.path.join(killed, "summary.json")))
    out = subprocess.run(cmd + [f"--workdir={killed}"], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True)
    self.assertIn("resuming from", out.stdout)
    with open(os.path.join(full, "summary.json")) as f:
      want = json.load(f)
    with open(os.path.join(killed, "summary.json")) as f:
      got = json.load(f)
    want.pop("wall_time_s"), got.pop("wall_time_s")
    self.assertEqual(got, want)
    self.assertEqual(_strip(metrics), _strip(os.path.join(full, "metrics.jsonl")))

  def test_torn_last_line_is_dropped(self):
    path = os.path.join(_tmpdir(self), "metrics.jsonl")
    with open(path, "w") as f:
      f.write('{"round": 5, "a": 1}\n{"round": 10, "a": 2}\n{"round": 15, "a": 3}\n{"round": 2')
    records = common.read_metrics(path, up_to_round=10)
    self.assertEqual([r["round"] for r in records], [5, 10])
    with open(path) as f:
      self.assertEqual(f.read(), '{"round": 5, "a": 1}\n{"round": 10, "a": 2}\n')

  def test_checkpoint_of_another_config_is_refused(self):
    workdir = _tmpdir(self)
    self.assertEqual(_main(workdir=workdir, rounds=10, **TINY)[0], 0)
    code, err = _main(workdir=workdir, rounds=10, **dict(TINY, hidden=8))
    self.assertEqual(code, 2)
    self.assertIn("another configuration", err)
    self.assertTrue(os.path.exists(os.path.join(workdir, "summary.json")))  # nothing lost


class DivergenceAndDeterminismTest(absltest.TestCase):

  def test_nan_stops_with_round_and_quantity_and_keeps_last_good_checkpoint(self):
    workdir = _tmpdir(self)
    code, err = _main(workdir=workdir, rounds=50, outer_lr=1e30, inner_lr=1e30,
                      **dict(TINY, checkpoint_every=1))
    self.assertEqual(code, 2)
    self.assertRegex(err, r"round \d+: .*(loss|hypergrad_norm|x|y|v).* became NaN or infinite")
    self.assertNotIn("Traceback", err)
    bad_round = int(err.split("round ")[1].split(":")[0])
    self.assertFalse(os.path.exists(os.path.join(workdir, "summary.json")))
    if bad_round > 1:
      _, meta = checkpoint.restore(workdir, _template_state())
      self.assertEqual(meta["round"], bad_round - 1)

  def test_same_seed_identical_metrics(self):
    a, b, c = (os.path.join(_tmpdir(self), n) for n in "abc")
    for workdir, seed in ((a, 3), (b, 3), (c, 4)):
      self.assertEqual(_main(workdir=workdir, rounds=15, seed=seed, **TINY)[0], 0)
    self.assertEqual(_strip(os.path.join(a, "metrics.jsonl")),
                     _strip(os.path.join(b, "metrics.jsonl")))
    self.assertNotEqual(_strip(os.path.join(a, "metrics.jsonl")),
                        _strip(os.path.join(c, "metrics.jsonl")))
    with open(os.path.join(a, "config.json")) as f:
      config = json.load(f)
    self.assertEqual(config["flags"]["seed"], 3)
    self.assertIn("jax", config["versions"])


def _template_state():
  import jax
  import optax
  from bilevel import federated, models
  x, y = models.init_mlp(jax.random.key(0), 64, 16, 10)
  return federated.init_state(x, y, optax.sgd(1.0))


BAD_INPUTS = [
    (dict(rounds=0), "--rounds=0"),
    (dict(num_clients=0), "num_clients"),
    (dict(clients_per_round=50, num_clients=20), "clients_per_round=50"),
    (dict(levels="1/1:0.5"), "sum to 0.5"),
    (dict(levels="1.5/1:1"), r"rx=1\.5"),
    (dict(levels="abc"), "not of the form"),
    (dict(mask_policy="lottery"), "mask_policy='lottery'"),
    (dict(mask_granularity="block"), "mask_granularity='block'"),
    (dict(estimator="newton"), "estimator='newton'"),
    (dict(dataset="imagenet"), "imagenet"),
    (dict(dataset="mnist"), "--data_dir"),
    (dict(dataset="mnist", data_dir="/nonexistent/folder"), "/nonexistent/folder"),
    (dict(partition="weird"), "weird"),
    (dict(alpha=0.0, partition="dirichlet"), "alpha"),
    (dict(val_fraction=1.5), "val_fraction=1.5"),
    (dict(inner_lr=0.0), "inner_lr=0.0"),
    (dict(outer_lr=-1.0), "outer_lr=-1.0"),
    (dict(v_lr=0.0), "step_size=0.0"),
    (dict(delta=0.0), "delta=0.0"),
    (dict(local_steps=0), "local_steps=0"),
    (dict(aggregation="median"), "aggregation='median'"),
    (dict(mask_policy="static", levels="0.5/0.5:1"), "uncovered"),
    (dict(batch_size=-1), "batch_size=-1"),
    (dict(eval_every=0), "eval_every=0"),
    (dict(hidden=0), "hidden=0"),
    (dict(server_lr=0.0), "server_lr=0.0"),
    (dict(checkpoint_every=-1), "checkpoint_every=-1"),
    (dict(devices=64), r"--devices=64 is outside the allowed range \[0, 1\]"),
    (dict(workdir=None), "--workdir is required"),
]


class BadInputTest(parameterized.TestCase):

  def test_there_are_at_least_twenty(self):
    self.assertGreaterEqual(len(BAD_INPUTS), 20)

  @parameterized.parameters(*BAD_INPUTS)
  def test_one_clear_error_and_nonzero_exit(self, overrides, message):
    overrides = dict(dict(TINY, rounds=2, workdir=os.path.join(_tmpdir(self), "w")), **overrides)
    code, err = _main(**overrides)
    self.assertNotEqual(code, 0)
    self.assertRegex(err, message)
    self.assertTrue(err.startswith("error: "))
    self.assertEqual(err.strip().count("\n"), 0)  # one paragraph
    if overrides.get("workdir"):
      self.assertFalse(os.path.exists(os.path.join(overrides["workdir"], "summary.json")))

  def test_all_problems_in_one_message(self):
    code, err = _main(**dict(TINY, rounds=0, estimator="newton", val_fraction=2.0, workdir=None))
    self.assertEqual(code, 2)
    self.assertIn("4 problems", err)

  @parameterized.parameters("--rounds=abc", "--algorithm=gradient_descent")
  def test_unparsable_flags_exit_without_traceback(self, arg):
    out = subprocess.run([sys.executable, "-m", "experiments.hyper_representation", arg,
                          "--workdir=/tmp/unused"], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    self.assertNotEqual(out.returncode, 0)
    self.assertNotIn("Traceback", out.stderr)
    self.assertIn(arg.split("=")[0], out.stderr)


if __name__ == "__main__":
  absltest.main()
