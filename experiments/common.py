"""What the drivers share: flags (each defined here once), the algorithm built from them, the
workdir protocol (config.json, resume, metrics.jsonl, summary.json; WORKSPACE.md, Results
schema), seeds (one after another or as one vmapped program) and the process start (host
memory, CPU devices, compilation cache, jax.distributed).

Algorithms are built only through `bilevel.algorithms.get` (`make_algorithm`): a flag given on
the command line wins over the algorithm's own defaults; a flag left at its default yields to an
algorithm that sets that option itself (algorithms.own_options).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import flags, logging

from bilevel import algorithms, checkpoint, federated, loop, models, sharding, tree
from bilevel.data import DataError
from bilevel.errors import ConfigError
from bilevel.metrics import JsonlWriter, plot_records, to_python, write_json

_LOADED_AT = time.perf_counter()
_LIB = algorithms.defaults("rafbo")  # the flags' defaults: the drivers' default algorithm's
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, "
                              "summary.json and plots (created if missing).")
SEED = flags.DEFINE_integer("seed", _LIB.seed, "The one seed every random stream is derived from.")
QUICK = flags.DEFINE_boolean("quick", False, "A small, fast version of the experiment "
                             "(benchmark, coverage_rate).")
SMOKE = flags.DEFINE_boolean(
    "smoke", False, "Tiny run for tests, honoured by every driver (task drivers: at most 2 "
    "rounds, metrics every round, the first 2 of --seeds; elsewhere tiny sizes, 1 seed or rep, "
    "2 grid points): tests/doc_commands_test.py runs every documented command with it.")
SMOKE_ROUNDS, SMOKE_SEEDS = 2, 2
# Test hooks (tests/reliability_test.py): SIGKILL, or SIGSTOP (to be killed from outside), right
# after this process's N-th checkpoint.
KILL_AFTER_CHECKPOINT_ENV = "BILEVEL_KILL_AFTER_CHECKPOINT"
STOP_AFTER_CHECKPOINT_ENV = "BILEVEL_STOP_AFTER_CHECKPOINT"

ROUNDS = flags.DEFINE_integer("rounds", 200, "Communication rounds Q.")
NUM_CLIENTS = flags.DEFINE_integer("num_clients", 20, "Simulated clients M.")
CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 10, "Clients sampled per round.")
ALGORITHM = flags.DEFINE_enum("algorithm", "rafbo", sorted(algorithms.names()),
                              "Algorithm or baseline (bilevel.algorithms.get; each sets its own "
                              "defaults, docs/method.md, section 7).")
LEVELS = flags.DEFINE_string("levels", "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5",
                             "Resource levels rx/ry:share,... (keep ratios of x and y). Ignored "
                             "by the full-model algorithms (fednest, lfednest, simfbo, memfbo).")
# Flag -> (the base.Options field it sets, help, choices of an enum flag); the defaults are the
# library's (_LIB), but mask_granularity's: "unit".
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
    "the cosine and relative error of the round's aggregated estimate against the true "
    "full-model hypergradient (diag_* keys; docs/method.md, section 11), and every round the "
    "share of never-covered coordinates of x and y.")
SUBMODEL = flags.DEFINE_enum("submodel", "compact", ["compact", "dense"],
                             "Client computation with unit masks: compact (extracted arrays of "
                             "width ceil(r K), stratified sampling) or dense (masked full arrays).")
LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Progress line every this many rounds.")
DEVICES = flags.DEFINE_integer(
    "devices", 1, "Shard each round's clients over this many devices (jax.sharding; 1 = no "
    "sharding, 0 = every device jax.devices() lists). Same numbers up to summation order.")
CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 1, "Split the host CPU into this many JAX devices for --devices to shard "
    "over, e.g. --cpu_devices=2 --devices=0 on 2 cores (BENCHMARKS.md); 1 = one CPU device.")
CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 50, "Write the full run state to WORKDIR/checkpoint.npz every this many "
    "rounds (and after the last); 0 = never.")
RESUME = flags.DEFINE_boolean(
    "resume", True, "Continue from WORKDIR/checkpoint.npz when the workdir's config.json matches "
    "this run's; --noresume starts afresh and overwrites the workdir's results.")
DIVERGENCE_FACTOR = flags.DEFINE_float(
    "divergence_factor", 100.0, "Stop the run as diverged (exit 2, the last checkpoint kept, no "
    "summary.json) when the outer loss or the hypergradient norm exceeds this multiple of its "
    "median over rounds 1-10; 0 turns the check off (NaN / inf always stop a run).")
COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Folder of JAX's persistent compilation cache (default: "
    "$JAX_COMPILATION_CACHE_DIR, else default_cache_dir()); 'none' turns the cache off.")
REUSE_HOST_MEMORY = flags.DEFINE_boolean(
    "reuse_host_memory", True, "Keep freed host memory for the next round (glibc mallopt; "
    "faster rounds, same results; BENCHMARKS.md). CPU runs only (accelerator_possible).")
EVAL_SPLIT = flags.DEFINE_enum(
    "eval_split", "test", ["test", "holdout"], "What test_accuracy is measured on: the test set, "
    "or (tuning) a class-stratified --holdout_fraction of the training data, taken from the "
    "clients; the test set is then never read.")
HOLDOUT_FRACTION = flags.DEFINE_float("holdout_fraction", 0.2, "Share of the training data held "
                                      "out with --eval_split=holdout.")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "JAX processes of a multi-process run (jax.distributed; the clients "
    "sharded over all, process 0 writes): 1 = this one; N > 1 with --coordinator_address and "
    "--process_id; 0 = detected (SLURM, Cloud TPU, Open MPI, ...).")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                          "for --num_processes > 1.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's id in 0..num_processes-1.")
SEEDS = flags.DEFINE_list(
    "seeds", None, "Several seeds, e.g. 0,1,2, in place of --seed: WORKDIR/seed_S as --seed=S "
    "--workdir=WORKDIR/seed_S writes it, and WORKDIR/summary.json combining them (mean, std, "
    "min, max of every numeric figure).")
BATCH_SEEDS = flags.DEFINE_boolean(
    "batch_seeds", True, "Run the seeds of --seeds as one vmapped program (each seed's records, "
    "checkpoints and summary as in its own run) when they share every static shape, one device "
    "and no --diagnose_every; else, or with --nobatch_seeds, one after another.")
HIDDEN = flags.DEFINE_integer(
    "hidden", 200, "Hidden units of the MLP (hyper_representation's representation layer, "
    "hyper_cleaning's --classifier=mlp: default 100 there, the benchmark's MLP).")
ACTIVATION = flags.DEFINE_enum(
    "activation", "relu", sorted(models.ACTIVATIONS), "Activation of the hidden layer "
    "(hyper_representation: MLP and CNN; hyper_cleaning: --classifier=mlp).")
ALGORITHM_LIST = flags.DEFINE_list(
    "algorithms", None, "Algorithms to run (coverage_rate: default rabo,rafbo; "
    "time_to_accuracy: default rafbo,fednest).")
DRIVER_FLAGS = flags.DEFINE_list(
    "driver_flags", [], "Further flags for every driver process this one starts (tune's grid "
    "points, time_to_accuracy's runs), e.g. --driver_flags=--num_clients=100,--partition=shards.")

# Flags that may differ between a run and its resumption.
_RESUME_FREE_FLAGS = ("resume", "log_every", "workdir", "devices", "cpu_devices",
                      "reuse_host_memory", "seeds", "batch_seeds", "compilation_cache",
                      "num_processes", "coordinator_address", "process_id")


# ------------------------------------------------------------------ process start

_FLAG_DEFAULTS: dict[str, Any] = {}  # flag -> its own default, for flags a task's defaults set


def start_driver(defaults: Mapping[str, Any] | None = None) -> bool:
  """What every driver does first, before JAX allocates. `defaults`: the task's defaults of
  shared flags (flag defaults: a flag given or set in code keeps its value). Then --smoke (caps
  --rounds, --eval_every 1, as given values), --cpu_devices, the compilation cache,
  jax.distributed and --reuse_host_memory (returns whether it applied)."""
  # A process that runs several drivers (the tests) starts each from the flags' own defaults.
  for name, value in _FLAG_DEFAULTS.items():
    flags.FLAGS.set_default(name, value)
  for name, value in (defaults or {}).items():
    _FLAG_DEFAULTS.setdefault(name, flags.FLAGS[name].default)
    flags.FLAGS.set_default(name, value)
  if SMOKE.value:
    flags.FLAGS.rounds = min(ROUNDS.value, SMOKE_ROUNDS)
    flags.FLAGS.eval_every = 1
  import jax
  if CPU_DEVICES.value != 1:
    if CPU_DEVICES.value < 1:
      fail(f"--cpu_devices={CPU_DEVICES.value} must be >= 1.")
    try:
      jax.config.update("jax_num_cpu_devices", CPU_DEVICES.value)
    except RuntimeError as e:  # JAX already started in this process
      fail(f"--cpu_devices={CPU_DEVICES.value} must be set before JAX starts: {e}")
  cache = compilation_cache_dir()
  if cache is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    try:
      os.makedirs(cache, exist_ok=True)
    except OSError as e:
      fail(f"--compilation_cache={cache}: cannot create the cache folder ({e}); give another "
           "folder or --compilation_cache=none.")
    jax.config.update("jax_compilation_cache_dir", cache)
    # Every program is kept, the thirty small eager ones of a start-up too (BENCHMARKS.md).
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
  start_distributed()
  return REUSE_HOST_MEMORY.value and not accelerator_possible() and reuse_host_memory()


def reuse_host_memory() -> bool:
  """Keep freed host memory mapped for the next round (glibc mallopt; False elsewhere): large
  blocks on the heap (no mmap), a 1 GiB trim threshold and one malloc arena per core. Without
  it every round page-faults all its temporaries anew (BENCHMARKS.md, host memory). Results do
  not change. One arena for every thread (M_ARENA_MAX 1) made XLA compile the config-A round
  in 9.9 s instead of 6.2 s; glibc's default (8 per core) made the 100-client rounds of
  `experiments.benchmark` ~20 % slower."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_arena_max, os.cpu_count() or 1), (m_trim_threshold, 1 << 30)))
  except (OSError, AttributeError):  # not glibc
    return False


