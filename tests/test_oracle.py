"""The oracle against torch: property suites, the seed systems, localization, kinks, float32, bad candidates."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import manual_bp as bp
import oracle
from manual_bp.activations import ReLU, Tanh
from oracle import CandidateError
from oracle.strategies import cases, cnn_specs, draw_data, draw_params


@given(cases(dtypes=("float64",)))
def test_manual_bp_equals_torch_float64(case):
    oracle.assert_gradients_match(case.spec, case.params, case.x, case.y)


@given(cases(dtypes=("float32",)))
def test_manual_bp_equals_torch_float32_judged_against_float64_truth(case):
    oracle.assert_gradients_match(case.spec, case.params, case.x, case.y)


@given(cases(specs_strategy=cnn_specs()))
def test_manual_bp_equals_torch_on_random_cnns_in_both_dtypes(case):
    """Random conv/pool/flatten/dense nets, every regime (exact ties included), float64 and float32."""
    oracle.assert_gradients_match(case.spec, case.params, case.x, case.y)


# -- the seed systems against their identical torch computations ---------------------------------
@pytest.mark.parametrize("name", bp.example_names())
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_seed_examples_match_torch(name, dtype):
    spec = bp.example(name)
    result = oracle.check(spec, *bp.random_case(spec, 20, batch=4), dtype=dtype)
    assert result.passed and result.classification in ("match", "rounding"), result.message()


def test_seed_linear_regression_equals_torch():
    from manual_bp import regression as reg

    rng = np.random.default_rng(21)
    x, y, theta = rng.normal(size=10), rng.normal(size=10), np.array([0.4, -0.8])
    t = torch.tensor(theta, requires_grad=True)
    xt, yt = torch.tensor(x), torch.tensor(y)
    cost = ((t[0] + t[1] * xt - yt) ** 2).sum() / (2 * len(x))
    cost.backward()
    assert reg.linear_cost(theta, x, y) == pytest.approx(cost.item(), rel=1e-14)
    torch.testing.assert_close(torch.tensor(reg.linear_gradient(theta, x, y)), t.grad, rtol=1e-13, atol=1e-15)


def test_seed_logistic_regression_equals_torch():
    from manual_bp import regression as reg

    rng = np.random.default_rng(22)
    x, y, theta = rng.normal(size=(12, 2)), rng.integers(0, 2, 12).astype(float), np.array([5.0, -1.0, 0.0])
    t = torch.tensor(theta, requires_grad=True)
    z = t[0] + torch.tensor(x) @ t[1:]
    cost = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(y))
    cost.backward()
    assert reg.logistic_cost(theta, x, y) == pytest.approx(cost.item(), rel=1e-13)
    torch.testing.assert_close(torch.tensor(reg.logistic_gradient(theta, x, y)), t.grad, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(reg.logistic_hypothesis(theta, x), torch.sigmoid(z).detach().numpy(), rtol=1e-14)


# -- a deliberately broken backward is caught and localized ----------------------------------------
class OneMinusTanh(Tanh):
    """tanh' written as 1 − tanh instead of 1 − tanh²."""

    def derivative(self, z, a):
        return 1 - a


def _with_activation(spec, layer, act):
    layers = list(spec.layers)
    layers[layer] = bp.Dense(layers[layer].units, act, layers[layer].bias)
    return bp.Spec(spec.input_size, tuple(layers), spec.loss, spec.name)


@given(st.lists(st.integers(1, 16), min_size=1, max_size=5), st.sampled_from(["half_sse", "mse", "cross_entropy"]), st.data())
def test_broken_tanh_derivative_is_caught_at_its_layer(widths, loss, data):
    layers = [{"type": "dense", "units": w, "activation": "tanh"} for w in widths]
    layers.append({"type": "dense", "units": 3, "activation": "identity"})
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 4, "layers": layers, "loss": loss})
    layer = data.draw(st.integers(0, len(widths) - 1), label="broken layer")
    broken = _with_activation(spec, layer, OneMinusTanh())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    params = draw_params(spec, rng, "well_conditioned")
    x, y = draw_data(spec, rng, "well_conditioned", 4)
    result = oracle.check(spec, params, x, y, lambda s, p, xx, yy: bp.gradients(broken, p, xx, yy))
    assert not result.passed and result.classification == "bug"
    assert result.first_divergent_layer == layer, result.localization
    assert f"layer {layer} (tanh)" in result.localization


