r"""A second correct backward, written independently of manual_bp's code (only the spec is read).

It differs from manual_bp on purpose wherever two correct implementations may round differently,
so that the oracle's false-alarm rate is measured on more than one way of being right:

* layers by ``np.einsum`` (z = a θᵀ + b, ∂C/∂θ = δᵀa, δ θ), not ``@``;
* every derivative from z by its stable closed form, never from a = g(z): σ'(z) = e^{-|z|}/(1+e^{-|z|})²,
  tanh'(z) = sech² z = 4e^{-2|z|}/(1+e^{-2|z|})², gelu's Φ by erfc, silu' with σ(−z) itself, ...;
* the output δ in one piece where the loss and the output activation meet: sigmoid + bce gives
  δ = (σ(z) − y)/N exactly (never through torch's 1e-12 guard), softmax + bce the closed form
  δ_j = [(p_j − y_j) − Σ_{k≠j} (p_k − y_k) p_j/(1 − p_k)]/N with p_j/(1 − p_k) computed as the softmax of
  z with unit k left out (no rounded 1 − p is ever divided by); cross_entropy softmax(z) − onehot,
  log_softmax + nll the same.

The loss *value* is the spec's definition (torch's: bce's logs clamped at −100 on the probabilities).
Kink conventions are torch's: relu'(0) = 0, leaky'(0) = slope, elu'(0) = α, selu'(0) = λα, hardtanh' = 0
at both bounds, l1's sign(0) = 0; softplus is z where βz > threshold, as torch.

Convolution, pooling and flatten layers (spec format 2) are written from their definitions, not as
manual_bp's im2col + col2im. With â the input padded by (lo, hi) per spatial axis (torch's "same":
d(k − 1) in all, lo = ⌊d(k − 1)/2⌋), stride s, dilation d, and for each kernel offset j the strided
slice â_j[x] = â[s x + d j] (one slice per offset, every position and example at once):

* conv: z = b + Σ_j einsum(â_j, θ[..., j]) per group (channels split as (G, C/G), einsum over the
  group axis); ∂C/∂θ[..., j] = einsum(δ, â_j); ∂C/∂â is δ·θ[..., j] scattered back onto the slice â_j,
  offset by offset (within one offset the slice's positions are distinct, so a plain += is exact);
* max pool: the running max over the offsets in row-major order, replaced only where an element is
  strictly larger, so a tie keeps the FIRST maximal element (torch's CPU kernel); δ goes back to the
  slice of the offset that won, offset by offset; padding is −∞;
* avg pool: Σ_j â_j / N with N = k (kH·kW) if count_include_pad, else the number of window elements
  inside the input, counted by pooling an indicator of the unpadded input the same way; ∂C/∂â_j += δ/N;
* flatten: a reshape, and its inverse.

Normalization and dropout layers are written as manual_bp's are not: every normalization first lays its
input out as a 2-D table, one row per set S that it normalizes over (batch norm: channels moved to the
front, (C, m·positions); layer norm: (m·leading axes, prod normalized_shape); group norm: (m·G, C/G·positions)),
and runs the forward as a chain of elementary nodes, μ = Σx/N, x−μ, (x−μ)², σ² = Σ(x−μ)²/N,
r = √(σ² + ε), ρ = 1/r, x̂ = (x−μ)·ρ. The backward walks that graph node by node in reverse (the
staged derivation, cs231n style), never the compact (g − mean g − x̂ mean(g x̂))/s:

    ∂ρ = Σ g (x−μ);  ∂(x−μ) = g ρ;  ∂r = −∂ρ/r²;  ∂σ² = ∂r/(2r);  ∂(x−μ) += 2 (x−μ) ∂σ²/N;
    ∂μ = −Σ ∂(x−μ);  ∂x = ∂(x−μ) + ∂μ/N

with g = ∂C/∂x̂ = γ δ. Batch norm in eval mode multiplies by ρ = 1/√(r_σ² + ε) of the running variance
(∂x = g ρ). ∂C/∂γ and ∂C/∂β are einsums over the axes γ is shared across. Dropout is
z = where(M, a/(1 − p), 0) (a division, not a product with the scaled mask), ∂C/∂a = where(M, δ/(1 − p), 0),
M the case's mask, manual_bp.keep_mask(seed, p, shape): case data, not math, drawn here by the same
documented formula ``default_rng(seed).random(shape) >= p`` so that nothing is imported from manual_bp
(tests/test_second_correct_norm.py checks the two agree); eval mode is the identity.

Embedding and residual layers are written as manual_bp's are not. The embedding's ∂C/∂W is the product
Hᵀδ with H the (m·T, V) one-hot table of the tokens (repeats summed by the product, never scattered with
``np.add.at``), the padding row masked to zero afterwards; the forward is ``np.take``. A residual block is
not a layer with its own backward at all: the forward opens every block into a tape of nodes (its body's
layers keyed ``layers.{i}.body.{j}``, nested blocks opened in turn, its projection ``layers.{i}.projection``,
and a sum node ``layers.{i}`` that carries the block's activation), every value numbered; the backward walks
the tape in reverse as a small reverse-mode autodiff, one adjoint per value, gradients *added* into it by
every node that reads the value (the block input's adjoint collects the body's and the skip path's before
its producer is reached). Every node's δ = ∂C/∂z is returned under its key.

Sequence layers (batch first, (m, T, n)) are written as manual_bp's are not:

* temporal_dense: one einsum with the step axis kept ("mti,oi->mto"; θ and b summed over m and t in one einsum),
  not a product on m·T rows;
* rnn / lstm / gru (torch's gate order and names): per step the input and hidden products are separate einsums
  added to the *summed* biases b_ih + b_hh (gru keeps b_hn inside r ⊙ (h W_hnᵀ + b_hn)); σ(u) = ½(1 + tanh(u/2))
  (½ e^{u/2}/cosh(u/2) for u < 0); gru's h = σ(−a_z) n + σ(a_z) h₋ (1 − z never rounded). BPTT walks back with
  *every weight gradient added step by step* into a running total, and every derivative is taken from the
  pre-activation (σ'(u) = e^{−|u|}/(1 + e^{−|u|})², sech² u, relu' = 1[u > 0]), never from a gate's value;
* attention (torch.nn.MultiheadAttention, batch first, packed in_proj): one head at a time, q scaled by 1/√d_h
  *before* the product (so dk = dSᵀ q̃ needs no scale and dq = (dS k)/√d_h), the softmax as e · (1/Σe), its
  vector-Jacobian product as P ⊙ dP − P Σ(P ⊙ dP), each head's rows of ∂in_proj written from that head alone.

A loss after a per-step head reads the output (m, T, k) as m·T rows of k, every reduction over those rows
(half_mse's m is m·T); a class target of −100 drops its row (δ 0) and cross_entropy / nll average over the rows
kept, as torch's default ignore_index (the same for a vector output's −100).

``grads(spec, params, x, y) -> (loss, grads, deltas)``, everything in the params' dtype (token indices stay
integers).
"""

