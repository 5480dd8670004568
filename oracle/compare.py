r"""Tensor-by-tensor comparison against torch.autograd, with one tolerance table keyed by dtype.

The verdict on a tensor is **normwise**:

.. math::  \|g - \hat g\|_2 \;\le\; \mathrm{rtol}\,\|\hat g\|_2 + \mathrm{atol}\cdot S\sqrt{n}

ĝ is the reference, n the tensor's size and S the *gradient scale of the whole check*: the largest
|element| of any reference gradient or δ. Why this form:

* Normwise, so a tiny element beside large ones may carry a large *relative* rounding error (it
  does, in any implementation) without a false alarm; an error of the size of the gradient itself,
  which every real backprop bug makes, is still millions of ulps past the bound.
* atol is relative to S, so the verdict does not change when the loss is rescaled (sum vs mean,
  m = 1 or 512), and a tensor that is tiny only because its units saturate is judged on the scale
  of the gradients around it.
* Strict bound, float64: rtol = 1e-10, atol = 1e-10·S — a thousand times stricter than
  ``torch.testing.assert_close``'s float64 defaults (1e-7), so even a float32 cast hidden in a float64
  backward (errors near 1e-8) is caught on well-conditioned networks. Two correct float64
  implementations of the same equations differ by ~1e-15 there, and by up to ~1e-9·S where a
  saturated softmax or tanh turns a difference of nearly equal numbers into a gradient element.
* Strict bound, float32: the candidate is judged against **float64 truth** (torch in float64 on the
  same float32 values), with rtol = 1e-5, atol = 1e-6·S.
* Rounding allowance: where the problem itself is ill-conditioned (saturated units, cancelling
  sums) correct implementations differ by more than the strict bound. So when a tensor misses it, the
  oracle measures torch's own rounding noise on *this* problem: an ensemble of torch runs in the
  candidate's dtype (the given values, and four copies with every input nudged by ±1 ulp, two of
  them also with each g'(z) jittered by the rounding error of evaluating it), and takes
  their largest error against the truth. A candidate within ``rounding_factor`` (10×) of that noise is
  classified ``rounding`` and passes; beyond it, the error is not rounding. One run alone is not
  enough: rounding is random, and a single run can be lucky exactly where the gradient is most sensitive.

Elementwise numbers (mismatched share, greatest differences and their index) are reported to help
the reader; the elementwise bound is :math:`|g_i - \hat g_i| \le \mathrm{atol}\cdot S + \mathrm{rtol}|\hat g_i|`
(plus 10× torch's own noise at that element, when the rounding allowance was measured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float  # in units of the check's gradient scale S
    rounding_factor: float = 10.0  # allowed multiple of torch's own rounding noise on the same problem

    def describe(self) -> str:
        return (f"‖g − ĝ‖ ≤ {self.rtol:g}·‖ĝ‖ + {self.atol:g}·S·√n (ĝ = torch float64), "
                f"or ≤ {self.rounding_factor:g}× torch's own rounding noise")


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, atol=1e-10),
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
}


@dataclass(frozen=True)
class TensorComparison:
    """How one candidate tensor compares with the reference."""

    name: str                 # "layers.1.weight", "layers.1.delta", "input.grad", "loss"
    layer: int | None
    shape: tuple
    passed: bool
    verdict: str              # "match", "rounding" (within torch's own rounding noise), "mismatch"
    max_abs_err: float
    max_rel_err: float
    normwise_rel_err: float   # ‖g − ĝ‖ / ‖ĝ‖ (inf when ĝ = 0 and g ≠ 0)
    allowed_normwise: float   # the bound on ‖g − ĝ‖
    normwise_err: float       # ‖g − ĝ‖
    torch_noise_err: float | None  # largest ‖t − ĝ‖ over torch's ensemble, when it was measured
    mismatched: int
    size: int
    worst_index: tuple
    worst_candidate: float
    worst_reference: float
    worst_allowed: float
    rel_index: tuple

    @property
    def mismatched_share(self) -> float:
        return self.mismatched / self.size if self.size else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
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
        if self.torch_noise_err is not None:
            lines.append(f"  torch's own rounding noise ‖t − ĝ‖ = {self.torch_noise_err:.3g}")
        return "\n".join(lines)


def _index(flat: int, shape: tuple) -> tuple:
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def compare_tensor(
    name: str,
    got: np.ndarray,
    ref: np.ndarray,
    tol: Tolerance,
    scale: float,
    noise: list | None = None,
    layer: int | None = None,
) -> TensorComparison:
    """Compare ``got`` with ``ref`` (float64 reference values) under ``tol``; see the module docstring.

    ``noise`` is a list of torch runs of the same tensor; given, it enables the rounding allowance.
    """
    g = np.asarray(got, dtype=np.float64).ravel()
    r = np.asarray(ref, dtype=np.float64)
    shape, r = r.shape, r.ravel()
    if r.size == 0:
        return TensorComparison(name, layer, shape, True, "match", 0.0, 0.0, 0.0, 0.0, 0.0, None, 0, 0, (), 0.0, 0.0, 0.0, ())
    diff = np.abs(g - r)
    err = float(np.sqrt(diff @ diff))
    if err != err:  # a NaN anywhere is never a match
        diff = np.where(np.isnan(diff), np.inf, diff)
        err = float("inf")
    abs_r = np.abs(r)
    ref_norm = float(np.sqrt(r @ r))
    elem_allowed = tol.atol * scale + tol.rtol * abs_r
    allowed = tol.rtol * ref_norm + tol.atol * scale * np.sqrt(r.size)
    noise_err = None
    verdict = "match" if err <= allowed else "mismatch"
    if noise is not None:  # an ensemble of torch runs: the largest error any of them makes
        diffs = [np.abs(np.asarray(t, dtype=np.float64).ravel() - r) for t in noise]
        noise_err = max(float(np.sqrt(d @ d)) for d in diffs)
        elem_allowed = elem_allowed + tol.rounding_factor * np.maximum.reduce(diffs)
        if verdict == "mismatch" and err <= tol.rounding_factor * noise_err:
            verdict = "rounding"
    with np.errstate(over="ignore"):
        rel = diff / np.maximum(abs_r, np.finfo(np.float64).tiny)  # 0 where equal, huge (or inf) where ĝ is 0
    worst, worst_rel = int(np.argmax(diff)), int(np.argmax(rel))
    return TensorComparison(
        name=name,
        layer=layer,
        shape=shape,
        passed=verdict != "mismatch",
        verdict=verdict,
        max_abs_err=float(diff[worst]),
        max_rel_err=float(rel[worst_rel]),
        normwise_rel_err=(err / ref_norm) if ref_norm > 0 else (0.0 if err == 0 else float("inf")),
        allowed_normwise=float(allowed),
        normwise_err=err,
        torch_noise_err=noise_err,
        mismatched=int(np.count_nonzero(diff > elem_allowed)),
        size=int(r.size),
        worst_index=_index(worst, shape),
        worst_candidate=float(g[worst]),
        worst_reference=float(r[worst]),
        worst_allowed=float(elem_allowed[worst]),
        rel_index=_index(worst_rel, shape),
    )
