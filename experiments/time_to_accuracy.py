"""Time to a test accuracy at FedNest's config A as a user waits for it: the whole process, from
its start, in a fresh home folder (cold) and again in the same one (warm).

  python -m experiments.time_to_accuracy --workdir=runs/tta

For each of --algorithms one hyper-representation driver process (`command`: the library's
default steps, or with --presets its tuned flagfile) runs with HOME a new empty folder (cold: no
JAX compilation cache, no matplotlib font cache; `user_env` drops the cache-folder variables),
then with the same HOME (warm). The time runs from just before the process starts to the moment
its metrics.jsonl first holds test_accuracy >= --target (polled every POLL_S s); the process is
then terminated. speedup = --fednest_reference_s / that time; driver_reported_s (the driver's
own process age at that record) is a cross-check. --seed_batch also times the README main job
(`time_seeds`). Writes WORKDIR/benchmark.json (BENCHMARKS.md) and prints a table.
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

# --algorithms and --driver_flags (common.py): the algorithms to time (default below) and flags
# added to every timed driver command, e.g. --driver_flags=--submodel=dense.
DEFAULT_ALGORITHMS = ("rafbo", "fednest")
DRIVER_FLAGS = common.DRIVER_FLAGS
TARGET = flags.DEFINE_float("target", 0.895, "Test accuracy (fraction) to reach.")
REFERENCE_S = flags.DEFINE_float("fednest_reference_s", 66.0, "FedNest's own time to the target "
                                 "(its PyTorch code: 300-500 rounds at 0.221 s per round).")
SEED_BATCH = flags.DEFINE_integer(
    "seed_batch", 10, "Also time the README main job, whole process: one seed cold and warm, "
    "and this many seeds batched (cold, warm) and one after another (warm). 0 skips it.")
PRESETS = flags.DEFINE_boolean("presets", False, "Run each algorithm from its tuned flagfile "
                               "(experiments/presets/hyper_representation_ALG.cfg) instead of the "
                               "library's default steps.")
MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 500, "Rounds a run may take (--rounds of the "
                                  "driver process); one that ends below the target counts null.")

DEFAULT_SEED = 1  # FedNest's config-A seed of the README (the shared --seed defaults to 0)
EVAL_EVERY = 5  # test accuracy every this many rounds
POLL_S = 0.2  # how often metrics.jsonl is read while the process runs
TERM_WAIT_S = 30.0  # after SIGTERM, wait this long before SIGKILL
CONFIG_A = ("--num_clients=100", "--clients_per_round=10", "--partition=iid")
# --smoke (tests): a few rounds and a target every record reaches, so each run returns at once.
SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET = 4, 2, 0.0
FEDNEST_REFERENCE = ("FedNest's PyTorch code at config A: 0.895 test accuracy after 300-500 "
                     "rounds at 0.221 s per round, at best about 66 s")


class Scan(NamedTuple):
  reached: dict[str, Any] | None  # the first record with test_accuracy >= target
  last: dict[str, Any] | None  # the last complete record holding test_accuracy


def scan_metrics(path: str, target: float) -> Scan:
  """Scan a driver's metrics.jsonl, possibly still being written (a torn last line, without its
  newline or not JSON, ends the scan; a missing file gives Scan(None, None))."""
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
    if isinstance(accuracy, (int, float)):
      last = record
      if accuracy >= target:
        reached = record
        break
  return Scan(reached, last)


def preset(algorithm: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets",
                      f"hyper_representation_{algorithm}.cfg")


def command(algorithm: str, run_dir: str, rounds: int, eval_every: int) -> list[str]:
  steps = f"--flagfile={preset(algorithm)}" if PRESETS.value else f"--algorithm={algorithm}"
  return [sys.executable, "-m", "experiments.hyper_representation", f"--workdir={run_dir}", steps,
          *CONFIG_A, f"--rounds={rounds}", f"--eval_every={eval_every}",
          f"--seed={common.SEED.value}", "--log_every=100000", *DRIVER_FLAGS.value]


def user_env(home: str) -> dict[str, str]:
  """This process's environment with HOME=home and no cache-folder overrides: a driver started
  with it keeps its compilation cache (and matplotlib its font cache) under home."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JAX_COMPILATION_CACHE_DIR",
                      "MPLCONFIGDIR")}
  return dict(env, HOME=home)


