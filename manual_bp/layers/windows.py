r"""The index maps that convolution and pooling share: padding, sliding windows and their adjoint.

Along one spatial axis of size n, a layer with kernel k, stride s, dilation d and padding
(lo, hi) reads, for output position x and kernel offset j, the padded input

.. math::  \hat a[i] = a[i - lo] \ (0 \le i - lo < n, \text{ else the pad value}), \qquad
           \text{window}[x, j] = \hat a[s x + d j],

for x = 0 … o − 1 with :math:`o = \lfloor (n + lo + hi - d(k-1) - 1)/s \rfloor + 1` (torch's size,
``ceil_mode=False``). ``windows`` is that map as a strided view (no copy). Its adjoint ``col2im``
sends a gradient on the windows back to the input,
:math:`∂C/∂\hat a[i] = \sum_{x, j:\ s x + d j = i} ∂C/∂\text{window}[x, j]`, summing where windows
overlap (stride < extent); ``unpad`` then drops the padding's share. Both act on every spatial axis
at once and keep the batch and channel axes in front.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Pads = Sequence[tuple[int, int]]


def out_size(n: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    """Output positions along an axis of size n: :math:`\\lfloor (n + lo + hi - d(k-1) - 1)/s \\rfloor + 1` (≤ 0: empty)."""
    return (n + lo + hi - d * (k - 1) - 1) // s + 1


def pad(a: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    """a (m, C, *S) with pads[t] = (lo, hi) entries of ``value`` added before and after spatial axis t."""
    if not any(lo or hi for lo, hi in pads):
        return a
    return np.pad(a, ((0, 0), (0, 0), *pads), mode="constant", constant_values=value)


def unpad(g: np.ndarray, pads: Pads) -> np.ndarray:
    """The inverse crop of ``pad``: keep the positions that came from the unpadded input."""
    if not any(lo or hi for lo, hi in pads):
        return g
    crop = tuple(slice(lo, g.shape[2 + t] - hi) for t, (lo, hi) in enumerate(pads))
    return g[(slice(None), slice(None), *crop)]


def windows(ap: np.ndarray, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
    """Read-only view of shape (m, C, *out, *kernel): ``w[..., x, j] = ap[..., s·x + d·j]`` on every spatial axis."""
    nd = len(kernel)
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    view = sliding_window_view(ap, extent, axis=tuple(range(2, 2 + nd)))  # (m, C, *(n̂ − e + 1), *extent)
    every = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride) + tuple(slice(None, None, d) for d in dilation)
    return view[every]


def offsets(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], out: Sequence[int]):
    """For each kernel offset j (row-major), the index of the padded input that offset j of every window
    reads: on each spatial axis the positions d·j, d·j + s, …, d·j + s(o − 1), as one strided slice."""
    for j in np.ndindex(*kernel):
        yield j, (slice(None), slice(None), *(slice(d * jt, d * jt + s * (o - 1) + 1, s)
                                                for jt, s, d, o in zip(j, stride, dilation, out)))


def col2im(dw: np.ndarray, padded_shape: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> np.ndarray:
    """The adjoint of ``windows``: ``dw`` (m, C, *out, *kernel) summed back onto the padded input,
    :math:`g[i] = \\sum_{x, j:\\ s x + d j = i} dw[x, j]`.

    One strided slice addition per kernel offset j (kH·kW of them, each over the whole batch and
    every channel and output position): offset j wrote to the positions d·j, d·j + s, …, d·j + s(o − 1).
    """
    nd = len(stride)
    kernel, out = dw.shape[-nd:], dw.shape[2:2 + nd]
    g = np.zeros(tuple(padded_shape), dtype=dw.dtype)
    for j, at in offsets(kernel, stride, dilation, out):
        g[at] += dw[(Ellipsis, *j)]
    return g
