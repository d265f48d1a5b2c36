"""``metafunc.compat.higher``: a differentiable optimizer starts from the state of the
``torch.optim`` optimizer it wraps (issue 14, cause 1).

The oracle is ``torch.optim`` itself, continuing from the same state: a deep copy of the warmed-up
model and optimizer takes the same steps. Meta-gradients through the copied state are checked by
central finite differences of that ``torch.optim`` continuation.
"""

from __future__ import annotations

import copy

import optree
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
)
from torch import nn

import metafunc.compat.higher as compat

WARM_UP, STEPS_AFTER = 4, 10


def torch_steps(net, opt, steps, support=SUPPORT):
    """``steps`` plain ``torch.optim`` steps; the flat params after each."""
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        mse(net(support[0]), support[1]).backward()
        opt.step()
        trajectory.append(flat(net.parameters()))
    return trajectory


def grouped(name, kw):
    """``torch.optim.<name>`` with two parameter groups whose hyperparameters differ."""
    own = {"lr": kw["lr"] * 0.5}
    own.update({"etas": (0.3, 1.1)} if name == "Rprop" else {"weight_decay": 0.05})

    def make_opt(net):
        groups = [{"params": net[0].parameters(), **own}, {"params": net[2].parameters()}]
        return getattr(torch.optim, name)(groups, **kw)

    return make_opt


def warmed_up(make_opt, steps=WARM_UP, make=mlp):
    net = make()
    opt = make_opt(net)
    torch_steps(net, opt, steps)
    return net, opt


def close(a, b, rel=1e-13):
    """Equal to float64 round-off, relative to the size of the weights (maximize grows them)."""
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


@pytest.mark.parametrize(
    ("name", "kw"), OPTIMIZERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZERS)]
)
def test_a_stepped_optimizer_is_continued_like_torch_optim(name, kw):
    """After 4 torch.optim steps, 10 differentiable steps with two groups of different
    hyperparameters are the steps torch.optim takes next (was: ValueError 'already has state')."""
    net, opt = warmed_up(grouped(name, kw))
    ref_net, ref_opt = copy.deepcopy((net, opt))
    want = torch_steps(ref_net, ref_opt, STEPS_AFTER)
    with compat.innerloop_ctx(net, opt) as (fmodel, diffopt):
        for t in range(STEPS_AFTER):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
            assert close(flat(fmodel.parameters()), want[t]), (name, t)


@pytest.mark.parametrize("entry", ["innerloop_ctx", "get_diff_optim", "DifferentiableOptimizer"])
def test_every_entry_point_copies_the_state(entry):
    net, opt = warmed_up(lambda n: torch.optim.Adam(n.parameters(), lr=0.05, amsgrad=True))
    want = torch_steps(*copy.deepcopy((net, opt)), STEPS_AFTER)
    fmodel = compat.monkeypatch(net)
    if entry == "innerloop_ctx":
        with compat.innerloop_ctx(net, opt) as (fmodel, diffopt):
            pass
    elif entry == "get_diff_optim":
        diffopt = compat.get_diff_optim(opt, net.parameters(), fmodel=fmodel)
    else:
        diffopt = compat.optim.DifferentiableAdam(opt, net.parameters(), fmodel=fmodel)
    for t in range(STEPS_AFTER):
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
        assert close(flat(fmodel.parameters()), want[t]), t


