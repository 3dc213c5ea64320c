"""Benchmark suite: what pruning, compact submodels, vmap, estimators, client counts and devices
cost per RAFBO round. Prints each figure and writes WORKDIR/benchmark.json (BENCHMARKS.md).

  python -m experiments.benchmark --workdir=runs/bench            # full (10/100/1000 clients)
  python -m experiments.benchmark --quick --workdir=runs/bench_q  # < 3 minutes on 2 CPU cores
  python -m experiments.benchmark --quick --compare=HEAD~1 --workdir=runs/cmp  # side by side

The round: the hyper-representation MLP on synthetic data of MNIST shape, local_steps x (one
inner step + the fd estimator with one v step) per client. Times are medians of interleaved
repetitions after a warm-up call (`median_times`); peak memory is XLA's plan for the compiled
round. The keep-ratio figure shards its rounds over one JAX device per CPU core (--cpu_devices)
next to the same rounds on one device; the device figure runs in a subprocess with
--bench_devices forced host devices; every other figure runs on one device.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags

from experiments import common

QUICK = common.QUICK  # fewer repetitions, client counts and compilations
REPS = flags.DEFINE_integer("reps", None, "Timed repetitions per figure (default 7, quick 5; "
                            "more for fast functions, see --min_time_s).")
MIN_TIME = flags.DEFINE_float("min_time_s", None, "Repeat each figure's functions until the "
                              "fastest was timed this long in all (at most 100 repetitions; "
                              "default 2, quick 1).")
IN_DIM = flags.DEFINE_integer("bench_in_dim", 784, "Input width of the MLP.")
CLASSES = flags.DEFINE_integer("bench_classes", 10, "Classes of the head.")
LOOP_CLIENTS = flags.DEFINE_list("loop_clients", ["10", "100"], "Client counts for vmap vs loop.")
SCALING = flags.DEFINE_list("scaling_clients", None, "Clients per round for the scaling table "
                            "(default 10,100,1000 on the three-level profile; quick 100 on "
                            "the keep-ratio figure's last round, already compiled).")
EST_ROWS = flags.DEFINE_integer("estimator_rows", 1024, "Batch rows for the estimator costs.")
EST_STEPS = flags.DEFINE_integer("estimator_steps", 5, "num_steps of every estimator.")
DEVICES = flags.DEFINE_integer("bench_devices", 4, "Forced host devices for the device figure "
                               "(0 skips it).")
KEEP_RATIOS = flags.DEFINE_list("keep_ratios", ["1", "0.5", "0.25"], "Keep ratios of the "
                                "keep-ratio figure (one level r/r; the first is the reference).")
SECTIONS = flags.DEFINE_list("sections", ["keep_ratio", "compact_dense",
                                         "vmap_loop", "estimators", "scaling", "devices"],
                             "Which figures to measure.")
COMPARE = flags.DEFINE_string(
    "compare", None, "A git revision of this repository to measure side by side with this "
    "checkout: --passes benchmark processes of each with the same flags, alternating (ref, this, "
    "this, ref, ...); writes WORKDIR/compare.json (every figure's medians and their ratio).")
PASSES = flags.DEFINE_integer("passes", 2, "Runs of each side for --compare.")
DEVICES_CHILD = flags.DEFINE_boolean("devices_child", False, "Internal: run the device figure "
                                     "in this (forced multi-device) process and print JSON.")
# Shared flags (common.py) read here: the MLP's hidden units K (--hidden), each client's rows,
# which are also its minibatch (--batch_size), clients per round of the keep-ratio,
# compact/dense and device figures (--clients_per_round) and --local_steps (1 = a RABO round).
HIDDEN, BATCH = common.HIDDEN, common.BATCH_SIZE
CLIENTS, LOCAL_STEPS = common.CLIENTS_PER_ROUND, common.LOCAL_STEPS
# The benchmark's own defaults of shared flags, applied in main() (not at import: a process that
# only imports this module, e.g. the test suite, keeps the drivers' defaults).
BENCH_DEFAULTS = {"cpu_devices": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count(), "clients_per_round": 100, "local_steps": 2}
# --smoke (tests): --quick with tiny sizes and one repetition; the flags that choose what is
# measured (--sections, --keep_ratios, --bench_devices) keep their values.
SMOKE_SIZES = dict(quick=True, reps=1, min_time_s=0.0, bench_in_dim=8, hidden=8, batch_size=4,
                   clients_per_round=4, loop_clients=["2", "3"], scaling_clients=["2"],
                   estimator_rows=4, estimator_steps=1, local_steps=1)
MAX_PASSES = 100
PROFILE = "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5"


def _min_time() -> float:
  return MIN_TIME.value if MIN_TIME.value is not None else (1.0 if QUICK.value else 2.0)


def median_times(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
  """Median wall time of each fn() (results blocked on) after one warm-up call each.

  Each pass calls every fn once, in turn, so slow spells of the shared cores fall on all of them
  alike. At least `reps` passes, more until the fastest fn was timed for --min_time_s in all (at
  most MAX_PASSES): the median of a few 30 ms calls on shared cores moves by tens of percent.
  """
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}

  def one_pass():
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)

  one_pass()
  fastest = min(t[0] for t in times.values())
  passes = max(reps, min(MAX_PASSES, math.ceil(_min_time() / max(fastest, 1e-9))))
  for _ in range(passes - 1):
    one_pass()
  return {name: statistics.median(t) for name, t in times.items()}


def _round(clients: int, levels: str, submodel: str = "compact", mesh=None,
           per_round: int | None = None):
  """(Round, state, data) of one RAFBO round: `per_round` (default all) of `clients` synthetic
  clients, stratified sampling, one inner step and one fd v step per local step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bilevel import algorithms, federated, models, sharding
  from bilevel.client import minibatch_sampler
  rng = np.random.default_rng(0)

  def split():
    shape = (clients, BATCH.value)
    return {"inputs": jnp.asarray(rng.normal(size=shape + (IN_DIM.value,)), jnp.float32),
            "labels": jnp.asarray(rng.integers(0, CLASSES.value, shape)),
            "weight": jnp.ones(shape, jnp.float32)}

  data = federated.FederatedData(split(), split(), jnp.full((clients,), BATCH.value))
  x0, y0 = models.init_mlp(jax.random.key(0), IN_DIM.value, HIDDEN.value, CLASSES.value)
  alg = algorithms.get(
      "rafbo", problem=models.hyper_representation_problem(), num_clients=clients,
      clients_per_round=per_round or clients, local_steps=LOCAL_STEPS.value, inner_steps=1,
      estimator="fd", num_steps=1, levels=levels, layout=models.mlp_layout(HIDDEN.value),
      sample=minibatch_sampler(BATCH.value), submodel=submodel, sampling="stratified",
      mesh=mesh)
  return (alg.make_round(x0),) + sharding.replicate((alg.init(x0, y0), data), mesh)


