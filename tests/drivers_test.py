"""Driver smoke tests: hyper_representation, hyper_cleaning and compare run end to end on tiny
settings and write their results; every --algorithm preset runs one round on both tasks; bad
flags end with a non-zero exit and no summary.json; the presets parse (hyper-cleaning's pieces:
tests/tasks_test.py).

Each driver's main() runs under absl's flagsaver, so flag values (and hyper_cleaning's task
defaults) never leak from one test into another. Compilation dominates the run time, so the
module compiles with jax_disable_most_optimizations (numbers are only checked for sanity here).
"""

import contextlib
import ctypes
import io
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import absltest, flagsaver, parameterized

from bilevel import algorithms, checkpoint, loop, sharding
from bilevel import data as data_lib
from bilevel import masks as masks_lib
import quadratic  # tests/quadratic.py
from experiments import centralised, common, compare, hyper_cleaning, hyper_representation

FLAGS = flags.FLAGS
ALGORITHMS = sorted(algorithms.names())
DEFAULT_ALGORITHM = "rafbo"  # the --algorithm default: SmokeTest's runs
TASKS = {"hyper_representation": (hyper_representation, dict(hidden=16)),
         "hyper_cleaning": (hyper_cleaning, {})}
# 4 clients: the default level profile gives every level one client or more (full_only needs 1/1).
TINY = dict(dataset="digits", num_clients=4, clients_per_round=2, local_steps=1, eval_every=1,
            log_every=1)
REQUIRED_SUMMARY = ("test_accuracy", "rounds", "wall_time_s", "cumulative_client_flops",
                    "min_coverage_x", "min_coverage_y")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "presets")

_saved_optimizations = None


def setUpModule():
  global _saved_optimizations
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  _saved_optimizations = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _saved_optimizations)


def _run(module, **overrides) -> str:
  """main() of a driver with the given flag values; returns what it printed."""
  out = io.StringIO()
  with flagsaver.flagsaver(**overrides), contextlib.redirect_stdout(out):
    module.main([])
  return out.getvalue()


