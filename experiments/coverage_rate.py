r"""Theory check: convergence against the minimum outer coverage C_x* and the rounds Q.

On the synthetic separable problem of `bilevel.theory` (closed-form Phi and grad Phi, strongly
convex quadratic inner level, quadratic-plus-cosine non-convex outer level, heterogeneous clients,
Gaussian gradient noise of level --grad_noise), element masks from `theory.coverage_schedule`
give every outer coordinate (and its inner twin) exactly C clients in every round, so C_x* = C.
For every algorithm, C in --coverages, Q in --rounds_list and seed, the driver runs Q rounds and
measures

    avg_sq_grad_norm(C, Q) = (1/Q) sum_{q<Q} ||grad Phi(x_q)||^2      (true gradient, float64)

Step sizes (the theory's choice). For an L-smooth Phi and a coverage-mean direction whose noise
variance is sigma^2 / C (C clients average independent noise), SGD-type analysis gives
    (1/Q) sum_q ||grad Phi(x_q)||^2 <= 2 (Phi(x_0) - Phi*) / (alpha Q) + L alpha sigma^2 / C,
and alpha proportional to sqrt(C/Q) balances both terms at O(1/sqrt(C Q)). So the outer step is
    RABO  (K = 1):  alpha = alpha0 * sqrt(C / Q),
    RAFBO (K > 1):  alpha = (alpha0 / K) * sqrt(C / Q) per local step (the K steps of a round
                    together move x about as far as one RABO step).
The factor alpha0 (/ K) is ClientConfig.outer_lr; the factor sqrt(C/Q) is the outer-loss scale s
carried in the client batch (see bilevel/theory.py), which is the same update and lets one
compiled round serve every Q. Inner step beta, v step eta and the fd probe are fixed.

Algorithms (docs/method.md, section 6, the project's reading):
  rabo  : 8 clients, all of them in every round (8 slots), K = 1 local step.
  rafbo : 16 clients, 8 sampled per round (partial participation), K = 4 local steps.
Both use the second-order-free `fd` estimator (one v step per local step, warm start), one inner
step per local step, coverage-mean aggregation and server step 1.

Seeds: --seed fixes the problem instance and the starting point; run r = 0..num_seeds-1 permutes
which client holds which coefficients and salts the noise draws, so every seed and every Q runs
through the same compiled chunk of rounds (lax.scan): one compilation per (algorithm, C).
Compilation dominates the run time on a CPU; vmapping the seeds compiled more slowly than the
sequential runs it saved, so seeds run one after another.

Writes to --workdir: config.json; metrics.jsonl (one line per (algorithm, C, Q, seed) run; its
`alpha` is alpha0 sqrt(C/Q), and C_x*/C_y* are the coverages measured from the masks);
summary.json with `avg_sq_grad_norm` {algorithm: {C: {Q: mean over seeds}}}, `slopes`
{algorithm: {C: fitted log-log slope in Q}}, the table, the measured ratio between the smallest
and the largest C at the largest Q against the 1/sqrt(C) prediction, and the acceptance checks;
coverage_rate.png (log-log, one line per C, one panel per algorithm).

    python -m experiments.coverage_rate --workdir=/tmp/coverage_rate --quick
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, NamedTuple, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import theory
from bilevel.client import ClientConfig
from bilevel.errors import ConfigError
from bilevel.federated import FederatedConfig, FederatedData, init_state
from bilevel.hypergrad import EstimatorOptions
from bilevel.masks import Level, MaskConfig
from bilevel.metrics import JsonlWriter, to_python
from bilevel.rounds import make_round
from experiments import common

# --quick (common.QUICK): rounds 64..1024 and 3 seeds unless those flags are given (~1 min).
QUICK = common.QUICK
DEFAULT_ALGORITHMS = ("rabo", "rafbo")  # --algorithms (experiments/common.py) when not given
COVERAGES = flags.DEFINE_list("coverages", ["1", "2", "4", "8"],
                              "Outer coverages C_x* to sweep, each in 1..8 (clients per round).")
ROUNDS_LIST = flags.DEFINE_list("rounds_list", ["64", "128", "256", "512", "1024", "2048", "4096"],
                                "Numbers of rounds Q to sweep (at least two distinct values).")
NUM_SEEDS = flags.DEFINE_integer("num_seeds", 5, "Runs per (algorithm, C, Q), averaged.")
GRAD_NOISE = flags.DEFINE_float("grad_noise", 3.0, "Std sigma of the Gaussian noise on every "
                                 "first-order gradient of the synthetic problem.")
HETEROGENEITY = flags.DEFINE_float("heterogeneity", 0.5, "Client heterogeneity of the synthetic "
                                   "problem, in [0, 1].")
DIM = flags.DEFINE_integer("dim", 32, "Coordinates of x (= of y); a multiple of 8.")
ALPHA0 = flags.DEFINE_float("alpha0", 0.5, "alpha = alpha0 * sqrt(C / Q) (RAFBO: / K per local "
                            "step); alpha0 * sqrt(max C / min Q) must be <= 1.")

QUICK_ROUNDS = (64, 128, 256, 512, 1024)
QUICK_SEEDS = 3
SLOTS = 8  # clients per round P for both algorithms: the largest possible coverage
ALGORITHM_SETUPS = {  # algorithm -> (clients M, local steps K)
    "rabo": (8, 1),  # M = P: every client in every round
    "rafbo": (16, 4),  # partial participation: P = 8 of M = 16
}
INNER_LR = 0.5  # beta (a_ij <= 2.5, so beta * a < 2)
V_STEP = 0.5  # eta of the v iteration
FD_DELTA = 1e-3
SLOPE_RANGE = (-0.7, -0.3)


class SweepConfig(NamedTuple):
  algorithms: tuple[str, ...]
  coverages: tuple[int, ...]
  rounds_list: tuple[int, ...]
  num_seeds: int
  grad_noise: float
  heterogeneity: float
  dim: int
  alpha0: float
  seed: int


def _ints(name: str, values: Sequence[str]) -> tuple[int, ...]:
  try:
    out = tuple(sorted({int(v) for v in values}))
  except ValueError:
    raise ConfigError(
        f"--{name}={','.join(values)} must be a comma-separated list of integers.") from None
  if not out:
    raise ConfigError(f"--{name} is empty; give at least one value.")
  return out


def validate(cfg: SweepConfig) -> None:
  """Every range check, with the value and the allowed range."""
  for alg in cfg.algorithms:
    if alg not in ALGORITHM_SETUPS:
      raise ConfigError(f"--algorithms contains {alg!r}; allowed: {', '.join(ALGORITHM_SETUPS)}.")
  if not cfg.algorithms:
    raise ConfigError("--algorithms is empty; give rabo, rafbo or both.")
  if cfg.coverages[0] < 1 or cfg.coverages[-1] > SLOTS:
    raise ConfigError(f"--coverages={list(cfg.coverages)} is outside the allowed range "
                      f"[1, {SLOTS}] (clients per round).")
  if cfg.rounds_list[0] < 1 or len(cfg.rounds_list) < 2:
    raise ConfigError(f"--rounds_list={list(cfg.rounds_list)} needs at least two distinct values "
                      ">= 1 to fit a slope.")
  if cfg.num_seeds < 1:
    raise ConfigError(f"--num_seeds={cfg.num_seeds} must be >= 1.")
  if not cfg.grad_noise >= 0:
    raise ConfigError(f"--grad_noise={cfg.grad_noise} is outside the allowed range [0, inf).")
  if not 0 <= cfg.heterogeneity <= 1:
    raise ConfigError(f"--heterogeneity={cfg.heterogeneity} is outside the allowed range [0, 1].")
  if cfg.dim < SLOTS or cfg.dim % SLOTS:
    raise ConfigError(f"--dim={cfg.dim} must be a positive multiple of {SLOTS} (one block of "
                      "coordinates per slot, so that the keep ratio is exactly C/8).")
  if not cfg.alpha0 > 0:
    raise ConfigError(f"--alpha0={cfg.alpha0} is outside the allowed range (0, inf).")
  largest = cfg.alpha0 * math.sqrt(cfg.coverages[-1] / cfg.rounds_list[0])
  if largest > 1:
    raise ConfigError(f"--alpha0={cfg.alpha0} gives the step alpha0 * sqrt(C/Q) = {largest:.3g} "
                      f"> 1 at C={cfg.coverages[-1]}, Q={cfg.rounds_list[0]}; lower --alpha0 or "
                      "raise the smallest Q.")


# Shared flags this driver reads; the other shared flags describe one federated run and are
# fixed here (see the module docstring), so giving one is an error rather than silently ignored.
_SHARED_FLAGS_USED = ("workdir", "seed", "resume", "quick", "smoke")
# --smoke (common.SMOKE, for tests): these two Q, one seed, the first two coverages asked for.
SMOKE_ROUNDS = (16, 32)


def config_from_flags() -> SweepConfig:
  ignored = sorted(f.name for f in flags.FLAGS.flags_by_module_dict().get("experiments.common", [])
                   if f.present and f.name not in _SHARED_FLAGS_USED)
  if ignored:
    raise ConfigError(f"{', '.join('--' + n for n in ignored)} not used by coverage_rate: its "
                      "federated settings are fixed per algorithm (see its docstring); sweep with "
                      "--coverages, --rounds_list, --num_seeds, --grad_noise, --alpha0.")
  rounds, seeds = ROUNDS_LIST.value, NUM_SEEDS.value
  if QUICK.value:
    if not flags.FLAGS["rounds_list"].present:
      rounds = [str(q) for q in QUICK_ROUNDS]
    if not flags.FLAGS["num_seeds"].present:
      seeds = QUICK_SEEDS
  coverages = _ints("coverages", COVERAGES.value)
  if common.SMOKE.value:
    rounds, seeds, coverages = [str(q) for q in SMOKE_ROUNDS], 1, coverages[:2]
  cfg = SweepConfig(
      algorithms=tuple(dict.fromkeys(common.algorithm_list(DEFAULT_ALGORITHMS))),
      coverages=coverages, rounds_list=_ints("rounds_list", rounds),
      num_seeds=seeds, grad_noise=GRAD_NOISE.value, heterogeneity=HETEROGENEITY.value,
      dim=DIM.value, alpha0=ALPHA0.value, seed=common.SEED.value)
  validate(cfg)
  return cfg


# ------------------------------------------------------------------ one (algorithm, C): all Q


class RunResult(NamedTuple):
  avg_sq_grad_norm: np.ndarray  # [S]
  final_sq_grad_norm: np.ndarray  # [S]
  final_phi: np.ndarray  # [S]
  cx_star: np.ndarray  # [S] min over rounds of the minimum outer coverage
  cy_star: np.ndarray  # [S]


@jax.jit
def finish(x: jax.Array, coeffs: theory.SyntheticCoeffs, totals, q_total: jax.Array):
  """One run's RunResult fields from its final x and running totals."""
  sq_sum, cx, cy = totals
  return sq_sum / q_total, jnp.sum(theory.phi_grad(x, coeffs) ** 2), theory.phi(x, coeffs), cx, cy


