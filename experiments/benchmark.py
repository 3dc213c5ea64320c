"""What pruning, compact submodels, vmap, estimators, client counts and devices cost per RAFBO
round: prints each figure and writes WORKDIR/benchmark.json (BENCHMARKS.md; how each figure is
taken: docs/measurement.md).

  python -m experiments.benchmark --quick --workdir=runs/bench_q
  python -m experiments.benchmark --quick --compare=HEAD~1 --workdir=runs/cmp  # side by side
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

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bilevel import algorithms, costs, federated, hypergrad, models, sharding, tree
from bilevel.client import minibatch_sampler
from bilevel.metrics import write_json
from experiments import common, compare

REPS = flags.DEFINE_integer("reps", None, "Timed passes per figure at least (default 7, quick 5).")
MIN_TIME = flags.DEFINE_float("min_time_s", None, "More passes until the fastest function was "
                              "timed this long in all (at most 100; default 2, quick 1).")
IN_DIM = flags.DEFINE_integer("bench_in_dim", 784, "Input width of the MLP.")
CLASSES = flags.DEFINE_integer("bench_classes", 10, "Classes of the head.")
LOOP_CLIENTS = flags.DEFINE_list("loop_clients", ["10", "100"], "Client counts for vmap vs loop.")
SCALING = flags.DEFINE_list("scaling_clients", None, "Clients per round for the scaling table "
                            "(default 10,100,1000; quick 100).")
EST_ROWS = flags.DEFINE_integer("estimator_rows", 1024, "Batch rows for the estimator costs.")
EST_STEPS = flags.DEFINE_integer("estimator_steps", 5, "num_steps of every estimator.")
DEVICES = flags.DEFINE_integer("bench_devices", 4, "Host devices of the device figure (0: off).")
KEEP_RATIOS = flags.DEFINE_list("keep_ratios", ["1", "0.5", "0.25"], "Keep ratios r (one level "
                                "r/r); the first is the reference.")
SECTIONS = flags.DEFINE_list("sections", ["keep_ratio", "compact_dense", "vmap_loop",
                                          "estimators", "scaling", "devices"], "Figures to take.")
COMPARE = flags.DEFINE_string("compare", None, "A git revision to measure side by side with this "
                              "checkout (alternating processes; WORKDIR/compare.json).")
PASSES = flags.DEFINE_integer("passes", 2, "Benchmark processes of each side for --compare.")
DEVICES_CHILD = flags.DEFINE_boolean("devices_child", False, "Internal: print the device figure.")
# Shared flags: --hidden (K), --batch_size (a client's rows and minibatch), --clients_per_round,
# --local_steps (1 = a RABO round), with the benchmark's own defaults.
QUICK, HIDDEN, BATCH = common.QUICK, common.HIDDEN, common.BATCH_SIZE
CLIENTS, LOCAL_STEPS = common.CLIENTS_PER_ROUND, common.LOCAL_STEPS
BENCH_DEFAULTS = {"cpu_devices": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count(), "clients_per_round": 100, "local_steps": 2}
# --smoke: --quick at tiny sizes; what is measured (--sections, --keep_ratios) stays as given.
SMOKE_SIZES = dict(quick=True, reps=1, min_time_s=0.0, bench_in_dim=8, hidden=8, batch_size=4,
                   clients_per_round=4, loop_clients=["2", "3"], scaling_clients=["2"],
                   estimator_rows=4, estimator_steps=1, local_steps=1)
MAX_PASSES = 100
PROFILE = "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5"


def median_times(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
  """Median wall time of each fn() after a warm-up call: passes call every fn in turn, at least
  `reps` of them, more until the fastest was timed --min_time_s in all (at most MAX_PASSES)."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  passes = reps
  while len(times[next(iter(fns))]) < passes:
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
    fastest = min(t[0] for t in times.values())
    passes = max(reps, min(MAX_PASSES, math.ceil(MIN_TIME.value / max(fastest, 1e-9))))
  return {name: statistics.median(t) for name, t in times.items()}


def round_time_model(times: dict[float, float]) -> dict[str, float]:
  """Least-squares t(r) = a + b r over keep ratios r; max_rel_residual: the worst relative miss."""
  b, a = statistics.linear_regression(list(times), list(times.values()))
  return dict(a_s=a, b_s=b, fixed_share_at_r1=a / (a + b),
              max_rel_residual=max(abs(a + b * r - t) / t for r, t in times.items()))


