"""Dual-pruning masks: resource levels, mask policies, unit -> parameter expansion, coverage.

Legend: K = units in a group, M = clients, C = clients in a round (leading axis of `*_C` trees).

A client's resource level is a pair of keep ratios (r_x, r_y) in (0, 1] (docs/method.md,
section 4); a level profile `rx/ry:share,...` says which share of clients sits at each level.

Masks are 0/1 arrays shaped like the parameters. With `unit` granularity a `UnitLayout` names the
unit groups and, per parameter leaf, the axes they index: pruning a unit zeroes every slice along
them. With `element` granularity every coordinate is a unit.

One order per (client, round, group) decides both sides: x keeps the first ceil(r_x K) units,
y the first ceil(r_y K) (exact integers: `host_keep_count` on the host, `keep_count` traced). A
group indexed by both x and y keeps the first ceil(min(r_x, r_y) K) units on both sides
(docs/method.md, section 4, says why); coverage, FLOPs, bytes and compact widths follow.

A mask policy (`Policy`: `random`, `rolling`, `static`, `magnitude`, named in `POLICIES`, or a
user's own) orders the units. An optional per-client `available` unit mask restricts a group to
the units a client owns (hyper-cleaning's samples); keep ratios then apply to the owned units.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bilevel.errors import ConfigError, check_choice

PyTree = Any
UnitMasks = dict[str, jax.Array]  # group -> [K] 0/1

GRANULARITIES = ("unit", "element")


# ------------------------------------------------------------------ resource levels


class Level(NamedTuple):
  rx: float
  ry: float
  share: float


def parse_levels(profile: str) -> tuple[Level, ...]:
  """Parse `rx/ry:share,...` (e.g. `1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5`) and validate it."""
  levels = []
  for item in filter(None, (s.strip() for s in profile.split(","))):
    try:
      ratios, share = item.split(":")
      rx, ry = ratios.split("/")
      levels.append(Level(float(rx), float(ry), float(share)))
    except ValueError:
      raise ConfigError(
          f"resource level {item!r} in profile {profile!r} is not of the form rx/ry:share "
          "(e.g. 1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5).") from None
  validate_levels(levels)
  return tuple(levels)


def validate_levels(levels: Sequence[Level]) -> None:
  if not levels:
    raise ConfigError("the resource-level profile is empty; give at least one rx/ry:share.")
  for lv in levels:
    for name, r in (("rx", lv.rx), ("ry", lv.ry)):
      if not 0.0 < r <= 1.0:
        raise ConfigError(f"keep ratio {name}={r!r} in level {lv.rx}/{lv.ry}:{lv.share} is outside "
                          "the allowed range (0, 1].")
    if not 0.0 < lv.share <= 1.0:
      raise ConfigError(f"share={lv.share!r} of level {lv.rx}/{lv.ry} is outside the allowed "
                        "range (0, 1].")
  total = sum(lv.share for lv in levels)
  if abs(total - 1.0) > 1e-6:
    raise ConfigError(f"level shares sum to {total!r}; they must sum to 1.")


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
  """Integer counts summing to `total`, proportional to `weights` (largest-remainder rounding)."""
  weights = np.asarray(weights, dtype=float)
  raw = total * weights / weights.sum()
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
    counts[i] += 1
  return counts


def assign_levels(levels: Sequence[Level], num_clients: int, seed: int) -> np.ndarray:
  """Fixed per-client keep ratios [M, 2]: counts by largest remainder, then a seeded shuffle."""
  counts = largest_remainder(num_clients, np.array([lv.share for lv in levels]))
  ratios = np.repeat(np.array([[lv.rx, lv.ry] for lv in levels]), counts, axis=0)
  return ratios[np.random.default_rng(seed).permutation(num_clients)]


# Keep ratios are read on a grid of RATIO_SCALE steps: r = num / RATIO_SCALE with num an integer.
# float32 holds num exactly (round(r * 10^6) <= 10^6 < 2^24, float32 error of r * 10^6 < 0.07), so
# the traced count equals the host one, and ceil(num n / RATIO_SCALE) is exact integer arithmetic
# (ceil(r n - 1e-6) in float32 gave ceil(0.3 * 200) = 61: 1e-6 is below float32 spacing at 60).
RATIO_SCALE = 10**6


def host_keep_count(ratio: float, n: int) -> int:
  """ceil(r n) clipped to [1, n] for the ratio read to 6 decimals, in Python integers.

  The one source of truth for keep counts on the host (compact widths, coverage checks, tests);
  `keep_count` computes the same number inside traced code.
  """
  num = int(round(float(ratio) * RATIO_SCALE))
  return int(min(max(-(-num * int(n) // RATIO_SCALE), 1), max(int(n), 1)))


def keep_count(ratio: jax.typing.ArrayLike, n: jax.typing.ArrayLike) -> jax.Array:
  """host_keep_count for traced ratios and counts: ceil(num n / 10^6) in int32 arithmetic.

  num n can exceed int32, so with n = qn 10^6 + rn and num = 1000 a + b (a <= 1000, b < 1000):
  num rn = (1000 c + d) 1000 + b rn with a rn = 1000 c + d; every partial product is < 2^31.
  """
  num = jnp.round(jnp.asarray(ratio) * RATIO_SCALE).astype(jnp.int32)
  n = jnp.round(jnp.asarray(n)).astype(jnp.int32)  # n may be a float sum of 0/1 units
  qn, rn = n // RATIO_SCALE, n % RATIO_SCALE
  a, b = num // 1000, num % 1000
  c, d = (a * rn) // 1000, (a * rn) % 1000
  k = num * qn + c + (d * 1000 + b * rn + RATIO_SCALE - 1) // RATIO_SCALE
  return jnp.clip(k, 1, jnp.maximum(n, 1)).astype(jnp.int32)


# ------------------------------------------------------------------ layouts


@dataclasses.dataclass(frozen=True)
class Axes:
  """The unit groups a parameter leaf is indexed by: ((group, axis), ...). A PyTree leaf."""

  pairs: tuple[tuple[str, int], ...] = ()


class UnitLayout(NamedTuple):
  """Unit groups and, per parameter leaf of x and y, the axes they index."""

  groups: Mapping[str, int]  # group -> K
  x: PyTree  # like x, leaves Axes
  y: PyTree  # like y, leaves Axes

  def groups_of(self, side: PyTree) -> set[str]:
    return {g for a in jax.tree.leaves(side) for g, _ in a.pairs}


def _expand(unit_masks: UnitMasks, axes_tree: PyTree, params: PyTree) -> PyTree:
  """Parameter mask: product over a leaf's (group, axis) pairs of the broadcast unit mask."""

  def leaf(axes: Axes, p: jax.Array) -> jax.Array:
    m = jnp.ones(p.shape, p.dtype)
    for g, ax in axes.pairs:
      shape = [1] * p.ndim
      shape[ax] = p.shape[ax]
      m = m * unit_masks[g].astype(p.dtype).reshape(shape)
    return m

  return jax.tree.map(leaf, axes_tree, params)


