"""More guards of the judge, written against the surviving mutants of a mutmut run on the judging code
(``oracle/compare.py``, ``oracle/checker.py``, ``oracle/conventions.py``, ``oracle/twin.py``; see
reports/mutation-testing.md, "The oracle's judge").

Same rules as tests/test_judge.py: every expectation comes from the case itself (a planted fault or none,
an element placed exactly on a kink, a dyadic case whose answers are exact) or from an independent closed
form (NumPy written here, or manual_bp's own NumPy forward), never from the code path under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import manual_bp as bp
import oracle
from oracle.compare import TOLERANCES, Tolerance, compare_tensor

from .test_judge import (_backprop, _candidate, _failed, _l1_case, _one_kink_case, _output, _spec, _tanh_case,
                         _times, _two_kinks_case, _hardtanh_kink_case)


def _v2(shape, layers, loss="half_sse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": shape}, "layers": layers, "loss": loss})


# -- compare_tensor on its own -----------------------------------------------------------------------------------
def test_compare_tensor_judges_in_float64_whatever_dtype_it_is_given():
    """float32 arrays near 1e20: ‖ĝ‖² = 2e40 overflows float32 (an infinite bound would pass anything) but not
    float64, where the closed form holds: a factor 2 is a mismatch, equality a match."""
    ref = np.array([1e20, -1e20], dtype=np.float32)
    tol = TOLERANCES["float32"]
    assert compare_tensor("t", ref, ref, tol, 1e20).verdict == "match"
    t = compare_tensor("t", 2 * ref, ref, tol, 1e20)
    assert t.verdict == "mismatch" and not t.passed
    r64 = ref.astype(np.float64)
    assert t.allowed_normwise == pytest.approx(1e-5 * np.linalg.norm(r64) + 1e-6 * 1e20 * math.sqrt(2), rel=1e-6)
    assert t.normwise_rel_err == pytest.approx(1.0, rel=1e-6)


def test_an_empty_tensor_keeps_its_name_layer_and_shape():
    t = compare_tensor("layers.3.bias", np.zeros((0,)), np.zeros((0,)), TOLERANCES["float64"], 1.0, layer=3)
    assert (t.name, t.layer, t.shape, t.passed, t.verdict) == ("layers.3.bias", 3, (0,), True, "match")
    assert t.message().startswith("layers.3.bias (layer 3): match")
    # nothing to compare: no error, no bound, nothing mismatched, no worst element
    assert t.to_dict() == {
        "name": "layers.3.bias", "layer": 3, "shape": [0], "passed": True, "verdict": "match", "max_abs_err": 0.0,
        "max_rel_err": 0.0, "normwise_rel_err": 0.0, "allowed_normwise": 0.0, "normwise_err": 0.0,
        "rounding_allowance": None, "mismatched": 0, "size": 0, "worst_index": [], "worst_candidate": 0.0,
        "worst_reference": 0.0, "worst_allowed": 0.0, "rel_index": [], "mismatched_share": 0.0}


def test_a_nan_element_counts_as_mismatched_with_an_infinite_difference():
    ref = np.array([2.0, -4.0, 8.0])
    t = compare_tensor("t", np.array([2.0, np.nan, 8.0]), ref, TOLERANCES["float64"], 8.0)
    assert t.mismatched == 1 and t.max_abs_err == math.inf and t.worst_index == (1,) and t.verdict == "mismatch"


def test_huge_differences_are_judged_silently_and_never_passed():
    """An element 1e200 off (‖g − ĝ‖² would overflow; the norm is scaled, so it is 1e200) and a relative error
    against ĝ = 0 (infinite): a mismatch, with no floating-point warning on the user's console."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = compare_tensor("t", np.array([1e200, 10.0, 3.0]), np.array([1.0, 0.0, 3.0]), TOLERANCES["float64"], 1.0)
    assert t.verdict == "mismatch" and t.normwise_err == pytest.approx(1e200) and t.max_rel_err == math.inf
    assert t.rel_index == (1,) and t.worst_index == (0,) and t.mismatched == 2


def test_identical_values_match_even_under_a_zero_tolerance():
    ref = np.array([[0.0, 0.0], [0.0, 0.0]])
    exact = Tolerance(rtol=0.0, atol=0.0, rounding_factor=0.0)
    assert compare_tensor("t", ref.copy(), ref, exact, 1.0).verdict == "match"
    off = compare_tensor("t", np.array([[0.0, 2.0 ** -300], [0.0, 0.0]]), ref, exact, 1.0)
    assert off.verdict == "mismatch" and off.mismatched == 1  # the three equal elements are not mismatched


