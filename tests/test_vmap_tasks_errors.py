"""The error messages of :func:`metafunc.vmap_tasks` and of :func:`metafunc.stack_tasks`.

Each message is pinned in torch's ``vmap(...)`` format: what was expected, what was seen, the fix.
"""

from __future__ import annotations

import pytest
import torch

import metafunc

pytestmark = pytest.mark.usefixtures("one_thread")


def _run_loop(*args, **kwargs):
    return metafunc.vmap_tasks(lambda x, y: x + y, strategy="loop", **kwargs)(*args)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (
            lambda: metafunc.stack_tasks([]),
            TypeError,
            r"stack_tasks\(tasks\): expected a non-empty list of per-task pytrees, got list "
            r"\(empty\)\.",
        ),
        (
            lambda: metafunc.stack_tasks({"x": torch.ones(1)}),
            TypeError,
            r"expected a non-empty list of per-task pytrees, got dict\.",
        ),
        (
            lambda: metafunc.stack_tasks(torch.ones(2, 3)),
            TypeError,
            r"expected a non-empty list of per-task pytrees, got Tensor\.",
        ),
        (
            lambda: metafunc.stack_tasks([{"x": torch.ones(1)}, {"y": torch.ones(1)}]),
            ValueError,
            r"stack_tasks\(tasks\): task 1 has structure PyTreeSpec\(\{'y': \*\}\), task 0 has "
            r"PyTreeSpec\(\{'x': \*\}\)\. Every task must have the same keys and nesting\.",
        ),
        (
            lambda: metafunc.stack_tasks([(torch.ones(1),), (torch.ones(1), torch.ones(1))]),
            ValueError,
            r"task 1 has structure .* Every task must have the same keys and nesting",
        ),
        (
            lambda: metafunc.stack_tasks([{"x": torch.ones(2)}, {"x": torch.ones(3)}]),
            ValueError,
            r"stack_tasks\(tasks\): the leaf at \['x'\] has different shapes across tasks "
            r"\[\(2,\), \(3,\)\]",
        ),
        (
            lambda: metafunc.stack_tasks([{"x": torch.ones(2)}, {"x": 1.0}]),
            TypeError,
            r"the leaf at \['x'\] is a float in some task; every leaf must be a tensor",
        ),
        (
            lambda: metafunc.unstack_tasks((torch.ones(2, 1), torch.ones(3, 1))),
            ValueError,
            r"unstack_tasks\(batch\): the leaves disagree on the number of tasks \(dim 0\): "
            r"\[2, 3\]",
        ),
        (
            lambda: metafunc.unstack_tasks({"a": torch.tensor(1.0)}),
            TypeError,
            r"expected a pytree of tensors with a task dimension",
        ),
        (
            lambda: metafunc.vmap_tasks(lambda x: x, strategy="jit"),
            ValueError,
            r"vmap_tasks\(func, \.\.\.\): expected strategy in \('auto', 'vmap', 'loop'\), got "
            r"'jit'\.",
        ),
        (
            lambda: metafunc.vmap_tasks(lambda x: x, randomness="fixed"),
            ValueError,
            r"expected randomness in \('error', 'different', 'same'\), got 'fixed'\.",
        ),
        (
            lambda: metafunc.vmap_tasks(lambda x: x, chunk_size=0),
            ValueError,
            r"expected chunk_size to be a positive int, got 0\.",
        ),
        (
            lambda: metafunc.vmap_tasks(lambda x: x, chunk_size=2.0),
            ValueError,
            r"expected chunk_size to be a positive int, got 2\.0\.",
        ),
        (
            lambda: metafunc.vmap_tasks(lambda x: x, chunk_size=2, strategy="loop"),
            ValueError,
            r"vmap_tasks\(func, \.\.\.\): chunk_size applies to strategy='vmap', not 'loop'\.",
        ),
        (
            lambda: metafunc.vmap_tasks(torch.ones(3)),
            TypeError,
            r"vmap_tasks\(func, \.\.\.\): expected func to be callable, got Tensor\.",
        ),
        (
            lambda: _run_loop(torch.ones(3, 2), torch.ones(4, 2)),
            ValueError,
            r"vmap_tasks\(func, strategy='loop'\): expected the batched inputs \(in_dims not "
            r"None\) to share one task-dimension size, got \[3, 4\]\. Arguments shared by all "
            r"tasks, such as the meta-parameters, take in_dims None, e\.g\. "
            r"in_dims=\(None, 0, 0\)\.",
        ),
        (  # the loop strategy checks in_dims as torch.func.vmap does
            lambda: _run_loop(torch.ones(3, 2), torch.ones(3, 2), in_dims=(0, 0, 0)),
            ValueError,
            r"expected in_dims to be an int, None, or a tuple with one entry per positional "
            r"argument \(2\), got a tuple of 3\.",
        ),
        (
            lambda: _run_loop(torch.ones(3, 2), torch.ones(3, 2), in_dims=(0, 2)),
            ValueError,
            r"in_dims entry 2 is out of range for an input of shape \(3, 2\)\.",
        ),
        (
            lambda: _run_loop(torch.ones(3, 2), torch.ones(3, 2), in_dims=(0, "0")),
            ValueError,
            r"expected every in_dims entry to be an int or None, got '0'\.",
        ),
        (
            lambda: _run_loop(torch.ones(3, 2), torch.ones(3, 2), in_dims=(0, {"a": 0})),
            ValueError,
            r"in_dims \(0, \{'a': 0\}\) does not match the structure of the arguments",
        ),
        (
            lambda: _run_loop(torch.ones(3, 2), torch.ones(2, 4), in_dims=(0, -1)),
            ValueError,
            r"share one task-dimension size, got \[3, 4\]\.",
        ),
        (
            lambda: _run_loop(torch.ones(3), torch.ones(3), in_dims=None),
            ValueError,
            r"share one task-dimension size, got no batched tensor input\.",
        ),
        (
            lambda: metafunc.vmap_tasks(lambda x: 1.0, strategy="loop")(torch.ones(2)),
            ValueError,
            r"vmap_tasks\(func, strategy='loop'\): expected func to return tensors \(or pytrees "
            r"of them\), got float\.",
        ),
    ],
)
def test_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
