"""The error messages of :func:`metafunc.functionalize` and :class:`metafunc.FunctionalModel`.

Each message is pinned in full or in its essential parts: missing, unknown and misspelled keys
(with the right name suggested), tied aliases, params that are not a mapping or not tensors, wrong
shapes, dtypes and devices, buffers, ``to_module``/``load_into`` mismatches, things that are not a
module, uninitialised lazy modules and a train mode that is not a bool.
"""

from __future__ import annotations

import re

import pytest
import torch
from _functional_helpers import DTYPE, _with_frozen, _x, small_bn_net, small_mlp, tied_lm
from torch import nn

from metafunc import functionalize

CALL = "FunctionalModel(params, ...)"
APPLY = "FunctionalModel.apply(params, buffers, ...)"
MLP_KEYS = "['0.bias', '0.weight', '2.bias', '2.weight']"
BN_KEYS = "['1.num_batches_tracked', '1.running_mean', '1.running_var']"


def test_error_missing_param():
    fm = functionalize(small_mlp())
    params = {k: v for k, v in fm.params.items() if k != "0.bias"}
    msg = (
        f"{CALL}: params do not match the model: missing key(s) ['0.bias']. "
        f"Expected the keys of fm.params: {MLP_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_unknown_param():
    fm = functionalize(small_mlp())
    msg = (
        f"{CALL}: params do not match the model: unknown key 'foo'. "
        f"Expected the keys of fm.params: {MLP_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm({**fm.params, "foo": torch.zeros(1)}, _x())


def test_error_misspelled_param_suggests_the_right_name():
    fm = functionalize(small_mlp())
    params = dict(fm.params)
    params["0.wieght"] = params.pop("0.weight")
    msg = (
        f"{CALL}: params do not match the model: missing key(s) ['0.weight']; unknown key "
        f"'0.wieght' (did you mean '0.weight'?). Expected the keys of fm.params: {MLP_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_misspelled_frozen_name_suggests_it():
    net = _with_frozen().to(DTYPE)
    fm = functionalize(net)
    with pytest.raises(
        ValueError, match=re.escape("unknown key '0.weigth' (did you mean '0.weight'?)")
    ):
        fm({**fm.params, "0.weigth": net[0].weight}, _x())


def test_error_tied_alias_names_the_key_to_pass():
    net, idx = tied_lm("cpu")
    fm = functionalize(net)
    extra = "key 'out.weight' is tied to 'emb.weight': pass 'emb.weight' only"
    with pytest.raises(ValueError, match=re.escape(f"params do not match the model: {extra}.")):
        fm({**fm.params, "out.weight": net.emb.weight}, idx)
    instead = {"out.weight": net.emb.weight, "out.bias": net.out.bias}
    msg = (
        f"{CALL}: params do not match the model: missing key(s) ['emb.weight']; {extra}. "
        "Expected the keys of fm.params: ['emb.weight', 'out.bias']."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(instead, idx)


@pytest.mark.parametrize(
    "make_params",
    [
        pytest.param(lambda net: list(net.parameters()), id="list"),
        pytest.param(lambda net: net.parameters(), id="generator"),
        pytest.param(lambda net: tuple(net.parameters()), id="tuple"),
    ],
)
def test_error_params_not_a_mapping_hints_named_parameters(make_params):
    net = small_mlp()
    fm = functionalize(net)
    params = make_params(net)
    msg = (
        f"{CALL}: expected params to be a dict of tensors keyed by parameter name (as in "
        f"fm.params), got {type(params).__name__}. Did you pass model.parameters()? Use "
        "fm.params, or dict(model.named_parameters())."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_params_a_tensor_has_no_parameters_hint():
    fm = functionalize(small_mlp())
    msg = (
        f"{CALL}: expected params to be a dict of tensors keyed by parameter name (as in "
        "fm.params), got Tensor."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm(torch.zeros(3), _x())


def test_error_input_dtype_or_device_differs_from_the_params():
    """A float32 batch into a float64 model (or the reverse) and data on another device are named
    before torch fails deep inside; autocast regions mix dtypes on purpose and pass."""
    fm = functionalize(small_mlp())  # DTYPE (float64)
    x = _x()
    msg = (
        f"{CALL}: an input is torch.float32 but the params are torch.float64; convert the data "
        "(x.to(torch.float64)) or the model (model.to(torch.float32) before functionalize)."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm(fm.params, x.float())
    with pytest.raises(TypeError, match=r"^FunctionalModel\.apply\(params, buffers, \.\.\.\): an "):
        fm.apply(fm.params, fm.buffers, x.float())
    with pytest.raises(ValueError, match=r"an input is on meta but the params are on cpu; move"):
        fm(fm.params, x.to("meta"))
    with pytest.raises(TypeError, match=r"an input is torch.float32"):
        fm(fm.params, [x.float()])  # one level into lists and tuples
    emb = functionalize(nn.Embedding(5, 2).double())
    assert emb(emb.params, torch.tensor([0, 4])).shape == (2, 2)  # integer inputs: not checked
    single = functionalize(small_mlp().float())  # autocast casts float32 (not float64) tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert single(single.params, x.bfloat16()).dtype == torch.bfloat16


def test_error_param_wrong_shape():
    fm = functionalize(small_mlp())
    params = {**fm.params, "0.weight": torch.zeros(3, 4, dtype=DTYPE)}
    msg = (
        f"{CALL}: expected params['0.weight'] to have shape (4, 3), got (3, 4). Under "
        "torch.func.vmap, give the per-task shape (in_dims maps the batch dimension away)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm(params, _x())


def test_error_frozen_override_wrong_shape():
    fm = functionalize(_with_frozen().to(DTYPE))
    with pytest.raises(ValueError, match=re.escape("params['0.weight'] to have shape (5, 3)")):
        fm({**fm.params, "0.weight": torch.zeros(5, dtype=DTYPE)}, _x())


@pytest.mark.parametrize(
    ("value", "type_name"), [([[0.0] * 3] * 4, "list"), (1.0, "float"), (None, "NoneType")]
)
def test_error_param_not_a_tensor(value, type_name):
    fm = functionalize(small_mlp())
    msg = f"{CALL}: expected params['0.weight'] to be a torch.Tensor, got {type_name}."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm({**fm.params, "0.weight": value}, _x())


def test_error_params_are_checked_by_apply():
    fm = functionalize(small_bn_net())
    params = {k: v for k, v in fm.params.items() if k != "1.bias"}
    with pytest.raises(ValueError, match=re.escape(f"{APPLY}: params do not match the model")):
        fm.apply(params, fm.buffers, _x())
    with pytest.raises(TypeError, match=re.escape(f"{APPLY}: expected params to be a dict")):
        fm.apply(list(fm.params.values()), fm.buffers, _x())


def test_error_buffers_missing():
    fm = functionalize(small_bn_net())
    buffers = {k: v for k, v in fm.buffers.items() if k != "1.running_var"}
    msg = (
        f"{APPLY}: buffers do not match the model: missing key(s) ['1.running_var']. "
        f"Expected the keys of fm.buffers: {BN_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, buffers, _x())


def test_error_buffers_unknown_and_misspelled():
    fm = functionalize(small_bn_net())
    msg = (
        f"{APPLY}: buffers do not match the model: unknown key 'foo'. "
        f"Expected the keys of fm.buffers: {BN_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, {**fm.buffers, "foo": torch.zeros(1)}, _x())

    buffers = dict(fm.buffers)
    buffers["1.running_mena"] = buffers.pop("1.running_mean")
    msg = (
        f"{APPLY}: buffers do not match the model: missing key(s) ['1.running_mean']; unknown "
        f"key '1.running_mena' (did you mean '1.running_mean'?). Expected the keys of "
        f"fm.buffers: {BN_KEYS}."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, buffers, _x())


def test_error_buffers_not_a_mapping():
    fm = functionalize(small_bn_net())
    msg = (
        f"{APPLY}: expected buffers to be a dict of tensors keyed by buffer name (as in "
        "fm.buffers), got list."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, list(fm.buffers.values()), _x())


def test_error_buffer_wrong_shape_and_not_a_tensor():
    fm = functionalize(small_bn_net())
    msg = (
        f"{APPLY}: expected buffers['1.running_mean'] to have shape (4,), got (5,). Under "
        "torch.func.vmap, give the per-task shape (in_dims maps the batch dimension away)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, {**fm.buffers, "1.running_mean": torch.zeros(5, dtype=DTYPE)}, _x())
    msg = f"{APPLY}: expected buffers['1.num_batches_tracked'] to be a torch.Tensor, got int."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.apply(fm.params, {**fm.buffers, "1.num_batches_tracked": 0}, _x())


def test_error_to_module_checks_params_and_buffers():
    fm = functionalize(small_bn_net())
    with pytest.raises(ValueError, match=re.escape("FunctionalModel.to_module: params do not")):
        fm.to_module({})
    with pytest.raises(ValueError, match=re.escape("FunctionalModel.to_module: buffers do not")):
        fm.to_module(buffers={})
    with pytest.raises(TypeError, match=re.escape("Did you pass model.parameters()?")):
        fm.to_module(list(fm.params.values()))


def test_error_load_into_mismatched_module():
    fm = functionalize(small_mlp())
    call = "FunctionalModel.load_into(module, ...)"
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Linear(2, 2))
    msg = (
        f"{call}: the module's parameter and buffer names differ from this model's: missing "
        "[], unknown ['3.bias', '3.weight']. Load into a module of the same architecture."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.load_into(other)

    renamed = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    msg = "missing ['2.bias', '2.weight'], unknown ['1.bias', '1.weight']"
    with pytest.raises(ValueError, match=re.escape(msg)):
        fm.load_into(renamed)

    wider = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DTYPE)
    msg = f"{call}: '2.weight' has shape (5, 4) in the module and (2, 4) here. Nothing was loaded."
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        fm.load_into(wider)

    msg = f"{call}: expected an nn.Module, got dict."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.load_into(dict(fm.params))

    with pytest.raises(ValueError, match=re.escape(f"{call}: params do not match the model")):
        fm.load_into(small_mlp(), {})


@pytest.mark.parametrize("not_a_module", [lambda x: x, {"w": torch.zeros(1)}, None])
def test_error_functionalize_not_a_module(not_a_module):
    msg = (
        "functionalize(module): expected a torch.nn.Module, got "
        f"{type(not_a_module).__name__}. Pass the model instance, e.g. functionalize(MyNet())."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        functionalize(not_a_module)


def test_error_functionalize_a_functional_model():
    fm = functionalize(small_mlp())
    with pytest.raises(TypeError, match=re.escape("got FunctionalModel.")):
        functionalize(fm)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: nn.LazyLinear(3), "weight"),
        (lambda: nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(3)), "1.weight"),
        (lambda: nn.LazyBatchNorm1d(affine=False), "running_mean"),
    ],
)
def test_error_functionalize_uninitialized_lazy_module(make, name):
    msg = (
        f"functionalize(module): {name!r} is an uninitialized lazy tensor. Run one forward "
        "pass of the module on example inputs first, then functionalize it."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        functionalize(make())


def test_error_train_mode_not_a_bool():
    fm = functionalize(small_mlp())
    msg = "FunctionalModel.train(mode): expected a bool, got str."
    with pytest.raises(TypeError, match=f"^{re.escape(msg)}$"):
        fm.train("eval")
    assert fm.training is True