def test_the_normwise_relative_error_of_a_small_reference_is_the_plain_ratio():
    t = compare_tensor("t", np.array([0.75, 0.0]), np.array([0.5, 0.0]), TOLERANCES["float64"], 1.0)
    assert t.normwise_rel_err == 0.5 and t.normwise_err == 0.25


def test_an_error_exactly_at_the_elementwise_bound_is_rounding():
    """Dyadic numbers, so |g − ĝ| equals f·B exactly: '≤' in the bound, so rounding; a hair beyond is a mismatch."""
    ref = np.array([1.0, -2.0, 4.0])
    b = np.array([0.5, 0.25, 0.0])
    tol = Tolerance(rtol=0.0, atol=0.0, rounding_factor=1.0)
    assert compare_tensor("t", ref + np.array([0.5, -0.25, 0.0]), ref, tol, 1.0, bound=b).verdict == "rounding"
    over = ref + np.array([0.5, -0.25, 0.0])
    over[0] = np.nextafter(over[0], 2.0)  # 1.5 + 1 ulp
    assert compare_tensor("t", over, ref, tol, 1.0, bound=b).verdict == "mismatch"


def test_the_rounding_allowance_norm_is_computed_in_float64_whatever_dtype_the_bound_comes_in():
    """B = 1e-30 in float32: ‖f·B‖ = 2·√2·1e-30 (its square, 8e-60, would underflow to 0 in float32)."""
    ref = np.array([1.0, 2.0])
    t = compare_tensor("t", ref, ref, TOLERANCES["float64"], 1.0, bound=np.full(2, 1e-30, dtype=np.float32))
    assert t.rounding_allowance == pytest.approx(2 * math.sqrt(2) * float(np.float32(1e-30)), rel=1e-12, abs=0)


@pytest.mark.parametrize("softmax", [False, True])
def test_the_exact_bce_alternative_works_in_float64_whatever_the_dtype_of_z_and_y(softmax):
    """float32 logits and integer 0/1 targets: the exact δ and C are those of the same values in 50 digits
    (computed in float64, not in float32, and not refused for integer targets)."""
    from oracle.conventions import exact_bce

    from .test_judge import _decimal_bce

    spec = _spec(2, [(3, "softmax" if softmax else "sigmoid", True)], "bce")
    z = np.array([[3.1, -2.7, 1.3], [0.55, -0.35, 0.1]], dtype=np.float32)
    y = np.array([[1, 0, 0], [0, 1, 0]])
    delta, loss = exact_bce(spec, z, y)
    want_delta, want_loss = _decimal_bce(z.astype(np.float64), y.astype(np.float64), softmax)
    assert delta.dtype == np.float64
    np.testing.assert_allclose(delta, want_delta, rtol=1e-12, atol=0)
    assert loss == pytest.approx(want_loss, rel=1e-12)


# -- what the candidate returns: every refusal names the problem and the fix ------------------------------------------
def _returning(fix):
    """A correct candidate for _tanh_case whose answer is then changed by ``fix(loss, grads, deltas)``."""
    def fn(spec, params, x, y):
        loss, grads, deltas = _backprop(spec, params, x, y)
        return fix(loss, dict(grads), dict(deltas), x, params)
    return fn


