"""Time to a test accuracy at FedNest's config A as a user waits for it, whole process, in a new
HOME (cold: no compilation or font cache) and again in it (warm); with --seed_batch also the
README main job's seeds. Writes WORKDIR/benchmark.json (BENCHMARKS.md; how the times are taken:
docs/measurement.md).

  python -m experiments.time_to_accuracy --workdir=runs/tta
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app, flags

from bilevel import algorithms, checkpoint
from bilevel.metrics import write_json
from experiments import common
from experiments.compare import read_json

TARGET = flags.DEFINE_float("target", 0.895, "Test accuracy (fraction) to reach.")
REFERENCE_S = flags.DEFINE_float("fednest_reference_s", 66.0, "FedNest's own time to the target "
                                 "(its PyTorch code: 300-500 rounds at 0.221 s per round).")
SEED_BATCH = flags.DEFINE_integer(
    "seed_batch", 10, "Also time the README main job, whole process: one seed cold and warm, "
    "and this many seeds batched (cold, warm) and one after another (warm). 0 skips it.")
PRESETS = flags.DEFINE_boolean("presets", False, "Run each algorithm from its tuned flagfile "
                               "(experiments/presets/hyper_representation_ALG.cfg).")
MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 500, "Rounds a run may take; one that ends below "
                                  "the target counts null.")
# --algorithms and --driver_flags (common.py): what to time, and flags for every timed process.
DEFAULTS = {"seed": 1, "algorithms": ["rafbo", "fednest"]}  # FedNest's config-A seed (README)
EVAL_EVERY, POLL_S, TERM_WAIT_S = 5, 0.2, 30.0
CONFIG_A = ("--num_clients=100", "--clients_per_round=10", "--partition=iid")
SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET = 4, 2, 0.0  # every record reaches the target
FEDNEST_REFERENCE = ("FedNest's PyTorch code at config A: 0.895 test accuracy after 300-500 "
                     "rounds at 0.221 s per round, at best about 66 s")
DRIVER = [sys.executable, "-m", "experiments.hyper_representation"]


def scan_metrics(path: str, target: float) -> tuple[dict | None, dict | None]:
  """(first record with test_accuracy >= target, last record with test_accuracy up to it) of a
  metrics.jsonl being written (its torn last line is not read)."""
  last = None
  for record in checkpoint.read_metrics(path, math.inf, rewrite=False):
    if isinstance(record.get("test_accuracy"), (int, float)):
      last = record
      if record["test_accuracy"] >= target:
        return record, last
  return None, last


def preset(algorithm: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets",
                      f"hyper_representation_{algorithm}.cfg")


def user_env(home: str) -> dict[str, str]:
  """This environment with HOME=home and no cache-folder variables: a driver started with it
  keeps its compilation cache (and matplotlib its font cache) under home."""
  drop = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JAX_COMPILATION_CACHE_DIR", "MPLCONFIGDIR")
  return dict({k: v for k, v in os.environ.items() if k not in drop}, HOME=home)


def cache_files(home: str) -> int:
  """Files in the driver's default compilation cache folder under home (user_env)."""
  folder = common.default_cache_dir(home)
  return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def _fresh(folder: str) -> str:
  shutil.rmtree(folder, ignore_errors=True)  # nothing stale to read, nothing to resume
  os.makedirs(folder)
  return folder


def timed(cmd: list[str], run_dir: str, home: str, target: float) -> tuple[Any, ...]:
  """(seconds, reached, last, ended, exit code) of cmd run with HOME=home until
  run_dir/metrics.jsonl holds test_accuracy >= target (then SIGTERM; SIGKILL after TERM_WAIT_S)
  or it ends; its output goes to run_dir/driver.log."""
  with open(os.path.join(run_dir, "driver.log"), "w", encoding="utf-8") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=user_env(home))
    try:
      while True:
        try:
          ended = proc.wait(timeout=POLL_S) is not None
        except subprocess.TimeoutExpired:
          ended = False
        reached, last = scan_metrics(os.path.join(run_dir, "metrics.jsonl"), target)
        seconds = time.perf_counter() - start
        if reached is not None or ended:
          break
    finally:
      if proc.poll() is None:
        proc.terminate()
        try:
          proc.wait(timeout=TERM_WAIT_S)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
  return seconds, reached, last, ended, proc.returncode


