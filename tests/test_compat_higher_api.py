"""``metafunc.compat.higher``: every public name of higher 0.2.1, with higher's meaning (issue 14,
causes 2 and 3): ``utils``, ``patch.make_functional``, ``patch.buffer_sync``,
``optim.create_diff_optim``, ``get_trainable_opt_params``/``apply_trainable_opt_params``, and
differentiable optimizers written for higher (``_update``).

The names are written out here from higher 0.2.1's source, so this runs without higher; the test
against ``dir()`` of the real modules is in ``test_compat_higher_peer.py``.
"""

from __future__ import annotations

import collections
import copy
from typing import NamedTuple

import pytest
import torch
from test_compat_higher_common import (
    OPTIMIZERS,
    QUERY,
    SUPPORT,
    finite_differences,
    flat,
    float64_default,  # noqa: F401 (an autouse fixture)
    mlp,
    mse,
    torch_meta_loss,
    torch_unroll,
)
from torch import nn
from torch.func import functional_call

import metafunc.compat.higher as compat

# every public name of higher 0.2.1 (its __init__.py, optim.py, patch.py, utils.py), and the
# underscored helpers of higher.utils that user code imports
HIGHER_NAMES = {
    "": [
        "create_diff_optim",
        "get_diff_optim",
        "innerloop_ctx",
        "monkeypatch",
        "optim",
        "patch",
        "register_optim",
        "utils",
    ],
    "optim": [
        "DifferentiableASGD",
        "DifferentiableAdadelta",
        "DifferentiableAdagrad",
        "DifferentiableAdam",
        "DifferentiableAdamax",
        "DifferentiableOptimizer",
        "DifferentiableRMSprop",
        "DifferentiableRprop",
        "DifferentiableSGD",
        "apply_trainable_opt_params",
        "create_diff_optim",
        "get_diff_optim",
        "get_trainable_opt_params",
        "register_optim",
    ],
    "patch": ["buffer_sync", "make_functional", "monkeypatch", "_MonkeyPatchBase"],
    "utils": [
        "flatten",
        "get_func_params",
        "_copy_tensor",
        "_find_param_in_list",
        "_get_param_mapping",
        "_is_container",
        "_recursive_copy_and_cast",
        "_recursive_map",
    ],
}


@pytest.mark.parametrize("module", list(HIGHER_NAMES))
def test_every_public_name_of_higher_0_2_1_exists(module):
    namespace = getattr(compat, module) if module else compat
    missing = [name for name in HIGHER_NAMES[module] if not hasattr(namespace, name)]
    assert not missing, f"metafunc.compat.higher{'.' + module if module else ''}: {missing}"
    if module:
        assert getattr(compat, module).__name__ == f"metafunc.compat.higher.{module}"
    assert compat.create_diff_optim is compat.optim.create_diff_optim
    assert compat.monkeypatch is compat.patch.monkeypatch


# higher.utils
class Pair(NamedTuple):
    a: float
    b: float


def test_utils_containers_flatten_and_map_as_in_higher():
    nested = {"betas": (0.9, 0.999), "lr": [1e-3, {"x": 2}], "s": {3}}
    assert compat.utils.flatten(nested) == [0.9, 0.999, 1e-3, 2, 3]
    assert compat.utils.flatten(torch.ones(2)).__len__() == 1  # a tensor is one leaf
    doubled = compat.utils._recursive_map(nested, lambda x: 2 * x)
    assert doubled == {"betas": (1.8, 1.998), "lr": [2e-3, {"x": 4}], "s": {6}}
    assert type(doubled["betas"]) is tuple and type(doubled["lr"]) is list
    # containers higher's version fails on keep their type here
    assert compat.utils._recursive_map(Pair(1.0, 2.0), lambda x: -x) == Pair(-1.0, -2.0)
    default = collections.defaultdict(list, {"k": 1})
    mapped = compat.utils._recursive_map(default, lambda x: x + 1)
    assert mapped == {"k": 2} and mapped.default_factory is list
    assert [compat.utils._is_container(x) for x in ([], (), {}, set(), torch.ones(1), 1)] == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


