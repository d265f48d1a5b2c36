"""``metafunc.compat.higher``: higher's API on metafunc, checked against three oracles.

* ``torch.optim``: the fast weights after every step equal ``torch.optim``'s steps on a copy of
  the model. Always run.
* Central finite differences of a ``torch.optim`` unroll, for the meta-gradients. Always run.
* The real higher 0.2.1, a test-only peer, on the cases where higher is right (SGD, Adagrad,
  conv+BatchNorm, learnable ``override`` tensors, ``parameters(time=t)``,
  ``track_higher_grads=False``): equal to float64 round-off. They skip where higher is not
  installed. Where higher departs from ``torch.optim`` (Adam's ``eps``), the tests show it.

Everything runs in float64, with float64 as the default dtype: ``torch.optim`` keeps scalar state
(``step``, ASGD's ``eta``/``mu``, NAdam's ``mu_product``) in the default dtype, so a float32 default
puts a float32 round-off (~1e-9) into the float64 reference.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import metafunc
import metafunc.compat.higher as compat

D = torch.float64
STEPS = 3


@pytest.fixture(autouse=True)
def float64_default():
    """float64 by default; one thread (these tensors are tiny: a second thread only adds
    synchronisation, which costs milliseconds per op on a loaded machine)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(D)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def real_higher():
    """The real higher package, or a skip. Imported here: CI's test extra does not install it."""
    with quiet():
        return pytest.importorskip("higher")


@contextlib.contextmanager
def quiet():
    """higher warns (its RMSprop and Rprop, on construction); the suite makes warnings errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- models, data, oracles --------------------------------------------------------------------
def batch(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D), torch.randn(shape[0], 1, generator=g, dtype=D)


SUPPORT, QUERY = batch(0, 8, 3), batch(1, 8, 3)
IMAGES_SUPPORT, IMAGES_QUERY = batch(2, 6, 1, 6, 6), batch(3, 6, 1, 6, 6)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 1)
    )


def mse(out, y):
    return ((out - y) ** 2).mean()


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def same(a, b) -> bool:
    """The same tensor objects, in the same order."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def torch_unroll(make, make_opt, theta=None, hyper=None, steps=STEPS, support=SUPPORT, heads=None):
    """``torch.optim`` on a fresh model: ``(model, optimizer, [flat params after step t])``.

    ``theta``: flat initial params; ``hyper``: ``{key: value}`` or one dict per parameter group,
    written into the groups; ``heads``: per-step forward keyword (models that skip params)."""
    net = make()
    if theta is not None:
        nn.utils.vector_to_parameters(theta, net.parameters())
    opt = make_opt(net)
    if hyper is not None:
        hypers = hyper if isinstance(hyper, list) else [hyper] * len(opt.param_groups)
        for group, h in zip(opt.param_groups, hypers):
            group.update(h)
    trajectory = [flat(net.parameters())]
    for t in range(steps):
        opt.zero_grad()
        out = net(support[0]) if heads is None else net(support[0], heads[t])
        mse(out, support[1]).backward()
        opt.step()
        trajectory.append(flat(net.parameters()))
    return net, opt, trajectory


def torch_meta_loss(make, make_opt, **kw) -> float:
    net, _, _ = torch_unroll(make, make_opt, **kw)
    with torch.no_grad():
        return mse(net(QUERY[0]), QUERY[1]).item()


def finite_differences(f, x, h=1e-6, points=3) -> torch.Tensor:
    """Central differences of the float function ``f`` at the flat tensor ``x``: the 3-point
    stencil (error ~h**2) or the 5-point one (~h**4, for the curvature of Adam and RMSprop)."""
    x = x.detach().clone()
    out = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        if points == 3:
            out[i] = (f(x + e) - f(x - e)) / (2 * h)
        else:
            out[i] = (8 * (f(x + e) - f(x - e)) - f(x + 2 * e) + f(x - 2 * e)) / (12 * h)
    return out


