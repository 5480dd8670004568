r"""Rounding through a composite layer (rnn, lstm, gru, attention): first-order error analysis on a small tape.

A recurrent or attention layer is many operations deep (a step is two products, a sum, four gates; attention is
a product, a scale, a softmax and another product), so one |L| and one count k per layer (``oracle.magnitudes``)
cannot say how rounding moves through it. Here the layer is re-run, in float64 at the reference input, as a tape
of primitive operations, and every entry carries two numbers per element: its value v and an error bound E.

Forward, for an operation y = f(x₁, x₂, …) with error bounds E_k of its inputs and u the unit roundoff:

.. math::  E_y = \sum_k |∂f/∂x_k|\, E_k + u\, R_f

with R_f the size of the terms f rounds (a k-term product: γ_k (|x₁||x₂|); σ, tanh: c·|y|; a softmax: c·p).
Backward, given the upstream gradient's error E_ḡ and magnitude G = |ḡ| (bounded by |J|ᵀ, as everywhere in the
oracle: errors may add with one sign):

.. math::  E_{x̄_k} = |∂f/∂x_k|^T E_ḡ \;+\; G\,\Big|\frac{∂^2 f}{∂x_k\,∂x}\Big| E_x \;+\; u\,R'_f

the upstream error carried back, the *drift* (the backward reuses forward values that are themselves off by E_x:
σ′ = s(1 − s) from a rounded s, the softmax Jacobian from rounded p) and the backward's own rounding. Everything is
linear in (E of the input, u), so one tape gives every map the rest of the oracle asks of a layer
(``CompositeMagnitudes``): |J|E (u = 0), the rounding in units of u (E = 0, u = 1), |J|ᵀv, the drift, and each
parameter's bound. Elements within reach of a relu kink (an rnn with relu) may take either slope: the jump
counts as error there.

That worst case carries errors through |J|, and over many recurrent steps ‖|W_hh|‖^T outgrows what rounding does
by orders of magnitude. The measured noise (``oracle.noise``) therefore takes *samples* from the same tape
(``sample_forward``, ``sample_backward``): every operation's own rounding at random (√k·u·|terms|·ξ), carried
through the signed Jacobians, and the backward's reuse of the perturbed forward values, exactly as the ensemble
does between layers. The allowance is 10× the largest of its runs, capped by the worst case, as for every layer.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from .rounding import ULPS, _gamma as _gamma_u, _sigmoid


def _gamma(k: int) -> float:
    """A k-term sum's rounding in units of u (``oracle.rounding._gamma`` with u = 1)."""
    return _gamma_u(k, 1.0) if k > 0 else 0.0