def _read(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _assert_test_accuracy(test, workdir):
  """summary.json's test accuracy is the last logged one and a count of right answers over the
  digits test set (k / n_test), not merely a number in [0, 1]."""
  summary = _read(os.path.join(workdir, "summary.json"))
  records = [r for r in _records(os.path.join(workdir, "metrics.jsonl")) if "test_accuracy" in r]
  test.assertEqual(summary["test_accuracy"], records[-1]["test_accuracy"])
  n_test = len(data_lib.load_dataset("digits", None, seed=0).y_test)
  right = summary["test_accuracy"] * n_test
  test.assertAlmostEqual(right, round(right), delta=1e-3)  # float32 mean of n_test booleans
  test.assertGreater(round(right), 0)


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
class SmokeTest(parameterized.TestCase):
  """Two rounds of each task into one temporary directory, then checks and compare."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.root = cls._tmp.name
    cls.dirs = {"hr": os.path.join(cls.root, "hr"), "hc": os.path.join(cls.root, "hc"),
                "hc/unweighted": os.path.join(cls.root, "hc", "unweighted"),
                "hr_cnn": os.path.join(cls.root, "hr_cnn")}
    _run(hyper_representation, workdir=cls.dirs["hr"], rounds=2, hidden=16, **TINY)
    _run(hyper_representation, workdir=cls.dirs["hr_cnn"], rounds=2, model="cnn",
         channels=["4", "6"], **TINY)
    _run(hyper_cleaning, workdir=cls.dirs["hc"], rounds=2, baseline_unweighted=True, **TINY)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  @parameterized.parameters("hr", "hc", "hc/unweighted", "hr_cnn")
  def test_writes_results(self, run):
    workdir = self.dirs[run]
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
      self.assertTrue(os.path.isfile(os.path.join(workdir, name)), f"{run}: {name} missing")
    summary = _read(os.path.join(workdir, "summary.json"))
    for key in REQUIRED_SUMMARY:
      self.assertIn(key, summary)
      self.assertTrue(math.isfinite(summary[key]), f"{run}: {key}={summary[key]}")
    _assert_test_accuracy(self, workdir)
    self.assertEqual(summary["rounds"], 2)
    self.assertEqual(summary["algorithm"], DEFAULT_ALGORITHM)
    records = _records(os.path.join(workdir, "metrics.jsonl"))
    self.assertEqual([r["round"] for r in records], [1, 2])
    self.assertGreater(records[1]["cumulative_client_flops"], records[0]["cumulative_client_flops"])
    self.assertIn("config", _read(os.path.join(workdir, "config.json")))

  def test_the_cnn_defaults_to_the_width_scaler_and_a_step_trust_region(self):
    cnn = _read(os.path.join(self.dirs["hr_cnn"], "config.json"))["config"]
    self.assertEqual((cnn["width_scale"], cnn["x_trust"], cnn["x_trust_on"]), (True, 0.1, "step"))
    mlp = _read(os.path.join(self.dirs["hr"], "config.json"))["config"]
    self.assertEqual((mlp.get("width_scale"), mlp["x_trust"], mlp["x_trust_on"]),
                     (None, 0.0, "delta"))
    # a flag given wins over the CNN's default, one flag at a time
    workdir = os.path.join(self.root, "hr_cnn_given")
    with flagsaver.flagsaver(workdir=workdir, model="cnn", channels=["4", "6"], seed=0,
                             width_scale=False, x_trust=0.05, **TINY):
      common.start_driver(hyper_representation.cnn_defaults())  # as main() starts
      hyper_representation.prepare_one()
    given = _read(os.path.join(workdir, "config.json"))["config"]
    self.assertEqual((given.get("width_scale"), given["x_trust"], given["x_trust_on"]),
                     (None, 0.05, "step"))
    self.assertEqual(given["task_defaults_applied"], {"x_trust_on": "step"})
    # fednest's round reads no trust region: the CNN gives it the scaler only, no ConfigError
    workdir = os.path.join(self.root, "hr_cnn_fednest")
    with flagsaver.flagsaver(workdir=workdir, model="cnn", channels=["4", "6"], seed=0,
                             algorithm="fednest", **TINY):
      common.start_driver(hyper_representation.cnn_defaults())
      hyper_representation.prepare_one()
    self.assertEqual(_read(os.path.join(workdir, "config.json"))["config"]
                     ["task_defaults_applied"], {"width_scale": True})

  def test_smoke_runs_cover_the_default_algorithm(self):
    self.assertEqual(FLAGS["algorithm"].default, DEFAULT_ALGORITHM)  # AlgorithmsTest skips it

  def test_hyper_cleaning_summary(self):
    summary = _read(os.path.join(self.dirs["hc"], "summary.json"))
    base = _read(os.path.join(self.dirs["hc/unweighted"], "summary.json"))
    self.assertBetween(summary["weight_auc"], 0.0, 1.0)
    for key in ("weight_precision", "weight_recall"):
      self.assertBetween(summary[key], 0.0, 1.0)
    self.assertEqual(summary["unweighted_test_accuracy"], base["test_accuracy"])
    self.assertAlmostEqual(summary["accuracy_gain"],
                           summary["test_accuracy"] - base["test_accuracy"], places=6)
    self.assertFalse(base["weighted"])
    self.assertEqual(base["weight_auc"], 0.5)  # weights never move: every score tied
    config = _read(os.path.join(self.dirs["hc"], "config.json"))["config"]
    self.assertEqual(config["noise"], 0.5)
    self.assertEqual(config["local_steps"], 1)  # given flags beat task defaults
    self.assertNotIn("local_steps", config["task_defaults_applied"])

  def test_compare(self):
    unfinished = os.path.join(self.root, "killed")
    os.makedirs(unfinished)
    with open(os.path.join(self.dirs["hc"], "metrics.jsonl")) as f, \
        open(os.path.join(unfinished, "metrics.jsonl"), "w") as g:
      g.write(f.readline())
    out = os.path.join(self.root, "cmp")
    printed = _run(compare, workdirs=[self.dirs["hr"], self.dirs["hc"], self.dirs["hc/unweighted"],
                                      unfinished],
                   labels=["hr", "hc", "hc_unweighted", "killed"], out=out)
    self.assertIn("unfinished", printed)
    self.assertTrue(os.path.isfile(os.path.join(out, "compare.png")))
    with open(os.path.join(out, "compare.md")) as f:
      md = f.read()
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]  # skip the header
    self.assertEqual([r.split("|")[1].strip() for r in rows], ["hr", "hc", "hc_unweighted"])
    self.assertIn("weight AUC", md)
    self.assertIn("1.000", rows[0])  # FLOPs relative to the first run
    self.assertIn("killed", md.split("Unfinished runs")[1])

  def test_compare_needs_a_finished_run(self):
    empty = os.path.join(self.root, "empty")
    os.makedirs(empty, exist_ok=True)
    for kwargs in (dict(workdirs=[empty]), dict(workdirs=[os.path.join(self.root, "missing")]),
                   dict(workdirs=[self.dirs["hr"]], labels=["a", "b"]),
                   dict(workdirs=[self.dirs["hr"]], out=None, workdir=None)):
      kwargs.setdefault("out", os.path.join(self.root, "cmp_bad"))
      with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
        with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(io.StringIO()):
          _run(compare, **kwargs)
        self.assertNotEqual(cm.exception.code, 0)
    self.assertFalse(os.path.exists(os.path.join(self.root, "cmp_bad", "compare.md")))


@pytest.mark.slow
class CentralisedTest(absltest.TestCase):
  """The centralised reference trains the task's model on all training images."""

  def test_one_epoch_of_adam_learns_and_writes_its_summary(self):
    workdir = tempfile.mkdtemp()
    _run(centralised, workdir=workdir, model="mlp", hidden=32, epochs=1, seeds=["0", "1"])
    summary = _read(os.path.join(workdir, "summary.json"))
    self.assertEqual(sorted(summary["per_seed"]), ["0", "1"])
    accs = list(summary["per_seed"].values())
    self.assertAlmostEqual(summary["mean_test_accuracy"], float(np.mean(accs)), places=12)
    # One epoch (62 Adam steps) of a 784-32-10 MLP: 0.898 measured with 200 hidden units; a
    # model that does not train stays near chance (0.1).
    self.assertGreater(min(accs), 0.8)


class AlgorithmsTest(parameterized.TestCase):
  """Every preset but the default one (rafbo: SmokeTest runs it on both tasks, with the same
  tiny settings) runs one round on both tasks. Compiling the round is most of the time."""

  @parameterized.product(task=sorted(TASKS),
                         algorithm=[a for a in ALGORITHMS if a != DEFAULT_ALGORITHM])
  def test_one_round(self, task, algorithm):
    module, extra = TASKS[task]
    with tempfile.TemporaryDirectory() as workdir, \
        mock.patch.object(checkpoint, "plot_records"):  # plotting is covered by SmokeTest
      _run(module, workdir=workdir, rounds=1, algorithm=algorithm, checkpoint_every=0, **TINY,
           **extra)
      summary = _read(os.path.join(workdir, "summary.json"))
      _assert_test_accuracy(self, workdir)
    self.assertEqual(summary["algorithm"], algorithm)
    self.assertTrue(math.isfinite(summary["final_outer_loss"]))
    self.assertGreater(summary["cumulative_client_flops"], 0)


class BadFlagsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("hr_unknown_dataset", "hyper_representation", dict(dataset="imagenet"), "imagenet"),
      ("hc_unknown_dataset", "hyper_cleaning", dict(dataset="imagenet"), "imagenet"),
      ("hr_data_dir_without_files", "hyper_representation",
       dict(dataset="mnist", data_dir="EMPTY"), "Missing data file"),
      ("hc_data_dir_without_files", "hyper_cleaning",
       dict(dataset="fashion_mnist", data_dir="EMPTY"), "Missing data file"),
      ("hc_noise_one", "hyper_cleaning", dict(noise=1.0), "--noise=1.0"),
      ("hc_noise_negative", "hyper_cleaning", dict(noise=-0.1), "--noise=-0.1"),
      ("hc_element_masks", "hyper_cleaning", dict(mask_granularity="element"), "element"),
      ("hc_static_samples", "hyper_cleaning", dict(mask_policy="static"), "uncovered forever"),
      ("hc_compact_submodel", "hyper_cleaning", dict(submodel="compact"), "--submodel=dense"),
      ("hc_two_problems", "hyper_cleaning", dict(noise=2.0, rounds=0), "2 problems"),
  )
  def test_exits_without_summary(self, task, overrides, message):
    module, extra = TASKS[task]
    with tempfile.TemporaryDirectory() as root:
      empty = os.path.join(root, "empty")
      os.makedirs(empty)
      overrides = {k: empty if v == "EMPTY" else v for k, v in overrides.items()}
      workdir = os.path.join(root, "run")
      stderr = io.StringIO()
      with self.assertRaises(SystemExit) as cm, contextlib.redirect_stderr(stderr):
        _run(module, **{**TINY, **extra, "workdir": workdir, "rounds": 1, **overrides})
      self.assertNotEqual(cm.exception.code, 0)
      self.assertTrue(stderr.getvalue().startswith("error: "), stderr.getvalue())
      self.assertIn(message, stderr.getvalue())
      self.assertFalse(os.path.exists(os.path.join(workdir, "summary.json")))


