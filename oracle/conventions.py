r"""Conventions: elements where more than one answer is right, and how the oracle follows the candidate's.

Two kinds of element have more than one valid gradient:

* **Kinks.** At a non-differentiable point of an activation (relu at 0, hardtanh at its bounds,
  elu at 0 when α ≠ 1, ...) or of the loss (l1 at a zero residual), both one-sided derivatives are
  valid. So are they *within rounding of* a kink: a correct implementation may compute z on the other
  side. torch takes one side; the candidate may take the other.
* **Numerical guards.** torch's ``binary_cross_entropy`` backward divides by max(a(1 − a), 1e-12) and
  its forward clamps each log at −100. Neither is the derivative of the loss: where the guard is active
  (an output within 1e-12 of 0 or 1) the exact δ of sigmoid + bce is (σ(z) − y)/N, and torch's is
  not. Both are accepted: the exact value, torch's float64 value, and (for a float32 candidate) the
  value torch computes in float32, where the guard switches on earlier. Where an output lies within
  float32 rounding of 1, whether it rounds to exactly 1 (and so switches the guard on) depends on the
  order of a sum (a softmax's normalizer): torch's guarded formula with those outputs taken as 1 is
  accepted too.

How they are judged: the backward of the torch twin is re-run with a hook at each layer
(``twin.run_twin(adopt=...)``) that, on these elements only, replaces torch's δ by the alternative the
candidate chose (the one nearest its δ, when it reports δ, a kink's sides compared in units of their
slopes; otherwise one consistent choice for all such elements, each choice tried in turn). Everything
below is then computed from that δ, so the layers below a kink or a guard are still judged strictly: a
bug there is not excused by the kink above it. A candidate whose every tensor matches such a re-run
passes as ``kink`` (or ``convention`` when a guard was involved), with a note naming the elements.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .graph import nodes
from .rounding import ULPS, UNIT_ROUNDOFF, derivatives, one_sided_slopes
from .twin import pool_windows, route_weights, run_twin

#: torch's guard in the BCE backward: max(a(1 − a), EPS), EPS = 1e-12 stored as a float32 constant
BCE_GUARD = float(np.float32(1e-12))


@dataclass
class Special:
    """Everything about one check's multi-valued elements."""

    kink: list                      # per layer: bool mask of elements within rounding of a kink
    kink_points: list               # per layer: [(k, left slope, right slope), ...]
    loss_kink: np.ndarray | None    # output elements within rounding of the loss's kink (l1)
    guard: np.ndarray | None        # output elements where a BCE guard or log clamp is active
    guard_deltas: dict = field(default_factory=dict)   # label -> δ_L alternative on guard elements
    guard_losses: dict = field(default_factory=dict)   # label -> loss value under that convention
    guard_formulas: dict = field(default_factory=dict)  # label -> δ_L as a function of the logits (``Guards``)
    guard_terms: dict = field(default_factory=dict)     # label -> each element's share of the loss (``Guards``)

    @property
    def any(self) -> bool:
        return (any(m.any() for m in self.kink) or (self.loss_kink is not None and self.loss_kink.any())
                or (self.guard is not None and self.guard.any()))


@dataclass
class Guards:
    """Output elements where a numerical guard of torch's loss is active, and the answers accepted there."""

    mask: np.ndarray | None = None
    deltas: dict = field(default_factory=dict)   # label -> δ_L under that convention
    losses: dict = field(default_factory=dict)   # label -> loss value under that convention
    # label -> the formula behind ``deltas[label]`` as a function of the output's logits (a float64 torch tensor), its
    # branches (guard on or off, an output rounded to exactly 0 or 1) held as they are at the reference: the noise
    # ensemble evaluates it at each run's jittered logits, so that the rounding of the candidate's own z reaches
    # the alternative it follows (a guarded δ_k ∝ p_k moves by p_k's relative error, z's absolute one)
    formulas: dict = field(default_factory=dict)
    # label (and "torch") -> each output element's share of the loss under that convention (they sum to ``losses``)
    terms: dict = field(default_factory=dict)