def cache_files(home: str) -> int:
  """Files in the driver's default compilation cache folder under home (user_env)."""
  folder = common.default_cache_dir(home)
  return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def _fresh(folder: str) -> str:
  shutil.rmtree(folder, ignore_errors=True)  # nothing stale to read, nothing to resume
  os.makedirs(folder)
  return folder


def time_one(algorithm: str, state: str, workdir: str, home: str, rounds: int,
             eval_every: int, target: float) -> dict[str, Any]:
  """One driver process, timed from just before it starts to the first record >= target."""
  run_dir = _fresh(os.path.join(workdir, f"{algorithm}_{state}"))
  log_path = os.path.join(run_dir, "driver.log")
  cmd = command(algorithm, run_dir, rounds, eval_every)
  seconds, after_exit = None, False
  with open(log_path, "w", encoding="utf-8") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=user_env(home))
    try:
      while True:
        ended = proc.poll() is not None  # checked before reading: a record written before
        scan = scan_metrics(os.path.join(run_dir, "metrics.jsonl"), target)  # exit is seen
        if scan.reached is not None:
          seconds, after_exit = time.perf_counter() - start, ended
          break
        if ended:
          break
        time.sleep(POLL_S)
    finally:
      if proc.poll() is None:  # SIGTERM (its checkpoint stays valid), SIGKILL if it lingers
        proc.terminate()
        try:
          proc.wait(timeout=TERM_WAIT_S)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
  reached, last = scan.reached or {}, scan.last or {}
  try:  # the driver's own process age at that record: its start-up + its run's wall time
    age = reached["time_to_first_round_s"] - reached["first_round_s"] + reached["wall_time_s"]
  except (KeyError, TypeError):
    age = None
  out = dict(
      seconds_to_target=seconds, round_reached=reached.get("round"),
      speedup=REFERENCE_S.value / seconds if seconds else None,
      test_accuracy_at_target=reached.get("test_accuracy"), driver_reported_s=age,
      # detected only once the process had ended (between two polls): seconds include its exit
      detected_after_exit=after_exit,
      last_round=last.get("round"), last_test_accuracy=last.get("test_accuracy"),
      first_round_s=last.get("first_round_s"),
      time_to_first_round_s=last.get("time_to_first_round_s"),
      # files in the compilation cache after the run: a warm run that adds none loaded them all
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


def time_seeds(workdir: str, num_seeds: int) -> dict[str, Any]:
  """The README main job, whole process: one seed (cold, warm cache) against num_seeds seeds
  batched (cold for the batched program, then warm) and one after another (warm)."""
  home = _fresh(os.path.join(workdir, "home_main"))
  seeds = f"--seeds={','.join(str(s) for s in range(num_seeds))}"
  runs = (("one_seed_cold", []), ("one_seed_warm", []), ("seeds_batched_cold", [seeds]),
          ("seeds_batched_warm", [seeds]), ("seeds_sequential_warm", [seeds, "--nobatch_seeds"]))
  out: dict[str, Any] = {"num_seeds": num_seeds, "commands": {}}
  for name, extra in runs:
    run_dir = _fresh(os.path.join(workdir, f"main_{name}"))
    log_path = os.path.join(workdir, f"main_{name}.log")
    cmd = [sys.executable, "-m", "experiments.hyper_representation", f"--workdir={run_dir}",
           *extra] + (["--smoke"] if common.SMOKE.value else [])
    print(f"=== main job: {name.replace('_', ' ')}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
      start = time.perf_counter()
      code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False,
                            env=user_env(home)).returncode
    out[f"{name}_s"] = time.perf_counter() - start if code == 0 else None
    out["commands"][name] = " ".join(cmd[1:])
    try:
      with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
      summary = summary.get("mean", summary)  # several seeds: the mean over them
      out[f"{name}_time_to_first_round_s"] = summary.get("time_to_first_round_s")
    except (OSError, ValueError):
      out[f"{name}_time_to_first_round_s"] = None
    if code != 0:
      out.setdefault("errors", {})[name] = f"exit code {code}, log {log_path}"
    else:
      shutil.rmtree(run_dir, ignore_errors=True)
    print(f"  {_fmt(out[f'{name}_s'], '.1f')} s", flush=True)
  for name in ("seeds_batched_warm", "seeds_sequential_warm"):
    one, many = out["one_seed_warm_s"], out[f"{name}_s"]
    out[f"{name}_over_one_seed"] = many / one if many and one else None
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
  return problems


def _fmt(value: Any, spec: str) -> str:
  """format(value, spec), or "-" padded to the spec's width for None."""
  if value is not None:
    return format(value, spec)
  width = "".join(c for c in spec.split(".")[0] if c.isdigit())
  return format("-", f">{width}") if width else "-"


def print_results(results: dict[str, dict[str, dict[str, Any]]], target: float,
                  main_job: dict[str, Any] | None) -> None:
  print(f"time to test accuracy {target:g} (whole process; FedNest's code: "
        f"{REFERENCE_S.value:g} s):")
  print(f"  {'algorithm':<10} {'cache':<5} {'seconds':>8} {'round':>6} {'speedup':>8} "
        f"{'first round s':>14}  last accuracy")
  for algorithm, states in results.items():
    for state, r in states.items():
      speedup = _fmt(r["speedup"], ".2f") + ("x" if r["speedup"] else "")
      print(f"  {algorithm:<10} {state:<5} {_fmt(r['seconds_to_target'], '8.1f')} "
            f"{_fmt(r['round_reached'], '>6')} {speedup:>8} "
            f"{_fmt(r['first_round_s'], '14.2f')}  {_fmt(r['last_test_accuracy'], '.4f')}"
            + (f"  error: {r['error']}" if r["error"] else ""))
  if main_job is not None:
    s = {k: _fmt(v, ".1f") for k, v in main_job.items() if k.endswith("_s") or "_over_" in k}
    print(f"README main job, whole process: one seed {s['one_seed_cold_s']} s cold, "
          f"{s['one_seed_warm_s']} s warm; {main_job['num_seeds']} seeds batched "
          f"{s['seeds_batched_warm_s']} s warm ({s['seeds_batched_warm_over_one_seed']}x one "
          f"seed; first batched run {s['seeds_batched_cold_s']} s), one after another "
          f"{s['seeds_sequential_warm_s']} s ({s['seeds_sequential_warm_over_one_seed']}x)")


def main(argv: Sequence[str]) -> None:
  if not flags.FLAGS["seed"].present:
    flags.FLAGS.seed = DEFAULT_SEED
  common.start_driver()
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.gather(check_flags())  # every problem in one error, --workdir's included
  workdir = common.require_workdir()
  rounds, eval_every, target = MAX_ROUNDS.value, EVAL_EVERY, TARGET.value
  if common.SMOKE.value:
    rounds, eval_every, target = SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET
  start = time.perf_counter()
  results: dict[str, dict[str, dict[str, Any]]] = {}
  for algorithm in common.algorithm_list(DEFAULT_ALGORITHMS):
    home = _fresh(os.path.join(workdir, f"home_{algorithm}"))  # cold: a new, empty home
    results[algorithm] = {}
    for state in ("cold", "warm"):
      print(f"=== {algorithm}, {state} (HOME={home})", flush=True)
      r = results[algorithm][state] = time_one(algorithm, state, workdir, home, rounds,
                                               eval_every, target)
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
      fednest_reference=FEDNEST_REFERENCE,
      settings=dict(max_rounds=rounds, eval_every=eval_every, config_a=list(CONFIG_A),
                    steps="presets" if PRESETS.value else "library defaults",
                    home="a new folder per algorithm (cold), then the same (warm)",
                    driver_flags=list(DRIVER_FLAGS.value), poll_interval_s=POLL_S,
                    smoke=common.SMOKE.value, cpu_count=os.cpu_count(),
                    persistent_cache_min_compile_time_s=float(os.environ.get(
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0))),
      results=results, main_job=main_job, total_time_s=time.perf_counter() - start)
  path = os.path.join(workdir, "benchmark.json")
  from bilevel.metrics import write_json  # pylint: disable=g-import-not-at-top
  write_json(path, result)
  print_results(results, target, main_job)
  print(f"wrote {path}")
  failed = [f"{a} ({s})" for a, states in results.items() for s, r in states.items()
            if r["error"]]
  failed += [f"main job ({name})" for name in (main_job or {}).get("errors", {})]
  if failed:
    common.fail(f"the driver process of {', '.join(failed)} stopped with an error (its last "
                f"line is in {path}; its folder and driver.log are kept).")


if __name__ == "__main__":
  app.run(main)
