"""The algorithms: one constructor per algorithm, each owning every default that defines it.

    alg = bilevel.algorithms.get("rafbo", problem=problem, num_clients=8, clients_per_round=4,
                                 levels="1/1:0.5,0.5/0.5:0.5", granularity="element")
    state = alg.init(x, y)                      # a federated.ServerState
    for _ in range(rounds):
      state, metrics = alg.step(state, data)    # data: a federated.FederatedData; jitted once

rafbo.py: RAFBO and RABO (the local round, top to bottom); fednest.py: FedNest's communicating
round; baselines.py: the local round with other defaults; base.py: the keywords every algorithm
takes (`Options`) and the configured `Algorithm`. docs/method.md, section 7, tabulates what each
algorithm sets. Every constructor takes the same keywords; one not given (or None) takes the
algorithm's default, and one its round does not read is a ConfigError unless left at its
default. The drivers' defaults are the library's (`own_options`) but for their level profile
and clients_per_round.
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


def reads(name: str) -> frozenset[str]:
  """The options `name`'s round reads (its round builder's keywords): giving any other one a
  value other than its default is a ConfigError (base.build)."""
  check_choice("algorithm", name, names())
  return frozenset(base._round_keywords(_SPECS[name]))


def get(name: str, *, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """The Algorithm `name` (one of names()) for `problem` (each loss (x, y, batch) -> scalar)
  and a population of num_clients M (the leading axis of the data `step` takes), configured
  by keywords (fields of `base.Options`; None or absent: the algorithm's default, e.g.
  estimator=bilevel.hypergrad.fd(num_steps=3) or estimator="fd", num_steps=3). ConfigError: an
  unknown name or keyword (naming the allowed ones) or a value outside its range (base.build).
  """
  check_choice("algorithm", name, names())
  return base.build(name, _SPECS[name], problem, num_clients, options)


__all__ = ["Algorithm", "Options", "FULL_LEVEL", "get", "names", "defaults", "own_options",
           "reads", "rafbo", "fednest", "baselines", "base"]