class PresetsTest(parameterized.TestCase):

  @parameterized.parameters(
      ("hyper_representation_fednest_iid.cfg", "fednest", "iid"),
      ("hyper_representation_fednest_noniid.cfg", "fednest", "shards"),
      ("hyper_cleaning_default.cfg", "rafbo", "iid"))
  def test_preset_parses_and_validates(self, name, algorithm, partition):
    path = os.path.join(PRESETS, name)
    self.assertTrue(os.path.isfile(path))
    with flagsaver.flagsaver():
      FLAGS(["prog", f"--flagfile={path}"])
      alg = common.make_algorithm(quadratic.QUADRATIC, masks_lib.UnitLayout({}, {}, {}))
      o = alg.options
      self.assertEqual(FLAGS.algorithm, algorithm)
      self.assertEqual(FLAGS.partition, partition)
      # The resolved configuration holds the file's values (a preset default must not win
      # over a value the file gives).
      with open(path) as f:
        given = dict(line.strip()[2:].split("=", 1) for line in f if line.startswith("--"))
      resolved = dict(num_clients=alg.num_clients, **{k: getattr(o, k) for k in (
          "clients_per_round", "local_steps", "inner_steps", "inner_lr", "outer_lr", "estimator",
          "num_steps", "v_lr", "mask_policy", "levels")})
      checked = 0
      for key, value in resolved.items():
        if key in given:
          want = given[key] if isinstance(value, str) else (
              masks_lib.parse_levels(given[key]) if key == "levels" else type(value)(
                  float(given[key])))
          self.assertEqual(value, want, key)
          checked += 1
      self.assertGreaterEqual(checked, 8)
      if name.startswith("hyper_cleaning"):
        # The preset spells out the driver's task defaults.
        for key, value in hyper_cleaning.task.DEFAULTS.items():
          self.assertEqual(FLAGS[key].value, value, key)



