"""What a RAFBO round costs (keep ratios, compact submodels, vmap, estimators, clients) and time
to accuracy: prints each figure, writes WORKDIR/benchmark.json (BENCHMARKS.md, docs/measurement.md).

  python -m experiments.benchmark --quick --workdir=runs/bench_q
  python -m experiments.benchmark --quick --compare=HEAD~1 --workdir=runs/cmp  # side by side
"""

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bilevel import algorithms, federated, hypergrad, masks, models, sharding, timing, tree
from bilevel.client import minibatch_sampler
from bilevel.metrics import commit, device_info, versions, write_json
from experiments import common, time_to_accuracy

REPS = flags.DEFINE_integer("reps", None, "Timed passes per figure at least (7; quick 5).")
MIN_TIME = flags.DEFINE_float("min_time_s", None, "Time each function this long (2 s; quick 1).")
IN_DIM = flags.DEFINE_integer("bench_in_dim", 784, "Input width of the MLP.")
CLASSES = flags.DEFINE_integer("bench_classes", 10, "Classes of the head.")
LOOP_CLIENTS = flags.DEFINE_list("loop_clients", ["10", "100"], "Client counts for vmap vs loop.")
SCALING = flags.DEFINE_list("scaling_clients", None, "Clients per round (10,100,1000; quick 100).")
EST_ROWS = flags.DEFINE_integer("estimator_rows", 1024, "Batch rows for the estimator costs.")
EST_STEPS = flags.DEFINE_integer("estimator_steps", 5, "num_steps of every estimator.")
KEEP_RATIOS = flags.DEFINE_list("keep_ratios", ["1", "0.5", "0.25"], "Keep ratios r (level r/r), "
                                "the first the reference.")
SECTIONS = flags.DEFINE_list("sections", ["keep_ratio", "compact_dense", "vmap_loop",
                                          "estimators", "scaling"], "Figures to take.")
COMPARE = flags.DEFINE_string("compare", None, "A git revision to benchmark side by side.")
PASSES = flags.DEFINE_integer("passes", 2, "Benchmark processes of each side for --compare.")
# Shared flags: --hidden (K), --batch_size (a client's rows and minibatch), --local_steps (1: RABO).
QUICK, HIDDEN, BATCH = common.QUICK, common.HIDDEN, common.BATCH_SIZE
CLIENTS, LOCAL_STEPS = common.CLIENTS_PER_ROUND, common.LOCAL_STEPS
BENCH_DEFAULTS = {"cpu_devices": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count(), "clients_per_round": 100, "local_steps": 2,
                  **time_to_accuracy.DEFAULTS}
# --smoke: --quick at tiny sizes; what is measured (--sections, --keep_ratios) stays as given.
SMOKE_SIZES = dict(quick=True, reps=1, min_time_s=0.0, bench_in_dim=8, hidden=8, batch_size=4,
                   clients_per_round=4, loop_clients=["2", "3"], scaling_clients=["2"],
                   estimator_rows=4, estimator_steps=1, local_steps=1)
PROFILE = "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5"
_COMPILED: dict[tuple[Any, ...], dict[str, Any]] = {}


def compiled_round(clients: int, levels: str, submodel: str = "compact",
                   per_round: int | None = None, mesh=None) -> dict[str, Any]:
  """A RAFBO round on synthetic clients, per_round (default all) sampled, one inner and one fd v
  step per local step, compiled once per configuration: {"run", "round", "state", "data",
  "peak_bytes", "temp_bytes"}."""
  key = (clients, levels, submodel, per_round or clients, mesh)
  if key not in _COMPILED:
    rng, shape = np.random.default_rng(0), (clients, BATCH.value)
    rows = [timing.synthetic_rows(rng, shape, IN_DIM.value, CLASSES.value) for _ in range(2)]
    x0, y0 = models.init_mlp(jax.random.key(0), IN_DIM.value, HIDDEN.value, CLASSES.value)
    alg = algorithms.get(
        "rafbo", problem=models.hyper_representation_problem(), num_clients=clients,
        clients_per_round=per_round or clients, local_steps=LOCAL_STEPS.value, inner_steps=1,
        estimator="fd", num_steps=1, levels=levels, layout=models.mlp_layout(HIDDEN.value),
        sample=minibatch_sampler(BATCH.value), submodel=submodel, sampling="stratified", mesh=mesh)
    rnd = alg.make_round(x0)
    state, data = sharding.replicate(
        (alg.init(x0, y0), federated.FederatedData(*rows, jnp.full(clients, shape[1]))), mesh)
    run, peak, temp = timing.compile_with_memory_plan(rnd.step.func, *rnd.step.args, state, data)
    _COMPILED[key] = dict(run=run, round=rnd, state=state, data=data, peak_bytes=peak,
                          temp_bytes=temp)
  return _COMPILED[key]


