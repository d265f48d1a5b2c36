"""Shared by ``tests/test_compat_higher_*.py``: models, data, oracles, and higher's own examples.

``metafunc.compat.higher``: higher's API on metafunc, checked against three oracles.

* ``torch.optim``: the fast weights after every step equal ``torch.optim``'s steps on a copy of
  the model. Always run.
* Central finite differences of a ``torch.optim`` unroll, for the meta-gradients. Always run.
* The real higher 0.2.1, a test-only peer, on the cases where higher is right (SGD, Adagrad,
  conv+BatchNorm, learnable ``override`` tensors, ``parameters(time=t)``,
  ``track_higher_grads=False``): equal to float64 round-off. They skip where higher is not
  installed. Where higher departs from ``torch.optim`` (Adam's ``eps``), the tests show it.

Everything runs in float64, with float64 as the default dtype: ``torch.optim`` keeps scalar state
(``step``, ASGD's ``eta``/``mu``, NAdam's ``mu_product``) in the default dtype, so a float32 default
puts a float32 round-off (~1e-9) into the float64 reference.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import metafunc

D = torch.float64
STEPS = 3


@pytest.fixture(autouse=True)
def float64_default():
    """float64 by default; one thread (these tensors are tiny: a second thread only adds
    synchronisation, which costs milliseconds per op on a loaded machine)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(D)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def real_higher():
    """The real higher package, or a skip. Imported here: CI's test extra does not install it."""
    with quiet():
        return pytest.importorskip("higher")


@contextlib.contextmanager
def quiet():
    """higher warns (its RMSprop and Rprop, on construction); the suite makes warnings errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- models, data, oracles --------------------------------------------------------------------
def batch(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D), torch.randn(shape[0], 1, generator=g, dtype=D)


SUPPORT, QUERY = batch(0, 8, 3), batch(1, 8, 3)
IMAGES_SUPPORT, IMAGES_QUERY = batch(2, 6, 1, 6, 6), batch(3, 6, 1, 6, 6)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 1)
    )


def mse(out, y):
    return ((out - y) ** 2).mean()


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def same(a, b) -> bool:
    """The same tensor objects, in the same order."""
    a, b = list(a), list(b)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def torch_unroll(make, make_opt, theta=None, hyper=None, steps=STEPS, support=SUPPORT, heads=None):
    """``torch.optim`` on a fresh model: ``(model, optimizer, [flat params after step t])``.

    ``theta``: flat initial params; ``hyper``: ``{key: value}`` or one dict per parameter group,
    written into the groups; ``heads``: per-step forward keyword (models that skip params)."""
    net = make()
    if theta is not None:
        nn.utils.vector_to_parameters(theta, net.parameters())
    opt = make_opt(net)
    if hyper is not None:
        hypers = hyper if isinstance(hyper, list) else [hyper] * len(opt.param_groups)
        for group, h in zip(opt.param_groups, hypers):
            group.update(h)
    trajectory = [flat(net.parameters())]
    for t in range(steps):
        opt.zero_grad()
        out = net(support[0]) if heads is None else net(support[0], heads[t])
        mse(out, support[1]).backward()
        opt.step()
        trajectory.append(flat(net.parameters()))
    return net, opt, trajectory


def torch_meta_loss(make, make_opt, **kw) -> float:
    net, _, _ = torch_unroll(make, make_opt, **kw)
    with torch.no_grad():
        return mse(net(QUERY[0]), QUERY[1]).item()


def finite_differences(f, x, h=1e-6, points=3) -> torch.Tensor:
    """Central differences of the float function ``f`` at the flat tensor ``x``: the 3-point
    stencil (error ~h**2) or the 5-point one (~h**4, for the curvature of Adam and RMSprop)."""
    x = x.detach().clone()
    out = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        if points == 3:
            out[i] = (f(x + e) - f(x - e)) / (2 * h)
        else:
            out[i] = (8 * (f(x + e) - f(x - e)) - f(x + 2 * e) + f(x - 2 * e)) / (12 * h)
    return out


def unroll(lib, make=mlp, make_opt=sgd, steps=STEPS, support=SUPPORT, query=QUERY, **ctx):
    """higher's MAML pattern, run with ``lib`` (the compat layer, or the real higher)."""
    model = make()
    with lib.innerloop_ctx(model, make_opt(model), **ctx) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(mse(fmodel(support[0]), support[1]))
        meta = mse(fmodel(query[0]), query[1])
    return model, fmodel, meta