KEYS = "layers.0.weight, layers.0.bias, layers.1.weight, layers.1.bias, layers.2.weight, layers.2.bias"
REFUSALS = {
    "loss-vector": (lambda l, g, d, x, p: (np.array([1.0, 2.0]), g), "returned loss array([1., 2.])",
                    "return the reduced loss as one number"),
    "loss-text": (lambda l, g, d, x, p: ("0.5", g), "returned loss '0.5'", "return the reduced loss as one number"),
    "grads-list": (lambda l, g, d, x, p: (l, list(g.values())), "returned grads as a list", "return a dict {name: array}"),
    "missing": (lambda l, g, d, x, p: (l, {k: v for k, v in g.items() if k != "layers.1.bias"}),
                "returned no gradient for 'layers.1.bias'", f"return exactly these keys: {KEYS}"),
    "extra": (lambda l, g, d, x, p: (l, {**g, "layers.7.weight": g["layers.0.weight"]}),
              "returned an unknown key 'layers.7.weight'", f"return exactly these keys: {KEYS}"),
    "not-array": (lambda l, g, d, x, p: (l, {**g, "layers.1.weight": g["layers.1.weight"].tolist()}),
                  "returned layers.1.weight as a list", "return NumPy arrays"),
    "shape": (lambda l, g, d, x, p: (l, {**g, "layers.1.weight": g["layers.1.weight"].T}),
              "returned layers.1.weight with shape (4, 3)", "its shape must be (3, 4)"),
    "dtype": (lambda l, g, d, x, p: (l, {**g, "layers.2.bias": g["layers.2.bias"].astype(np.float32)}),
              "returned layers.2.bias as float32 for float64 inputs", "compute and return float64"),
    "deltas-list": (lambda l, g, d, x, p: (l, g, list(d.values())), "returned deltas as a list",
                    "return a dict {'layers.i': δ_i} or None"),
    "delta-shape": (lambda l, g, d, x, p: (l, g, {**d, "layers.1": d["layers.1"][:2]}),
                    "returned delta layers.1 with shape (2, 3)", "its shape must be (5, 3)"),
    "grad-input-shape": (lambda l, g, d, x, p: _Answer(l, g, None, x[:, :2]), "returned grad_input with shape (5, 2)",
                         "its shape must be (5, 3)"),
    "answer-int": (lambda l, g, d, x, p: 7, "returned a int",
                   "return (loss, grads) or (loss, grads, deltas), grads a dict of arrays keyed like layers.0.weight"),
    "answer-4-tuple": (lambda l, g, d, x, p: (l, g, d, None), "returned a tuple",
                       "return (loss, grads) or (loss, grads, deltas), grads a dict of arrays keyed like layers.0.weight"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_every_unusable_answer_is_refused_naming_the_problem_and_the_fix(kind):
    spec, params, x, y = _tanh_case()
    fix, problem, how = REFUSALS[kind]
    with pytest.raises(oracle.CandidateError) as info:
        oracle.check(spec, params, x, y, _returning(fix))
    assert (info.value.field, info.value.problem, info.value.fix) == ("impl", problem, how)


class _Answer:
    def __init__(self, loss, grads, deltas=None, grad_input=None):
        self.loss, self.grads, self.deltas, self.grad_input = loss, grads, deltas, grad_input


def test_every_form_of_a_right_answer_is_accepted_and_every_part_is_judged():
    """(loss, grads), (loss, grads, deltas), an object with loss/grads[/deltas/grad_input]: all match; in each
    form, a wrong part given is found (the loss, a δ, ∂C/∂x), and the parts left out are not compared."""
    spec, params, x, y = _tanh_case()
    loss, grads, deltas = _backprop(spec, params, x, y)
    gin = deltas["layers.0"] @ params["layers.0.weight"]
    forms = {
        "pair": (loss, grads), "triple": (loss, grads, deltas), "object": _Answer(loss, grads),
        "object+deltas": _Answer(loss, grads, deltas), "object+input": _Answer(loss, grads, None, gin),
        "numpy-loss": (np.array([[loss]]), grads),
    }
    for name, answer in forms.items():
        result = oracle.check(spec, params, x, y, lambda *a, r=answer: r)
        assert result.classification == "match", (name, result.message())
        names = {t.name for t in result.tensors}
        assert ("layers.1.delta" in names) == (name in ("triple", "object+deltas")), name
        assert ("input.grad" in names) == (name == "object+input"), name
    bad = oracle.check(spec, params, x, y, lambda *a: _Answer(loss, grads, {**deltas, "layers.2": -deltas["layers.2"]}))
    assert bad.classification == "bug" and _failed(bad) == ["layers.2.delta"]
    bad = oracle.check(spec, params, x, y, lambda *a: _Answer(loss, grads, None, 2 * gin))
    assert bad.classification == "bug" and _failed(bad) == ["input.grad"]
    bad = oracle.check(spec, params, x, y, lambda *a: _Answer(loss * 1.5, grads))
    assert bad.classification == "forward" and bad.passed is False


def test_an_answer_object_needs_only_loss_and_grads_and_one_without_grads_is_refused():
    from types import SimpleNamespace

    spec, params, x, y = _tanh_case()
    loss, grads, _ = _backprop(spec, params, x, y)
    result = oracle.check(spec, params, x, y, lambda *a: SimpleNamespace(loss=loss, grads=grads))
    assert result.classification == "match" and not any(t.name.endswith(".delta") for t in result.tensors)
    with pytest.raises(oracle.CandidateError) as info:
        oracle.check(spec, params, x, y, lambda *a: SimpleNamespace(loss=loss))
    assert info.value.problem == "returned a SimpleNamespace"


def test_an_overflowing_case_is_refused_in_words_naming_the_layer_the_quantity_and_the_fix():
    """z of layer 0 beyond float64; a = selu(z) beyond float32 while z is not (λ > 1); a loss beyond float64."""
    spec = _spec(2, [(2, "selu", False), (1, "identity", False)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, 0.0], [0.0, 1.0]]), "layers.1.weight": np.array([[1e-30, 1e-30]])}
    y = np.zeros((1, 1))
    cases = [
        ({k: v * 2 for k, v in params.items()}, np.array([[1e308, 1.0]]), np.float64,
         "the forward pass overflows float64 at layer 0 (z of selu is not finite in float64)", "scale the inputs or weights down"),
        (params, np.array([[3.3e38, 1.0]]), np.float32,
         "the forward pass overflows float32 at layer 0 (a of selu is not finite in float32)", "scale the inputs or weights down"),
    ]
    for p, x, dt, problem, fix in cases:
        assert 3.3e38 * spec.layers[0].activation.scale > float(np.finfo(np.float32).max)
        with pytest.raises(bp.SpecError) as info:
            oracle.check(spec, {k: v.astype(dt) for k, v in p.items()}, x.astype(dt), y.astype(dt), _candidate())
        assert (info.value.field, info.value.problem, info.value.fix) == ("x", problem, fix)
    ident = _spec(2, [(1, "identity", False)], "half_sse")
    with pytest.raises(bp.SpecError) as info:
        oracle.check(ident, {"layers.0.weight": np.array([[1.0, 1.0]])}, np.array([[1e200, 0.0]]), y, _candidate())
    assert (info.value.field, info.value.problem, info.value.fix) == (
        "x", "the loss or its gradients overflow float64 on this case", "scale the inputs, weights or targets down")
    # float32: output 2e19 and loss 2e38 fit, the weight gradient 4e38 does not (it is finite in float64)
    w32, x32, y32 = np.array([[1.0, 1.0]], np.float32), np.array([[2e19, 0.0]], np.float32), np.zeros((1, 1), np.float32)
    with pytest.raises(bp.SpecError) as info:
        oracle.check(ident, {"layers.0.weight": w32}, x32, y32, _candidate())
    assert info.value.problem == "the loss or its gradients overflow float32 on this case"