def median_times(fns: dict[str, Any], reps: int) -> dict[str, float]:
  return timing.median_times(fns, reps, MIN_TIME.value)


def one_level(ratio: float | str) -> str:  # "r/r:1", the keep-ratio figure's round at ratio r
  return "{0:g}/{0:g}:1".format(float(ratio))


def keep_ratio_figures(reps: int) -> dict[str, Any]:
  """Round time against keep ratio r (one level r/r), sharded over every device and on one."""
  ratios, n = [float(r) for r in KEEP_RATIOS.value], len(jax.devices())
  mesh = sharding.client_mesh() if n > 1 else None
  one = ([ratios[0], ratios[-1]] if QUICK.value else ratios) if mesh is not None else []
  runs = {f"{d}:{r}": compiled_round(CLIENTS.value, one_level(r), mesh=m)["run"]
          for d, m, rs in ((n, mesh, ratios), (1, None, one)) for r in rs}
  times = median_times(runs, reps)
  params = lambda r: (IN_DIM.value + 1 + CLASSES.value) * masks.host_keep_count(
      r, HIDDEN.value) + CLASSES.value  # a client's parameters at keep ratio r

  def figure(devices: int, rs: list[float]) -> dict[str, Any]:
    t = {r: times[f"{devices}:{r}"] for r in rs}
    return dict(round_time_s={str(r): v for r, v in t.items()},
                time_ratio={str(r): t[r] / t[rs[0]] for r in rs[1:]},
                **({"model": timing.linear_time_model(t)} if len(rs) >= 3 else {}))

  headline = figure(n, ratios)
  return {**{f"keep_ratio_{k}": v for k, v in headline.items()}, "keep_ratio_devices": n,
          "keep_ratio_flop_ratio": {str(r): params(r) / params(ratios[0]) for r in ratios[1:]},
          "keep_ratio_one_device": figure(1, one) if one else headline,
          "keep_ratio_max_leaf_rel_diff": {str(r): timing.max_leaf_rel_diff(
              *(runs[f"{d}:{r}"]()[0][:3] for d in (n, 1))) for r in one}}  # x, y and v


def compact_dense_figures(reps: int) -> dict[str, Any]:
  """Compact submodels against dense masked rounds (--quick: the one-level round only)."""
  one = one_level(KEEP_RATIOS.value[-1])
  cases, out = {**({} if QUICK.value else {"profile": PROFILE}), one.split("/")[0]: one}, {}
  for name, levels in cases.items():
    runs = {sub: compiled_round(CLIENTS.value, levels, sub)["run"] for sub in ("compact", "dense")}
    t = median_times(runs, reps)
    out[name] = dict(compact_s=t["compact"], dense_s=t["dense"], ratio=t["compact"] / t["dense"])
  return dict(compact_over_dense={"levels": cases, **out},
              compact_over_dense_time_ratio={k: v["ratio"] for k, v in out.items()})


def vmap_loop_figures(reps: int) -> dict[str, Any]:
  """The jitted vmapped round against a Python loop over the same jitted client function; one
  population of max(--loop_clients) clients, c of them sampled per round."""
  counts, detail, client = [int(s) for s in LOOP_CLIENTS.value], {}, None
  for c in counts:
    m = compiled_round(max(counts), "1/1:1", per_round=c)
    rnd, state, data = m["round"], m["state"], m["data"]
    client = client or jax.jit(rnd.client_fns[0])  # the client function does not depend on c
    server, ids = jax.jit(rnd.server_fn), [int(i) for i in rnd.sample_fn(state.round)[0]]
    loop = lambda: server(state, [tree.stack([client(state, data, jnp.asarray(i), jnp.asarray(s),
                                                     state.round) for s, i in enumerate(ids)])])
    t = median_times({"vmap": m["run"], "loop": loop}, reps)
    detail[str(c)] = dict(vmap_s=t["vmap"], loop_s=t["loop"])
  return dict(vmap_over_loop_time_ratio={c: t["vmap_s"] / t["loop_s"] for c, t in detail.items()},
              vmap_loop_detail=detail)


def estimator_figures(reps: int) -> dict[str, Any]:
  """Each estimator's time in units of one gradient of g (measured) next to the analytic count."""
  rng = np.random.default_rng(1)
  batch = timing.synthetic_rows(rng, (EST_ROWS.value,), IN_DIM.value, CLASSES.value)
  x, y = models.init_mlp(jax.random.key(0), IN_DIM.value, HIDDEN.value, CLASSES.value)
  v = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), y)  # random v
  ests = {name: hypergrad.named(name, num_steps=EST_STEPS.value) for name in hypergrad.ESTIMATORS}
  per, grad_s = timing.estimator_costs(models.hyper_representation_problem(), ests, x, y, v,
                                       batch, reps, MIN_TIME.value)
  return dict(estimator_cost_grad_evals={k: c["measured_grad_evals"] for k, c in per.items()},
              estimator_costs=dict(rows=EST_ROWS.value, num_steps=EST_STEPS.value,
                                   grad_time_s=grad_s, per_estimator=per))


