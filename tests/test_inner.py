"""``inner_loop`` and ``Tape`` against independent oracles.

Oracles: central finite differences of an unroll written with ``torch.optim`` (float64); a closed
form for quadratic inner losses; hand-written first-order and truncated unrolls.
"""

from __future__ import annotations

import gc
import itertools
import json
import subprocess
import sys
import textwrap

import optree
import pytest
import torch
from _registry import REGISTRY
from hypothesis import given
from hypothesis import strategies as st

import metafunc
import metafunc.optim as mo
from metafunc.testing import assert_pure

D = torch.float64


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(D)
    yield
    torch.set_default_dtype(old)


def _mlp_problem(widths, seed, n=6):
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        params[f"w{i}"] = torch.randn(b, a, generator=g, dtype=D) / a**0.5
        params[f"b{i}"] = 0.1 * torch.randn(b, generator=g, dtype=D)
    x = torch.randn(n, widths[0], generator=g, dtype=D)
    y = torch.randn(n, widths[-1], generator=g, dtype=D)
    xq = torch.randn(n, widths[0], generator=g, dtype=D)
    yq = torch.randn(n, widths[-1], generator=g, dtype=D)
    return params, (x, y), (xq, yq)


def _forward(params, x):
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[f"w{i}"].T + params[f"b{i}"]
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


def mse(params, batch):
    x, y = batch
    return ((_forward(params, x) - y) ** 2).mean()