def accelerator_possible() -> bool:
  """Whether JAX may run on an accelerator here, without starting it: JAX_PLATFORMS names a
  platform other than cpu, or it is unset and an accelerator plugin or libtpu is installed."""
  platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return any(p != "cpu" for p in platforms)
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def start_distributed() -> None:
  """jax.distributed.initialize for --num_processes != 1 (CPU processes talk through gloo)."""
  n, pid = NUM_PROCESSES.value, PROCESS_ID.value
  if n == 1:
    return
  problems = [f"--num_processes={n} must be >= 0."] if n < 0 else []
  if n > 1 and not COORDINATOR_ADDRESS.value:
    problems.append(f"--num_processes={n} needs --coordinator_address=HOST:PORT (the address "
                    "process 0 listens on).")
  if n > 1 and not 0 <= pid < n:
    problems.append(f"--process_id={pid} is outside the allowed range [0, {n - 1}].")
  if problems:
    fail(" ".join(problems))
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if n == 0:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=COORDINATOR_ADDRESS.value, num_processes=n,
                               process_id=pid)


def is_writer() -> bool:
  """True in the one process that writes results (process 0)."""
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
  """The compilation cache folder without --compilation_cache or $JAX_COMPILATION_CACHE_DIR:
  $XDG_CACHE_HOME/bilevel_jax, else ~/.cache/bilevel_jax (home given: HOME=home, no XDG)."""
  if home is not None:
    return os.path.join(home, ".cache", "bilevel_jax")
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                      "bilevel_jax")


