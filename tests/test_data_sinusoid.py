""":class:`metafunc.data.Sinusoid`: regression tasks on sine waves.

Shapes, dtypes, devices and ranges (any of them, drawn by hypothesis), the default queries and
spread, determinism per seed, per-task evaluation, episodes that feed ``vmap_tasks``, and errors.

Oracle: ``math.sin`` per point, written here independently of the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from _data_helpers import _gen
from hypothesis import given
from hypothesis import strategies as st

import metafunc
import metafunc.data
from metafunc.data import (
    Episode,
    Sinusoid,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
