"""metafunc: gradient-based meta-learning on ``torch.func``.

Models are pure functions of plain dicts of tensors (:func:`functionalize`); inner-loop optimizers
are pure ``init``/``update`` pairs (:mod:`metafunc.optim`), differentiable in every input;
:func:`inner_loop` differentiates through an inner optimisation and records it on a :class:`Tape`.
"""

from . import algorithms, data, estimators, hyper, implicit, models, optim
from ._functional import FunctionalModel, functionalize
from ._inner import InnerLoopResult, inner_loop
from ._norms import exact_norms
from ._tape import Tape
from ._tasks import stack_tasks, unstack_tasks
from ._tree_math import stop_gradient
from ._vmap import vmap_tasks
from .optim._base import apply_updates

__version__ = "0.1.0"

__all__ = [
    "FunctionalModel",
    "InnerLoopResult",
    "Tape",
    "__version__",
    "algorithms",
    "apply_updates",
    "data",
    "estimators",
    "exact_norms",
    "functionalize",
    "hyper",
    "implicit",
    "inner_loop",
    "models",
    "optim",
    "stack_tasks",
    "stop_gradient",
    "unstack_tasks",
    "vmap_tasks",
]
