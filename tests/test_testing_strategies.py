"""``metafunc.testing.strategies``: valid draws, small shrunk examples, and a clear ImportError.

Oracles: the registry's own ranges and flag combinations; ``inner_loop`` accepting every drawn
configuration; hypothesis' shrinker on a property that fails on purpose.
"""

from __future__ import annotations

import subprocess
import sys

import optree
import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from torch import nn

import metafunc
from metafunc.testing import assert_pure
from metafunc.testing import optimizers as registry
from metafunc.testing import strategies as mst


@given(opt=mst.optimizers(params={"w": 0, "b": 0}), config=mst.inner_loop_configs())
def test_drawn_optimizers_and_inner_loop_configurations_are_valid(opt, config):
    params = {"w": torch.tensor([0.3, -0.5], dtype=torch.float64), "b": torch.tensor(0.2)}
    params["b"] = params["b"].double()
    for key, value in opt.kwargs.items():
        if key in registry.RANGES and isinstance(value, (float, torch.Tensor)):
            low, high = registry.RANGES[key]
            assert low <= float(value) <= high or value in [c.get(key) for c in opt.case.configs]
    loss = lambda p, _: (p["w"] ** 2).sum() + torch.cos(p["b"])
    result = metafunc.inner_loop(loss, params, opt.build(), None, **config)
    assert set(result.params) == {"w", "b"}
    assert repr(opt).startswith(f"mo.{opt.name}(")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(tree=mst.pytrees(), episode=mst.sinusoid_tasks(), classes=mst.classification_tasks())
def test_pytrees_and_task_batches_have_the_documented_shapes(tree, episode, classes):
    leaves = optree.tree_leaves(tree)
    assert 1 <= len(leaves) <= 4 and all(x.dtype in (torch.float32, torch.float64) for x in leaves)
    (xs, ys), (xq, _) = episode.support, episode.query
    assert xs.shape == ys.shape == xq.shape and xs.shape[-1] == 1 and xs.dtype == torch.float64
    (cx, cy), _ = classes.support, classes.query
    n, m = cy.shape
    assert cx.shape[:2] == (n, m) and cy.dtype == torch.int64
    ways = int(cy.max()) + 1
    assert torch.equal(torch.bincount(cy[0], minlength=ways), torch.full((ways,), m // ways))


def test_module_params_match_the_module_and_leave_it_alone():
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    params = find(mst.module_params(net), lambda p: True)
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in before.items()}
    assert all(v.dtype == torch.float64 for v in params.values())
    assert all(torch.equal(v, before[k]) for k, v in net.named_parameters())


def test_a_deliberately_failing_property_shrinks_to_a_minimal_readable_example():
    seen = []

    @settings(max_examples=50, database=None, derandomize=True)
    @given(tree=mst.pytrees(), opt=mst.optimizers(), config=mst.inner_loop_configs())
    def no_matrix_leaves(tree, opt, config):
        seen.append((tree, opt, config))
        assert all(x.dim() < 2 for x in optree.tree_leaves(tree))  # fails on any matrix

    with pytest.raises(AssertionError):
        no_matrix_leaves()
    tree, opt, config = seen[-1]  # hypothesis replays the shrunk example last
    assert list(tree) == ["p0"] and tree["p0"].shape == (1, 1)
    assert config == {"steps": 1}
    assert (
        repr(opt)
        == f"mo.{opt.name}(" + ", ".join(f"{k}={v!r}" for k, v in opt.case.configs[0].items()) + ")"
    )


def test_strategies_need_hypothesis_and_the_checks_do_not():
    code = (
        "import sys; sys.modules['hypothesis'] = None; sys.modules['pytest'] = None\n"
        "import metafunc.testing as t; print(t.check_grads.__name__)\n"
        "try:\n    import metafunc.testing.strategies\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("check_grads\n")
    assert "pip install metafunc[testing]" in out.stdout


@given(opt=mst.optimizers(kinds=("tensor",)), tree=mst.pytrees(containers=("dict",)))
def test_every_drawn_update_is_pure(opt, tree):
    tree = optree.tree_map(lambda x: x.double(), tree)
    grads = optree.tree_map(torch.cos, tree)
    update = opt.build().update
    assert_pure(update, grads, opt.build().init(tree), tree)
