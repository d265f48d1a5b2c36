"""Episode transforms: ``random_flip``, ``random_crop``, ``random_rot90``, ``shuffle_examples``,
``compose``, and ``EpisodeSampler(..., transform=...)``.

Oracles: per-image searches over every flip, crop window and rotation of the input (each output
image must be one of them), the dataset rows recorded in ``info``, and hand-written transforms
for the order of ``compose``.
"""

from __future__ import annotations

import pytest
import torch
from _data_helpers import _gen

from metafunc.data import (
    Episode,
    EpisodeSampler,
    LabelledImages,
    compose,
    random_crop,
    random_flip,
    random_rot90,
    shuffle_examples,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(classes=6, per_class=5, side=6) -> LabelledImages:
    """Distinct, asymmetric images: every rotation and flip of every image differs."""
    n = classes * per_class
    images = torch.randn(n, 2, side, side, generator=_gen(0), dtype=torch.float64)
    return LabelledImages(images, torch.arange(n) % classes)


def _episode(transform=None, seed=0, **kw):
    data = _data(**kw)
    sampler = EpisodeSampler(data, ways=3, shots=2, queries=3, transform=transform)
    return data, sampler.sample(4, generator=_gen(seed))


def _originals(data, episode):
    return [data.images[episode.info[f"{s}_indices"]] for s in ("support", "query")]


def test_flip_is_a_per_image_choice_and_p_bounds():
    data, episode = _episode(random_flip(0.5))
    flips = 0
    for x, orig in zip((episode.support[0], episode.query[0]), _originals(data, episode)):
        same = (x == orig).flatten(2).all(-1)
        flipped = (x == orig.flip(-1)).flatten(2).all(-1)
        assert bool((same ^ flipped).all())  # each image is itself or its mirror, not both
        flips += int(flipped.sum())
    assert 0 < flips < 4 * 15  # some flipped, some not
    _, always = _episode(random_flip(1.0))
    _, plain = _episode()
    assert torch.equal(always.query[0], plain.query[0].flip(-1))
    _, never = _episode(random_flip(0.0))
    assert torch.equal(never.support[0], plain.support[0])


def test_crop_windows_of_the_padded_image():
    size, padding = 5, 2
    data, episode = _episode(random_crop(size, padding=padding))
    x, orig = episode.support[0], _originals(data, episode)[0]
    assert x.shape == (4, 6, 2, size, size)
    padded = torch.nn.functional.pad(orig, (padding,) * 4)
    offsets = set()
    for t in range(4):
        for i in range(6):
            hits = [
                (r, c)
                for r in range(6 + 2 * padding - size + 1)
                for c in range(6 + 2 * padding - size + 1)
                if torch.equal(padded[t, i, :, r : r + size, c : c + size], x[t, i])
            ]
            assert len(hits) == 1
            offsets.add(hits[0])
    assert len(offsets) > 3  # drawn per image
    _, same = _episode(random_crop(6))
    _, plain = _episode()
    assert torch.equal(same.query[0], plain.query[0])  # no padding, full size: identity


def test_rot90_per_image_and_per_class():
    data, episode = _episode(random_rot90())
    angles = set()
    for x, orig in zip((episode.support[0], episode.query[0]), _originals(data, episode)):
        for t in range(4):
            for i in range(x.shape[1]):
                k = [
                    q
                    for q in range(4)
                    if torch.equal(torch.rot90(orig[t, i], q, (-2, -1)), x[t, i])
                ]
                assert len(k) == 1
                angles.add(k[0])
    assert angles == {0, 1, 2, 3}
    data, episode = _episode(random_rot90(per_class=True), seed=3)
    per_class: dict[tuple[int, int], set[int]] = {}
    for (x, y), orig in zip((episode.support, episode.query), _originals(data, episode)):
        for t in range(4):
            for i in range(x.shape[1]):
                k = [
                    q
                    for q in range(4)
                    if torch.equal(torch.rot90(orig[t, i], q, (-2, -1)), x[t, i])
                ]
                per_class.setdefault((t, int(y[t, i])), set()).update(k)
    assert all(len(v) == 1 for v in per_class.values())  # one angle per class, both sets
    assert len({next(iter(v)) for v in per_class.values()}) > 1


def test_shuffle_keeps_examples_labels_and_rows_together():
    data, episode = _episode(shuffle_examples())
    _, plain = _episode()
    for name in ("support", "query"):
        (x, y), rows = getattr(episode, name), episode.info[f"{name}_indices"]
        assert torch.equal(x, data.images[rows])
        classes = episode.info["classes"]
        assert torch.equal(data.labels[rows], classes.gather(1, y))
        assert torch.equal(rows.sort(1).values, plain.info[f"{name}_indices"].sort(1).values)
    assert not torch.equal(episode.support[1], plain.support[1])  # the order changed


def test_compose_order_determinism_and_vmap_ready_shapes():
    add = lambda e, g: e._replace(support=(e.support[0] + 1, e.support[1]))
    double = lambda e, g: e._replace(support=(e.support[0] * 2, e.support[1]))
    _, plain = _episode()
    _, both = _episode(compose(add, double))
    assert torch.equal(both.support[0], (plain.support[0] + 1) * 2)
    pipeline = compose(random_crop(6, padding=1), random_flip(), random_rot90(per_class=True))
    _, a = _episode(pipeline, seed=7)
    _, b = _episode(pipeline, seed=7)
    _, c = _episode(pipeline, seed=8)
    assert torch.equal(a.query[0], b.query[0]) and not torch.equal(a.query[0], c.query[0])
    assert a.support[0].shape == (4, 6, 2, 6, 6) and a.query[1].shape == (4, 9)


def test_transform_errors():
    data = _data()
    with pytest.raises(
        TypeError, match=r"EpisodeSampler.*transform to be None or callable.*compose"
    ):
        EpisodeSampler(data, ways=2, shots=1, queries=1, transform=[random_flip()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"compose\(\*transforms\).*got 3 \(int\) at position 1"):
        compose(random_flip(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"random_flip\(p\): expected p to be a probability"):
        random_flip(1.5)
    with pytest.raises(ValueError, match="padding to be an int >= 0"):
        random_crop(4, padding=-1)
    with pytest.raises(TypeError, match=r"random_rot90\(per_class=...\): expected a bool"):
        random_rot90(per_class=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"8x8 crop does not fit in images of 6x6 padded by 0"):
        _episode(random_crop(8))
    wide = LabelledImages(torch.zeros(12, 1, 2, 3), torch.arange(12) % 3)
    sampler = EpisodeSampler(wide, ways=2, shots=1, queries=1, transform=random_rot90())
    with pytest.raises(ValueError, match=r"square images, got \(2, 3\)"):
        sampler.sample(1, generator=_gen(0))
    flat = Episode(
        (torch.zeros(1, 2, 3), torch.zeros(1, 2)), (torch.zeros(1, 2, 3), torch.zeros(1, 2)), {}
    )
    with pytest.raises(ValueError, match=r"images of shape \(tasks, n, C, H, W\), got \(1, 2, 3\)"):
        random_flip()(flat, _gen(0))