class Tape:
    """A composite layer's forward as primitive operations on float64 arrays; entries are ints."""

    def __init__(self):
        self.values: list[np.ndarray] = []
        self.ops: list[tuple] = []     # (kind, inputs, extra) per entry; leaves: ("leaf", (), name)

    def _push(self, value, kind, inputs=(), extra=None) -> int:
        self.values.append(np.asarray(value, dtype=np.float64))
        self.ops.append((kind, tuple(inputs), extra))
        return len(self.values) - 1

    def v(self, i):
        return self.values[i]

    # -- leaves ---------------------------------------------------------------------------------------
    def leaf(self, value, name: str) -> int:
        """The input ("input"), a parameter (its short name) or a constant (None: no error, no gradient)."""
        return self._push(value, "leaf", (), name)

    # -- operations -------------------------------------------------------------------------------------
    def linear(self, x: int, W: int, b: int | None = None) -> int:
        """x Wᵀ + b over the last axis."""
        y = self.v(x) @ self.v(W).T + (0 if b is None else self.v(b))
        return self._push(y, "linear", (x, W) if b is None else (x, W, b))

    def matmul(self, A: int, B: int) -> int:
        """A @ B, batched over the leading axes."""
        return self._push(self.v(A) @ self.v(B), "matmul", (A, B))

    def add(self, x: int, y: int) -> int:
        return self._push(self.v(x) + self.v(y), "add", (x, y))

    def mul(self, x: int, y: int) -> int:
        return self._push(self.v(x) * self.v(y), "mul", (x, y))

    def scale(self, x: int, c: float) -> int:
        return self._push(self.v(x) * c, "scale", (x,), c)

    def one_minus(self, x: int) -> int:
        return self._push(1 - self.v(x), "one_minus", (x,))

    def sigmoid(self, x: int) -> int:
        return self._push(_sigmoid(self.v(x)), "sigmoid", (x,))

    def tanh(self, x: int) -> int:
        return self._push(np.tanh(self.v(x)), "tanh", (x,))

    def relu(self, x: int) -> int:
        return self._push(np.maximum(self.v(x), 0), "relu", (x,))

    def softmax(self, x: int, mask=None) -> int:
        """Softmax over the last axis; ``mask`` (True: left out, as a −∞ score) gets p = 0 exactly."""
        s = self.v(x) if mask is None else np.where(mask, -np.inf, self.v(x))
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        return self._push(p / p.sum(axis=-1, keepdims=True), "softmax", (x,), mask)

    def view(self, x: int, fwd, back) -> int:
        """An exact rearrangement: ``fwd`` maps x's array to y's (slice, reshape, transpose), ``back`` its adjoint
        (y-shaped back to x-shaped, zeros where y does not read x). Applied to values, errors and magnitudes alike."""
        return self._push(fwd(self.v(x)), "view", (x,), (fwd, back))

    def broadcast(self, x: int, m: int) -> int:
        """A vector shared by the batch, (H,) → (m, H); its gradient sums over the batch."""
        return self._push(np.broadcast_to(self.v(x), (m,) + self.v(x).shape).copy(), "broadcast", (x,), m)

    def stack(self, xs: list, axis: int) -> int:
        return self._push(np.stack([self.v(i) for i in xs], axis=axis), "stack", tuple(xs), axis)

    # -- the error passes -------------------------------------------------------------------------------
    def forward_errors(self, E_in, u: float) -> list:
        """E of every entry, given the input's error ``E_in`` and unit roundoff ``u`` (0: propagation only)."""
        E: list = []
        c = ULPS * u
        for (kind, ins, extra), y in zip(self.ops, self.values):
            if kind == "leaf":
                e = np.broadcast_to(np.asarray(E_in, dtype=np.float64), y.shape) if extra == "input" else np.zeros(y.shape)
            elif kind == "linear":
                x, W = (self.v(i) for i in ins[:2])
                e = E[ins[0]] @ np.abs(W).T
                if u:
                    size = np.abs(x) @ np.abs(W).T + (np.abs(self.v(ins[2])) if len(ins) > 2 else 0)
                    e = e + u * _gamma(W.shape[1] + 1) * size
            elif kind == "matmul":
                A, B = (self.v(i) for i in ins)
                e = E[ins[0]] @ np.abs(B) + np.abs(A) @ E[ins[1]] + u * _gamma(A.shape[-1]) * (np.abs(A) @ np.abs(B))
            elif kind == "add":
                e = E[ins[0]] + E[ins[1]] + u * (np.abs(self.v(ins[0])) + np.abs(self.v(ins[1])))
            elif kind == "mul":
                a, b = (self.v(i) for i in ins)
                e = np.abs(b) * E[ins[0]] + np.abs(a) * E[ins[1]] + u * np.abs(y)
            elif kind == "scale":
                e = abs(extra) * E[ins[0]] + u * np.abs(y)
            elif kind == "one_minus":
                e = E[ins[0]] + u * (1 + np.abs(self.v(ins[0])))
            elif kind == "sigmoid":
                e = y * (1 - y) * E[ins[0]] + c * y
            elif kind == "tanh":
                e = (1 - y * y) * E[ins[0]] + c * np.abs(y)
            elif kind == "relu":
                e = self._relu_slope(ins[0], E) * E[ins[0]]
            elif kind == "softmax":
                ez = E[ins[0]] if extra is None else np.where(extra, 0.0, E[ins[0]])
                e = y * (ez + (y * ez).sum(axis=-1, keepdims=True)) + c * y
            elif kind == "view":
                e = extra[0](E[ins[0]])
            elif kind == "broadcast":
                e = np.broadcast_to(E[ins[0]], y.shape).copy()
            else:  # stack
                e = np.stack([E[i] for i in ins], axis=extra)
            E.append(e)
        return E

    def _relu_slope(self, x: int, E: list) -> np.ndarray:
        """relu′ taken as 1 within reach of the kink (either side's slope is a correct one there)."""
        return (self.v(x) + E[x] > 0).astype(np.float64)

    def backward_errors(self, out: int, Eg_out, G_out, E: list, u: float) -> tuple[list, list]:
        """(E_ḡ, G) of every entry, from the output's gradient error ``Eg_out`` and magnitude ``G_out``, with the
        forward errors ``E`` (``forward_errors``) and the backward's unit roundoff ``u``."""
        n = len(self.values)
        Eg: list = [None] * n
        G: list = [None] * n
        c = ULPS * u

        def send(i, e, g):
            if self.ops[i][0] == "leaf" and self.ops[i][2] is None:
                return  # a constant
            if Eg[i] is None:
                Eg[i], G[i] = e, g
            else:  # two paths add: one more rounding
                Eg[i], G[i] = Eg[i] + e + u * (G[i] + g), G[i] + g

        Eg[out], G[out] = np.asarray(Eg_out, dtype=np.float64), np.asarray(G_out, dtype=np.float64)
        for k in reversed(range(n)):
            if Eg[k] is None:
                continue
            kind, ins, extra = self.ops[k]
            e, g, y = Eg[k], G[k], self.values[k]
            if kind == "leaf":
                continue
            if kind == "linear":
                x, W = (self.v(i) for i in ins[:2])
                aW, ax = np.abs(W), np.abs(x)
                rows = g.reshape(-1, g.shape[-1])
                send(ins[0], e @ aW + u * _gamma(W.shape[0]) * (g @ aW), g @ aW)
                ew = (e.reshape(-1, e.shape[-1]).T @ ax.reshape(-1, ax.shape[-1])
                      + rows.T @ E[ins[0]].reshape(-1, ax.shape[-1]))
                gw = rows.T @ ax.reshape(-1, ax.shape[-1])
                send(ins[1], ew + u * _gamma(rows.shape[0]) * gw, gw)
                if len(ins) > 2:
                    gb = rows.sum(axis=0)
                    send(ins[2], e.reshape(rows.shape).sum(axis=0) + u * _gamma(rows.shape[0]) * gb, gb)
            elif kind == "matmul":
                A, B = (self.v(i) for i in ins)
                aA, aB = np.abs(A), np.abs(B)
                gA = g @ np.swapaxes(aB, -1, -2)
                send(ins[0], e @ np.swapaxes(aB, -1, -2) + g @ np.swapaxes(E[ins[1]], -1, -2)
                     + u * _gamma(B.shape[-1]) * gA, gA)
                gB = np.swapaxes(aA, -1, -2) @ g
                send(ins[1], np.swapaxes(aA, -1, -2) @ e + np.swapaxes(E[ins[0]], -1, -2) @ g
                     + u * _gamma(A.shape[-2]) * gB, gB)
            elif kind == "add":
                send(ins[0], e, g)
                send(ins[1], e, g)
            elif kind == "mul":
                a, b = (self.v(i) for i in ins)
                send(ins[0], e * np.abs(b) + g * E[ins[1]] + u * g * np.abs(b), g * np.abs(b))
                send(ins[1], e * np.abs(a) + g * E[ins[0]] + u * g * np.abs(a), g * np.abs(a))
            elif kind == "scale":
                send(ins[0], abs(extra) * (e + u * g), abs(extra) * g)
            elif kind == "one_minus":
                send(ins[0], e, g)
            elif kind == "sigmoid":  # x̄ = ȳ s(1 − s): s is off by E_y, s(1 − s) moves by |1 − 2s| E_y
                d = y * (1 - y)
                send(ins[0], e * d + g * (np.abs(1 - 2 * y) * E[k] + c * d), g * d)
            elif kind == "tanh":     # x̄ = ȳ (1 − t²): moves by 2|t| E_y
                d = 1 - y * y
                send(ins[0], e * d + g * (2 * np.abs(y) * E[k] + c * d), g * d)
            elif kind == "relu":
                x = self.v(ins[0])
                near = np.abs(x) <= E[ins[0]]
                slope = self._relu_slope(ins[0], E)
                send(ins[0], e * slope + np.where(near, g, 0.0), g * slope)
            elif kind == "softmax":  # x̄ = p ⊙ (ȳ − Σ ȳ p)
                p, Ep = y, E[k]
                gsum = (g * p).sum(axis=-1, keepdims=True)
                mag = p * (g + gsum)
                drift = Ep * (g + gsum) + p * (g * Ep).sum(axis=-1, keepdims=True)
                err = p * (e + (e * p).sum(axis=-1, keepdims=True)) + drift + c * mag
                if extra is not None:
                    err, mag = np.where(extra, 0.0, err), np.where(extra, 0.0, mag)
                send(ins[0], err, mag)
            elif kind == "view":
                back = extra[1]
                send(ins[0], back(e), back(g))
            elif kind == "broadcast":
                gs = g.sum(axis=0)
                send(ins[0], e.sum(axis=0) + u * _gamma(extra) * gs, gs)
            else:  # stack
                for j, i in enumerate(ins):
                    send(i, np.take(e, j, axis=extra), np.take(g, j, axis=extra))
        return Eg, G

    # -- one random sample of the rounding, for the measured noise (``oracle.noise``) ----------------------------
    def sample_forward(self, rng, u: float, ulps: float) -> list:
        """One signed perturbation P of every entry: each operation's own rounding at random (√k·u·|terms|·ξ for a
        k-term product, ``ulps``·u·|y|·ξ for a function), carried through the *signed* Jacobians of the operations
        after it. The bound above carries |J|, which over many recurrent steps grows far beyond what rounding does."""
        P: list = []
        c = ulps * u

        def xi(shape):
            return rng.standard_normal(shape)

        for (kind, ins, extra), y in zip(self.ops, self.values):
            v = [self.v(i) for i in ins]
            if kind == "leaf":
                p = np.zeros(y.shape)
            elif kind == "linear":
                x, W = v[:2]
                size = np.abs(x) @ np.abs(W).T + (np.abs(v[2]) if len(v) > 2 else 0)
                p = P[ins[0]] @ W.T + math.sqrt(W.shape[1] + 1) * u * size * xi(y.shape)
            elif kind == "matmul":
                A, B = v
                p = (P[ins[0]] @ B + A @ P[ins[1]]
                     + math.sqrt(A.shape[-1]) * u * (np.abs(A) @ np.abs(B)) * xi(y.shape))
            elif kind == "add":
                p = P[ins[0]] + P[ins[1]] + u * np.abs(y) * xi(y.shape)
            elif kind == "mul":
                p = v[1] * P[ins[0]] + v[0] * P[ins[1]] + u * np.abs(y) * xi(y.shape)
            elif kind == "scale":
                p = extra * P[ins[0]] + u * np.abs(y) * xi(y.shape)
            elif kind == "one_minus":
                p = -P[ins[0]] + u * (1 + np.abs(v[0])) * xi(y.shape)
            elif kind == "sigmoid":
                p = y * (1 - y) * P[ins[0]] + c * y * xi(y.shape)
            elif kind == "tanh":
                p = (1 - y * y) * P[ins[0]] + c * np.abs(y) * xi(y.shape)
            elif kind == "relu":  # the slope held at the reference's, as the measured noise holds every kink
                p = (v[0] > 0) * P[ins[0]]
            elif kind == "softmax":
                pz = P[ins[0]] if extra is None else np.where(extra, 0.0, P[ins[0]])
                p = y * (pz - (y * pz).sum(axis=-1, keepdims=True)) + c * y * xi(y.shape)
            elif kind == "view":
                p = extra[0](P[ins[0]])
            elif kind == "broadcast":
                p = np.broadcast_to(P[ins[0]], y.shape).copy()
            else:
                p = np.stack([P[i] for i in ins], axis=extra)
            P.append(p)
        return P

    def sample_backward(self, out: int, g_out, P: list, rng, u: float, ulps: float) -> dict:
        """One signed perturbation of every leaf's gradient ({leaf entry: perturbation}) for the upstream gradient
        ``g_out`` (signed): each backward operation's rounding at random, the forward perturbation ``P`` it reuses
        (σ′ from a rounded σ, the softmax Jacobian from rounded p), carried back through the signed Jacobians."""
        n = len(self.values)
        G: list = [None] * n   # the exact gradient of every entry
        Q: list = [None] * n   # its perturbation
        c = ulps * u

        def xi(shape):
            return rng.standard_normal(shape)

        def send(i, g, q):
            if self.ops[i][0] == "leaf" and self.ops[i][2] is None:
                return
            if G[i] is None:
                G[i], Q[i] = g, q
            else:
                G[i] = G[i] + g
                Q[i] = Q[i] + q + u * np.abs(G[i]) * xi(g.shape)

        G[out], Q[out] = np.asarray(g_out, dtype=np.float64), np.zeros(np.shape(g_out))
        for k in reversed(range(n)):
            if G[k] is None or self.ops[k][0] == "leaf":
                continue
            kind, ins, extra = self.ops[k]
            g, q, y = G[k], Q[k], self.values[k]
            v = [self.v(i) for i in ins]
            if kind == "linear":
                x, W = v[:2]
                gx = g @ W
                send(ins[0], gx, q @ W + math.sqrt(W.shape[0]) * u * (np.abs(g) @ np.abs(W)) * xi(gx.shape))
                rows, xr = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
                gw = rows.T @ xr
                qw = (q.reshape(rows.shape).T @ xr + rows.T @ P[ins[0]].reshape(xr.shape)
                      + math.sqrt(rows.shape[0]) * u * (np.abs(rows).T @ np.abs(xr)) * xi(gw.shape))
                send(ins[1], gw, qw)
                if len(ins) > 2:
                    send(ins[2], rows.sum(axis=0), q.reshape(rows.shape).sum(axis=0)
                         + math.sqrt(rows.shape[0]) * u * np.abs(rows).sum(axis=0) * xi(rows.shape[1:]))
            elif kind == "matmul":
                A, B = v
                BT, AT = np.swapaxes(B, -1, -2), np.swapaxes(A, -1, -2)
                ga, gb = g @ BT, AT @ g
                send(ins[0], ga, q @ BT + g @ np.swapaxes(P[ins[1]], -1, -2)
                     + math.sqrt(B.shape[-1]) * u * (np.abs(g) @ np.abs(BT)) * xi(ga.shape))
                send(ins[1], gb, AT @ q + np.swapaxes(P[ins[0]], -1, -2) @ g
                     + math.sqrt(A.shape[-2]) * u * (np.abs(AT) @ np.abs(g)) * xi(gb.shape))
            elif kind == "add":
                send(ins[0], g, q)
                send(ins[1], g, q)
            elif kind == "mul":
                a, b = v
                send(ins[0], g * b, q * b + g * P[ins[1]] + u * np.abs(g * b) * xi(g.shape))
                send(ins[1], g * a, q * a + g * P[ins[0]] + u * np.abs(g * a) * xi(g.shape))
            elif kind == "scale":
                send(ins[0], extra * g, extra * q + u * np.abs(extra * g) * xi(g.shape))
            elif kind == "one_minus":
                send(ins[0], -g, -q)
            elif kind == "sigmoid":
                d = y * (1 - y)
                send(ins[0], g * d, q * d + g * (1 - 2 * y) * P[k] + c * np.abs(g * d) * xi(g.shape))
            elif kind == "tanh":
                d = 1 - y * y
                send(ins[0], g * d, q * d - 2 * g * y * P[k] + c * np.abs(g * d) * xi(g.shape))
            elif kind == "relu":
                slope = (v[0] > 0).astype(np.float64)
                send(ins[0], g * slope, q * slope)
            elif kind == "softmax":
                p, dp = y, P[k]
                gs = (g * p).sum(axis=-1, keepdims=True)
                gx = p * (g - gs)
                qx = (p * (q - (q * p).sum(axis=-1, keepdims=True)) + dp * (g - gs)
                      - p * (g * dp).sum(axis=-1, keepdims=True) + c * p * (np.abs(g) + np.abs(gs)) * xi(g.shape))
                if extra is not None:
                    gx, qx = np.where(extra, 0.0, gx), np.where(extra, 0.0, qx)
                send(ins[0], gx, qx)
            elif kind == "view":
                send(ins[0], extra[1](g), extra[1](q))
            elif kind == "broadcast":
                gs = g.sum(axis=0)
                send(ins[0], gs, q.sum(axis=0) + math.sqrt(extra) * u * np.abs(g).sum(axis=0) * xi(gs.shape))
            else:
                for j, i in enumerate(ins):
                    send(i, np.take(g, j, axis=extra), np.take(q, j, axis=extra))
        return {i: Q[i] for i, op in enumerate(self.ops) if op[0] == "leaf" and op[2] is not None}