_COMPILED: dict[tuple[Any, ...], dict[str, Any]] = {}


def compiled_round(clients: int, levels: str, submodel: str = "compact",
                   per_round: int | None = None, mesh=None) -> dict[str, Any]:
  """{"run": () -> one round, "peak_bytes", "temp_bytes"}, compiled once per configuration
  (compilation dominates --quick; figures that share a round share its executable). Peak =
  XLA's plan: arguments + outputs + temporaries - aliased buffers."""
  key = (clients, levels, submodel, per_round or clients, mesh)
  if key not in _COMPILED:
    rnd, state, data = _round(clients, levels, submodel, mesh=mesh, per_round=per_round)
    step = rnd.step  # functools.partial(the jitted round, its RoundArgs)
    compiled = step.func.lower(*step.args, state, data).compile()
    mem = compiled.memory_analysis()
    peak = temp = None
    if mem is not None:
      temp = int(mem.temp_size_in_bytes)
      peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
                 - getattr(mem, "alias_size_in_bytes", 0))
    _COMPILED[key] = dict(run=lambda: compiled(*step.args, state, data), peak_bytes=peak,
                          temp_bytes=temp)
  return _COMPILED[key]


def _one_level() -> str:
  """The keep-ratio figure's last round (one level), which --quick reuses for compact/dense and
  scaling instead of compiling the profile (~20 s)."""
  r = f"{float(KEEP_RATIOS.value[-1]):g}"
  return f"{r}/{r}:1"