def find_guards(spec, ref, params, x, y, y64, dtype) -> Guards:
    """bce: where a(1 − a) < 1e-12 (in float64, or in the candidate's float32) or a log would pass −100, and (float32)
    where a softmax output is within rounding of 1."""
    if spec.loss.name != "bce":
        return Guards()
    a = ref.output
    mask = (a * (1 - a) < BCE_GUARD) | (a < 1e-43) | (1 - a < 1e-43)
    run32, at1 = None, None
    if np.dtype(dtype) == np.float32:
        run32 = run_twin(spec, params, x, y, np.float32)
        a32 = run32.output
        mask = mask | (a32 * (np.float32(1) - a32) < np.float32(BCE_GUARD))
        if nodes(spec)[-1].activation.name == "softmax":
            # 1 − p within float32 rounding (ULPS ulps, as rounding.allowance's E_a): whether p is exactly 1 in
            # float32 (and the guard on) depends on the order the normalizer is summed in, 1 + Σ tiny terms
            near = 1 - a <= ULPS * (UNIT_ROUNDOFF[np.dtype(np.float32)] + UNIT_ROUNDOFF[np.dtype(np.float64)])
            mask = mask | near
            at1 = near & (a32 != 1)
    if not mask.any():
        return Guards()
    guards = Guards(mask)
    guards.deltas["exact"], guards.losses["exact"] = exact_bce(spec, ref.z[-1], y64)
    guards.terms["torch"], guards.terms["exact"] = clamped_bce_terms(a, y64), exact_bce_terms(spec, ref.z[-1], y64)
    guards.formulas["exact"] = lambda z: _exact_bce_delta(spec, z, y64)
    if run32 is not None:
        guards.deltas["float32"] = run32.deltas[nodes(spec)[-1].name].astype(np.float64)
        guards.losses["float32"] = float(run32.loss)
        on32 = a32 * (np.float32(1) - a32) < np.float32(BCE_GUARD)
        held = (a32 == 0) | (a32 == 1)
        guards.formulas["float32"] = lambda z: guarded_bce_delta(spec, z, y64, on32, held, a32)
        guards.terms["float32"] = clamped_bce_terms(a32, y64)
        if at1 is not None and at1.any():
            label = "float32, outputs near 1 taken as 1"
            guards.deltas[label], guards.losses[label] = _guarded_float32(spec, np.where(at1, np.float32(1), a32), y)
            guards.formulas[label] = lambda z: guarded_bce_delta(spec, z, y64, on32 | at1, held | at1,
                                                                 np.where(at1, np.float32(1), a32))
            guards.terms[label] = clamped_bce_terms(np.where(at1, np.float32(1), a32), y64)
    return guards


def clamped_bce_terms(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each element's share of torch's bce from the outputs ``a`` (in whatever dtype they were computed): its logs
    clamped at −100, −(y·max(log a, −100) + (1 − y)·max(log(1 − a), −100))/N."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore"):
        la, l1a = np.maximum(np.log(a), -100.0), np.maximum(np.log1p(-a), -100.0)
    return -(y * la + (1 - y) * l1a) / a.size


def mixed_loss(special, torch_loss: float, cand_loss: float) -> float | None:
    """The loss value nearest ``cand_loss`` that some per-element mix of torch's clamped conventions gives: each guard
    element may take its log clamp from any of them (a float32 candidate may clamp one saturated output's log as
    torch's float32 does and keep another, a float32 subnormal, unclamped as torch's float64 does), so C may lie
    anywhere between torch's C plus the most negative and the most positive sum of per-element differences. The
    exact convention, unclamped, is accepted only whole (its terms are the loss's own, up to 10³× the clamped
    ones). None where there are no guard elements."""
    terms = special.guard_terms
    if special.guard is None or not special.guard.any() or "torch" not in terms:
        return None
    base = terms["torch"]
    diffs = np.stack([np.where(np.isfinite(t), t - base, 0.0) for label, t in terms.items()
                      if label not in ("torch", "exact")] or [np.zeros_like(base)])
    diffs = np.where(special.guard, diffs, 0.0)
    lo, hi = diffs.clip(max=0).min(axis=0).sum(), diffs.clip(min=0).max(axis=0).sum()
    return float(np.clip(cand_loss, torch_loss + lo, torch_loss + hi))


