"""``metafunc.data``: sinusoid tasks, class splits, episode sampling, Omniglot, procedural glyphs.

Oracles are written here, independently of the library: ``math.sin`` per point for the sinusoid
targets; a dataset whose inputs encode their own row index (so every sampled example can be traced
back to its row and class); PNG files drawn here with known rectangles, whose expected tensors are
built by hand (inversion, counter-clockwise rotation by index arithmetic, area resizing by block
means); a nearest-class-mean classifier for the procedural glyphs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metafunc
import metafunc.data
from metafunc.data import (
    OMNIGLOT_SPLIT,
    Episode,
    EpisodeSampler,
    LabelledImages,
    Sinusoid,
    load_omniglot,
    procedural_glyphs,
    split_classes,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: a second intra-op thread only adds wake-up latency on a busy 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(parts) -> list[int]:
    return [c for part in parts for c in part]


# ------------------------------------------------------------------------------------ sinusoid
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinusoid_shapes_dtype_device_ranges(device, dtype):
    episode = Sinusoid().sample(50, 10, 15, generator=_gen(0), dtype=dtype, device=device)
    assert isinstance(episode, Episode)
    (xs, ys), (xq, yq) = episode.support, episode.query
    assert xs.shape == ys.shape == (50, 10, 1)
    assert xq.shape == yq.shape == (50, 15, 1)
    amplitude, phase = episode.info["amplitude"], episode.info["phase"]
    assert amplitude.shape == phase.shape == (50,)
    for t in (xs, ys, xq, yq, amplitude, phase):
        assert t.dtype == dtype and t.device.type == torch.device(device).type
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    x = torch.cat([xs, xq], dim=1)
    assert -5.0 <= x.min() and x.max() <= 5.0
    assert (ys.abs() <= amplitude[:, None, None] + 1e-6).all()


def test_sinusoid_default_queries_and_spread():
    episode = Sinusoid().sample(4000, 5, generator=_gen(1), dtype=torch.float64)
    assert episode.query[0].shape == (4000, 5, 1)
    amplitude, phase = episode.info["amplitude"], episode.info["phase"]
    x = episode.support[0]
    # uniform draws: the means sit at the middle of the ranges, the extremes near the bounds
    assert abs(amplitude.mean().item() - 2.55) < 0.1
    assert abs(phase.mean().item() - math.pi / 2) < 0.1
    assert abs(x.mean().item()) < 0.1
    assert amplitude.min() < 0.2 and amplitude.max() > 4.9
    assert x.min() < -4.99 and x.max() > 4.99


@given(
    num_tasks=st.integers(1, 6),
    shots=st.integers(1, 7),
    queries=st.integers(0, 7),
    amplitude=st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 3.0)).map(sorted),
    x_low=st.floats(-10.0, 10.0),
    x_width=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**31),
)
def test_sinusoid_any_shapes_and_ranges(num_tasks, shots, queries, amplitude, x_low, x_width, seed):
    tasks = Sinusoid(amplitude=tuple(amplitude), x_range=(x_low, x_low + x_width))
    episode = tasks.sample(num_tasks, shots, queries, generator=_gen(seed), dtype=torch.float64)
    assert episode.support[0].shape == (num_tasks, shots, 1)
    assert episode.query[1].shape == (num_tasks, queries, 1)
    a = episode.info["amplitude"]
    assert (a >= amplitude[0]).all() and (a <= amplitude[1]).all()
    x = torch.cat([episode.support[0], episode.query[0]], dim=1)
    assert (x >= x_low).all() and (x <= x_low + x_width).all()


def test_sinusoid_targets_match_independent_formula():
    episode = Sinusoid().sample(6, 4, 3, generator=_gen(2), dtype=torch.float64)
    amplitude, phase = episode.info["amplitude"].tolist(), episode.info["phase"].tolist()
    for x, y in (episode.support, episode.query):
        for t in range(6):
            for i in range(x.shape[1]):
                expected = amplitude[t] * math.sin(x[t, i, 0].item() - phase[t])
                assert y[t, i, 0].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_sinusoid_determinism_per_seed():
    tasks = Sinusoid()
    a = tasks.sample(5, 10, generator=_gen(7))
    b = tasks.sample(5, 10, generator=_gen(7))
    c = tasks.sample(5, 10, generator=_gen(8))
    for ta, tb, tc in zip(
        (*a.support, *a.query, *a.info.values()),
        (*b.support, *b.query, *b.info.values()),
        (*c.support, *c.query, *c.info.values()),
    ):
        assert torch.equal(ta, tb)
        assert not torch.equal(ta, tc)
    # the same draws whatever the number of query points or the dtype
    d = tasks.sample(5, 10, 30, generator=_gen(7), dtype=torch.float64)
    assert torch.equal(d.support[0].float(), a.support[0])
    assert torch.equal(d.info["phase"].float(), a.info["phase"])
    # a generator carries on: two successive draws differ
    g = _gen(7)
    first, second = tasks.sample(5, 10, generator=g), tasks.sample(5, 10, generator=g)
    assert torch.equal(first.support[0], a.support[0])
    assert not torch.equal(first.support[0], second.support[0])


def test_sinusoid_evaluate_broadcasts_per_task():
    x = torch.linspace(-5, 5, 7, dtype=torch.float64).expand(3, 7).unsqueeze(-1)
    amplitude = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    phase = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y = Sinusoid.evaluate(x, amplitude, phase)
    assert y.shape == (3, 7, 1)
    for t in range(3):
        for i in range(7):
            expected = amplitude[t].item() * math.sin(x[t, i, 0].item() - phase[t].item())
            assert y[t, i, 0].item() == pytest.approx(expected, abs=1e-12)
    assert Sinusoid.evaluate(torch.tensor([0.0]), 2.0, -math.pi / 2).item() == pytest.approx(2.0)
    episode = Sinusoid().sample(3, 5, generator=_gen(0))
    assert torch.equal(Sinusoid.evaluate(episode.query[0], **episode.info), episode.query[1])


def test_sinusoid_episode_feeds_vmap_tasks():
    episode = Sinusoid().sample(8, 5, generator=_gen(0), dtype=torch.float64)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def task_loss(w, support, query, info):  # per task: 0-d amplitude, (5, 1) points
        fitted = w * Sinusoid.evaluate(support[0], info["amplitude"], info["phase"])
        return ((fitted - support[1]) ** 2).mean() + 0 * query[0].sum()

    losses = metafunc.vmap_tasks(task_loss, in_dims=(None, 0, 0, 0), strategy="vmap")(
        w, episode.support, episode.query, episode.info
    )
    expected = torch.stack([((w - 1) ** 2 * episode.support[1][t] ** 2).mean() for t in range(8)])
    torch.testing.assert_close(losses, expected)


def test_sinusoid_errors():
    with pytest.raises(ValueError, match=r"Sinusoid\(amplitude=.*low <= high"):
        Sinusoid(amplitude=(5.0, 0.1))
    with pytest.raises(TypeError, match=r"x_range to be a \(low, high\) pair"):
        Sinusoid(x_range=5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        Sinusoid(phase=(0.0, math.inf))
    tasks = Sinusoid()
    with pytest.raises(ValueError, match=r"Sinusoid.sample.*num_tasks to be an int >= 1, got 0"):
        tasks.sample(0, 5, generator=_gen(0))
    with pytest.raises(TypeError, match=r"shots to be an int >= 1, got 2.5"):
        tasks.sample(2, 2.5, generator=_gen(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queries to be an int >= 0"):
        tasks.sample(2, 2, -1, generator=_gen(0))
    with pytest.raises(TypeError, match=r"generator to be a torch.Generator.*manual_seed"):
        tasks.sample(2, 2, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"floating-point torch.dtype"):
        tasks.sample(2, 2, generator=_gen(0), dtype=torch.int64)
    with pytest.raises(TypeError, match="device"):
        tasks.sample(2, 2, generator=_gen(0), device=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leading dims of x"):
        Sinusoid.evaluate(torch.zeros(3, 5, 1), torch.ones(4), torch.zeros(4))
    with pytest.raises(TypeError, match="x to be a tensor"):
        Sinusoid.evaluate([1.0], 1.0, 0.0)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- labelled datasets
def _indexed(counts: list[int], *, shape=(1, 2, 2), device="cpu") -> LabelledImages:
    """A dataset whose row ``i`` is filled with the value ``i``; class ``c`` has ``counts[c]``
    rows, interleaved with the other classes (rows are not grouped by class)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=_gen(0))]
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, *shape)
    names = [f"class{c}" for c in range(len(counts))]
    return LabelledImages(images.contiguous().to(device), labels.to(device), names)


