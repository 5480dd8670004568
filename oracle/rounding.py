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
    E_{∂θ_i} = E_{δ_i}^T|a_i| + |δ_i|^T E_{a_i} + γ_{m+1}|δ_i|^T|a_i|,\quad
    E_{∂b_i} = \textstyle\sum E_{δ_i} + γ_{m+1}\sum|δ_i|
    E_{up_{i-1}} = E_{δ_i}|θ_i| + γ_{n+1}|δ_i||θ_i|

M_g and M_g' are the magnitudes of the intermediate terms of each activation's usual formulas (the
rounding that evaluating *that formula* can really make): σ′ = a(1 − a) computed from a rounded a has
an absolute error of order u·a, not u·σ′; 1 − tanh² cancels where |tanh| ≈ 1; gelu's
½(1 + erf) cancels for z ≪ 0; and so on (``_scales``). c = 8 ulps per formula. γ_k is the worst case of
a k-term dot product. Every term is linear in u, so the candidate's rounding (u of its dtype) and the
reference's (float64) add up to one bound with u = u_dtype + u_float64. The first-order terms miss only
products of two rounding errors.

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

from .twin import activation_fn

#: unit roundoff of each dtype: the largest relative error of one correctly rounded operation
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float64): 2.0 ** -53}
ULPS = 8  # rounding errors allowed for evaluating one library function or closed formula


@dataclass
class Allowance:
    """Per-tensor elementwise bounds (float64 arrays) keyed like the comparison names, plus what they came from."""

    bounds: dict          # "loss", "layers.{i}.weight", "layers.{i}.bias", "layers.{i}.delta", "input.grad"
    z_error: list         # E_z per layer: how far a correct implementation's z may be from torch's
    output_error: np.ndarray  # E_a at the output (the loss's input)
    kink_masks: list      # per layer: elements within E_z of a kink (either one-sided slope is valid there)


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


def one_sided_slopes(act, k: float) -> tuple[float, float]:
    """The slopes of g just left and just right of the kink point k."""
    h = 1e-9 * max(1.0, abs(k))
    d1, _ = derivatives(act, np.array([k - h, k + h]))
    return float(d1[0]), float(d1[1])


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(0.5 * z))


def _scales(act, z, a, d1) -> tuple[np.ndarray | float, np.ndarray | float]:
    """(M_g, M_g'): the size of the terms the usual formulas for g(z) and g'(z) add or subtract."""
    name, p = act.name, act.params
    az, aa, ad = np.abs(z), np.abs(a), np.abs(d1)
    if name in ("identity", "relu", "hardtanh"):
        return 0.0, 0.0
    if name == "leaky_relu":
        return aa, 0.0
    if name == "sigmoid":        # σ' = a(1 − a) from a rounded a: error ~ u·a where a ≈ 1
        return aa, ad + aa
    if name == "tanh":           # 1 − a² cancels where |a| ≈ 1
        return aa, ad + aa * aa
    if name in ("elu", "selu"):  # α(e^z − 1) and a + α cancel for z ≤ 0
        alpha = p.get("alpha", act.__class__.__dict__.get("alpha", 1.0))
        scale = getattr(act, "scale", 1.0) if name == "selu" else 1.0
        neg = (z <= 0) * abs(alpha) * scale
        return aa + neg, ad + aa + neg
    if name == "softplus":       # log(1 + e^{βz})/β: an absolute u/β where βz ≪ 0 when log1p is not used
        return aa + 1.0 / p["beta"], ad
    if name == "gelu":           # z·½(1 + erf) cancels for z ≪ 0
        return aa + az, ad + 1.0 + az * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    if name == "gelu_tanh":      # 1 − tanh² and 1 + tanh cancel
        return aa + az, ad + 1.0 + az * math.sqrt(2 / math.pi) * (1 + 0.134145 * z * z)
    if name == "silu":           # σ(1 + z(1 − σ)): 1 − σ cancels for z ≫ 0
        s = _sigmoid(z)
        return aa, ad + s * (1 + 2 * az)
    if name == "mish":           # tanh(softplus) and 1 − tanh² cancel
        return aa + az, ad + 1.0 + 2 * az * _sigmoid(z)
    if name == "softsign":
        return aa, ad
    return aa + az, ad + 1.0     # an activation added later without its own entry: a generous default


