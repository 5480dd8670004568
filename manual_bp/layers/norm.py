r"""Normalization layers, ``batch_norm``, ``layer_norm`` and ``group_norm``, as ``torch.nn.functional`` computes them.

Each normalizes its input over sets S of N elements, then scales and shifts it:

* batch norm: one set per channel, over the batch and every position (N = m·H·W);
* layer norm: one set per example, over the trailing ``normalized_shape``;
* group norm: one set per example and group of C/G channels, over those channels and every position.

.. math::

    μ = \frac1N \sum_S a,\qquad σ^2 = \frac1N \sum_S (a - μ)^2 \ \text{(biased, as torch normalizes)},\qquad
    s = \sqrt{σ^2 + ε},\qquad \hat x = (a - μ)/s,\qquad z = γ \odot \hat x + β

Backward, given :math:`δ = ∂C/∂z`:

* :math:`∂C/∂γ = \sum δ \odot \hat x`, :math:`∂C/∂β = \sum δ`, summed over everything γ is shared across;
* :math:`g = γ \odot δ` (that is ∂C/∂x̂), and through x̂, μ and σ² together

  .. math::  ∂C/∂a = \frac1s\Big(g - \operatorname{mean}_S g - \hat x \odot \operatorname{mean}_S(g \odot \hat x)\Big)

  from :math:`∂\hat x_i/∂a_j = (1[i = j] - 1/N - \hat x_i \hat x_j / N)/s`. The mean term is the path through μ,
  the x̂ term the path through σ²; dropping either is the classic hand-written batch-norm bug.

Batch norm keeps running statistics, the buffers ``running_mean`` and ``running_var`` (not parameters, no
gradient). In eval mode (``"training": false``) it normalizes with them, :math:`\hat x = (a - r_μ)/\sqrt{r_{σ^2} + ε}`,
which is linear in a: :math:`∂C/∂a = γ δ / s`. In training mode it updates them as torch does,
:math:`r_μ ← (1 - \text{momentum})\, r_μ + \text{momentum}\, μ` and
:math:`r_{σ^2} ← (1 - \text{momentum})\, r_{σ^2} + \text{momentum}\, σ^2 N/(N - 1)`: Bessel's N − 1 is used there
only, never in the normalization (``updated_buffers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import at, number, optional_activation, parse_bool, positive_int, reject_unknown, shape_text

EPS = 1e-5  # torch's default ε


def normalize(v: np.ndarray, axes: tuple[int, ...], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(x̂, s) with x̂ = (v − μ)/s over ``axes``, s = √(σ² + ε), σ² the biased variance (two passes: the
    centred values are squared, never E[v²] − μ², which cancels when the spread is small)."""
    d = v - v.mean(axis=axes, keepdims=True)
    s = np.sqrt((d * d).mean(axis=axes, keepdims=True) + eps)
    return d / s, s


def normalize_backward(g: np.ndarray, xhat: np.ndarray, s: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    r""":math:`∂C/∂a = (g - \operatorname{mean}_S g - \hat x \operatorname{mean}_S(g\hat x))/s` for g = ∂C/∂x̂."""
    return (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True)) / s


def _eps(obj: dict, where: str) -> float:
    return number(obj.get("eps", EPS), at(where, "eps"), 0.0, 1e30, open_low=True,
                  hint="give 0 < ε ≤ 1e30 (it must fit float32), e.g. 1e-5 as torch")


@dataclass(frozen=True)
class _Norm:
    """What the three normalizations share: ε, the affine γ/β switch, an optional activation after them."""

    eps: float = EPS
    affine: bool = True
    activation: Activation = field(default_factory=lambda: make_activation("identity"))
    type: ClassVar[str] = ""

    # -- the sets S ----------------------------------------------------------------------------------------
    def _sets(self, a: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        """a viewed so that each set S lies along ``axes``."""
        raise NotImplementedError

    def _shared(self, a: np.ndarray) -> tuple[int, ...]:
        """The axes of a that γ and β are shared across (their gradients sum over them)."""
        raise NotImplementedError

    def _affine_shape(self, a: np.ndarray) -> tuple[int, ...]:
        """γ's shape, broadcast against a."""
        raise NotImplementedError

    def statistics(self, p: dict, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x̂, s) in a's shape (s broadcast against it)."""
        v, axes = self._sets(a)
        xhat, s = normalize(v, axes, self.eps)
        return xhat.reshape(a.shape), np.broadcast_to(s, v.shape).reshape(a.shape)

    def input_gradient(self, p: dict, a: np.ndarray, g: np.ndarray, xhat: np.ndarray, s: np.ndarray) -> np.ndarray:
        v, axes = self._sets(a)
        return normalize_backward(g.reshape(v.shape), xhat.reshape(v.shape), s.reshape(v.shape), axes).reshape(a.shape)

    # -- the contract ------------------------------------------------------------------------------------------
    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        shape = self.affine_param_shape(self.out_shape(in_shape, where))
        return {"weight": shape, "bias": shape} if self.affine else {}

    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        """z = γ ⊙ x̂ + β."""
        return self.forward_saved(p, a)[0]

    def forward_saved(self, p: dict, a: np.ndarray):
        """(z, (x̂, s)): the forward and the statistics its backward reuses (``manual_bp.network`` keeps them)."""
        xhat, s = self.statistics(p, a)
        if not self.affine:
            return xhat, (xhat, s)
        shape = self._affine_shape(a)
        return xhat * p["weight"].reshape(shape) + p["bias"].reshape(shape), (xhat, s)

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray, saved=None):
        """∂C/∂γ = Σ δ ⊙ x̂, ∂C/∂β = Σ δ, ∂C/∂a through x̂, μ and σ² (see the module docstring). ``saved``: the
        (x̂, s) of ``forward_saved`` (recomputed when not given)."""
        xhat, s = saved if saved is not None else self.statistics(p, a)
        nabla = {}
        g = delta
        if self.affine:
            shared, shape = self._shared(a), self._affine_shape(a)
            nabla["weight"] = (delta * xhat).sum(axis=shared).reshape(p["weight"].shape)
            nabla["bias"] = delta.sum(axis=shared).reshape(p["bias"].shape)
            g = delta * p["weight"].reshape(shape)
        return nabla, self.input_gradient(p, a, g, xhat, s)

    def _head(self) -> dict[str, Any]:
        return {"type": self.type, "eps": self.eps}

    def _tail(self) -> dict[str, Any]:
        return {"activation": self.activation.to_json()}


