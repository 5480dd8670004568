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
temporal   fan-in + 2             out + 1                      m·T + 1
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
        elif kind == "temporal_dense":  # dense at every step: its sums are dense's, θ's over the batch and the steps
            W = self.abs_w["weight"]
            self.k_z, self.k_in, self.k_w = W.shape[1] + 2, W.shape[0] + 1, m * self.a.shape[1] + 1
        elif kind == "dropout":  # a ⊙ M/(1 − p): one product per element
            self.k_z, self.k_in, self.k_w = 1, 1, 0
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
        if b is not None:  # per unit: the last axis of a sequence layer's output, the channel axis of a conv's
            z = z + (b if self.layer.type == "temporal_dense" else b.reshape((-1,) + (1,) * (z.ndim - 2)))
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
        """Σ_b v: summed over the batch and every position, one value per output channel/unit (the last axis of a
        sequence layer's output, the second of a conv's)."""
        if self.layer.type == "temporal_dense":
            return v.reshape(-1, v.shape[-1]).sum(axis=0)
        return v.sum(axis=(0, *range(2, v.ndim)))

    # -- what a nonlinear layer adds (``NormMagnitudes``); a linear layer's defaults -------------------------
    def input_terms(self, v: np.ndarray) -> np.ndarray:
        """The size of the terms ∂C/∂a adds up from δ-sized v (its rounding is γ_{k_in} times that)."""
        return self.back_input(v)

    def back_drift(self, v: np.ndarray, Ea: np.ndarray) -> np.ndarray:
        """How far ∂C/∂a moves, for δ of size v, when the input moves by Ea (zero where ∂C/∂a is linear in δ alone)."""
        return np.zeros(self.a.shape)

    def weight_input(self, A: np.ndarray) -> np.ndarray:
        """What ∂C/∂θ multiplies δ with, in magnitude, for input magnitudes A: the input itself."""
        return A

    def weight_error(self, Ea: np.ndarray) -> np.ndarray:
        """How far that moves when the input moves by Ea."""
        return Ea

    def weight_terms(self, v: np.ndarray, A: np.ndarray) -> np.ndarray:
        """The size of the terms ∂C/∂θ adds up (its rounding is γ_{k_w} times that)."""
        return self.back_weight(v, A)

    # -- every parameter's bound, by short name: a layer type with other parameters overrides these two ---------
    def param_bounds(self, edelta, ad, A, Ea, gamma, eta) -> dict:
        """{short name: the analytic bound of its gradient's error} given δ's error bound ``edelta``, |δ| ``ad``,
        the input's size ``A`` and error ``Ea``, and ``gamma(k)`` = γ_k (``oracle.rounding``)."""
        kw, out = self.k_w, {}
        if "weight" in self.w:
            # (δ + e)ᵀ(a + f) − δᵀa = eᵀa + δᵀf + eᵀf: the last, a product of two errors, is u² small where the
            # network is well conditioned, but not where the forward's error is as large as the values themselves
            # (a batch norm over tied values, 1/√ε times the mean's rounding, several norms deep): there torch's
            # δ and a can both be ≈ 0 while a correct implementation's are both of the size of their errors
            Ew = self.weight_error(Ea)
            out["weight"] = (self.back_weight(edelta, self.weight_input(A) + Ew) + self.back_weight(ad, Ew)
                             + gamma(kw) * self.weight_terms(ad, A) + kw * eta)
        if "bias" in self.w:
            out["bias"] = self.back_bias(edelta) + gamma(kw) * self.back_bias(ad) + kw * eta
        return out

    def param_rounding(self, short: str, ad, A) -> tuple:
        """(size of the terms the gradient of parameter ``short`` adds up, how many): what the measured noise rounds."""
        return (self.weight_terms(ad, A) if short == "weight" else self.back_bias(ad)), self.k_w

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


