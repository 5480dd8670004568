"""Regression: six float32 cells where a real bug passed because an allowance was larger than any correct
program's rounding (issue 9), and the correct programs those allowances must still pass.

* ``batch_norm_bessel_in_backward_only``, near_kinks: S was taken over ∂C/∂x too, which a batch norm on a nearly
  constant batch multiplies by 1/σ (S = 3.75e5 where the largest gradient or δ is 1.2e3), so atol·S·√n swamped δ.
* ``bias_missing_in_forward``, near_zero: the mutant changes only the loss, by 1.2–7·10⁻⁵·|C| (a correct float32 C
  errs by < 2·10⁻⁷·|C|); the loss allowance counted 8 ulps per term times N terms, and was added to the strict bound.
* ``softplus_beta_dropped``, saturated, elu output: elu's M_g′ counted |a| at z > 0, where g′ ≡ 1 exactly.
* ``gelu_tanh_derivative_for_exact`` and ``E5_output_derivative_dropped``, saturated: δ was judged on an S set by
  weight gradients that large inputs inflate (now S_δ for δ, S_θ for parameter gradients).
* ``bias_missing_in_forward``, saturated bce: the noise runs un-clamped torch's log(1 − a) ≥ −100 at a = 1.

Each case is rebuilt by ``oracle.rates.replay``. The allowances' soundness is checked against closed forms: a
float32 loop summing a loss term by term (one rounding bias all the way) and a float32 loop log-sum-exp must pass.
"""

import math

import numpy as np
import pytest

import manual_bp as bp
import oracle
from manual_bp.activations import make_activation
from oracle.compare import TOLERANCES, compare_loss
from oracle.mutants import CATALOGUE
from oracle.rates import replay
from oracle.rounding import UNIT_ROUNDOFF, _scales, derivatives

from .impls.second_correct import grads as second_correct

