"""``metafunc.compat.higher``: the differentiable optimizers and their options, against
``torch.optim`` and finite differences."""

from __future__ import annotations

import pytest
import torch
from test_compat_higher_common import (
    IMAGES_QUERY,
    IMAGES_SUPPORT,
    OPTIMIZERS,
    STEPS,
    SUPPORT,
    convnet,
    finite_differences,
    flat,
    float64_default,  # noqa: F401 (an autouse fixture)
    functional_unroll,
    mlp,
    mse,
    native_meta_loss,
    same,
    sgd,
    torch_meta_loss,
    torch_unroll,
    two_groups,
    unroll,
)
from torch import nn

import metafunc
import metafunc.compat.higher as compat


@pytest.mark.parametrize(
    ("name", "kw"), OPTIMIZERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZERS)]
)
def test_every_optimizer_steps_like_torch_optim(name, kw):
    def make_opt(net):
        return getattr(torch.optim, name)(net.parameters(), **kw)

    _, fmodel, _ = unroll(compat, make_opt=make_opt, steps=8)
    _, _, trajectory = torch_unroll(mlp, make_opt, steps=8)
    for t in range(9):
        assert (flat(fmodel.parameters(time=t)) - trajectory[t]).abs().max() < 1e-13, t


def test_there_is_a_differentiable_class_for_every_metafunc_optimizer():
    names = ["SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad"]
    names += ["Adadelta", "Rprop", "ASGD"]
    model = mlp()
    for name in names:
        cls = getattr(compat.optim, f"Differentiable{name}")
        assert issubclass(cls, compat.optim.DifferentiableOptimizer)
        opt = getattr(torch.optim, name)(model.parameters(), lr=0.1)
        assert type(compat.get_diff_optim(opt, model.parameters())) is cls
        assert getattr(metafunc.optim, cls.metafunc_optimizer.__name__) is cls.metafunc_optimizer


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("Adam", dict(lr=0.05, eps=1e-3)),
        ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
        ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ],
)
def test_adaptive_meta_gradients_match_finite_differences(name, kw):
    """Adam and RMSprop are where higher 0.2.1 is wrong or warns; here they follow the math."""

    def make_opt(net):
        return getattr(torch.optim, name)(net.parameters(), **kw)

    model, _, meta = unroll(compat, make_opt=make_opt, copy_initial_weights=False)
    meta.backward()
    got = flat(p.grad for p in model.parameters())
    oracle = finite_differences(
        lambda th: torch_meta_loss(mlp, make_opt, theta=th), flat(mlp().parameters()), points=5
    )
    assert (got - oracle).abs().max() < 1e-8


def test_learnable_override_lr_and_momentum_match_finite_differences():
    lr = torch.tensor(0.1, requires_grad=True)
    momentum = torch.tensor(0.9, requires_grad=True)
    _, _, meta = unroll(compat, override={"lr": [lr], "momentum": momentum})
    meta.backward()
    base = {"lr": 0.1, "momentum": 0.9}
    for name, value in (("lr", lr), ("momentum", momentum)):
        oracle = finite_differences(
            lambda v, name=name: torch_meta_loss(mlp, sgd, hyper={**base, name: v.item()}),
            torch.tensor([base[name]]),
        )
        assert abs(value.grad.item() - oracle.item()) < 1e-8, name
    # plain numbers override too, for every group: torch.optim with those values
    _, fmodel, _ = unroll(compat, override={"lr": 0.05, "momentum": [0.5]})
    _, _, trajectory = torch_unroll(mlp, sgd, hyper={"lr": 0.05, "momentum": 0.5})
    assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14