def kept_counts(masks: PyTree) -> PyTree:
  """Per leaf the number of kept (nonzero) entries, a float32 scalar."""
  return jax.tree.map(lambda m: jnp.sum(m != 0).astype(jnp.float32), masks)


def unit_kept_counts(unit_masks: UnitMasks, axes_tree: PyTree, params: PyTree) -> PyTree:
  """kept_counts(_expand(unit_masks, axes_tree, params)) without building the masks: an outer
  product of 0/1 unit masks keeps (product of their kept counts) x (sizes of the other axes)."""

  def leaf(axes: Axes, p: jax.Array) -> jax.Array:
    group_axes = {ax for _, ax in axes.pairs}
    n = jnp.float32(math.prod(d for ax, d in enumerate(p.shape) if ax not in group_axes))
    for g, _ in axes.pairs:
      n = n * jnp.sum(unit_masks[g] != 0).astype(jnp.float32)
    return n

  return jax.tree.map(leaf, axes_tree, params)


def expand_unit_masks(layout: UnitLayout, umx: UnitMasks, umy: UnitMasks, x: PyTree,
                      y: PyTree) -> tuple[PyTree, PyTree]:
  """Unit masks per group -> parameter masks (mask_x like x, mask_y like y)."""
  return _expand(umx, layout.x, x), _expand(umy, layout.y, y)


def _unit_magnitude(layout: UnitLayout, group: str, x: PyTree, y: PyTree) -> jax.Array:
  total = jnp.zeros((layout.groups[group],))
  for axes_tree, params in ((layout.x, x), (layout.y, y)):
    for axes, p in zip(jax.tree.leaves(axes_tree), jax.tree.leaves(params)):
      for g, ax in axes.pairs:
        if g == group:
          total = total + jnp.sum(jnp.moveaxis(p, ax, 0).reshape(p.shape[ax], -1) ** 2, axis=1)
  return total


# ------------------------------------------------------------------ mask policies

# (key, round, n, scores) -> rank [n], a permutation of 0..n-1: a client keeps the units of
# lowest rank. key: the client's (per round and group); scores() -> [n]: the units' magnitudes
# in the current global model (sums of squares of the slices a unit indexes), computed if called.
Policy = Callable[[jax.Array, jax.typing.ArrayLike, int, Callable[[], jax.Array]], jax.Array]