def guarded_bce_delta(spec, z: torch.Tensor, y, on: np.ndarray, held: np.ndarray, values: np.ndarray) -> torch.Tensor:
    r"""torch's guarded δ_L of bce at the logits ``z`` (float64), its branches held: ∇_a C = (a − y)/(N·max(a(1 − a),
    1e-12)) with the max taken as 1e-12 where ``on`` and as a(1 − a) elsewhere, a = σ(z) or softmax(z) but
    ``values`` where ``held`` (an output rounded to exactly 0 or 1), then torch's backward through the activation
    from its output: a(1 − a)·∇_a C, or a ⊙ (∇_a C − Σ ∇_a C·a)."""
    act = nodes(spec)[-1].activation.name
    a = torch.sigmoid(z) if act == "sigmoid" else torch.softmax(z, dim=-1)
    a = torch.where(torch.from_numpy(np.asarray(held)), torch.from_numpy(np.asarray(values, dtype=np.float64)), a)
    q = a * (1 - a)
    den = torch.where(torch.from_numpy(np.asarray(on)), torch.full_like(q, BCE_GUARD), torch.clamp(q, min=BCE_GUARD))
    up = (a - torch.from_numpy(np.asarray(y, dtype=np.float64))) / (den * a.numel())
    return q * up if act == "sigmoid" else a * (up - (up * a).sum(dim=-1, keepdim=True))


def _guarded_float32(spec, a32: np.ndarray, y) -> tuple[np.ndarray, float]:
    """(δ_L, C) of torch's bce (its guard and log clamp) and its softmax backward, computed in float32 from the
    softmax outputs ``a32``."""
    at = torch.from_numpy(np.asarray(a32, dtype=np.float32)).requires_grad_(True)
    with torch.enable_grad():
        loss = F.binary_cross_entropy(at, torch.from_numpy(np.asarray(y, dtype=np.float32)))
        (up,) = torch.autograd.grad(loss, at)
    at = at.detach()
    delta = at * (up - (up * at).sum(dim=-1, keepdim=True))   # torch's softmax backward, from its output
    return delta.numpy().astype(np.float64), float(loss.detach())


def find(spec, ref, allow, y64, guards: Guards) -> Special:
    """Every multi-valued element: kinks within the allowance's E_z, the loss's kink, the guards."""
    kink_points = []
    for node in nodes(spec):
        act = node.activation
        kink_points.append([(k, *one_sided_slopes(act, k)) for k in act.kink_points()] if not act.output_only else [])
    loss_kink = None
    if spec.loss.name == "l1":
        loss_kink = np.abs(ref.output - y64) <= allow.output_error
    return Special(allow.kink_masks, kink_points, loss_kink, guards.mask, guards.deltas, guards.losses, guards.formulas,
                   guards.terms)


def exact_bce(spec, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    r"""δ_L and C of bce on a sigmoid or softmax output, exactly (no guard, no clamp), from the logits z.

    sigmoid: δ = (σ(z) − y)/N and C = mean(softplus(z) − z y).
    softmax: with g_j = (p_j − y_j)/(p_j(1 − p_j)), δ_k = p_k g_k − p_k Σ_j p_j g_j; written without the
    terms that cancel (see the code) and with log(1 − p_j) as a log-sum-exp of the other logits, so it is
    finite and accurate even where p rounds to exactly 1 or 0.
    """
    delta = _exact_bce_delta(spec, torch.from_numpy(np.asarray(z, dtype=np.float64)), y).numpy()
    return delta, float(exact_bce_terms(spec, z, y).sum())


def exact_bce_terms(spec, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each element's share of ``exact_bce``'s C (they sum to it): (softplus(z) − z y)/N behind a sigmoid,
    −(y log p + (1 − y) log(1 − p))/N from the logits behind a softmax (NaN for a one-unit softmax: the loss is
    infinite unless y = 1)."""
    zt, yt = torch.from_numpy(np.asarray(z, dtype=np.float64)), torch.from_numpy(np.asarray(y, dtype=np.float64))
    if nodes(spec)[-1].activation.name == "sigmoid":
        return (F.binary_cross_entropy_with_logits(zt, yt, reduction="none") / zt.numel()).numpy()
    if zt.shape[-1] == 1:
        return np.full(zt.shape, np.nan)
    return _softmax_bce_exact(zt, yt)[1].numpy()


def _exact_bce_delta(spec, z: torch.Tensor, y) -> torch.Tensor:
    """``exact_bce``'s δ_L at the logits ``z`` (a float64 torch tensor): (σ(z) − y)/N, or the softmax form."""
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64))
    if nodes(spec)[-1].activation.name == "sigmoid":
        return (torch.sigmoid(z) - yt) / z.numel()
    if z.shape[-1] == 1:
        return torch.zeros_like(z)
    return _softmax_bce_exact(z, yt)[0]


