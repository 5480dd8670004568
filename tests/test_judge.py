"""Tests that guard the judge itself (issue 9, deliver 9).

The oracle's verdict is only worth something if a wrong gradient can never pass and a right one never
fails. These tests pin the judging code (``oracle.compare``, ``oracle.rounding``, ``oracle.conventions``,
``oracle.checker``) from the outside: every candidate here is an independent NumPy backprop written in
this file (``_backprop``), correct or with one planted fault, on small hand-built cases whose exact
answers are known (dyadic numbers, so z = 0 and a zero residual are exact in NumPy and in torch).
No assertion repeats what the oracle computed: each compares the verdict with what the case is
known to be (a fault is planted or not; an element sits on a kink or not), or compares a bound with a
closed form worked out by hand. They were written against the surviving mutants of a mutmut run on
the judging code (reports/mutation-testing.md) and each fails under at least one of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import manual_bp as bp
import oracle
from oracle.compare import TOLERANCES, Tolerance, compare_tensor

from .helpers import uncapped

U64 = 2.0 ** -53


# -- an independent backprop: the candidate of every test --------------------------------------------
def _spec(n_in, layers, loss):
    return bp.Spec.from_dict({"format_version": 1, "input_size": n_in, "loss": loss, "layers": [
        {"type": "dense", "units": u, "activation": a, "bias": b} for u, a, b in layers]})


def _act(act, z, work, tanh_sigmoid=False):
    name = act if isinstance(act, str) else act.name
    if name == "leaky_relu":
        s = work(act.params["negative_slope"])
        return np.where(z > 0, z, s * z), np.where(z > 0, work(1), s)
    if name == "selu":
        al, sc = work(act.alpha), work(act.scale)
        e = np.exp(np.minimum(z, 0))
        return sc * np.where(z > 0, z, al * (e - 1)), np.where(z > 0, sc, sc * al * e)
    if name == "identity":
        return z, np.ones_like(z)
    p = {} if isinstance(act, str) else act.params
    one = work(1)
    if name == "elu":
        al = work(p["alpha"])
        return np.where(z > 0, z, al * np.expm1(np.minimum(z, 0))), np.where(z > 0, one, al * np.exp(np.minimum(z, 0)))
    if name == "softplus":
        b, t = work(p["beta"]), work(p["threshold"])
        bz = b * z
        s = np.where(bz >= 0, one / (one + np.exp(-np.abs(bz))), np.exp(-np.abs(bz)) / (one + np.exp(-np.abs(bz))))
        return np.where(bz > t, z, np.log1p(np.exp(np.minimum(bz, t))) / b), np.where(bz > t, one, s)
    if name == "gelu":
        cdf = (one + np.vectorize(math.erf, otypes=[np.float64])(z.astype(np.float64) / math.sqrt(2)).astype(z.dtype)) / 2
        pdf = np.exp(-z * z / 2) / work(math.sqrt(2 * math.pi))
        return z * cdf, cdf + z * pdf
    if name == "gelu_tanh":
        k, c = work(math.sqrt(2 / math.pi)), work(0.044715)
        t = np.tanh(k * (z + c * z ** 3))
        return z * (one + t) / 2, (one + t) / 2 + z * (one - t * t) * k * (one + 3 * c * z * z) / 2
    if name in ("silu", "mish"):
        e = np.exp(-np.abs(z))
        s = np.where(z >= 0, one / (one + e), e / (one + e))
        if name == "silu":
            return z * s, s * (one + z * (one - s))
        sp = np.maximum(z, 0) + np.log1p(e)
        t = np.tanh(sp)
        return z * t, t + z * (one - t * t) * s
    if name == "softsign":
        return z / (one + np.abs(z)), one / (one + np.abs(z)) ** 2
    if name == "hardtanh":
        lo, hi = work(p["min_val"]), work(p["max_val"])
        return np.clip(z, lo, hi), ((z > lo) & (z < hi)).astype(z.dtype)
    if name == "tanh":
        a = np.tanh(z)
        return a, 1 - a * a
    if name == "sigmoid":
        if tanh_sigmoid:  # another formula, one ulp off torch's here and there (and inaccurate for z ≪ 0)
            a = (1 + np.tanh(z / 2)) / 2
        else:
            e = np.exp(-np.abs(z))
            a = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
        return a, a * (1 - a)
    if name == "relu":
        return np.where(z > 0, z, work(0)), (z > 0).astype(z.dtype)
    raise ValueError(name)


def _loss(name, r, sign0):
    m, n = r.shape[0], r.size
    if name == "half_sse":
        return 0.5 * np.sum(r * r), r
    if name == "sse":
        return np.sum(r * r), 2 * r
    if name == "half_mse":
        return np.sum(r * r) / (2 * m), r / m
    if name == "mse":
        return np.sum(r * r) / n, 2 * r / n
    if name == "l1":
        s = np.sign(r)
        s = np.where(r == 0, sign0, s)
        return np.sum(np.abs(r)) / n, s / n
    raise ValueError(name)


def _backprop(spec, params, x, y, *, work=None, relu_at_zero=None, sign0=0.0, delta_fault=None, tanh_sigmoid=False,
              grad_fault=None, loss_grad_factor=1.0, with_deltas=True):
    """(loss, grads[, deltas]) by the four backprop equations, computed in ``work`` precision (default:
    the dtype of x) and returned in the dtype of x.

    Faults: ``delta_fault = (k, f)`` replaces δ_k by f(δ_k) *and propagates it* (a wrong backward step
    through layer k); ``grad_fault = (name, f)`` replaces one parameter gradient after the fact;
    ``relu_at_zero`` (relu, leaky_relu, selu) / ``sign0`` (l1) pick the slope at a kink.
    """
    out_dt = x.dtype
    work = work or out_dt.type
    p = {k: v.astype(work) for k, v in params.items()}
    a, acts, zs, primes = x.astype(work), [x.astype(work)], [], []
    for i, layer in enumerate(spec.layers):
        z = a @ p[f"layers.{i}.weight"].T
        if layer.bias:
            z = z + p[f"layers.{i}.bias"]
        a, d = _act(layer.activation, z, work, tanh_sigmoid)
        if layer.activation.name in ("relu", "leaky_relu", "selu"):
            if relu_at_zero is not None:
                d = np.where(z == 0, work(relu_at_zero), d)
        zs.append(z)
        acts.append(a)
        primes.append(d)
    loss, grad_a = _loss(spec.loss.name, a - y.astype(work), work(sign0))
    grad_a = grad_a * work(loss_grad_factor)
    grads, deltas = {}, {}
    for i in reversed(range(len(spec.layers))):
        delta = grad_a * primes[i]
        if delta_fault is not None and delta_fault[0] == i:
            delta = delta_fault[1](delta)
        deltas[f"layers.{i}"] = delta.astype(out_dt)
        grads[f"layers.{i}.weight"] = (delta.T @ acts[i]).astype(out_dt)
        if spec.layers[i].bias:
            grads[f"layers.{i}.bias"] = delta.sum(axis=0).astype(out_dt)
        grad_a = delta @ p[f"layers.{i}.weight"]
    grads = {k: grads[k] for k in spec.param_shapes()}
    if grad_fault is not None:
        name, f = grad_fault
        grads[name] = np.asarray(f(grads[name]), dtype=out_dt)
    loss = out_dt.type(loss)
    return (loss, grads, deltas) if with_deltas else (loss, grads)


def _candidate(**kw):
    return lambda spec, params, x, y: _backprop(spec, params, x, y, **kw)


def _output(spec, params, x, tanh_sigmoid=False):
    a = x
    for i, layer in enumerate(spec.layers):
        z = a @ params[f"layers.{i}.weight"].T + (params[f"layers.{i}.bias"] if layer.bias else 0)
        a = _act(layer.activation, z, x.dtype.type, tanh_sigmoid)[0]
    return a


def _tanh_case(loss="half_sse", m=5, seed=0, widths=(4, 3), scale=1.0):
    spec = _spec(3, [(w, "tanh", True) for w in widths] + [(2, "identity", True)], loss)
    rng = np.random.default_rng(seed)
    params = bp.init_params(spec, rng, scale=scale)
    x = rng.standard_normal((m, 3))
    y = rng.standard_normal((m, 2))
    return spec, params, x, y


def _ill_conditioned(offset=1e6, residual=1e-3, seed=0):
    """Outputs around ±offset, targets a residual away: the loss and δ are differences of big numbers."""
    spec = _spec(3, [(4, "tanh", True), (2, "identity", True)], "half_sse")
    rng = np.random.default_rng(seed)
    params = bp.init_params(spec, rng)
    params["layers.1.bias"] = np.array([offset, -offset])
    x = rng.standard_normal((5, 3))
    out = _output(spec, params, x)
    return spec, params, x, out + residual * rng.standard_normal(out.shape)


def _times(f):
    return lambda g: g * f


def _failed(result):
    return sorted(t.name for t in result.failed_tensors)


def test_the_candidate_of_these_tests_is_torch_exact():
    """The reference of this file: the correct ``_backprop`` agrees with torch.autograd to a few ulps."""
    import torch

    spec, params, x, y = _tanh_case()
    loss, grads, _ = _backprop(spec, params, x, y)
    w = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    a = torch.tensor(x)
    for i in range(3):
        a = torch.nn.functional.linear(a, w[f"layers.{i}.weight"], w[f"layers.{i}.bias"])
        a = torch.tanh(a) if i < 2 else a
    c = 0.5 * ((a - torch.tensor(y)) ** 2).sum()
    c.backward()
    assert loss == pytest.approx(c.item(), rel=1e-14)
    for k, v in w.items():
        np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-12, atol=1e-15)


# -- (1) the verdict does not change when the loss is rescaled ------------------------------------------
@pytest.mark.parametrize("loss", ["half_sse", "sse", "half_mse", "mse"])
def test_rescaling_the_loss_does_not_change_the_verdict(loss):
    """half_sse, sse, half_mse and mse on one net differ by a constant factor: same verdicts in all four."""
    spec, params, x, y = _tanh_case(loss)
    assert oracle.check(spec, params, x, y, _candidate()).classification == "match"
    # a 1 % error in one bias gradient is a bug at every scale, found at its layer
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.1.bias", _times(1.01))))
    assert result.classification == "bug" and result.first_divergent_layer == 1
    assert _failed(result) == ["layers.1.bias"]
    # ... and so is using the gradient of the neighbouring loss (a factor 2 or ½ all through)
    result = oracle.check(spec, params, x, y, _candidate(loss_grad_factor=2.0 if loss in ("half_sse", "half_mse") else 0.5))
    assert result.classification == "bug" and result.first_divergent_layer == 2


@pytest.mark.parametrize("m", [1, 7, 300])
def test_the_batch_size_does_not_change_the_verdict_of_a_mean_loss(m):
    spec, params, x, y = _tanh_case("mse", m=m)
    assert oracle.check(spec, params, x, y, _candidate()).classification == "match"
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.0.weight", _times(1.01))))
    assert result.classification == "bug" and _failed(result) == ["layers.0.weight"]
    # a 1e-7 relative error is 1e3 times the float64 tolerance at any batch size
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.2.weight", _times(1 + 1e-7))))
    assert result.classification == "bug" and _failed(result) == ["layers.2.weight"]


@pytest.mark.parametrize("k,layer", [(1e-6, 2), (1e6, 0)])
def test_scaling_the_targets_and_the_output_scales_s_and_nothing_else(k, layer):
    """Output weights, biases and targets × k: the output layer's gradients and S scale by k (the layers
    below by k²). A 1e-7 relative error in the layer that sets S is a bug at either end."""
    spec, params, x, y = _tanh_case()
    params = {**params, "layers.2.weight": params["layers.2.weight"] * k, "layers.2.bias": params["layers.2.bias"] * k}
    y = y * k
    assert oracle.check(spec, params, x, y, _candidate()).classification == "match"
    name = f"layers.{layer}.bias"
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=(name, _times(1 + 1e-7))))
    assert result.classification == "bug" and _failed(result) == [name]


def test_a_doubled_gradient_is_a_bug_when_every_gradient_is_tiny():
    """S ~ 1e-8: an error of 1e-8 must be judged against atol·S = 1e-18, not atol/S = 1e-2."""
    spec, params, x, _ = _tanh_case()
    y = _output(spec, params, x) + 1e-8 * np.random.default_rng(1).standard_normal((5, 2))
    for with_deltas in (True, False):
        right = oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas))
        assert right.passed, right.message()
        assert 1e-10 < right.scale < 1e-7  # the case is what it claims: S itself is tiny
        result = oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas,
                                                             grad_fault=("layers.0.weight", _times(2.0))))
        assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()


# -- (2) dtype= and tolerance= are honoured ---------------------------------------------------------------
def test_tolerance_is_honoured_by_check_and_by_assert_gradients_match():
    spec, params, x, y = _tanh_case()
    off = _candidate(grad_fault=("layers.1.weight", _times(1 + 1e-7)))
    loose = Tolerance(rtol=1e-6, atol=1e-6)
    result = oracle.check(spec, params, x, y, off)
    assert result.classification == "bug" and _failed(result) == ["layers.1.weight"]
    assert result.tolerance == TOLERANCES["float64"]
    with pytest.raises(AssertionError, match="layers.1.weight"):
        oracle.assert_gradients_match(spec, params, x, y, off)
    result = oracle.check(spec, params, x, y, off, tolerance=loose)
    assert result.passed and result.classification == "match" and result.tolerance == loose
    assert oracle.assert_gradients_match(spec, params, x, y, off, tolerance=loose).passed
    # a tolerance stricter than the default is honoured too: a 1e-11 relative error, fine by default
    tiny = _candidate(grad_fault=("layers.1.weight", _times(1 + 1e-11)))
    assert oracle.check(spec, params, x, y, tiny).passed
    strict = Tolerance(rtol=1e-13, atol=1e-13, rounding_factor=2.0)
    assert oracle.check(spec, params, x, y, tiny, tolerance=strict).classification == "bug"
    with pytest.raises(AssertionError):
        oracle.assert_gradients_match(spec, params, x, y, tiny, tolerance=strict)


def test_dtype_float32_casts_and_judges_with_the_float32_tolerance():
    spec, params, x, y = _tanh_case()
    seen = []

    def spy(s, p, xx, yy):
        seen.append({xx.dtype, yy.dtype, *(v.dtype for v in p.values())})
        return _backprop(s, p, xx, yy, grad_fault=("layers.1.weight", _times(1 + 3e-6)))

    for run in (oracle.check, oracle.assert_gradients_match):
        result = run(spec, params, x, y, spy, dtype="float32")
        assert seen.pop() == {np.dtype(np.float32)}
        assert result.passed and result.dtype == "float32" and result.tolerance == TOLERANCES["float32"]
    # the same 3e-6 relative error in float64 is a bug
    assert oracle.check(spec, params, x, y, spy).classification == "bug"
    assert seen.pop() == {np.dtype(np.float64)}
    # and 3e-5 is one in float32 too
    off = _candidate(grad_fault=("layers.1.weight", _times(1 + 3e-5)))
    assert oracle.check(spec, params, x, y, off, dtype="float32").classification == "bug"
    with pytest.raises(AssertionError):
        oracle.assert_gradients_match(spec, params, x, y, off, dtype="float32")


def test_dtype_float64_casts_float32_inputs_up():
    spec, params, x, y = _tanh_case()
    p32, x32, y32 = {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y.astype(np.float32)
    off = _candidate(grad_fault=("layers.1.weight", _times(1 + 3e-6)))
    assert oracle.check(spec, p32, x32, y32, off).passed  # float32 by default: within 1e-5
    result = oracle.check(spec, p32, x32, y32, off, dtype="float64")
    assert result.dtype == "float64" and result.classification == "bug"


def test_rounding_factor_zero_takes_the_allowance_away():
    """A correct float32 candidate on an ill-conditioned net passes only through the allowance."""
    spec, params, x, y = _ill_conditioned(offset=300.0, residual=1e-2)
    p32, x32, y32 = {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y.astype(np.float32)
    result = oracle.check(spec, p32, x32, y32, _candidate())
    assert result.passed and result.classification == "rounding", result.message()
    no_allowance = Tolerance(rtol=1e-5, atol=1e-6, rounding_factor=0.0)
    assert oracle.check(spec, p32, x32, y32, _candidate(), tolerance=no_allowance).classification in ("bug", "forward")


# -- (3) the loss and δ get the rounding allowance -----------------------------------------------------------
def _shifted_output(k):
    """A correct implementation whose forward lands k ulps (relative) away at the output of the 3 → 4 tanh →
    2 identity net: its loss, δ and gradients are exactly those of that output."""
    def fn(spec, params, x, y):
        h = np.tanh(x @ params["layers.0.weight"].T + params["layers.0.bias"])
        r = (h @ params["layers.1.weight"].T + params["layers.1.bias"]) * (1 + k * U64) - y
        d0 = (r @ params["layers.1.weight"]) * (1 - h * h)
        return (0.5 * np.sum(r * r), {"layers.0.weight": d0.T @ x, "layers.0.bias": d0.sum(0),
                                      "layers.1.weight": r.T @ h, "layers.1.bias": r.sum(0)},
                {"layers.0": d0, "layers.1": r})
    return fn


def test_the_loss_and_delta_get_the_rounding_allowance():
    spec, params, x, y = _ill_conditioned()
    assert oracle.check(spec, params, x, y, _shifted_output(0)).classification == "match"
    result = oracle.check(spec, params, x, y, _shifted_output(4))
    assert result.passed and result.classification == "rounding", result.message()
    # the four ulps at the output are far beyond the strict bound (cond ~ |a|/|a − y| ~ 1e9) ...
    assert result.loss.normwise_rel_err > 1e-9 and result.loss.verdict == "rounding"
    assert {t.name: t.verdict for t in result.tensors}["layers.1.delta"] == "rounding"
    # ... and a thousand times more is not rounding any more
    result = oracle.check(spec, params, x, y, _shifted_output(4000))
    assert not result.passed and "layers.1.delta" in _failed(result)


def test_an_error_of_a_few_ulps_times_the_condition_in_the_loss_passes():
    spec, params, x, y = _ill_conditioned()
    loss, grads, deltas = _backprop(spec, params, x, y)
    out = _output(spec, params, x)
    r = out - y
    cond = float(np.sum(np.abs(r) * np.abs(out)) / np.sum(r * r))  # |∂C/∂a|·|a| / C: ~1e9 here
    assert cond > 1e8
    shift = 4 * U64 * cond * loss
    assert abs(shift) > 1e-8 * abs(loss)  # far beyond the strict bound 2e-10·|C|
    result = oracle.check(spec, params, x, y, lambda *a: (loss + shift, grads, deltas))
    assert result.passed and result.loss.verdict == "rounding", result.message()
    result = oracle.check(spec, params, x, y, lambda *a: (loss * (1 + 1e-3), grads, deltas))
    assert result.classification == "forward" and not result.passed


@pytest.mark.parametrize("rel", [1e-6, 1e-8, -1e-6])
def test_a_small_relative_error_in_the_loss_of_a_well_conditioned_net_is_forward(rel):
    spec, params, x, y = _tanh_case()
    loss, grads, deltas = _backprop(spec, params, x, y)
    for returned in ((loss * (1 + rel), grads, deltas), (loss * (1 + rel), grads)):
        result = oracle.check(spec, params, x, y, lambda *a, r=returned: r)
        assert result.classification == "forward" and not result.passed and not result.loss.passed
        assert result.first_divergent_layer is None and "loss" in result.localization
    assert oracle.check(spec, params, x, y, lambda *a: (loss * (1 + 1e-12), grads, deltas)).classification == "match"


def test_a_wrong_loss_with_a_zero_reference_loss_is_forward():
    """The loss's own scale falls back to 1 when torch's loss is exactly 0 (targets hit exactly)."""
    spec = _spec(2, [(2, "identity", False)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.25, 2.0]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    y = x @ params["layers.0.weight"].T
    loss, grads, deltas = _backprop(spec, params, x, y)
    assert loss == 0 and not any(np.any(g) for g in grads.values())
    assert oracle.check(spec, params, x, y, _candidate()).classification == "match"
    assert oracle.check(spec, params, x, y, lambda *a: (1e-6, grads, deltas)).classification == "forward"


# -- (4) float32's allowance uses float32's unit roundoff ---------------------------------------------------
def test_the_float32_allowance_is_computed_with_float32_unit_roundoff():
    spec, params, x, y = _ill_conditioned(offset=300.0, residual=1e-2)
    p32, x32, y32 = {k: v.astype(np.float32) for k, v in params.items()}, x.astype(np.float32), y.astype(np.float32)
    loss, grads, deltas = _backprop(spec, p32, x32, y32)  # float32 all through: a correct float32 candidate
    truth = _backprop(spec, p32, x32.astype(np.float64), y32.astype(np.float64),
                      work=np.float64)  # the same float32 values in float64
    rel = np.linalg.norm(grads["layers.1.weight"] - truth[1]["layers.1.weight"]) / np.linalg.norm(truth[1]["layers.1.weight"])
    assert rel > 1e-4  # float32 rounding here is far beyond the strict float32 bound (1e-5)
    result = oracle.check(spec, p32, x32, y32, lambda *a: (loss, grads, deltas))
    assert result.passed and result.classification == "rounding", result.message()
    # exactly the same numbers from a float64 candidate on the same values: a float64 error, far too big
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    as64 = (float(truth[0]), {k: v.astype(np.float64) for k, v in grads.items()},
            {k: v.astype(np.float64) for k, v in deltas.items()})
    result = oracle.check(spec, p64, x32.astype(np.float64), y32.astype(np.float64), lambda *a: as64)
    assert result.classification == "bug" and not result.passed


# -- (5) loss kinks: l1 at an exactly zero residual ----------------------------------------------------------
def _l1_case():
    """Dyadic numbers: the forward is exact in NumPy and torch; one residual is exactly 0."""
    spec = _spec(2, [(3, "relu", False), (2, "identity", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, -1.0]]),
              "layers.1.weight": np.array([[1.0, -0.5, 0.75], [0.5, 1.0, -0.25]])}
    x = np.array([[1.0, 2.0], [2.0, -0.5], [0.5, 1.5]])
    out = _output(spec, params, x)
    z0 = x @ params["layers.0.weight"].T
    assert not np.any(z0 == 0)  # the only kink is the loss's
    y = out + np.array([[0.0, 0.25], [-0.5, 0.125], [0.375, -0.25]])
    assert np.count_nonzero(out == y) == 1
    return spec, params, x, y


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("sign0", [1.0, -1.0])
def test_l1_sign_of_zero_other_than_torchs_is_a_kink(with_deltas, sign0):
    spec, params, x, y = _l1_case()
    assert oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas)).classification == "match"
    other = _candidate(sign0=sign0, with_deltas=with_deltas)
    # the case exposes the convention: the candidate's gradients do differ from torch's
    assert not np.allclose(other(spec, params, x, y)[1]["layers.0.weight"], _backprop(spec, params, x, y)[1]["layers.0.weight"])
    result = oracle.check(spec, params, x, y, other)
    assert result.passed and result.classification == "kink", result.message()
    assert any("sign(0)" in n and "l1" in n for n in result.notes)


@pytest.mark.parametrize("with_deltas", [True, False])
def test_l1_real_bugs_are_bugs_kink_or_not(with_deltas):
    spec, params, x, y = _l1_case()
    # sum where the mean belongs, elsewhere than the kink
    result = oracle.check(spec, params, x, y, _candidate(loss_grad_factor=6.0, with_deltas=with_deltas))
    assert result.classification == "bug" and result.first_divergent_layer == 1
    # the other sign(0) and a doubled layer-0 weight gradient: the kink does not excuse the layer below
    result = oracle.check(spec, params, x, y, _candidate(sign0=1.0, with_deltas=with_deltas,
                                                         grad_fault=("layers.0.weight", _times(2.0))))
    assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()
    # sign(0) = 3 is no subgradient of |r| (those lie in [−1, 1])
    result = oracle.check(spec, params, x, y, _candidate(sign0=3.0, with_deltas=with_deltas))
    assert result.classification == "bug" and result.first_divergent_layer == 1


# -- (6) one element on a relu kink --------------------------------------------------------------------------
def _one_kink_case():
    """z_0 is exactly 0 at element (0, 0) and nowhere near 0 elsewhere."""
    spec = _spec(3, [(3, "relu", False), (2, "identity", True)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, -1.0, 0.5], [0.5, 0.25, -1.0], [-1.0, 2.0, 1.0]]),
              "layers.1.weight": np.array([[0.5, -0.25, 1.0], [1.0, 0.5, -0.5]]),
              "layers.1.bias": np.array([0.125, -0.25])}
    x = np.array([[1.0, 1.0, 0.0], [0.5, -1.0, 1.0], [2.0, 0.5, -0.5]])
    y = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])
    z0 = x @ params["layers.0.weight"].T
    assert z0[0, 0] == 0 and np.count_nonzero(z0 == 0) == 1 and np.min(np.abs(z0[z0 != 0])) >= 0.5
    return spec, params, x, y


@pytest.mark.parametrize("with_deltas", [True, False])
def test_one_element_on_a_relu_kink_with_the_other_convention_is_a_kink(with_deltas):
    spec, params, x, y = _one_kink_case()
    assert oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas)).classification == "match"
    other = _candidate(relu_at_zero=1.0, with_deltas=with_deltas)
    assert not np.allclose(other(spec, params, x, y)[1]["layers.0.weight"], _backprop(spec, params, x, y)[1]["layers.0.weight"])
    result = oracle.check(spec, params, x, y, other)
    assert result.passed and result.classification == "kink", result.message()
    assert any("1 element(s) of layer 0" in n and "relu" in n for n in result.notes), result.notes
    assert result.first_divergent_layer == 0


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("fault", ["layers.0.weight", "layers.1.weight", "layers.1.bias"])
def test_one_kink_and_a_doubled_gradient_is_a_bug(with_deltas, fault):
    spec, params, x, y = _one_kink_case()
    for relu_at_zero in (0.0, 1.0):
        fn = _candidate(relu_at_zero=relu_at_zero, with_deltas=with_deltas, grad_fault=(fault, _times(2.0)))
        result = oracle.check(spec, params, x, y, fn)
        assert result.classification == "bug" and not result.passed, result.message()
        assert result.first_divergent_layer == int(fault.split(".")[1])
        assert _failed(result) == [fault]


@pytest.mark.parametrize("with_deltas", [True, False])
def test_one_kink_and_a_wrong_slope_elsewhere_is_a_bug(with_deltas):
    """relu' = 1 on the kink (valid) but also at one negative z (a bug): not excused by the kink."""
    spec, params, x, y = _one_kink_case()

    def fn(s, p, xx, yy):
        z0 = xx @ p["layers.0.weight"].T
        wrong = np.zeros_like(z0, dtype=bool)
        wrong[1, 1] = True  # z0[1, 1] = −1
        assert z0[1, 1] < 0
        return _backprop(s, p, xx, yy, relu_at_zero=1.0, with_deltas=with_deltas,
                         delta_fault=(0, lambda d: np.where(wrong, (_bp_delta1(s, p, xx, yy) @ p["layers.1.weight"]), d)))

    result = oracle.check(spec, params, x, y, fn)
    assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()


