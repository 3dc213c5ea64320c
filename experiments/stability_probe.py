"""What grows first when a run becomes unstable (docs/method.md, section 8): task 1's round,
built exactly as experiments.hyper_representation builds it (same flags), stepped round by round
with the state measured every --probe_every rounds. One JSON line per measured round:

  round, outer_loss, test_accuracy        the round's metrics and the global model's accuracy
  norm_x, norm_y, norm_v                  norms of the server's x, y and v
  feature_norm                            RMS over test images of ||features(x)|| (the MLP's
                                          hidden activations, or the CNN's flattened conv2)
  logit_max                               mean over test images of max |logit|
  curvature_global                        lambda_max of the global inner Hessian H at (x, y)
                                          (power iteration, exact products, all train rows)
  curvature_client_max / _min             the same per client on its own train split
  inner_step_ratio                        inner_lr x curvature_client_max (a fixed inner step
                                          oscillates on that client's quadratic model past 2)

  python -m experiments.stability_probe --workdir=runs/probe --partition=dirichlet --alpha=0.1 \\
      --flagfile=experiments/presets/hyper_representation_rafbo.cfg --inner_step=fixed

Measurement only: it writes the run's config.json into --workdir and nothing else.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from bilevel import hypergrad, models, tree
from bilevel.tasks import hyper_representation as hr_task
from experiments import common
from experiments import hyper_representation as task

PROBE_EVERY = flags.DEFINE_integer("probe_every", 10, "Measure the state every this many rounds.")
POWER_STEPS = flags.DEFINE_integer("power_steps", 30, "Power-iteration steps per curvature.")


def make_measure(problem, data, x_test):
  """state -> dict of the module docstring's figures (one jitted program)."""
  rows = data.inner["weight"].reshape(-1) > 0
  flat = jax.tree.map(lambda t: t.reshape((-1,) + t.shape[2:]), data.inner)

  def curvature(x, y, batch, key):
    hv = lambda p: hypergrad.exact_products(problem.inner_loss, x, y, p, batch, 0.0, False).hv
    p0 = jax.tree.map(lambda t: jax.random.normal(key, t.shape, t.dtype), y)

    def power(p, _):
      hp = hv(p)
      return tree.scale(1.0 / jnp.maximum(tree.norm(hp), 1e-30), hp), None

    p, _ = jax.lax.scan(power, p0, None, length=POWER_STEPS.value)
    return tree.vdot(p, hv(p))

  @jax.jit
  def measure(state, everything):
    x, y = state.x, state.y
    glob = curvature(x, y, everything, jax.random.key(1))
    per_client = jax.vmap(lambda b: curvature(x, y, b, jax.random.key(2)))(data.inner)
    logits = models.LOGITS[task.MODEL.value](x, y, x_test, task.ACTIVATION.value)
    feats = models.FEATURES[task.MODEL.value](x, x_test, task.ACTIVATION.value)
    feats = feats.reshape(feats.shape[0], -1)
    return dict(norm_x=tree.norm(x), norm_y=tree.norm(y), norm_v=tree.norm(state.v),
                feature_norm=jnp.sqrt(jnp.mean(jnp.sum(feats ** 2, -1))),
                logit_max=jnp.mean(jnp.max(jnp.abs(logits), -1)),
                curvature_global=glob, curvature_client_max=jnp.max(per_client),
                curvature_client_min=jnp.min(per_client))

  # all valid train rows of all clients, weights 1 (the global inner loss G up to weighting)
  everything = jax.tree.map(lambda t: t[rows], flat)
  return lambda state: measure(state, everything)


def main(argv):
  del argv
  common.start_driver()
  run = task.prepare_one()
  x_test, _ = hr_task.test_arrays(common.load_data(), task.MODEL.value)
  measure, state = make_measure(run.problem, run.data, x_test), run.state
  for q in range(int(state.round), common.ROUNDS.value):
    state, metrics = run.rnd.step(state, run.data)
    if (q + 1) % PROBE_EVERY.value and q + 1 != common.ROUNDS.value:
      continue
    figures = {k: float(v) for k, v in measure(state).items()}
    figures["inner_step_ratio"] = common.INNER_LR.value * figures["curvature_client_max"]
    record = dict(round=q + 1, outer_loss=float(metrics["outer_loss"]),
                  test_accuracy=float(run.eval_fn(state)["test_accuracy"]), **figures)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}),
          flush=True)
    if not jnp.isfinite(record["outer_loss"]) or record["outer_loss"] > 100:
      print(f"stopped: outer loss {record['outer_loss']:.4g} at round {q + 1}")
      break


if __name__ == "__main__":
  app.run(main)
