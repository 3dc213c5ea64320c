"""The FLOP model (bilevel/costs.py) against XLA's own counts of the compiled client update.

What XLA:CPU's cost analysis counts (measured with jax 0.10.2, and the reason for `_unrolled`):
  `compiled.cost_analysis()["flops"]` counts a while loop's body ONCE, whatever its trip count:
  the client update with 1, 2 or 4 inner steps (or num_steps, or local steps) gets the same
  count (`test_xla_counts_a_loop_body_once`). Every lax.scan (inner steps, v / Neumann / CG
  steps, local steps) is a while loop, so the comparisons unroll every scan while tracing
  (`jax.lax.scan(..., unroll=True)`): the compiled program is then straight-line and its count
  covers every iteration. Unrolling does not change what is shared: in the looped program XLA
  hoists the x-only forward out of the scans (loop-invariant code motion), in the unrolled one
  it merges the copies (common subexpressions). `test_model_equals_matmul_flops_of_looped_program`
  checks the looped program itself: the dot FLOPs of its optimised HLO, with every while body
  weighted by its known trip count, equal the model's count exactly.

Why 20 %: the model counts matmuls and convolutions (2 FLOPs per multiply-add), XLA also counts
elementwise work (activations, softmax and cross-entropy, biases, the sample weights, the masks'
and estimators' PyTree axpys and dots). On these models that adds 1-5 % (measured ratios
model / XLA: 0.95-0.99, docs/method.md section 3); 20 % leaves room for XLA versions that count
elementwise ops differently, while a wrong op count (one product more or less per step, a
forward counted per op instead of once) moves the linear task by 10-50 %.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel import algorithms, client, costs, federated, hypergrad, models
from bilevel.algorithms import fednest
from bilevel.tasks import hyper_cleaning as hc_task
from bilevel.tasks import hyper_representation as hr_task

pytestmark = pytest.mark.usefixtures("xla_optimised")  # XLA's counts of what a run compiles


def full_counts(tree):
  """Kept counts of an unpruned client: every leaf's size."""
  return jax.tree.map(lambda t: math.prod(t.shape), tree)


# (estimator, v_step, product): v_step matters for fd / exact, product for neumann / cg.
VARIANTS = [("fd", "cauchy", "exact"), ("fd", "fixed", "exact"), ("exact", "cauchy", "exact"),
            ("exact", "fixed", "exact"), ("neumann", "cauchy", "exact"),
            ("cg", "cauchy", "exact"), ("neumann", "cauchy", "fd"), ("cg", "cauchy", "fd")]
TOLERANCE = 0.2  # see the module docstring


def _cfg(estimator, v_step, product, local_steps=1, inner_steps=2, num_steps=3, radius=None):
  """A client's local update as the cost model reads it (costs.round_ops's keywords)."""
  return dict(local_steps=local_steps, inner_steps=inner_steps, inner_step="cauchy",
              estimator=hypergrad.named(estimator, num_steps=num_steps, v_step=v_step,
                                        product=product, radius=radius))


def _work(alg):
  """costs.round_ops's keywords of an algorithm (its resolved options and estimator)."""
  o = alg.options
  return dict(local_steps=o.local_steps, inner_steps=o.inner_steps, inner_step=o.inner_step,
              estimator=alg.estimator)


def _labels(key, n, classes=10):
  return jax.random.randint(key, (n,), 0, classes)


def _mlp_task(rows=64, in_dim=784, hidden=200, classes=10):
  """Task 1 (hyper-representation): x = hidden layer, y = head."""
  x, y = models.init_mlp(jax.random.key(0), in_dim, hidden, classes)

  def batch(k):
    k1, k2 = jax.random.split(k)
    return {"inputs": jax.random.normal(k1, (rows, in_dim)), "labels": _labels(k2, rows),
            "weight": jnp.ones((rows,))}

  return dict(problem=models.hyper_representation_problem(), x=x, y=y,
              inner=batch(jax.random.key(1)), outer=batch(jax.random.key(2)),
              model=hr_task.mlp_costs(), rows=(rows, rows))


