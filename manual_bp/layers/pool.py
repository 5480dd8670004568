r"""Pooling layers, ``max_pool1d/2d`` and ``avg_pool1d/2d``, as ``torch.nn.functional`` computes them.

Each channel is pooled on its own over windows of size k, stride s (default k) and padding p
(at most k/2 on each axis, as torch requires, so every window holds at least one input element),
``ceil_mode=False``. In ``windows``' index map, window[x, j] = â[s x + j] with â the input padded by p.
No parameters; the activation is the identity.

* max: :math:`z[x] = \max_j \hat a[s x + j]`, â padded with −∞ (padding never wins for finite input);
  :math:`∂C/∂a[i] = \sum_{x:\ s x + j^*(x) = i} δ[x]`, each δ routed to the argmax j*(x) of its
  window. **Ties**: j*(x) is the *first* maximal element of the window in row-major order (kh, then
  kw), which is what torch's CPU kernel picks; any convex split of δ among tied elements is also a
  valid subgradient (the oracle judges ties as a convention).
* avg: :math:`z[x] = \frac{1}{N(x)} \sum_j \hat a[s x + j]`, â padded with 0, N(x) = k (kH·kW) when
  ``count_include_pad`` (torch's default), else the number of window elements inside the input;
  :math:`∂C/∂a[i] = \sum_{x, j:\ s x + j = i} δ[x] / N(x)`.

Max pool walks the k window offsets (one strided slice of â each: every window at once), keeping a
running maximum; its backward walks them again, gives each window's δ to the first offset that holds
the maximum, and adds that share back onto the slice it read. Avg pool lays δ/N out on the windows, (m, C, *out, *kernel), and ``col2im`` adds it back
to the input positions they read. Both are vectorized over the batch, channels and positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..activations import Activation, make_activation
from ..errors import SpecError
from .base import at, check_nonempty, check_rank, int_tuple, parse_bool, reject_unknown, tuple_json
from .windows import col2im, offsets, out_size, pad, unpad, windows


@dataclass(frozen=True)
class _PoolNd:
    """What the four pooling types share: ``kernel_size``, ``stride`` (None: the kernel size),
    ``padding`` (≤ kernel_size/2), each an int or one per spatial axis, kept as tuples."""

    kernel_size: tuple
    stride: Any = None
    padding: tuple = 0
    activation: ClassVar[Activation] = make_activation("identity")
    nd: ClassVar[int] = 0
    type: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ("type", "kernel_size", "stride", "padding")

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("kernel_size", int_tuple(self.kernel_size, "kernel_size", self.nd))
        put("stride", self.kernel_size if self.stride is None else int_tuple(self.stride, "stride", self.nd))
        put("padding", int_tuple(self.padding, "padding", self.nd, minimum=0))
        for p, k in zip(self.padding, self.kernel_size):
            if 2 * p > k:
                raise SpecError("padding", f"{tuple_json(self.padding)} is more than half of kernel_size {tuple_json(self.kernel_size)}",
                                "as torch requires, give padding ≤ kernel_size / 2")

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "_PoolNd":
        reject_unknown(obj, cls.fields, where)
        if "kernel_size" not in obj:
            raise SpecError(at(where, "kernel_size"), "missing", f"every {cls.type} layer needs kernel_size")
        try:
            return cls(**{k: obj[k] for k in cls.fields if k in obj and k != "type"})
        except SpecError as err:  # re-anchor at the layer's path
            raise SpecError(at(where, err.field), err.problem, err.fix) from None

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "kernel_size": tuple_json(self.kernel_size), "stride": tuple_json(self.stride),
                "padding": tuple_json(self.padding)}

    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        return tuple((p, p) for p in self.padding)

    def out_shape(self, in_shape, where: str = "") -> tuple[int, ...]:
        """(C, *out) from (C, *spatial), out = ⌊(n + 2p − k)/s⌋ + 1; refuses a wrong rank or an empty output."""
        shape = check_rank(self.type, in_shape, self.nd, where)
        out = tuple(out_size(n, k, s, 1, p, p) for n, k, s, p in zip(shape[1:], self.kernel_size, self.stride, self.padding))
        return check_nonempty(self.type, shape, (shape[0], *out), where, "use a smaller kernel_size or a larger input")

    def param_shapes(self, in_shape, where: str = "") -> dict[str, tuple[int, ...]]:
        self.out_shape(in_shape, where)
        return {}

    def _padded(self, a: np.ndarray) -> tuple[int, ...]:
        return (*a.shape[:2], *(n + 2 * p for n, p in zip(a.shape[2:], self.padding)))


@dataclass(frozen=True)
class _MaxPool(_PoolNd):
    def _offsets(self, a: np.ndarray):
        """(â, [(index of offset j's reads), ...]): â the −∞-padded input, one strided slice per window offset."""
        ap = pad(a, self.pads, -np.inf)
        out = self.out_shape(a.shape[1:])[1:]
        return ap, [at for _, at in offsets(self.kernel_size, self.stride, (1,) * self.nd, out)]

    def forward(self, p: dict[str, np.ndarray], a: np.ndarray) -> np.ndarray:
        r""":math:`z[x] = \max_j \hat a[s x + j]`: a running maximum over the k offsets, every window at once."""
        ap, reads = self._offsets(a)
        z = ap[reads[0]].copy()
        for at in reads[1:]:
            np.maximum(z, ap[at], out=z)   # NaN propagates, as in torch
        return z

    def backward(self, p, a, delta):
        r""":math:`∂C/∂a[i] = Σ_{x: s x + j^*(x) = i} δ[x]`, j*(x) the first maximal element of window x.

        Walking the offsets in row-major order, the first whose value equals the window's maximum z takes δ,
        so ties keep the first; each offset's share goes back onto what it read. A window holding NaN
        (z is NaN) sends δ to its last NaN, as torch's kernel does (it takes over at every NaN)."""
        ap, reads = self._offsets(a)
        z = self.forward(p, a)
        free = ~np.isnan(z)                               # windows whose δ is not yet placed
        last_nan = np.full(delta.shape, -1)
        if not free.all():
            for k, at in enumerate(reads):
                last_nan[np.isnan(ap[at])] = k
        g = np.zeros(ap.shape, dtype=delta.dtype)
        for k, at in enumerate(reads):
            hit = ((ap[at] == z) & free) | (last_nan == k)
            free &= ~hit
            g[at] += delta * hit
        return {}, unpad(g, self.pads)


@dataclass(frozen=True)
class _AvgPool(_PoolNd):
    count_include_pad: bool = True
    fields: ClassVar[tuple[str, ...]] = ("type", "kernel_size", "stride", "padding", "count_include_pad")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "count_include_pad", parse_bool(self.count_include_pad, "count_include_pad"))

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "count_include_pad": self.count_include_pad}

    def divisor(self, in_shape, dtype) -> np.ndarray:
        """N(x), broadcastable to z: k (kH·kW) with ``count_include_pad``, else the window's elements
        inside the input, :math:`\\prod_t (\\min(s x_t - p + k, n) - \\max(s x_t - p, 0))`."""
        if self.count_include_pad or not any(self.padding):
            return np.asarray(math.prod(self.kernel_size), dtype=dtype)
        out = self.out_shape(in_shape)[1:]
        count = np.ones((), dtype=dtype)
        for t, (n, k, s, p, o) in enumerate(zip(in_shape[1:], self.kernel_size, self.stride, self.padding, out)):
            start = s * np.arange(o) - p
            inside = (np.minimum(start + k, n) - np.maximum(start, 0)).astype(dtype)
            count = count[..., None] * inside if t else inside
        return count

    def forward(self, p: dict[str, np.ndarray], a: np.ndarray) -> np.ndarray:
        r""":math:`z[x] = \frac{1}{N(x)} Σ_j \hat a[s x + j]`."""
        w = windows(pad(a, self.pads), self.kernel_size, self.stride, (1,) * self.nd)
        return w.sum(axis=tuple(range(-self.nd, 0))) / self.divisor(a.shape[1:], a.dtype)

    def backward(self, p, a, delta):
        r""":math:`∂C/∂a[i] = Σ_{x, j: s x + j = i} δ[x] / N(x)`: each window's δ/N spread over it."""
        share = delta / self.divisor(a.shape[1:], a.dtype)
        dw = np.broadcast_to(share.reshape(*share.shape, *(1,) * self.nd), (*share.shape, *self.kernel_size))
        return {}, unpad(col2im(dw, self._padded(a), self.stride, (1,) * self.nd), self.pads)


@dataclass(frozen=True)
class MaxPool1d(_MaxPool):
    """``F.max_pool1d``: (m, C, L) → (m, C, L_out)."""

    nd: ClassVar[int] = 1
    type: ClassVar[str] = "max_pool1d"


@dataclass(frozen=True)
class MaxPool2d(_MaxPool):
    """``F.max_pool2d``: (m, C, H, W) → (m, C, H_out, W_out)."""

    nd: ClassVar[int] = 2
    type: ClassVar[str] = "max_pool2d"


@dataclass(frozen=True)
class AvgPool1d(_AvgPool):
    """``F.avg_pool1d``: (m, C, L) → (m, C, L_out)."""

    nd: ClassVar[int] = 1
    type: ClassVar[str] = "avg_pool1d"


@dataclass(frozen=True)
class AvgPool2d(_AvgPool):
    """``F.avg_pool2d``: (m, C, H, W) → (m, C, H_out, W_out)."""

    nd: ClassVar[int] = 2
    type: ClassVar[str] = "avg_pool2d"