def test_without_deltas_localization_uses_parameter_gradients():
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": "half_sse", "layers": [
        {"type": "dense", "units": 4, "activation": "tanh"}, {"type": "dense", "units": 4, "activation": "tanh"},
        {"type": "dense", "units": 2, "activation": "identity"}]})
    broken = _with_activation(spec, 1, OneMinusTanh())
    params, x, y = bp.random_case(spec, 23, batch=5)

    def loss_and_grads_only(s, p, xx, yy):
        r = bp.gradients(broken, p, xx, yy)
        return r.loss, r.grads

    result = oracle.check(spec, params, x, y, loss_and_grads_only)
    assert result.first_divergent_layer == 1 and "layer 2 matches" in result.localization


def test_assertion_message_reads_like_torch_testing():
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 24, batch=8)

    def doubled(s, p, xx, yy):
        r = bp.gradients(s, p, xx, yy)
        return r.loss, {**r.grads, "layers.0.weight": 2 * r.grads["layers.0.weight"]}

    with pytest.raises(AssertionError) as info:
        oracle.assert_gradients_match(spec, params, x, y, doubled)
    text = str(info.value)
    for words in ("GRADIENT MISMATCH", "layers.0.weight (layer 0)", "Mismatched elements: 20 / 20 (100.0%)",
                  "Greatest absolute difference", "at index (", "allowed", "Criterion"):
        assert words in text
    assert "[[" not in text and len(text) < 2000  # never a whole array


def test_forward_mismatch_is_reported_before_gradients():
    spec = bp.example("seed-simple")
    params, x, y = bp.random_case(spec, 25, batch=3)
    result = oracle.check(spec, params, x, y, lambda s, p, xx, yy: (1.5 * bp.gradients(s, p, xx, yy).loss, bp.gradients(s, p, xx, yy).grads))
    assert result.classification == "forward" and not result.passed
    assert result.summary().startswith("FORWARD MISMATCH")


# -- kinks ------------------------------------------------------------------------------------------
class ReLUOneAtZero(ReLU):
    def derivative(self, z, a):
        return (z >= 0).astype(z.dtype)


def _relu_net():
    return bp.Spec.from_dict({"format_version": 1, "input_size": 4, "loss": "half_sse", "layers": [
        {"type": "dense", "units": 6, "activation": "relu", "bias": False},
        {"type": "dense", "units": 2, "activation": "identity"}]})


@pytest.mark.parametrize("with_deltas", [True, False])
def test_relu_prime_at_zero_is_a_kink_convention_not_a_bug(with_deltas):
    spec = _relu_net()
    other = _with_activation(spec, 0, ReLUOneAtZero())
    params = {"layers.0.weight": np.array([[1.0, -1, 0, 0], [0.5, 0.5, -1, 0]] * 3),
              "layers.1.weight": np.arange(12.0).reshape(2, 6) / 10, "layers.1.bias": np.array([0.1, -0.2])}
    x = np.array([[1.0, 1, 1, 2], [2.0, 1, 0.5, 1], [0.0, 0, 0, 0]])  # every z of layer 0 hits 0 somewhere
    y = np.array([[1.0, 0], [0, 1], [0.5, 0.5]])

    def candidate(s, p, xx, yy):
        r = bp.gradients(other, p, xx, yy)
        return (r.loss, r.grads, r.deltas) if with_deltas else (r.loss, r.grads)

    result = oracle.check(spec, params, x, y, candidate)
    assert result.passed and result.classification == "kink", result.message()
    assert "convention" in result.notes[-1]


class ReLUPassesEverything(ReLU):
    def derivative(self, z, a):
        return np.ones_like(z)


def test_a_real_bug_near_kinks_is_still_a_bug():
    spec = _relu_net()
    broken = _with_activation(spec, 0, ReLUPassesEverything())
    rng = np.random.default_rng(26)
    params, (x, y) = draw_params(spec, rng, "near_kinks"), draw_data(spec, rng, "near_kinks", 4)
    result = oracle.check(spec, params, x, y, lambda s, p, xx, yy: bp.gradients(broken, p, xx, yy))
    assert result.classification == "bug"


