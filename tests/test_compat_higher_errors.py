"""``metafunc.compat.higher``: clear errors for what the compat layer does not accept."""

from __future__ import annotations

import pytest
import torch
from test_compat_higher_common import (
    STEPS,
    SUPPORT,
    flat,
    float64_default,  # noqa: F401 (an autouse fixture)
    mlp,
    mse,
    sgd,
    torch_unroll,
    unroll,
)
from torch import nn

import metafunc
import metafunc.compat.higher as compat


def test_errors():
    model = mlp()
    opt = sgd(model)
    with pytest.raises(ValueError, match="override names 'learning_rate'"):
        compat.get_diff_optim(opt, model.parameters(), override={"learning_rate": [0.1]})
    with pytest.raises(ValueError, match=r"has 3 values for 1 parameter group"):
        compat.get_diff_optim(opt, model.parameters(), override={"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(TypeError, match="override to be a dict"):
        compat.get_diff_optim(opt, model.parameters(), override=[0.1])
    with pytest.raises(TypeError, match=r"optimizer instance, .*; got a Sequential\.$"):
        compat.get_diff_optim(model, model.parameters())
    with pytest.raises(TypeError, match=r"expected a torch\.optim optimizer"):
        compat.optim.DifferentiableSGD(model, model.parameters())
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        compat.monkeypatch(opt)
    with pytest.raises(ValueError, match="no params given and no fmodel"):
        compat.get_diff_optim(opt, model.parameters()).step(torch.zeros(()))
    with pytest.raises(ValueError, match=r"has 2 values for 1 parameter group"):
        with compat.innerloop_ctx(model, opt) as (fmodel, diffopt):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), override={"lr": [0.1, 0.2]})
    fmodel = compat.monkeypatch(model)
    with pytest.raises(ValueError, match="expected 4 tensors"):
        fmodel(SUPPORT[0], params=list(model.parameters())[:2])
    with pytest.raises(ValueError, match="expected 4 tensors"):
        fmodel.update_params([])
    mse(model(SUPPORT[0]), SUPPORT[1]).backward()
    opt.step()
    # a stepped optimizer was an error ("already has state"); it is now continued from its state
    # (issue 14; tests/test_compat_higher_state.py)
    assert len(compat.get_diff_optim(opt, model.parameters()).state) == 4
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer subclass"):
        compat.register_optim(compat.optim.DifferentiableSGD, torch.optim.SGD)


def test_register_optim():
    class MySGD(torch.optim.SGD):
        pass

    model = mlp()
    with pytest.raises(ValueError, match="register one with register_optim"):
        compat.get_diff_optim(MySGD(model.parameters(), lr=0.1), model.parameters())
    compat.register_optim(MySGD, compat.optim.DifferentiableSGD)
    try:
        _, fmodel, _ = unroll(
            compat, make_opt=lambda net: MySGD(net.parameters(), lr=0.1, momentum=0.9)
        )
    finally:
        del compat.optim._REGISTRY[MySGD]
    _, _, trajectory = torch_unroll(
        mlp, lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    )
    assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14


def test_a_loss_from_the_original_module_raises_instead_of_stepping_nothing():
    """The loss computed with ``model(x)``, not ``fmodel(x)``, reaches no fast weight. higher
    0.2.1 then steps nothing, silently; compat raises (at the first step whose loss reaches no
    fast weight: with copy_initial_weights=False, the time-0 fast weights *are* the model's
    parameters, so the first step cannot tell the two apart)."""
    match = (
        r"DifferentiableSGD\.step\(loss, \.\.\.\): no fast weight received a gradient.*fmodel\(x\)"
    )
    for copy_initial_weights in (True, False):
        model = mlp()
        ctx = compat.innerloop_ctx(model, sgd(model), copy_initial_weights=copy_initial_weights)
        with ctx as (fmodel, diffopt), pytest.raises(ValueError, match=match):
            for _ in range(STEPS):
                diffopt.step(mse(model(SUPPORT[0]), SUPPORT[1]))
        taken = 0 if copy_initial_weights else 1  # the steps that went through
        assert len(list(fmodel.parameters(time=taken))) == 4
        with pytest.raises(IndexError):
            fmodel.parameters(time=taken + 1)
    # the error comes before the callback, and a failed step leaves the override unchanged
    model = mlp()
    diffopt = compat.optim.DifferentiableSGD(
        sgd(model), model.parameters(), fmodel=compat.monkeypatch(model), grad_callback=list
    )
    with pytest.raises(ValueError, match="no fast weight received a gradient"):
        diffopt.step(mse(model(SUPPORT[0]), SUPPORT[1]), override={"lr": [0.5]})
    assert diffopt._override == {}
    with pytest.raises(ValueError, match="no fast weight received a gradient"):  # params= path
        diffopt.step(mse(model(SUPPORT[0]), SUPPORT[1]), params=list(diffopt.fmodel.parameters()))


