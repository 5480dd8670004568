"""The measured rounding noise of layers many operations deep (rnn, lstm, gru, attention): one random sample of
every operation's own rounding, carried through the *signed* Jacobians (``oracle/composite.py``), so that a long
recurrence in float32 keeps an allowance near what rounding really does instead of the worst case's |W|ᵀ powers."""

import numpy as np
import pytest

import manual_bp as bp
from manual_bp import Spec
from oracle import check
from oracle.composite import CompositeMagnitudes
from oracle.strategies import draw_data, draw_params
from oracle.twin import run_twin


def _spec(layer: dict, T: int = 24, n: int = 16) -> Spec:
    return Spec.from_dict({"format_version": 2, "input": {"shape": [T, n]},
                           "layers": [layer, {"type": "temporal_dense", "units": 5, "activation": "identity"}],
                           "loss": "cross_entropy"})


def _case(spec, regime, dtype, seed=1, batch=6):
    rng = np.random.default_rng(seed)
    params = draw_params(spec, rng, regime, dtype)
    x, y = draw_data(spec, rng, regime, batch, dtype)
    return params, x, y


def test_a_long_float32_recurrence_is_judged_without_a_weak_check():
    """32 tanh steps with weights on the half-integer grid: the worst case grows like ‖|W_hh|‖^T and once made the
    allowance 10⁵ times the gradient; the sampled noise keeps it a real check."""
    spec = _spec({"type": "rnn", "hidden_size": 16}, T=32)
    params, x, y = _case(spec, "near_kinks", "float32", batch=8)
    result = check(spec, params, x, y)
    assert result.passed, result.message()
    assert not [n for n in result.notes if n.startswith("Weak check")], result.notes


@pytest.mark.parametrize("layer", [{"type": "lstm", "hidden_size": 12}, {"type": "gru", "hidden_size": 12},
                                   {"type": "attention", "num_heads": 4, "causal": True}])
def test_a_one_per_mille_error_in_a_long_float32_sequence_layer_is_caught(layer):
    """The allowance stays far below a 0.1% error of one weight gradient, over 24 steps in float32."""
    spec = _spec(layer)
    params, x, y = _case(spec, "well_conditioned", "float32")
    name = "layers.0.weight_hh_l0" if layer["type"] != "attention" else "layers.0.in_proj_weight"

    def nudged(spec, params, x, y):
        g = bp.gradients(spec, params, x, y)
        g.grads[name] = g.grads[name] * np.float32(1.001)
        return g

    assert check(spec, params, x, y).passed
    result = check(spec, params, x, y, nudged)
    assert not result.passed and result.classification == "bug", result.message()


@pytest.mark.parametrize("layer", [{"type": "lstm", "hidden_size": 6, "initial_state": "learned"},
                                   {"type": "rnn", "hidden_size": 6, "nonlinearity": "relu"},
                                   {"type": "attention", "num_heads": 2}])
def test_samples_are_random_rounding_sized_and_within_the_worst_case(layer):
    """Each sample is nonzero, changes from draw to draw, and stays inside the first-order worst case (u of the
    bound's units): what a noise model must be to be neither silent nor louder than rounding can be."""
    spec = _spec(layer, T=5, n=4)
    params, x, _ = _case(spec, "well_conditioned", "float64", batch=3)
    i = 0
    w = {k[len("layers.0."):]: v for k, v in params.items() if k.startswith("layers.0.")}
    mag = CompositeMagnitudes(spec.layers[i], w, x)
    u = 2.0 ** -24
    rng = np.random.default_rng(0)
    bound = u * mag.terms(None)
    samples = [mag.sample_z(rng, u, 2.0) for _ in range(20)]
    assert all(np.any(s != 0) for s in samples) and not np.array_equal(samples[0], samples[1])
    # a Gaussian sample stays within a few of its own scale; the worst case is far above that scale
    assert max(float(np.max(np.abs(s) / np.maximum(bound, 1e-300))) for s in samples) < 6
    delta = np.random.default_rng(1).standard_normal(mag.tape.v(mag.out).shape)
    grads = mag.sample_grads(delta, rng, u, 2.0)
    assert set(grads) == set(w) | {"input"}
    assert grads["input"].shape == x.shape and np.any(grads["input"] != 0)


def test_the_measured_allowance_covers_torch_in_float32_on_a_long_lstm():
    """torch itself in float32 (a correct implementation written by others) lands inside the allowance."""
    spec = _spec({"type": "lstm", "hidden_size": 16}, T=24)
    params, x, y = _case(spec, "saturated", "float32")
    ref32 = run_twin(spec, params, x, y, np.float32)

    def torch32(spec, params, x, y):
        return ref32.loss, dict(ref32.grads), {k: v for k, v in ref32.deltas.items()}

    result = check(spec, params, x, y, torch32)
    assert result.passed, result.message()
