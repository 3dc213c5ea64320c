"""The benchmark's time_to_accuracy section: time to a test accuracy at FedNest's config A, whole
process, cold (new HOME) and warm, and the README main job (BENCHMARKS.md; docs/measurement.md).

  python -m experiments.benchmark --sections=time_to_accuracy --workdir=runs/tta
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from absl import flags

from bilevel import algorithms, checkpoint
from experiments import common
from experiments.compare import fmt, read_json

TARGET = flags.DEFINE_float("target", 0.895, "Test accuracy (fraction) to reach.")
REFERENCE_S = flags.DEFINE_float("fednest_reference_s", 66.0, "FedNest's own time to the target.")
SEED_BATCH = flags.DEFINE_integer("seed_batch", 10, "Seeds of the README main job (0: skip it).")
PRESETS = flags.DEFINE_boolean("presets", False, "Each algorithm from its tuned flagfile.")
MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 500, "Rounds a run may take.")
# Also --algorithms (what to time) and --driver_flags (common.py); seed 1: FedNest's config A's.
DEFAULTS = {"seed": 1, "algorithms": ["rafbo", "fednest"]}
EVAL_EVERY, POLL_S, TERM_WAIT_S = 5, 0.2, 30.0
CONFIG_A = ("--num_clients=100", "--clients_per_round=10", "--partition=iid")
SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET = 4, 2, 0.0  # every record reaches the target
FEDNEST_REFERENCE = ("FedNest's PyTorch code at config A: 0.895 test accuracy after 300-500 "
                     "rounds at 0.221 s per round, at best about 66 s")
DRIVER = [sys.executable, "-m", "experiments.hyper_representation"]
PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets",
                      "hyper_representation_{}.cfg")  # .format(algorithm)


def scan_metrics(path: str, target: float) -> tuple[dict | None, dict | None]:
  """(first record with test_accuracy >= target, last record with test_accuracy up to it)."""
  last = None
  for record in checkpoint.read_metrics(path, math.inf, rewrite=False):
    if isinstance(record.get("test_accuracy"), (int, float)):
      last = record
      if record["test_accuracy"] >= target:
        return record, last
  return None, last


def user_env(home: str) -> dict[str, str]:
  drop = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JAX_COMPILATION_CACHE_DIR", "MPLCONFIGDIR")
  return dict({k: v for k, v in os.environ.items() if k not in drop}, HOME=home)


def cache_files(home: str) -> int:
  folder = common.default_cache_dir(home)
  return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def _fresh(folder: str) -> str:
  shutil.rmtree(folder, ignore_errors=True)  # nothing stale to read, nothing to resume
  os.makedirs(folder)
  return folder


def timed(name: str, args: list[str], home: str, target: float) -> dict[str, Any]:
  """The driver with args in a new WORKDIR/name and HOME=home until its metrics reach target
  (then SIGTERM, SIGKILL after TERM_WAIT_S) or it ends; a failed run's folder is kept."""
  run_dir = _fresh(os.path.join(common.WORKDIR.value, name))
  cmd, log = [*DRIVER, f"--workdir={run_dir}", *args], os.path.join(run_dir, "driver.log")
  with open(log, "w", encoding="utf-8") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=user_env(home))
    try:
      reached, ended = None, False
      while reached is None and not ended:
        with contextlib.suppress(subprocess.TimeoutExpired):
          proc.wait(timeout=POLL_S)
        ended = proc.returncode is not None
        reached, last = scan_metrics(os.path.join(run_dir, "metrics.jsonl"), target)
        seconds = time.perf_counter() - start
    finally:
      proc.terminate()  # a process that has ended gets no signal
      try:
        proc.wait(timeout=TERM_WAIT_S)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
  run = dict(seconds=seconds, reached=reached or {}, last=last or {}, ended=ended, log=log,
             code=proc.returncode, command=" ".join(cmd[1:]), error=None, summary={})
  summary = os.path.join(run_dir, "summary.json")
  if reached is None and proc.returncode != 0:
    with open(log, encoding="utf-8", errors="replace") as f:
      run["error"] = (f.read().strip().splitlines() or ["(no output)"])[-1]
  else:
    run["summary"] = read_json(summary, "summary") if os.path.exists(summary) else {}
    shutil.rmtree(run_dir, ignore_errors=True)
  return run


def time_main_job(num_seeds: int) -> dict[str, Any]:
  """The README main job: one seed (cold, warm), num_seeds batched (cold, warm) and one after
  another (warm), all in one new HOME."""
  home = _fresh(os.path.join(common.WORKDIR.value, "home_main"))
  seeds = f"--seeds={','.join(str(s) for s in range(num_seeds))}"
  out: dict[str, Any] = {"num_seeds": num_seeds, "commands": {}}
  for name, extra in (("one_seed_cold", []), ("one_seed_warm", []),
                      ("seeds_batched_cold", [seeds]), ("seeds_batched_warm", [seeds]),
                      ("seeds_sequential_warm", [seeds, "--nobatch_seeds"])):
    run = timed(f"main_{name}", extra + ["--smoke"] * common.SMOKE.value, home, math.inf)
    summary = run["summary"].get("mean", run["summary"])  # several seeds: the mean over them
    out[f"{name}_time_to_first_round_s"] = summary.get("time_to_first_round_s")
    out[f"{name}_s"] = run["seconds"] if run["code"] == 0 else None
    out["commands"][name] = run["command"]
    if run["error"]:
      out.setdefault("errors", {})[name] = f"exit code {run['code']}: {run['error']}"
    print(f"=== README main job, {name.replace('_', ' ')}: {fmt(out[f'{name}_s'], '.1f')} s",
          flush=True)
  for name in ("seeds_batched_warm", "seeds_sequential_warm"):
    one, many = out["one_seed_warm_s"], out[f"{name}_s"]
    out[f"{name}_over_one_seed"] = many / one if many and one else None
  shutil.rmtree(home, ignore_errors=True)
  return out


