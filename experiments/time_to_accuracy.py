"""Time to a test accuracy at FedNest's config A, as a user waits for it: whole process, from
its start, in a fresh home folder (cold) and again in the same one (warm).

For each of --algorithms (default rafbo, fednest) one hyper-representation driver process runs
the algorithm at the library's default steps (--presets: its tuned flagfile
experiments/presets/hyper_representation_ALG.cfg instead) at FedNest's config A:

  HOME=W/home_ALG python -m experiments.hyper_representation --workdir=W/ALG_STATE \
    --algorithm=ALG --num_clients=100 --clients_per_round=10 --partition=iid --rounds=500 \
    --eval_every=5 --seed=S --log_every=100000

cold: HOME is a new empty folder, so everything a first run does happens: JAX's persistent
compilation cache (~/.cache/bilevel_jax) is empty and every program compiles; matplotlib has no
font cache. warm: the same HOME again, holding what the cold run left. Nothing else is set: the
driver finds its cache where a user's would be. (XDG_CACHE_HOME and JAX_COMPILATION_CACHE_DIR
are removed from the child's environment, so a setting of this shell does not leak in.)

The time runs from just before the process is started (interpreter start-up, imports, data,
compilation or cache load included) to the moment its metrics.jsonl first holds a record with
test_accuracy >= --target (default 0.895), polled every POLL_S seconds; the process is then
terminated (SIGTERM; its checkpoint stays valid) and its folder deleted. A process that ends
without reaching the target gets seconds_to_target null and its last accuracy. Each result also
has driver_reported_s: the driver's own process age when it logged that record (its start-up
before the first round + its run wall time); it misses the interpreter's start before the
driver's first line and the record's evaluation, so it is a cross-check, not the figure. The
reference is FedNest's own PyTorch code at config A: 0.895 after 300-500 rounds at 0.221 s per
round, at best about 66 s (--fednest_reference_s); speedup = reference / seconds_to_target.

--seed defaults to 1 here (the config-A seed of the README), not the shared flag's 0.
With --seed_batch=S (default 10; 0 skips it) it then times the README main job (whole process:
one seed cold and warm, S seeds as one vmapped program and one after another; time_seeds).
Writes WORKDIR/benchmark.json (versions, device, settings, per algorithm and cache state:
seconds_to_target, round_reached, speedup, ...; main_job: the seed timings) and prints a table.

  python -m experiments.time_to_accuracy --workdir=runs/tta
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, NamedTuple, Sequence

from absl import app, flags

from bilevel import algorithms
from experiments import common

# --algorithms (experiments/common.py): the algorithms to time, each with its preset
# experiments/presets/hyper_representation_ALG.cfg; DEFAULT_ALGORITHMS when not given.
DEFAULT_ALGORITHMS = ("rafbo", "fednest")
TARGET = flags.DEFINE_float("target", 0.895, "Test accuracy (fraction) to reach.")
REFERENCE_S = flags.DEFINE_float("fednest_reference_s", 66.0, "FedNest's own time to the target "
                                 "(its PyTorch code: 300-500 rounds at 0.221 s per round).")
SEED_BATCH = flags.DEFINE_integer(
    "seed_batch", 10, "Also time the README main job (hyper_representation at its defaults, "
    "whole process, cache as named): one seed cold and warm, and this many seeds (--seeds=0,"
    "...,S-1) as one vmapped program (cold: its first run compiles it; warm) and one after "
    "another (--nobatch_seeds, warm). 0 skips it.")
# --driver_flags (experiments/common.py): flags added to every timed RAFBO / FedNest driver
# command, e.g. --driver_flags=--submodel=dense.
DRIVER_FLAGS = common.DRIVER_FLAGS
PRESETS = flags.DEFINE_boolean("presets", False, "Run each algorithm from its tuned flagfile "
                              "(experiments/presets/hyper_representation_ALG.cfg) instead of the "
                              "library's default steps.")
MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 500, "Rounds a run may take (--rounds of the "
                                  "driver process); one that ends below the target counts null.")

DEFAULT_SEED = 1  # FedNest's config-A seed of the README (the shared --seed defaults to 0)
EVAL_EVERY = 5  # test accuracy every this many rounds
POLL_S = 0.2  # how often metrics.jsonl is read while the process runs
TERM_WAIT_S = 30.0  # after SIGTERM, wait this long before SIGKILL
CACHE_STATES = ("cold", "warm")
CONFIG_A = ("--num_clients=100", "--clients_per_round=10", "--partition=iid")
# --smoke (tests): a few rounds and a target every record reaches, so each run returns at once.
SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET = 4, 2, 0.0
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")


class Scan(NamedTuple):
  reached: dict[str, Any] | None  # the first record with test_accuracy >= target
  last: dict[str, Any] | None  # the last complete record holding test_accuracy


def scan_metrics(path: str, target: float) -> Scan:
  """Read a driver's metrics.jsonl (possibly still being written): the first record whose
  test_accuracy is >= target, and the last complete record with a test_accuracy. A missing
  file gives Scan(None, None); a torn last line (no newline yet, or not JSON) ends the scan."""
  reached = last = None
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return Scan(None, None)
  for line in lines:
    if not line.endswith("\n"):
      break
    try:
      record = json.loads(line)
    except ValueError:
      break
    accuracy = record.get("test_accuracy") if isinstance(record, dict) else None
    if not isinstance(accuracy, (int, float)):
      continue
    last = record
    if accuracy >= target:
      reached = record
      break
  return Scan(reached, last)


def preset(algorithm: str) -> str:
  return os.path.join(PRESETS_DIR, f"hyper_representation_{algorithm}.cfg")


def command(algorithm: str, run_dir: str, rounds: int, eval_every: int) -> list[str]:
  steps = [f"--flagfile={preset(algorithm)}"] if PRESETS.value else [f"--algorithm={algorithm}"]
  return [sys.executable, "-m", "experiments.hyper_representation", f"--workdir={run_dir}",
          *steps, *CONFIG_A, f"--rounds={rounds}", f"--eval_every={eval_every}",
          f"--seed={common.SEED.value}", "--log_every=100000", *DRIVER_FLAGS.value]


def user_env(home: str) -> dict[str, str]:
  """This process's environment with HOME=home and no cache-folder overrides: a driver started
  with it keeps its compilation cache (and matplotlib its font cache) under home."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JAX_COMPILATION_CACHE_DIR",
                      "MPLCONFIGDIR")}
  env["HOME"] = home
  return env