def _loss_bounds(loss, a, y, G, Ea, u, guard):
    """(E_G, E_C): bounds on the errors of ∇_a C and of C, given E_a at the output."""
    N, m = a.size, a.shape[0]
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
        EG = np.where(guard, 0.0, H * Ea + cu * aG)
    elif name == "bce_with_logits":
        s = _sigmoid(a)
        EG = s * (1 - s) * Ea / N + cu * (s + np.abs(y)) / N
    elif name == "cross_entropy":
        p = np.exp(a - a.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        EG = p * (Ea + (p * Ea).sum(axis=-1, keepdims=True)) / m + cu * (p + np.abs(m * G)) / m
    else:  # nll: −onehot/m is exact
        EG = np.zeros_like(a)
    # the loss value: first-order change through a, plus summing N terms of the loss's magnitude
    if name == "cross_entropy":
        mag = (np.abs(a).max(axis=-1) + np.log(a.shape[1]) + np.abs(a).max(axis=-1)).mean()
    elif name == "bce_with_logits":
        mag = (np.abs(a) * (1 + np.abs(y)) + np.log(2)).mean()
    elif name == "nll":
        mag = np.abs(a).max(axis=-1).mean()
    elif name == "bce":
        mag = 100.0 if np.any(guard) else float(np.mean(np.abs(np.log(np.clip(a, 1e-300, 1))) + np.abs(np.log(np.clip(1 - a, 1e-300, 1)))))
    else:
        mag = None
    EC = float(np.sum(aG * Ea))
    return EG, EC, mag


def allowance(spec: Spec, params: dict, x: np.ndarray, y: np.ndarray, ref, dtype, guard=None) -> Allowance:
    """The rounding allowance of every compared tensor for a candidate computing in ``dtype``.

    ``params``, ``x``, ``y`` are the float64 values of the case; ``ref`` the float64 torch reference
    (``twin.run_twin``); ``guard`` an optional boolean mask of output elements where a numerical guard of
    the loss is active (their δ is judged by the convention rule; its rounding is bounded locally there).
    """
    u = UNIT_ROUNDOFF[np.dtype(dtype)] + UNIT_ROUNDOFF[np.dtype(np.float64)]
    cu = ULPS * u
    # underflow: each operation may also lose an absolute amount below the smallest normal number
    eta = float(np.finfo(dtype).tiny) + float(np.finfo(np.float64).tiny)
    L = len(spec.layers)
    A = [np.abs(x)]
    Ea = [np.zeros_like(x)]
    Ez, d1s, Egs, kink_masks = [], [], [], []
    for i, layer in enumerate(spec.layers):
        W = np.abs(params[f"layers.{i}.weight"])
        b = np.abs(params[f"layers.{i}.bias"]) if layer.bias else 0.0
        ez = Ea[i] @ W.T + (W.shape[1] + 2) * (u * (A[i] @ W.T + b) + eta)
        z, a, act = ref.z[i], ref.acts[i], layer.activation
        mask = np.zeros(z.shape, dtype=bool)
        if act.name == "softmax":
            spread = ez + (a * ez).sum(axis=-1, keepdims=True)
            ea = a * spread + cu * a + ULPS * eta
            d1 = d2 = eg = None
        elif act.name == "log_softmax":
            p = np.exp(a)
            ea = ez + (p * ez).sum(axis=-1, keepdims=True) + cu * (np.abs(a) + np.abs(z) + np.abs(z).max(axis=-1, keepdims=True))
            d1 = d2 = eg = None
        else:
            d1, d2 = derivatives(act, z)
            slope = np.abs(d1)
            for k in act.kink_points():
                near = np.abs(z - k) <= ez + cu * abs(k)
                if near.any():
                    left, right = one_sided_slopes(act, k)
                    slope = np.where(near, np.maximum(slope, max(abs(left), abs(right))), slope)
                    mask |= near
            mg, mgp = _scales(act, z, a, d1)
            ea = slope * ez + cu * mg + ULPS * eta
            eg = np.abs(d2) * ez + cu * mgp + ULPS * eta
        Ez.append(ez)
        d1s.append(d1)
        Egs.append(eg)
        kink_masks.append(mask)
        A.append(np.abs(a))
        Ea.append(ea)

    guard = np.zeros(ref.output.shape, dtype=bool) if guard is None else guard
    G = ref.upstream[L - 1]
    yv = np.asarray(y, dtype=np.float64) if spec.loss.targets == "values" else None
    EG, EC, mag = _loss_bounds(spec.loss, ref.output, yv, G, Ea[L], u, guard)
    n_terms = ref.output.size
    loss_bound = EC + cu * (n_terms + 2) * (abs(ref.loss) if mag is None else mag) + (n_terms + 2) * eta

    bounds = {"loss": np.array(loss_bound)}
    up, Eup = G, EG
    for i in reversed(range(L)):
        layer, act = spec.layers[i], spec.layers[i].activation
        delta = ref.deltas[f"layers.{i}"]
        ad = np.abs(delta)
        if act.name == "softmax":
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
        else:
            edelta = Eup * np.abs(d1s[i]) + np.abs(up) * Egs[i] + cu * ad
        if i == L - 1 and guard.any():
            rows = guard.any(axis=-1, keepdims=True) if act.output_only else guard
            edelta = np.where(rows, cu * 16 * ad, edelta)
        W = np.abs(params[f"layers.{i}.weight"])
        m = delta.shape[0]
        edelta = edelta + ULPS * eta
        bounds[f"layers.{i}.delta"] = edelta
        bounds[f"layers.{i}.weight"] = edelta.T @ A[i] + ad.T @ Ea[i] + (m + 1) * (u * (ad.T @ A[i]) + eta)
        if layer.bias:
            bounds[f"layers.{i}.bias"] = edelta.sum(axis=0) + (m + 1) * (u * ad.sum(axis=0) + eta)
        Eup = edelta @ W + (W.shape[0] + 1) * (u * (ad @ W) + eta)
        up = ref.upstream[i - 1] if i > 0 else ref.grad_input
    bounds["input.grad"] = Eup
    return Allowance(bounds, Ez, Ea[L], kink_masks)

