"""Flags shared by the drivers (each defined here once), config building and the workdir protocol.

Workdir layout (WORKSPACE.md, Results schema): config.json (flags, library versions, device),
metrics.jsonl
(one JSON object per logged round), summary.json (final metrics; written last, so its presence
marks a finished run) and PNG plots.

Algorithms are built only through `bilevel.algorithms.get` (`make_algorithm`): each algorithm
owns its defaults there; a flag given on the command line always wins over them, and a flag left
at its default yields to an algorithm that sets that option itself (`algorithm_options`).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import platform
import signal
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import flags, logging

from bilevel import algorithms, checkpoint, federated, loop, models, sharding
from bilevel.data import DataError
from bilevel.errors import ConfigError
from bilevel.metrics import JsonlWriter, plot_records, to_python, write_json

_LOADED_AT = time.perf_counter()
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, "
                              "summary.json and plots (created if missing).")
# The library's defaults (those of the drivers' default algorithm, rafbo) are the flags'.
_LIB = algorithms.defaults("rafbo")
SEED = flags.DEFINE_integer("seed", _LIB.seed, "The one seed every random stream is derived from.")
QUICK = flags.DEFINE_boolean("quick", False, "A small, fast version of the experiment "
                             "(benchmark, coverage_rate).")
SMOKE = flags.DEFINE_boolean(
    "smoke", False, "Tiny run for tests: a few rounds, small data. Every driver honours it "
    "(hyper_representation, hyper_cleaning: at most 2 rounds, metrics every round, the first 2 "
    "of --seeds; coverage_rate: 2 small Q, 1 seed, at most 2 coverages; benchmark: tiny sizes, "
    "1 rep; tune: 2 grid points). "
    "tests/doc_commands_test.py runs every documented command with it.")
SMOKE_ROUNDS = 2
SMOKE_SEEDS = 2  # --smoke with --seeds runs the first two seeds only
# Test hook: BILEVEL_KILL_AFTER_CHECKPOINT=N makes a driver send itself SIGKILL right after it
# has written its N-th checkpoint of this process (_Recorder), a deterministic kill point
# for the resume tests (WORKSPACE.md, "Runs: checkpoints, resume, errors").
KILL_AFTER_CHECKPOINT_ENV = "BILEVEL_KILL_AFTER_CHECKPOINT"
# BILEVEL_STOP_AFTER_CHECKPOINT=N: SIGSTOP instead, so that a test can SIGKILL it from outside
# at a known point (the process cannot finish first).
STOP_AFTER_CHECKPOINT_ENV = "BILEVEL_STOP_AFTER_CHECKPOINT"

# Federated run flags shared by the task drivers.
ROUNDS = flags.DEFINE_integer("rounds", 200, "Communication rounds Q.")
NUM_CLIENTS = flags.DEFINE_integer("num_clients", 20, "Simulated clients M.")
CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 10, "Clients sampled per round.")
ALGORITHM = flags.DEFINE_enum("algorithm", "rafbo", sorted(algorithms.names()),
                              "Algorithm or baseline (bilevel.algorithms.get; each sets its own "
                              "defaults, docs/method.md, section 7).")
LEVELS = flags.DEFINE_string("levels", "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5",
                             "Resource levels rx/ry:share,... (keep ratios of x and y). Ignored "
                             "by the full-model algorithms (fednest, lfednest, simfbo, memfbo).")
# Shared flag -> (the bilevel.algorithms keyword it sets, help, choices of an enum flag); each
# flag's default is the library's (_LIB), but mask_granularity's: "unit".
_ALGORITHM_FLAGS = {
    "estimator": ("estimator", "Hypergradient estimator: fd, exact, neumann, cg.", None),
    "mask_policy": ("mask_policy", "random, rolling, static, magnitude.", None),
    "mask_granularity": ("granularity", "unit or element.", None),
    "redraw_levels": ("redraw_levels", "Redraw client levels each round.", None),
    "allow_uncovered": ("allow_uncovered", "Accept mask settings that never cover some outer "
                        "units.", None),
    "local_steps": ("local_steps", "Local steps K per round (RAFBO).", None),
    "inner_steps": ("inner_steps", "Inner steps T per local step (fednest: FedNest's local_ep, "
                    "epochs of SVRG steps over each client's train split in batches of "
                    "--batch_size).", None),
    "inner_lr": ("inner_lr", "Inner step size beta.", None),
    "inner_step": ("inner_step", "Inner step rule: cauchy = min(inner_lr, g'g / g'Hg) along the "
                   "inner gradient g (one product per step; holds under label skew, "
                   "docs/method.md section 8), fixed = inner_lr always.", ["cauchy", "fixed"]),
    "outer_lr": ("outer_lr", "Outer (hypergradient) step size alpha.", None),
    "x_trust": ("x_trust", "Trust region on each client's x delta: its norm is capped at "
                "x_trust times the norm of the client's submodel x (per layer, or whole with "
                "--x_trust_scope=model); 0 = off (docs/method.md, section 8).", None),
    "x_trust_scope": ("x_trust_scope", "Where --x_trust measures norms: per layer of x, or all "
                      "of x.", ["layer", "model"]),
    "num_steps": ("num_steps", "v updates / Neumann terms / CG iterations.", None),
    "v_lr": ("v_lr", "Step size eta of the v update and Neumann series (fednest: follows "
             "--outer_lr, FedNest's one step hlr).", None),
    "fednest_neumann": ("fednest_neumann", "fednest's v: code = FedNest's code's closed form "
                        "(per-client counters, never-cleared message list; docs/method.md, "
                        "section 7), series = the Neumann series it intends, averaged on the "
                        "server after every term.", ["code", "series"]),
    "delta": ("delta", "Finite-difference probe length (fd).", None),
    "radius": ("radius", "Optional projection radius for v.", None),
    "v_step": ("v_step", "v update of fd / exact: cauchy = step min(v_lr, r'r / r'Hr) along the "
               "residual r = Hv - grad_y f (cannot diverge; docs/method.md), fixed = v_lr "
               "always.", ["cauchy", "fixed"]),
    "server_lr": ("server_lr", "Server step s on the coverage mean.", None),
    "aggregation": ("aggregation", "coverage or zero_fill (ablation).", None),
}
_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, type(None): flags.DEFINE_float}
for _name, (_option, _help, _choices) in _ALGORITHM_FLAGS.items():
  _default = "unit" if _option == "granularity" else getattr(_LIB, _option)
  if _choices:
    flags.DEFINE_enum(_name, _default, _choices, _help)
  else:
    _DEFINE[type(_default)](_name, _default, _help)
LOCAL_STEPS, INNER_LR, INNER_STEP, V_STEP = (
    flags.FLAGS[n] for n in ("local_steps", "inner_lr", "inner_step", "v_step"))
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Client minibatch size (0 = full batch).")
DATASET = flags.DEFINE_string("dataset", "mnist_embedded",
                              "mnist_embedded, digits, mnist, fashion_mnist, cifar10.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with local dataset files.")
PARTITION = flags.DEFINE_string("partition", "iid", "iid, shards or dirichlet.")
ALPHA = flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration (partition=dirichlet).")
VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.5, "Share of a client's data for f_i.")
EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Log metrics every this many rounds.")
DIAGNOSE_EVERY = flags.DEFINE_integer(
    "diagnose_every", 0, "Every this many rounds (a multiple of --eval_every; 0 = never) record "
    "the true full-model hypergradient of the global problem (inner problem by L-BFGS to "
    "||grad_y G|| <= 1e-5 or 500 steps, linear system by 100 CG steps) and the cosine and "
    "relative error of the round's aggregated estimate against it (diag_* keys), and every "
    "round the cumulative share of never-covered coordinates of x and y.")
SUBMODEL = flags.DEFINE_enum("submodel", "compact", ["compact", "dense"],
                             "Client computation with unit masks: compact (extracted arrays of "
                             "width ceil(r K), stratified sampling) or dense (masked full arrays).")
LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Progress line every this many rounds.")
DEVICES = flags.DEFINE_integer(
    "devices", 1, "Shard each round's clients over this many devices (jax.sharding; 1 = no "
    "sharding, 0 = every device jax.devices() lists). Same numbers up to summation order.")
CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 1, "Split the host CPU into this many JAX devices (jax_num_cpu_devices, set "
    "when the driver starts) so that --devices can shard a round's clients over the cores, "
    "e.g. --cpu_devices=2 --devices=0 on 2 cores (BENCHMARKS.md: 100-client rounds of pruned "
    "clients run faster; small rounds do not). 1 = JAX's single CPU device.")
CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 50, "Write the full run state to WORKDIR/checkpoint.npz every this many "
    "rounds (and after the last); 0 = never.")
RESUME = flags.DEFINE_boolean(
    "resume", True, "Continue from WORKDIR/checkpoint.npz when the workdir's config.json matches "
    "this run's; --noresume starts afresh and overwrites the workdir's results.")

DIVERGENCE_FACTOR = flags.DEFINE_float(
    "divergence_factor", 100.0, "Stop the run as diverged (exit 2, the last checkpoint kept, no "
    "summary.json) when the outer loss or the hypergradient norm exceeds this multiple of its "
    "largest value over rounds 1-10; 0 turns the check off (NaN / inf always stop a run).")

COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Folder of JAX's persistent compilation cache, shared by all of "
    "a user's runs, so a repeated run loads its compiled rounds instead of compiling them "
    "(default: $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/bilevel_jax or "
    "~/.cache/bilevel_jax); 'none' turns the cache off.")

REUSE_HOST_MEMORY = flags.DEFINE_boolean(
    "reuse_host_memory", True, "Keep freed host memory for the next round (glibc mallopt) "
    "instead of page-faulting fresh memory in every round: ~1.35x faster 100-client rounds "
    "on the 2-core CPU (BENCHMARKS.md); no effect on results. CPU runs only: skipped where "
    "JAX may use an accelerator (common.accelerator_possible).")

EVAL_SPLIT = flags.DEFINE_enum(
    "eval_split", "test", ["test", "holdout"], "What test_accuracy is measured on: the test set, "
    "or (for tuning, experiments.tune) a class-stratified --holdout_fraction of the TRAINING "
    "data that is taken away from the clients; the test set is then never read.")
HOLDOUT_FRACTION = flags.DEFINE_float("holdout_fraction", 0.2, "Share of the training data held "
                                      "out with --eval_split=holdout.")

NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "JAX processes of a multi-process run (jax.distributed): 1 = this process "
    "alone; N > 1 with --coordinator_address and --process_id (start one process per host or "
    "device group); 0 = let jax.distributed.initialize() detect the cluster (SLURM, Cloud TPU, "
    "Open MPI, ...). The sampled clients are sharded over every process's devices; process 0 "
    "alone writes the workdir.")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                          "for --num_processes > 1.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's id in 0..num_processes-1.")

SEEDS = flags.DEFINE_list(
    "seeds", None, "Several seeds in one invocation, e.g. 0,1,2,3,4: one run per seed in "
    "WORKDIR/seed_S (exactly what --seed=S --workdir=WORKDIR/seed_S writes) and WORKDIR/"
    "summary.json combining them (mean, std, min and max of every numeric summary figure). "
    "Replaces --seed.")

BATCH_SEEDS = flags.DEFINE_boolean(
    "batch_seeds", True, "Run the seeds of --seeds as one vmapped program (one compiled round "
    "with a leading seed axis; every seed's records, checkpoints and summary as in its own "
    "run) when they share every static shape, one device and no --diagnose_every; else, or "
    "with --nobatch_seeds, one after another (BENCHMARKS.md, seeds).")

# Flags that may differ between a run and its resumption.
_RESUME_FREE_FLAGS = ("resume", "log_every", "workdir", "devices", "cpu_devices",
                      "reuse_host_memory", "seeds", "batch_seeds", "compilation_cache",
                      "num_processes", "coordinator_address", "process_id")


def reuse_host_memory() -> bool:
  """Serve large host allocations from the heap and keep the heap (glibc; False elsewhere).

  By default glibc serves blocks over 32 MiB with a fresh mmap, and XLA:CPU's worker threads
  allocate from per-thread heaps that are unmapped once empty; both are returned to the OS on
  free, so every round page-faults all of its temporary memory anew (about 110,000 faults per
  100-client round here, a third of its wall time; BENCHMARKS.md). mallopt(M_MMAP_MAX, 0) puts
  large blocks on the heap, M_ARENA_MAX 1 keeps every thread on that one heap and a 1 GiB
  M_TRIM_THRESHOLD keeps it mapped when freed, so later rounds reuse the same pages. Call it
  before the threads start (drivers: first thing). Results do not change; resident memory
  stays at its high-water mark.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_arena_max, 1), (m_trim_threshold, 1 << 30)))
  except (OSError, AttributeError):  # not glibc
    return False