def _channel_shape(a: np.ndarray) -> tuple[int, ...]:
    return (1, a.shape[1]) + (1,) * (a.ndim - 2)


@dataclass(frozen=True)
class BatchNorm(_Norm):
    r"""``torch.nn.BatchNorm1d`` over (m, C) or (m, C, L), ``BatchNorm2d`` over (m, C, H, W): one set per channel.

    Fields: ``eps`` (1e-5), ``momentum`` (0.1, of the running statistics' update), ``affine`` (true: γ ``weight``
    and β ``bias``, one per channel), ``training`` (true: batch statistics; false: the running ones),
    ``activation`` (identity). Buffers ``running_mean``, ``running_var`` (C,).
    """

    momentum: float = 0.1
    training: bool = True
    type: ClassVar[str] = "batch_norm"
    fields: ClassVar[tuple[str, ...]] = ("type", "eps", "momentum", "affine", "training", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "BatchNorm":
        reject_unknown(obj, cls.fields, where)
        return cls(eps=_eps(obj, where),
                   momentum=number(obj.get("momentum", 0.1), at(where, "momentum"), 0.0, 1.0),
                   affine=parse_bool(obj.get("affine", True), at(where, "affine")),
                   training=parse_bool(obj.get("training", True), at(where, "training")),
                   activation=optional_activation(obj, where))

    def to_json(self) -> dict[str, Any]:
        return {**self._head(), "momentum": self.momentum, "affine": self.affine, "training": self.training, **self._tail()}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        shape = tuple(int(d) for d in in_shape)
        if not 1 <= len(shape) <= 3:
            raise SpecError(where, f"batch_norm needs (C,), (C, L) or (C, H, W) input, got {shape_text(shape)}")
        return shape

    def affine_param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0],)

    def buffer_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        """The running statistics, one per channel (state_dict names as torch's BatchNorm)."""
        c = self.out_shape(in_shape, where)[0]
        return {"running_mean": (c,), "running_var": (c,)}

    def check_batch(self, m: int, in_shape, where: str) -> None:
        """Training mode needs two values per channel at least, as torch requires."""
        values = m * math.prod(tuple(in_shape)[1:])
        if self.training and values < 2:
            raise SpecError("x", f"{where}: batch_norm in training mode sees {values} value per channel "
                                 f"(batch {m} of {shape_text(in_shape)})",
                            "give a batch of 2 or more, or set \"training\": false to use the running statistics")

    def _sets(self, a):
        return a, (0, *range(2, a.ndim))

    def _shared(self, a):
        return (0, *range(2, a.ndim))

    def _affine_shape(self, a):
        return _channel_shape(a)

    def statistics(self, p, a):
        if self.training:
            return super().statistics(p, a)
        shape = _channel_shape(a)
        s = np.sqrt(p["running_var"].reshape(shape) + self.eps)
        return (a - p["running_mean"].reshape(shape)) / s, np.broadcast_to(s, a.shape)

    def input_gradient(self, p, a, g, xhat, s):
        return super().input_gradient(p, a, g, xhat, s) if self.training else g / s

    def updated_buffers(self, p: dict, a: np.ndarray, saved=None) -> dict[str, np.ndarray]:
        """The running statistics after this forward: unchanged in eval mode; in training mode moved toward
        the batch's mean and its *unbiased* variance, σ² N/(N − 1)."""
        if not self.training:
            return {"running_mean": p["running_mean"].copy(), "running_var": p["running_var"].copy()}
        axes = self._shared(a)
        n = a.size // a.shape[1]
        mu = a.mean(axis=axes)
        d = a - mu.reshape(_channel_shape(a))
        var = (d * d).sum(axis=axes) / (n - 1)
        k = self.momentum
        return {"running_mean": (1 - k) * p["running_mean"] + k * mu, "running_var": (1 - k) * p["running_var"] + k * var}


