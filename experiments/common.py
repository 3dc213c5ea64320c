"""What the drivers share: flags (each defined once), the algorithm built from them, the workdir
protocol (config.json, resume, metrics.jsonl, summary.json), seeds and the process start. Why
each works as it does: docs/drivers.md."""

import json
import os
import signal
import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
from absl import flags, logging

from bilevel import algorithms, checkpoint, client, federated, inner, loop, models, sharding, tree
from bilevel import data as data_lib
from bilevel.errors import ConfigError
from bilevel.metrics import combine_summaries, device_info, to_python, versions, write_json

_LIB = algorithms.defaults("rafbo")  # the flags' defaults: the default algorithm's
WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the results (created if missing).")
SEED = flags.DEFINE_integer("seed", _LIB.seed, "The one seed every random stream comes from.")
QUICK = flags.DEFINE_boolean("quick", False, "A small, fast version of the experiment.")
SMOKE = flags.DEFINE_boolean("smoke", False, "Tiny run for tests (docs/drivers.md).")
ROUNDS = flags.DEFINE_integer("rounds", 200, "Communication rounds Q.")
NUM_CLIENTS = flags.DEFINE_integer("num_clients", 20, "Simulated clients M.")
CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 10, "Clients sampled per round.")
ALGORITHM = flags.DEFINE_enum("algorithm", "rafbo", sorted(algorithms.names()), "Algorithm.")
LEVELS = flags.DEFINE_string("levels", "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5", "rx/ry:share,...")
# Flags of the bilevel.algorithms.Options fields of their name (mask_granularity: granularity),
# described there; their defaults: _LIB's, but mask_granularity's "unit".
_ALGORITHM_FLAGS = ("estimator", "mask_policy", "mask_granularity", "redraw_levels",
                    "allow_uncovered", "local_steps", "inner_steps", "inner_lr", "inner_step",
                    "outer_lr", "x_trust", "x_trust_scope", "x_trust_on", "num_steps", "v_lr",
                    "fednest_neumann", "delta", "radius", "v_step", "server_lr", "aggregation")
_CHOICES = dict(inner_step=list(inner.STEP_RULES), v_step=["cauchy", "fixed"],
                x_trust_scope=list(client.TRUST_SCOPES), x_trust_on=list(client.TRUST_ON),
                fednest_neumann=["code", "series"])
_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, type(None): flags.DEFINE_float}
for _name in _ALGORITHM_FLAGS:
  _default = "unit" if _name == "mask_granularity" else getattr(_LIB, _name)
  _help = "An algorithm option (bilevel.algorithms.Options; docs/drivers.md)."
  if _name in _CHOICES:
    flags.DEFINE_enum(_name, _default, _CHOICES[_name], _help)
  else:
    _DEFINE[type(_default)](_name, _default, _help)
LOCAL_STEPS, INNER_LR = flags.FLAGS["local_steps"], flags.FLAGS["inner_lr"]
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Client minibatch size (0 = full batch).")
DATASET = flags.DEFINE_string("dataset", "mnist_embedded", "Dataset (bilevel/data.py).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder with local dataset files.")
PARTITION = flags.DEFINE_string("partition", "iid", "iid, shards or dirichlet.")
ALPHA = flags.DEFINE_float("alpha", 0.5, "Dirichlet concentration (partition=dirichlet).")
VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.5, "Share of a client's data for f_i.")
EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Log metrics every this many rounds.")
DIAGNOSE_EVERY = flags.DEFINE_integer("diagnose_every", 0, "Diagnostics period; 0 = never.")
SUBMODEL = flags.DEFINE_enum("submodel", "compact", ["compact", "dense"], "Client arrays.")
LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Progress line every this many rounds.")
DEVICES = flags.DEFINE_integer("devices", 1, "Devices to shard the clients over (0 = all).")
CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "JAX devices to split the host CPU into.")
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 50, "Checkpoint every N rounds.")
RESUME = flags.DEFINE_boolean("resume", True, "Continue from the workdir's checkpoint.")
DIVERGENCE_FACTOR = flags.DEFINE_float("divergence_factor", 100.0, "Blow-up stop; 0 = off.")
COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, "Cache folder; none = off.")
REUSE_HOST_MEMORY = flags.DEFINE_boolean("reuse_host_memory", True, "Keep freed host memory.")
EVAL_SPLIT = flags.DEFINE_enum("eval_split", "test", ["test", "holdout"], "test_accuracy's data.")
HOLDOUT_FRACTION = flags.DEFINE_float("holdout_fraction", 0.2, "Held-out training share.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "JAX processes (0 = detected).")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's id in 0..num_processes-1.")
SEEDS = flags.DEFINE_list("seeds", None, "Several seeds, e.g. 0,1,2, into WORKDIR/seed_S.")
BATCH_SEEDS = flags.DEFINE_boolean("batch_seeds", True, "Run --seeds as one vmapped program.")
HIDDEN = flags.DEFINE_integer("hidden", 200, "Hidden units of the MLP.")
ACTIVATION = flags.DEFINE_enum("activation", "relu", sorted(models.ACTIVATIONS), "Activation.")
ALGORITHM_LIST = flags.DEFINE_list("algorithms", None, "Algorithms to run.")
DRIVER_FLAGS = flags.DEFINE_list("driver_flags", [], "Flags for every driver process started.")
# Flags that may differ between a run and its resumption.
_RESUME_FREE_FLAGS = ("resume", "log_every", "workdir", "devices", "cpu_devices",
                      "reuse_host_memory", "seeds", "batch_seeds", "compilation_cache",
                      "num_processes", "coordinator_address", "process_id")


