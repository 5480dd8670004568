"""The step check (``oracle.steps``): where a candidate reports δ, each hidden δ is also judged against the one its
own δ above implies, with that step's rounding only. It catches a wrong g′ that the check proper's allowance
(every layer above carried down) lets through, and it passes correct candidates, at kinks too."""

import numpy as np
import pytest
import manual_bp as bp
import oracle
from oracle import rates, steps
from oracle.mutants import CATALOGUE
from oracle.twin import run_twin

# the seed-17 detection run's miss: the output's δ is uncertain by 1e-3 of itself in float32 (softsign behind a
# saturated net), and that carries down to δ₀, where the tanh-GELU derivative moves one element by 9e-4 of itself
SATURATED_GELU = {
    "spec": {"format_version": 1, "name": "", "description": "", "input_size": 7, "layers": [
        {"type": "dense", "units": 5, "activation": "gelu", "bias": True},
        {"type": "dense", "units": 5, "activation": "gelu", "bias": True},
        {"type": "dense", "units": 5, "activation": "gelu", "bias": True},
        {"type": "dense", "units": 7, "activation": "softsign", "bias": True}], "loss": "sse"},
    "regime": "saturated", "dtype": "float32", "batch": 1, "data_seed": 3034793012}


def _mutant(name):
    return next(m for m in CATALOGUE if m.name == name).grads_fn


def test_the_implied_delta_is_the_closed_form_step_from_the_candidates_delta():
    """FromCandidate's record at layer i is (δ_{i+1} θ_{i+1}) ⊙ g′(z_i) with the *candidate's* δ_{i+1} (here an
    arbitrary one), computed independently in NumPy; and the run goes on from the candidate's δ_i."""
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": "half_mse", "layers": [
        {"type": "dense", "units": 4, "activation": "tanh", "bias": True},
        {"type": "dense", "units": 5, "activation": "sigmoid", "bias": True},
        {"type": "dense", "units": 2, "activation": "identity", "bias": True}]})
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 1, s) for k, s in spec.param_shapes().items()}
    x, y = rng.normal(0, 1, (6, 3)), rng.normal(0, 1, (6, 2))
    cand = {f"layers.{i}": rng.normal(0, 1, (6, n)) for i, n in enumerate((4, 5, 2))}
    hook = steps.FromCandidate(spec, cand)
    run = run_twin(spec, params, x, y, np.float64, adopt=hook)
    z0 = x @ params["layers.0.weight"].T + params["layers.0.bias"]
    z1 = np.tanh(z0) @ params["layers.1.weight"].T + params["layers.1.bias"]
    s1 = 1 / (1 + np.exp(-z1))
    np.testing.assert_allclose(hook.implied[1].numpy(), (cand["layers.2"] @ params["layers.2.weight"]) * s1 * (1 - s1),
                               rtol=1e-13)
    np.testing.assert_allclose(hook.implied[0].numpy(), (cand["layers.1"] @ params["layers.1.weight"])
                               * (1 - np.tanh(z0) ** 2), rtol=1e-13)
    np.testing.assert_allclose(run.grads["layers.0.weight"], cand["layers.0"].T @ x, rtol=1e-13)


def test_only_hidden_layers_whose_readers_all_report_delta_are_checked():
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": "half_mse", "layers": [
        {"type": "dense", "units": 4, "activation": "tanh", "bias": True},
        {"type": "dense", "units": 5, "activation": "tanh", "bias": True},
        {"type": "dense", "units": 2, "activation": "identity", "bias": True}]})
    every = {f"layers.{i}": None for i in range(3)}
    assert steps.checkable(spec, every, None) == [0, 1]          # never the output layer
    assert steps.checkable(spec, {"layers.0": 0, "layers.2": 0}, None) == []   # layer 1 missing: neither step
    assert steps.checkable(spec, every, [None, "tie", None]) == [1]            # a reader with ties


def test_a_wrong_gelu_derivative_that_the_carried_allowance_hides_is_caught_step_by_step():
    spec, params, x, y = rates.replay(SATURATED_GELU)
    result = oracle.check(spec, params, x, y, _mutant("gelu_tanh_derivative_for_exact"))
    assert not result.passed and result.classification == "bug", result.message()
    assert result.first_divergent_layer == 0 and "step by step" in result.localization, result.message()
    # the correct backward passes, with δ and without, and torch's float32 answer too
    assert oracle.check(spec, params, x, y).passed
    twin32 = run_twin(spec, params, x, y, np.float32)
    assert oracle.check(spec, params, x, y, lambda *a: (twin32.loss, twin32.grads, twin32.deltas)).passed


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("factor", [1 + 1e-3, 1 - 1e-3])
def test_one_hidden_step_a_little_off_is_a_bug_at_that_layer(layer, factor):
    """δ of one hidden layer scaled by 1 ± 1e-3: inside the check proper's allowance on this case (1e-3 of δ
    carried down from the output, f = 2), outside the step's own."""
    spec, params, x, y = rates.replay(SATURATED_GELU)
    right = bp.gradients(spec, params, x, y)

    def candidate(spec, params, x, y):
        deltas = dict(right.deltas)
        deltas[f"layers.{layer}"] = right.deltas[f"layers.{layer}"] * np.float32(factor)
        return right.loss, right.grads, deltas

    result = oracle.check(spec, params, x, y, candidate)
    assert not result.passed and result.first_divergent_layer == layer, result.message()