def _softmax_bce_exact(zt: torch.Tensor, yt: torch.Tensor):
    """(δ_L, each element's share of C) of bce on a softmax output from the logits, as torch tensors (differentiable
    in zt): see exact_bce."""
    N, n = zt.numel(), zt.shape[-1]
    logp = F.log_softmax(zt, dim=-1)
    p = logp.exp()
    others = zt.unsqueeze(-2).expand(*zt.shape, n).clone()
    idx = torch.arange(n)
    others[..., idx, idx] = -torch.inf
    log1mp = torch.logsumexp(others, dim=-1) - torch.logsumexp(zt, dim=-1, keepdim=True)   # log(1 − p_j)
    # δ_k = t_k − p_k Σ_j t_j, t_j = (p_j − y_j)/(1 − p_j); t_k(1 − p_k) = p_k − y_k, so
    # δ_k = (p_k − y_k) − Σ_{j≠k} (p_j − y_j) p_k/(1 − p_j), each ratio as exp(log p_k − log(1 − p_j)) ≤ 1
    log_ratio = logp.unsqueeze(-1) - log1mp.unsqueeze(-2)                  # [.., k, j] = log(p_k/(1 − p_j))
    ratio = torch.exp(log_ratio.masked_fill(torch.eye(n, dtype=torch.bool), -torch.inf))  # j ≠ k only
    delta = ((p - yt) - (ratio * (p - yt).unsqueeze(-2)).sum(dim=-1)) / N
    return delta, -(yt * logp + (1 - yt) * log1mp) / N


def exact_bce_drift(spec, z: np.ndarray, y: np.ndarray, ez: np.ndarray) -> np.ndarray:
    r"""How far the exact δ_L of bce (``exact_bce``) moves when the logits move by at most ``ez`` each:
    Σ_l |∂δ_j/∂z_l|·E_{z_l}, to first order.

    A candidate that follows the exact convention evaluates that formula at *its own* rounded z. Where the guard
    is active behind a softmax, p_j/(1 − p_k) is the softmax of the logits other than k: of order 1 even where p_j
    itself underflows, so it moves with z's absolute rounding (large in a saturated net, |z| ~ 10⁴), unlike p_j.
    Behind a sigmoid, (σ(z) − y)/N moves by σ′E_z/N, which its bound already holds (E_a/N); 0 is returned there.
    """
    if nodes(spec)[-1].activation.name != "softmax" or np.shape(z)[-1] == 1:
        return np.zeros(np.shape(z))
    zt = torch.tensor(np.asarray(z, dtype=np.float64), requires_grad=True)
    yt = torch.from_numpy(np.asarray(y, dtype=np.float64))
    e = torch.from_numpy(np.asarray(ez, dtype=np.float64))
    out = torch.zeros_like(e)
    with torch.enable_grad():
        delta, _ = _softmax_bce_exact(zt, yt)
        for j in range(zt.shape[-1]):  # row j of each example's Jacobian (the rows of the batch are independent)
            (row,) = torch.autograd.grad(delta[..., j].sum(), zt, retain_graph=True)
            out[..., j] = (torch.nan_to_num(row, nan=0.0, posinf=0.0, neginf=0.0).abs() * e).sum(dim=-1)
    return out.numpy()


def _vjp(act, z, a, up, d1):
    """δ from an upstream gradient, in torch, for the output activation (elementwise, softmax, log_softmax)."""
    if act.name == "softmax":
        return a * (up - (up * a).sum(dim=-1, keepdim=True))
    if act.name == "log_softmax":
        return up - a.exp() * up.sum(dim=-1, keepdim=True)
    return up * d1