def _bp_delta1(spec, params, x, y):
    return _backprop(spec, params, x, y)[2]["layers.1"]


def test_a_relu_kink_does_not_excuse_an_error_on_the_kink_element_itself():
    """At z = 0 the valid δ are 0 and the upstream gradient; half of it is neither."""
    spec, params, x, y = _one_kink_case()
    up = _bp_delta1(spec, params, x, y) @ params["layers.1.weight"]
    for with_deltas in (True, False):
        fn = _candidate(with_deltas=with_deltas, delta_fault=(0, lambda d: np.where(
            np.arange(d.size).reshape(d.shape) == 0, 0.5 * up, d)))
        result = oracle.check(spec, params, x, y, fn)
        assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()
        if with_deltas:
            hints = result.hints["layers.0.delta"]
            assert "the error is confined to elements whose z lies on a kink" in hints, hints
            assert "the error is confined to batch row 0" in hints, hints


# -- (7) the rounding outcome, hints, NaN and Inf -----------------------------------------------------------
def test_a_long_double_candidate_on_a_saturated_net_passes():
    """Another correct implementation (every step in long double, then rounded to float64) on a net whose
    tanh units saturate: it differs from torch by rounding only, and must pass as match or rounding."""
    spec = _spec(3, [(6, "tanh", True), (4, "sigmoid", True), (2, "identity", True)], "half_sse")
    rng = np.random.default_rng(3)
    params = bp.init_params(spec, rng, scale=8.0)
    x = 4 * rng.standard_normal((6, 3))
    y = rng.standard_normal((6, 2))
    h = np.tanh(x @ params["layers.0.weight"].T + params["layers.0.bias"])
    assert np.mean(np.abs(h) > 0.999) > 0.3  # saturated
    ld = _candidate(work=np.longdouble)
    result = oracle.check(spec, params, x, y, ld)
    assert result.passed and result.classification in ("match", "rounding"), result.message()
    # and a planted 1e-6 error in the same long-double candidate is still found
    bad = _candidate(work=np.longdouble, grad_fault=("layers.1.weight", _times(1 + 1e-6)))
    result = oracle.check(spec, params, x, y, bad)
    assert result.classification == "bug" and _failed(result) == ["layers.1.weight"]