def test_some_parameters_without_a_gradient_still_step_with_callback_and_override():
    """Only *no* gradient at all is an error: an unused head is fine, on every path."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x):
            return self.a(x)

    seen = []

    def callback(grads):
        seen.append([g is None for g in grads])
        return grads

    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with compat.innerloop_ctx(model, opt, override={"lr": torch.tensor(0.2)}) as (fmodel, diffopt):
        diffopt.grad_callback = callback
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), override={"lr": [0.3]})
    assert seen == [[False, False, True, True]] * 2
    _, _, trajectory = torch_unroll(
        TwoHeads, lambda net: torch.optim.SGD(net.parameters(), lr=0.1), steps=1, hyper={"lr": 0.2}
    )
    assert (flat(fmodel.parameters(time=1)) - trajectory[1]).abs().max() < 1e-14
    assert torch.equal(flat(fmodel.parameters())[-4:], flat(model.b.parameters()))


@pytest.mark.parametrize(
    "make_loss, error, match",
    [
        (
            lambda out: (out - SUPPORT[1]) ** 2,
            ValueError,
            r"got a tensor of shape \(8, 1\)\. Reduce",
        ),
        (
            lambda out: mse(out, SUPPORT[1]).detach(),
            ValueError,
            "got a tensor that does not require grad",
        ),
        (lambda out: mse(out, SUPPORT[1]).item(), TypeError, r"got float .*not loss\.item\(\)"),
    ],
    ids=["non-scalar", "detached", "float"],
)
def test_a_bad_loss_gets_a_clear_error(make_loss, error, match):
    model = mlp()
    with compat.innerloop_ctx(model, sgd(model)) as (fmodel, diffopt):
        with pytest.raises(
            error,
            match=r"DifferentiableSGD\.step\(loss, \.\.\.\): expected a "
            r"scalar tensor loss with a graph to the fast weights; " + match,
        ):
            diffopt.step(make_loss(fmodel(SUPPORT[0])))
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]).reshape(1))  # one element: as higher


def test_a_metafunc_optimizer_or_an_optimizer_class_gets_a_clear_error():
    model = mlp()
    expected = r"expected a torch\.optim optimizer instance, e\.g\. torch\.optim\.SGD\("
    cases = [
        (metafunc.optim.sgd(lr=0.1), r"got a metafunc optimizer \(use metafunc\.inner_loop"),
        (torch.optim.SGD, r"got the class torch\.optim\.SGD; instantiate it"),
        (torch.optim.Adam, r"got the class torch\.optim\.Adam; instantiate it"),
    ]
    for opt, got in cases:
        with pytest.raises(TypeError, match=r"innerloop_ctx\(model, opt, \.\.\.\): " + expected):
            with compat.innerloop_ctx(model, opt):
                pass
        with pytest.raises(TypeError, match=r"get_diff_optim\(opt, \.\.\.\): .*" + got):
            compat.get_diff_optim(opt, model.parameters())
        with pytest.raises(TypeError, match=r"DifferentiableSGD\(other, \.\.\.\): .*" + got):
            compat.optim.DifferentiableSGD(opt, model.parameters())


def test_an_override_tensor_of_the_wrong_shape_is_reported_where_it_is_set():
    model = mlp()
    bad = torch.tensor([0.1, 0.2], requires_grad=True)
    match = (
        r"override\['lr'\] has a tensor of shape \(2,\), which does not broadcast to "
        r"parameter '0\.weight' of parameter group 0 \(shape \(4, 3\)\)"
    )
    with pytest.raises(ValueError, match=r"DifferentiableSGD: " + match):
        with compat.innerloop_ctx(model, sgd(model), override={"lr": bad}):
            pass
    no_names = match.replace("'0\\.weight'", "0")  # no fmodel: the parameter's index
    with pytest.raises(ValueError, match=r"DifferentiableSGD: " + no_names):
        compat.get_diff_optim(sgd(model), model.parameters(), override={"lr": [bad]})
    with compat.innerloop_ctx(model, sgd(model)) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"DifferentiableSGD\.step\(loss, \.\.\.\): " + match):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), override={"lr": bad})
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"override\['betas'\] has a tensor of shape \(3,\)"):
        compat.get_diff_optim(adam, model.parameters(), override={"betas": (torch.ones(3), 0.9)})
    # shapes that broadcast to every parameter unchanged are fine: 0-dim, and (1,) here
    for lr in (torch.tensor(0.1), torch.tensor([0.1])):
        compat.get_diff_optim(sgd(model), model.parameters(), override={"lr": lr})