def _cnn_task(rows=32, shape=(16, 16, 3), channels=(8, 16), classes=10):
  x, y = models.init_cnn(jax.random.key(0), shape, channels, classes)

  def batch(k):
    k1, k2 = jax.random.split(k)
    return {"inputs": jax.random.normal(k1, (rows,) + shape), "labels": _labels(k2, rows),
            "weight": jnp.ones((rows,))}

  return dict(problem=models.hyper_representation_problem(model="cnn"), x=x, y=y,
              inner=batch(jax.random.key(1)), outer=batch(jax.random.key(2)),
              model=hr_task.cnn_costs(shape), rows=(rows, rows))


def _cleaning_task(classifier="linear", rows=64, val_rows=48, samples=256, in_dim=784,
                   classes=10):
  """Task 2 (hyper-cleaning): x = one weight logit per training sample, y = the classifier."""
  keys = jax.random.split(jax.random.key(0), 8)
  x = {"logits": jax.random.normal(keys[0], (samples,)), "gate": jnp.ones((samples,))}
  if classifier == "linear":
    y = {"head": {"kernel": 0.01 * jax.random.normal(keys[1], (in_dim, classes)),
                  "bias": jnp.zeros((classes,))}}
    logits = hc_task.linear_logits
  else:
    h, head = models.init_mlp(keys[1], in_dim, 100, classes)
    y = {"hidden": h["hidden"], "head": head["head"]}
    logits = hc_task.mlp_logits_fn("relu")
  inner = {"inputs": jax.random.normal(keys[2], (rows, in_dim)), "labels": _labels(keys[3], rows),
           "weight": jnp.ones((rows,)),
           "index": jax.random.randint(keys[4], (rows,), 0, samples)}
  outer = {"inputs": jax.random.normal(keys[5], (val_rows, in_dim)),
           "labels": _labels(keys[6], val_rows), "weight": jnp.ones((val_rows,))}
  return dict(problem=hc_task.cleaning_problem(logits, 1e-3), x=x, y=y, inner=inner,
              outer=outer, model=hc_task.model_costs(classifier), rows=(rows, val_rows))


TASKS = {"mlp": _mlp_task, "linear": _cleaning_task, "cnn": _cnn_task,
         "cleaning_mlp": functools.partial(_cleaning_task, "mlp")}


@functools.lru_cache(maxsize=None)
def _task(name):
  return TASKS[name]()


def _compiled(task, cfg, sample=client.full_batch, first_step_apart=True, x_trust=0.0):
  """One client's update on the full model (no masks), lowered and compiled."""
  v = jax.tree.map(lambda t: 0.1 * jnp.ones_like(t), task["y"])

  def update(x, y, v, inner, outer, key):
    return client.client_update(task["problem"], x, y, v, inner, outer, None, None, key,
                                sample=sample, first_step_apart=first_step_apart, inner_lr=0.1,
                                outer_lr=0.1, x_trust=x_trust, x_trust_scope="layer", **cfg)

  return jax.jit(update).lower(task["x"], task["y"], v, task["inner"], task["outer"],
                               jax.random.key(3)).compile()


def _xla_flops(compiled) -> float:
  analysis = compiled.cost_analysis()  # a dict, or a list of dicts in older JAX versions
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def _model_flops(task, cfg, rows=None, first_step_apart=True):
  return float(costs.client_flops(full_counts(task["x"]), full_counts(task["y"]),
                                  rows or task["rows"], task["model"],
                                  first_step_apart=first_step_apart, **cfg))


@pytest.fixture
def unrolled(monkeypatch):
  """Every lax.scan traced fully unrolled: XLA's count then covers every iteration."""
  monkeypatch.setattr(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True))