def _rows(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, jax.Array]:
  """Synthetic rows of MNIST shape (inputs, labels, weight)."""
  return {"inputs": jnp.asarray(rng.normal(size=shape + (IN_DIM.value,)), jnp.float32),
          "labels": jnp.asarray(rng.integers(0, CLASSES.value, shape)),
          "weight": jnp.ones(shape, jnp.float32)}


def _round(clients: int, levels: str, submodel: str = "compact", mesh=None, per_round=None):
  """(Round, state, data) of a RAFBO round on synthetic clients: `per_round` (default all) of
  them, stratified, one inner step and one fd v step per local step."""
  rng = np.random.default_rng(0)
  data = federated.FederatedData(_rows(rng, (clients, BATCH.value)),
                                 _rows(rng, (clients, BATCH.value)),
                                 jnp.full((clients,), BATCH.value))
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
  """{"run": () -> one round, "peak_bytes", "temp_bytes"} (XLA's plan: arguments + outputs +
  temporaries - aliased), compiled once per configuration."""
  key = (clients, levels, submodel, per_round or clients, mesh)
  if key not in _COMPILED:
    rnd, state, data = _round(clients, levels, submodel, mesh, per_round)
    step = rnd.step  # functools.partial(the jitted round, its RoundArgs)
    compiled = step.func.lower(*step.args, state, data).compile()
    mem = compiled.memory_analysis()
    temp = None if mem is None else int(mem.temp_size_in_bytes)
    peak = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        + temp - getattr(mem, "alias_size_in_bytes", 0))
    _COMPILED[key] = dict(run=lambda: compiled(*step.args, state, data), peak_bytes=peak,
                          temp_bytes=temp)
  return _COMPILED[key]


def keep_ratio_figures(reps: int) -> dict[str, Any]:
  """Round time against keep ratio r (one level r/r), sharded over every device, and on one
  device in the same passes (--quick: the first and last ratio)."""
  ratios, n = [float(r) for r in KEEP_RATIOS.value], len(jax.devices())
  mesh = sharding.client_mesh() if n > 1 else None
  one = ([ratios[0], ratios[-1]] if QUICK.value else ratios) if mesh is not None else []
  runs = {f"{n}:{r}": compiled_round(CLIENTS.value, f"{r:g}/{r:g}:1", mesh=mesh)["run"]
          for r in ratios}
  runs.update({f"1:{r}": compiled_round(CLIENTS.value, f"{r:g}/{r:g}:1")["run"] for r in one})
  times = median_times(runs, reps)

  def params(r: float) -> int:  # a client's parameters at k = ceil(r K) (masks.keep_count)
    return (IN_DIM.value + 1 + CLASSES.value) * math.ceil(r * HIDDEN.value) + CLASSES.value

  def figure(devices: int, rs: list[float]) -> dict[str, Any]:
    t = {r: times[f"{devices}:{r}"] for r in rs}
    return dict(round_time_s={str(r): v for r, v in t.items()},
                time_ratio={str(r): t[r] / t[rs[0]] for r in rs[1:]},
                **({"model": round_time_model(t)} if len(rs) >= 3 else {}))

  headline = figure(n, ratios)
  return dict(
      keep_ratio_devices=n, keep_ratio_round_time_s=headline["round_time_s"],
      keep_ratio_time_ratio=headline["time_ratio"],
      **({"keep_ratio_model": headline["model"]} if "model" in headline else {}),
      keep_ratio_flop_ratio={str(r): params(r) / params(ratios[0]) for r in ratios[1:]},
      keep_ratio_one_device=figure(1, one) if one else headline)


def _one_level() -> str:
  """The keep-ratio figure's last round, which --quick reuses instead of compiling PROFILE."""
  return "{0:g}/{0:g}:1".format(float(KEEP_RATIOS.value[-1]))


def compact_dense_figures(reps: int) -> dict[str, Any]:
  """Compact submodels against dense masked rounds (--quick: the one-level round only)."""
  cases = {} if QUICK.value else {"profile": PROFILE}
  cases[_one_level().split("/")[0]] = _one_level()
  out = {}
  for name, levels in cases.items():
    t = median_times({sub: compiled_round(CLIENTS.value, levels, sub)["run"]
                      for sub in ("compact", "dense")}, reps)
    out[name] = dict(compact_s=t["compact"], dense_s=t["dense"], ratio=t["compact"] / t["dense"])
  return dict(compact_over_dense={"levels": cases, **out},
              compact_over_dense_time_ratio={k: v["ratio"] for k, v in out.items()})