def test_a_doubled_gradient_gets_the_ratio_2_hint_through_check():
    spec, params, x, y = _tanh_case()
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.1.weight", _times(2.0))))
    assert result.classification == "bug" and _failed(result) == ["layers.1.weight"]
    hints = result.hints["layers.1.weight"]
    assert any("ratio" in h and "= 2" in h for h in hints), hints
    assert "Hint: constant ratio" in result.message()


def test_a_transposed_square_weight_gradient_gets_the_transpose_hint():
    spec = _spec(4, [(4, "tanh", True), (2, "identity", True)], "half_sse")
    params, x, y = bp.random_case(spec, 4, batch=5)
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.0.weight", np.transpose)))
    assert result.classification == "bug" and _failed(result) == ["layers.0.weight"]
    assert any("transpose" in h for h in result.hints["layers.0.weight"])


def test_a_wrong_delta_gets_a_hint_confined_to_one_batch_row():
    spec, params, x, y = _tanh_case()

    def one_row(d):
        d = d.copy()
        d[2] *= 3
        return d

    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(1, one_row)))
    assert result.first_divergent_layer == 1
    assert any("batch row 2" in h for h in result.hints["layers.1.delta"]), result.hints


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("with_deltas", [True, False])
def test_nan_or_inf_in_a_gradient_is_a_bug(bad, with_deltas):
    spec, params, x, y = _tanh_case()

    def poison(g):
        g = g.copy()
        g.flat[1] = bad
        return g

    result = oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas, grad_fault=("layers.1.weight", poison)))
    assert not result.passed and result.classification == "bug"
    assert any("NaN or Inf" in n for n in result.notes)
    assert _failed(result) == ["layers.1.weight"] and result.first_divergent_layer == 1
    assert any("NaN or Inf" in h for h in result.hints["layers.1.weight"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_on_a_kink_case_is_still_a_bug(bad):
    """The convention re-run must not forgive a NaN: the kink case with a poisoned gradient."""
    spec, params, x, y = _one_kink_case()

    def poison(g):
        g = g.copy()
        g.flat[0] = bad
        return g

    for with_deltas in (True, False):
        fn = _candidate(relu_at_zero=1.0, with_deltas=with_deltas, grad_fault=("layers.0.weight", poison))
        result = oracle.check(spec, params, x, y, fn)
        assert not result.passed and result.classification == "bug"
        assert any("NaN or Inf" in n for n in result.notes)


def test_a_nan_loss_is_not_passed():
    spec, params, x, y = _tanh_case()
    _, grads, deltas = _backprop(spec, params, x, y)
    result = oracle.check(spec, params, x, y, lambda *a: (float("nan"), grads, deltas))
    assert not result.passed and result.classification == "forward"
    assert any("NaN or Inf" in n for n in result.notes)


# -- (8) δ given in the tuple is used ---------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_wrong_delta_with_right_gradients_is_reported_at_that_delta(layer):
    spec, params, x, y = _tanh_case()

    def fn(s, p, xx, yy):
        loss, grads, deltas = _backprop(s, p, xx, yy)
        return loss, grads, {**deltas, f"layers.{layer}": deltas[f"layers.{layer}"] * 1.5}

    result = oracle.check(spec, params, x, y, fn)
    assert result.classification == "bug" and not result.passed
    assert _failed(result) == [f"layers.{layer}.delta"]
    assert result.first_divergent_layer == layer
    assert f"layer {layer}" in result.localization


def test_only_the_deltas_given_are_compared():
    spec, params, x, y = _tanh_case()
    loss, grads, deltas = _backprop(spec, params, x, y)
    result = oracle.check(spec, params, x, y, lambda *a: (loss, grads, {"layers.1": deltas["layers.1"]}))
    assert result.classification == "match"
    assert sorted(t.name for t in result.tensors if t.name.endswith(".delta")) == ["layers.1.delta"]


# -- (9) localization in a 4-layer net -------------------------------------------------------------------------
def _four_layers():
    spec = _spec(3, [(5, "tanh", True), (4, "tanh", True), (4, "tanh", True), (2, "identity", True)], "half_sse")
    params, x, y = bp.random_case(spec, 9, batch=6)
    return spec, params, x, y


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_a_wrong_backward_step_is_localized_to_its_layer(k, with_deltas):
    """δ_k × 1.5, carried down: layer k is the first to diverge walking back from the loss."""
    spec, params, x, y = _four_layers()
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(k, _times(1.5)), with_deltas=with_deltas))
    assert result.classification == "bug" and result.first_divergent_layer == k, result.localization
    above = [n for n in _failed(result) if int(n.split(".")[1]) > k]
    assert not above and f"layers.{k}.weight" in _failed(result)
    if with_deltas and k == 3:
        assert "output δ (layer 3)" in result.localization
    elif with_deltas:
        assert f"δ of layer {k + 1} matches, δ of layer {k} diverges" in result.localization
    elif k == 3:
        assert result.localization.startswith("layer 3 is the first to diverge")
    else:
        assert f"layer {k} is the first to diverge" in result.localization
        assert ("layer 3 matches" if k == 2 else f"layers {k + 1}..3 match") in result.localization


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_a_wrong_parameter_gradient_is_localized_to_its_layer(k, with_deltas):
    spec, params, x, y = _four_layers()
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=(f"layers.{k}.bias", _times(-1.0)), with_deltas=with_deltas))
    assert result.classification == "bug" and result.first_divergent_layer == k, result.localization
    assert _failed(result) == [f"layers.{k}.bias"]
    if with_deltas:
        assert f"δ of layer {k} matches but layers.{k}.bias does not" in result.localization


