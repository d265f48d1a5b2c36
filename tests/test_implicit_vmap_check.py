"""The convergence check of custom_root, custom_fixed_point and imaml when the differentiable
arguments are batched per task by ``vmap``.

A tensor batched by ``vmap`` reports ``requires_grad=False`` even when the tensor it batches
requires grad, and the check used to be skipped for such arguments: an unconverged solve under
``vmap`` gave no warning. Oracles: a per-task loop (``vmap_tasks(strategy="loop")``), whose
warnings carry the same message without the task's index; Newton's method and fixed-point
iteration in pure Python floats (which tasks fail), in float64.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch

import metafunc
import metafunc.optim as mo
from metafunc.implicit import (
    ImplicitSolveWarning,
    custom_fixed_point,
    custom_root,
    imaml,
    solve_cg,
)

D = torch.float64


def cubic(x, a):
    return a * x**3 - x - 2


def _newton_residual(a: float, steps: int, x: float = 1.0) -> float:
    """|a x^3 - x - 2| after ``steps`` Newton steps from ``x``, in Python floats."""
    for _ in range(steps):
        x = x - (a * x**3 - x - 2) / (3 * a * x**2 - 1)
    return abs(a * x**3 - x - 2)


def _newton(steps: int, **kwargs):
    @custom_root(cubic, **kwargs)
    def newton(x, a):
        for _ in range(steps):
            x = x - cubic(x, a) / (3 * a * x**2 - 1)
        return x

    return newton


def _messages(fn) -> list[str]:
    """The ImplicitSolveWarning messages that ``fn()`` emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, ImplicitSolveWarning)]


def _loop_messages(per_task, *args) -> list[str]:
    """The messages of a per-task loop, one backward for the whole meta-batch."""
    mapped = metafunc.vmap_tasks(per_task, strategy="loop")
    return _messages(lambda: mapped(*args).sum().backward())


def _with_task(message: str, where: str, tasks: str) -> str:
    """The loop's message with the vmapped path's task list inserted after ``where``."""
    assert message.count(where) == 1
    return message.replace(where, f"{where} ({tasks})")


AT_SOL = "at the returned solution"

# 3 Newton steps from x = 1: a = 1 stops at |F| = 0.054, above tol * |F(1)| = 0.002; a = 2 and
# a = 4 are within tol of their start |F(1)| = 1 (asserted in the tests).
A_VALUES = [2.0, 1.0, 4.0]


def _vmapped(name: str, per_task):
    """``a -> d(sum of per_task over tasks)/da``, the task axis mapped by ``name``."""
    if name == "grad(torch.func.vmap)":
        return torch.func.grad(lambda a: torch.func.vmap(per_task)(a).sum())

    mapped = (
        torch.func.vmap(per_task)
        if name == "torch.func.vmap"
        else metafunc.vmap_tasks(per_task, strategy="vmap")
    )

    def meta_grad(a):
        a = a.clone().requires_grad_()
        (da,) = torch.autograd.grad(mapped(a).sum(), a)
        return da

    return meta_grad