def compilation_cache_dir() -> str | None:
  """The persistent compilation cache folder of --compilation_cache (None: off)."""
  value = (COMPILATION_CACHE.value or os.environ.get("JAX_COMPILATION_CACHE_DIR")
           or default_cache_dir())
  return None if value.lower() == "none" else value


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
  """The client mesh for --devices or a multi-process run (None for one device)."""
  import jax
  if jax.process_count() > 1:  # every process's devices
    return sharding.client_mesh()
  n = DEVICES.value or len(jax.devices())
  return None if n == 1 else sharding.client_mesh(n)


# ------------------------------------------------------------------ flags -> configuration

def fail(message: str) -> None:
  """End the program with one clear error paragraph and exit code 2 (no traceback)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def gather(problems: list[str], *checks: Callable[[], Any]) -> list[Any]:
  """Run every check, collecting ConfigError / DataError messages with `problems` (and a missing
  --workdir); end the program with all of them in one paragraph, else return the results."""
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


def make_algorithm(problem: Any, layout: Any, **task: Any) -> algorithms.Algorithm:
  """--algorithm by bilevel.algorithms.get for --num_clients clients: every shared algorithm flag
  that is given, or at its default where the algorithm has no default of its own, and the
  task's keywords (sample, cost, submodel, mesh, ...; they win). Raises ConfigError."""
  own = algorithms.own_options(ALGORITHM.value)
  names = dict(clients_per_round="clients_per_round", levels="levels", seed="seed",
               **{name: option for name, (option, _, _) in _ALGORITHM_FLAGS.items()})
  options = {option: flags.FLAGS[name].value for name, option in names.items()
             if flags.FLAGS[name].present or option not in own}
  return algorithms.get(ALGORITHM.value, problem=problem, num_clients=NUM_CLIENTS.value,
                        layout=layout, **dict(options, **task))