def vmap_loop_figures(reps: int) -> dict[str, Any]:
  """The jitted vmapped round against a Python loop over the same jitted client function; one
  population of max(--loop_clients) clients, c of them sampled per round."""
  counts = [int(s) for s in LOOP_CLIENTS.value]
  ratio, detail, client = {}, {}, None
  for c in counts:
    rnd, state, data = _round(max(counts), "1/1:1", per_round=c)
    client = client or jax.jit(rnd.client_fns[0])  # the client function does not depend on c
    server = jax.jit(rnd.server_fn)
    ids = [int(i) for i in rnd.sample_fn(state.round)[0]]

    def loop():
      outs = [client(state, data, jnp.asarray(i), jnp.asarray(s), state.round)
              for s, i in enumerate(ids)]
      return server(state, [tree.stack(outs)])

    t = median_times({"vmap": compiled_round(max(counts), "1/1:1", per_round=c)["run"],
                      "loop": loop}, reps)
    ratio[str(c)] = t["vmap"] / t["loop"]
    detail[str(c)] = dict(vmap_s=t["vmap"], loop_s=t["loop"])
  return dict(vmap_over_loop_time_ratio=ratio, vmap_loop_detail=detail)


def estimator_figures(reps: int) -> dict[str, Any]:
  """Each estimator's time in units of one gradient of g (measured) next to the analytic count."""
  rng = np.random.default_rng(1)
  batch = _rows(rng, (EST_ROWS.value,))
  x, y = models.init_mlp(jax.random.key(0), IN_DIM.value, HIDDEN.value, CLASSES.value)
  v = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), y)  # random v
  problem = models.hyper_representation_problem()
  grad_g = jax.jit(jax.grad(problem.inner_loss, argnums=(0, 1)))
  opts = hypergrad.EstimatorOptions(num_steps=EST_STEPS.value)
  runs = {"grad": lambda: grad_g(x, y, batch)}
  for name, est in hypergrad.ESTIMATORS.items():
    fn = jax.jit(lambda x, y, v, est=est: est(problem, x, y, batch, batch, v, None, None, opts))
    runs[name] = lambda fn=fn: fn(x, y, v)
  times = median_times(runs, reps)
  out = {est: dict(measured_grad_evals=times[est] / times["grad"],
                   analytic_grad_evals=costs.grad_evals_per_round(
                       local_steps=1, inner_steps=0, inner_step="fixed", estimator=est,
                       estimator_options=opts))
         for est in hypergrad.ESTIMATORS}
  return dict(estimator_cost_grad_evals={k: v["measured_grad_evals"] for k, v in out.items()},
              estimator_costs=dict(rows=EST_ROWS.value, num_steps=EST_STEPS.value,
                                   grad_time_s=times["grad"], per_estimator=out))


def scaling_figures(reps: int) -> dict[str, Any]:
  """Round time and XLA's peak plan per clients per round (--quick: the one-level round)."""
  levels, rows = _one_level() if QUICK.value else PROFILE, []
  for c in map(int, SCALING.value or (["100"] if QUICK.value else ["10", "100", "1000"])):
    m = compiled_round(c, levels)
    t = median_times({"": m["run"]}, max(2, reps if c < 1000 else 2))[""]
    rows.append(dict(clients_per_round=c, levels=levels, round_time_s=t, rounds_per_s=1 / t,
                     peak_bytes=m["peak_bytes"], temp_bytes=m["temp_bytes"],
                     peak_bytes_per_client=m["peak_bytes"] and m["peak_bytes"] / c))
  return dict(clients_scaling=rows)


def device_figures(reps: int) -> dict[str, Any]:
  """The same round on one device and sharded over all of this process's devices."""
  n, levels = len(jax.devices()), "1/1:1" if QUICK.value else PROFILE
  runs = {name: compiled_round(CLIENTS.value, levels, mesh=mesh)["run"]
          for name, mesh in (("1", None), (str(n), sharding.client_mesh()))}
  a, b = (run()[0] for run in runs.values())
  times = median_times(runs, reps)
  # max |a - b| / max |b| per leaf (float32; fd divides rounding by its probe length)
  diff = max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))) / max(np.max(np.abs(q)), 1e-30))
             for p, q in zip(jax.tree.leaves((a.x, a.y, a.v)), jax.tree.leaves((b.x, b.y, b.v))))
  return dict(devices={"count": n, "levels": levels, "round_time_s": times,
                       "time_ratio": times[str(n)] / times["1"],
                       "max_leaf_rel_diff_vs_one_device": diff,
                       "device_kind": jax.devices()[0].device_kind})


