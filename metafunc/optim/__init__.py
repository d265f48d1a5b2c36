"""Pure, differentiable inner-loop optimizers in the optax style.

``opt = adam(lr=...)``; ``state = opt.init(params)``; ``updates, state = opt.update(grads, state,
params)``; ``params = metafunc.apply_updates(params, updates)``. Every function is out-of-place and
differentiable in all its inputs, hyperparameters included.

Half precision: the arithmetic of float16 and bfloat16 params runs in float32 and their optimizer
state is kept in float32; updates come back in the params' dtype. The ``scale_by_*`` transforms and
:func:`trace` take ``accumulator_dtype=`` to choose the state's dtype (e.g. ``torch.float16`` to
save memory, ``torch.float64`` for float32 params). In float16, an exactly-zero gradient entry is
taken as a structural zero (a masked loss): the meta-gradient does not flow back through the
optimizer's dependence on it, whose derivative (about ``lr / eps``) float16 cannot hold.

A Python-number hyperparameter larger than a params leaf's dtype can hold (``lr=1e300`` on float32
params) raises a ``ValueError`` in ``init`` or ``update``; tensor hyperparameters are not read.
"""

from ._adaptive import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByAsgdState,
    ScaleByNadamState,
    ScaleByRadamState,
    ScaleByRmsState,
    ScaleByRpropState,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_adamax,
    scale_by_asgd,
    scale_by_nadam,
    scale_by_radam,
    scale_by_rms,
    scale_by_rprop,
)
from ._alias import adadelta, adagrad, adam, adamax, adamw, asgd, nadam, radam, rmsprop, rprop, sgd
from ._base import (
    EmptyState,
    GradientTransformation,
    MaskedNode,
    MaskedState,
    apply_updates,
    chain,
    identity,
    masked,
    set_to_zero,
)
from ._hyper import safe_sqrt
from ._transforms import (
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "MaskedNode",
    "MaskedState",
    "ScaleByAdadeltaState",
    "ScaleByAdagradState",
    "ScaleByAdamState",
    "ScaleByAdamaxState",
    "ScaleByAsgdState",
    "ScaleByNadamState",
    "ScaleByRadamState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "TraceState",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "asgd",
    "chain",
    "clip_by_global_norm",
    "identity",
    "masked",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "safe_sqrt",
    "scale",
    "scale_by_adadelta",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_asgd",
    "scale_by_learning_rate",
    "scale_by_nadam",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rprop",
    "set_to_zero",
    "sgd",
    "trace",
]