def check_shared_flags() -> list[str]:
  """Range problems of the shared flags (all of them, not only the first)."""
  problems = [f"--{f.name}={f.value} must be >= {low}." for f, low in (
      (ROUNDS, 1), (NUM_CLIENTS, 1), (CLIENTS_PER_ROUND, 1), (EVAL_EVERY, 1), (LOG_EVERY, 1),
      (BATCH_SIZE, 0), (CHECKPOINT_EVERY, 0), (HIDDEN, 1)) if f.value < low]
  for f in (VAL_FRACTION, HOLDOUT_FRACTION):
    if not 0 < f.value < 1:
      problems.append(f"--{f.name}={f.value} is outside the allowed range (0, 1).")
  if not ALPHA.value > 0:
    problems.append(f"--alpha={ALPHA.value} is outside the allowed range (0, inf).")
  every = DIAGNOSE_EVERY.value
  if every < 0 or (every and EVAL_EVERY.value > 0 and every % EVAL_EVERY.value):
    problems.append(f"--diagnose_every={every} must be 0 or a positive multiple of "
                    f"--eval_every={EVAL_EVERY.value} (diagnostics go into logged records).")
  if DIVERGENCE_FACTOR.value < 0:
    problems.append(f"--divergence_factor={DIVERGENCE_FACTOR.value} must be >= 0 (0 = off).")
  import jax
  available = len(jax.devices())
  if not 0 <= DEVICES.value <= available:
    problems.append(f"--devices={DEVICES.value} is outside the allowed range [0, {available}]: "
                    f"this process sees {available} {jax.devices()[0].platform} device(s).")
  return problems


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


def algorithm_list(default: Sequence[str]) -> list[str]:
  """--algorithms if given, else the driver's default."""
  return list(ALGORITHM_LIST.value if ALGORITHM_LIST.value is not None else default)


# ------------------------------------------------------------------ workdir protocol

def config_dict(alg: algorithms.Algorithm) -> dict[str, Any]:
  """alg's resolved configuration for config.json: its name, population, every option with a
  plain value and its levels."""
  plain = {k: v for k, v in alg.options._asdict().items()
           if isinstance(v, (type(None), bool, int, float, str))}
  return dict(algorithm=alg.name, num_clients=alg.num_clients, **plain,
              levels=[lv._asdict() for lv in alg.options.levels])


