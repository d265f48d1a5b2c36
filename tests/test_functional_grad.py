"""Gradients through a :class:`metafunc.FunctionalModel`, and ``torch.func.vmap`` over its params.

``torch.func.grad`` equals ``backward`` for every layer kind; frozen params get no gradient but are
used; meta-gradients (also through an inner step) land on the module's parameters; a batch of
params vmaps like a loop over them, with per-task gradients, and batched shapes get a hint.

Every numerical check compares against the module's own ``forward``/``backward`` (run on a deep
copy), in float64, exactly or to 1e-12.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _functional_helpers import (
    CASE_IDS,
    CASES,
    DTYPE,
    MODES,
    Case,
    _x,
    assert_close,
    assert_dicts_close,
    assert_dicts_equal,
    assert_unchanged,
    loss_of,
    mlp,
    module_grads,
    randn,
    randomize_,
    small_mlp,
    snapshot,
)

from metafunc import FunctionalModel, functionalize


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_func_grad_matches_backward(case: Case, training: bool, device: str):
    module, x = case.make(device)
    module.train(training)
    fm = functionalize(module)
    before = snapshot(module)

    torch.manual_seed(99)
    grads = torch.func.grad(lambda p: loss_of(fm(p, x)))(fm.params)
    expected = module_grads(module, x, seed=99)

    assert grads.keys() == fm.params.keys()
    assert_dicts_close(grads, expected)
    assert any(g.abs().sum() > 0 for g in grads.values())
    # torch.func.grad does not populate .grad and changes nothing.
    assert all(p.grad is None for p in module.parameters())
    assert_unchanged(module, before)
    # The model is still usable after the transform.
    assert_dicts_equal(fm.to_module().state_dict(), module.state_dict())
    assert fm.eval().training is False


def test_frozen_params_get_no_gradient_but_are_used(device: str):
    module, x = CASES[CASE_IDS.index("frozen_param")].make(device)
    fm = functionalize(module)
    assert "0.weight" not in fm.params
    assert fm.frozen["0.weight"] is module[0].weight
    assert fm.trainable["0.weight"] is False

    grads = torch.func.grad(lambda p: loss_of(fm(p, x)))(fm.params)
    assert "0.weight" not in grads
    assert grads.keys() == {"0.bias", "2.weight", "2.bias"}

    # The output depends on the frozen value: fm sees in-place changes to the module's tensor.
    out_before = fm(fm.params, x)
    with torch.no_grad():
        module[0].weight.mul_(2.0)
    out_after = fm(fm.params, x)
    assert not torch.equal(out_before, out_after)
    assert_close(out_after, module(x))

    # A frozen name may be passed in params: it overrides the stored value for that call.
    w = randn(torch.Generator().manual_seed(3), 5, 3, device=device)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        reference[0].weight.copy_(w)
    assert_close(fm({**fm.params, "0.weight": w}, x), reference(x))
    assert_close(fm(fm.params, x), module(x))  # stored frozen value untouched by the override
    g = torch.func.grad(lambda p: loss_of(fm(p, x)))({**fm.params, "0.weight": w})
    assert g.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_meta_gradient_lands_on_module(device: str):
    module, x = CASES[CASE_IDS.index("batchnorm1d")].make(device)
    fm = functionalize(module)
    expected = module_grads(module, x)
    loss = loss_of(fm(fm.params, x))
    loss.backward()
    for k, p in module.named_parameters():
        assert p.grad is not None, k
        assert_close(p.grad, expected[k])


def test_meta_gradient_through_inner_step_lands_on_module(device: str):
    """MAML: one differentiable inner SGD step, outer loss backpropagated to the module."""
    module = small_mlp(device)
    gen = torch.Generator().manual_seed(4)
    xs, ys = randn(gen, 5, 3, device=device), randn(gen, 5, 2, device=device)
    xq, yq = randn(gen, 5, 3, device=device), randn(gen, 5, 2, device=device)
    fm = functionalize(module)

    def outer(params: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = torch.func.grad(lambda p: (fm(p, xs) - ys).square().sum())(params)
        adapted = {k: params[k] - 0.1 * inner[k] for k in params}
        return (fm(adapted, xq) - yq).square().sum()

    outer(fm.params).backward()
    expected = torch.func.grad(outer)({k: p.detach() for k, p in fm.params.items()})
    for k, p in module.named_parameters():
        assert_close(p.grad, expected[k])

    # The second-order gradient is right: numerical check on the float64 params.
    names = list(fm.params)
    leaves = [p.detach().clone().requires_grad_() for p in fm.params.values()]
    assert torch.autograd.gradcheck(lambda *ts: outer(dict(zip(names, ts))), leaves)


def _task_params(fm: FunctionalModel, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: randn(gen, *v.shape, device=v.device.type) for k, v in fm.params.items()}
        for _ in range(n)
    ]


def _stack(tasks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([t[k] for t in tasks]) for k in tasks[0]}


def test_vmap_over_params_matches_loop(device: str):
    net = randomize_(mlp([3, 5, 4, 2]), 0).to(device=device, dtype=DTYPE)
    fm = functionalize(net)
    tasks = _task_params(fm, 4, seed=2)
    x = randn(torch.Generator().manual_seed(3), 6, 3, device=device)

    out = torch.func.vmap(fm, in_dims=(0, None))(_stack(tasks), x)
    expected = torch.stack([fm(p, x) for p in tasks])
    assert out.shape == (4, 6, 2)
    assert_close(out, expected)
    # And each task equals the module holding that task's params.
    for i, p in enumerate(tasks):
        assert_close(out[i], fm.to_module(p)(x))


def test_vmap_over_params_and_inputs_and_per_task_grads(device: str):
    net = randomize_(mlp([3, 4, 2]), 0).to(device=device, dtype=DTYPE)
    fm = functionalize(net)
    tasks = _task_params(fm, 3, seed=5)
    xs = randn(torch.Generator().manual_seed(6), 3, 5, 3, device=device)

    out = torch.func.vmap(fm)(_stack(tasks), xs)
    assert_close(out, torch.stack([fm(p, xs[i]) for i, p in enumerate(tasks)]))

    grad_fn = torch.func.grad(lambda p, x: loss_of(fm(p, x)))
    grads = torch.func.vmap(grad_fn)(_stack(tasks), xs)
    expected = _stack([module_grads(fm.to_module(p), xs[i]) for i, p in enumerate(tasks)])
    assert_dicts_close(grads, expected)


def test_vmap_with_batched_shapes_gives_per_task_hint():
    fm = functionalize(small_mlp())
    stacked = _stack(_task_params(fm, 2, seed=0))
    with pytest.raises(ValueError, match=re.escape("to have shape (4, 3), got (2, 4, 3)")):
        fm(stacked, _x())
