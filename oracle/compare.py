r"""Tensor-by-tensor comparison against torch.autograd, with one tolerance table keyed by dtype.

A tensor **matches** under the strict, normwise bound

.. math::  \|g - \hat g\|_2 \;\le\; \mathrm{rtol}\,\|\hat g\|_2 + \mathrm{atol}\cdot S\sqrt{n}

ĝ is the float64 reference, n the tensor's size and S the *gradient scale of the whole check* for the tensor's
kind (``Scales``): for a δ, S_δ, the largest |element| of any reference δ; for a parameter gradient, S_θ, the
largest |element| of any reference parameter gradient. They are kept apart because ∂C/∂θ = δᵀa carries the
activations below it: with inputs of size 100 one S would let a δ move by a hundred times its own rounding.
∂C/∂x is judged on S = max(S_δ, S_θ) but does not set it: behind a batch norm over a nearly constant batch it
carries a 1/σ (10⁵ and more) that the parameter gradients and δ, formed before that division, never see, and an
S taken from it would let atol·S·√n swamp them all (``checker._scale``). Why this form:

* Normwise, so a tiny element beside large ones may carry a large *relative* rounding error (it
  does, in any implementation) without a false alarm; an error of the size of the gradient itself,
  which every real backprop bug makes, is still millions of ulps past the bound.
* atol is relative to S, so the verdict does not change when the loss is rescaled (sum vs mean,
  m = 1 or 512), and a tensor that is tiny only because its units saturate is judged on the scale
  of the gradients around it.
* float64: rtol = 1e-10, atol = 1e-10·S, a thousand times stricter than ``torch.testing``'s float64
  defaults, so even a float32 cast hidden in a float64 backward is caught on well-conditioned nets.
* float32: the candidate is judged against **float64 truth** (torch in float64 on the same float32
  values), with rtol = 1e-5, atol = 1e-6·S.

A tensor that misses the strict bound is still **rounding** (and passes) when every element lies
within the strict elementwise bound plus the *rounding allowance* B:

.. math::  |g_i - \hat g_i| \;\le\; \mathrm{atol}\cdot S + \mathrm{rtol}\,|\hat g_i| + f\cdot B_i

B is how far a correct implementation computing in the candidate's dtype lands from torch on *this*
case. It is measured (``oracle.noise``): torch is re-run six times with every rounding a correct
implementation could make injected at random, sized by the formula that makes it (a dot product's
√n·u·Σ|terms|, σ' = a(1 − a) from a rounded a, the terms of a softmax backward), and B is 10× the
largest deviation, element by element. Every non-smooth choice is held fixed in those runs (the slope
at elements within rounding of a kink; guard elements are judged by the convention rule,
``oracle.conventions``), so a discontinuity can never inflate B. B never exceeds the first-order
worst case (``oracle.rounding``), which adds every error with one sign. Both scale with the
intermediates, not with S, so when every gradient is tiny but the activations are not, a correct
implementation still passes. f = ``rounding_factor`` (2) is the safety margin.

B of a δ deep in a float32 net carries every layer above it: an output δ uncertain by 1e-3 of itself leaves every
δ below uncertain by as much, room enough for one layer's wrong g′. Where the candidate reports δ, a pass within
B is therefore also judged **step by step** (``oracle.steps``): each hidden δᵢ against the δᵢ torch forms from the
candidate's own δ of the layers reading aᵢ, by the same bounds, with a B measured for that step alone.

**The loss** C, a scalar, is judged on its own size instead of S, and by the larger of the two bounds, not
their sum (``compare_loss``):

.. math::  |C - \hat C| \;\le\; \max\big((\mathrm{rtol} + \mathrm{atol})\,|\hat C|,\; f\cdot B_C\big)

(``match`` within the first, ``rounding`` within the second). B_C bounds every rounding a correct
implementation makes in C: the change through its rounded output, Σ|∇ₐC|·E_a, each element loss's own formula,
c·u·M_ℓ, and the sum of the N element losses, (N + 2)·u·Σ|ℓᵢ| = (N + 2)·u·|C| as a worst case, since a loop
adds them with one bias (``rounding._loss_rounding``; the ensemble injects that own rounding at its full size,
at random, so B_C is in practice this bound). Nothing is left for the strict term to cover, so it only
matters where it exceeds f·B_C (well-conditioned losses, where a correct C errs by far less than either);
added to f·B_C it would let a change of the loss alone pass (a bias dropped from the forward pass moves C by
1e-5·|C| where a correct float32 C is within 1e-7·|C|).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float  # in units of the check's gradient scale S
    rounding_factor: float = 2.0  # allowed multiple of the rounding allowance B (oracle.rounding)

    def __post_init__(self):
        import math

        from manual_bp import SpecError

        for name in ("rtol", "atol", "rounding_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SpecError(f"tolerance.{name}", f"{value!r} is not a finite number ≥ 0", "give e.g. Tolerance(rtol=1e-10, atol=1e-10)")

    def describe(self) -> str:
        return (f"‖g − ĝ‖ ≤ {self.rtol:g}·‖ĝ‖ + {self.atol:g}·S·√n (ĝ = torch float64), "
                f"or every |gᵢ − ĝᵢ| ≤ {self.atol:g}·S + {self.rtol:g}·|ĝᵢ| + {self.rounding_factor:g}·Bᵢ (B: the rounding allowance); "
                f"the loss: |C − Ĉ| ≤ max({self.rtol + self.atol:g}·|Ĉ|, {self.rounding_factor:g}·B_C)")


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, atol=1e-10),
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
}


def gradient_scale(largest: float, loss: float, dtype, tol: Tolerance) -> float:
    """S: the largest |element| of any reference parameter gradient or δ (``largest``), but never below the
    dtype's resolution of this loss, ε²·max(1, |C|)/atol: where saturation drives every gradient to the underflow
    range, torch's exact 0 and an exact implementation's 1e-45 are the same answer."""
    eps = float(np.finfo(dtype).eps)
    return max(largest, eps * eps * max(1.0, abs(loss)) / max(tol.atol, 1e-300), float(np.finfo(np.float64).tiny))


class Scales(float):
    """The check's gradient scales: S_δ, the largest |element| of any reference δ, and S_θ, of any reference
    parameter gradient, each through ``gradient_scale``. As a float it is S = max(S_δ, S_θ), the scale ∂C/∂x is
    judged on and the one a report names.

    Two, not one, because the two kinds are in different units: ∂C/∂θ = δᵀa carries the activations below it, so
    inputs of size 100 make the first layer's weight gradient 100× the δ around it, and an S taken from it would
    let atol·S·√n pass a δ changed by a hundred times its own rounding."""

    def __new__(cls, delta: float, param: float):
        obj = super().__new__(cls, max(delta, param))
        obj.delta, obj.param = float(delta), float(param)
        return obj

    def __reduce__(self):
        return (Scales, (self.delta, self.param))

    @classmethod
    def of_reference(cls, grads, deltas, loss: float, dtype, tol: Tolerance) -> "Scales":
        """S_δ from the reference's δ tensors, S_θ from its parameter gradients (each through ``gradient_scale``)."""
        def largest(tensors):
            return max((max(float(t.max()), -float(t.min())) for t in map(np.asarray, tensors) if t.size), default=0.0)

        return cls(gradient_scale(largest(deltas), loss, dtype, tol), gradient_scale(largest(grads), loss, dtype, tol))

    def of(self, name: str) -> float:
        """The scale the tensor ``name`` is judged on: S_δ for a δ, S for ∂C/∂x, S_θ for a parameter's gradient."""
        if name.endswith(".delta") or name.startswith("delta."):  # layers.1.delta, or a golden set's delta.layers.1
            return self.delta
        return float(self) if name == "input.grad" else self.param


