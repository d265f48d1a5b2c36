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

from ._adam import (
    ScaleByAdamaxState,
    ScaleByAdamState,
    ScaleByNadamState,
    ScaleByRadamState,
    scale_by_adam,
    scale_by_adamax,
    scale_by_nadam,
    scale_by_radam,
)
from ._alias import adadelta, adagrad, adam, adamax, adamw, asgd, nadam, radam, rmsprop, rprop, sgd
from ._base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    identity,
    masked,
    set_to_zero,
)
from ._learned import LearnedState, init_learned_weights, learned, learned_num_features
from ._rms import (
    ScaleByAdadeltaState,
    ScaleByAdagradState,
    ScaleByRmsState,
    scale_by_adadelta,
    scale_by_adagrad,
    scale_by_rms,
)
from ._stepsize import ScaleByAsgdState, ScaleByRpropState, scale_by_asgd, scale_by_rprop
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
    "LearnedState",
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
    "init_learned_weights",
    "learned",
    "learned_num_features",
    "masked",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
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

# names that were public and are implementation: for one release, their error says so
_REMOVED = {
    "safe_sqrt": (
        "the square root with derivative 0 at 0 that the optimizers use inside their per-leaf "
        "kernels; it is private now (metafunc.optim._leafwise.safe_sqrt, which may change). Copy "
        "its two lines if you need it: torch.where(x > 0, torch.sqrt(torch.where(x > 0, x, 1)), 0)"
    ),
    "MaskedNode": (
        "the placeholder that masked(...) puts in place of the leaves it excludes; it is private "
        "now (metafunc.optim._base.MaskedNode, which may change). Build the mask as a pytree of "
        "bools; masked(...) handles the excluded leaves"
    ),
    "MaskedState": (
        "the state type of masked(...); it is private now (metafunc.optim._base.MaskedState, "
        "which may change). Use the state that masked(...).init returns; its inner optimizer's "
        "state is state.inner_state"
    ),
}


def __getattr__(name: str) -> object:
    if name in _REMOVED:
        raise AttributeError(
            f"metafunc.optim.{name} was removed from the public API: it is {_REMOVED[name]}."
        )
    raise AttributeError(f"module 'metafunc.optim' has no attribute {name!r}")
