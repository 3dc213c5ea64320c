"""The run loop: rounds of a built round (anything with `.step`), records, checkpoint and log
callbacks, the divergence guards (docs/method.md, section 9); S runs batched in one program
(seeds_step, run_seeds), each run on its own; diagnostics; host memory for the rounds."""

from __future__ import annotations

import ctypes
import functools
import os
import time
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import tree
from bilevel.errors import ConfigError
from bilevel.federated import DIAGNOSTICS, ServerState
from bilevel.metrics import to_python

PyTree = Any


class DivergenceError(RuntimeError):
  """A loss, the hypergradient or a parameter became NaN / inf, or grew past BlowupGuard's bound."""


GUARDED_METRICS = ("inner_loss", "outer_loss", "hypergrad_norm")  # non-finite: stop
BLOWUP_METRICS = ("outer_loss", "hypergrad_norm")  # finite blow-up: stop (BlowupGuard)
BLOWUP_WARMUP = 10
BLOWUP_FACTOR = 100.0


class BlowupGuard:
  """Raises DivergenceError when a BLOWUP_METRICS value exceeds factor (None or 0: off) x its
  median over rounds 1..BLOWUP_WARMUP, kept in the run totals (`early_*`; the warm-up values
  under `_early_values_*`) so a resumed run uses the same reference."""

  def __init__(self, factor: float | None, totals: dict[str, Any]):
    self.factor, self.totals = factor, totals

  def __call__(self, done: int, metrics: Mapping[str, Any]) -> None:
    if not self.factor:
      return
    for k in BLOWUP_METRICS:
      key, values_key = f"early_{k}", f"_early_values_{k}"
      if done <= BLOWUP_WARMUP:
        values = self.totals.setdefault(values_key, []) + [float(metrics[k])]
        self.totals[values_key] = values
        self.totals[key] = float(np.median(values))
        if done == BLOWUP_WARMUP:
          del self.totals[values_key]
      elif metrics[k] > self.factor * self.totals.get(key, float("inf")):
        raise DivergenceError(
            f"round {done}: {k} = {metrics[k]:.4g} grew past {self.factor:g} x its early value "
            f"{self.totals[key]:.4g} (median over rounds 1-{BLOWUP_WARMUP}); the run stopped as "
            "diverged. Lower the step sizes (--outer_lr, --inner_lr, --v_lr); the last "
            "checkpoint holds the last good state; --divergence_factor=0 turns this guard off.")


@jax.jit
def _finite_parts(state: ServerState) -> jax.Array:
  """[x, y, v] all finite."""
  ok = lambda t: jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(t)]))
  return jnp.stack([ok(state.x), ok(state.y), ok(state.v)])


def _check_finite(done: int, metrics: Mapping[str, Any], parts_finite: Any) -> None:
  """DivergenceError when a GUARDED_METRICS value or one of x, y, v (parts_finite: [3] bool,
  _finite_parts) is not finite."""
  bad = [k for k in GUARDED_METRICS if not np.isfinite(metrics[k])]
  bad += [name for name, ok in zip(("x", "y", "v"), np.asarray(parts_finite)) if not ok]
  if bad:
    raise DivergenceError(
        f"round {done}: {', '.join(bad)} became NaN or infinite; the run stopped. Lower the step "
        "sizes (--outer_lr, --inner_lr, --v_lr) or the fd probe (--delta); the last checkpoint "
        "holds the last good state.")


def _diagnose(ever: dict[str, PyTree] | None, diag: Mapping[str, PyTree], totals: dict[str, Any],
              before: ServerState, done: int, diagnose_fn: Callable[..., Mapping[str, Any]] | None,
              diagnose_every: int) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """Update the never-covered shares in totals; (ever covered so far, diag_* figures or {}).
  ever: per coordinate of x and y, kept by some client in some round so far (numpy bool trees)."""
  now = {side: jax.tree.map(lambda c: np.asarray(c) > 0, diag[f"count_{side}"])
         for side in ("x", "y")}
  ever = now if ever is None else {side: jax.tree.map(np.logical_or, ever[side], now[side])
                                   for side in ("x", "y")}
  for side in ("x", "y"):
    flat = np.concatenate([np.ravel(e) for e in jax.tree.leaves(ever[side])])
    totals[f"never_covered_{side}_share"] = float(np.mean(~flat))
  extra = {}
  if diagnose_fn is not None and diagnose_every and done % diagnose_every == 0:
    extra = {f"diag_{k}": v for k, v in to_python(
        jax.device_get(dict(diagnose_fn(before, diag["estimate"])))).items()}
  return ever, extra


def _record(done: int, metrics: Mapping[str, Any], totals: Mapping[str, Any],
            extra: Mapping[str, Any], start: float,
            eval_fn: Callable[[ServerState], Mapping[str, Any]] | None, state: ServerState
            ) -> dict[str, Any]:
  """A logged record: the round's metrics, the run totals, extra figures, wall time, eval_fn."""
  record = dict(round=done, **metrics, **{k: v for k, v in totals.items() if not k.startswith("_")},
                **extra, wall_time_s=time.perf_counter() - start)
  record.update(to_python(dict(eval_fn(state))) if eval_fn is not None else {})
  return record