def start_driver() -> bool:
  """What every driver does first, before JAX allocates: --reuse_host_memory (returns whether
  it applied), --cpu_devices and --smoke (caps --rounds at SMOKE_ROUNDS, --eval_every 1; set
  as given values, so task defaults do not override them)."""
  if SMOKE.value:
    flags.FLAGS.rounds = min(ROUNDS.value, SMOKE_ROUNDS)
    flags.FLAGS.eval_every = 1
  if CPU_DEVICES.value != 1:
    if CPU_DEVICES.value < 1:
      fail(f"--cpu_devices={CPU_DEVICES.value} must be >= 1.")
    import jax
    try:
      jax.config.update("jax_num_cpu_devices", CPU_DEVICES.value)
    except RuntimeError as e:  # JAX already started in this process
      fail(f"--cpu_devices={CPU_DEVICES.value} must be set before JAX starts: {e}")
  enable_compilation_cache()
  start_distributed()
  return REUSE_HOST_MEMORY.value and not accelerator_possible() and reuse_host_memory()


def accelerator_possible() -> bool:
  """Whether JAX may run on an accelerator in this process, decided without starting its
  backends: JAX_PLATFORMS names a platform other than cpu, or it is unset and an accelerator
  plugin (a `jax_plugins` entry point or package, e.g. jax-cuda12-plugin) or libtpu is
  installed. Host-memory tuning (--reuse_host_memory) is for CPU runs only."""
  import importlib.util
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return any(p != "cpu" for p in platforms)
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def start_distributed() -> None:
  """jax.distributed.initialize for --num_processes != 1 (CPU processes talk through gloo)."""
  if NUM_PROCESSES.value == 1:
    return
  import jax
  problems = []
  if NUM_PROCESSES.value < 0:
    problems.append(f"--num_processes={NUM_PROCESSES.value} must be >= 0.")
  if NUM_PROCESSES.value > 1:
    if not COORDINATOR_ADDRESS.value:
      problems.append(f"--num_processes={NUM_PROCESSES.value} needs --coordinator_address="
                      "HOST:PORT (the address process 0 listens on).")
    if not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
      problems.append(f"--process_id={PROCESS_ID.value} is outside the allowed range "
                      f"[0, {NUM_PROCESSES.value - 1}].")
  if problems:
    fail(" ".join(problems))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if NUM_PROCESSES.value == 0:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=COORDINATOR_ADDRESS.value,
                               num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)