def test_a_wrong_input_gradient_alone_is_reported_without_a_layer():
    spec, params, x, y = _tanh_case()

    class Full:
        def __init__(self, grad_input):
            self.loss, self.grads, self.deltas = _backprop(spec, params, x, y)
            self.grad_input = grad_input

    right = (_backprop(spec, params, x, y)[2]["layers.0"] @ params["layers.0.weight"])
    assert oracle.check(spec, params, x, y, lambda *a: Full(right)).classification == "match"
    result = oracle.check(spec, params, x, y, lambda *a: Full(-right))
    assert result.classification == "bug" and result.first_divergent_layer is None
    assert _failed(result) == ["input.grad"]
    assert result.localization == "every parameter gradient matches, ∂C/∂x does not: the last step δ_0 θ_0 is wrong"


# -- (10) the bounds themselves, against closed forms -------------------------------------------------------------
def test_the_strict_bound_is_rtol_norm_plus_atol_s_sqrt_n():
    ref = np.array([3.0, 4.0, 0.0, 0.0])  # ‖ĝ‖ = 5, n = 4
    tol = Tolerance(rtol=1e-3, atol=1e-4, rounding_factor=2.0)
    allowed = 1e-3 * 5 + 1e-4 * 10 * 2  # rtol·‖ĝ‖ + atol·S·√n with S = 10
    for err, passed in ((0.99 * allowed, True), (1.01 * allowed, False)):
        t = compare_tensor("t", ref + np.array([err, 0, 0, 0]), ref, tol, 10.0)
        assert t.passed is passed and t.verdict == ("match" if passed else "mismatch")
        assert t.allowed_normwise == pytest.approx(allowed, rel=1e-12)
        assert t.normwise_err == pytest.approx(err, rel=1e-12)
        assert t.normwise_rel_err == pytest.approx(err / 5, rel=1e-12)
    # each term on its own
    only_r, only_a = Tolerance(rtol=1e-3, atol=0.0), Tolerance(rtol=0.0, atol=1e-4)
    assert compare_tensor("t", ref * (1 + 0.99e-3), ref, only_r, 10.0).passed
    assert not compare_tensor("t", ref * (1 + 1.01e-3), ref, only_r, 10.0).passed
    spread = np.full(4, 1e-4 * 10 * 0.99)  # ‖d‖ = 2·0.99·atol·S < atol·S·√4
    assert compare_tensor("t", ref + spread, ref, only_a, 10.0).passed
    assert not compare_tensor("t", ref + spread * 1.02, ref, only_a, 10.0).passed
    assert not compare_tensor("t", ref + spread, ref, only_a, 5.0).passed  # S halved
    assert compare_tensor("t", ref + spread, ref, only_a, 20.0).passed


def test_the_elementwise_rounding_bound_is_atol_s_plus_rtol_g_plus_f_b():
    ref = np.array([[1.0, -2.0], [0.0, 4.0]])
    tol = Tolerance(rtol=1e-6, atol=1e-7, rounding_factor=3.0)
    b = np.array([[1e-3, 2e-3], [1e-4, 0.0]])
    elem = 1e-7 * 1.0 + 1e-6 * np.abs(ref) + 3.0 * b  # S = 1
    for frac, verdict in ((0.99, "rounding"), (1.01, "mismatch")):
        got = ref + frac * elem * np.array([[1, -1], [-1, 1]])
        t = compare_tensor("t", got, ref, tol, 1.0, bound=b, layer=2)
        assert t.verdict == verdict and t.passed is (verdict == "rounding") and t.layer == 2
        assert t.mismatched == (0 if frac < 1 else 4)
        assert t.rounding_allowance == pytest.approx(3.0 * float(np.linalg.norm(b)), rel=1e-12)
    # the worst element is reported with its index, values and bound
    got = ref.copy()
    got[1, 0] = 0.5
    t = compare_tensor("t", got, ref, tol, 1.0, bound=b)
    assert t.worst_index == (1, 0) and t.worst_candidate == 0.5 and t.worst_reference == 0.0
    assert t.worst_allowed == pytest.approx(elem[1, 0], rel=1e-12)
    assert t.max_abs_err == 0.5 and t.rel_index == (1, 0) and t.max_rel_err > 1e300
    assert t.mismatched == 1 and t.size == 4 and t.shape == (2, 2) and t.mismatched_share == 0.25
    # without a bound there is no rounding verdict at all
    t = compare_tensor("t", ref + 0.99 * elem, ref, tol, 1.0)
    assert t.verdict == "mismatch" and t.rounding_allowance is None


def test_compare_tensor_reports_relative_errors_and_never_passes_nan():
    ref = np.array([2.0, -4.0, 8.0])
    t = compare_tensor("t", np.array([2.0, -4.0, 9.0]), ref, TOLERANCES["float64"], 8.0)
    assert t.max_rel_err == pytest.approx(1 / 8) and t.rel_index == (2,) and t.max_abs_err == 1.0
    assert t.worst_index == (2,) and t.mismatched == 1
    for bad in (np.nan, np.inf):
        got = ref.copy()
        got[0] = bad
        huge = np.full(3, 1e100)
        t = compare_tensor("t", got, ref, Tolerance(rtol=1e6, atol=1e6, rounding_factor=1e6), 1e10, bound=huge)
        assert not t.passed and t.verdict == "mismatch" and t.worst_index == (0,) and t.normwise_err == math.inf
    zero = compare_tensor("t", np.zeros(2), np.zeros(2), TOLERANCES["float64"], 1.0)
    assert zero.passed and zero.normwise_rel_err == 0.0
    off = compare_tensor("t", np.array([1e-3, 0.0]), np.zeros(2), TOLERANCES["float64"], 1.0)
    assert not off.passed and off.normwise_rel_err == math.inf
    empty = compare_tensor("t", np.zeros((0, 3)), np.zeros((0, 3)), TOLERANCES["float64"], 1.0)
    assert empty.passed and empty.size == 0 and empty.mismatched_share == 0.0


def test_tolerance_describe_and_message_carry_the_numbers():
    tol = Tolerance(rtol=2e-9, atol=3e-8, rounding_factor=5.0)
    text = tol.describe()
    for words in ("2e-09·‖ĝ‖", "3e-08·S·√n", "5·Bᵢ"):
        assert words in text
    t = compare_tensor("layers.0.weight", np.array([1.0, 3.0]), np.array([1.0, 2.0]), tol, 2.0, bound=np.zeros(2), layer=0)
    msg = t.message()
    for words in ("layers.0.weight (layer 0): mismatch", "Mismatched elements: 1 / 2 (50.0%)", "at index (1,)",
                  "candidate 3, torch 2", "Rounding allowance"):
        assert words in msg, msg
    d = t.to_dict()
    assert d["shape"] == [2] and d["worst_index"] == [1] and d["rel_index"] == [1] and d["mismatched_share"] == 0.5


def test_invalid_tolerance_values_are_refused_with_the_field_named():
    for field in ("rtol", "atol", "rounding_factor"):
        for bad in (True, "1e-10", None, -1e-3, float("nan"), float("inf")):
            kw = {"rtol": 1e-10, "atol": 1e-10, field: bad}
            with pytest.raises(bp.SpecError) as info:
                Tolerance(**kw)
            err = info.value
            assert err.field == f"tolerance.{field}" and repr(bad) in err.problem and "≥ 0" in err.problem
            assert err.fix == "give e.g. Tolerance(rtol=1e-10, atol=1e-10)"
    assert Tolerance(rtol=0, atol=1, rounding_factor=0).atol == 1  # integers and zero are fine


# -- (11) the words the judge prints ---------------------------------------------------------------------------
HEADS = {
    "match": "gradients match torch.autograd (",
    "rounding": "gradients match torch.autograd within rounding (ill-conditioned in places) (",
    "kink": "gradients match torch.autograd up to a convention at kinks (",
    "convention": "gradients match torch.autograd up to torch's numerical guards (exact where torch clamps) (",
    "forward": "FORWARD MISMATCH: the loss differs from torch's (",
    "bug": "GRADIENT MISMATCH: the backward pass is wrong (",
    "crash": "CANDIDATE CRASHED: the gradient function did not return (",
}


def test_every_classification_has_its_own_summary():
    import dataclasses

    spec, params, x, y = _tanh_case()
    result = oracle.check(spec, params, x, y, _candidate())
    for kind, head in HEADS.items():
        text = dataclasses.replace(result, classification=kind).summary()
        assert text == f"{head}spec: {spec.describe()}, float64)", text  # an unnamed spec is called "spec"
    named = dataclasses.replace(result, spec=bp.example("seed-simple"))
    assert "(seed-simple: " in named.summary()


def test_a_crash_message_carries_the_candidates_own_traceback():
    spec, params, x, y = _tanh_case()

    def boom(*a):
        raise RuntimeError("boom")

    result = oracle.check(spec, params, x, y, boom)
    assert result.classification == "crash" and not result.passed
    assert result.crash["message"] == "raised RuntimeError: boom" and result.crash["kind"] == "raised"
    tb = result.crash["traceback"]
    assert tb.startswith("Traceback (most recent call last):\n") and tb.endswith("RuntimeError: boom\n")
    lines = result.message().split("\n")
    assert lines[0].startswith(HEADS["crash"])
    assert "The candidate raised RuntimeError: boom" in lines
    assert "Traceback (most recent call last):" in lines and lines[-1] == "RuntimeError: boom"
    assert any(line.startswith("  File ") and "in boom" in line for line in lines)
    crash = oracle.CandidateCrash("timeout", "ran past 5 s")
    assert str(crash) == "ran past 5 s" and crash.to_dict() == {"kind": "timeout", "message": "ran past 5 s", "traceback": ""}


def test_a_candidate_error_names_the_impl_and_a_fix():
    spec, params, x, y = _tanh_case()
    with pytest.raises(oracle.CandidateError) as info:
        oracle.check(spec, params, x, y, lambda *a: 42)
    err = info.value
    assert isinstance(err, bp.SpecError) and err.field == "impl" and err.problem == "returned a int"
    assert err.fix and "(loss, grads)" in err.fix and str(err).startswith("impl: returned a int; return (loss, grads)")


def test_the_full_message_lists_the_failing_loss_and_tensors_line_by_line():
    spec, params, x, y = _tanh_case()
    loss, grads, deltas = _backprop(spec, params, x, y)
    result = oracle.check(spec, params, x, y, lambda *a: (loss * 1.1, grads, deltas))
    lines = result.message().split("\n")
    assert lines[0].startswith(HEADS["forward"]) and lines[1].startswith("Where: the loss differs")
    assert "loss: mismatch" in lines and lines[-1].startswith("Criterion: ‖g − ĝ‖ ≤ 1e-10·‖ĝ‖")
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.1.weight", _times(2.0))))
    lines = result.message().split("\n")
    assert "layers.1.weight (layer 1): mismatch" in lines and not any(line.startswith("loss") for line in lines)
    assert any(line.startswith("  Hint: constant ratio candidate/torch = 2") for line in lines)
    assert lines[-1].endswith(f"S_δ = {result.scale.delta:.3g}, S_θ = {result.scale.param:.3g}")