def _progress(done: int, num_rounds: int, first: int, start: float, metrics: Mapping[str, Any],
              totals: Mapping[str, Any], stopped: Mapping[int, str], seeds: int | None) -> str:
  """The log line: the round, its outer loss (the mean over running seeds), the pace."""
  rate = (done - first) / max(time.perf_counter() - start, 1e-9)
  pace = f"{rate:.2f} rounds/s  ETA {(num_rounds - done) / max(rate, 1e-9):.0f}s"
  if seeds is None:
    return (f"round {done}/{num_rounds}  outer_loss {metrics['outer_loss']:.4f}  "
            f"|hypergrad| {metrics['hypergrad_norm']:.3e}  C_x* {totals['cx_star']:g}  {pace}")
  live = [s for s in range(seeds) if s not in stopped]
  loss = np.mean([metrics["outer_loss"][s] for s in live]) if live else float("nan")
  return (f"round {done}/{num_rounds}  {len(live)} of {seeds} seeds running  mean "
          f"outer_loss {loss:.4f}  {pace}")


def _due(done: int, every: int, num_rounds: int) -> bool:
  """Every `every` rounds and after the last one (never for every = 0)."""
  return bool(every) and (done % every == 0 or done == num_rounds)


_finite_seeds = jax.jit(jax.vmap(_finite_parts))


def run(rnd: Any, state: ServerState, data: Any, num_rounds: int, *,
        eval_fn: Any = None, eval_every: int = 1, on_record: Any = None,
        log: Callable[[str], None] | None = None, log_every: int = 10,
        start_totals: Any = None, checkpoint_every: int = 0, on_checkpoint: Any = None,
        blowup_factor: float | None = BLOWUP_FACTOR,
        diagnose_fn: Callable[[ServerState, PyTree], Mapping[str, Any]] | None = None,
        diagnose_every: int = 0, seeds: int | None = None) -> tuple[Any, ...]:
  """Run rounds state.round .. num_rounds - 1 of `rnd` (only rnd.step(state, data) is called);
  return the final state and the records.

  A record every `eval_every` rounds and after the last: the round's metrics, cumulative client
  FLOPs and bytes, C_x* (min over rounds of the minimum outer coverage), wall time,
  first_round_s (compilation included) and eval_fn(state); on_record(record) gets it.
  NaN / inf and blow-ups (BlowupGuard) raise DivergenceError. on_checkpoint(state, totals,
  round) every `checkpoint_every` rounds and after the last; log(line) every `log_every`;
  start_totals: the totals a resumed run continues. Rounds built with diagnostics=True add the
  never-covered shares every round and diagnose_fn(state before, estimate) every
  `diagnose_every` rounds.

  seeds=S: S runs batched on a leading axis of state and data (seeds_step), eval_fn, on_record,
  start_totals, on_checkpoint one per run; each run keeps what one run keeps, and one that
  diverges stops alone. Returns (final state [S, ...], records per run, {s: error message}).
  """
  batched = seeds is not None
  num = seeds if batched else 1
  per_run = lambda v: list(v) if batched and v is not None else [v] * num
  eval_fns, on_records, on_checkpoints = per_run(eval_fn), per_run(on_record), per_run(on_checkpoint)
  fresh = dict(cumulative_client_flops=0.0, cumulative_comm_bytes=0.0, cx_star=float("inf"),
               cy_star=float("inf"))
  totals = [{**fresh, **(t or {})} for t in per_run(start_totals)]
  guards = [BlowupGuard(blowup_factor, t) for t in totals]
  records: list[list[dict[str, Any]]] = [[] for _ in range(num)]
  stopped: dict[int, str] = {}
  rounds = np.asarray(jax.device_get(state.round)).reshape(-1)
  if np.any(rounds != rounds[0]):
    raise ValueError(f"run needs every seed at the same round; got {rounds.tolist()}.")
  start, first, ever = time.perf_counter(), int(rounds[0]), None
  for q in range(first, num_rounds):
    step_start, before = time.perf_counter(), state
    state, metrics = rnd.step(state, data)
    diag = metrics.pop(DIAGNOSTICS, None)
    metrics = to_python(jax.device_get(metrics))
    if q == first:  # this process's first round: compilation (or a cache load) included
      first_round_s = time.perf_counter() - step_start
    finite = np.asarray(_finite_seeds(state) if batched else _finite_parts(state)[None])
    done = q + 1
    for s in [s for s in range(num) if s not in stopped]:
      m = {k: v[s] for k, v in metrics.items()} if batched else metrics
      run_state = (lambda s=s: tree.index(state, s)) if batched else (lambda: state)
      if q == first:
        totals[s]["first_round_s"] = first_round_s
      try:
        _check_finite(done, m, finite[s])
        guards[s](done, m)
      except DivergenceError as e:
        if not batched:
          raise
        stopped[s] = str(e)
        continue
      extra = {}
      if diag is not None and not batched:
        ever, extra = _diagnose(ever, diag, totals[s], before, done, diagnose_fn, diagnose_every)
      t = totals[s]
      t["cumulative_client_flops"] += m["client_flops"]
      t["cumulative_comm_bytes"] += m["comm_bytes"]
      t["cx_star"] = min(t["cx_star"], m["coverage_x_min"])
      t["cy_star"] = min(t["cy_star"], m["coverage_y_min"])
      if _due(done, eval_every, num_rounds):
        records[s].append(_record(done, m, totals[s], extra, start, eval_fns[s], run_state()))
        if on_records[s] is not None:
          on_records[s](records[s][-1])
      if on_checkpoints[s] is not None and _due(done, checkpoint_every, num_rounds):
        on_checkpoints[s](run_state(), dict(totals[s]), done)
    if len(stopped) == num:
      break
    if log is not None and _due(done, log_every, num_rounds):
      log(_progress(done, num_rounds, first, start, metrics, totals[0], stopped, seeds))
  return (state, records, stopped) if batched else (state, records[0])