def round_time_model(times: dict[float, float]) -> dict[str, float]:
  """Least-squares fit t(r) = a + b r of round times against keep ratio (three or more r): a is
  the part of a round no keep ratio removes (sampling, minibatch gathers, server step, small
  ops), b the part that scales with r; t(r)/t(1) = (a + b r) / (a + b) then reads off what a keep
  ratio buys. max_rel_residual: the fit's worst relative miss on the measured points."""
  rs, ts = list(times), list(times.values())
  mr, mt = statistics.fmean(rs), statistics.fmean(ts)
  b = (sum((r - mr) * (t - mt) for r, t in zip(rs, ts)) / sum((r - mr) ** 2 for r in rs))
  a = mt - b * mr
  return dict(a_s=a, b_s=b, fixed_share_at_r1=a / (a + b),
              max_rel_residual=max(abs(a + b * r - t) / t for r, t in zip(rs, ts)))


def keep_ratio_figures(reps: int) -> dict[str, Any]:
  """Round time against keep ratio r (one level r/r), its clients sharded over every device of
  this process (XLA:CPU runs a pruned client's narrow GEMMs on one thread, so on one device the
  other cores idle at small r), and in the same passes on one device, the drivers' default
  (--quick: the first and last ratio only)."""
  import jax
  from bilevel import sharding
  ratios = [float(r) for r in KEEP_RATIOS.value]
  n = len(jax.devices())
  mesh = sharding.client_mesh() if n > 1 else None
  one = ([ratios[0], ratios[-1]] if QUICK.value else ratios) if mesh is not None else []
  runs = {f"{n}:{r}": compiled_round(CLIENTS.value, f"{r:g}/{r:g}:1", mesh=mesh)["run"]
          for r in ratios}
  runs.update({f"1:{r}": compiled_round(CLIENTS.value, f"{r:g}/{r:g}:1")["run"] for r in one})
  times = median_times(runs, reps)

  def params(r: float) -> int:  # a client's parameters at k = ceil(r K) (masks.keep_count)
    k = math.ceil(r * HIDDEN.value)
    return IN_DIM.value * k + k + k * CLASSES.value + CLASSES.value

  def figure(devices: int, rs: list[float]) -> dict[str, Any]:
    t = {r: times[f"{devices}:{r}"] for r in rs}
    out = dict(round_time_s={str(r): v for r, v in t.items()},
               time_ratio={str(r): t[r] / t[rs[0]] for r in rs[1:]})
    if len(rs) >= 3:
      out["model"] = round_time_model(t)
    return out

  headline = figure(n, ratios)
  return dict(
      keep_ratio_devices=n,
      keep_ratio_round_time_s=headline["round_time_s"],
      keep_ratio_time_ratio=headline["time_ratio"],
      **({"keep_ratio_model": headline["model"]} if "model" in headline else {}),
      keep_ratio_flop_ratio={str(r): params(r) / params(ratios[0]) for r in ratios[1:]},
      keep_ratio_one_device=figure(1, one) if one else headline)


def compact_dense_figures(reps: int) -> dict[str, Any]:
  """Compact submodels against dense masked rounds (--quick: the one-level round only)."""
  out = {}
  cases = (() if QUICK.value else (("profile", PROFILE),)) + (
      (_one_level().split("/")[0], _one_level()),)
  for name, levels in cases:
    t = median_times({sub: compiled_round(CLIENTS.value, levels, sub)["run"]
                      for sub in ("compact", "dense")}, reps)
    out[name] = dict(compact_s=t["compact"], dense_s=t["dense"],
                     ratio=t["compact"] / t["dense"])
  return dict(compact_over_dense={"levels": dict(cases), **out},
              compact_over_dense_time_ratio={k: v["ratio"] for k, v in out.items()})


