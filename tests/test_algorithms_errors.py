"""Every argument and meta-batch mistake is named, before any work, with a message that says
the fix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _algorithms import (
    _model,
    _tasks,
)
from torch import nn

import metafunc
import metafunc.optim as mo
from metafunc.algorithms import (
    IMAML,
    MAML,
    Leap,
    MetaLearner,
    PerParamLR,
    PerStepLR,
    Reptile,
    WarpGrad,
)


def test_errors():
    fm = _model([1, 3, 1])
    with pytest.raises(ValueError, match="expected loss to be one of"):
        MAML(fm, "mae")
    with pytest.raises(TypeError, match="functionalize"):
        MAML(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="functionalize"):
        Reptile(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"did you mean '2\.weight'"):
        MAML(fm, adapted=["2.weigth"])
    with pytest.raises(TypeError, match="list of param names"):
        MAML(fm, adapted="2.weight")
    with pytest.raises(ValueError, match="adapted is empty"):
        MAML(fm, adapted=[])
    with pytest.raises(ValueError, match="expected learn_lr"):
        MAML(fm, learn_lr="per_layer")
    with pytest.raises(ValueError, match="step_weights"):
        MAML(fm, steps=2, step_weights=[1.0])
    with pytest.raises(ValueError, match="step_weights"):
        MAML(fm, steps=2, step_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least one positive"):
        MAML(fm, steps=2, step_weights=[0.0, 0.0])
    for bad in (0, -1, 1.5, True):
        for make in (
            lambda s: MAML(fm, steps=s),
            lambda s: Reptile(fm, steps=s),
            lambda s: IMAML(fm, steps=s),
            lambda s: Leap(fm, steps=s),
            lambda s: WarpGrad(fm, warp=["0.weight"], steps=s),
        ):
            with pytest.raises(ValueError, match="expected steps to be a positive int"):
                make(bad)
    for make in (
        lambda lr: MAML(fm, inner_lr=lr),
        lambda lr: Reptile(fm, inner_lr=lr),
        lambda lr: IMAML(fm, inner_lr=lr),
        lambda lr: Leap(fm, inner_lr=lr),
        lambda lr: WarpGrad(fm, warp=["0.weight"], inner_lr=lr),
    ):
        with pytest.raises(ValueError, match="inner_lr"):
            make(0.0)
    for make in (
        lambda **kw: MAML(fm, **kw),
        lambda **kw: Reptile(fm, **kw),
        lambda **kw: Leap(fm, **kw),
    ):
        with pytest.raises(ValueError, match="inner_opt carries its own learning rate; drop"):
            make(inner_lr=0.1, inner_opt=mo.adam(lr=0.1))
        with pytest.raises(TypeError, match=r"expected inner_opt to be a metafunc\.optim"):
            make(inner_opt=torch.optim.Adam)
    with pytest.raises(ValueError, match=r"drop learn_lr=PerParamLR\(\)"):
        MAML(fm, inner_opt=mo.adam(lr=0.1), learn_lr=PerParamLR())
    with pytest.raises(ValueError, match="lam"):
        IMAML(fm, lam=0.0)
    with pytest.raises(ValueError, match="expected metric"):
        Leap(fm, metric="area")
    with pytest.raises(ValueError, match=r"did you mean '0\.weight'"):
        WarpGrad(fm, warp=["0.wieght"])
    with pytest.raises(TypeError, match="list of param names"):
        WarpGrad(fm, warp="0.weight")
    with pytest.raises(ValueError, match="both warp params and task params"):
        WarpGrad(fm, warp=list(fm.params))
    with pytest.raises(ValueError, match="buffer_size"):
        WarpGrad(fm, warp=["0.weight"], buffer_size=0)
    with pytest.raises(NotImplementedError):
        MetaLearner(fm).task_loss({}, None, None)


def test_meta_batch_mistakes_are_named():
    """The mistakes of a first meta-training loop, each named before any work is done."""
    fm = _model([1, 3, 1])
    (sx, sy), (qx, qy) = _tasks(2, 4, 5, 1, 1, "mse", seed=3)
    maml = MAML(fm, inner_lr=0.1, strategy="vmap")
    meta = maml.init()
    call = r"MAML\.meta_grad\(meta, support, query\)"
    with pytest.raises(TypeError, match=call + r": expected meta to be the dict of learner.init"):
        maml.meta_grad(fm.params, (sx, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"these are the model's params"):
        maml.meta_grad(dict(fm.params), (sx, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"with keys \['lr', 'params'\]; got \['params'\]"):
        MAML(fm, learn_lr=PerParamLR(), strategy="vmap").meta_grad(meta, (sx, sy), (qx, qy))
    meta_sgd = MAML(fm, steps=2, learn_lr=PerParamLR(), strategy="vmap").init()
    with pytest.raises(ValueError, match=r"expects meta\['lr'\]\['0.weight'\] of shape \(2,\)"):
        MAML(fm, steps=2, learn_lr=PerStepLR(), strategy="vmap").meta_grad(
            meta_sgd, (sx, sy), (qx, qy)
        )
    with pytest.raises(TypeError, match=r"expected support to be a pair .* got a tuple of 3"):
        maml.meta_grad(meta, (sx, sy, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"expected query to be a pair .* got a Tensor"):
        maml.meta_grad(meta, (sx, sy), qx)
    with pytest.raises(ValueError, match=r"same two leading sizes, got \(2, 4, 1\) and \(4, 1\)"):
        maml.meta_grad(meta, (sx, sy[0]), (qx, qy))
    with pytest.raises(ValueError, match=r"query has shape \(2, 0, 1\): no examples per task"):
        maml.meta_grad(meta, (sx, sy), (qx[:, :0], qy[:, :0]))  # queries=0
    with pytest.raises(ValueError, match=r"support has 2 tasks but query has 1"):
        maml.meta_grad(meta, (sx, sy), (qx[:1], qy[:1]))
    with pytest.raises(ValueError, match=r"outputs have shape \(4, 1\) per task and the targets"):
        maml.meta_grad(meta, (sx, sy[..., 0]), (qx, qy[..., 0]))  # mse would broadcast
    for learner in (Reptile(fm, strategy="vmap"), Leap(fm, strategy="vmap")):
        with pytest.raises(TypeError, match=r"\.meta_grad\(meta, support, query\): expected meta"):
            learner.meta_grad(fm.params, (sx, sy), (qx, qy))
    with pytest.raises(TypeError, match=r"MAML\.evaluate\(meta, support, query\)"):
        maml.evaluate(meta, (sx, sy, sy), (qx, qy))

    ce = MAML(_model([2, 3, 3]), "cross_entropy", strategy="vmap")
    (cx, cy), (dx, dy) = _tasks(2, 4, 5, 2, 3, "cross_entropy", seed=4)
    with pytest.raises(TypeError, match=r"int64 class indices, got torch.float64; use y.argmax"):
        ce.meta_grad(ce.init(), (cx, F.one_hot(cy, 3).double()), (dx, dy))
    with pytest.raises(TypeError, match=r"query targets as int64 class indices, got torch.int32"):
        ce.meta_grad(ce.init(), (cx, cy), (dx, dy.int()))


def test_constructor_arguments_are_checked_up_front():
    fm = _model([1, 3, 1])
    with pytest.raises(TypeError, match=r"expected first_order to be a bool, got 'no'"):
        MAML(fm, first_order="no")
    with pytest.raises(TypeError, match=r"IMAML\(model, \.\.\.\): expected solve to be a linear"):
        IMAML(fm, solve="cg")
    with pytest.raises(ValueError, match=r"expected if_not_converged in"):
        IMAML(fm, if_not_converged="bogus")
    with pytest.raises(TypeError, match=r"stop_gradient\(tree\): expected a pytree"):
        metafunc.stop_gradient(nn.Linear(1, 1).parameters())


def test_non_finite_hyperparameters_are_refused():
    fm = _model([1, 3, 1])
    for bad in (math.inf, math.nan):
        for make in (
            lambda v: MAML(fm, inner_lr=v),
            lambda v: Reptile(fm, inner_lr=v),
            lambda v: IMAML(fm, lam=v),
        ):
            with pytest.raises(
                ValueError, match=r"expected (inner_lr|lam) to be positive and finite"
            ):
                make(bad)
        with pytest.raises(ValueError, match=r"finite non-negative numbers"):
            MAML(fm, steps=2, step_weights=[bad, 1.0])