def stop(proc: subprocess.Popen) -> None:
  """SIGTERM, then SIGKILL if it has not ended within TERM_WAIT_S."""
  if proc.poll() is not None:
    return
  proc.terminate()
  try:
    proc.wait(timeout=TERM_WAIT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def _age_at(record: dict[str, Any]) -> float | None:
  """The driver's own process age when it logged `record` (before its evaluation): process
  start-up + the run's wall time; a cross-check of the time measured from outside."""
  try:
    return record["time_to_first_round_s"] - record["first_round_s"] + record["wall_time_s"]
  except (KeyError, TypeError):
    return None


def cache_files(home: str) -> int:
  """Files in the driver's default compilation cache folder under home (user_env)."""
  folder = common.default_cache_dir(home)
  return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def time_one(algorithm: str, state: str, workdir: str, home: str, rounds: int,
             eval_every: int, target: float) -> dict[str, Any]:
  """One driver process, timed from just before it starts to the first record >= target."""
  run_dir = os.path.join(workdir, f"{algorithm}_{state}")
  shutil.rmtree(run_dir, ignore_errors=True)  # nothing stale to read, nothing to resume
  os.makedirs(run_dir)
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  log_path = os.path.join(run_dir, "driver.log")
  cmd = command(algorithm, run_dir, rounds, eval_every)
  seconds = None
  after_exit = False
  with open(log_path, "w", encoding="utf-8") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=user_env(home))
    try:
      while True:
        ended = proc.poll() is not None  # checked before reading: a record written before
        scan = scan_metrics(metrics_path, target)  # the exit is seen by this last read
        if scan.reached is not None:
          seconds = time.perf_counter() - start
          after_exit = ended
          break
        if ended:
          break
        time.sleep(POLL_S)
    finally:
      stop(proc)
  out = dict(
      seconds_to_target=seconds,
      round_reached=scan.reached["round"] if scan.reached else None,
      speedup=REFERENCE_S.value / seconds if seconds else None,
      test_accuracy_at_target=scan.reached["test_accuracy"] if scan.reached else None,
      driver_reported_s=_age_at(scan.reached) if scan.reached else None,
      # detected only once the process had ended (between two polls): seconds include its exit
      detected_after_exit=after_exit,
      last_round=scan.last["round"] if scan.last else None,
      last_test_accuracy=scan.last["test_accuracy"] if scan.last else None,
      first_round_s=scan.last.get("first_round_s") if scan.last else None,
      time_to_first_round_s=scan.last.get("time_to_first_round_s") if scan.last else None,
      # files in the compilation cache under home after the run: a warm run that adds none
      # loaded every program it ran
      cache_files=cache_files(home),
      exit_code=proc.returncode, error=None, command=" ".join(cmd[1:]))
  if scan.reached is None and proc.returncode != 0:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      lines = f.read().strip().splitlines()
    out["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
    out["log"] = log_path  # the run folder is kept for reading
  else:
    shutil.rmtree(run_dir, ignore_errors=True)
  return out


def time_process(cmd: Sequence[str], log_path: str, home: str) -> tuple[float, int]:
  """(whole-process wall seconds, exit code) of one command run with HOME=home (user_env), its
  output into log_path."""
  with open(log_path, "w", encoding="utf-8") as log:
    start = time.perf_counter()
    code = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, check=False,
                          env=user_env(home)).returncode
  return time.perf_counter() - start, code