BESSEL = {'mutant': 'batch_norm_bessel_in_backward_only', 'spec': {'format_version': 2, 'name': '', 'description': '', 'input': {'shape': [27]}, 'layers': [{'type': 'batch_norm', 'eps': 1e-05, 'momentum': 0.1, 'affine': False, 'training': True, 'activation': 'gelu'}, {'type': 'batch_norm', 'eps': 1e-05, 'momentum': 0.1, 'affine': False, 'training': True, 'activation': {'name': 'softplus', 'beta': 1.0, 'threshold': 20.0}}, {'type': 'batch_norm', 'eps': 1e-05, 'momentum': 0.1, 'affine': False, 'training': True, 'activation': {'name': 'softplus', 'beta': 1.0, 'threshold': 20.0}}, {'type': 'dense', 'units': 5, 'activation': 'log_softmax', 'bias': False}], 'loss': 'nll'}, 'regime': 'near_kinks', 'dtype': 'float32', 'batch': 3, 'data_seed': 702675955}  # noqa: E501
BIAS = {'mutant': 'bias_missing_in_forward', 'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 1, 'layers': [{'type': 'dense', 'units': 1, 'activation': 'identity', 'bias': True}], 'loss': 'half_sse'}, 'regime': 'near_zero', 'dtype': 'float32', 'batch': 4, 'data_seed': 2781823295}  # noqa: E501
ELU = {'mutant': 'softplus_beta_dropped', 'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 24, 'layers': [{'type': 'dense', 'units': 18, 'activation': {'name': 'softplus', 'beta': 1.0, 'threshold': 5.0}, 'bias': False}, {'type': 'dense', 'units': 4, 'activation': {'name': 'softplus', 'beta': 1.0, 'threshold': 5.0}, 'bias': False}, {'type': 'dense', 'units': 4, 'activation': {'name': 'softplus', 'beta': 1.0, 'threshold': 5.0}, 'bias': False}, {'type': 'dense', 'units': 10, 'activation': {'name': 'elu', 'alpha': 0.5}, 'bias': True}], 'loss': 'l1'}, 'regime': 'saturated', 'dtype': 'float32', 'batch': 5, 'data_seed': 1268517777}  # noqa: E501
# the δ judged on an S set by the first layer's weight gradient, which saturated inputs (|x| up to 100) make 100× every
# δ: atol·S·√n let the exact GELU's δ₀ move by three times its own bound (compare.Scales)
GELU = {'mutant': 'gelu_tanh_derivative_for_exact', 'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 26, 'layers': [{'type': 'dense', 'units': 19, 'activation': 'gelu', 'bias': True}, {'type': 'dense', 'units': 6, 'activation': 'gelu_tanh', 'bias': True}], 'loss': {'name': 'smooth_l1', 'beta': 0.5}}, 'regime': 'saturated', 'dtype': 'float32', 'batch': 4, 'data_seed': 4259698135}  # noqa: E501
E5 = {'mutant': 'E5_output_derivative_dropped', 'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 26, 'layers': [{'type': 'dense', 'units': 31, 'activation': 'identity', 'bias': True}, {'type': 'dense', 'units': 7, 'activation': 'gelu', 'bias': True}, {'type': 'dense', 'units': 26, 'activation': 'selu', 'bias': True}, {'type': 'dense', 'units': 26, 'activation': 'gelu', 'bias': True}, {'type': 'dense', 'units': 10, 'activation': 'selu', 'bias': False}, {'type': 'dense', 'units': 7, 'activation': {'name': 'elu', 'alpha': 1.0}, 'bias': False}], 'loss': 'mse'}, 'regime': 'saturated', 'dtype': 'float32', 'batch': 3, 'data_seed': 2532006323}  # noqa: E501
# two outputs at z = 253 and 210 (a = 1 exactly, torch's log clamp active): the ensemble moved a to 1 − 1e-7, which
# turned the element loss 100·(1 − y) into 16·(1 − y) and let a loss moved by 1.1% pass; the clamp is now held
CLAMP = {'mutant': 'bias_missing_in_forward', 'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 15, 'layers': [{'type': 'dense', 'units': 18, 'activation': {'name': 'softplus', 'beta': 1.0, 'threshold': 20.0}, 'bias': True}, {'type': 'dense', 'units': 18, 'activation': 'relu', 'bias': True}, {'type': 'dense', 'units': 1, 'activation': 'sigmoid', 'bias': True}], 'loss': 'bce'}, 'regime': 'saturated', 'dtype': 'float32', 'batch': 3, 'data_seed': 2915087847}  # noqa: E501
CASES = [BESSEL, BIAS, ELU, GELU, E5, CLAMP]
# a correct float32 loss underflows to 0 where torch's float64 C is 4.6e-57 (a control of a detection run, seed 3)
TINY_LOSS = {'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 13, 'layers': [{'type': 'dense', 'units': 5, 'activation': {'name': 'softplus', 'beta': 0.5, 'threshold': 5.0}, 'bias': True}, {'type': 'dense', 'units': 26, 'activation': {'name': 'softplus', 'beta': 0.5, 'threshold': 5.0}, 'bias': True}, {'type': 'dense', 'units': 29, 'activation': {'name': 'softplus', 'beta': 0.5, 'threshold': 20.0}, 'bias': True}, {'type': 'dense', 'units': 18, 'activation': {'name': 'softplus', 'beta': 0.5, 'threshold': 20.0}, 'bias': True}, {'type': 'dense', 'units': 13, 'activation': {'name': 'softplus', 'beta': 0.5, 'threshold': 5.0}, 'bias': True}, {'type': 'dense', 'units': 1, 'activation': 'sigmoid', 'bias': False}], 'loss': {'name': 'smooth_l1', 'beta': 1.0}}, 'regime': 'near_kinks', 'dtype': 'float32', 'batch': 1, 'data_seed': 2664168464}  # noqa: E501
U32 = UNIT_ROUNDOFF[np.dtype(np.float32)]


def _id(info):
    return f"{info['mutant']}-{info['regime']}"


@pytest.mark.parametrize("info", CASES, ids=_id)
def test_the_mutant_is_caught(info):
    mutant = next(m for m in CATALOGUE if m.name == info["mutant"])
    spec, params, x, y = replay(info)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert not result.passed, result.message()
    assert result.classification == ("forward" if info["mutant"] == "bias_missing_in_forward" else "bug")


@pytest.mark.parametrize("grads_fn", [None, second_correct], ids=["manual_bp", "second_correct"])
@pytest.mark.parametrize("info", CASES, ids=_id)
def test_correct_implementations_pass_the_same_cases(info, grads_fn):
    spec, params, x, y = replay(info)
    result = oracle.check(spec, params, x, y, grads_fn)
    assert result.passed, result.message()


@pytest.mark.parametrize("grads_fn", [None, second_correct], ids=["manual_bp", "second_correct"])
def test_a_loss_below_float32s_range_passes(grads_fn):
    spec, params, x, y = replay(TINY_LOSS)
    r = bp.gradients(spec, {k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64),
                     y.astype(np.float64))
    assert 0 < r.loss < float(np.finfo(np.float32).smallest_subnormal) / 2  # 0 in float32, however computed
    result = oracle.check(spec, params, x, y, grads_fn)
    assert result.passed, result.message()


def test_s_is_the_largest_parameter_gradient_or_delta_not_the_input_gradient():
    spec, params, x, y = replay(BESSEL)
    r = bp.gradients(spec, {k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64), y)
    largest = max(float(np.max(np.abs(t))) for t in [*r.grads.values(), *r.deltas.values()])
    assert float(np.max(np.abs(r.grad_input))) > 100 * largest  # the batch norm's 1/σ: what S must not follow
    assert oracle.check(spec, params, x, y).scale == pytest.approx(largest, rel=1e-6)


def test_the_loss_passes_within_the_larger_of_strict_and_rounding_never_their_sum():
    tol = TOLERANCES["float32"]  # strict: (1e-5 + 1e-6)·|C| = 1.1e-5 at C = 1; f·B = 2e-5 at B = 1e-5
    assert compare_loss(1 + 1.0e-5, 1.0, tol, np.array(1e-5)).verdict == "match"
    assert compare_loss(1 + 1.9e-5, 1.0, tol, np.array(1e-5)).verdict == "rounding"
    assert compare_loss(1 + 2.5e-5, 1.0, tol, np.array(1e-5)).verdict == "mismatch"  # < 1.1e-5 + 2e-5
    assert compare_loss(1 + 1.0e-5, 1.0, tol, np.array(1e-9)).passed  # a tiny B never tightens the strict bound
    assert not compare_loss(1 + 1.2e-5, 1.0, tol, np.array(1e-9)).passed


@pytest.mark.parametrize("name,limit", [("elu", 1.0), ("selu", 1.0507009873554805)])
def test_elu_slope_rounding_at_positive_z_is_the_constant_slope_not_a(name, limit):
    act = make_activation(name, **({"alpha": 0.5} if name == "elu" else {}))
    z = np.array([3.0, 7.4e3, -1.0])
    a = act.value(z)
    _, mgp = _scales(act, z, a, derivatives(act, z)[0], (U32, UNIT_ROUNDOFF[np.dtype(np.float64)]))
    assert mgp[:2] == pytest.approx([limit, limit], rel=1e-12)  # g′ ≡ 1 (selu: λ), however large a is
    assert mgp[2] >= abs(a[2])                                  # z ≤ 0: g′ = a + α from a rounded a


def _loop_sum(terms):
    """Σ terms in float32, one at a time (what a hand-written loop does)."""
    total = np.float32(0)
    for t in np.asarray(terms, dtype=np.float32).ravel():
        total = np.float32(total + t)
    return total


def test_a_float32_loop_summing_many_equal_loss_terms_passes():
    # 65,536 equal squares: every partial sum rounds the same way, so the error grows like N·u, not √N·u
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 1, "loss": "half_sse",
                              "layers": [{"type": "dense", "units": 1, "activation": "identity", "bias": True}]})
    m, v = 65536, np.float32(0.4714286)
    params = {"layers.0.weight": np.ones((1, 1), np.float32), "layers.0.bias": np.zeros(1, np.float32)}
    x, y = np.full((m, 1), v, np.float32), np.zeros((m, 1), np.float32)

    def looped(spec, params, x, y):
        a = x @ params["layers.0.weight"].T + params["layers.0.bias"]
        return _loop_sum(np.float32(0.5) * (a - y) ** 2), bp.gradients(spec, params, x, y).grads

    exact = 0.5 * float(v) ** 2 * m
    error = abs(float(looped(spec, params, x, y)[0]) - exact)
    assert error > 10 * math.sqrt(m + 2) * 2 * U32 * exact  # beyond any random-sign (√N) allowance
    result = oracle.check(spec, params, x, y, looped)
    assert result.passed, result.message()


def test_a_float32_loop_log_sum_exp_over_many_classes_passes():
    # cross-entropy ≈ 0 (one class dominates): the 4000 terms e^{a − max} ≈ 0.75u each round 1 + Σ by one bias,
    # so log Σ errs by about k·u, all of C, however few ulps the logits are
    k = 4000
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 1, "loss": "cross_entropy",
                              "layers": [{"type": "dense", "units": k, "activation": "identity", "bias": False}]})
    w = np.full((k, 1), np.log(0.75 * U32), np.float32)
    w[0, 0] = 0.0
    params, x, y = {"layers.0.weight": w}, np.ones((1, 1), np.float32), np.array([0])

    def looped(spec, params, x, y):
        a = (x @ params["layers.0.weight"].T)[0]
        lse = np.float32(np.log(_loop_sum(np.exp(a - a.max())))) + a.max()
        return np.float32(lse - a[y[0]]), bp.gradients(spec, params, x, y).grads

    logits = w[:, 0].astype(np.float64)
    exact = float(np.logaddexp.reduce(logits) - logits[0])
    assert abs(float(looped(spec, params, x, y)[0]) - exact) > 0.5 * exact
    result = oracle.check(spec, params, x, y, looped)
    assert result.passed, result.message()
