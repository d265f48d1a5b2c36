"""Tree maths (metafunc._tree_math) against per-leaf loops, flattened vectors and closed forms."""

from __future__ import annotations

import pytest
import torch

import metafunc
from metafunc import _tree_math as tm

D = torch.float64


def _tree(seed: int, dtype: torch.dtype = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=g, dtype=dtype),
        "b": torch.randn(2, generator=g, dtype=dtype),
        "s": torch.randn((), generator=g, dtype=dtype),
    }


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def test_detach_cuts_the_graph_and_passes_other_leaves_through():
    w = torch.ones(2, dtype=D, requires_grad=True)
    out = tm.detach({"w": w * 2, "n": 3, "none": None})
    assert not out["w"].requires_grad and out["n"] == 3 and out["none"] is None
    torch.testing.assert_close(out["w"], torch.full((2,), 2.0, dtype=D))


def test_stop_gradient_is_public_and_refuses_a_generator():
    assert metafunc.stop_gradient is tm.stop_gradient
    with pytest.raises(TypeError, match=r"stop_gradient\(tree\): expected a pytree"):
        metafunc.stop_gradient(torch.nn.Linear(2, 1).parameters())


def test_elementwise_operations_match_a_per_key_loop():
    a, b = _tree(0), _tree(1)
    alpha = 0.3
    cases = {
        "zeros_like": (tm.zeros_like(a), {k: torch.zeros_like(a[k]) for k in a}),
        "add": (tm.add(a, b), {k: a[k] + b[k] for k in a}),
        "sub": (tm.sub(a, b), {k: a[k] - b[k] for k in a}),
        "scale": (tm.scale(alpha, a), {k: alpha * a[k] for k in a}),
        "axpy": (tm.axpy(alpha, a, b), {k: alpha * a[k] + b[k] for k in a}),
    }
    for name, (got, want) in cases.items():
        assert got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-15, atol=1e-15, msg=name)


def test_axpy_with_a_tensor_alpha_keeps_the_leaf_dtype_and_differentiates_alpha():
    x, y = _tree(2, torch.float32), _tree(3, torch.float32)
    alpha = torch.tensor(0.7, dtype=D, requires_grad=True)
    out = tm.axpy(alpha, x, y)
    assert all(v.dtype == torch.float32 for v in out.values())
    (g,) = torch.autograd.grad(sum(v.sum() for v in out.values()), alpha)
    # d/d alpha sum(alpha x + y) = sum(x), summed in float64 as a closed form
    torch.testing.assert_close(g, _flat(x).to(D).sum(), rtol=1e-6, atol=1e-6)


def test_vdot_and_norm_match_the_flattened_vectors():
    a, b = _tree(4), _tree(5)
    torch.testing.assert_close(tm.vdot(a, b), torch.dot(_flat(a), _flat(b)))
    torch.testing.assert_close(tm.norm(a), torch.linalg.vector_norm(_flat(a)))
    single = {"x": torch.tensor([3.0, 4.0], dtype=D)}
    torch.testing.assert_close(tm.vdot(single, single), torch.tensor(25.0, dtype=D))
    torch.testing.assert_close(tm.norm(single), torch.tensor(5.0, dtype=D))


def test_vdot_pairs_leaves_by_key_and_refuses_other_structures():
    a = {"u": torch.tensor([1.0, 2.0], dtype=D), "v": torch.tensor(3.0, dtype=D)}
    reordered = {"v": torch.tensor(2.0, dtype=D), "u": torch.tensor([3.0, 4.0], dtype=D)}
    torch.testing.assert_close(tm.vdot(a, reordered), torch.tensor(17.0, dtype=D))
    with pytest.raises(ValueError):
        tm.vdot(a, {"u": a["u"], "w": a["v"]})


def test_grad_or_zeros_is_the_closed_form_gradient_with_zeros_for_unused_leaves():
    p = _tree(6)
    p["unused"] = torch.ones(4, dtype=D)
    seen = []
    grads, value = tm.grad_or_zeros(
        lambda q: (q["w"].sin().sum() * q["s"] + (q["b"] ** 3).sum(), "aux"),
        p,
        has_aux=True,
        on_grads=seen.append,
    )
    assert value[1] == "aux"
    torch.testing.assert_close(value[0], p["w"].sin().sum() * p["s"] + (p["b"] ** 3).sum())
    torch.testing.assert_close(grads["w"], p["w"].cos() * p["s"])
    torch.testing.assert_close(grads["s"], p["w"].sin().sum())
    torch.testing.assert_close(grads["b"], 3 * p["b"] ** 2)
    torch.testing.assert_close(grads["unused"], torch.zeros(4, dtype=D))
    (raw,) = seen  # in tree_leaves order: optree sorts dict keys
    assert [g is None for g in raw] == [k == "unused" for k in sorted(p)]
    assert not any(g.requires_grad for g in grads.values())


def test_grad_or_zeros_of_a_constant_is_zero():
    grads, value = tm.grad_or_zeros(lambda q: torch.tensor(2.0, dtype=D), _tree(7))
    assert value.item() == 2.0
    assert all(not g.any() for g in grads.values())


def test_grad_or_zeros_with_create_graph_gives_the_second_derivative():
    x = torch.tensor([0.5, -1.5], dtype=D, requires_grad=True)
    grads, _ = tm.grad_or_zeros(lambda q: (q["x"] ** 3).sum(), {"x": x}, create_graph=True)
    (second,) = torch.autograd.grad(grads["x"].sum(), x)
    torch.testing.assert_close(second, 6 * x.detach())  # d/dx 3x^2


def test_grad_or_zeros_without_create_graph_leaves_the_inputs_untouched():
    x = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    grads, _ = tm.grad_or_zeros(lambda q: (q["x"] ** 2).sum(), {"x": x})
    assert x.grad is None and not grads["x"].requires_grad
    torch.testing.assert_close(grads["x"], 2 * x.detach())
