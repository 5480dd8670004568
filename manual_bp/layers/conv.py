r"""Convolution layers, ``conv1d`` and ``conv2d``, as ``torch.nn.Conv1d`` / ``Conv2d`` compute them.

Notation (one spatial axis written; 2-D applies the same map on H and W at once): the input a is
(m, C, n), padded to â (``windows``' index map: â[i] = a[i − lo], 0 outside); the weight θ is
(O, C/G, k) in torch's layout, with G ``groups``: output channel o reads only the C/G input channels
of its group g(o). Stride s, dilation d. What torch calls convolution is a cross-correlation:

.. math::  z[m, o, x] = b[o] + \sum_{c \in g(o)} \sum_{j=0}^{k-1} θ[o, c, j]\; \hat a[m, c, s x + d j]
           \qquad (z = θ ⋆ a + b)

Backward, given :math:`δ = ∂C/∂z` of z's shape (m, O, o):

* :math:`∂C/∂θ[o, c, j] = \sum_{m, x} δ[m, o, x]\; \hat a[m, c, s x + d j]`  (δ ⋆ a: δ correlated with a);
* :math:`∂C/∂b[o] = \sum_{m, x} δ[m, o, x]`  (summed over the batch *and* every output position);
* :math:`∂C/∂\hat a[m, c, i] = \sum_{o \in g(c)} \sum_{x, j:\ s x + d j = i} δ[m, o, x]\; θ[o, c, j]`, the
  *full convolution* of δ with the flipped kernel: spread δ out by the stride (s − 1 zeros between
  entries), pad it by d(k − 1) on both sides, and correlate it with θ[o, c, k − 1 − j], in and out
  channels swapped within each group. Then ∂C/∂a drops the padding's share: ∂C/∂a[i] = ∂C/∂â[i + lo].

All three are computed with im2col: the windows of â laid out as a matrix ``cols`` of shape
(G, C/G·k, m·o), one column per output position of every example, so that per group

    z = θ cols (+ b),     ∂C/∂θ = δ colsᵀ,     ∂C/∂cols = θᵀ δ,

three matrix products. Then every column of ∂C/∂cols is added back onto the input positions it was
read from (col2im's index map, ``windows.offsets``), which is the full convolution above written as
its index map. No loop over the batch, the channels or the pixels; only over the k (or kH·kW) kernel
offsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from ..named import show
from .base import at, check_nonempty, check_rank, int_tuple, parse_bool, parse_named, positive_int, reject_unknown, shape_text, tuple_json
from .windows import offsets, out_size, pad, unpad, windows


@dataclass(frozen=True)
class _ConvNd:
    """What conv1d and conv2d share; ``nd`` is the number of spatial axes.

    Fields as torch's: ``kernel_size``, ``stride``, ``dilation`` (an int, or one per spatial axis),
    ``padding`` (the same, or ``"same"``: output size = input size, stride 1 only, the odd one out
    on the right as torch pads it), ``groups`` (divides the input and output channels), ``bias``.
    Per-axis fields are kept as tuples.
    """

    out_channels: int
    kernel_size: tuple
    activation: Activation
    stride: tuple = 1
    padding: Any = 0          # tuple of ints, or "same"
    dilation: tuple = 1
    groups: int = 1
    bias: bool = True
    nd: ClassVar[int] = 0
    type: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = (
        "type", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "activation", "bias")

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        nd = self.nd
        put("out_channels", positive_int(self.out_channels, "out_channels"))
        put("kernel_size", int_tuple(self.kernel_size, "kernel_size", nd))
        put("stride", int_tuple(self.stride, "stride", nd))
        put("dilation", int_tuple(self.dilation, "dilation", nd))
        if isinstance(self.padding, str):
            if self.padding != "same":
                raise SpecError("padding", f"{show(self.padding)} is not a padding", 'give a whole number ≥ 0, one per spatial axis, or "same"')
            if self.stride != (1,) * nd:
                raise SpecError("padding", f'"same" needs stride 1, got stride {tuple_json(self.stride)}',
                                "as in torch, give a strided convolution its padding as numbers")
        else:
            put("padding", int_tuple(self.padding, "padding", nd, minimum=0))
        put("groups", positive_int(self.groups, "groups"))
        if self.out_channels % self.groups:
            raise SpecError("groups", f"{self.groups} does not divide out_channels = {self.out_channels}",
                            "choose groups that divide both the input and the output channels")
        put("bias", parse_bool(self.bias, "bias"))

    # -- the spec ------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "_ConvNd":
        reject_unknown(obj, cls.fields, where)
        for key in ("out_channels", "kernel_size", "activation"):
            if key not in obj:
                raise SpecError(at(where, key), "missing", f"every {cls.type} layer needs {key}")
        activation = parse_named(obj["activation"], at(where, "activation"), make_activation)
        settings = {k: obj[k] for k in cls.fields if k in obj and k not in ("type", "activation")}
        try:
            return cls(activation=activation, **settings)
        except SpecError as err:  # re-anchor at the layer's path
            raise SpecError(at(where, err.field), err.problem, err.fix) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type, "out_channels": self.out_channels, "kernel_size": tuple_json(self.kernel_size),
            "stride": tuple_json(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else tuple_json(self.padding),
            "dilation": tuple_json(self.dilation), "groups": self.groups,
            "activation": self.activation.to_json(), "bias": self.bias,
        }

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        """(lo, hi) zeros per spatial axis; ``"same"`` pads d(k − 1) in all, lo = ⌊d(k − 1)/2⌋ (torch's split)."""
        if self.padding == "same":
            total = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        return tuple((p, p) for p in self.padding)

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(O, *out) from (C, *spatial); refuses a wrong rank, groups not dividing C, an empty output."""
        shape = check_rank(self.type, in_shape, self.nd, where)
        channels, spatial = shape[0], shape[1:]
        if channels % self.groups:
            raise SpecError(at(where, "groups"), f"{self.groups} does not divide the {channels} input channels of {shape_text(shape)}",
                            "choose groups that divide both the input and the output channels")
        out = tuple(out_size(n, k, s, d, lo, hi) for n, k, s, d, (lo, hi)
                    in zip(spatial, self.kernel_size, self.stride, self.dilation, self.pads))
        return check_nonempty(self.type, shape, (self.out_channels, *out), where,
                              "use a smaller kernel_size, dilation or stride, more padding, or a larger input")

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        """torch's layouts: weight (O, C/G, *kernel), bias (O,)."""
        self.out_shape(in_shape, where)  # refuses what no weight fits
        channels = int(in_shape[0])
        shapes = {"weight": (self.out_channels, channels // self.groups, *self.kernel_size)}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    # -- the equations -------------------------------------------------------------------------------
    def _cols(self, a: np.ndarray) -> np.ndarray:
        """im2col: cols[g, (c, j), (m, x)] = â[m, g·C/G + c, s x + d j], shape (G, C/G·K, m·P)."""
        nd, G = self.nd, self.groups
        m, C = a.shape[:2]
        w = windows(pad(a, self.pads), self.kernel_size, self.stride, self.dilation)  # (m, C, *out, *kernel)
        out = w.shape[2:2 + nd]
        w = w.reshape(m, G, C // G, *out, *self.kernel_size)
        # (m, g, c, *x, *j) -> (g, c, *j, m, *x): channel and kernel offset index rows, example and position columns
        order = (1, 2, *range(3 + nd, 3 + 2 * nd), 0, *range(3, 3 + nd))
        return w.transpose(order).reshape(G, C // G * math.prod(self.kernel_size), m * math.prod(out))

    def forward(self, p: dict[str, np.ndarray], a: np.ndarray) -> np.ndarray:
        r""":math:`z = θ ⋆ a + b`: per group, θ (O/G, C/G·K) times cols (C/G·K, m·P)."""
        return self.forward_saved(p, a)[0]

    def forward_saved(self, p: dict[str, np.ndarray], a: np.ndarray):
        """(z, cols): the forward and its im2col matrix, which the backward's ∂C/∂θ = δ colsᵀ reuses."""
        m, G, O = a.shape[0], self.groups, self.out_channels
        out = self.out_shape(a.shape[1:])[1:]
        theta = p["weight"].reshape(G, O // G, -1)
        cols = self._cols(a)
        z = theta @ cols                                                     # (G, O/G, m·P)
        z = z.reshape(O, m, *out).swapaxes(0, 1)                            # (m, O, *out)
        z = np.ascontiguousarray(z)
        if self.bias:
            z += p["bias"].reshape(O, *(1,) * self.nd)
        return z, cols

    def backward(
        self, p: dict[str, np.ndarray], a: np.ndarray, delta: np.ndarray, saved=None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        r""":math:`∂C/∂θ = δ ⋆ a`, :math:`∂C/∂b = Σ_{m,x} δ`, :math:`∂C/∂a` = δ fully convolved with the flipped θ.
        ``saved``: the forward's cols (``forward_saved``), recomputed when not given."""
        nd, G, O = self.nd, self.groups, self.out_channels
        m, C = a.shape[:2]
        out = delta.shape[2:]
        cols = saved if saved is not None else self._cols(a)                 # (G, C/G·K, m·P)
        d = delta.reshape(m, O, -1).swapaxes(0, 1).reshape(G, O // G, -1)   # (G, O/G, m·P)
        theta = p["weight"].reshape(G, O // G, -1)                           # (G, O/G, C/G·K)
        nabla = {"weight": (d @ cols.swapaxes(1, 2)).reshape(p["weight"].shape)}
        if self.bias:
            nabla["bias"] = delta.sum(axis=(0, *range(2, 2 + nd)))
        dcols = theta.swapaxes(1, 2) @ d                                     # θᵀδ: (G, C/G·K, m·P)
        # each kernel offset's rows of ∂C/∂cols go back onto the input positions that offset read
        # (col2im's index map), accumulated channel-major as dcols is laid out, then swapped to (m, C, ...)
        dw = dcols.reshape(C, *self.kernel_size, m, *out)
        g = np.zeros((C, m, *(n + lo + hi for n, (lo, hi) in zip(a.shape[2:], self.pads))), dtype=dcols.dtype)
        for j, at in offsets(self.kernel_size, self.stride, self.dilation, out):
            g[at] += dw[(slice(None), *j)]
        return nabla, np.ascontiguousarray(unpad(g.swapaxes(0, 1), self.pads))


@dataclass(frozen=True)
class Conv1d(_ConvNd):
    """``torch.nn.Conv1d``: input (m, C, L), weight (O, C/G, k), output (m, O, L_out)."""

    nd: ClassVar[int] = 1
    type: ClassVar[str] = "conv1d"


@dataclass(frozen=True)
class Conv2d(_ConvNd):
    """``torch.nn.Conv2d``: input (m, C, H, W), weight (O, C/G, kH, kW), output (m, O, H_out, W_out)."""

    nd: ClassVar[int] = 2
    type: ClassVar[str] = "conv2d"
