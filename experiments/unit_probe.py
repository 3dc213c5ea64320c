"""Per-unit coverage probe (docs/method.md, section 8): do hidden units that few of the round's
clients keep take larger or more one-sided updates? Task 1's MLP round as
experiments.hyper_representation builds it (same flags), run dense with stratified sampling (the
compact round's numbers) so each client's full-size delta is seen. Every --probe_every rounds
one JSON line, averaged over those rounds, hidden units binned by their coverage count c_j:

  agg_dx / agg_dy     mean norm of the aggregated delta of unit j's x column / head row
  rad_x / rad_y       its radial part <delta_j, W_j> / ||W_j|| (> 0: the unit grows)
  align               ||coverage mean_j|| / mean ||D_ij|| over the keeping clients
                      (1: the clients agree; 1/sqrt(c_j): independent directions)
  client_dx_by_level  mean ||D_ij|| (x column) over kept units, per keep ratio
  W_col_norm, corr    percentiles of the x-column norms; correlation over units of the sum over
                      rounds of 1/c_j with the unit's norm (> 0: units kept by few grew most)

  python -m experiments.unit_probe --workdir=runs/unit_probe --partition=shards \\
      --flagfile=experiments/presets/hyper_representation_rafbo.cfg --num_clients=100 \\
      --clients_per_round=10 --rounds=120

Measurement only (MLP only): it writes the run's config.json into --workdir and nothing else.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bilevel import models
from bilevel.client import minibatch_sampler
from experiments import common
from experiments import hyper_representation as task

EVERY = flags.DEFINE_integer("probe_every", 10, "Report every this many rounds.")


def main(argv):
  del argv
  common.start_driver()
  run = task.prepare_one()
  state, data = run.state, run.data
  rnd = common.make_algorithm(
      run.problem, models.mlp_layout(task.HIDDEN.value), submodel="dense",
      sample=minibatch_sampler(common.BATCH_SIZE.value), sampling="stratified").make_round(state.x)

  @jax.jit
  def step(state):
    q = state.round
    ids = jnp.concatenate(rnd.sample_fn(q))
    slots = jnp.arange(ids.shape[0])
    res = jax.vmap(rnd.client_fns[0], (None, None, 0, 0, None))(state, data, ids, slots, q)
    new, metrics = rnd.server_fn(state, [res])
    m = res.mask_x["hidden"]["bias"]  # [C, K]
    c = m.sum(0)
    dxc = jnp.sqrt(jnp.sum(res.out.delta_x["hidden"]["kernel"] ** 2, 1) +
                   res.out.delta_x["hidden"]["bias"] ** 2)  # [C, K]
    dyc = jnp.sqrt(jnp.sum(res.out.delta_y["head"]["kernel"] ** 2, -1))  # [C, K]
    W = state.x["hidden"]["kernel"]
    A = new.x["hidden"]["kernel"] - W
    agg_dx = jnp.sqrt(jnp.sum(A ** 2, 0))
    rad_x = jnp.sum(A * W, 0) / jnp.linalg.norm(W, axis=0)
    B = new.y["head"]["kernel"] - state.y["head"]["kernel"]
    agg_dy = jnp.sqrt(jnp.sum(B ** 2, -1))
    head = state.y["head"]["kernel"]
    rad_y = jnp.sum(B * head, -1) / jnp.linalg.norm(head, axis=-1)
    mean_client = jnp.sum(dxc * m, 0) / jnp.maximum(c, 1)
    level = jnp.asarray(rnd.client_ratios)[ids, 0]
    return new, metrics, dict(c=c, agg_dx=agg_dx, rad_x=rad_x, agg_dy=agg_dy, rad_y=rad_y,
                              align=agg_dx / jnp.maximum(mean_client, 1e-12), dxc=dxc, m=m,
                              level=level, wn=jnp.linalg.norm(new.x["hidden"]["kernel"], axis=0),
                              hn=jnp.linalg.norm(new.y["head"]["kernel"], axis=-1))

  bins = [(1, 2), (3, 4), (5, 6), (7, 10)]
  acc = {}
  cum_inv = np.zeros(task.HIDDEN.value)
  for q in range(int(state.round), common.ROUNDS.value):
    state, metrics, d = step(state)
    d = jax.tree.map(np.asarray, d)
    cum_inv += 1.0 / np.maximum(d["c"], 1)
    for lo, hi in bins:
      sel = (d["c"] >= lo) & (d["c"] <= hi)
      for k in ("agg_dx", "rad_x", "agg_dy", "rad_y", "align"):
        acc.setdefault((lo, k), []).append(d[k][sel].mean() if sel.any() else np.nan)
    for r in (1.0, 0.5, 0.25):
      rows = np.isclose(d["level"], r)
      mm = d["m"][rows] > 0
      acc.setdefault(("lvl", r), []).append(d["dxc"][rows][mm].mean() if mm.any() else np.nan)
    if (q + 1) % EVERY.value == 0 or q + 1 == common.ROUNDS.value:
      out = {"round": q + 1, "outer_loss": round(float(metrics["outer_loss"]), 3),
             "acc": round(float(run.eval_fn(state)["test_accuracy"]), 3)}
      for lo, hi in bins:
        out[f"c{lo}-{hi}"] = {k: round(float(np.nanmean(acc[(lo, k)])), 4)
                              for k in ("agg_dx", "rad_x", "agg_dy", "rad_y", "align")}
      out["client_dx_by_level"] = {str(r): round(float(np.nanmean(acc[("lvl", r)])), 4)
                                   for r in (1.0, 0.5, 0.25)}
      wn = d["wn"]
      out["W_col_norm q10/50/90/max"] = [round(float(v), 2)
                                         for v in np.percentile(wn, [10, 50, 90, 100])]
      out["corr(cum 1/c, W norm)"] = round(float(np.corrcoef(cum_inv, wn)[0, 1]), 3)
      out["corr(cum 1/c, head norm)"] = round(float(np.corrcoef(cum_inv, d["hn"])[0, 1]), 3)
      print(json.dumps(out), flush=True)
      acc = {}
      if not np.isfinite(metrics["outer_loss"]) or metrics["outer_loss"] > 100:
        break


if __name__ == "__main__":
  app.run(main)
