r"""The rounding allowance: how far a *correct* implementation may land from torch, element by element.

Two correct implementations of the same equations differ because each rounds, and where the problem
is ill-conditioned (a saturated sigmoid, a residual a − y far smaller than a, a sum that cancels) the
difference can be far larger than ε times the result. The oracle does not guess that difference from
torch's own runs (an ensemble of nudged inputs flips relu′ at exact kinks and turns a guard on or off,
so it measures the problem's discontinuities, not its rounding). It **bounds** it, by first-order
running-error analysis of the network it is checking, with every non-smooth choice held fixed:

Forward, layer i, with u the unit roundoff (2⁻⁵³ in float64, 2⁻²⁴ in float32) and E· an error bound:

.. math::

    E_{z_i} = E_{a_i}|θ_i|^T + γ_{n+2}\,(|a_i||θ_i|^T + |b_i|),\qquad γ_k = k\,u
    E_{a_{i+1}} = |g_i'(z_i)|\,E_{z_i} + c\,u\,M_g(z_i)

Backward, from ∇_a C at the output (loss-specific: its Hessian times E_{a_L} plus its own rounding):

.. math::

    E_{δ_i} = E_{up}\,|g'| + |up|\,(|g''|\,E_{z_i} + c\,u\,M_{g'}(z_i)) + c\,u\,|δ_i|
    E_{∂θ_i} = E_{δ_i}^T(|a_i| + E_{a_i}) + |δ_i|^T E_{a_i} + γ_{m+1}|δ_i|^T|a_i|,\quad
    E_{∂b_i} = \textstyle\sum E_{δ_i} + γ_{m+1}\sum|δ_i|
    E_{up_{i-1}} = E_{δ_i}|θ_i| + γ_{n+1}|δ_i||θ_i|

and the loss value (``_loss_rounding``; M_ℓ the size of the terms each element loss is formed from, N the
number of output elements; cross-entropy adds its log-sum-exp's k-term sum, k·u):

.. math::

    E_C = \textstyle\sum |∇_a C|\,E_{a_L} + c\,u\,M_ℓ + (N + 2)\,u\,|C|

Written here for dense layers; every other layer type replaces E|θ|ᵀ, v|θ|, vᵀa, Σv and the counts k of
γ_k by its own maps (``oracle.magnitudes``). Errors already made are moved through |θ| as a worst case:
they are not independent (one rounded probability moves a whole softmax row of δ, and that row feeds
every unit below), so they may add up with one sign.

M_g and M_g' are the magnitudes of the intermediate terms of each activation's usual formulas (the
rounding that evaluating *that formula* can really make): σ′ = a(1 − a) computed from a rounded a has
an absolute error of order u·a, not u·σ′; 1 − tanh² cancels where |tanh| ≈ 1; gelu's
½(1 + erf) cancels for z ≪ 0; and so on (``_scales``). c = 8 ulps per formula. γ_k is the worst case of
a k-term dot product. Every term is linear in u, so the candidate's rounding (u of its dtype) and the
reference's (float64) add up to one bound with u = u_dtype + u_float64. The first-order terms miss only
products of two rounding errors (but for ∂θ's E_δᵀE_a, kept: where a norm amplifies a tie's rounding to
the size of the values, torch's δ and a can both be ≈ 0 while a correct implementation's are as large as their errors).

What the bound does **not** cover, on purpose: which side of a kink an element takes, and whether a
numerical guard is active. Those are held fixed here (slopes use the larger side within reach of a
kink) and judged separately by the convention rule in ``checker``, so that no discontinuity can
inflate the allowance for the elements around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from manual_bp import Spec
from manual_bp.losses import IGNORE_INDEX

from .graph import consumers, node_weights, nodes
from .magnitudes import SumMagnitudes, magnitudes
from .twin import activation_fn

#: unit roundoff of each dtype: the largest relative error of one correctly rounded operation
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float64): 2.0 ** -53}
BCE_GUARD = float(np.float32(1e-12))  # torch's max(a(1 − a), 1e-12) in the bce backward
ULPS = 8  # rounding errors allowed for evaluating one library function or closed formula
LAMBDA = 6.0  # the probabilistic bound's margin: an n-term sum errs by more than λ√n·u·Σ|terms| with
              # probability below 2·exp(−λ²/2) ≈ 3e-8 (Higham and Mary 2019)


@dataclass
class Allowance:
    """Per-tensor elementwise bounds (float64 arrays) keyed like the comparison names, plus what they came from."""

    bounds: dict          # "loss", "layers.{i}.weight", "layers.{i}.bias", "layers.{i}.delta", "input.grad"
    z_error: list         # E_z per layer: how far a correct implementation's z may be from torch's
    output_error: np.ndarray  # E_a at the output (the loss's input)
    kink_masks: list      # per layer: elements within E_z of a kink (either one-sided slope is valid there)
    scales: list = None   # per layer: (M_g, M_g') of its activation (None for softmax-like), see _scales
    magnitudes: list = None  # per layer: its magnitude maps (oracle.magnitudes.Magnitudes)
    ties: list = None     # per layer: a max pool's windows with several contenders for the max (else None)
    act_error: list = None  # E_a per layer: how far a correct implementation's a = g(z) may be from torch's
    loss_rounding: float = 0.0  # the loss value's own rounding: E_C less its change through the output


def derivatives(act, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g'(z) and g''(z) of an elementwise activation, by torch.autograd (double backward), in float64."""
    with torch.enable_grad():  # also when called from a backward hook, where grad mode is off
        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        a = activation_fn(act)(zt)
        if not a.requires_grad:
            return np.ones_like(z), np.zeros_like(z)
        (d1,) = torch.autograd.grad(a.sum(), zt, create_graph=True)
        if not d1.requires_grad:
            return d1.detach().numpy(), np.zeros_like(z)
        (d2,) = torch.autograd.grad(d1.sum(), zt)
    return d1.detach().numpy(), np.nan_to_num(d2.numpy(), nan=0.0, posinf=0.0, neginf=0.0)


