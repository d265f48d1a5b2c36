"""pytest plugin: fixtures for :mod:`metafunc.testing` and a ``float64`` marker.

Installed with metafunc as a ``pytest11`` entry point, and inert by default: it registers the
``float64`` marker's name, and nothing else happens in a test that neither carries the marker nor
requests one of the fixtures. Without the entry point (metafunc run from a source tree), a test
module opts in with ``pytest_plugins = ["metafunc.testing.pytest_plugin"]`` in its top-level
conftest.py.

- ``@pytest.mark.float64``: torch's default dtype is float64 during the test (set up, call and
  tear down), restored afterwards. Gradient checks want it: a model built inside the test, and
  constants such as ``torch.tensor(0.5)``, are float64 then.
- ``float64`` fixture: the same, for a test that asks for it by name.
- ``torch_generator``: a ``torch.Generator`` seeded from the test's node id (reproducible, and
  different per test).
- ``meta_checks``: the checks and strategies in one namespace: ``meta_checks.check_grads``,
  ``meta_checks.assert_vmap_matches_loop``, ``meta_checks.assert_pure``,
  ``meta_checks.strategies`` (needs hypothesis).
- ``sinusoid_episode``: a float64 meta-batch of 4 sinusoid tasks, 5 shots and 5 queries each.

Example (a test file)::

    import pytest, torch
    import metafunc

    @pytest.mark.float64
    def test_meta_gradient(meta_checks, sinusoid_episode):
        def meta_loss(params): ...
        meta_checks.check_grads(meta_loss, (params,), order=2)
"""

from __future__ import annotations

import types
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

__all__ = [
    "float64",
    "meta_checks",
    "pytest_configure",
    "pytest_runtest_setup",
    "pytest_runtest_teardown",
    "sinusoid_episode",
    "torch_generator",
]

_OLD_DTYPE = pytest.StashKey[torch.dtype]()


def pytest_configure(config: pytest.Config) -> None:
    """Registers the marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers",
        "float64: run the test with torch's default dtype set to float64 (metafunc.testing)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Sets float64 as the default dtype for a test marked ``float64`` (before its fixtures)."""
    if item.get_closest_marker("float64") is not None:
        item.stash[_OLD_DTYPE] = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Restores the default dtype after a marked test's teardown."""
    try:
        return (yield)
    finally:
        old = item.stash.get(_OLD_DTYPE, None)
        if old is not None:
            torch.set_default_dtype(old)
            del item.stash[_OLD_DTYPE]


@pytest.fixture
def float64() -> Iterator[None]:
    """torch's default dtype is float64 while the test runs."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def torch_generator(request: pytest.FixtureRequest) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the test's node id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


class _Checks(types.SimpleNamespace):
    @property
    def strategies(self) -> Any:  # imported on use: only this part needs hypothesis
        from . import strategies

        return strategies


@pytest.fixture
def meta_checks() -> _Checks:
    """``check_grads``, ``assert_vmap_matches_loop``, ``assert_pure`` and ``strategies``."""
    from . import assert_pure, assert_vmap_matches_loop, check_grads

    return _Checks(
        check_grads=check_grads,
        assert_vmap_matches_loop=assert_vmap_matches_loop,
        assert_pure=assert_pure,
    )


@pytest.fixture
def sinusoid_episode() -> Any:
    """4 sinusoid regression tasks in float64, 5 support and 5 query points each (seed 0)."""
    from metafunc.data import Sinusoid

    gen = torch.Generator().manual_seed(0)
    return Sinusoid().sample(4, 5, generator=gen, dtype=torch.float64)
