"""The algorithms: one constructor per algorithm, each owning every default that defines it.

    alg = bilevel.algorithms.get("rafbo", problem=problem, num_clients=8, clients_per_round=4,
                                 levels="1/1:0.5,0.5/0.5:0.5", granularity="element")
    state = alg.init(x, y)                      # a federated.ServerState
    for _ in range(rounds):
      state, metrics = alg.step(state, data)    # data: a federated.FederatedData; jitted once

rafbo.py: RAFBO and RABO (the local round, top to bottom); fednest.py: FedNest's communicating
round; baselines.py: lfednest, simfbo, memfbo, full_only, heterofl, fedrolex (the local round
with their own defaults); base.py: the keywords every algorithm takes (`Options`, each default
defined once) and the configured `Algorithm` (init, jitted step; `bilevel.run` drives it).
docs/method.md, section 7, tabulates what each algorithm sets (tests/presets_doc_test.py
checks the table against the code).

Every constructor takes the same keywords; one not given (or None) takes the algorithm's
default, and one its round does not read is a ConfigError unless left at its default. The
drivers build every algorithm through `get` (experiments/common.py, `make_algorithm`): a flag
given on the command line is passed, one left at its default too unless the algorithm sets
that option itself (`own_options`). So the library's defaults are the drivers' for
`--algorithm=NAME`, except their level profile "1/1:0.2,0.5/0.5:0.3,0.25/0.25:0.5" (here
"1/1:1") and their clients_per_round 10 (here num_clients // 2: the same for their 20 clients).
"""

from __future__ import annotations

from typing import Any

from bilevel.algorithms import baselines, base, fednest, rafbo
from bilevel.algorithms.base import FULL_LEVEL, Algorithm, Options
from bilevel.errors import check_choice
from bilevel.problems import BilevelProblem

# name -> what defines the algorithm (each module's constructor builds the same from its Spec)
_SPECS: dict[str, base.Spec] = {
    "rabo": rafbo.RABO, "rafbo": rafbo.RAFBO, "fednest": fednest.FEDNEST,
    "lfednest": baselines.LFEDNEST, "simfbo": baselines.SIMFBO, "memfbo": baselines.MEMFBO,
    "full_only": baselines.FULL_ONLY, "heterofl": baselines.HETEROFL,
    "fedrolex": baselines.FEDROLEX}


def names() -> tuple[str, ...]:
  """The names `get` accepts."""
  return tuple(_SPECS)


def defaults(name: str) -> Options:
  """The options `name` resolves to when no keyword is given (None: resolved per call:
  clients_per_round, granularity; or optional: layout, cost, ...)."""
  check_choice("algorithm", name, names())
  return _SPECS[name].defaults


def own_options(name: str) -> tuple[str, ...]:
  """The options whose default `name` sets itself: those that differ from what every
  algorithm shares (e.g. fednest's step sizes, heterofl's mask_policy) and, for algorithms
  where every client takes part, clients_per_round. The drivers pass a flag left at its
  default only for options not listed here, so an algorithm's own default wins over it."""
  check_choice("algorithm", name, names())
  spec = _SPECS[name]
  own = [f for f in Options._fields if getattr(spec.defaults, f) != getattr(base.SHARED, f)]
  if spec.full_participation:
    own.append("clients_per_round")
  return tuple(own)


def get(name: str, *, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """The algorithm `name` (see `names()`) configured by keywords over its own defaults.

  Args:
    name: one of names().
    problem: bilevel.BilevelProblem(inner_loss, outer_loss); each loss (x, y, batch) -> scalar.
    num_clients: population size M (the leading axis of the FederatedData passed to `step`).
    **options: any field of `base.Options`; None or absent = the algorithm's default.

  Returns:
    An Algorithm with init(x, y), step(state, data), options and name.

  Raises:
    ConfigError: an unknown name or keyword (naming the allowed ones) or a value outside its
      range (base.build).
  """
  check_choice("algorithm", name, names())
  return base.build(name, _SPECS[name], problem, num_clients, options)


__all__ = ["Algorithm", "Options", "FULL_LEVEL", "get", "names", "defaults", "own_options",
           "rafbo", "fednest", "baselines", "base"]
