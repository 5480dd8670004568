"""The general forward/backward: whole-network finite differences, the seed's closed forms, shapes, dtypes."""

import subprocess
import sys

import numpy as np
import pytest

import manual_bp as bp

from .helpers import central_difference


def _spec(hidden, out_act, loss, out_units=3, bias=True):
    layers = [{"type": "dense", "units": 4, "activation": h, "bias": bias} for h in hidden]
    layers.append({"type": "dense", "units": out_units, "activation": out_act, "bias": bias})
    return bp.Spec.from_dict({"format_version": 1, "input_size": 3, "layers": layers, "loss": loss})


HIDDEN = [n for n, c in bp.ACTIVATIONS.items() if not c.output_only]
NETWORKS = [_spec([h, "tanh"], "identity", "half_sse") for h in HIDDEN] + [
    _spec(["tanh"], "identity", loss) for loss in ("sse", "half_mse", "mse", "l1", "huber", "smooth_l1", "bce_with_logits", "cross_entropy")
] + [
    _spec(["sigmoid"], "sigmoid", "bce"),
    _spec(["relu"], "softmax", "mse"),
    _spec(["elu"], "log_softmax", "nll"),
    _spec(["softsign", "mish"], "tanh", {"name": "huber", "delta": 0.2}, bias=False),
]


@pytest.mark.parametrize("spec", NETWORKS, ids=lambda s: s.describe())
def test_whole_network_gradients_match_finite_differences(spec):
    params, x, y = bp.random_case(spec, 7, batch=5, scale=2.0)
    result = bp.gradients(spec, params, x, y)
    for name in params:
        def loss_at(value, name=name):
            return bp.gradients(spec, {**params, name: value}, x, y).loss
        numeric = central_difference(loss_at, params[name])
        np.testing.assert_allclose(result.grads[name], numeric, rtol=2e-5, atol=1e-8, err_msg=name)
    numeric_x = central_difference(lambda v: bp.gradients(spec, params, v, y).loss, x)
    np.testing.assert_allclose(result.grad_input, numeric_x, rtol=2e-5, atol=1e-8, err_msg="x")


def _sigma(z):
    return 1 / (1 + np.exp(-z))


def test_seed_simple_case_closed_form_equals_general_backward():
    """SEED-NOTES system 1, written in the seed's own column form and indices."""
    spec = bp.example("seed-simple")
    rng = np.random.default_rng(8)
    params = bp.init_params(spec, rng, scale=3.0)
    t1, t2, t3 = (params[f"layers.{i}.weight"] for i in range(3))
    a1 = rng.normal(size=(3, 1))
    y = np.array([[0.7]])
    z2 = t1 @ a1; a2 = _sigma(z2)
    z3 = t2 @ a2; a3 = _sigma(z3)
    z4 = t3 @ a3; y_hat = z4  # f = identity
    s3 = y_hat - y
    s2 = (t3.T @ s3) * _sigma(z3) * (1 - _sigma(z3))
    s1 = (t2.T @ s2) * _sigma(z2) * (1 - _sigma(z2))
    closed = {"layers.2.weight": s3 @ a3.T, "layers.1.weight": s2 @ a2.T, "layers.0.weight": s1 @ a1.T}

    result = bp.gradients(spec, params, a1, y)  # the seed's single column example
    assert result.loss == pytest.approx(0.5 * (y_hat - y).item() ** 2, rel=1e-15)
    for name, expected in closed.items():
        np.testing.assert_allclose(result.grads[name], expected, rtol=1e-13, atol=1e-16, err_msg=name)
    np.testing.assert_allclose(result.deltas["layers.0"], s1[:, 0], rtol=1e-13, atol=1e-16)
    assert result.grad_input.shape == (3, 1)


