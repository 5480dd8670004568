r"""Layers that only rearrange their input: ``flatten``.

No parameters, identity activation, and a backward that undoes the rearrangement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import reject_unknown, shape_text


@dataclass(frozen=True)
class Flatten:
    r"""``torch.nn.Flatten()``: (m, C, H, W) → (m, C·H·W), row-major as torch (index (c·H + h)·W + w).

    Forward :math:`z[m, (c, h, w)] = a[m, c, h, w]`; backward :math:`∂C/∂a = δ` reshaped back to a's shape.
    A (m, n) input passes unchanged.
    """

    activation: ClassVar[Activation] = make_activation("identity")
    type: ClassVar[str] = "flatten"
    fields: ClassVar[tuple[str, ...]] = ("type",)

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "Flatten":
        reject_unknown(obj, cls.fields, where)
        return cls()

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        shape = tuple(int(d) for d in in_shape)
        if not shape:
            raise SpecError(where, f"flatten needs an input with at least one axis, got {shape_text(shape)}")
        return (math.prod(shape),)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        self.out_shape(in_shape, where)
        return {}

    def forward(self, p: dict[str, np.ndarray], a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], -1)

    def backward(self, p, a, delta):
        return {}, delta.reshape(a.shape)