def as_scales(scale) -> Scales:
    """``scale`` as ``Scales``: a plain float S (a report or golden set from before S_δ and S_θ) is both."""
    return scale if isinstance(scale, Scales) else Scales(float(scale), float(scale))


def scale_of(scale, name: str) -> float:
    """The scale the tensor ``name`` is judged on (``Scales.of``); a plain float S is every tensor's."""
    return as_scales(scale).of(name)


@dataclass(frozen=True)
class TensorComparison:
    """How one candidate tensor compares with the reference.

    The verdict and the normwise figures are computed at once (two dot products for a tensor that matches); the
    element statistics (greatest differences, their indices, the mismatched count) only when something reads them:
    a passing tensor in a campaign never needs them, a report does."""

    name: str                 # "layers.1.weight", "layers.1.delta", "input.grad", "loss"
    layer: int | None
    shape: tuple
    passed: bool
    verdict: str              # "match", "rounding" (within the rounding allowance), "mismatch"
    normwise_rel_err: float   # ‖g − ĝ‖ / ‖ĝ‖ (inf when ĝ = 0 and g ≠ 0)
    allowed_normwise: float   # the bound on ‖g − ĝ‖
    normwise_err: float       # ‖g − ĝ‖
    rounding_allowance: float | None  # ‖f·B‖, the rounding allowance's norm, when one was given
    size: int
    # (g, ĝ flattened, the elementwise allowance or None, tol, S): what the element statistics are computed from
    _elements: tuple | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def _stats(self) -> dict:
        if self._elements is None:
            return dict(max_abs_err=0.0, max_rel_err=0.0, mismatched=0, worst_index=(), worst_candidate=0.0,
                        worst_reference=0.0, worst_allowed=0.0, rel_index=())
        g, r, elem_allowed, tol, scale = self._elements
        if elem_allowed is None:
            elem_allowed = _element_allowance(r, tol, scale, None)
        diff = _difference(g, r)
        with np.errstate(over="ignore", invalid="ignore"):
            rel = diff / np.maximum(np.abs(r), np.finfo(np.float64).tiny)  # 0 where equal, huge (or inf) where ĝ is 0
        worst, worst_rel = int(np.argmax(diff)), int(np.argmax(rel))
        return dict(max_abs_err=float(diff[worst]), max_rel_err=float(rel[worst_rel]),
                    mismatched=int(np.count_nonzero(diff > elem_allowed)), worst_index=_index(worst, self.shape),
                    worst_candidate=float(g[worst]), worst_reference=float(r[worst]),
                    worst_allowed=float(elem_allowed[worst]), rel_index=_index(worst_rel, self.shape))

    max_abs_err = property(lambda self: self._stats["max_abs_err"])
    max_rel_err = property(lambda self: self._stats["max_rel_err"])
    mismatched = property(lambda self: self._stats["mismatched"])
    worst_index = property(lambda self: self._stats["worst_index"])
    worst_candidate = property(lambda self: self._stats["worst_candidate"])
    worst_reference = property(lambda self: self._stats["worst_reference"])
    worst_allowed = property(lambda self: self._stats["worst_allowed"])
    rel_index = property(lambda self: self._stats["rel_index"])

    @property
    def mismatched_share(self) -> float:
        return self.mismatched / self.size if self.size else 0.0

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "layer", "shape", "passed", "verdict", "max_abs_err", "max_rel_err",
                                            "normwise_rel_err", "allowed_normwise", "normwise_err", "rounding_allowance",
                                            "mismatched", "size", "worst_index", "worst_candidate", "worst_reference",
                                            "worst_allowed", "rel_index")}
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        d["rel_index"] = list(self.rel_index)
        d["mismatched_share"] = self.mismatched_share
        return d

    def message(self) -> str:
        """torch.testing-style lines: mismatched elements, greatest differences with index and bound."""
        where = f" (layer {self.layer})" if self.layer is not None else ""
        share = f"{self.mismatched} / {self.size} ({100 * self.mismatched_share:.1f}%)"
        lines = [
            f"{self.name}{where}: {self.verdict}",
            f"  Mismatched elements: {share}",
            f"  Greatest absolute difference: {self.max_abs_err:.3g} at index {self.worst_index} "
            f"(candidate {self.worst_candidate:.6g}, torch {self.worst_reference:.6g}; up to {self.worst_allowed:.3g} allowed)",
            f"  Greatest relative difference: {self.max_rel_err:.3g} at index {self.rel_index}",
            f"  Normwise ‖g − ĝ‖ = {self.normwise_err:.3g} (relative {self.normwise_rel_err:.3g}; up to {self.allowed_normwise:.3g} allowed)",
        ]
        if self.rounding_allowance is not None:
            lines.append(f"  Rounding allowance ‖f·B‖ = {self.rounding_allowance:.3g}")
        return "\n".join(lines)