def test_a_bug_verdict_says_passed_false_not_just_something_falsy():
    spec, params, x, y = _tanh_case()
    right = oracle.check(spec, params, x, y, _candidate())
    assert right.classification == "match" and right.passed is True and right.loss.name == "loss"
    assert set(right.arrays) == {t.name for t in right.tensors}  # (candidate, torch) of every tensor, for the plots
    crash = oracle.check(spec, params, x, y, lambda *a: 1 / 0)
    assert crash.classification == "crash" and crash.passed is False and crash.dtype == "float64"
    assert crash.tolerance == TOLERANCES["float64"]
    assert crash.summary().endswith(", float64)")
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.0.weight", _times(2.0))))
    assert result.classification == "bug" and result.passed is False


def test_a_rounding_verdict_keeps_the_rounding_allowance_of_every_tensor():
    """The float32 candidate on the ill-conditioned net of test_judge passes as rounding; the result carries B
    for the loss and each tensor compared (what the report plots), finite and ≥ 0."""
    from .test_judge import _ill_conditioned

    spec, params, x, y = _ill_conditioned(offset=300.0, residual=1e-2)
    p32, x32, y32 = {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y.astype(np.float32)
    result = oracle.check(spec, p32, x32, y32, _candidate())
    assert result.classification == "rounding", result.message()
    assert {t.name for t in result.tensors} <= set(result.bounds) and "loss" in result.bounds
    assert all(np.all(np.isfinite(b)) and np.all(np.asarray(b) >= 0) for b in result.bounds.values())


# -- the twin: every layer type, the nn.Module, what run_twin reports -----------------------------------------
CONV_SPECS = {
    "1d": ([2, 9], [
        {"type": "conv1d", "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1, "groups": 2, "activation": "tanh"},
        {"type": "avg_pool1d", "kernel_size": 2, "stride": 1, "padding": 1, "count_include_pad": False},
        {"type": "max_pool1d", "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]),
    "2d": ([2, 6, 5], [
        {"type": "conv2d", "out_channels": 2, "kernel_size": [3, 2], "padding": "same", "dilation": [1, 2], "activation": "tanh"},
        {"type": "avg_pool2d", "kernel_size": 2, "stride": 1, "padding": 1},
        {"type": "max_pool2d", "kernel_size": [2, 3], "stride": [1, 2], "padding": 1},
        {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]),
    "1d-dilated": ([3, 11], [
        {"type": "conv1d", "out_channels": 3, "kernel_size": 3, "dilation": 2, "padding": 2, "activation": "tanh"},
        {"type": "avg_pool1d", "kernel_size": 3, "stride": 2, "padding": 1},
        {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]),
    "2d-grouped": ([4, 5, 6], [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": [2, 1], "padding": [1, 0], "groups": 2,
         "activation": "tanh"},
        {"type": "avg_pool2d", "kernel_size": 2, "padding": 1, "count_include_pad": False},
        {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]),
}


@pytest.mark.parametrize("case", list(CONV_SPECS))
def test_the_twin_of_every_layer_type_is_the_layer_manual_bp_computes(case):
    """Every setting of every conv and pool layer reaches torch (stride, padding, dilation, groups,
    count_include_pad): the twin's forward equals manual_bp's own NumPy forward, and a correct backward
    (manual_bp's) matches while a doubled conv weight gradient is never passed."""
    spec = _v2(*CONV_SPECS[case])
    params, x, y = bp.random_case(spec, 1, batch=3)
    from oracle.twin import run_twin

    ref = run_twin(spec, params, x, y, np.float64)
    mine = bp.forward(spec, params, x)
    for i in range(len(spec.layers)):
        np.testing.assert_allclose(ref.z[i], mine.z[i], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(ref.acts[i], mine.a[i + 1], rtol=1e-12, atol=1e-13)
    assert oracle.check(spec, params, x, y).classification == "match"

    def doubled(s, p, xx, yy):
        r = bp.gradients(s, p, xx, yy)
        return r.loss, {**r.grads, "layers.0.weight": 2 * r.grads["layers.0.weight"]}

    try:
        result = oracle.check(spec, params, x, y, doubled)
    except bp.SpecError as err:  # a version that judges conv/pool nets strictly only (715122b) refuses instead
        assert err.field == "layers" and err.problem.startswith("layers.0.weight differs from torch's")
        assert err.fix == "compare in float64 on well-conditioned data, or use dense layers"
    else:
        assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()


def test_the_twin_module_has_the_specs_linear_layers_and_computes_its_forward():
    """``Twin`` (what the benchmark times): one nn.Linear per layer, (out, in) weights, a bias only where the spec
    has one, in the dtype asked for; with the case's weights loaded its forward is the NumPy forward."""
    from oracle.twin import Twin

    spec = _spec(3, [(4, "tanh", True), (5, "sigmoid", False), (2, "identity", True)], "half_sse")
    params, x, _ = bp.random_case(spec, 2, batch=4)
    for dtype in (torch.float64, torch.float32):
        model = Twin(spec, dtype)
        shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
        assert shapes == {"layers.0.weight": (4, 3), "layers.0.bias": (4,), "layers.1.weight": (5, 4),
                          "layers.2.weight": (2, 5), "layers.2.bias": (2,)}
        assert all(v.dtype == dtype for v in model.parameters())
    model = Twin(spec, torch.float64)
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(torch.from_numpy(params[k]))
    out = model(torch.from_numpy(x))
    out = out[0] if isinstance(out, tuple) else out  # (ỹ, zs, acts) before the twin became a full nn.Module
    np.testing.assert_allclose(out.detach().numpy(), _output(spec, params, x), rtol=1e-13)


def test_run_twin_counts_the_elements_exactly_on_a_kink_and_reports_each_upstream_gradient():
    """``Reference.exact_kinks``: z exactly on an activation's kink plus zero residuals of l1; ``upstream[i]`` is
    ∂C/∂a_{i+1}: (a − y) at a half_sse output, δ_{i+1} θ_{i+1} below it."""
    from oracle.twin import run_twin

    for case, kinks in ((_one_kink_case, 1), (_l1_case, 1), (_hardtanh_kink_case, 2)):
        spec, params, x, y = case()
        assert run_twin(spec, params, x, y, np.float64).exact_kinks == kinks, case.__name__
    act = {"name": "leaky_relu", "negative_slope": 0.75}
    spec, params, x, y = _two_kinks_case(act)
    ref = run_twin(spec, params, x, y, np.float64)
    assert ref.exact_kinks == 2
    out = _output(spec, params, x)
    np.testing.assert_allclose(ref.upstream[1], out - y, rtol=1e-14)
    np.testing.assert_allclose(ref.upstream[0], (out - y) @ params["layers.1.weight"], rtol=1e-14)
    np.testing.assert_allclose(ref.output, out, rtol=1e-14)
    z0 = x @ params["layers.0.weight"].T
    np.testing.assert_array_equal(ref.z[0], z0)
    np.testing.assert_array_equal(ref.acts[0], np.where(z0 > 0, z0, 0.75 * z0))


def test_run_twin_computes_in_the_dtype_it_is_asked_for_whatever_the_arrays_come_in():
    """float32 params and data, run in float64: the float64 answer on those float32 values (a float32 run would be
    ~1e-7 off); its arrays are float64."""
    from oracle.twin import run_twin

    spec, params, x, y = _tanh_case()
    p32, x32, y32 = {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y.astype(np.float32)
    ref = run_twin(spec, p32, x32, y32, np.float64)
    p64, x64, y64 = {k: v.astype(np.float64) for k, v in p32.items()}, x32.astype(np.float64), y32.astype(np.float64)
    loss, grads, _ = _backprop(spec, p64, x64, y64)
    assert ref.loss == pytest.approx(loss, rel=1e-13)
    for k, v in grads.items():
        assert ref.grads[k].dtype == np.float64
        np.testing.assert_allclose(ref.grads[k], v, rtol=1e-12, atol=1e-15)


# -- conventions: which elements the rule may touch, and what the notes say ------------------------------------
def _sigmoid_guard_case():
    """bce on a sigmoid output; z = 30 at element (0, 0) only: σ(30)(1 − σ(30)) ≈ 9e-14 is under torch's guard
    1e-12, every other a(1 − a) is far above it."""
    spec = _spec(2, [(3, "sigmoid", False)], "bce")
    params = {"layers.0.weight": np.array([[30.0, 0.0], [1.0, -0.25], [-0.5, 0.75]])}
    x = np.array([[1.0, 0.0], [0.03, 1.1], [-0.07, 0.45], [0.02, -1.3]])
    y = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.9, 0.05, 0.6], [0.35, 0.15, 0.7]])
    z = x @ params["layers.0.weight"].T
    a = 1 / (1 + np.exp(-z))
    guarded = a * (1 - a) < 1e-12
    assert guarded[0, 0] and np.count_nonzero(guarded) == 1 and np.min((a * (1 - a))[~guarded]) > 1e-3
    return spec, params, x, y


@pytest.mark.parametrize("with_deltas", [True, False])
def test_the_guard_convention_touches_only_the_guarded_elements_of_an_elementwise_output(with_deltas):
    """An exact (50-digit) bce candidate differs from torch by rounding everywhere, by the guard only at (0, 0):
    the note counts that one element, in the exact words of the rule."""
    from .test_judge import _exact_bce_candidate

    spec, params, x, y = _sigmoid_guard_case()
    fn = _exact_bce_candidate(softmax=False)
    result = oracle.check(spec, params, x, y, fn if with_deltas else (lambda *a: fn(*a)[:2]))
    assert result.passed and result.classification == "convention", result.message()
    assert result.notes == [
        "Numerical-guard convention: at 1 output element(s) where torch's bce guard max(a(1 − a), 1e-12) or its log "
        "clamp at −100 is active, the candidate follows the exact derivative of the loss (torch's guard "
        "max(a(1 − a), 1e-12) is not); both are accepted."], result.notes


def test_the_float32_guard_note_says_torchs_float32_value_in_full():
    from .test_judge import _float32_guard_case, _torch_float32_bce

    spec, params, x, y = _float32_guard_case()
    with np.errstate(divide="ignore"):
        result = oracle.check(spec, params, x, y, _torch_float32_bce)
    assert result.classification == "convention"
    assert [n[n.index("the candidate follows"):] for n in result.notes] == [
        "the candidate follows torch's guarded value computed in float32; both are accepted."], result.notes


@pytest.mark.parametrize("with_deltas", [True, False])
def test_exact_bce_on_one_guarded_softmax_row_moves_that_row_only(with_deltas):
    """softmax rows (30, 30, −30) (its third unit under the guard) and three ordinary rows: the exact δ differs
    from torch's on the whole first row (δ_k involves every unit of its row) and nowhere else but by rounding."""
    from .test_judge import _exact_bce_candidate

    spec = _spec(2, [(3, "softmax", False)], "bce")
    params = {"layers.0.weight": np.array([[30.0, 0.5], [30.0, -0.25], [-30.0, 0.75]])}
    x = np.array([[1.0, 0.0], [0.01, 1.1], [-0.02, 0.45], [0.03, -1.3]])
    y = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05], [0.35, 0.15, 0.5]])
    fn = _exact_bce_candidate(softmax=True)
    result = oracle.check(spec, params, x, y, fn if with_deltas else (lambda *a: fn(*a)[:2]))
    assert result.passed and result.classification == "convention", result.message()
    assert len(result.notes) == 1 and result.notes[0].startswith("Numerical-guard convention: at 3 output element(s) "), result.notes


def _l1_softmax_case(act):
    """3 × 3 softmax (or log_softmax) output, l1 loss, a zero residual at element (1, 2) only: y is torch's own
    output there. Square on purpose: a row mask that is transposed or taken per column has the right shape."""
    spec = _spec(2, [(3, act, False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, -0.75]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.25]])
    f = torch.softmax if act == "softmax" else torch.log_softmax
    out = f(torch.tensor(x @ params["layers.0.weight"].T), -1).numpy()
    y = out + np.array([[0.25, -0.125, 0.375], [-0.25, 0.5, 0.0], [0.125, 0.25, -0.5]])
    assert np.count_nonzero(out == y) == 1 and out[1, 2] == y[1, 2]
    return spec, params, x, y


def _l1_softmax_candidate(act, sign0, with_deltas=True, scale_row=None):
    def fn(spec, params, x, y):
        z = torch.tensor(x @ params["layers.0.weight"].T)
        a = (torch.softmax if act == "softmax" else torch.log_softmax)(z, -1).numpy()
        r = a - y
        g = np.where(r > 0, 1.0, np.where(r < 0, -1.0, sign0)) / r.size
        if act == "softmax":
            delta = a * (g - np.sum(g * a, axis=1, keepdims=True))
        else:
            delta = g - np.exp(a) * g.sum(axis=1, keepdims=True)
        if scale_row is not None:
            delta[scale_row] *= 1.5
        out = (np.mean(np.abs(r)), {"layers.0.weight": delta.T @ x}, {"layers.0": delta})
        return out if with_deltas else out[:2]
    return fn


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("act", ["softmax", "log_softmax"])
def test_l1_kink_in_one_row_of_a_square_softmax_output_is_a_kink(act, with_deltas):
    """sign(0) = +1 at (1, 2) moves δ on all of row 1 (and only there): a kink. A wrong row elsewhere is a bug."""
    spec, params, x, y = _l1_softmax_case(act)
    assert oracle.check(spec, params, x, y, _l1_softmax_candidate(act, 0.0, with_deltas)).classification == "match"
    result = oracle.check(spec, params, x, y, _l1_softmax_candidate(act, 1.0, with_deltas))
    assert result.passed and result.classification == "kink", result.message()
    assert any(n.startswith("Kink convention: at 3 output element(s) on the kink of l1") and "sign(0) = +1" in n
               for n in result.notes), result.notes
    bad = oracle.check(spec, params, x, y, _l1_softmax_candidate(act, 1.0, with_deltas, scale_row=0))
    assert bad.classification == "bug" and bad.first_divergent_layer == 0, bad.message()


@pytest.mark.parametrize("with_deltas", [True, False])
def test_l1_kink_behind_an_elementwise_output_moves_that_element_only(with_deltas):
    """softsign output (its g' is recomputed by the rule, one ulp off torch's at some elements). z = 0 exactly at
    output (0, 0) (softsign(0) = 0), y = g(0) there: sign(0) = +1 changes δ at that one
    element of an elementwise output, so the note counts 1."""
    spec = _spec(2, [(3, "relu", False), (3, "softsign", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, -1.0]]),
              "layers.1.weight": np.array([[0.75, -1.0, 0.5], [0.5, 1.0, -0.25], [-0.3, 0.7, 1.1]])}
    x = np.array([[1.0, 2.0], [2.0, -0.5], [0.5, 1.5], [-0.7, 0.9]])
    z1 = np.maximum(x @ params["layers.0.weight"].T, 0) @ params["layers.1.weight"].T
    assert z1[0, 0] == 0 and np.count_nonzero(z1 == 0) == 1
    y = _output(spec, params, x) + np.array([[0.0, 0.25, -0.125], [-0.5, 0.125, 0.3], [0.375, -0.25, 0.1],
                                             [0.2, -0.3, 0.4]])
    result = oracle.check(spec, params, x, y, _candidate(sign0=1.0, with_deltas=with_deltas))
    assert result.passed and result.classification == "kink", result.message()
    assert any(n.startswith("Kink convention: at 1 output element(s) on the kink of l1") for n in result.notes), result.notes


@pytest.mark.parametrize("with_deltas", [True, False])
def test_l1_sign_plus_one_where_torchs_residual_is_one_ulp_below_zero_is_a_kink(with_deltas):
    """Identity output, y one ulp above the (exact, dyadic) output at (0, 0): torch's residual is −1 ulp, so its
    ∂C/∂a there is −1/N; a candidate whose output rounded one ulp up sees a zero residual and may use
    sign(0) = +1, i.e. +1/N: the two valid values are opposite numbers. A kink, counted once."""
    spec = _spec(2, [(2, "identity", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 0.25]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0], [0.25, 0.75]])
    out = x @ params["layers.0.weight"].T
    y = out + np.array([[0.0, 0.5], [-0.25, 0.125], [0.375, -0.5]])
    y[0, 0] = np.nextafter(out[0, 0], np.inf)

    def plus(spec, params, x, y):
        r = x @ params["layers.0.weight"].T - y
        s = np.sign(r)
        s[0, 0] = 1.0
        delta = s / r.size
        res = (np.mean(np.abs(r)), {"layers.0.weight": delta.T @ x}, {"layers.0": delta})
        return res if with_deltas else res[:2]

    result = oracle.check(spec, params, x, y, plus)
    assert result.passed and result.classification == "kink", result.message()
    assert any(n.startswith("Kink convention: at 1 output element(s)") and "sign(0) = +1" in n for n in result.notes)


