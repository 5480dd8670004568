"""Regression: relu′(0) = 1 (a valid kink convention) judged ``bug`` in float32 exact_kinks nets (3 in 14,100
control checks of a rates run at seed 5). At a unit whose z is exactly 0 for every example, torch's δ is 0 and
the candidate's is its own float32 upstream; the allowance carried the upstream's rounding with torch's
slope (0) there instead of the larger one-sided slope, so the candidate's float32 rounding of the upstream
(2.5e-5 relative after softmax and silu) had a bound of ~1e-9. Each case is rebuilt by ``oracle.rates.replay``.
"""

import pytest

import oracle
from oracle.mutants import CATALOGUE
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
