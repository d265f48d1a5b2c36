"""The pytest plugin: inert by default, a ``float64`` marker and fixtures when asked for.

Oracle: an inner pytest run (``pytester``) of a small test file, with its outcomes counted.
"""

from __future__ import annotations

pytest_plugins = ["pytester"]

TESTS = """
import pytest
import torch

def test_unmarked_runs_in_float32():
    assert torch.get_default_dtype() == torch.float32

@pytest.mark.float64
def test_marked_runs_in_float64(meta_checks, torch_generator, sinusoid_episode):
    assert torch.get_default_dtype() == torch.float64
    w = torch.randn(3, generator=torch_generator)
    meta_checks.check_grads(lambda w: (w.sin() ** 2).sum(), (w,), order=2)
    assert sinusoid_episode.support[0].shape == (4, 5, 1)
    assert meta_checks.strategies.pytrees is not None

def test_after_the_marked_test_float32_again():
    assert torch.get_default_dtype() == torch.float32

def test_float64_fixture(float64):
    assert torch.get_default_dtype() == torch.float64
"""


def test_plugin_is_inert_by_default_and_serves_marker_and_fixtures(pytester):
    pytester.makepyfile(test_user=TESTS)
    result = pytester.runpytest_inprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_module_can_opt_in_by_name_when_the_plugin_is_already_loaded(pytester):
    pytester.makepyfile(test_opt_in='pytest_plugins = ["metafunc.testing.pytest_plugin"]\n' + TESTS)
    pytester.makeconftest("")
    result = pytester.runpytest_inprocess("--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