def test_parameter_groups_with_different_hyperparameters_step_like_torch_optim():
    def make_opt(net):  # groups also differ in a switch; net[2].bias is in no group
        return torch.optim.SGD(
            [
                {"params": net[0].parameters(), "lr": 0.2, "nesterov": True},
                {"params": [net[2].weight], "dampening": 0.5},
            ],
            lr=0.05,
            momentum=0.9,
        )

    _, fmodel, _ = unroll(compat, make_opt=make_opt)
    _, _, trajectory = torch_unroll(mlp, make_opt)
    assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14
    assert torch.equal(list(fmodel.parameters())[-1], mlp()[2].bias)  # outside every group

    def make_adam(net):
        return torch.optim.Adam(
            [
                {"params": net[0].parameters(), "lr": 0.1, "betas": (0.5, 0.9)},
                {"params": net[2].parameters(), "eps": 1e-2},
            ],
            lr=0.01,
        )

    _, fmodel, _ = unroll(compat, make_opt=make_adam)
    _, _, trajectory = torch_unroll(mlp, make_adam)
    assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14


def test_per_group_override_lists_match_finite_differences():
    lrs = [torch.tensor(0.2, requires_grad=True), torch.tensor(0.05, requires_grad=True)]
    _, fmodel, meta = unroll(compat, make_opt=two_groups, override={"lr": lrs})
    meta.backward()
    _, _, trajectory = torch_unroll(mlp, two_groups)
    assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14
    for i in range(2):

        def f(v, i=i):
            hyper = [{"lr": 0.2}, {"lr": 0.05}]
            hyper[i] = {"lr": v.item()}
            return torch_meta_loss(mlp, two_groups, hyper=hyper)

        oracle = finite_differences(f, torch.tensor([[0.2, 0.05][i]]))
        assert abs(lrs[i].grad.item() - oracle.item()) < 1e-8, i


def test_step_override_takes_precedence_and_stays_as_in_higher():
    model = mlp()
    lr = torch.tensor(0.3, requires_grad=True)
    with compat.innerloop_ctx(model, sgd(model), override={"lr": [0.01]}) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), override={"lr": [lr]})
        for _ in range(STEPS - 1):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
    _, _, trajectory = torch_unroll(mlp, sgd, hyper={"lr": 0.3})
    assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14


def test_step_with_explicit_params_and_no_fmodel():
    params, grads = functional_unroll(compat)
    model, fmodel, meta = unroll(compat, copy_initial_weights=False)
    meta.backward()
    assert (params - flat(fmodel.parameters())).abs().max() < 1e-14
    assert (grads - flat(p.grad for p in model.parameters())).abs().max() < 1e-14


def test_grad_callback_is_applied_like_clipping_before_torch_optim_step():
    max_norm = 0.05

    def clip(grads):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * coef for g in grads]

    net = mlp()
    opt = sgd(net)
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        mse(net(SUPPORT[0]), SUPPORT[1]).backward()
        nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        opt.step()
        trajectory.append(flat(net.parameters()))

    model = mlp()
    fmodel = compat.monkeypatch(model)
    diffopt = compat.optim.DifferentiableSGD(
        sgd(model), model.parameters(), fmodel=fmodel, grad_callback=clip
    )
    seen = []
    for t in range(STEPS):
        callback = None if t == 0 else (lambda grads: seen.append(len(grads)) or clip(grads))
        new = diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), grad_callback=callback)
        assert same(new, fmodel.fast_params)
        assert (flat(new) - trajectory[t]).abs().max() < 1e-14, t
    assert seen == [4, 4]  # the step's callback replaces the default; one grad per parameter