def sweep_one(cfg: SweepConfig, algorithm: str, coverage: int, coeffs: theory.SyntheticCoeffs,
              x0: jax.Array) -> dict[int, RunResult]:
  """Every Q and seed for one (algorithm, C) through one compiled chunk of rounds (float64)."""
  num_clients, local_steps = ALGORITHM_SETUPS[algorithm]
  ratio = coverage / SLOTS
  fed_cfg = FederatedConfig(
      num_clients=num_clients, clients_per_round=SLOTS,
      client=ClientConfig(local_steps=local_steps, inner_steps=1, inner_lr=INNER_LR,
                          outer_lr=cfg.alpha0 / local_steps, estimator="fd",
                          estimator_options=EstimatorOptions(num_steps=1, step_size=V_STEP,
                                                             delta=FD_DELTA)),
      mask=MaskConfig(policy="random", granularity="element"),
      levels=(Level(ratio, ratio, 1.0),), seed=cfg.seed)
  # The lower-level API (rounds.make_round), not bilevel.algorithms.get: the sweep traces the
  # unjitted round (jit=False) inside the scan of `advance` below, and runs it with its own
  # controlled-coverage masks (mask_fn) on the theory check's synthetic problem.
  rnd = make_round(theory.SYNTHETIC, fed_cfg, None, x0, sample=theory.sample, jit=False,
                   mask_fn=theory.coverage_schedule(SLOTS, coverage))
  chunk = math.gcd(*cfg.rounds_list)

  @jax.jit
  def advance(state, data, totals):
    """`chunk` rounds; totals = (sum of ||grad Phi(x_q)||^2, C_x* so far, C_y* so far)."""

    def body(carry, _):
      state, (sq_sum, cx, cy) = carry
      sq_sum = sq_sum + jnp.sum(theory.phi_grad(state.x, coeffs) ** 2)
      state, metrics = rnd.step(state, data)
      cx = jnp.minimum(cx, metrics["coverage_x_min"].astype(cx.dtype))
      cy = jnp.minimum(cy, metrics["coverage_y_min"].astype(cy.dtype))
      return (state, (sq_sum, cx, cy)), None

    (state, totals), _ = jax.lax.scan(body, (state, totals), None, length=chunk)
    return state, totals

  state0 = init_state(x0, jnp.zeros_like(x0), optax.sgd(1.0))  # y and v start at 0
  results = {}
  for q_total in cfg.rounds_list:
    runs = []
    for r in range(cfg.num_seeds):
      # Seed r: which client holds which coefficients, and the noise salt (no retracing).
      perm = np.random.default_rng([cfg.seed, r]).permutation(num_clients)
      clients = theory.make_clients(jax.tree.map(lambda z: z[perm], coeffs),
                                    noise_std=cfg.grad_noise, scale=math.sqrt(coverage / q_total),
                                    salt=r)
      data = FederatedData(inner=clients, outer=clients, num_examples=jnp.ones((num_clients,)))
      inf = jnp.full((), jnp.inf, jnp.float64)  # explicit dtype: a weak type would retrace
      state, totals = state0, (jnp.zeros((), jnp.float64), inf, inf)
      for _ in range(q_total // chunk):
        state, totals = advance(state, data, totals)
      runs.append(finish(state.x, coeffs, totals, q_total))
    results[q_total] = RunResult(*(np.array(jax.device_get(v)) for v in zip(*runs)))
  return results


# ------------------------------------------------------------------ summary and plot


def fit_slope(rounds: Sequence[int], values: Sequence[float]) -> float:
  """Least-squares slope of log(value) against log(Q)."""
  return float(np.polyfit(np.log(rounds), np.log(values), 1)[0])


def summarize(cfg: SweepConfig, means: dict, stds: dict) -> dict[str, Any]:
  """means/stds: {algorithm: {C: {Q: value}}} -> the summary (string keys for JSON)."""
  q_max, c_min, c_max = cfg.rounds_list[-1], cfg.coverages[0], cfg.coverages[-1]
  slopes, ratios, checks, table = {}, {}, {}, []
  for alg in cfg.algorithms:
    slopes[alg] = {c: fit_slope(cfg.rounds_list, [means[alg][c][q] for q in cfg.rounds_list])
                   for c in cfg.coverages}
    at_max = [means[alg][c][q_max] for c in cfg.coverages]
    measured = at_max[0] / at_max[-1]
    predicted = math.sqrt(c_max / c_min)
    ratios[alg] = dict(measured=measured, predicted=predicted,
                       measured_over_predicted=measured / predicted, rounds=q_max,
                       coverage_low=c_min, coverage_high=c_max)
    checks[alg] = dict(
        slopes_in_range=all(SLOPE_RANGE[0] <= s <= SLOPE_RANGE[1] for s in slopes[alg].values()),
        monotone_in_coverage_at_largest_rounds=bool(np.all(np.diff(at_max) < 0)),
        ratio_within_factor_2=0.5 <= measured / predicted <= 2.0)
    for c in cfg.coverages:
      for q in cfg.rounds_list:
        table.append(dict(algorithm=alg, coverage=c, rounds=q, alpha=cfg.alpha0 * math.sqrt(c / q),
                          avg_sq_grad_norm=means[alg][c][q], std_over_seeds=stds[alg][c][q],
                          num_seeds=cfg.num_seeds))
  str_keys = lambda d: {str(k): str_keys(v) if isinstance(v, dict) else v for k, v in d.items()}
  return dict(avg_sq_grad_norm=str_keys(means), avg_sq_grad_norm_std=str_keys(stds),
              slopes=str_keys(slopes), slope_range=list(SLOPE_RANGE), coverage_ratio=ratios,
              checks=checks, table=table)


def plot(path: str, cfg: SweepConfig, means: dict, slopes: dict) -> None:
  import matplotlib  # imported here: only the driver plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(cfg.algorithms), figsize=(5 * len(cfg.algorithms), 4),
                           squeeze=False, sharey=True)
  q = np.array(cfg.rounds_list, dtype=float)
  for ax, alg in zip(axes[0], cfg.algorithms):
    for c in cfg.coverages:
      ax.loglog(q, [means[alg][c][int(r)] for r in q], "o-",
                label=f"C_x*={c} (slope {slopes[alg][str(c)]:.2f})")
    ref = means[alg][cfg.coverages[0]][cfg.rounds_list[0]] * (q / q[0]) ** -0.5
    ax.loglog(q, ref, "k--", lw=1, label="Q^-1/2")
    ax.set_title(f"{alg.upper()}: alpha = {cfg.alpha0:g} sqrt(C_x*/Q)")
    ax.set_xlabel("rounds Q")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("(1/Q) sum_q ||grad Phi(x_q)||^2")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def print_table(cfg: SweepConfig, means: dict, summary: dict) -> None:
  head = "alg    C_x* " + "".join(f"{'Q=' + str(q):>11}" for q in cfg.rounds_list) + "      slope"
  print(head)
  for alg in cfg.algorithms:
    for c in cfg.coverages:
      row = "".join(f"{means[alg][c][q]:11.4g}" for q in cfg.rounds_list)
      print(f"{alg:6s} {c:4d} {row} {summary['slopes'][alg][str(c)]:10.3f}")
  for alg in cfg.algorithms:
    r = summary["coverage_ratio"][alg]
    print(f"{alg}: at Q={r['rounds']} avg(C={r['coverage_low']}) / avg(C={r['coverage_high']}) = "
          f"{r['measured']:.3f} (1/sqrt(C) predicts {r['predicted']:.3f}); checks "
          f"{json.dumps(summary['checks'][alg])}")