def _per_slope(diff: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """|diff| / |slope|: a difference in δ as one in the upstream it was formed from (a zero slope: 0 where diff
    is exactly 0, else ∞, since nothing but 0 comes out of it)."""
    s = slope.abs()
    return torch.where(s > 0, diff.abs() / torch.where(s > 0, s, 1.0),
                       torch.where(diff == 0, 0.0, math.inf).to(diff.dtype))


class Adopter:
    """The hook given to ``run_twin(adopt=...)``: on multi-valued elements, take the candidate's choice.

    ``deltas``: the candidate's δ per layer (or None); ``choice``: for layers without a candidate δ, one
    option per category ("kink": "torch" | "other"; "loss": "torch" | "+" | "-" | "0";
    "guard": "torch" | a label of ``Special.guard_deltas``). ``taken`` counts adopted elements.
    """

    def __init__(self, spec, ref, special: Special, deltas, choice: dict):
        self.spec, self.ref, self.special, self.deltas, self.choice = spec, ref, special, deltas or {}, choice
        self.taken: dict = {}
        self._d1 = {}
        self._at_ref: dict = {}  # guard label -> its formula at the reference logits

    def _d1_of(self, i):
        if i not in self._d1:
            act = nodes(self.spec)[i].activation
            self._d1[i] = None if act.output_only else torch.from_numpy(derivatives(act, self.ref.z[i])[0])
        return self._d1[i]

    def options(self, i, up, g, z_run=None) -> list:
        """[(category, label, mask, alternative δ, slope)] for layer i given the (re-run) upstream ``up``; slope: the
        one-sided slope a kink's alternative takes per element (None for the loss's and the guards'). ``z_run``: the
        run's own z_i where it is not the reference's (a jittered run), which a guard's alternative moves with."""
        graph = nodes(self.spec)
        sp, L = self.special, len(graph)
        act = graph[i].activation
        z = torch.from_numpy(self.ref.z[i])
        out = []
        mask = sp.kink[i]
        other_d1 = None  # the other one-sided slope on this layer's kink elements, torch's elsewhere
        if mask.any():
            zi = self.ref.z[i]
            points = sp.kink_points[i]
            nearest = np.argmin([np.abs(zi - k) for k, _, _ in points], axis=0)
            d1 = self._d1_of(i)
            other_d1 = d1.clone()
            for j, (k, left, right) in enumerate(points):
                near = torch.from_numpy(mask & (nearest == j))
                torch_took_left = (d1 - left).abs() <= (d1 - right).abs()
                other = torch.where(torch_took_left, torch.full_like(d1, right), torch.full_like(d1, left))
                other_d1 = torch.where(near, other, other_d1)
                out.append(("kink", "other", near, up * other, other))
        if i == L - 1:
            if sp.loss_kink is not None and sp.loss_kink.any():
                lk = torch.from_numpy(sp.loss_kink)
                N = up.numel()
                a = torch.from_numpy(self.ref.acts[i])
                # behind a softmax the choice moves the whole row of δ, so the whole row is the option
                rows = lk.any(dim=-1, keepdim=True).expand_as(lk) if act.output_only else lk
                # an output on both kinks at once (relu's output at 0 against an l1 target of 0): both choices
                # together, the loss's sign times the activation's other slope (either alone gives torch's 0)
                both = lk & torch.from_numpy(mask) if other_d1 is not None else None
                for label, c in (("+", 1.0), ("-", -1.0), ("0", 0.0)):
                    alt_up = torch.where(lk, torch.full_like(up, c / N), up)
                    out.append(("loss", label, rows, _vjp(act, z, a, alt_up, self._d1_of(i)), None))
                    if both is not None and both.any():  # its upstream is replaced too: read by plain distance
                        out.append(("kink+loss", label, both, alt_up * other_d1, None))
            if sp.guard is not None:
                gm = sp.guard.any(axis=-1, keepdims=True) & np.ones_like(sp.guard) if act.output_only else sp.guard
                gm = torch.from_numpy(gm)
                for label, alt in sp.guard_deltas.items():
                    alt = torch.from_numpy(alt)
                    if z_run is not None and label in sp.guard_formulas:  # its value at the reference, moved as the
                        formula = sp.guard_formulas[label]            # formula moves from there to this run's z
                        if label not in self._at_ref:
                            self._at_ref[label] = formula(z)
                        alt = alt + (formula(z_run) - self._at_ref[label])
                    out.append(("guard", label, gm, alt, None))
        return out

    def __call__(self, i, up, g, z_run=None):
        opts = self.options(i, up, g, z_run)
        if not opts:
            return g
        key = nodes(self.spec)[i].name
        new = g.clone()
        if key in self.deltas:  # per element, the option nearest the candidate's own δ
            cand = torch.from_numpy(np.asarray(self.deltas[key], dtype=np.float64).reshape(g.shape))
            # a kink's sides first, each at its distance in units of its slope: the candidate's δ there is its own
            # upstream times the slope it took, and that upstream's rounding reaches δ scaled by the slope (none
            # at all through relu's 0). Where the upstream is within its rounding of 0, the plain distance would
            # read a δ of the larger slope as the smaller one's, whose allowance is far tighter (or nil)
            kinks = [o for o in opts if o[4] is not None]
            if kinks:
                d1 = self._d1_of(i)
                best = _per_slope(cand - g, d1)
                for cat, label, mask, alt, slope in kinks:
                    far = _per_slope(cand - alt, slope)
                    closer = mask & (far < best)
                    best = torch.where(closer, far, best)
                    new = torch.where(closer, alt, new)
                    # a nonzero δ where torch's slope is 0 took the other side even where that side's δ at torch's
                    # z is 0 too (∂C/∂a = 0 at torch's a, e.g. σ(0) − ½ behind a relu): its value moves with the
                    # rounded forward, which only the noise measured on that side covers (torch's side gives none)
                    shown = closer & (d1 == 0) & (cand != 0)
                    self._count(i, cat, label, closer & (((alt - g).abs() > 0) | shown))
            best = (cand - new).abs()
            for cat, label, mask, alt, slope in opts:
                if slope is not None:
                    continue
                closer = mask & ((cand - alt).abs() < best)
                best = torch.where(closer, (cand - alt).abs(), best)
                new = torch.where(closer, alt, new)
                self._count(i, cat, label, closer & ((alt - g).abs() > 0))
        else:
            for cat, label, mask, alt, _ in opts:
                if cat == "kink+loss":  # applies where both choices are made (after each alone: it overrides)
                    chosen = self.choice.get("kink", "torch") == "other" and self.choice.get("loss", "torch") == label
                else:
                    chosen = self.choice.get(cat, "torch") == label
                if chosen:
                    new = torch.where(mask, alt, new)
                    self._count(i, cat, label, mask & ((alt - g).abs() > 0))
        return new

    def _count(self, i, cat, label, where):
        n = int(where.sum())
        if n:
            self.taken[(i, cat, label)] = self.taken.get((i, cat, label), 0) + n


def choices(special: Special) -> list[dict]:
    """The consistent choices to try for a candidate without δ (torch's own first)."""
    cats = []
    if any(m.any() for m in special.kink):
        cats.append(("kink", ("torch", "other")))
    if special.loss_kink is not None and special.loss_kink.any():
        cats.append(("loss", ("torch", "+", "-", "0")))
    if special.guard is not None:
        cats.append(("guard", ("torch", *special.guard_deltas)))
    names = [c for c, _ in cats]
    return [dict(zip(names, combo)) for combo in itertools.product(*(opts for _, opts in cats))][1:]


def notes(spec, taken: dict) -> list[str]:
    """Sentences naming the elements where the candidate's valid choice differs from torch's."""
    out = []
    for (i, cat, label), n in sorted(taken.items()):
        if cat == "kink":
            act = nodes(spec)[i].activation.name
            out.append(f"Kink convention: at {n} element(s) of {nodes(spec)[i].label} whose z lies on (or within rounding of) a "
                       f"kink of {act}, the candidate takes the other one-sided slope than torch; "
                       f"both are valid. Layers below are judged from the candidate's choice.")
        elif cat == "loss":
            out.append(f"Kink convention: at {n} output element(s) on the kink of {spec.loss.name} (a zero residual), "
                       f"the candidate uses sign(0) = {label}1 where torch uses 0; both are valid subgradients.")
        elif cat == "kink+loss":
            act = nodes(spec)[i].activation.name
            out.append(f"Kink convention: at {n} output element(s) on both a kink of {act} and the kink of "
                       f"{spec.loss.name} (a zero residual), the candidate takes the other one-sided slope of {act} "
                       f"than torch and sign(0) = {label}1 where torch uses 0; both are valid subgradients.")
        else:
            what = ("the exact derivative of the loss (torch's guard max(a(1 − a), 1e-12) is not)" if label == "exact"
                    else "torch's guarded value computed in float32" if label == "float32"
                    else "torch's guarded value computed in float32 with the outputs within rounding of 1 taken as "
                         "exactly 1 (as a float32 softmax may round them)")
            out.append(f"Numerical-guard convention: at {n} output element(s) where torch's bce guard "
                       f"max(a(1 − a), 1e-12) or its log clamp at −100 is active, the candidate follows {what}; "
                       f"both are accepted.")
    return out


ROUTING_MODES = ("first", "last", "split")


SWEEPS = 4  # rounds of reading the tied windows' routing from the candidate's δ (see routes_from_deltas)


def routes_from_deltas(spec, ref, allow, deltas: dict, start: dict | None = None) -> dict:
    """Each tied window's routing read from the candidate's δ of the layer feeding the pool, window by window.

    Routing a window's δ to contender k puts δ·g′ at k into δ_{i−1} (torch's δ of the pool and g′); splitting
    it puts δ·g′/n at each of its n contenders. Starting from torch's routing, each tied window in turn takes
    the option that brings the predicted δ_{i−1} nearest (in Σ|·|) to the candidate's, the other windows held
    as they are. Windows that cannot overlap are updated together (one class per position modulo ⌈k/s⌉ on
    each axis), for ``SWEEPS`` rounds. A wrong read can only fail a candidate, never pass a bug: the re-run
    following these routes judges every tensor again. ``start`` may give another routing to start from per
    layer (torch's picks in the candidate's dtype: where windows overlap, the descent can stop short of the
    candidate's routing, and a start nearer to it helps).
    """
    routes = {}
    graph = nodes(spec)
    for i, contenders in enumerate(allow.ties or []):
        b = graph[i].src  # the node feeding the pool
        cand = deltas.get(graph[b].name) if b >= 0 else None
        if contenders is None or cand is None or np.shape(cand) != ref.z[b].shape:
            continue
        layer, nd = graph[i].layer, len(graph[i].layer.kernel_size)
        act = graph[b].activation
        slope = derivatives(act, ref.z[b])[0]
        kinks = allow.kink_masks[b]
        if kinks is not None and kinks.any():  # within rounding of a kink the candidate may take either side:
            sides = [s for k in act.kink_points() for s in one_sided_slopes(act, k)]   # predict with the larger
            slope = np.where(kinks, max(abs(v) for v in sides) * np.sign(slope + (slope == 0)), slope)
        slope = torch.from_numpy(slope)
        cand = torch.as_tensor(np.asarray(cand, dtype=np.float64))
        # the δ each window routes: the candidate's own where it gives it (so that a pool above, routed its own way,
        # does not blur this read), else torch's
        own = deltas.get(graph[i].name)
        d = torch.as_tensor(np.asarray(own if own is not None and np.shape(own) == ref.z[i].shape
                                       else ref.deltas[graph[i].name], dtype=np.float64))[..., None]
        mask = contenders.flatten(-nd)
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        weights = (start[i] if start and i in start else route_weights(contenders, nd, "first")).flatten(-nd)
        g = pool_windows(layer, slope, 0.0).flatten(-nd)
        tied = (mask.sum(-1) >= 2)
        out_shape = contenders.shape[2:2 + nd]
        period = [-(-k // s) for k, s in zip(layer.kernel_size, layer.stride)]
        grids = torch.meshgrid(*[torch.arange(o) for o in out_shape], indexing="ij")

        def sent(w):  # δ_{i−1} the windows' routing predicts, laid back onto the input positions
            with torch.enable_grad():
                probe = torch.zeros(slope.shape, dtype=torch.float64, requires_grad=True)
                (back,) = torch.autograd.grad(pool_windows(layer, probe, 0.0), probe, (w * d).view(contenders.shape))
            return back * slope

        for _ in range(SWEEPS):
            for colour in itertools.product(*[range(p) for p in period]):
                group = tied & torch.stack([gr % p == c for gr, p, c in zip(grids, period, colour)]).all(0)
                if not bool(group.any()):
                    continue
                here = weights * d * g                        # what each window itself puts at its elements
                base = pool_windows(layer, cand - sent(weights), 0.0).flatten(-nd) + here
                one_hot = torch.where(mask, base.abs().sum(-1, keepdim=True) - base.abs() + (base - d * g).abs(), math.inf)
                split = torch.where(mask, (base - d * g / n).abs(), base.abs()).sum(-1, keepdim=True)
                current = (base - here).abs().sum(-1, keepdim=True)
                best = one_hot.argmin(-1, keepdim=True)
                best_cost = one_hot.gather(-1, best)
                choice = torch.zeros_like(weights).scatter_(-1, best, 1.0)
                choice = torch.where(split < best_cost, mask / n, choice)
                better = torch.minimum(split, best_cost) < current   # keep the current routing on a draw
                weights = torch.where((group[..., None] & better), choice, weights)
        routes[i] = weights.view(contenders.shape)
    return routes


def routings(spec, allow, dtype, run_in_dtype=None) -> list[tuple[str, dict]]:
    """The max-pool routings to try where windows tie: ``[(label, {layer: weights})]``, empty without ties.

    Which elements tie is taken two ways: those equal once the reference input is rounded to the candidate's
    dtype (what a float32 implementation sees: saturated tanh gives 1.0 twice), and those within the
    rounding allowance of the max. Each is routed to the first, the last, or split evenly; torch's own
    routing is the reference already. ``run_in_dtype`` (torch's run in the candidate's dtype, when that is
    not float64) adds the routing its own rounded values pick, window by window: the likeliest choice of a
    candidate computing in that dtype. Every choice is judged in full, so a bug still fails under all.
    """
    tied = {i: t for i, t in enumerate(allow.ties or []) if t is not None}
    if not tied:
        return []
    rounded = {i: m for i in tied if (m := allow.magnitudes[i].contenders(dtype=dtype)) is not None}
    out = []
    if run_in_dtype is not None:
        out.append((f"maximum that torch picks computing in {np.dtype(dtype).name}", torch_picks(spec, allow, run_in_dtype)))
    for label, masks in (("tied in the candidate's dtype", rounded), ("tied within rounding", tied)):
        for mode in ROUTING_MODES:
            if masks:
                out.append((f"{mode} of the elements {label}",
                            {i: route_weights(m, len(nodes(spec)[i].layer.kernel_size), mode) for i, m in masks.items()}))
    return out


def torch_picks(spec, allow, run) -> dict:
    """{pool layer: weights}: each tied window's δ sent where torch's max picks it (the first maximum) among the
    pool's inputs in ``run`` (a ``run_twin`` result, in any dtype); the first contender where that pick is none."""
    picks = {}
    for i, mask in enumerate(allow.ties or []):
        if mask is None:
            continue
        layer, nd = nodes(spec)[i].layer, len(nodes(spec)[i].layer.kernel_size)
        b = nodes(spec)[i].src
        a = torch.from_numpy(np.asarray(run.acts[b] if b >= 0 else allow.magnitudes[i].a, dtype=np.float64))
        win = pool_windows(layer, a, -math.inf).flatten(-nd)
        first = win == win.max(-1, keepdim=True).values
        pick = route_weights(first.view(mask.shape), nd, "first")
        valid = ((pick > 0) & mask).flatten(-nd).any(-1)[(..., *(None,) * nd)]
        picks[i] = torch.where(valid, pick, route_weights(mask, nd, "first"))
    return picks


def routing_note(spec, label: str, routes: dict) -> str:
    layers = ", ".join(nodes(spec)[i].label for i in sorted(routes))
    return (f"Tie convention: at the max pool(s) {layers}, where a window's maximum is tied (or tied within "
            f"rounding), the candidate routes δ to the {label}, not to torch's pick; any of them (or a convex "
            f"split) is a valid subgradient. Layers below are judged from the candidate's choice.")