def unroll(lib, make=mlp, make_opt=sgd, steps=STEPS, support=SUPPORT, query=QUERY, **ctx):
    """higher's MAML pattern, run with ``lib`` (the compat layer, or the real higher)."""
    model = make()
    with lib.innerloop_ctx(model, make_opt(model), **ctx) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(mse(fmodel(support[0]), support[1]))
        meta = mse(fmodel(query[0]), query[1])
    return model, fmodel, meta


def native_meta_loss(params, fm, opt, support=SUPPORT, query=QUERY, **kw):
    def loss(p, b):
        return mse(fm(p, b[0]), b[1])

    result = metafunc.inner_loop(loss, params, opt, support, steps=STEPS, **kw)
    return loss(result.params, query), result


# --- the meta-gradient and where it goes --------------------------------------------------------
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


# --- options of the optimizers -------------------------------------------------------------------
OPTIMIZERS = [
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=0.05, weight_decay=0.1)),
    ("Adamax", dict(lr=0.05, weight_decay=0.01)),
    ("NAdam", dict(lr=0.05, momentum_decay=0.01, weight_decay=0.01)),
    ("NAdam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.05, betas=(0.9, 0.9), weight_decay=0.01)),  # rectified from step 6
    ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
    ("Adadelta", dict(lr=1.0, rho=0.8, weight_decay=0.01)),
    ("Rprop", dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 1.0))),
    ("ASGD", dict(lr=0.05, lambd=1e-3, alpha=0.5, t0=2, weight_decay=0.01)),
]


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


def two_groups(net, **kw):
    return torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.2}, {"params": net[2].parameters()}],
        lr=0.05,
        momentum=0.9,
        **kw,
    )


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


def functional_unroll(lib):
    """higher's other style: no fmodel in the optimizer, the weights passed around explicitly."""
    model = mlp()
    fmodel = lib.monkeypatch(model, copy_initial_weights=False)
    diffopt = lib.optim.DifferentiableSGD(sgd(model), model.parameters())
    params = list(fmodel.parameters())
    for _ in range(STEPS):
        loss = mse(fmodel(SUPPORT[0], params=params), SUPPORT[1])
        params = diffopt.step(loss, params=params)
    mse(fmodel(QUERY[0], params=params), QUERY[1]).backward()
    return flat(params), flat(p.grad for p in model.parameters())


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
    with pytest.raises(ValueError, match="already has state"):
        compat.get_diff_optim(opt, model.parameters())
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


# --- higher's own examples, unchanged but for the import ------------------------------------------
def higher_readme_example(higher):
    """The "Example Usage" of higher's README (Adam, default options); returns what it computes."""
    torch.manual_seed(0)
    MyModel = mlp
    loss_function = mse
    data = [batch(10 + i, 8, 3) for i in range(3)]
    meta_loss_fn = lambda params: sum((p**2).sum() for p in params)

    model = MyModel()
    opt = torch.optim.Adam(model.parameters())

    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for xs, ys in data:
            logits = fmodel(xs)  # modified `params` can also be passed as a kwarg
            loss = loss_function(logits, ys)  # no need to call loss.backwards()
            diffopt.step(loss)  # note that `step` must take `loss` as an argument!

        # At the end of your inner loop you can obtain these e.g. ...
        grad_of_grads = torch.autograd.grad(
            meta_loss_fn(fmodel.parameters()), fmodel.parameters(time=0)
        )
    return model, data, fmodel, grad_of_grads