# -- float32 against float64 truth ------------------------------------------------------------------
def test_float32_cast_inside_float64_backward_is_caught():
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 27, batch=6)

    def sloppy(s, p, xx, yy):
        r = bp.gradients(s, {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}, xx, yy)
        return r.loss, r.grads

    result = oracle.check(spec, params, x, y, sloppy)
    assert result.classification in ("bug", "forward") and not result.passed


def test_float32_candidate_with_float32_rounding_passes_and_a_bug_does_not():
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 28, batch=6, dtype="float32")
    assert oracle.check(spec, params, x, y).passed

    def slightly_off(s, p, xx, yy):
        r = bp.gradients(s, p, xx, yy)
        return r.loss, {**r.grads, "layers.1.bias": r.grads["layers.1.bias"] * np.float32(1.001)}

    result = oracle.check(spec, params, x, y, slightly_off)
    assert not result.passed and result.first_divergent_layer == 1


# -- the candidate's answer is validated ------------------------------------------------------------
def _bad(kind):
    def fn(spec, params, x, y):
        r = bp.gradients(spec, params, x, y)
        g = dict(r.grads)
        if kind == "raises":
            raise RuntimeError("boom")
        if kind == "missing":
            g.pop("layers.0.weight")
        if kind == "extra":
            g["layers.9.weight"] = g["layers.0.weight"]
        if kind == "shape":
            g["layers.0.weight"] = g["layers.0.weight"].T
        if kind == "dtype":
            g["layers.0.weight"] = g["layers.0.weight"].astype(np.float32)
        if kind == "list":
            g["layers.0.weight"] = g["layers.0.weight"].tolist()
        if kind == "tuple4":
            return r.loss, g, None, None
        return r.loss, g
    return fn


def test_a_candidate_that_raises_gets_a_crash_verdict_with_its_own_traceback():
    spec = bp.example("seed-nielsen")
    result = oracle.check(spec, *bp.random_case(spec, 29, batch=2), _bad("raises"))
    assert not result.passed and result.classification == "crash"
    assert result.crash["kind"] == "raised" and "RuntimeError: boom" in result.crash["traceback"]
    assert "in fn" in result.crash["traceback"] and "checker.py" not in result.crash["traceback"]


def test_a_candidate_that_calls_sys_exit_gets_a_crash_verdict():
    import sys

    spec = bp.example("seed-nielsen")
    result = oracle.check(spec, *bp.random_case(spec, 29, batch=2), lambda *a: sys.exit(0))
    assert not result.passed and result.classification == "crash" and result.crash["kind"] == "exit"


def test_a_candidate_that_mutates_the_spec_changes_nothing_judged():
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": {"name": "huber", "delta": 1.0},
                              "layers": [{"type": "dense", "units": 2, "activation": "tanh"}]})

    def meddler(s, params, x, y):
        object.__setattr__(s.loss, "delta", 0.01)
        s.loss.params["delta"] = 0.01
        r = bp.gradients(s, params, x, y)
        return r.loss, r.grads

    params, x, y = bp.random_case(spec, 3, batch=4)
    y = y * 10  # residuals beyond both deltas: the two losses differ
    result = oracle.check(spec, params, x, y, meddler)
    assert spec.loss.params["delta"] == 1.0 and result.spec.loss.params["delta"] == 1.0
    assert not result.passed


@pytest.mark.parametrize("kind,words", [
    ("missing", "no gradient for 'layers.0.weight'"),
    ("extra", "unknown key 'layers.9.weight'"), ("shape", "with shape (4, 5)"),
    ("dtype", "as float32 for float64 inputs"), ("list", "as a list"), ("tuple4", "returned a tuple"),
])
def test_unusable_candidates_raise_candidate_error(kind, words):
    spec = bp.example("seed-nielsen")
    with pytest.raises(CandidateError, match=words.replace("(", r"\(").replace(")", r"\)")):
        oracle.check(spec, *bp.random_case(spec, 29, batch=2), _bad(kind))


def test_candidate_cannot_change_the_callers_arrays():
    spec = bp.example("seed-simple")
    params, x, y = bp.random_case(spec, 30, batch=2)
    before = {k: v.copy() for k, v in params.items()}

    def vandal(s, p, xx, yy):
        r = bp.gradients(s, p, xx, yy)
        for v in p.values():
            v[...] = 0
        xx[...] = 0
        return r.loss, r.grads

    assert oracle.check(spec, params, x, y, vandal).passed
    assert all(np.array_equal(before[k], params[k]) for k in params)
