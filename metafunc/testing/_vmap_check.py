"""``assert_vmap_matches_loop``: ``torch.func.vmap`` against a Python loop over the tasks.

The loop is the oracle: it runs ``fn`` on one task at a time, outside any transform. Outputs are
compared task by task; derivatives with respect to the shared arguments (``in_dims`` entry
``None``: the meta-parameters) are taken with ``torch.autograd`` of one fixed random projection
of each task's outputs, so the first task whose derivative differs can be named.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch

from .. import _checks
from ._common import default_dtype, float_copy, fmt, is_float, leaves_with_names

__all__ = ["assert_vmap_matches_loop"]

_NORMS = (
    "torch's vmap gets the second derivative of F.batch_norm (training mode), F.layer_norm and "
    "F.instance_norm wrong (pytorch/functorch#534): run the model as a metafunc.FunctionalModel "
    "(exact norms under vmap), or call it inside metafunc.exact_norms()."
)


def assert_vmap_matches_loop(
    fn: Callable[..., Any],
    in_dims: int | tuple[int | None, ...],
    *args: Any,
    randomness: str = "error",
    grads: int = 0,
    rtol: float = 1e-7,
    atol: float = 1e-10,
    dtype: torch.dtype | None = torch.float64,
    vmap: Callable[..., Callable[..., Any]] = torch.func.vmap,
    seed: int = 0,
) -> None:
    """Asserts that ``vmap(fn, in_dims)(*args)`` equals a per-task loop, and so do its derivatives.

    Task ``i`` of the loop calls ``fn`` on ``args`` with each batched argument (``in_dims``
    entry an int) indexed at ``i`` along its dimension and each shared one (entry ``None``) as
    it is; its outputs are compared with entry ``i`` of the vmapped outputs (``out_dims=0``).
    With ``grads=1`` (``2``) the first (and second) derivatives of each task's outputs, projected
    on a fixed random pytree, with respect to the shared floating-point arguments are compared
    too: the MAML meta-gradient of ``fn(meta_params, task_data)``, say. Everything runs on
    ``dtype`` copies of the arguments (``None``: the arguments' own dtypes).

    Args:
        fn: the per-task function.
        in_dims: as ``torch.func.vmap``: an int for every argument, or one int or ``None`` per
            argument (applied to all of its leaves).
        *args: the arguments, batched ones with the task dimension.
        randomness: as ``torch.func.vmap``: ``"error"`` or ``"same"`` (each loop call then
            starts from the same seeded RNG state as the vmapped call). ``"different"`` draws
            numbers a loop cannot reproduce, and is refused.
        grads: 0, 1 or 2: the order of derivatives compared.
        rtol, atol: the tolerance of ``torch.allclose`` on each leaf.
        dtype: the floating-point dtype of the copies the check runs on.
        vmap: the vectorizing map under test, with ``torch.func.vmap``'s signature (e.g.
            ``functools.partial(metafunc.vmap_tasks, strategy="vmap")``).
        seed: seeds the random projections (and the RNG with ``randomness="same"``).

    Raises:
        AssertionError: names the first differing task, the output or argument leaf, the
            largest difference and where it is, and a likely cause.

    Example:
        >>> import torch
        >>> from metafunc.testing import assert_vmap_matches_loop
        >>> def task(w, x):
        ...     return torch.tanh(x @ w).pow(2).mean()
        >>> w, xs = torch.randn(3, 2), torch.randn(4, 5, 3)
        >>> assert_vmap_matches_loop(task, (None, 0), w, xs, grads=2)
    """
    call = f"assert_vmap_matches_loop(fn, in_dims={in_dims!r}, ...)"
    dims = _check_arguments(call, fn, in_dims, args, randomness, grads, rtol, atol)
    args = tuple(float_copy(a, dtype) for a in args)
    shared = [
        (name, leaf)
        for a, d, root in zip(args, dims, (f"args[{i}]" for i in range(len(args))))
        if d is None
        for name, leaf in zip(*leaves_with_names(a, root)[:2])
        if is_float(leaf)
    ]
    if grads:
        for _, leaf in shared:
            leaf.requires_grad_()
        if not shared:
            raise ValueError(
                f"{call}: grads={grads} needs a shared (in_dim None) floating-point argument to "
                "differentiate with respect to; none was given."
            )
    n = _num_tasks(call, args, dims)

    def run(f: Callable[[], Any]) -> Any:
        if randomness != "same":
            return f()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return f()

    with default_dtype(dtype):
        batched = run(lambda: vmap(fn, in_dims=dims, randomness=randomness)(*args))

        def task(i: int) -> Any:
            return fn(*(a if d is None else _take(a, d, i) for a, d in zip(args, dims)))

        loop = [run(functools.partial(task, i)) for i in range(n)]
        names, b_leaves, b_spec = leaves_with_names(batched, "out")
        for i, out in enumerate(loop):
            _, l_leaves, l_spec = leaves_with_names(out, "out")
            if l_spec != b_spec:
                raise AssertionError(
                    f"{call}: task {i} returned the structure {l_spec} in the loop, but vmap "
                    f"returned {b_spec}."
                )
            pairs = [
                (name, b[i], ell)
                for name, b, ell in zip(names, b_leaves, l_leaves)
                if isinstance(b, torch.Tensor)
            ]
            _compare(call, f"task {i} of {n}", "output", pairs, rtol, atol, _OUTPUT_CAUSE)
        if grads:
            _compare_grads(call, batched, loop, shared, n, grads, rtol, atol, seed)


_OUTPUT_CAUSE = (
    "a batching rule that differs from the op's eager result, fn reading state that changes "
    "between calls (a module buffer written in place), or randomness."
)


def _check_arguments(
    call: str,
    fn: Any,
    in_dims: Any,
    args: tuple,
    randomness: Any,
    grads: Any,
    rtol: Any,
    atol: Any,
) -> tuple[int | None, ...]:
    _checks.is_callable(call, "fn", fn)
    if _checks._is_int(in_dims):
        in_dims = (in_dims,) * len(args)
    if not (
        isinstance(in_dims, tuple)
        and len(in_dims) == len(args)
        and all(d is None or _checks._is_int(d) for d in in_dims)
    ):
        raise ValueError(
            f"{call}: expected in_dims to be an int or a tuple with one int or None per "
            f"argument ({len(args)} given), got {in_dims!r}."
        )
    if all(d is None for d in in_dims):
        raise ValueError(f"{call}: expected at least one batched argument (an int in in_dims).")
    if randomness == "different":
        raise ValueError(
            f"{call}: randomness='different' draws numbers a per-task loop cannot reproduce. "
            "Use randomness='same', or pass the random numbers in as a batched argument."
        )
    _checks.one_of(call, "randomness", randomness, ("error", "same"))
    _checks.one_of(call, "grads", grads, (0, 1, 2))
    _checks.at_least(call, "rtol", rtol)
    _checks.at_least(call, "atol", atol)
    return in_dims


def _num_tasks(call: str, args: tuple, dims: tuple[int | None, ...]) -> int:
    sizes = {
        leaf.shape[d]
        for a, d in zip(args, dims)
        if d is not None
        for leaf in optree.tree_leaves(a)
        if isinstance(leaf, torch.Tensor)
    }
    if len(sizes) != 1:
        raise ValueError(
            f"{call}: expected every batched tensor to have the same size along its in_dim, "
            f"got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def _take(tree: Any, dim: int, i: int) -> Any:
    return optree.tree_map(lambda x: x.select(dim, i) if isinstance(x, torch.Tensor) else x, tree)


def _compare(
    call: str,
    task: str,
    what: str,
    pairs: list[tuple[str, torch.Tensor, Any]],
    rtol: float,
    atol: float,
    cause: str,
) -> None:
    for name, got, want in pairs:
        if not isinstance(want, torch.Tensor) or got.shape != want.shape:
            raise AssertionError(
                f"{call}: {task} differs from the per-task loop in the {what} {name}: vmap gave "
                f"{_describe(got)}, the loop {_describe(want)}."
            )
        got, want = got.detach(), want.detach()
        if not got.is_floating_point():
            if torch.equal(got, want):
                continue
        elif torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            continue
        diff = (got.double() - want.double()).abs().nan_to_num(nan=float("inf"))
        flat = int(diff.argmax())
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(flat), got.shape))
        g, w = float(got.reshape(-1)[flat]), float(want.reshape(-1)[flat])
        rel = abs(g - w) / abs(w) if w else float("inf")
        raise AssertionError(
            f"{call}: {task} differs from the per-task loop in the {what} {name}: "
            f"max |vmap - loop| = {fmt(float(diff.max()))} at element {index} (vmap {fmt(g)}, "
            f"loop {fmt(w)}, rel. error {rel:.2e}); tolerance rtol={rtol:g}, atol={atol:g}.\n"
            f"  likely cause: {cause}"
        )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return repr(x)


def _compare_grads(
    call: str,
    batched: Any,
    loop: list[Any],
    shared: list[tuple[str, torch.Tensor]],
    n: int,
    grads: int,
    rtol: float,
    atol: float,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    b_leaves = [x for x in optree.tree_leaves(batched) if is_float(x)]
    weights = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in b_leaves]
    inputs = [t for _, t in shared]
    v = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in inputs]

    def derivatives(outs: list[torch.Tensor], ws: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        s = sum(((w * o).sum() for w, o in zip(ws, outs)), torch.zeros(()))
        first = _grad(s, inputs, create_graph=grads == 2)
        if grads == 1:
            return [first]
        hv = sum(((d * vi).sum() for d, vi in zip(first, v)), torch.zeros(()))
        return [first, _grad(hv, inputs, create_graph=False)]

    names = [name for name, _ in shared]
    what = ["first derivative of the projected outputs w.r.t.", "second derivative w.r.t."]
    cause = "a batching rule with a wrong derivative, where the forward values agree. " + _NORMS
    for i in range(n):
        outs_b = [x[i] for x in b_leaves]
        outs_l = [x for x in optree.tree_leaves(loop[i]) if is_float(x)]
        ws = [w[i] for w in weights]
        for k, (db, dl) in enumerate(zip(derivatives(outs_b, ws), derivatives(outs_l, ws))):
            pairs = list(zip(names, db, dl))
            _compare(call, f"task {i} of {n}", what[k], pairs, rtol, atol, cause)


def _grad(s: torch.Tensor, inputs: list[torch.Tensor], *, create_graph: bool) -> list[torch.Tensor]:
    if not s.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    found = torch.autograd.grad(
        s, inputs, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found)]
