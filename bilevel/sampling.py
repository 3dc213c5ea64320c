"""Who takes part in a round and what each client gets: client sampling and per-client context.

Sampling (docs/method.md, section 6): "uniform" draws C clients without replacement from the
population; "stratified" draws a fixed count from each resource level (the largest-remainder
split of C by level sizes, without replacement within the level), so every level's group has a
static size (the compact path needs it). The population is every client, or with only_full the
clients assigned level 1/1.

Context: per (round, client id), the client's keep ratios (its fixed level, or a level redrawn
every round), whether it takes part (only_full), its mask key, owned units and batch key. Keys
come from the seed streams (WORKSPACE.md, Seed streams): fold_in(fold_in(stream, round), id).
Everything a seed changes enters as `federated.RoundArgs` (jit arguments).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bilevel import masks as masks_lib
from bilevel import submodel as submodel_lib
from bilevel.federated import FederatedData, RoundArgs, stream_key
from bilevel.masks import Level, UnitLayout

# Streams a round reads (RoundArgs.keys); "init" is the drivers' (initial parameters).
ROUND_STREAMS = ("sample", "levels", "masks", "batches")


class Stratum(NamedTuple):
  """Clients of one resource level: the compact path vmaps each stratum with its own shapes."""

  rx: float
  ry: float
  clients: np.ndarray  # population ids at this level
  per_round: int  # clients sampled from it per round (stratified sampling)
  counts: dict[str, int]  # static compact width per unit group


def client_levels(levels: Sequence[Level], num_clients: int, seed: int, *, only_full: bool,
                  redraw_levels: bool) -> tuple[np.ndarray, np.ndarray]:
  """(ratios [M, 2], population): each client's fixed keep ratios (masks.assign_levels, seeded
  by `seed`) and the ids that may be sampled (with only_full and fixed levels: level 1/1)."""
  ratios = masks_lib.assign_levels(levels, num_clients, seed)
  population = np.arange(num_clients)
  if only_full and not redraw_levels:
    population = population[(ratios[:, 0] == 1) & (ratios[:, 1] == 1)]
  return ratios, population


def make_strata(ratios: np.ndarray, population: np.ndarray, clients_per_round: int,
                layout: UnitLayout | None) -> tuple[Stratum, ...]:
  """Population split by resource level (largest r first); per-round counts by largest remainder.

  Compact widths are masks.host_keep_count's exact integers, the counts the traced round's
  masks.keep_count gives (the ratio read to 6 decimals, float32 or float64 alike).
  """
  pairs = ratios[population]
  levels = sorted({tuple(p) for p in pairs.tolist()}, reverse=True)
  members = [population[np.all(pairs == np.array(lv), axis=1)] for lv in levels]
  per_round = masks_lib.largest_remainder(clients_per_round, np.array([len(m) for m in members]))
  strata = []
  for (rx, ry), ids, c in zip(levels, members, per_round):
    counts = {}
    if layout is not None:
      kx = {g: masks_lib.host_keep_count(rx, n) for g, n in layout.groups.items()}
      ky = {g: masks_lib.host_keep_count(ry, n) for g, n in layout.groups.items()}
      counts = submodel_lib.group_keep_counts(layout, kx, ky)
    if c > 0:
      strata.append(Stratum(rx, ry, ids, int(c), counts))
  return tuple(strata)


def round_args(seed: int, steps: Mapping[str, float], ratios: np.ndarray,
               population: np.ndarray, strata: tuple[Stratum, ...], dtype: Any) -> RoundArgs:
  """The RoundArgs of a run: its seed's streams, level assignment and step sizes (as scalars
  of x's dtype; steps: outer_lr, inner_lr, v_lr)."""
  return RoundArgs(
      keys={name: stream_key(seed, name) for name in ROUND_STREAMS},
      ratios=jnp.asarray(ratios), population=jnp.asarray(population),
      strata=tuple(jnp.asarray(st.clients) for st in strata),
      steps={name: jnp.asarray(value, dtype) for name, value in steps.items()})


SampleFn = Callable[[RoundArgs, jax.Array], list[jax.Array]]


def make_sample_fn(sampling: str, num_sampled: int, strata: tuple[Stratum, ...]) -> SampleFn:
  """`sample_fn(args, round) -> [ids]`: one array of num_sampled ids ("uniform") or one per
  stratum ("stratified"; stratum s draws with fold_in(round key, s) when there are several)."""

  def sample_fn(a: RoundArgs, q: jax.Array) -> list[jax.Array]:
    key = jax.random.fold_in(a.keys["sample"], q)
    if sampling == "uniform":
      return [jax.random.choice(key, a.population, (num_sampled,), replace=False)]
    return [jax.random.choice(key if len(strata) == 1 else jax.random.fold_in(key, s),
                              a.strata[s], (st.per_round,), replace=False)
            for s, st in enumerate(strata)]

  return sample_fn


class ClientContext(NamedTuple):
  """What a sampled client gets in a round besides the server state and the data."""

  rx: jax.Array  # keep ratio of x
  ry: jax.Array  # keep ratio of y
  active: jax.Array  # 1.0, or 0.0 for a client that sits the round out (only_full)
  mask_key: jax.Array
  available: Mapping[str, jax.Array] | None  # group -> [K] units it owns (None: all)
  batch_key: jax.Array


ContextFn = Callable[[RoundArgs, FederatedData, jax.Array, jax.Array], ClientContext]


def make_context_fn(levels: Sequence[Level], redraw_levels: bool, only_full: bool) -> ContextFn:
  """`context(args, data, client_id, round) -> ClientContext`: a client's fixed level, or one
  drawn from `levels` each round (redraw_levels); with only_full only level 1/1 takes part."""
  level_table = jnp.array([[lv.rx, lv.ry] for lv in levels])
  level_p = jnp.array([lv.share for lv in levels])

  def context(a: RoundArgs, data: FederatedData, cid: jax.Array, q: jax.Array) -> ClientContext:
    if redraw_levels:
      lvl = jax.random.choice(jax.random.fold_in(jax.random.fold_in(a.keys["levels"], q), cid),
                              len(levels), p=level_p)
      rx, ry = level_table[lvl, 0], level_table[lvl, 1]
    else:
      rx, ry = a.ratios[cid, 0], a.ratios[cid, 1]
    active = jnp.asarray(1.0)
    if only_full:
      active = ((rx == 1) & (ry == 1)).astype(jnp.float32)
    mkey = jax.random.fold_in(jax.random.fold_in(a.keys["masks"], q), cid)
    avail = None if data.available is None else {g: t[cid] for g, t in data.available.items()}
    bkey = jax.random.fold_in(jax.random.fold_in(a.keys["batches"], q), cid)
    return ClientContext(rx, ry, active, mkey, avail, bkey)

  return context
