r"""Costs C(ỹ, y) and their gradients :math:`\nabla_a C` with respect to the network output ỹ = a^L.

Batches are rows: ỹ has shape (m, n_out), m examples. Each loss states its reduction exactly:

============== ===================================================================== ==================
name           C                                                                     targets y
============== ===================================================================== ==================
half_sse       :math:`\tfrac12 \sum_i \sum_j (ỹ_{ij} - y_{ij})^2` (seed: ½(ỹ − y)²)   (m, n_out) values
sse            :math:`\sum_i \sum_j (y_{ij} - ỹ_{ij})^2` (seed's J(θ), no ½)          (m, n_out) values
half_mse       :math:`\tfrac{1}{2m} \sum_i \sum_j (ỹ_{ij} - y_{ij})^2` (seed's J)      (m, n_out) values
mse            :math:`\tfrac{1}{N} \sum (ỹ - y)^2`, N = m·n_out (torch's default)       (m, n_out) values
l1             :math:`\tfrac{1}{N} \sum |ỹ - y|`                                       (m, n_out) values
huber          :math:`\tfrac{1}{N} \sum h_\delta(ỹ - y)` (torch HuberLoss)               (m, n_out) values
smooth_l1      :math:`\tfrac{1}{N} \sum s_\beta(ỹ - y)` (torch SmoothL1Loss)            (m, n_out) values
bce            :math:`-\tfrac{1}{N} \sum y\log ỹ + (1-y)\log(1-ỹ)`, logs clamped ≥ −100  (m, n_out) in [0, 1]
bce_with_logits same as bce on σ(ỹ), computed stably from the logits ỹ                 (m, n_out) in [0, 1]
cross_entropy  :math:`\tfrac{1}{m}\sum_i \big(\log\sum_j e^{ỹ_{ij}} - ỹ_{i,y_i}\big)` on logits (m,) class indices
nll            :math:`-\tfrac{1}{m}\sum_i ỹ_{i,y_i}` on log-probabilities                 (m,) class indices
============== ===================================================================== ==================

**Sequence outputs.** A network that ends in a ``temporal_dense`` head outputs ỹ of shape (m, T, n_out): it is
judged as m·T rows of n_out (``as_rows``), as torch users write ``F.cross_entropy(out.reshape(-1, k),
y.reshape(-1))``. Every reduction above is then over those rows: "m" is m·T, N = m·T·n_out. Targets are (m, T)
class indices or (m, T, n_out) values.

**Ignored targets.** For cross_entropy and nll a class index of −100 (``IGNORE_INDEX``, torch's default
``ignore_index``) marks a row (an example, or one step of a sequence) that contributes nothing: its gradient is 0
and the mean is over the m' rows that are kept (m' replaces m above). This is the mask of a padded sequence
(cs231n's ``temporal_softmax_loss``), in torch's convention. Every row ignored is refused (torch gives NaN).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import Activation, log_softmax, softmax, stable_sigmoid
from .errors import SpecError
from .named import Named

#: torch's default ``ignore_index``: a cross_entropy / nll target equal to it marks a row that counts for nothing
IGNORE_INDEX = -100


class Loss(Named):
    """Base class: subclasses set ``name`` and write ``value(a, y)`` and ``grad(a, y)``."""

    kind = "loss"
    positive = True  # delta, beta: every loss parameter is a positive width
    #: "values": y has the output's shape; "classes": y is one integer class index per example.
    targets: str = "values"

    def value(self, a: np.ndarray, y: np.ndarray) -> np.floating:
        raise NotImplementedError

    def grad(self, a: np.ndarray, y: np.ndarray) -> np.ndarray:
        r""":math:`\nabla_a C`, the same shape as a."""
        raise NotImplementedError

    def check_output(self, activation: Activation, units: int) -> tuple[str, str] | None:
        """(problem, fix) when this loss cannot follow an output layer of ``units`` units with ``activation``."""
        return None

    def kinks(self, a: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Elements of a where C is not differentiable (none by default)."""
        return np.zeros(np.shape(a), dtype=bool)

    def as_rows(self, a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, y) as the rows the loss is applied to: a sequence output (m, T, k) as m·T rows (m·T, k), its targets
        as m·T class indices or (m·T, k) values; a vector output (m, k) unchanged. ``grad`` of the rows,
        reshaped to a's shape, is ∇_a C."""
        if np.ndim(a) <= 2:
            return a, y
        k = a.shape[-1]
        return a.reshape(-1, k), (y.reshape(-1) if self.targets == "classes" else y.reshape(-1, k))


def _scalar(x: np.ndarray, like: np.ndarray) -> np.floating:
    return like.dtype.type(x)


