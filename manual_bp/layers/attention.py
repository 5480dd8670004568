r"""``attention``: multi-head self-attention over a sequence (T, d), as ``torch.nn.MultiheadAttention(d, h,
bias=bias, batch_first=True)`` called as ``mha(x, x, x, need_weights=False, attn_mask=causal_mask)``.

The parameters are torch's: the stacked projection :math:`W_{in}` (3d, d) with :math:`b_{in}` (3d,), and
:math:`W_{out}` (d, d) with :math:`b_{out}` (d,) (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``). Each of the h heads reads d_h = d/h columns of q, k and v (head j: columns j·d_h to
(j+1)·d_h). Forward, one example, per head:

.. math::

    [q\ k\ v] = x W_{in}^T + b_{in},\qquad S = \frac{q k^T}{\sqrt{d_h}}\quad (T, T),\qquad
    P = \operatorname{softmax}_s(S),\qquad O = P v

with, when ``causal``, :math:`S[t, s] = -∞` for s > t (a step sees itself and the steps before it). The
softmax runs over s, each row less its maximum first, so a huge score gives 1, never inf/inf. The heads'
O, side by side, make the context C (T, d), and :math:`z = C W_{out}^T + b_{out}`.

Backward, given :math:`δ = ∂C/∂z` (T, d), per head, summed over the batch (and the steps for the weights):

* :math:`∂C/∂W_{out} = \sum δ^T C`, :math:`∂C/∂b_{out} = \sum δ`, and :math:`dO = δ W_{out}` split into heads;
* through O = P v: :math:`dP = dO\, v^T` and :math:`dv = P^T dO`;
* through the softmax, row by row: :math:`dS = P ⊙ (dP - \sum_s dP ⊙ P)` (its vector-Jacobian product; a
  masked entry has P = 0, so its dS is 0: the −∞ gets no gradient);
* through S: :math:`dq = dS\, k / \sqrt{d_h}` and :math:`dk = dS^T q / \sqrt{d_h}` (the scale is in both);
* the heads side by side again, :math:`G = [dq\ dk\ dv]` (T, 3d): :math:`∂C/∂W_{in} = \sum G^T x`,
  :math:`∂C/∂b_{in} = \sum G`, and :math:`∂C/∂x = G\, W_{in}` (q, k and v all come from x: three paths, one sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import at, optional_activation, parse_bool, positive_int, reject_unknown, shape_text


def softmax(S: np.ndarray) -> np.ndarray:
    """softmax over the last axis, each row less its maximum first (exp of ≤ 0: no overflow; −∞ gives 0)."""
    e = np.exp(S - S.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_vjp(P: np.ndarray, dP: np.ndarray) -> np.ndarray:
    r"""∂C/∂S from ∂C/∂P through P = softmax(S) over the last axis: :math:`P ⊙ (dP - \sum_s dP ⊙ P)`."""
    return P * (dP - (dP * P).sum(axis=-1, keepdims=True))


_SOFTMAX_VJP = softmax_vjp  # (backward's keyword of the same name hides it there)


def future_mask(T: int) -> np.ndarray:
    """(T, T) booleans, True where s > t: the entries a causal step may not see."""
    return np.triu(np.ones((T, T), dtype=bool), 1)


@dataclass(frozen=True)
class Attention:
    """``torch.nn.MultiheadAttention(d, num_heads, bias=bias, batch_first=True)`` as self-attention on (T, d).

    Fields: ``num_heads`` (dividing d, the input's last size), ``causal`` (false: every step sees every step;
    true: each step sees itself and the earlier ones), ``bias`` (true: ``in_proj_bias`` and ``out_proj.bias``),
    ``activation`` (identity).
    """

    num_heads: int
    causal: bool = False
    bias: bool = True
    activation: Activation = field(default_factory=lambda: make_activation("identity"))
    type: ClassVar[str] = "attention"
    fields: ClassVar[tuple[str, ...]] = ("type", "num_heads", "causal", "bias", "activation")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "Attention":
        reject_unknown(obj, cls.fields, where)
        if "num_heads" not in obj:
            raise SpecError(at(where, "num_heads"), "missing", "every attention layer needs num_heads (dividing the input's d)")
        return cls(num_heads=positive_int(obj["num_heads"], at(where, "num_heads")),
                   causal=parse_bool(obj.get("causal", False), at(where, "causal")),
                   bias=parse_bool(obj.get("bias", True), at(where, "bias")),
                   activation=optional_activation(obj, where))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "num_heads": self.num_heads, "causal": self.causal, "bias": self.bias,
                "activation": self.activation.to_json()}

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(T, d) from a sequence (T, d) whose d the heads divide."""
        shape = tuple(int(n) for n in in_shape)
        if len(shape) != 2:
            raise SpecError(where, f"attention needs (T, d) input, got {shape_text(shape)}",
                            'give a sequence input, "shape": [T, d]')
        d = shape[1]
        if d % self.num_heads:
            raise SpecError(at(where, "num_heads"), f"{self.num_heads} heads do not divide d = {d} (input {shape_text(shape)})",
                            "the heads must divide d, the input's last size: give a num_heads that divides it")
        return shape

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        """torch's state_dict names and order: in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias."""
        d = self.out_shape(in_shape, where)[1]
        shapes = {"in_proj_weight": (3 * d, d)}
        if self.bias:
            shapes["in_proj_bias"] = (3 * d,)
        shapes["out_proj.weight"] = (d, d)
        if self.bias:
            shapes["out_proj.bias"] = (d,)
        return shapes

    # -- heads ---------------------------------------------------------------------------------------------
    def _split(self, t: np.ndarray) -> np.ndarray:
        """(m, T, d) → (m, h, T, d_h): head j takes columns j·d_h:(j+1)·d_h."""
        m, T, d = t.shape
        return t.reshape(m, T, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    @staticmethod
    def _join(t: np.ndarray) -> np.ndarray:
        """(m, h, T, d_h) → (m, T, d), the heads side by side."""
        m, h, T, dh = t.shape
        return t.transpose(0, 2, 1, 3).reshape(m, T, h * dh)

    # -- the contract ----------------------------------------------------------------------------------------
    def forward(self, p: dict, a: np.ndarray) -> np.ndarray:
        """z = C W_outᵀ + b_out, C the heads' softmax(q kᵀ/√d_h) v side by side."""
        return self.forward_saved(p, a)[0]

    def forward_saved(self, p: dict, a: np.ndarray):
        """(z, saved): saved holds q, k, v (m, h, T, d_h), probs P (m, h, T, T) and context C (m, T, d)."""
        m, T, d = a.shape
        qkv = a.reshape(m * T, d) @ p["in_proj_weight"].T
        if self.bias:
            qkv += p["in_proj_bias"]
        h, dh = self.num_heads, d // self.num_heads
        q, k, v = qkv.reshape(m, T, 3, h, dh).transpose(2, 0, 3, 1, 4)  # each (m, h, T, d_h)
        S = (q @ k.swapaxes(-1, -2)) / math.sqrt(dh)
        if self.causal:
            S[..., future_mask(T)] = -np.inf
        P = softmax(S)
        context = self._join(P @ v)
        z = context @ p["out_proj.weight"].T
        if self.bias:
            z += p["out_proj.bias"]
        return z, {"q": q, "k": k, "v": v, "probs": P, "context": context}

    def backward(self, p: dict, a: np.ndarray, delta: np.ndarray, saved=None, *, softmax_vjp=None,
                 scale_in_backward: bool = True, swap_kv: bool = False):
        """The gradients of the module docstring, every head and example at once; ``saved``: what
        ``forward_saved`` kept (recomputed when not given).

        The keywords only let a mutant model a real bug: ``softmax_vjp(P, dP) -> dS`` in place of the correct
        one, ``scale_in_backward=False`` leaves 1/√d_h out of dq and dk, ``swap_kv=True`` routes dk where dv
        belongs and dv where dk belongs."""
        if saved is None:
            saved = self.forward_saved(p, a)[1]
        q, k, v, P, context = (saved[key] for key in ("q", "k", "v", "probs", "context"))
        m, T, d = a.shape
        dh = d // self.num_heads
        nabla = {"out_proj.weight": delta.reshape(m * T, d).T @ context.reshape(m * T, d)}
        if self.bias:
            nabla["out_proj.bias"] = delta.sum(axis=(0, 1))
        dO = self._split(delta @ p["out_proj.weight"])       # (m, h, T, d_h)
        dP = dO @ v.swapaxes(-1, -2)                          # (m, h, T, T)
        dv = P.swapaxes(-1, -2) @ dO
        dS = (_SOFTMAX_VJP if softmax_vjp is None else softmax_vjp)(P, dP)
        if self.causal:
            dS = np.where(future_mask(T), 0.0, dS)            # the −∞ entries are constants: no gradient
        scale = 1 / math.sqrt(dh) if scale_in_backward else 1.0
        dq = (dS @ k) * scale
        dk = (dS.swapaxes(-1, -2) @ q) * scale
        if swap_kv:
            dk, dv = dv, dk
        G = np.stack((dq, dk, dv), axis=2).transpose(0, 3, 2, 1, 4).reshape(m * T, 3 * d)  # (m·T, 3d): [dq dk dv]
        nabla = {"in_proj_weight": G.T @ a.reshape(m * T, d),
                 **({"in_proj_bias": G.sum(axis=0)} if self.bias else {}), **nabla}
        return nabla, (G @ p["in_proj_weight"]).reshape(m, T, d)
