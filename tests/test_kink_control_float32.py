"""Regression: relu′(0) = 1 (a valid kink convention) judged ``bug`` in float32 exact_kinks nets (3 in 14,100
control checks of a rates run at seed 5). At a unit whose z is exactly 0 for every example, torch's δ is 0 and
the candidate's is its own float32 upstream; the allowance carried the upstream's rounding with torch's
slope (0) there instead of the larger one-sided slope, so the candidate's float32 rounding of the upstream
(2.5e-5 relative after softmax and silu) had a bound of ~1e-9. Each case is rebuilt by ``oracle.rates.replay``.
"""

import pytest

import oracle
from oracle.mutants import CATALOGUE, CORRECT
from oracle.rates import replay

CASES = [
    {'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 26, 'layers': [{'type': 'dense', 'units': 25, 'activation': {'name': 'softplus', 'beta': 2.0, 'threshold': 5.0}, 'bias': True}, {'type': 'dense', 'units': 25, 'activation': 'relu', 'bias': False}, {'type': 'dense', 'units': 21, 'activation': 'identity', 'bias': True}, {'type': 'dense', 'units': 17, 'activation': 'gelu_tanh', 'bias': False}, {'type': 'dense', 'units': 25, 'activation': {'name': 'softplus', 'beta': 2.0, 'threshold': 5.0}, 'bias': True}, {'type': 'dense', 'units': 7, 'activation': 'sigmoid', 'bias': False}], 'loss': 'mse'}, 'regime': 'exact_kinks', 'dtype': 'float32', 'batch': 1, 'data_seed': 3145196628},
    {'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 4, 'layers': [{'type': 'dense', 'units': 7, 'activation': {'name': 'elu', 'alpha': 1.5}, 'bias': False}, {'type': 'dense', 'units': 3, 'activation': 'relu', 'bias': True}, {'type': 'dense', 'units': 19, 'activation': 'relu', 'bias': True}, {'type': 'dense', 'units': 9, 'activation': 'silu', 'bias': False}, {'type': 'dense', 'units': 5, 'activation': 'softmax', 'bias': False}], 'loss': 'half_sse'}, 'regime': 'exact_kinks', 'dtype': 'float32', 'batch': 2, 'data_seed': 597878125},
    {'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 4, 'layers': [{'type': 'dense', 'units': 3, 'activation': 'relu', 'bias': True}, {'type': 'dense', 'units': 3, 'activation': 'relu', 'bias': True}, {'type': 'dense', 'units': 3, 'activation': 'relu', 'bias': True}, {'type': 'dense', 'units': 9, 'activation': 'silu', 'bias': False}, {'type': 'dense', 'units': 5, 'activation': 'softmax', 'bias': False}], 'loss': 'half_sse'}, 'regime': 'exact_kinks', 'dtype': 'float32', 'batch': 5, 'data_seed': 2673986412},
]


@pytest.mark.parametrize("info", CASES, ids=lambda info: f"seed{info['data_seed']}")
def test_the_other_slope_at_exact_kinks_in_float32_is_a_kink(info):
    mutant = next(m for m in CATALOGUE if m.name == "relu_prime_at_zero_is_one")
    spec, params, x, y = replay(info)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert result.passed and result.classification == "kink", result.message()
    assert oracle.check(spec, params, x, y).passed


CONV_CASE = {'spec': {'format_version': 2, 'name': '', 'description': '', 'input': {'shape': [2, 9, 5]}, 'layers': [{'type': 'conv2d', 'out_channels': 4, 'kernel_size': [3, 2], 'stride': 1, 'padding': 'same', 'dilation': [3, 2], 'groups': 1, 'activation': 'relu', 'bias': False}, {'type': 'conv2d', 'out_channels': 4, 'kernel_size': [3, 2], 'stride': 1, 'padding': 'same', 'dilation': [3, 2], 'groups': 1, 'activation': 'silu', 'bias': False}, {'type': 'flatten'}, {'type': 'dense', 'units': 8, 'activation': 'silu', 'bias': False}, {'type': 'dense', 'units': 3, 'activation': 'softmax', 'bias': False}], 'loss': 'half_mse'}, 'regime': 'near_kinks', 'dtype': 'float32', 'batch': 5, 'data_seed': 3897684029}


def _delta0_scaled(grads_fn, factor):
    def scaled(spec, params, x, y):
        loss, grads, deltas = grads_fn(spec, params, x, y)[:3]
        deltas = dict(deltas)
        deltas["layers.0"] = (deltas["layers.0"] * factor).astype(deltas["layers.0"].dtype)
        return loss, grads, deltas
    return scaled


def test_the_other_slope_read_in_units_of_the_slope_where_the_upstream_is_within_rounding_of_zero():
    """Regression: relu′(0) = 1 judged ``bug`` in a float32 conv net (near_kinks). 71 units of layer 0 have z exactly
    0; there the candidate's δ is its own upstream, whose float32 rounding (up to ~1e-5 allowed) dwarfs the upstream itself
    (1e-14 to 1e-10). At 22 of them that δ lay nearer torch's 0 than torch's upstream, so the per-element read took torch's
    slope, whose allowance there is nil. The sides are now compared in units of their slopes."""
    mutant = next(m for m in CATALOGUE if m.name == "relu_prime_at_zero_is_one")
    spec, params, x, y = replay(CONV_CASE)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert result.passed and result.classification == "kink", result.message()
    assert oracle.check(spec, params, x, y).passed
    # bugs at that layer still fail, whichever slope is taken at the kinks
    dropped = next(m for m in CATALOGUE if m.name == "relu_mask_dropped_layer0")
    assert oracle.check(spec, params, x, y, dropped.grads_fn).classification == "bug"
    for fn in (mutant.grads_fn, CORRECT.grads_fn):
        assert oracle.check(spec, params, x, y, _delta0_scaled(fn, 1.01)).classification == "bug"