class HalfSSE(Loss):
    r""":math:`C = \tfrac12 \sum (ỹ - y)^2`, :math:`\nabla_a C = ỹ - y`."""

    name = "half_sse"

    def value(self, a, y):
        r = a - y
        return _scalar(0.5 * np.sum(r * r), a)

    def grad(self, a, y):
        return a - y


class SSE(Loss):
    r""":math:`C = \sum (y - ỹ)^2`, :math:`\nabla_a C = -2 (y - ỹ)`."""

    name = "sse"

    def value(self, a, y):
        r = y - a
        return _scalar(np.sum(r * r), a)

    def grad(self, a, y):
        return -2 * (y - a)


class HalfMSE(Loss):
    r""":math:`C = \tfrac{1}{2m} \sum (ỹ - y)^2` with m = number of examples, :math:`\nabla_a C = (ỹ - y)/m`."""

    name = "half_mse"

    def value(self, a, y):
        r = a - y
        return _scalar(np.sum(r * r) / (2 * a.shape[0]), a)

    def grad(self, a, y):
        return (a - y) / a.shape[0]


class MSE(Loss):
    r""":math:`C = \tfrac1N \sum (ỹ - y)^2` over all N elements, :math:`\nabla_a C = 2(ỹ - y)/N`."""

    name = "mse"

    def value(self, a, y):
        r = a - y
        return _scalar(np.mean(r * r), a)

    def grad(self, a, y):
        return 2 * (a - y) / a.size


class L1(Loss):
    r""":math:`C = \tfrac1N \sum |ỹ - y|`, :math:`\nabla_a C = \mathrm{sign}(ỹ - y)/N`, 0 where ỹ = y (as torch)."""

    name = "l1"

    def value(self, a, y):
        return _scalar(np.mean(np.abs(a - y)), a)

    def grad(self, a, y):
        return np.sign(a - y) / a.size

    def kinks(self, a, y):
        return a == y


class Huber(Loss):
    r""":math:`h_\delta(r) = \tfrac12 r^2` for |r| < δ, else :math:`\delta(|r| - \tfrac12\delta)`; mean.

    :math:`h'_\delta(r) = \mathrm{clip}(r, -\delta, \delta)`.
    """

    name = "huber"
    defaults = {"delta": 1.0}

    def value(self, a, y):
        r = np.abs(a - y)
        return _scalar(np.mean(np.where(r < self.delta, 0.5 * r * r, self.delta * (r - 0.5 * self.delta))), a)

    def grad(self, a, y):
        return np.clip(a - y, -self.delta, self.delta) / a.size


class SmoothL1(Loss):
    r""":math:`s_\beta(r) = \tfrac{1}{2\beta} r^2` for |r| < β, else :math:`|r| - \tfrac12\beta`; mean.

    :math:`s'_\beta(r) = r/\beta` for |r| < β, else sign(r).
    """

    name = "smooth_l1"
    defaults = {"beta": 1.0}

    def value(self, a, y):
        r = np.abs(a - y)
        return _scalar(np.mean(np.where(r < self.beta, 0.5 * r * r / self.beta, r - 0.5 * self.beta)), a)

    def grad(self, a, y):
        r = a - y
        return np.where(np.abs(r) < self.beta, r / self.beta, np.sign(r)) / a.size


def _clamped_log(p: np.ndarray) -> np.ndarray:
    """max(log p, −100), with log 0 = −inf clamped too, and no warning (torch's BCELoss rule)."""
    positive = p > 0
    return np.where(positive, np.maximum(np.log(np.where(positive, p, 1)), -100), -100).astype(p.dtype, copy=False)


#: torch's guard against 0/0 in the BCE gradient: 1e-12 stored as a float32 constant (≈ 9.9999998e-13).
_BCE_GUARD = float(np.float32(1e-12))


class BCE(Loss):
    r""":math:`C = -\tfrac1N \sum y \log ỹ + (1 - y)\log(1 - ỹ)`, each log clamped at −100 (as torch).

    :math:`\nabla_a C = (ỹ - y) / \max(ỹ(1 - ỹ), 10^{-12}) / N` (torch's guard against 0/0, a float32 1e-12).
    """

    name = "bce"

    def check_output(self, activation, units):
        if activation.name not in ("sigmoid", "softmax"):
            return "bce needs probabilities in [0, 1]", "end with a sigmoid (or softmax) layer, or use bce_with_logits"
        return None

    def value(self, a, y):
        return _scalar(-np.mean(y * _clamped_log(a) + (1 - y) * _clamped_log(1 - a)), a)

    def grad(self, a, y):
        return (a - y) / np.maximum(a * (1 - a), _BCE_GUARD) / a.size