def test_several_diff_optims_from_one_optimizer_share_no_state_with_it_or_each_other():
    """Two differentiable copies made at step 3 and one at step 5 of the same torch.optim.Adam,
    stepped in turn with torch.optim in between: each follows torch.optim from its own start."""
    net, opt = warmed_up(grouped("Adam", dict(lr=0.05, betas=(0.8, 0.9))), steps=3)
    from_3 = torch_steps(*copy.deepcopy((net, opt)), STEPS_AFTER)
    first = [compat.monkeypatch(net) for _ in range(2)]
    first_opts = [compat.get_diff_optim(opt, net.parameters(), fmodel=f) for f in first]
    before = copy.deepcopy(first_opts[0].state)
    torch_steps(net, opt, 2)  # torch.optim moves on: the copies must not
    assert all(
        torch.equal(a, b)
        for s, s0 in zip(first_opts[0].state.values(), before.values())
        for a, b in zip(_leaves(s), _leaves(s0))
    )
    from_5 = torch_steps(*copy.deepcopy((net, opt)), STEPS_AFTER)
    late = compat.monkeypatch(net)
    late_opt = compat.get_diff_optim(opt, net.parameters(), fmodel=late)
    torch_state = copy.deepcopy(opt.state_dict()["state"])
    for t in range(STEPS_AFTER):
        for fmodel, diffopt, want in [
            *zip(first, first_opts, [from_3] * 2),
            (late, late_opt, from_5),
        ]:
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
            assert close(flat(fmodel.parameters()), want[t]), t
    after = opt.state_dict()["state"]  # ... and the differentiable steps leave torch.optim's alone
    assert all(
        torch.equal(torch_state[i][k], after[i][k]) for i in torch_state for k in torch_state[i]
    )


def _leaves(state):
    return [x for x in optree.tree_leaves(state) if isinstance(x, torch.Tensor)]


def test_a_parameter_without_state_starts_fresh_as_in_torch_optim():
    """A head unused during the warm-up has no torch.optim state: its first differentiable step
    is a first step (SGD's b_1 = g_1, Adam's step 1), the other parameters continue."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)

        def forward(self, x, heads="ab"):
            return sum(getattr(self, h)(x) for h in heads)

    for make_opt in (
        lambda n: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9),
        lambda n: torch.optim.Adam(n.parameters(), lr=0.05),
    ):
        net = TwoHeads()
        opt = make_opt(net)
        for _ in range(3):
            opt.zero_grad()
            mse(net(SUPPORT[0], "a"), SUPPORT[1]).backward()
            opt.step()
        assert net.b.weight not in opt.state
        ref_net, ref_opt = copy.deepcopy((net, opt))
        with compat.innerloop_ctx(net, opt) as (fmodel, diffopt):
            for _ in range(4):
                diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
                ref_opt.zero_grad()
                mse(ref_net(SUPPORT[0]), SUPPORT[1]).backward()
                ref_opt.step()
                assert close(flat(fmodel.parameters()), flat(ref_net.parameters()))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_the_copied_state_has_torch_optims_values_dtype_and_device(device):
    """A float32 model (the default dtype here is float64): Adam's moments and step count are
    copied exactly, in float32 and on the device asked for, not aliased."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, amsgrad=True)
    for _ in range(3):
        opt.zero_grad()
        mse(net(SUPPORT[0].float()), SUPPORT[1].float()).backward()
        opt.step()
    diffopt = compat.get_diff_optim(opt, net.parameters(), device=device)
    for i, p in enumerate(net.parameters()):
        adam_state = diffopt.state[i][0]  # the chain's first transform: scale_by_adam
        torch_state = opt.state[p]
        assert int(adam_state.step) == int(torch_state["step"]) == 3
        for field, key in [("mu", "exp_avg"), ("nu", "exp_avg_sq"), ("nu_max", "max_exp_avg_sq")]:
            ours = getattr(adam_state, field)["p"]
            assert ours.dtype == torch.float32 and ours.device.type == "cpu"
            assert torch.equal(ours, torch_state[key])
            assert (
                ours.untyped_storage().data_ptr() != torch_state[key].untyped_storage().data_ptr()
            )


LEARNABLE_LR = [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01), 3),
    ("Adam", dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3), 5),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01), 5),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True), 5),
    ("NAdam", dict(lr=0.05), 5),
    ("Adadelta", dict(lr=1.0, rho=0.8), 5),
    ("Adamax", dict(lr=0.05), 5),
]


