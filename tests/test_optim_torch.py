"""Every registered optimizer follows its ``torch.optim`` namesake's trajectory (the oracle)."""

from __future__ import annotations

import pytest
import torch
from _registry import CASE_CONFIGS, REGISTRY, loss_fn
from hypothesis import given
from hypothesis import strategies as st

import metafunc


@pytest.fixture
def float64_default():
    # torch.optim keeps some scalar state (ASGD's eta and mu, NAdam's mu_product, step counts) in
    # the *default* dtype; float64 there makes the oracle exact to float64 round-off.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3
)


def _problem(shape_list, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    params = {
        f"p{i}": torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)
        for i, s in enumerate(shape_list)
    }
    coeffs = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(device, dtype)
        for k, v in params.items()
    }
    return params, coeffs


def _run_both(case, config, params, coeffs, steps):
    sign = -1.0 if config.get("maximize") else 1.0  # maximize a bounded-above objective

    def objective(p, c):
        return sign * loss_fn(p, c)

    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = case.theirs(list(theirs.values()), **config)
    opt = case.ours(**config)
    ours, state = dict(params), opt.init(params)
    for _ in range(steps):
        torch_opt.zero_grad()
        objective(theirs, coeffs).backward()
        torch_opt.step()
        grads = torch.func.grad(objective)(ours, coeffs)
        updates, state = opt.update(grads, state, ours)
        ours = metafunc.apply_updates(ours, updates)
        yield ours, {k: v.detach() for k, v in theirs.items()}, state


@pytest.mark.usefixtures("float64_default")
@given(
    case_config=st.sampled_from(CASE_CONFIGS),
    shape_list=shapes,
    seed=st.integers(0, 2**31 - 1),
)
def test_trajectory_matches_torch_optim_float64(case_config, shape_list, seed):
    case, index = case_config
    config = case.configs[index]
    params, coeffs = _problem(shape_list, seed, torch.float64, "cpu")
    for step, (ours, theirs, _) in enumerate(_run_both(case, config, params, coeffs, 50)):
        for k in params:
            torch.testing.assert_close(
                ours[k], theirs[k], rtol=1e-10, atol=1e-12, msg=f"{case.name} step {step} {k}"
            )


@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_trajectory_matches_torch_optim_float32(case, device):
    params, coeffs = _problem([(3, 2), (4,)], 0, torch.float32, device)
    config = case.configs[-1]
    *_, (ours, theirs, _) = _run_both(case, config, params, coeffs, 50)
    for k in params:
        assert ours[k].dtype == torch.float32
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("float64_default")
def test_asgd_average_matches_torch_ax():
    case = next(c for c in REGISTRY if c.name == "asgd")
    params, coeffs = _problem([(5,)], 3, torch.float64, "cpu")
    config = case.configs[1]  # t0=10: averaging starts within the run
    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_opt = case.theirs(list(theirs.values()), **config)
    ours_run = list(_run_both(case, config, params, coeffs, 30))
    for _ in range(30):
        torch_opt.zero_grad()
        loss_fn(theirs, coeffs).backward()
        torch_opt.step()
    ax = torch_opt.state[theirs["p0"]]["ax"]
    torch.testing.assert_close(ours_run[-1][2][-1].ax["p0"], ax, rtol=1e-10, atol=1e-12)


IMPLEMENTATION_FLAGS = {"foreach", "fused", "capturable", "differentiable", "params"}


@pytest.mark.parametrize("case", REGISTRY, ids=repr)
def test_same_hyperparameter_names_and_defaults_as_torch_optim(case):
    import inspect

    ours = inspect.signature(case.ours).parameters
    theirs = {
        k: v
        for k, v in inspect.signature(case.theirs.__init__).parameters.items()
        if k not in IMPLEMENTATION_FLAGS and k != "self"
    }
    assert set(ours) == set(theirs)
    for name, param in theirs.items():
        ours_default, theirs_default = ours[name].default, param.default
        if isinstance(theirs_default, tuple):
            assert tuple(map(float, ours_default)) == tuple(map(float, theirs_default)), name
        else:
            assert ours_default == theirs_default, name
