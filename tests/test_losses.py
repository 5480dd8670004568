"""Every loss's hand-written gradient against a central finite difference, and its exact reduction."""

import numpy as np
import pytest

from manual_bp import LOSSES, make_loss

from .helpers import central_difference

VALUE_LOSSES = [make_loss(n) for n, cls in LOSSES.items() if cls.targets == "values"] + [
    make_loss("huber", delta=0.3),
    make_loss("smooth_l1", beta=0.4),
]


def _targets(loss, rng, shape):
    if loss.name in ("bce", "bce_with_logits"):
        return rng.uniform(0, 1, shape)
    return rng.normal(size=shape)


def _outputs(loss, rng, shape):
    if loss.name == "bce":
        return rng.uniform(0.02, 0.98, shape)
    return rng.normal(0, 2, shape)


@pytest.mark.parametrize("loss", VALUE_LOSSES, ids=repr)
def test_value_loss_gradient_matches_finite_difference(loss):
    rng = np.random.default_rng(3)
    a, y = _outputs(loss, rng, (5, 3)), _targets(loss, rng, (5, 3))
    numeric = central_difference(lambda t: loss.value(t, y), a)
    np.testing.assert_allclose(loss.grad(a, y), numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
def test_class_loss_gradient_matches_finite_difference(name):
    loss = make_loss(name)
    rng = np.random.default_rng(4)
    a = rng.normal(0, 3, (6, 4))
    if name == "nll":
        a = a - np.log(np.sum(np.exp(a), axis=1, keepdims=True))
    y = rng.integers(0, 4, 6)
    numeric = central_difference(lambda t: loss.value(t, y), a)
    np.testing.assert_allclose(loss.grad(a, y), numeric, rtol=1e-6, atol=1e-9)


def test_reductions_are_exactly_as_documented():
    a = np.array([[1.0, 2.0], [3.0, 5.0]])
    y = np.array([[0.0, 0.0], [1.0, 1.0]])
    sq = 1 + 4 + 4 + 16  # Σ Σ (ỹ − y)²
    assert make_loss("half_sse").value(a, y) == sq / 2
    assert make_loss("sse").value(a, y) == sq
    assert make_loss("half_mse").value(a, y) == sq / (2 * 2)  # m = 2 examples
    assert make_loss("mse").value(a, y) == sq / 4  # N = 4 elements
    assert make_loss("l1").value(a, y) == (1 + 2 + 2 + 4) / 4


def test_large_logits_are_stable():
    big = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]])
    for name, y in [("cross_entropy", np.array([0, 0])), ("bce_with_logits", np.array([[1.0, 0.0], [1.0, 0.0]]))]:
        loss = make_loss(name)
        v, g = loss.value(big, y), loss.grad(big, y)
        assert np.isfinite(v) and np.all(np.isfinite(g))
    assert make_loss("cross_entropy").value(big, np.array([0, 0])) == 1000.0  # (0 + 2000) / 2
    bce = make_loss("bce")
    p = np.array([[0.0, 1.0]])
    assert bce.value(p, np.array([[1.0, 0.0]])) == 100.0  # both logs clamped at −100, as torch