def random(key: jax.Array, round_idx: jax.typing.ArrayLike, n: int, scores) -> jax.Array:
  """A fresh random permutation per client and round (Federated Dropout)."""
  return jax.random.permutation(key, n)


def rolling(key: jax.Array, round_idx: jax.typing.ArrayLike, n: int, scores) -> jax.Array:
  """The window starting at unit (round mod n), shared by all clients (FedRolex)."""
  return (jnp.arange(n) - round_idx) % n


def static(key: jax.Array, round_idx: jax.typing.ArrayLike, n: int, scores) -> jax.Array:
  """The leading units (HeteroFL)."""
  return jnp.arange(n)


def magnitude(key: jax.Array, round_idx: jax.typing.ArrayLike, n: int, scores) -> jax.Array:
  """The largest units of the current global model, ties broken with the client's key."""
  return jnp.argsort(jnp.lexsort((jax.random.permutation(key, n), -scores())))


POLICIES: dict[str, Policy] = {"random": random, "rolling": rolling, "static": static,
                               "magnitude": magnitude}
# Policies whose kept set never reaches a unit that no client keeps at the start (check_coverable).
_STUCK_POLICIES = ("static", static)


def _ranks(policy: str | Policy, key: jax.Array, round_idx: jax.typing.ArrayLike, n: int,
           scores: Callable[[], jax.Array], available: jax.Array | None) -> jax.Array:
  """rank[j] in 0..n-1: units are kept in rank order; unavailable units rank last."""
  rank = (POLICIES[policy] if isinstance(policy, str) else policy)(key, round_idx, n, scores)
  if available is None:
    return rank
  return jnp.argsort(jnp.argsort(rank + n * (1 - available.astype(jnp.int32))))


def unit_masks(layout: UnitLayout, policy: str | Policy, rx: jax.typing.ArrayLike,
               ry: jax.typing.ArrayLike, key: jax.Array, round_idx: jax.typing.ArrayLike,
               x: PyTree, y: PyTree, available: UnitMasks | None = None
               ) -> tuple[UnitMasks, UnitMasks]:
  """One client's unit masks (umx for groups x indexes, umy for groups y indexes)."""
  in_x, in_y = layout.groups_of(layout.x), layout.groups_of(layout.y)
  umx, umy = {}, {}
  for i, (g, n) in enumerate(sorted(layout.groups.items())):
    avail = None if available is None else available.get(g)
    n_avail = n if avail is None else jnp.sum(avail)
    rank = _ranks(policy, jax.random.fold_in(key, i), round_idx, n,
                  lambda g=g: _unit_magnitude(layout, g, x, y), avail)
    keep_x = rank < keep_count(rx, n_avail)
    keep_y = rank < keep_count(ry, n_avail)
    if avail is not None:
      keep_x &= avail != 0
      keep_y &= avail != 0
    if g in in_x and g in in_y:
      # Shared group: a unit whose y rows are pruned gets an exactly zero hypergradient on x
      # (and x-pruned units give y nothing to read), so both sides keep the smaller set.
      keep_x = keep_y = keep_x & keep_y
    if g in in_x:
      umx[g] = keep_x.astype(jnp.float32)
    if g in in_y:
      umy[g] = keep_y.astype(jnp.float32)
  return umx, umy


def element_masks(policy: str | Policy, rx: jax.typing.ArrayLike, ry: jax.typing.ArrayLike,
                  key: jax.Array, round_idx: jax.typing.ArrayLike, x: PyTree,
                  y: PyTree) -> tuple[PyTree, PyTree]:
  """Coordinate-wise masks: each leaf keeps ceil(r * leaf.size) coordinates by the policy."""

  def side(params, r, salt):
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, p in enumerate(leaves):
      k = jax.random.fold_in(key, salt * 100_003 + i)
      rank = _ranks(policy, k, round_idx, p.size, lambda p=p: jnp.ravel(p) ** 2, None)
      out.append((rank < keep_count(r, p.size)).astype(p.dtype).reshape(p.shape))
    return jax.tree.unflatten(treedef, out)

  return side(x, rx, 0), side(y, ry, 1)


def validate_masks(layout: UnitLayout | None, *, policy: str | Policy, granularity: str) -> None:
  if not callable(policy):  # a name
    check_choice("mask_policy", policy, POLICIES)
  check_choice("mask_granularity", granularity, GRANULARITIES)
  if granularity == "unit" and layout is None:
    raise ConfigError("mask_granularity='unit' needs a UnitLayout for the model; use 'element' "
                      "for models without one.")