class BCEWithLogits(Loss):
    r"""Binary cross-entropy on logits x, stably: :math:`C = \tfrac1N \sum \max(x, 0) - x y + \log(1 + e^{-|x|})`.

    :math:`\nabla_a C = (\sigma(x) - y)/N`.
    """

    name = "bce_with_logits"

    def value(self, a, y):
        return _scalar(np.mean(np.maximum(a, 0) - a * y + np.log1p(np.exp(-np.abs(a)))), a)

    def grad(self, a, y):
        return (stable_sigmoid(a) - y) / a.size


class _ClassLoss(Loss):
    targets = "classes"

    def check_output(self, activation, units):
        if units < 2:
            return f"{self.name} takes class indices and needs at least 2 output units, not {units}", "give the last layer one unit per class"
        return None

    @staticmethod
    def one_hot(y: np.ndarray, like: np.ndarray) -> np.ndarray:
        """1 at (i, y_i) for every kept row; an ignored row (y_i = −100) is all zeros."""
        hot = np.zeros_like(like)
        rows = np.flatnonzero(np.asarray(y) != IGNORE_INDEX)
        hot[rows, np.asarray(y)[rows]] = 1
        return hot

    @staticmethod
    def kept(y: np.ndarray) -> np.ndarray:
        """The rows that count: y_i ≠ −100 (torch's default ``ignore_index``)."""
        return np.asarray(y) != IGNORE_INDEX


class CrossEntropy(_ClassLoss):
    r"""Softmax cross-entropy on logits x with class indices: :math:`C = \tfrac1m \sum_i \mathrm{lse}(x_i) - x_{i,y_i}`.

    :math:`\nabla_a C = (\mathrm{softmax}(x) - \mathrm{onehot}(y)) / m`.

    A target y_i = −100 ignores row i (torch's default ``ignore_index``): the sums run over the kept rows only,
    m is their number, and an ignored row's gradient is 0. lse is the stable log-sum-exp (max subtracted).
    On a sequence output (m, T, k) the rows are the m·T steps (``as_rows``): a step with y = −100 is masked.
    """

    name = "cross_entropy"

    def check_output(self, activation, units):
        if activation.output_only:
            return f"cross_entropy applies its own softmax to logits, not to {activation.name}", "end with an elementwise activation (identity)"
        return super().check_output(activation, units)

    def value(self, a, y):
        kept = self.kept(y)
        if not kept.any():  # torch: the mean over no rows, NaN (check_y refuses such targets)
            return _scalar(np.nan, a)
        a, y = a[kept], np.asarray(y)[kept]
        return _scalar(-np.mean(log_softmax(a)[np.arange(a.shape[0]), y]), a)

    def grad(self, a, y):
        kept = self.kept(y)
        return np.where(kept[:, None], (softmax(a) - self.one_hot(y, a)) / max(int(np.count_nonzero(kept)), 1), 0)


class NLL(_ClassLoss):
    r"""Negative log-likelihood of log-probabilities with class indices: :math:`C = -\tfrac1m \sum_i a_{i,y_i}`.

    :math:`\nabla_a C = -\mathrm{onehot}(y) / m`. Follows a ``log_softmax`` output layer.

    A target y_i = −100 ignores row i (torch's default ``ignore_index``): the sum runs over the kept rows only,
    m is their number, and an ignored row's gradient is 0. On a sequence output (m, T, k) the rows are the m·T
    steps (``as_rows``): a step with y = −100 is masked.
    """

    name = "nll"

    def check_output(self, activation, units):
        if activation.name != "log_softmax":
            return "nll expects log-probabilities", "end with a log_softmax layer, or use cross_entropy on logits"
        return super().check_output(activation, units)

    def value(self, a, y):
        kept = self.kept(y)
        if not kept.any():  # torch: the mean over no rows, NaN (check_y refuses such targets)
            return _scalar(np.nan, a)
        a, y = a[kept], np.asarray(y)[kept]
        return _scalar(-np.mean(a[np.arange(a.shape[0]), y]), a)

    def grad(self, a, y):
        return -self.one_hot(y, a) / max(int(np.count_nonzero(self.kept(y))), 1)


LOSSES: dict[str, type[Loss]] = {
    cls.name: cls
    for cls in (HalfSSE, SSE, HalfMSE, MSE, L1, Huber, SmoothL1, BCE, BCEWithLogits, CrossEntropy, NLL)
}


def make_loss(name: str, **params: Any) -> Loss:
    """The loss called ``name`` with the given parameters (defaults for the rest)."""
    if name not in LOSSES:
        raise SpecError("loss", f"unknown loss {name!r}", f"choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](**params)