def vmap_loop_figures(reps: int) -> dict[str, Any]:
  """The jitted vmapped round against a Python loop of the same client function, jitted once;
  one population of max(--loop_clients) clients, c of them sampled per round."""
  import jax
  import jax.numpy as jnp
  from bilevel import tree
  ratio, detail = {}, {}
  counts = [int(s) for s in LOOP_CLIENTS.value]
  population = max(counts)
  client = None
  for c in counts:
    rnd, state, data = _round(population, "1/1:1", per_round=c)
    client = client or jax.jit(rnd.client_fns[0])  # the client function does not depend on c
    server = jax.jit(rnd.server_fn)
    ids = [int(i) for i in rnd.sample_fn(state.round)[0]]

    def loop():
      outs = [client(state, data, jnp.asarray(i), jnp.asarray(s), state.round)
              for s, i in enumerate(ids)]
      return server(state, [tree.stack(outs)])

    t = median_times({"vmap": compiled_round(population, "1/1:1", per_round=c)["run"],
                      "loop": loop}, reps)
    ratio[str(c)] = t["vmap"] / t["loop"]
    detail[str(c)] = dict(vmap_s=t["vmap"], loop_s=t["loop"])
  return dict(vmap_over_loop_time_ratio=ratio, vmap_loop_detail=detail)


def estimator_figures(reps: int) -> dict[str, Any]:
  """Each estimator's time in units of one gradient of g (measured) next to the analytic count."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bilevel import costs, hypergrad, models
  rng = np.random.default_rng(1)
  rows = EST_ROWS.value
  batch = {"inputs": jnp.asarray(rng.normal(size=(rows, IN_DIM.value)), jnp.float32),
           "labels": jnp.asarray(rng.integers(0, CLASSES.value, rows)),
           "weight": jnp.ones(rows, jnp.float32)}
  x, y = models.init_mlp(jax.random.key(0), IN_DIM.value, HIDDEN.value, CLASSES.value)
  v = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), y)  # random v
  problem = models.hyper_representation_problem()
  grad_g = jax.jit(jax.grad(problem.inner_loss, argnums=(0, 1)))
  opts = hypergrad.EstimatorOptions(num_steps=EST_STEPS.value)
  runs = {"grad": lambda: grad_g(x, y, batch)}
  for est in hypergrad.ESTIMATORS:
    fn = jax.jit(lambda x, y, v, est=est: hypergrad.ESTIMATORS[est](
        problem, x, y, batch, batch, v, None, None, opts))
    runs[est] = lambda fn=fn: fn(x, y, v)
  times = median_times(runs, reps)
  out = {est: dict(measured_grad_evals=times[est] / times["grad"],
                   analytic_grad_evals=costs.grad_evals_per_round(
                       local_steps=1, inner_steps=0, inner_step="fixed", estimator=est,
                       estimator_options=opts))
         for est in hypergrad.ESTIMATORS}
  return dict(estimator_cost_grad_evals={k: v["measured_grad_evals"] for k, v in out.items()},
              estimator_costs=dict(rows=rows, num_steps=EST_STEPS.value,
                                   grad_time_s=times["grad"], per_estimator=out))


def scaling_figures(reps: int) -> dict[str, Any]:
  """Rounds per second and XLA's peak plan per clients per round: the three-level profile
  (--quick: the keep-ratio figure's last round, already compiled)."""
  levels = _one_level() if QUICK.value else PROFILE
  counts = SCALING.value or (["100"] if QUICK.value else ["10", "100", "1000"])
  rows = []
  for c in map(int, counts):
    m = compiled_round(c, levels)
    t = median_times({"": m["run"]}, max(2, reps if c < 1000 else 2))[""]
    peak = m["peak_bytes"]
    rows.append(dict(clients_per_round=c, levels=levels, round_time_s=t, rounds_per_s=1 / t,
                     peak_bytes=peak, temp_bytes=m["temp_bytes"],
                     peak_bytes_per_client=None if peak is None else peak / c))
  return dict(clients_scaling=rows)


def device_figures(reps: int) -> dict[str, Any]:
  """In a process with forced host devices: the same round on one device (no mesh) and on all."""
  import jax
  import numpy as np
  from bilevel import sharding
  n = len(jax.devices())
  levels = "1/1:1" if QUICK.value else PROFILE  # --quick: one client group to compile
  runs = {name: compiled_round(CLIENTS.value, levels, mesh=mesh)["run"]
          for name, mesh in (("1", None), (str(n), sharding.client_mesh()))}
  states = {name: run()[0] for name, run in runs.items()}
  times = median_times(runs, reps)
  a, b = states["1"], states[str(n)]
  # max |a - b| / max |b| per leaf (float32; fd divides rounding by its probe length)
  diff = max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))) / max(np.max(np.abs(q)), 1e-30))
             for p, q in zip(jax.tree.leaves((a.x, a.y, a.v)), jax.tree.leaves((b.x, b.y, b.v))))
  return dict(devices={"count": n, "levels": levels, "round_time_s": times,
                       "time_ratio": times[str(n)] / times["1"],
                       "max_leaf_rel_diff_vs_one_device": diff,
                       "device_kind": jax.devices()[0].device_kind})


