"""The seed's regression systems: its worked numbers asserted exactly, gradients by finite differences."""

import numpy as np

from manual_bp import regression as reg

from .helpers import central_difference


def test_linear_cost_at_theta_0_1_on_four_points_each_off_by_one_is_one_half():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = x + np.array([1.0, -1.0, 1.0, -1.0])  # each point off by exactly 1
    assert reg.linear_cost((0, 1), x, y) == 0.5


def test_linear_hypothesis_worked_value():
    assert reg.linear_hypothesis((-1, 2), 6.0)[0] == 11.0


def test_linear_gradient_is_the_vectorised_residual_form():
    rng = np.random.default_rng(5)
    x, y, theta = rng.normal(size=7), rng.normal(size=7), np.array([0.3, -1.2])
    numeric = central_difference(lambda t: reg.linear_cost(t, x, y), theta)
    np.testing.assert_allclose(reg.linear_gradient(theta, x, y), numeric, rtol=1e-7)


def test_logistic_decision_boundary_is_x1_at_most_5_whatever_x2():
    theta = (5, -1, 0)
    b = reg.decision_boundary(theta)
    assert b.text == "x1 ≤ 5"
    grid = np.array([[x1, x2] for x1 in (-3.0, 4.9, 5.0, 5.1, 9.0) for x2 in (-100.0, 0.0, 100.0)])
    expected = (grid[:, 0] <= 5).astype(int)
    assert np.array_equal(reg.predict(theta, grid), expected)
    assert np.array_equal(b.contains(grid), expected.astype(bool))


def test_logistic_hypothesis_is_the_seeds_closed_form():
    x = np.array([[0.0, 3.0], [5.0, -2.0], [7.5, 1.0]])
    h = reg.logistic_hypothesis((5, -1, 0), x)
    np.testing.assert_allclose(h, 1 / (1 + np.exp(x[:, 0] - 5)), rtol=1e-15)
    assert h[1] == 0.5


def test_logistic_gradient_matches_finite_difference():
    rng = np.random.default_rng(6)
    x, y, theta = rng.normal(size=(9, 2)), rng.integers(0, 2, 9).astype(float), np.array([0.5, -1.0, 2.0])
    numeric = central_difference(lambda t: reg.logistic_cost(t, x, y), theta)
    np.testing.assert_allclose(reg.logistic_gradient(theta, x, y), numeric, rtol=1e-7)