def seeds_step(rnds: Sequence[Any], states: Sequence[ServerState] = (), data: Sequence[Any] = ()
               ) -> Callable[..., tuple[ServerState, dict[str, jax.Array]]]:
  """`step(state, data)`: the rounds `rnds` of one configuration, differing only in the seed,
  as one program: the first's `apply` vmapped over a leading axis of their per-run values
  (Round.hyper), state and data. Seed s of it is rnds[s] to float32 rounding (1e-10 in float64).
  Raises ConfigError when a round has no per-run values apart or a mask_fn, the rounds differ in
  a static shape, or the runs' `states` and `data` (if given) differ in shape or round."""
  if any(tree.signature((s, d)) != tree.signature((states[0], data[0]))
         for s, d in zip(states, data)):
    raise ConfigError("seeds_step: their data or parameters differ in shape (e.g. a non-IID "
                      "partition)")
  if len({int(s.round) for s in states}) > 1:
    raise ConfigError(f"seeds_step: their checkpoints are at different rounds "
                      f"({', '.join(str(int(s.round)) for s in states)})")
  if any(r.apply is None or r.hyper is None for r in rnds):
    raise ConfigError("seeds_step needs rounds with their per-run values apart (Round.hyper "
                      "and Round.apply: rafbo.make_round, fednest.make_fednest_round); run "
                      "these seeds one after another.")
  if any(r.seed_constants for r in rnds):
    raise ConfigError("seeds_step: a round built with a mask_fn may hold constants of its own "
                      "seed; run its seeds one after another.")
  shapes = lambda r: (tree.signature(r.hyper), r.clients_per_round,
                      [(st.rx, st.ry, st.per_round, st.counts) for st in r.strata])
  first = shapes(rnds[0])
  if any(shapes(r) != first for r in rnds[1:]):
    raise ConfigError("seeds_step: the seeds' rounds differ in a static shape (levels, strata "
                      "or client counts); run them one after another.")
  return functools.partial(jax.jit(jax.vmap(rnds[0].apply)), tree.stack([r.hyper for r in rnds]))


def run_seeds(step: Callable[..., tuple[ServerState, dict[str, Any]]], state: ServerState,
              data: Any, num_rounds: int, *,
              eval_fns: Sequence[Callable[[ServerState], Mapping[str, Any]] | None],
              **keywords: Any) -> tuple[ServerState, list[list[dict[str, Any]]], dict[int, str]]:
  """`run(..., seeds=len(eval_fns))` of the seeds' vmapped round `step` (seeds_step)."""
  return run(types.SimpleNamespace(step=step), state, data, num_rounds, eval_fn=eval_fns,
             seeds=len(eval_fns), **keywords)


def diagnose_fn(problem: Any, data: Any) -> Callable[[ServerState, PyTree], Mapping[str, Any]]:
  """run's diagnose_fn: the estimate against the true hypergradient on the stacked data."""
  from bilevel import diagnostics

  @jax.jit
  def diagnose(state, estimate):
    true = diagnostics.true_hypergradient(problem, state.x, state.y, data.inner, data.outer)
    return dict(diagnostics.estimate_quality(estimate, true.hypergrad),
                inner_grad_norm=true.inner_grad_norm, inner_steps=true.inner_steps,
                cg_residual=true.cg_residual)

  return diagnose


def reuse_host_memory() -> bool:
  """Keep freed host memory for the next CPU round (glibc mallopt: no mmap, an arena per core, a
  1 GiB trim threshold; same results): call it first thing. False where libc is not glibc."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return all(libc.mallopt(option, value) == 1 for option, value in
               ((m_mmap_max, 0), (m_arena_max, os.cpu_count() or 1), (m_trim_threshold, 1 << 30)))
  except (OSError, AttributeError):
    return False
