"""Timing of compiled JAX programs: interleaved median wall times, a linear time model, XLA's
memory plan, leaf differences, synthetic rows, estimators' costs, and the benchmark's round
figures for any algorithm's round builder (docs/measurement.md)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bilevel import costs, sharding, tree
from bilevel.hypergrad import Estimator
from bilevel.problems import BilevelProblem
from bilevel.tree import PyTree


def median_times(fns: Mapping[str, Callable[[], Any]], reps: int, min_time_s: float,
                 max_passes: int = 100, clock: Callable[[], float] = time.perf_counter
                 ) -> dict[str, float]:
  """Median wall time of each fn() after a warm-up call, over passes that call each in turn: at
  least reps passes, more until the fastest first pass adds up to min_time_s (max_passes)."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  passes = reps
  while len(times[next(iter(fns))]) < passes:
    for name, fn in fns.items():
      start = clock()
      jax.block_until_ready(fn())
      times[name].append(clock() - start)
    fastest = min(t[0] for t in times.values())
    passes = max(reps, min(max_passes, math.ceil(min_time_s / max(fastest, 1e-9))))
  return {name: statistics.median(t) for name, t in times.items()}


def linear_time_model(times: Mapping[float, float]) -> dict[str, float]:
  """Least-squares t(r) = a + b r; fixed_share_at_r1 = a / (a + b); max_rel_residual: the worst
  relative miss."""
  b, a = statistics.linear_regression(list(times), list(times.values()))
  return dict(a_s=a, b_s=b, fixed_share_at_r1=a / (a + b),
              max_rel_residual=max(abs(a + b * r - t) / t for r, t in times.items()))


def max_leaf_rel_diff(a: PyTree, b: PyTree) -> float:
  """The largest max |a - b| / max |b| over the leaves of two trees of one structure."""
  leaves = [[np.asarray(t) for t in jax.tree.leaves(tree)] for tree in (a, b)]
  return max(float(np.max(np.abs(p - q)) / max(np.max(np.abs(q)), 1e-30)) for p, q in zip(*leaves))


def synthetic_rows(rng: np.random.Generator, shape: tuple[int, ...], in_dim: int,
                   classes: int) -> dict[str, jax.Array]:
  """Normal inputs [*shape, in_dim] (float32), uniform labels in [0, classes), weight 1."""
  return {"inputs": jnp.asarray(rng.normal(size=shape + (in_dim,)), jnp.float32),
          "labels": jnp.asarray(rng.integers(0, classes, shape)),
          "weight": jnp.ones(shape, jnp.float32)}


def compile_with_memory_plan(fn: Any, *args: Any
                             ) -> tuple[Callable[[], Any], int | None, int | None]:
  """fn (jitted) compiled for args: (run, peak_bytes, temp_bytes), run() = fn(*args); XLA's plan,
  peak = arguments + outputs + temporaries - aliased (None where the backend has no plan)."""
  compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = None if mem is None else int(mem.temp_size_in_bytes)
  peak = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                      + temp - getattr(mem, "alias_size_in_bytes", 0))
  return lambda: compiled(*args), peak, temp


def estimator_costs(problem: BilevelProblem, estimators: Mapping[str, Estimator], x: PyTree,
                    y: PyTree, v: PyTree, batch: PyTree, reps: int, min_time_s: float
                    ) -> tuple[dict[str, dict[str, float]], float]:
  """Each estimator's median time (jitted, batch on both levels) in units of one gradient of the
  inner loss g in (x, y), next to its analytic count (costs); and that gradient's seconds."""
  grad_g = jax.jit(jax.grad(problem.inner_loss, argnums=(0, 1)))
  runs = {"grad": lambda: grad_g(x, y, batch)}
  for name, est in estimators.items():
    fn = jax.jit(lambda x, y, v, est=est: est(problem, x, y, batch, batch, v))
    runs[name] = lambda fn=fn: fn(x, y, v)
  times = median_times(runs, reps, min_time_s)
  return {name: dict(measured_grad_evals=times[name] / times["grad"],
                     analytic_grad_evals=costs.grad_evals_per_round(
                         local_steps=1, inner_steps=0, inner_step="fixed", estimator=est))
          for name, est in estimators.items()}, times["grad"]


def estimator_figures(problem: BilevelProblem, estimators: Mapping[str, Estimator], x: PyTree,
                      y: PyTree, v: PyTree, batch: PyTree, num_steps: int, reps: int,
                      min_time_s: float) -> dict[str, Any]:
  """estimator_costs as the benchmark's figure (rows: batch's leading size)."""
  per, grad_s = estimator_costs(problem, estimators, x, y, v, batch, reps, min_time_s)
  return dict(estimator_cost_grad_evals={k: c["measured_grad_evals"] for k, c in per.items()},
              estimator_costs=dict(rows=jax.tree.leaves(batch)[0].shape[0], num_steps=num_steps,
                                   grad_time_s=grad_s, per_estimator=per))


class Build(Protocol):
  """A round builder, compiled once per configuration: {"run": run() one round, "round":
  federated.Round, "state", "data", "peak_bytes", "temp_bytes"} (compile_with_memory_plan)."""

  def __call__(self, clients: int, levels: str, submodel: str = "compact",
               per_round: int | None = None, mesh: Mesh | None = None) -> dict[str, Any]:
    ...


