"""Helpers and layer kinds shared by the ``test_vmap_tasks_*.py`` files.

Seeded float64 initialisation (non-trivial norm weights and running statistics), the per-task loop
that is the oracle, meta-gradients, leafwise comparison of pytrees, the layer kinds of ``CASES``
with their data, and a MAML task built on :func:`metafunc.inner_loop`.
"""

from __future__ import annotations

import optree
import torch
from torch import nn

import metafunc
import metafunc.optim as mo

D = torch.float64
N_TASKS = 3  # odd, so chunk_size=2 leaves a short last chunk
N_SAMPLES = 4


def _init(module: nn.Module, seed: int) -> nn.Module:
    """float64, every parameter and running statistic drawn from a seeded generator (affine norm
    weights and running stats non-trivial, so that wrong formulas show)."""
    module = module.to(D)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) / fan_in**0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=D))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=D))
    return module


def _take(tree, i):
    return optree.tree_map(lambda a: a[i], tree)


def _stack(trees):
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def _loop(task, shared, batched, n=N_TASKS):
    """The oracle: ``task(*shared, *task_i_of(batched))`` for each task, outputs stacked."""
    return _stack([task(*shared, *_take(batched, i)) for i in range(n)])


def _meta_grad(total, params):
    return dict(zip(params, torch.autograd.grad(total, list(params.values()))))


def _assert_trees_close(actual, expected, rtol=1e-10):
    """Leafwise, with an absolute floor at ``rtol`` times the largest expected entry (entries that
    are zero in exact arithmetic, e.g. the meta-gradient of a bias before a BatchNorm, are
    round-off in both)."""
    a_leaves, a_spec = optree.tree_flatten(actual)
    e_leaves, e_spec = optree.tree_flatten(expected)
    assert a_spec == e_spec
    floats = [e for e in e_leaves if e.is_floating_point() and e.numel()]
    scale = max((e.abs().max().item() for e in floats), default=1.0)
    for a, e in zip(a_leaves, e_leaves):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device
        if e.is_floating_point():
            torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale)
        else:
            assert torch.equal(a, e)


class _MaskedMLP(nn.Module):
    """Dropout with a fixed mask: the mask is an input, multiplied in (comparable across runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x, mask):
        return self.out(torch.relu(self.hidden(x)) * mask)


def _linear_norm(norm: nn.Module) -> nn.Module:
    # no bias before a BatchNorm: its exact meta-gradient is 0, and Adam would turn the
    # round-off left of it into a full-size step
    bias = not isinstance(norm, nn.BatchNorm1d)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), norm, nn.ReLU(), nn.Linear(4, 1))


# name -> (module factory, per-sample input shape, per-sample mask shape or None)
CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)), (3,), None),
    "batchnorm1d": (lambda: _linear_norm(nn.BatchNorm1d(4)), (3,), None),
    "batchnorm1d_eval": (lambda: _linear_norm(nn.BatchNorm1d(4)).eval(), (3,), None),
    "batchnorm1d_cumulative": (lambda: _linear_norm(nn.BatchNorm1d(4, momentum=None)), (3,), None),
    "batchnorm2d": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, bias=False),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 1),
        ),
        (1, 6, 6),
        None,
    ),
    "layernorm": (lambda: _linear_norm(nn.LayerNorm(4)), (3,), None),
    "layernorm_3d_shape": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.LayerNorm([2, 4, 4]), nn.ReLU(), nn.Flatten(), nn.Linear(32, 1)
        ),
        (1, 6, 6),
        None,
    ),
    "groupnorm": (lambda: _linear_norm(nn.GroupNorm(2, 4)), (3,), None),
    "instancenorm": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, bias=False),
            nn.InstanceNorm1d(4, affine=True),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4, 1),
        ),
        (2, 6),
        None,
    ),
    "conv_maxpool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 1),
        ),
        (1, 8, 8),
        None,
    ),
    "conv_avgpool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 1),
        ),
        (1, 8, 8),
        None,
    ),
    "dropout_fixed_mask": (_MaskedMLP, (3,), (6,)),
}


def _data(case: str, seed: int, device: str, n_tasks: int = N_TASKS):
    """Stacked support and query batches ``(x, y[, mask])``, one row per task."""
    _, x_shape, mask_shape = CASES[case]
    g = torch.Generator().manual_seed(seed)

    def batch():
        shape = (n_tasks, N_SAMPLES)
        out = [
            torch.randn(*shape, *x_shape, generator=g, dtype=D),
            torch.randn(*shape, 1, generator=g, dtype=D),
        ]
        if mask_shape is not None:
            keep = torch.rand(*shape, *mask_shape, generator=g, dtype=D) > 0.5
            out.append(keep.to(D) / 0.5)
        return tuple(t.to(device) for t in out)

    return batch(), batch()


def _maml_task(fm, opt, mode, steps=2):
    def inner_loss(params, batch):
        x, y, *extra = batch
        return ((fm(params, x, *extra) - y) ** 2).mean()

    def task(params, buffers, support, query):
        result = metafunc.inner_loop(inner_loss, params, opt, support, steps=steps, **mode)
        x, y, *extra = query
        out, new_buffers = fm.apply(result.params, buffers, x, *extra)
        return ((out - y) ** 2).mean(), new_buffers

    return task


def _mlp_setup(device, n_tasks=N_TASKS, seed=7):
    fm = metafunc.functionalize(_init(CASES["mlp"][0](), seed=seed).to(device))
    task = _maml_task(fm, mo.sgd(lr=0.1), {})
    support, query = _data("mlp", seed=seed + 1, device=device, n_tasks=n_tasks)
    return fm, task, support, query