def is_writer() -> bool:
  """True in the one process that writes results (process 0; the only one when not distributed)."""
  import jax
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across the processes of a multi-process run (nothing otherwise)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_age_s() -> float:
  """Seconds since this process started (Linux /proc; else since experiments.common loaded)."""
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime", encoding="ascii") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _LOADED_AT


def default_cache_dir(home: str | None = None) -> str:
  """The drivers' compilation cache folder without --compilation_cache or
  $JAX_COMPILATION_CACHE_DIR: $XDG_CACHE_HOME/bilevel_jax, else HOME/.cache/bilevel_jax
  (home: this user's by default; given, the folder of a process started with HOME=home and
  no XDG_CACHE_HOME)."""
  if home is not None:
    return os.path.join(home, ".cache", "bilevel_jax")
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                      "bilevel_jax")


def compilation_cache_dir() -> str | None:
  """The persistent compilation cache folder of --compilation_cache (None: off)."""
  value = COMPILATION_CACHE.value
  if value is None:
    value = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
  return None if value.lower() == "none" else value


def enable_compilation_cache() -> None:
  """Point JAX's persistent compilation cache at compilation_cache_dir().

  Every program is kept, however short its compilation (min_compile_time 0; the environment's
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides it): besides the rounds, which load in
  about a second instead of compiling for ten, a driver runs some thirty small eager
  programs (parameter initialisation, data placement) whose compilations add up to over a
  second; loaded from the cache they take a fraction of it (BENCHMARKS.md, start-up).
  """
  import jax
  path = compilation_cache_dir()
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    fail(f"--compilation_cache={path}: cannot create the cache folder ({e}); give another "
         "folder or --compilation_cache=none.")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "optax", "flax", "chex", "numpy"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = "missing"
  return out


