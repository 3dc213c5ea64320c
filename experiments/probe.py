"""Task 1's round, built as experiments.hyper_representation builds it (same flags), measured
every --probe_every rounds: one JSON line each (docs/method.md, section 8; figures: docs/tools.md).

  python -m experiments.probe --probe=stability --workdir=runs/probe --partition=dirichlet \\
      --alpha=0.1 --flagfile=experiments/presets/hyper_representation_rafbo.cfg --inner_step=fixed
"""
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bilevel import diagnostics, models, tree
from bilevel.client import minibatch_sampler
from bilevel.tasks import hyper_representation as hr_task
from experiments import common
from experiments import hyper_representation as task

PROBE = flags.DEFINE_enum("probe", "stability", ["stability", "units"], "What to measure.")
PROBE_EVERY = flags.DEFINE_integer("probe_every", 10, "Measure every this many rounds.")
POWER_STEPS = flags.DEFINE_integer("power_steps", 30, "Power-iteration steps per curvature.")
BINS = ((1, 2), (3, 4), (5, 6), (7, 10))  # units: coverage counts c_j


def stability(run: common.SeedRun):
  """(step, report): the driver's round; the state's norms, scales and curvatures."""
  x_test, _ = hr_task.test_arrays(common.load_data(), task.MODEL.value)
  curvature = functools.partial(diagnostics.max_curvature, run.problem.inner_loss,
                                steps=POWER_STEPS.value)
  # all valid train rows of all clients, weights 1 (the global inner loss G up to weighting)
  rows = run.data.inner["weight"].reshape(-1) > 0
  everything = jax.tree.map(lambda t: t.reshape((-1,) + t.shape[2:])[rows], run.data.inner)

  @jax.jit
  def measure(state, everything):
    x, y = state.x, state.y
    per_client = jax.vmap(lambda b: curvature(x, y, b, jax.random.key(2)))(run.data.inner)
    feats = models.FEATURES[task.MODEL.value](x, x_test, common.ACTIVATION.value)
    logits = models.LOGITS[task.MODEL.value](x, y, x_test, common.ACTIVATION.value)
    return dict(norm_x=tree.norm(x), norm_y=tree.norm(y), norm_v=tree.norm(state.v),
                feature_norm=jnp.sqrt(jnp.mean(jnp.sum(feats.reshape(len(feats), -1) ** 2, -1))),
                logit_max=jnp.mean(jnp.max(jnp.abs(logits), -1)),
                curvature_global=curvature(x, y, everything, jax.random.key(1)),
                curvature_client_max=jnp.max(per_client),
                curvature_client_min=jnp.min(per_client))

  def report(state):
    figures = {k: float(v) for k, v in measure(state, everything).items()}
    return dict(figures, inner_step_ratio=common.INNER_LR.value * figures["curvature_client_max"])

  return lambda state: run.rnd.step(state, run.data), report


def units(run: common.SeedRun):
  """(step, report): the round dense with stratified sampling (the compact round's numbers), so
  that each client's full-size delta is seen; per-unit figures averaged over the rounds."""
  if task.MODEL.value != "mlp":
    common.fail("--probe=units measures the MLP's hidden units: give --model=mlp.")
  rnd = common.make_algorithm(
      run.problem, models.mlp_layout(common.HIDDEN.value), submodel="dense",
      sample=minibatch_sampler(common.BATCH_SIZE.value), sampling="stratified"
  ).make_round(run.state.x)
  one_round = jax.jit(functools.partial(diagnostics.unit_round, rnd, run.data))
  window, cum_inv = [], np.zeros(common.HIDDEN.value)  # cum_inv: sum over rounds of 1/c

  def step(state):
    state, metrics, d = one_round(state)
    window.append(jax.tree.map(np.asarray, d))
    np.add(cum_inv, 1.0 / np.maximum(window[-1]["c"], 1), out=cum_inv)
    return state, metrics

  def report(state):
    def mean(key, select):  # over the window's rounds of each round's mean (nan: none selected)
      return float(np.nanmean([d[key][s].mean() if (s := select(d)).any() else np.nan
                               for d in window]))

    out = {f"c{lo}-{hi}": {k: mean(k, lambda d: (d["c"] >= lo) & (d["c"] <= hi))
                           for k in ("agg_dx", "rad_x", "agg_dy", "rad_y", "align")}
           for lo, hi in BINS}
    out["client_dx_by_level"] = {str(r): mean("dxc", lambda d: np.isclose(d["level"], r)[:, None]
                                              & (d["m"] > 0)) for r in (1.0, 0.5, 0.25)}
    wn, hn = window[-1]["wn"], window[-1]["hn"]
    window.clear()
    return dict(out, **{"W_col_norm q10/50/90/max": np.percentile(wn, [10, 50, 90, 100]).tolist(),
                        "corr(cum 1/c, W norm)": float(np.corrcoef(cum_inv, wn)[0, 1]),
                        "corr(cum 1/c, head norm)": float(np.corrcoef(cum_inv, hn)[0, 1])})

  return step, report


def main(argv):
  common.start_driver(task.cnn_defaults(), argv)
  run = common.gather([], task.prepare_one)[0]
  step, report = dict(stability=stability, units=units)[PROBE.value](run)
  state = run.state
  for q in range(int(state.round), common.ROUNDS.value):
    state, metrics = step(state)
    if (q + 1) % PROBE_EVERY.value and q + 1 != common.ROUNDS.value:
      continue
    record = dict(round=q + 1, outer_loss=float(metrics["outer_loss"]),
                  test_accuracy=float(run.eval_fn(state)["test_accuracy"]), **report(state))
    print(json.dumps(json.loads(json.dumps(record), parse_float=lambda v: round(float(v), 4))),
          flush=True)  # every float to 4 decimals
    if not math.isfinite(record["outer_loss"]) or record["outer_loss"] > 100:
      print(f"stopped: outer loss {record['outer_loss']:.4g} at round {q + 1}")
      break


if __name__ == "__main__":
  app.run(main)