class NormMagnitudes(Magnitudes):
    r"""The maps of batch, layer and group norm, z = γ x̂ + β with x̂ = (a − μ)/s over sets S of N elements.

    Not linear in a: the maps are its Jacobian's absolute value at the reference input,
    |∂x̂_i/∂a_j| ≤ (1[i = j] + 1/N + |x̂_i||x̂_j|/N)/s, so that with X = |x̂| and means over each set

    .. math::  |L|(E) = \frac{|γ|}{s}\big(E + \bar E + X\,\overline{XE}\big),\qquad
               |J_a|^T v = \frac1s\big(G + \bar G + X\,\overline{XG}\big),\ G = |γ| v

    The rounding of x̂ itself is not u·|x̂|: μ is a sum of N terms as large as |a|, and a − μ cancels when the
    spread s is small against the mean magnitude M = mean_S |a|. Per element it is γ_k·R with
    R = M/s + X(1 + R_s): the mean's rounding (≤ γ_N M, one shift for the whole set) and the centred value's
    own; R_s = 1 + γ_k (M/s)² is the relative rounding of s (the two-pass variance's: the mean's error moves σ²
    by its square only; a one-pass E[a²] − μ² cancels far worse and is outside this allowance). R enters z's terms, and the
    backward's through the x̂ and s it reuses. ``back_drift`` moves ∂C/∂a by the input's errors (x̂ and s move
    with them); ∂C/∂γ = Σ δ x̂ multiplies δ by X. Batch norm in eval mode is linear: x̂ = (a − r_μ)/s.
    """

    def __post_init__(self):
        self._winners = None
        layer, a = self.layer, np.asarray(self.a, dtype=np.float64)
        self.abs_w = {k: np.abs(v) for k, v in self.w.items()}
        self.train = getattr(layer, "training", True)
        m, nd = a.shape[0], a.ndim
        if layer.type == "layer_norm":
            k = 1 if layer.normalized_shape is None else len(layer.normalized_shape)
            self._view, self._axes = a.shape, tuple(range(nd - k, nd))
            self._shared, self._gshape = tuple(range(nd - k)), a.shape[nd - k:]
        else:
            groups = layer.num_groups if layer.type == "group_norm" else None
            self._view = (m, groups, -1) if groups else a.shape
            self._axes = (2,) if groups else (0, *range(2, nd))
            self._shared, self._gshape = (0, *range(2, nd)), (1, a.shape[1]) + (1,) * (nd - 2)
        if layer.type == "batch_norm":       # N, the elements of one set
            self._n = a.size // a.shape[1]
        elif layer.type == "group_norm":
            self._n = a[0].size // layer.num_groups
        else:
            self._n = math.prod(self._gshape)
        one = np.ones(self._gshape)
        self.G = self.abs_w["weight"].reshape(self._gshape) if "weight" in self.w else one
        self.B = self.abs_w["bias"].reshape(self._gshape) if "bias" in self.w else 0 * one
        if self.train:
            v = a.reshape(self._view)
            mu = v.mean(axis=self._axes, keepdims=True)
            s = np.sqrt(((v - mu) ** 2).mean(axis=self._axes, keepdims=True) + layer.eps)
            self.s = np.broadcast_to(s, v.shape).reshape(a.shape)
            self.X = np.abs((v - mu) / s).reshape(a.shape)
            M = self._mean(np.abs(a))
            # the centred value a − μ̂ errs by the mean's rounding Δμ (≤ γ_N·M, the same for the whole set) and by
            # u·|a − μ|: the input's own errors are the previous layer's, moved here by forward(). Δμ leaves the
            # variance alone to first order (Σ(a − μ) = 0): it moves σ² by Δμ² only, relatively (γ M/s)², so
            # the relative rounding of s is R_s = 1 + γ_k (M/s)² (in units of γ_k)
            gamma = (self._n + 4) * 2.0 ** -24
            Rs = 1 + gamma * (M / self.s) ** 2
            self.R = M / self.s + self.X * (1 + Rs)
            self.Rs = Rs
            self.k_z = self.k_in = self._n + 4
        else:
            rm = self.w["running_mean"].reshape(self._gshape)
            self.s = np.broadcast_to(np.sqrt(self.w["running_var"].reshape(self._gshape) + layer.eps), a.shape)
            self.X = np.abs(a - rm) / self.s
            self.R = (np.abs(a) + np.abs(rm)) / self.s + self.X
            self.Rs = np.zeros(a.shape)
            self.k_z, self.k_in = 5, 3
        # ∂C/∂γ sums δ x̂ over everything one γ is shared across, each x̂ rounded as above
        self.k_w = a.size // math.prod(self._gshape) + self._n + 4

    def _mean(self, t: np.ndarray) -> np.ndarray:
        """The mean over each element's set, broadcast back to a's shape."""
        v = np.asarray(t).reshape(self._view)
        return np.broadcast_to(v.mean(axis=self._axes, keepdims=True), v.shape).reshape(self.a.shape)

    def _jt(self, v: np.ndarray) -> np.ndarray:
        """|∂x̂/∂a|ᵀ v (the same as |∂x̂/∂a| v: the bound is symmetric)."""
        if not self.train:
            return v / self.s
        return (v + self._mean(v) + self.X * self._mean(self.X * v)) / self.s

    def forward(self, E):
        return self.G * self._jt(E)

    def terms(self, A):
        return self.G * self.R + self.B

    def back_input(self, v):
        return self._jt(self.G * v)

    def input_terms(self, v):
        G = self.G * v
        if not self.train:
            return G * (1 + self.R) / self.s
        return ((1 + self.Rs) * (G + self._mean(G) + self.X * self._mean(self.X * G))
                + self.R * self._mean(self.X * G) + self.X * self._mean(self.R * G)) / self.s

    def back_drift(self, v, Ea):
        if not self.train:
            return np.zeros(self.a.shape)
        G = self.G * v
        Ex = self._jt(Ea)                        # how far x̂ moves
        rel_s = self._mean(self.X * Ea) / self.s  # and s, relatively
        return (rel_s * (G + self._mean(G) + self.X * self._mean(self.X * G))
                + (Ex * self._mean(self.X * G) + self.X * self._mean(Ex * G)) / self.s)

    def weight_input(self, A):
        return self.X

    def weight_error(self, Ea):
        return self._jt(Ea)

    def weight_terms(self, v, A):
        return self.back_weight(v, self.X + self.R)

    def back_weight(self, v, A):
        return (v * A).sum(axis=self._shared).reshape(self.w["weight"].shape)

    def back_bias(self, v):
        return v.sum(axis=self._shared).reshape(self.w["bias"].shape)

    def held(self, a):
        return None

    def contenders(self, Ea=None, dtype=None):
        return None


