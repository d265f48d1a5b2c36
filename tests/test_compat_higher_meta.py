"""``metafunc.compat.higher``: where the meta-gradient goes, and higher's own examples run with
the compat import (checked against finite differences, native metafunc and ``torch.optim``)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_compat_higher_common import (
    IMAGES_QUERY,
    IMAGES_SUPPORT,
    STEPS,
    convnet,
    finite_differences,
    flat,
    float64_default,  # noqa: F401 (an autouse fixture)
    higher_maml_omniglot_train,
    higher_readme_example,
    mlp,
    mse,
    native_meta_loss,
    omniglot_net,
    same,
    sgd,
    torch_meta_loss,
    torch_unroll,
    unroll,
)
from torch import nn

import metafunc
import metafunc.compat.higher as compat


def test_maml_meta_gradient_matches_finite_differences_and_native_metafunc():
    model, _, meta = unroll(compat, copy_initial_weights=False)
    meta.backward()
    got = flat(p.grad for p in model.parameters())
    oracle = finite_differences(
        lambda th: torch_meta_loss(mlp, sgd, theta=th), flat(mlp().parameters())
    )
    assert (got - oracle).abs().max() < 1e-8

    native = mlp()
    fm = metafunc.functionalize(native)
    opt = metafunc.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
    native_meta_loss(fm.params, fm, opt)[0].backward()
    assert (got - flat(p.grad for p in native.parameters())).abs().max() < 1e-14


def test_conv_batchnorm_maml_matches_native_and_leaves_the_model_buffers_alone():
    kw = dict(make=convnet, support=IMAGES_SUPPORT, query=IMAGES_QUERY)
    model, _, meta = unroll(compat, meta_grad_to_model=True, **kw)
    meta.backward()
    fresh = convnet()
    for name, buffer in fresh.named_buffers():  # as in higher: the inner loop uses copies
        assert torch.equal(buffer, model.get_buffer(name)), name

    native = convnet()
    fm = metafunc.functionalize(native)
    opt = metafunc.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
    native_meta_loss(fm.params, fm, opt, IMAGES_SUPPORT, IMAGES_QUERY)[0].backward()
    got, want = flat(p.grad for p in model.parameters()), flat(p.grad for p in native.parameters())
    assert (got - want).abs().max() < 1e-14


def test_copy_initial_weights_true_gives_the_model_no_meta_gradient():
    """The default: the meta-gradient stops at ``fmodel.parameters(time=0)``, detached copies."""
    model, fmodel, meta = unroll(compat)
    time0 = list(fmodel.parameters(time=0))
    assert all(p is not q and not q.grad_fn for p, q in zip(model.parameters(), time0))
    grads = torch.autograd.grad(meta, time0, retain_graph=True)
    meta.backward()
    assert all(p.grad is None for p in model.parameters())

    model2, _, meta2 = unroll(compat, copy_initial_weights=False)
    meta2.backward()
    assert (flat(grads) - flat(p.grad for p in model2.parameters())).abs().max() == 0


@pytest.mark.parametrize("entry", ["innerloop_ctx", "monkeypatch"])
def test_meta_grad_to_model_is_the_named_alias_of_copy_initial_weights(entry):
    def make(**kw):
        model = mlp()
        if entry == "monkeypatch":
            return model, compat.monkeypatch(model, **kw)
        with compat.innerloop_ctx(model, sgd(model), **kw) as (fmodel, _):
            return model, fmodel

    for kw, attached in [
        ({}, False),
        ({"copy_initial_weights": False}, True),
        ({"meta_grad_to_model": True}, True),
        ({"meta_grad_to_model": False}, False),
        ({"copy_initial_weights": True, "meta_grad_to_model": True}, True),
    ]:
        model, fmodel = make(**kw)
        same = [p is q for p, q in zip(model.parameters(), fmodel.parameters(time=0))]
        assert all(same) if attached else not any(same), kw
    with pytest.raises(ValueError, match="contradict"):
        make(copy_initial_weights=False, meta_grad_to_model=False)
    with pytest.raises(TypeError, match="meta_grad_to_model to be a bool"):
        make(meta_grad_to_model=1)


def test_parameters_time_t_is_torch_optims_step_t_and_carries_the_tail_meta_gradient():
    model, fmodel, meta = unroll(compat, meta_grad_to_model=True)
    _, _, trajectory = torch_unroll(mlp, sgd)
    native = mlp()
    fm = metafunc.functionalize(native)
    opt = metafunc.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
    native_meta, result = native_meta_loss(fm.params, fm, opt)
    for t in range(STEPS + 1):
        params = list(fmodel.parameters(time=t))
        assert (flat(params) - trajectory[t]).abs().max() < 1e-14, t
        grads = torch.autograd.grad(meta, params, retain_graph=True)
        tape = list(result.tape[t].values())
        want = torch.autograd.grad(native_meta, tape, retain_graph=True)
        assert (flat(grads) - flat(want)).abs().max() < 1e-14, t
    assert same(fmodel.parameters(time=-1), fmodel.parameters())
    assert same(fmodel.init_fast_params, model.parameters())
    assert same(fmodel.fast_params, fmodel.parameters(time=STEPS))
    for bad in (STEPS + 1, -(STEPS + 2)):
        with pytest.raises(IndexError, match=r"4 time step\(s\) are kept"):
            fmodel.parameters(time=bad)


def test_higher_readme_example_runs_with_the_compat_import():
    model, data, fmodel, grad_of_grads = higher_readme_example(compat)
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters())
    for xs, ys in data:
        opt.zero_grad()
        mse(ref(xs), ys).backward()
        opt.step()
    assert (flat(fmodel.parameters()) - flat(ref.parameters())).abs().max() < 1e-14

    def oracle(theta):
        net = copy.deepcopy(model)
        nn.utils.vector_to_parameters(theta, net.parameters())
        opt = torch.optim.Adam(net.parameters())
        for xs, ys in data:
            opt.zero_grad()
            mse(net(xs), ys).backward()
            opt.step()
        return sum((p**2).sum() for p in net.parameters()).item()

    fd = finite_differences(oracle, flat(model.parameters()))
    assert (flat(grad_of_grads) - fd).abs().max() < 1e-7


def test_higher_maml_omniglot_train_step_runs_with_the_compat_import():
    net, grads, _, (x_spt, y_spt, x_qry, y_qry) = higher_maml_omniglot_train(compat)
    native = omniglot_net()
    fm = metafunc.functionalize(native)

    def loss(p, b):
        return nn.functional.cross_entropy(fm(p, b[0]), b[1])

    for i in range(2):
        adapted = metafunc.inner_loop(
            loss, fm.params, metafunc.optim.sgd(lr=0.1), (x_spt[i], y_spt[i]), steps=5
        ).params
        loss(adapted, (x_qry[i], y_qry[i])).backward()
    assert (grads - flat(p.grad for p in native.parameters())).abs().max() < 1e-14
    assert torch.equal(net[1].running_mean, omniglot_net()[1].running_mean)  # used copies
