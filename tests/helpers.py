"""Test helpers that compute things independently of the code under test."""

import numpy as np


def central_difference(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """∂f/∂x by central differences, element by element, step h·max(1, |x|)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = h * max(1.0, abs(x[idx]))
        xp, xm = x.copy(), x.copy()
        xp[idx] += step
        xm[idx] -= step
        grad[idx] = (f(xp) - f(xm)) / (2 * step)
    return grad