from __future__ import annotations

import math

import numpy as np

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
GELU_TANH_K = math.sqrt(2.0 / math.pi)
GELU_TANH_C = 0.044715
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _act(layer):
    """(name, params) of a layer's activation, read from the spec's JSON form."""
    a = layer.activation
    return a.name, dict(a.params)


# -- elementary stable pieces -------------------------------------------------------------------------
def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _dsigmoid(z):
    """σ(z) σ(−z) = e^{-|z|} / (1 + e^{-|z|})²."""
    e = np.exp(-np.abs(z))
    return e / ((1 + e) * (1 + e))


def _sech2(u):
    """1 − tanh²(u) = 4 e^{-2|u|} / (1 + e^{-2|u|})², no cancellation."""
    e = np.exp(-2 * np.abs(u))
    return 4 * e / ((1 + e) * (1 + e))


def _softplus(z):
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _log_softmax(z):
    """Over the last axis (the units of a row, or of one step of a sequence)."""
    m = z.max(axis=-1, keepdims=True)
    s = z - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def _softmax(z):
    """Over the last axis (the units of a row, or of one step of a sequence)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _phi_cdf(z):
    return 0.5 * _erfc(-z / math.sqrt(2.0))


# -- activations: value and derivative, both from z ------------------------------------------------------
def act_value(name, p, z):
    if name == "identity":
        return z
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0 * z)
    if name == "leaky_relu":
        return np.where(z > 0, z, p.get("negative_slope", 0.01) * z)
    if name == "elu":
        return np.where(z > 0, z, p.get("alpha", 1.0) * np.expm1(np.minimum(z, 0)))
    if name == "selu":
        return SELU_SCALE * np.where(z > 0, z, SELU_ALPHA * np.expm1(np.minimum(z, 0)))
    if name == "softplus":
        beta, threshold = p.get("beta", 1.0), p.get("threshold", 20.0)
        return np.where(beta * z > threshold, z, _softplus(beta * z) / beta)
    if name == "gelu":
        return z * _phi_cdf(z)
    if name == "gelu_tanh":
        return 0.5 * z * (1 + np.tanh(GELU_TANH_K * (z + GELU_TANH_C * z ** 3)))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "mish":
        return z * np.tanh(_softplus(z))
    if name == "softsign":
        return z / (1 + np.abs(z))
    if name == "hardtanh":
        return np.minimum(np.maximum(z, p.get("min_val", -1.0)), p.get("max_val", 1.0))
    if name == "softmax":
        return _softmax(z)
    if name == "log_softmax":
        return _log_softmax(z)
    raise ValueError(f"unknown activation {name}")


def act_derivative(name, p, z):
    """g'(z) for elementwise activations, from z alone."""
    if name == "identity":
        return np.ones_like(z)
    if name == "sigmoid":
        return _dsigmoid(z)
    if name == "tanh":
        return _sech2(z)
    if name == "relu":
        return (z > 0) * np.ones_like(z)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, p.get("negative_slope", 0.01))
    if name == "elu":
        return np.where(z > 0, 1.0, p.get("alpha", 1.0) * np.exp(np.minimum(z, 0)))
    if name == "selu":
        return np.where(z > 0, SELU_SCALE, SELU_SCALE * SELU_ALPHA * np.exp(np.minimum(z, 0)))
    if name == "softplus":
        beta, threshold = p.get("beta", 1.0), p.get("threshold", 20.0)
        return np.where(beta * z > threshold, 1.0, _sigmoid(beta * z))
    if name == "gelu":
        return _phi_cdf(z) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":
        u = GELU_TANH_K * (z + GELU_TANH_C * z ** 3)
        return 0.5 * (1 + np.tanh(u)) + 0.5 * z * _sech2(u) * GELU_TANH_K * (1 + 3 * GELU_TANH_C * z * z)
    if name == "silu":
        return _sigmoid(z) * (1 + z * _sigmoid(-z))
    if name == "mish":
        sp = _softplus(z)
        return np.tanh(sp) + z * _sigmoid(z) * _sech2(sp)
    if name == "softsign":
        return 1 / (1 + np.abs(z)) ** 2
    if name == "hardtanh":
        return ((z > p.get("min_val", -1.0)) & (z < p.get("max_val", 1.0))) * np.ones_like(z)
    raise ValueError(f"{name} has no elementwise derivative")


def act_vjp(name, p, z, g):
    """δ = ∂C/∂z from ∂C/∂a, per example for the row-coupled ones."""
    if name == "softmax":
        s = _softmax(z)
        return s * (g - np.einsum("...j,...j->...", g, s)[..., None])
    if name == "log_softmax":
        return g - _softmax(z) * g.sum(axis=-1, keepdims=True)
    return g * act_derivative(name, p, z)


# -- losses: the value, and ∂C/∂a (or δ_L directly where loss and output activation meet) ------------------
# Every loss below reads its output as rows: (m, k), or a sequence's (m, T, k) laid out as m·T rows of k by
# ``grads`` (so half_mse's m is the number of rows). A class target of −100 (torch's ignore_index) drops its row:
# its δ is 0 and the class losses average over the rows kept.
IGNORED = -100


def _kept(y):
    """The rows whose class target is not −100, and how many (at least 1: every row ignored is refused upstream)."""
    kept = np.asarray(y) != IGNORED
    return kept, max(int(kept.sum()), 1)


def _clamped_log(v):
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(v), -100)


def loss_value(loss, a, y, m):
    name, p = loss.name, dict(loss.params)
    n = a.size
    if name == "half_sse":
        return 0.5 * np.sum((a - y) ** 2)
    if name == "sse":
        return np.sum((y - a) ** 2)
    if name == "half_mse":
        return np.sum((a - y) ** 2) / (2 * m)
    if name == "mse":
        return np.sum((a - y) ** 2) / n
    if name == "l1":
        return np.sum(np.abs(a - y)) / n
    if name == "huber":
        d, r = p["delta"], np.abs(a - y)
        return np.sum(np.where(r < d, 0.5 * r * r, d * (r - 0.5 * d))) / n
    if name == "smooth_l1":
        b, r = p["beta"], np.abs(a - y)
        return np.sum(np.where(r < b, 0.5 * r * r / b, r - 0.5 * b)) / n
    if name == "bce":
        return -np.sum(y * _clamped_log(a) + (1 - y) * _clamped_log(1 - a)) / n
    if name == "bce_with_logits":
        return np.sum(np.maximum(a, 0) - a * y + np.log1p(np.exp(-np.abs(a)))) / n
    if name in ("cross_entropy", "nll"):
        kept, count = _kept(y)
        scores = _log_softmax(a) if name == "cross_entropy" else a
        picked = scores[np.flatnonzero(kept), y[kept]]               # the kept rows' target entries only
        return -np.sum(picked) / count
    raise ValueError(f"unknown loss {name}")