def _assert_close(model, xla, what):
  assert abs(model / xla - 1) <= TOLERANCE, f"{what}: model {model:.4g}, XLA {xla:.4g}, " \
                                            f"ratio {model / xla:.3f}"


# ------------------------------------------------------------------ against XLA's cost analysis


# Both tasks' models in the quick tier; the CNN and the hyper-cleaning MLP (slower to compile)
# in the slow one.
@pytest.mark.parametrize("task", ["mlp", "linear", pytest.param("cnn", marks=pytest.mark.slow),
                                  pytest.param("cleaning_mlp", marks=pytest.mark.slow)])
@pytest.mark.parametrize("estimator,v_step,product", VARIANTS)
def test_model_within_20_percent_of_xla(unrolled, task, estimator, v_step, product):
  cfg = _cfg(estimator, v_step, product)
  t = _task(task)
  _assert_close(_model_flops(t, cfg), _xla_flops(_compiled(t, cfg)),
                f"{task} {estimator} {v_step} {product}")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mlp", "linear"])
@pytest.mark.parametrize("estimator", ["fd", "cg"])
def test_local_steps_with_minibatches(unrolled, task, estimator):
  """K = 2 local steps on minibatches drawn from a client's rows (what drivers with
  --batch_size do). Full batches would let XLA share, in the unrolled program, the
  hyper-cleaning logits at the y where step 1 ended with step 2's first inner gradient (same
  rows, x-free forward); the looped program of K >= 3 cannot (see costs.py)."""
  t = dict(_task(task))
  rows = 32
  cfg = _cfg(estimator, "cauchy", "exact", local_steps=2, inner_steps=1, num_steps=2)
  compiled = _compiled(t, cfg, sample=client.minibatch_sampler(rows))
  _assert_close(_model_flops(t, cfg, rows=(rows, rows)), _xla_flops(compiled),
                f"{task} {estimator} K=2")


@pytest.mark.parametrize("task", ["mlp", "linear"])
def test_all_local_steps_in_one_scan(task):
  """The compact round's client step (first_step_apart=False): the K steps are one scan body,
  which XLA's cost analysis counts once (test_xla_counts_a_loop_body_once), so K x XLA's count
  is the round's. The model counts every step's reported losses (y's forward; x's forward
  shared with the step's gradients), which the loop computes: a failed sharing of x's forward
  would add 2 forwards per step (+47 % on the MLP; measured ratios 0.97 MLP, 0.95 linear)."""
  t = dict(_task(task))
  rows, k = 32, 3
  cfg = _cfg("fd", "cauchy", "fd", local_steps=k, inner_steps=1, num_steps=1)
  compiled = _compiled(t, cfg, sample=client.minibatch_sampler(rows), first_step_apart=False)
  _assert_close(_model_flops(t, cfg, rows=(rows, rows), first_step_apart=False),
                k * _xla_flops(compiled), f"{task} K={k} in one scan")


@pytest.mark.slow
def test_radius(unrolled):
  """With a projection radius the Cauchy step recomputes H v after every step: N products more.
  Unrolled, the last recomputation is dead code (the looped program computes it)."""
  t = _task("linear")
  cfg = _cfg("exact", "cauchy", "exact", radius=1.0)
  _assert_close(_model_flops(t, cfg), _xla_flops(_compiled(t, cfg)), "linear exact radius")


def test_xla_counts_a_loop_body_once():
  """Documents XLA:CPU's cost analysis of while loops (why the tests above unroll the scans).

  If this fails, XLA now weighs loop bodies by their trip counts: the unrolling above can go
  (and the module docstring and docs/method.md should say so)."""
  t = _task("linear")
  flops = {s: _xla_flops(_compiled(t, _cfg("fd", "fixed", "exact", inner_steps=s)))
           for s in (2, 4)}
  assert flops[2] == flops[4], flops


# ------------------------------------------------------------------ against the looped program