def _norm(v: np.ndarray) -> float:
    """‖v‖₂ without overflow: (max|v|)·‖v/max|v|‖, so 1e200-sized entries give 1e200, not inf."""
    top = float(np.max(np.abs(v))) if v.size else 0.0
    if top == 0.0 or not np.isfinite(top):
        return top
    w = v / top
    return top * float(np.sqrt(w @ w))


def _index(flat: int, shape: tuple) -> tuple:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def mismatch_mask(got, ref, tol: Tolerance, scale: float, bound=None) -> np.ndarray:
    """The elements of ``got`` outside what ``compare_tensor`` allows each one (its tolerance plus its rounding
    allowance), in ``ref``'s shape: where a failing tensor fails."""
    g, r = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    b = None if bound is None else tol.rounding_factor * np.broadcast_to(np.asarray(bound, dtype=np.float64), r.shape)
    return ~(_difference(g, r) <= _element_allowance(r, tol, scale, b))


def compare_tensor(
    name: str,
    got: np.ndarray,
    ref: np.ndarray,
    tol: Tolerance,
    scale: float,
    bound: np.ndarray | None = None,
    layer: int | None = None,
    either: bool = False,
) -> TensorComparison:
    """Compare ``got`` with ``ref`` (float64 reference values) under ``tol``; see the module docstring.

    ``bound`` is the rounding allowance B of each element (``oracle.rounding``); given, it enables the
    ``rounding`` verdict: every |gᵢ − ĝᵢ| ≤ atol·S + rtol·|ĝᵢ| + f·Bᵢ, or, with ``either``, ≤ max(atol·S +
    rtol·|ĝᵢ|, f·Bᵢ) (for an allowance that is a complete bound on its own: the loss's, see ``compare_loss``).
    """
    g = np.asarray(got, dtype=np.float64).ravel()
    r = np.asarray(ref, dtype=np.float64)
    shape, r = r.shape, r.ravel()
    if r.size == 0:
        return TensorComparison(name, layer, shape, True, "match", 0.0, 0.0, 0.0, None, 0)
    err, ref_norm = _fast_norms(g, r)
    if err is None:  # NaN, an infinity, or values whose squares leave float64's range: the careful way
        diff = _difference(g, r)
        err = _norm(diff) if np.all(np.isfinite(diff)) else float("inf")
        ref_norm = _norm(np.where(np.isinf(r), 0.0, r))
    allowed = tol.rtol * ref_norm + tol.atol * scale * np.sqrt(r.size)
    verdict = "match" if err <= allowed else "mismatch"
    allowance, elem_allowed = None, None
    if bound is not None:
        b = tol.rounding_factor * np.broadcast_to(np.asarray(bound, dtype=np.float64), shape).ravel()
        allowance = _norm(b)
        elem_allowed = _element_allowance(r, tol, scale, b, either)
        if verdict == "mismatch" and np.all(_difference(g, r) <= elem_allowed):
            verdict = "rounding"
    return TensorComparison(
        name=name,
        layer=layer,
        shape=shape,
        passed=verdict != "mismatch",
        verdict=verdict,
        normwise_rel_err=(err / ref_norm) if ref_norm > 0 else (0.0 if err == 0 else float("inf")),
        allowed_normwise=float(allowed),
        normwise_err=float(err),
        rounding_allowance=allowance,
        size=int(r.size),
        _elements=(g, r, elem_allowed, tol, scale),
    )