def loss_grad(loss, a, y, m):
    name, p = loss.name, dict(loss.params)
    n = a.size
    if name == "half_sse":
        return a - y
    if name == "sse":
        return 2 * (a - y)
    if name == "half_mse":
        return (a - y) / m
    if name == "mse":
        return 2 * (a - y) / n
    if name == "l1":
        return np.sign(a - y) / n
    if name == "huber":
        d = p["delta"]
        return np.minimum(np.maximum(a - y, -d), d) / n
    if name == "smooth_l1":
        b, r = p["beta"], a - y
        return np.where(np.abs(r) < b, r / b, np.sign(r)) / n
    if name == "bce_with_logits":
        return (_sigmoid(a) - y) / n
    if name == "cross_entropy":
        return _softmax_minus_target(a, y)
    if name == "nll":
        _, count = _kept(y)
        return -_one_hot(y, a) / count
    raise ValueError(f"{name} is handled with its output activation")


def _one_hot(y, like):
    """1 at (r, y_r) for each kept row r; a row whose target is −100 stays all zeros."""
    kept, _ = _kept(y)
    hot = np.zeros_like(like)
    hot[np.flatnonzero(kept), y[kept]] = 1
    return hot


def _softmax_minus_target(z, y):
    """(softmax(z) − onehot(y)) / (kept rows), zero on the rows whose target is −100."""
    kept, count = _kept(y)
    return np.where(kept[:, None], _softmax(z) - _one_hot(y, z), np.zeros_like(z)) / count


def output_delta(spec, z, a, y, m):
    """δ_L = ∂C/∂z_L, the loss and the output activation taken together where that is exact."""
    name, p = _act(spec.layers[-1])
    loss = spec.loss.name
    n = a.size
    if loss == "bce" and name == "sigmoid":
        return (_sigmoid(z) - y) / n
    if loss == "bce" and name == "softmax":
        return _softmax_bce_delta(z, y) / n
    if loss == "nll" and name == "log_softmax":
        return _softmax_minus_target(z, y)
    return act_vjp(name, p, z, loss_grad(spec.loss, a, y, m))


def _softmax_bce_delta(z, y):
    r"""N·δ for bce after softmax, without ever dividing by a rounded 1 − p.

    :math:`δ_j = (p_j − y_j) − \sum_{k≠j} (p_k − y_k)\, p_j/(1 − p_k)`, and :math:`p_j/(1 − p_k) = q^{(k)}_j`,
    the softmax of z with unit k left out: computed as its own softmax (shifted by the largest remaining
    logit), it stays exact where p_k rounds to 1 and every other exp(z − max z) underflows.
    """
    k = z.shape[1]
    if k == 1:
        return np.zeros_like(z)  # a one-unit softmax is the constant 1: the loss does not depend on z
    pr = _softmax(z)
    left_out = np.where(np.eye(k, dtype=bool)[None, :, :], -np.inf, z[:, None, :])   # row k: z without unit k
    q = np.exp(left_out - left_out.max(axis=2, keepdims=True))
    q /= q.sum(axis=2, keepdims=True)                                               # q[m, k, j] = p_j / (1 − p_k)
    r = pr - y
    return r - np.einsum("mk,mkj->mj", r, q)


# -- convolution, pooling, flatten (spec format 2) ------------------------------------------------------
def _spatial_pads(layer):
    """(lo, hi) per spatial axis, from the spec's fields: "same" pads d(k − 1) in all, ⌊d(k − 1)/2⌋ left."""
    if isinstance(layer.padding, str):
        assert layer.padding == "same"
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(layer.kernel_size, layer.dilation)]
    return [(p, p) for p in layer.padding]


def _dilation(layer):
    return tuple(getattr(layer, "dilation", (1,) * len(layer.kernel_size)))


def _padded(a, pads, fill):
    """a (m, C, *S) inside a (m, C, *(S + lo + hi)) array of ``fill``; returns it and the inner view's slices."""
    shape = (*a.shape[:2], *(n + lo + hi for n, (lo, hi) in zip(a.shape[2:], pads)))
    out = np.full(shape, fill, dtype=a.dtype)
    inner = (slice(None), slice(None), *(slice(lo, lo + n) for n, (lo, _) in zip(a.shape[2:], pads)))
    out[inner] = a
    return out, inner


def _geometry(layer, a_shape):
    """(pads, out sizes, [(offset, slices)] in row-major offset order) of a windowed layer on input a_shape."""
    pads = _spatial_pads(layer)
    dil, stride, kernel = _dilation(layer), tuple(layer.stride), tuple(layer.kernel_size)
    out = tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                for n, (lo, hi), k, s, d in zip(a_shape[2:], pads, kernel, stride, dil))
    offsets = []
    for j in np.ndindex(*kernel):  # row-major: the last axis fastest
        sl = tuple(slice(d * jt, d * jt + s * (o - 1) + 1, s) for jt, s, d, o in zip(j, stride, dil, out))
        offsets.append((j, (slice(None), slice(None), *sl)))
    return pads, out, offsets