# False alarms an adversarial run found (correct candidates reporting δ judged ``bug``), each a regression case.
RNN_GELU = {"format_version": 2, "input": {"shape": [6, 3]}, "layers": [
    {"type": "temporal_dense", "units": 3, "activation": "tanh", "bias": True},
    {"type": "rnn", "hidden_size": 1, "bias": True, "return_sequences": False, "initial_state": "learned",
     "activation": "identity", "nonlinearity": "tanh"},
    {"type": "dense", "units": 1, "activation": "gelu", "bias": False},
    {"type": "dense", "units": 1, "activation": "identity", "bias": False}], "loss": "half_sse"}
ATTENTION_GRU_GELU = {"format_version": 2, "input": {"shape": [5, 3]}, "layers": [
    {"type": "residual", "body": [
        {"type": "layer_norm", "eps": 1e-05, "normalized_shape": None, "elementwise_affine": True, "activation": "identity"},
        {"type": "attention", "num_heads": 1, "causal": True, "bias": False, "activation": "identity"}],
     "projection": None, "activation": "identity"},
    {"type": "gru", "hidden_size": 1, "bias": True, "return_sequences": False, "initial_state": "learned",
     "activation": "identity"},
    {"type": "dense", "units": 1, "activation": "gelu", "bias": False},
    {"type": "dense", "units": 1, "activation": "identity", "bias": False}], "loss": "half_sse"}
GRU_GELU = {"format_version": 2, "input": {"shape": [2, 4]}, "layers": [
    {"type": "temporal_dense", "units": 4, "activation": "gelu", "bias": True},
    {"type": "gru", "hidden_size": 2, "bias": True, "return_sequences": True, "initial_state": "learned",
     "activation": "identity"},
    {"type": "flatten"},
    {"type": "dense", "units": 1, "activation": "gelu", "bias": False},
    {"type": "dense", "units": 2, "activation": "identity", "bias": False}], "loss": "half_sse"}
ELU_SOFTSIGN = {"format_version": 1, "input_size": 14, "layers": [
    {"type": "dense", "units": 14, "activation": {"name": "elu", "alpha": 0.5}, "bias": True},
    {"type": "dense", "units": 3, "activation": {"name": "elu", "alpha": 0.5}, "bias": True},
    {"type": "dense", "units": 14, "activation": {"name": "elu", "alpha": 0.5}, "bias": True},
    {"type": "dense", "units": 3, "activation": "softsign", "bias": True}], "loss": "sse"}


def _torch_in_dtype(spec, params, x, y):
    r = run_twin(spec, params, x, y, np.asarray(x).dtype)
    return r.loss, r.grads, r.deltas


@pytest.mark.parametrize("spec, dtype, batch, seed, who", [
    # torch's own float32 gelu′ is exactly 0 at z = −7.9 (1 + erf cancels), where it is −1.2e-13: the layer's own
    # scale (3e-13) left no atol; it is floored at rtol·S_δ
    (RNN_GELU, "float32", 3, 3342097848, "torch"),
    # behind saturated gates, torch rounds σ(1 − σ) and 1 − tanh² to exactly 0, second_correct's closed forms give
    # products like 1e-123: the rnn/gru tape's sampled rounding is first order, so steps through it are on S_δ
    (ATTENTION_GRU_GELU, "float64", 4, 1476550152, "second_correct"),
    (RNN_GELU, "float64", 1, 176476434, "second_correct"),
    # torch's autograd of z/(1 + |z|) cancels two terms of 1/(1 + |z|) to 1/(1 + |z|)²: at |z| ≈ 4500 its δ errs by
    # 1.7e-4 of itself in float32 (rounding._scales gives softsign′ that cancellation; the check proper failed)
    (ELU_SOFTSIGN, "float32", 6, 317107263, "torch"),
    # torch's vectorized float32 gelu′ is exactly 0 below z = −6.2, where Φ + zφ survives 1 + erf's cancellation and
    # |zφ| ≈ z²Φ is 64× Φ at z = −8 (rounding._scales allowed Φ alone): δ₃ = 0, and the weight gradient 0 against
    # −4e-13, beyond B (the check proper failed)
    (GRU_GELU, "float32", 4, 530805251, "torch"),
])
def test_a_correct_candidate_that_reports_delta_is_not_a_bug(spec, dtype, batch, seed, who):
    spec, params, x, y = rates.replay({"spec": spec, "regime": "saturated", "dtype": dtype, "batch": batch,
                                       "data_seed": seed})
    fn = _torch_in_dtype if who == "torch" else rates.load_second_correct()
    result = oracle.check(spec, params, x, y, fn)
    assert result.passed, result.message()