def _same_run(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Same config, versions and flags apart from _RESUME_FREE_FLAGS; a flag the old record lacks
  (added to the code since) counts as the same when this run leaves it at its default."""
  new, old_flags = json.loads(json.dumps(to_python(new))), old.get("flags", {})
  defaults = json.loads(json.dumps(to_python(
      {k: flags.FLAGS[k].default for k in new["flags"] if k in flags.FLAGS})))
  skip = set(_RESUME_FREE_FLAGS) | {k for k, v in new["flags"].items()
                                    if k not in old_flags and k in defaults and v == defaults[k]}
  strip = lambda f: {k: v for k, v in f.items() if k not in skip}
  return (old.get("config") == new["config"] and strip(old_flags) == strip(new["flags"])
          and old.get("versions") == new["versions"])


def start_run(workdir: str, config: Mapping[str, Any]) -> bool:
  """Prepare workdir for this run; True when it resumes from the workdir's checkpoint (--resume,
  a checkpoint and a config.json of the same run). A checkpoint of another run ends the program
  (nothing deleted); a fresh run removes earlier results first and writes config.json."""
  config_path = os.path.join(workdir, "config.json")
  flag_values = {f.name: f.value for module, module_flags in
                 flags.FLAGS.flags_by_module_dict().items() if "experiments" in module
                 for f in module_flags}
  record = {"config": dict(config), "flags": flag_values, "versions": versions(),
            "device": device_info(), "argv": list(sys.argv)}
  again = "Use a new --workdir, or pass --noresume to start afresh and overwrite it."
  if RESUME.value and checkpoint.exists(workdir):
    try:
      with open(config_path, encoding="utf-8") as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      fail(f"cannot read {config_path} ({e}), which describes the checkpoint in {workdir}. {again}")
    if not _same_run(old if isinstance(old, dict) else {}, record):
      fail(f"{workdir} holds a checkpoint of a run with another configuration ({config_path}). "
           + again)
    print(f"resuming from {os.path.join(workdir, checkpoint.FILENAME)}")
    sync(f"start_run {workdir}")  # every process decided before process 0 writes anything
    return True
  sync(f"start_run {workdir}")
  if is_writer():
    for name in ("summary.json", "metrics.jsonl", checkpoint.FILENAME):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    write_json(config_path, record)
  return False


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
  if is_writer():
    write_json(os.path.join(workdir, "summary.json"), summary)


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


def print_final(summary: Mapping[str, Any]) -> None:
  """A run's summary as the final table (figures that are None left out)."""
  rows = {k: v for k, v in summary.items() if v is not None}
  width = max(len(k) for k in rows)
  print("final:")
  for k, v in rows.items():
    print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")


# ------------------------------------------------------------------ runs and seeds

class SeedRun(NamedTuple):
  """One run of a seed, prepared by a driver's prepare_one and not started; finish(records) ->
  the summary (written, printed) gets every record of the run, earlier ones included."""

  workdir: str
  rnd: federated.Round
  state: federated.ServerState
  data: federated.FederatedData
  eval_fn: Callable[[federated.ServerState], Mapping[str, Any]]
  title: str
  resume: bool
  finish: Callable[[list[dict[str, Any]]], dict[str, Any]]
  problem: Any = None  # the task's BilevelProblem, for --diagnose_every


_CHECKPOINTS_SAVED = [0]  # by this process, across seeds (the test hooks count them)