def _conv_setup(layer, w, a):
    """What the conv forward and backward both start from: groups G, batch m, channels C and O, output
    size, the kernel offsets' slices, the spatial einsum subscripts, the zero-padded input (and the slice
    of it that is the input), and θ split by group (G, O/G, C/G, *kernel)."""
    G, (m, C), O = layer.groups, a.shape[:2], w.shape[0]
    pads, out, offsets = _geometry(layer, a.shape)
    ap, inner = _padded(a, pads, 0)
    theta = w.reshape(G, O // G, C // G, *w.shape[2:])
    return G, m, C, O, out, offsets, "xy"[:len(out)], ap, inner, theta


def conv_forward(layer, w, b, a):
    r""":math:`z = b + Σ_j θ[:, :, j] · â_j`, per group: (m, G, C/G, *out) against (G, O/G, C/G)."""
    G, m, C, O, out, offsets, xy, ap, _, theta = _conv_setup(layer, w, a)
    z = np.zeros((m, G, O // G, *out), dtype=a.dtype)
    for j, sl in offsets:
        piece = ap[sl].reshape(m, G, C // G, *out)
        z += np.einsum(f"mgc{xy},goc->mgo{xy}", piece, theta[(Ellipsis, *j)])
    z = z.reshape(m, O, *out)
    if b is not None:
        z = z + b.reshape(O, *(1,) * len(out))
    return z


def conv_backward(layer, w, a, delta):
    r"""(∂C/∂θ, ∂C/∂b, ∂C/∂a): ∂C/∂θ[..., j] = Σ δ â_j, ∂C/∂b = Σ δ, ∂C/∂â_j += δ θ[..., j]."""
    G, m, C, O, out, offsets, xy, ap, inner, theta = _conv_setup(layer, w, a)
    d = delta.reshape(m, G, O // G, *out)
    gw = np.zeros_like(theta)
    gap = np.zeros_like(ap)
    for j, sl in offsets:
        piece = ap[sl].reshape(m, G, C // G, *out)
        gw[(Ellipsis, *j)] = np.einsum(f"mgo{xy},mgc{xy}->goc", d, piece)
        gap[sl] += np.einsum(f"mgo{xy},goc->mgc{xy}", d, theta[(Ellipsis, *j)]).reshape(m, C, *out)
    gb = np.einsum(f"mo{xy}->o", delta)
    return gw.reshape(w.shape), gb, gap[inner]


def max_pool_forward(layer, a):
    """(z, winner): the running max over the window offsets in row-major order, and the offset index
    it came from; an element replaces it only when strictly larger, so the first maximal one wins."""
    pads, out, offsets = _geometry(layer, a.shape)
    ap, _ = _padded(a, pads, -np.inf)
    z = ap[offsets[0][1]].copy()
    winner = np.zeros(z.shape, dtype=np.int64)
    for n, (_, sl) in enumerate(offsets[1:], start=1):
        piece = ap[sl]
        larger = (piece > z) | np.isnan(piece)      # as torch's CPU kernel: a NaN takes the window
        z = np.where(larger, piece, z)
        winner = np.where(larger, n, winner)
    return z, winner


def max_pool_backward(layer, a, delta):
    pads, out, offsets = _geometry(layer, a.shape)
    _, winner = max_pool_forward(layer, a)
    gap, inner = _padded(np.zeros_like(a), pads, 0)
    for n, (_, sl) in enumerate(offsets):
        gap[sl] += np.where(winner == n, delta, 0)
    return gap[inner]


def _avg_divisor(layer, a):
    """N per output position: the kernel's size, or (count_include_pad false) the window's elements inside
    the input, counted by summing an indicator of the unpadded input over the windows."""
    if layer.count_include_pad:
        return np.asarray(math.prod(layer.kernel_size), dtype=a.dtype)
    pads, out, offsets = _geometry(layer, a.shape)
    ones, _ = _padded(np.ones((1, 1, *a.shape[2:]), dtype=a.dtype), pads, 0)
    return sum(ones[sl] for _, sl in offsets)


def avg_pool_forward(layer, a):
    pads, out, offsets = _geometry(layer, a.shape)
    ap, _ = _padded(a, pads, 0)
    total = np.zeros((*a.shape[:2], *out), dtype=a.dtype)
    for _, sl in offsets:
        total += ap[sl]
    return total / _avg_divisor(layer, a)


def avg_pool_backward(layer, a, delta):
    pads, out, offsets = _geometry(layer, a.shape)
    share = delta / _avg_divisor(layer, a)
    gap, inner = _padded(np.zeros_like(a), pads, 0)
    for _, sl in offsets:
        gap[sl] += share
    return gap[inner]


# -- normalization and dropout ----------------------------------------------------------------------------
def _as_rows(layer, a):
    """(table, back): a as a 2-D table with one row per normalization set, and the map that puts a table
    of that shape back into a's layout."""
    kind = layer.type
    if kind == "batch_norm":                      # (m, C, *S) -> (C, m, *S) -> (C, m·S)
        moved = np.moveaxis(a, 1, 0)
        return moved.reshape(a.shape[1], -1), lambda t: np.moveaxis(t.reshape(moved.shape), 0, 1)
    if kind == "layer_norm":                      # (..., *normalized_shape) -> (rest, prod normalized_shape)
        width = math.prod(_ln_shape(layer, a))
        return a.reshape(-1, width), lambda t: t.reshape(a.shape)
    if kind == "group_norm":                      # (m, C, *S) -> (m·G, C/G·S), channels of a group consecutive
        return a.reshape(a.shape[0] * layer.num_groups, -1), lambda t: t.reshape(a.shape)
    raise ValueError(kind)


def _ln_shape(layer, a):
    return tuple(a.shape[-1:]) if layer.normalized_shape is None else tuple(layer.normalized_shape)


def _gamma_view(layer, v, a):
    """γ or β (per channel, or normalized_shape) shaped to broadcast against a."""
    if layer.type == "layer_norm":
        return v.reshape(_ln_shape(layer, a))
    return v.reshape(1, a.shape[1], *(1,) * (a.ndim - 2))


def _affine(layer):
    return getattr(layer, "affine", getattr(layer, "elementwise_affine", True))


def _norm_graph(layer, params, i, a):
    """The forward as a chain of nodes over the row table: returns (x̂ in a's layout, cache for the backward)."""
    x, back = _as_rows(layer, a)
    dt = a.dtype.type
    eps = dt(layer.eps)
    if layer.type == "batch_norm" and not layer.training:
        rmu = params[f"{_key(i)}.running_mean"].astype(a.dtype).reshape(-1, 1)
        rvar = params[f"{_key(i)}.running_var"].astype(a.dtype).reshape(-1, 1)
        rho = dt(1) / np.sqrt(rvar + eps)
        return back((x - rmu) * rho), {"eval": True, "rho": rho, "back": back}
    n = x.shape[1]
    mu = np.einsum("rn->r", x)[:, None] / dt(n)               # node 1: the mean
    xmu = x - mu                                               # node 2: centred
    sq = xmu * xmu                                             # node 3: squared
    var = np.einsum("rn->r", sq)[:, None] / dt(n)             # node 4: biased variance
    r = np.sqrt(var + eps)                                     # node 5: r = √(σ² + ε)
    rho = dt(1) / r                                            # node 6: ρ = 1/r
    xhat = xmu * rho                                           # node 7: x̂ = (x − μ) ρ
    return back(xhat), {"eval": False, "xmu": xmu, "r": r, "rho": rho, "n": n, "back": back}


def _norm_graph_backward(layer, a, g, cache):
    """∂C/∂a from g = ∂C/∂x̂, node by node in reverse through the forward graph."""
    rows, _ = _as_rows(layer, g)
    back = cache["back"]
    if cache["eval"]:
        return back(rows * cache["rho"])
    xmu, r, rho, n = cache["xmu"], cache["r"], cache["rho"], cache["n"]
    dt = a.dtype.type
    d_rho = np.einsum("rn,rn->r", rows, xmu)[:, None]          # x̂ = xmu·ρ, ρ shared along the row
    d_xmu = rows * rho                                         # ... and its xmu branch
    d_r = -d_rho / (r * r)                                     # ρ = 1/r
    d_var = d_r / (dt(2) * r)                                  # r = √(σ² + ε)
    d_sq = np.broadcast_to(d_var / dt(n), xmu.shape)           # σ² = Σ sq / N
    d_xmu = d_xmu + dt(2) * xmu * d_sq                         # sq = xmu², second branch into xmu
    d_mu = -np.einsum("rn->r", d_xmu)[:, None]                 # xmu = x − μ, μ's branch
    d_x = d_xmu + d_mu / dt(n)                                 # μ = Σ x / N
    return back(d_x)


def norm_forward(layer, params, i, a):
    xhat, _ = _norm_graph(layer, params, i, a)
    if not _affine(layer):
        return xhat
    return xhat * _gamma_view(layer, params[f"{_key(i)}.weight"], a) + _gamma_view(layer, params[f"{_key(i)}.bias"], a)


def norm_backward(layer, params, i, a, delta):
    """({weight, bias} when affine, ∂C/∂a)."""
    xhat, cache = _norm_graph(layer, params, i, a)
    nabla, g = {}, delta
    if _affine(layer):
        w = params[f"{_key(i)}.weight"]
        if layer.type == "layer_norm":                          # shared across all leading axes
            k = w.size
            nabla["weight"] = np.einsum("qk,qk->k", delta.reshape(-1, k), xhat.reshape(-1, k)).reshape(w.shape)
            nabla["bias"] = np.einsum("qk->k", delta.reshape(-1, k)).reshape(w.shape)
        else:                                                   # per channel: shared across batch and positions
            m, c = a.shape[:2]
            d3 = delta.reshape(m, c, -1)
            nabla["weight"] = np.einsum("mcp,mcp->c", d3, xhat.reshape(m, c, -1))
            nabla["bias"] = np.einsum("mcp->c", d3)
        g = delta * _gamma_view(layer, w, a)
    return nabla, _norm_graph_backward(layer, a, g, cache)


def keep_mask(seed, p, shape):
    """The case's dropout mask (True = kept), as manual_bp.keep_mask draws it: NumPy's PCG64 from the seed."""
    return np.random.default_rng(seed).random(tuple(shape)) >= p


def dropout_forward(layer, a):
    if not layer.training:
        return a
    return np.where(keep_mask(layer.seed, layer.p, a.shape), a / a.dtype.type(1 - layer.p), a.dtype.type(0))


def dropout_backward(layer, a, delta):
    if not layer.training:
        return delta
    return np.where(keep_mask(layer.seed, layer.p, a.shape), delta / delta.dtype.type(1 - layer.p), delta.dtype.type(0))


def _key(i):
    """The parameter prefix of a layer: ``layers.{i}`` for a top-level index, or a full dotted name as given
    (``layers.2.body.0``, ``layers.2.projection``) for a layer inside a block."""
    return i if isinstance(i, str) else f"layers.{i}"


# -- embedding: a one-hot table times the weight ---------------------------------------------------------------
def _one_hot_tokens(tokens, vocab, dtype):
    """The (m·T, V) table with a 1 at each token's column: the embedding is this table times W."""
    flat = np.asarray(tokens).reshape(-1)
    return (flat[:, None] == np.arange(vocab)[None, :]).astype(dtype)


def embedding_forward(layer, w, tokens):
    """z[m, t] = W[x[m, t]], read off by ``np.take`` (a product with the one-hot table would turn an infinite
    entry of W elsewhere in the table into 0·∞ = NaN)."""
    return np.take(w, np.asarray(tokens, dtype=np.int64), axis=0)


def embedding_backward(layer, w, tokens, delta):
    r"""∂C/∂W = Hᵀ δ with H the one-hot table of the tokens: row v is Σ δ over every (m, t) whose token is v,
    repeats summed by the product itself; the padding row is then masked to zero. No ∂C/∂x (tokens)."""
    hot = _one_hot_tokens(tokens, w.shape[0], w.dtype)
    gw = np.einsum("nv,nd->vd", hot, delta.reshape(-1, w.shape[1]))
    if layer.padding_idx is not None:
        live = np.arange(w.shape[0]) != layer.padding_idx % w.shape[0]
        gw = np.where(live[:, None], gw, w.dtype.type(0))
    return gw


# -- sequences: temporal_dense, rnn / lstm / gru, multi-head self-attention ---------------------------------------
def temporal_dense_forward(w, b, a):
    """z[m, t] = a[m, t] θᵀ + b, one einsum with the step axis kept (not m·T rows)."""
    z = np.einsum("mti,oi->mto", a, w)
    return z if b is None else z + b


def temporal_dense_backward(w, a, delta, with_bias, need_input):
    """θ and b are shared by every step: their gradients sum over the batch and the steps, both in one einsum."""
    out = {"weight": np.einsum("mto,mti->oi", delta, a)}
    if with_bias:
        out["bias"] = np.einsum("mto->o", delta)
    return out, (np.einsum("mto,oi->mti", delta, w) if need_input else None)


def _sigmoid_th(u):
    r""":math:`σ(u) = ½(1 + \tanh(u/2))` for u ≥ 0, and :math:`½\, e^{u/2} / \cosh(u/2)` for u < 0 (the same
    function, no cancellation on either side; a cosh that overflows gives σ = 0, its value to the dtype)."""
    neg = np.minimum(u, 0) / 2
    with np.errstate(over="ignore"):
        low = 0.5 * np.exp(neg) / np.cosh(neg)
    return np.where(u >= 0, 0.5 * (1 + np.tanh(np.maximum(u, 0) / 2)), low)


_RNN_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _rnn_weights(layer, params, key):
    """(W_ih, W_hh, b_ih, b_hh) with zero biases when the layer has none (a zero adds nothing, exactly)."""
    w_ih, w_hh = params[f"{key}.weight_ih_l0"], params[f"{key}.weight_hh_l0"]
    if layer.bias:
        return w_ih, w_hh, params[f"{key}.bias_ih_l0"], params[f"{key}.bias_hh_l0"]
    zero = np.zeros(w_ih.shape[0], dtype=w_ih.dtype)
    return w_ih, w_hh, zero, zero


def _rnn_start(layer, params, key, m, dtype, name):
    """h_0 (or c_0): the learned vector repeated for every example, or zeros."""
    if layer.initial_state == "learned":
        return np.repeat(params[f"{key}.{name}"][None, :], m, axis=0)
    return np.zeros((m, layer.hidden_size), dtype=dtype)


def recurrent_run(layer, params, key, a):
    r"""Run rnn / lstm / gru over a (m, T, n), one step at a time: (output, tape), the tape one record per step
    with every pre-activation (the backward takes each derivative from them, never from a gate's value).

    Per step the input and hidden products are separate einsums added to the *summed* biases b_ih + b_hh (gru keeps
    b_hn apart: r multiplies h W_hnᵀ + b_hn). With the gate blocks of a = x W_ihᵀ + h W_hhᵀ + b:

    * rnn: h = φ(a), φ tanh or relu;
    * lstm: i, f, o = σ(a_i), σ(a_f), σ(a_o), g = tanh(a_g); c = f c₋ + i g; h = o tanh(c);
    * gru: r = σ(a_r), z = σ(a_z), n = tanh(a_n) with a_n = x W_inᵀ + b_in + r (h₋ W_hnᵀ + b_hn);
      h = σ(−a_z) n + σ(a_z) h₋ (1 − z written as σ(−a_z): exact where z rounds to 1).

    σ is ``_sigmoid_th``."""
    kind, H = layer.type, layer.hidden_size
    m, T, _ = a.shape
    w_ih, w_hh, b_ih, b_hh = _rnn_weights(layer, params, key)
    h = _rnn_start(layer, params, key, m, a.dtype, "h0")
    c = _rnn_start(layer, params, key, m, a.dtype, "c0") if kind == "lstm" else None
    tape, outs = [], []
    for t in range(T):
        x_t = a[:, t, :]
        rec = {"x": x_t, "h_prev": h, "c_prev": c}
        xin = np.einsum("mn,gn->mg", x_t, w_ih)
        hid = np.einsum("mk,gk->mg", h, w_hh)
        if kind == "rnn":
            pre = (hid + xin) + (b_ih + b_hh)
            h = np.tanh(pre) if layer.nonlinearity == "tanh" else np.where(pre > 0, pre, 0 * pre)
            rec["pre"] = pre
        elif kind == "lstm":
            pre = (hid + xin) + (b_ih + b_hh)
            a_i, a_f, a_g, a_o = (pre[:, j * H:(j + 1) * H] for j in range(4))
            g = np.tanh(a_g)
            i_, f_, o_ = _sigmoid_th(a_i), _sigmoid_th(a_f), _sigmoid_th(a_o)
            c = i_ * g + f_ * c
            h = o_ * np.tanh(c)
            rec.update(a_i=a_i, a_f=a_f, a_g=a_g, a_o=a_o, i=i_, f=f_, g=g, o=o_, c=c)
        else:  # gru
            xb, hb = xin + b_ih, hid + b_hh
            a_r = xb[:, :H] + hb[:, :H]
            a_z = xb[:, H:2 * H] + hb[:, H:2 * H]
            hn = hb[:, 2 * H:]
            r = _sigmoid_th(a_r)
            a_n = xb[:, 2 * H:] + r * hn
            n = np.tanh(a_n)
            h_new = _sigmoid_th(-a_z) * n + _sigmoid_th(a_z) * h
            rec.update(a_r=a_r, a_z=a_z, a_n=a_n, hn=hn, r=r, n=n)
            h = h_new
        outs.append(h)
        tape.append(rec)
    out = np.stack(outs, axis=1) if layer.return_sequences else outs[-1]
    return out, tape


def recurrent_forward(layer, params, key, a):
    return recurrent_run(layer, params, key, a)[0]


def recurrent_backward(layer, params, key, a, delta, need_input=True):
    r"""Backpropagation through time, step T … 1, every weight gradient *accumulated step by step* (an einsum per
    step added to a running total, not one product over all steps at the end).

    The output's δ joins ∂C/∂h_t from step t + 1: dh = δ_t + carry (δ_t only at t = T without return_sequences).
    From dh (and lstm's carried dc) each step forms the δ of its pre-activations, every derivative from the
    pre-activation itself (σ'(u) = e^{−|u|}/(1 + e^{−|u|})², tanh'(u) = sech² u, relu'(u) = 1[u > 0]):

    * rnn: d = dh φ'(pre);
    * lstm: dc = dc₊ + dh o sech²(c); d_i = dc g σ'(a_i), d_f = dc c₋ σ'(a_f), d_g = dc i sech²(a_g),
      d_o = dh tanh(c) σ'(a_o); dc₋ = dc f;
    * gru: d_n = dh σ(−a_z) sech²(a_n), d_z = dh (h₋ − n) σ'(a_z), d_r = d_n hn σ'(a_r); the input side sees
      [d_r d_z d_n], the hidden side [d_r d_z d_n r]; h₋ also gets dh σ(a_z) directly.

    Then ∂W_ih += d_xᵀ x_t, ∂W_hh += d_hᵀ h₋, ∂b_ih += Σ d_x, ∂b_hh += Σ d_h, ∂x_t = d_x W_ih,
    carry = d_h W_hh (+ the gru's direct path). A learned h0 (c0) gets the final carry summed over the batch."""
    kind, H = layer.type, layer.hidden_size
    _, tape = recurrent_run(layer, params, key, a)
    w_ih, w_hh, _, _ = _rnn_weights(layer, params, key)
    m, T, _ = a.shape
    dt = delta.dtype
    g_ih, g_hh = np.zeros_like(w_ih), np.zeros_like(w_hh)
    gb_ih, gb_hh = np.zeros(w_ih.shape[0], dtype=dt), np.zeros(w_ih.shape[0], dtype=dt)
    dx = np.zeros_like(a) if need_input else None
    carry = np.zeros((m, H), dtype=dt)
    carry_c = np.zeros((m, H), dtype=dt) if kind == "lstm" else None
    for t in reversed(range(T)):
        rec = tape[t]
        if layer.return_sequences:
            dh = delta[:, t, :] + carry
        else:
            dh = delta + carry if t == T - 1 else carry
        if kind == "rnn":
            pre = rec["pre"]
            dphi = _sech2(pre) if layer.nonlinearity == "tanh" else (pre > 0) * np.ones_like(pre)
            d_x = d_h = dh * dphi
            direct = None
        elif kind == "lstm":
            c = rec["c"]
            dc = carry_c + dh * rec["o"] * _sech2(c)
            d_x = d_h = np.concatenate([dc * rec["g"] * _dsigmoid(rec["a_i"]),
                                        dc * rec["c_prev"] * _dsigmoid(rec["a_f"]),
                                        dc * rec["i"] * _sech2(rec["a_g"]),
                                        dh * np.tanh(c) * _dsigmoid(rec["a_o"])], axis=1)
            carry_c = dc * rec["f"]
            direct = None
        else:  # gru
            d_n = dh * _sigmoid_th(-rec["a_z"]) * _sech2(rec["a_n"])
            d_z = dh * (rec["h_prev"] - rec["n"]) * _dsigmoid(rec["a_z"])
            d_r = d_n * rec["hn"] * _dsigmoid(rec["a_r"])
            d_x = np.concatenate([d_r, d_z, d_n], axis=1)
            d_h = np.concatenate([d_r, d_z, d_n * rec["r"]], axis=1)
            direct = dh * _sigmoid_th(rec["a_z"])
        g_ih += np.einsum("mg,mn->gn", d_x, rec["x"])
        g_hh += np.einsum("mg,mk->gk", d_h, rec["h_prev"])
        gb_ih += np.einsum("mg->g", d_x)
        gb_hh += np.einsum("mg->g", d_h)
        if need_input:
            dx[:, t, :] = np.einsum("mg,gn->mn", d_x, w_ih)
        carry = np.einsum("mg,gk->mk", d_h, w_hh)
        if direct is not None:
            carry = carry + direct
    out = {"weight_ih_l0": g_ih, "weight_hh_l0": g_hh}
    if layer.bias:
        out["bias_ih_l0"], out["bias_hh_l0"] = gb_ih, gb_hh
    if layer.initial_state == "learned":
        out["h0"] = np.einsum("mk->k", carry)
        if kind == "lstm":
            out["c0"] = np.einsum("mk->k", carry_c)
    return out, dx


def _attention_parts(layer, params, key, d):
    """(W_q, W_k, W_v, b_q, b_k, b_v, W_out, b_out): the packed in_proj split in its three (d, d) blocks."""
    w_in, w_out = params[f"{key}.in_proj_weight"], params[f"{key}.out_proj.weight"]
    if layer.bias:
        b_in, b_out = params[f"{key}.in_proj_bias"], params[f"{key}.out_proj.bias"]
    else:
        b_in, b_out = np.zeros(3 * d, dtype=w_in.dtype), None
    return (w_in[:d], w_in[d:2 * d], w_in[2 * d:], b_in[:d], b_in[d:2 * d], b_in[2 * d:], w_out, b_out)


def attention_run(layer, params, key, a):
    r"""Self-attention on a (m, T, d), one head at a time: (z, per-head records, context).

    Head j (columns j·d_h to (j+1)·d_h of q, k and v) projects x itself, then scales q *before* the product:
    q̃ = (x W_qjᵀ + b_qj)·(1/√d_h), S = q̃ kᵀ (per example, an einsum), −∞ where s > t when causal;
    P = e ⊙ (1/Σ_s e) with e = exp(S − max_s S) (a product with the reciprocal, not a division); O_j = P v.
    The heads' O side by side are the context C, and z = C W_outᵀ + b_out."""
    m, T, d = a.shape
    heads = layer.num_heads
    dh = d // heads
    scale = 1 / math.sqrt(dh)
    wq, wk, wv, bq, bk, bv, w_out, b_out = _attention_parts(layer, params, key, d)
    hidden = np.triu(np.ones((T, T), dtype=bool), 1)                 # s > t: a step that is not yet seen
    records, context = [], np.zeros_like(a)
    for j in range(heads):
        cols = slice(j * dh, (j + 1) * dh)
        q = (np.einsum("mtd,ed->mte", a, wq[cols]) + bq[cols]) * scale
        k = np.einsum("mtd,ed->mte", a, wk[cols]) + bk[cols]
        v = np.einsum("mtd,ed->mte", a, wv[cols]) + bv[cols]
        S = np.einsum("mte,mse->mts", q, k)
        if layer.causal:
            S = np.where(hidden, -np.inf, S)
        e = np.exp(S - S.max(axis=2, keepdims=True))
        P = e * (1 / np.einsum("mts->mt", e))[:, :, None]
        context[:, :, cols] = np.einsum("mts,mse->mte", P, v)
        records.append({"cols": cols, "q": q, "k": k, "v": v, "P": P})
    z = np.einsum("mtc,oc->mto", context, w_out)
    if b_out is not None:
        z = z + b_out
    return z, records, context


def attention_forward(layer, params, key, a):
    return attention_run(layer, params, key, a)[0]


def attention_backward(layer, params, key, a, delta, need_input=True):
    r"""The backward, head by head, each head's in_proj rows filled from that head's gradients:

    ∂W_out = Σ δᵀ C, ∂b_out = Σ δ, dC = δ W_out; per head dO = dC[:, :, cols], dv = Pᵀ dO, dP = dO vᵀ,
    dS = P ⊙ dP − P ⊙ Σ_s(P ⊙ dP) (the softmax's vector-Jacobian product, two products; a masked entry has
    P = 0 and so dS = 0); since q̃ already carries the scale, dk = dSᵀ q̃ takes none and dq = (dS k)/√d_h;
    ∂W_q[cols] = Σ dqᵀ x (and k, v alike), ∂b = Σ dq, ∂x += dq W_q[cols] + dk W_k[cols] + dv W_v[cols]."""
    m, T, d = a.shape
    dh = d // layer.num_heads
    scale = 1 / math.sqrt(dh)
    wq, wk, wv, _, _, _, w_out, _ = _attention_parts(layer, params, key, d)
    _, records, context = attention_run(layer, params, key, a)
    g_in = np.zeros((3 * d, d), dtype=delta.dtype)
    gb_in = np.zeros(3 * d, dtype=delta.dtype)
    out = {}
    g_out = np.einsum("mto,mtc->oc", delta, context)
    d_context = np.einsum("mto,oc->mtc", delta, w_out)
    dx = np.zeros_like(a) if need_input else None
    for rec in records:
        cols, q, k, v, P = rec["cols"], rec["q"], rec["k"], rec["v"], rec["P"]
        dO = d_context[:, :, cols]
        dv = np.einsum("mts,mte->mse", P, dO)
        dP = np.einsum("mte,mse->mts", dO, v)
        PdP = P * dP
        dS = PdP - P * np.einsum("mts->mt", PdP)[:, :, None]
        dq = np.einsum("mts,mse->mte", dS, k) * scale
        dk = np.einsum("mts,mte->mse", dS, q)
        for block, (grad, w) in enumerate(((dq, wq), (dk, wk), (dv, wv))):
            rows = slice(block * d + cols.start, block * d + cols.stop)
            g_in[rows] = np.einsum("mte,mtd->ed", grad, a)
            gb_in[rows] = np.einsum("mte->e", grad)
            if need_input:
                dx += np.einsum("mte,ed->mtd", grad, w[cols])
    out["in_proj_weight"] = g_in
    if layer.bias:
        out["in_proj_bias"] = gb_in
    out["out_proj.weight"] = g_out
    if layer.bias:
        out["out_proj.bias"] = np.einsum("mto->o", delta)
    return out, dx


def layer_forward(layer, params, i, a):
    """z of layer i (an index, or a block's dotted name) from its input a."""
    kind = layer.type
    if kind == "embedding":
        return embedding_forward(layer, params[f"{_key(i)}.weight"], a)
    if kind == "dense":
        z = np.einsum("mi,oi->mo", a, params[f"{_key(i)}.weight"])
        if layer.bias:
            z = z + params[f"{_key(i)}.bias"]
        return z
    if kind in ("conv1d", "conv2d"):
        return conv_forward(layer, params[f"{_key(i)}.weight"], params.get(f"{_key(i)}.bias") if layer.bias else None, a)
    if kind in ("max_pool1d", "max_pool2d"):
        return max_pool_forward(layer, a)[0]
    if kind in ("avg_pool1d", "avg_pool2d"):
        return avg_pool_forward(layer, a)
    if kind == "flatten":
        return a.reshape(a.shape[0], -1)
    if kind in ("batch_norm", "layer_norm", "group_norm"):
        return norm_forward(layer, params, i, a)
    if kind == "dropout":
        return dropout_forward(layer, a)
    if kind == "temporal_dense":
        bias = params[f"{_key(i)}.bias"] if layer.bias else None
        return temporal_dense_forward(params[f"{_key(i)}.weight"], bias, a)
    if kind in _RNN_GATES:
        return recurrent_forward(layer, params, _key(i), a)
    if kind == "attention":
        return attention_forward(layer, params, _key(i), a)
    raise ValueError(f"unknown layer type {kind}")


def layer_backward(layer, params, i, a, delta, need_input=None):
    """({short name: ∂C/∂θ}, ∂C/∂a) of layer i, from its input a and δ_i = ∂C/∂z_i (a dense layer's ∂C/∂a is None
    when ``need_input`` is false, by default for the network's first layer; an embedding's always is)."""
    kind = layer.type
    if need_input is None:
        need_input = _key(i) != "layers.0"
    if kind == "embedding":
        return {"weight": embedding_backward(layer, params[f"{_key(i)}.weight"], a, delta)}, None
    if kind == "dense":
        w = params[f"{_key(i)}.weight"]
        out = {"weight": np.einsum("mo,mi->oi", delta, a)}
        if layer.bias:
            out["bias"] = np.einsum("mo->o", delta)
        return out, (np.einsum("mo,oi->mi", delta, w) if need_input else None)
    if kind in ("conv1d", "conv2d"):
        gw, gb, ga = conv_backward(layer, params[f"{_key(i)}.weight"], a, delta)
        return ({"weight": gw, "bias": gb} if layer.bias else {"weight": gw}), ga
    if kind in ("max_pool1d", "max_pool2d"):
        return {}, max_pool_backward(layer, a, delta)
    if kind in ("avg_pool1d", "avg_pool2d"):
        return {}, avg_pool_backward(layer, a, delta)
    if kind == "flatten":
        return {}, delta.reshape(a.shape)
    if kind in ("batch_norm", "layer_norm", "group_norm"):
        return norm_backward(layer, params, i, a, delta)
    if kind == "dropout":
        return {}, dropout_backward(layer, a, delta)
    if kind == "temporal_dense":
        return temporal_dense_backward(params[f"{_key(i)}.weight"], a, delta, layer.bias, need_input)
    if kind in _RNN_GATES:
        return recurrent_backward(layer, params, _key(i), a, delta, need_input)
    if kind == "attention":
        return attention_backward(layer, params, _key(i), a, delta, need_input)
    raise ValueError(f"unknown layer type {kind}")


# -- the network: a tape of nodes, walked backward with adjoints accumulated per value ----------------------------
def _record(tape, key, layer, src, params, values, dtype, skip=None):
    """Run one node forward and append it to the tape: a layer node reads value ``src``; a sum node (a block's,
    ``skip`` given) adds values ``src`` and ``skip``. Its z and its activation's output both become values;
    returns the id of the activation's output."""
    if skip is None:
        z = layer_forward(layer, params, key, values[src])
    else:
        z = values[src] + values[skip]
    z = np.asarray(z).astype(dtype, copy=False)
    name, p = _act(layer)
    values.append(np.asarray(act_value(name, p, z)).astype(dtype, copy=False))
    tape.append({"key": key, "layer": layer, "src": src, "skip": skip, "z": z, "out": len(values) - 1})
    return len(values) - 1


def _unroll(tape, key, layer, src, params, values, dtype):
    """Lay a layer, or a residual block opened up, onto the tape: the body's nodes in order from the block's
    input, then its projection (from the same input), then the sum node that carries the block's activation."""
    if layer.type != "residual":
        return _record(tape, key, layer, src, params, values, dtype)
    cur = src
    for j, inner in enumerate(layer.body):
        cur = _unroll(tape, f"{key}.body.{j}", inner, cur, params, values, dtype)
    skip = src
    if layer.projection is not None:
        skip = _record(tape, f"{key}.projection", layer.projection, src, params, values, dtype)
    return _record(tape, key, layer, cur, params, values, dtype, skip=skip)


def grads(spec, params, x, y):
    """(loss, grads, deltas) of ``spec`` at ``params`` on the batch (x, y), in the params' dtype.

    The forward lays every node (blocks opened up) onto a tape, each value it makes numbered; the backward
    walks the tape in reverse, keeping one adjoint ∂C/∂v per value and *adding* into it whenever a node hands
    a gradient back, so a block input read by its body and by its skip path (or projection) collects both
    before the node that made it is reached. A node's δ is ∂C/∂z from the adjoint of its output; a sum node
    passes δ to both its operands."""
    names = list(spec.param_shapes())
    dtype = params[names[0]].dtype if names else np.asarray(x).dtype
    tokens = bool(spec.layers) and spec.layers[0].type == "embedding"
    x = np.asarray(x).astype(np.int64) if tokens else np.asarray(x, dtype=dtype)
    if x.ndim == len(spec.input_shape):
        x = x[None]
    m, k = x.shape[0], spec.output_size
    rows = m * math.prod(spec.output_shape) // k      # m, or m·T after a per-step head: the loss's rows of k
    if spec.loss.targets == "classes":
        y = np.asarray(y).reshape(rows).astype(np.int64)
    else:
        y = np.asarray(y, dtype=dtype).reshape(rows, k)

    tape, values, cur = [], [x], 0                      # value 0: the network's input
    for i, layer in enumerate(spec.layers):
        cur = _unroll(tape, f"layers.{i}", layer, cur, params, values, dtype)
    a = values[cur]
    loss = dtype.type(loss_value(spec.loss, a.reshape(rows, k), y, rows))

    adjoint, out, deltas = {}, {}, {}
    last = len(tape) - 1
    for n in reversed(range(len(tape))):
        node = tape[n]
        if n == last:                                   # the output node: loss and activation together, on rows
            z = node["z"]
            delta = output_delta(spec, z.reshape(rows, k), a.reshape(rows, k), y, rows).reshape(z.shape)
        else:
            name, p = _act(node["layer"])
            delta = act_vjp(name, p, node["z"], adjoint.pop(node["out"]))
        delta = np.asarray(delta).astype(dtype, copy=False)
        deltas[node["key"]] = delta
        if node["skip"] is not None:                    # z = body + skip: δ to both
            handed = [(node["src"], delta), (node["skip"], delta)]
        else:
            nabla, back = layer_backward(node["layer"], params, node["key"], values[node["src"]], delta,
                                         need_input=node["src"] != 0)
            for k, v in nabla.items():
                out[f"{node['key']}.{k}"] = np.asarray(v).astype(dtype, copy=False)
            handed = [] if back is None or node["src"] == 0 else [(node["src"], back)]
        for vid, g in handed:
            g = np.asarray(g).astype(dtype, copy=False)
            adjoint[vid] = adjoint[vid] + g if vid in adjoint else g
    grads_ = {name: out[name] for name in names}
    deltas = {node["key"]: deltas[node["key"]] for node in tape}
    return loss, grads_, deltas