def other_branch_offset(act, z: np.ndarray) -> np.ndarray:
    """How far g(z) moves if z is evaluated on the other side of a kink where g's *value* jumps (softplus's
    threshold: log(1 + e^{βz})/β on one side, z on the other); 0 for every continuous activation. A correct
    implementation whose z lands within rounding of such a point may take either value."""
    if act.name != "softplus":
        return np.zeros(np.shape(z))
    beta, t = act.params.get("beta", 1.0), act.params.get("threshold", 20.0)
    bz = beta * z
    log_branch = (np.maximum(bz, 0) + np.log1p(np.exp(-np.abs(bz)))) / beta
    return np.where(bz > t, log_branch - z, z - log_branch)


def one_sided_slopes(act, k: float) -> tuple[float, float]:
    """The slopes of g just left and just right of the kink point k."""
    h = 4 * float(np.finfo(np.float64).eps) * max(1.0, abs(k))  # a few ulps: the one-sided limit, to rounding
    d1, _ = derivatives(act, np.array([k - h, k + h]))
    return float(d1[0]), float(d1[1])


def _sigmoid(z):
    """σ(z), accurate to the last bit at both ends (e^{−|z|} never overflows)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _gamma(n: int, u: float) -> float:
    """The rounding of an n-term sum, relative to the sum of its |terms|: λ√n·u (probabilistic, see above),
    or the worst case n·u where that is smaller."""
    return min(n, LAMBDA * math.sqrt(n)) * u


def _cancel(terms, result, us):
    """The rounding, in units of u = Σ us, of a subtraction of nearly equal ``terms`` (their size).

    For each dtype's unit roundoff u_k it is u_k·terms, not less where the exact ``result`` is merely
    below u_k·terms: a library function one ulp off turns 1 − tanh² = 0 into 2u. But where the result
    is below u_k²·terms, the argument is so far saturated (|x| > ln(2/u) for tanh) that every
    implementation returns the limit exactly and the subtraction gives 0: the error is the exact
    result itself. ``result`` must be computed without the cancellation (a stable closed form).
    """
    terms = np.broadcast_to(terms, np.shape(result)) if np.ndim(terms) < np.ndim(result) else terms
    r = np.abs(result)
    return sum(np.where(r < uk * uk * terms, r, uk * terms) for uk in us) / sum(us)


def _sech2(x):
    """1 − tanh²(x) = 4e^{−2|x|}/(1 + e^{−2|x|})², without the cancellation."""
    e = np.exp(-2 * np.abs(x))
    return 4 * e / (1 + e) ** 2


def _scales(act, z, a, d1, us) -> tuple[np.ndarray | float, np.ndarray | float]:
    """(M_g, M_g'): the size of the terms the usual formulas for g(z) and g'(z) add or subtract, so that
    evaluating them errs by at most c·u·M (``_cancel`` for the terms that cancel; ``us`` the unit
    roundoffs of the candidate's dtype and of the float64 reference)."""
    name, p = act.name, act.params
    az, aa, ad = np.abs(z), np.abs(a), np.abs(d1)
    if name in ("identity", "relu", "hardtanh"):
        return 0.0, 0.0
    if name == "leaky_relu":
        return aa, 0.0
    if name == "sigmoid":        # σ' = a(1 − a) from a rounded a: 1 − a cancels where a ≈ 1
        s = _sigmoid(z)
        return aa, ad + _cancel(aa, s * _sigmoid(-z), us)
    if name == "tanh":           # 1 − a² cancels where |a| ≈ 1
        return aa, ad + _cancel(aa * aa, _sech2(z), us)
    if name in ("elu", "selu"):  # α(e^z − 1) and a + α cancel for z ≤ 0
        alpha = p.get("alpha", act.__class__.__dict__.get("alpha", 1.0))
        scale = getattr(act, "scale", 1.0) if name == "selu" else 1.0
        neg = (z <= 0) * abs(alpha) * scale
        exact_slope = neg * np.exp(np.minimum(z, 0))
        # g' = a + α (selu: a + scale·α) from a rounded a only where z ≤ 0; for z > 0 it is the constant 1 (scale),
        # which no formula rounds beyond itself (ad), however large a is
        return aa + _cancel(neg, aa, us), ad + (z <= 0) * aa + _cancel(neg, exact_slope, us)
    if name == "softplus":       # log(1 + e^{βz})/β: 1 + e^{βz} rounds to 1 where βz ≪ 0 (without log1p)
        return aa + _cancel(1.0 / p["beta"], aa, us), ad
    if name == "gelu":           # z·½(1 + erf(z/√2)): 1 + erf cancels for z ≪ 0
        # Φ(z) = ½ erfc(−z/√2), accurate for z ≪ 0 (torch.special.ndtr forms ½(1 + erf) and returns 0 below
        # z ≈ −8.3, which _cancel would take for a saturated, exactly-0 result and allow no error at all)
        zt = torch.from_numpy(np.asarray(z, dtype=np.float64))
        cdf = (0.5 * torch.special.erfc(-zt / math.sqrt(2))).numpy()
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        # g′ = ½(1 + erf(z/√2)) + zφ(z): what survives 1 + erf's cancellation is Φ + |z|φ, not Φ alone (for z ≪ 0,
        # |g′| ≈ |z|φ ≈ z²Φ). An implementation that adds zφ before the 1 cancels (torch's vectorized float32 kernel
        # returns exactly 0 for z < −6.2, |g′| up to 1e-8) loses all of it where saturated, u·1 short of that
        left = cdf + az * pdf
        return aa + _cancel(az, az * cdf, us), ad + _cancel(1.0, left, us) + az * pdf
    if name == "gelu_tanh":      # ½(1 + tanh) and 1 − tanh² cancel
        k = math.sqrt(2 / math.pi)
        x = k * (z + 0.044715 * z ** 3)
        half_1pt = _sigmoid(2 * x)            # ½(1 + tanh x)
        slope = 0.5 * az * k * (1 + 0.134145 * z * z)
        return (aa + _cancel(az, az * half_1pt, us),
                ad + _cancel(1.0, half_1pt, us) + _cancel(slope, slope * _sech2(x), us))
    if name == "silu":           # σ(1 + z(1 − σ)): 1 − σ cancels for z ≫ 0
        s = _sigmoid(z)
        return aa, ad + s * (1 + az) + _cancel(s * az, s * az * _sigmoid(-z), us)
    if name == "mish":           # tanh(softplus) and 1 − tanh² cancel
        sp = np.logaddexp(0.0, z)
        s = _sigmoid(z)
        return aa + _cancel(az, aa, us), ad + 1.0 + _cancel(az * s, az * s * _sech2(sp), us)
    if name == "softsign":       # autograd of z/(1 + |z|): 1/(1 + |z|) − |z|/(1 + |z|)², two terms that cancel
        return aa, ad + _cancel(1 / (1 + az), ad, us)
    return aa + az, ad + 1.0     # an activation added later without its own entry: a generous default


def _loss_bounds(loss, a, y, G, Ea, u, guard):
    """(E_G, E_C): bounds on the errors of ∇_a C and of C, given E_a at the output.

    ``y``: the values (float64) of a value loss, or the class indices of cross_entropy / nll, where a row with
    −100 is ignored: its E_G is 0 and m is the number of kept rows. A sequence output (m, T, k) is bounded as the
    m·T rows of k the loss applies to (``Loss.as_rows``); E_G comes back in a's shape.
    """
    shape = np.shape(a)
    if len(shape) > 2:
        k = shape[-1]
        a, G, Ea = (np.reshape(t, (-1, k)) for t in (a, G, Ea))
        guard = None if guard is None else np.reshape(guard, (-1, k))
        y = None if y is None else np.reshape(y, -1 if loss.targets == "classes" else (-1, k))
    N, m = a.size, a.shape[0]
    kept = np.ones(m, dtype=bool)
    if loss.targets == "classes" and y is not None:
        kept = np.asarray(y) != IGNORE_INDEX
        m = max(int(kept.sum()), 1)
    cu = ULPS * u
    aG = np.abs(G)
    name = loss.name
    if name in ("half_sse", "sse", "half_mse", "mse"):
        h = {"half_sse": 1.0, "sse": 2.0, "half_mse": 1.0 / m, "mse": 2.0 / N}[name]
        EG = h * Ea + cu * aG
    elif name == "l1":
        EG = cu * aG
    elif name == "huber":
        EG = Ea / N + cu * aG
    elif name == "smooth_l1":
        EG = Ea / (loss.params["beta"] * N) + cu * aG
    elif name == "bce":
        q = np.maximum(a * (1 - a), 1e-150)  # where it is smaller, the guard is active and EG is not used
        H = np.abs(q - (a - y) * (1 - 2 * a)) / (q * q) / N
        with np.errstate(over="ignore", invalid="ignore"):  # H·E_a beyond float64 where q is tiny: an infinite
            EG = np.where(guard, 0.0, H * Ea + cu * aG)      # allowance there (the guard's elements never use it)
    elif name == "bce_with_logits":
        s = _sigmoid(a)
        EG = s * (1 - s) * Ea / N + cu * (s + np.abs(y)) / N
    elif name == "cross_entropy":
        p = np.exp(a - a.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        EG = p * (Ea + (p * Ea).sum(axis=-1, keepdims=True)) / m + cu * (p + np.abs(m * G)) / m
        EG = np.where(kept[:, None], EG, 0.0)  # an ignored row's gradient is exactly 0
    else:  # nll: −onehot/m is exact
        EG = np.zeros_like(a)
    # the loss value's own rounding (``_loss_rounding``): M_ℓ, the size of the terms each element loss is formed
    # from, averaged as C is (None: |C|, the loss's own size), and the length k of the sum inside each element loss
    inner = a.shape[-1] if name == "cross_entropy" else 0
    if name == "cross_entropy":
        mag = (np.abs(a[kept]).max(axis=-1) + np.log(a.shape[1]) + np.abs(a[kept]).max(axis=-1)).mean()
    elif name == "bce_with_logits":
        mag = (np.abs(a) * (1 + np.abs(y)) + np.log(2)).mean()
    elif name == "nll":
        mag = np.abs(a[kept]).max(axis=-1).mean()
    elif name == "bce":
        mag = 100.0 if np.any(guard) else float(np.mean(np.abs(np.log(np.clip(a, 1e-300, 1))) + np.abs(np.log(np.clip(1 - a, 1e-300, 1)))))
    else:
        mag = None
    EC = float(np.sum(aG * Ea))
    if name == "bce":  # C's change through a rounded a, exactly: −y·log a is far from linear where a is tiny (and G,
        # torch's guarded gradient, is not its slope there); torch's clamp of the log at −100 bounds it
        EC = float(np.sum(np.abs(y) * _clamped_log_change(a, Ea) + np.abs(1 - y) * _clamped_log_change(1 - a, Ea)) / N)
    return np.reshape(EG, shape), EC, mag, inner


def _clamped_log_change(v, e):
    """The most max(log v′, −100) moves for v′ within e of v (v′ ≤ 0 gives −100)."""
    def clog(t):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.maximum(np.log(np.maximum(t, 0.0)), -100.0)

    return np.maximum(clog(v + e) - clog(v), clog(v) - clog(v - e))


def _loss_rounding(mag: float, inner: int, n: int, loss: float, u: float, eta: float) -> float:
    r"""The rounding a correct implementation makes in the loss value itself, given its output a; E_C adds the
    first-order change through its rounded a, Σ|∇ₐC|·E_a:

    .. math::  E_C - \sum|∇_a C|\,E_a = c\,u\,M_ℓ + γ_k + γ_{N+2}\,\textstyle\sum|ℓ_i| + (N + 2)\,η,
               \qquad γ_k = k\,u,\quad \textstyle\sum|ℓ_i| = |C|

    Each element loss's own formula errs by c ulps of the terms it is formed from (``mag`` = M_ℓ, averaged as C
    is); cross-entropy's log Σⱼ e^{a_j − max} is a sum of ``inner`` = k terms ≤ 1, so its log errs by γ_k
    absolutely, however small C is; the sum of the N element losses ℓᵢ errs by at most γ_{N−1}·Σ|ℓᵢ| (a recursive
    sum, Higham eq. 4.4), plus the division of a mean and a last add. Σ|ℓᵢ|, normalized as C is, is |C|: every
    element loss is ≥ 0 (bce's targets lie in [0, 1], nll reads log-probabilities; ``manual_bp``'s checks).
    The sum counts once, not c ulps once per term: that would let a change of the loss alone by 10⁻⁵·|C| pass in
    float32. It is the worst case, not the probabilistic γ of the dot products (``_gamma``): a loop adding N terms
    of one size rounds with one bias. η: what each operation may lose below the smallest normal number (a loss of
    1e-57 is 0 in float32).
    """
    return ULPS * u * mag + inner * u + (n + 2) * u * abs(loss) + (n + 2) * eta


def _softmax_bce_bound(p, y, Ea, G, cu, cu64, u_c):
    r"""E_δ of bce on a softmax output, bounded as one composite function of p (what it is).

    δ_k = t_k − p_k Σ_j t_j with t_j = p_j G_j = (p_j − y_j)/(1 − p_j) (guarded where p_j(1 − p_j) < 1e-12).
    Formed as p ⊙ (G − Σ G p) from the same p, the two huge terms of δ_k cancel exactly in p_k and leave a
    rounding error u·p_k(|G_k| + Σ|G_j|p_j); through p_j (j ≠ k) it moves by p_k |∂t_j/∂p_j| E_{p_j},
    |∂t_j/∂p_j| ≤ 2/(1 − p_j)² (2/1e-12 where the guard holds). Through its own p_k, δ_k = t_k(1 − p_k) − p_k Σ_{j≠k} t_j
    moves by E_{p_k} where t_k(1 − p_k) = p_k − y_k, but where the guard holds t_k = p_k(p_k − y_k)/1e-12, so by
    (1 − p_k)|2p_k − y_k| E_{p_k}/1e-12: a guarded δ_k is proportional to p_k, and p_k's relative error is z's
    absolute error (large behind a norm over two examples). Bounding G and the Jacobian apart would count, at p ≈ 1,
    a 1/(1 − p) error twice that no implementation makes. The rounding of the G-terms is bounded apart for
    the float64 reference (torch's guarded G, up to 1e12/N) and for the candidate (its G in its own dtype,
    where 1 − p is at least u_c or exactly 0).
    """
    N = p.size
    q = p * (1 - p)
    slope = np.where(q >= BCE_GUARD, 2.0 / np.maximum((1 - p) ** 2, 1e-300), 2.0 / BCE_GUARD)
    sens = slope * Ea                                         # |∂t_j/∂p_j| E_{p_j}
    through_others = p * (sens.sum(axis=-1, keepdims=True) - sens)
    own = np.where(q >= BCE_GUARD, 1.0, (1 - p) * np.abs(2 * p - y) / BCE_GUARD) * Ea   # |∂δ_k/∂p_k| E_{p_k}
    aG = np.abs(G)
    # the candidate's own G, in its dtype, cannot exceed (p − y)/max(p(1 − p), u_c, 1e-12)/N
    aGc = np.abs(p - y) / np.maximum(p * (1 - p), max(u_c, BCE_GUARD)) / N
    return ((own + through_others) / N + cu64 * p * (aG + (aG * p).sum(axis=-1, keepdims=True))
            + ULPS * u_c * p * (aGc + (aGc * p).sum(axis=-1, keepdims=True)) + cu * np.abs(p - y) / N)


def allowance(spec: Spec, params: dict, x: np.ndarray, y: np.ndarray, ref, dtype, guard=None,
              alternatives: dict | None = None, routes: dict | None = None) -> Allowance:
    """The rounding allowance of every compared tensor for a candidate computing in ``dtype``.

    ``params``, ``x``, ``y`` are the float64 values of the case; ``ref`` the float64 torch reference
    (``twin.run_twin``, or its re-run following a candidate's conventions); ``guard`` an optional boolean
    mask of output elements where a numerical guard of the loss is active, and ``alternatives`` the δ_L
    accepted there (``conventions.Guards.deltas``): each is computed by a formula whose terms are as large
    as the values, so its rounding, relative to them, is allowed on the guarded rows too, and the exact one
    moves with the candidate's own rounded z by up to Σ|∂δ/∂z|·E_z (``conventions.exact_bce_drift``). ``routes`` are the
    max-pool routings ``ref`` was computed with (``twin.run_twin(routes=...)``), if not torch's.
    """
    us = (UNIT_ROUNDOFF[np.dtype(dtype)], UNIT_ROUNDOFF[np.dtype(np.float64)])
    u = sum(us)
    cu, cu64 = ULPS * u, ULPS * us[1]
    # underflow: each operation may also lose an absolute amount below the smallest normal number
    eta = float(np.finfo(dtype).tiny) + float(np.finfo(np.float64).tiny)
    graph = nodes(spec)
    L = len(graph)
    # A[j], Ea[j]: the size and the error bound of the input x (j = 0) and of node k's output a_{k+1} (j = k + 1)
    A = [np.abs(x).astype(np.float64)]
    Ea = [np.zeros(np.shape(x))]
    Ez, d1s, slopes, Egs, kink_masks, scales = [], [], [], [], [], []
    mags, ties = [], []
    for i, node in enumerate(graph):
        layer, j = node.layer, node.src + 1
        if node.is_sum:  # z = h + s: the errors add, and the sum rounds once
            mag = SumMagnitudes(layer, {}, x if node.src < 0 else ref.acts[node.src])
            k = node.skip + 1
            ez = Ea[j] + Ea[k] + _gamma(1, u) * (A[j] + A[k]) + eta
        else:
            mag = magnitudes(layer, node_weights(params, node), x if node.src < 0 else ref.acts[node.src],
                             (routes or {}).get(i))
            ez = mag.forward(Ea[j])
            if mag.k_z:
                ez = ez + _gamma(mag.k_z, u) * mag.terms(A[j]) + mag.k_z * eta
        mags.append(mag)
        ties.append(mag.contenders(Ea[j]))
        z, a, act = ref.z[i], ref.acts[i], node.activation
        mask = np.zeros(z.shape, dtype=bool)
        if act.name == "softmax":
            spread = ez + (a * ez).sum(axis=-1, keepdims=True)
            ea = a * spread + cu * a + ULPS * eta
            d1 = d2 = eg = None
            scales.append(None)
        elif act.name == "log_softmax":
            p = np.exp(a)
            ea = ez + (p * ez).sum(axis=-1, keepdims=True) + cu * (np.abs(a) + np.abs(z) + np.abs(z).max(axis=-1, keepdims=True))
            d1 = d2 = eg = None
            scales.append(None)
        else:
            d1, d2 = derivatives(act, z)
            slope = np.abs(d1)
            for k in act.kink_points():
                near = np.abs(z - k) <= ez + cu * abs(k)
                if near.any():
                    left, right = one_sided_slopes(act, k)
                    slope = np.where(near, np.maximum(slope, max(abs(left), abs(right))), slope)
                    mask |= near
            mg, mgp = _scales(act, z, a, d1, us)
            ea = slope * ez + cu * mg + ULPS * eta + np.where(mask, np.abs(other_branch_offset(act, z)), 0.0)
            eg = np.abs(d2) * ez + cu * mgp + ULPS * eta
            scales.append((mg, mgp))
        Ez.append(ez)
        d1s.append(d1)
        slopes.append(None if d1 is None else slope)
        Egs.append(eg)
        kink_masks.append(mask)
        A.append(np.abs(a))
        Ea.append(ea)

    guard = np.zeros(ref.output.shape, dtype=bool) if guard is None else guard
    G = ref.upstream[L - 1]
    yv = np.asarray(y, dtype=np.float64) if spec.loss.targets == "values" else None
    # on the rows the loss applies to (a sequence output's m·T steps); class indices: −100 rows ignored
    EG, EC, loss_mag, inner = _loss_bounds(spec.loss, ref.output, np.asarray(y) if yv is None else yv, G, Ea[L], u,
                                           guard)
    loss_mag = abs(ref.loss) if loss_mag is None else float(loss_mag)
    loss_rounding = _loss_rounding(loss_mag, inner, ref.output.size, ref.loss, u, eta)
    bounds = {"loss": np.array(EC + loss_rounding)}
    # ∂C/∂a of node k's output (j = k + 1; the input x: j = 0) adds what every node reading it sends back:
    # their errors, and the rounding of that sum where two or more add (a block's input feeds body and skip)
    sent_error = {L: EG}
    sent_size: dict = {}
    readers = consumers(spec)

    def send(j, err, size):
        sent_error[j] = sent_error.get(j, 0) + err
        sent_size[j] = sent_size.get(j, 0) + size

    def received(j):
        n = len(readers.get(j - 1, ()))
        extra = _gamma(n - 1, u) * sent_size[j] + (n - 1) * eta if n > 1 else 0
        return sent_error[j] + extra

    for i in reversed(range(L)):
        node = graph[i]
        layer, act = node.layer, node.activation
        up, Eup = ref.upstream[i], received(i + 1)
        delta = ref.deltas[node.name]
        ad = np.abs(delta)
        if act.name == "softmax" and i == L - 1 and spec.loss.name == "bce":
            edelta = _softmax_bce_bound(ref.acts[i], yv, Ea[L], up, cu, cu64, us[0])
        elif act.name == "softmax":
            p = ref.acts[i]
            dp = p * (Ez[i] + (p * Ez[i]).sum(axis=-1, keepdims=True))
            s = np.abs((up * p).sum(axis=-1, keepdims=True))
            edelta = (p * (Eup + (Eup * p).sum(axis=-1, keepdims=True)) + dp * (np.abs(up) + s)
                      + p * (np.abs(up) * dp).sum(axis=-1, keepdims=True) + cu * p * (np.abs(up) + (np.abs(up) * p).sum(axis=-1, keepdims=True)))
        elif act.name == "log_softmax":
            p = np.exp(ref.acts[i])
            dp = p * (Ez[i] + (p * Ez[i]).sum(axis=-1, keepdims=True))
            s = np.abs(up.sum(axis=-1, keepdims=True))
            edelta = Eup + p * Eup.sum(axis=-1, keepdims=True) + dp * s + cu * (np.abs(up) + p * s)
        elif i == L - 1 and act.name == "sigmoid" and spec.loss.name == "bce":
            # σ + bce: every usual implementation lands within rounding of (a − y)/N, whether it forms
            # (a − y)/N directly or (a − y)/(a(1 − a)) · a(1 − a) from the same a (the two a(1 − a) cancel)
            edelta = (Ea[L] + cu * (np.abs(ref.output) + np.abs(yv))) / ref.output.size + cu * ad
            # where torch's guard is active its δ is (a − y)/1e-12 · a(1 − a): σ' from a rounded a, absolute u
            # (the float64 reference's rounding; a candidate's own guarded answer is an accepted alternative)
            edelta = edelta + np.where(guard, cu64 * np.abs(up) * (ref.output + np.abs(d1s[i])), 0.0)
            # and torch's guarded δ_g = (a − y) σ'(z)/(1e-12 N), unlike (a − y)/N, moves with z by as much as itself
            # (∝ e^z for z ≪ 0): every guarded answer (torch's in float64 or float32, the candidate's) is that formula
            # at its own rounded z, so within |∂δ_g/∂z| E_z of its value at the exact z, ∂δ_g/∂z =
            # σ'(σ' + (a − y)(1 − 2a))/(1e-12 N). Where σ' is within E_z of the guard's switch, the guarded side's
            # slope is taken, as at a kink. (The rounding of a itself is cu·|δ| and the term above.)
            a_out, q = ref.output, _sigmoid(ref.z[i]) * _sigmoid(-ref.z[i])
            reach = guard & (q * np.exp(-Ez[i]) < BCE_GUARD)
            dz = np.minimum(q, BCE_GUARD) * np.abs(q + (a_out - yv) * (1 - 2 * a_out)) / (BCE_GUARD * ref.output.size)
            edelta = edelta + np.where(reach, dz * Ez[i], 0.0)
        else:
            # within rounding of a kink either one-sided slope may carry the upstream error (the larger is used)
            edelta = Eup * slopes[i] + np.abs(up) * Egs[i] + cu * ad
        if i == L - 1 and alternatives and guard.any():
            rows = guard.any(axis=-1, keepdims=True) if act.output_only else guard
            for alt in alternatives.values():
                big = np.abs(alt)
                edelta = edelta + np.where(rows, cu * (big + big.sum(axis=-1, keepdims=True) * act.output_only), 0.0)
            if "exact" in alternatives:  # ... and evaluated at the candidate's own rounded z, it moves with z
                from .conventions import exact_bce_drift  # (conventions reads this module's helpers)
                edelta = edelta + np.where(rows, exact_bce_drift(spec, ref.z[i], yv, Ez[i]), 0.0)
        mag = mags[i]
        edelta = edelta + ULPS * eta
        bounds[f"{node.name}.delta"] = edelta
        if node.is_sum:  # δ goes to both paths unchanged
            send(node.src + 1, edelta, ad)
            send(node.skip + 1, edelta, ad)
            continue
        j = node.src + 1
        for short, bound in mag.param_bounds(edelta, ad, A[j], Ea[j], lambda k: _gamma(k, u), eta).items():
            if f"{node.name}.{short}" in params:
                bounds[f"{node.name}.{short}"] = bound
        back = mag.back_input(edelta) + mag.back_drift(ad, Ea[j])
        if mag.k_in:
            back = back + _gamma(mag.k_in, u) * mag.input_terms(ad) + mag.k_in * eta
        send(j, back, mag.back_input(ad))
    bounds["input.grad"] = received(0) if 0 in sent_error else np.zeros(np.shape(x))
    return Allowance(bounds, Ez, Ea[L], kink_masks, scales, mags, ties,
                     [np.broadcast_to(np.asarray(e, dtype=np.float64), np.shape(a)) for e, a in zip(Ea[1:], ref.acts)],
                     loss_rounding)

