"""The run loop: rounds of a built round (a federated.Round, or anything with `.step`), records,
checkpoint and log callbacks, and the divergence guards (docs/method.md, section 9).

Every round the losses, the hypergradient norm and x, y, v are checked: a NaN or inf stops the
run (DivergenceError, naming the round and the quantity), and so does an outer loss or
hypergradient norm above a factor times its early value (BlowupGuard). `run(..., seeds=S)`
does the same for S runs batched in one program (seeds_step, run_seeds), each run on its own.
"""

from __future__ import annotations

import functools
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
  """A loss, the hypergradient estimate or a parameter became NaN or infinite, or a loss or the
  hypergradient norm grew past `blowup_factor` times its early value (a finite blow-up)."""


GUARDED_METRICS = ("inner_loss", "outer_loss", "hypergrad_norm")  # non-finite: stop
BLOWUP_METRICS = ("outer_loss", "hypergrad_norm")  # finite blow-up: stop (BlowupGuard)
BLOWUP_WARMUP = 10
BLOWUP_FACTOR = 100.0


class BlowupGuard:
  """Raises DivergenceError when a BLOWUP_METRICS value exceeds factor x its early value.

  The early value of a quantity is its median over rounds 1..BLOWUP_WARMUP of the run (a median,
  so a blow-up that starts inside those rounds does not raise its own reference); later rounds
  are checked against it. It is kept in the run totals (`early_*`; the warm-up values under
  `_early_values_*` until the median is final), so a resumed run uses the same reference.
  factor None or 0 turns the guard off.
  """

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
  """Run rounds state.round .. num_rounds - 1 of `rnd` (a federated.Round or an algorithms.
  Algorithm: only rnd.step(state, data) is called); return the final state and the records.

  A record is logged every `eval_every` rounds and after the last one: the round's metrics,
  cumulative client FLOPs and communicated bytes, the running C_x* (min over rounds of the
  minimum outer coverage), wall time, the time of this call's first round (first_round_s:
  compilation included) and whatever eval_fn(state) returns. NaN / inf and blow-ups
  (blowup_factor times the early value; None or 0: off) raise DivergenceError (module
  docstring). `on_checkpoint(state, totals, round)` is called every `checkpoint_every` rounds
  and after the last one, after that round's record was passed on (on_record(record)).
  `log(line)` receives a progress line every `log_every` rounds (the library prints nothing
  itself; the drivers pass absl logging). `start_totals`: the totals a resumed run continues.
  Diagnostics (a round built with diagnostics=True): every round never_covered_x_share /
  never_covered_y_share (coordinates no client kept since this call's first round); every
  `diagnose_every` rounds (a multiple of eval_every) `diagnose_fn(state the round started
  from, the round's aggregated estimate)` adds figures (bilevel.diagnostics.estimate_quality).

  seeds=S: S runs batched on a leading axis of state and data (state.round [S], equal across
  them), advanced together by rnd.step (seeds_step; rounds built without diagnostics).
  eval_fn, on_record, start_totals and on_checkpoint are then sequences of S, one per run, and
  each run keeps what one run keeps, computed from its own slice. A run that diverges stops
  alone: its DivergenceError message goes into `stopped` {s: message}, it gets no later record
  or checkpoint, and the others go on (the runs do not interact). Returns (final state
  [S, ...], records per run, stopped).
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


def seeds_step(rnds: Sequence[Any]) -> Callable[..., tuple[ServerState, dict[str, jax.Array]]]:
  """`step(state, data)` running the rounds of several seeds as one program: the round's
  `apply` vmapped over a leading seed axis of its per-run values (Round.hyper), state and data
  ([S, ...]; metrics come back [S]).

  rnds: Rounds of one configuration that differ only in the seed (the drivers
  check the configurations); each seed's RoundArgs carry what the seed changes, so the round
  traced for the first serves every seed. Seed s of the result is the round of rnds[s] to
  float32 rounding (to 1e-10 in float64; tests/seeds_test.py). FedNest's round qualifies
  too. Raises ConfigError when a round has no per-run values apart or a mask_fn
  (Round.seed_constants), or the rounds differ in a static shape.
  """
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
  """`run(..., seeds=len(eval_fns))` of the seeds' vmapped round `step(state, data)`
  (seeds_step); keywords: run's, the per-run ones (on_record, start_totals, on_checkpoint)
  also as on_records, on_checkpoints. Returns (final state [S, ...], records per seed, stopped).
  """
  for plural, singular in (("on_records", "on_record"), ("on_checkpoints", "on_checkpoint")):
    if plural in keywords:
      keywords[singular] = keywords.pop(plural)
  return run(types.SimpleNamespace(step=step), state, data, num_rounds, eval_fn=eval_fns,
             seeds=len(eval_fns), **keywords)
