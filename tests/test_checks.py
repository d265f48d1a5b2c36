"""The shared argument checks (metafunc._checks) and the copies they replaced that were wrong."""

from __future__ import annotations

import math
import re

import pytest
import torch

import metafunc
from metafunc import _checks
from metafunc.implicit import solve_cg, solve_dense, solve_neumann

CALL = "f(x, ...)"


def test_vmap_tasks_refuses_a_bool_chunk_size():
    """chunk_size=True was accepted (its check forgot that bool is an int) and vmapped in chunks
    of one task."""
    msg = "vmap_tasks(func, ...): expected chunk_size to be a positive int, got True."
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        metafunc.vmap_tasks(lambda x: x, chunk_size=True)


@pytest.mark.parametrize("solve", [solve_cg, solve_neumann])
def test_linear_solvers_refuse_a_bool_maxiter(solve):
    """maxiter=True was accepted as one iteration."""
    with pytest.raises(
        ValueError, match=r"expected maxiter to be a positive int or None, got True"
    ):
        solve(lambda v: v, torch.ones(2), maxiter=True)


@pytest.mark.parametrize("name", ["tol", "atol"])
@pytest.mark.parametrize("solve", [solve_cg, solve_neumann, solve_dense])
def test_linear_solvers_refuse_a_bool_tolerance(solve, name):
    """tol=True was accepted as a tolerance of 1."""
    with pytest.raises(ValueError, match=rf"expected {name} >= 0, got True"):
        solve(lambda v: v, torch.ones(2), **{name: True})


def test_linear_solvers_refuse_a_bool_ridge():
    """ridge=True was accepted as a ridge of 1."""
    with pytest.raises(TypeError, match=r"expected ridge to be a number or tensor, got True"):
        solve_cg(lambda v: v, torch.ones(2), ridge=True)


def test_linear_solvers_still_accept_an_infinite_tolerance_and_a_tensor_ridge():
    x, info = solve_cg(
        lambda v: v, torch.ones(2, dtype=torch.float64), atol=math.inf, ridge=torch.tensor(1.0)
    )
    assert bool(info.converged) and int(info.iterations) == 0
    torch.testing.assert_close(x, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize(
    ("check", "error", "message"),
    [
        (
            lambda v: _checks.positive_int(CALL, "steps", v),
            ValueError,
            "f(x, ...): expected steps to be a positive int, got True.",
        ),
        (
            lambda v: _checks.nonnegative_int(CALL, "truncate", v),
            ValueError,
            "f(x, ...): expected truncate to be a non-negative int, got True.",
        ),
        (
            lambda v: _checks.finite_number(CALL, "tol", v, meaning="a tolerance"),
            ValueError,
            "f(x, ...): expected tol to be a finite number >= 0 (a tolerance), got True.",
        ),
        (
            lambda v: _checks.positive_finite(CALL, "lam", v),
            ValueError,
            "f(x, ...): expected lam to be positive and finite, got True.",
        ),
        (
            lambda v: _checks.at_least(CALL, "tol", v),
            ValueError,
            "f(x, ...): expected tol >= 0, got True.",
        ),
        (
            lambda v: _checks.int_at_least(CALL, "ways", v, minimum=1),
            TypeError,
            "f(x, ...): expected ways to be an int >= 1, got True (bool). Pass a Python int, "
            "e.g. ways=1.",
        ),
        (
            lambda v: _checks.number_at_least(CALL, "noise", v, minimum=0.0, fix="Pass 0."),
            TypeError,
            "f(x, ...): expected noise to be a number, got True (bool).",
        ),
        (
            lambda v: _checks.number_or_tensor(CALL, "ridge", v),
            TypeError,
            "f(x, ...): expected ridge to be a number or tensor, got True.",
        ),
    ],
)
def test_every_numeric_check_refuses_a_bool(check, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        check(True)


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (lambda v: _checks.positive_int(CALL, "n", v), [1, 7], [0, -1, 2.0, "3", None]),
        (lambda v: _checks.positive_int(CALL, "n", v, or_none=True), [None, 1], [0, 1.0]),
        (lambda v: _checks.nonnegative_int(CALL, "n", v), [0, 3], [-1, 0.0, None]),
        (
            lambda v: _checks.finite_number(CALL, "x", v),
            [0, 0.5, 3],
            [-1e-9, math.inf, math.nan, "0", torch.tensor(1.0)],
        ),
        (lambda v: _checks.positive_finite(CALL, "x", v), [1e-9, 2], [0, -1, math.inf, math.nan]),
        (lambda v: _checks.at_least(CALL, "x", v), [0, math.inf], [-1, math.nan, "1"]),
        (lambda v: _checks.one_of(CALL, "mode", v, ("a", "b")), ["a", "b"], ["c", None]),
    ],
)
def test_checks_accept_their_rule_and_refuse_the_rest(check, good, bad):
    for value in good:
        check(value)
    for value in bad:
        with pytest.raises(ValueError, match=r"^f\(x, \.\.\.\): expected "):
            check(value)