# -- (12) kinks away from element (0, 0), other kink slopes, and the loss kink behind a non-identity output --------
def _kink_off_origin_case(act):
    """z_0 is exactly 0 at element (1, 2) only; the output layer is the identity."""
    spec = _spec(3, [(3, act, False), (2, "identity", True)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, -1.0, 0.5], [0.5, 0.25, -1.0], [-1.0, 2.0, 1.0]]),
              "layers.1.weight": np.array([[0.5, -0.25, 1.0], [1.0, 0.5, -0.5]]),
              "layers.1.bias": np.array([0.125, -0.25])}
    x = np.array([[1.0, 2.0, 0.5], [1.0, 0.25, 0.5], [2.0, 0.5, -0.5]])
    y = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])
    z0 = x @ params["layers.0.weight"].T
    assert z0[1, 2] == 0 and np.count_nonzero(z0 == 0) == 1
    return spec, params, x, y


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("act", ["relu", {"name": "leaky_relu", "negative_slope": 0.75}])
def test_a_kink_anywhere_with_either_slope_is_a_kink(act, with_deltas):
    """relu'(0) = 1 or leaky_relu'(0) = 1 (torch: 0 and the slope) at an element that is not the first one."""
    spec, params, x, y = _kink_off_origin_case(act)
    assert oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas)).classification == "match"
    other = _candidate(relu_at_zero=1.0, with_deltas=with_deltas)
    assert not np.allclose(other(spec, params, x, y)[1]["layers.0.weight"], _backprop(spec, params, x, y)[1]["layers.0.weight"])
    result = oracle.check(spec, params, x, y, other)
    assert result.passed and result.classification == "kink", result.message()
    # a slope that is neither side's is a bug
    result = oracle.check(spec, params, x, y, _candidate(relu_at_zero=0.5, with_deltas=with_deltas))
    assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()


@pytest.mark.parametrize("with_deltas", [True, False])
def test_l1_kink_behind_a_sigmoid_output_is_a_kink(with_deltas):
    """σ(0) = ½ exactly: a zero residual at an output whose σ' is ¼, so ∂C/∂a and δ differ there."""
    spec = _spec(2, [(3, "relu", False), (2, "sigmoid", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 1.0], [0.25, -1.0]]),
              "layers.1.weight": np.array([[0.75, -1.0, 0.5], [0.5, 1.0, -0.25]])}
    x = np.array([[1.0, 2.0], [2.0, -0.5], [0.5, 1.5]])
    z1 = np.maximum(x @ params["layers.0.weight"].T, 0) @ params["layers.1.weight"].T
    assert z1[0, 0] == 0 and np.count_nonzero(z1 == 0) == 1
    y = _output(spec, params, x) + np.array([[0.0, 0.25], [-0.5, 0.125], [0.375, -0.25]])
    assert y[0, 0] == 0.5
    assert oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas)).classification == "match"
    result = oracle.check(spec, params, x, y, _candidate(sign0=1.0, with_deltas=with_deltas))
    assert result.passed and result.classification == "kink", result.message()
    result = oracle.check(spec, params, x, y, _candidate(sign0=4.0, with_deltas=with_deltas))
    assert result.classification == "bug", result.message()


# -- (13) torch's BCE guard: the exact alternative, against 50-digit closed forms ---------------------------------
def _decimal_bce(z, y, softmax):
    """δ = ∂C/∂z and C of mean bce on σ(z) or softmax(z), in 50-digit decimal arithmetic."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    N = z.size
    delta, total = np.zeros(z.shape), Decimal(0)
    for r in range(z.shape[0]):
        zs, ys = [Decimal(float(v)) for v in z[r]], [Decimal(float(v)) for v in y[r]]
        if softmax:
            e = [v.exp() for v in zs]
            s = sum(e)
            p = [v / s for v in e]
            q = [(s - v) / s for v in e]  # 1 − p_j without cancelling
            t = [(pj - yj) / qj for pj, qj, yj in zip(p, q, ys)]
            st = sum(t)
            for k in range(len(zs)):
                delta[r, k] = float((t[k] - p[k] * st) / N)
        else:
            p = [1 / (1 + (-v).exp()) for v in zs]
            q = [1 / (1 + v.exp()) for v in zs]
            for k in range(len(zs)):
                delta[r, k] = float((p[k] - ys[k]) / N)
        for pj, qj, yj in zip(p, q, ys):
            total -= yj * pj.ln() + (1 - yj) * qj.ln()
    return delta, float(total / N)


@pytest.mark.parametrize("softmax", [False, True])
def test_the_exact_bce_alternative_matches_a_50_digit_closed_form(softmax):
    from oracle.conventions import exact_bce

    act = "softmax" if softmax else "sigmoid"
    spec = _spec(2, [(3, act, True)], "bce")
    z = np.array([[40.0, -2.0, 1.0], [0.5, -0.25, 0.0], [-35.0, 3.0, 2.5], [1.0, 38.0, -40.0]])
    y = np.array([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.0, 0.6, 0.4], [0.1, 0.7, 0.2]])
    delta, loss = exact_bce(spec, z, y)
    want_delta, want_loss = _decimal_bce(z, y, softmax)
    np.testing.assert_allclose(delta, want_delta, rtol=1e-12, atol=0)
    assert loss == pytest.approx(want_loss, rel=1e-12)


def test_the_exact_bce_alternative_of_a_one_unit_softmax_is_zero():
    from oracle.conventions import exact_bce

    spec = _spec(2, [(1, "softmax", True)], "bce")
    delta, loss = exact_bce(spec, np.array([[3.0], [-1.0]]), np.array([[1.0], [0.25]]))
    assert delta.shape == (2, 1) and np.all(delta == 0) and math.isnan(loss)


def _exact_bce_candidate(softmax, negate=False):
    """A candidate that differentiates bce exactly (no guard) in 50 digits: one layer, so ∂C/∂θ = δᵀx."""
    def fn(spec, params, x, y):
        z = x @ params["layers.0.weight"].T + params.get("layers.0.bias", 0.0)
        delta, loss = _decimal_bce(z, y, softmax)
        if negate:
            delta = -delta
        grads = {"layers.0.weight": delta.T @ x, "layers.0.bias": delta.sum(axis=0)}
        return loss, {k: grads[k] for k in spec.param_shapes()}, {"layers.0": delta}
    return fn


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("softmax", [False, True])
def test_exact_bce_where_torchs_guard_is_active_is_a_convention(softmax, with_deltas):
    spec = _spec(2, [(3, "softmax" if softmax else "sigmoid", True)], "bce")
    params = {"layers.0.weight": np.array([[0.5, -0.25], [1.0, 0.5], [-0.5, 1.0]]), "layers.0.bias": np.array([40.0, 0.0, -1.0])}
    x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    y = np.array([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])

    def strip(fn):
        return fn if with_deltas else (lambda *a: fn(*a)[:2])

    result = oracle.check(spec, params, x, y, strip(_exact_bce_candidate(softmax)))
    assert result.passed and result.classification == "convention", result.message()
    assert any("guard" in n and "exact derivative" in n for n in result.notes)
    assert oracle.check(spec, params, x, y).classification in ("match", "rounding")  # torch's own guarded values
    result = oracle.check(spec, params, x, y, strip(_exact_bce_candidate(softmax, negate=True)))
    assert result.classification == "bug", result.message()


# -- (14) the rounding allowance's ingredients, against the documented closed forms ---------------------------------
def test_derivatives_are_g_prime_and_g_second_in_closed_form():
    from oracle.rounding import derivatives

    z = np.array([-3.0, -0.5, 0.0, 0.25, 2.0])
    t = np.tanh(z)
    d1, d2 = derivatives(bp.make_activation("tanh"), z)
    np.testing.assert_allclose(d1, 1 - t * t, rtol=1e-14)
    np.testing.assert_allclose(d2, -2 * t * (1 - t * t), rtol=1e-12, atol=1e-300)
    s = 1 / (1 + np.exp(-z))
    d1, d2 = derivatives(bp.make_activation("sigmoid"), z)
    np.testing.assert_allclose(d1, s * (1 - s), rtol=1e-14)
    np.testing.assert_allclose(d2, s * (1 - s) * (1 - 2 * s), rtol=1e-12, atol=1e-17)
    d1, d2 = derivatives(bp.make_activation("identity"), z)
    assert np.all(d1 == 1) and np.all(d2 == 0)
    d1, d2 = derivatives(bp.make_activation("relu"), z)
    assert np.array_equal(d1, (z > 0).astype(float)) and np.all(d2 == 0)
    # where torch's double backward is NaN (mish far right), g'' counts as 0, not as NaN or 1
    d1, d2 = derivatives(bp.make_activation("mish"), np.array([800.0, 1.0]))
    assert d1[0] == 1 and d2[0] == 0 and 0 < abs(d2[1]) < 1
    d1, d2 = derivatives(bp.make_activation("gelu"), np.array([-3e154, 0.0]))
    assert d2[0] == 0 and d2[1] == pytest.approx(2 / math.sqrt(2 * math.pi), rel=1e-12)


@pytest.mark.parametrize("act,k,slopes", [
    ("relu", 0.0, (0.0, 1.0)),
    ({"name": "leaky_relu", "negative_slope": 0.2}, 0.0, (0.2, 1.0)),
    ({"name": "elu", "alpha": 0.5}, 0.0, (0.5, 1.0)),
    ({"name": "hardtanh", "min_val": -0.5, "max_val": 0.5}, 0.5, (1.0, 0.0)),
    ({"name": "hardtanh", "min_val": -0.5, "max_val": 0.5}, -0.5, (0.0, 1.0)),
    ({"name": "hardtanh", "min_val": -2e5, "max_val": 1e5}, 1e5, (1.0, 0.0)),
    ("selu", 0.0, (1.6732632423543772 * 1.0507009873554805, 1.0507009873554805)),
    ({"name": "elu", "alpha": 2.5}, 0.0, (2.5, 1.0)),
])
def test_one_sided_slopes_are_the_slopes_just_left_and_right_of_the_kink(act, k, slopes):
    from oracle.rounding import one_sided_slopes

    act = bp.make_activation(act) if isinstance(act, str) else bp.make_activation(act["name"], **{
        key: v for key, v in act.items() if key != "name"})
    left, right = one_sided_slopes(act, k)
    # the one-sided limits to rounding: the convention re-run adopts them verbatim under a 1e-10 bound
    assert left == pytest.approx(slopes[0], rel=1e-13, abs=1e-300) and right == pytest.approx(slopes[1], rel=1e-13, abs=1e-300)


def test_the_allowances_sigmoid_is_sigma_at_both_ends():
    from oracle.rounding import _sigmoid

    z = np.array([-700.0, -30.0, -1.0, 0.0, 0.5, 30.0, 700.0])
    want = np.array([math.exp(-700), 1 / (1 + math.exp(30)), 1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-0.5)),
                     1 / (1 + math.exp(-30)), 1.0])
    np.testing.assert_allclose(_sigmoid(z), want, rtol=1e-14)


def _hardtanh_kink_case():
    """hardtanh(−½, ½) with z_0 exactly at +½ (element (1, 0)) and at −½ (element (2, 0))."""
    act = {"name": "hardtanh", "min_val": -0.5, "max_val": 0.5}
    spec = _spec(2, [(2, act, False), (1, "identity", False)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, -0.5], [0.25, 0.125]]), "layers.1.weight": np.array([[1.0, -2.0]])}
    x = np.array([[0.25, 0.5], [1.0, 1.0], [-0.25, 0.5]])
    y = np.array([[0.3], [-0.2], [0.7]])
    z0 = x @ params["layers.0.weight"].T
    assert z0[1, 0] == 0.5 and z0[2, 0] == -0.5 and np.count_nonzero(np.abs(z0) == 0.5) == 2
    return spec, params, x, y


def _hardtanh_candidate(slope_at_ends, with_deltas=True, double_w0=False):
    def fn(spec, params, x, y):
        lo, hi = -0.5, 0.5
        z0 = x @ params["layers.0.weight"].T
        h = np.clip(z0, lo, hi)
        d0 = ((z0 > lo) & (z0 < hi)).astype(float)
        d0 = np.where((z0 == lo) | (z0 == hi), slope_at_ends, d0)
        out = h @ params["layers.1.weight"].T
        r = out - y
        delta0 = (r @ params["layers.1.weight"]) * d0
        grads = {"layers.0.weight": delta0.T @ x * (2 if double_w0 else 1), "layers.1.weight": r.T @ h}
        return (0.5 * np.sum(r * r), grads, {"layers.0": delta0, "layers.1": r}) if with_deltas else (0.5 * np.sum(r * r), grads)
    return fn


@pytest.mark.parametrize("with_deltas", [True, False])
def test_hardtanh_ends_with_slope_one_are_a_kink(with_deltas):
    spec, params, x, y = _hardtanh_kink_case()
    assert oracle.check(spec, params, x, y, _hardtanh_candidate(0.0, with_deltas)).classification == "match"
    result = oracle.check(spec, params, x, y, _hardtanh_candidate(1.0, with_deltas))
    assert result.passed and result.classification == "kink", result.message()
    assert oracle.check(spec, params, x, y, _hardtanh_candidate(1.0, with_deltas, double_w0=True)).classification == "bug"


# -- (15) the convention rule follows the candidate element by element, and says what it did ---------------------
def _two_kinks_case(act):
    spec = _spec(3, [(3, act, False), (2, "identity", True)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, -1.0, 0.5], [0.5, 0.25, -1.0], [-1.0, 2.0, 1.0]]),
              "layers.1.weight": np.array([[0.5, -0.25, 1.0], [1.0, 0.5, -0.5]]),
              "layers.1.bias": np.array([0.125, -0.25])}
    x = np.array([[1.0, 2.0, 0.5], [1.0, 0.25, 0.5], [2.0, 0.5, -0.5], [2.0, 2.0, 0.0]])
    y = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.25, 0.5]])
    z0 = x @ params["layers.0.weight"].T
    assert z0[1, 2] == 0 and z0[3, 0] == 0 and np.count_nonzero(z0 == 0) == 2
    return spec, params, x, y


def test_a_candidate_mixing_both_slopes_at_two_kinks_is_followed_element_by_element():
    """leaky_relu(0.75): torch's slope 0.75 at one kink element, the other side's 1 at the other."""
    act = {"name": "leaky_relu", "negative_slope": 0.75}
    spec, params, x, y = _two_kinks_case(act)
    up = _bp_delta1(spec, params, x, y) @ params["layers.1.weight"]
    assert up[3, 0] != 0 and up[1, 2] != 0
    mask = np.zeros(up.shape, dtype=bool)
    mask[3, 0] = True
    mixed = _candidate(delta_fault=(0, lambda d: np.where(mask, up, d)))
    result = oracle.check(spec, params, x, y, mixed)
    assert result.passed and result.classification == "kink", result.message()
    assert any(n.startswith("Kink convention: at 1 element(s) of layer 0") for n in result.notes), result.notes
    both = oracle.check(spec, params, x, y, _candidate(relu_at_zero=1.0))
    assert both.classification == "kink" and any("at 2 element(s) of layer 0" in n for n in both.notes), both.notes


@pytest.mark.parametrize("sign0,text", [(1.0, "sign(0) = +1"), (-1.0, "sign(0) = -1")])
def test_the_l1_note_names_the_sign_the_candidate_used(sign0, text):
    spec, params, x, y = _l1_case()
    for with_deltas in (True, False):
        result = oracle.check(spec, params, x, y, _candidate(sign0=sign0, with_deltas=with_deltas))
        assert result.classification == "kink"
        assert any(n.startswith("Kink convention: at 1 output element(s) on the kink of l1") and text in n
                   for n in result.notes), result.notes


def test_the_hardtanh_note_counts_both_ends():
    spec, params, x, y = _hardtanh_kink_case()
    result = oracle.check(spec, params, x, y, _hardtanh_candidate(1.0))
    assert any(n.startswith("Kink convention: at 2 element(s) of layer 0") and "hardtanh" in n for n in result.notes), result.notes


def _float32_guard_case():
    """σ(17) rounds to 1 in float32 (torch's float32 guard is active) but not in float64."""
    spec = _spec(2, [(2, "sigmoid", True)], "bce")
    params = {"layers.0.weight": np.array([[0.5, -0.25], [1.0, 0.5]], np.float32), "layers.0.bias": np.array([17.0, 0.0], np.float32)}
    x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], np.float32)
    y = np.array([[0.9, 0.05], [0.2, 0.3], [0.6, 0.2]], np.float32)
    z = x @ params["layers.0.weight"].T + params["layers.0.bias"]
    assert np.all(1 / (1 + np.exp(-z[:, 0].astype(np.float64))) < 1) and np.all((1 + np.exp(-z[:, 0])) == 1)
    return spec, params, x, y