# ------------------------------------------------------------------ main


def main(argv: Sequence[str]) -> None:
  common.start_driver()
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    cfg = config_from_flags()
  except ConfigError as e:
    common.fail(str(e))
  workdir = common.require_workdir()
  common.start_run(workdir, cfg._asdict())  # removes earlier results, writes config.json
  start = time.perf_counter()
  writer = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  means, stds = {}, {}
  with jax.enable_x64(True), contextlib.closing(writer):
    x0 = jnp.asarray(np.random.default_rng([cfg.seed, 10**6]).normal(0.0, 2.0, cfg.dim))
    for alg in cfg.algorithms:
      # Same seed: the same Phi for every algorithm, only the client split differs.
      alg_coeffs = theory.make_synthetic(ALGORITHM_SETUPS[alg][0], cfg.dim, seed=cfg.seed,
                                         heterogeneity=cfg.heterogeneity)
      means[alg], stds[alg] = {}, {}
      for c in cfg.coverages:
        t0 = time.perf_counter()
        results = sweep_one(cfg, alg, c, alg_coeffs, x0)
        elapsed = time.perf_counter() - t0
        means[alg][c] = {q: float(np.mean(r.avg_sq_grad_norm)) for q, r in results.items()}
        stds[alg][c] = {q: float(np.std(r.avg_sq_grad_norm)) for q, r in results.items()}
        for q, r in results.items():
          for s in range(cfg.num_seeds):
            writer(to_python(dict(
                algorithm=alg, coverage=c, rounds=q, seed=s, alpha=cfg.alpha0 * math.sqrt(c / q),
                avg_sq_grad_norm=r.avg_sq_grad_norm[s], final_sq_grad_norm=r.final_sq_grad_norm[s],
                final_phi=r.final_phi[s], cx_star=r.cx_star[s], cy_star=r.cy_star[s],
                sweep_wall_time_s=elapsed)))
        print(f"{alg} C_x*={c}: done in {elapsed:.1f}s", flush=True)
  summary = summarize(cfg, means, stds)
  summary["wall_time_s"] = time.perf_counter() - start
  plot(os.path.join(workdir, "coverage_rate.png"), cfg, means, summary["slopes"])
  print_table(cfg, means, summary)
  common.write_summary(workdir, summary)


if __name__ == "__main__":
  app.run(main)