class _Recorder:
  """One run's side of the run loop: its checkpoint restored, records streamed to
  metrics.jsonl, checkpoints written (with the test hooks) and the final plot."""

  def __init__(self, run: SeedRun):
    self.run, self.earlier, self.totals, self.elapsed = run, [], None, 0.0
    self.state, path = run.state, os.path.join(run.workdir, "metrics.jsonl")
    if run.resume:
      try:
        self.state, meta = checkpoint.restore(run.workdir, run.state)
      except checkpoint.CheckpointError as e:
        fail(str(e))
      self.earlier = checkpoint.read_metrics(path, meta["round"], rewrite=is_writer())
      self.totals, self.elapsed = meta["totals"], meta["wall_time_s"]
    self.wall_offset = self.elapsed
    self.writer = JsonlWriter(path) if is_writer() else None
    self.run_start_age = process_age_s()  # start-up before the first round: imports, data, setup

  def on_record(self, record: dict[str, Any]) -> None:
    record["wall_time_s"] += self.wall_offset
    record["time_to_first_round_s"] = self.run_start_age + record["first_round_s"]
    self.elapsed = record["wall_time_s"]
    if self.writer is not None:
      self.writer(record)

  def on_checkpoint(self, state: federated.ServerState, totals: dict[str, Any], done: int) -> None:
    if is_writer():
      checkpoint.save(self.run.workdir, state, {"round": done, "totals": totals,
                                                "wall_time_s": self.elapsed})
    _CHECKPOINTS_SAVED[0] += 1
    for env, sig in ((KILL_AFTER_CHECKPOINT_ENV, signal.SIGKILL),
                     (STOP_AFTER_CHECKPOINT_ENV, signal.SIGSTOP)):
      if _CHECKPOINTS_SAVED[0] == int(os.environ.get(env, "0") or 0):
        os.kill(os.getpid(), sig)

  def close(self, records: list[dict[str, Any]], plot: bool = True) -> list[dict[str, Any]]:
    """Close metrics.jsonl and (plot) draw every record of the run; return them."""
    if self.writer is not None:
      self.writer.close()
    records = self.earlier + records
    if plot and is_writer() and records:
      plot_records(records, os.path.join(self.run.workdir, "curves.png"), self.run.title)
    return records


def _loop_flags() -> dict[str, Any]:
  return dict(num_rounds=ROUNDS.value, eval_every=EVAL_EVERY.value, log=logging.info,
              log_every=LOG_EVERY.value, checkpoint_every=CHECKPOINT_EVERY.value,
              blowup_factor=DIVERGENCE_FACTOR.value)


def run_prepared(runs: Sequence[SeedRun]) -> dict[str, Any]:
  """Run (or resume) a seed's runs in order, each then finished; the last one's summary.
  Raises loop.DivergenceError (after printing it) when a run diverges."""
  summary = {}
  for run in runs:
    rec = _Recorder(run)
    data, state = sharding.replicate((run.data, rec.state), client_mesh())  # once, not per round
    try:
      _, records = loop.run(
          run.rnd, state, data, eval_fn=run.eval_fn, on_record=rec.on_record,
          start_totals=rec.totals, on_checkpoint=rec.on_checkpoint,
          diagnose_fn=_diagnose_fn(run.problem, data) if DIAGNOSE_EVERY.value else None,
          diagnose_every=DIAGNOSE_EVERY.value, **_loop_flags())
    except loop.DivergenceError as e:
      rec.close([], plot=False)
      print(f"error: {e}", file=sys.stderr)
      raise
    summary = run.finish(rec.close(records))
  return summary


def _diagnose_fn(problem, data: federated.FederatedData):
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


