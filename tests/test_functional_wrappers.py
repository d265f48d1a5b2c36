""":func:`metafunc.functionalize` of wrapped and lazy modules.

``DataParallel``, ``DistributedDataParallel`` (a one-process gloo group) and ``torch.compile``
wrappers, nested or not, are unwrapped to the module they hold; a lazy module works once a forward
pass has initialised it.

Every numerical check compares against the module's own ``forward``/``backward`` (run on a deep
copy), in float64, exactly or to 1e-12.
"""

from __future__ import annotations

import torch
from _functional_helpers import DTYPE, assert_close, randn, small_mlp
from torch import nn

from metafunc import functionalize


def test_unwraps_data_parallel():
    net = small_mlp()
    x = randn(torch.Generator().manual_seed(1), 4, 3)
    fm = functionalize(nn.DataParallel(net))  # with one GPU present, this moves net onto it
    assert fm.params.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert fm.params["0.weight"] is net[0].weight
    x = x.to(net[0].weight.device)
    assert_close(fm(fm.params, x), net(x))
    assert type(fm.to_module()) is nn.Sequential


def test_unwraps_torch_compile():
    net = small_mlp()
    x = randn(torch.Generator().manual_seed(1), 4, 3)
    fm = functionalize(torch.compile(net, backend="eager"))
    assert fm.params.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert fm.params["2.bias"] is net[2].bias
    assert_close(fm(fm.params, x), net(x))


def test_unwraps_nested_wrappers():
    net = small_mlp()
    fm = functionalize(nn.DataParallel(torch.compile(net, backend="eager")))
    assert fm.params["0.weight"] is net[0].weight


def test_lazy_module_works_after_a_forward_pass():
    net = nn.LazyLinear(3).to(DTYPE)
    x = randn(torch.Generator().manual_seed(1), 2, 4)
    net(x)
    fm = functionalize(net)
    assert fm.params.keys() == {"weight", "bias"}
    assert_close(fm(fm.params, x), net(x))


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = nn.Linear(3, 2).to(DTYPE)
        ddp = nn.parallel.DistributedDataParallel(net)
        fm = functionalize(ddp)
        assert sorted(fm.params) == ["bias", "weight"]
        assert fm.params["weight"] is net.weight
        x = torch.randn(4, 3, dtype=DTYPE)
        assert_close(fm(fm.params, x), net(x))
    finally:
        dist.destroy_process_group()
