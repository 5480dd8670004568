r"""Layer types: what a layer's spec holds, its parameters, and its forward and backward equations.

A layer maps the previous activation :math:`a^{(l)}` to a pre-activation :math:`z^{(l+1)}`; its
activation g then gives :math:`a^{(l+1)} = g(z^{(l+1)})`. Backward is handed
:math:`\delta = \partial C/\partial z^{(l+1)}` and returns the parameter gradients and
:math:`\partial C/\partial a^{(l)}` for the layer below.

Each layer type registers itself in ``LAYER_TYPES`` under its spec ``"type"``. Later types
(conv, pooling, normalization, residual, recurrent) are new classes here; old specs keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .activations import Activation, make_activation
from .errors import SpecError
from .named import count, show, show_key

#: the largest units or input_size a spec may give (a layer of more is no network one can check)
MAX_SIZE = 2**31


def parse_named(value: Any, field: str, make) -> Any:
    """An activation or loss from its spec form: a name, or ``{"name": ..., param: value, ...}``."""
    if isinstance(value, str):
        params: dict[str, Any] = {}
        name = value
    elif isinstance(value, dict):
        if "name" not in value:
            raise SpecError(field, f"{show(value)} has no 'name'", 'write e.g. {"name": "leaky_relu", "negative_slope": 0.1}')
        params = {k: v for k, v in value.items() if k != "name"}
        for key in params:
            if not isinstance(key, str):
                raise SpecError(f"{field}.{show_key(key)}", "is not a parameter name", "name parameters with strings")
        name = value["name"]
        if not isinstance(name, str):
            raise SpecError(f"{field}.name", f"{show(name)} is not a string", "give the name as a string")
    else:
        raise SpecError(field, f"{show(value)} is neither a name nor an object", 'write a name such as "tanh"')
    try:
        return make(name, **params)
    except SpecError as err:
        # re-anchor the message at the full path of the field
        sub = err.field.partition(".")[2]
        raise SpecError(f"{field}.{sub}" if sub else field, err.problem, err.fix) from None


def positive_int(value: Any, field: str, maximum: int = MAX_SIZE) -> int:
    """A whole number in [1, maximum] (a JSON integer: not a bool, not 3.0, not "3")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"{show(value)} is not an integer", "give a whole number ≥ 1")
    if value < 1:
        raise SpecError(field, f"{show(value)} is not positive", "give a whole number ≥ 1")
    if value > maximum:
        raise SpecError(field, f"{count(value)} is too large", f"give at most {maximum}")
    return int(value)


def reject_unknown(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            key = show_key(key)
            raise SpecError(f"{where}.{key}" if where else key, "unknown field", f"allowed fields are: {', '.join(allowed)}")


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
                raise SpecError(f"{where}.{key}", "missing", f"every dense layer needs {key}")
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

    def param_shapes(self, n_in: int) -> dict[str, tuple[int, ...]]:
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


LAYER_TYPES: dict[str, type] = {Dense.type: Dense}
