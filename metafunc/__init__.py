"""metafunc: gradient-based meta-learning on ``torch.func``.

Models are pure functions of plain dicts of tensors (:func:`functionalize`); inner-loop optimizers
are pure ``init``/``update`` pairs (:mod:`metafunc.optim`), differentiable in every input.
"""

from . import optim
from ._functional import FunctionalModel, functionalize
from .optim._base import apply_updates

__version__ = "0.1.0"

__all__ = ["FunctionalModel", "__version__", "apply_updates", "functionalize", "optim"]