# -- the layers as tapes ------------------------------------------------------------------------------------------
def _chunk(tape: Tape, x: int, j: int, size: int) -> int:
    """Columns j·size:(j+1)·size of the last axis (a gate of a recurrent layer, q/k/v of attention)."""
    lo, hi = j * size, (j + 1) * size
    full = tape.v(x).shape[-1]

    def back(g):
        out = np.zeros(g.shape[:-1] + (full,))
        out[..., lo:hi] = g
        return out
    return tape.view(x, lambda t: t[..., lo:hi], back)


def _step(tape: Tape, x: int, t: int) -> int:
    """Step t of a sequence (m, T, ·)."""
    T = tape.v(x).shape[1]

    def back(g):
        out = np.zeros((g.shape[0], T) + g.shape[1:])
        out[:, t] = g
        return out
    return tape.view(x, lambda s: s[:, t], back)


def recurrent_tape(layer, w: dict, a: np.ndarray) -> tuple[Tape, int, dict]:
    """rnn / lstm / gru over a (m, T, n) as a tape (torch's equations, gate orders i f g o and r z n).
    Returns (tape, output entry, {short name: parameter entry})."""
    tape = Tape()
    m, T, _ = a.shape
    H = layer.hidden_size
    x = tape.leaf(a, "input")
    P = {k: tape.leaf(v, k) for k, v in w.items()}
    gi = tape.linear(x, P["weight_ih_l0"], P.get("bias_ih_l0"))   # x W_ihᵀ + b_ih for every step at once
    zero = tape.leaf(np.zeros((m, H)), None)
    h = tape.broadcast(P["h0"], m) if "h0" in P else zero
    c = tape.broadcast(P["c0"], m) if "c0" in P else zero
    hs = []
    for t in range(T):
        xt = _step(tape, gi, t)
        gh = tape.linear(h, P["weight_hh_l0"], P.get("bias_hh_l0"))
        if layer.type == "rnn":
            pre = tape.add(xt, gh)
            h = tape.tanh(pre) if layer.nonlinearity == "tanh" else tape.relu(pre)
        elif layer.type == "lstm":
            gates = tape.add(xt, gh)
            i, f, g, o = (_chunk(tape, gates, j, H) for j in range(4))
            i, f, g, o = tape.sigmoid(i), tape.sigmoid(f), tape.tanh(g), tape.sigmoid(o)
            c = tape.add(tape.mul(f, c), tape.mul(i, g))
            h = tape.mul(o, tape.tanh(c))
        else:  # gru
            r = tape.sigmoid(tape.add(_chunk(tape, xt, 0, H), _chunk(tape, gh, 0, H)))
            z = tape.sigmoid(tape.add(_chunk(tape, xt, 1, H), _chunk(tape, gh, 1, H)))
            n = tape.tanh(tape.add(_chunk(tape, xt, 2, H), tape.mul(r, _chunk(tape, gh, 2, H))))
            h = tape.add(tape.mul(tape.one_minus(z), n), tape.mul(z, h))
        hs.append(h)
    out = tape.stack(hs, axis=1) if layer.return_sequences else h
    return tape, out, P


