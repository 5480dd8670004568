"""Conv, pooling and flatten layers of manual_bp.layers, one layer at a time, against torch.

Forward must equal ``torch.nn.functional`` to 1e-12 in float64 and backward must equal
``torch.autograd``'s gradients (weight, bias, input) to 1e-10 normwise relative, for random fields
(stride, padding including "same", dilation, groups, bias, count_include_pad) and random shapes,
plus the edge cases by name; shape errors are SpecErrors naming the layer and both shapes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import manual_bp as bp
from manual_bp import SpecError
from manual_bp.activations import make_activation
from manual_bp.layers import (
    LAYER_TYPES, AvgPool1d, AvgPool2d, Conv1d, Conv2d, Dense, Flatten, MaxPool1d, MaxPool2d,
)

IDENTITY = make_activation("identity")
CONV = {1: Conv1d, 2: Conv2d}
MAX = {1: MaxPool1d, 2: MaxPool2d}
AVG = {1: AvgPool1d, 2: AvgPool2d}


# -- the torch side: built from the layer's fields with torch.nn.functional only -----------------------
def torch_forward(layer, p: dict, a: torch.Tensor) -> torch.Tensor:
    nd = getattr(layer, "nd", 0)
    if isinstance(layer, (Conv1d, Conv2d)):
        conv = F.conv1d if nd == 1 else F.conv2d
        with warnings.catch_warnings():  # torch warns that "same" with an even kernel copies the input
            warnings.filterwarnings("ignore", message="Using padding='same'")
            return conv(a, p["weight"], p.get("bias"), stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation, groups=layer.groups)
    if isinstance(layer, (MaxPool1d, MaxPool2d)):
        pool = F.max_pool1d if nd == 1 else F.max_pool2d
        return pool(a, layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, (AvgPool1d, AvgPool2d)):
        pool = F.avg_pool1d if nd == 1 else F.avg_pool2d
        return pool(a, layer.kernel_size, layer.stride, layer.padding, count_include_pad=layer.count_include_pad)
    if isinstance(layer, Flatten):
        return torch.flatten(a, 1)
    raise AssertionError(layer)


def norm_close(mine: np.ndarray, ref: np.ndarray, rtol: float, what: str) -> None:
    """‖mine − ref‖ ≤ rtol ‖ref‖ (exactly equal when ref is 0), shapes and dtype checked."""
    assert mine.shape == ref.shape, f"{what}: shape {mine.shape} != {ref.shape}"
    err, scale = np.linalg.norm(mine - ref), np.linalg.norm(ref)
    assert err <= rtol * scale, f"{what}: ‖Δ‖ = {err:.3e}, ‖ref‖ = {scale:.3e}"


def check_against_torch(layer, in_shape, m, seed, dtype=np.float64, integers=False):
    """forward to 1e-12, backward (every parameter and the input) to 1e-10 relative, with a random δ."""
    rng = np.random.default_rng(seed)
    draw = (lambda s: rng.integers(-2, 3, s).astype(dtype)) if integers else (lambda s: rng.standard_normal(s).astype(dtype))
    a = draw((m, *in_shape))
    p = {k: draw(s) for k, s in layer.param_shapes(in_shape).items()}
    z = layer.forward(p, a)
    assert z.shape == (m, *layer.out_shape(in_shape)) and z.dtype == dtype
    delta = draw(z.shape)
    grads, grad_a = layer.backward(p, a, delta)
    assert set(grads) == set(p) and grad_a.dtype == dtype and all(g.dtype == dtype for g in grads.values())

    ta = torch.tensor(a, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    tz = torch_forward(layer, tp, ta)
    tz.backward(torch.tensor(delta))
    if dtype == np.float64:
        np.testing.assert_allclose(z, tz.detach().numpy(), rtol=1e-12, atol=1e-12)
        norm_close(grad_a, ta.grad.numpy(), 1e-10, f"{layer} ∂C/∂a")
        for k in p:
            norm_close(grads[k], tp[k].grad.numpy(), 1e-10, f"{layer} ∂C/∂{k}")
    return z, grads, grad_a


# -- random fields and shapes --------------------------------------------------------------------------
def per_axis(draw, nd, values):
    """An int or an nd-tuple, as a user might write it (the layer keeps tuples either way)."""
    t = tuple(draw(values) for _ in range(nd))
    return t[0] if len(set(t)) == 1 and draw(st.booleans()) else t


def input_sizes(draw, extents, pads):
    """Spatial sizes with at least one output position: n ≥ extent − lo − hi."""
    return tuple(draw(st.integers(max(1, e - lo - hi), e - lo - hi + 6)) for e, (lo, hi) in zip(extents, pads))


@st.composite
def conv_cases(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = per_axis(draw, nd, st.integers(1, 4))
    dilation = per_axis(draw, nd, st.integers(1, 3))
    same = draw(st.integers(0, 3)) == 0
    stride = 1 if same else per_axis(draw, nd, st.integers(1, 4))
    padding = "same" if same else per_axis(draw, nd, st.integers(0, 3))
    act = make_activation(draw(st.sampled_from(["identity", "relu", "tanh"])))
    layer = CONV[nd](cout, kernel, act, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=draw(st.booleans()))
    extents = [d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation)]
    in_shape = (cin, *input_sizes(draw, extents, layer.pads))
    return layer, in_shape, draw(st.integers(1, 3)), draw(st.integers(0, 2**32 - 1))


@st.composite
def pool_cases(draw):
    nd = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    stride = draw(st.none() | st.tuples(*[st.integers(1, 5)] * nd))
    if draw(st.booleans()):
        layer = MAX[nd](kernel, stride, padding)
    else:
        layer = AVG[nd](kernel, stride, padding, count_include_pad=draw(st.booleans()))
    in_shape = (draw(st.integers(1, 3)), *input_sizes(draw, kernel, layer.pads))
    return layer, in_shape, draw(st.integers(1, 3)), draw(st.integers(0, 2**32 - 1))


@given(conv_cases())
def test_conv_matches_torch(case):
    layer, in_shape, m, seed = case
    assert type(layer).from_json(layer.to_json(), "layers[0]") == layer
    check_against_torch(layer, in_shape, m, seed)


@given(pool_cases(), st.booleans())
def test_pool_matches_torch(case, integers):
    """Integer inputs in [−2, 2] make ties in max-pool windows common: δ goes where torch sends it."""
    layer, in_shape, m, seed = case
    assert type(layer).from_json(layer.to_json(), "layers[0]") == layer
    check_against_torch(layer, in_shape, m, seed, integers=integers)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(1, 3), st.integers(0, 99))
def test_flatten_matches_torch(in_shape, m, seed):
    layer = Flatten()
    assert layer.out_shape(in_shape) == (math.prod(in_shape),)
    assert layer.param_shapes(in_shape) == {}
    check_against_torch(layer, tuple(in_shape), m, seed)


# -- the edge cases by name ------------------------------------------------------------------------------
EDGE_CASES = {
    "kernel = input size": (Conv2d(4, (5, 3), IDENTITY), (2, 5, 3), 2),
    "kernel = input size, 1-D": (Conv1d(3, 7, IDENTITY, bias=False), (2, 7), 2),
    "stride > kernel": (Conv2d(3, 2, IDENTITY, stride=3), (2, 8, 7), 2),
    "stride > kernel, 1-D, padded": (Conv1d(2, 2, IDENTITY, stride=5, padding=1), (3, 13), 2),
    "padding = kernel // 2": (Conv2d(4, 5, IDENTITY, padding=2), (3, 6, 6), 2),
    "padding = kernel - 1": (Conv2d(2, 3, IDENTITY, padding=2), (1, 4, 4), 2),
    "1x1 conv": (Conv2d(5, 1, IDENTITY), (3, 4, 4), 2),
    "1x1 conv, strided": (Conv2d(5, 1, IDENTITY, stride=2), (3, 5, 5), 2),
    "groups = channels (depthwise)": (Conv2d(6, 3, IDENTITY, padding=1, groups=6), (6, 5, 5), 2),
    "groups = channels, 1-D, multiplier 2": (Conv1d(8, 3, IDENTITY, groups=4), (4, 9), 2),
    "batch 1": (Conv2d(3, 3, IDENTITY, stride=2, padding=1), (2, 7, 7), 1),
    "same, even kernel, dilated": (Conv2d(3, (4, 2), IDENTITY, padding="same", dilation=(1, 3)), (2, 6, 7), 2),
    "same, 1-D, even kernel": (Conv1d(2, 4, IDENTITY, padding="same"), (3, 5), 2),
    "dilation, stride, padding together": (Conv2d(4, 3, IDENTITY, stride=2, padding=(2, 1), dilation=2, groups=2), (4, 9, 8), 3),
    "max pool, padding = kernel // 2": (MaxPool2d(3, 2, 1), (2, 5, 5), 2),
    "max pool, kernel = input size": (MaxPool2d((4, 3)), (2, 4, 3), 2),
    "max pool, stride > kernel": (MaxPool1d(2, 3), (2, 10), 2),
    "max pool, overlapping windows": (MaxPool2d(3, 1, 1), (2, 4, 4), 2),
    "avg pool, padding counted": (AvgPool2d(3, 2, 1, count_include_pad=True), (2, 5, 6), 2),
    "avg pool, padding not counted": (AvgPool2d(3, 2, 1, count_include_pad=False), (2, 5, 6), 2),
    "avg pool 1-D, padding not counted": (AvgPool1d(4, 1, 2, count_include_pad=False), (2, 5), 2),
    "avg pool, stride > kernel, batch 1": (AvgPool2d(2, 3), (3, 8, 8), 1),
    "flatten (C, H, W)": (Flatten(), (3, 4, 5), 2),
    "flatten (C, L), batch 1": (Flatten(), (3, 4), 1),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
@pytest.mark.parametrize("integers", [False, True], ids=["normal", "integers"])
def test_edge_cases_match_torch(name, integers):
    layer, in_shape, m = EDGE_CASES[name]
    check_against_torch(layer, in_shape, m, seed=len(name), integers=integers)


def test_max_pool_ties_go_to_the_first_element_in_row_major_order():
    """The documented convention (torch's CPU kernel): a tie sends all of δ to the window's first maximum."""
    a = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 3.0],
                    [2.0, 3.0, 1.0]]]])
    layer = MaxPool2d(2, 1)
    delta = np.array([[[[1.0, 10.0], [100.0, 1000.0]]]])
    _, grad = layer.backward({}, a, delta)
    # windows (0,0): 3 at (0,1); (0,1): 3 at (0,1); (1,0): 3 at (1,0); (1,1): 3 at (1,2) (row 1 before row 2)
    np.testing.assert_array_equal(grad, [[[[0, 11, 0], [100, 0, 1000], [0, 0, 0]]]])
    check_against_torch(layer, (1, 3, 3), 1, seed=0, integers=True)


# -- float32 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dilation, stride, padding together", "same, even kernel, dilated",
                                  "max pool, overlapping windows", "avg pool, padding not counted", "flatten (C, H, W)"])
def test_float32_keeps_its_dtype_and_matches_float64(name):
    layer, in_shape, m = EDGE_CASES[name]
    z32, g32, ga32 = check_against_torch(layer, in_shape, m, seed=7, dtype=np.float32)
    z64, g64, ga64 = check_against_torch(layer, in_shape, m, seed=7, dtype=np.float64)
    # the same draws, cast: float64 with the float32 inputs differs by float32 roundings only
    rng = np.random.default_rng(7)
    a = rng.standard_normal((m, *in_shape)).astype(np.float32).astype(np.float64)
    p = {k: rng.standard_normal(s).astype(np.float32).astype(np.float64) for k, s in layer.param_shapes(in_shape).items()}
    z = layer.forward(p, a)
    delta = rng.standard_normal(z.shape).astype(np.float32).astype(np.float64)
    g, ga = layer.backward(p, a, delta)
    norm_close(z32.astype(np.float64), z, 1e-6, "z")
    norm_close(ga32.astype(np.float64), ga, 1e-6, "∂C/∂a")
    for k in g:
        norm_close(g32[k].astype(np.float64), g[k], 1e-6, k)


# -- shapes and their errors -----------------------------------------------------------------------------
def test_param_shapes_are_torchs_layouts():
    assert Conv2d(8, (3, 5), IDENTITY, groups=2).param_shapes((4, 9, 9)) == {"weight": (8, 2, 3, 5), "bias": (8,)}
    assert Conv1d(6, 3, IDENTITY, groups=3, bias=False).param_shapes((3, 9)) == {"weight": (6, 1, 3)}
    assert MaxPool2d(2).param_shapes((3, 4, 4)) == {} and AvgPool1d(2).param_shapes((3, 4)) == {}
    c = torch.nn.Conv2d(4, 8, (3, 5), groups=2)
    assert {k: tuple(v.shape) for k, v in c.state_dict().items()} == Conv2d(8, (3, 5), IDENTITY, groups=2).param_shapes((4, 9, 9))


def test_out_shapes():
    assert Conv2d(16, 3, IDENTITY, padding=1).out_shape((3, 32, 32)) == (16, 32, 32)
    assert Conv2d(16, 3, IDENTITY, padding="same", dilation=3).out_shape((3, 10, 7)) == (16, 10, 7)
    assert Conv2d(2, (3, 1), IDENTITY, stride=(2, 3)).out_shape((1, 9, 10)) == (2, 4, 4)
    assert Conv1d(2, 3, IDENTITY, dilation=2).out_shape((1, 5)) == (2, 1)
    assert MaxPool2d(2).out_shape((6, 28, 28)) == (6, 14, 14)
    assert AvgPool1d(3, 2, 1).out_shape((4, 8)) == (4, 4)
    assert Flatten().out_shape((16, 5, 5)) == (400,)


@pytest.mark.parametrize("layer, in_shape, message", [
    (Conv2d(8, 3, IDENTITY), (64,), "layers.3: conv2d needs (C, H, W) input, got (64,)"),
    (Conv2d(8, 3, IDENTITY), (3, 8, 8, 8), "layers.3: conv2d needs (C, H, W) input, got (3, 8, 8, 8)"),
    (Conv1d(8, 3, IDENTITY), (3, 8, 8), "layers.3: conv1d needs (C, L) input, got (3, 8, 8)"),
    (MaxPool2d(2), (10, 4), "layers.3: max_pool2d needs (C, H, W) input, got (10, 4)"),
    (AvgPool1d(2), (10,), "layers.3: avg_pool1d needs (C, L) input, got (10,)"),
    (Flatten(), (), "layers.3: flatten needs an input with at least one axis, got ()"),
])
def test_wrong_rank_is_refused_naming_layer_and_shape(layer, in_shape, message):
    with pytest.raises(SpecError) as err:
        layer.out_shape(in_shape, "layers.3")
    assert str(err.value) == message
    with pytest.raises(SpecError, match="needs"):
        layer.param_shapes(in_shape, "layers.3")


@pytest.mark.parametrize("layer, in_shape, message", [
    (Conv2d(8, 5, IDENTITY), (3, 4, 4), "layers[1]: conv2d maps (3, 4, 4) to (8, 0, 0), an empty output"),
    (Conv2d(8, 3, IDENTITY, dilation=(1, 4)), (3, 4, 8), "layers[1]: conv2d maps (3, 4, 8) to (8, 2, 0), an empty output"),
    (Conv1d(2, 4, IDENTITY, padding=1, stride=2), (3, 1), "layers[1]: conv1d maps (3, 1) to (2, 0), an empty output"),
    (MaxPool2d(3), (6, 2, 9), "layers[1]: max_pool2d maps (6, 2, 9) to (6, 0, 3), an empty output"),
    (AvgPool1d(5, padding=1), (2, 2), "layers[1]: avg_pool1d maps (2, 2) to (2, 0), an empty output"),
])
def test_empty_output_is_refused_naming_both_shapes(layer, in_shape, message):
    with pytest.raises(SpecError) as err:
        layer.out_shape(in_shape, "layers[1]")
    assert str(err.value).startswith(message + "; ")


def test_groups_must_divide_the_input_channels():
    with pytest.raises(SpecError) as err:
        Conv2d(4, 3, IDENTITY, groups=2).out_shape((3, 8, 8), "layers[2]")
    assert str(err.value).startswith("layers[2].groups: 2 does not divide the 3 input channels of (3, 8, 8)")


# -- the spec form ---------------------------------------------------------------------------------------
def test_to_json_is_canonical_and_round_trips():
    conv = Conv2d.from_json({"type": "conv2d", "out_channels": 6, "kernel_size": [5, 5], "activation": "relu"}, "layers[0]")
    assert conv.to_json() == {"type": "conv2d", "out_channels": 6, "kernel_size": 5, "stride": 1, "padding": 0,
                              "dilation": 1, "groups": 1, "activation": "relu", "bias": True}
    assert conv == Conv2d(6, 5, make_activation("relu"))
    same = Conv1d.from_json({"type": "conv1d", "out_channels": 2, "kernel_size": 4, "padding": "same",
                             "activation": {"name": "leaky_relu", "negative_slope": 0.1}, "bias": False}, "x")
    assert Conv1d.from_json(same.to_json(), "x") == same and same.to_json()["padding"] == "same"
    pool = MaxPool2d.from_json({"type": "max_pool2d", "kernel_size": [2, 3]}, "layers[1]")
    assert pool.stride == (2, 3) and pool.to_json() == {"type": "max_pool2d", "kernel_size": [2, 3], "stride": [2, 3], "padding": 0}
    avg = AvgPool1d.from_json({"type": "avg_pool1d", "kernel_size": 3, "padding": 1, "count_include_pad": False}, "l")
    assert avg.to_json() == {"type": "avg_pool1d", "kernel_size": 3, "stride": 3, "padding": 1, "count_include_pad": False}
    assert Flatten.from_json({"type": "flatten"}, "l") == Flatten() and Flatten().to_json() == {"type": "flatten"}
    for layer in (MaxPool1d(2), AvgPool2d(2), Flatten()):
        assert layer.activation.name == "identity"


GOOD = {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "activation": "relu"}


@pytest.mark.parametrize("cls, obj, message", [
    (Conv2d, {**GOOD, "kernal_size": 3}, "layers[0].kernal_size: unknown field"),
    (Conv2d, {k: v for k, v in GOOD.items() if k != "out_channels"}, "layers[0].out_channels: missing"),
    (Conv2d, {k: v for k, v in GOOD.items() if k != "activation"}, "layers[0].activation: missing"),
    (Conv2d, {**GOOD, "out_channels": 0}, "layers[0].out_channels: 0 is not positive"),
    (Conv2d, {**GOOD, "kernel_size": [3, 3, 3]}, "layers[0].kernel_size: [3, 3, 3] has 3 entries"),
    (Conv2d, {**GOOD, "kernel_size": [3, 0]}, "layers[0].kernel_size[1]: 0 is not positive"),
    (Conv2d, {**GOOD, "kernel_size": 2.0}, "layers[0].kernel_size: 2.0 is not an integer"),
    (Conv2d, {**GOOD, "stride": True}, "layers[0].stride: True is not an integer"),
    (Conv2d, {**GOOD, "padding": -1}, "layers[0].padding: -1 is negative"),
    (Conv2d, {**GOOD, "padding": "valid"}, "layers[0].padding: 'valid' is not a padding"),
    (Conv2d, {**GOOD, "padding": "same", "stride": 2}, 'layers[0].padding: "same" needs stride 1, got stride 2'),
    (Conv2d, {**GOOD, "dilation": [1, 0]}, "layers[0].dilation[1]: 0 is not positive"),
    (Conv2d, {**GOOD, "groups": 3}, "layers[0].groups: 3 does not divide out_channels = 4"),
    (Conv2d, {**GOOD, "bias": "yes"}, "layers[0].bias: 'yes' is not true or false"),
    (Conv2d, {**GOOD, "activation": "sigmod"}, "layers[0].activation: unknown activation 'sigmod'"),
    (Conv1d, {**GOOD, "type": "conv1d", "kernel_size": [3, 3]}, "layers[0].kernel_size: [3, 3] has 2 entries"),
    (MaxPool2d, {"type": "max_pool2d"}, "layers[0].kernel_size: missing"),
    (MaxPool2d, {"type": "max_pool2d", "kernel_size": 3, "padding": 2}, "layers[0].padding: 2 is more than half of kernel_size 3"),
    (MaxPool2d, {"type": "max_pool2d", "kernel_size": 2, "count_include_pad": True}, "layers[0].count_include_pad: unknown field"),
    (MaxPool2d, {"type": "max_pool2d", "kernel_size": 2, "activation": "relu"}, "layers[0].activation: unknown field"),
    (AvgPool2d, {"type": "avg_pool2d", "kernel_size": 2, "count_include_pad": 1}, "layers[0].count_include_pad: 1 is not true or false"),
    (AvgPool1d, {"type": "avg_pool1d", "kernel_size": 2, "stride": 0}, "layers[0].stride: 0 is not positive"),
    (Flatten, {"type": "flatten", "start_dim": 1}, "layers[0].start_dim: unknown field"),
])
def test_bad_fields_are_refused_with_the_field_named(cls, obj, message):
    with pytest.raises(SpecError) as err:
        cls.from_json(obj, "layers[0]")
    assert str(err.value).startswith(message)


# -- the package ------------------------------------------------------------------------------------------
def test_the_package_keeps_the_old_names_and_registers_every_type():
    from manual_bp.layers import MAX_SIZE, parse_named, positive_int, reject_unknown
    assert MAX_SIZE == 2**31 and positive_int(3, "units") == 3
    assert parse_named("tanh", "activation", make_activation).name == "tanh"
    with pytest.raises(SpecError, match="layers.0.units: unknown field"):
        reject_unknown({"units": 1}, ("type",), "layers.0")
    assert bp.Dense is Dense and bp.LAYER_TYPES is LAYER_TYPES
    assert {cls.type for cls in (Conv1d, Conv2d, MaxPool1d, MaxPool2d, AvgPool1d, AvgPool2d, Flatten)} == {
        "conv1d", "conv2d", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "flatten"}
    from manual_bp.layers import (GRU, LSTM, RNN, Attention, BatchNorm, Dropout, Embedding, GroupNorm, LayerNorm, Residual,
                                  TemporalDense)
    assert LAYER_TYPES == {cls.type: cls for cls in (Dense, Conv1d, Conv2d, MaxPool1d, MaxPool2d, AvgPool1d, AvgPool2d, Flatten,
                                                      BatchNorm, LayerNorm, GroupNorm, Dropout, Embedding, Residual,
                                                      TemporalDense, RNN, LSTM, GRU, Attention)}
