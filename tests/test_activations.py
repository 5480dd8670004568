"""Every activation's hand-written derivative against a central finite difference (float64, no torch)."""

import numpy as np
import pytest

from manual_bp import ACTIVATIONS, make_activation

ELEMENTWISE = [
    make_activation(n) for n, cls in ACTIVATIONS.items() if not cls.output_only
] + [
    make_activation("leaky_relu", negative_slope=0.2),
    make_activation("elu", alpha=0.7),
    make_activation("softplus", beta=2.0, threshold=10.0),
    make_activation("hardtanh", min_val=-0.5, max_val=2.0),
]


def _points(act, rng):
    """Well-conditioned, saturated (|z| up to 50) and near-kink points, none exactly on a kink."""
    z = np.concatenate([rng.normal(0, 2, 200), rng.uniform(-50, 50, 200), rng.normal(0, 1e-3, 50)])
    for k in (0.0, act.params.get("min_val", 0.0), act.params.get("max_val", 0.0)):
        z = np.concatenate([z, k + rng.choice([-1, 1], 20) * rng.uniform(1e-4, 1e-2, 20)])
    if "threshold" in act.params:  # softplus switches to the identity at beta*z = threshold
        t = act.params["threshold"] / act.params["beta"]
        z = np.concatenate([z, t + rng.choice([-1, 1], 20) * rng.uniform(1e-3, 1e-1, 20)])
    return z


@pytest.mark.parametrize("act", ELEMENTWISE, ids=repr)
def test_derivative_matches_finite_difference(act):
    rng = np.random.default_rng(1)
    z = _points(act, rng)
    h = 1e-6
    numeric = (act.value(z + h) - act.value(z - h)) / (2 * h)
    analytic = act.derivative(z, act.value(z))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_output_activation_vjp_matches_finite_difference(name):
    act = make_activation(name)
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, (4, 5))
    g = rng.normal(size=(4, 5))  # a random upstream direction: a sum would hide errors
    delta = act.vjp(z, act.value(z), g)
    h = 1e-6
    numeric = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        numeric[idx] = (np.sum(g * act.value(zp)) - np.sum(g * act.value(zm))) / (2 * h)
    np.testing.assert_allclose(delta, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_inputs_give_no_overflow_and_no_nan(name, dtype):
    """|z| = 1000 (and 1e4): warnings are errors in this suite, so any overflow fails here."""
    act = make_activation(name)
    z = np.array([[-1e4, -1000.0, -30.0, 0.0, 30.0, 1000.0, 1e4]], dtype=dtype)
    a = act.value(z)
    d = act.vjp(z, a, np.ones_like(z))
    assert a.dtype == dtype and d.dtype == dtype
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(d))


def test_kink_conventions_are_torchs():
    """The values PyTorch documents/implements at non-differentiable points."""
    zero = np.zeros(1)
    d = lambda name, **p: make_activation(name, **p).derivative(zero, make_activation(name, **p).value(zero))[0]
    assert d("relu") == 0.0
    assert d("leaky_relu", negative_slope=0.3) == 0.3
    assert d("elu", alpha=0.7) == 0.7
    ht = make_activation("hardtanh")
    ends = np.array([-1.0, 1.0])
    assert np.all(ht.derivative(ends, ht.value(ends)) == 0.0)
    assert np.all(ht.kinks(ends)) and make_activation("relu").kinks(zero)[0]


def test_sigmoid_derivative_is_not_applied_twice():
    """Seed mistake E1: σ'(z)(1 − σ(z)) is wrong; σ'(0) must be exactly 1/4."""
    s = make_activation("sigmoid")
    assert s.derivative(np.zeros(1), s.value(np.zeros(1)))[0] == 0.25