def native_meta_loss(params, fm, opt, support=SUPPORT, query=QUERY, **kw):
    def loss(p, b):
        return mse(fm(p, b[0]), b[1])

    result = metafunc.inner_loop(loss, params, opt, support, steps=STEPS, **kw)
    return loss(result.params, query), result


# --- the optimizers and their options, for every test that runs all of them --------------------
OPTIMIZERS = [
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=0.05, weight_decay=0.1)),
    ("Adamax", dict(lr=0.05, weight_decay=0.01)),
    ("NAdam", dict(lr=0.05, momentum_decay=0.01, weight_decay=0.01)),
    ("NAdam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RAdam", dict(lr=0.05, betas=(0.9, 0.9), weight_decay=0.01)),  # rectified from step 6
    ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01)),
    ("Adadelta", dict(lr=1.0, rho=0.8, weight_decay=0.01)),
    ("Rprop", dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 1.0))),
    ("ASGD", dict(lr=0.05, lambd=1e-3, alpha=0.5, t0=2, weight_decay=0.01)),
]


def two_groups(net, **kw):
    return torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.2}, {"params": net[2].parameters()}],
        lr=0.05,
        momentum=0.9,
        **kw,
    )


def functional_unroll(lib):
    """higher's other style: no fmodel in the optimizer, the weights passed around explicitly."""
    model = mlp()
    fmodel = lib.monkeypatch(model, copy_initial_weights=False)
    diffopt = lib.optim.DifferentiableSGD(sgd(model), model.parameters())
    params = list(fmodel.parameters())
    for _ in range(STEPS):
        loss = mse(fmodel(SUPPORT[0], params=params), SUPPORT[1])
        params = diffopt.step(loss, params=params)
    mse(fmodel(QUERY[0], params=params), QUERY[1]).backward()
    return flat(params), flat(p.grad for p in model.parameters())


# --- higher's own examples, unchanged but for the import ------------------------------------------
def higher_readme_example(higher):
    """The "Example Usage" of higher's README (Adam, default options); returns what it computes."""
    torch.manual_seed(0)
    MyModel = mlp
    loss_function = mse
    data = [batch(10 + i, 8, 3) for i in range(3)]
    meta_loss_fn = lambda params: sum((p**2).sum() for p in params)

    model = MyModel()
    opt = torch.optim.Adam(model.parameters())

    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for xs, ys in data:
            logits = fmodel(xs)  # modified `params` can also be passed as a kwarg
            loss = loss_function(logits, ys)  # no need to call loss.backwards()
            diffopt.step(loss)  # note that `step` must take `loss` as an argument!

        # At the end of your inner loop you can obtain these e.g. ...
        grad_of_grads = torch.autograd.grad(
            meta_loss_fn(fmodel.parameters()), fmodel.parameters(time=0)
        )
    return model, data, fmodel, grad_of_grads


def omniglot_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def higher_maml_omniglot_train(higher, n_tasks=2):
    """The train step of higher's examples/maml-omniglot.py, shrunk (2 tasks, 6x6 images)."""
    net = omniglot_net()
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x_spt, x_qry = (
        torch.randn(n_tasks, 5, 1, 6, 6, generator=g),
        torch.randn(n_tasks, 5, 1, 6, 6, generator=g),
    )
    y_spt = y_qry = torch.arange(5).repeat(n_tasks, 1)
    net.train()
    n_inner_iter = 5
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
    meta_opt.zero_grad()
    qry_losses = []
    for i in range(n_tasks):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(n_inner_iter):
                spt_logits = fnet(x_spt[i])
                spt_loss = nn.functional.cross_entropy(spt_logits, y_spt[i])
                diffopt.step(spt_loss)
            qry_logits = fnet(x_qry[i])
            qry_loss = nn.functional.cross_entropy(qry_logits, y_qry[i])
            qry_losses.append(qry_loss.detach())
            qry_loss.backward()
    grads = flat(p.grad for p in net.parameters())
    meta_opt.step()
    return net, grads, torch.stack(qry_losses), (x_spt, y_spt, x_qry, y_qry)
