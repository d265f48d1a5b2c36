"""Learners are plain values: frozen dataclasses whose fields are their configuration, variants
made by ``dataclasses.replace``, learned learning rates as small objects, and the old spellings
(``adapt=``, ``learn_lr="..."``) kept for one release with a warning and the same numbers."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from _algorithms import HEAD, WARP, _close, _fd, _maml_objective, _model, _tasks

import metafunc.optim as mo
from metafunc.algorithms import IMAML, MAML, Leap, PerParamLR, PerStepLR, Reptile, WarpGrad


def _learners(fm):
    return [
        MAML(fm, inner_lr=0.3, steps=2, strategy="vmap"),
        Reptile(fm, inner_lr=0.3, strategy="vmap"),
        IMAML(fm, strategy="vmap"),
        Leap(fm, inner_lr=0.3, strategy="vmap"),
        WarpGrad(fm, warp=WARP, strategy="vmap"),
    ]


def test_learners_refuse_assignment_and_name_the_copy_to_make():
    fm = _model([1, 3, 3, 1])
    for learner in _learners(fm):
        name = type(learner).__name__
        with pytest.raises(
            dataclasses.FrozenInstanceError,
            match=rf"{name}\.steps = \.\.\.: learners are immutable .* learner = "
            r"dataclasses\.replace\(learner, steps=\.\.\.\)",
        ):
            learner.steps = 3  # type: ignore[misc]
    learner = MAML(fm, steps=2, step_weights=[0.5, 0.5])
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"replace\(learner, step_weights="):
        learner.step_weights = [0.0, 1.0]  # type: ignore[misc]
    assert learner.step_weights == (0.5, 0.5)


def test_replace_makes_a_checked_learner_with_the_new_value():
    """``dataclasses.replace`` runs the constructor's checks, and the copy computes with its own
    values (finite differences of a two-step unroll, from a one-step learner)."""
    fm = _model([1, 3, 1], seed=13)
    support, query = _tasks(2, 4, 5, 1, 1, "mse", seed=14)
    one = MAML(fm, inner_lr=0.3, steps=1, strategy="vmap")
    two = dataclasses.replace(one, steps=2)
    assert (one.steps, two.steps) == (1, 2) and two.inner_lr == 0.3
    meta = two.init()
    grads, _ = two.meta_grad(meta, support, query)
    objective = functools.partial(
        _maml_objective, support=support, query=query, kind="mse", lr=lambda m: lambda k, t: 0.3
    )
    _close(grads, _fd(lambda m: objective(m, steps=2), meta))
    with pytest.raises(ValueError, match=r"MAML\(model, \.\.\.\): expected steps to be a positive"):
        dataclasses.replace(one, steps=0)
    with pytest.raises(ValueError, match=r"Leap\(model, \.\.\.\): expected metric in"):
        dataclasses.replace(Leap(fm), metric="area")


def test_learners_compare_and_hash_by_configuration():
    fm = _model([1, 3, 3, 1])
    a, b = MAML(fm, inner_lr=0.1, adapted=HEAD), MAML(fm, inner_lr=0.1, adapted=reversed(HEAD))
    assert a == b and hash(a) == hash(b)
    assert a != MAML(fm, inner_lr=0.2, adapted=HEAD)
    assert a != MAML(_model([1, 3, 3, 1]), inner_lr=0.1, adapted=HEAD)  # another model
    assert len({*_learners(fm), *_learners(fm)}) == 5


def test_inner_lr_and_inner_opt_exclude_each_other_without_a_sentinel():
    """Exactly one of ``inner_lr`` and ``inner_opt`` is set on a learner (no NaN learning
    rate), so a copy of a learner with an optimizer is a valid learner."""
    fm = _model([1, 3, 1])
    adam = mo.adam(lr=0.1)
    for make in (MAML, Reptile, Leap):
        plain, custom = make(fm), make(fm, inner_opt=adam)
        assert plain.inner_lr == 0.01 and plain.inner_opt is None
        assert custom.inner_lr is None and custom.inner_opt is adam
        assert dataclasses.replace(custom, steps=2).inner_opt is adam


def test_learned_learning_rates_are_objects():
    fm = _model([1, 3, 1])
    meta_sgd = MAML(fm, inner_lr=0.2, steps=3, learn_lr=PerParamLR(), strategy="vmap")
    mamlpp = MAML(fm, inner_lr=0.2, steps=3, learn_lr=PerStepLR(), strategy="vmap")
    params = fm.params
    for k, rate in meta_sgd.init()["lr"].items():
        assert rate.shape == params[k].shape and torch.all(rate == 0.2) and rate.requires_grad
    for rate in mamlpp.init()["lr"].values():
        assert rate.shape == (3,) and torch.all(rate == 0.2) and rate.requires_grad
    with pytest.raises(TypeError, match=r"expected learn_lr to be None, .*PerParamLR\(\).*got 1"):
        MAML(fm, learn_lr=1)
    with pytest.raises(ValueError, match=r"expected learn_lr to be None, .* got 'per_layer'"):
        MAML(fm, learn_lr="per_layer")


def _meta_grad(learner, support, query):
    meta = learner.init()
    if "lr" in meta:  # rates that differ across entries and steps
        g = torch.Generator().manual_seed(1)
        meta["lr"] = {k: 0.1 + 0.3 * torch.rand(v.shape, generator=g, dtype=v.dtype)
                      for k, v in meta["lr"].items()}  # fmt: skip
    return learner.meta_grad(meta, support, query)


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ({"adapt": list(reversed(HEAD))}, {"adapted": HEAD}, "adapted="),
        ({"learn_lr": "per_param"}, {"learn_lr": PerParamLR()}, r"PerParamLR\(\)"),
        ({"learn_lr": "per_layer_per_step"}, {"learn_lr": PerStepLR()}, r"PerStepLR\(\)"),
    ],
)
def test_old_spellings_warn_name_the_new_one_and_give_the_same_learner(old, new, names):
    fm = _model([1, 3, 1], seed=5)
    support, query = _tasks(2, 4, 5, 1, 1, "mse", seed=6)
    with pytest.warns(DeprecationWarning, match=rf"MAML\(model, \.\.\.\): .*{names}") as seen:
        before = MAML(fm, inner_lr=0.2, steps=2, strategy="vmap", **old)
    assert [w.filename for w in seen] == [__file__]  # the warning points at the caller
    after = MAML(fm, inner_lr=0.2, steps=2, strategy="vmap", **new)
    assert before == after
    (g_old, m_old), (g_new, m_new) = (_meta_grad(x, support, query) for x in (before, after))
    _close(g_old, g_new, rtol=0, atol=0)
    _close(m_old, m_new, rtol=0, atol=0)


def test_adapt_and_adapted_together_are_refused():
    fm = _model([1, 3, 1])
    with pytest.raises(TypeError, match=r"got adapt= and adapted=; .* Pass adapted only"):
        MAML(fm, adapt=HEAD, adapted=HEAD)


def test_a_warpgrad_copy_starts_with_an_empty_buffer():
    fm = _model([1, 3, 3, 1], seed=23)
    support, query = _tasks(2, 4, 5, 1, 1, "mse", seed=24)
    learner = WarpGrad(fm, warp=WARP, steps=2, replay=4, strategy="vmap")
    learner.meta_grad(learner.init(), support, query)
    copy = dataclasses.replace(learner, replay=2)
    assert len(learner.buffer) == 4 and len(copy.buffer) == 0 and copy.replay == 2


def test_annealed_copies_share_one_compiled_graph():
    """MAML++ anneals its step weights by a new learner each meta-step: with the learner an
    input of the compiled step (as the runner does), every copy runs the one graph, and the
    compiled meta-gradient is the eager one of that copy."""
    fm = _model([1, 3, 1], seed=11)
    support, query = _tasks(2, 4, 5, 1, 1, "mse", seed=12)
    learner = MAML(
        fm, inner_lr=0.2, steps=2, learn_lr=PerStepLR(), step_weights=[0.0, 1.0], strategy="vmap"
    )
    meta = learner.init()
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    compiled = torch.compile(
        lambda lrn, m, s, q: lrn.meta_grad(m, s, q), backend="aot_eager", fullgraph=True
    )
    results = []
    for weights in ([0.0, 1.0], [0.5, 0.5], [0.9, 0.1]):
        learner = learner.with_step_weights(weights)
        got, _ = compiled(learner, meta, support, query)
        want, _ = learner.meta_grad(meta, support, query)
        _close(got, want, rtol=1e-12, atol=1e-14)
        results.append(got["params"]["0.weight"])
    assert stats["unique_graphs"] - before == 1
    assert not torch.equal(results[0], results[-1])
