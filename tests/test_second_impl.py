"""The second correct implementation (tests/impls/second_correct.py) is correct on its own terms:
it agrees with torch.autograd through the oracle, with central differences, and its bce output δ is
the exact one (not torch's guarded one)."""

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp import ACTIVATIONS, LOSSES
from oracle.strategies import ELEMENTWISE, cases

from .helpers import central_difference
from .impls.second_correct import grads


@settings(max_examples=300)
@given(cases(regimes=("well_conditioned",)))
def test_second_impl_agrees_with_torch_on_well_conditioned_cases(case):
    result = oracle.check(case.spec, case.params, case.x, case.y, grads)
    assert result.passed and result.classification in ("match", "rounding"), result.message()


def _spec(hidden: str, output: str, loss, units=3):
    loss_spec = loss if isinstance(loss, dict) else {"name": loss}
    return bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": loss_spec, "layers": [
        {"type": "dense", "units": 4, "activation": hidden, "bias": True},
        {"type": "dense", "units": units, "activation": output, "bias": True}]})


# every hidden activation (with its parameters away from the defaults) and every loss, once each
HIDDEN = [{"name": "leaky_relu", "negative_slope": 0.2}, {"name": "elu", "alpha": 1.5},
          {"name": "softplus", "beta": 2.0, "threshold": 5.0}, {"name": "hardtanh", "min_val": -0.5, "max_val": 2.0}]
HIDDEN += [n for n in ELEMENTWISE if n not in ("leaky_relu", "elu", "softplus", "hardtanh")]
LOSS_OUTPUTS = [("half_sse", "identity"), ("sse", "tanh"), ("half_mse", "softmax"), ("mse", "sigmoid"),
                ("l1", "identity"), ({"name": "huber", "delta": 0.5}, "identity"),
                ({"name": "smooth_l1", "beta": 2.0}, "softsign"), ("bce", "sigmoid"), ("bce", "softmax"),
                ("bce_with_logits", "gelu"), ("cross_entropy", "identity"), ("nll", "log_softmax")]


def test_the_lists_cover_every_activation_and_loss():
    names = {a["name"] if isinstance(a, dict) else a for a in HIDDEN} | {o for _, o in LOSS_OUTPUTS}
    assert names == set(ACTIVATIONS)
    assert {(l["name"] if isinstance(l, dict) else l) for l, _ in LOSS_OUTPUTS} == set(LOSSES)


@pytest.mark.parametrize("hidden,output_loss", [(HIDDEN[i % len(HIDDEN)], LOSS_OUTPUTS[i % len(LOSS_OUTPUTS)])
                                                for i in range(max(len(HIDDEN), len(LOSS_OUTPUTS)))],
                         ids=lambda v: str(v)[:30])
def test_second_impl_agrees_with_central_differences(hidden, output_loss):
    loss, output = output_loss
    spec = _spec(hidden, output, loss)
    params, x, y = bp.random_case(spec, 7, batch=4)
    x = x * 0.7 + 0.05  # keep clear of kinks (z = 0, hardtanh's ends, l1's zero residual)
    _, g, _ = grads(spec, params, x, y)
    for name, value in params.items():
        def loss_at(v, name=name):
            return float(grads(spec, {**params, name: v}, x, y)[0])
        numeric = central_difference(loss_at, value)
        np.testing.assert_allclose(g[name], numeric, rtol=1e-5, atol=1e-7, err_msg=f"{spec.describe()}: {name}")


def test_sigmoid_bce_delta_is_exact_where_torch_guards():
    spec = _spec("tanh", "sigmoid", "bce", units=2)
    z = np.array([[40.0, -40.0], [3.0, -50.0]])
    params = {"layers.0.weight": np.zeros((4, 3)), "layers.0.bias": np.zeros(4),
              "layers.1.weight": np.zeros((2, 4)), "layers.1.bias": np.zeros(2)}
    y = np.array([[0.3, 0.9], [1.0, 0.0]])
    # one example per row of z: the output layer's bias carries z
    for row in range(2):
        p = {**params, "layers.1.bias": z[row].copy()}
        _, _, deltas = grads(spec, p, np.zeros((1, 3)), y[row:row + 1])
        with mpmath.workdps(50):
            exact = [float((1 / (1 + mpmath.exp(-mpmath.mpf(zj))) - yj) / 2) for zj, yj in zip(z[row], y[row])]
        np.testing.assert_allclose(deltas["layers.1"][0], exact, rtol=1e-14)


def test_softmax_bce_delta_is_the_exact_closed_form_even_when_saturated():
    spec = _spec("tanh", "softmax", "bce", units=3)
    # the last: p = (1, 0, 0) in floating point, every other exp(z − max z) underflows, yet δ is O(1)
    zs = [np.array([30.0, -5.0, 1.0]), np.array([0.3, -0.2, 0.1]), np.array([12.0, 11.0, -40.0]),
          np.array([800.0, -300.0, -250.0])]
    ys = [np.array([0.2, 0.5, 0.9]), np.array([1.0, 0.0, 0.5]), np.array([0.9, 0.1, 0.0]), np.array([0.5, 0.2, 0.7])]
    base = {"layers.0.weight": np.zeros((4, 3)), "layers.0.bias": np.zeros(4), "layers.1.weight": np.zeros((3, 4))}
    for z, y in zip(zs, ys):
        _, _, deltas = grads(spec, {**base, "layers.1.bias": z.copy()}, np.zeros((1, 3)), y[None])
        with mpmath.workdps(600):
            e = [mpmath.exp(mpmath.mpf(v)) for v in z]
            p = [v / sum(e) for v in e]
            g = [(p[k] - y[k]) / (p[k] * (1 - p[k])) / 3 for k in range(3)]  # ∂C/∂p of the unclamped bce
            inner = sum(p[k] * g[k] for k in range(3))
            exact = [float(p[j] * (g[j] - inner)) for j in range(3)]
        np.testing.assert_allclose(deltas["layers.1"][0], exact, rtol=1e-12, atol=1e-300)


def test_second_impl_keeps_the_dtype_and_torch_kink_conventions():
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 2, "loss": "l1", "layers": [
        {"type": "dense", "units": 3, "activation": "relu", "bias": False},
        {"type": "dense", "units": 1, "activation": {"name": "hardtanh", "min_val": -1.0, "max_val": 1.0}, "bias": False}]})
    params = {"layers.0.weight": np.array([[1.0, -1.0], [1.0, 1.0], [0.5, 0.0]], dtype=np.float32),
              "layers.1.weight": np.array([[1.0, 0.5, 0.0]], dtype=np.float32)}
    x = np.array([[1.0, 1.0], [0.5, 0.5]], dtype=np.float32)  # z_0[:, 0] = 0 exactly; z_1 = 1 (hardtanh's end), 0.5
    y = np.array([[1.0], [1.0]], dtype=np.float32)           # residual 0 exactly on row 0, −0.5 on row 1
    loss, g, d = grads(spec, params, x, y)
    assert all(v.dtype == np.float32 for v in list(g.values()) + list(d.values()))
    mine = bp.gradients(spec, params, x, y)
    np.testing.assert_array_equal(d["layers.0"], [[0, 0, 0], [0, -0.25, 0]])  # relu'(0) = 0, hardtanh'(1) = 0, sign(0) = 0
    for k in g:
        np.testing.assert_array_equal(g[k], mine.grads[k])
    result = oracle.check(spec, params, x, y, grads)
    assert result.passed and result.classification == "match", result.message()