def defaults_applied(defaults: Mapping[str, Any]) -> dict[str, Any]:
  """Those of start_driver's defaults that the run uses: their flags were not given (config.json's
  task_defaults_applied)."""
  return {k: v for k, v in defaults.items() if flags.FLAGS[k].using_default_value}


def start_driver(defaults: Mapping[str, Any] | None = None, argv: Sequence[str] = ()) -> bool:
  """The process start (docs/drivers.md); returns whether --reuse_host_memory applied."""
  for name, value in (defaults or {}).items():  # tests: flagsaver restores the flags' own
    flags.FLAGS.set_default(name, value)
  if SMOKE.value:
    flags.FLAGS.rounds, flags.FLAGS.eval_every = min(ROUNDS.value, 2), 1
  n, pid, cpus = NUM_PROCESSES.value, PROCESS_ID.value, CPU_DEVICES.value
  fail(*[problem for problem, bad in (
      (f"unexpected arguments: {' '.join(argv[1:])}", len(argv) > 1),
      (f"--cpu_devices={cpus} must be >= 1.", cpus < 1),
      (f"--num_processes={n} must be >= 0.", n < 0),
      (f"--num_processes={n} needs --coordinator_address=HOST:PORT of process 0.",
       n > 1 and not COORDINATOR_ADDRESS.value),
      (f"--process_id={pid} is outside the allowed range [0, {n - 1}].",
       n > 1 and not 0 <= pid < n)) if bad])
  try:
    if cpus != 1:
      jax.config.update("jax_num_cpu_devices", cpus)
  except RuntimeError as e:  # JAX already started in this process
    fail(f"--cpu_devices={cpus} must be set before JAX starts: {e}")
  cache = (COMPILATION_CACHE.value or os.environ.get("JAX_COMPILATION_CACHE_DIR")
           or default_cache_dir())
  if cache.lower() == "none":
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    try:
      os.makedirs(cache, exist_ok=True)
    except OSError as e:
      fail(f"--compilation_cache={cache}: cannot create the cache folder ({e}); give another "
           "folder or --compilation_cache=none.")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
  if n != 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**({} if n == 0 else dict(
        coordinator_address=COORDINATOR_ADDRESS.value, num_processes=n, process_id=pid)))
  return (REUSE_HOST_MEMORY.value and not sharding.accelerator_possible()
          and loop.reuse_host_memory())