def scaling_figures(reps: int) -> dict[str, Any]:
  """Round time and XLA's peak plan per clients per round (--quick: the one-level round)."""
  levels, rows = one_level(KEEP_RATIOS.value[-1]) if QUICK.value else PROFILE, []
  for c in map(int, SCALING.value or (["100"] if QUICK.value else ["10", "100", "1000"])):
    m = compiled_round(c, levels)
    t = median_times({"": m["run"]}, max(2, reps if c < 1000 else 2))[""]
    rows.append(dict(clients_per_round=c, levels=levels, round_time_s=t, rounds_per_s=1 / t,
                     peak_bytes=m["peak_bytes"], temp_bytes=m["temp_bytes"],
                     peak_bytes_per_client=m["peak_bytes"] and m["peak_bytes"] / c))
  return dict(clients_scaling=rows)


SECTION_FNS = {"time_to_accuracy": time_to_accuracy.figures, "keep_ratio": keep_ratio_figures,
               "compact_dense": compact_dense_figures, "vmap_loop": vmap_loop_figures,
               "estimators": estimator_figures, "scaling": scaling_figures}


def check_flags() -> list[str]:
  try:
    ratios_ok = len(KEEP_RATIOS.value) > 1 and all(0 < float(r) <= 1 for r in KEEP_RATIOS.value)
  except ValueError:
    ratios_ok = False
  small = [f"--{f.name}={f.value}" for f in (HIDDEN, BATCH, CLIENTS, LOCAL_STEPS) if f.value < 1]
  checks = {f"--keep_ratios={','.join(KEEP_RATIOS.value)} needs two or more numbers in (0, 1]; "
            "the first is the reference.": ratios_ok,
            f"{', '.join(small)}: the benchmark needs every size >= 1 (--batch_size is also each "
            "client's row count here; there is no full batch).": not small,
            f"--sections={','.join(SECTIONS.value)} has unknown names; allowed: "
            f"{', '.join(SECTION_FNS)}.": set(SECTIONS.value) <= set(SECTION_FNS),
            f"--passes={PASSES.value} must be >= 1.": PASSES.value >= 1}
  tta = time_to_accuracy.check_flags() if "time_to_accuracy" in SECTIONS.value else []
  return [problem for problem, ok in checks.items() if not ok] + tta


def main(argv):
  del argv
  reused = common.start_driver(dict(BENCH_DEFAULTS, **(SMOKE_SIZES if common.SMOKE.value else {})))
  reps = REPS.value or (5 if QUICK.value else 7)
  if MIN_TIME.value is None:
    flags.FLAGS.min_time_s = 1.0 if QUICK.value else 2.0
  common.gather(check_flags())
  workdir, path = common.require_workdir(), os.path.join(common.WORKDIR.value, "benchmark.json")
  if COMPARE.value:
    from scripts import compare_revisions  # pylint: disable=g-import-not-at-top
    return compare_revisions.revisions(COMPARE.value, PASSES.value, workdir)
  start, result = time.perf_counter(), {}
  for name in [s for s in SECTION_FNS if s in SECTIONS.value]:
    t0 = time.perf_counter()
    result.update(figures := SECTION_FNS[name](reps))
    print(f"== {name} ({time.perf_counter() - t0:.1f}s)")
    print(json.dumps(figures, indent=1, default=float))
  result.update(  # JAX starts here at the latest: the time_to_accuracy section runs without it
      total_time_s=time.perf_counter() - start, versions=versions(), device=device_info(),
      argv=sys.argv, commit=commit(os.path.dirname(os.path.abspath(__file__))), settings=dict(
          quick=QUICK.value, reps=reps, min_time_s=MIN_TIME.value, in_dim=IN_DIM.value,
          hidden=HIDDEN.value, classes=CLASSES.value, batch=BATCH.value, clients=CLIENTS.value,
          local_steps=LOCAL_STEPS.value, inner_steps=1, estimator="fd", dtype="float32",
          cpu_count=os.cpu_count(), cpu_devices=common.CPU_DEVICES.value,
          reuse_host_memory=reused, glibc_tunables=os.environ.get("GLIBC_TUNABLES", "")))
  write_json(path, result)
  print(f"wrote {path} in {result['total_time_s']:.0f}s")
  if failed := result.get("time_to_accuracy", {}).get("failed"):
    common.fail(f"the driver process of {', '.join(failed)} stopped with an error (its last "
                f"line is in {path}; its folder and driver.log are kept).")


if __name__ == "__main__":
  app.run(main)