def _device_subprocess(reps: int) -> dict[str, Any]:
  """device_figures in a process of --bench_devices host CPU devices (its last line: JSON)."""
  argv = [sys.executable, "-m", "experiments.benchmark", *sys.argv[1:], "--devices_child",
          f"--cpu_devices={DEVICES.value}", f"--reps={reps}", f"--min_time_s={MIN_TIME.value}"]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, env=env)
  if proc.returncode != 0:
    return dict(devices={"error": proc.stderr[-2000:]})
  return json.loads(proc.stdout.strip().splitlines()[-1])


SECTION_FNS = {"keep_ratio": keep_ratio_figures, "compact_dense": compact_dense_figures,
               "vmap_loop": vmap_loop_figures, "estimators": estimator_figures,
               "scaling": scaling_figures, "devices": _device_subprocess}


def check_flags() -> list[str]:
  try:
    ratios_ok = len(KEEP_RATIOS.value) > 1 and all(0 < float(r) <= 1 for r in KEEP_RATIOS.value)
  except ValueError:
    ratios_ok = False
  problems = [] if ratios_ok else [f"--keep_ratios={','.join(KEEP_RATIOS.value)} needs two or "
                                   "more numbers in (0, 1]; the first is the reference."]
  small = [f"--{f.name}={f.value}" for f in (HIDDEN, BATCH, CLIENTS, LOCAL_STEPS) if f.value < 1]
  if small:
    problems.append(f"{', '.join(small)}: the benchmark needs every size >= 1 (--batch_size is "
                    "also each client's row count here; there is no full batch).")
  if set(SECTIONS.value) - set(SECTION_FNS):
    problems.append(f"--sections={','.join(SECTIONS.value)} has unknown names; allowed: "
                    f"{', '.join(SECTION_FNS)}.")
  return problems + ([f"--passes={PASSES.value} must be >= 1."] if PASSES.value < 1 else [])


def main(argv):
  del argv
  if common.SMOKE.value:
    for name, value in SMOKE_SIZES.items():
      setattr(flags.FLAGS, name, value)
  reused = common.start_driver(BENCH_DEFAULTS)
  reps = REPS.value or (5 if QUICK.value else 7)
  if MIN_TIME.value is None:
    flags.FLAGS.min_time_s = 1.0 if QUICK.value else 2.0
  if DEVICES_CHILD.value:
    print(json.dumps(device_figures(reps)))
    return
  common.gather(check_flags())
  workdir = common.require_workdir()
  if COMPARE.value:
    return compare.revisions(COMPARE.value, PASSES.value, workdir)
  start = time.perf_counter()
  result: dict[str, Any] = dict(
      versions=common.versions(), device=common.device_info(), argv=sys.argv,
      commit=compare.commit(), settings=dict(
          quick=QUICK.value, reps=reps, min_time_s=MIN_TIME.value, in_dim=IN_DIM.value,
          hidden=HIDDEN.value, classes=CLASSES.value, batch=BATCH.value, clients=CLIENTS.value,
          local_steps=LOCAL_STEPS.value, inner_steps=1, estimator="fd", dtype="float32",
          cpu_count=os.cpu_count(), cpu_devices=common.CPU_DEVICES.value,
          reuse_host_memory=reused, glibc_tunables=os.environ.get("GLIBC_TUNABLES", "")))
  for name, fn in SECTION_FNS.items():
    if name in SECTIONS.value and (name != "devices" or DEVICES.value > 0):
      t0 = time.perf_counter()
      result.update(figures := fn(reps))
      print(f"== {name} ({time.perf_counter() - t0:.1f}s)")
      print(json.dumps(figures, indent=1, default=float))
  result["total_time_s"] = time.perf_counter() - start
  write_json(os.path.join(workdir, "benchmark.json"), result)
  print(f"wrote {os.path.join(workdir, 'benchmark.json')} in {result['total_time_s']:.0f}s")


if __name__ == "__main__":
  app.run(main)