@pytest.mark.parametrize(("name", "kw", "points"), LEARNABLE_LR, ids=[c[0] for c in LEARNABLE_LR])
def test_meta_gradient_of_a_learnable_lr_through_the_copied_state_matches_finite_differences(
    name, kw, points
):
    """3 torch.optim steps, then 3 differentiable ones with a learnable lr: d(meta-loss)/d(lr)
    equals central differences of torch.optim continuing with lr +- h from the same state."""

    def make_opt(net):
        return getattr(torch.optim, name)(net.parameters(), **kw)

    net, opt = warmed_up(make_opt, steps=3)
    start = copy.deepcopy((net, opt))

    def oracle(v):
        ref_net, ref_opt = copy.deepcopy(start)
        for group in ref_opt.param_groups:
            group["lr"] = v.item()
        torch_steps(ref_net, ref_opt, 3)
        with torch.no_grad():
            return mse(ref_net(QUERY[0]), QUERY[1]).item()

    lr = torch.tensor(kw["lr"], requires_grad=True)
    with compat.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))
        mse(fmodel(QUERY[0]), QUERY[1]).backward()
    fd = finite_differences(oracle, torch.tensor([kw["lr"]]), points=points)
    assert abs(lr.grad.item() - fd.item()) < 1e-8 * max(1.0, abs(fd.item()))


def asgd(net):
    return torch.optim.ASGD(net.parameters(), lr=0.05, lambd=1e-3, alpha=0.5, t0=2)


def test_asgd_refuses_a_first_step_that_torch_optim_would_take_differently():
    """torch.optim.ASGD stores the eta of its next step; a learnable or changed lr cannot give
    that step here (metafunc computes eta from lr), so it is an error, not a different step."""
    net, opt = warmed_up(asgd)
    learnable = torch.tensor(0.05, requires_grad=True)
    with pytest.raises(ValueError, match=r"DifferentiableASGD\(other, \.\.\.\): parameter "):
        compat.get_diff_optim(opt, net.parameters(), override={"lr": [learnable]})
    with pytest.raises(ValueError, match=r"a learnable lr .* cannot change that step"):
        compat.get_diff_optim(opt, net.parameters(), override={"lr": [learnable]})
    with compat.innerloop_ctx(net, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match=r"stored eta=.* were changed after"):
            diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), override={"lr": [0.1]})
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]))  # the failed step changed nothing
        diffopt.step(mse(fmodel(SUPPORT[0]), SUPPORT[1]), override={"lr": [0.1]})  # later: fine
    opt.param_groups[0]["lr"] = 0.1  # changed in torch.optim itself after its last step
    with pytest.raises(ValueError, match=r"stored eta=.*give eta=.*Step the torch\.optim"):
        compat.get_diff_optim(opt, net.parameters())


def test_state_that_cannot_be_continued_is_a_clear_error():
    net, opt = warmed_up(lambda n: torch.optim.Adam(n.parameters(), lr=0.05))
    opt.param_groups[0]["amsgrad"] = True  # switched on after stepping: no max_exp_avg_sq
    with pytest.raises(ValueError, match=r"parameter '0\.weight' has no 'max_exp_avg_sq'"):
        with compat.innerloop_ctx(net, opt):
            pass

    class CountingSGD(torch.optim.SGD):
        """Keeps one more piece of state, which DifferentiableSGD would drop."""

        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["calls"] = self.state[p].get("calls", 0) + 1

    compat.register_optim(CountingSGD, compat.optim.DifferentiableSGD)
    try:
        net, opt = warmed_up(lambda n: CountingSGD(n.parameters(), lr=0.1, momentum=0.9))
        with pytest.raises(ValueError, match=r"has \['calls'\], which metafunc\.optim\.sgd does"):
            compat.get_diff_optim(opt, net.parameters())
    finally:
        del compat.optim._REGISTRY[CountingSGD]