def omniglot_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def higher_maml_omniglot_train(higher, n_tasks=2):
    """The train step of higher's examples/maml-omniglot.py, shrunk (2 tasks, 6x6 images)."""
    net = omniglot_net()
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x_spt, x_qry = (
        torch.randn(n_tasks, 5, 1, 6, 6, generator=g),
        torch.randn(n_tasks, 5, 1, 6, 6, generator=g),
    )
    y_spt = y_qry = torch.arange(5).repeat(n_tasks, 1)
    net.train()
    n_inner_iter = 5
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
    meta_opt.zero_grad()
    qry_losses = []
    for i in range(n_tasks):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(n_inner_iter):
                spt_logits = fnet(x_spt[i])
                spt_loss = nn.functional.cross_entropy(spt_logits, y_spt[i])
                diffopt.step(spt_loss)
            qry_logits = fnet(x_qry[i])
            qry_loss = nn.functional.cross_entropy(qry_logits, y_qry[i])
            qry_losses.append(qry_loss.detach())
            qry_loss.backward()
    grads = flat(p.grad for p in net.parameters())
    meta_opt.step()
    return net, grads, torch.stack(qry_losses), (x_spt, y_spt, x_qry, y_qry)


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


# --- against the real higher 0.2.1 ----------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "convnet"])
@pytest.mark.parametrize("copy_initial_weights", [False, True])
def test_meta_gradients_and_every_time_step_match_higher(model, copy_initial_weights):
    higher = real_higher()
    kw = (
        dict(make=mlp)
        if model == "mlp"
        else dict(make=convnet, support=IMAGES_SUPPORT, query=IMAGES_QUERY)
    )
    runs = {}
    for name, lib in (("compat", compat), ("higher", higher)):
        with quiet():
            m, fmodel, meta = unroll(lib, copy_initial_weights=copy_initial_weights, **kw)
            grads = [
                torch.autograd.grad(meta, list(fmodel.parameters(time=t)), retain_graph=True)
                for t in range(STEPS + 1)
            ]
            meta.backward()
        model_grads = [p.grad for p in m.parameters()]
        runs[name] = (fmodel, grads, model_grads, m)
    (cf, cg, cm, cmodel), (hf, hg, hm, hmodel) = runs["compat"], runs["higher"]
    for t in range(STEPS + 1):
        assert (flat(cf.parameters(time=t)) - flat(hf.parameters(time=t))).abs().max() < 1e-14
        assert (flat(cg[t]) - flat(hg[t])).abs().max() < 1e-14, t
    if copy_initial_weights:
        assert all(g is None for g in cm + hm)
    else:
        assert (flat(cm) - flat(hm)).abs().max() < 1e-14
    for (name, b), hb in zip(cmodel.named_buffers(), hmodel.buffers()):
        assert torch.equal(b, hb), name  # neither touches the module's running statistics


def test_learnable_override_gradients_match_higher():
    higher = real_higher()
    results = []
    for lib in (compat, higher):
        lrs = [torch.tensor(0.2, requires_grad=True), torch.tensor(0.05, requires_grad=True)]
        momentum = torch.tensor(0.9, requires_grad=True)
        dampening = torch.tensor(0.1, requires_grad=True)
        override = {"lr": lrs, "momentum": [momentum], "dampening": [dampening]}
        with quiet():
            _, fmodel, meta = unroll(lib, make_opt=two_groups, override=override)
            meta.backward()
        results.append(
            (
                flat(fmodel.parameters()),
                flat([*lrs, momentum, dampening]),
                torch.stack([lrs[0].grad, lrs[1].grad, momentum.grad, dampening.grad]),
            )
        )
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-14


@pytest.mark.parametrize("name", ["Adagrad", "Adadelta", "Adamax", "ASGD", "RMSprop", "Rprop"])
def test_other_optimizers_match_higher_where_higher_is_right(name):
    """On this problem higher's Adagrad, Adadelta, Adamax, ASGD, RMSprop and Rprop give
    torch.optim's steps and the compat layer's meta-gradients (RMSprop despite its warning)."""
    higher = real_higher()

    def make_opt(net):
        return getattr(torch.optim, name)(net.parameters(), lr=0.05)

    grads = []
    for lib in (compat, higher):
        with quiet():
            model, fmodel, meta = unroll(lib, make_opt=make_opt, copy_initial_weights=False)
            meta.backward()
        grads.append(flat(p.grad for p in model.parameters()))
        _, _, trajectory = torch_unroll(mlp, make_opt)
        assert (flat(fmodel.parameters()) - trajectory[-1]).abs().max() < 1e-14
    assert (grads[0] - grads[1]).abs().max() < 1e-13