def _hlo_dot_flops(hlo: str) -> float:
  """2 x (output size) x (contracted size) summed over the dots of an optimised HLO module,
  each while body weighted by its known trip count (dense models only: no convolutions)."""
  shape = r"[a-z]+[0-9]*\[([0-9,]*)\]"
  dims = lambda s: [int(d) for d in s.split(",") if d]
  comps, entry, cur = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$", line)
    if head:
      cur = comps.setdefault(head.group(2), {"shapes": {}, "ins": []})
      entry = head.group(2) if head.group(1) else entry
      for p in re.finditer(r"([\w.\-]+): " + shape, head.group(3)):
        cur["shapes"][p.group(1)] = dims(p.group(2))
    elif line.startswith("}"):
      cur = None
    elif cur is not None:
      ins = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
      if ins:
        result = re.match(shape, ins.group(2))
        if result:
          cur["shapes"][ins.group(1)] = dims(result.group(1))
        cur["ins"].append(ins.groups())

  @functools.lru_cache(maxsize=None)
  def cost(name):
    comp, total = comps[name], 0.0
    for out, text in comp["ins"]:
      op = re.search(r"[\]})] ([a-z][\w\-]*)\(", text)
      op = op.group(1) if op else ""
      if op == "dot":
        lhs = comp["shapes"][re.search(r"dot\(%([\w.\-]+),", text).group(1)]
        contracted = dims(re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", text).group(1))
        total += 2 * math.prod(comp["shapes"][out]) * math.prod(lhs[i] for i in contracted)
      assert op != "convolution", "dense models only"
      if op in ("fusion", "call", "while", "conditional"):
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', text)
        weight = int(trips.group(1)) if op == "while" and trips else 1
        for sub in re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", text):
          total += weight * cost(sub)
        for subs in re.findall(r"branch_computations=\{([^}]*)\}", text):
          total += max(cost(s.strip().lstrip("%")) for s in subs.split(","))
    return total

  return cost(entry)


def _looped_cases():
  """fd (Cauchy) and cg (exact) on the linear task and a head-heavy MLP in the quick tier."""
  for task in ("linear", "mlp_head", "cleaning_mlp"):
    for variant in (VARIANTS[0], VARIANTS[3], VARIANTS[4], VARIANTS[5], VARIANTS[7]):
      if task == "cleaning_mlp" and variant[0] not in ("fd", "cg"):
        continue  # two y layers: fd and cg cover both product kinds
      quick = task != "cleaning_mlp" and variant in (VARIANTS[0], VARIANTS[5])
      yield pytest.param(task, *variant, marks=() if quick else pytest.mark.slow)


@pytest.mark.parametrize("task,estimator,v_step,product", list(_looped_cases()))
def test_model_equals_matmul_flops_of_looped_program(task, estimator, v_step, product):
  """K = 3 local steps, loops as the library writes them (not unrolled), full batches: the
  model's count is exactly the matmul work XLA schedules (x-only forward hoisted once per
  local step, dead losses of later steps removed, exact products' primal forward shared)."""
  t = (_mlp_task(in_dim=32, hidden=64, classes=64)  # a head as large as the hidden layer
       if task == "mlp_head" else _task(task))
  cfg = _cfg(estimator, v_step, product, local_steps=3, inner_steps=2, num_steps=3)
  dots = _hlo_dot_flops(_compiled(t, cfg).as_text())
  assert dots > 0
  assert _model_flops(t, cfg) == pytest.approx(dots, rel=1e-9)


def test_label_skew_options_add_no_matmul_flops():
  """feature_l2 / outer_l2 (outer loss) and x_trust (client) are elementwise work: the looped
  program's matmul FLOPs still equal the model's count (docs/method.md, section 8)."""
  t = _mlp_task(in_dim=32, hidden=64, classes=64)
  t["problem"] = models.hyper_representation_problem(feature_l2=1e-3, outer_l2=1e-3)
  cfg = _cfg("fd", "cauchy", "exact", local_steps=3, inner_steps=2, num_steps=3)
  dots = _hlo_dot_flops(_compiled(t, cfg, x_trust=0.05).as_text())
  assert _model_flops(t, cfg) == pytest.approx(dots, rel=1e-9)


# ------------------------------------------------------------------ counts and prices


@pytest.mark.parametrize("num_steps", [0, 1, 2, 5])
def test_cg_evaluates_num_steps_plus_two_products(num_steps):
  est = hypergrad.cg(num_steps=num_steps)
  assert est.products() == (num_steps + 1, 1)
  ops = dict(((op, batch), n) for op, batch, n in
             costs.round_ops(local_steps=1, inner_steps=1, estimator=est, inner_step="fixed"))
  assert ops[("hv", costs.INNER)] + ops[("jv", costs.INNER)] == num_steps + 2


@pytest.mark.parametrize("estimator", ["fd", "exact", "neumann", "cg"])
@pytest.mark.parametrize("v_step", ["cauchy", "fixed"])
@pytest.mark.parametrize("radius", [None, 1.0])
@pytest.mark.parametrize("num_steps", [0, 1, 3])
def test_products_agree_with_grad_evals(estimator, v_step, radius, num_steps):
  """The per-op table counts one estimate's products as the analytic count, written out here
  (2 gradients per product, plus grad f)."""
  est = hypergrad.named(estimator, num_steps=num_steps, v_step=v_step, radius=radius)
  if estimator in ("fd", "exact"):  # N H v + J v; Cauchy: H v at the warm start (+ N, radius)
    products = num_steps + 1 + ((1 + (num_steps if radius is not None else 0))
                                if v_step == "cauchy" and num_steps > 0 else 0)
  elif estimator == "neumann":
    products = max(num_steps - 1, 0) + 1
  else:  # cg: H v0, one H p per iteration, J v
    products = num_steps + 2
  assert costs.grad_evals_per_round(local_steps=1, inner_steps=0, inner_step="fixed",
                                    estimator=est) == (
      1 + 2 * products)


def test_hand_count_mlp_fd():
  """Task 1, fd, Cauchy step, N = 1, T = 1, K = 1, written out per op (per example)."""
  d, h, c, rows = 784, 200, 10, 64
  x = {"hidden": {"kernel": d * h, "bias": h}}
  y = {"head": {"kernel": h * c, "bias": c}}
  cfg = _cfg("fd", "cauchy", "exact", inner_steps=1, num_steps=1)
  head = 2 * h * c  # one pass over the head
  expected = (2 * (2 * d * h)  # the hidden layer's forward on the inner and the outer batch
              + 2 * head  # one inner step: head forward, head weight gradient
              + head  # the reported inner loss
              + 3 * 2 * (2 * head)  # three H v (the Cauchy inner step's H g, the warm
              # start, one v step), each two probes
              + 2 * (2 * head) + 2 * d * h  # J v: two probes forward and back, hidden weights
              + 3 * head + 2 * d * h)  # grad f: head forward, weights, input; hidden weights
  assert costs.client_flops(x, y, (rows, rows), hr_task.mlp_costs(), **cfg) == rows * expected


def test_traced_kept_counts_and_pruning():
  """Kept counts arrive traced in a round; a half-width MLP client costs about half."""
  d, h, c, rows = 784, 200, 10, 64
  cfg = _cfg("fd", "cauchy", "exact")
  kept = lambda k: ({"hidden": {"kernel": jnp.float32(d * k), "bias": jnp.float32(k)}},
                    {"head": {"kernel": jnp.float32(k * c), "bias": jnp.float32(c)}})
  f = jax.jit(lambda kx, ky: costs.client_flops(kx, ky, (rows, rows), hr_task.mlp_costs(), **cfg))
  full, half = float(f(*kept(h))), float(f(*kept(h // 2)))
  eager = float(costs.client_flops(*kept(h), (rows, rows), hr_task.mlp_costs(), **cfg))
  assert full == pytest.approx(eager, rel=1e-6)
  assert half == pytest.approx(full / 2, rel=1e-6)  # every price is linear in the width


class TestRoundPricing:
  """The rounds report what the per-operation model prices: the wiring, not the model."""

  M, N, D, H, C = 6, 8, 12, 10, 3

  @pytest.fixture(autouse=True)
  def _unoptimised(self, xla_optimised):
    """No XLA count is read here (the rounds' own float32 FLOP sums are): the rounds compile
    with most optimisations off, as the rest of the suite's rounds (several times faster)."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield  # xla_optimised then restores the session's setting

  def _setup(self, name, **options):
    rng = np.random.default_rng(0)
    split = lambda: {"inputs": jnp.asarray(rng.normal(size=(self.M, self.N, self.D)), jnp.float32),
                     "labels": jnp.asarray(rng.integers(0, self.C, (self.M, self.N))),
                     "weight": jnp.ones((self.M, self.N))}
    data = federated.FederatedData(inner=split(), outer=split(),
                                   num_examples=jnp.full((self.M,), self.N))
    x, y = models.init_mlp(jax.random.key(0), self.D, self.H, self.C)
    cost = costs.CostModel(hr_task.mlp_costs(), lambda kept_x: (self.N, self.N))
    alg = algorithms.get(name, problem=models.hyper_representation_problem(),
                         num_clients=self.M, clients_per_round=4, cost=cost,
                         layout=models.mlp_layout(self.H), **options)
    state = alg.init(x, y)
    return alg, cost, state, data, x, y

  def test_full_model_round_is_clients_times_the_model(self):
    alg, cost, state, data, x, y = self._setup("simfbo")
    _, metrics = alg.step(state, data)
    want = 4 * costs.client_flops(full_counts(x), full_counts(y), (self.N, self.N),
                                  hr_task.mlp_costs(), **_work(alg))
    # float32 sums of four equal float32 terms: relative rounding ~1e-7.
    assert abs(float(metrics["client_flops"]) / want - 1.0) < 1e-5

  def test_pruned_round_prices_each_client_on_its_kept_units(self):
    alg, cost, state, data, x, y = self._setup("rafbo", levels="1/1:0.5,0.5/0.5:0.5")
    _, metrics = alg.step(state, data)
    rnd = alg.make_round(x)
    ids = [int(i) for i in rnd.sample_fn(state.round)[0]]
    want = 0.0
    for cid in ids:  # a unit kept = its hidden-kernel column and its head row
      k = math.ceil(rnd.client_ratios[cid, 0] * self.H)
      kept_x = {"hidden": {"kernel": self.D * k, "bias": k}}
      kept_y = {"head": {"kernel": k * self.C, "bias": self.C}}
      want += costs.client_flops(kept_x, kept_y, (self.N, self.N), hr_task.mlp_costs(),
                                 **_work(alg))
    assert abs(float(metrics["client_flops"]) / want - 1.0) < 1e-5

  def test_fednest_round_prices_its_passes_and_products(self):
    alg, cost, state, data, x, y = self._setup("fednest")
    _, metrics = alg.step(state, data)
    kx, ky = full_counts(x), full_counts(y)
    prices, rows = costs.op_prices(hr_task.mlp_costs(), "exact", kx, ky), (self.N, self.N)
    op = lambda kind, batch: prices[kind] * rows[0 if batch == "inner" else 1]
    o = alg.options  # 4 sampled clients in both phases
    c = fednest.round_counts(4, inner_steps=o.inner_steps, local_steps=o.local_steps,
                             num_steps=o.num_steps)
    want = (c.first_order_inner * (op("forward_x", "inner") + op("grad_y", "inner"))
            + c.first_order_outer * (op("forward_x", "outer") + op("grad_xy", "outer"))
            + c.hvp_products * op("hv", "inner") + c.cross_products * op("jv", "inner"))
    assert abs(float(metrics["client_flops"]) / want - 1.0) < 1e-5
