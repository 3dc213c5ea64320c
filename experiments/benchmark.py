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

from bilevel import algorithms, federated, hypergrad, masks, models, sharding, timing
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
PROFILE = common.LEVELS.default  # the drivers' default levels (README)
_COMPILED: dict[tuple[Any, ...], dict[str, Any]] = {}


def compiled_round(clients: int, levels: str, submodel: str = "compact",
                   per_round: int | None = None, mesh=None) -> dict[str, Any]:
  """A RAFBO round on synthetic clients, per_round (default all) sampled, one inner and one fd v
  step per local step, compiled once per configuration (timing.Build)."""
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
    state, data = sharding.replicate(
        (alg.init(x0, y0), federated.FederatedData(*rows, jnp.full(clients, shape[1]))), mesh)
    _COMPILED[key] = timing.compile_round(alg.make_round(x0), state, data)
  return _COMPILED[key]


def estimator_figures(reps: int) -> dict[str, Any]:
  """Each estimator's time in units of one gradient of g (measured) next to the analytic count."""
  rng = np.random.default_rng(1)
  batch = timing.synthetic_rows(rng, (EST_ROWS.value,), IN_DIM.value, CLASSES.value)
  x, y = models.init_mlp(jax.random.key(0), IN_DIM.value, HIDDEN.value, CLASSES.value)
  v = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), t.dtype), y)  # random v
  ests = {name: hypergrad.named(name, num_steps=EST_STEPS.value) for name in hypergrad.ESTIMATORS}
  return timing.estimator_figures(models.hyper_representation_problem(), ests, x, y, v, batch,
                                  EST_STEPS.value, reps, MIN_TIME.value)


SECTION_FNS = {  # name -> figures(reps)
    "time_to_accuracy": time_to_accuracy.figures,
    "keep_ratio": lambda reps: timing.keep_ratio_figures(
        compiled_round, [float(r) for r in KEEP_RATIOS.value], CLIENTS.value, reps,
        MIN_TIME.value, QUICK.value, params=lambda r: CLASSES.value + (  # a client's parameters
            IN_DIM.value + 1 + CLASSES.value) * masks.host_keep_count(r, HIDDEN.value)),
    "compact_dense": lambda reps: timing.compact_dense_figures(
        compiled_round, CLIENTS.value, KEEP_RATIOS.value[-1], PROFILE, reps, MIN_TIME.value,
        QUICK.value),
    "vmap_loop": lambda reps: timing.vmap_loop_figures(
        compiled_round, [int(s) for s in LOOP_CLIENTS.value], reps, MIN_TIME.value),
    "estimators": estimator_figures,
    "scaling": lambda reps: timing.scaling_figures(
        compiled_round, [int(c) for c in SCALING.value or ()], KEEP_RATIOS.value[-1], PROFILE,
        reps, MIN_TIME.value, QUICK.value)}


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
