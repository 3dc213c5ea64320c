r"""Federated data hyper-cleaning (README, Expected results, task 2; benchopt / MemFBO setup).

Training labels are replaced by a uniformly random label with probability `noise`
(`data.corrupt_labels`); every client's validation split keeps its clean labels.

    x = {"logits": [N], "gate": [N]}    one weight logit per TRAINING sample of every client
                                        (global vector; client m owns its own rows), and a
                                        constant-1 gate (see "Outer pruning" below)
    y = classifier: linear {"head": {"kernel": [D, C], "bias": [C]}} or an MLP
        {"hidden": Dense(H), "head": Dense(C)} (both layers are inner)

    g_i(x, y) = sum_j gate_j sigmoid(x_j) CE_j(y) / sum_j gate_j  +  c ||y||^2     (c = reg)
    f_i(x, y) = CE of y on client i's clean validation split

over the client's train rows j (all of them, or with a batch size B > 0 a minibatch of B rows
drawn uniformly, with replacement, from the rows the client keeps this round: `KeptRowSampler`);
every row carries its global sample index, and g gathers x[index].

Outer pruning (dual pruning, docs/method.md, section 4): the unit group "samples" indexes both
x leaves; `FederatedData.available` = ownership [M, N], so in a round a client keeps an r_x share
of ITS OWN samples. A kept sample is the client's submodel: its weight gets a hypergradient and
it enters g_i. A sample outside the round's mask is outside the submodel: at the pruned point its
gate is 0, so it adds nothing to g_i (and to the client's work) this round, instead of silently
entering with the weight sigmoid(0) = 1/2 that a zeroed logit alone would give. The gate is
held out of autodiff (stop_gradient), so its hypergradient and delta are exactly 0 and it stays 1.
Outer coverage of an owned sample is at most 1 (its owner, when sampled and keeping it): read
`uncovered_x_share` per round; C_x* (= min_coverage_x) is 0 under partial participation by nature.
Inner pruning: input-feature units (group "features" = rows of the linear kernel) or hidden units
(group "hidden": hidden.kernel[:, h], hidden.bias[h], head.kernel[h, :]) for the MLP. x and y share
no unit group. Clients run the dense (masked full-size) computation: the compact path does not
support client-owned units. Client FLOPs: the per-operation model (bilevel/costs.py) with this
task's op prices (`model_costs`) on the kept training rows and the validation rows (or the
minibatch) (`cost_model`); communicated bytes count both x leaves (logit and gate) of a kept
sample, ~1% of a round's bytes.

Baselines on this task, with two task-specific readings:
  heterofl : HeteroFL prunes model width, it has no notion of pruning data. A static sample mask
             would keep a weak client's leading r_x share of samples forever and never touch the
             rest, so here heterofl prunes ONLY y (static leading features / hidden units) and
             every level's r_x is set to 1 (`heterofl_levels`). With allow_uncovered the
             profile's r_x is kept and a warning names the share of samples never updated.
  fedrolex : the rolling window of an owned group rolls over the client's OWN samples (one of
             its samples per round, wrapping), not over the global index (where a client's window
             would only move while the global window start passes its rows, i.e. almost never);
             y's feature / hidden window rolls over all units, shared by all clients
             (`owned_rolling_mask_fn`).

Metrics: test accuracy / loss of y, and how well w = sigmoid(x) separates the training samples
whose label is correct (positive) from those whose label is wrong: `weight_auc` (rank AUC, ties
averaged), `weight_precision` / `weight_recall` of "w >= 0.5 means clean". A label replaced by
chance with the true label counts as clean (no method could tell it apart).

The unweighted baseline is the same round started from logits BASELINE_LOGIT = 100:
sigmoid(100) is 1 and its derivative 0 in float32 and float64, so every weight is exactly 1,
every hypergradient exactly 0 and x never moves.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import costs, federated, models
from bilevel import data as data_lib
from bilevel import masks as masks_lib
from bilevel.client import MinibatchSampler, full_batch
from bilevel.masks import Axes, Level, UnitLayout
from bilevel.problems import BilevelProblem

PyTree = Any


NOISE_STREAM = 5  # numpy seed salt of the label corruption (numpy side of the seed streams)
BASELINE_LOGIT = 100.0  # weight exactly 1 with an exactly zero derivative (see the docstring)
# What a run reports of x besides the shared figures (the keys of weight_metrics).
WEIGHT_METRICS = ("weight_auc", "weight_precision", "weight_recall", "mean_weight_clean",
                  "mean_weight_noisy", "samples_updated_share")
# The task's defaults where they differ from the library's and the drivers' (tuned on
# mnist_embedded, 20 clients, noise 0.5, the drivers' level profile: weight AUC ~0.95, test
# accuracy ~0.88 against ~0.72 unweighted; hidden: the width of the MLP classifier), by the
# drivers' flag names; the driver applies them to the flags not given.
DEFAULTS: dict[str, Any] = dict(
    rounds=300, local_steps=5, inner_steps=1, inner_lr=0.05, outer_lr=30.0, v_lr=0.05,
    num_steps=1, batch_size=0, eval_every=10, hidden=100)


# ------------------------------------------------------------------ data


class CleaningData(NamedTuple):
  fed: federated.FederatedData
  clean: np.ndarray  # [N] bool: the sample's training label is correct
  replaced: np.ndarray  # [N] bool: the label was chosen for replacement (rate --noise)
  offsets: np.ndarray  # [M] global index of each client's first sample
  counts: np.ndarray  # [M] samples each client owns
  num_samples: int  # N


def build_data(ds: data_lib.Dataset, num_clients: int, scheme: str, *, noise: float,
               val_fraction: float, alpha: float, seed: int) -> CleaningData:
  """Partition, split train/val per client, corrupt the TRAIN labels, index samples globally.

  Global sample index: client 0's train rows first, then client 1's, ... (in each client the
  valid rows come first, see data.ClientData), so client m owns [offsets[m], offsets[m] + n_m).
  """
  parts = data_lib.partition(ds.y_train, num_clients, scheme, seed=seed, alpha=alpha)
  cd = data_lib.make_client_data(ds.x_train, ds.y_train, parts, val_fraction=val_fraction,
                                 seed=seed)
  noise_seed = int(np.random.SeedSequence([seed, NOISE_STREAM]).generate_state(1)[0])
  noisy, replaced = data_lib.corrupt_labels(ds.y_train, noise, ds.num_classes, seed=noise_seed)
  valid = cd.train_mask > 0
  counts = cd.num_train.astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  n = int(counts.sum())
  pos = np.arange(cd.train_mask.shape[1])[None, :]
  gidx = np.where(valid, offsets[:, None] + pos, 0).astype(np.int32)
  rows = cd.train_index[valid]  # [N] source rows, in global-index order (row-major)
  train_labels = np.where(valid, noisy[np.maximum(cd.train_index, 0)], 0).astype(np.int32)
  ownership = np.zeros((num_clients, n), np.float32)
  for m in range(num_clients):
    ownership[m, offsets[m]:offsets[m] + counts[m]] = 1.0
  flat = lambda a: a.reshape(a.shape[:2] + (-1,))
  inner = {"inputs": jnp.asarray(flat(cd.train_x)), "labels": jnp.asarray(train_labels),
           "weight": jnp.asarray(cd.train_mask), "index": jnp.asarray(gidx)}
  outer = {"inputs": jnp.asarray(flat(cd.val_x)), "labels": jnp.asarray(cd.val_y),
           "weight": jnp.asarray(cd.val_mask)}
  fed = federated.FederatedData(inner, outer, jnp.asarray(cd.num_train),
                                {"samples": jnp.asarray(ownership)})
  return CleaningData(fed, noisy[rows] == ds.y_train[rows], replaced[rows], offsets, counts, n)


# ------------------------------------------------------------------ model and problem


Logits = Callable[[PyTree, jax.Array], jax.Array]  # (y, inputs [B, D]) -> [B, C]


def linear_logits(y: PyTree, inputs: jax.Array) -> jax.Array:
  return models.dense(y["head"], inputs)


def mlp_logits_fn(activation: str) -> Logits:
  def logits(y: PyTree, inputs: jax.Array) -> jax.Array:
    hidden = models.ACTIVATIONS[activation](models.dense(y["hidden"], inputs))
    return models.dense(y["head"], hidden)
  return logits


def init_params(key: jax.Array, classifier: str, num_samples: int, in_dim: int, hidden: int,
                classes: int) -> tuple[PyTree, PyTree]:
  """x = zero logits (every weight 1/2) and unit gates; y = zero linear head or flax-init MLP."""
  x = {"logits": jnp.zeros((num_samples,), jnp.float32),
       "gate": jnp.ones((num_samples,), jnp.float32)}
  if classifier == "linear":
    y = {"head": {"kernel": jnp.zeros((in_dim, classes), jnp.float32),
                  "bias": jnp.zeros((classes,), jnp.float32)}}
  else:
    h, head = models.init_mlp(key, in_dim, hidden, classes)
    y = {"hidden": h["hidden"], "head": head["head"]}
  return x, y


def model(classifier: str, num_samples: int, ds: data_lib.Dataset, hidden: int,
          seed: int) -> tuple[UnitLayout, PyTree, PyTree]:
  """The unit layout and the initial (x, y) of a run seeded `seed` (its init stream)."""
  in_dim = int(np.prod(ds.input_shape))
  x, y = init_params(jax.random.fold_in(federated.stream_key(seed, "init"), 0), classifier,
                     num_samples, in_dim, hidden, ds.num_classes)
  return layout(classifier, num_samples, in_dim, hidden), x, y


def layout(classifier: str, num_samples: int, in_dim: int, hidden: int) -> UnitLayout:
  sample = Axes((("samples", 0),))
  x = {"logits": sample, "gate": sample}
  if classifier == "linear":
    return UnitLayout(groups={"samples": num_samples, "features": in_dim}, x=x,
                      y={"head": {"kernel": Axes((("features", 0),)), "bias": Axes()}})
  unit = lambda ax: Axes((("hidden", ax),))
  return UnitLayout(groups={"samples": num_samples, "hidden": hidden}, x=x,
                    y={"hidden": {"kernel": unit(1), "bias": unit(0)},
                       "head": {"kernel": unit(0), "bias": Axes()}})


class KeptRowSampler(NamedTuple):
  """Inner minibatches of batch_size rows drawn uniformly, with replacement, from the rows the
  client keeps this round (client.MinibatchSampler's rule over kept instead of valid rows);
  outer (validation) minibatches, whose rows are never pruned, are MinibatchSampler's.

  A client keeps a row when the row is valid and its sample's gate is nonzero at the point g is
  evaluated at: the pruned point, where the gate is x["gate"] * m_x (1 on the samples the
  round's mask keeps). The round draws batches before and apart from the masks (a sampler gets
  the data and a key only), so the sampler returns a *draw*, {"population": the stacked data
  [M, N_tr, ...], "client": id, "key": key}, and g (`cleaning_problem(..., sampler=...)`)
  resolves it at its x (`resolve`): every evaluation of one local step resolves it to the same
  rows. With every valid row kept (r_x = 1, FedNest's full model) the rows are exactly
  MinibatchSampler's (same key, same count).
  """

  batch_size: int

  def __call__(self, data: Any, key: jax.Array) -> dict[str, Any]:
    return self.from_population(jax.tree.map(lambda t: t[None], data), 0, key)

  def from_population(self, data: Any, client_id: jax.Array, key: jax.Array) -> dict[str, Any]:
    if "index" not in data:  # validation rows (no sample index, no weight to prune)
      return MinibatchSampler(self.batch_size).from_population(data, client_id, key)
    return {"population": data, "client": jnp.asarray(client_id, jnp.int32), "key": key}

  def resolve(self, gate: jax.Array, draw: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The batch: the r-th kept row of the client for r ~ U{0, ..., kept - 1}, gathered as one
    row gather from [M * N_tr, ...]. A client keeping no row gets rows of weight 0."""
    data, cid = draw["population"], draw["client"]
    n = data["weight"].shape[1]
    kept = (jax.lax.stop_gradient(gate)[data["index"][cid]] != 0) & (data["weight"][cid] > 0)
    r = jax.random.randint(draw["key"], (self.batch_size,), 0, jnp.maximum(jnp.sum(kept), 1))
    pos = jnp.minimum(jnp.searchsorted(jnp.cumsum(kept), r, side="right"), n - 1)
    rows = cid * n + pos
    batch = jax.tree.map(lambda t: t.reshape(-1, *t.shape[2:]).at[rows].get(
        mode="promise_in_bounds"), data)
    return dict(batch, weight=batch["weight"] * kept[pos])


def cleaning_problem(logits_fn: Logits, reg: float,
                     sampler: KeptRowSampler | None = None) -> BilevelProblem:
  """g_i = sum_j gate_j w_j CE_j / sum_j gate_j + reg ||y||^2 (w_j = sigmoid(x_j)); f_i = CE(val).

  Inner batch {"inputs" [B, D], "labels" [B], "weight" [B] (1 valid row, 0 padding),
  "index" [B] (global sample index)}, or a draw of `sampler` (resolved at x); outer batch
  {"inputs", "labels", "weight"}.
  """

  def inner(x, y, b):
    if sampler is not None and "population" in b:
      b = sampler.resolve(x["gate"], b)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(y, b["inputs"]), b["labels"])
    gate = jax.lax.stop_gradient(x["gate"][b["index"]]) * b["weight"]
    w = jax.nn.sigmoid(x["logits"][b["index"]])
    penalty = sum(jnp.sum(t ** 2) for t in jax.tree.leaves(y))
    return jnp.sum(gate * w * ce) / jnp.maximum(jnp.sum(gate), 1.0) + reg * penalty

  def outer(x, y, b):
    del x
    return models.weighted_ce(logits_fn(y, b["inputs"]), b["labels"], b["weight"])

  return BilevelProblem(inner, outer)


class Setting(NamedTuple):
  """The classifier's logits, the client batch sampler and the bilevel problem."""

  logits_fn: Logits
  sample: Any  # KeptRowSampler(batch_size), or client.full_batch for batch_size 0
  problem: BilevelProblem


def setting(classifier: str, activation: str, batch_size: int, reg: float) -> Setting:
  """The Setting of a classifier ("linear" or "mlp" with `activation`), a client batch size
  (0: full batches) and the penalty c = reg."""
  logits_fn = linear_logits if classifier == "linear" else mlp_logits_fn(activation)
  sample = KeptRowSampler(batch_size) if batch_size else full_batch
  return Setting(logits_fn, sample,
                 cleaning_problem(logits_fn, reg, sample if batch_size else None))


def round_keywords(cd: CleaningData, lay: UnitLayout, classifier: str, batch_size: int, *,
                   mask_policy: str, granularity: str) -> dict[str, Any]:
  """The bilevel.algorithms keywords this task's round needs besides the setting's: the
  samples each client owns (available), the owned rolling window for rolling masks (mask_fn),
  the FLOP model (cost) and dense clients (the compact path does not take owned units)."""
  mask_fn = None
  if mask_policy == "rolling":
    mask_fn = owned_rolling_mask_fn(lay, cd.offsets, cd.counts, cd.fed.available["samples"],
                                    granularity=granularity)
  val_rows = jax.tree.leaves(cd.fed.outer)[0].shape[1]  # a client's (padded) validation split
  return dict(available={"samples": np.asarray(cd.fed.available["samples"])}, mask_fn=mask_fn,
              cost=cost_model(classifier, batch_size, val_rows), submodel="dense")


# ------------------------------------------------------------------ metrics


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
  """P(score of a random positive > that of a random negative), ties counted 1/2 (Mann-Whitney).

  AUC = (sum of the positives' ranks - P (P + 1) / 2) / (P Q), ranks 1..N with tied scores
  sharing their average rank. None when one class is empty.
  """
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  num_pos, num_neg = int(positive.sum()), int((~positive).sum())
  if num_pos == 0 or num_neg == 0:
    return None
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
  ranks = avg_rank[inverse]
  return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def weight_metrics(logits: np.ndarray, clean: np.ndarray, init_logit: float = 0.0
                   ) -> dict[str, Any]:
  """weight_auc, precision / recall of "sigmoid(x) >= 0.5 means clean", share of moved weights."""
  logits = np.asarray(logits)
  pred = logits >= 0.0  # sigmoid(x) >= 0.5
  tp = float(np.sum(pred & clean))
  return dict(weight_auc=rank_auc(logits, clean),
              weight_precision=tp / max(float(pred.sum()), 1.0),
              weight_recall=tp / max(float(clean.sum()), 1.0),
              mean_weight_clean=float(np.mean(1 / (1 + np.exp(-logits[clean])))) if clean.any()
              else None,
              mean_weight_noisy=float(np.mean(1 / (1 + np.exp(-logits[~clean])))) if (~clean).any()
              else None,
              samples_updated_share=float(np.mean(logits != init_logit)))


# ------------------------------------------------------------------ masks


def owned_rolling_mask_fn(lay: UnitLayout, offsets: np.ndarray, counts: np.ndarray,
                          available: jax.Array, *, granularity: str = "unit") -> federated.MaskFn:
  """FedRolex on owned samples: the window rolls over the client's own samples.

  masks._ranks rolls by (index - round) mod N over the global index; a client owning the block
  [o, o + n) gets the window starting at its own sample (round mod n) by passing the round
  o + (round mod n) for the x masks. y masks use the true round (window shared by all clients).
  """
  offsets_j, counts_j = jnp.asarray(offsets), jnp.maximum(jnp.asarray(counts), 1)

  def mask_fn(state, cid, slot, q, rx, ry, key):
    del slot
    avail = {"samples": available[cid]}
    masks = lambda r: masks_lib.make_masks(lay, state.x, state.y, rx, ry, key, r, avail,
                                           policy="rolling", granularity=granularity)
    mask_x, mask_y = masks(offsets_j[cid] + q % counts_j[cid])[0], masks(q)[1]
    return mask_x, mask_y

  return mask_fn


def heterofl_levels(levels: Sequence[Level], mask_policy: str, allow_uncovered: bool,
                    log: Callable[[str], None] = print) -> tuple[Level, ...] | None:
  """heterofl's reading on this task (module docstring): with static masks and some r_x < 1,
  the levels with r_x = 1 (None: keep the profile; with allow_uncovered, after a warning)."""
  if mask_policy != "static" or all(lv.rx >= 1 for lv in levels):
    return None
  if allow_uncovered:
    never = sum(lv.share * (1 - lv.rx) for lv in levels)
    log(f"warning: heterofl with static sample masks and --allow_uncovered: about "
        f"{never:.0%} of the training samples are never kept by their owner, so their weights "
        "stay at 1/2 and they never enter g.")
    return None
  out = tuple(Level(1.0, lv.ry, lv.share) for lv in levels)
  log("note: heterofl prunes only y on hyper-cleaning (HeteroFL prunes width, not data): "
      "r_x = 1 at every level, levels "
      + ",".join(f"{lv.rx:g}/{lv.ry:g}:{lv.share:g}" for lv in out) + ".")
  return out


# ------------------------------------------------------------------ op prices and evaluation


def model_costs(classifier: str = "linear") -> costs.ModelCosts:
  """Op prices (costs.ModelCosts): x = per-sample weight logits (elementwise in g), y = a
  linear classifier {"head"} or an MLP {"hidden", "head"} on the inputs."""
  layers = ((lambda ky: [ky["head"]["kernel"]]) if classifier == "linear"
            else (lambda ky: [ky["hidden"]["kernel"], ky["head"]["kernel"]]))
  zero = lambda kx: 0.0
  return costs.ModelCosts(x_forward=zero, x_backward=zero, y_layers=layers, x_in_features=False)


def cost_model(classifier: str, batch_size: int, val_rows: int) -> costs.CostModel:
  """The FLOP model of a client's round: inner rows = the kept samples (full batch) or the
  batch, all of it kept rows (minibatch; none for a client that keeps no sample); outer rows =
  the batch or the (padded) validation split. The weights' own work (a gather and a product
  per row) is left out: model_costs prices the classifier's matmuls."""

  def rows(kept_x):
    kept = kept_x["gate"]
    return (kept if not batch_size else batch_size * jnp.minimum(kept, 1.0)), (batch_size or
                                                                                val_rows)

  return costs.CostModel(model_costs(classifier), rows)


Evaluate = Callable[[federated.ServerState, float], dict[str, Any]]


def make_evaluate(ds: data_lib.Dataset, cd: CleaningData, logits_fn: Logits) -> Evaluate:
  """`evaluate(state, init_logit)`: test accuracy / loss of y and the weight metrics of x."""
  x_test = jnp.asarray(ds.x_test.reshape(len(ds.x_test), -1))
  y_test = jnp.asarray(ds.y_test)

  @jax.jit
  def test_metrics(y):
    logits = logits_fn(y, x_test)
    return {"test_accuracy": jnp.mean(jnp.argmax(logits, -1) == y_test),
            "test_loss": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_test))}

  def evaluate(state, init_logit):
    out = dict(jax.device_get(test_metrics(state.y)))
    out.update(weight_metrics(np.asarray(state.x["logits"]), cd.clean, init_logit))
    return out

  return evaluate