def default_cache_dir(home: str | None = None) -> str:
  """$XDG_CACHE_HOME/bilevel_jax, else ~/.cache/bilevel_jax (home given: HOME=home, no XDG)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(base if home is None else os.path.join(home, ".cache"), "bilevel_jax")


def client_mesh():
  """The client mesh for --devices or a multi-process run (None for one device)."""
  if jax.process_count() > 1:  # every process's devices
    return sharding.client_mesh()
  n = DEVICES.value or len(jax.devices())
  return None if n == 1 else sharding.client_mesh(n)


def fail(*problems: str) -> None:
  """Given problems: end the program with them in one error paragraph, exit code 2."""
  if problems:
    print("error: " + (problems[0] if len(problems) == 1 else f"{len(problems)} problems: "
                       + " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))),
          file=sys.stderr)
    sys.exit(2)


def gather(problems: list[str], *checks: Callable[[], Any]) -> list[Any]:
  """Every check's result, or the end of the program with every problem (--workdir's too)."""
  results = []
  for check in checks:
    try:
      results.append(check())
    except (ConfigError, data_lib.DataError, checkpoint.CheckpointError) as e:
      problems.append(str(e))
      results.append(None)
  if not WORKDIR.value:
    problems.append("--workdir is required: the directory where results are written.")
  fail(*problems)
  return results


def require_workdir() -> str:
  gather([])
  os.makedirs(WORKDIR.value, exist_ok=True)
  return WORKDIR.value


def make_algorithm(problem: Any, layout: Any, **task: Any) -> algorithms.Algorithm:
  """--algorithm for --num_clients clients: the algorithm flags given, or at their default where
  the algorithm has none of its own, and the task's keywords (they win). Raises ConfigError."""
  own = algorithms.own_options(ALGORITHM.value)
  names = {name: name for name in ("clients_per_round", "levels", "seed", *_ALGORITHM_FLAGS)}
  names["mask_granularity"] = "granularity"
  options = {option: flags.FLAGS[name].value for name, option in names.items()
             if flags.FLAGS[name].present or option not in own}
  return algorithms.get(ALGORITHM.value, problem=problem, num_clients=NUM_CLIENTS.value,
                        layout=layout, **dict(options, **task))


def check_shared_flags() -> list[str]:
  """Range problems of the shared flags (all of them, not only the first)."""
  problems = [f"--{f.name}={f.value} must be >= {low}." for f, low in (
      (ROUNDS, 1), (NUM_CLIENTS, 1), (CLIENTS_PER_ROUND, 1), (EVAL_EVERY, 1), (LOG_EVERY, 1),
      (BATCH_SIZE, 0), (CHECKPOINT_EVERY, 0), (HIDDEN, 1), (DIVERGENCE_FACTOR, 0))
      if f.value < low]
  problems += [f"--{f.name}={f.value} is outside the allowed range {bounds}." for f, ok, bounds in (
      (VAL_FRACTION, 0 < VAL_FRACTION.value < 1, "(0, 1)"),
      (HOLDOUT_FRACTION, 0 < HOLDOUT_FRACTION.value < 1, "(0, 1)"),
      (ALPHA, ALPHA.value > 0, "(0, inf)")) if not ok]
  every = DIAGNOSE_EVERY.value
  if every < 0 or (every and EVAL_EVERY.value > 0 and every % EVAL_EVERY.value):
    problems.append(f"--diagnose_every={every} must be 0 or a positive multiple of "
                    f"--eval_every={EVAL_EVERY.value} (diagnostics go into logged records).")
  available = len(jax.devices())
  if not 0 <= DEVICES.value <= available:
    problems.append(f"--devices={DEVICES.value} is outside the allowed range [0, {available}]: "
                    f"this process sees {available} {jax.devices()[0].platform} device(s).")
  return problems


def load_data():
  """--dataset from --data_dir; --eval_split=holdout: its holdout split as the test set."""
  ds = data_lib.load_dataset(DATASET.value, DATA_DIR.value, seed=SEED.value)
  holdout = EVAL_SPLIT.value == "holdout"
  return data_lib.holdout_split(ds, HOLDOUT_FRACTION.value, SEED.value) if holdout else ds


def parse_seeds() -> list[int] | None:
  """--seeds as distinct integers >= 0 in the given order (None without --seeds)."""
  seeds = [int(s) if s.strip().isdecimal() else -1 for s in SEEDS.value or []]
  if min(seeds, default=0) < 0 or len(set(seeds)) != len(seeds):
    fail(f"--seeds={','.join(SEEDS.value)} must be distinct integers >= 0, comma-separated.")
  return seeds or None


def config_dict(alg: algorithms.Algorithm) -> dict[str, Any]:
  """alg's configuration for config.json: name, population, plain-valued options, levels."""
  plain = {k: v for k, v in alg.options._asdict().items()
           if isinstance(v, (type(None), bool, int, float, str))}
  return dict(algorithm=alg.name, num_clients=alg.num_clients, **plain,
              levels=[lv._asdict() for lv in alg.options.levels])