def test_callable_and_bool_messages():
    with pytest.raises(TypeError, match=r"^f\(x, \.\.\.\): expected a callable, got int\.$"):
        _checks.is_callable(CALL, None, 3)
    with pytest.raises(TypeError, match=r"expected hook to be callable or None, got str\.$"):
        _checks.is_callable(CALL, "hook", "x", or_none=True)
    _checks.is_callable(CALL, "hook", None, or_none=True)
    with pytest.raises(TypeError, match=r"^f\(x, \.\.\.\): expected a bool, got int\.$"):
        _checks.boolean(CALL, None, 1)
    with pytest.raises(TypeError, match=r"expected flag to be a bool, got 1\.$"):
        _checks.boolean(CALL, "flag", 1)


def test_tensor_dict_hints_named_parameters_for_a_generator_only():
    net = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=re.escape("Did you pass model.parameters()?")):
        _checks.tensor_dict(CALL, "params", net.parameters(), source="(fm.params)")
    with pytest.raises(TypeError, match=r"dict of tensors \(fm\.params\), got Tensor\.$"):
        _checks.tensor_dict(CALL, "params", torch.ones(1), source="(fm.params)")
    with pytest.raises(TypeError, match=r"non-empty dict of tensors"):
        _checks.tensor_dict(CALL, "params", {}, source="(fm.params)", non_empty=True)


def test_keys_match_names_missing_unknown_tied_and_close_keys():
    expected = {"fc.weight": 0, "fc.bias": 0}
    given = {"fc.weight": 0, "fc.bias": 0, "frozen": 0}
    _checks.keys_match(CALL, "params", given, expected, optional={"frozen": 0}, source="s")
    with pytest.raises(ValueError) as info:
        _checks.keys_match(
            CALL,
            "params",
            {"fc.weigth": 0, "out.weight": 0},
            expected,
            tied={"out.weight": "fc.weight"},
            source="fm.params",
        )
    assert str(info.value) == (
        "f(x, ...): params do not match the model: missing key(s) ['fc.weight', 'fc.bias']; "
        "unknown key 'fc.weigth' (did you mean 'fc.weight'?); key 'out.weight' is tied to "
        "'fc.weight': pass 'fc.weight' only. Expected the keys of fm.params: "
        "['fc.bias', 'fc.weight']."
    )


def test_float_tree_takes_non_empty_trees_of_floating_tensors_only():
    _checks.float_tree("f(h)", "h", {"a": torch.zeros(2), "b": [torch.ones(())]}, example="{}")
    for bad in ({}, {"a": torch.zeros(2, dtype=torch.long)}, {"a": 0.5}, torch.tensor([1])):
        with pytest.raises(TypeError) as raised:
            _checks.float_tree("f(h)", "h", bad, meaning="the knobs", example="{'a': t}")
        assert str(raised.value) == (
            "f(h): expected h to be a pytree of floating-point tensors (the knobs), got "
            f"{type(bad).__name__}. Pass e.g. {{'a': t}}."
        )