def test_utils_copies_share_no_storage_and_keep_requires_grad():
    model = mlp()
    model[0].bias.requires_grad_(False)
    copies = compat.utils.get_func_params(model)
    for p, q in zip(model.parameters(), copies):
        assert torch.equal(p, q) and q.grad_fn is None and q.requires_grad == p.requires_grad
        assert q.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    shared = compat.utils.get_func_params(model, safe_copy=False)
    assert all(
        q.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        for p, q in zip(model.parameters(), shared)
    )
    state = {"step": torch.tensor(3.0), "bufs": [torch.ones(2, requires_grad=True)], "k": 0.5}
    copied = compat.utils._recursive_copy_and_cast(state, "cpu")
    assert copied["k"] == 0.5 and torch.equal(copied["step"], state["step"])
    assert copied["bufs"][0].requires_grad and copied["bufs"][0] is not state["bufs"][0]
    state["step"].add_(1)
    assert copied["step"].item() == 3.0
    with pytest.raises(TypeError, match=r"get_func_params\(module, \.\.\.\): expected a torch"):
        compat.utils.get_func_params([torch.ones(1)])


def test_utils_param_mapping_follows_parameters_order_with_tied_weights():
    shared = nn.Linear(2, 2)
    head = nn.Linear(2, 1)
    model = nn.Sequential(shared, nn.Tanh(), shared, head)
    params = list(model.parameters())
    assert len(params) == 4  # shared's weight and bias once
    seen: list[torch.Tensor] = []
    mapping = compat.utils._get_param_mapping(model, seen, [])
    assert mapping == [0, 1, 0, 1, 2, 3]
    assert all(a is b for a, b in zip(seen, params))
    assert compat.utils._find_param_in_list(head.bias, params) == 3
    assert compat.utils._find_param_in_list(head.bias.detach().clone(), params) is None  # by `is`


# patch.make_functional, patch.buffer_sync
def test_make_functional_runs_the_module_with_the_params_it_is_given():
    model = mlp()
    fmodule = compat.patch.make_functional(model)
    assert fmodule.fast_params is None
    with pytest.raises(ValueError, match=r"no fast weights yet; pass params="):
        fmodule(SUPPORT[0])
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    want = functional_call(model, dict(zip(names, params)), (SUPPORT[0],))
    assert torch.equal(fmodule(SUPPORT[0], params=params), want)
    assert torch.equal(fmodule(SUPPORT[0]), want)  # as in higher: the params given are kept
    assert all(a is b for a, b in zip(fmodule.parameters(), params))

    seen = []
    compat.patch.make_functional(model, encapsulator=lambda f, m: seen.append((f, m)))
    assert len(seen) == 1 and seen[0][1] is model
    with pytest.raises(TypeError, match=r"make_functional\(module, \.\.\.\): expected a torch"):
        compat.patch.make_functional(model.parameters())


def test_buffer_sync_copies_the_module_buffers_into_the_functional_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    fmodel = compat.monkeypatch(model)
    model(SUPPORT[0])  # the module's running statistics move on; the patched copies do not
    assert not torch.equal(fmodel[1].running_mean, model[1].running_mean)
    compat.patch.buffer_sync(model, fmodel)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        ours, theirs = getattr(fmodel[1], name), getattr(model[1], name)
        assert torch.equal(ours, theirs) and ours is not theirs
    model.eval()
    fmodel.eval()
    assert torch.equal(fmodel(QUERY[0]), model(QUERY[0]))
    model.train()
    model(SUPPORT[0])  # one-off: later changes to the module do not reach the copies
    assert not torch.equal(fmodel[1].running_mean, model[1].running_mean)
    with pytest.raises(ValueError, match=r"buffer_sync\(module, fmodule, \.\.\.\): the module's"):
        compat.patch.buffer_sync(mlp(), fmodel)
    with pytest.raises(TypeError, match="expected fmodule to be a functional model"):
        compat.patch.buffer_sync(model, model)


