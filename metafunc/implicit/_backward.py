"""The backward pass of :func:`custom_root`: ``-(dF/dtheta)^T u`` with ``J^T u = v``.

``Implicit`` is the ``autograd.Function`` whose forward returns the (detached) solution and whose
backward hands the cotangent to :meth:`Problem.backward`, which solves the linear system by
vector-Jacobian products and differentiates the optimality function in its other arguments.
"""

from __future__ import annotations

import warnings

import optree
import torch

from .._tree_math import norm
from .._typing import PyTree


class Problem:
    """Everything the backward pass needs that is not a tensor input of the autograd.Function."""

    def __init__(self, root, sol_spec, args_spec, leaves, diff_idx):
        self.root = root
        self.sol_spec, self.args_spec = sol_spec, args_spec
        self.leaves, self.diff_idx = leaves, diff_idx

    def rebuild(self, diff_leaves) -> tuple[tuple, dict]:
        leaves = list(self.leaves)
        for i, x in zip(self.diff_idx, diff_leaves):
            leaves[i] = x
        return optree.tree_unflatten(self.args_spec, leaves)  # type: ignore[return-value]

    def residual(self, sol_leaves, diff_leaves) -> PyTree:
        args, kwargs = self.rebuild(diff_leaves)
        sol = optree.tree_unflatten(self.sol_spec, list(sol_leaves))
        return self.root.optimality_fn(sol, *args, **kwargs)

    def backward(self, sol_leaves, diff_leaves, cotangents, needs, limit) -> list:
        root = self.root
        sol_leaves, diff_leaves = tuple(sol_leaves), tuple(diff_leaves)
        v = optree.tree_unflatten(self.sol_spec, list(cotangents))
        F_sol = lambda s: self.residual(optree.tree_leaves(s), diff_leaves)
        sol = optree.tree_unflatten(self.sol_spec, list(sol_leaves))
        if root.linearize is not None:
            args, kwargs = self.rebuild(diff_leaves)
            F_at_sol, matvec = root.linearize(sol, *args, **kwargs)
        else:
            vjp = torch.func.vjp(F_sol, sol)
            F_at_sol, vjp_sol = (lambda out=vjp[0]: out), vjp[1]

            def matvec(w):  # J^T w
                return vjp_sol(w)[0]

        optimality = None
        if limit is not None or root.on_solve is not None:  # "ignore": nothing extra
            optimality = norm(F_at_sol())
            root.check_optimality(optimality, limit)
        solve_kwargs = {}
        if root.solve_takes_rmatvec:

            def rmatvec(w):  # J w, by forward mode
                with warnings.catch_warnings():  # torch's jvp decompositions, loaded on first use
                    warnings.filterwarnings("ignore", ".*torch.jit.script", DeprecationWarning)
                    return torch.func.jvp(F_sol, (sol,), (w,))[1]

            solve_kwargs["rmatvec"] = rmatvec
        out = root.solve(matvec, v, **solve_kwargs)
        u, info = out if isinstance(out, tuple) else (out, None)
        if info is not None:
            root.report(info, optimality)
        result: list = [None] * len(diff_leaves)
        picked = [i for i, need in enumerate(needs) if need]
        if picked and root.args_vjp is not None:  # closed forms, where the caller knows them
            args, kwargs = self.rebuild(diff_leaves)
            closed = optree.tree_leaves(root.args_vjp(sol, u, *args, **kwargs), none_is_leaf=True)
            for i in picked:
                thunk = closed[self.diff_idx[i]]
                result[i] = None if thunk is None else thunk()
            picked = [i for i in picked if result[i] is None]
        if not picked:
            return result

        def F_args(*chosen):
            leaves = list(diff_leaves)
            for i, x in zip(picked, chosen):
                leaves[i] = x
            return self.residual(sol_leaves, leaves)

        vjp_args = torch.func.vjp(F_args, *[diff_leaves[i] for i in picked])[1]
        grads = vjp_args(optree.tree_map(torch.neg, u))
        for i, g in zip(picked, grads):
            result[i] = g
        return result


class Implicit(torch.autograd.Function):
    generate_vmap_rule = True

    # limit: the tolerance on ||F(sol)|| (a tensor, batched like the tasks under vmap), or None
    @staticmethod
    def forward(problem, n_sol, limit, *tensors):
        return tuple(t.clone() for t in tensors[:n_sol])

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, n_sol, limit, *tensors = inputs
        ctx.problem, ctx.n_sol, ctx.has_limit = problem, n_sol, limit is not None
        ctx.save_for_backward(*output, *tensors[n_sol:], *([] if limit is None else [limit]))

    @staticmethod
    def backward(ctx, *cotangents):
        saved = ctx.saved_tensors
        n, end = ctx.n_sol, len(saved) - ctx.has_limit
        limit = saved[-1] if ctx.has_limit else None
        needs = ctx.needs_input_grad[3 + n :]
        grads = ctx.problem.backward(saved[:n], saved[n:end], cotangents, needs, limit)
        return (None, None, None, *([None] * n), *grads)
