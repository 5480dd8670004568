r"""The seed's regression systems, as first-class functions.

Inputs x are (m,) for one feature or (m, n) for n features; θ = (θ0, θ1, ..., θn) with θ0 the
intercept, so :math:`h_θ(x) = θ^T [1, x]`. The design matrix X prepends the column of ones and the
seed's residual vector is :math:`Xθ - y`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .activations import stable_sigmoid, stable_softplus


def design_matrix(x: np.ndarray) -> np.ndarray:
    """X = [1, x]: shape (m, n + 1)."""
    x = np.asarray(x, dtype=float)
    x = x[:, None] if x.ndim == 1 else x
    return np.hstack([np.ones((x.shape[0], 1), dtype=x.dtype), x])


def _theta(theta) -> np.ndarray:
    return np.asarray(theta, dtype=float)


# -- linear regression ----------------------------------------------------------------------------
def linear_hypothesis(theta, x) -> np.ndarray:
    r""":math:`h_θ(x) = θ_0 + θ_1 x_1 + \dots`; e.g. θ = (−1, 2) gives h(6) = 11."""
    return design_matrix(np.atleast_1d(x)) @ _theta(theta)


def linear_cost(theta, x, y) -> float:
    r""":math:`J(θ) = \frac{1}{2m} \sum_i (h_θ(x_i) - y_i)^2`; e.g. J(0, 1) = 1/2 on four points each off by 1."""
    r = linear_hypothesis(theta, x) - np.asarray(y, dtype=float)
    return float(r @ r / (2 * r.shape[0]))


def linear_gradient(theta, x, y) -> np.ndarray:
    r""":math:`∂J/∂θ = \frac1m X^T (Xθ - y)`, vectorised over the residual vector."""
    X = design_matrix(x)
    return X.T @ (X @ _theta(theta) - np.asarray(y, dtype=float)) / X.shape[0]


# -- logistic regression --------------------------------------------------------------------------
def logistic_hypothesis(theta, x) -> np.ndarray:
    r""":math:`h_θ(x) = σ(θ^T x) = 1/(1 + e^{-θ^T x})`; for θ = (5, −1, 0), :math:`1/(1 + e^{x_1 - 5})`."""
    return stable_sigmoid(design_matrix(np.atleast_1d(x) if np.ndim(x) == 1 else x) @ _theta(theta))


def logistic_cost(theta, x, y) -> float:
    r""":math:`J(θ) = -\frac1m \sum_i y_i \log h_i + (1 - y_i)\log(1 - h_i)`,
    computed from z = θ^T x as :math:`\frac1m\sum \mathrm{softplus}(z) - y z` (no log of 0)."""
    z = design_matrix(x) @ _theta(theta)
    y = np.asarray(y, dtype=float)
    return float(np.mean(stable_softplus(z) - y * z))


def logistic_gradient(theta, x, y) -> np.ndarray:
    r""":math:`∂J/∂θ = \frac1m X^T (σ(Xθ) - y)`."""
    X = design_matrix(x)
    return X.T @ (stable_sigmoid(X @ _theta(theta)) - np.asarray(y, dtype=float)) / X.shape[0]


def predict(theta, x) -> np.ndarray:
    r"""1 where :math:`θ^T x ≥ 0` (h ≥ ½), else 0."""
    return (design_matrix(x) @ _theta(theta) >= 0).astype(int)


class Boundary(NamedTuple):
    """Where ``predict`` says 1: ``coef · x + intercept ≥ 0``, and in words when one feature decides."""

    intercept: float
    coef: tuple
    text: str

    def contains(self, x) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=float))
        return x @ np.asarray(self.coef) + self.intercept >= 0


def decision_boundary(theta) -> Boundary:
    r"""The region :math:`θ_0 + \sum_k θ_k x_k ≥ 0`. With one non-zero θ_k it is a threshold on x_k:
    θ = (5, −1, 0) gives :math:`5 - x_1 ≥ 0 ⇔ x_1 ≤ 5`, whatever x_2 is."""
    t = _theta(theta)
    intercept, coef = float(t[0]), tuple(float(c) for c in t[1:])
    live = [k for k, c in enumerate(coef) if c != 0]
    if len(live) == 1:
        k = live[0]
        threshold = -intercept / coef[k]
        op = "≥" if coef[k] > 0 else "≤"
        text = f"x{k + 1} {op} {threshold:g}"
    elif not live:
        text = "every x" if intercept >= 0 else "no x"
    else:
        text = " + ".join(f"{c:g}·x{k + 1}" for k, c in enumerate(coef) if c) + f" + {intercept:g} ≥ 0"
    return Boundary(intercept, coef, text)
