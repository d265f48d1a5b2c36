"""Few-shot episodes: :class:`~metafunc.data.LabelledImages`, ``split_classes``, ``EpisodeSampler``.

Labelled datasets with their defaults and checks; class splits by fractions, with groups kept
together and Omniglot's convention; episodes of ``ways`` classes with ``shots`` and ``queries``
examples (any of them, drawn by hypothesis), class and example coverage, determinism, plain tensors
with any labels, episodes that feed ``vmap_tasks``, and errors; and the names ``metafunc.data``
exports, each documented with an example.

Oracle: a dataset whose inputs encode their own row index, so every sampled example can be traced
back to its row and class.
"""

from __future__ import annotations

import pytest
import torch
from _data_helpers import _flat, _gen
from hypothesis import given
from hypothesis import strategies as st

import metafunc
import metafunc.data
from metafunc.data import (
    OMNIGLOT_SPLIT,
    EpisodeSampler,
    LabelledImages,
    procedural_glyphs,
    split_classes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_public_api():
    assert sorted(metafunc.data.__all__) == sorted(
        [
            "CIFAR_FS_SPLIT",
            "FC100_SPLIT",
            "OMNIGLOT_SPLIT",
            "EncodedImages",
            "Episode",
            "EpisodeSampler",
            "LabelledImages",
            "Sinusoid",
            "compose",
            "load_cifar_fs",
            "load_fc100",
            "load_miniimagenet",
            "load_omniglot",
            "load_tieredimagenet",
            "procedural_glyphs",
            "random_crop",
            "random_flip",
            "random_rot90",
            "shuffle_examples",
            "split_classes",
        ]
    )
    for name in metafunc.data.__all__:
        obj = getattr(metafunc.data, name)
        if callable(obj):
            assert obj.__doc__ and ">>>" in obj.__doc__, name