def _finish(run_dir: str, failed: bool) -> str | None:
  """A failed run's last line of driver.log (its folder is kept); else None, folder removed."""
  if not failed:
    return shutil.rmtree(run_dir, ignore_errors=True)
  with open(os.path.join(run_dir, "driver.log"), encoding="utf-8", errors="replace") as f:
    return (f.read().strip().splitlines() or ["(no output)"])[-1]


def time_algorithm(algorithm: str, state: str, home: str, rounds: int, eval_every: int,
                   target: float) -> dict[str, Any]:
  """One config-A driver process timed to the target (speedup: --fednest_reference_s over it)."""
  run_dir = _fresh(os.path.join(common.WORKDIR.value, f"{algorithm}_{state}"))
  steps = f"--flagfile={preset(algorithm)}" if PRESETS.value else f"--algorithm={algorithm}"
  cmd = [*DRIVER, f"--workdir={run_dir}", steps, *CONFIG_A, f"--rounds={rounds}",
         f"--eval_every={eval_every}", f"--seed={common.SEED.value}", "--log_every=100000",
         *common.DRIVER_FLAGS.value]
  seconds, reached, last, ended, code = timed(cmd, run_dir, home, target)
  seconds, reached, last = seconds if reached else None, reached or {}, last or {}
  try:  # the driver's own process age at that record: its start-up + its run's wall time
    age = reached["time_to_first_round_s"] - reached["first_round_s"] + reached["wall_time_s"]
  except (KeyError, TypeError):
    age = None
  error = _finish(run_dir, failed=not reached and code != 0)
  return dict(seconds_to_target=seconds, round_reached=reached.get("round"),
              speedup=REFERENCE_S.value / seconds if seconds else None,
              test_accuracy_at_target=reached.get("test_accuracy"), driver_reported_s=age,
              detected_after_exit=bool(reached) and ended,  # seconds include the exit
              last_round=last.get("round"), last_test_accuracy=last.get("test_accuracy"),
              first_round_s=last.get("first_round_s"),
              time_to_first_round_s=last.get("time_to_first_round_s"),
              cache_files=cache_files(home),  # a warm run that adds none loaded them all
              exit_code=code, error=error, command=" ".join(cmd[1:]),
              **({"log": os.path.join(run_dir, "driver.log")} if error else {}))


def time_seeds(num_seeds: int) -> dict[str, Any]:
  """The README main job, whole process: one seed (cold, warm) against num_seeds seeds batched
  (cold, warm) and one after another (warm), all in one new HOME."""
  home = _fresh(os.path.join(common.WORKDIR.value, "home_main"))
  seeds = f"--seeds={','.join(str(s) for s in range(num_seeds))}"
  out: dict[str, Any] = {"num_seeds": num_seeds, "commands": {}}
  for name, extra in (("one_seed_cold", []), ("one_seed_warm", []),
                      ("seeds_batched_cold", [seeds]), ("seeds_batched_warm", [seeds]),
                      ("seeds_sequential_warm", [seeds, "--nobatch_seeds"])):
    print(f"=== main job: {name.replace('_', ' ')}", flush=True)
    run_dir = _fresh(os.path.join(common.WORKDIR.value, f"main_{name}"))
    cmd = [*DRIVER, f"--workdir={run_dir}", *extra] + ["--smoke"] * common.SMOKE.value
    seconds, _, _, _, code = timed(cmd, run_dir, home, math.inf)
    try:
      summary = read_json(os.path.join(run_dir, "summary.json"), "summary")
      summary = summary.get("mean", summary)  # several seeds: the mean over them
      out[f"{name}_time_to_first_round_s"] = summary.get("time_to_first_round_s")
    except (OSError, ValueError):
      out[f"{name}_time_to_first_round_s"] = None
    out[f"{name}_s"], out["commands"][name] = seconds if code == 0 else None, " ".join(cmd[1:])
    if error := _finish(run_dir, failed=code != 0):
      out.setdefault("errors", {})[name] = f"exit code {code}: {error}"
    print(f"  {_fmt(out[f'{name}_s'], '.1f')} s", flush=True)
  for name in ("seeds_batched_warm", "seeds_sequential_warm"):
    one, many = out["one_seed_warm_s"], out[f"{name}_s"]
    out[f"{name}_over_one_seed"] = many / one if many and one else None
  shutil.rmtree(home, ignore_errors=True)
  return out


