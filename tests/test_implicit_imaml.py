"""What :func:`metafunc.implicit.imaml` and :func:`solve_cg` spend, and the meta-gradients their
shortcuts deliver.

iMAML's optimality function is ``F(phi, theta, batch, lam) = grad loss_fn(phi, batch) + lam (phi -
theta)``: its Jacobians in ``theta`` (``-lam I``) and ``lam`` (``phi - theta``) are closed forms, so
the backward pass needs ``loss_fn`` once (the Hessian-vector products at ``phi*``), as a
hand-written iMAML does; CG runs on one flat vector. Oracles: counts of ``loss_fn`` calls and of
torch operations (no timing); the same CG on a single-leaf system; the closed form of the quadratic
problem (``phi* = M^-1 (b + lam theta)``, ``M = A + lam I``), differentiated by hand in every input.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode

import metafunc
import metafunc.optim as mo
from metafunc.implicit import imaml, solve_cg

D = torch.float64
TIGHT = functools.partial(solve_cg, tol=1e-12, maxiter=200)


def quadratic(p, batch):
    A, b = batch
    return 0.5 * p["w"] @ A @ p["w"] - b @ p["w"]


def _problem(device, n: int = 3, seed: int = 0):
    """A (SPD, eigenvalues in [0.5, 3]), b, c (the query target) and theta, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    A = (q * torch.linspace(0.5, 3.0, n, dtype=D)) @ q.T
    b, c, theta = (torch.randn(n, generator=g, dtype=D) for _ in range(3))
    return A.to(device), b.to(device), c.to(device), theta.to(device)


@pytest.mark.parametrize("mapped", [False, True])
def test_imaml_backward_evaluates_loss_fn_once(mapped, device):
    """Forward: one call per inner step; result.grad_norm, one more at phi*, only when read.
    Backward: one, for the Hessian-vector products; the meta-gradient in theta is lam u (u the
    CG solution) with no further evaluation of the optimality function. Under vmap the Python
    calls are per batch."""
    A, b, c, theta0 = _problem(device)
    calls = {"n": 0}

    def counting(p, batch):
        calls["n"] += 1
        return quadratic(p, batch)

    def meta_loss(theta, b, c):
        kwargs = {"lam": 2.0, "steps": 4, "solve": TIGHT, "if_not_converged": "ignore"}
        r = imaml(counting, {"w": theta}, mo.sgd(lr=0.2), (A, b), **kwargs)
        return 0.5 * ((r.params["w"] - c) ** 2).sum()

    theta = theta0.clone().requires_grad_()
    if mapped:
        bs, cs = torch.stack([b, -b]), torch.stack([c, 2 * c])
        loss = metafunc.vmap_tasks(meta_loss, in_dims=(None, 0, 0), strategy="vmap")(theta, bs, cs)
        loss = loss.sum()
    else:
        loss = meta_loss(theta, b, c)
    assert calls["n"] == 4
    loss.backward()
    assert calls["n"] == 4 + 1