def time_seeds(workdir: str, num_seeds: int) -> dict[str, Any]:
  """The README main job: one seed (cold, warm cache) against num_seeds seeds batched (cold
  for the batched program, then warm) and one after another (warm); one new home folder."""
  home = os.path.join(workdir, "home_main")
  shutil.rmtree(home, ignore_errors=True)
  os.makedirs(home)
  seeds = ",".join(str(s) for s in range(num_seeds))
  runs = (("one_seed_cold", []), ("one_seed_warm", []),
          ("seeds_batched_cold", [f"--seeds={seeds}"]),
          ("seeds_batched_warm", [f"--seeds={seeds}"]),
          ("seeds_sequential_warm", [f"--seeds={seeds}", "--nobatch_seeds"]))
  out: dict[str, Any] = {"num_seeds": num_seeds, "commands": {}}
  for name, extra in runs:
    run_dir = os.path.join(workdir, f"main_{name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    cmd = [sys.executable, "-m", "experiments.hyper_representation", f"--workdir={run_dir}",
           *extra] + (["--smoke"] if common.SMOKE.value else [])
    print(f"=== main job: {name.replace('_', ' ')}", flush=True)
    seconds, code = time_process(cmd, os.path.join(workdir, f"main_{name}.log"), home)
    out[f"{name}_s"] = seconds if code == 0 else None
    out["commands"][name] = " ".join(cmd[1:])
    try:
      with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
      summary = summary.get("mean", summary)  # several seeds: the mean over them
      out[f"{name}_time_to_first_round_s"] = summary.get("time_to_first_round_s")
    except (OSError, ValueError):
      out[f"{name}_time_to_first_round_s"] = None
    if code != 0:
      out.setdefault("errors", {})[name] = (f"exit code {code}, log "
                                            f"{os.path.join(workdir, f'main_{name}.log')}")
    else:
      shutil.rmtree(run_dir, ignore_errors=True)
    print(f"  {_fmt(out[f'{name}_s'], '.1f')} s", flush=True)
  one = out["one_seed_warm_s"]
  for name in ("seeds_batched_warm", "seeds_sequential_warm"):
    out[f"{name}_over_one_seed"] = (out[f"{name}_s"] / one
                                    if out[f"{name}_s"] and one else None)
  shutil.rmtree(home, ignore_errors=True)
  return out


def check_flags() -> list[str]:
  problems = []
  known = set(algorithms.names())
  names = common.algorithm_list(DEFAULT_ALGORITHMS)
  if not names:
    problems.append("--algorithms is empty: give at least one algorithm.")
  if len(set(names)) != len(names):
    problems.append(f"--algorithms={','.join(names)} names an algorithm twice.")
  for name in names:
    if name not in known:
      problems.append(f"--algorithms: unknown algorithm {name!r}; known: "
                      f"{', '.join(sorted(known))}.")
    elif PRESETS.value and not os.path.isfile(preset(name)):
      problems.append(f"--algorithms: {name} has no preset {preset(name)}.")
  if not 0 <= TARGET.value <= 1:
    problems.append(f"--target={TARGET.value} is outside the allowed range [0, 1] (a fraction).")
  if not REFERENCE_S.value > 0:
    problems.append(f"--fednest_reference_s={REFERENCE_S.value} must be > 0.")
  if SEED_BATCH.value < 0 or SEED_BATCH.value == 1:
    problems.append(f"--seed_batch={SEED_BATCH.value} must be 0 (skip) or >= 2.")
  if MAX_ROUNDS.value < 1:
    problems.append(f"--max_rounds={MAX_ROUNDS.value} must be >= 1.")
  if common.SEED.value < 0:
    problems.append(f"--seed={common.SEED.value} must be >= 0.")
  if common.SEEDS.value:
    problems.append("--seeds is not used here: give one --seed.")
  if not common.WORKDIR.value:
    problems.append("--workdir is required: the directory where results are written.")
  return problems


def _fmt(value: Any, spec: str) -> str:
  """format(value, spec), or "-" padded to the spec's width for None."""
  if value is not None:
    return format(value, spec)
  width = "".join(c for c in spec.split(".")[0] if c.isdigit())
  return format("-", f">{width}") if width else "-"


