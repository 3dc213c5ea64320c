r"""Theory check: convergence against the outer coverage C_x* and the rounds Q (docs/method.md,
section 10), in four parts (--parts), each written to metrics.jsonl and summarised from those
records in summary.json.

Problems (`bilevel.theory`): the separable synthetic problem (closed-form Phi and grad Phi,
strongly convex quadratic inner level, quadratic-plus-cosine non-convex outer level,
heterogeneous clients, Gaussian noise of level --grad_noise on every first-order gradient), and
two non-separable ones for the bias part. Element masks from `theory.coverage_schedule` give
every outer coordinate (and its inner twin) exactly C clients in every round, so C_x* = C; the
coverage is read from the clients' keep ratio r_x = C/8, a traced round argument, and the step
sizes are traced too, so one compiled round serves every C, step and Q of an algorithm.

The measured quantity (true gradient, float64):

    avg_sq_grad_norm(C, Q) = (1/Q) sum_{q<Q} ||grad Phi(x_q)||^2

Algorithms (docs/method.md, section 6, the project's reading):
  rabo  : 8 clients, all of them in every round (8 slots), K = 1 local step.
  rafbo : 16 clients, 8 sampled per round (partial participation), K = 4 local steps.
Both use the second-order-free `fd` estimator with one v step per local step (warm start), one
inner step per local step (beta = 0.5), coverage-mean aggregation and server step 1. The v step
and the inner step are --v_step and --inner_step: "fixed" (this driver's default: v <- v - 0.5 r,
y <- y - 0.5 grad_y g; with K = 1 a client's update is then affine in its coefficients, the
argument of bilevel/theory.py) or "cauchy" (the library default, under which that argument does
not hold); summary.json states which (`v_step`, `inner_step`, `step_note`).

Parts (the outer step alpha is per local step divided by K for RAFBO in every rule):
  rate       alpha = alpha0 sqrt(C/Q) (the theory's choice: it balances 2 Delta/(alpha Q) against
             L alpha sigma^2 / C at O(1/sqrt(C Q))); C in --coverages, Q in --rounds_list.
             This rule builds a C^-1/2 Q^-1/2 dependence into the optimisation term itself.
  step_rules the same grid under steps that do not depend on C: alpha = --fixed_alpha (fixed)
             and alpha = alpha0 / sqrt(Q) (inv_sqrt_q), each with noise and without
             (--grad_noise=0), and the rate rule without noise; the noise term (noisy minus
             noise-free) is the part the coverage mean can divide.
  uneven     uneven coverage (`theory.pattern_schedule`, --uneven_patterns): patterns with the
             same mean coverage and different minimum, and the reverse, at alpha = alpha0/sqrt(Q)
             (the same for every pattern), with and without noise.
  bias       RABO without noise on the separable problem and two non-separable ones (coupled
             quadratic, logistic inner level), at a fixed step (BIAS_ALPHA) for BIAS_ROUNDS, for
             every C and fd probe delta in --bias_deltas: the floor (1/TAIL) sum of the last TAIL
             ||grad Phi(x_q)||^2. Clients are identical (--bias_heterogeneity=0) unless asked,
             so only pruning and fd bias can keep grad Phi from 0.

Seeds: --seed fixes the problem instance and the starting point; run r = 0..num_seeds-1 permutes
which client holds which coefficients and salts the noise draws.

Writes to --workdir: config.json; metrics.jsonl, one line per run (part, algorithm, problem,
pattern, step rule, alpha, C, Q, seed, noise, delta; measured C_x*, C_y* and mean coverage, and
the run's averages); summary.json (`summarize` of those lines: for the rate part
`avg_sq_grad_norm` {algorithm: {C: {Q: mean over seeds}}}, `slopes` {algorithm: {C: fitted
log-log slope in Q}}, `c_exponents` {algorithm: {Q: slope in C}}, the ratio between the smallest
and largest C at the largest Q against 1/sqrt(C), checks; `step_rules`, `uneven`, `bias` for the
other parts; `v_step`); coverage_rate.png (the rate part, log-log, one line per C).

    python -m experiments.coverage_rate --workdir=/tmp/coverage_rate --quick
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

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
from bilevel.algorithms.rafbo import make_round
from experiments import common

# --quick (common.QUICK): rounds 64..1024, 3 seeds and the rate part only unless those flags
# are given (under a minute on 2 CPU cores).
QUICK = common.QUICK
DEFAULT_ALGORITHMS = ("rabo", "rafbo")  # --algorithms (experiments/common.py) when not given
PARTS = ("rate", "step_rules", "uneven", "bias")
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
PARTS_FLAG = flags.DEFINE_list("parts", list(PARTS), "Parts to run (module docstring): "
                               f"{', '.join(PARTS)}. --quick runs only rate unless given.")
FIXED_ALPHA = flags.DEFINE_float("fixed_alpha", 0.05, "The step_rules part's fixed outer step "
                                 "(RAFBO: / K per local step), the same for every C and Q.")
UNEVEN_PATTERNS = flags.DEFINE_list(
    "uneven_patterns", ["4/4/4/4", "2/6/2/6", "1/7/1/7", "1/1/1/1", "1/3/1/3", "1/7/7/7"],
    "Coverage patterns of the uneven part: c1/c2/... per block of 8 coordinates, rotating by "
    "round (theory.pattern_schedule); each entry in 1..8, the length dividing --dim / 8.")
PART_ROUNDS = flags.DEFINE_list("part_rounds", ["256", "1024", "4096"], "Numbers of rounds Q of "
                                "the step_rules and uneven parts (at least two distinct values).")
PART_SEEDS = flags.DEFINE_integer("part_seeds", 3, "Runs per point of the step_rules and uneven "
                                  "parts, averaged.")
BIAS_DELTAS = flags.DEFINE_list("bias_deltas", ["0.001", "0.1", "0.3", "1"],
                                "fd probe lengths delta of the bias part.")
BIAS_HETEROGENEITY = flags.DEFINE_float("bias_heterogeneity", 0.0, "Client heterogeneity of the "
                                        "bias part's problems, in [0, 1].")

QUICK_ROUNDS = (64, 128, 256, 512, 1024)
QUICK_SEEDS = 3
QUICK_PART_ROUNDS = (64, 256, 1024)  # --quick with --parts naming step_rules or uneven
SLOTS = 8  # clients per round P for both algorithms: the largest possible coverage
ALGORITHM_SETUPS = {  # algorithm -> (clients M, local steps K)
    "rabo": (8, 1),  # M = P: every client in every round
    "rafbo": (16, 4),  # partial participation: P = 8 of M = 16
}
INNER_LR = 0.5  # beta (a_ij <= 2.5, so beta * a < 2)
V_STEP = 0.5  # eta of the v iteration
FD_DELTA = 1e-3
SLOPE_RANGE = (-0.7, -0.3)
STEP_RULES = ("sqrt_c_over_q", "fixed", "inv_sqrt_q")
# The bias part: RABO, no noise, a fixed step, long enough to settle (the floor at both Q is
# recorded, so a reader sees whether it still moved), the floor averaged over the last TAIL
# rounds (a multiple of the schedule's period 8).
BIAS_ALGORITHM = "rabo"
BIAS_ALPHA = 0.1
BIAS_ROUNDS = (1024, 2048)
BIAS_TAIL = 256
BIAS_PROBLEMS = {  # name -> (coupling, logistic rows)
    "separable": None,
    "coupled_quadratic": (0.3, 0),
    "logistic": (0.0, 64),
}
FLOOR_ZERO = 1e-20  # a floor below this is float64 rounding of a converged run: not fitted


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
  parts: tuple[str, ...] = ("rate",)
  v_step: str = "fixed"
  inner_step: str = "fixed"
  fixed_alpha: float = 0.05
  uneven_patterns: tuple[tuple[int, ...], ...] = ()
  bias_deltas: tuple[float, ...] = (FD_DELTA,)
  bias_heterogeneity: float = 0.0
  bias_rounds: tuple[int, ...] = BIAS_ROUNDS
  part_rounds: tuple[int, ...] = (256, 1024, 4096)
  part_seeds: int = 3


def _ints(name: str, values: Sequence[str]) -> tuple[int, ...]:
  try:
    out = tuple(sorted({int(v) for v in values}))
  except ValueError:
    raise ConfigError(
        f"--{name}={','.join(values)} must be a comma-separated list of integers.") from None
  if not out:
    raise ConfigError(f"--{name} is empty; give at least one value.")
  return out


def _patterns(values: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  try:
    return tuple(dict.fromkeys(tuple(int(c) for c in v.split("/")) for v in values))
  except ValueError:
    raise ConfigError(f"--uneven_patterns={','.join(values)} must be coverages like 1/7/1/7 "
                      "separated by commas.") from None


def _floats(name: str, values: Sequence[str]) -> tuple[float, ...]:
  try:
    return tuple(sorted({float(v) for v in values}))
  except ValueError:
    raise ConfigError(f"--{name}={','.join(values)} must be a comma-separated list of "
                      "numbers.") from None


def pattern_name(pattern: Sequence[int]) -> str:
  return "/".join(str(c) for c in pattern)


def validate(cfg: SweepConfig) -> None:
  """Every range check, with the value and the allowed range."""
  for alg in cfg.algorithms:
    if alg not in ALGORITHM_SETUPS:
      raise ConfigError(f"--algorithms contains {alg!r}; allowed: {', '.join(ALGORITHM_SETUPS)}.")
  if not cfg.algorithms:
    raise ConfigError("--algorithms is empty; give rabo, rafbo or both.")
  for part in cfg.parts:
    if part not in PARTS:
      raise ConfigError(f"--parts contains {part!r}; allowed: {', '.join(PARTS)}.")
  if not cfg.parts:
    raise ConfigError(f"--parts is empty; give some of {', '.join(PARTS)}.")
  if cfg.coverages[0] < 1 or cfg.coverages[-1] > SLOTS:
    raise ConfigError(f"--coverages={list(cfg.coverages)} is outside the allowed range "
                      f"[1, {SLOTS}] (clients per round).")
  if cfg.rounds_list[0] < 1 or len(cfg.rounds_list) < 2:
    raise ConfigError(f"--rounds_list={list(cfg.rounds_list)} needs at least two distinct values "
                      ">= 1 to fit a slope.")
  if cfg.part_rounds[0] < 1 or len(cfg.part_rounds) < 2:
    raise ConfigError(f"--part_rounds={list(cfg.part_rounds)} needs at least two distinct values "
                      ">= 1 to fit a slope.")
  for name, n in (("num_seeds", cfg.num_seeds), ("part_seeds", cfg.part_seeds)):
    if n < 1:
      raise ConfigError(f"--{name}={n} must be >= 1.")
  if not cfg.grad_noise >= 0:
    raise ConfigError(f"--grad_noise={cfg.grad_noise} is outside the allowed range [0, inf).")
  for name, h in (("heterogeneity", cfg.heterogeneity),
                  ("bias_heterogeneity", cfg.bias_heterogeneity)):
    if not 0 <= h <= 1:
      raise ConfigError(f"--{name}={h} is outside the allowed range [0, 1].")
  if cfg.dim < SLOTS or cfg.dim % SLOTS:
    raise ConfigError(f"--dim={cfg.dim} must be a positive multiple of {SLOTS} (one block of "
                      "coordinates per slot, so that the keep ratio is exactly C/8).")
  if not cfg.alpha0 > 0:
    raise ConfigError(f"--alpha0={cfg.alpha0} is outside the allowed range (0, inf).")
  largest = cfg.alpha0 * math.sqrt(cfg.coverages[-1] / min(cfg.rounds_list[0],
                                                          cfg.part_rounds[0]))
  if largest > 1:
    raise ConfigError(f"--alpha0={cfg.alpha0} gives the step alpha0 * sqrt(C/Q) = {largest:.3g} "
                      f"> 1 at C={cfg.coverages[-1]} and the smallest Q of --rounds_list or "
                      "--part_rounds; lower --alpha0 or raise the smallest Q.")
  if not 0 < cfg.fixed_alpha <= 1:
    raise ConfigError(f"--fixed_alpha={cfg.fixed_alpha} is outside the allowed range (0, 1].")
  if "uneven" in cfg.parts:
    if len(cfg.uneven_patterns) < 2:
      raise ConfigError("--uneven_patterns needs at least two patterns to compare.")
    for p in cfg.uneven_patterns:
      if not p or min(p) < 1 or max(p) > SLOTS or (cfg.dim // SLOTS) % len(p):
        raise ConfigError(f"--uneven_patterns entry {pattern_name(p)!r}: every coverage must be "
                          f"in [1, {SLOTS}] and the length must divide --dim / {SLOTS} = "
                          f"{cfg.dim // SLOTS}.")
  if cfg.grad_noise == 0 and {"step_rules", "uneven"} & set(cfg.parts):
    raise ConfigError("--grad_noise=0 with the step_rules or uneven part: those parts compare "
                      "noisy runs with noise-free ones; give --grad_noise > 0 or leave them out "
                      "of --parts.")
  if not cfg.bias_deltas or min(cfg.bias_deltas) <= 0:
    raise ConfigError(f"--bias_deltas={list(cfg.bias_deltas)} must be numbers in (0, inf).")


# Shared flags this driver reads; the other shared flags describe one federated run and are
# fixed here (see the module docstring), so giving one is an error rather than silently ignored.
_SHARED_FLAGS_USED = ("workdir", "seed", "resume", "quick", "smoke", "v_step", "inner_step")
# --v_step and --inner_step (common.V_STEP, common.INNER_STEP): this driver's default is "fixed"
# for both (the affine argument of bilevel/theory.py holds with K = 1); "cauchy" (the library
# default) only when given.
# --smoke (common.SMOKE, for tests): these two Q, one seed, the first two coverages asked for,
# the first two patterns, two deltas and short bias runs.
SMOKE_ROUNDS = (16, 32)


def config_from_flags() -> SweepConfig:
  ignored = sorted(f.name for f in flags.FLAGS.flags_by_module_dict().get("experiments.common", [])
                   if f.present and f.name not in _SHARED_FLAGS_USED)
  if ignored:
    raise ConfigError(f"{', '.join('--' + n for n in ignored)} not used by coverage_rate: its "
                      "federated settings are fixed per algorithm (see its docstring); sweep with "
                      "--coverages, --rounds_list, --num_seeds, --grad_noise, --alpha0.")
  rounds, seeds, parts = ROUNDS_LIST.value, NUM_SEEDS.value, PARTS_FLAG.value
  part_rounds, part_seeds = PART_ROUNDS.value, PART_SEEDS.value
  if QUICK.value:
    if not flags.FLAGS["rounds_list"].present:
      rounds = [str(q) for q in QUICK_ROUNDS]
    if not flags.FLAGS["num_seeds"].present:
      seeds = QUICK_SEEDS
    if not flags.FLAGS["parts"].present:
      parts = ["rate"]
    if not flags.FLAGS["part_rounds"].present:
      part_rounds = [str(q) for q in QUICK_PART_ROUNDS]
  coverages = _ints("coverages", COVERAGES.value)
  patterns = _patterns(UNEVEN_PATTERNS.value)
  deltas = _floats("bias_deltas", BIAS_DELTAS.value)
  bias_rounds = BIAS_ROUNDS
  if common.SMOKE.value:
    rounds, seeds, coverages = [str(q) for q in SMOKE_ROUNDS], 1, coverages[:2]
    part_rounds, part_seeds = rounds, 1
    patterns, deltas, bias_rounds = patterns[:2], deltas[:2], (2 * BIAS_TAIL // 8, BIAS_TAIL // 2)
  cfg = SweepConfig(
      algorithms=tuple(dict.fromkeys(common.algorithm_list(DEFAULT_ALGORITHMS))),
      coverages=coverages, rounds_list=_ints("rounds_list", rounds),
      num_seeds=seeds, grad_noise=GRAD_NOISE.value, heterogeneity=HETEROGENEITY.value,
      dim=DIM.value, alpha0=ALPHA0.value, seed=common.SEED.value,
      parts=tuple(dict.fromkeys(parts)),
      v_step=common.V_STEP.value if flags.FLAGS["v_step"].present else "fixed",
      inner_step=common.INNER_STEP.value if flags.FLAGS["inner_step"].present else "fixed",
      fixed_alpha=FIXED_ALPHA.value,
      uneven_patterns=patterns, bias_deltas=deltas,
      bias_heterogeneity=BIAS_HETEROGENEITY.value, bias_rounds=tuple(sorted(set(bias_rounds))),
      part_rounds=_ints("part_rounds", part_rounds), part_seeds=part_seeds)
  validate(cfg)
  return cfg


# ------------------------------------------------------------------ problems and step rules


class ProblemSpec(NamedTuple):
  problem: Any  # BilevelProblem
  coeffs: Any  # [M, ...] coefficients
  phi: Callable[[jax.Array, Any], jax.Array]
  phi_grad: Callable[[jax.Array, Any], jax.Array]


def separable(num_clients: int, cfg: SweepConfig, heterogeneity: float) -> ProblemSpec:
  coeffs = theory.make_synthetic(num_clients, cfg.dim, seed=cfg.seed, heterogeneity=heterogeneity)
  return ProblemSpec(theory.SYNTHETIC, coeffs, theory.phi, theory.phi_grad)


def bias_problem(name: str, cfg: SweepConfig) -> ProblemSpec:
  num_clients = ALGORITHM_SETUPS[BIAS_ALGORITHM][0]
  if BIAS_PROBLEMS[name] is None:
    return separable(num_clients, cfg, cfg.bias_heterogeneity)
  coupling, rows = BIAS_PROBLEMS[name]
  coeffs = theory.make_coupled(num_clients, cfg.dim, seed=cfg.seed,
                               heterogeneity=cfg.bias_heterogeneity, coupling=coupling,
                               logistic_rows=rows)
  return ProblemSpec(theory.COUPLED, coeffs, theory.coupled_phi, theory.coupled_phi_grad)


def bias_deltas(name: str, cfg: SweepConfig) -> tuple[float, ...]:
  """The fd probes a bias problem runs: all for the logistic one; the smallest and largest for
  the quadratic ones (where fd products are exact, so the two must agree)."""
  if name == "logistic":
    return cfg.bias_deltas
  return tuple(sorted({cfg.bias_deltas[0], cfg.bias_deltas[-1]}))


def step_alpha(rule: str, cfg: SweepConfig, coverage: int, rounds: int) -> float:
  """The outer step alpha of a run (RAFBO takes alpha / K per local step)."""
  if rule == "sqrt_c_over_q":
    return cfg.alpha0 * math.sqrt(coverage / rounds)
  if rule == "inv_sqrt_q":
    return cfg.alpha0 / math.sqrt(rounds)
  if rule == "fixed":
    return cfg.fixed_alpha
  if rule == "bias":
    return BIAS_ALPHA
  raise ValueError(rule)


# ------------------------------------------------------------------ one compiled round, many runs


class Runner(NamedTuple):
  """One compiled chunk of rounds: every C (through the keep ratio), step and seed runs on it."""

  advance: Callable[..., Any]
  finish: Callable[..., Any]
  args: Any  # the round's RoundArgs
  local_steps: int
  num_clients: int


def make_runner(spec: ProblemSpec, algorithm: str, mask_fn: Any, cfg: SweepConfig, x0: jax.Array,
                chunk: int, delta: float = FD_DELTA) -> Runner:
  num_clients, local_steps = ALGORITHM_SETUPS[algorithm]
  fed_cfg = FederatedConfig(
      num_clients=num_clients, clients_per_round=SLOTS,
      client=ClientConfig(local_steps=local_steps, inner_steps=1, inner_lr=INNER_LR,
                          outer_lr=cfg.alpha0 / local_steps, estimator="fd",
                          estimator_options=EstimatorOptions(num_steps=1, step_size=V_STEP,
                                                             delta=delta, v_step=cfg.v_step),
                          inner_step=cfg.inner_step),
      mask=MaskConfig(policy="random", granularity="element"),
      levels=(Level(1.0, 1.0, 1.0),), seed=cfg.seed)
  # The lower-level API (rafbo.make_round), not bilevel.algorithms.get: the sweep traces the
  # unjitted round (jit=False) inside the scan of `advance` below with its own RoundArgs (keep
  # ratios = C/8 and step sizes per run) and controlled-coverage masks (mask_fn).
  rnd = make_round(spec.problem, fed_cfg, None, x0, sample=theory.sample, jit=False,
                   mask_fn=mask_fn)
  step_fn, args = rnd.apply, rnd.hyper

  @jax.jit
  def advance(state, data, args, coeffs, totals, measure):
    """`chunk` rounds; totals = (C_x* so far, C_y* so far, sum of the rounds' mean outer
    coverage); also returns this chunk's sum of ||grad Phi(x_q)||^2 when `measure` (a traced
    bool; 0 otherwise), summed per chunk on the host, so that a floor in the last chunk is not
    lost to cancellation against the early rounds."""

    def body(carry, _):
      state, sq_sum, (cx, cy, cx_mean) = carry
      sq_sum = sq_sum + jax.lax.cond(measure, lambda: jnp.sum(spec.phi_grad(state.x, coeffs) ** 2),
                                     lambda: jnp.zeros((), sq_sum.dtype))
      state, metrics = step_fn(args, state, data)
      cx = jnp.minimum(cx, metrics["coverage_x_min"].astype(cx.dtype))
      cy = jnp.minimum(cy, metrics["coverage_y_min"].astype(cy.dtype))
      cx_mean = cx_mean + metrics["coverage_x_mean"].astype(cx.dtype)
      return (state, sq_sum, (cx, cy, cx_mean)), None

    zero = jnp.zeros((), totals[0].dtype)
    (state, sq_sum, totals), _ = jax.lax.scan(body, (state, zero, totals), None, length=chunk)
    return state, totals, sq_sum

  @jax.jit
  def finish(x, coeffs):
    return jnp.sum(spec.phi_grad(x, coeffs) ** 2), spec.phi(x, coeffs)

  return Runner(advance, finish, args, local_steps, num_clients)


def run_once(runner: Runner, spec: ProblemSpec, x0: jax.Array, *, coverage_ratio: float,
             alpha: float, checkpoints: Sequence[int], seed: int, noise: float, chunk: int,
             cfg: SweepConfig, measure_all: bool = True) -> dict[int, dict[str, Any]]:
  """One run of max(checkpoints) rounds (multiples of chunk) -> {checkpoint q: the run's
  figures after q rounds}. Seed r permutes the clients' coefficients and salts the noise.
  measure_all: ||grad Phi(x_q)||^2 in every round (avg_sq_grad_norm); otherwise only in the
  chunks that end at a checkpoint (tail_sq_grad_norm; avg_sq_grad_norm is None)."""
  perm = np.random.default_rng([cfg.seed, seed]).permutation(runner.num_clients)
  clients = theory.make_clients(jax.tree.map(lambda z: z[perm], spec.coeffs), noise_std=noise,
                                salt=seed)
  data = FederatedData(inner=clients, outer=clients,
                       num_examples=jnp.ones((runner.num_clients,)))
  f64 = lambda v: jnp.asarray(v, jnp.float64)  # explicit dtype: a weak type would retrace
  args = runner.args._replace(
      ratios=jnp.full_like(runner.args.ratios, coverage_ratio),
      steps=dict(runner.args.steps, outer_lr=f64(alpha / runner.local_steps)))
  state = init_state(x0, jnp.zeros_like(x0), optax.sgd(1.0))  # y and v start at 0
  inf = f64(jnp.inf)
  totals = (inf, inf, f64(0.0))
  chunk_sums, out = [], {}
  for i in range(max(checkpoints) // chunk):
    end = (i + 1) * chunk
    state, totals, sq = runner.advance(state, data, args, spec.coeffs, totals,
                                       jnp.asarray(measure_all or end in checkpoints))
    chunk_sums.append(sq)
    if end in checkpoints:
      sums = np.asarray(jax.device_get(chunk_sums))
      final_sq, final_phi = runner.finish(state.x, spec.coeffs)
      cx, cy, cx_mean = (float(v) for v in jax.device_get(totals))
      out[end] = dict(avg_sq_grad_norm=float(np.sum(sums)) / end if measure_all else None,
                      final_sq_grad_norm=float(final_sq), final_phi=float(final_phi),
                      tail_sq_grad_norm=float(sums[-1]) / chunk, tail_rounds=chunk,
                      cx_star=cx, cy_star=cy, cx_mean=cx_mean / end)
  return out


# ------------------------------------------------------------------ the parts


def x_start(cfg: SweepConfig) -> jax.Array:
  return jnp.asarray(np.random.default_rng([cfg.seed, 10**6]).normal(0.0, 2.0, cfg.dim))


def sweep_part(cfg: SweepConfig, part: str, emit: Callable[[dict], None]) -> None:
  """Runs one part; every run goes to emit(record)."""
  x0 = x_start(cfg)
  if part == "bias":
    chunk = math.gcd(BIAS_TAIL, *cfg.bias_rounds)
    for name in BIAS_PROBLEMS:
      spec = bias_problem(name, cfg)
      for delta in bias_deltas(name, cfg):
        t0 = time.perf_counter()
        runner = make_runner(spec, BIAS_ALGORITHM, theory.coverage_schedule(SLOTS), cfg, x0,
                             chunk, delta)
        for c in cfg.coverages:
          alpha = step_alpha("bias", cfg, c, 0)
          runs = run_once(runner, spec, x0, coverage_ratio=c / SLOTS, alpha=alpha,
                          checkpoints=cfg.bias_rounds, seed=0, noise=0.0, chunk=chunk, cfg=cfg,
                          measure_all=False)
          for q, result in runs.items():
            emit(dict(part=part, algorithm=BIAS_ALGORITHM, problem=name, pattern=str(c),
                      coverage=c, step_rule="bias", rounds=q, seed=0, grad_noise=0.0,
                      delta=delta, heterogeneity=cfg.bias_heterogeneity, alpha=alpha, **result))
        print(f"bias {name} delta={delta:g}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return

  rounds, seeds = ((cfg.rounds_list, cfg.num_seeds) if part == "rate" else
                   (cfg.part_rounds, cfg.part_seeds))
  chunk = math.gcd(*rounds)
  for alg in cfg.algorithms:
    # Same seed: the same Phi for every algorithm, only the client split differs.
    spec = separable(ALGORITHM_SETUPS[alg][0], cfg, cfg.heterogeneity)
    if part == "uneven":
      schedules = [(p, theory.pattern_schedule(SLOTS, p), [("inv_sqrt_q", cfg.grad_noise),
                                                           ("inv_sqrt_q", 0.0)])
                   for p in cfg.uneven_patterns]
    else:
      runs = ([("sqrt_c_over_q", cfg.grad_noise)] if part == "rate" else
              [(rule, noise) for rule in STEP_RULES for noise in (cfg.grad_noise, 0.0)])
      schedules = [((c,), None, runs) for c in cfg.coverages]
    runner = None
    for pattern, mask_fn, runs in schedules:
      t0 = time.perf_counter()
      if runner is None or mask_fn is not None:  # coverage_schedule: one compile for every C
        runner = make_runner(spec, alg, mask_fn or theory.coverage_schedule(SLOTS), cfg, x0, chunk)
      c = min(pattern)
      for rule, noise in runs:
        for q in rounds:
          alpha = step_alpha(rule, cfg, c, q)
          for s in range(seeds):
            emit(dict(part=part, algorithm=alg, problem="separable",
                      pattern=pattern_name(pattern), coverage=c,
                      coverage_mean_scheduled=float(np.mean(pattern)), step_rule=rule,
                      rounds=q, seed=s, grad_noise=noise, delta=FD_DELTA,
                      heterogeneity=cfg.heterogeneity, alpha=alpha,
                      **run_once(runner, spec, x0, coverage_ratio=c / SLOTS, alpha=alpha,
                                 checkpoints=(q,), seed=s, noise=noise, chunk=chunk,
                                 cfg=cfg)[q]))
      print(f"{part} {alg} pattern {pattern_name(pattern)}: done in "
            f"{time.perf_counter() - t0:.1f}s", flush=True)


# ------------------------------------------------------------------ summary (from the records)


def fit_slope(xs: Sequence[float], values: Sequence[float]) -> float:
  """Least-squares slope of log(value) against log(x) (x = Q: the slope in Q)."""
  return float(np.polyfit(np.log(xs), np.log(values), 1)[0])


def loglog_slope(xs: Sequence[float], values: Sequence[float]) -> float | None:
  """fit_slope, or None when fewer than two distinct x or a value is not positive and finite."""
  if len(set(xs)) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
    return None
  return fit_slope(xs, values)


def joint_fit(points: Sequence[tuple[float, float, float]]) -> dict[str, float] | None:
  """log v = a + p log C + s log Q by least squares over (C, Q, v): {"c": p, "q": s}."""
  if not points or any(not v > 0 for _, _, v in points):
    return None
  a = np.array([[1.0, math.log(c), math.log(q)] for c, q, _ in points])
  coef = np.linalg.lstsq(a, np.log([v for _, _, v in points]), rcond=None)[0]
  return dict(c=float(coef[1]), q=float(coef[2]))


def _mean_over_seeds(records: Sequence[dict], key_fn, field: str = "avg_sq_grad_norm"):
  groups: dict[Any, list[float]] = {}
  for r in records:
    groups.setdefault(key_fn(r), []).append(r[field])
  return ({k: float(np.mean(v)) for k, v in groups.items()},
          {k: float(np.std(v)) for k, v in groups.items()})


def _nest(flat: dict[tuple, float]) -> dict:
  """{(a, b, c): v} -> {"a": {"b": {"c": v}}} (string keys for JSON)."""
  out: dict = {}
  for key, v in flat.items():
    d = out
    for k in key[:-1]:
      d = d.setdefault(str(k), {})
    d[str(key[-1])] = v
  return out


def _grid_exponents(means: dict[tuple[int, int], float]) -> dict[str, Any]:
  """means {(C, Q): v} -> q_exponents {C}, c_exponents {Q}, joint {c, q}."""
  cs = sorted({c for c, _ in means})
  qs = sorted({q for _, q in means})
  return dict(q_exponents={str(c): loglog_slope(qs, [means[c, q] for q in qs]) for c in cs},
              c_exponents={str(q): loglog_slope(cs, [means[c, q] for c in cs]) for q in qs},
              joint=joint_fit([(c, q, v) for (c, q), v in means.items()]))


def summarize_rate(cfg: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
  """The rate part's summary (the keys --quick has always written, and c_exponents)."""
  means, stds = _mean_over_seeds(records, lambda r: (r["algorithm"], r["coverage"], r["rounds"]))
  q_max, c_min, c_max = cfg.rounds_list[-1], cfg.coverages[0], cfg.coverages[-1]
  slopes, c_exponents, joint, ratios, checks, table = {}, {}, {}, {}, {}, []
  for alg in cfg.algorithms:
    grid = {(c, q): means[alg, c, q] for c in cfg.coverages for q in cfg.rounds_list}
    exps = _grid_exponents(grid)
    slopes[alg] = {c: fit_slope(cfg.rounds_list, [grid[c, q] for q in cfg.rounds_list])
                   for c in cfg.coverages}
    c_exponents[alg], joint[alg] = exps["c_exponents"], exps["joint"]
    at_max = [grid[c, q_max] for c in cfg.coverages]
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
        table.append(dict(algorithm=alg, coverage=c, rounds=q,
                          alpha=step_alpha("sqrt_c_over_q", cfg, c, q),
                          avg_sq_grad_norm=grid[c, q], std_over_seeds=stds[alg, c, q],
                          num_seeds=cfg.num_seeds))
  return dict(avg_sq_grad_norm=_nest(means), avg_sq_grad_norm_std=_nest(stds),
              slopes=_nest({(a, c): s for a, d in slopes.items() for c, s in d.items()}),
              c_exponents=c_exponents, joint_exponents=joint, slope_range=list(SLOPE_RANGE),
              coverage_ratio=ratios, checks=checks, table=table)