def _torch_float32_bce(spec, params, x, y):
    """A float32 candidate that does what torch does in float32, guard included (written out in NumPy)."""
    z = x @ params["layers.0.weight"].T + params["layers.0.bias"]
    a = (np.float32(1) / (np.float32(1) + np.exp(-z))).astype(np.float32)
    N = np.float32(a.size)
    grad_a = (a - y) / np.maximum(a * (np.float32(1) - a), np.float32(1e-12)) / N
    delta = (grad_a * a * (np.float32(1) - a)).astype(np.float32)
    loss = -np.mean(y * np.maximum(np.log(a), -100) + (1 - y) * np.maximum(np.log(np.maximum(1 - a, 1e-45)), -100))
    return np.float32(loss), {"layers.0.weight": delta.T @ x, "layers.0.bias": delta.sum(axis=0)}, {"layers.0": delta}


def test_torchs_float32_guard_is_a_convention_in_float32_mode():
    spec, params, x, y = _float32_guard_case()
    with np.errstate(divide="ignore"):
        result = oracle.check(spec, params, x, y, _torch_float32_bce)
    assert result.passed and result.classification == "convention", result.message()
    assert any("guard" in n and "torch's guarded value computed in float32" in n for n in result.notes), result.notes

    def negated(*a):
        with np.errstate(divide="ignore"):
            loss, g, d = _torch_float32_bce(*a)
        return loss, {k: -v for k, v in g.items()}, {k: -v for k, v in d.items()}

    assert oracle.check(spec, params, x, y, negated).classification == "bug"


def test_localization_sentences_name_the_step_that_is_wrong():
    spec, params, x, y = _four_layers()
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(1, _times(1.5))))
    assert result.localization == ("δ of layer 2 matches, δ of layer 1 diverges: the backward step through layer 1 "
                                   "(tanh) is wrong: (δ_2 θ_2) ⊙ g'(z_1)")
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(3, _times(1.5))))
    assert result.localization == ("the output δ (layer 3) diverges: ∇_a C of the loss (half_sse) "
                                   "or the output activation's derivative (identity) is wrong")
    both = ("layers.2.weight", lambda g: g * 2)
    result = oracle.check(spec, params, x, y, lambda *a: _two_faults(*a, both))
    assert result.localization == ("δ of layer 2 matches but layers.2.weight, layers.2.bias do not: the "
                                   "parameter-gradient step of layer 2 (∂C/∂θ = δᵀa, ∂C/∂b = Σ δ) is wrong")
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(1, _times(1.5)), with_deltas=False))
    assert result.localization == ("layers 2..3 match; layer 1 is the first to diverge (layers.1.weight, layers.1.bias): "
                                   "the backward step through layer 1 (tanh) or its parameter gradients")
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(3, _times(1.5)), with_deltas=False))
    assert result.localization == ("layer 3 is the first to diverge (layers.3.weight, layers.3.bias): the output layer: "
                                   "check ∇_a C of half_sse and the derivative of identity")


def _two_faults(spec, params, x, y, fault):
    loss, grads, deltas = _backprop(spec, params, x, y, grad_fault=fault)
    grads["layers.2.bias"] = grads["layers.2.bias"] * 2
    return loss, grads, deltas


# -- (16) more hints, judged through check ------------------------------------------------------------------------
def test_a_neighbouring_layers_gradient_gets_the_wrong_layer_hint():
    spec, params, x, y = _four_layers()  # layers 1 and 2 both have 4 units: their biases and δ have equal shapes
    right = _backprop(spec, params, x, y)
    grads = {**right[1], "layers.2.bias": right[1]["layers.1.bias"]}
    result = oracle.check(spec, params, x, y, lambda *a: (right[0], grads))
    assert _failed(result) == ["layers.2.bias"]
    assert any("equals torch's layers.1.bias" in h for h in result.hints["layers.2.bias"]), result.hints
    deltas = {**right[2], "layers.1": right[2]["layers.2"]}
    result = oracle.check(spec, params, x, y, lambda *a: (right[0], right[1], deltas))
    assert any("equals torch's layers.2.delta" in h for h in result.hints["layers.1.delta"]), result.hints


def test_a_sum_where_the_mean_belongs_gets_the_batch_size_hint():
    spec, params, x, y = _tanh_case("half_mse", m=6)
    result = oracle.check(spec, params, x, y, _candidate(grad_fault=("layers.0.weight", _times(6.0))))
    assert any("a missing 1/m, m = 6" in h for h in result.hints["layers.0.weight"]), result.hints


def _row_fault(row, factor, elsewhere=0.0):
    def f(d):
        d = d * (1 + elsewhere)
        d[row] *= factor
        return d
    return f


def test_the_batch_row_hint_uses_the_checks_own_tolerance():
    # every gradient ~1e-8: the row is judged against atol·S, not against a fixed 1e-8
    spec, params, x, _ = _tanh_case()
    y = _output(spec, params, x) + 1e-8 * np.random.default_rng(1).standard_normal((5, 2))
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(1, _row_fault(2, 1.5))))
    assert "the error is confined to batch row 2" in result.hints["layers.1.delta"], result.hints
    # and rows off by 1e-9 (ten times the tolerance, far below a blunt 1e-8 threshold) are wrong rows too
    spec, params, x, y = _tanh_case()
    result = oracle.check(spec, params, x, y, _candidate(delta_fault=(1, _row_fault(2, 3.0, elsewhere=1e-9))))
    assert result.first_divergent_layer == 1
    assert "layers.1.delta" in _failed(result)
    assert not any("confined" in h for h in result.hints.get("layers.1.delta", [])), result.hints


