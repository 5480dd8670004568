r"""The fully connected layer (``torch.nn.Linear``): z = a θᵀ + b."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import parse_named, positive_int, reject_unknown, shape_text


@dataclass(frozen=True)
class Dense:
    r"""Fully connected layer, weight θ of shape (out, in) like ``torch.nn.Linear``.

    Forward, rows are examples:  :math:`z = a\,θ^T + b`  (the seed's :math:`z^{(l+1)} = θ^{(l)} a^{(l)}` per column).

    Backward, given :math:`δ = ∂C/∂z` of shape (m, out):

    * :math:`∂C/∂θ = δ^T a`, i.e. :math:`∂C/∂θ_{jk} = \sum_i δ_{ij} a_{ik}`   ("∂C/∂w = a_in · δ_out")
    * :math:`∂C/∂b = \sum_i δ_i`                                              (summed over the batch)
    * :math:`∂C/∂a = δ\,θ`, the :math:`(θ^T δ)` of the recursion, written for row batches.
    """

    units: int
    activation: Activation
    bias: bool = True
    type: ClassVar[str] = "dense"
    fields: ClassVar[tuple[str, ...]] = ("type", "units", "activation", "bias")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "Dense":
        reject_unknown(obj, cls.fields, where)
        for key in ("units", "activation"):
            if key not in obj:
                raise SpecError(f"{where}.{key}", "missing", f"every {cls.type} layer needs {key}")
        bias = obj.get("bias", True)
        if not isinstance(bias, bool):
            raise SpecError(f"{where}.bias", f"{bias!r} is not true or false", "write true or false")
        return cls(
            units=positive_int(obj["units"], f"{where}.units"),
            activation=parse_named(obj["activation"], f"{where}.activation", make_activation),
            bias=bias,
        )

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "units": self.units, "activation": self.activation.to_json(), "bias": self.bias}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(units,) from a vector input (n,); anything else needs a flatten first."""
        shape = (int(in_shape),) if isinstance(in_shape, (int, np.integer)) else tuple(int(d) for d in in_shape)
        if len(shape) != 1:
            raise SpecError(where, f"dense needs (n,) input, got {shape_text(shape)}", "put a flatten layer before it")
        return (self.units,)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        self.out_shape(in_shape, where)
        n_in = int(in_shape) if isinstance(in_shape, (int, np.integer)) else int(in_shape[0])
        shapes = {"weight": (self.units, n_in)}
        if self.bias:
            shapes["bias"] = (self.units,)
        return shapes

    def forward(self, p: dict[str, np.ndarray], a_prev: np.ndarray) -> np.ndarray:
        z = a_prev @ p["weight"].T
        if self.bias:
            z += p["bias"]
        return z

    def backward(
        self, p: dict[str, np.ndarray], a_prev: np.ndarray, delta: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        nabla = {"weight": delta.T @ a_prev}
        if self.bias:
            nabla["bias"] = delta.sum(axis=0)
        return nabla, delta @ p["weight"]
