"""metafunc.models: the backbones are the published networks, functionalize exactly, and give
MAML's exact second-order meta-gradient under vmap.

Oracles: the published sizes (WRN-28-10 with a 10-way head has 36,479,194 parameters, the
CIFAR-10 count of Zagoruyko & Komodakis' code; ResNet-12 12.4M, Lee et al. 2019), the module's
own forward, and a per-task loop of second-order MAML written with ``torch.autograd.grad`` on
``torch.func.functional_call`` (no vmap, no metafunc)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import metafunc
from metafunc.algorithms import MAML
from metafunc.models import (
    Conv4,
    DropBlock,
    ResNet12,
    WideResNet,
    conv4_miniimagenet,
    conv4_omniglot,
    wrn28_10,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64

# (name, tiny constructor, input channels, image side): reduced widths and images, for speed
TINY = {
    "conv4": (lambda ways: Conv4(ways, in_channels=1, hidden=3, image_size=16), 1, 16),
    "resnet12": (lambda ways: ResNet12(ways, channels=(2, 3, 2, 3), image_size=16), 3, 16),
    "wrn": (lambda ways: WideResNet(ways, depth=10, widen=1), 3, 8),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_parameter_counts():
    assert _count(wrn28_10(ways=10)) == 36_479_194
    assert round(_count(ResNet12()) / 1e5) == 124  # 12.4M
    assert wrn28_10().out_features == 640


def test_feature_sizes_of_the_standard_inputs():
    torch.manual_seed(0)
    assert conv4_omniglot()(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert conv4_miniimagenet()(torch.randn(2, 3, 84, 84)).shape == (2, 800)
    assert conv4_miniimagenet(hidden=64).out_features == 1600
    net = ResNet12(channels=(2, 3, 4, 5))  # 84x84 -> 5x5, narrow so that it is quick
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 125)
    assert ResNet12().out_features == 16000
    assert ResNet12(avg_pool=True).out_features == 640
    assert ResNet12(5, channels=(2, 3, 4, 5), avg_pool=True)(torch.randn(2, 3, 84, 84)).shape == (
        2,
        5,
    )


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("ways", [None, 4])
def test_functionalize_is_the_module(name, ways):
    make, channels, side = TINY[name]
    torch.manual_seed(1)
    net = make(ways).to(D)
    fm = metafunc.functionalize(net)
    x = torch.randn(5, channels, side, side, dtype=D)
    out = fm(fm.params, x)
    assert torch.equal(out, net(x))
    assert out.shape == (5, net.out_features if ways is None else ways)
    assert not fm.buffers  # batch statistics only: nothing that a learner would have to write


def _loop_maml_grads(net, support, query, lr, steps):
    """Second-order MAML's meta-gradient, task by task, by torch.autograd.grad."""
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    (xs, ys), (xq, yq) = support, query
    total = torch.zeros((), dtype=D)
    for i in range(xs.shape[0]):
        p = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, p, (xs[i],)), ys[i])
            g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
            p = {k: v - lr * gk for (k, v), gk in zip(p.items(), g)}
        total = total + F.cross_entropy(functional_call(net, p, (xq[i],)), yq[i])
    grads = torch.autograd.grad(total / xs.shape[0], list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.parametrize("name", sorted(TINY))
def test_second_order_maml_under_vmap_equals_a_per_task_loop(name):
    make, channels, side = TINY[name]
    torch.manual_seed(2)
    net = make(3).to(D)
    g = torch.Generator().manual_seed(3)

    def part(n):
        x = torch.randn(2, n, channels, side, side, generator=g, dtype=D)
        return x, torch.randint(3, (2, n), generator=g)

    support, query = part(6), part(4)
    learner = MAML(metafunc.functionalize(net), "cross_entropy", inner_lr=0.3, strategy="vmap")
    grads, _ = learner.meta_grad(learner.init(), support, query)
    expected = _loop_maml_grads(net, support, query, lr=0.3, steps=1)
    assert set(grads["params"]) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(grads["params"][k], v, rtol=1e-9, atol=1e-12, msg=k)
        assert v.abs().max() > 0, f"{k}: no meta-gradient"  # every param is used


def test_dropblock_is_the_identity_in_eval_mode_and_at_zero():
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(DropBlock(0.3, 3).eval()(x), x)
    assert torch.equal(DropBlock(0.0, 3)(x), x)
    net = ResNet12(channels=(2, 3, 4, 5), image_size=16)
    assert not any(isinstance(m, DropBlock) for m in net.modules())  # off by default


def test_dropblock_drops_about_drop_prob_in_squares_and_keeps_the_mean():
    torch.manual_seed(4)
    drop = DropBlock(0.2, block_size=3)
    x = torch.ones(64, 8, 21, 21)
    out = drop(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.2) < 0.03
    kept = out[~dropped]
    torch.testing.assert_close(kept, torch.full_like(kept, out.numel() / kept.numel()))
    # every dropped entry lies in a dropped 3x3 square (blocks, not single units)
    pooled = -F.max_pool2d(-dropped.float(), 3, stride=1, padding=1)  # 3x3 all-dropped centres
    covered = F.max_pool2d(pooled, 3, stride=1, padding=1) > 0
    interior = dropped[..., 1:-1, 1:-1]  # squares clipped at the border are not full
    assert covered[..., 1:-1, 1:-1][interior].float().mean() > 0.9


def test_resnet12_with_dropblock_applies_it_after_blocks_3_and_4():
    net = ResNet12(channels=(2, 3, 4, 5), drop_prob=0.1, block_size=5)
    where = [
        i
        for i, block in enumerate(net.features)
        if any(isinstance(m, DropBlock) for m in block.modules())
    ]
    assert where == [2, 3]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Conv4(image_size=8), r"Conv4\(ways, \.\.\.\): image_size=8 is halved 4 times"),
        (lambda: Conv4(ways=0), r"Conv4\(ways, \.\.\.\): expected ways to be a positive int"),
        (lambda: ResNet12(channels=(1, 2, 3)), r"expected channels to be 4 positive ints"),
        (lambda: WideResNet(depth=12), r"expected depth = 6 n \+ 4 .* got 12"),
        (lambda: DropBlock(1.0), r"expected drop_prob in \[0, 1\), got 1.0"),
        (lambda: DropBlock(0.1, block_size=4), r"expected an odd block_size .* pass 5 or 3"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