def _same_run(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Same config, versions and flags but _RESUME_FREE_FLAGS and new flags at their default."""
  new, old_flags = json.loads(json.dumps(to_python(new))), old.get("flags", {})
  defaults = json.loads(json.dumps(to_python(
      {k: flags.FLAGS[k].default for k in new["flags"] if k in flags.FLAGS})))
  skip = set(_RESUME_FREE_FLAGS) | {k for k, v in new["flags"].items()
                                    if k not in old_flags and k in defaults and v == defaults[k]}
  strip = lambda f: {k: v for k, v in f.items() if k not in skip}
  return (old.get("config") == new["config"] and strip(old_flags) == strip(new["flags"])
          and old.get("versions") == new["versions"])


def start_run(workdir: str, config: Mapping[str, Any]) -> bool:
  """True to resume workdir's checkpoint of this run; else its results removed, config written."""
  config_path = os.path.join(workdir, "config.json")
  flag_values = {f.name: f.value for module, module_flags in
                 flags.FLAGS.flags_by_module_dict().items() if "experiments" in module
                 for f in module_flags}
  record = {"config": dict(config), "flags": flag_values, "versions": versions(),
            "device": device_info(), "argv": list(sys.argv)}
  again = "Use a new --workdir, or pass --noresume to start afresh and overwrite it."
  resume = RESUME.value and checkpoint.exists(workdir)
  if resume:
    try:
      with open(config_path, encoding="utf-8") as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      fail(f"cannot read {config_path} ({e}), which describes the checkpoint in {workdir}. {again}")
    if not _same_run(old if isinstance(old, dict) else {}, record):
      fail(f"{workdir} holds a checkpoint of a run with another configuration ({config_path}). "
           + again)
    print(f"resuming from {os.path.join(workdir, checkpoint.FILENAME)}")
  sharding.sync(f"start_run {workdir}")  # every process decided before process 0 writes
  if not resume and sharding.is_writer():
    for name in ("summary.json", "metrics.jsonl", checkpoint.FILENAME):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    write_json(config_path, record)
  return resume


def write_summary(workdir: str, summary: Mapping[str, Any], show: bool = False) -> Mapping:
  """workdir/summary.json (process 0); show: also print it as the final table; the summary."""
  if sharding.is_writer():
    write_json(os.path.join(workdir, "summary.json"), summary)
  if show:
    rows = {k: v for k, v in summary.items() if v is not None}
    width = max(len(k) for k in rows)
    print("final:")
    for k, v in rows.items():
      print(f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
  return summary


class SeedRun(NamedTuple):
  """A run prepared, not started; finish(all its records) writes its summary and returns it."""
  workdir: str
  rnd: federated.Round
  state: federated.ServerState
  data: federated.FederatedData
  eval_fn: Callable[[federated.ServerState], Mapping[str, Any]]
  title: str
  resume: bool
  finish: Callable[[list[dict[str, Any]]], dict[str, Any]]
  problem: Any = None  # the task's BilevelProblem, for --diagnose_every


_CHECKPOINTS_SAVED = [0]  # by this process, across seeds


def _after_checkpoint() -> None:  # test hooks: SIGKILL / SIGSTOP after the N-th checkpoint
  _CHECKPOINTS_SAVED[0] += 1
  for env, sig in (("BILEVEL_KILL_AFTER_CHECKPOINT", signal.SIGKILL),
                   ("BILEVEL_STOP_AFTER_CHECKPOINT", signal.SIGSTOP)):
    if _CHECKPOINTS_SAVED[0] == int(os.environ.get(env, "0") or 0):
      os.kill(os.getpid(), sig)


def run_prepared(runs: Sequence[tuple[int, SeedRun]], batched: bool = False
                 ) -> dict[int, dict[str, Any] | None] | None:
  """Run (or resume) and finish [(seed, run)] one after another or batched: {seed: its last
  summary, None if one of its runs stopped}; None (the reason printed) if they cannot batch."""
  files = gather([], lambda: [checkpoint.RunFiles(
      run.workdir, run.state, run.resume, sharding.is_writer(), run.title, _after_checkpoint)
      for _, run in runs])[0]
  keywords = dict(num_rounds=ROUNDS.value, eval_every=EVAL_EVERY.value, log=logging.info,
                  log_every=LOG_EVERY.value, checkpoint_every=CHECKPOINT_EVERY.value,
                  blowup_factor=DIVERGENCE_FACTOR.value)
  records, stopped = [[] for _ in runs], {}
  if batched:
    try:
      step = loop.seeds_step([r.rnd for _, r in runs], [f.state for f in files],
                             [r.data for _, r in runs])
    except ConfigError as e:
      for f in files:
        f.close([], plot=False)
      print(f"the seeds run one after another: {e}.", flush=True)
      return None
    print(f"{len(set(s for s, _ in runs))} seeds ({len(runs)} runs) run as one vmapped program "
          "(--batch_seeds).", flush=True)
    _, records, stopped = loop.run_seeds(
        step, tree.stack([f.state for f in files]), tree.stack([r.data for _, r in runs]),
        eval_fns=[r.eval_fn for _, r in runs], on_record=[f.on_record for f in files],
        start_totals=[f.totals for f in files], on_checkpoint=[f.on_checkpoint for f in files],
        **keywords)
  summaries = {}
  for i, ((seed, run), f) in enumerate(zip(runs, files)):
    going = summaries.get(seed, {}) is not None  # a seed's later runs build on its earlier ones
    if going and not batched:
      data, state = sharding.replicate((run.data, f.state), client_mesh())  # once, not per round
      try:
        records[i] = loop.run(
            run.rnd, state, data, eval_fn=run.eval_fn, on_record=f.on_record,
            start_totals=f.totals, on_checkpoint=f.on_checkpoint,
            diagnose_fn=loop.diagnose_fn(run.problem, data) if DIAGNOSE_EVERY.value else None,
            diagnose_every=DIAGNOSE_EVERY.value, **keywords)[1]
      except loop.DivergenceError as e:
        stopped[i] = str(e)
    finished = f.close(records[i], plot=(going or batched) and i not in stopped)
    if i in stopped:
      print(f"error: {stopped[i]} ({run.workdir})", file=sys.stderr)
      summaries[seed] = None
    elif going:
      summaries[seed] = run.finish(finished)
  return summaries


def for_each_seed(prepare_one: Callable[[], Sequence[SeedRun]]) -> None:
  """Run prepare_one()'s runs of --seed, or of each --seeds value into WORKDIR/seed_S and write
  their combined summary; a ConfigError or DataError of prepare_one ends the program."""
  seeds = parse_seeds()
  if seeds is None:
    if None in run_prepared([(SEED.value, run) for run in gather([], prepare_one)[0]]).values():
      sys.exit(2)
    return
  seeds, root = seeds[:2] if SMOKE.value else seeds, require_workdir()
  if os.path.exists(os.path.join(root, "summary.json")) and sharding.is_writer():
    os.remove(os.path.join(root, "summary.json"))  # written again once every seed has finished

  def prepare(seed: int) -> list[tuple[int, SeedRun]]:
    flags.FLAGS.seed, flags.FLAGS.workdir = seed, os.path.join(root, f"seed_{seed}")
    return [(seed, run) for run in gather([], prepare_one)[0]]

  reasons = [why for why, bad in (
      ("--devices / a multi-process run shard the clients", client_mesh() is not None),
      ("--diagnose_every computes per-seed diagnostics", DIAGNOSE_EVERY.value > 0)) if bad]
  batch = BATCH_SEEDS.value and len(seeds) > 1
  if batch and reasons:
    print(f"the seeds run one after another: {'; '.join(reasons)}.", flush=True)
  summaries = (run_prepared([r for s in seeds for r in prepare(s)], batched=True)
               if batch and not reasons else None)
  if summaries is None:
    summaries = {}
    for i, seed in enumerate(seeds):  # a seed that stops: the others go on
      print(f"=== seed {seed} ({i + 1} of {len(seeds)}): {root}/seed_{seed}", flush=True)
      summaries.update(run_prepared(prepare(seed)))
  flags.FLAGS.workdir = root
  stopped = [str(seed) for seed, summary in summaries.items() if summary is None]
  if stopped:
    fail(f"seeds {','.join(stopped)} of {','.join(map(str, seeds))} stopped (their errors are "
         f"above); the finished seeds' results are in {root}/seed_S. No combined summary.json "
         "was written.")
  combined = combine_summaries(summaries)
  write_summary(root, combined)
  print(f"over seeds {','.join(map(str, seeds))} (mean +- std, min .. max):")
  for k, mean in combined["mean"].items():
    print(f"  {k:<28} {mean:.4g} +- {combined['std'][k]:.2g}  "
          f"({combined['min'][k]:.4g} .. {combined['max'][k]:.4g})")
