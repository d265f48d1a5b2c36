"""``inner_loop`` with params that the inner loss has no gradient path to (``allow_unused``).

A param the inner loss does not depend on gets no gradient, and the inner loop leaves it as it
was: an identity adaptation that hides the bug (a ``.detach()`` in the loss). These tests pin the
error, the ways to allow such params, and that the check is the same on every path: the
torch.func path (eager, under ``vmap_tasks`` and ``torch.func.grad``), first-order and truncated
steps, and the checkpointed ``torch.autograd.grad`` path. Oracles: hand-written SGD steps.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

import metafunc
import metafunc.optim as mo

D = torch.float64
LR = 0.1


def _params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, generator=g, dtype=D).to(device) for k in ("body", "head", "scale")}


def _detached_head(p, x):
    """A bug: ``head`` enters the loss only through ``.detach()``."""
    return ((p["body"] * x + p["head"].detach()) ** 2).sum() + (p["scale"] ** 2).sum()


def _ignores_head(p, x):
    """Legitimate: ``head`` is not part of the inner loss (it is meta-learned only)."""
    return ((p["body"] * x) ** 2).sum() + (p["scale"] ** 2).sum()


def _sgd_oracle(params, x, steps):
    """Hand-written SGD on ``_ignores_head``: d/dbody = 2 body x^2, d/dscale = 2 scale."""
    body, scale = params["body"].clone(), params["scale"].clone()
    for _ in range(steps):
        body, scale = body - LR * 2 * body * x**2, scale - LR * 2 * scale
    return {"body": body, "head": params["head"], "scale": scale}


UNUSED = r"loss_fn has no gradient path to params \['head'\] at any of its 2 steps"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"first_order": True}, {"truncate": 1}, {"checkpoint": 1}],
    ids=["second_order", "first_order", "truncate", "checkpoint"],
)
def test_a_detached_param_is_an_error_naming_its_key(kwargs, device):
    x = torch.linspace(-1, 1, 3, dtype=D, device=device)
    with pytest.raises(ValueError, match=UNUSED + r".*allow_unused=\['head'\]"):
        metafunc.inner_loop(_detached_head, _params(device), mo.sgd(lr=LR), x, steps=2, **kwargs)


@pytest.mark.parametrize("checkpoint", [None, 1])
def test_a_loss_that_depends_on_no_param_names_them_all(checkpoint, device):
    x = torch.ones(3, dtype=D, device=device)
    with pytest.raises(
        ValueError, match=r"no gradient path to params \['body', 'head', 'scale'\] at any of its"
    ):
        metafunc.inner_loop(
            lambda p, x: (x**2).sum(),
            _params(device),
            mo.sgd(lr=LR),
            x,
            steps=2,
            checkpoint=checkpoint,
        )


@pytest.mark.parametrize("allow_unused", [True, ["head"], ("head",), {"head"}])
@pytest.mark.parametrize("checkpoint", [None, 1])
def test_allowed_unused_params_stay_unchanged_and_the_rest_matches_sgd(
    allow_unused, checkpoint, device
):
    params, x = _params(device), torch.linspace(-1, 1, 3, dtype=D, device=device)
    result = metafunc.inner_loop(
        _ignores_head,
        params,
        mo.sgd(lr=LR),
        x,
        steps=2,
        allow_unused=allow_unused,
        checkpoint=checkpoint,
    )
    expected = _sgd_oracle(params, x, 2)
    for k in params:
        torch.testing.assert_close(result.params[k], expected[k], rtol=1e-12, atol=1e-12)


def test_allowing_some_keys_still_names_the_others(device):
    x = torch.ones(3, dtype=D, device=device)

    def loss(p, x):
        return (p["body"].detach() * p["head"].detach() * x).sum() + p["scale"].sum()

    with pytest.raises(ValueError, match=r"no gradient path to params \['body'\] at any of its"):
        metafunc.inner_loop(loss, _params(device), mo.sgd(lr=LR), x, steps=2, allow_unused=["head"])


def test_a_single_step_is_named_as_such(device):
    x = torch.ones(3, dtype=D, device=device)
    with pytest.raises(ValueError, match=r"no gradient path to params \['head'\] at its one step"):
        metafunc.inner_loop(_detached_head, _params(device), mo.sgd(lr=LR), x, steps=1)


def test_a_param_used_at_some_steps_only_is_not_an_error(device):
    """``head`` is used at the second step only; the oracle takes the same two SGD steps."""
    params = _params(device)
    batches = [(torch.ones(3, dtype=D, device=device), 0.0), (2 * torch.ones(3, dtype=D), 1.0)]
    batches[1] = (batches[1][0].to(device), 1.0)

    def loss(p, batch):
        x, use_head = batch
        out = (p["body"] * x).sum() + (p["scale"] ** 2).sum()
        return out + use_head * (p["head"] ** 2).sum() if use_head else out

    result = metafunc.inner_loop(loss, params, mo.sgd(lr=LR), batches)
    body = params["body"] - LR * 1.0 - LR * 2.0
    scale = params["scale"] * (1 - 2 * LR) ** 2
    head = params["head"] * (1 - 2 * LR)
    for k, want in {"body": body, "scale": scale, "head": head}.items():
        torch.testing.assert_close(result.params[k], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_the_check_runs_per_task_under_vmap_tasks(strategy, device):
    params = _params(device)
    xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=D).to(device)

    def task(p, x, loss_fn, **kw):
        return metafunc.inner_loop(loss_fn, p, mo.sgd(lr=LR), x, steps=2, **kw).params["body"]

    run = metafunc.vmap_tasks(task, in_dims=(None, 0, None), strategy=strategy)
    with pytest.raises(ValueError, match=UNUSED):
        run(params, xs, _detached_head)
    allowed = metafunc.vmap_tasks(
        lambda p, x: task(p, x, _ignores_head, allow_unused=["head"]),
        in_dims=(None, 0),
        strategy=strategy,
    )
    got = allowed(params, xs)
    for i in range(xs.shape[0]):
        torch.testing.assert_close(
            got[i], _sgd_oracle(params, xs[i], 2)["body"], rtol=1e-12, atol=1e-12
        )


def test_the_check_runs_under_an_outer_torch_func_grad(device):
    x = torch.linspace(-1, 1, 3, dtype=D, device=device)

    def meta_loss(p, loss_fn, **kw):
        return metafunc.inner_loop(loss_fn, p, mo.sgd(lr=LR), x, steps=2, **kw).params["body"].sum()

    with pytest.raises(ValueError, match=UNUSED):
        grad(meta_loss)(_params(device), _detached_head)
    # allowed: the meta-gradient w.r.t. body is d/dbody0 sum(body0 (1 - 2 LR x^2)^2)
    g = grad(meta_loss)(_params(device), _ignores_head, allow_unused=True)
    torch.testing.assert_close(g["body"], (1 - 2 * LR * x**2) ** 2, rtol=1e-12, atol=1e-12)
    assert torch.equal(g["head"], torch.zeros_like(g["head"]))


def test_anil_adapts_a_subset_and_raises_nothing(device):
    """``MAML(adapted=[...])`` passes only the adapted params to inner_loop: the others are closed
    over by the loss, so they are not 'unused'."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    fm = metafunc.functionalize(net.to(device=device, dtype=D))
    learner = metafunc.algorithms.MAML(fm, adapted=["2.weight", "2.bias"], steps=2)
    g = torch.Generator().manual_seed(2)
    support = (
        torch.randn(3, 5, 2, generator=g, dtype=D),
        torch.randn(3, 5, 1, generator=g, dtype=D),
    )
    query = (torch.randn(3, 5, 2, generator=g, dtype=D), torch.randn(3, 5, 1, generator=g, dtype=D))
    support = tuple(t.to(device) for t in support)
    query = tuple(t.to(device) for t in query)
    grads, _ = learner.meta_grad(learner.init(), support, query)
    assert all(torch.isfinite(v).all() for v in grads["params"].values())


@pytest.mark.parametrize(
    ("allow_unused", "error", "pattern"),
    [
        ("head", TypeError, r"expected allow_unused to be a bool or a collection of param keys"),
        (1, TypeError, r"expected allow_unused to be a bool or a collection of param keys"),
        ([0], TypeError, r"expected allow_unused to be a bool or a collection of param keys"),
        (["haed"], ValueError, r"allow_unused names 'haed', not a key of params \(did you mean"),
    ],
)
def test_allow_unused_argument_errors(allow_unused, error, pattern):
    with pytest.raises(error, match=pattern):
        metafunc.inner_loop(
            _ignores_head,
            _params("cpu"),
            mo.sgd(lr=LR),
            torch.ones(3, dtype=D),
            steps=1,
            allow_unused=allow_unused,
        )