def run_seeds_batched(groups: Sequence[Sequence[SeedRun]]
                      ) -> tuple[dict[int, dict[str, Any]], dict[int, str]] | None:
  """Every seed's runs (groups[s]) as one vmapped program (loop.seeds_step, loop.run_seeds),
  each run keeping its own records, checkpoints, guards and summary as if run alone; a seed's
  runs finish in order. Returns ({seed index: summary}, {seed index: error}), or None with the
  reason printed (nothing run) when the runs cannot share one program."""
  runs = [run for group in groups for run in group]
  recorders = [_Recorder(r) for r in runs]
  states = [rec.state for rec in recorders]
  reason = None
  if any(tree.signature((s, r.data)) != tree.signature((states[0], runs[0].data))
         for s, r in zip(states, runs)):
    reason = "their data or parameters differ in shape (e.g. a non-IID partition)"
  elif len({int(s.round) for s in states}) > 1:
    reason = (f"their checkpoints are at different rounds "
              f"({', '.join(str(int(s.round)) for s in states)})")
  else:
    try:
      step = loop.seeds_step([r.rnd for r in runs])
    except ConfigError as e:
      reason = str(e)
  if reason is not None:
    for rec in recorders:
      rec.close([], plot=False)
    print(f"the seeds run one after another: {reason}.", flush=True)
    return None
  print(f"{len(groups)} seeds ({len(runs)} runs) run as one vmapped program (--batch_seeds).",
        flush=True)
  _, records, stopped = loop.run_seeds(
      step, tree.stack(states), tree.stack([r.data for r in runs]),
      eval_fns=[r.eval_fn for r in runs], on_record=[rec.on_record for rec in recorders],
      start_totals=[rec.totals for rec in recorders],
      on_checkpoint=[rec.on_checkpoint for rec in recorders], **_loop_flags())
  summaries, errors, i = {}, {}, 0
  for g, group in enumerate(groups):
    for run in group:
      recs = recorders[i].close(records[i], plot=i not in stopped)
      if i in stopped:
        print(f"error: {run.workdir}: {stopped[i]}", file=sys.stderr)
        errors.setdefault(g, stopped[i])
      elif g not in errors:  # a seed's later runs may build on its earlier ones
        summaries[g] = run.finish(recs)
      i += 1
    if g in errors:
      summaries.pop(g, None)
  return summaries, errors


def combine_summaries(summaries: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
  """One summary over seeds: mean, std (ddof 1; 0 for one seed), min and max of every numeric
  figure that every seed has; text fields shared by all seeds; each seed's summary."""
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
  """Run --seed, or each --seeds value into WORKDIR/seed_S (batched when --batch_seeds and they
  can share one program), then write their combined summary to WORKDIR/summary.json and print
  it. prepare_one reads the seed and the workdir from the flags and returns its runs."""
  seeds = parse_seeds()
  if seeds is None:
    try:
      run_prepared(_runs(prepare_one()))
    except loop.DivergenceError:
      sys.exit(2)
    return
  seeds = seeds[:SMOKE_SEEDS] if SMOKE.value else seeds
  root = require_workdir()
  if os.path.exists(os.path.join(root, "summary.json")) and is_writer():
    os.remove(os.path.join(root, "summary.json"))  # written again once every seed has finished

  def prepare(seed: int) -> list[SeedRun]:
    flags.FLAGS.seed, flags.FLAGS.workdir = seed, os.path.join(root, f"seed_{seed}")
    return _runs(prepare_one())

  batched = run_seeds_batched([prepare(s) for s in seeds]) if _batchable(len(seeds)) else None
  if batched is not None:
    summaries = {seeds[i]: v for i, v in batched[0].items()}
    stopped = [seeds[i] for i in sorted(batched[1])]
  else:
    summaries, stopped = {}, []
    for i, seed in enumerate(seeds):
      print(f"=== seed {seed} ({i + 1} of {len(seeds)}): {root}/seed_{seed}", flush=True)
      try:
        summaries[seed] = run_prepared(prepare(seed))
      except loop.DivergenceError:  # the other seeds go on
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


def _runs(prepared: SeedRun | Sequence[SeedRun]) -> list[SeedRun]:
  return [prepared] if isinstance(prepared, SeedRun) else list(prepared)


def _batchable(num_seeds: int) -> bool:
  """The flags' side of whether --seeds may run as one vmapped program: --batch_seeds, several
  seeds, one device of one process and no --diagnose_every (the reason printed if not)."""
  if not BATCH_SEEDS.value or num_seeds < 2:
    return False
  reasons = [why for why, bad in (
      ("--devices / a multi-process run shard the clients", client_mesh() is not None),
      ("--diagnose_every computes per-seed diagnostics", DIAGNOSE_EVERY.value > 0)) if bad]
  if reasons:
    print(f"the seeds run one after another: {'; '.join(reasons)}.", flush=True)
  return not reasons
