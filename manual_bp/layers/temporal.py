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
from typing import ClassVar

import numpy as np

from ..errors import SpecError
from .base import shape_text
from .dense import Dense


@dataclass(frozen=True)
class TemporalDense(Dense):
    """A dense layer over the last axis of a sequence (T, n): weight (out, n), bias (out,), like ``torch.nn.Linear``.
    Its fields, spec form and forward (a θᵀ + b, on the last axis) are Dense's; its shapes and the sums of its
    backward are over every step too."""

    type: ClassVar[str] = "temporal_dense"

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(T, units) from a sequence (T, n)."""
        shape = tuple(int(d) for d in in_shape)
        if len(shape) != 2:
            raise SpecError(where, f"temporal_dense needs (T, n) input, got {shape_text(shape)}",
                            'give a sequence input, "shape": [T, n]')
        return (shape[0], self.units)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        self.out_shape(in_shape, where)
        shapes = {"weight": (self.units, int(tuple(in_shape)[1]))}
        if self.bias:
            shapes["bias"] = (self.units,)
        return shapes

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray):
        """Σ over the batch and every step for θ and b (Dense's, on (m·T) rows); δθ at each step for a."""
        nabla, _ = super().backward(p, a.reshape(-1, a.shape[-1]), delta.reshape(-1, delta.shape[-1]))
        return nabla, delta @ p["weight"]
