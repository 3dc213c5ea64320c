r"""The theory check's sweep (docs/method.md, section 10): convergence against the outer coverage
C_x* and the rounds Q on the problems of `theory`, in four parts (PARTS); `summarize` reads the
run records only. The measured quantity (true gradient, float64):

    avg_sq_grad_norm(C, Q) = (1/Q) sum_{q<Q} ||grad Phi(x_q)||^2

`theory.coverage_schedule` gives every outer coordinate exactly C clients per round (C_x* = C),
read from the keep ratio r_x = C/8, so one compiled runner (`make_runner`) serves every C, step
and Q of an algorithm (ALGORITHM_SETUPS; fd, one inner and one v step of 0.5 per local step:
`step_note`). Outer step rules (RAFBO: alpha / K per local step): sqrt_c_over_q alpha0 sqrt(C/Q)
(the theory's), inv_sqrt_q alpha0 / sqrt(Q), fixed. The parts:

  rate        the grid under sqrt_c_over_q.
  step_rules  the grid under every rule, with noise and without (their difference: the noise term).
  uneven      `theory.pattern_schedule` patterns at inv_sqrt_q, with and without noise.
  bias        RABO without noise on PROBLEMS at alpha = BIAS_ALPHA, for every C and fd delta: the
              floor (mean ||grad Phi(x_q)||^2 over the last chunk).

`seed` fixes the problem and the starting point; run r = 0..num_seeds-1 permutes which client
holds which coefficients and salts the noise.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import algorithms
from bilevel.errors import ConfigError
from bilevel.federated import FederatedData, init_state
from bilevel.tasks import theory

PARTS = ("rate", "step_rules", "uneven", "bias")
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
# The bias part: a fixed step, long enough to settle (the floor at both Q is recorded, so a
# reader sees whether it still moved), the floor averaged over the last TAIL rounds (a multiple
# of the schedule's period 8).
BIAS_ALGORITHM = "rabo"
BIAS_ALPHA = 0.1
BIAS_ROUNDS = (1024, 2048)
BIAS_TAIL = 256
PROBLEMS = {  # name -> (coupling, logistic rows) of theory.make_coupled; None: separable
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


# The driver's --quick sweep (under a minute on 2 CPU cores): these fields unless given.
QUICK = dict(rounds_list=(64, 128, 256, 512, 1024), num_seeds=3, parts=("rate",),
             part_rounds=(64, 256, 1024))


def smoke(cfg: SweepConfig) -> SweepConfig:
  """The tests' tiny sweep: Q = 16, 32, one seed, two coverages, patterns and deltas."""
  return cfg._replace(rounds_list=(16, 32), num_seeds=1, coverages=cfg.coverages[:2],
                      part_rounds=(16, 32), part_seeds=1, uneven_patterns=cfg.uneven_patterns[:2],
                      bias_deltas=cfg.bias_deltas[:2], bias_rounds=(BIAS_TAIL // 4, BIAS_TAIL // 2))


def pattern_name(pattern: Sequence[int]) -> str:
  return "/".join(str(c) for c in pattern)


def validate(cfg: SweepConfig) -> None:
  """Every range check, with the value and the allowed range (ConfigError)."""
  def need(ok: Any, message: str) -> None:
    if not ok:
      raise ConfigError(message)

  for name, allowed in (("algorithms", ALGORITHM_SETUPS), ("parts", PARTS)):
    given = getattr(cfg, name)
    need(given and set(given) <= set(allowed),
         f"{name}={list(given)} must be one or more of {', '.join(allowed)}.")
  need(cfg.coverages and 1 <= cfg.coverages[0] and cfg.coverages[-1] <= SLOTS,
       f"coverages={list(cfg.coverages)} is outside the allowed range [1, {SLOTS}] (clients per "
       "round).")
  for name in ("rounds_list", "part_rounds"):
    q = getattr(cfg, name)
    need(len(q) >= 2 and q[0] >= 1,
         f"{name}={list(q)} needs at least two distinct values >= 1 to fit a slope.")
  for name in ("num_seeds", "part_seeds"):
    need(getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)} must be >= 1.")
  need(cfg.grad_noise >= 0, f"grad_noise={cfg.grad_noise} is outside the allowed range [0, inf).")
  for name in ("heterogeneity", "bias_heterogeneity"):
    need(0 <= getattr(cfg, name) <= 1,
         f"{name}={getattr(cfg, name)} is outside the allowed range [0, 1].")
  need(cfg.dim >= SLOTS and not cfg.dim % SLOTS,
       f"dim={cfg.dim} must be a positive multiple of {SLOTS} (one block of coordinates per "
       "slot, so that the keep ratio is exactly C/8).")
  need(cfg.alpha0 > 0, f"alpha0={cfg.alpha0} is outside the allowed range (0, inf).")
  largest = cfg.alpha0 * math.sqrt(cfg.coverages[-1] / min(cfg.rounds_list[0],
                                                          cfg.part_rounds[0]))
  need(largest <= 1, f"alpha0={cfg.alpha0} gives the step alpha0 * sqrt(C/Q) = {largest:.3g} > 1 "
       f"at C={cfg.coverages[-1]} and the smallest Q of rounds_list or part_rounds; lower alpha0 "
       "or raise the smallest Q.")
  need(0 < cfg.fixed_alpha <= 1,
       f"fixed_alpha={cfg.fixed_alpha} is outside the allowed range (0, 1].")
  if "uneven" in cfg.parts:
    need(len(cfg.uneven_patterns) >= 2, "uneven_patterns needs at least two patterns to compare.")
    for p in cfg.uneven_patterns:
      need(p and min(p) >= 1 and max(p) <= SLOTS and not (cfg.dim // SLOTS) % len(p),
           f"uneven_patterns entry {pattern_name(p)!r}: every coverage must be in [1, {SLOTS}] "
           f"and the length must divide dim / {SLOTS} = {cfg.dim // SLOTS}.")
  need(cfg.grad_noise > 0 or not {"step_rules", "uneven"} & set(cfg.parts),
       "grad_noise=0 with the step_rules or uneven part: those parts compare noisy runs with "
       "noise-free ones; give grad_noise > 0 or leave them out of parts.")
  need(cfg.bias_deltas and min(cfg.bias_deltas) > 0,
       f"bias_deltas={list(cfg.bias_deltas)} must be numbers in (0, inf).")


# ------------------------------------------------------------------ problems and step rules


class ProblemSpec(NamedTuple):
  problem: Any  # BilevelProblem
  coeffs: Any  # [M, ...] coefficients
  phi: Callable[[jax.Array, Any], jax.Array]
  phi_grad: Callable[[jax.Array, Any], jax.Array]


def make_problem(name: str, num_clients: int, cfg: SweepConfig,
                 heterogeneity: float) -> ProblemSpec:
  """PROBLEMS[name] with num_clients clients: the same Phi for every num_clients (seed)."""
  if PROBLEMS[name] is None:
    coeffs = theory.make_synthetic(num_clients, cfg.dim, seed=cfg.seed,
                                   heterogeneity=heterogeneity)
    return ProblemSpec(theory.SYNTHETIC, coeffs, theory.phi, theory.phi_grad)
  coupling, rows = PROBLEMS[name]
  coeffs = theory.make_coupled(num_clients, cfg.dim, seed=cfg.seed, heterogeneity=heterogeneity,
                               coupling=coupling, logistic_rows=rows)
  return ProblemSpec(theory.COUPLED, coeffs, theory.coupled_phi, theory.coupled_phi_grad)


def step_alpha(rule: str, cfg: SweepConfig, coverage: int, rounds: int) -> float:
  """The outer step alpha of a run (RAFBO takes alpha / K per local step)."""
  return {"sqrt_c_over_q": lambda: cfg.alpha0 * math.sqrt(coverage / rounds),
          "inv_sqrt_q": lambda: cfg.alpha0 / math.sqrt(rounds),
          "fixed": lambda: cfg.fixed_alpha, "bias": lambda: BIAS_ALPHA}[rule]()


# ------------------------------------------------------------------ one compiled round, many runs


def make_runner(spec: ProblemSpec, algorithm: str, mask_fn: Any, cfg: SweepConfig, x0: jax.Array,
                chunk: int, delta: float) -> Callable[..., dict[int, dict[str, Any]]]:
  """Compiles `chunk` rounds of the algorithm on spec once; returns run(coverage_ratio, alpha,
  checkpoints, seed, noise, measure_all) -> {checkpoint q: the run's figures after q rounds}.

  A run takes max(checkpoints) rounds (multiples of chunk). Seed r permutes the clients'
  coefficients and salts the noise. measure_all: ||grad Phi(x_q)||^2 in every round
  (avg_sq_grad_norm); otherwise only in the chunks that end at a checkpoint (tail_sq_grad_norm;
  avg_sq_grad_norm is None). The sum of ||grad Phi||^2 is kept per chunk and added on the host,
  so that a floor in the last chunk is not lost to cancellation against the early rounds."""
  num_clients, local_steps = ALGORITHM_SETUPS[algorithm]
  alg = algorithms.get(
      "rafbo", problem=spec.problem, num_clients=num_clients, clients_per_round=SLOTS,
      local_steps=local_steps, inner_steps=1, inner_lr=INNER_LR,
      outer_lr=cfg.alpha0 / local_steps, estimator="fd", num_steps=1, v_lr=V_STEP, delta=delta,
      v_step=cfg.v_step, inner_step=cfg.inner_step, granularity="element", seed=cfg.seed,
      sample=theory.sample, mask_fn=mask_fn)
  # Unjitted (jit=False): traced inside advance's scan with each run's RoundArgs.
  rnd = alg.make_round(x0, jit=False)

  @jax.jit
  def advance(state, data, args, coeffs, totals, measure):
    """totals = (C_x* so far, C_y* so far, sum of the rounds' mean outer coverage)."""

    def body(carry, _):
      state, sq_sum, (cx, cy, cx_mean) = carry
      sq_sum = sq_sum + jax.lax.cond(
          measure, lambda: jnp.sum(spec.phi_grad(state.x, coeffs) ** 2),
          lambda: jnp.zeros((), sq_sum.dtype))
      state, metrics = rnd.apply(args, state, data)
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

  def run(*, coverage_ratio: float, alpha: float, checkpoints: Sequence[int], seed: int,
          noise: float, measure_all: bool) -> dict[int, dict[str, Any]]:
    perm = np.random.default_rng([cfg.seed, seed]).permutation(num_clients)
    clients = theory.make_clients(jax.tree.map(lambda z: z[perm], spec.coeffs), noise_std=noise,
                                  salt=seed)
    data = FederatedData(inner=clients, outer=clients, num_examples=jnp.ones((num_clients,)))
    f64 = lambda v: jnp.asarray(v, jnp.float64)  # explicit dtype: a weak type would retrace
    args = rnd.hyper._replace(ratios=jnp.full_like(rnd.hyper.ratios, coverage_ratio),
                              steps=dict(rnd.hyper.steps, outer_lr=f64(alpha / local_steps)))
    state = init_state(x0, jnp.zeros_like(x0), optax.sgd(1.0))  # y and v start at 0
    totals = (f64(jnp.inf), f64(jnp.inf), f64(0.0))
    chunk_sums, out = [], {}
    for i in range(max(checkpoints) // chunk):
      end = (i + 1) * chunk
      state, totals, sq = advance(state, data, args, spec.coeffs, totals,
                                  jnp.asarray(measure_all or end in checkpoints))
      chunk_sums.append(sq)
      if end in checkpoints:
        sums = np.asarray(jax.device_get(chunk_sums))
        final_sq, final_phi = finish(state.x, spec.coeffs)
        cx, cy, cx_mean = (float(v) for v in jax.device_get(totals))
        out[end] = dict(avg_sq_grad_norm=float(np.sum(sums)) / end if measure_all else None,
                        final_sq_grad_norm=float(final_sq), final_phi=float(final_phi),
                        tail_sq_grad_norm=float(sums[-1]) / chunk, tail_rounds=chunk,
                        cx_star=cx, cy_star=cy, cx_mean=cx_mean / end)
    return out

  return run


# ------------------------------------------------------------------ the parts


def _runners(cfg: SweepConfig, part: str):
  """Per compiled runner of a part: (algorithm, problem name, heterogeneity, delta, mask_fn, the
  coverage patterns run on it). coverage_schedule reads C from the keep ratio, so one runner
  serves every C; each uneven pattern and each bias delta has its own."""
  even = [(c,) for c in cfg.coverages]
  if part == "bias":
    for name in PROBLEMS:
      # fd products are exact on the quadratic problems: the smallest and largest delta must agree.
      deltas = (cfg.bias_deltas if name == "logistic" else
                sorted({cfg.bias_deltas[0], cfg.bias_deltas[-1]}))
      for delta in deltas:
        yield (BIAS_ALGORITHM, name, cfg.bias_heterogeneity, delta,
               theory.coverage_schedule(SLOTS), even)
    return
  for alg in cfg.algorithms:
    if part == "uneven":
      for p in cfg.uneven_patterns:
        yield alg, "separable", cfg.heterogeneity, FD_DELTA, theory.pattern_schedule(SLOTS, p), [p]
    else:
      yield alg, "separable", cfg.heterogeneity, FD_DELTA, theory.coverage_schedule(SLOTS), even


def sweep_part(cfg: SweepConfig, part: str, emit: Callable[[dict], None],
               log: Callable[[str], None] = print) -> None:
  """Runs one part; every run goes to emit(record). The bias part runs each point once to
  max(bias_rounds) and records the tail at every Q of bias_rounds; the others run each Q."""
  x0 = jnp.asarray(np.random.default_rng([cfg.seed, 10**6]).normal(0.0, 2.0, cfg.dim))
  noise = cfg.grad_noise
  if part == "bias":
    checkpoints, seeds, runs = [cfg.bias_rounds], 1, [("bias", 0.0)]
    chunk = math.gcd(BIAS_TAIL, *cfg.bias_rounds)
  else:
    rounds, seeds = ((cfg.rounds_list, cfg.num_seeds) if part == "rate" else
                     (cfg.part_rounds, cfg.part_seeds))
    checkpoints, chunk = [(q,) for q in rounds], math.gcd(*rounds)
    runs = {"rate": [("sqrt_c_over_q", noise)],
            "uneven": [("inv_sqrt_q", noise), ("inv_sqrt_q", 0.0)],
            "step_rules": [(rule, n) for rule in STEP_RULES for n in (noise, 0.0)]}[part]
  for alg, problem, heterogeneity, delta, mask_fn, patterns in _runners(cfg, part):
    t0 = time.perf_counter()
    # Same seed: the same Phi for every algorithm, only the client split differs.
    spec = make_problem(problem, ALGORITHM_SETUPS[alg][0], cfg, heterogeneity)
    run = make_runner(spec, alg, mask_fn, cfg, x0, chunk, delta)
    for pattern in patterns:
      c = min(pattern)
      scheduled = {} if part == "bias" else dict(coverage_mean_scheduled=float(np.mean(pattern)))
      for rule, sigma in runs:
        for points in checkpoints:
          alpha = step_alpha(rule, cfg, c, points[-1])
          for s in range(seeds):
            results = run(coverage_ratio=c / SLOTS, alpha=alpha, checkpoints=points, seed=s,
                          noise=sigma, measure_all=part != "bias")
            for q, result in results.items():
              emit(dict(part=part, algorithm=alg, problem=problem, pattern=pattern_name(pattern),
                        coverage=c, step_rule=rule, rounds=q, seed=s, grad_noise=sigma,
                        delta=delta, heterogeneity=heterogeneity, alpha=alpha, **scheduled,
                        **result))
    log(f"{part} {alg} {problem} delta={delta:g} patterns "
        f"{','.join(pattern_name(p) for p in patterns)}: done in {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------ summary (from the records)


def loglog_slope(xs: Sequence[float], values: Sequence[float]) -> float | None:
  """Least-squares slope of log(value) against log(x), or None when fewer than two distinct x
  or a value is not positive and finite."""
  if len(set(xs)) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
    return None
  return float(np.polyfit(np.log(xs), np.log(values), 1)[0])


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
  """means {(C, Q): v} -> q_exponents {C}, c_exponents {Q}, and joint {c: p, q: s} of the
  least-squares fit log v = a + p log C + s log Q (None unless every v > 0)."""
  cs = sorted({c for c, _ in means})
  qs = sorted({q for _, q in means})
  joint = None
  if means and all(v > 0 for v in means.values()):
    a = np.array([[1.0, math.log(c), math.log(q)] for c, q in means])
    coef = np.linalg.lstsq(a, np.log(list(means.values())), rcond=None)[0]
    joint = dict(c=float(coef[1]), q=float(coef[2]))
  return dict(q_exponents={str(c): loglog_slope(qs, [means[c, q] for q in qs]) for c in cs},
              c_exponents={str(q): loglog_slope(cs, [means[c, q] for c in cs]) for q in qs},
              joint=joint)


def summarize_rate(cfg: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
  """The rate part's summary: means and stds over seeds, slopes in Q, exponents of C, the
  ratio of the extreme coverages at the largest Q against 1/sqrt(C), checks, a flat table."""
  means, stds = _mean_over_seeds(records, lambda r: (r["algorithm"], r["coverage"], r["rounds"]))
  q_max, c_min, c_max = cfg.rounds_list[-1], cfg.coverages[0], cfg.coverages[-1]
  slopes, c_exponents, joint, ratios, checks, table = {}, {}, {}, {}, {}, []
  for alg in cfg.algorithms:
    grid = {(c, q): means[alg, c, q] for c in cfg.coverages for q in cfg.rounds_list}
    exps = _grid_exponents(grid)
    slopes[alg], c_exponents[alg], joint[alg] = (exps["q_exponents"], exps["c_exponents"],
                                                 exps["joint"])
    at_max = [grid[c, q_max] for c in cfg.coverages]
    measured, predicted = at_max[0] / at_max[-1], math.sqrt(c_max / c_min)
    ratios[alg] = dict(measured=measured, predicted=predicted,
                       measured_over_predicted=measured / predicted, rounds=q_max,
                       coverage_low=c_min, coverage_high=c_max)
    checks[alg] = dict(
        slopes_in_range=all(s is not None and SLOPE_RANGE[0] <= s <= SLOPE_RANGE[1]
                            for s in slopes[alg].values()),
        monotone_in_coverage_at_largest_rounds=bool(np.all(np.diff(at_max) < 0)),
        ratio_within_factor_2=0.5 <= measured / predicted <= 2.0)
    table += [dict(algorithm=alg, coverage=c, rounds=q,
                   alpha=step_alpha("sqrt_c_over_q", cfg, c, q), avg_sq_grad_norm=grid[c, q],
                   std_over_seeds=stds[alg, c, q], num_seeds=cfg.num_seeds)
              for c in cfg.coverages for q in cfg.rounds_list]
  return dict(avg_sq_grad_norm=_nest(means), avg_sq_grad_norm_std=_nest(stds), slopes=slopes,
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
  """Per algorithm: each pattern's value, noise-free value and noise term per Q, and per Q the
  fitted exponents (of the value and of the noise term) against the minimum coverage among
  patterns of equal mean, against the mean among patterns of equal minimum, and against
  mean_j(1/c_j) over all patterns."""
  means, _ = _mean_over_seeds(records, lambda r: (r["algorithm"], r["pattern"], r["grad_noise"] > 0,
                                                   r["rounds"]))
  patterns = cfg.uneven_patterns
  stats = {p: dict(min=min(p), mean=float(np.mean(p)),
                   inverse_mean=float(np.mean([1.0 / c for c in p]))) for p in patterns}

  def slopes_within(group: str, along: str, value: dict) -> dict[str, float | None]:
    """{g: slope of value against stats `along`} over the patterns whose stats `group` is g."""
    groups: dict[float, list] = {}
    for p in patterns:
      groups.setdefault(stats[p][group], []).append(p)
    return {f"{g:g}": loglog_slope([stats[p][along] for p in ps], [value[p] for p in ps])
            for g, ps in sorted(groups.items()) if len({stats[p][along] for p in ps}) > 1}

  out: dict[str, Any] = {}
  for alg in cfg.algorithms:
    per_pattern, fits = {}, {}
    for p in patterns:
      at = lambda noisy: {str(q): means[alg, pattern_name(p), noisy, q] for q in cfg.part_rounds}
      noisy, clean = at(True), at(False)
      per_pattern[pattern_name(p)] = dict(stats[p], avg_sq_grad_norm=noisy, noise_free=clean,
                                          noise_term={q: noisy[q] - clean[q] for q in noisy})
    for q in map(str, cfg.part_rounds):
      fits[q] = {}
      for label, field in (("value", "avg_sq_grad_norm"), ("noise_term", "noise_term")):
        value = {p: per_pattern[pattern_name(p)][field][q] for p in patterns}
        fits[q][f"{label}_vs_min_at_equal_mean"] = slopes_within("mean", "min", value)
        fits[q][f"{label}_vs_mean_at_equal_min"] = slopes_within("min", "mean", value)
        fits[q][f"{label}_vs_inverse_mean"] = loglog_slope(
            [stats[p]["inverse_mean"] for p in patterns], [value[p] for p in patterns])
    out[alg] = dict(patterns=per_pattern, exponents=fits)
  return out


def summarize_bias(_: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
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
  """What the sweep's inner and v steps mean for the affine argument of the theory module."""
  if v_step == inner_step == "fixed":
    return ("fixed inner and v steps (y <- y - 0.5 grad_y g, v <- v - 0.5 (H v - grad_y f)): with "
            "K = 1 (RABO) a client's update is affine in its coefficients and, on the separable "
            "problem, a submodel computes the exact update of its kept coordinates "
            "(bilevel/tasks/theory.py; tests/theory_test.py); with K = 4 (RAFBO) the update is "
            "not affine (products of coefficients across local steps)")
  cauchy = [n for n, v in (("inner", inner_step), ("v", v_step)) if v == "cauchy"]
  return (f"Cauchy {' and '.join(cauchy)} step (min(0.5, r'r / r'Hr), one scalar per client over "
          "its kept coordinates): a client's update is not affine in its coefficients and a "
          "submodel's update depends on which coordinates it keeps, so the affine argument of "
          "bilevel/tasks/theory.py does not apply")


def summarize(cfg: SweepConfig, records: Sequence[dict]) -> dict[str, Any]:
  """The summary of every part run, computed from the run records alone."""
  by_part = lambda p: [r for r in records if r["part"] == p]
  summary: dict[str, Any] = dict(parts=list(cfg.parts), v_step=cfg.v_step,
                                 inner_step=cfg.inner_step,
                                 step_note=step_note(cfg.v_step, cfg.inner_step))
  if "rate" in cfg.parts:
    summary.update(summarize_rate(cfg, by_part("rate")))
  for part, fn in (("step_rules", summarize_step_rules), ("uneven", summarize_uneven),
                   ("bias", summarize_bias)):
    if part in cfg.parts:
      summary[part] = fn(cfg, by_part(part))
  return summary


# ------------------------------------------------------------------ output


def report(cfg: SweepConfig, summary: dict[str, Any]) -> str:
  """The rate part's table (avg_sq_grad_norm over Q per algorithm and C, slope in Q), then each
  part's main fits to 4 significant digits."""
  lines = []
  if "rate" in cfg.parts:
    lines.append("alg    C_x* " + "".join(f"{'Q=' + str(q):>11}" for q in cfg.rounds_list)
                 + "      slope")
    lines += [f"{alg:6s} {c:4d} " + "".join(
        f"{summary['avg_sq_grad_norm'][alg][str(c)][str(q)]:11.4g}" for q in cfg.rounds_list)
              + f" {summary['slopes'][alg][str(c)]:10.3f}"
              for alg in cfg.algorithms for c in cfg.coverages]
  fits = dict(
      rate=lambda: {k: summary[k] for k in ("coverage_ratio", "c_exponents", "joint_exponents")},
      step_rules=lambda: {rule: {alg: st["noise_term_exponents"]["c_exponents"]  # noise vs C
                                 for alg, st in per_alg.items()}
                          for rule, per_alg in summary["step_rules"].items()},
      uneven=lambda: {alg: st["exponents"] for alg, st in summary["uneven"].items()},
      bias=lambda: {k: summary["bias"][k] for k in ("floor", "c_exponents", "delta_exponents")})
  short = lambda t: ({k: short(v) for k, v in t.items()} if isinstance(t, dict) else
                     float(f"{t:.4g}") if isinstance(t, float) else t)
  return "\n".join(lines + [f"{part}: {json.dumps(short(fits[part]()))}" for part in cfg.parts])


def plot_rate(path: str, cfg: SweepConfig, summary: dict[str, Any]) -> None:
  """The rate part on log-log axes, one panel per algorithm, with a Q^-1/2 reference."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the driver plots)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(cfg.algorithms), figsize=(5 * len(cfg.algorithms), 4),
                           squeeze=False, sharey=True)
  q = np.array(cfg.rounds_list, dtype=float)
  for ax, alg in zip(axes[0], cfg.algorithms):
    means = summary["avg_sq_grad_norm"][alg]
    for c in cfg.coverages:
      ax.loglog(q, [means[str(c)][str(r)] for r in cfg.rounds_list], "o-",
                label=f"C_x*={c} (slope {summary['slopes'][alg][str(c)]:.2f})")
    ax.loglog(q, means[str(cfg.coverages[0])][str(cfg.rounds_list[0])] * (q / q[0]) ** -0.5, "k--",
              lw=1, label="Q^-1/2")
    ax.set(title=f"{alg.upper()}: alpha = {cfg.alpha0:g} sqrt(C_x*/Q)", xlabel="rounds Q")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("(1/Q) sum_q ||grad Phi(x_q)||^2")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
