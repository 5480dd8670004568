r"""How rounding errors move through each layer type's map: the absolute-value twin |L| of every layer.

Every layer computes z = L(a; θ) + b. For dense, conv, avg pool and flatten, L is linear in a for fixed
θ and linear in θ for fixed a, so the rounding analysis (``oracle.rounding``) and the measured noise
(``oracle.noise``) need only four maps of magnitudes per layer, written for dense as

.. math::

    |L|(E) = E\,|θ|^T,\qquad |J_a|^T v = v\,|θ|,\qquad |J_θ|^T(v, A) = v^T A,\qquad Σ_b v = \textstyle\sum_i v_i

(errors E of the input moved to z; errors or magnitudes v of δ moved to ∂C/∂a, to ∂C/∂θ at input
magnitudes A, and to ∂C/∂b), plus the number of rounded operations each result adds up (the k of γ_k):

=========  =====================  ===========================  ======================
layer      k of z                 k of ∂C/∂a                   k of ∂C/∂θ, ∂C/∂b
=========  =====================  ===========================  ======================
dense      fan-in + 2             out + 1                      m + 1
conv       C/G·∏kernel + 2        O/G·∏kernel + 1 (a bound)    m·∏out + 1
avg pool   ∏kernel + 1            ∏⌈k/s⌉ + 1 (overlaps)        –
max pool   0 (a max is exact)     ∏⌈k/s⌉ − 1 (overlaps add)    –
flatten    0                      0                            –
=========  =====================  ===========================  ======================

Dense uses NumPy products; every other type evaluates its torch twin (``twin.TWIN_LAYERS``) with |θ|
or |a| in place and lets autograd give the transposes, so a new linear layer type needs only its
counts here. Max pool is not linear: |max(a + e) − max a| ≤ max |e| bounds its forward, and its
backward routes v as torch does at the reference input. Which element wins a window is a choice,
like the side of a kink: ``contenders`` finds the ties, and the checker follows the candidate's choice
among them (``twin.route_weights``) as it follows its side of a kink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .twin import TWIN_LAYERS, pool_windows


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _overlap(layer) -> int:
    """How many windows of a pool can cover one input element: ∏⌈k/s⌉."""
    return math.prod(-(-k // s) for k, s in zip(layer.kernel_size, layer.stride))


@dataclass
class Magnitudes:
    """The magnitude maps of layer ``layer`` with parameters ``w`` (short names, float64) at the reference
    input ``a`` (its sign decides max pool's routing): see the module docstring."""

    layer: object
    w: dict
    a: np.ndarray
    route: torch.Tensor | None = None  # a max pool's routing weights at ties (twin.route_weights); None: torch's

    def __post_init__(self):
        self._winners = None
        layer, m = self.layer, self.a.shape[0]
        kind = layer.type
        self.abs_w = {k: np.abs(v) for k, v in self.w.items()}
        if kind == "dense":
            W = self.abs_w["weight"]
            self.k_z, self.k_in, self.k_w = W.shape[1] + 2, W.shape[0] + 1, m + 1
        elif kind.startswith("conv"):
            W = self.abs_w["weight"]
            out_spatial = math.prod(layer.out_shape(self.a.shape[1:])[1:])
            self.k_z = math.prod(W.shape[1:]) + 2
            self.k_in = W.shape[0] // layer.groups * math.prod(W.shape[2:]) + 1
            self.k_w = m * out_spatial + 1
        elif kind.startswith("avg_pool"):
            self.k_z, self.k_in, self.k_w = math.prod(layer.kernel_size) + 1, _overlap(layer) + 1, 0
        elif kind.startswith("max_pool"):
            self.k_z, self.k_in, self.k_w = 0, _overlap(layer) - 1, 0
        elif kind == "flatten":
            self.k_z = self.k_in = self.k_w = 0
        else:  # a new layer type must say how many terms its sums add (see manual_bp/layers/base.py)
            raise NotImplementedError(f"oracle.magnitudes has no rounding counts for layer type {kind!r}")

    # -- forward ----------------------------------------------------------------------------------------
    def forward(self, E: np.ndarray) -> np.ndarray:
        """|L|(E): how errors E of the input bound errors of z."""
        if self.layer.type == "dense":
            return E @ self.abs_w["weight"].T
        if self.layer.type.startswith("max_pool"):  # the max moves by at most the largest error in its window
            return TWIN_LAYERS[self.layer.type](self.layer, {}, _t(E)).numpy()
        return self._op(_t(E), self._abs_weight()).numpy()

    def terms(self, A: np.ndarray) -> np.ndarray:
        """|L|(|a|; |θ|) + |b|: the size of the terms each z adds up (its rounding is γ_{k_z} times that)."""
        b = self.abs_w.get("bias")
        z = self.forward(A)
        if b is not None:
            z = z + b.reshape((-1,) + (1,) * (z.ndim - 2))
        return z

    # -- backward ---------------------------------------------------------------------------------------
    def back_input(self, v: np.ndarray) -> np.ndarray:
        """|J_a|ᵀ v: how δ-sized v moves to ∂C/∂a (v|θ| for dense; a max pool by its ``route``)."""
        if self.layer.type == "dense":
            return v @ self.abs_w["weight"]
        if self.route is not None:
            nd = len(self.layer.kernel_size)
            with torch.enable_grad():
                probe = torch.zeros(self.a.shape, dtype=torch.float64, requires_grad=True)
                (g,) = torch.autograd.grad(pool_windows(self.layer, probe, 0.0), probe,
                                           _t(v)[(..., *(None,) * nd)] * self.route)
            return g.numpy()
        with torch.enable_grad():  # also inside a backward hook
            a = _t(self.a).requires_grad_(True)
            (g,) = torch.autograd.grad(self._op(a, self._abs_weight()), a, _t(v))
        return g.numpy()

    def back_weight(self, v: np.ndarray, A: np.ndarray) -> np.ndarray:
        """|J_θ|ᵀ(v, A): ∂C/∂θ's magnitude from δ-sized v at input magnitudes A (vᵀA for dense)."""
        if self.layer.type == "dense":
            return v.T @ A
        with torch.enable_grad():
            W = _t(self.w["weight"]).requires_grad_(True)
            (g,) = torch.autograd.grad(self._op(_t(A), {"weight": W}), W, _t(v))
        return g.numpy()

    def back_bias(self, v: np.ndarray) -> np.ndarray:
        """Σ_b v: summed over the batch and every position, one value per output channel/unit."""
        return v.sum(axis=(0, *range(2, v.ndim)))

    def held(self, a: torch.Tensor) -> torch.Tensor | None:
        """A max pool of ``a`` that keeps the winners torch picks at the reference input (so that noise
        cannot switch them); None for every other layer type."""
        if not self.layer.type.startswith("max_pool"):
            return None
        _, idx = self._pool()
        return torch.gather(a.flatten(2), 2, idx.flatten(2)).view(idx.shape)

    def contenders(self, Ea: np.ndarray | None = None, dtype=None) -> torch.Tensor | None:
        """For a max pool: which elements of each window may be its max for a correct implementation, as a
        bool mask of the windows (m, C, *out, *kernel); None unless some window has two (a tie), and for
        other layer types. With ``Ea``: every element within the input errors of the max,
        a + Ea ≥ max − E_max. With ``dtype``: the elements that tie once the reference input is rounded to
        ``dtype``, the ties a candidate computing in it most likely sees."""
        if not self.layer.type.startswith("max_pool"):
            return None
        nd = len(self.layer.kernel_size)
        if dtype is not None:
            a = _t(np.asarray(self.a, dtype=dtype).astype(np.float64))
            win = pool_windows(self.layer, a, -math.inf)
            best = win.flatten(-nd).max(-1).values
            mask = win == best[(..., *(None,) * nd)]
        else:
            z, idx = self._pool()
            e_max = torch.gather(_t(Ea).flatten(2), 2, idx.flatten(2)).view_as(z)
            mask = pool_windows(self.layer, _t(self.a) + _t(Ea), -math.inf) >= (z - e_max)[(..., *(None,) * nd)]
        return mask if bool((mask.flatten(-nd).sum(-1) >= 2).any()) else None

    def _pool(self):
        """torch's max pool of the reference input, with the index of each window's winner (computed once:
        every jittered run holds the same winners)."""
        if self._winners is None:
            pool = F.max_pool1d if len(self.layer.kernel_size) == 1 else F.max_pool2d
            self._winners = pool(_t(self.a), self.layer.kernel_size, self.layer.stride, self.layer.padding,
                                 return_indices=True)
        return self._winners

    # -- helpers --------------------------------------------------------------------------------------------
    def _abs_weight(self) -> dict:
        return {"weight": _t(self.abs_w["weight"])} if "weight" in self.w else {}

    def _op(self, a: torch.Tensor, w: dict) -> torch.Tensor:
        """The twin's map without its bias."""
        return TWIN_LAYERS[self.layer.type](self.layer, w, a)