def _torch_optim_meta_loss(case, config, params, support, query, steps):
    """The oracle's value: the same unroll with torch.optim (no metafunc involved)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt = case.theirs(list(leaves.values()), **config)
    for _ in range(steps):
        opt.zero_grad()
        mse(leaves, support).backward()
        opt.step()
    with torch.no_grad():
        return mse(leaves, query).item()


# ----------------------------------------------------------- finite differences, every optimizer
@pytest.mark.usefixtures("float64_default")
@given(
    case=st.sampled_from(REGISTRY),
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**20),
)
def test_second_order_meta_gradient_matches_finite_differences(case, widths, steps, seed):
    config = {k: v for k, v in case.configs[-1].items() if k != "maximize"}
    params, support, query = _mlp_problem(widths, seed)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    result = metafunc.inner_loop(mse, theta, case.ours(**config), support, steps=steps)
    grads = torch.autograd.grad(mse(result.params, query), list(theta.values()))
    g = torch.Generator().manual_seed(seed + 1)
    direction = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in params.items()}
    analytic = sum((gr * direction[k]).sum() for k, gr in zip(theta, grads)).item()
    h = 1e-6

    def at(sign):
        shifted = {k: v + sign * h * direction[k] for k, v in params.items()}
        return _torch_optim_meta_loss(case, config, shifted, support, query, steps)

    numeric = (at(1) - at(-1)) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------ closed form (SGD)
@given(n=st.integers(1, 4), steps=st.integers(1, 6), seed=st.integers(0, 2**20))
def test_quadratic_inner_loss_closed_form(n, steps, seed):
    """f(phi) = phi'A phi/2 - b'phi, SGD(alpha): phi_T = M^T theta + sum_t M^t alpha b with
    M = I - alpha A; the MAML meta-gradient of |phi_T - c|^2/2 is (M^T)'(phi_T - c)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=D)
    a = q @ q.T / n + 0.5 * torch.eye(n, dtype=D)
    b, c = torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    theta = torch.randn(n, generator=g, dtype=D, requires_grad=True)
    alpha = 0.3 / torch.linalg.eigvalsh(a).max().item()
    loss = lambda p, _: 0.5 * p["w"] @ a @ p["w"] - b @ p["w"]
    result = metafunc.inner_loop(loss, {"w": theta}, mo.sgd(lr=alpha), None, steps=steps)
    m = torch.eye(n, dtype=D) - alpha * a
    m_t = torch.linalg.matrix_power(m, steps)
    phi = m_t @ theta.detach() + sum(
        torch.linalg.matrix_power(m, t) @ (alpha * b) for t in range(steps)
    )
    torch.testing.assert_close(result.params["w"].detach(), phi, rtol=1e-10, atol=1e-10)
    (meta,) = torch.autograd.grad(0.5 * ((result.params["w"] - c) ** 2).sum(), theta)
    torch.testing.assert_close(meta, m_t.T @ (phi - c), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------- first order, truncated
def test_first_order_is_the_outer_gradient_at_the_adapted_params():
    params, support, query = _mlp_problem([2, 3, 1], 0)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = mo.adam(lr=0.05, weight_decay=0.1)  # weight decay: the params enter the update too
    result = metafunc.inner_loop(mse, theta, opt, support, steps=3, first_order=True)
    full = metafunc.inner_loop(mse, params, opt, support, steps=3)
    for k in params:  # same adapted values as the exact unroll
        torch.testing.assert_close(result.params[k], full.params[k], rtol=0, atol=0)
    grads = torch.autograd.grad(mse(result.params, query), list(theta.values()))
    adapted = {k: v.detach() for k, v in result.params.items()}
    expected = torch.func.grad(mse)(adapted, query)
    for k, gr in zip(theta, grads):
        assert torch.equal(gr, expected[k])


def test_first_order_hyperparameter_gradient_treats_inner_gradients_as_constants():
    params, support, query = _mlp_problem([2, 3, 1], 1)
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    result = metafunc.inner_loop(mse, params, mo.sgd(lr=lr), support, steps=3, first_order=True)
    (got,) = torch.autograd.grad(mse(result.params, query), lr)
    # hand-written: phi_T = theta - lr * sum_t g_t with g_t constants => dL/dlr = -<grad L, sum g>
    p, gsum = dict(params), {k: torch.zeros_like(v) for k, v in params.items()}
    for _ in range(3):
        gt = torch.func.grad(mse)(p, support)
        p = {k: p[k] - 0.1 * gt[k] for k in p}
        gsum = {k: gsum[k] + gt[k] for k in p}
    outer = torch.func.grad(mse)(p, query)
    expected = -sum((outer[k] * gsum[k]).sum() for k in p)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("truncate", [0, 1, 2, 4])
def test_truncated_matches_hand_written_truncated_unroll(truncate):
    params, support, query = _mlp_problem([2, 4, 1], 2)
    steps, lr = 4, 0.2
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    result = metafunc.inner_loop(mse, theta, mo.sgd(lr=lr), support, steps=steps, truncate=truncate)
    got = torch.autograd.grad(mse(result.params, query), list(theta.values()))
    # hand-written: the first steps - truncate updates use constant gradients
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    p = dict(ref)
    for t in range(steps):
        if t < steps - truncate:
            gt = torch.func.grad(mse)({k: v.detach() for k, v in p.items()}, support)
        else:
            gt = dict(
                zip(p, torch.autograd.grad(mse(p, support), list(p.values()), create_graph=True))
            )
        p = {k: p[k] - lr * gt[k] for k in p}
    expected = torch.autograd.grad(mse(p, query), list(ref.values()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_truncate_at_least_steps_is_the_full_meta_gradient_and_zero_is_first_order():
    params, support, query = _mlp_problem([2, 3, 1], 3)

    def meta(**kw):
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        r = metafunc.inner_loop(mse, theta, mo.sgd(lr=0.1), support, steps=3, **kw)
        return torch.autograd.grad(mse(r.params, query), list(theta.values()))

    for a, b in zip(meta(truncate=10), meta()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(meta(truncate=0), meta(first_order=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------ learnable (per-step) hyperparameters
def test_per_step_learning_rates_match_finite_differences():
    params, support, query = _mlp_problem([2, 3, 1], 4)
    lrs = torch.tensor([0.1, 0.2, 0.05], dtype=D, requires_grad=True)

    def meta_loss(rates):
        opts = [mo.sgd(lr=rates[t], momentum=0.5) for t in range(3)]
        return mse(metafunc.inner_loop(mse, params, opts, [support] * 3).params, query)

    (got,) = torch.autograd.grad(meta_loss(lrs), lrs)
    for i in range(3):
        e = torch.zeros(3, dtype=D)
        e[i] = 1e-6
        fd = (meta_loss(lrs.detach() + e) - meta_loss(lrs.detach() - e)) / 2e-6
        assert got[i].item() == pytest.approx(fd.item(), rel=1e-6)


# ------------------------------------------------------------------- where the meta-gradient goes
def test_meta_gradient_lands_on_the_module_and_nothing_else_accumulates():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(D)
    fm = metafunc.functionalize(net)
    x, y = torch.randn(8, 2, dtype=D), torch.randn(8, 1, dtype=D)
    loss = lambda p, b: ((fm(p, b[0]) - b[1]) ** 2).mean()
    result = metafunc.inner_loop(loss, fm.params, mo.sgd(lr=0.1), (x, y), steps=3)
    meta_loss = loss(result.params, (x, y))
    expected = torch.autograd.grad(meta_loss, list(net.parameters()), retain_graph=True)
    assert all(p.grad is None for p in net.parameters())  # the inner loop left no .grad behind
    meta_loss.backward()
    for p, e in zip(net.parameters(), expected):
        assert torch.equal(p.grad, e)


def test_stop_gradient_cuts_the_path_to_the_initial_weights_but_not_to_hyperparameters():
    params, support, query = _mlp_problem([2, 3, 1], 5)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    result = metafunc.inner_loop(
        mse, metafunc.stop_gradient(theta), mo.sgd(lr=lr), support, steps=2
    )
    mse(result.params, query).backward()
    assert all(v.grad is None for v in theta.values())
    assert lr.grad is not None and lr.grad.abs() > 0


# ------------------------------------------------------------------------------------- the tape
def test_tape_records_every_step_as_non_aliasing_differentiable_snapshots():
    params, support, _ = _mlp_problem([2, 3, 1], 6)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    result = metafunc.inner_loop(mse, theta, mo.sgd(lr=0.1), support, steps=3)
    tape = result.tape
    assert tape.steps == [0, 1, 2, 3] and tape.num_steps == 3
    assert all(tape[0][k] is theta[k] for k in theta)  # tape[0] is the params passed in
    manual = dict(params)
    for t in range(1, 4):
        manual = {k: manual[k] - 0.1 * torch.func.grad(mse)(manual, support)[k] for k in manual}
        for k in manual:
            torch.testing.assert_close(tape[t][k].detach(), manual[k], rtol=1e-14, atol=1e-15)
    ptrs = [tape[t][k].data_ptr() for t in tape.steps for k in theta]
    assert len(set(ptrs)) == len(ptrs)
    entry = tape[1]
    entry.clear()  # tape[t] is a fresh dict: mutating it does not change the tape
    assert sorted(tape[1]) == sorted(theta)
    assert tape[-1].keys() == result.params.keys()
    assert all(tape[-1][k] is result.params[k] for k in theta)
    torch.testing.assert_close(tape.losses, result.losses)
    assert tape.losses.shape == (3,)


def test_meta_gradient_wrt_a_recorded_step_and_a_multi_step_loss():
    params, support, query = _mlp_problem([2, 3, 1], 7)
    theta0 = {k: v.clone().requires_grad_() for k, v in params.items()}
    result = metafunc.inner_loop(mse, theta0, mo.sgd(lr=0.1), support, steps=3)
    meta_loss = mse(result.params, query)
    at_step_1 = torch.autograd.grad(meta_loss, list(result.tape[1].values()), retain_graph=True)
    # oracle: restart the (stateless) SGD loop from tape[1] for the remaining 2 steps
    phi1 = {k: v.detach().clone().requires_grad_() for k, v in result.tape[1].items()}
    rest = metafunc.inner_loop(mse, phi1, mo.sgd(lr=0.1), support, steps=2)
    expected = torch.autograd.grad(mse(rest.params, query), list(phi1.values()))
    for a, b in zip(at_step_1, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a MAML++-style multi-step loss is the sum of the per-step meta-losses
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    r = metafunc.inner_loop(mse, theta, mo.sgd(lr=0.1), support, steps=3)
    multi = torch.autograd.grad(sum(mse(r.tape[t], query) for t in (1, 2, 3)), list(theta.values()))
    singles = [
        torch.autograd.grad(
            mse(metafunc.inner_loop(mse, theta, mo.sgd(lr=0.1), support, steps=t).params, query),
            list(theta.values()),
        )
        for t in (1, 2, 3)
    ]
    for i, m in enumerate(multi):
        torch.testing.assert_close(m, sum(s[i] for s in singles), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("record", "steps"),
    [("all", [0, 1, 2, 3, 4, 5]), ("endpoints", [0, 5]), ("none", []), (2, [0, 2, 4, 5])],
)
def test_recording_policies(record, steps):
    params, support, _ = _mlp_problem([2, 3, 1], 8)
    result = metafunc.inner_loop(mse, params, mo.adam(lr=0.1), support, steps=5, record=record)
    assert result.tape.steps == steps
    assert result.tape.losses.shape == (5,)
    missing = next((t for t in range(6) if t not in steps), None)
    if missing is None:
        return
    with pytest.raises(KeyError, match=rf"Tape\[{missing}\]: step {missing} was not recorded"):
        result.tape[missing]


def test_record_state():
    params, support, _ = _mlp_problem([2, 3, 1], 9)
    opt = mo.adam(lr=0.1)
    result = metafunc.inner_loop(mse, params, opt, support, steps=2, record_state=True)
    assert int(result.tape.state(2)[0].step) == 2
    assert optree.tree_structure(result.tape.state(0)) == optree.tree_structure(opt.init(params))
    no_state = metafunc.inner_loop(mse, params, opt, support, steps=2)
    with pytest.raises(KeyError, match=r"Pass record_state=True"):
        no_state.tape.state(1)


def test_batches_iterable_has_aux_and_opt_state_continuation():
    params, support, _ = _mlp_problem([2, 3, 1], 10)

    def loss_with_aux(p, batch):
        loss = mse(p, batch)
        return loss, {"double": 2 * loss}

    batches = [support, (support[0] * 2, support[1])]
    result = metafunc.inner_loop(
        loss_with_aux, params, mo.adam(lr=0.1), iter(batches), has_aux=True
    )
    assert len(result.aux) == 2
    torch.testing.assert_close(result.aux[1]["double"], 2 * result.losses[1])
    # continuing from the returned state equals running all steps at once
    first = metafunc.inner_loop(mse, params, mo.adam(lr=0.1), support, steps=2)
    second = metafunc.inner_loop(
        mse, first.params, mo.adam(lr=0.1), support, steps=1, opt_state=first.opt_state
    )
    both = metafunc.inner_loop(mse, params, mo.adam(lr=0.1), support, steps=3)
    for k in params:
        torch.testing.assert_close(second.params[k], both.params[k], rtol=0, atol=0)


def test_inputs_are_not_modified():
    params, support, _ = _mlp_problem([2, 3, 1], 11)
    # params and support batch: same values and versions; a repeat call gives the same result
    assert_pure(metafunc.inner_loop, mse, params, mo.adam(lr=0.1), support, steps=3)


# -------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("case", REGISTRY, ids=repr)
@pytest.mark.parametrize("checkpoint", ["sqrt", 2])
def test_checkpointed_equals_plain(case, checkpoint):
    params, support, query = _mlp_problem([2, 4, 1], 12)
    opt = case.ours(**case.configs[0])

    def meta(**kw):
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        r = metafunc.inner_loop(mse, theta, opt, support, steps=7, **kw)
        grads = torch.autograd.grad(mse(r.params, query), list(theta.values()))
        return grads, r

    plain, rp = meta()
    ckpt, rc = meta(checkpoint=checkpoint)
    assert rc.tape.steps == rp.tape.steps
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert rc.tape.steps == rp.tape.steps
    torch.testing.assert_close(rc.losses, rp.losses, rtol=0, atol=0)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, metafunc
    def kib(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])
    torch.manual_seed(0)
    mode = sys.argv[1]
    p = {"w1": torch.randn(128, 1) * 0.5, "b1": torch.zeros(128), "w2": torch.randn(128, 128) / 12,
         "w3": torch.randn(1, 128) / 12}
    p = {k: v.requires_grad_() for k, v in p.items()}
    x = torch.linspace(-5, 5, 1024).unsqueeze(1)
    y = torch.sin(x)
    def loss(q, b):
        h = torch.tanh(b[0] @ q["w1"].T + q["b1"])
        h = torch.tanh(h @ q["w2"].T)
        return ((h @ q["w3"].T - b[1]) ** 2).mean()
    def step(steps):
        r = metafunc.inner_loop(loss, p, metafunc.optim.sgd(lr=0.01), (x, y), steps=steps,
                                checkpoint=None if mode == "plain" else "sqrt", record="endpoints")
        loss(r.params, (x, y)).backward()
    step(2)  # warm-up: allocator pools, lazy imports
    # ru_maxrss is inherited across exec on Linux; VmHWM reset through clear_refs is not
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS:")
    step(64)
    after = kib("VmHWM:")
    print(json.dumps({"peak_kib": after - before}))
    """
)


def test_checkpointed_unroll_has_lower_peak_memory():
    """Peak RSS growth of one meta-step in a fresh process (VmHWM, KiB): T=64 steps of a
    1-128-128-1 MLP on 1024 points. Checkpointing keeps ~sqrt(T) steps of activations."""

    def peak(mode):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)["peak_kib"]

    plain, ckpt = peak("plain"), peak("sqrt")
    assert plain > 50_000  # the plain unroll's graph really dominates (> 50 MB)
    assert ckpt < plain / 3, (plain, ckpt)


# -------------------------------------------------------------------------- no growth over time
@pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated")
def test_no_memory_growth_across_outer_steps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    fm = metafunc.functionalize(net)
    outer = torch.optim.Adam(net.parameters(), lr=1e-3)
    inner = mo.adam(lr=0.01)
    x, y = torch.randn(5, 4, 1), torch.randn(5, 4, 1)
    loss = lambda p, b: ((fm(p, b[0]) - b[1]) ** 2).mean()

    def task(params, xs, ys):
        r = metafunc.inner_loop(loss, params, inner, (xs, ys), steps=2)
        return loss(r.params, (xs, ys))

    run = metafunc.vmap_tasks(task, in_dims=(None, 0, 0), strategy="vmap")

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = {}
    for i in range(1, 201):
        outer.zero_grad()
        run(fm.params, x, y).mean().backward()
        outer.step()
        if i in (10, 200):
            counts[i] = live_tensors()
    # <=, not ==: the count is of every tensor in the process, and tensors left by earlier tests
    # (e.g. torch.compile's caches) may be collected in between; growth is what must not happen
    assert counts[200] <= counts[10], counts


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"params": [torch.ones(1)]}, TypeError, r"Did you pass model.parameters\(\)\?"),
        ({"params": {"w": torch.tensor([1])}}, ValueError, r"expected floating-point leaves"),
        ({"opt": torch.optim.SGD}, TypeError, r"expected opt to be a metafunc.optim optimizer"),
        ({"loss_fn": 3}, TypeError, r"expected loss_fn to be callable"),
        ({"steps": 0}, ValueError, r"expected steps to be a positive int"),
        ({"steps": None, "batches": torch.ones(1)}, TypeError, r"one batch with steps=N"),
        ({"truncate": -1}, ValueError, r"expected truncate to be a non-negative int"),
        ({"first_order": True, "truncate": 1}, ValueError, r"truncate=0 is first_order=True"),
        ({"first_order": 1}, TypeError, r"expected first_order to be a bool"),
        ({"checkpoint": 0}, ValueError, r"expected checkpoint to be None, 'sqrt'"),
        ({"record": "some"}, ValueError, r"expected 'all', 'endpoints', 'none' or a positive int"),
        ({"opt": [mo.sgd(), mo.sgd()]}, ValueError, r"got 2 per-step optimizers for 3 steps"),
        ({"steps": None, "batches": []}, ValueError, r"got no batches"),
        (  # an (x, y) pair without steps= would be two steps, one on x and one on y
            {"steps": None, "batches": (torch.ones(2), torch.ones(2))},
            TypeError,
            r"batches is a tuple of 2 tensors and steps=None, so it would run 2 steps",
        ),
        (  # per-step batches with steps= would be one batch (a list) reused
            {"steps": 2, "batches": [(torch.ones(2), torch.ones(2))] * 2},
            TypeError,
            r"with steps=2 batches is one batch, reused at every step, but got a list of 2 tuples",
        ),
    ],
)
def test_argument_errors(kwargs, error, pattern):
    args = {
        "loss_fn": lambda p, b: (p["w"] ** 2).sum(),
        "params": {"w": torch.ones(2)},
        "opt": mo.sgd(lr=0.1),
        "batches": None,
        "steps": 3,
    }
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        metafunc.inner_loop(
            args.pop("loss_fn"), args.pop("params"), args.pop("opt"), args.pop("batches"), **args
        )


def test_loss_errors():
    p = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=r"expected loss_fn to return a scalar tensor, got \(2,\)"):
        metafunc.inner_loop(lambda q, b: q["w"] ** 2, p, mo.sgd(), None, steps=1)
    with pytest.raises(TypeError, match=r"pass has_aux=True"):
        metafunc.inner_loop(lambda q, b: ((q["w"] ** 2).sum(), 1), p, mo.sgd(), None, steps=1)
    with pytest.raises(TypeError, match=r"expected loss_fn to return \(loss, aux\)"):
        metafunc.inner_loop(
            lambda q, b: (q["w"] ** 2).sum(), p, mo.sgd(), None, steps=1, has_aux=True
        )


def test_checkpointed_meta_gradient_reaches_closed_over_hyperparameters_and_meta_params():
    """Tensors that the segment reads but does not produce (a learnable lr inside the optimizer,
    a meta-learned scale inside the loss) get the same meta-gradient as without checkpointing."""
    params, support, query = _mlp_problem([2, 3, 1], 13)
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    log_scale = torch.tensor(0.2, dtype=D, requires_grad=True)
    scale = log_scale.exp()  # a non-leaf external tensor

    def loss(p, batch):
        return scale * mse(p, batch)

    def grads(**kw):
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        r = metafunc.inner_loop(loss, theta, mo.adam(lr=lr), support, steps=6, **kw)
        return torch.autograd.grad(
            mse(r.params, query), [lr, log_scale, *theta.values()], retain_graph=True
        )

    for a, b in zip(grads(), grads(checkpoint=2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert lr.grad is None and log_scale.grad is None  # returned, never accumulated


def test_checkpointed_dropout_is_recomputed_with_the_same_masks():
    params, support, query = _mlp_problem([2, 8, 1], 14)

    def loss(p, batch):
        x, y = batch
        h = torch.nn.functional.dropout(torch.tanh(x @ p["w0"].T + p["b0"]), 0.5, training=True)
        return ((h @ p["w1"].T + p["b1"] - y) ** 2).mean()

    def grads(**kw):
        torch.manual_seed(0)
        theta = {k: v.clone().requires_grad_() for k, v in params.items()}
        r = metafunc.inner_loop(loss, theta, mo.sgd(lr=0.1), support, steps=4, **kw)
        return torch.autograd.grad(mse(r.params, query), list(theta.values()))

    for a, b in zip(grads(), grads(checkpoint=2)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
