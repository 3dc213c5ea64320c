"""Timing of compiled JAX programs: interleaved median wall times, a linear time model, XLA's
memory plan, leaf differences, synthetic rows, estimators' costs (docs/measurement.md)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import costs
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
