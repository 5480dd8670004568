"""temporal_dense (dense at every step of a sequence): manual_bp against torch's F.linear on (m, T, n), the spec
rules, and the oracle on random sequence nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp import SpecError
from oracle.strategies import cases, sequence_specs


def spec_of(layers, shape=(5, 3), loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


LAYERS = [{"type": "temporal_dense", "units": 4, "activation": "tanh"}, {"type": "layer_norm", "activation": "relu"},
          {"type": "temporal_dense", "units": 2, "activation": "identity", "bias": False}, {"type": "flatten"},
          {"type": "dense", "units": 3, "activation": "identity"}]


def test_weights_shared_through_time_sum_their_gradients_as_torch():
    spec = spec_of(LAYERS)
    params, x, y = bp.random_case(spec, 0, batch=3)
    ours = bp.gradients(spec, params, x, y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    a = torch.tanh(F.linear(xt, P["layers.0.weight"], P["layers.0.bias"]))
    a = F.relu(F.layer_norm(a, (4,), P["layers.1.weight"], P["layers.1.bias"]))
    a = F.linear(a, P["layers.2.weight"])
    out = F.linear(a.flatten(1), P["layers.4.weight"], P["layers.4.bias"])
    F.mse_loss(out, torch.tensor(y)).backward()
    for k in spec.param_shapes():
        np.testing.assert_allclose(ours.grads[k], P[k].grad.numpy(), rtol=1e-10, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(ours.grad_input, xt.grad.numpy(), rtol=1e-10, atol=1e-13)
    # the closed form: θ's gradient is the sum over steps of each step's δᵀa
    d, a0 = ours.deltas["layers.0"], x
    np.testing.assert_allclose(ours.grads["layers.0.weight"], sum(d[:, t].T @ a0[:, t] for t in range(5)), rtol=1e-12)


@pytest.mark.parametrize("layers, shape, match", [
    ([{"type": "temporal_dense", "units": 2, "activation": "tanh"}], (6,), r"layers\.0: temporal_dense needs \(T, n\) input, got \(6,\)"),
    ([{"type": "temporal_dense", "units": 0, "activation": "tanh"}], (2, 3), r"layers\[0\]\.units: 0 is not positive"),
    ([{"type": "temporal_dense", "units": 2}], (2, 3), r"layers\[0\]\.activation: missing"),
])
def test_bad_temporal_dense_is_refused(layers, shape, match):
    with pytest.raises(SpecError, match=match):
        spec_of(layers + [{"type": "flatten"}, {"type": "dense", "units": 1, "activation": "identity"}], shape)


def test_a_gradient_from_the_last_step_only_is_named():
    from oracle.mutants import CATALOGUE
    mutant = next(m for m in CATALOGUE if m.name == "temporal_dense_grad_from_last_step")
    spec = spec_of(LAYERS)
    params, x, y = bp.random_case(spec, 0, batch=3)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert result.classification == "bug" and result.first_divergent_layer == 2
    assert "every step" in result.localization


@settings(deadline=None)
@given(cases(specs_strategy=sequence_specs()))
def test_correct_backprop_passes_on_random_sequence_nets(case):
    result = oracle.check(case.spec, case.params, case.x, case.y)
    assert result.passed, result.message()