def _device_subprocess(reps: int) -> dict[str, Any]:
  """The device figure from a subprocess with --bench_devices forced host devices (its JSON)."""
  sizes = ("bench_in_dim", "hidden", "bench_classes", "batch_size", "clients_per_round",
           "local_steps", "reuse_host_memory", "quick")
  argv = [sys.executable, "-m", "experiments.benchmark", "--devices_child", f"--reps={reps}",
          "--cpu_devices=1",  # the forced device count comes from XLA_FLAGS
          f"--min_time_s={_min_time()}", *(f"--{n}={flags.FLAGS[n].value}" for n in sizes)]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES.value}",
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
  if proc.returncode != 0:
    return dict(devices={"error": proc.stderr[-2000:]})
  return json.loads(proc.stdout.strip().splitlines()[-1])


SECTION_FNS = {"keep_ratio": keep_ratio_figures, "compact_dense": compact_dense_figures,
               "vmap_loop": vmap_loop_figures, "estimators": estimator_figures,
               "scaling": scaling_figures, "devices": _device_subprocess}


def commit() -> dict[str, Any] | None:
  """{"sha", "dirty"} of the git checkout holding this file (None outside one): which code the
  figures are of (dirty: tracked files differ from the commit)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True,
                                  timeout=60, check=True).stdout.strip()
  try:
    return {"sha": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
  except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
    return None


def _figures(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """The numeric figures of a benchmark.json, flattened to "a.b.c" names (settings aside)."""
  out: dict[str, float] = {}
  for key, value in result.items():
    if prefix == "" and key in ("versions", "device", "argv", "settings", "commit"):
      continue
    if isinstance(value, dict):
      out.update(_figures(value, f"{prefix}{key}."))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f"{prefix}{key}"] = float(value)
  return out


def compare(ref: str, passes: int, workdir: str) -> None:
  """--compare: revision `ref` and this checkout in alternating benchmark processes."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = os.path.abspath(workdir)  # the sides run in their own trees
  tree = os.path.join(workdir, "ref_tree")
  remove = ["git", "-C", here, "worktree", "remove", "--force", tree]
  subprocess.run(remove, capture_output=True, check=False)
  made = subprocess.run(["git", "-C", here, "worktree", "add", "--detach", tree, ref],
                        capture_output=True, text=True, check=False)
  if made.returncode != 0:
    common.fail(f"--compare={ref}: cannot check it out into {tree}: {made.stderr.strip()}")
  own = {"compare", "passes", "workdir", "nocompare", "nopasses", "noworkdir"}
  argv = [a for a in sys.argv[1:] if a.lstrip("-").split("=")[0] not in own]
  runs: dict[str, list[dict[str, float]]] = {"ref": [], "this": []}
  try:
    for i in range(passes):
      for side in (("ref", "this") if i % 2 == 0 else ("this", "ref")):
        root, out = (tree if side == "ref" else here), os.path.join(workdir, f"{side}_{i}")
        print(f"=== pass {i + 1}/{passes}: {side} ({ref if side == 'ref' else 'this checkout'})",
              flush=True)
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", *argv,
                               f"--workdir={out}"], cwd=root,
                              env=dict(os.environ, PYTHONPATH=root), check=False)
        if proc.returncode != 0:
          common.fail(f"--compare: the {side} benchmark process failed (exit "
                      f"{proc.returncode}); its output is above.")
        with open(os.path.join(out, "benchmark.json"), encoding="utf-8") as f:
          runs[side].append(_figures(json.load(f)))
  finally:
    subprocess.run(remove, capture_output=True, check=False)
  rows = {}
  for n in runs["this"][0]:
    if all(n in r for r in runs["ref"] + runs["this"]):
      a, b = (statistics.median(r[n] for r in runs[side]) for side in ("ref", "this"))
      rows[n] = {"ref": a, "this": b, "this_over_ref": b / a if a else None,
                 "ref_runs": [r[n] for r in runs["ref"]],
                 "this_runs": [r[n] for r in runs["this"]]}
  print(f"{'figure':<52} {ref[:12]:>12} {'this':>12} {'this/ref':>9}")
  for n, r in rows.items():
    if not n.endswith("total_time_s"):
      ratio = f"{r['this_over_ref']:.3f}" if r["this_over_ref"] is not None else "-"
      print(f"{n[:52]:<52} {r['ref']:>12.4g} {r['this']:>12.4g} {ratio:>9}")
  from bilevel.metrics import write_json
  write_json(os.path.join(workdir, "compare.json"),
             {"ref": ref, "this": commit(), "passes": passes, "argv": list(sys.argv),
              "figures": rows})
  print(f"wrote {os.path.join(workdir, 'compare.json')}")