def make_masks(layout: UnitLayout | None, x: PyTree, y: PyTree, rx: jax.typing.ArrayLike,
               ry: jax.typing.ArrayLike, key: jax.Array, round_idx: jax.typing.ArrayLike,
               available: UnitMasks | None = None, *, policy: str | Policy,
               granularity: str) -> tuple[PyTree, PyTree]:
  """One client's (mask_x, mask_y) for this round (policy: a Policy or its name, granularity
  "unit" or "element"). x, y: the current global model."""
  if granularity == "element":
    return element_masks(policy, rx, ry, key, round_idx, x, y)
  umx, umy = unit_masks(layout, policy, rx, ry, key, round_idx, x, y, available)
  return expand_unit_masks(layout, umx, umy, x, y)


def check_coverable(layout: UnitLayout | None, x: PyTree, client_ratios: np.ndarray,
                    available: Mapping[str, np.ndarray] | None = None, *, policy: str | Policy,
                    granularity: str, allow_uncovered: bool = False) -> None:
  """Reject configurations under which some outer coordinate can never be covered
  (docs/method.md, section 4): with `static` masks every outer unit must be kept by some client
  (a client owning units, `available` [M, K], must keep all it owns). Random and rolling masks
  cover every unit over rounds; `magnitude` ranks by the moving global model; a user's policy is
  not checked. client_ratios: [M, 2] keep ratios (r_x, r_y) of the clients that can take part.
  """
  if allow_uncovered or policy not in _STUCK_POLICIES:
    return
  rx, ry = np.asarray(client_ratios)[:, 0], np.asarray(client_ratios)[:, 1]
  shared = set()
  if granularity == "element":
    sizes = {f"x leaf {i}": int(np.prod(np.shape(p))) for i, p in enumerate(jax.tree.leaves(x))}
  else:
    sizes = {g: layout.groups[g] for g in sorted(layout.groups_of(layout.x))}
    shared = layout.groups_of(layout.x) & layout.groups_of(layout.y)

  def kept(g: str, n: np.ndarray) -> np.ndarray:
    """Per client the x units it keeps of n: on shared groups min(k_x, k_y) (unit_masks)."""
    k = [host_keep_count(a, m) if m > 0 else 0 for a, m in zip(rx, n)]
    if g in shared:
      k = [min(kx, host_keep_count(b, m)) if m > 0 else 0 for kx, b, m in zip(k, ry, n)]
    return np.array(k)

  for g, n in sizes.items():
    if available is not None and g in available:
      own = np.asarray(available[g]).sum(axis=1)
      short = kept(g, own) < own
      if np.any(short):
        raise ConfigError(
            f"mask_policy={policy!r} with client-owned outer units in group {g!r} and keep "
            f"ratio r_x={rx[np.argmax(short)]} < 1 leaves those units uncovered forever; use "
            "mask_policy random or rolling, r_x = 1, or allow uncovered coordinates explicitly.")
      continue
    k = kept(g, np.full(len(rx), n))
    if k.max() < n:
      best = int(np.argmax(k))
      via_y = (f" (shared with y: r_y={ry[best]} of that client bounds it)"
               if k[best] < host_keep_count(rx[best], n) else "")
      raise ConfigError(
          f"mask_policy={policy!r} with largest outer keep ratio r_x={rx.max()}{via_y} leaves "
          f"{n - k.max()} of {n} outer units in {g!r} uncovered in every round; add a level "
          "with r_x = r_y = 1 on shared groups (r_x = 1 otherwise), use mask_policy random or "
          "rolling, or allow uncovered coordinates explicitly.")


# ------------------------------------------------------------------ coverage


class CoverageStats(NamedTuple):
  min: jax.Array  # fewest clients keeping any coordinate
  mean: jax.Array  # mean number of clients keeping a coordinate
  uncovered_share: jax.Array  # share of coordinates no client keeps


def coverage_stats(masks_C: PyTree) -> CoverageStats:
  """Min / mean coverage and uncovered share over every coordinate of every leaf, from the
  counts C_q[j] of clients whose mask keeps coordinate j."""
  counts = jax.tree.map(lambda m: jnp.sum(m != 0, axis=0, dtype=jnp.int32), masks_C)
  return coverage_stats_from_counts(counts)


def coverage_stats_from_counts(counts_tree: PyTree) -> CoverageStats:
  """coverage_stats given the per-coordinate counts C_q[j] (a tree like one mask)."""
  counts = jnp.concatenate([jnp.ravel(c) for c in jax.tree.leaves(counts_tree)])
  return CoverageStats(jnp.min(counts), jnp.mean(counts.astype(jnp.float32)),
                       jnp.mean((counts == 0).astype(jnp.float32)))
