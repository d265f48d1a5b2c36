"""Shared oracles for the ``test_algorithms_*`` files: tiny float64 MLPs run by a hand-written
forward pass, losses written out, inner loops as explicit ``torch.autograd.grad`` steps, central
finite differences. None of them calls metafunc beyond building the model."""

from __future__ import annotations

import itertools

import optree
import torch
from hypothesis import HealthCheck, settings
from torch import nn

import metafunc

D = torch.float64

# the `device` fixture is a plain parameter, safe to share across hypothesis examples
with_device = settings(
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
    ]
)

HEAD = ["2.weight", "2.bias"]

WARP = ["2.weight", "2.bias"]
TASK = ["0.weight", "0.bias", "4.weight", "4.bias"]


def _model(sizes, seed: int = 0, device: str = "cpu") -> metafunc.FunctionalModel:
    """A tanh MLP ``sizes[0] -> ... -> sizes[-1]``; Linear layers at indices 0, 2, 4, ..."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    return metafunc.functionalize(nn.Sequential(*layers).to(dtype=D, device=device))


def _forward(p, x):
    """The MLP by hand: ``x W^T + b`` per layer, tanh between layers."""
    idx = sorted({int(k.split(".")[0]) for k in p})
    for j, i in enumerate(idx):
        if j:
            x = torch.tanh(x)
        x = x @ p[f"{i}.weight"].T + p[f"{i}.bias"]
    return x


def _loss(kind, out, y):
    if kind == "mse":
        return ((out - y) ** 2).mean()
    picked = out.gather(-1, y[:, None]).squeeze(-1)
    return (torch.logsumexp(out, -1) - picked).mean()


def _tasks(n_tasks, n_s, n_q, d_in, d_out, kind, seed=0, device="cpu"):
    """``(support, query)``, each ``(x, y)`` stacked over tasks."""
    g = torch.Generator().manual_seed(seed)

    def part(n):
        x = torch.randn(n_tasks, n, d_in, generator=g, dtype=D)
        if kind == "mse":
            amp = 0.5 + torch.rand(n_tasks, 1, d_out, generator=g, dtype=D)
            y = amp * torch.sin(x.sum(-1, keepdim=True) + 1.0)
        else:
            y = torch.randint(d_out, (n_tasks, n), generator=g)
        return x.to(device), y.to(device)

    return part(n_s), part(n_q)


def _task(batch, i):
    return batch[0][i], batch[1][i]


def _leaf(p):
    return {k: v.detach().clone().requires_grad_() for k, v in p.items()}


def _sgd(theta, batch, kind, steps, lr, keys=None, create_graph=False):
    """The inner loop by hand: ``phi_{t+1} = phi_t - lr(k, t) * dL_support/dphi_t[k]`` for the
    adapted keys; returns ``[phi_0, ..., phi_steps]``. ``theta``'s adapted leaves must require
    grad (the graph reaches them; without ``create_graph`` it is first order)."""
    keys = list(theta) if keys is None else keys
    path = [dict(theta)]
    phi = dict(theta)
    for t in range(steps):
        with torch.enable_grad():
            loss = _loss(kind, _forward(phi, batch[0]), batch[1])
            gs = torch.autograd.grad(loss, [phi[k] for k in keys], create_graph=create_graph)
        phi = {**phi, **{k: phi[k] - lr(k, t) * g for k, g in zip(keys, gs)}}
        path.append(phi)
    return path


def _torch_adam(theta, batch, lr, steps):
    """The inner loop with torch.optim.Adam on the MSE (the oracle for ``inner_opt=adam``)."""
    phi = {k: nn.Parameter(v.detach().clone()) for k, v in theta.items()}
    opt = torch.optim.Adam(phi.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        _loss("mse", _forward(phi, batch[0]), batch[1]).backward()
        opt.step()
    return phi


def _fd(fn, tree, eps=1e-6):
    """Central finite differences of the scalar ``fn(tree)`` in every entry of every leaf."""
    leaves, spec = optree.tree_flatten(tree)
    base = [x.detach().clone() for x in leaves]
    out = []
    for j, x in enumerate(base):
        g = torch.zeros_like(x).reshape(-1)
        for e in range(x.numel()):
            vals = []
            for sign in (1.0, -1.0):
                moved = [b.clone() for b in base]
                moved[j].reshape(-1)[e] += sign * eps
                vals.append(float(fn(optree.tree_unflatten(spec, moved))))
            g[e] = (vals[0] - vals[1]) / (2 * eps)
        out.append(g.reshape(x.shape))
    return optree.tree_unflatten(spec, out)


def _close(a, b, rtol=1e-6, atol=1e-8):
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb, (sa, sb)
    for x, y in zip(la, lb):
        torch.testing.assert_close(x.detach(), y.detach().to(x.device), rtol=rtol, atol=atol)


def _maml_objective(meta, support, query, kind, steps, keys=None, lr=None, weights=None):
    """The MAML-family meta-objective by hand: the mean over tasks of the query loss after
    ``steps`` SGD steps (or ``sum_t w_t L_query(phi_t)``), values only."""
    total = 0.0
    n = support[0].shape[0]
    for i in range(n):
        theta = _leaf(meta["params"])
        path = _sgd(theta, _task(support, i), kind, steps, lr(meta), keys)
        q = _task(query, i)
        if weights is None:
            total += _loss(kind, _forward(path[-1], q[0]), q[1]).item()
        else:
            total += sum(
                w * _loss(kind, _forward(path[t], q[0]), q[1]).item()
                for t, w in enumerate(weights, start=1)
            )
    return torch.tensor(total / n, dtype=D)