def _row(x: torch.Tensor) -> torch.Tensor:
    """The dataset rows of sampled inputs of :func:`_indexed`."""
    return x.flatten(start_dim=x.dim() - 3)[..., 0].long()


def test_labelled_images_defaults_and_checks():
    data = LabelledImages(torch.zeros(4, 1, 3, 3), torch.tensor([0, 2, 2, 1], dtype=torch.int32))
    assert data.labels.dtype == torch.long
    assert data.class_names == ["0", "1", "2"] and data.num_classes == 3 and len(data) == 4
    assert data.class_groups is None
    assert repr(data) == "LabelledImages(4 images of shape (1, 3, 3), 3 classes)"
    # more names than labels used: classes may be empty
    assert LabelledImages(torch.zeros(1, 1, 2, 2), torch.tensor([0]), ["a", "b"]).num_classes == 2
    with pytest.raises(TypeError, match=r"images to be a 4-d tensor.*unsqueeze\(1\)"):
        LabelledImages(torch.zeros(4, 3, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="floating point"):
        LabelledImages(torch.zeros(4, 1, 3, 3, dtype=torch.uint8), torch.zeros(4).long())
    with pytest.raises(TypeError, match="1-d integer tensor"):
        LabelledImages(torch.zeros(4, 1, 3, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="4 images and 3 labels"):
        LabelledImages(torch.zeros(4, 1, 3, 3), torch.zeros(3).long())
    with pytest.raises(ValueError, match="labels >= 0"):
        LabelledImages(torch.zeros(2, 1, 3, 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="1 class_names but labels up to 2"):
        LabelledImages(torch.zeros(2, 1, 3, 3), torch.tensor([0, 2]), ["a"])
    with pytest.raises(ValueError, match=r"distinct class_names.*\['a'\]"):
        LabelledImages(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1]), ["a", "a"])
    with pytest.raises(TypeError, match="class_names to be a list of str"):
        LabelledImages(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1]), "ab")
    with pytest.raises(ValueError, match="class_groups to have one entry per class"):
        LabelledImages(torch.zeros(2, 1, 3, 3), torch.tensor([0, 1]), class_groups=["g"])