def test_a_kink_where_the_upstream_gradient_is_zero_is_not_counted():
    """relu'(0) = 1 at two elements on the kink, but the whole row of one of them has a zero residual (its upstream
    gradient is exactly 0, so both slopes give δ = 0 there): the note counts the one element where it matters."""
    spec, params, x, y = _two_kinks_case("relu")
    y = y.copy()
    y[3] = _output(spec, params, x)[3]  # row 3 (kink at (3, 0)) fitted exactly: dyadic, so exact in torch too
    for with_deltas in (True, False):
        result = oracle.check(spec, params, x, y, _candidate(relu_at_zero=1.0, with_deltas=with_deltas))
        assert result.classification == "kink", result.message()
        assert any(n.startswith("Kink convention: at 1 element(s) of layer 0") for n in result.notes), result.notes
        assert result.first_divergent_layer == 0 and "layer 0" in result.localization  # where the choice departs


def test_the_batch_row_hint_of_a_float32_candidate_allows_float32_rounding_in_the_other_rows():
    """A float32 candidate (float32 rounding in every row) with row 2 of δ_1 tripled: the hint confines the error
    to row 2, judging the other rows with atol·S + rtol·|ĝ|."""
    from .test_judge import _row_fault

    spec, params, x, y = _tanh_case(m=6)
    p32, x32, y32 = {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y.astype(np.float32)
    result = oracle.check(spec, p32, x32, y32, _candidate(delta_fault=(1, _row_fault(2, 3.0))))
    assert result.classification == "bug" and result.first_divergent_layer == 1
    assert "the error is confined to batch row 2" in result.hints["layers.1.delta"], result.hints


# -- real bugs the mutation run found (now fixed: norms are scaled, an infinite reference needs the same inf) ---------
def test_a_wrong_gradient_of_a_huge_but_finite_case_is_not_passed():
    """x ~ 1e150: loss 2e300 and gradients 4e300 are finite (the case is not refused as overflowing), but
    ‖∂C/∂θ‖² ~ 1e601 is not. A doubled, zeroed or negated gradient must still be a bug."""
    spec = _spec(2, [(2, "identity", False)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 0.25]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]]) * 1e150
    y = np.zeros((2, 2))
    loss, grads = _backprop(spec, params, x, y, with_deltas=False)
    assert np.isfinite(loss) and np.all(np.isfinite(grads["layers.0.weight"]))
    with np.errstate(over="ignore"):
        assert oracle.check(spec, params, x, y, lambda *a: (loss, grads)).passed
        for f in (2.0, 0.0, -1.0):
            wrong = {k: f * v for k, v in grads.items()}
            result = oracle.check(spec, params, x, y, lambda *a, w=wrong: (loss, w))
            assert result.classification == "bug", (f, result.classification)


def test_compare_tensor_never_matches_nan_even_against_an_infinite_reference():
    with np.errstate(invalid="ignore", over="ignore"):
        t = compare_tensor("t", np.array([np.nan, 1.0]), np.array([np.inf, 1.0]), TOLERANCES["float64"], 1.0)
    assert not t.passed and t.verdict == "mismatch"
    with np.errstate(invalid="ignore", over="ignore"):
        same = compare_tensor("t", np.array([np.inf, 1.0]), np.array([np.inf, 1.0]), TOLERANCES["float64"], 1.0)
        other = compare_tensor("t", np.array([-np.inf, 1.0]), np.array([np.inf, 1.0]), TOLERANCES["float64"], 1.0)
    assert same.passed and not other.passed
