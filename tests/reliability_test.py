"""Checkpoint / resume after SIGKILL, torn metrics lines, divergence guard, determinism and
one clear error (no traceback) for each of many bad inputs."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import chex
import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import absltest, flagsaver, parameterized

from bilevel import checkpoint
from experiments import common, compare, hyper_cleaning, hyper_representation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT_S = 300  # one tiny driver run, compile included, on a loaded 2-core machine
TINY = dict(dataset="digits", num_clients=6, clients_per_round=3, hidden=16, eval_every=5,
            log_every=1000, checkpoint_every=10)


def setUpModule():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _tmpdir(test):
  d = tempfile.TemporaryDirectory()
  test.addCleanup(d.cleanup)
  return d.name


def _main_out(module=hyper_representation, **overrides):
  """Run a driver in-process; return (exit code or 0, stdout text, stderr text)."""
  err, out = io.StringIO(), io.StringIO()
  with flagsaver.flagsaver(**overrides), contextlib.redirect_stderr(err), \
      contextlib.redirect_stdout(out):
    for name in overrides:  # as if given on the command line: they win over --algorithm presets
      flags.FLAGS[name].present = 1
    try:
      module.main([])
      code = 0
    except SystemExit as e:
      code = e.code
  return code, out.getvalue(), err.getvalue()


def _main(**overrides):
  """Run hyper_representation in-process; return (exit code or 0, stderr text)."""
  code, _, err = _main_out(**overrides)
  return code, err


def _env(**extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)


def _snapshot(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {k: v for k, v in summary.items() if not k.endswith("_s")}  # timings


def _strip(path):
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # timings
            for line in f]


class ResumeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # The driver kills itself with SIGKILL right after its 2nd checkpoint (round 10).
      ("self_kill_after_second_checkpoint", "BILEVEL_KILL_AFTER_CHECKPOINT", 10),
      # A real SIGKILL from outside: the driver stops itself (SIGSTOP) after its 1st checkpoint
      # (round 5), so the kill lands there whatever the machine's speed.
      ("external_sigkill_after_first_checkpoint", "BILEVEL_STOP_AFTER_CHECKPOINT", 5))
  @pytest.mark.slow
  def test_sigkill_then_rerun_gives_the_uninterrupted_result(self, hook, kill_round):
    root = _tmpdir(self)
    settings = dict(TINY, rounds=20, checkpoint_every=5)
    cmd = [sys.executable, "-m", "experiments.hyper_representation"] + [
        f"--{k}={v}" for k, v in settings.items()]
    full, killed = os.path.join(root, "full"), os.path.join(root, "killed")
    self.assertEqual(_main(workdir=full, **settings)[0], 0)
    proc = subprocess.Popen(cmd + [f"--workdir={killed}"], env=_env(**{hook: "2" if kill_round
                                                                       == 10 else "1"}),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      if hook == "BILEVEL_STOP_AFTER_CHECKPOINT":
        deadline = time.time() + SUBPROCESS_TIMEOUT_S
        while time.time() < deadline:
          pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
          if pid:
            break
          time.sleep(0.05)
        self.assertTrue(pid and os.WIFSTOPPED(status), "the driver did not stop at its checkpoint")
        proc.send_signal(signal.SIGKILL)
      self.assertEqual(proc.wait(timeout=SUBPROCESS_TIMEOUT_S), -signal.SIGKILL)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)
    self.assertFalse(os.path.exists(os.path.join(killed, "summary.json")))
    self.assertEqual(checkpoint.restore(killed, _template_state())[1]["round"], kill_round)
    metrics = os.path.join(killed, "metrics.jsonl")
    self.assertEqual([r["round"] for r in _strip(metrics)], list(range(5, kill_round + 1, 5)))
    out = subprocess.run(cmd + [f"--workdir={killed}"], env=_env(), cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    self.assertIn("resuming from", out.stdout)
    self.assertEqual(_summary(killed), _summary(full))
    self.assertEqual(_strip(metrics), _strip(os.path.join(full, "metrics.jsonl")))

  @pytest.mark.slow
  def test_noresume_starts_from_round_zero_and_overwrites(self):
    workdir = _tmpdir(self)
    settings = dict(TINY, rounds=4, eval_every=2, checkpoint_every=2)
    self.assertEqual(_main(workdir=workdir, **settings)[0], 0)
    first = _summary(workdir)
    # Another configuration: refused with resume, run afresh with --noresume.
    self.assertEqual(_main(workdir=workdir, **dict(settings, hidden=8))[0], 2)
    code, out, _ = _main_out(workdir=workdir, resume=False, **dict(settings, hidden=8))
    self.assertEqual(code, 0)
    self.assertNotIn("resuming", out)
    with open(os.path.join(workdir, "config.json")) as f:
      self.assertEqual(json.load(f)["config"]["hidden"], 8)
    self.assertEqual([r["round"] for r in _strip(os.path.join(workdir, "metrics.jsonl"))], [2, 4])
    self.assertNotEqual(_summary(workdir), first)
    # The same configuration again with --noresume: recomputed from round 0, same numbers.
    fresh = _tmpdir(self)
    self.assertEqual(_main(workdir=fresh, **dict(settings, hidden=8))[0], 0)
    code, out, _ = _main_out(workdir=workdir, resume=False, **dict(settings, hidden=8))
    self.assertNotIn("resuming", out)
    self.assertEqual(_strip(os.path.join(workdir, "metrics.jsonl")),
                     _strip(os.path.join(fresh, "metrics.jsonl")))

  @pytest.mark.slow
  def test_hyper_cleaning_resumes_after_sigkill(self):
    root = _tmpdir(self)
    settings = dict(dataset="digits", num_clients=4, clients_per_round=2, local_steps=1,
                    rounds=6, eval_every=2, checkpoint_every=2, log_every=1000)
    full, killed = os.path.join(root, "full"), os.path.join(root, "killed")
    self.assertEqual(_main_out(hyper_cleaning, workdir=full, **settings)[0], 0)
    cmd = [sys.executable, "-m", "experiments.hyper_cleaning", f"--workdir={killed}"] + [
        f"--{k}={v}" for k, v in settings.items()]
    proc = subprocess.run(cmd, env=_env(**{"BILEVEL_KILL_AFTER_CHECKPOINT": "2"}), cwd=REPO,
                          capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
    self.assertEqual(proc.returncode, -signal.SIGKILL)
    self.assertFalse(os.path.exists(os.path.join(killed, "summary.json")))
    self.assertEqual([r["round"] for r in _strip(os.path.join(killed, "metrics.jsonl"))], [2, 4])
    out = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertIn("resuming from", out.stdout)
    self.assertEqual(_summary(killed), _summary(full))
    self.assertEqual(_strip(os.path.join(killed, "metrics.jsonl")),
                     _strip(os.path.join(full, "metrics.jsonl")))

  def test_torn_last_line_is_dropped(self):
    path = os.path.join(_tmpdir(self), "metrics.jsonl")
    with open(path, "w") as f:
      f.write('{"round": 5, "a": 1}\n{"round": 10, "a": 2}\n{"round": 15, "a": 3}\n{"round": 2')
    records = checkpoint.read_metrics(path, up_to_round=10)
    self.assertEqual([r["round"] for r in records], [5, 10])
    with open(path) as f:
      self.assertEqual(f.read(), '{"round": 5, "a": 1}\n{"round": 10, "a": 2}\n')

  @pytest.mark.slow
  def test_checkpoint_of_another_config_is_refused(self):
    workdir = _tmpdir(self)
    self.assertEqual(_main(workdir=workdir, rounds=10, **TINY)[0], 0)
    code, err = _main(workdir=workdir, rounds=10, **dict(TINY, hidden=8))
    self.assertEqual(code, 2)
    self.assertIn("another configuration", err)
    self.assertTrue(os.path.exists(os.path.join(workdir, "summary.json")))  # nothing lost

  def test_a_flag_added_since_resumes_at_its_default_only(self):
    # A workdir written by an older version of the code lacks flags added since: resuming is
    # the same run when the new flag stays at its default, another one when it is set.
    old = {"config": {"a": 1}, "flags": {"seed": 0, "workdir": "w"}, "versions": {"jax": "1"}}
    new = dict(old, flags={"seed": 0, "workdir": "w", "divergence_factor": 100.0})
    self.assertTrue(common._same_run(old, new))
    self.assertFalse(common._same_run(old, dict(new, flags=dict(new["flags"],
                                                                divergence_factor=5.0))))
    self.assertFalse(common._same_run(old, dict(new, flags=dict(new["flags"], seed=1))))


class DivergenceAndDeterminismTest(absltest.TestCase):

  @pytest.mark.slow
  def test_nan_stops_with_round_and_quantity_and_keeps_last_good_checkpoint(self):
    # inner_lr 1e5 against the head's L2 penalty multiplies y by ~200 per inner step: finite
    # for two rounds, overflowing float32 in round 3 (a real, deterministic divergence). The
    # fixed inner step: the default Cauchy step would cap 1e5 at 1 / curvature.
    root = _tmpdir(self)
    settings = dict(TINY, inner_lr=1e5, inner_step="fixed", checkpoint_every=1)
    workdir = os.path.join(root, "diverged")
    code, err = _main(workdir=workdir, rounds=12, **settings)
    self.assertEqual(code, 2)
    self.assertRegex(err, r"^error: round \d+: .*(loss|hypergrad_norm|x|y|v)")
    self.assertNotIn("Traceback", err)
    bad_round = int(err.split("round ")[1].split(":")[0])
    self.assertGreaterEqual(bad_round, 3)  # so that a checkpoint of a good round exists
    self.assertFalse(os.path.exists(os.path.join(workdir, "summary.json")))
    kept, meta = checkpoint.restore(workdir, _template_state())
    self.assertEqual(meta["round"], bad_round - 1)
    chex.assert_tree_all_finite(kept)
    # The kept state is exactly that of an uninterrupted run of bad_round - 1 rounds.
    good = os.path.join(root, "good")
    self.assertEqual(_main(workdir=good, rounds=bad_round - 1, **settings)[0], 0)
    want, want_meta = checkpoint.restore(good, _template_state())
    untimed = lambda totals: {k: v for k, v in totals.items() if not k.endswith("_s")}
    self.assertEqual(untimed(meta["totals"]), untimed(want_meta["totals"]))
    chex.assert_trees_all_equal(kept, want)  # same structure, bitwise-equal leaves

  @pytest.mark.slow
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


@pytest.mark.slow
class BadRunFilesTest(parameterized.TestCase):
  """A damaged or foreign file in a workdir: one clear error line, exit code 2, and every file
  already there byte for byte unchanged."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.runs = {}
    for name, hidden in (("h16", 16), ("h8", 8)):
      cls.runs[name] = os.path.join(cls._tmp.name, name)
      code, err = _main(workdir=cls.runs[name], rounds=2, **dict(TINY, hidden=hidden))
      assert code == 0, err

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def _copy(self, name):
    workdir = os.path.join(_tmpdir(self), "w")
    shutil.copytree(self.runs[name], workdir)
    return workdir

  def _assert_one_clear_error(self, code, err, message):
    self.assertEqual(code, 2, err)
    self.assertTrue(err.startswith("error: "), err)
    self.assertEqual(err.strip().count("\n"), 0, err)
    self.assertNotIn("Traceback", err)
    self.assertRegex(err, message)

  @parameterized.named_parameters(
      ("truncated_checkpoint", "truncate", "cannot read checkpoint"),
      ("random_bytes_checkpoint", "random", "cannot read checkpoint"),
      ("checkpoint_of_another_configuration", "foreign", "another structure or shape"),
      ("corrupt_config_json", "config", "cannot read .*config.json"))
  def test_damaged_run_file(self, damage, message):
    workdir = self._copy("h16")
    path = os.path.join(workdir, checkpoint.FILENAME)
    if damage == "truncate":
      with open(path, "rb") as f:
        data = f.read()
      with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    elif damage == "random":
      with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    elif damage == "foreign":
      shutil.copy(os.path.join(self.runs["h8"], checkpoint.FILENAME), path)
    else:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"config": {"hidden": 16')
    before = _snapshot(workdir)
    code, err = _main(workdir=workdir, rounds=2, **dict(TINY, hidden=16))
    self._assert_one_clear_error(code, err, message)
    self.assertEqual(_snapshot(workdir), before)

  def test_corrupt_summary_in_compare(self):
    good, bad = self._copy("h16"), os.path.join(_tmpdir(self), "bad")
    shutil.copytree(self.runs["h8"], bad)
    with open(os.path.join(bad, "summary.json"), "w") as f:
      f.write('{"test_accuracy": 0.9, ')
    out = os.path.join(_tmpdir(self), "cmp")
    os.makedirs(out)
    with open(os.path.join(out, "compare.md"), "w") as f:
      f.write("an earlier comparison\n")
    before = [_snapshot(d) for d in (good, bad, out)]
    err = io.StringIO()
    with flagsaver.flagsaver(workdirs=[good, bad], out=out), contextlib.redirect_stderr(err), \
        contextlib.redirect_stdout(io.StringIO()), self.assertRaises(SystemExit) as cm:
      compare.main([])
    self._assert_one_clear_error(cm.exception.code, err.getvalue(),
                                 f"cannot read .*{bad}")
    self.assertEqual([_snapshot(d) for d in (good, bad, out)], before)


def _template_state():
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
  @pytest.mark.slow
  def test_unparsable_flags_exit_without_traceback(self, arg):
    out = subprocess.run([sys.executable, "-m", "experiments.hyper_representation", arg,
                          "--workdir=/tmp/unused"], cwd=REPO, capture_output=True, text=True,
                         env=_env(), timeout=SUBPROCESS_TIMEOUT_S)
    self.assertNotEqual(out.returncode, 0)
    self.assertNotIn("Traceback", out.stderr)
    self.assertIn(arg.split("=")[0], out.stderr)


if __name__ == "__main__":
  absltest.main()