def test_parameters_without_a_gradient_keep_weights_and_state_as_in_torch_optim():
    """A parameter unused by a step's loss is skipped, and so is its state (Adam's step count)."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
            self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)

        def forward(self, x, heads="ab"):
            return sum(getattr(self, h)(x) for h in heads) * self.frozen

    heads = ["ab", "a", "ab", "b", "ab"]
    for name in ["Adam", "SGD", "Adagrad", "NAdam", "ASGD"]:

        def make_opt(net, name=name):
            kw = {"momentum": 0.9} if name == "SGD" else {}
            return getattr(torch.optim, name)(net.parameters(), lr=0.1, **kw)

        model = TwoHeads()
        with compat.innerloop_ctx(model, make_opt(model)) as (fmodel, diffopt):
            for h in heads:
                diffopt.step(mse(fmodel(SUPPORT[0], h), SUPPORT[1]))
        _, _, trajectory = torch_unroll(TwoHeads, make_opt, steps=len(heads), heads=heads)
        for t in range(len(heads) + 1):
            got = flat(fmodel.parameters(time=t))
            assert (got - trajectory[t]).abs().max() < 1e-14, (name, t)
        assert torch.equal(dict(fmodel.named_parameters())["frozen"], torch.ones(1))


def test_track_higher_grads_false_detaches_every_step():
    """higher's "test mode", also its first-order MAML: no meta-gradient crosses a step."""
    model, fmodel, meta = unroll(compat, copy_initial_weights=False, track_higher_grads=False)
    assert fmodel.track_higher_grads is False
    final = list(fmodel.parameters())
    assert all(p.grad_fn is None and p.requires_grad for p in final)
    _, _, trajectory = torch_unroll(mlp, sgd)
    assert (flat(final) - trajectory[-1]).abs().max() < 1e-14
    assert same(fmodel.parameters(time=0), final)  # only the latest weights are kept
    with pytest.raises(IndexError, match="track_higher_grads=False keeps only the latest"):
        fmodel.parameters(time=1)
    grads = torch.autograd.grad(meta, final, retain_graph=True)
    meta.backward()
    assert all(p.grad is None for p in model.parameters())  # as in higher
    native = mlp()
    fm = metafunc.functionalize(native)
    opt = metafunc.optim.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
    native_meta_loss(fm.params, fm, opt, first_order=True)[0].backward()
    want = flat(p.grad for p in native.parameters())  # native first-order MAML: the same gradient
    assert (flat(grads) - want).abs().max() < 1e-14
    with pytest.raises(TypeError, match="expected a bool"):
        fmodel.track_higher_grads = 1


def test_device_argument_on_cpu():
    model, fmodel, meta = unroll(compat, device="cpu", copy_initial_weights=False)
    meta.backward()
    model2, _, meta2 = unroll(compat, copy_initial_weights=False)
    meta2.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), model2.parameters()))
    model, fmodel, meta = unroll(
        compat, device=torch.device("cpu"), make=convnet, support=IMAGES_SUPPORT, query=IMAGES_QUERY
    )
    assert all(p.device.type == "cpu" for p in fmodel.parameters())
    assert torch.equal(model[1].running_mean, torch.zeros(2))


def test_forward_params_become_the_fast_weights_and_modes_are_the_fmodels_own():
    """As in higher: ``fmodel(x, params=p)`` makes ``p`` current, so a later ``step(loss)`` steps
    ``p``; the buffers are copies, and ``fmodel.eval()`` does not change the module."""
    model = mlp()
    fmodel = compat.monkeypatch(model)
    diffopt = compat.get_diff_optim(sgd(model), model.parameters(), fmodel=fmodel)
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    new = diffopt.step(mse(fmodel(SUPPORT[0], params=start), SUPPORT[1]))
    assert same(fmodel.parameters(time=1), start) and same(fmodel.parameters(time=2), new)
    _, _, trajectory = torch_unroll(mlp, sgd, steps=1)
    assert (flat(new) - trajectory[1]).abs().max() < 1e-14

    net = convnet()
    net[1].eval()  # a frozen BatchNorm inside a model in training mode
    fnet = compat.monkeypatch(net)
    assert torch.equal(fnet(IMAGES_SUPPORT[0]), net(IMAGES_SUPPORT[0]))
    fnet.eval()
    assert net.training and not fnet.training
    fnet.train()
    fnet(IMAGES_SUPPORT[0])
    assert torch.equal(net[1].running_mean, torch.zeros(2))