@pytest.mark.parametrize("with_deltas", [True, False])
def test_exact_bce_just_inside_torchs_guard_is_a_convention(with_deltas):
    """σ(30) = 1 − 9e-14: a(1 − a) is under the guard 1e-12 but 1 − a is far from 0 (no log clamp)."""
    spec = _spec(2, [(1, "sigmoid", True)], "bce")
    params = {"layers.0.weight": np.array([[0.0, 0.0]]), "layers.0.bias": np.array([30.0])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    y = np.array([[0.25], [0.75]])
    fn = _exact_bce_candidate(softmax=False)
    result = oracle.check(spec, params, x, y, fn if with_deltas else (lambda *a: fn(*a)[:2]))
    assert result.passed and result.classification == "convention", result.message()


def test_l1_kink_in_a_one_layer_net_is_a_kink():
    spec = _spec(2, [(2, "identity", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [-0.5, 0.25]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    y = x @ params["layers.0.weight"].T + np.array([[0.0, 0.5], [-0.25, 0.125]])
    for with_deltas in (True, False):
        result = oracle.check(spec, params, x, y, _candidate(sign0=1.0, with_deltas=with_deltas))
        assert result.passed and result.classification == "kink", result.message()


def test_l1_kink_behind_a_softmax_output_is_a_kink():
    """Equal logits give p = (½, ½) exactly; y = ½ there is a zero residual, and sign(0) = +1 is a valid subgradient."""
    spec = _spec(2, [(2, "softmax", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [1.0, 0.5]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    y = np.array([[0.5, 0.25], [0.75, 0.5]])

    def plus(spec, params, x, y):
        z = x @ params["layers.0.weight"].T
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        r = p - y
        g = np.where(r >= 0, 1.0, -1.0) / r.size
        delta = p * (g - np.sum(g * p, axis=1, keepdims=True))
        return np.mean(np.abs(r)), {"layers.0.weight": delta.T @ x}, {"layers.0": delta}

    assert oracle.check(spec, params, x, y).classification == "match"
    result = oracle.check(spec, params, x, y, plus)
    assert result.passed and result.classification == "kink", result.message()


def test_localize_with_nothing_wrong_names_no_layer():
    from oracle.checker import localize

    spec, params, x, y = _tanh_case()
    result = oracle.check(spec, params, x, y, lambda *a: _Full(spec, params, x, y))
    assert result.classification == "match" and any(t.name == "input.grad" for t in result.tensors)
    assert localize(spec, result.tensors) == (None, "")
    assert localize(spec, []) == (None, "")


class _Full:
    """A candidate answer as an object with every field, ∂C/∂x included."""

    def __init__(self, spec, params, x, y):
        self.loss, self.grads, self.deltas = _backprop(spec, params, x, y)
        self.grad_input = self.deltas["layers.0"] @ params["layers.0.weight"]


@pytest.mark.parametrize("with_deltas", [True, False])
def test_selu_at_its_kink_with_the_right_sides_slope_is_a_kink(with_deltas):
    """torch's selu'(0) is λα (the left side); λ (the right side) is the other valid slope, and it is not 1."""
    spec, params, x, y = _kink_off_origin_case("selu")
    selu = spec.layers[0].activation
    assert oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas)).classification == "match"
    result = oracle.check(spec, params, x, y, _candidate(relu_at_zero=selu.scale, with_deltas=with_deltas))
    assert result.passed and result.classification == "kink", result.message()
    result = oracle.check(spec, params, x, y, _candidate(relu_at_zero=1.0, with_deltas=with_deltas))
    assert result.classification == "bug", result.message()


@pytest.mark.parametrize("with_deltas", [True, False])
def test_l1_sign_zero_where_torchs_residual_is_one_ulp_off_is_a_kink(with_deltas):
    """The candidate's σ(5/64) is one ulp above torch's: its residual is exactly 0 where torch's is −1 ulp, so it
    takes sign(0) = 0 where torch takes −1. Both are right (the residual is zero within rounding)."""
    spec = _spec(2, [(2, "sigmoid", False)], "l1")
    params = {"layers.0.weight": np.array([[0.078125, 0.5], [0.25, -0.5]])}
    x = np.array([[1.0, 0.0], [0.5, 1.0], [1.0, 1.0]])
    mine = _output(spec, params, x, tanh_sigmoid=True)
    import torch

    theirs = torch.sigmoid(torch.tensor(x @ params["layers.0.weight"].T)).numpy()
    assert mine[0, 0] - theirs[0, 0] == 2.0 ** -53  # one ulp of 0.52
    y = mine + np.array([[0.0, 0.25], [-0.25, 0.125], [0.375, -0.125]])
    result = oracle.check(spec, params, x, y, _candidate(with_deltas=with_deltas, tanh_sigmoid=True))
    assert result.passed and result.classification == "kink", result.message()
    assert any("sign(0) = 0" in n for n in result.notes), result.notes  # (printed "sign(0) = 01")


@pytest.mark.parametrize("with_deltas", [True, False])
def test_exact_bce_on_a_partly_guarded_softmax_row_is_a_convention(with_deltas):
    """Row 0 = softmax(20, 20, −20): only its third unit is under torch's guard, yet the exact δ differs from
    torch's on the whole row (δ_k involves every unit of the row); 2 rows, 3 units."""
    spec = _spec(2, [(3, "softmax", False)], "bce")
    params = {"layers.0.weight": np.array([[20.0, 0.5], [20.0, -0.25], [-20.0, 0.0]])}
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    fn = _exact_bce_candidate(softmax=True)
    result = oracle.check(spec, params, x, y, fn if with_deltas else (lambda *a: fn(*a)[:2]))
    assert result.passed and result.classification == "convention", result.message()
    wrong = _exact_bce_candidate(softmax=True, negate=True)
    assert oracle.check(spec, params, x, y, wrong).classification == "bug"


@pytest.mark.parametrize("with_deltas", [True, False])
def test_l1_kink_behind_a_log_softmax_output_is_a_kink(with_deltas):
    """Equal logits: log_softmax = −log 2 exactly (torch's value is the target); sign(0) = +1 moves the whole row."""
    import torch

    spec = _spec(2, [(2, "log_softmax", False)], "l1")
    params = {"layers.0.weight": np.array([[1.0, 0.5], [1.0, 0.5]])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    y = torch.log_softmax(torch.tensor(x @ params["layers.0.weight"].T), -1).numpy() + np.array([[0.0, 0.25], [-0.25, 0.0]])

    def plus(spec, params, x, y):
        a = torch.log_softmax(torch.tensor(x @ params["layers.0.weight"].T), -1).numpy()
        r = a - y
        g = np.where(r >= 0, 1.0, -1.0) / r.size
        delta = g - np.exp(a) * g.sum(axis=1, keepdims=True)
        out = (np.mean(np.abs(r)), {"layers.0.weight": delta.T @ x}, {"layers.0": delta})
        return out if with_deltas else out[:2]

    assert oracle.check(spec, params, x, y).classification == "match"
    result = oracle.check(spec, params, x, y, plus)
    assert result.passed and result.classification == "kink", result.message()


# -- (17) the worst-case bound itself: sound against real roundings, and not absurdly loose -------------------------
def _allowance_cases():
    def mk(layers, loss, seed, scale=1.0, xs=1.0, off=0.0):
        spec = _spec(3, layers, loss)
        rng = np.random.default_rng(seed)
        p = bp.init_params(spec, rng, scale=scale)
        x = xs * rng.standard_normal((5, 3))
        y = rng.standard_normal((5, layers[-1][0]))
        if off:
            y = _output(spec, p, x) + off * rng.standard_normal(y.shape)
        return spec, p, x, y

    return {
        "tanh-saturated": (mk([(6, "tanh", True), (4, "tanh", True), (2, "identity", True)], "half_sse", 0, scale=6, xs=3), True),
        "sigmoid-saturated": (mk([(6, "sigmoid", True), (2, "sigmoid", True)], "mse", 1, scale=6, xs=3), True),
        "residual-cancels": (mk([(4, "tanh", True), (2, "identity", True)], "half_sse", 2, off=1e-6), False),
        "relu": (mk([(6, "relu", True), (3, "relu", True), (2, "identity", True)], "sse", 3), True),
        "selu": (mk([(6, "selu", True), (2, "identity", True)], "half_mse", 4, scale=3), True),
        "leaky-l1": (mk([(6, {"name": "leaky_relu", "negative_slope": 0.1}, True), (2, "identity", True)], "l1", 6), True),
    }


def _assert_within_allowance(result, ref, bounds, dt, tight: bool) -> None:
    """Every tensor of ``result`` = (loss, grads, deltas) within its allowance B of torch's float64 ``ref``,
    element by element and without the safety factor; B finite and ≥ 0; and, when ``tight``, B within
    3e4 ulps of the tensor's size (small enough to catch bugs)."""
    loss, grads, deltas = result
    got = {"loss": np.float64(loss), **grads, **{f"{k}.delta": v for k, v in deltas.items()}}
    want = {"loss": ref.loss, **ref.grads, **{f"{k}.delta": v for k, v in ref.deltas.items()}}
    eps = float(np.finfo(dt).eps)
    for name in got:
        b = np.asarray(bounds[name])
        assert np.all(np.isfinite(b)) and np.all(b >= 0), name
        err = np.abs(np.asarray(got[name], dtype=np.float64) - want[name])
        assert np.all(err <= b), (name, float(np.max(err / np.maximum(b, 1e-300))))
        if tight:
            size = max(float(np.max(np.abs(want[name]))), 1e-300)
            assert float(np.max(b)) <= 3e4 * eps * size, (name, float(np.max(b)) / size / eps)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(_allowance_cases()))
def test_the_worst_case_allowance_covers_real_roundings_and_is_not_loose(case, dtype):
    """B (``oracle.rounding.allowance``) must cover how far a correct implementation lands from torch (a long
    double one for float64, a float32 one for float32), element by element, without the safety factor; and on
    these well-scaled nets it must stay within a few hundred ulps of each tensor's size."""
    from oracle.rounding import allowance
    from oracle.twin import run_twin

    (spec, p, x, y), well_scaled = _allowance_cases()[case]
    dt = np.dtype(dtype)
    pc, xc, yc = {k: v.astype(dt) for k, v in p.items()}, x.astype(dt), y.astype(dt)
    p64, x64, y64 = {k: v.astype(np.float64) for k, v in pc.items()}, xc.astype(np.float64), yc.astype(np.float64)
    ref = run_twin(spec, p64, x64, y64, np.float64)
    bounds = allowance(spec, p64, x64, y64, ref, dt).bounds
    loss, grads, deltas = _backprop(spec, pc, xc, yc, work=np.longdouble if dt == np.float64 else None)
    _assert_within_allowance((loss, grads, deltas), ref, bounds, dt, tight=well_scaled)


def test_selu_left_slope_where_torchs_z_is_a_rounding_above_the_kink_is_a_kink():
    """z = 2⁻⁵² exactly (1 + 2⁻⁵² − 1): torch takes the right slope λ; a candidate whose sum rounds to ≤ 0 takes
    the left one, λα (λα e^z to the last bit). Both are valid within rounding of the kink."""
    spec = _spec(2, [(2, "selu", False), (1, "identity", False)], "half_sse")
    params = {"layers.0.weight": np.array([[1.0, -1.0], [0.5, 1.0]]), "layers.1.weight": np.array([[1.0, -2.0]])}
    x = np.array([[1.0, 0.5], [1.0 + 2.0 ** -52, 1.0], [0.5, -1.0]])
    y = np.array([[0.25], [-0.5], [1.0]])
    selu = spec.layers[0].activation
    z0 = x @ params["layers.0.weight"].T
    assert z0[1, 0] == 2.0 ** -52
    up = _bp_delta1(spec, params, x, y) @ params["layers.1.weight"]
    mask = np.zeros_like(up, dtype=bool)
    mask[1, 0] = True
    left = _candidate(delta_fault=(0, lambda d: np.where(mask, up * selu.alpha * selu.scale * np.exp(z0), d)))
    assert oracle.check(spec, params, x, y, _candidate()).classification == "match"
    result = oracle.check(spec, params, x, y, left)
    assert result.passed and result.classification == "kink", result.message()


def test_the_allowances_closed_form_helpers():
    """``_sech2`` is 1 − tanh² without the cancellation; ``_cancel`` is u·terms, or the exact result itself where
    that is below u²·terms (saturated: every implementation returns the limit exactly)."""
    from oracle.rounding import _cancel, _sech2

    x = np.array([-3.0, -0.5, 0.0, 0.25, 2.0])
    np.testing.assert_allclose(_sech2(x), 1 - np.tanh(x) ** 2, rtol=1e-13)
    assert _sech2(np.array([40.0]))[0] == pytest.approx(4 * math.exp(-80), rel=1e-13)
    us = (2.0 ** -24, 2.0 ** -53)
    # in units of u = Σ u_k: 0.5 and 1e-9 are above both u_k² (3.6e-15, 1.2e-32): u_k·1 each, 1 in all;
    # 1e-20 is below u32² only: (1e-20 + u64)/u; 1e-40 is below both: 2·1e-40/u
    got = _cancel(1.0, np.array([0.5, 1e-9, 1e-20, 1e-40]), us)
    want = np.array([1.0, 1.0, (1e-20 + us[1]) / sum(us), 2e-40 / sum(us)])
    np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(_cancel(np.array([2.0, 4.0]), np.array([1.0, 1e-60]), us), [2.0, 2e-60 / sum(us)], rtol=1e-13)


def test_the_gradient_scale_has_a_floor_at_the_dtypes_resolution_of_the_loss():
    """S = max(largest gradient, ε²·max(1, |C|)/atol): gradients below the loss's resolution are all 'zero'."""
    from oracle.compare import gradient_scale

    f64, f32 = TOLERANCES["float64"], TOLERANCES["float32"]
    e64, e32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
    assert gradient_scale(3.0, 5.0, np.float64, f64) == 3.0
    assert gradient_scale(1e-30, 5.0, np.float64, f64) == pytest.approx(e64 ** 2 * 5.0 / 1e-10, rel=1e-14)
    assert gradient_scale(1e-30, 0.25, np.float64, f64) == pytest.approx(e64 ** 2 / 1e-10, rel=1e-14)
    assert gradient_scale(1e-30, -5.0, np.float32, f32) == pytest.approx(e32 ** 2 * 5.0 / 1e-6, rel=1e-14)
    assert gradient_scale(0.0, 1.0, np.float64, Tolerance(rtol=1e-10, atol=0.0)) == pytest.approx(e64 ** 2 / 1e-300, rel=1e-14)
    assert gradient_scale(0.0, 0.0, np.float64, Tolerance(rtol=1e-10, atol=1e300)) == float(np.finfo(np.float64).tiny)


def test_a_saturated_net_whose_gradients_underflow_is_judged_on_the_losss_resolution():
    """σ(−800) ≈ e^−800 underflows: torch's gradients are exactly 0, an exact implementation's are ~1e-300
    (below the loss's resolution, the same answer), but a gradient of the loss's own size is a bug."""
    spec = _spec(2, [(1, "sigmoid", True)], "half_sse")
    params = {"layers.0.weight": np.array([[0.5, -0.25]]), "layers.0.bias": np.array([-800.0])}
    x = np.array([[1.0, 2.0], [0.5, -1.0]])
    y = np.array([[0.25], [0.5]])
    loss, grads, deltas = _backprop(spec, params, x, y)
    assert all(np.all(g == 0) for g in grads.values())
    tiny = {k: np.full_like(v, 1e-300) for k, v in grads.items()}
    result = oracle.check(spec, params, x, y, lambda *a: (loss, tiny))
    assert result.passed and result.classification == "match", result.message()
    big = {**grads, "layers.0.bias": np.array([1e-3])}
    assert oracle.check(spec, params, x, y, lambda *a: (loss, big)).classification == "bug"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_complex_data_with_a_dtype_is_refused_naming_the_array(dtype):
    spec, params, x, y = _tanh_case()
    for field, xx, yy in (("x", x + 1j, y), ("y", x, y + 1j)):
        with pytest.raises(bp.SpecError) as info:
            oracle.check(spec, params, xx, yy, _candidate(), dtype=dtype)
        assert info.value.field == field and "complex" in info.value.problem


ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", {"name": "leaky_relu", "negative_slope": 0.1},
               {"name": "elu", "alpha": 0.7}, "selu", {"name": "softplus", "beta": 2.0, "threshold": 10.0}, "gelu",
               "gelu_tanh", "silu", "mish", "softsign", {"name": "hardtanh", "min_val": -2.0, "max_val": 1.5}]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a if isinstance(a, str) else a["name"])
def test_every_activations_allowance_covers_a_correct_implementation(act, dtype):
    """Per activation, on a net driven into its saturated (and cancelling) ranges: the usual formulas, written
    here in NumPy and run in the candidate's dtype, land within B of torch (float64 truth), element by element
    and without the safety factor; B stays within 3e4 ulps of each tensor's size; and oracle.check agrees."""
    from oracle.rounding import allowance
    from oracle.twin import run_twin

    spec = _spec(3, [(6, act, True), (4, act, True), (2, "identity", True)], "half_sse")
    rng = np.random.default_rng(11)
    dt = np.dtype(dtype)
    p = {k: v.astype(dt) for k, v in bp.init_params(spec, rng, scale=5.0).items()}
    x = (4 * rng.standard_normal((6, 3))).astype(dt)
    y = rng.standard_normal((6, 2)).astype(dt)
    p64, x64, y64 = {k: v.astype(np.float64) for k, v in p.items()}, x.astype(np.float64), y.astype(np.float64)
    ref = run_twin(spec, p64, x64, y64, np.float64)
    bounds = allowance(spec, p64, x64, y64, ref, dt).bounds
    with np.errstate(over="ignore"):
        loss, grads, deltas = _backprop(spec, p, x, y)
    _assert_within_allowance((loss, grads, deltas), ref, bounds, dt, tight=True)
    result = oracle.check(spec, p, x, y, lambda *a: (loss, grads, deltas))
    assert result.passed, result.message()


def test_a_delta_is_judged_on_the_deltas_scale_not_on_weight_gradients_that_large_inputs_inflate():
    """Inputs of size 10⁴ make ∂C/∂θ₀ = δ₀ᵀx 10⁴× every δ. One S taken over both would let atol·S·√n pass a reported
    δ that is off by 10⁻⁷ of itself (10⁹ times float64's rounding of it); S_δ does not. The same relative error in
    a weight gradient is caught either way, and the correct answer passes."""
    spec = _spec(3, [(4, "identity", True), (2, "identity", True)], "half_sse")
    rng = np.random.default_rng(3)
    params = bp.init_params(spec, rng)
    params["layers.0.weight"] *= 1e-4  # z₀ of size 1 from inputs of size 10⁴
    x, y = 1e4 * rng.standard_normal((5, 3)), rng.standard_normal((5, 2))

    def off_delta(spec, params, x, y):
        loss, grads, deltas = _backprop(spec, params, x, y)
        return loss, grads, {**deltas, "layers.1": deltas["layers.1"] * (1 + 1e-7)}

    result = oracle.check(spec, params, x, y, off_delta)
    assert result.scale.param > 1e3 * result.scale.delta  # the premise: weight gradients dwarf δ
    assert not result.passed and _failed(result) == ["layers.1.delta"], result.message()
    assert oracle.check(spec, params, x, y, _candidate()).passed


def test_the_input_gradient_is_judged_on_the_larger_scale():
    """∂C/∂x = δ₀θ₀ is neither a δ nor a parameter gradient: it is judged on S = max(S_δ, S_θ), whichever is
    larger, and δ on S_δ, parameter gradients on S_θ (the golden sets' layout names δ "delta.layers.i")."""
    from oracle.compare import Scales

    for delta, param in ((2.0, 0.5), (0.5, 2.0)):
        s = Scales(delta, param)
        assert s.of("input.grad") == float(s) == 2.0
        assert s.of("layers.3.delta") == s.of("delta.layers.3") == delta
        assert s.of("layers.3.weight") == s.of("grad.layers.3.weight") == param


@pytest.mark.parametrize("name", ["half_sse", "sse", "half_mse", "mse", "huber", "smooth_l1", "bce_with_logits"])
def test_the_loss_gradients_terms_are_its_own_size_where_nothing_cancels(name):
    """The noise runs round ∇ₐC by u times the size of the terms it is formed from (a and y, scaled as the loss
    scales them). Where a and y have opposite signs, |a − y| = |a| + |y|: those sizes must equal |∇ₐC| itself, as
    torch.autograd computes it (huber and smooth_l1 inside their quadratic zone); where they share a sign, the terms
    exceed it by (|a| + |y|)/|a − y|."""
    import torch

    from oracle.noise import _loss_gradient_terms
    from oracle.twin import loss_fn

    spec = _spec(3, [(4, "identity", True)], {"name": name, "beta": 2.0} if name == "smooth_l1" else
                 ({"name": name, "delta": 2.0} if name == "huber" else name))
    rng = np.random.default_rng(5)
    a = 0.4 * np.abs(rng.standard_normal((3, 4)))
    y = -0.4 * np.abs(rng.standard_normal((3, 4)))  # opposite signs, |a − y| < 2 (inside huber's and smooth_l1's zone)
    if name == "bce_with_logits":  # ∇ₐC = (σ(a) − y)/N from the terms σ(a) and y ∈ [0, 1]: y = 0 cancels nothing
        at = torch.tensor(a, requires_grad=True)
        for y_ in (np.zeros_like(a), np.full_like(a, 0.3)):
            (grad,) = torch.autograd.grad(loss_fn(spec.loss)(at, torch.tensor(y_)), at)
            terms = _loss_gradient_terms(spec.loss, torch.tensor(a), torch.tensor(y_), grad.numpy()).numpy()
            s = 1 / (1 + np.exp(-a))
            np.testing.assert_allclose(terms * np.abs(s - y_), np.abs(grad.numpy()) * (s + y_), rtol=1e-12)
        return
    at = torch.tensor(a, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_fn(spec.loss)(at, torch.tensor(y)), at)
    terms = _loss_gradient_terms(spec.loss, torch.tensor(a), torch.tensor(y), grad.numpy()).numpy()
    np.testing.assert_allclose(terms, np.abs(grad.numpy()), rtol=1e-12)
    same = np.abs(y)  # same signs: the terms are the result's size times (|a| + |y|)/|a − y| > 1, not the result's
    (grad2,) = torch.autograd.grad(loss_fn(spec.loss)(at, torch.tensor(same)), at)
    terms2 = _loss_gradient_terms(spec.loss, torch.tensor(a), torch.tensor(same), grad2.numpy()).numpy()
    np.testing.assert_allclose(terms2 * np.abs(a - same), np.abs(grad2.numpy()) * (a + same), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_log_softmax_layers_measured_rounding_is_each_examples_own(dtype):
    """The ensemble rounds log_softmax's δ = up − p·Σup by u times its terms |up| + p·Σ|up|, the sum over the
    example's own row: in a batch, each example's rounding is its own. Giving every *other* example a target 10³×
    larger (so their ∇ₐC dwarfs the first's) must leave the first example's measured noise unchanged, in every δ and
    in ∂C/∂x (the ensemble draws the same noise: its seed comes from x and the spec), and within FACTOR × its own
    analytic worst case, which is computed row by row."""
    from oracle.noise import FACTOR, measured_allowance
    from oracle.rounding import allowance
    from oracle.twin import run_twin

    spec = _spec(5, [(6, "tanh", True), (4, "log_softmax", True)], "half_sse")
    rng = np.random.default_rng(0)
    params = bp.init_params(spec, rng)
    x, y = rng.standard_normal((8, 5)), rng.standard_normal((8, 4))
    far = y.copy()
    far[1:] = 1e3 * np.sign(y[1:])
    per_example = ["layers.1.delta", "layers.0.delta", "input.grad"]
    measured = []
    for yy in (y, far):
        ref = run_twin(spec, params, x, yy, np.float64)
        allow = allowance(spec, params, x, yy, ref, dtype)
        own = measured_allowance(spec, params, x, yy, ref, uncapped(allow), dtype)
        for k in per_example:
            assert np.all(own[k][0] > 0), k
            assert np.all(own[k][0] <= FACTOR * allow.bounds[k][0]), (k, own[k][0] / allow.bounds[k][0])
        measured.append(own)
    assert np.abs(far[1:]).min() > 100 * np.abs(y[0]).max()  # the premise: the other rows' targets dwarf the first's
    for k in per_example:
        np.testing.assert_allclose(measured[1][k][0], measured[0][k][0], rtol=1e-9, err_msg=k)