def attention_tape(layer, w: dict, a: np.ndarray) -> tuple[Tape, int, dict]:
    """Multi-head self-attention over a (m, T, d) as a tape (``nn.MultiheadAttention``'s equations)."""
    tape = Tape()
    m, T, d = a.shape
    h = layer.num_heads
    dh = d // h
    x = tape.leaf(a, "input")
    P = {k: tape.leaf(v, k) for k, v in w.items()}
    qkv = tape.linear(x, P["in_proj_weight"], P.get("in_proj_bias"))

    def heads(t):  # (m, T, d) → (m, h, T, dh)
        return tape.view(t, lambda s: s.reshape(m, T, h, dh).transpose(0, 2, 1, 3),
                         lambda g: g.transpose(0, 2, 1, 3).reshape(m, T, d))
    q, k, v = (heads(_chunk(tape, qkv, j, d)) for j in range(3))
    kT = tape.view(k, lambda s: np.swapaxes(s, -1, -2), lambda g: np.swapaxes(g, -1, -2))
    scores = tape.scale(tape.matmul(q, kT), 1 / math.sqrt(dh))
    mask = np.triu(np.ones((T, T), dtype=bool), 1) if layer.causal else None
    probs = tape.softmax(scores, mask)
    ctx = tape.matmul(probs, v)
    merged = tape.view(ctx, lambda s: s.transpose(0, 2, 1, 3).reshape(m, T, d),
                       lambda g: g.reshape(m, T, h, dh).transpose(0, 2, 1, 3))
    out = tape.linear(merged, P["out_proj.weight"], P.get("out_proj.bias"))
    return tape, out, P