def summarize_step_rules(cfg: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
  """Per step rule and algorithm: the noisy and noise-free grids, the noise term (difference)
  and the fitted exponents of each in C and Q."""
  means, _ = _mean_over_seeds(records, lambda r: (r["step_rule"], r["grad_noise"] > 0,
                                                   r["algorithm"], r["coverage"], r["rounds"]))
  out: dict[str, Any] = {}
  for rule in STEP_RULES:
    for alg in cfg.algorithms:
      grid = lambda noisy: {(c, q): means.get((rule, noisy, alg, c, q))
                            for c in cfg.coverages for q in cfg.part_rounds}
      noisy, clean = grid(True), grid(False)
      if any(v is None for v in (*noisy.values(), *clean.values())):
        continue
      term = {k: noisy[k] - clean[k] for k in noisy}
      out.setdefault(rule, {})[alg] = dict(
          avg_sq_grad_norm=_nest(noisy), noise_free=_nest(clean), noise_term=_nest(term),
          noisy_exponents=_grid_exponents(noisy), noise_free_exponents=_grid_exponents(clean),
          noise_term_exponents=_grid_exponents(term))
  return out


def summarize_uneven(cfg: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
  """Per algorithm and Q: each pattern's value, and the fitted exponents against the minimum
  coverage among patterns of equal mean, against the mean among patterns of equal minimum, and
  against mean_j(1/c_j) over all patterns (of the noisy value and of the noise term)."""
  means, _ = _mean_over_seeds(records, lambda r: (r["algorithm"], r["pattern"], r["grad_noise"] > 0,
                                                   r["rounds"]))
  out: dict[str, Any] = {}
  for alg in cfg.algorithms:
    per_pattern, fits = {}, {}
    for q in cfg.part_rounds:
      rows = []
      for p in cfg.uneven_patterns:
        name = pattern_name(p)
        noisy, clean = means[alg, name, True, q], means[alg, name, False, q]
        rows.append((min(p), float(np.mean(p)), float(np.mean([1.0 / c for c in p])), noisy,
                     noisy - clean))
        entry = per_pattern.setdefault(name, dict(min=min(p), mean=float(np.mean(p)),
                                                  inverse_mean=rows[-1][2], avg_sq_grad_norm={},
                                                  noise_free={}, noise_term={}))
        entry["avg_sq_grad_norm"][str(q)] = noisy
        entry["noise_free"][str(q)] = clean
        entry["noise_term"][str(q)] = noisy - clean
      fit = {}
      for label, col in (("value", 3), ("noise_term", 4)):
        by_mean, by_min = {}, {}
        for r in rows:
          by_mean.setdefault(r[1], []).append(r)
          by_min.setdefault(r[0], []).append(r)
        fit[f"{label}_vs_min_at_equal_mean"] = {
            f"{m:g}": loglog_slope([r[0] for r in rs], [r[col] for r in rs])
            for m, rs in sorted(by_mean.items()) if len({r[0] for r in rs}) > 1}
        fit[f"{label}_vs_mean_at_equal_min"] = {
            f"{m:g}": loglog_slope([r[1] for r in rs], [r[col] for r in rs])
            for m, rs in sorted(by_min.items()) if len({r[1] for r in rs}) > 1}
        fit[f"{label}_vs_inverse_mean"] = loglog_slope([r[2] for r in rows], [r[col] for r in rows])
      fits[str(q)] = fit
    out[alg] = dict(patterns=per_pattern, exponents=fits)
  return out


def summarize_bias(records: Sequence[dict]) -> dict[str, Any]:
  """floor {problem: {delta: {C: the tail average at the largest Q}}}, the floor at every Q, and
  the fitted exponents of the floor in C (over C < 8, at each delta) and in delta (at each C),
  over the floors above FLOOR_ZERO (None with fewer than two)."""
  floors = {(r["problem"], r["delta"], r["coverage"], r["rounds"]): r["tail_sq_grad_norm"]
            for r in records}
  q_max = max(k[3] for k in floors)
  at_max = {k[:3]: v for k, v in floors.items() if k[3] == q_max}

  def fit(points):
    points = [(x, v) for x, v in points if v > FLOOR_ZERO]
    return loglog_slope(*zip(*points)) if len(points) > 1 else None

  c_exps, delta_exps = {}, {}
  for name, delta, c in sorted(at_max):
    c_exps.setdefault(name, {})[f"{delta:g}"] = fit(
        [(cc, v) for (n, d, cc), v in sorted(at_max.items())
         if n == name and d == delta and cc < SLOTS])
    delta_exps.setdefault(name, {})[str(c)] = fit(
        [(d, v) for (n, d, cc), v in sorted(at_max.items()) if n == name and cc == c])
  return dict(floor=_nest({(n, f"{d:g}", c): v for (n, d, c), v in at_max.items()}),
              floor_by_rounds=_nest({(n, f"{d:g}", c, q): v for (n, d, c, q), v in floors.items()}),
              rounds=q_max, tail_rounds=records[0]["tail_rounds"], alpha=records[0]["alpha"],
              heterogeneity=records[0]["heterogeneity"], floor_zero=FLOOR_ZERO,
              c_exponents=c_exps, delta_exponents=delta_exps)


def step_note(v_step: str, inner_step: str) -> str:
  """What the sweep's inner and v steps mean for the affine argument of bilevel/theory.py."""
  if v_step == inner_step == "fixed":
    return ("fixed inner and v steps (y <- y - 0.5 grad_y g, v <- v - 0.5 (H v - grad_y f)): with "
            "K = 1 (RABO) a client's update is affine in its coefficients and, on the separable "
            "problem, a submodel computes the exact update of its kept coordinates "
            "(bilevel/theory.py; tests/theory_test.py); with K = 4 (RAFBO) the update is not "
            "affine (products of coefficients across local steps)")
  cauchy = [n for n, v in (("inner", inner_step), ("v", v_step)) if v == "cauchy"]
  return (f"Cauchy {' and '.join(cauchy)} step (min(0.5, r'r / r'Hr), one scalar per client over "
          "its kept coordinates): a client's update is not affine in its coefficients and a "
          "submodel's update depends on which coordinates it keeps, so the affine argument of "
          "bilevel/theory.py does not apply")


def summarize(cfg: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
  """The summary of every part run, computed from the run records alone."""
  by_part = lambda p: [r for r in records if r["part"] == p]
  summary: dict[str, Any] = dict(parts=list(cfg.parts), v_step=cfg.v_step,
                                 inner_step=cfg.inner_step,
                                 step_note=step_note(cfg.v_step, cfg.inner_step))
  if "rate" in cfg.parts:
    summary.update(summarize_rate(cfg, by_part("rate")))
  if "step_rules" in cfg.parts:
    summary["step_rules"] = summarize_step_rules(cfg, by_part("step_rules"))
  if "uneven" in cfg.parts:
    summary["uneven"] = summarize_uneven(cfg, by_part("uneven"))
  if "bias" in cfg.parts:
    summary["bias"] = summarize_bias(by_part("bias"))
  return summary


# ------------------------------------------------------------------ plot and tables


def plot(path: str, cfg: SweepConfig, means: dict, slopes: dict) -> None:
  import matplotlib  # imported here: only the driver plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(cfg.algorithms), figsize=(5 * len(cfg.algorithms), 4),
                           squeeze=False, sharey=True)
  q = np.array(cfg.rounds_list, dtype=float)
  for ax, alg in zip(axes[0], cfg.algorithms):
    for c in cfg.coverages:
      ax.loglog(q, [means[alg][str(c)][str(int(r))] for r in q], "o-",
                label=f"C_x*={c} (slope {slopes[alg][str(c)]:.2f})")
    ref = means[alg][str(cfg.coverages[0])][str(cfg.rounds_list[0])] * (q / q[0]) ** -0.5
    ax.loglog(q, ref, "k--", lw=1, label="Q^-1/2")
    ax.set_title(f"{alg.upper()}: alpha = {cfg.alpha0:g} sqrt(C_x*/Q)")
    ax.set_xlabel("rounds Q")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("(1/Q) sum_q ||grad Phi(x_q)||^2")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _fmt(v: float | None) -> str:
  return "   n/a" if v is None else f"{v:6.3f}"


def print_tables(cfg: SweepConfig, summary: dict) -> None:
  qs = cfg.rounds_list
  head = lambda first: first + "".join(f"{'Q=' + str(q):>11}" for q in qs)
  if "rate" in cfg.parts:
    print(head("alg    C_x* ") + "      slope")
    for alg in cfg.algorithms:
      for c in cfg.coverages:
        row = "".join(f"{summary['avg_sq_grad_norm'][alg][str(c)][str(q)]:11.4g}" for q in qs)
        print(f"{alg:6s} {c:4d} {row} {summary['slopes'][alg][str(c)]:10.3f}")
    for alg in cfg.algorithms:
      r = summary["coverage_ratio"][alg]
      print(f"{alg}: at Q={r['rounds']} avg(C={r['coverage_low']}) / avg(C={r['coverage_high']}) "
            f"= {r['measured']:.3f} (1/sqrt(C) predicts {r['predicted']:.3f}); exponent of C at "
            f"each Q {json.dumps({q: round(v, 3) for q, v in summary['c_exponents'][alg].items()})}"
            f"; joint {json.dumps(_rounded(summary['joint_exponents'][alg]))}; checks "
            f"{json.dumps(summary['checks'][alg])}")
  pq = cfg.part_rounds
  for rule, per_alg in summary.get("step_rules", {}).items():
    for alg, st in per_alg.items():
      for label, grid in (("noisy", "avg_sq_grad_norm"), ("noise_free", "noise_free"),
                          ("noise_term", "noise_term")):
        e = st[f"{label}_exponents"]
        values = " ".join(f"{st[grid][str(c)][str(pq[-1])]:.4g}" for c in cfg.coverages)
        print(f"step rule {rule:13s} {alg:5s} {label:10s}: Q={pq[-1]} per C {values}; exponent "
              f"of C at each Q {' '.join(_fmt(e['c_exponents'][str(q)]) for q in pq)}; of Q "
              f"per C {' '.join(_fmt(e['q_exponents'][str(c)]) for c in cfg.coverages)}")
  for alg, st in summary.get("uneven", {}).items():
    q = str(pq[-1])
    for name, p in st["patterns"].items():
      print(f"uneven {alg:5s} {name:9s} min {p['min']} mean {p['mean']:4.2f} mean(1/c) "
            f"{p['inverse_mean']:.3f}: Q={q} value {p['avg_sq_grad_norm'][q]:.4g} noise term "
            f"{p['noise_term'][q]:.4g}")
    print(f"uneven {alg} exponents at Q={q}: {json.dumps(_rounded(st['exponents'][q]))}")
  if "bias" in summary:
    b = summary["bias"]
    for name, per_delta in b["floor"].items():
      for d, per_c in per_delta.items():
        print(f"bias floor {name:17s} delta={d:>6s}: " +
              " ".join(f"C={c}: {v:.3g}" for c, v in per_c.items()))
    print(f"bias exponents in C: {json.dumps(_rounded(b['c_exponents']))}; in delta: "
          f"{json.dumps(_rounded(b['delta_exponents']))}")


def _rounded(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _rounded(v) for k, v in tree.items()}
  return round(tree, 3) if isinstance(tree, float) else tree


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
  records, part_times = [], {}

  def emit(record: dict) -> None:
    record = to_python(record)
    records.append(record)
    writer(record)

  with jax.enable_x64(True), contextlib.closing(writer):
    for part in cfg.parts:
      t0 = time.perf_counter()
      sweep_part(cfg, part, emit)
      part_times[part] = time.perf_counter() - t0
  summary = summarize(cfg, records)
  summary["part_wall_time_s"] = part_times
  summary["wall_time_s"] = time.perf_counter() - start
  if "rate" in cfg.parts:
    plot(os.path.join(workdir, "coverage_rate.png"), cfg, summary["avg_sq_grad_norm"],
         summary["slopes"])
  print_tables(cfg, summary)
  common.write_summary(workdir, summary)


if __name__ == "__main__":
  app.run(main)