def compare_loss(got: float, ref: float, tol: Tolerance, bound=None) -> TensorComparison:
    """Compare the loss C with the reference's Ĉ: ``match`` within (rtol + atol)·|Ĉ|, ``rounding`` within the
    larger of that and f·B_C, never their sum (B_C, ``bound``, is a complete bound on a correct implementation's
    error in C; see the module docstring)."""
    return compare_tensor("loss", np.float64(got), np.float64(ref), tol, abs(float(ref)) or 1.0, bound, either=True)


def _difference(g: np.ndarray, r: np.ndarray) -> np.ndarray:
    """|g − ĝ| elementwise; a NaN anywhere is never a match, and an infinite ĝ is matched only by the same infinity."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(g - r)
    if np.all(np.isfinite(diff)) and np.all(np.isfinite(r)):
        return diff
    same_inf = np.isinf(r) & (g == r)
    return np.where(same_inf, 0.0, np.where(np.isnan(diff) | np.isinf(r), np.inf, diff))


def _element_allowance(r: np.ndarray, tol: Tolerance, scale: float, b, either: bool = False) -> np.ndarray:
    """What each element may differ by: atol·S + rtol·|ĝᵢ|, plus f·Bᵢ when a rounding allowance is given (with
    ``either``, the larger of the two: ``compare_loss``)."""
    allowed = tol.atol * scale + tol.rtol * np.where(np.isinf(r), 0.0, np.abs(r))
    if b is None:
        return allowed
    return np.maximum(allowed, b) if either else allowed + b


def _fast_norms(g: np.ndarray, r: np.ndarray):
    """(‖g − ĝ‖, ‖ĝ‖) by two dot products, or (None, None) where that could be wrong: a NaN or an infinity, or a sum
    of squares outside [1e-280, 1e280] (an overflow, or an underflow that could turn a nonzero difference into 0)."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        d = g - r
        e2, r2 = float(d @ d), float(r @ r)
    for v, vec in ((e2, d), (r2, r)):
        if not (1e-280 <= v <= 1e280) and not (v == 0.0 and not vec.any()):
            return None, None
    return float(np.sqrt(e2)), float(np.sqrt(r2))