class _CountOps(TorchFunctionMode):
    """Counts the torch functions called, by name, while ``active``."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.active = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _cg_arithmetic(n_leaves: int, device) -> tuple[list[str], torch.Tensor]:
    """The arithmetic torch calls (not views, cat, split, checks) of 4 CG iterations on a
    diagonal system of 12 unknowns split into n_leaves leaves, the matvec not counted; and the
    solution."""
    d = torch.linspace(1.0, 3.0, 12, dtype=D, device=device)
    rhs = torch.linspace(-1.0, 2.0, 12, dtype=D, device=device)
    chunks = lambda t: dict(zip("abcdefghijkl", torch.chunk(t, n_leaves)))
    diag, b = chunks(d), chunks(rhs)
    counter = _CountOps()

    def matvec(v):
        counter.active = False
        out = {k: diag[k] * v[k] for k in v}
        counter.active = True
        return out

    with counter:
        x, _ = solve_cg(matvec, b, tol=0.0, maxiter=4)
    layout = {"reshape", "view", "cat", "split", "chunk", "__get__", "dim", "numel", "size"}
    layout |= {"is_floating_point", "is_complex"}  # the argument checks, once per call
    names = [n for n in counter.names if n not in layout]
    return names, torch.cat([x[k] for k in sorted(x)])


def test_solve_cg_vector_arithmetic_does_not_grow_with_the_number_of_leaves(device):
    """The vector updates of CG (dot products, x + alpha p, ...) cost a fixed number of tensor
    operations per iteration, not one per leaf: on small networks each operation, not its
    arithmetic, is the cost (torch.func wrappers, vmap). The solution is the same."""
    one, x_one = _cg_arithmetic(1, device)
    six, x_six = _cg_arithmetic(6, device)
    assert len(six) == len(one), (len(one), len(six))
    torch.testing.assert_close(x_six, x_one, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    ("matvec", "init", "pattern"),
    [
        (lambda v: {"a": v["a"]}, None, r"expected matvec\(v\) to be a pytree of b's structure"),
        (
            lambda v: {"a": v["a"], "b": v["b"][:1]},
            None,
            r"expected matvec\(v\) .*got .* shapes \[\(2,\), \(1,\)\]\. matvec must keep",
        ),
        (lambda v: v, {"a": torch.zeros(2, dtype=D)}, r"expected init to be a pytree of b's"),
    ],
)
def test_solve_cg_names_a_matvec_or_init_that_does_not_match_b(matvec, init, pattern):
    b = {"a": torch.ones(2, dtype=D), "b": torch.ones(2, dtype=D)}
    with pytest.raises(ValueError, match=rf"solve_cg\(matvec, b, \.\.\.\): {pattern}"):
        solve_cg(matvec, b, init=init)


def test_imaml_meta_gradient_in_params_lam_and_the_batch_matches_the_closed_form(device):
    """L = |phi* - c|^2 / 2 with phi* = M^-1 (b + lam theta): with u = M^-1 (phi* - c),
    dL/dtheta = lam u, dL/dlam = u . (theta - phi*) and dL/db = u. theta and lam take the closed
    forms of imaml's backward pass, b (in the batch) the vector-Jacobian product of the
    optimality function; lam is a 1-element tensor of shape (1,)."""
    A, b0, c, theta0 = _problem(device, n=4, seed=3)
    lam0 = 1.5
    theta, b = theta0.clone().requires_grad_(), b0.clone().requires_grad_()
    lam = torch.tensor([lam0], dtype=D, device=device, requires_grad=True)
    lr = 2 / (3.5 + 2 * lam0)
    r = imaml(quadratic, {"w": theta}, mo.sgd(lr=lr), (A, b), lam=lam, steps=80, solve=TIGHT)
    g_theta, g_lam, g_b = torch.autograd.grad(
        0.5 * ((r.params["w"] - c) ** 2).sum(), (theta, lam, b)
    )
    M = A + lam0 * torch.eye(4, dtype=D, device=device)
    phi = torch.linalg.solve(M, b0 + lam0 * theta0)
    u = torch.linalg.solve(M, phi - c)
    torch.testing.assert_close(g_theta, lam0 * u, rtol=1e-9, atol=1e-11)
    assert g_lam.shape == (1,)
    torch.testing.assert_close(g_lam, ((theta0 - phi) @ u).reshape(1), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_b, u, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mapped", [False, True])
def test_imaml_grad_norm_is_evaluated_when_read_and_equals_the_regularised_gradient(mapped, device):
    """result.grad_norm costs one more gradient of loss_fn, so it is evaluated on first read
    (once: a second read reuses it), inside the caller's vmap; its value is ||grad L(phi*) +
    lam (phi* - theta)||, here from the closed form A phi* - b + lam (phi* - theta)."""
    A, b, _, theta = _problem(device)
    calls = {"n": 0}

    def counting(p, batch):
        calls["n"] += 1
        return quadratic(p, batch)

    def solve(theta, b):
        kwargs = {"lam": 2.0, "steps": 3, "if_not_converged": "ignore"}
        r = imaml(counting, {"w": theta}, mo.sgd(lr=0.2), (A, b), **kwargs)
        before = calls["n"]
        first, second = r.grad_norm, r.grad_norm
        assert calls["n"] == before + 1 and first is second
        phi, losses, norm = r  # unpacks as the NamedTuple it was
        assert norm is first and losses.shape == (3,)
        return phi["w"], norm

    if mapped:
        bs = torch.stack([b, -b])
        phi, norm = metafunc.vmap_tasks(solve, in_dims=(None, 0), strategy="vmap")(theta, bs)
        expected = torch.linalg.vector_norm(phi @ A - bs + 2.0 * (phi - theta), dim=-1)
    else:
        phi, norm = solve(theta, b)
        expected = torch.linalg.vector_norm(A @ phi - b + 2.0 * (phi - theta))
    torch.testing.assert_close(norm, expected, rtol=1e-12, atol=1e-14)
    assert not norm.requires_grad
