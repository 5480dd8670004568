"""Spec format version 2: the input's shape, shape inference layer by layer, and networks that mix
conv, pooling, flatten and dense, checked end to end against torch (issue 10, the general structure)."""

import json

import numpy as np
import pytest

import manual_bp as bp
import oracle


def _v2(shape, layers, loss="cross_entropy"):
    return {"format_version": 2, "input": {"shape": shape}, "layers": layers, "loss": loss}


def test_version_1_specs_load_unchanged_and_write_back_identically():
    for name in bp.example_names():
        spec = bp.example(name)
        if spec.format_version == 1:
            text = spec.to_json()
            assert "input_size" in json.loads(text) and "input" not in json.loads(text)
            assert bp.Spec.from_json(text) == spec and bp.Spec.from_json(text).to_json() == text
            assert spec.input_shape == (spec.input_size,)


def test_lenet_example_parses_infers_shapes_and_round_trips():
    spec = bp.example("lenet")
    assert spec.input_shape == (1, 28, 28) and spec.out_shape(0) == (6, 28, 28) and spec.out_shape(1) == (6, 14, 14)
    assert spec.out_shape(4) == (400,) and spec.output_size == 10
    assert spec.param_shapes()["layers.0.weight"] == (6, 1, 5, 5)  # torch's (out, in/groups, kH, kW)
    assert bp.Spec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_lenet_manual_bp_matches_torch_autograd(dtype):
    spec = bp.example("lenet")
    params, x, y = bp.random_case(spec, 3, batch=3, dtype=dtype)
    result = oracle.check(spec, params, x, y)
    assert result.passed and result.classification == "match", result.message()
    assert {t.name for t in result.tensors} >= {"layers.0.weight", "layers.2.delta", "layers.1.delta", "input.grad"}


def test_a_conv_bug_is_a_bug_at_its_layer():
    """A dropped bias gradient in a conv layer is judged like any dense bug, and located."""
    spec = bp.example("lenet")
    params, x, y = bp.random_case(spec, 4, batch=2)

    def no_conv_bias(s, p, xx, yy):
        r = bp.gradients(s, p, xx, yy)
        return r.loss, {**r.grads, "layers.2.bias": np.zeros_like(r.grads["layers.2.bias"])}

    result = oracle.check(spec, params, x, y, no_conv_bias)
    assert not result.passed and result.classification == "bug"
    assert result.first_divergent_layer == 2 and "layers.2.bias" in {t.name for t in result.failed_tensors}


@pytest.mark.parametrize("shape,layers,words", [
    ([8], [{"type": "dense", "units": 4, "activation": "relu"}, {"type": "conv2d", "out_channels": 2, "kernel_size": 1,
      "activation": "relu"}], "layers.1: conv2d needs (C, H, W) input, got (4,)"),
    ([1, 4, 4], [{"type": "conv2d", "out_channels": 2, "kernel_size": 9, "activation": "relu"}], "an empty output"),
    ([1, 4, 4], [{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "activation": "relu"}], "a loss needs a vector"),
    ([1, 4, 4], [{"type": "dense", "units": 3, "activation": "identity"}], "dense needs (n,) input, got (1, 4, 4)"),
])
def test_shape_mismatches_are_refused_naming_the_layer_and_both_shapes(shape, layers, words):
    with pytest.raises(bp.SpecError) as info:
        bp.Spec.from_dict(_v2(shape, layers))
    assert words in str(info.value)


@pytest.mark.parametrize("obj,words", [
    ({"format_version": 1, "input_size": 3, "layers": [{"type": "flatten"}], "loss": "mse"}, "flatten needs the input's shape"),
    ({"format_version": 2, "input_size": 3, "layers": [], "loss": "mse"}, "input_size: is not a field of format_version 2"),
    ({"format_version": 2, "input": {"shape": [3, 0]}, "layers": [{"type": "flatten"}], "loss": "mse"}, "input.shape[1]"),
    ({"format_version": 2, "input": {"shape": [1, 2, 3, 4]}, "layers": [{"type": "flatten"}], "loss": "mse"}, "1 to 3 sizes"),
    ({"format_version": 2, "input": [3], "layers": [{"type": "flatten"}], "loss": "mse"}, "input: "),
    ({"format_version": 3, "input": {"shape": [3]}, "layers": [], "loss": "mse"}, "format_version: 3 is not supported"),
])
def test_malformed_version_2_fields_are_refused(obj, words):
    with pytest.raises(bp.SpecError) as info:
        bp.Spec.from_dict(obj)
    assert words in str(info.value)


def test_x_must_have_the_input_shape():
    spec = bp.example("lenet")
    params = bp.init_params(spec, np.random.default_rng(0))
    with pytest.raises(bp.SpecError, match="give \\(batch, 1, 28, 28\\)"):
        bp.gradients(spec, params, np.zeros((2, 784)), np.array([1, 2]))
