r"""``temporal_dense``: one dense layer applied at every step of a sequence, as ``torch.nn.Linear`` on (m, T, n).

With rows as (example, step) pairs and θ (out, in) shared by every step:

.. math::  z[m, t] = a[m, t]\, θ^T + b

Backward, given :math:`δ = ∂C/∂z` of shape (m, T, out):

* :math:`∂C/∂θ = \sum_{m, t} δ[m, t]^T a[m, t]` and :math:`∂C/∂b = \sum_{m, t} δ[m, t]`: summed over the batch
  *and* every step (the weights are shared through time; a gradient from one step only is the classic bug);
* :math:`∂C/∂a[m, t] = δ[m, t]\, θ`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import at, parse_bool, parse_named, positive_int, reject_unknown, shape_text


@dataclass(frozen=True)
class TemporalDense:
    """A dense layer over the last axis of a sequence (T, n): weight (out, n), bias (out,), like ``torch.nn.Linear``."""

    units: int
    activation: Activation
    bias: bool = True
    type: ClassVar[str] = "temporal_dense"
    fields: ClassVar[tuple[str, ...]] = ("type", "units", "activation", "bias")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "TemporalDense":
        reject_unknown(obj, cls.fields, where)
        for key in ("units", "activation"):
            if key not in obj:
                raise SpecError(at(where, key), "missing", f"every temporal_dense layer needs {key}")
        return cls(units=positive_int(obj["units"], at(where, "units")),
                   activation=parse_named(obj["activation"], at(where, "activation"), make_activation),
                   bias=parse_bool(obj.get("bias", True), at(where, "bias")))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "units": self.units, "activation": self.activation.to_json(), "bias": self.bias}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(T, units) from a sequence (T, n)."""
        shape = tuple(int(d) for d in in_shape)
        if len(shape) != 2:
            raise SpecError(where, f"temporal_dense needs (T, n) input, got {shape_text(shape)}",
                            'give a sequence input, "shape": [T, n]')
        return (shape[0], self.units)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        shape = self.out_shape(in_shape, where)
        out = {"weight": (self.units, int(tuple(in_shape)[1]))}
        if self.bias:
            out["bias"] = (shape[1],)
        return out

    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        z = a @ p["weight"].T
        if self.bias:
            z += p["bias"]
        return z

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray):
        """Σ over the batch and every step for θ and b; δθ at each step for a."""
        d2, a2 = delta.reshape(-1, delta.shape[-1]), a.reshape(-1, a.shape[-1])
        nabla = {"weight": d2.T @ a2}
        if self.bias:
            nabla["bias"] = d2.sum(axis=0)
        return nabla, delta @ p["weight"]
