"""The benchmark's time_to_accuracy section (BENCHMARKS.md; docs/measurement.md): whole-process time
to a test accuracy at FedNest's config A, cold (new HOME) and warm, and the README main job."""
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
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
DEFAULTS = {"seed": 1, "algorithms": ["rafbo", "fednest"]}  # seed 1: FedNest's config A's
EVAL_EVERY, POLL_S, TERM_WAIT_S = 5, 0.2, 30.0
CONFIG_A = ("--num_clients=100", "--clients_per_round=10", "--partition=iid")
SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET = 4, 2, 0.0  # every record reaches the target
DRIVER = [sys.executable, "-m", "experiments.hyper_representation"]
PRESET = os.path.abspath(os.path.join(__file__, "../presets/hyper_representation_{}.cfg"))


def scan_metrics(path: str, target: float) -> tuple[dict | None, dict | None]:
  """(first record with test_accuracy >= target, last record with test_accuracy up to it)."""
  scored = [r for r in checkpoint.read_metrics(path, math.inf, rewrite=False)
            if isinstance(r.get("test_accuracy"), (int, float))]
  reached = next((r for r in scored if r["test_accuracy"] >= target), None)
  return reached, reached or (scored[-1] if scored else None)


def user_env(home: str) -> dict[str, str]:
  drop = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JAX_COMPILATION_CACHE_DIR", "MPLCONFIGDIR")
  return dict({k: v for k, v in os.environ.items() if k not in drop}, HOME=home)


def timed(name: str, args: list[str], home: str, target: float) -> tuple[dict, float, dict]:
  """(record, seconds, summary) of the driver with args and HOME=home, stopped once at target."""
  run_dir = tempfile.mkdtemp(prefix=f"{name}_", dir=common.WORKDIR.value)  # new: nothing stale
  cmd, log = [*DRIVER, f"--workdir={run_dir}", *args], os.path.join(run_dir, "driver.log")
  with open(log, "w", encoding="utf-8") as out:
    reached, start = None, time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=user_env(home))
  try:
    while reached is None and proc.returncode is None:
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=POLL_S)
      reached, last = scan_metrics(os.path.join(run_dir, "metrics.jsonl"), target)
      seconds = time.perf_counter() - start
    ended = proc.returncode is not None
  finally:
    proc.terminate()  # a process that has ended gets no signal, here or below
    with contextlib.suppress(subprocess.TimeoutExpired):
      proc.wait(timeout=TERM_WAIT_S)
    proc.kill()
    proc.wait()
  error, summary, path = None, {}, os.path.join(run_dir, "summary.json")
  if reached is None and proc.returncode != 0:  # a failed run's folder is kept
    with open(log, encoding="utf-8", errors="replace") as f:
      error = (f.read().strip().splitlines() or ["(no output)"])[-1]
  else:
    summary = read_json(path, "summary") if os.path.exists(path) else {}
    shutil.rmtree(run_dir, ignore_errors=True)
  reached, last, to_target = reached or {}, last or {}, seconds if reached else None
  cache = common.default_cache_dir(home)  # a warm run that adds no file to it loaded them all
  return dict(
      seconds_to_target=to_target, speedup=REFERENCE_S.value / to_target if to_target else None,
      round_reached=reached.get("round"), test_accuracy_at_target=reached.get("test_accuracy"),
      driver_reported_s=(reached["time_to_first_round_s"] - reached["first_round_s"]
                         + reached["wall_time_s"] if reached else None),  # its process age
      detected_after_exit=bool(reached) and ended,  # seconds include the exit
      last_round=last.get("round"), last_test_accuracy=last.get("test_accuracy"),
      **{k: last.get(k) for k in ("first_round_s", "time_to_first_round_s")},
      cache_files=len(os.listdir(cache)) if os.path.isdir(cache) else 0, exit_code=proc.returncode,
      error=error, command=" ".join(cmd[1:]), **({"log": log} if error else {})), seconds, summary