class EmbeddingMagnitudes(Magnitudes):
    r"""The maps of an embedding, z[m, t] = W[x[m, t]]: a gather, exact (no rounding, k_z = 0), of token indices
    that have no error. ∂C/∂W[v] adds δ over the n_v occurrences of token v: |J_θ|ᵀv scatters v the same way,
    k_w = max_v n_v + 1. There is no ∂C/∂x."""

    def __post_init__(self):
        self._winners = None
        self.abs_w = {k: np.abs(v) for k, v in self.w.items()}
        self.tokens = np.asarray(self.a, dtype=np.int64)
        counts = np.bincount(self.tokens.reshape(-1), minlength=self.layer.num_embeddings)
        self.k_z, self.k_in, self.k_w = 0, 0, int(counts.max(initial=0)) + 1

    def forward(self, E):
        return np.zeros((*self.tokens.shape, self.layer.embedding_dim))

    def terms(self, A):
        return self.forward(A)

    def back_input(self, v):
        return np.zeros(self.tokens.shape)

    def back_weight(self, v, A=None):
        """Σ over the occurrences of each token of v (A, the tokens' own size, plays no part)."""
        out = np.zeros(self.w["weight"].shape)
        np.add.at(out, self.tokens.reshape(-1), np.asarray(v).reshape(-1, out.shape[1]))
        if self.layer.padding_idx is not None:
            out[self.layer.padding_idx] = 0
        return out

    def param_bounds(self, edelta, ad, A, Ea, gamma, eta) -> dict:
        """∂C/∂W's error: δ's errors summed per token, and the rounding of those sums (tokens carry no error)."""
        kw = self.k_w
        return {"weight": self.back_weight(edelta) + gamma(kw) * self.back_weight(ad) + kw * eta}

    def held(self, a):
        return None

    def contenders(self, Ea=None, dtype=None):
        return None


class SumMagnitudes(Magnitudes):
    """A residual block's sum z = h + s: each path's δ is z's δ (its maps are the identity), one addition rounds
    z (k_z = 1), and nothing is summed in the backward (the paths' gradients add where they meet, at the block's
    input). The analytic bound and the measured noise treat its two inputs themselves (``oracle.graph``)."""

    def __post_init__(self):
        self._winners = None
        self.abs_w = {}
        self.k_z, self.k_in, self.k_w = 1, 0, 0

    def forward(self, E):
        return E

    def back_input(self, v):
        return v

    def held(self, a):
        return None

    def contenders(self, Ea=None, dtype=None):
        return None


def magnitudes(layer, w: dict, a: np.ndarray, route=None) -> Magnitudes:
    """The magnitude maps of one layer: ``NormMagnitudes`` for the normalizations, ``EmbeddingMagnitudes`` for an
    embedding, ``oracle.composite.CompositeMagnitudes`` for the layers many operations deep (rnn, lstm, gru,
    attention), ``Magnitudes`` for the rest."""
    from .composite import TAPES, CompositeMagnitudes  # it reads oracle.rounding's constants, which imports us
    if layer.type in TAPES:
        return CompositeMagnitudes(layer, w, np.asarray(a), route)
    cls = (NormMagnitudes if layer.type in ("batch_norm", "layer_norm", "group_norm")
           else EmbeddingMagnitudes if layer.type == "embedding" else Magnitudes)
    return cls(layer, w, np.asarray(a), route)