# optim.create_diff_optim
def test_create_diff_optim_steps_like_a_new_torch_optimizer():
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    _, _, want = torch_unroll(mlp, lambda net: torch.optim.SGD(net.parameters(), **kw))
    fmodel = compat.monkeypatch(mlp())
    diffopt = compat.optim.create_diff_optim(torch.optim.SGD, kw, fmodel=fmodel)
    for t in range(3):
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
        assert (flat(fmodel.parameters()) - want[t + 1]).abs().max() < 1e-14, t

    def groups(net):  # parameter groups with their own settings, in params=
        return [{"params": net[0].parameters(), "lr": 0.2}, {"params": net[2].parameters()}]

    _, _, want = torch_unroll(mlp, lambda net: torch.optim.Adam(groups(net), lr=0.05))
    for with_fmodel in (True, False):
        fmodel = compat.monkeypatch(mlp())
        params = list(fmodel.parameters())
        tensors = [{"params": params[:2], "lr": 0.2}, {"params": params[2:]}]
        diffopt = compat.create_diff_optim(
            torch.optim.Adam, {"lr": 0.05}, params=tensors, fmodel=fmodel if with_fmodel else None
        )
        for t in range(3):
            loss = mse(fmodel(SUPPORT[0], params=params), SUPPORT[1])
            params = diffopt.step(loss, params=None if with_fmodel else params)
            assert (flat(params) - want[t + 1]).abs().max() < 1e-14, (with_fmodel, t)


def test_create_diff_optim_errors():
    fmodel = compat.monkeypatch(mlp())
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"expected a torch\.optim\.Optimizer class.*get_diff_optim"
    ):
        compat.create_diff_optim(opt, fmodel=fmodel)
    with pytest.raises(ValueError, match=r"give params= .* or an fmodel"):
        compat.create_diff_optim(torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ValueError, match="no differentiable version of LBFGS is registered"):
        compat.create_diff_optim(torch.optim.LBFGS, fmodel=fmodel)
    with pytest.raises(ValueError, match="params has shapes"):
        compat.create_diff_optim(torch.optim.SGD, params=[torch.ones(2)], fmodel=fmodel)
    with pytest.raises(ValueError, match="not one of fmodel's current fast weights"):
        compat.create_diff_optim(
            torch.optim.SGD, params=[{"params": [torch.ones(2)]}], fmodel=fmodel
        )


# optim.get_trainable_opt_params, apply_trainable_opt_params
def _groups(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize(
    ("name", "kw"), OPTIMIZERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZERS)]
)
def test_trainable_opt_params_round_trip_is_exact(name, kw):
    def make_opt(net):
        groups = [
            {"params": net[0].parameters(), "lr": kw["lr"] / 3},
            {"params": net[2].parameters()},
        ]
        return getattr(torch.optim, name)(groups, **kw)

    opt = make_opt(mlp())
    before = copy.deepcopy(_groups(opt))
    override = compat.optim.get_trainable_opt_params(opt)
    assert "lr" in override and all(len(v) == 2 for v in override.values())
    for key, values in override.items():
        for group, value in zip(before, values):
            leaves = compat.utils.flatten(value)
            assert all(t.requires_grad and t.dtype == torch.float64 for t in leaves), key
            assert [t.item() for t in leaves] == compat.utils.flatten(group[key]), key
            assert not isinstance(group[key], bool), key  # switches are not learnable
    compat.optim.apply_trainable_opt_params(opt, override)
    after = _groups(opt)
    assert after == before  # values and types (an int stays an int)
    assert [type(v) for g in after for v in g.values()] == [
        type(v) for g in before for v in g.values()
    ]
    # and the override is what innerloop_ctx takes
    with compat.innerloop_ctx(mlp(), opt, override=override) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))


def test_learned_hyperparameters_are_written_back():
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)  # momentum: the int 0
    override = compat.optim.get_trainable_opt_params(opt)
    with torch.no_grad():
        override["lr"][0].add_(0.0123)
        override["momentum"][0].add_(0.25)
    compat.optim.apply_trainable_opt_params(opt, override)
    group = opt.param_groups[0]
    assert group["lr"] == (torch.tensor(0.1, dtype=torch.float64) + 0.0123).item()
    assert group["momentum"] == 0.25  # higher 0.2.1 would truncate it to int(0.25) == 0
    adam = torch.optim.Adam(mlp().parameters(), betas=(0.8, 0.9))
    compat.optim.apply_trainable_opt_params(adam, {"betas": [(torch.tensor(0.7), 0.95)]})
    assert adam.param_groups[0]["betas"] == (0.7, 0.95)
    lr = torch.tensor(0.1)
    tensor_lr = torch.optim.SGD(mlp().parameters(), lr=lr)
    compat.optim.apply_trainable_opt_params(tensor_lr, {"lr": [torch.tensor(0.3)]})
    assert tensor_lr.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.3)


