r"""``embedding``: a lookup table of row vectors, indexed by integer tokens, as ``torch.nn.Embedding``.

The network's input is then token indices x of shape (m, T) (the spec's input shape is (T,); one token
per example is T = 1), each in [0, V). With W the (V, D) table:

.. math::  z[m, t] = W[x[m, t]]\qquad (m, T, D)

Backward, given :math:`δ = ∂C/∂z`: every occurrence of token v adds its δ to row v,

.. math::  ∂C/∂W[v] = \sum_{(m, t):\ x[m, t] = v} δ[m, t]

so a token that appears twice gets the *sum* of both δ (an assignment would keep only one). The row of
``padding_idx``, if given, gets no gradient (its forward value is still W[padding_idx], as in torch).
Tokens are not differentiable: there is no ∂C/∂x, so an embedding must be the first layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import at, optional_activation, positive_int, reject_unknown, shape_text, whole


@dataclass(frozen=True)
class Embedding:
    """``torch.nn.Embedding(num_embeddings, embedding_dim, padding_idx)``: weight (V, D)."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None
    activation: Activation = field(default_factory=lambda: make_activation("identity"))
    type: ClassVar[str] = "embedding"
    tokens: ClassVar[bool] = True  # its input is integer token indices, not values
    fields: ClassVar[tuple[str, ...]] = ("type", "num_embeddings", "embedding_dim", "padding_idx", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "Embedding":
        reject_unknown(obj, cls.fields, where)
        for key in ("num_embeddings", "embedding_dim"):
            if key not in obj:
                raise SpecError(at(where, key), "missing", "every embedding layer needs num_embeddings and embedding_dim")
        v = positive_int(obj["num_embeddings"], at(where, "num_embeddings"))
        pad = obj.get("padding_idx")
        if pad is not None:  # torch takes −V..V−1 and counts a negative index from the end
            if isinstance(pad, bool) or not isinstance(pad, int) or not -v <= pad < v:
                raise SpecError(at(where, "padding_idx"), f"{pad!r} is not a token index in [{-v}, {v})",
                                f"give a token index below num_embeddings = {v}, or null")
            pad = pad % v
        return cls(num_embeddings=v, embedding_dim=positive_int(obj["embedding_dim"], at(where, "embedding_dim")),
                   padding_idx=pad, activation=optional_activation(obj, where))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "activation": self.activation.to_json()}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(T, D) from T tokens per example."""
        shape = tuple(int(d) for d in in_shape)
        if len(shape) != 1:
            raise SpecError(where, f"embedding needs (T,) token input, got {shape_text(shape)}",
                            'give the input as "shape": [T], T tokens per example')
        return (*shape, self.embedding_dim)

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        self.out_shape(in_shape, where)
        return {"weight": (self.num_embeddings, self.embedding_dim)}

    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        """z[m, t] = W[x[m, t]]."""
        return p["weight"][a]

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray):
        """∂C/∂W[v] = Σ of δ over every occurrence of token v (``np.add.at`` accumulates repeats); no ∂C/∂x."""
        grad = np.zeros_like(p["weight"])
        np.add.at(grad, a.reshape(-1), delta.reshape(-1, self.embedding_dim))
        if self.padding_idx is not None:
            grad[self.padding_idx] = 0
        return {"weight": grad}, None
