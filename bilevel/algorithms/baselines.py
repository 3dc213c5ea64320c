"""The baselines as compositions of the same parts (docs/method.md, section 7): each is the
local round of rafbo.py with its own defaults and participation rule. FedNest's own round:
fednest.py.

Full-model baselines (lfednest, simfbo, memfbo) run every client on the full model: `levels`
is accepted (and validated) so that every algorithm takes the same call, but ignored. To run
one of their estimators on pruned submodels, use rafbo with that estimator (e.g.
`get("rafbo", ..., estimator="exact")`).
"""

from __future__ import annotations

from typing import Any

from bilevel.algorithms.base import SHARED, Algorithm, Spec, build
from bilevel.algorithms.rafbo import make_round
from bilevel.problems import BilevelProblem

LFEDNEST = Spec(SHARED._replace(estimator="neumann", inner_steps=5, num_steps=5), make_round,
                full_model=True)
SIMFBO = Spec(SHARED._replace(estimator="exact"), make_round, full_model=True)
MEMFBO = Spec(SHARED, make_round, full_model=True)
FULL_ONLY = Spec(SHARED, make_round, only_full=True)
HETEROFL = Spec(SHARED._replace(mask_policy="static"), make_round)
FEDROLEX = Spec(SHARED._replace(mask_policy="rolling"), make_round)


def lfednest(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """LFedNest-style baseline: K local steps of T = 5 inner steps and a 5-term Neumann
  hypergradient per client on the full model, averaged once per round (no extra communication
  rounds for the inner problem or the hypergradient)."""
  return build("lfednest", LFEDNEST, problem, num_clients, options)


def simfbo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """SimFBO-style baseline: exact Hessian-vector products for v, full model."""
  return build("simfbo", SIMFBO, problem, num_clients, options)


def memfbo(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """MemFBO-style baseline: the fd (Hessian-free) estimator, full model (rafbo unpruned)."""
  return build("memfbo", MEMFBO, problem, num_clients, options)


def full_only(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """Resource-unaware baseline: only clients at level 1/1 take part (config.only_full): a
  round has min(clients_per_round, that many) clients; a profile without 1/1 is a ConfigError."""
  return build("full_only", FULL_ONLY, problem, num_clients, options)


def heterofl(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """HeteroFL-style baseline: static nested masks (each client always keeps the first units),
  so the profile needs a level with r_x = 1 (else `init` raises ConfigError, unless
  allow_uncovered=True)."""
  return build("heterofl", HETEROFL, problem, num_clients, options)


def fedrolex(*, problem: BilevelProblem, num_clients: int, **options: Any) -> Algorithm:
  """FedRolex-style baseline: rolling masks (the kept window moves by one unit per round)."""
  return build("fedrolex", FEDROLEX, problem, num_clients, options)