def test_explicit_params_style_matches_higher():
    higher = real_higher()
    with quiet():
        want = functional_unroll(higher)
    for a, b in zip(functional_unroll(compat), want):
        assert (a - b).abs().max() < 1e-14


def test_track_higher_grads_false_matches_higher():
    higher = real_higher()
    results = []
    for lib in (compat, higher):
        with quiet():
            model, fmodel, meta = unroll(lib, copy_initial_weights=False, track_higher_grads=False)
            final = list(fmodel.parameters())
            grads = torch.autograd.grad(meta, final, retain_graph=True)
            meta.backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad_fn is None for p in final)
        results.append((flat(final), flat(grads)))
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-14


def test_higher_adam_departs_from_torch_optim_and_the_compat_layer_does_not():
    """higher 0.2.1 adds ``eps`` to ``sqrt(v_t)`` before the bias correction of ``v_t``:
    its Adam is not ``torch.optim.Adam`` (a 1e-2 difference here, at ``eps=1e-3``)."""
    higher = real_higher()

    def make_opt(net):
        return torch.optim.Adam(net.parameters(), lr=0.05, eps=1e-3)

    _, _, trajectory = torch_unroll(mlp, make_opt, steps=5)
    drift = {}
    for name, lib in (("compat", compat), ("higher", higher)):
        _, fmodel, _ = unroll(lib, make_opt=make_opt, steps=5)
        drift[name] = (flat(fmodel.parameters()) - trajectory[-1]).abs().max().item()
    assert drift["compat"] < 1e-14
    assert drift["higher"] > 1e-3


def test_higher_rmsprop_warns_and_the_compat_layer_does_not():
    higher = real_higher()
    model = mlp()
    with pytest.warns(UserWarning, match="gradient correctness"):
        higher.optim.get_diff_optim(torch.optim.RMSprop(model.parameters()), model.parameters())
    compat.optim.get_diff_optim(torch.optim.RMSprop(model.parameters()), model.parameters())


def test_higher_examples_give_the_same_numbers_with_either_import():
    higher = real_higher()
    with quiet():
        _, grads_h, losses_h, _ = higher_maml_omniglot_train(higher)
    _, grads_c, losses_c, _ = higher_maml_omniglot_train(compat)
    assert (grads_c - grads_h).abs().max() < 1e-14
    assert (losses_c - losses_h).abs().max() < 1e-14
    # the README example uses Adam: the same weights, up to higher's Adam drift (eps=1e-8); the
    # meta-gradients differ more (5.6e-4 here), and the compat layer's match finite differences
    # of torch.optim.Adam (test_higher_readme_example_runs_with_the_compat_import)
    with quiet():
        _, _, fmodel_h, _ = higher_readme_example(higher)
    _, _, fmodel_c, _ = higher_readme_example(compat)
    assert (flat(fmodel_c.parameters()) - flat(fmodel_h.parameters())).abs().max() < 1e-5


def test_parameters_unused_by_the_loss_match_higher():
    """higher skips a parameter whose gradient is None, as torch.optim does; so does compat."""
    higher = real_higher()

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x, heads="ab"):
            return sum(getattr(self, h)(x) for h in heads)

    heads = ["ab", "a", "ab", "b", "ab"]
    results = []
    for lib in (compat, higher):
        model = TwoHeads()
        with (
            quiet(),
            lib.innerloop_ctx(
                model, torch.optim.Adagrad(model.parameters(), lr=0.1, lr_decay=0.1)
            ) as (f, d),
        ):
            for h in heads:
                d.step(mse(f(SUPPORT[0], h), SUPPORT[1]))
            meta = mse(f(QUERY[0]), QUERY[1])
            results.append(flat(torch.autograd.grad(meta, list(f.parameters(time=0)))))
    assert (results[0] - results[1]).abs().max() < 1e-14
