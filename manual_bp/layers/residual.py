r"""``residual``: a block whose output adds its input back, ``body(x) + x``, or ``body(x) + P(x)`` with a projection.

The body is a list of layers of any type (residual blocks included, so blocks nest), each followed by its
own activation as in the network; P is a dense or 1×1 conv layer when the body changes the shape. The block's
own ``activation`` (default identity) follows the sum, as the relu after a ResNet basic block:

.. math::  z = h_J + s,\qquad h_0 = a,\ h_{j+1} = g_j(L_j(h_j)),\qquad s = a \text{ or } P(a)

Backward, given :math:`δ = ∂C/∂z`: both paths receive δ, and their gradients add at the input,

.. math::  ∂C/∂h_J = δ,\qquad ∂C/∂a = \underbrace{(\text{the body's δ recursion from } δ)}_{\text{through } L_{J-1} \dots L_0}
           + \underbrace{δ \text{ (or } P\text{'s backward of } δ)}_{\text{the identity path}}

so dropping the identity path's δ is the classic residual bug. P is a dense layer or a conv (usually 1×1; any
conv whose output has the body's shape works). Parameters are named as torch's nested
modules: ``layers.{i}.body.{j}.weight``, ``layers.{i}.projection.weight``; the δ of body layer j is reported
as ``layers.{i}.body.{j}``, the projection's (the block's δ) as ``layers.{i}.projection`` (``backward_with_deltas``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from ..named import show
from .base import at, forward_keeping, kept, optional_activation, reject_unknown, shape_text

PROJECTIONS = ("dense", "conv1d", "conv2d")


def _sub(p: dict, prefix: str) -> dict:
    """The parameters under ``prefix`` ("body.0.", "projection."), by their names inside it."""
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def _prefixed(prefix: str, d: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()}


@dataclass(frozen=True)
class Residual:
    """A residual block: ``body`` (a tuple of layers), an optional ``projection`` on the skip path, and the
    block's ``activation`` after the sum."""

    body: tuple
    projection: Any = None
    activation: Activation = field(default_factory=lambda: make_activation("identity"))
    type: ClassVar[str] = "residual"
    fields: ClassVar[tuple[str, ...]] = ("type", "body", "projection", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "Residual":
        from . import LAYER_TYPES  # the registry holds this class too

        reject_unknown(obj, cls.fields, where)
        body = obj.get("body")
        if not isinstance(body, list) or not body:
            raise SpecError(at(where, "body"), f"{show(body)} is not a non-empty list of layers",
                            'write "body": [{"type": "dense", ...}, ...]')
        layers = []
        for j, lj in enumerate(body):
            w = f"{at(where, 'body')}[{j}]"
            layer = _parse(lj, w, LAYER_TYPES)
            if getattr(layer, "tokens", False):
                raise SpecError(w, f"{layer.type} takes token indices and cannot sit inside a block",
                                "put it first in the network, before any block")
            layers.append(layer)
        proj = obj.get("projection")
        if proj is not None:
            w = at(where, "projection")
            proj = _parse(proj, w, LAYER_TYPES)
            if proj.type not in PROJECTIONS:
                raise SpecError(f"{w}.type", f"{proj.type} cannot be a projection", "use a dense layer or a conv (conv1d/conv2d, usually 1×1)")
            if proj.activation.name != "identity":
                raise SpecError(f"{w}.activation", f"{proj.activation.name} on a projection", "a projection is linear: use identity")
        return cls(body=tuple(layers), projection=proj, activation=optional_activation(obj, where))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "body": [layer.to_json() for layer in self.body],
                "projection": None if self.projection is None else self.projection.to_json(),
                "activation": self.activation.to_json()}

    # -- shapes ------------------------------------------------------------------------------------------
    def body_shapes(self, in_shape, where: str = "") -> list[tuple[int, ...]]:
        """The input shape of every body layer, then the body's output shape."""
        shapes = [tuple(int(d) for d in in_shape)]
        for j, layer in enumerate(self.body):
            shapes.append(tuple(layer.out_shape(shapes[-1], f"{at(where, 'body')}.{j}")))
        return shapes

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        shapes = self.body_shapes(in_shape, where)
        skip = shapes[0] if self.projection is None else tuple(self.projection.out_shape(shapes[0], at(where, "projection")))
        if shapes[-1] != skip:
            fix = ("give a projection (a dense or 1×1 conv layer) that maps the input to the body's output shape"
                   if self.projection is None else "make the projection's output the body's output shape")
            raise SpecError(where, f"residual body maps {shape_text(shapes[0])} to {shape_text(shapes[-1])}, but the "
                                   f"skip path carries {shape_text(skip)}", fix)
        return shapes[-1]

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        shapes, out = self.body_shapes(in_shape, where), {}
        self.out_shape(in_shape, where)
        for j, layer in enumerate(self.body):
            out.update(_prefixed(f"body.{j}.", layer.param_shapes(shapes[j], f"{at(where, 'body')}.{j}")))
        if self.projection is not None:
            out.update(_prefixed("projection.", self.projection.param_shapes(shapes[0], at(where, "projection"))))
        return out

    def buffer_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        shapes, out = self.body_shapes(in_shape, where), {}
        for j, layer in enumerate(self.body):
            if hasattr(layer, "buffer_shapes"):
                out.update(_prefixed(f"body.{j}.", layer.buffer_shapes(shapes[j], f"{at(where, 'body')}.{j}")))
        return out

    def check_batch(self, m: int, in_shape, where: str) -> None:
        shapes = self.body_shapes(in_shape, where)
        for j, layer in enumerate(self.body):
            if hasattr(layer, "check_batch"):
                layer.check_batch(m, shapes[j], f"{where}.body.{j}")

    # -- forward and backward ------------------------------------------------------------------------------
    def _forward(self, p: dict, a: np.ndarray):
        """(z, zs, hs, saved): the block's output, each body layer's z_j, the body's activations h_0 = a, ..., h_J,
        and what each block inside the body saved (None for other layers)."""
        hs, zs, self_saved = [a], [], []
        for j, layer in enumerate(self.body):
            z, keep = forward_keeping(layer, _sub(p, f"body.{j}."), hs[-1])  # what its backward reuses
            zs.append(z)
            self_saved.append(keep)
            hs.append(layer.activation.value(z))
        skip = a if self.projection is None else self.projection.forward(_sub(p, "projection."), a)
        return hs[-1] + skip, zs, hs, self_saved

    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        """z = h_J + a (or + P(a))."""
        return self._forward(p, a)[0]

    def forward_saved(self, p: dict, a: np.ndarray):
        """(z, saved): the forward and what backward and ``updated_buffers`` reuse (every z_j and h_j of the body),
        so that the body runs once per forward + backward (``manual_bp.network`` keeps it in its Cache)."""
        z, zs, hs, inner = self._forward(p, a)
        return z, (zs, hs, inner)

    def backward_with_deltas(self, p: dict, a: np.ndarray, delta: np.ndarray, saved=None):
        """(grads, ∂C/∂a, deltas): δ runs back through the body (δ_j = ∂C/∂z_j, keyed ``body.{j}``) and through the
        skip path, and the two gradients add at the block's input. ``saved``: what ``forward_saved`` returned."""
        zs, hs, inner_saved = saved if saved is not None else self._forward(p, a)[1:]
        grads, deltas, g = {}, {}, delta                      # ∂C/∂h_J = δ
        for j in reversed(range(len(self.body))):
            layer = self.body[j]
            d = layer.activation.vjp(zs[j], hs[j + 1], g)     # δ_j = ∂C/∂h_{j+1} ⊙ g_j'(z_j)
            deltas[f"body.{j}"] = d
            if hasattr(layer, "backward_with_deltas"):
                nabla, g, inner = layer.backward_with_deltas(_sub(p, f"body.{j}."), hs[j], d, inner_saved[j])
                deltas.update(_prefixed(f"body.{j}.", inner))
            else:
                nabla, g = layer.backward(_sub(p, f"body.{j}."), hs[j], d, *kept(inner_saved[j]))
            grads.update(_prefixed(f"body.{j}.", nabla))
        if self.projection is None:
            return grads, g + delta, deltas                   # the identity path hands δ straight down
        nabla, through = self.projection.backward(_sub(p, "projection."), a, delta)
        grads.update(_prefixed("projection.", nabla))
        deltas["projection"] = delta                          # P(a) is added to z: its δ is the block's
        return grads, g + through, deltas

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray):
        grads, grad_a, _ = self.backward_with_deltas(p, a, delta)
        return grads, grad_a

    def updated_buffers(self, p: dict, a: np.ndarray, saved=None) -> dict[str, np.ndarray]:
        _, hs, inner_saved = saved if saved is not None else self._forward(p, a)[1:]
        out = {}
        for j, layer in enumerate(self.body):
            if hasattr(layer, "updated_buffers"):
                out.update(_prefixed(f"body.{j}.", layer.updated_buffers(_sub(p, f"body.{j}."), hs[j], *kept(inner_saved[j]))))
        return out


def _parse(obj: Any, where: str, types: dict):
    if not isinstance(obj, dict):
        raise SpecError(where, f"{show(obj)} is not an object", 'write {"type": "dense", "units": ..., "activation": ...}')
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in types:
        raise SpecError(f"{where}.type", f"unknown layer type {show(kind)}", f"choose one of: {', '.join(types)}")
    layer = types[kind].from_json(obj, where)
    if layer.activation.output_only:
        raise SpecError(f"{where}.activation", f"{layer.activation.name} couples the units and may only end the network",
                        "use an elementwise activation inside a block")
    return layer
