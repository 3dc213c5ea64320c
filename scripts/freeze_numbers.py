"""Freeze the numbers the drivers write, to check that a refactor changes none of them.

  python scripts/freeze_numbers.py record OUT_DIR [NAME ...]   run the commands, store records
  python scripts/freeze_numbers.py compare OUT_A OUT_B         exit 1 unless every record matches

`record` runs a fixed list of short driver commands (COMMANDS: both tasks, rafbo, rabo, fednest,
simfbo, memfbo, lfednest, full_only, heterofl, fedrolex, compact and dense submodels, batched
seeds, a run killed after its first checkpoint and resumed, coverage_rate --quick,
--diagnose_every), each in its own workdir under OUT_DIR/runs, and stores per command every
metrics.jsonl record and summary.json of its workdir (seed_S/ and unweighted/ subfolders
included) with the timing fields removed (TIMING_KEYS and any key ending in `_s`) in
OUT_DIR/NAME.json. `compare` checks exact equality of everything that remains.

Runs use their own JAX compilation cache (OUT_DIR/../cache), so they neither read nor fill the
user's cache that the timing benchmarks measure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

HR = "experiments.hyper_representation"
HC = "experiments.hyper_cleaning"
# name -> (module, flags[, environment]); a list of steps runs them one after another in one
# workdir (the resumed run: killed by the drivers' test hook after its first checkpoint, then
# the same command again resumes from it).
_SHORT = ["--rounds=4", "--eval_every=1", "--log_every=1"]
COMMANDS: dict[str, list[tuple[str, list[str], dict[str, str]]]] = {
    "hr_rafbo_compact": [(HR, _SHORT, {})],
    "hr_rafbo_dense": [(HR, _SHORT + ["--submodel=dense"], {})],
    "hr_rabo": [(HR, _SHORT + ["--algorithm=rabo"], {})],
    "hr_fednest": [(HR, ["--rounds=2", "--eval_every=1", "--algorithm=fednest"], {})],
    "hr_simfbo": [(HR, _SHORT + ["--algorithm=simfbo"], {})],
    "hr_memfbo_neumann": [(HR, ["--rounds=3", "--eval_every=1", "--algorithm=memfbo"], {})],
    "hr_lfednest": [(HR, ["--rounds=2", "--eval_every=1", "--algorithm=lfednest"], {})],
    "hr_full_only": [(HR, _SHORT + ["--algorithm=full_only"], {})],
    "hr_heterofl": [(HR, _SHORT + ["--algorithm=heterofl"], {})],
    "hr_fedrolex_dense": [(HR, _SHORT + ["--algorithm=fedrolex", "--submodel=dense"], {})],
    "hr_rafbo_variants_dense": [(HR, _SHORT + [
        "--submodel=dense", "--estimator=cg", "--num_steps=3", "--mask_policy=magnitude",
        "--redraw_levels", "--aggregation=zero_fill", "--inner_step=fixed", "--v_step=fixed",
        "--batch_size=32", "--outer_lr=0.02", "--num_clients=8", "--clients_per_round=5"], {})],
    "hr_cnn_compact": [(HR, ["--rounds=3", "--eval_every=1", "--model=cnn"], {})],
    "hr_seeds_batched": [(HR, _SHORT + ["--seeds=0,1"], {})],
    "hr_seeds_batched_dense": [(HR, _SHORT + ["--seeds=0,1", "--submodel=dense",
                                              "--algorithm=rabo"], {})],
    "hr_resumed": [(HR, ["--rounds=6", "--eval_every=1", "--checkpoint_every=2"],
                    {"BILEVEL_KILL_AFTER_CHECKPOINT": "1"}),
                   (HR, ["--rounds=6", "--eval_every=1", "--checkpoint_every=2"], {})],
    "hr_diagnose": [(HR, ["--rounds=4", "--eval_every=2", "--diagnose_every=2"], {})],
    "hc_rafbo": [(HC, _SHORT, {})],
    "hc_rabo_unweighted": [(HC, _SHORT + ["--algorithm=rabo", "--baseline_unweighted"], {})],
    "hc_fednest": [(HC, ["--rounds=2", "--eval_every=1", "--algorithm=fednest"], {})],
    "hc_simfbo_seeds": [(HC, _SHORT + ["--algorithm=simfbo", "--seeds=0,1"], {})],
    "hc_heterofl": [(HC, _SHORT + ["--algorithm=heterofl"], {})],
    "hc_fedrolex": [(HC, _SHORT + ["--algorithm=fedrolex"], {})],
    "hc_mlp_fullbatch": [(HC, _SHORT + ["--classifier=mlp", "--batch_size=0",
                                        "--mask_policy=static", "--allow_uncovered"], {})],
    "hc_resumed_seeds": [(HC, ["--rounds=4", "--eval_every=1", "--checkpoint_every=2",
                               "--seeds=0,1", "--baseline_unweighted"],
                          {"BILEVEL_KILL_AFTER_CHECKPOINT": "2"}),
                         (HC, ["--rounds=4", "--eval_every=1", "--checkpoint_every=2",
                               "--seeds=0,1", "--baseline_unweighted"], {})],
    "coverage_rate_quick": [("experiments.coverage_rate", ["--quick"], {})],
}

# Timing fields (measured, not computed): dropped before comparing, with every key ending in _s.
TIMING_KEYS = ("wall_time_s", "first_round_s", "time_to_first_round_s", "seconds", "time")


def _strip(obj):
  """obj without timing fields, recursively."""
  if isinstance(obj, dict):
    return {k: _strip(v) for k, v in obj.items()
            if k not in TIMING_KEYS and not k.endswith("_s")}
  if isinstance(obj, list):
    return [_strip(v) for v in obj]
  return obj


def _collect(workdir: str) -> dict:
  """Every metrics.jsonl record and summary.json under workdir, keyed by relative path."""
  out = {}
  for root, _, files in sorted(os.walk(workdir)):
    rel = os.path.relpath(root, workdir)
    for name in sorted(files):
      path = os.path.join(root, name)
      if name == "metrics.jsonl":
        with open(path, encoding="utf-8") as f:
          out[os.path.join(rel, name)] = [_strip(json.loads(line)) for line in f if line.strip()]
      elif name == "summary.json":
        with open(path, encoding="utf-8") as f:
          out[os.path.join(rel, name)] = _strip(json.load(f))
  return out


def record(out_dir: str, names: list[str]) -> int:
  names = names or list(COMMANDS)
  unknown = [n for n in names if n not in COMMANDS]
  if unknown:
    print(f"unknown commands: {unknown}; known: {list(COMMANDS)}")
    return 2
  os.makedirs(out_dir, exist_ok=True)
  cache = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "cache")
  failed = []
  start = time.perf_counter()
  for i, name in enumerate(names, 1):
    workdir = os.path.join(out_dir, "runs", name)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    rcs = []
    for module, args, env in COMMANDS[name]:
      cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *args]
      run_env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, **env)
      proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, check=False)
      with open(os.path.join(out_dir, f"{name}.log"), "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}  (env {env})\n{proc.stdout}{proc.stderr}\nrc={proc.returncode}\n")
      rcs.append(proc.returncode)
    # A step killed on purpose (the resume test hook) ends with SIGKILL (-9); the last step must
    # succeed.
    ok = rcs[-1] == 0 and all(rc in (0, -9) for rc in rcs[:-1])
    if not ok:
      failed.append(name)
    with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump({"commands": [[m, a, e] for m, a, e in COMMANDS[name]], "returncodes": rcs,
                 "records": _collect(workdir)}, f, indent=1, sort_keys=True)
    print(f"[{i}/{len(names)}] {name}: rc {rcs} {'ok' if ok else 'FAILED'} "
          f"({time.perf_counter() - t0:.0f} s, {time.perf_counter() - start:.0f} s total)",
          flush=True)
  if failed:
    print(f"failed: {failed} (logs: {out_dir}/NAME.log)")
    return 1
  return 0


def _first_difference(a, b, path="") -> str | None:
  if type(a) is not type(b):
    return f"{path}: {a!r} != {b!r}"
  if isinstance(a, dict):
    for k in sorted(set(a) | set(b)):
      if k not in a or k not in b:
        return f"{path}/{k}: only in {'B' if k not in a else 'A'}"
      d = _first_difference(a[k], b[k], f"{path}/{k}")
      if d:
        return d
    return None
  if isinstance(a, list):
    if len(a) != len(b):
      return f"{path}: {len(a)} != {len(b)} entries"
    for i, (u, v) in enumerate(zip(a, b)):
      d = _first_difference(u, v, f"{path}[{i}]")
      if d:
        return d
    return None
  return None if a == b else f"{path}: {a!r} != {b!r}"


def compare(dir_a: str, dir_b: str) -> int:
  names = sorted({f[:-5] for d in (dir_a, dir_b) for f in os.listdir(d) if f.endswith(".json")})
  bad = 0
  for name in names:
    paths = [os.path.join(d, f"{name}.json") for d in (dir_a, dir_b)]
    if not all(os.path.exists(p) for p in paths):
      print(f"{name}: MISSING in {'A' if not os.path.exists(paths[0]) else 'B'}")
      bad += 1
      continue
    a, b = [json.load(open(p, encoding="utf-8")) for p in paths]
    diff = _first_difference(a["records"], b["records"])
    if a["returncodes"] != b["returncodes"]:
      diff = f"return codes {a['returncodes']} != {b['returncodes']}"
    elif not a["records"]:
      diff = "no records"
    n = sum(len(v) if isinstance(v, list) else 1 for v in a["records"].values())
    print(f"{name}: {'identical' if diff is None else 'DIFFERENT'} ({n} records)"
          + (f"  first difference {diff}" if diff else ""))
    bad += diff is not None
  print(f"{len(names) - bad} of {len(names)} commands identical")
  return 1 if bad else 0


def main(argv: list[str]) -> int:
  if len(argv) >= 2 and argv[0] == "record":
    return record(argv[1], argv[2:])
  if len(argv) == 3 and argv[0] == "compare":
    return compare(argv[1], argv[2])
  print(__doc__)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
