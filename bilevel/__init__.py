"""Resource-adaptive federated bilevel optimization with dual pruning (RABO / RAFBO) in JAX.

Reconstruction of arXiv 2512.24667 from its abstract; see docs/method.md and WORKSPACE.md.

Algorithms as objects (bilevel.algorithms):

    alg = bilevel.algorithms.get("rafbo", problem=bilevel.BilevelProblem(inner, outer),
                                 num_clients=M, levels="1/1:0.5,0.5/0.5:0.5",
                                 granularity="element")
    state = alg.init(x, y)
    state, metrics = alg.step(state, bilevel.FederatedData(inner_data, outer_data, counts))
"""

from bilevel import algorithms
from bilevel.federated import FederatedData
from bilevel.hypergrad import ESTIMATORS, HypergradResult, hypergradient
from bilevel.loop import run
from bilevel.masks import Axes, CoverageStats, Level, UnitLayout, coverage_stats
from bilevel.masks import parse_levels
from bilevel.problems import BilevelProblem
from bilevel.server import coverage_mean

__all__ = ["BilevelProblem", "hypergradient", "HypergradResult", "ESTIMATORS", "coverage_mean",
           "coverage_stats", "CoverageStats", "FederatedData", "algorithms", "run", "Level",
           "UnitLayout", "Axes", "parse_levels"]
__version__ = "0.1.0"
