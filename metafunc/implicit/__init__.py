"""Implicit differentiation: meta-gradients from optimality conditions, not from unrolled steps.

:func:`custom_root` and :func:`custom_fixed_point` make a solver differentiable by the implicit
function theorem; the linear solvers (:func:`solve_cg`, :func:`solve_normal_cg`,
:func:`solve_neumann`, :func:`solve_dense`) work on pytrees with matrix-vector products only;
:func:`imaml` is the iMAML inner problem (Rajeswaran et al. 2019) on top of them.
"""

from ._imaml import IMAMLResult, imaml
from ._linear import SolveInfo, solve_cg, solve_dense, solve_neumann, solve_normal_cg
from ._root import ImplicitSolveWarning, custom_fixed_point, custom_root

__all__ = [
    "IMAMLResult",
    "ImplicitSolveWarning",
    "SolveInfo",
    "custom_fixed_point",
    "custom_root",
    "imaml",
    "solve_cg",
    "solve_dense",
    "solve_neumann",
    "solve_normal_cg",
]