def check_flags() -> list[str]:
  names, known = common.ALGORITHM_LIST.value, sorted(algorithms.names())
  problems = [f"--algorithms: unknown algorithm {n!r}." for n in names if n not in known]
  problems += [f"--algorithms: {n} has no preset {PRESET.format(n)}." for n in names
               if PRESETS.value and n in known and not os.path.isfile(PRESET.format(n))]
  checks = {f"--algorithms={','.join(names)}: give one or more of {', '.join(known)}, each "
            "once.": names and len(set(names)) == len(names),
            f"--target={TARGET.value} is outside [0, 1].": 0 <= TARGET.value <= 1,
            f"--fednest_reference_s={REFERENCE_S.value} must be > 0.": REFERENCE_S.value > 0,
            f"--seed_batch={SEED_BATCH.value} must be 0 (skip) or >= 2.": SEED_BATCH.value != 1
            and SEED_BATCH.value >= 0,
            f"--max_rounds={MAX_ROUNDS.value} must be >= 1.": MAX_ROUNDS.value >= 1,
            f"--seed={common.SEED.value} must be >= 0.": common.SEED.value >= 0,
            "--seeds is not used here: give one --seed.": not common.SEEDS.value}
  return problems + [problem for problem, ok in checks.items() if not ok]


def figures(reps: int) -> dict[str, Any]:
  """Each --algorithms cold and warm to the target, then (--seed_batch) the README main job."""
  del reps
  rounds, eval_every, target = (MAX_ROUNDS.value, EVAL_EVERY, TARGET.value)
  if common.SMOKE.value:
    rounds, eval_every, target = SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET
  results: dict[str, dict[str, Any]] = {}
  for algorithm in common.ALGORITHM_LIST.value:
    home = _fresh(os.path.join(common.WORKDIR.value, f"home_{algorithm}"))  # cold: new, empty
    steps = (f"--flagfile={PRESET.format(algorithm)}" if PRESETS.value
             else f"--algorithm={algorithm}")
    args = [steps, *CONFIG_A, f"--rounds={rounds}", f"--eval_every={eval_every}",
            f"--seed={common.SEED.value}", "--log_every=100000", *common.DRIVER_FLAGS.value]
    for state in ("cold", "warm"):
      run = timed(f"{algorithm}_{state}", args, home, target)
      reached, last = run["reached"], run["last"]
      seconds = run["seconds"] if reached else None
      r = results.setdefault(algorithm, {})[state] = dict(
          seconds_to_target=seconds, speedup=REFERENCE_S.value / seconds if seconds else None,
          round_reached=reached.get("round"), test_accuracy_at_target=reached.get("test_accuracy"),
          driver_reported_s=(reached["time_to_first_round_s"] - reached["first_round_s"]
                             + reached["wall_time_s"] if reached else None),  # its process age
          detected_after_exit=bool(reached) and run["ended"],  # seconds include the exit
          last_round=last.get("round"), last_test_accuracy=last.get("test_accuracy"),
          first_round_s=last.get("first_round_s"),
          time_to_first_round_s=last.get("time_to_first_round_s"),
          cache_files=cache_files(home),  # a warm run that adds none loaded them all
          exit_code=run["code"], error=run["error"], command=run["command"],
          **({"log": run["log"]} if run["error"] else {}))
      print(f"=== {algorithm}, {state}: {fmt(r['seconds_to_target'], '.1f')} s to {target:g}, "
            f"round {fmt(r['round_reached'])}; error: {r['error']}", flush=True)
    shutil.rmtree(home, ignore_errors=True)
  main_job = time_main_job(SEED_BATCH.value) if SEED_BATCH.value else None
  failed = [f"{a} ({s})" for a, states in results.items() for s, r in states.items() if r["error"]]
  failed += [f"main job ({name})" for name in (main_job or {}).get("errors", {})]
  return {"time_to_accuracy": dict(
      target=target, seed=common.SEED.value, fednest_reference_s=REFERENCE_S.value,
      fednest_reference=FEDNEST_REFERENCE, results=results, main_job=main_job, failed=failed,
      settings=dict(max_rounds=rounds, eval_every=eval_every, config_a=CONFIG_A,
                    steps="presets" if PRESETS.value else "library defaults",
                    driver_flags=common.DRIVER_FLAGS.value, poll_interval_s=POLL_S,
                    persistent_cache_min_compile_time_s=float(os.environ.get(
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0))))}
