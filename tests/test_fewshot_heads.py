"""ProtoNet, R2-D2 and MetaOptNet against independent oracles, in float64 on tiny problems.

Oracles (none calls metafunc beyond building the model): the heads written out per task in a
Python loop over tasks and classes (prototypes as class means, squared distances; ridge
regression by least squares on the augmented system ``[X; sqrt(lam) I] W = [Y; 0]``, a QR
solve, not the normal equations; the 2-way SVM dual solved exactly by enumerating its active
sets), their meta-gradients by ``torch.autograd.grad`` and by central finite differences, and
the SVM dual's KKT conditions.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import pytest
import torch
from _algorithms import D, _close, _fd, _forward, _leaf, _loss, _model

import metafunc
from metafunc.algorithms import MAML, R2D2, MetaOptNet, ProtoNet
from metafunc.implicit import ImplicitSolveWarning, solve_normal_cg
from metafunc.models import Conv4

pytestmark = pytest.mark.usefixtures("one_thread")


def _episodes(tasks, ways, shots, queries, d_in, seed=0):
    """``(support, query)`` stacked over tasks; every class in every support set."""
    g = torch.Generator().manual_seed(seed)

    def part(per_class):
        y = torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)
        centres = torch.randn(tasks, ways, d_in, generator=g, dtype=D)
        x = centres.gather(1, y[..., None].expand(-1, -1, d_in))
        return x + 0.7 * torch.randn(x.shape, generator=g, dtype=D), y

    return part(shots), part(queries)


def _protonet_task(p, support, query, ways):
    (xs, ys), (xq, yq) = support, query
    fs, fq = _forward(p, xs), _forward(p, xq)
    protos = torch.stack([fs[ys == k].mean(0) for k in range(ways)])
    logits = -((fq[:, None, :] - protos[None]) ** 2).sum(-1)
    return _loss("cross_entropy", logits, yq), logits


def _ridge(X, Y, lam):
    """``argmin ||X W - Y||^2 + lam ||W||^2`` as least squares on the augmented system."""
    d = X.shape[1]
    A = torch.cat([X, lam.sqrt() * torch.eye(d, dtype=D)])
    B = torch.cat([Y, torch.zeros(d, Y.shape[1], dtype=D)])
    return torch.linalg.lstsq(A, B).solution


def _r2d2_task(p, head, support, query, ways):
    (xs, ys), (xq, yq) = support, query
    W = _ridge(_forward(p, xs), torch.eye(ways, dtype=D)[ys], head["log_lam"].exp())
    logits = head["scale"] * _forward(p, xq) @ W + head["bias"]
    return _loss("cross_entropy", logits, yq), logits


def _svm_dual_2way(K, y, C):
    """The 2-way Crammer-Singer dual, exactly: with ``s = +1`` for class 0 and ``-1`` for class
    1, ``z[:, 0] = s a``, ``z[:, 1] = -s a``, it is ``min (s a)^T K (s a) - sum(a)`` over the box
    ``0 <= a <= C``; every assignment of each ``a_i`` to 0, C or free is tried, the free part
    solved, and the feasible point satisfying the KKT conditions kept."""
    s = 1.0 - 2.0 * y.to(D)
    Q = 2 * (s[:, None] * K * s[None, :])
    n = K.shape[0]
    for pattern in itertools.product((0, 1, 2), repeat=n):  # 0: at 0, 1: at C, 2: free
        fixed = torch.tensor([C if c == 1 else 0.0 for c in pattern], dtype=D)
        free = [i for i, c in enumerate(pattern) if c == 2]
        a = fixed.clone()
        if free:
            rest = [i for i in range(n) if i not in free]
            rhs = 1 - Q[free][:, rest] @ fixed[rest]
            a[free] = torch.linalg.solve(Q[free][:, free], rhs)
        g = Q @ a - 1  # the gradient
        ok = bool(((a >= -1e-12) & (a <= C + 1e-12)).all())
        for i, c in enumerate(pattern):
            ok &= (g[i] >= -1e-10) if c == 0 else (g[i] <= 1e-10) if c == 1 else True
        if ok:
            return torch.stack([s * a, -s * a], dim=1)
    raise AssertionError("no KKT point: the enumeration is wrong")


def _svm_task(p, head, support, query, C):
    (xs, ys), (xq, yq) = support, query
    fs, fq = _forward(p, xs), _forward(p, xq)
    with torch.no_grad():
        z = _svm_dual_2way(fs @ fs.T, ys, C)
    logits = head["scale"] * fq @ (z.T @ fs).T
    return _loss("cross_entropy", logits, yq), logits


def _mean_over_tasks(task, support, query):
    n = support[0].shape[0]
    total = 0.0
    for i in range(n):
        total = total + task((support[0][i], support[1][i]), (query[0][i], query[1][i]))[0]
    return total / n


# --------------------------------------------------------------------------- ProtoNet


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_protonet_meta_grad_matches_the_distances_by_hand(strategy):
    fm = _model([3, 5, 4], seed=1)
    support, query = _episodes(3, 3, 2, 4, 3, seed=2)
    learner = ProtoNet(fm, ways=3, strategy=strategy)
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)

    theta = _leaf(meta["params"])
    objective = lambda p: _mean_over_tasks(lambda s, q: _protonet_task(p, s, q, 3), support, query)
    loss = objective(theta)
    expected = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    _close(grads["params"], expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(metrics["loss"].mean(), loss.detach())
    fd = _fd(objective, meta["params"])
    _close(grads["params"], fd, rtol=1e-6, atol=1e-8)
    # the last layer's bias translates every embedding: distances, hence the loss, ignore it
    assert grads["params"]["2.bias"].abs().max() < 1e-12
    for k in ("0.weight", "0.bias", "2.weight"):
        assert grads["params"][k].abs().min() > 0, k


def test_protonet_evaluate_gives_the_distances_accuracy_and_loss():
    fm = _model([3, 5, 4], seed=3)
    support, query = _episodes(2, 4, 3, 5, 3, seed=4)
    learner = ProtoNet(fm, ways=4)
    metrics = learner.evaluate(learner.init(), support, query)
    for i in range(2):
        task = (support[0][i], support[1][i]), (query[0][i], query[1][i])
        loss, logits = _protonet_task(fm.params, *task, 4)
        accuracy = (logits.argmax(-1) == task[1][1]).to(D).mean()
        torch.testing.assert_close(metrics["loss"][i], loss.detach())
        torch.testing.assert_close(metrics["accuracy"][i], accuracy)
    adapted = learner.adapt(learner.init(), (support[0][0], support[1][0]))
    assert adapted["head"]["weight"].shape == (4, 4) and not adapted["head"]["weight"].requires_grad


# --------------------------------------------------------------------------- R2-D2


@pytest.mark.parametrize(
    ("width", "shots", "form"), [(8, 1, "woodbury n<d"), (2, 3, "primal n>=d")]
)
def test_r2d2_meta_grad_matches_least_squares_by_hand(width, shots, form):
    fm = _model([3, 5, width], seed=5)
    support, query = _episodes(2, 3, shots, 4, 3, seed=6)
    assert (support[0].shape[1] < width) == form.startswith("woodbury")
    learner = R2D2(fm, ways=3, lam=0.7, scale=2.0, bias=0.1, strategy="vmap")
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)

    leaves = _leaf({**meta["params"], **{f"head.{k}": v for k, v in meta["head"].items()}})

    def objective(tree):
        p = {k: v for k, v in tree.items() if not k.startswith("head.")}
        head = {k[5:]: v for k, v in tree.items() if k.startswith("head.")}
        return _mean_over_tasks(lambda s, q: _r2d2_task(p, head, s, q, 3), support, query)

    loss = objective(leaves)
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    got = {**grads["params"], **{f"head.{k}": v for k, v in grads["head"].items()}}
    _close(got, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(metrics["loss"].mean(), loss.detach())
    fd = _fd(objective, {k: v.detach() for k, v in leaves.items()})
    _close(got, fd, rtol=1e-6, atol=1e-8)
    assert got["head.bias"].abs() < 1e-12  # a bias shared by all classes cancels in softmax
    for k, v in got.items():
        if k != "head.bias":
            assert v.abs().max() > 1e-6, k


def test_r2d2_vmap_equals_loop():
    fm = _model([3, 5, 6], seed=7)
    support, query = _episodes(3, 2, 2, 3, 3, seed=8)
    make = lambda strategy: R2D2(fm, ways=2, lam=0.5, strategy=strategy)
    vm = make("vmap").meta_grad(make("vmap").init(), support, query)
    lp = make("loop").meta_grad(make("loop").init(), support, query)
    _close(vm, lp, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- MetaOptNet


def test_metaoptnet_meta_grad_matches_the_exact_2way_svm():
    fm = _model([3, 4, 6], seed=9)
    support, query = _episodes(2, 2, 2, 3, 3, seed=10)
    C = 0.5
    learner = MetaOptNet(fm, ways=2, C=C, scale=1.5, tol=1e-12, maxiter=20000, strategy="vmap")
    meta = learner.init()
    grads, metrics = learner.meta_grad(meta, support, query)

    def objective(tree):
        p = {k: v for k, v in tree.items() if k != "scale"}
        head = {"scale": tree["scale"]}
        return _mean_over_tasks(lambda s, q: _svm_task(p, head, s, q, C), support, query)

    tree = {**meta["params"], "scale": meta["head"]["scale"]}
    torch.testing.assert_close(metrics["loss"].mean(), objective(tree))
    fd = _fd(objective, tree)
    got = {**grads["params"], "scale": grads["head"]["scale"]}
    _close(got, fd, rtol=1e-5, atol=1e-8)
    for k, v in got.items():
        assert v.abs().max() > 1e-6, k


def _dual_from_head(weight, X, scale):
    """``z`` from ``weight = scale z^T X`` (``X`` of full row rank)."""
    return (weight @ torch.linalg.pinv(X)).T / scale


@pytest.mark.parametrize("ways", [3, 5])
def test_metaoptnet_solution_satisfies_the_dual_kkt_conditions(ways):
    fm = _model([3, 16, 16], seed=11)  # rank-n embeddings: z is read back from the head
    support, _ = _episodes(1, ways, 2, 1, 3, seed=12)
    C = 0.3
    learner = MetaOptNet(fm, ways=ways, C=C, tol=1e-10, maxiter=20000)
    x, y = support[0][0], support[1][0]
    adapted = learner.adapt(learner.init(), (x, y))
    X = _forward(fm.params, x).detach()
    z = _dual_from_head(adapted["head"]["weight"], X, 1.0)
    Y = torch.eye(ways, dtype=D)[y]
    assert (z <= C * Y + 1e-8).all()  # feasible
    torch.testing.assert_close(z.sum(1), torch.zeros(len(y), dtype=D), atol=1e-8, rtol=0)
    g = X @ X.T @ z - Y  # stationarity: the free entries of each row share its largest gradient
    top = g.max(1, keepdim=True).values
    free = z < C * Y - 1e-6
    assert (g[free] - top.expand_as(g)[free]).abs().max() < 1e-6
    assert free.any() and (~free).any()  # a solution with both kinds of entries


def test_metaoptnet_vmap_equals_loop():
    fm = _model([3, 4, 8], seed=13)
    support, query = _episodes(3, 3, 2, 2, 3, seed=14)
    make = lambda strategy: MetaOptNet(fm, ways=3, C=0.5, tol=1e-10, strategy=strategy)
    vm = make("vmap").meta_grad(make("vmap").init(), support, query)
    lp = make("loop").meta_grad(make("loop").init(), support, query)
    _close(vm, lp, rtol=1e-7, atol=1e-10)


def test_metaoptnet_warns_when_the_solver_stops_short():
    fm = _model([3, 4, 8], seed=15)
    support, query = _episodes(1, 3, 2, 2, 3, seed=16)
    learner = MetaOptNet(fm, ways=3, C=0.5, tol=1e-12, maxiter=2)
    with pytest.warns(
        ImplicitSolveWarning, match=r"the SVM dual solver stopped after maxiter=2 iterations"
    ):
        learner.meta_grad(learner.init(), support, query)
    strict = dataclasses.replace(learner, if_not_converged="raise", strategy="vmap")
    with pytest.raises(
        RuntimeError, match=r"the SVM dual solver stopped after maxiter=2 iterations"
    ):
        strict.meta_grad(strict.init(), support, query)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_metaoptnet_warns_when_the_backward_linear_solve_stops_short(strategy):
    fm = _model([3, 4, 8], seed=15)
    support, query = _episodes(2, 3, 2, 2, 3, seed=16)
    short = functools.partial(solve_normal_cg, maxiter=1)
    learner = MetaOptNet(fm, ways=3, C=0.5, solve=short, strategy=strategy)
    with pytest.warns(ImplicitSolveWarning, match=r"the linear solve of the implicit gradient"):
        learner.meta_grad(learner.init(), support, query)


# --------------------------------------------------------------------------- all heads


HEADS = {
    "protonet": lambda fm, **kw: ProtoNet(fm, ways=3, **kw),
    "r2d2": lambda fm, **kw: R2D2(fm, ways=3, lam=1.0, **kw),
    "metaoptnet": lambda fm, **kw: MetaOptNet(fm, ways=3, C=1.0, tol=1e-12, maxiter=20000, **kw),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_conv4_backbone_vmap_equals_loop(name):
    torch.manual_seed(17)
    fm = metafunc.functionalize(Conv4(in_channels=1, hidden=4, image_size=16).to(D))
    g = torch.Generator().manual_seed(18)
    y = torch.arange(3).repeat(2, 2)
    support = (torch.randn(2, 6, 1, 16, 16, generator=g, dtype=D), y)
    query = (torch.randn(2, 6, 1, 16, 16, generator=g, dtype=D), y)
    vm = HEADS[name](fm, strategy="vmap")
    lp = HEADS[name](fm, strategy="loop")
    got, expected = vm.meta_grad(vm.init(), support, query), lp.meta_grad(lp.init(), support, query)
    _close(got, expected, rtol=1e-7, atol=1e-10)
    for k, v in got[0]["params"].items():
        assert v.abs().max() > 0, k


@pytest.mark.parametrize("name", sorted(HEADS))
def test_targets_outside_ways_are_refused(name):
    fm = _model([3, 4, 8], seed=19)
    support, query = _episodes(1, 4, 1, 1, 3, seed=20)
    learner = HEADS[name](fm)
    with pytest.raises(ValueError, match=r"support targets range over \[0, 3\], but ways=3"):
        learner.meta_grad(learner.init(), support, query)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda fm: ProtoNet(fm, ways=1),
            r"ProtoNet\(model, \.\.\.\): expected ways to be an int >= 2",
        ),
        (lambda fm: R2D2(fm, lam=0.0), r"R2D2\(model, \.\.\.\): expected lam to be positive"),
        (lambda fm: MetaOptNet(fm, C=-1.0), r"expected C to be positive and finite"),
        (lambda fm: MetaOptNet(fm, maxiter=0), r"expected maxiter to be a positive int"),
        (lambda fm: MetaOptNet(fm, if_not_converged="no"), r"expected if_not_converged in"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make(_model([3, 4], seed=0))


def test_the_heads_are_plain_frozen_values():
    fm = _model([3, 4], seed=0)
    learner = R2D2(fm, ways=3)
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"dataclasses.replace"):
        learner.lam = 2.0  # type: ignore[misc]
    assert dataclasses.replace(learner, lam=2.0).init()["head"]["log_lam"].item() == math.log(2)
    assert not isinstance(learner, MAML)