def test_apply_trainable_opt_params_checks_everything_before_writing():
    opt = torch.optim.SGD(
        [{"params": mlp().parameters()}, {"params": [torch.ones(1, requires_grad=True)]}], lr=0.1
    )
    call = r"apply_trainable_opt_params\(opt, override\): "
    with pytest.raises(ValueError, match=call + r"override\['lr'\] must be a list .* got 3 values"):
        compat.optim.apply_trainable_opt_params(opt, {"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=call + r"parameter group 0 has no hyperparameter 'lrr'"):
        compat.optim.apply_trainable_opt_params(opt, {"lr": [0.5], "lrr": [0.1]})
    assert opt.param_groups[0]["lr"] == 0.1  # nothing written
    with pytest.raises(ValueError, match=r"is 0\.5, but the group holds a bool"):
        compat.optim.apply_trainable_opt_params(opt, {"nesterov": [torch.tensor(0.5)]})
    with pytest.raises(ValueError, match=r"'foreach'.* holds None"):
        compat.optim.apply_trainable_opt_params(opt, {"foreach": [1.0]})
    with pytest.raises(TypeError, match=call + "expected override to be a dict"):
        compat.optim.apply_trainable_opt_params(opt, [0.1])


def test_trainable_opt_params_meta_gradient_matches_finite_differences():
    """higher's pattern for learning the inner optimizer's hyperparameters, unchanged."""

    def make_opt(net):
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    model = mlp()
    opt = make_opt(model)
    override = compat.optim.get_trainable_opt_params(opt)
    with compat.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
        mse(fmodel(QUERY[0]), QUERY[1]).backward()
    base = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "dampening": 0.0}
    for key, value in base.items():
        fd = finite_differences(
            lambda v, key=key: torch_meta_loss(mlp, make_opt, hyper={**base, key: v.item()}),
            torch.tensor([value]),
        )
        assert abs(override[key][0].grad.item() - fd.item()) < 1e-8, key


# a differentiable optimizer written for higher (higher's _update protocol)
def momentum_sgd_for(lib):
    """The user code of a custom differentiable optimizer, as written for higher."""

    class DifferentiableMomentumSGD(lib.optim.DifferentiableOptimizer):
        def _update(self, grouped_grads, **kwargs):
            for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
                for j, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is None:
                        continue
                    state = self.state[gi][j]
                    buf = state.get("momentum_buffer")
                    buf = g if buf is None else buf * group["momentum"] + g
                    state["momentum_buffer"] = buf
                    group["params"][j] = p - group["lr"] * buf

    return DifferentiableMomentumSGD


class MySGD(torch.optim.SGD):
    pass


def test_a_differentiable_optimizer_written_for_higher_runs_with_its_state():
    compat.register_optim(MySGD, momentum_sgd_for(compat))
    try:
        net = mlp()
        groups = [{"params": net[0].parameters(), "lr": 0.2}, {"params": net[2].parameters()}]
        opt = MySGD(groups, lr=0.05, momentum=0.9)
        for _ in range(2):  # warm-up: the momentum buffers are continued
            opt.zero_grad()
            mse(net(SUPPORT[0]), SUPPORT[1]).backward()
            opt.step()
        ref_net, ref_opt = copy.deepcopy((net, opt))
        lr = torch.tensor(0.05, requires_grad=True)
        with compat.innerloop_ctx(net, opt, override={"lr": [0.2, lr]}) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
                ref_opt.zero_grad()
                mse(ref_net(SUPPORT[0]), SUPPORT[1]).backward()
                ref_opt.step()
                assert (flat(fmodel.parameters()) - flat(ref_net.parameters())).abs().max() < 1e-14
            mse(fmodel(QUERY[0]), QUERY[1]).backward()
        assert lr.grad is not None and lr.grad.item() != 0
        assert "momentum_buffer" in opt.state[net[0].weight]  # torch.optim's own state is kept
        with pytest.raises(TypeError, match=r"override\['lr'\] must be a list"):
            compat.get_diff_optim(opt, net.parameters(), override={"lr": 0.1})
    finally:
        del compat.optim._REGISTRY[MySGD]