def device_info() -> dict[str, Any]:
  import jax  # imported late so JAX_PLATFORMS set by a caller takes effect
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "count": len(devices)}


def client_mesh():
  """The client mesh for --devices (None for one device); validated in check_shared_flags."""
  import jax
  if jax.process_count() > 1:  # every process's devices
    return sharding.client_mesh()
  n = DEVICES.value or len(jax.devices())
  return None if n == 1 else sharding.client_mesh(n)


def fail(message: str) -> None:
  """End the program with one clear error paragraph and exit code 2 (no traceback)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def gather(problems: list[str], *checks: Callable[[], Any]) -> list[Any]:
  """Run every check, collecting ConfigError / DataError messages with `problems`; if there are
  any, end the program with all of them in one paragraph; else return the checks' results."""
  results = []
  for check in checks:
    try:
      results.append(check())
    except (ConfigError, DataError) as e:
      problems.append(str(e))
      results.append(None)
  if not WORKDIR.value:
    problems.append("--workdir is required: the directory where results are written.")
  if len(problems) == 1:
    fail(problems[0])
  if problems:
    fail(f"{len(problems)} problems: " + " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
  return results


def require_workdir() -> str:
  if not WORKDIR.value:
    fail("--workdir is required: the directory where results are written.")
  os.makedirs(WORKDIR.value, exist_ok=True)
  return WORKDIR.value


def algorithm_options() -> dict[str, Any]:
  """bilevel.algorithms.get's keywords for --algorithm from the shared flags (_ALGORITHM_FLAGS).

  A flag given on the command line or in a flagfile is passed. A flag left at its default (or
  at a task default, e.g. bilevel.tasks.hyper_cleaning.DEFAULTS) is passed too, unless the algorithm sets
  that option itself (algorithms.own_options: fednest's step sizes, rabo's clients_per_round,
  heterofl's mask_policy, ...): then the algorithm's own default wins. Full-model algorithms
  ignore --levels, as the library does (docs/method.md, section 7).
  """
  own = algorithms.own_options(ALGORITHM.value)
  options = dict(clients_per_round="clients_per_round", levels="levels", seed="seed",
                 **{name: option for name, (option, _, _) in _ALGORITHM_FLAGS.items()})
  return {option: flags.FLAGS[name].value for name, option in options.items()
          if flags.FLAGS[name].present or option not in own}


def make_algorithm(problem: Any, layout: Any, **task: Any) -> algorithms.Algorithm:
  """--algorithm built by bilevel.algorithms.get for --num_clients clients: algorithm_options()
  and the task's keywords (`task`: sample, cost, submodel, mesh, available, mask_fn,
  diagnostics, or an option the task resolves itself, which wins). Raises ConfigError."""
  options = dict(algorithm_options(), **task)
  return algorithms.get(ALGORITHM.value, problem=problem, num_clients=NUM_CLIENTS.value,
                        layout=layout, **options)


def check_shared_flags() -> list[str]:
  """Range problems of the shared flags (all of them, not only the first)."""
  problems = []
  for flag, low in ((ROUNDS, 1), (NUM_CLIENTS, 1), (CLIENTS_PER_ROUND, 1), (EVAL_EVERY, 1),
                    (LOG_EVERY, 1), (BATCH_SIZE, 0), (CHECKPOINT_EVERY, 0)):
    if flag.value < low:
      problems.append(f"--{flag.name}={flag.value} must be >= {low}.")
  if not 0 < VAL_FRACTION.value < 1:
    problems.append(f"--val_fraction={VAL_FRACTION.value} is outside the allowed range (0, 1).")
  if not ALPHA.value > 0:
    problems.append(f"--alpha={ALPHA.value} is outside the allowed range (0, inf).")
  every = DIAGNOSE_EVERY.value
  if every < 0 or (every and EVAL_EVERY.value > 0 and every % EVAL_EVERY.value):
    problems.append(f"--diagnose_every={DIAGNOSE_EVERY.value} must be 0 or a positive multiple "
                    f"of --eval_every={EVAL_EVERY.value} (diagnostics go into logged records).")
  if not 0 < HOLDOUT_FRACTION.value < 1:
    problems.append(f"--holdout_fraction={HOLDOUT_FRACTION.value} is outside the allowed range "
                    "(0, 1).")
  if HIDDEN.value < 1:
    problems.append(f"--hidden={HIDDEN.value} must be >= 1.")
  if DIVERGENCE_FACTOR.value < 0:
    problems.append(f"--divergence_factor={DIVERGENCE_FACTOR.value} must be >= 0 (0 = off).")
  import jax
  available = len(jax.devices())
  if not 0 <= DEVICES.value <= available:
    problems.append(f"--devices={DEVICES.value} is outside the allowed range [0, {available}]: "
                    f"this process sees {available} {jax.devices()[0].platform} device(s).")
  return problems


def config_dict(alg: algorithms.Algorithm) -> dict[str, Any]:
  """alg's resolved configuration for config.json: its name, population and every option with
  a plain value (samplers, layouts, meshes, ... aside), levels as dicts."""
  plain = {k: v for k, v in alg.options._asdict().items()
           if isinstance(v, (type(None), bool, int, float, str))}
  return dict(algorithm=alg.name, num_clients=alg.num_clients, **plain,
              levels=[lv._asdict() for lv in alg.options.levels])


def _config_record(config: Mapping[str, Any]) -> dict[str, Any]:
  flag_values = {f.name: f.value for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
                 if "experiments" in module for f in module_flags}
  return {"config": dict(config), "flags": flag_values, "versions": versions(),
          "device": device_info(), "argv": list(sys.argv)}


def _same_run(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Same resolved config and flags (apart from _RESUME_FREE_FLAGS) and library versions.

  A flag the old record lacks (added to the code since) counts as the same when this run
  leaves it at its default, so a code update that only adds flags does not block resuming.
  """
  new = json.loads(json.dumps(to_python(new)))  # the form it takes once written
  old_flags = old.get("flags", {})
  defaults = json.loads(json.dumps(to_python(
      {k: flags.FLAGS[k].default for k in new["flags"] if k in flags.FLAGS})))
  added_at_default = {k for k, v in new["flags"].items()
                      if k not in old_flags and k in defaults and v == defaults[k]}
  strip = lambda f: {k: v for k, v in f.items()
                     if k not in _RESUME_FREE_FLAGS and k not in added_at_default}
  return (old.get("config") == new["config"] and strip(old_flags) == strip(new["flags"])
          and old.get("versions") == new["versions"])


def start_run(workdir: str, config: Mapping[str, Any]) -> bool:
  """Prepare workdir for this run; return True when it resumes from the workdir's checkpoint.

  Resumes when --resume (default), a checkpoint exists and config.json describes the same run.
  A checkpoint of a different run ends the program with a clear message (nothing is deleted).
  A fresh run removes earlier results first, so nothing stale is mistaken for this run's.
  """
  config_path = os.path.join(workdir, "config.json")
  record = _config_record(config)
  if RESUME.value and checkpoint.exists(workdir):
    try:
      with open(config_path, encoding="utf-8") as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      fail(f"cannot read {config_path} ({e}), which describes the checkpoint in {workdir}. "
           "Use a new --workdir, or pass --noresume to start afresh and overwrite it.")
    if not isinstance(old, dict):
      old = {}
    if _same_run(old, record):
      print(f"resuming from {os.path.join(workdir, checkpoint.FILENAME)}")
      sync(f"start_run {workdir}")  # every process decided before process 0 writes anything
      return True
    fail(f"{workdir} holds a checkpoint of a run with another configuration ({config_path}). "
         "Use a new --workdir, or pass --noresume to start afresh and overwrite it.")
  sync(f"start_run {workdir}")
  if not is_writer():
    return False
  for name in ("summary.json", "metrics.jsonl", checkpoint.FILENAME):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      os.remove(path)
  write_json(config_path, record)
  return False


def read_metrics(path: str, up_to_round: int) -> list[dict[str, Any]]:
  """Records of metrics.jsonl with round <= up_to_round; a torn last line is dropped.

  The file is rewritten (atomically) to exactly those records, so appending continues cleanly.
  """
  records, lines = [], []
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          break  # a line torn by a kill: it and anything after it are recomputed
        if not line.endswith("\n") or record.get("round", up_to_round + 1) > up_to_round:
          break
        records.append(record)
        lines.append(line)
  if is_writer():
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, path)
  return records


def diagnose_fn(problem, data: federated.FederatedData):
  """(state, estimate) -> diag figures: bilevel.diagnostics on the clients' stacked data."""
  import jax
  from bilevel import diagnostics

  @jax.jit
  def diagnose(state, estimate):
    true = diagnostics.true_hypergradient(problem, state.x, state.y, data.inner, data.outer)
    return dict(diagnostics.estimate_quality(estimate, true.hypergrad),
                inner_grad_norm=true.inner_grad_norm, inner_steps=true.inner_steps,
                cg_residual=true.cg_residual)

  return diagnose


class _Recorder:
  """One run's side of the run loop: resuming from its checkpoint, streaming its records to
  metrics.jsonl, checkpointing (with the kill / stop test hooks) and the final plot."""

  def __init__(self, workdir: str, state: federated.ServerState, resume: bool):
    self.workdir, self.earlier, self.totals, self.wall_offset = workdir, [], None, 0.0
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    if resume:
      try:
        state, meta = checkpoint.restore(workdir, state)
      except checkpoint.CheckpointError as e:
        fail(str(e))
      self.earlier = read_metrics(self.metrics_path, meta["round"])
      self.totals, self.wall_offset = meta["totals"], meta["wall_time_s"]
    self.state, self.elapsed = state, self.wall_offset
    self.writer = JsonlWriter(self.metrics_path) if is_writer() else None
    self.run_start_age = process_age_s()  # start-up before the first round: imports, data, setup

  def on_record(self, record: dict[str, Any]) -> None:
    record["wall_time_s"] += self.wall_offset
    record["time_to_first_round_s"] = self.run_start_age + record["first_round_s"]
    self.elapsed = record["wall_time_s"]
    if self.writer is not None:
      self.writer(record)

  def on_checkpoint(self, state: federated.ServerState, totals: dict[str, Any], done: int) -> None:
    if is_writer():
      checkpoint.save(self.workdir, state, {"round": done, "totals": totals,
                                            "wall_time_s": self.elapsed})
    _CHECKPOINTS_SAVED[0] += 1
    saved = _CHECKPOINTS_SAVED[0]
    if saved == int(os.environ.get(KILL_AFTER_CHECKPOINT_ENV, "0") or 0):
      os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like `kill -9`
    if saved == int(os.environ.get(STOP_AFTER_CHECKPOINT_ENV, "0") or 0):
      os.kill(os.getpid(), signal.SIGSTOP)  # test hook: wait to be killed

  def close(self, records: list[dict[str, Any]], title: str, plot: bool = True
            ) -> list[dict[str, Any]]:
    """Close metrics.jsonl and (plot) draw every record of the run, earlier ones included (a
    run that stopped, or was never started, is not drawn); return the records."""
    if self.writer is not None:
      self.writer.close()
    records = self.earlier + records
    if plot and is_writer() and records:
      plot_records(records, os.path.join(self.workdir, "curves.png"), title)
    return records


# Checkpoints this process has written (the test hooks count them across seeds).
_CHECKPOINTS_SAVED = [0]


def _loop_flags() -> dict[str, Any]:
  """loop.run's keywords from the shared flags (every run of a driver alike)."""
  return dict(num_rounds=ROUNDS.value, eval_every=EVAL_EVERY.value, log=logging.info,
              log_every=LOG_EVERY.value, checkpoint_every=CHECKPOINT_EVERY.value,
              blowup_factor=DIVERGENCE_FACTOR.value)


class SeedRun(NamedTuple):
  """One seed's run, prepared by a driver (its prepare_one) and not yet started: the round, the
  state, data and evaluation, and `finish(records) -> summary` (writes summary.json, prints)."""

  workdir: str
  rnd: federated.Round
  state: federated.ServerState
  data: federated.FederatedData
  eval_fn: Callable[[federated.ServerState], Mapping[str, Any]]
  title: str
  resume: bool
  finish: Callable[[list[dict[str, Any]]], dict[str, Any]]
  problem: Any = None  # the task's BilevelProblem, for --diagnose_every (rnd built to diagnose)


def run_prepared(runs: SeedRun | Sequence[SeedRun]) -> dict[str, Any]:
  """Run (or resume) a prepared seed's runs in order, each streaming its records to
  metrics.jsonl and checkpointing, then its finish (given every record of the run, earlier
  ones included); returns the last one's summary."""
  summary = {}
  for run in [runs] if isinstance(runs, SeedRun) else runs:
    rec = _Recorder(run.workdir, run.state, run.resume)
    data, state = sharding.replicate((run.data, rec.state), client_mesh())  # once, not per round
    try:
      _, records = loop.run(
          run.rnd, state, data, eval_fn=run.eval_fn, on_record=rec.on_record,
          start_totals=rec.totals, on_checkpoint=rec.on_checkpoint,
          diagnose_fn=diagnose_fn(run.problem, data) if DIAGNOSE_EVERY.value else None,
          diagnose_every=DIAGNOSE_EVERY.value, **_loop_flags())
    except loop.DivergenceError as e:
      rec.close([], run.title, plot=False)
      fail(str(e))
    summary = run.finish(rec.close(records, run.title))
  return summary


def run_seeds_batched(groups: Sequence[Sequence[SeedRun]]
                      ) -> tuple[dict[int, dict[str, Any]], dict[int, str]] | None:
  """Run prepared seeds as one vmapped program (loop.seeds_step, loop.run_seeds): each run
  keeps its own records, checkpoints, guards and summary in its own workdir, as if run alone.

  groups: per seed, its runs (one, or e.g. hyper_cleaning's weighted run and its unweighted
  baseline); all runs of all seeds share the program. A seed's runs finish in order once the
  rounds are done; its summary is the last one's finish.
  Returns ({seed index: summary}, {seed index: error of a run of it that stopped}), or None
  (with the reason printed) when the runs cannot share one program: a static shape differs,
  a mask_fn, or resumed checkpoints at different rounds. Nothing has run
  then; the caller runs the seeds one after another.
  """
  from bilevel import tree
  runs = [run for group in groups for run in group]
  recorders = [_Recorder(r.workdir, r.state, r.resume) for r in runs]
  states = [rec.state for rec in recorders]
  reason = None
  if any(tree.signature((s, r.data)) != tree.signature((states[0], runs[0].data))
         for s, r in zip(states, runs)):
    reason = "their data or parameters differ in shape (e.g. a non-IID partition)"
  elif len({int(s.round) for s in states}) > 1:
    reason = (f"their checkpoints are at different rounds "
              f"({', '.join(str(int(s.round)) for s in states)})")
  if reason is None:
    try:
      step = loop.seeds_step([r.rnd for r in runs])
    except ConfigError as e:
      reason = str(e)
  if reason is not None:
    for rec, run in zip(recorders, runs):
      rec.close([], run.title, plot=False)
    print(f"the seeds run one after another: {reason}.", flush=True)
    return None
  state, data = tree.stack(states), tree.stack([r.data for r in runs])
  print(f"{len(groups)} seeds ({len(runs)} runs) run as one vmapped program (--batch_seeds).",
        flush=True)
  _, records, stopped = loop.run_seeds(
      step, state, data, eval_fns=[r.eval_fn for r in runs],
      on_record=[rec.on_record for rec in recorders],
      start_totals=[rec.totals for rec in recorders],
      on_checkpoint=[rec.on_checkpoint for rec in recorders], **_loop_flags())
  summaries, seed_errors, i = {}, {}, 0
  for g, group in enumerate(groups):
    for run in group:
      recs = recorders[i].close(records[i], run.title, plot=i not in stopped)
      if i in stopped:
        print(f"error: {run.workdir}: {stopped[i]}", file=sys.stderr)
        seed_errors.setdefault(g, stopped[i])
      elif g not in seed_errors:  # a seed's later runs may build on its earlier ones
        summaries[g] = run.finish(recs)
      i += 1
    if g in seed_errors:
      summaries.pop(g, None)
  return summaries, seed_errors


def run_summary(task: str, last: Mapping[str, Any], *keys: str) -> dict[str, Any]:
  """A run's summary from its last record: what every task reports, and `keys` of the record."""
  return dict(
      task=task, algorithm=ALGORITHM.value, rounds=last["round"],
      wall_time_s=last["wall_time_s"], first_round_s=last["first_round_s"],
      time_to_first_round_s=last["time_to_first_round_s"], min_coverage_x=last["cx_star"],
      min_coverage_y=last["cy_star"], final_outer_loss=last["outer_loss"],
      final_inner_loss=last["inner_loss"], final_hypergrad_norm=last["hypergrad_norm"],
      **{k: last[k] for k in ("test_accuracy", "test_loss", "cumulative_client_flops",
                              "cumulative_comm_bytes") + keys})


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  if is_writer():
    write_json(os.path.join(workdir, "summary.json"), summary)


def load_data():
  """--dataset from --data_dir; with --eval_split=holdout its holdout split (data.holdout_split,
  seeded by --seed) in place of the test set."""
  from bilevel import data as data_lib
  ds = data_lib.load_dataset(DATASET.value, DATA_DIR.value, seed=SEED.value)
  if EVAL_SPLIT.value == "test":
    return ds
  return data_lib.holdout_split(ds, HOLDOUT_FRACTION.value, SEED.value)


def parse_seeds() -> list[int] | None:
  """--seeds as distinct integers >= 0 in the given order (None without --seeds)."""
  if not SEEDS.value:
    return None
  try:
    seeds = [int(s) for s in SEEDS.value]
  except ValueError:
    fail(f"--seeds={','.join(SEEDS.value)} must be a comma-separated list of integers.")
  if min(seeds) < 0 or len(set(seeds)) != len(seeds):
    fail(f"--seeds={','.join(SEEDS.value)} must be distinct integers >= 0.")
  return seeds


def combine_summaries(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
  """One summary over seeds: mean, std (sample, ddof 1; 0 for one seed), min and max of every
  numeric figure that every seed has; text fields shared by all seeds; each seed's summary."""
  import numpy as np
  first = next(iter(summaries.values()))
  numeric = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and all(isinstance(s.get(k), (int, float)) for s in summaries.values())]
  stats = {name: {} for name in ("mean", "std", "min", "max")}
  for k in numeric:
    values = np.array([float(s[k]) for s in summaries.values()])
    stats["mean"][k] = float(values.mean())
    stats["std"][k] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    stats["min"][k], stats["max"][k] = float(values.min()), float(values.max())
  shared = {k: v for k, v in first.items() if k not in numeric and
            all(s.get(k) == v for s in summaries.values())}
  return dict(shared, seeds=list(summaries), num_seeds=len(summaries), **stats,
              per_seed={str(s): dict(v) for s, v in summaries.items()})


def for_each_seed(prepare_one: Callable[[], SeedRun | Sequence[SeedRun]]) -> None:
  """Run --seed, or each --seeds value into WORKDIR/seed_S, then write the combined summary
  (combine_summaries) to WORKDIR/summary.json and print its mean +- std.

  prepare_one reads the seed and the workdir from the flags and returns its runs, prepared and
  not started (a SeedRun, or the seed's runs in the order they finish; run_prepared runs them).
  --batch_seeds runs the seeds as one vmapped program (run_seeds_batched); where they cannot
  share one, the seeds run one after another.
  """
  seeds = parse_seeds()
  run_one = lambda: run_prepared(prepare_one())
  if seeds is None:
    run_one()
    return
  if SMOKE.value:
    seeds = seeds[:SMOKE_SEEDS]
  root = require_workdir()
  stale = os.path.join(root, "summary.json")
  if os.path.exists(stale) and is_writer():
    os.remove(stale)  # written again once every seed has finished
  seed_dir = lambda seed: os.path.join(root, f"seed_{seed}")
  batched = None
  if _batchable(len(seeds)):
    groups = []
    for seed in seeds:
      flags.FLAGS.seed, flags.FLAGS.workdir = seed, seed_dir(seed)
      prepared = prepare_one()
      groups.append([prepared] if isinstance(prepared, SeedRun) else list(prepared))
    batched = run_seeds_batched(groups)
  if batched is not None:
    summaries = {seeds[i]: v for i, v in batched[0].items()}
    stopped = [seeds[i] for i in sorted(batched[1])]
  else:
    summaries, stopped = {}, []
    for i, seed in enumerate(seeds):
      flags.FLAGS.seed, flags.FLAGS.workdir = seed, seed_dir(seed)
      print(f"=== seed {seed} ({i + 1} of {len(seeds)}): {WORKDIR.value}", flush=True)
      try:
        summaries[seed] = run_one()
      except SystemExit as e:
        # A run that started and then stopped (e.g. diverged) does not stop the other seeds;
        # a configuration error (nothing run yet) would stop every seed alike: end at once.
        if not e.code or not os.path.exists(os.path.join(WORKDIR.value, "metrics.jsonl")):
          raise
        stopped.append(seed)
  flags.FLAGS.workdir = root
  if stopped:
    fail(f"seeds {','.join(map(str, stopped))} of {','.join(map(str, seeds))} stopped (their "
         f"errors are above); the finished seeds' results are in {root}/seed_S. No combined "
         "summary.json was written.")
  combined = combine_summaries(summaries)
  write_summary(root, combined)
  print(f"over seeds {','.join(map(str, seeds))} (mean +- std, min .. max):")
  for k, mean in combined["mean"].items():
    print(f"  {k:<28} {mean:.4g} +- {combined['std'][k]:.2g}  "
          f"({combined['min'][k]:.4g} .. {combined['max'][k]:.4g})")


def _batchable(num_seeds: int) -> bool:
  """Whether --seeds may run as one vmapped program here (the flags' side of it; the seeds'
  shapes are checked once they are built): --batch_seeds, several seeds, one device of one
  process (the client mesh does not take a seed axis) and no --diagnose_every."""
  if not BATCH_SEEDS.value or num_seeds < 2:
    return False
  reasons = [why for why, bad in (
      ("--devices / a multi-process run shard the clients", client_mesh() is not None),
      ("--diagnose_every computes per-seed diagnostics", DIAGNOSE_EVERY.value > 0)) if bad]
  if reasons:
    print(f"the seeds run one after another: {'; '.join(reasons)}.", flush=True)
  return not reasons


def print_final(summary: Mapping[str, Any]) -> None:
  """A run's summary as the final table (figures that are None left out)."""
  print("final:")
  print_table({k: v for k, v in summary.items() if v is not None})


def print_table(rows: Mapping[str, Any]) -> None:
  width = max(len(k) for k in rows)
  for k, v in rows.items():
    print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


# ------------------------------------------------------------------ model flags
# One name for one thing in every driver (issue 16): the MLP's width and activation, read by
# hyper_representation (--model=mlp), hyper_cleaning (--classifier=mlp; its task.DEFAULTS set
# hidden 100) and the benchmark (hidden only).

HIDDEN = flags.DEFINE_integer(
    "hidden", 200, "Hidden units of the MLP (hyper_representation's representation layer, "
    "hyper_cleaning's --classifier=mlp: default 100 there, the benchmark's MLP).")
ACTIVATION = flags.DEFINE_enum(
    "activation", "relu", sorted(models.ACTIVATIONS), "Activation of the hidden layer "
    "(hyper_representation: MLP and CNN; hyper_cleaning: --classifier=mlp).")

# The algorithms a multi-algorithm driver runs (one flag for both; each has its own default).
ALGORITHM_LIST = flags.DEFINE_list(
    "algorithms", None, "Algorithms to run (coverage_rate: default rabo,rafbo; "
    "time_to_accuracy: default rafbo,fednest).")


# Flags passed on to the driver processes a driver starts (one flag for tune and
# time_to_accuracy).
DRIVER_FLAGS = flags.DEFINE_list(
    "driver_flags", [], "Further flags passed to every driver process this one starts (tune: "
    "every grid point's run, e.g. --driver_flags=--num_clients=100,--partition=shards; "
    "time_to_accuracy: every timed RAFBO / FedNest run, e.g. --driver_flags=--submodel=dense).")


def algorithm_list(default: Sequence[str]) -> list[str]:
  """--algorithms if given, else the driver's default."""
  return list(ALGORITHM_LIST.value if ALGORITHM_LIST.value is not None else default)