def check_flags() -> list[str]:
  names, known, batch = common.ALGORITHM_LIST.value, sorted(algorithms.names()), SEED_BATCH.value
  return [message for bad, message in (
      *((n not in known, f"--algorithms: unknown algorithm {n!r}.") for n in names),
      *((PRESETS.value and n in known and not os.path.isfile(PRESET.format(n)),
         f"--algorithms: {n} has no preset {PRESET.format(n)}.") for n in names),
      (not names or len(set(names)) != len(names),
       f"--algorithms={','.join(names)}: give one or more of {', '.join(known)}, each once."),
      (not 0 <= TARGET.value <= 1, f"--target={TARGET.value} is outside [0, 1]."),
      (not REFERENCE_S.value > 0, f"--fednest_reference_s={REFERENCE_S.value} must be > 0."),
      (batch == 1 or batch < 0, f"--seed_batch={batch} must be 0 (skip) or >= 2."),
      (MAX_ROUNDS.value < 1, f"--max_rounds={MAX_ROUNDS.value} must be >= 1."),
      (common.SEED.value < 0, f"--seed={common.SEED.value} must be >= 0."),
      (common.SEEDS.value, "--seeds is not used here: give one --seed.")) if bad]


def time_main_job(num_seeds: int) -> dict[str, Any]:
  """The README main job: one seed, num_seeds batched and one after another, in one new HOME."""
  seeds, smoke = f"--seeds={','.join(map(str, range(num_seeds)))}", ["--smoke"] * common.SMOKE.value
  out: dict[str, Any] = {"num_seeds": num_seeds, "commands": {}}
  with tempfile.TemporaryDirectory(prefix="home_main_", dir=common.WORKDIR.value) as home:
    for name, extra in (("one_seed_cold", []), ("one_seed_warm", []),
                        ("seeds_batched_cold", [seeds]), ("seeds_batched_warm", [seeds]),
                        ("seeds_sequential_warm", [seeds, "--nobatch_seeds"])):
      run, seconds, summary = timed(f"main_{name}", extra + smoke, home, math.inf)
      summary = summary.get("mean", summary)  # several seeds: the mean over them
      out[f"{name}_time_to_first_round_s"] = summary.get("time_to_first_round_s")
      out[f"{name}_s"] = seconds if run["exit_code"] == 0 else None
      out["commands"][name] = run["command"]
      if run["error"]:
        out.setdefault("errors", {})[name] = f"exit code {run['exit_code']}: {run['error']}"
      print(f"=== README main job, {name.replace('_', ' ')}: {fmt(out[f'{name}_s'], '.1f')} s",
            flush=True)
  for name in ("seeds_batched_warm", "seeds_sequential_warm"):
    one, many = out["one_seed_warm_s"], out[f"{name}_s"]
    out[f"{name}_over_one_seed"] = many / one if many and one else None
  return out


def figures(reps: int) -> dict[str, Any]:
  """Each --algorithms cold and warm to the target, then (--seed_batch) the README main job."""
  del reps
  rounds, eval_every, target = ((SMOKE_ROUNDS, SMOKE_EVAL_EVERY, SMOKE_TARGET) if common.SMOKE.value
                                else (MAX_ROUNDS.value, EVAL_EVERY, TARGET.value))
  results: dict[str, dict[str, Any]] = {algorithm: {} for algorithm in common.ALGORITHM_LIST.value}
  for algorithm in common.ALGORITHM_LIST.value:
    how = f"--flagfile={PRESET.format(algorithm)}" if PRESETS.value else f"--algorithm={algorithm}"
    args = [how, *CONFIG_A, f"--rounds={rounds}", f"--eval_every={eval_every}",
            f"--seed={common.SEED.value}", "--log_every=100000", *common.DRIVER_FLAGS.value]
    with tempfile.TemporaryDirectory(prefix=f"home_{algorithm}_", dir=common.WORKDIR.value) as home:
      for state in ("cold", "warm"):
        r = results[algorithm][state] = timed(f"{algorithm}_{state}", args, home, target)[0]
        print(f"=== {algorithm}, {state}: {fmt(r['seconds_to_target'], '.1f')} s to {target:g}, "
              f"round {fmt(r['round_reached'])}; error: {r['error']}", flush=True)
  main_job = time_main_job(SEED_BATCH.value) if SEED_BATCH.value else None
  failed = [f"{a} ({s})" for a, states in results.items() for s, r in states.items() if r["error"]]
  failed += [f"main job ({name})" for name in (main_job or {}).get("errors", {})]
  return {"time_to_accuracy": dict(
      target=target, seed=common.SEED.value, fednest_reference_s=REFERENCE_S.value,
      results=results, main_job=main_job, failed=failed,
      settings=dict(max_rounds=rounds, eval_every=eval_every, config_a=CONFIG_A,
                    steps="presets" if PRESETS.value else "library defaults",
                    driver_flags=common.DRIVER_FLAGS.value, poll_interval_s=POLL_S,
                    persistent_cache_min_compile_time_s=float(os.environ.get(
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0))))}
