"""The federated setting: client data, server state, seed streams, round types.

The round itself: bilevel/algorithms/rafbo.py (RAFBO / RABO and the baselines over it) and
bilevel/algorithms/fednest.py; `loop.run` drives either. Randomness (WORKSPACE.md, Seed
streams): one seed; named streams fold_in(key(seed), STREAMS[name]); per-round key
fold_in(stream, round); per-client key fold_in(round key, client id).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel import tree

PyTree = Any
STREAMS = {"init": 0, "sample": 1, "masks": 2, "batches": 3, "levels": 4}
DIAGNOSTICS = "_diagnostics"  # metrics key of make_round(diagnostics=True)'s per-round trees


def stream_key(seed: int, name: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), STREAMS[name])


class FederatedData(NamedTuple):
  """Client data stacked on a leading client axis [M, ...]."""

  inner: Any  # what g_i is evaluated on (or sampled from)
  outer: Any  # what f_i is evaluated on
  num_examples: jax.Array  # [M] example counts (aggregation weights with weighting="examples")
  available: Mapping[str, jax.Array] | None = None  # group -> [M, K] units a client owns


class ServerState(NamedTuple):
  x: PyTree
  y: PyTree
  v: PyTree
  opt_state: optax.OptState
  round: jax.Array  # int32 scalar: rounds completed


def init_state(x: PyTree, y: PyTree, optimizer: optax.GradientTransformation) -> ServerState:
  return ServerState(x, y, tree.zeros_like(y), optimizer.init(x), jnp.zeros((), jnp.int32))


# (state, client_id, slot, round, rx, ry, key) -> (mask_x, mask_y): masks that replace the
# policy's (rafbo.make_round's mask_fn).
MaskFn = Callable[..., tuple[PyTree, PyTree]]
SUBMODELS = ("dense", "compact")
SAMPLINGS = ("uniform", "stratified")


class RoundArgs(NamedTuple):
  """What differs between runs of one compiled round: jit arguments, not constants.

  The seed's random streams, its level assignment and the tuned step sizes enter the traced
  round as arrays, so every seed and every step-size grid point of a configuration runs one
  executable (one compilation per process, then JAX's persistent compilation cache).
  """

  keys: dict[str, jax.Array]  # stream name -> typed key (stream_key(seed, name))
  ratios: jax.Array  # [M, 2] client keep ratios
  population: jax.Array  # ids that may be sampled
  strata: tuple[jax.Array, ...]  # per stratum, its client ids
  steps: dict[str, jax.Array]  # outer_lr, inner_lr, v_lr as scalars of x's dtype


class Round(NamedTuple):
  """The jitted round and what the host needs to drive it.

  `step(state, data)` is `apply(hyper, state, data)` with its per-run values `hyper` (RoundArgs)
  bound as jit arguments, so seeds or grid points batch by vmapping `apply` over stacked `hyper`
  (loop.seeds_step). The unjitted pieces of `step` (tests/federated_test.py loops over them):
  `sample_fn(round) -> [ids per stratum]`, `client_fns[s](state, data, client_id, slot, round)
  -> server.ClientResult` (per stratum; one on the dense path) and `server_fn(state,
  [ClientResult stacked on [C] per client function]) -> (state, metrics)`.
  """

  step: Callable[..., tuple[ServerState, dict[str, jax.Array]]]
  population: np.ndarray  # client ids that may be sampled
  client_ratios: np.ndarray  # [M, 2] fixed keep ratios (ignored with redraw_levels)
  clients_per_round: int
  strata: tuple[Any, ...] = ()  # sampling.Stratum per level (stratified sampling)
  sample_fn: Callable[[jax.Array], list[jax.Array]] | None = None
  client_fns: tuple[Callable[..., Any], ...] = ()
  server_fn: Callable[..., tuple[ServerState, dict[str, jax.Array]]] | None = None
  # The traced step may hold constants of its own seed (a caller's mask_fn may close over
  # them), so other seeds cannot share it (loop.seeds_step refuses it).
  seed_constants: bool = False
  hyper: RoundArgs | None = None  # the per-run values `step` binds
  apply: Callable[..., tuple[ServerState, dict[str, jax.Array]]] | None = None