def print_results(results: dict[str, dict[str, dict[str, Any]]], target: float) -> None:
  print(f"time to test accuracy {target:g} (whole process; FedNest's code: "
        f"{REFERENCE_S.value:g} s):")
  print(f"  {'algorithm':<10} {'cache':<5} {'seconds':>8} {'round':>6} {'speedup':>8} "
        f"{'first round s':>14}  last accuracy")
  for algorithm, states in results.items():
    for state, r in states.items():
      print(f"  {algorithm:<10} {state:<5} {_fmt(r['seconds_to_target'], '8.1f')} "
            f"{_fmt(r['round_reached'], '>6')} {_fmt(r['speedup'], '.2f') + ('x' if r['speedup'] else ''):>8} "
            f"{_fmt(r['first_round_s'], '14.2f')}  {_fmt(r['last_test_accuracy'], '.4f')}"
            + (f"  error: {r['error']}" if r["error"] else ""))


def main(argv: Sequence[str]) -> None:
  if not flags.FLAGS["seed"].present:
    flags.FLAGS.seed = DEFAULT_SEED
  common.start_driver()
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  problems = check_flags()
  if len(problems) == 1:
    common.fail(problems[0])
  if problems:
    common.fail(f"{len(problems)} problems: " +
                " ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))
  workdir = common.require_workdir()
  rounds, eval_every, target = MAX_ROUNDS.value, EVAL_EVERY, TARGET.value
  if common.SMOKE.value:
    rounds, eval_every, target = SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET
  start = time.perf_counter()
  results: dict[str, dict[str, dict[str, Any]]] = {}
  for algorithm in common.algorithm_list(DEFAULT_ALGORITHMS):
    home = os.path.join(workdir, f"home_{algorithm}")
    shutil.rmtree(home, ignore_errors=True)  # cold means a new, empty home folder
    os.makedirs(home)
    results[algorithm] = {}
    for state in CACHE_STATES:
      print(f"=== {algorithm}, {state} (HOME={home})", flush=True)
      r = time_one(algorithm, state, workdir, home, rounds, eval_every, target)
      results[algorithm][state] = r
      print(f"  {_fmt(r['seconds_to_target'], '.1f')} s to {target:g} at round "
            f"{_fmt(r['round_reached'], '')} (last accuracy "
            f"{_fmt(r['last_test_accuracy'], '.4f')})", flush=True)
    shutil.rmtree(home, ignore_errors=True)
  main_job = time_seeds(workdir, SEED_BATCH.value) if SEED_BATCH.value else None
  # JAX starts in this process only now, after the timed processes: on a GPU it would
  # otherwise hold (preallocate) device memory while they run.
  result = dict(
      versions=common.versions(), device=common.device_info(), argv=list(sys.argv),
      target=target, seed=common.SEED.value, fednest_reference_s=REFERENCE_S.value,
      fednest_reference="FedNest's PyTorch code at config A: 0.895 test accuracy after 300-500 "
                        "rounds at 0.221 s per round, at best about 66 s",
      settings=dict(max_rounds=rounds, eval_every=eval_every, config_a=list(CONFIG_A),
                    steps="presets" if PRESETS.value else "library defaults",
                    home="a new folder per algorithm (cold), then the same (warm)",
                    driver_flags=list(DRIVER_FLAGS.value),
                    poll_interval_s=POLL_S, smoke=common.SMOKE.value,
                    cpu_count=os.cpu_count(),
                    persistent_cache_min_compile_time_s=float(os.environ.get(
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0))),
      results=results, main_job=main_job, total_time_s=time.perf_counter() - start)
  path = os.path.join(workdir, "benchmark.json")
  from bilevel.metrics import write_json  # pylint: disable=g-import-not-at-top
  write_json(path, result)
  print_results(results, target)
  if main_job is not None:
    print(f"README main job, whole process: one seed {_fmt(main_job['one_seed_cold_s'], '.1f')} s "
          f"cold, {_fmt(main_job['one_seed_warm_s'], '.1f')} s warm; {main_job['num_seeds']} "
          f"seeds batched {_fmt(main_job['seeds_batched_warm_s'], '.1f')} s warm "
          f"({_fmt(main_job['seeds_batched_warm_over_one_seed'], '.1f')}x one seed; first "
          f"batched run {_fmt(main_job['seeds_batched_cold_s'], '.1f')} s), one after another "
          f"{_fmt(main_job['seeds_sequential_warm_s'], '.1f')} s "
          f"({_fmt(main_job['seeds_sequential_warm_over_one_seed'], '.1f')}x)")
  print(f"wrote {path}")
  failed = [f"{a} ({s})" for a, states in results.items() for s, r in states.items()
            if r["error"]]
  failed += [f"main job ({name})" for name in (main_job or {}).get("errors", {})]
  if failed:
    common.fail(f"the driver process of {', '.join(failed)} stopped with an error (its last "
                f"line is in {path}; its folder and driver.log are kept).")


if __name__ == "__main__":
  app.run(main)