@dataclass(frozen=True)
class LayerNorm(_Norm):
    r"""``torch.nn.LayerNorm(normalized_shape)``: one set per example, over the trailing axes it names.

    Fields: ``normalized_shape`` (the trailing sizes of the input; default its last axis), ``eps`` (1e-5),
    ``elementwise_affine`` (true: γ ``weight`` and β ``bias`` of shape normalized_shape), ``activation``.
    """

    normalized_shape: tuple = None
    type: ClassVar[str] = "layer_norm"
    fields: ClassVar[tuple[str, ...]] = ("type", "normalized_shape", "eps", "elementwise_affine", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "LayerNorm":
        reject_unknown(obj, cls.fields, where)
        shape = obj.get("normalized_shape")
        if shape is not None:
            key = at(where, "normalized_shape")
            if isinstance(shape, list):
                if not 1 <= len(shape) <= 3:
                    raise SpecError(key, f"has {len(shape)} sizes", "give 1 to 3 trailing sizes of the input, e.g. [64]")
                shape = tuple(positive_int(d, f"{key}[{j}]") for j, d in enumerate(shape))
            else:
                shape = (positive_int(shape, key),)
        return cls(eps=_eps(obj, where),
                   affine=parse_bool(obj.get("elementwise_affine", True), at(where, "elementwise_affine")),
                   activation=optional_activation(obj, where), normalized_shape=shape)

    def to_json(self) -> dict[str, Any]:
        return {**self._head(), "normalized_shape": None if self.normalized_shape is None else list(self.normalized_shape),
                "elementwise_affine": self.affine, **self._tail()}

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[-1:] if self.normalized_shape is None else tuple(self.normalized_shape)

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        shape = tuple(int(d) for d in in_shape)
        dims = self._dims(shape)
        if len(dims) > len(shape) or shape[len(shape) - len(dims):] != dims:
            raise SpecError(at(where, "normalized_shape"), f"{list(dims)} is not the trailing sizes of the input {shape_text(shape)}",
                            "give the last sizes of the layer's input, e.g. [" + str(shape[-1]) + "]")
        return shape

    def affine_param_shape(self, shape):
        return self._dims(shape)

    def _sets(self, a):
        k = len(self._dims(a.shape[1:]))
        return a, tuple(range(a.ndim - k, a.ndim))

    def _shared(self, a):
        return tuple(range(a.ndim - len(self._dims(a.shape[1:]))))

    def _affine_shape(self, a):
        return self._dims(a.shape[1:])


@dataclass(frozen=True)
class GroupNorm(_Norm):
    r"""``torch.nn.GroupNorm(num_groups, C)``: one set per example and group of C/G consecutive channels.

    Fields: ``num_groups`` (dividing C), ``eps`` (1e-5), ``affine`` (true: γ ``weight`` and β ``bias`` per
    channel), ``activation``. Layer norm over (C, H, W) is the case G = 1; instance norm G = C.
    """

    num_groups: int = 1
    type: ClassVar[str] = "group_norm"
    fields: ClassVar[tuple[str, ...]] = ("type", "num_groups", "eps", "affine", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "GroupNorm":
        reject_unknown(obj, cls.fields, where)
        if "num_groups" not in obj:
            raise SpecError(at(where, "num_groups"), "missing", "every group_norm layer needs num_groups (dividing its channels)")
        return cls(eps=_eps(obj, where), affine=parse_bool(obj.get("affine", True), at(where, "affine")),
                   activation=optional_activation(obj, where),
                   num_groups=positive_int(obj["num_groups"], at(where, "num_groups")))

    def to_json(self) -> dict[str, Any]:
        return {**self._head(), "num_groups": self.num_groups, "affine": self.affine, **self._tail()}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        shape = tuple(int(d) for d in in_shape)
        if shape[0] % self.num_groups:
            raise SpecError(at(where, "num_groups"), f"{self.num_groups} groups do not divide {shape[0]} channels "
                            f"(input {shape_text(shape)})", "give a num_groups that divides the channels")
        return shape

    def affine_param_shape(self, shape):
        return (shape[0],)

    def check_batch(self, m: int, in_shape, where: str) -> None:
        """torch refuses a batch where m·(C/G)·(positions) is 1: one example whose groups hold one value each."""
        shape = tuple(in_shape)
        if m * (shape[0] // self.num_groups) * math.prod(shape[1:]) < 2:
            raise SpecError("x", f"{where}: group_norm sees one value per group in a batch of {m} "
                                 f"(input {shape_text(shape)}, {self.num_groups} groups); torch refuses that",
                            "give a batch of 2 or more, or fewer groups")

    def _sets(self, a):
        return a.reshape(a.shape[0], self.num_groups, -1), (2,)

    def _shared(self, a):
        return (0, *range(2, a.ndim))

    def _affine_shape(self, a):
        return _channel_shape(a)
