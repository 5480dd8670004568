"""The second correct implementation (tests/impls/second_correct.py) on batch, layer and group norm and
dropout: it agrees with torch.autograd (torch.nn.functional written out here, not the oracle's twin) to
float64 rounding, and the oracle passes it on drawn networks that mix these layers with everything else.

Its normalization code is its own: each norm as a row table (one row per normalized set) and a backward
that walks the forward graph node by node (∂ρ, ∂r, ∂σ², ∂μ, ...), not manual_bp's compact formula.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import manual_bp as bp
import oracle
from oracle.strategies import cases, with_norms

from .helpers import assert_close_to_reference, functional_reference
from .impls import second_correct
from .impls.second_correct import grads

def spec_of(shape, layers, loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


def dense(units, act="identity"):
    return {"type": "dense", "units": units, "activation": act}


def case_of(spec, seed=0):
    params, x, y = bp.random_case(spec, seed, batch=3)
    rng = np.random.default_rng(seed + 100)
    for k in spec.buffer_shapes():  # running statistics away from (0, 1), so eval mode is not the identity
        params[k] = rng.uniform(0.3, 2.0, params[k].shape) if k.endswith("running_var") else rng.normal(0, 0.5, params[k].shape)
    return params, x, y


def assert_matches_torch(spec, params, x, y):
    loss, g, d = grads(spec, params, x, y)
    ref_loss, ref_g, ref_d, _, _ = functional_reference(spec, params, x, y)
    assert set(g) == set(spec.param_shapes()) == set(ref_g)           # trainable parameters only, no buffers
    assert set(d) == {f"layers.{i}" for i in range(len(spec.layers))}
    assert_close_to_reference(spec, (loss, g, d), (ref_loss, ref_g, ref_d))


def bn(training=True, affine=True, act="identity"):
    return {"type": "batch_norm", "training": training, "affine": affine, "activation": act}


CONV1 = {"type": "conv1d", "out_channels": 3, "kernel_size": 2, "activation": "identity"}
CONV2 = {"type": "conv2d", "out_channels": 4, "kernel_size": 2, "activation": "identity"}

SPECS = {}
for train in (True, False):
    for affine in (True, False):
        tag = f"{'train' if train else 'eval'}, {'affine' if affine else 'no affine'}"
        SPECS[f"batch_norm 1-d over (m, n), {tag}"] = spec_of([4], [dense(5), bn(train, affine, "tanh"), dense(2)])
        SPECS[f"batch_norm 1-d over (C, L), {tag}"] = spec_of(
            [2, 6], [CONV1, bn(train, affine, "relu"), {"type": "flatten"}, dense(2)])
        SPECS[f"batch_norm 2-d over (C, H, W), {tag}"] = spec_of(
            [2, 4, 5], [CONV2, bn(train, affine, "tanh"), {"type": "flatten"}, dense(2)])
SPECS.update({
    "batch_norm on the input itself": spec_of([3, 4], [bn(), {"type": "flatten"}, dense(2, "sigmoid")]),
    "layer_norm, last axis of (m, n)": spec_of([4], [dense(6), {"type": "layer_norm", "activation": "tanh"}, dense(2)]),
    "layer_norm, last axis of (C, L)": spec_of(
        [2, 6], [CONV1, {"type": "layer_norm", "activation": "relu"}, {"type": "flatten"}, dense(2)]),
    "layer_norm, full shape (C, H, W)": spec_of(
        [2, 4, 5], [CONV2, {"type": "layer_norm", "normalized_shape": [4, 3, 4], "activation": "tanh"},
                    {"type": "flatten"}, dense(2)]),
    "layer_norm, (H, W) of (C, H, W), no affine": spec_of(
        [2, 4, 5], [CONV2, {"type": "layer_norm", "normalized_shape": [3, 4], "elementwise_affine": False},
                    {"type": "flatten"}, dense(2)]),
    "group_norm, 2 groups of 2 (C, H, W)": spec_of(
        [2, 4, 5], [CONV2, {"type": "group_norm", "num_groups": 2, "activation": "tanh"}, {"type": "flatten"}, dense(2)]),
    "group_norm, instance norm (G = C), no affine": spec_of(
        [2, 6], [CONV1, {"type": "group_norm", "num_groups": 3, "affine": False, "activation": "relu"},
                 {"type": "flatten"}, dense(2)]),
    "group_norm, one group, over (m, n)": spec_of([4], [dense(6), {"type": "group_norm", "num_groups": 1}, dense(2)]),
    "norms stacked": spec_of([2, 4, 5], [CONV2, bn(True, True, "tanh"), {"type": "group_norm", "num_groups": 4},
                                         {"type": "layer_norm", "normalized_shape": [4, 3, 4]}, bn(False),
                                         {"type": "flatten"}, dense(2)]),
})
for p in (0.0, 0.5, 0.9):
    for train in (True, False):
        SPECS[f"dropout p={p}, {'train' if train else 'eval'}"] = spec_of(
            [4], [dense(6, "tanh"), {"type": "dropout", "p": p, "seed": 11, "training": train}, dense(2)])
SPECS["dropout on a (C, H, W) input, then a conv"] = spec_of(
    [2, 4, 5], [{"type": "dropout", "p": 0.5, "seed": 3, "activation": "relu"}, CONV2, {"type": "flatten"}, dense(2)])


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_torch_in_float64(name):
    spec = SPECS[name]
    for seed in (0, 1):
        assert_matches_torch(spec, *case_of(spec, seed))


def test_eval_batch_norm_uses_the_running_statistics():
    spec = spec_of([4], [bn(False, False)])
    params, x, _ = case_of(spec)
    z = second_correct.layer_forward(spec.layers[0], params, 0, x)
    rm, rv = params["layers.0.running_mean"], params["layers.0.running_var"]
    np.testing.assert_allclose(z, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-14)


def test_dropout_mask_is_the_cases():
    """second_correct draws the mask by keep_mask's documented formula; it must be manual_bp's mask."""
    for seed, p, shape in ((0, 0.5, (3, 4)), (7, 0.9, (2, 3, 4, 5)), (2**40, 0.1, (5,)), (1, 0.0, (3, 2))):
        np.testing.assert_array_equal(second_correct.keep_mask(seed, p, shape), bp.keep_mask(seed, p, shape))


def test_float32_stays_float32():
    spec = SPECS["norms stacked"]
    params, x, y = case_of(spec)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    loss, g, d = grads(spec, p32, x.astype(np.float32), y.astype(np.float32))
    assert all(v.dtype == np.float32 for v in (*g.values(), *d.values())) and np.asarray(loss).dtype == np.float32
    _, g64, _ = grads(spec, params, x, y)
    for k in g:
        np.testing.assert_allclose(g[k], g64[k], rtol=1e-3, atol=1e-4)


# Derandomized, as the CNN test: random draws of float32 cases meet, about once in 3000, a max-pool window
# whose float32 near-tie torch's float64 decides otherwise, which fails manual_bp as much as second_correct.
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases(specs_strategy=with_norms()))
def test_oracle_passes_second_correct_on_drawn_norm_cases(case):
    result = oracle.check(case.spec, case.params, case.x, case.y, grads)
    assert result.passed, result.message()