def check_flags() -> None:
  try:
    bad = [r for r in KEEP_RATIOS.value if not 0 < float(r) <= 1]
  except ValueError:
    bad = KEEP_RATIOS.value
  if bad or len(KEEP_RATIOS.value) < 2:
    common.fail(f"--keep_ratios={','.join(KEEP_RATIOS.value)} needs two or more numbers in "
                "(0, 1]; the first is the reference the others are divided by.")
  small = [f"--{f.name}={f.value}" for f in (HIDDEN, BATCH, CLIENTS, LOCAL_STEPS) if f.value < 1]
  if small:
    common.fail(f"{', '.join(small)}: the benchmark needs every size >= 1 (--batch_size is also "
                "each client's row count here; there is no full batch).")
  unknown = set(SECTIONS.value) - set(SECTION_FNS)
  if unknown:
    common.fail(f"--sections has unknown names {sorted(unknown)}; allowed: "
                f"{', '.join(SECTION_FNS)}.")
  if COMPARE.value and PASSES.value < 1:
    common.fail(f"--passes={PASSES.value} must be >= 1.")


def main(argv):
  del argv
  for name, value in BENCH_DEFAULTS.items():
    if not flags.FLAGS[name].present:
      setattr(flags.FLAGS, name, value)
  if common.SMOKE.value and not DEVICES_CHILD.value:
    for name, value in SMOKE_SIZES.items():
      setattr(flags.FLAGS, name, value)
  host_memory_reused = common.start_driver()
  reps = REPS.value or (5 if QUICK.value else 7)
  if DEVICES_CHILD.value:
    print(json.dumps(device_figures(reps)))
    return
  check_flags()
  workdir = common.require_workdir()
  if COMPARE.value:
    compare(COMPARE.value, PASSES.value, workdir)
    return
  start = time.perf_counter()
  result: dict[str, Any] = dict(
      versions=common.versions(), device=common.device_info(), argv=list(sys.argv),
      commit=commit(),
      settings=dict(quick=QUICK.value, reps=reps, min_time_s=_min_time(), in_dim=IN_DIM.value,
                    hidden=HIDDEN.value, classes=CLASSES.value, batch=BATCH.value,
                    clients=CLIENTS.value, local_steps=LOCAL_STEPS.value, inner_steps=1,
                    estimator="fd", dtype="float32", cpu_count=os.cpu_count(),
                    cpu_devices=common.CPU_DEVICES.value, reuse_host_memory=host_memory_reused,
                    glibc_tunables=os.environ.get("GLIBC_TUNABLES", "")))
  for name, fn in SECTION_FNS.items():
    if name not in SECTIONS.value or (name == "devices" and DEVICES.value <= 0):
      continue
    t0 = time.perf_counter()
    figures = fn(reps)
    result.update(figures)
    print(f"== {name} ({time.perf_counter() - t0:.1f}s)")
    print(json.dumps(figures, indent=1, default=float))
  result["total_time_s"] = time.perf_counter() - start
  path = os.path.join(workdir, "benchmark.json")
  from bilevel.metrics import write_json
  write_json(path, result)
  print(f"wrote {path} in {result['total_time_s']:.0f}s")


if __name__ == "__main__":
  app.run(main)