TAPES = {"rnn": recurrent_tape, "lstm": recurrent_tape, "gru": recurrent_tape, "attention": attention_tape}


class CompositeMagnitudes:
    """The magnitude maps ``oracle.rounding`` and ``oracle.noise`` ask of a layer (see ``oracle.magnitudes``), from
    the layer's tape. The rounding is given whole, in units of u, so every count k is 1 (γ_1 = u)."""

    k_z = k_in = k_w = 1

    def __init__(self, layer, w: dict, a: np.ndarray, route=None):
        self.layer, self.w, self.a = layer, w, np.asarray(a, dtype=np.float64)
        params = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
        self.tape, self.out, self.params = TAPES[layer.type](layer, params, self.a)
        self.input = 0  # the tape's first leaf is the input
        self._zero = np.zeros(self.a.shape)
        self._fwd: dict = {}
        self._bwd: dict = {}

    def _forward(self, E, u: float) -> list:
        key = (id(E), u)
        if key not in self._fwd:
            self._fwd[key] = (E, self.tape.forward_errors(E, u))  # E kept alive: its id stays its own
        return self._fwd[key][1]

    def _backward(self, Eg, G, E_in, u: float):
        return self.tape.backward_errors(self.out, Eg, G, self._forward(E_in, u), u)

    def _rounding(self, ad):
        """(E_ḡ per entry) of the backward's own rounding and of the forward's rounding it reuses, in units of u."""
        ad = np.asarray(ad, dtype=np.float64)
        key = zlib.crc32(ad.tobytes())  # the noise asks once per parameter with equal copies of |δ|
        if key not in self._bwd:
            self._bwd = {key: self._backward(np.zeros(ad.shape), ad, self._zero, 1.0)[0]}
        return self._bwd[key]

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, E):
        return self._forward(E, 0.0)[self.out]

    def terms(self, A):
        return self._forward(self._zero, 1.0)[self.out]

    # -- backward --------------------------------------------------------------------------------------------
    def back_input(self, v):
        Eg, _ = self._backward(v, np.zeros(np.shape(v)), self._zero, 0.0)
        return self._or_zero(Eg[self.input])

    def back_drift(self, v, Ea):
        Eg, _ = self._backward(np.zeros(np.shape(v)), v, Ea, 0.0)
        return self._or_zero(Eg[self.input])

    def input_terms(self, v):
        return self._or_zero(self._rounding(v)[self.input])

    def param_bounds(self, edelta, ad, A, Ea, gamma, eta) -> dict:
        u = gamma(1)
        Eg, _ = self._backward(edelta, ad, Ea, u)
        n = len(self.tape.values)
        return {k: self._or_zero(Eg[i], self.tape.v(i)) + n * eta for k, i in self.params.items()}

    def param_rounding(self, short: str, ad, A) -> tuple:
        i = self.params[short]
        return self._or_zero(self._rounding(ad)[i], self.tape.v(i)), 1

    def _or_zero(self, e, like=None):
        return np.zeros((self.a if like is None else like).shape) if e is None else e

    # -- the measured noise: one random sample of the layer's own rounding per jittered run ----------------------
    def sample_z(self, rng, u: float, ulps: float) -> np.ndarray:
        """A random perturbation of z by the rounding inside the layer (kept for ``sample_grads`` of the same run)."""
        self._sample = self.tape.sample_forward(rng, u, ulps)
        return self._sample[self.out]

    def sample_grads(self, delta, rng, u: float, ulps: float) -> dict:
        """{"input": perturbation of ∂C/∂a, short name: of each parameter's gradient} for this run's δ (signed)."""
        P = getattr(self, "_sample", None) or self.tape.sample_forward(rng, u, ulps)
        Q = self.tape.sample_backward(self.out, delta, P, rng, u, ulps)
        out = {short: self._or_zero(Q.get(i), self.tape.v(i)) for short, i in self.params.items()}
        out["input"] = self._or_zero(Q.get(self.input))
        return out

    def held(self, a):
        return None

    def contenders(self, Ea=None, dtype=None):
        return None
