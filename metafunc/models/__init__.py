"""Few-shot backbones as ordinary ``nn.Module``\\ s: Conv-4, ResNet-12 and WRN-28-10, and
the networks of ``python -m metafunc train`` (an MLP and Conv-4 with WarpGrad's warp layers).

Each backbone takes ``ways``: ``None`` (the default) gives the flattened features, the
embedding that :class:`~metafunc.algorithms.ProtoNet`, :class:`~metafunc.algorithms.R2D2` and
:class:`~metafunc.algorithms.MetaOptNet` read; an int adds a linear classifier ``head`` with
that many outputs, the model that :class:`~metafunc.algorithms.MAML` adapts. ``out_features``
is the embedding's size.

BatchNorm always normalises with the statistics of the batch it is given, in training and in
evaluation mode, as MAML's reference code does (``track_running_stats=False``): under
:func:`~metafunc.vmap_tasks` each task is normalised with its own statistics, and metafunc
computes BatchNorm exactly there, second order included (``metafunc._norms``). No running
statistics are kept: metafunc's learners return buffers, never write them, so running
statistics would stay at their initial values. Convolutions followed by a BatchNorm have no
bias (the norm removes it, so its gradient would be exactly zero), except in
:class:`WarpConv4`, which keeps MAML's biases.

The constructors take width and size arguments (``hidden``, ``channels``, ``widen``,
``image_size``), so that tests and smoke runs can use small versions of the same networks.
"""

from ._conv4 import Conv4, conv4_miniimagenet, conv4_omniglot
from ._dropblock import DropBlock
from ._mlp import MLP
from ._resnet12 import ResNet12
from ._warpconv4 import WarpConv4
from ._wrn import WideResNet, wrn28_10

__all__ = [
    "MLP",
    "Conv4",
    "DropBlock",
    "ResNet12",
    "WarpConv4",
    "WideResNet",
    "conv4_miniimagenet",
    "conv4_omniglot",
    "wrn28_10",
]