# ------------------------------------------------------------------------------- class splits
def test_split_fractions_disjoint_covering_sorted_and_seeded():
    train, val, test = split_classes(100, (0.7, 0.1, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == list(range(100))
    assert all(s == sorted(s) for s in (train, val, test))
    assert split_classes(100, (0.7, 0.1, 0.2), seed=0) == (train, val, test)
    assert split_classes(100, (0.7, 0.1, 0.2), seed=1) != (train, val, test)
    # a list of labels, any values
    labels = [10, 20, 30, 40, 50]
    parts = split_classes(labels, (3, 1, 1), seed=3)
    assert sorted(_flat(parts)) == labels and [len(p) for p in parts] == [3, 1, 1]
    # a label tensor, and one None for the rest
    parts = split_classes(torch.tensor([5, 6, 7, 8]), (1, None, 1), seed=3)
    assert [len(p) for p in parts] == [1, 2, 1] and sorted(_flat(parts)) == [5, 6, 7, 8]


@given(
    num_classes=st.integers(1, 60),
    weights=st.tuples(*[st.integers(0, 10)] * 3).filter(lambda w: sum(w) > 0),
    seed=st.integers(0, 1000),
)
def test_split_fractions_any(num_classes, weights, seed):
    fractions = tuple(w / sum(weights) for w in weights)
    parts = split_classes(num_classes, fractions, seed=seed)
    assert sorted(_flat(parts)) == list(range(num_classes))
    for part, f in zip(parts, fractions):
        assert abs(len(part) - f * num_classes) < 1  # rounded to a neighbouring whole count


@given(num_groups=st.integers(1, 30), per_group=st.integers(1, 4), seed=st.integers(0, 1000))
def test_split_groups_stay_together(num_groups, per_group, seed):
    groups = [f"char{c // per_group}" for c in range(num_groups * per_group)]
    parts = split_classes(len(groups), (0.5, 0.25, 0.25), seed=seed, groups=groups)
    assert sorted(_flat(parts)) == list(range(len(groups)))
    where = {}
    for i, part in enumerate(parts):
        for c in part:
            assert where.setdefault(groups[c], i) == i  # every class of a group in one split
    assert sum(len(p) for p in parts) == num_groups * per_group


def test_split_omniglot_convention_counts_characters():
    groups = [c // 4 for c in range(1623 * 4)]  # 1623 characters, 4 rotations each
    train, val, test = split_classes(len(groups), OMNIGLOT_SPLIT, seed=0, groups=groups)
    assert (len(train), len(val), len(test)) == (4800, 0, 423 * 4)
    assert {c // 4 for c in train}.isdisjoint({c // 4 for c in test})
    # a LabelledImages brings its own groups
    data = LabelledImages(
        torch.zeros(8, 1, 2, 2), torch.arange(8), class_groups=[str(c // 4) for c in range(8)]
    )
    train, val, test = split_classes(data, (1, 0, 1), seed=0)
    assert sorted([train, test]) == [[0, 1, 2, 3], [4, 5, 6, 7]] and val == []


def test_split_errors():
    with pytest.raises(ValueError, match=r"split_classes.*fractions >= 0 summing to 1"):
        split_classes(10, (0.5, 0.2, 0.2), seed=0)
    with pytest.raises(ValueError, match="must add up to the number of classes, 10"):
        split_classes(10, (5, 2, 2), seed=0)
    with pytest.raises(ValueError, match=r"number of groups, 2 \(at most\)"):
        split_classes(4, (2, 1, None), seed=0, groups=[0, 0, 1, 1])
    with pytest.raises(TypeError, match="at most one None"):
        split_classes(10, (5, None, None), seed=0)
    with pytest.raises(ValueError, match="counts >= 0"):
        split_classes(10, (11, -1, 0), seed=0)
    with pytest.raises(TypeError, match=r"three numbers \(train, val, test\)"):
        split_classes(10, (0.5, 0.5), seed=0)
    with pytest.raises(TypeError, match="number of classes, a list of integer labels"):
        split_classes("abc", (1, 1, 1), seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="classes to be an int >= 1"):
        split_classes(0, (1.0, 0.0, 0.0), seed=0)
    with pytest.raises(ValueError, match="distinct classes"):
        split_classes([1, 1, 2], (1, 1, None), seed=0)
    with pytest.raises(ValueError, match="one group key per class, 3, got 2"):
        split_classes(3, (1, 1, 1), seed=0, groups=[0, 1])
    with pytest.raises(TypeError, match="seed to be an int"):
        split_classes(3, (1, 1, 1), seed=None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ episode sampler
def _check_episode(episode, data, classes, ways, shots, queries, num_tasks):
    (xs, ys), (xq, yq) = episode.support, episode.query
    assert xs.shape == (num_tasks, ways * shots, *data.images.shape[1:])
    assert xq.shape == (num_tasks, ways * queries, *data.images.shape[1:])
    assert ys.dtype == yq.dtype == torch.long
    for y, per_class in ((ys, shots), (yq, queries)):
        expected = torch.arange(ways).repeat_interleave(per_class).expand(num_tasks, -1)
        assert torch.equal(y.cpu(), expected)
    chosen = episode.info["classes"].cpu()
    rows_s, rows_q = _row(xs).cpu(), _row(xq).cpu()
    assert torch.equal(rows_s, episode.info["support_indices"].cpu())
    assert torch.equal(rows_q, episode.info["query_indices"].cpu())
    labels = data.labels.cpu()
    for t in range(num_tasks):
        task_classes = chosen[t].tolist()
        assert len(set(task_classes)) == ways and set(task_classes) <= set(classes)
        # every example carries the dataset class of its new label
        assert torch.equal(labels[rows_s[t]], chosen[t][ys[t].cpu()])
        assert torch.equal(labels[rows_q[t]], chosen[t][yq[t].cpu()])
        rows = rows_s[t].tolist() + rows_q[t].tolist()
        assert len(set(rows)) == len(rows)  # no example twice, none in both support and query


def test_sampler_shapes_labels_disjoint(device):
    data = _indexed([7, 9, 6, 8, 10, 6, 7], device=device)
    classes = [0, 2, 3, 5, 6]
    sampler = EpisodeSampler(data, classes, ways=3, shots=2, queries=4)
    episode = sampler.sample(20, generator=_gen(0))
    for t in (*episode.support, *episode.query, *episode.info.values()):
        assert t.device.type == torch.device(device).type
    _check_episode(episode, data, classes, 3, 2, 4, 20)
    assert repr(sampler) == "EpisodeSampler(5 classes, ways=3, shots=2, queries=4)"
    assert sampler.classes == classes


@given(
    counts=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    ways=st.integers(1, 4),
    shots=st.integers(1, 3),
    queries=st.integers(0, 3),
    num_tasks=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_sampler_any_shapes(counts, ways, shots, queries, num_tasks, seed):
    data = _indexed(counts)
    eligible = [c for c, n in enumerate(counts) if n >= shots + queries]
    if len(eligible) < ways:
        with pytest.raises(ValueError):
            EpisodeSampler(data, None, ways=ways, shots=shots, queries=queries)
        return
    sampler = EpisodeSampler(data, eligible, ways=ways, shots=shots, queries=queries)
    episode = sampler.sample(num_tasks, generator=_gen(seed))
    _check_episode(episode, data, eligible, ways, shots, queries, num_tasks)


def test_sampler_covers_classes_orders_and_examples():
    data = _indexed([5, 12, 5, 5, 30])
    sampler = EpisodeSampler(data, None, ways=3, shots=1, queries=1)
    episode = sampler.sample(2000, generator=_gen(0))
    chosen = episode.info["classes"]
    # label 0 goes to every class: the class order is random per task
    assert set(chosen[:, 0].tolist()) == {0, 1, 2, 3, 4}
    counts = torch.bincount(chosen.flatten(), minlength=5).float() / chosen.numel()
    assert torch.allclose(counts, torch.full((5,), 0.2), atol=0.03)  # classes drawn uniformly
    # every example of every class gets drawn, uniformly within its class
    rows = torch.cat([episode.info["support_indices"], episode.info["query_indices"]], 1)
    hits = torch.bincount(rows.flatten(), minlength=len(data))
    assert (hits > 0).all()
    big = (data.labels == 4).nonzero().flatten()
    assert hits[big].float().std() / hits[big].float().mean() < 0.35


def test_sampler_plain_tensors_any_labels():
    inputs = torch.arange(30.0).view(10, 3)  # rows of 3 features, row i holds 3i, 3i+1, 3i+2
    labels = torch.tensor([7, 3, 7, 3, 11, 7, 3, 11, 11, 7])
    sampler = EpisodeSampler((inputs, labels), ways=2, shots=1, queries=2)
    assert sampler.classes == [3, 7, 11]
    episode = sampler.sample(50, generator=_gen(0))
    xs, ys = episode.support
    assert xs.shape == (50, 2, 3) and ys.shape == (50, 2)
    rows = (xs[..., 0] / 3).long()
    assert torch.equal(labels[rows], episode.info["classes"])
    assert set(episode.info["classes"].flatten().tolist()) == {3, 7, 11}


def test_sampler_determinism():
    data = _indexed([6] * 10)
    sampler = EpisodeSampler(data, range(10), ways=5, shots=2, queries=3)
    a = sampler.sample(8, generator=_gen(4))
    b = sampler.sample(8, generator=_gen(4))
    c = sampler.sample(8, generator=_gen(5))
    assert all(torch.equal(x, y) for x, y in zip(a.support + a.query, b.support + b.query))
    assert torch.equal(a.info["classes"], b.info["classes"])
    assert not torch.equal(a.support[0], c.support[0])
    again = EpisodeSampler(data, range(10), ways=5, shots=2, queries=3).sample(8, generator=_gen(4))
    assert torch.equal(again.query[0], a.query[0])


def test_sampler_episode_feeds_vmap_tasks():
    """A prototype classifier per task, vmapped over the episode, equals a loop over tasks."""
    data = procedural_glyphs(10, 6, seed=0)
    episode = EpisodeSampler(data, None, ways=4, shots=2, queries=3).sample(5, generator=_gen(0))

    def accuracy(support, query):
        (xs, _), (xq, yq) = support, query
        prototypes = xs.flatten(1).view(4, 2, -1).mean(1)  # examples ordered by label
        predictions = torch.cdist(xq.flatten(1), prototypes).argmin(1)
        return (predictions == yq).float().mean()

    vmapped = metafunc.vmap_tasks(accuracy, strategy="vmap")(episode.support, episode.query)
    looped = metafunc.vmap_tasks(accuracy, strategy="loop")(episode.support, episode.query)
    torch.testing.assert_close(vmapped, looped)
    assert vmapped.shape == (5,) and vmapped.mean() > 0.5  # chance is 0.25


def test_sampler_errors():
    data = _indexed([5, 2, 5, 3])
    with pytest.raises(ValueError, match=r"3 classes given, fewer than ways=4"):
        EpisodeSampler(data, [0, 2, 3], ways=4, shots=1, queries=1)
    with pytest.raises(
        ValueError,
        match=r"shots \+ queries = 2 \+ 2 = 4 examples; 2 have fewer \('class1' \(label 1\): 2, "
        r"'class3' \(label 3\): 3 examples\)",
    ):
        EpisodeSampler(data, None, ways=2, shots=2, queries=2)
    with pytest.raises(ValueError, match=r"label 9: 0"):
        EpisodeSampler(data, [0, 9], ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="distinct classes"):
        EpisodeSampler(data, [0, 0, 2], ways=2, shots=1, queries=1)
    with pytest.raises(TypeError, match="LabelledImages or an \\(inputs, labels\\) pair"):
        EpisodeSampler(torch.zeros(3), None, ways=1, shots=1, queries=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"labels \(dataset\[1\]\) to be a 1-d integer tensor"):
        EpisodeSampler((torch.zeros(3), torch.zeros(3)), None, ways=1, shots=1, queries=1)
    with pytest.raises(ValueError, match="one row per label"):
        EpisodeSampler((torch.zeros(3), torch.zeros(4).long()), None, ways=1, shots=1, queries=1)
    with pytest.raises(TypeError, match="classes to be a list of integer labels"):
        EpisodeSampler(data, "01", ways=1, shots=1, queries=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ways to be an int >= 1, got 0"):
        EpisodeSampler(data, None, ways=0, shots=1, queries=1)
    with pytest.raises(TypeError, match="shots to be an int"):
        EpisodeSampler(data, None, ways=1, shots=True, queries=1)  # type: ignore[arg-type]
    sampler = EpisodeSampler(data, None, ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"EpisodeSampler.sample.*num_tasks to be an int >= 1"):
        sampler.sample(0, generator=_gen(0))
    with pytest.raises(TypeError, match=r"generator to be a torch.Generator"):
        sampler.sample(1, generator=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- omniglot
SIDE = 105  # Omniglot drawings are 105 x 105


def _rect(a: int, c: int, d: int) -> tuple[int, int, int, int]:
    """The black rectangle (top, left, bottom, right; inclusive) of drawing d of character c of
    alphabet a: off-centre and not square, so that each rotation is told apart."""
    top, left = 6 + 11 * d, 9 + 8 * c + 20 * a
    return top, left, top + 9, left + 24


def _write_omniglot(root: Path, alphabets=("Alpha", "Beta"), characters=3, drawings=4, mode="1"):
    from PIL import Image, ImageDraw

    for a, alphabet in enumerate(alphabets):
        for c in range(characters):
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                image = Image.new(mode, (SIDE, SIDE), 255 if mode == "L" else 1)
                top, left, bottom, right = _rect(a, c, d)
                ImageDraw.Draw(image).rectangle([left, top, right, bottom], fill=0)
                image.save(folder / f"{1000 + 20 * c + d}_{d + 1:02d}.png")
    return root


def _expected(a: int, c: int, d: int) -> torch.Tensor:
    """The unrotated, unresized drawing as the loader must give it: strokes 1, paper 0."""
    top, left, bottom, right = _rect(a, c, d)
    image = torch.zeros(SIDE, SIDE)
    image[top : bottom + 1, left : right + 1] = 1.0
    return image


def _of_class(data: LabelledImages, name: str) -> torch.Tensor:
    return data.images[data.labels == data.class_names.index(name), 0]


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    return _write_omniglot(tmp_path_factory.mktemp("omniglot") / "images_background")


def test_omniglot_classes_names_groups(omniglot_root):
    data = load_omniglot(omniglot_root)
    assert data.num_classes == 2 * 3 * 4 and len(data) == 2 * 3 * 4 * 4
    assert data.images.shape[1:] == (1, 28, 28) and data.images.dtype == torch.float32
    assert torch.equal(data.labels, torch.arange(24).repeat_interleave(4))
    assert data.class_names[:5] == [
        "Alpha/character01/rot0",
        "Alpha/character01/rot90",
        "Alpha/character01/rot180",
        "Alpha/character01/rot270",
        "Alpha/character02/rot0",
    ]
    assert data.class_names[-1] == "Beta/character03/rot270"
    assert data.class_groups is not None
    assert data.class_groups[:5] == ["Alpha/character01"] * 4 + ["Alpha/character02"]
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    # the parent folder of images_background is accepted as well
    parent = load_omniglot(omniglot_root.parent, rotations=(0,))
    assert parent.num_classes == 6 and parent.class_names[0] == "Alpha/character01/rot0"


def test_omniglot_content_inversion_and_rotations(omniglot_root):
    data = load_omniglot(omniglot_root, image_size=SIDE)
    for a, alphabet in enumerate(("Alpha", "Beta")):
        for c in range(3):
            name = f"{alphabet}/character{c + 1:02d}"
            upright = _of_class(data, f"{name}/rot0")
            for d in range(4):
                assert torch.equal(upright[d], _expected(a, c, d))  # exact: 1-bit strokes are 1
            for angle in (90, 180, 270):
                rotated = _of_class(data, f"{name}/rot{angle}")
                assert torch.equal(rotated, torch.rot90(upright, angle // 90, dims=(-2, -1)))
            # counter-clockwise: pixel (r, c) of the drawing lands at (SIDE - 1 - c, r)
            r, col = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
            by_hand = torch.zeros(SIDE, SIDE)
            by_hand[SIDE - 1 - col, r] = _expected(a, c, 0)
            assert torch.equal(_of_class(data, f"{name}/rot90")[0], by_hand)


def test_omniglot_resizing_is_area_averaging(omniglot_root):
    data = load_omniglot(omniglot_root, rotations=(0, 90), image_size=35)  # 105 = 3 * 35
    block_means = _expected(1, 2, 3).view(35, 3, 35, 3).mean(dim=(1, 3))
    upright = _of_class(data, "Beta/character03/rot0")[3]
    torch.testing.assert_close(upright, block_means)
    torch.testing.assert_close(
        _of_class(data, "Beta/character03/rot90")[3], torch.rot90(block_means, 1, dims=(0, 1))
    )
    # 28 x 28 (105 / 28 = 3.75: area bins overlap by a pixel, so ink is about conserved)
    small = load_omniglot(omniglot_root, rotations=(0,))
    assert small.images.shape == (24, 1, 28, 28)
    ink = small.images[small.labels == 0].sum(dim=(1, 2, 3)) * (SIDE / 28) ** 2
    expected = torch.stack([_expected(0, 0, d).sum() for d in range(4)])
    torch.testing.assert_close(ink, expected, rtol=0.1, atol=0.0)
    top, left, bottom, right = (round(v * 28 / SIDE) for v in _rect(0, 0, 0))
    assert small.images[0, 0, top + 1 : bottom, left + 1 : right].min() > 0.99  # inside: ink
    assert small.images[0, 0, bottom + 2 :].max() == 0  # below: paper


def test_omniglot_greyscale_and_both_folders(tmp_path):
    from PIL import Image

    _write_omniglot(tmp_path / "images_background", ("Alpha",), 2, 2, mode="L")
    _write_omniglot(tmp_path / "images_evaluation", ("Gamma",), 1, 2, mode="L")
    grey = tmp_path / "images_evaluation" / "Gamma" / "character01"
    Image.new("L", (SIDE, SIDE), 51).save(grey / "9999_03.png")  # a grey drawing: 1 - 0.2
    Image.new("L", (2 * SIDE, 2 * SIDE), 0).save(grey / "9999_04.png")  # a larger, all ink
    data = load_omniglot(tmp_path, rotations=(0, 180), image_size=SIDE)
    assert data.class_names == [
        "Alpha/character01/rot0",
        "Alpha/character01/rot180",
        "Alpha/character02/rot0",
        "Alpha/character02/rot180",
        "Gamma/character01/rot0",
        "Gamma/character01/rot180",
    ]
    assert torch.equal(_of_class(data, "Alpha/character02/rot0")[1], _expected(0, 1, 1))
    gamma = _of_class(data, "Gamma/character01/rot0")
    assert gamma.shape == (4, SIDE, SIDE)
    torch.testing.assert_close(gamma[2], torch.full((SIDE, SIDE), 1 - 51 / 255))
    assert torch.equal(gamma[3], torch.ones(SIDE, SIDE))  # resized to image_size like the rest
    # rotations of one character stay in one split
    train, val, test = split_classes(data, (1, 1, 1), seed=0)
    for part in (train, val, test):
        assert (
            len(part) == 2
            and data.class_names[part[0]].rsplit("/", 1)[0]
            == (data.class_names[part[1]].rsplit("/", 1)[0])
        )


def test_omniglot_split_keeps_rotations_together(omniglot_root):
    data = load_omniglot(omniglot_root)
    for seed in range(5):
        parts = split_classes(data, (0.5, 0.0, 0.5), seed=seed)
        assert sorted(_flat(parts)) == list(range(24))
        characters = [{data.class_names[c].rsplit("/", 1)[0] for c in p} for p in parts]
        assert characters[0].isdisjoint(characters[2])
        assert len(parts[0]) == 12 and len(characters[0]) == 3
    sampler = EpisodeSampler(data, parts[0], ways=5, shots=1, queries=3)
    assert sampler.sample(2, generator=_gen(0)).support[0].shape == (2, 5, 1, 28, 28)


def test_omniglot_errors(tmp_path, omniglot_root, monkeypatch):
    layout = r"<path>/<alphabet>/<character>/\*\.png"
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"omniglot.*nowhere.*does not exist.*{layout}"):
        load_omniglot(missing)
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"file.zip.*is a file, not a folder"):
        load_omniglot(tmp_path / "file.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"empty.*is empty.*{layout}"):
        load_omniglot(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"PNG files directly.*one character's folder"):
        load_omniglot(omniglot_root / "Alpha" / "character01")
    with pytest.raises(ValueError, match=r"PNG files directly, one level too shallow"):
        load_omniglot(omniglot_root / "Alpha")
    (tmp_path / "nopng" / "Alpha" / "character01").mkdir(parents=True)
    (tmp_path / "nopng" / "Alpha" / "character01" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"character01.*holds no \.png files"):
        load_omniglot(tmp_path / "nopng")
    deep = _write_omniglot(tmp_path / "deep" / "python" / "omniglot", ("Alpha",), 1, 1)
    with pytest.raises(ValueError, match="one level too high"):
        load_omniglot(deep.parent.parent)
    (tmp_path / "noletters" / "Alpha").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no character folders"):
        load_omniglot(tmp_path / "noletters")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no alphabet folders"):
        load_omniglot(tmp_path / "loose")
    broken = _write_omniglot(tmp_path / "broken", ("Alpha",), 1, 1)
    (broken / "Alpha" / "character01" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.png"):
        load_omniglot(broken)
    twice = tmp_path / "twice"
    _write_omniglot(twice / "images_background", ("Alpha",), 1, 1)
    _write_omniglot(twice / "images_evaluation", ("Alpha",), 1, 1)
    with pytest.raises(ValueError, match="'Alpha/character01' is in two folders"):
        load_omniglot(twice)
    with pytest.raises(ValueError, match=r"distinct rotations among 0, 90, 180 and 270.*45"):
        load_omniglot(omniglot_root, rotations=(0, 45))
    with pytest.raises(ValueError, match="distinct rotations"):
        load_omniglot(omniglot_root, rotations=(90, 90))
    with pytest.raises(TypeError, match="rotations to be a non-empty tuple"):
        load_omniglot(omniglot_root, rotations=())
    with pytest.raises(ValueError, match="image_size to be an int >= 1, got 0"):
        load_omniglot(omniglot_root, image_size=0)
    with pytest.raises(TypeError, match=r"path to be a str or os.PathLike"):
        load_omniglot(3)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_omniglot(omniglot_root)


# ------------------------------------------------------------------------- procedural glyphs
def test_glyphs_shape_range_labels():
    data = procedural_glyphs(7, 5, seed=0)
    assert data.images.shape == (35, 1, 28, 28) and data.images.dtype == torch.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert torch.equal(data.labels, torch.arange(7).repeat_interleave(5))
    assert data.class_names == [f"glyph{c}" for c in range(7)] and data.class_groups is None
    ink = data.images.mean(dim=(1, 2, 3))
    assert (ink > 0.03).all() and (ink < 0.4).all()  # strokes on a dark background
    # noise-free pixels are mostly exact paper (0) or ink (1): strokes, not blobs
    clean = procedural_glyphs(7, 5, seed=0, noise=0.0).images
    assert ((clean == 0) | (clean == 1)).float().mean() > 0.85
    assert procedural_glyphs(3, 2, seed=0, image_size=40).images.shape == (6, 1, 40, 40)
    assert procedural_glyphs(2000, 1, seed=0).images.shape == (2000, 1, 28, 28)  # fast enough


def test_glyphs_determinism():
    a = procedural_glyphs(10, 4, seed=3)
    assert torch.equal(a.images, procedural_glyphs(10, 4, seed=3).images)
    assert not torch.equal(a.images, procedural_glyphs(10, 4, seed=4).images)
    # the glyphs are a function of (seed, num_classes): clean copies are the same classes
    clean = procedural_glyphs(10, 3, seed=3, jitter=0.0, noise=0.0).images
    assert torch.equal(clean[0::3], clean[1::3])  # no jitter: every example is the glyph
    assert torch.equal(clean[0::3], procedural_glyphs(10, 1, seed=3, jitter=0, noise=0).images)
    assert not torch.equal(a.images[0], a.images[1])  # jittered examples differ


def test_glyphs_classes_are_learnable_not_trivial():
    ways = 20
    clean = procedural_glyphs(ways, 1, seed=1, jitter=0.0, noise=0.0).images.flatten(1)
    data = procedural_glyphs(ways, 10, seed=1)
    x = data.images.flatten(1)
    by_template = torch.cdist(x, clean).argmin(1)
    accuracy = (by_template == data.labels).float().mean().item()
    assert 0.6 < accuracy  # chance is 0.05
    # nearest class mean over 5 jittered examples, on 5 others
    examples = data.images.view(ways, 10, -1)
    means = examples[:, :5].mean(1)
    queries = examples[:, 5:].reshape(ways * 5, -1)
    truth = torch.arange(ways).repeat_interleave(5)
    accuracy = (torch.cdist(queries, means).argmin(1) == truth).float().mean().item()
    assert 0.6 < accuracy
    # not trivial: a jittered example is far from its clean glyph, on the scale of the ink
    distance = (x - clean[data.labels]).abs().sum(1)
    assert (distance > 0.3 * clean[data.labels].sum(1)).float().mean() > 0.5


def test_glyphs_errors():
    with pytest.raises(ValueError, match=r"procedural_glyphs.*num_classes to be an int >= 1"):
        procedural_glyphs(0, 5, seed=0)
    with pytest.raises(TypeError, match="examples_per_class to be an int"):
        procedural_glyphs(5, 2.0, seed=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed to be an int"):
        procedural_glyphs(5, 2, seed="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jitter to be a finite number >= 0"):
        procedural_glyphs(5, 2, seed=0, jitter=-1.0)
    with pytest.raises(ValueError, match="noise to be a finite number >= 0"):
        procedural_glyphs(5, 2, seed=0, noise=math.nan)
    with pytest.raises(ValueError, match="image_size"):
        procedural_glyphs(5, 2, seed=0, image_size=0)


def test_public_api():
    assert sorted(metafunc.data.__all__) == sorted(
        [
            "OMNIGLOT_SPLIT",
            "Episode",
            "EpisodeSampler",
            "LabelledImages",
            "Sinusoid",
            "load_omniglot",
            "procedural_glyphs",
            "split_classes",
        ]
    )
    for name in metafunc.data.__all__:
        obj = getattr(metafunc.data, name)
        if callable(obj):
            assert obj.__doc__ and ">>>" in obj.__doc__, name
