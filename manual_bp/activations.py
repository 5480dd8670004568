r"""Activation functions g and their derivatives g', written by hand in NumPy.

Each activation is one small object: ``value(z)`` is :math:`a = g(z)` and ``derivative(z, a)`` is
:math:`g'(z)`, given the already computed ``a = g(z)`` so nothing is evaluated twice.
Both work elementwise on arrays of any shape and keep the dtype of ``z``.

The backward step through an activation is ``vjp(z, a, grad_a)``: the vector-Jacobian product
:math:`\delta = \nabla_a C \odot g'(z)` for elementwise functions. ``softmax`` and ``log_softmax``
are not elementwise; they override ``vjp`` with the closed form of their Jacobian-vector product and
never build the (n, n) Jacobian. They may only be used on the output layer.

Conventions at kinks follow PyTorch exactly (``kinks(z)`` marks those points):

* relu'(0) = 0;  leaky_relu'(0) = negative_slope;  hardtanh' = 0 at min_val and max_val;
* elu'(0) = alpha and selu'(0) = scale * alpha (PyTorch takes the negative branch at 0).

Every formula is the numerically stable one: no overflow warning and no NaN for |z| up to 1e3 and
beyond (exp is only ever taken of a non-positive number).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import SpecError
from .named import Named, positive_rule


def _exp_neg_abs(z: np.ndarray) -> np.ndarray:
    """exp(-|z|) in (0, 1]: the one exponential the stable forms need."""
    return np.exp(-np.abs(z))


def stable_sigmoid(z: np.ndarray) -> np.ndarray:
    r""":math:`\sigma(z) = 1 / (1 + e^{-z})`, as :math:`e^{z}/(1 + e^{z})` for z < 0 (no overflow)."""
    e = _exp_neg_abs(z)
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def stable_softplus(z: np.ndarray) -> np.ndarray:
    r""":math:`\log(1 + e^{z}) = \max(z, 0) + \log(1 + e^{-|z|})`."""
    return np.maximum(z, 0) + np.log1p(_exp_neg_abs(z))


def log_softmax(z: np.ndarray) -> np.ndarray:
    r""":math:`z_j - \log\sum_k e^{z_k}`, as :math:`(z_j - m) - \log\sum_k e^{z_k - m}` with m = max_k z_k.

    Subtracting m first keeps the result accurate when the log-sum-exp is large (no m + log(...) rounding).
    """
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    r""":math:`e^{z_j - m} / \sum_k e^{z_k - m}`: the largest term is exactly 1, so p near 1 stays accurate."""
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


_erf = np.vectorize(math.erf, otypes=[np.float64])


class Activation(Named):
    """Base class: subclasses set ``name``, ``defaults`` and write ``value`` and ``derivative``."""

    kind = "activation"
    #: softmax-like activations couple the units of a row and may only end the network.
    output_only: bool = False

    # -- the two functions every activation defines -------------------------------------------
    def value(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def derivative(self, z: np.ndarray, a: np.ndarray) -> np.ndarray:
        """g'(z); ``a`` is ``value(z)``, passed in so it is not recomputed."""
        raise NotImplementedError

    # -- what backward calls --------------------------------------------------------------------
    def vjp(self, z: np.ndarray, a: np.ndarray, grad_a: np.ndarray) -> np.ndarray:
        r""":math:`\delta = \nabla_a C \odot g'(z)`, multiplied into g''s fresh array (no extra temporary)."""
        delta = self.derivative(z, a)
        delta *= grad_a
        return delta

    def kink_points(self) -> tuple[float, ...]:
        """The values of z where g is not differentiable (none by default)."""
        return ()

    def kinks(self, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the elements of z that lie exactly on a kink."""
        mask = np.zeros(np.shape(z), dtype=bool)
        for k in self.kink_points():
            mask |= z == k
        return mask

    #: the derivative at a kink on the other side from PyTorch's convention (for the oracle).
    def other_side_slope(self) -> float | None:
        return None


class Identity(Activation):
    r""":math:`g(z) = z`, :math:`g'(z) = 1`."""

    name = "identity"

    def value(self, z):
        return z

    def derivative(self, z, a):
        return np.ones_like(z)

    def vjp(self, z, a, grad_a):
        return grad_a


class Sigmoid(Activation):
    r""":math:`\sigma(z) = 1/(1 + e^{-z})`, :math:`\sigma'(z) = \sigma(z)(1 - \sigma(z))`.

    The derivative is σ(1 − σ) once — not σ'(z)(1 − σ(z)), which applies (1 − σ) twice (seed E1).
    """

    name = "sigmoid"

    def value(self, z):
        return stable_sigmoid(z)

    def derivative(self, z, a):
        d = 1 - a
        d *= a
        return d


class Tanh(Activation):
    r""":math:`g(z) = \tanh z`, :math:`g'(z) = 1 - \tanh^2 z`."""

    name = "tanh"

    def value(self, z):
        return np.tanh(z)

    def derivative(self, z, a):
        d = a * a
        np.subtract(1, d, out=d)
        return d


class ReLU(Activation):
    r""":math:`g(z) = \max(z, 0)`, :math:`g'(z) = [z > 0]`; relu'(0) = 0 as in PyTorch."""

    name = "relu"

    def value(self, z):
        return np.maximum(z, 0).astype(z.dtype, copy=False)  # NaN stays NaN, as torch.relu

    def derivative(self, z, a):
        return (z > 0).astype(z.dtype)

    def kink_points(self):
        return (0.0,)

    def other_side_slope(self):
        return 1.0


class LeakyReLU(Activation):
    r""":math:`g(z) = z` for z > 0, :math:`s z` otherwise; :math:`g'(0) = s` (negative_slope) as PyTorch."""

    name = "leaky_relu"
    defaults = {"negative_slope": 0.01}
    constraints = {}  # any finite slope, as torch (0 gives relu, negative slopes are allowed too)

    def value(self, z):
        return np.where(z > 0, z, self.negative_slope * z).astype(z.dtype, copy=False)

    def derivative(self, z, a):
        return np.where(z > 0, 1.0, self.negative_slope).astype(z.dtype)

    def kink_points(self):
        return (0.0,)

    def other_side_slope(self):
        return 1.0


class ELU(Activation):
    r""":math:`g(z) = z` for z > 0, :math:`\alpha(e^{z} - 1)` otherwise; :math:`g'(z) = \alpha e^{z}` for z ≤ 0."""

    name = "elu"
    defaults = {"alpha": 1.0}
    constraints = {}  # any finite alpha, as torch (torch accepts 0 and negative values and so do we)

    def value(self, z):
        return np.where(z > 0, z, self.alpha * np.expm1(np.minimum(z, 0))).astype(z.dtype, copy=False)

    def derivative(self, z, a):
        return np.where(z > 0, 1.0, self.alpha * np.exp(np.minimum(z, 0))).astype(z.dtype, copy=False)

    def kink_points(self):
        return (0.0,) if self.alpha != 1.0 else ()

    def other_side_slope(self):
        return 1.0


class SELU(Activation):
    r""":math:`g(z) = \lambda\,\mathrm{elu}_\alpha(z)` with PyTorch's fixed α ≈ 1.6733 and λ ≈ 1.0507."""

    name = "selu"
    alpha = 1.6732632423543772848170429916717
    scale = 1.0507009873554804934193349852946

    def value(self, z):
        neg = self.alpha * np.expm1(np.minimum(z, 0))
        return (self.scale * np.where(z > 0, z, neg)).astype(z.dtype, copy=False)

    def derivative(self, z, a):
        neg = self.alpha * np.exp(np.minimum(z, 0))
        return (self.scale * np.where(z > 0, 1.0, neg)).astype(z.dtype, copy=False)

    def kink_points(self):
        return (0.0,)

    def other_side_slope(self):
        return self.scale


class Softplus(Activation):
    r""":math:`g(z) = \frac{1}{\beta}\log(1 + e^{\beta z})`, and z itself where βz > threshold (as PyTorch).

    :math:`g'(z) = \sigma(\beta z)`, and 1 where βz > threshold.
    """

    name = "softplus"
    defaults = {"beta": 1.0, "threshold": 20.0}
    #: beta divides the value: beta = 0 is 0/0 (NaN everywhere), beta < 0 is not a softplus.
    #: threshold may be any finite number, as in torch.
    constraints = {"beta": positive_rule("softplus(z) = log(1 + exp(beta*z))/beta is undefined for beta = 0")}

    def value(self, z):
        bz = self.beta * z
        return np.where(bz > self.threshold, z, stable_softplus(bz) / self.beta).astype(z.dtype, copy=False)

    def derivative(self, z, a):
        bz = self.beta * z
        return np.where(bz > self.threshold, 1.0, stable_sigmoid(bz)).astype(z.dtype, copy=False)

    def kink_points(self):
        """βz = threshold, where torch switches from log(1 + e^{βz})/β to z: the slope jumps from σ(threshold)
        to 1 and the value by log(1 + e^{−threshold})/β (e.g. 0.0067 at threshold 5)."""
        return (self.threshold / self.beta,)

    def other_side_slope(self):
        return 1.0


class GELU(Activation):
    r"""Exact GELU: :math:`g(z) = z\,\Phi(z)`, :math:`g'(z) = \Phi(z) + z\,\varphi(z)`,
    with Φ the standard normal CDF :math:`\tfrac12(1 + \mathrm{erf}(z/\sqrt2))` and φ its density."""

    name = "gelu"

    def _cdf(self, z):
        return (0.5 * (1.0 + _erf(z / math.sqrt(2.0)))).astype(z.dtype, copy=False)

    def value(self, z):
        return z * self._cdf(z)

    def derivative(self, z, a):
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return self._cdf(z) + z * pdf


class GELUTanh(Activation):
    r"""GELU, tanh approximation (PyTorch's ``approximate='tanh'``):
    :math:`g(z) = \tfrac12 z (1 + \tanh u)`, :math:`u = \sqrt{2/\pi}\,(z + 0.044715 z^3)`;
    :math:`g'(z) = \tfrac12(1 + \tanh u) + \tfrac12 z (1 - \tanh^2 u)\sqrt{2/\pi}(1 + 3 \cdot 0.044715 z^2)`."""

    name = "gelu_tanh"
    _k = math.sqrt(2.0 / math.pi)
    _c = 0.044715

    def _tanh_u(self, z):
        return np.tanh(self._k * (z + self._c * z * z * z))

    def value(self, z):
        return 0.5 * z * (1 + self._tanh_u(z))

    def derivative(self, z, a):
        t = self._tanh_u(z)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * self._k * (1 + 3 * self._c * z * z)


class SiLU(Activation):
    r""":math:`g(z) = z\,\sigma(z)`, :math:`g'(z) = \sigma(z)\,(1 + z(1 - \sigma(z)))`."""

    name = "silu"

    def value(self, z):
        return z * stable_sigmoid(z)

    def derivative(self, z, a):
        s = stable_sigmoid(z)
        return s * (1 + z * (1 - s))


class Mish(Activation):
    r""":math:`g(z) = z \tanh(\mathrm{softplus}(z))`,
    :math:`g'(z) = \tanh(\mathrm{sp}(z)) + z\,\sigma(z)\,(1 - \tanh^2(\mathrm{sp}(z)))`."""

    name = "mish"

    def value(self, z):
        return z * np.tanh(stable_softplus(z))

    def derivative(self, z, a):
        t = np.tanh(stable_softplus(z))
        return t + z * stable_sigmoid(z) * (1 - t * t)


class Softsign(Activation):
    r""":math:`g(z) = z / (1 + |z|)`, :math:`g'(z) = 1 / (1 + |z|)^2`."""

    name = "softsign"

    def value(self, z):
        return z / (1 + np.abs(z))

    def derivative(self, z, a):
        d = 1 + np.abs(z)
        return 1 / (d * d)


class Hardtanh(Activation):
    r""":math:`g(z) = \min(\max(z, lo), hi)`, :math:`g'(z) = [lo < z < hi]` (0 at both ends, as PyTorch)."""

    name = "hardtanh"
    defaults = {"min_val": -1.0, "max_val": 1.0}

    def validate(self):
        # torch refuses min_val > max_val; min_val = max_val (a constant, gradient 0 everywhere) is refused too
        if not self.min_val < self.max_val:
            raise SpecError(
                "activation.min_val", f"{self.min_val} is not below max_val {self.max_val}", "make min_val < max_val"
            )

    def value(self, z):
        return np.clip(z, self.min_val, self.max_val).astype(z.dtype, copy=False)

    def derivative(self, z, a):
        return ((z > self.min_val) & (z < self.max_val)).astype(z.dtype)

    def kink_points(self):
        return (self.min_val, self.max_val)

    def other_side_slope(self):
        return 1.0


class Softmax(Activation):
    r""":math:`a_j = e^{z_j} / \sum_k e^{z_k}` over the units of each example (output layer only).

    Backward without the Jacobian: :math:`\delta = a \odot (\nabla_a C - \langle \nabla_a C, a\rangle)`.
    """

    name = "softmax"
    output_only = True

    def value(self, z):
        return softmax(z)

    def derivative(self, z, a):
        raise TypeError("softmax has no elementwise derivative; use vjp(z, a, grad_a)")

    def vjp(self, z, a, grad_a):
        return a * (grad_a - np.sum(grad_a * a, axis=-1, keepdims=True))


class LogSoftmax(Activation):
    r""":math:`a_j = z_j - \log\sum_k e^{z_k}` (output layer only; pairs with the ``nll`` loss).

    Backward: :math:`\delta = \nabla_a C - \mathrm{softmax}(z) \sum_j (\nabla_a C)_j`.
    """

    name = "log_softmax"
    output_only = True

    def value(self, z):
        return log_softmax(z)

    def derivative(self, z, a):
        raise TypeError("log_softmax has no elementwise derivative; use vjp(z, a, grad_a)")

    def vjp(self, z, a, grad_a):
        return grad_a - np.exp(a) * np.sum(grad_a, axis=-1, keepdims=True)


ACTIVATIONS: dict[str, type[Activation]] = {
    cls.name: cls
    for cls in (
        Identity, Sigmoid, Tanh, ReLU, LeakyReLU, ELU, SELU, Softplus, GELU, GELUTanh,
        SiLU, Mish, Softsign, Hardtanh, Softmax, LogSoftmax,
    )
}


def make_activation(name: str, **params: Any) -> Activation:
    """The activation called ``name`` with the given parameters (defaults for the rest)."""
    if name not in ACTIVATIONS:
        raise SpecError("activation", f"unknown activation {name!r}", f"choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name](**params)