def check_flags() -> list[str]:
  names, known = common.ALGORITHM_LIST.value, sorted(algorithms.names())
  problems = [f"--algorithms={','.join(names)}: give one or more of {', '.join(known)}, each "
              "once."] if not names or len(set(names)) != len(names) else []
  problems += [f"--algorithms: unknown algorithm {n!r}." for n in names if n not in known]
  problems += [f"--algorithms: {n} has no preset {preset(n)}." for n in names
               if PRESETS.value and n in known and not os.path.isfile(preset(n))]
  checks = {f"--target={TARGET.value} is outside [0, 1].": 0 <= TARGET.value <= 1,
            f"--fednest_reference_s={REFERENCE_S.value} must be > 0.": REFERENCE_S.value > 0,
            f"--seed_batch={SEED_BATCH.value} must be 0 (skip) or >= 2.": SEED_BATCH.value != 1
            and SEED_BATCH.value >= 0,
            f"--max_rounds={MAX_ROUNDS.value} must be >= 1.": MAX_ROUNDS.value >= 1,
            f"--seed={common.SEED.value} must be >= 0.": common.SEED.value >= 0,
            "--seeds is not used here: give one --seed.": not common.SEEDS.value}
  return problems + [problem for problem, ok in checks.items() if not ok]


def _fmt(value: Any, spec: str = "") -> str:
  """format(value, spec), or "-" at the spec's width for None."""
  return format(value, spec) if value is not None else format("-", f">{spec.split('.')[0]}")


def main(argv: Sequence[str]) -> None:
  common.start_driver(DEFAULTS)
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  common.gather(check_flags())  # every problem in one error, --workdir's included
  workdir = common.require_workdir()
  rounds, eval_every, target = MAX_ROUNDS.value, EVAL_EVERY, TARGET.value
  if common.SMOKE.value:
    rounds, eval_every, target = SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET
  start, results = time.perf_counter(), {}
  for algorithm in common.ALGORITHM_LIST.value:
    home = _fresh(os.path.join(workdir, f"home_{algorithm}"))  # cold: a new, empty home
    for state in ("cold", "warm"):
      print(f"=== {algorithm}, {state} (HOME={home})", flush=True)
      r = results.setdefault(algorithm, {})[state] = time_algorithm(
          algorithm, state, home, rounds, eval_every, target)
      print(f"  {_fmt(r['seconds_to_target'], '.1f')} s to {target:g} at round "
            f"{_fmt(r['round_reached'])}: {_fmt(r['speedup'], '.2f')}x FedNest's "
            f"{REFERENCE_S.value:g} s; first round {_fmt(r['first_round_s'], '.2f')} s, last "
            f"accuracy {_fmt(r['last_test_accuracy'], '.4f')}"
            + (f"; error: {r['error']}" if r["error"] else ""), flush=True)
    shutil.rmtree(home, ignore_errors=True)
  main_job = time_seeds(SEED_BATCH.value) if SEED_BATCH.value else None
  path = os.path.join(workdir, "benchmark.json")
  write_json(path, dict(  # JAX starts here only now: on a GPU it would hold memory meanwhile
      versions=common.versions(), device=common.device_info(), argv=sys.argv, target=target,
      seed=common.SEED.value, fednest_reference_s=REFERENCE_S.value,
      fednest_reference=FEDNEST_REFERENCE,
      settings=dict(max_rounds=rounds, eval_every=eval_every, config_a=CONFIG_A,
                    steps="presets" if PRESETS.value else "library defaults",
                    home="a new folder per algorithm (cold), then the same (warm)",
                    driver_flags=common.DRIVER_FLAGS.value, poll_interval_s=POLL_S,
                    smoke=common.SMOKE.value, cpu_count=os.cpu_count(),
                    persistent_cache_min_compile_time_s=float(os.environ.get(
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0))),
      results=results, main_job=main_job, total_time_s=time.perf_counter() - start))
  if main_job is not None:
    print("README main job, whole process (s): " + ", ".join(
        f"{k} {_fmt(v, '.1f')}" for k, v in main_job.items()
        if k.endswith(("cold_s", "warm_s", "_seed"))))
  print(f"wrote {path}")
  failed = [f"{a} ({s})" for a, states in results.items() for s, r in states.items() if r["error"]]
  failed += [f"main job ({name})" for name in (main_job or {}).get("errors", {})]
  if failed:
    common.fail(f"the driver process of {', '.join(failed)} stopped with an error (its last "
                f"line is in {path}; its folder and driver.log are kept).")


if __name__ == "__main__":
  app.run(main)