def compile_round(rnd: Any, state: PyTree, data: PyTree) -> dict[str, Any]:
  """A federated.Round's step compiled for (state, data): what a Build returns."""
  run, peak, temp = compile_with_memory_plan(rnd.step.func, *rnd.step.args, state, data)
  return dict(run=run, round=rnd, state=state, data=data, peak_bytes=peak, temp_bytes=temp)


def one_level(ratio: float | str) -> str:
  """The levels "r/r:1": every client at keep ratio r."""
  return "{0:g}/{0:g}:1".format(float(ratio))


def keep_ratio_figures(build: Build, ratios: Sequence[float], clients: int, reps: int,
                       min_time_s: float, quick: bool, params: Callable[[float], float]
                       ) -> dict[str, Any]:
  """Round time against keep ratio r (one level r/r, the first r the reference), sharded over
  every device and on one (quick: the first and last r); params(r): a client's parameters."""
  n = len(jax.devices())
  mesh = sharding.client_mesh() if n > 1 else None
  one = ([ratios[0], ratios[-1]] if quick else list(ratios)) if mesh is not None else []
  runs = {f"{d}:{r}": build(clients, one_level(r), mesh=m)["run"]
          for d, m, rs in ((n, mesh, ratios), (1, None, one)) for r in rs}
  times = median_times(runs, reps, min_time_s)

  def figure(devices: int, rs: Sequence[float]) -> dict[str, Any]:
    t = {r: times[f"{devices}:{r}"] for r in rs}
    return dict(round_time_s={str(r): v for r, v in t.items()},
                time_ratio={str(r): t[r] / t[rs[0]] for r in rs[1:]},
                **({"model": linear_time_model(t)} if len(rs) >= 3 else {}))

  headline = figure(n, ratios)
  return {**{f"keep_ratio_{k}": v for k, v in headline.items()}, "keep_ratio_devices": n,
          "keep_ratio_flop_ratio": {str(r): params(r) / params(ratios[0]) for r in ratios[1:]},
          "keep_ratio_one_device": figure(1, one) if one else headline,
          "keep_ratio_max_leaf_rel_diff": {str(r): max_leaf_rel_diff(
              *(runs[f"{d}:{r}"]()[0][:3] for d in (n, 1))) for r in one}}  # x, y and v


def compact_dense_figures(build: Build, clients: int, ratio: float | str, profile: str, reps: int,
                          min_time_s: float, quick: bool) -> dict[str, Any]:
  """Compact submodels against dense masked rounds at levels profile and one_level(ratio)
  (quick: the latter only)."""
  one = one_level(ratio)
  cases, out = {**({} if quick else {"profile": profile}), one.split("/")[0]: one}, {}
  for name, levels in cases.items():
    runs = {sub: build(clients, levels, sub)["run"] for sub in ("compact", "dense")}
    t = median_times(runs, reps, min_time_s)
    out[name] = dict(compact_s=t["compact"], dense_s=t["dense"], ratio=t["compact"] / t["dense"])
  return dict(compact_over_dense={"levels": cases, **out},
              compact_over_dense_time_ratio={k: v["ratio"] for k, v in out.items()})


def vmap_loop_figures(build: Build, counts: Sequence[int], reps: int, min_time_s: float
                      ) -> dict[str, Any]:
  """The jitted vmapped round against a Python loop over the same jitted client function; one
  population of max(counts) clients, c of them sampled per round (levels 1/1:1)."""
  detail, client = {}, None
  for c in counts:
    m = build(max(counts), "1/1:1", per_round=c)
    rnd, state, data = m["round"], m["state"], m["data"]
    client = client or jax.jit(rnd.client_fns[0])  # the client function does not depend on c
    server, ids = jax.jit(rnd.server_fn), [int(i) for i in rnd.sample_fn(state.round)[0]]
    loop = lambda: server(state, [tree.stack([client(state, data, jnp.asarray(i), jnp.asarray(s),
                                                     state.round) for s, i in enumerate(ids)])])
    t = median_times({"vmap": m["run"], "loop": loop}, reps, min_time_s)
    detail[str(c)] = dict(vmap_s=t["vmap"], loop_s=t["loop"])
  return dict(vmap_over_loop_time_ratio={c: t["vmap_s"] / t["loop_s"] for c, t in detail.items()},
              vmap_loop_detail=detail)


def scaling_figures(build: Build, counts: Sequence[int], ratio: float | str, profile: str,
                    reps: int, min_time_s: float, quick: bool) -> dict[str, Any]:
  """Round time and XLA's peak plan per clients per round (empty counts: 10, 100, 1000; quick
  100) at levels profile (quick: one_level(ratio)); 2 passes from 1000 clients on."""
  levels, rows = one_level(ratio) if quick else profile, []
  for c in counts or ((100,) if quick else (10, 100, 1000)):
    m = build(c, levels)
    t = median_times({"": m["run"]}, max(2, reps if c < 1000 else 2), min_time_s)[""]
    rows.append(dict(clients_per_round=c, levels=levels, round_time_s=t, rounds_per_s=1 / t,
                     peak_bytes=m["peak_bytes"], temp_bytes=m["temp_bytes"],
                     peak_bytes_per_client=m["peak_bytes"] and m["peak_bytes"] / c))
  return dict(clients_scaling=rows)