def test_seed_sse_dJ_dtheta_23_element_by_element():
    """SEED-NOTES system 5: ∂J/∂θ_jk = −2 (y_j − c_j) σ'(z_j) a_k; the seed stops at θ_23."""
    spec = bp.example("seed-sse")
    rng = np.random.default_rng(9)
    params = bp.init_params(spec, rng, scale=2.0)
    x, y = rng.normal(size=3), rng.uniform(size=2)
    a_prev = _sigma(params["layers.0.weight"] @ x)          # a^(L−1), 3 units
    z = params["layers.1.weight"] @ a_prev                   # z^(L), 2 units
    c = _sigma(z)
    closed = np.array([[-2 * (y[j] - c[j]) * _sigma(z[j]) * (1 - _sigma(z[j])) * a_prev[k] for k in range(3)] for j in range(2)])
    grad = bp.gradients(spec, params, x, y).grads["layers.1.weight"]
    np.testing.assert_allclose(grad, closed, rtol=1e-13)
    theta_23 = grad[1, 2]  # the seed's 1-based θ_23
    assert theta_23 == pytest.approx(-2 * (y[1] - c[1]) * c[1] * (1 - c[1]) * a_prev[2], rel=1e-13)


def test_seed_nielsen_output_delta():
    """SEED-NOTES system 4: δ^L = (a^L − y) ⊙ σ'(z^L)."""
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 10, batch=3)
    cache = bp.forward(spec, params, x)
    result = bp.backward(cache, y)
    aL = cache.output
    np.testing.assert_allclose(result.deltas["layers.2"], (aL - y) * aL * (1 - aL), rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    spec = _spec(["gelu", "softplus"], "identity", "cross_entropy")
    params, x, y = bp.random_case(spec, 11, batch=3, dtype=dtype)
    r = bp.gradients(spec, params, x, y)
    assert r.loss.dtype == dtype and r.grad_input.dtype == dtype
    assert all(g.dtype == dtype for g in r.grads.values()) and all(d.dtype == dtype for d in r.deltas.values())


def test_column_row_and_vector_forms_agree():
    spec = bp.example("seed-nielsen")
    rng = np.random.default_rng(12)
    params = bp.init_params(spec, rng)
    x, y = rng.normal(size=4), rng.uniform(size=2)
    as_vector = bp.gradients(spec, params, x, y)
    as_column = bp.gradients(spec, params, x[:, None], y[:, None])
    as_row = bp.gradients(spec, params, x[None, :], y[None, :])
    for name in params:
        assert np.array_equal(as_vector.grads[name], as_row.grads[name])
        assert np.array_equal(as_column.grads[name], as_row.grads[name])
    assert as_column.grad_input.shape == (4, 1) and as_vector.grad_input.shape == (4,)


def test_backward_is_pure():
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 13, batch=3)
    cache = bp.forward(spec, params, x)
    first, second = bp.backward(cache, y), bp.backward(cache, y)
    assert all(np.array_equal(first.grads[k], second.grads[k]) for k in params)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda p, x, y: ({**p, "layers.0.weight": p["layers.0.weight"].T}, x, y), "params['layers.0.weight']"),
        (lambda p, x, y: ({k: v for k, v in p.items() if k != "layers.1.bias"}, x, y), "params['layers.1.bias']"),
        (lambda p, x, y: ({**p, "layers.0.bias": np.full(5, np.nan)}, x, y), "params['layers.0.bias']"),
        (lambda p, x, y: (p, x[:, :2], y), "x"),
        (lambda p, x, y: (p, np.where(x > 0, np.inf, x), y), "x"),
        (lambda p, x, y: (p, x, y[:, :1]), "y"),
        (lambda p, x, y: (p, x.astype(np.float32), y), "x"),
    ],
)
def test_bad_arrays_name_the_field(change, field):
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 14, batch=3)
    with pytest.raises(bp.SpecError) as info:
        bp.gradients(spec, *change(params, x, y))
    assert info.value.field == field


def test_importing_manual_bp_does_not_import_torch():
    code = "import sys, manual_bp, manual_bp.regression; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float64_targets_do_not_promote_a_float32_network():
    """Found by mutation testing: y must be cast to the network's dtype, or float32 silently becomes float64."""
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 15, batch=3, dtype="float32")
    r = bp.gradients(spec, params, x, y.astype(np.float64))
    assert r.loss.dtype == np.float32 and all(g.dtype == np.float32 for g in r.grads.values())
    assert all(d.dtype == np.float32 for d in r.deltas.values())
