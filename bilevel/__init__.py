"""Resource-adaptive federated bilevel optimization with dual pruning (RABO / RAFBO) in JAX.

Reconstruction of arXiv 2512.24667 from its abstract; see SPEC.md and WORKSPACE.md.
"""

from bilevel.hypergrad import ESTIMATORS, HypergradResult, hypergradient
from bilevel.masks import CoverageStats, coverage_stats
from bilevel.problems import BilevelProblem
from bilevel.server import coverage_mean

__all__ = ["BilevelProblem", "hypergradient", "HypergradResult", "ESTIMATORS", "coverage_mean",
           "coverage_stats", "CoverageStats"]
__version__ = "0.1.0"
