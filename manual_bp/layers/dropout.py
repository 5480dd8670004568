r"""``dropout``: zero each element with probability p and scale the rest by 1/(1 − p), as torch trains.

The mask is part of the case, so that this code, the torch twin and a user's own implementation all drop
the same elements: :func:`keep_mask` draws it from the layer's ``seed`` and the input's
shape (NumPy's PCG64, the same on every machine). With M the mask (1 = kept) and s = 1/(1 − p):

.. math::  z = a \odot M\, s,\qquad ∂C/∂a = δ \odot M\, s

In eval mode (``"training": false``) it is the identity. p = 0 keeps everything; p = 1 is refused (torch
returns zeros and a zero gradient there, which checks nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from .base import at, number, optional_activation, parse_bool, reject_unknown, whole


def keep_mask(seed: int, p: float, shape: tuple[int, ...]) -> np.ndarray:
    """A dropout layer's mask for an input of ``shape`` (batch first): True where an element is kept, each
    with probability 1 − p, drawn from ``numpy.random.default_rng(seed)`` (the same on every machine).

    This is how every side of a check gets the same mask: manual_bp's dropout, the torch twin, and a user's
    own implementation, which calls ``manual_bp.keep_mask(layer.seed, layer.p, a.shape)``."""
    return np.random.default_rng(seed).random(tuple(shape)) >= p


@dataclass(frozen=True)
class Dropout:
    """``torch.nn.Dropout(p)`` with its mask drawn from ``seed`` (see the module docstring)."""

    p: float = 0.5
    seed: int = 0
    training: bool = True
    activation: Activation = field(default_factory=lambda: make_activation("identity"))
    type: ClassVar[str] = "dropout"
    fields: ClassVar[tuple[str, ...]] = ("type", "p", "seed", "training", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "Dropout":
        reject_unknown(obj, cls.fields, where)
        return cls(p=number(obj.get("p", 0.5), at(where, "p"), 0.0, 1.0, open_high=True,
                            hint="give a drop probability p in [0, 1) (p = 1 drops everything and checks nothing)"),
                   seed=whole(obj.get("seed", 0), at(where, "seed"), minimum=0, maximum=2**63 - 1),
                   training=parse_bool(obj.get("training", True), at(where, "training")),
                   activation=optional_activation(obj, where))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "p": self.p, "seed": self.seed, "training": self.training,
                "activation": self.activation.to_json()}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        return tuple(int(d) for d in in_shape)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        return {}

    def scaled_mask(self, a: np.ndarray) -> np.ndarray | None:
        """M s for an input of a's shape (None in eval mode)."""
        if not self.training:
            return None
        return keep_mask(self.seed, self.p, a.shape).astype(a.dtype) / a.dtype.type(1 - self.p)

    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        mask = self.scaled_mask(a)
        return a.copy() if mask is None else a * mask

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray):
        mask = self.scaled_mask(a)
        return {}, (delta.copy() if mask is None else delta * mask)
