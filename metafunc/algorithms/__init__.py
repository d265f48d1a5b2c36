"""Meta-learning algorithms over the core API, each a small module.

Every algorithm is a :class:`MetaLearner`, an immutable value (a frozen dataclass whose fields
are its configuration; ``dataclasses.replace`` makes a variant): ``init()`` gives the
meta-parameters (a dict of tensors, the model's own parameters under ``"params"``),
``meta_grad(meta, support, query)`` the meta-gradient over a stacked meta-batch with per-task
metrics, ``evaluate`` the post-adaptation query metrics, ``adapt`` the adapted params of one
task. :class:`PerParamLR` and :class:`PerStepLR` are MAML's learned inner learning rates.
:class:`ProtoNet`, :class:`R2D2` and :class:`MetaOptNet` fit a classifier head on the support
embeddings instead of an inner loop (metric, ridge-regression and SVM heads).
"""

from ._base import MetaLearner
from ._imaml import IMAML
from ._leap import Leap
from ._learned_lr import PerParamLR, PerStepLR
from ._maml import MAML
from ._metaoptnet import MetaOptNet
from ._protonet import ProtoNet
from ._r2d2 import R2D2
from ._reptile import Reptile
from ._warpgrad import WarpGrad

__all__ = [
    "IMAML",
    "MAML",
    "R2D2",
    "Leap",
    "MetaLearner",
    "MetaOptNet",
    "PerParamLR",
    "PerStepLR",
    "ProtoNet",
    "Reptile",
    "WarpGrad",
]
