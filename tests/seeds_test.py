"""Seeds batched in one program (loop.seeds_step, loop.run_seeds, --batch_seeds).

- Library: three seeds of a compact round, and of FedNest's round (different seeds, initial
  points and data) run as one vmapped program give every seed's records and final state of
  its own run: to 1e-10 in
  float64 (the same operations; only XLA's batching of them differs), to float32 rounding over
  one round (rtol 1e-5: ~1e-7 per operation, summed over the round's reductions).
- A seed that becomes NaN stops alone, with the message its own run gives; the others finish
  as they would alone.
- seeds_step refuses rounds that cannot share a program (other strata, a mask_fn, no
  RoundArgs).
- Driver: --seeds=0,1 batched writes per seed what --nobatch_seeds writes (float32: the runs
  agree to rtol 1e-4 over 2 rounds: rounding differences of 1e-7 grow through the updates),
  hyper_cleaning's weighted and unweighted runs of every seed included; a round with a mask_fn
  or --diagnose_every runs the seeds one after another; a batched run killed between its
  seeds' checkpoints resumes to the uninterrupted result.

Compilation dominates every test here (the compact round, alone and batched), so the
module compiles with jax_disable_most_optimizations (as tests/drivers_test.py does; the
killed-batch test's subprocesses too): each comparison is between two programs compiled the
same way, the float64 library rounds have two levels and the float32 and driver ones one (each
level is one more client program to compile), one algorithm per seed serves every library test,
and the drivers run on the small digits data with 16 hidden units for two rounds (what the tests
check does not depend on the sizes or the level count).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from absl.testing import absltest, parameterized

from bilevel import algorithms, federated, loop, masks, models, tree
from bilevel.errors import ConfigError
from experiments import hyper_cleaning
from reliability_test import REPO, _env, _main_out

M, N, DIN, H, CL = 8, 10, 12, 16, 4
LEVELS = "1/1:0.5,0.5/0.25:0.5"  # two strata, one pruned with r_x != r_y
# float32's rounding bound does not depend on the strata (float64's identity checks them): one
# pruned level with r_x != r_y, one client program to compile instead of two.
LEVELS_FLOAT32 = "0.5/0.25:1"
SEEDS = (0, 3, 5)


def _rafbo(seed, x0, levels=LEVELS):
  """The compact rafbo round of seed (delta 1e-2: fd divides rounding differences by delta,
  1e-16 / 1e-2 stays below 1e-12) and its algorithm."""
  alg = algorithms.get("rafbo", problem=models.hyper_representation_problem("tanh"),
                       num_clients=M, clients_per_round=6, local_steps=2, inner_steps=2,
                       inner_lr=0.2, outer_lr=0.2, estimator="fd", num_steps=2, v_lr=0.2,
                       delta=1e-2, levels=levels, seed=seed, layout=models.mlp_layout(H),
                       submodel="compact")
  return alg.make_round(x0), alg


# Each seed's own algorithm, built once per (seed, round kind, dtype): the tests that run the same
# configuration (float64 with and without a NaN seed) trace and compile its rounds once.
_ALGS = {}
_STEPS = {}


def _seed_run(seed, dtype, poison=False, fednest=False):
  """(round, initial state, data) of one seed: its own initial point and data (fednest: the
  fednest preset's round, FedNest's communicating round)."""
  rng = np.random.default_rng(seed)

  def split():
    inputs = rng.normal(size=(M, N, DIN))
    if poison:
      inputs[:] = np.nan
    return {"inputs": jnp.asarray(inputs, dtype),
            "labels": jnp.asarray(rng.integers(0, CL, (M, N))), "weight": jnp.ones((M, N), dtype)}

  data = federated.FederatedData(split(), split(), jnp.full((M,), N))
  x0, y0 = models.init_mlp(jax.random.key(seed), DIN, H, CL, dtype)
  key = (seed, fednest, jnp.dtype(dtype).name)
  if key not in _ALGS:  # one algorithm (and so one jitted round) per seed, shared by the tests
    levels = LEVELS_FLOAT32 if jnp.dtype(dtype) == jnp.float32 else LEVELS
    _ALGS[key] = (algorithms.get("fednest", problem=models.hyper_representation_problem("tanh"),
                                 num_clients=M, clients_per_round=4, seed=seed)
                  if fednest else _rafbo(seed, x0, levels)[1])
  alg = _ALGS[key]
  if fednest:
    return alg.make_round(x0), alg.init(x0, y0), data
  return alg.make_round(x0), federated.init_state(x0, y0, alg.optimizer), data


def _numeric(record):
  return {k: v for k, v in record.items()
          if isinstance(v, float) and not k.endswith("_s")}  # wall times differ


class LibraryTest(parameterized.TestCase):

  def _both(self, dtype, rounds_run, poison=(), fednest=False):
    runs = [_seed_run(s, dtype, poison=s in poison, fednest=fednest) for s in SEEDS]
    alone = []
    for rnd, state, data in runs:
      try:
        alone.append(loop.run(rnd, state, data, rounds_run, blowup_factor=None))
      except loop.DivergenceError as e:
        alone.append(str(e))
    key = (fednest, jnp.dtype(dtype).name)
    if key not in _STEPS:  # the seeds' vmapped program, traced and compiled once per configuration
      _STEPS[key] = loop.seeds_step([r for r, _, _ in runs])
    step = _STEPS[key]
    state, records, stopped = loop.run_seeds(
        step, tree.stack([s for _, s, _ in runs]), tree.stack([d for _, _, d in runs]),
        rounds_run,
        eval_fns=[None] * len(SEEDS), blowup_factor=None)
    return alone, (state, records, stopped)

  @parameterized.parameters((np.float64, 4, 1e-10, False), (np.float32, 1, 1e-5, False),
                            (np.float64, 3, 1e-10, True))
  def test_each_seed_is_its_own_run(self, dtype, rounds_run, rtol, fednest):
    with jax.enable_x64(dtype == np.float64):
      alone, (state, records, stopped) = self._both(dtype, rounds_run, fednest=fednest)
    self.assertEqual(stopped, {})
    for i, (final, want) in enumerate(alone):
      self.assertLen(records[i], rounds_run)
      for got_record, want_record in zip(records[i], want):
        self.assertEqual(got_record["round"], want_record["round"])
        chex.assert_trees_all_close(_numeric(got_record), _numeric(want_record), rtol=rtol)
      got = jax.tree.map(lambda a: a[i], state)
      chex.assert_trees_all_close((got.x, got.y, got.v), (final.x, final.y, final.v),
                                  rtol=rtol, atol=rtol)
    # The seeds really differ (a shared seed would pass the comparison above trivially).
    self.assertNotAlmostEqual(records[0][-1]["outer_loss"], records[1][-1]["outer_loss"], 4)

  def test_a_nan_seed_stops_alone(self):
    with jax.enable_x64(True):
      alone, (_, records, stopped) = self._both(np.float64, 3, poison=(3,))
    self.assertEqual(list(stopped), [1])
    self.assertEqual(stopped[1], alone[1])  # the message its own run gives
    self.assertIn("NaN", stopped[1])
    self.assertEqual(records[1], [])
    for i in (0, 2):
      self.assertLen(records[i], 3)
      chex.assert_trees_all_close(_numeric(records[i][-1]), _numeric(alone[i][1][-1]),
                                  rtol=1e-10)

  def test_refuses_rounds_that_cannot_share_a_program(self):
    rnd, _, _ = _seed_run(0, np.float32)
    with self.assertRaisesRegex(ConfigError, "mask_fn"):
      loop.seeds_step([rnd, rnd._replace(seed_constants=True)])
    x0, _ = models.init_mlp(jax.random.key(0), DIN, H, CL)
    other, _ = _rafbo(1, x0, "1/1:0.5,0.5/0.5:0.5")
    with self.assertRaisesRegex(ConfigError, "static shape"):
      loop.seeds_step([rnd, other])
    unbound = rnd._replace(hyper=None, apply=None)  # a round without its per-run values apart
    with self.assertRaisesRegex(ConfigError, "per-run values"):
      loop.seeds_step([unbound, unbound])


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _assert_same_records(test, got, want, rtol):
  test.assertEqual([r["round"] for r in got], [r["round"] for r in want])
  for a, b in zip(got, want):
    chex.assert_trees_all_close(_numeric(a), _numeric(b), rtol=rtol)


_saved_optimizations = None


def setUpModule():
  global _saved_optimizations
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  _saved_optimizations = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _saved_optimizations)


# One pruned level (the driver's default has three; the library tests above batch two strata):
# the driver's batching of the seeds does not depend on the level count, and each level is one
# more client program to compile, in every run of the driver. Two rounds: the runs compare past
# the first round's update (rounding differences grow through the updates).
SETTINGS = dict(rounds=2, eval_every=1, num_clients=10, clients_per_round=4, checkpoint_every=1,
                dataset="digits", hidden=16, levels="0.5/0.5:1")


class DriverTest(absltest.TestCase):

  def test_batched_seeds_write_what_sequential_seeds_write(self):
    root = tempfile.mkdtemp()
    batched, sequential = os.path.join(root, "b"), os.path.join(root, "s")
    code, out, err = _main_out(workdir=batched, seeds=["0", "1"], **SETTINGS)
    self.assertEqual(code, 0, err)
    self.assertIn("2 seeds (2 runs) run as one vmapped program", out)
    code, out, err = _main_out(workdir=sequential, seeds=["0", "1"], batch_seeds=False,
                               **SETTINGS)
    self.assertEqual(code, 0, err)
    self.assertNotIn("vmapped program", out)
    for seed in ("seed_0", "seed_1"):
      for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.npz",
                   "curves.png"):
        self.assertTrue(os.path.exists(os.path.join(batched, seed, name)), (seed, name))
      _assert_same_records(self, _records(os.path.join(batched, seed, "metrics.jsonl")),
                           _records(os.path.join(sequential, seed, "metrics.jsonl")), 1e-4)
    with open(os.path.join(batched, "summary.json"), encoding="utf-8") as f:
      combined = json.load(f)
    self.assertEqual(combined["seeds"], [0, 1])
    self.assertEqual(combined["per_seed"]["1"]["rounds"], SETTINGS["rounds"])

  def test_hyper_cleaning_batches_both_runs_of_every_seed(self):
    root = tempfile.mkdtemp()
    batched, sequential = os.path.join(root, "b"), os.path.join(root, "s")
    settings = dict(SETTINGS, seeds=["0", "1"], baseline_unweighted=True)
    code, out, err = _main_out(hyper_cleaning, workdir=batched, **settings)
    self.assertEqual(code, 0, err)
    self.assertIn("2 seeds (4 runs) run as one vmapped program", out)
    code, out, err = _main_out(hyper_cleaning, workdir=sequential, batch_seeds=False, **settings)
    self.assertEqual(code, 0, err)
    for run in ("seed_0", "seed_1", "seed_0/unweighted", "seed_1/unweighted"):
      _assert_same_records(self, _records(os.path.join(batched, run, "metrics.jsonl")),
                           _records(os.path.join(sequential, run, "metrics.jsonl")), 1e-4)
    for seed in ("seed_0", "seed_1"):  # the seed's summary has the baseline's figures
      with open(os.path.join(batched, seed, "summary.json"), encoding="utf-8") as f:
        self.assertIn("accuracy_gain", json.load(f))

  def test_a_mask_fn_runs_the_seeds_one_after_another(self):
    # fedrolex on hyper-cleaning rolls over each client's own samples with a mask_fn that
    # holds the seed's sample ownership: the seeds cannot share its program.
    root = tempfile.mkdtemp()
    code, out, err = _main_out(hyper_cleaning, workdir=root, seeds=["0", "1"],
                               algorithm="fedrolex", **SETTINGS)
    self.assertEqual(code, 0, err)
    self.assertIn("the seeds run one after another: seeds_step: a round built with a mask_fn",
                  out)

  def test_diagnostics_run_the_seeds_one_after_another(self):
    root = tempfile.mkdtemp()
    # One round: what runs the seeds apart is the flag, not the round count.
    code, out, err = _main_out(workdir=root, seeds=["0", "1"], diagnose_every=1,
                               **dict(SETTINGS, rounds=1))
    self.assertEqual(code, 0, err)
    self.assertIn("the seeds run one after another: --diagnose_every", out)
    self.assertTrue(os.path.exists(os.path.join(root, "summary.json")))


NOOPT = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}  # the subprocesses compile as this module does


@pytest.mark.slow
class KilledBatchTest(absltest.TestCase):

  def test_resume_after_a_kill_between_the_seeds_checkpoints(self):
    # Checkpoints every round, two seeds: the 3rd checkpoint of the process is seed 0's at
    # round 2, so the kill leaves seed 0 at round 2 and seed 1 at round 1. The rerun resumes
    # each seed from its own checkpoint (one after another: their rounds differ).
    root = tempfile.mkdtemp()
    settings = dict(SETTINGS, rounds=3)  # the kill falls between seed 0's last two rounds
    flags_ = [f"--{k}={v}" for k, v in settings.items()] + ["--seeds=0,1", "--noreuse_host_memory"]
    cmd = [sys.executable, "-m", "experiments.hyper_representation"] + flags_
    full, killed = os.path.join(root, "full"), os.path.join(root, "killed")
    for workdir, extra in ((full, {}), (killed, {"BILEVEL_KILL_AFTER_CHECKPOINT": "3"})):
      proc = subprocess.run(cmd + [f"--workdir={workdir}"], env=_env(**extra, **NOOPT), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
      if extra:
        self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr[-2000:])
      else:
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertLen(_records(os.path.join(killed, "seed_0", "metrics.jsonl")), 2)
    self.assertLen(_records(os.path.join(killed, "seed_1", "metrics.jsonl")), 1)
    proc = subprocess.run(cmd + [f"--workdir={killed}"], env=_env(**NOOPT), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("checkpoints are at different rounds (2, 1)", proc.stdout)
    for seed in ("seed_0", "seed_1"):
      _assert_same_records(self, _records(os.path.join(killed, seed, "metrics.jsonl")),
                           _records(os.path.join(full, seed, "metrics.jsonl")), 1e-4)


if __name__ == "__main__":
  absltest.main()