class CpuDevicesTest(absltest.TestCase):

  @pytest.mark.slow
  def test_cpu_devices_shard_the_rounds_over_the_cores(self):
    # A fresh process (the device count is fixed when JAX starts): --cpu_devices=2 splits the
    # CPU into 2 JAX devices and --devices=0 shards every round's clients over both.
    with tempfile.TemporaryDirectory() as workdir:
      argv = [sys.executable, "-m", "experiments.hyper_representation", f"--workdir={workdir}",
              "--cpu_devices=2", "--devices=0", "--rounds=2", "--hidden=16", "--checkpoint_every=0",
              *(f"--{k}={v}" for k, v in TINY.items())]
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
      env.pop("XLA_FLAGS", None)
      proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertEqual(_read(os.path.join(workdir, "config.json"))["device"]["count"], 2)
      _assert_test_accuracy(self, workdir)

  def test_cpu_devices_below_one_is_an_error(self):
    with tempfile.TemporaryDirectory() as root, self.assertRaises(SystemExit) as cm, \
        contextlib.redirect_stderr(io.StringIO()) as stderr:
      _run(hyper_representation, **{**TINY, "workdir": os.path.join(root, "run"), "rounds": 1,
                                    "cpu_devices": 0})
    self.assertNotEqual(cm.exception.code, 0)
    self.assertIn("--cpu_devices=0", stderr.getvalue())


class HostMemoryTest(absltest.TestCase):

  def test_reuse_host_memory_keeps_freed_large_blocks_mapped(self):
    # A 64 MiB block is over glibc's largest mmap threshold (32 MiB): by default every malloc
    # of it maps fresh pages, and writing them faults 16384 times. After reuse_host_memory the
    # block comes from the kept heap: writing it again faults (almost) never.
    if not loop.reuse_host_memory():
      self.skipTest("not glibc")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20

    def write_fresh_block():
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      libc.free(p)

    write_fresh_block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    write_fresh_block()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    self.assertLess(faults, size // 4096 // 10)


  def test_host_memory_tuning_is_for_cpu_runs_only(self):
    with mock.patch.dict(os.environ, {"JAX_PLATFORMS": "cuda,cpu"}):
      self.assertTrue(sharding.accelerator_possible())
    with mock.patch.dict(os.environ, {"JAX_PLATFORMS": "cpu"}):
      self.assertFalse(sharding.accelerator_possible())
    with mock.patch.dict(os.environ, {"JAX_PLATFORMS": ""}), \
        mock.patch("importlib.util.find_spec", lambda name: object() if name == "libtpu"
                   else None), \
        mock.patch("importlib.metadata.entry_points", lambda group: []):
      self.assertTrue(sharding.accelerator_possible())  # libtpu installed, platform unset


if __name__ == "__main__":
  absltest.main()