MAPPINGS = ["torch.func.vmap", "vmap_tasks", "grad(torch.func.vmap)"]


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_custom_root_with_batched_args_warns_under_vmap_as_the_loop_does(mapping, device):
    residuals = [_newton_residual(a, 3) for a in A_VALUES]
    assert residuals[1] > 1e-3 * 2 and residuals[0] < 1e-3 and residuals[2] < 1e-3
    init = torch.tensor(1.0, dtype=D, device=device)
    a = torch.tensor(A_VALUES, dtype=D, device=device)
    root = _newton(3)
    per_task = lambda a: root(init, a)

    (loop,) = _loop_messages(per_task, a.clone().requires_grad_())
    assert f"{residuals[1]:.3g} {AT_SOL}, above" in loop
    (mapped,) = _messages(lambda: _vmapped(mapping, per_task)(a))
    assert mapped == _with_task(loop, AT_SOL, "1 of 3 tasks: task 1")


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_custom_root_with_batched_args_raises_under_vmap_as_the_loop_does(mapping, device):
    init = torch.tensor(1.0, dtype=D, device=device)
    a = torch.tensor(A_VALUES, dtype=D, device=device)
    root = _newton(3, if_not_converged="raise")
    per_task = lambda a: root(init, a)
    with pytest.raises(RuntimeError) as loop:
        metafunc.vmap_tasks(per_task, strategy="loop")(a.clone().requires_grad_()).sum().backward()
    expected = _with_task(str(loop.value), AT_SOL, "1 of 3 tasks: task 1")
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        _vmapped(mapping, per_task)(a)


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_converged_and_ignored_solves_under_vmap_stay_silent(mapping, device):
    """Warnings are errors in this suite: a warning here fails the test."""
    init = torch.tensor(1.0, dtype=D, device=device)
    a = torch.tensor(A_VALUES, dtype=D, device=device)
    for root in (_newton(8), _newton(3, if_not_converged="ignore")):
        da = _vmapped(mapping, lambda a, root=root: root(init, a))(a)
        assert bool(torch.isfinite(da).all())
    # at the root, the implicit derivative -x^3 / (3 a x^2 - 1) (tests/test_implicit_root.py)
    converged = _newton(8)
    x = converged(torch.ones_like(a), a)  # elementwise: all tasks at once
    da = _vmapped(mapping, lambda a: converged(init, a))(a)
    torch.testing.assert_close(da, -(x**3) / (3 * a * x**2 - 1))


def test_several_failing_tasks_are_named_and_the_worst_one_shown(device):
    a_values = [1.0, 2.0, 0.9, 4.0]
    residuals = [_newton_residual(a, 3) for a in a_values]
    starts = [abs(a - 3) for a in a_values]  # |F(1)|
    fails = [r > 1e-3 * s for r, s in zip(residuals, starts)]
    assert fails == [True, False, True, False]
    worst = max((0, 2), key=lambda i: residuals[i])
    init = torch.tensor(1.0, dtype=D, device=device)
    a = torch.tensor(a_values, dtype=D, device=device)
    root = _newton(3)
    per_task = lambda a: root(init, a)

    loop = _loop_messages(per_task, a.clone().requires_grad_())
    assert len(loop) == 2
    (worst_loop,) = [m for m in loop if f"{residuals[worst]:.3g} {AT_SOL}" in m]
    (mapped,) = _messages(lambda: _vmapped("vmap_tasks", per_task)(a))
    tasks = f"2 of 4 tasks: tasks 0, 2; the numbers are task {worst}'s, the worst"
    assert mapped == _with_task(worst_loop, AT_SOL, tasks)


def test_ignore_under_vmap_evaluates_nothing_extra_and_warn_evaluates_f_at_init(device):
    """ "warn" evaluates F once more than "ignore" (at init), batched arguments or not."""
    counts = {"ignore": 0, "warn": 0}

    def counting(policy):
        def F(x, a):
            counts[policy] += 1
            return cubic(x, a)

        return F

    init = torch.tensor(1.0, dtype=D, device=device)
    for policy in counts:

        @custom_root(counting(policy), if_not_converged=policy)
        def newton(x, a):
            for _ in range(30):
                x = x - cubic(x, a) / (3 * a * x**2 - 1)
            return x

        _vmapped("vmap_tasks", lambda a: newton(init, a))(torch.tensor(A_VALUES, dtype=D))
    assert counts["ignore"] == counts["warn"] - 1


def test_custom_fixed_point_with_batched_args_warns_under_vmap_as_the_loop_does(device):
    """x = cos(a x) from 0 by 6 iterations: the contraction |a sin(a x)| is 0.05 at a = 0.3 (its
    residual falls 1e-3-fold) and 0.6 at a = 1 (it does not)."""

    def residual(a: float, steps: int = 6) -> float:
        x = 0.0
        for _ in range(steps):
            x = math.cos(a * x)
        return abs(math.cos(a * x) - x)

    assert residual(0.3) < 1e-3 * 1.0 < residual(1.0)  # |T(0) - 0| = 1
    T = lambda x, a: torch.cos(a * x)

    @custom_fixed_point(T)
    def iterate(x, a):
        for _ in range(6):
            x = T(x, a)
        return x

    init = torch.tensor(0.0, dtype=D, device=device)
    a = torch.tensor([0.3, 1.0], dtype=D, device=device)
    per_task = lambda a: iterate(init, a)
    (loop,) = _loop_messages(per_task, a.clone().requires_grad_())
    assert f"{residual(1.0):.3g} {AT_SOL}" in loop
    (mapped,) = _messages(lambda: _vmapped("torch.func.vmap", per_task)(a))
    assert mapped == _with_task(loop, AT_SOL, "1 of 2 tasks: task 1")


