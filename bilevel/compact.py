"""The compact execution strategy: each sampled client computes on its submodel's arrays
(docs/method.md, section 6; WORKSPACE.md, Submodel paths), tested equal to the dense round in
float64 to 1e-12 (tests/compact_test.py).

Unit masks only: the kept units are extracted units-major (submodel.to_units_major: a kept
unit is a contiguous row) into arrays of the level's static width ceil(r K) (one client step
per stratum of stratified sampling), client.client_update runs on them, and the server
scatter-adds the rows into full-size sums (server.round_sums).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from bilevel import masks as masks_lib
from bilevel import server, tree
from bilevel import submodel as submodel_lib
from bilevel.client import Sampler, population_sampler
from bilevel.federated import FederatedData, RoundArgs, ServerState
from bilevel.masks import UnitLayout
from bilevel.problems import BilevelProblem
from bilevel.sampling import ContextFn, Stratum


ClientFn = Callable[..., server.ClientResult]


def compact_client_fns(problem: BilevelProblem, mask_policy: str, layout: UnitLayout,
                       strata: Sequence[Stratum], context: ContextFn, finish: ClientFn,
                       sample: Sampler, update: Callable[..., Any]) -> tuple[ClientFn, ...]:
  """One compact client step per stratum (its static widths `counts`), on the units-major
  model (submodel.units_major_layout / units_major_problem); update(args, problem, x, y, v,
  inner, outer, mask_x, mask_y, key, sample=, first_step_apart=): the round's
  client.client_update with its options and the step sizes of args (RoundArgs)."""
  um_layout = submodel_lib.units_major_layout(layout)
  um_problem = submodel_lib.units_major_problem(problem, layout)

  def compact_client(counts: dict[str, int]) -> ClientFn:
    def client(a: RoundArgs, state: ServerState, data: FederatedData, cid: jax.Array,
               slot: jax.Array, q: jax.Array) -> server.ClientResult:
      del slot
      c = context(a, data, cid, q)
      umx, umy = masks_lib.unit_masks(layout, mask_policy, c.rx, c.ry, c.mask_key, q,
                                      state.x, state.y)
      idx = submodel_lib.compact_indices(layout, umx, umy, counts)
      # Units-major (submodel.to_units_major): the kept units are whole rows, gathered here
      # and scatter-added as rows by the server; the losses see the model's layout.
      take = lambda side, t: submodel_lib.extract(
          getattr(um_layout, side), submodel_lib.to_units_major(getattr(layout, side), t), idx)
      x_c, y_c, v_c = take("x", state.x), take("y", state.y), take("y", state.v)
      cux, cuy = submodel_lib.compact_unit_masks(umx, umy, idx)
      cux, cuy = tree.scale(c.active, cux), tree.scale(c.active, cuy)
      cmx, cmy = masks_lib.expand_unit_masks(um_layout, cux, cuy, x_c, y_c)
      kept = (masks_lib.unit_kept_counts(cux, um_layout.x, x_c),
              masks_lib.unit_kept_counts(cuy, um_layout.y, y_c))
      # x's compact mask is all ones: the client computes on exactly its kept x units (active
      # is 1 for every client a compact round samples: only_full restricts the population).
      out = update(a, um_problem, x_c, y_c, v_c, data.inner, data.outer, None, cmy,
                   c.batch_key, sample=population_sampler(sample, cid), first_step_apart=False)
      return finish(data, cid, out, cmx, cmy, c.active, idx, kept)  # the server scatter-adds

    return client

  return tuple(compact_client(st.counts) for st in strata)