def _quadratic(p, batch):
    A, b = batch
    return 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]


def test_imaml_with_per_task_params_warns_under_vmap_as_the_loop_does(device):
    """Per-task initial params (the only differentiable argument, batched). 40 steps of lr 0.1,
    lam 1 from theta = 0 on diagonal quadratics: each coordinate's residual shrinks by |1 - 0.1
    (d + 1)| per step, so curvatures >= 2 converge 1e-3-fold and a curvature of 0.1 does not."""
    curvatures = [[3.0, 2.0, 4.0], [0.1, 0.2, 3.0]]
    b = torch.tensor([[1.0, -1.0, 0.5], [1.0, 1.0, -0.5]], dtype=D, device=device)
    A = torch.stack([torch.diag(torch.tensor(d, dtype=D, device=device)) for d in curvatures])
    # F_T = (1 - 0.1 (d + 1))^40 * F_0 per coordinate, with F_0 = -b at theta = 0
    shrink = [[abs(1 - 0.1 * (d + 1)) ** 40 for d in row] for row in curvatures]
    final = [
        math.sqrt(sum((s * float(bi)) ** 2 for s, bi in zip(row, b_row)))
        for row, b_row in zip(shrink, b.tolist())
    ]
    assert final[0] < 1e-3 * float(b[0].norm()) and final[1] > 1e-3 * float(b[1].norm())
    kwargs = {"lam": 1.0, "steps": 40, "solve": functools.partial(solve_cg, tol=1e-12)}

    def per_task(theta, A, b):
        return imaml(_quadratic, {"w": theta}, mo.sgd(lr=0.1), (A, b), **kwargs).params["w"].sum()

    theta = torch.zeros(2, 3, dtype=D, device=device)
    loop_fn = metafunc.vmap_tasks(per_task, strategy="loop")
    (loop,) = _messages(lambda: loop_fn(theta.clone().requires_grad_(), A, b).sum().backward())
    assert f"{final[1]:.3g} {AT_SOL}" in loop
    mapped_fn = metafunc.vmap_tasks(per_task, strategy="vmap")
    (mapped,) = _messages(lambda: mapped_fn(theta.clone().requires_grad_(), A, b).sum().backward())
    assert mapped == _with_task(loop, AT_SOL, "1 of 2 tasks: task 1")


def test_an_unconverged_linear_solve_under_vmap_names_its_task(device):
    """J = A per task; one CG step solves A = 2 I exactly but not A = diag(1, 3)."""
    A = torch.stack([torch.diag(torch.tensor(d, dtype=D)) for d in ([2.0, 2.0], [1.0, 3.0])])
    A = A.to(device)

    @custom_root(lambda x, A, b: A @ x - b, solve=functools.partial(solve_cg, maxiter=1))
    def exact(x, A, b):
        return torch.linalg.solve(A, b)

    init = torch.zeros(2, dtype=D, device=device)
    b = torch.ones(2, 2, dtype=D, device=device)
    per_task = lambda A, b: exact(init, A, b).sum()
    (loop,) = _loop_messages(per_task, A, b.clone().requires_grad_())
    where = "stopped at residual"
    number = re.search(rf"{where} (\S+) after", loop)
    assert number is not None
    mapped_fn = metafunc.vmap_tasks(per_task, strategy="vmap")
    (mapped,) = _messages(lambda: mapped_fn(A, b.clone().requires_grad_()).sum().backward())
    assert mapped == _with_task(loop, f"{where} {number.group(1)}", "1 of 2 tasks: task 1")
