"""Diagnosis hints: what a wrong gradient looks like next to torch's, in words.

Each hint is computed from the two arrays alone (plus the batch size and torch's other tensors), never
guessed from names: a constant ratio (and which usual factor it is), a match after transposing, zeros
where torch has none, equality with a neighbouring layer's gradient, an error confined to batch rows,
or to elements lying on a kink.
"""

from __future__ import annotations

import numpy as np

#: ratio -> what it usually means
FACTORS = [
    (-1.0, "−1: the sign is flipped (y − ỹ for ỹ − y?)"),
    (2.0, "2: a missing ½ (d/dx of ½r² is r)"),
    (0.5, "½: a spurious ½, or a missing factor 2 (d/dx of r² is 2r)"),
    (-2.0, "−2: a missing ½ and a flipped sign"),
    (-0.5, "−½: a spurious ½ and a flipped sign"),
]


def _close(a, b, rtol=1e-6) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * scale))


def constant_ratio(cand, ref, batch: int | None, factors=()) -> str | None:
    cand = np.asarray(cand, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    big = np.abs(ref) > 1e-3 * np.max(np.abs(ref)) if ref.size and np.any(ref) else None
    if big is None or big.sum() < 1:
        return None
    with np.errstate(over="ignore", invalid="ignore"):  # a ratio beyond float64 (a candidate of 1e300) is no constant
        r = cand[big] / ref[big]
        k = float(np.median(r))
        if not np.isfinite(k) or k == 0 or not np.all(np.abs(r - k) <= 1e-6 * abs(k)) or abs(k - 1) < 1e-6:
            return None
    if not _close(cand, k * ref):
        return None
    named = []
    if batch and batch > 1:
        named += [(float(batch), f"a missing 1/m, m = {batch} (sum where the mean belongs)"),
                  (1.0 / batch, f"a spurious 1/m, m = {batch} (mean where the sum belongs)")]
    named += list(factors)  # the net's own usual factors, e.g. an avg pool's window size
    named += [(f, meaning.split(": ", 1)[1]) for f, meaning in FACTORS]
    meanings = [meaning for factor, meaning in named if abs(k - factor) <= 1e-6 * abs(factor)]
    if meanings:
        return f"constant ratio candidate/torch = {k:.6g}: " + "; or ".join(meanings)
    if big.sum() < 2:  # one element always has "a constant ratio"
        return None
    return f"constant ratio candidate/torch = {k:.6g}: a scale factor is wrong"


def hints(name: str, cand, ref, *, batch: int | None, others: dict | None = None, kink_mask=None,
          allowed=None, factors=()) -> list[str]:
    """Hints for one mismatching tensor ``name``; ``others`` maps torch's other tensors by name; ``factors``
    are (ratio, meaning) pairs the network itself suggests (checked before the usual ½, 2, −1)."""
    cand = np.asarray(cand, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    out = []
    if not np.all(np.isfinite(cand)):
        out.append("the candidate holds NaN or Inf")
        return out
    ratio = constant_ratio(cand, ref, batch, factors)
    if ratio:
        out.append(ratio)
    if cand.ndim == 2 and cand.shape[0] == cand.shape[1] and not _close(cand, ref) and _close(cand.T, ref):
        out.append("it equals torch's gradient transposed: a missing or extra transpose")
    out += _spatial_hints(name, cand, ref)
    for other, arr in (others or {}).items():
        if other != name and np.shape(arr) == cand.shape and np.any(arr) and _close(cand, arr):
            out.append(f"it equals torch's {other}: the δ or gradient of the wrong layer was used")
    if np.any(ref) and not np.any(cand):
        out.append("the candidate is zero everywhere torch is not: a dropped term or a derivative that vanished")
    elif not out and np.any(ref) and np.mean((cand == 0) & (ref != 0)) > 0.25:
        out.append("the candidate is zero at many elements where torch is not")
    if allowed is None:
        allowed = 1e-8 * (np.max(np.abs(ref)) if ref.size else 0)
    bad = np.abs(cand - ref) > allowed
    if name.endswith(".delta") or name == "input.grad":
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1)) if bad.ndim >= 2 else []
        m = bad.shape[0] if bad.ndim >= 2 else 0
        if m > 1 and len(rows) == 1:
            out.append(f"the error is confined to batch row {int(rows[0])}")
        elif m > 1 and len(rows) == m - 1 and 0 not in rows:
            out.append("only batch row 0 is right: only the first example was back-propagated?")
    if bad.ndim >= 3 and bad.any() and (name.endswith(".delta") or name == "input.grad"):
        out += _where_on_the_map(bad)
    if kink_mask is not None and bad.any() and np.all(np.asarray(kink_mask)[bad]):
        out.append("the error is confined to elements whose z lies on a kink")
    return out


def _spatial_hints(name: str, cand, ref) -> list[str]:
    """A conv weight (out, in, *kernel) that equals torch's with its kernel flipped, or with the in and out
    channels swapped; any 2-D map (a kernel, a δ) with its two spatial axes exchanged."""
    if cand.ndim < 3 or _close(cand, ref):
        return []
    out = []
    if cand.ndim == 4 and ref.shape[2] == ref.shape[3] and not _close(ref, np.swapaxes(ref, 2, 3)) \
            and _close(cand, np.swapaxes(ref, 2, 3)):
        out.append("it equals torch's with the two spatial axes exchanged (H and W transposed)")
    if not name.endswith(".weight"):
        return out
    flipped = ref[(..., *(slice(None, None, -1),) * (ref.ndim - 2))]
    if not _close(ref, flipped) and _close(cand, flipped):
        out.append("it equals torch's gradient with the kernel flipped: the forward is a cross-correlation, "
                   "so ∂C/∂θ is δ correlated with the input, not convolved")
    if ref.shape[0] == ref.shape[1] and _close(cand, np.swapaxes(ref, 0, 1)):
        out.append("it equals torch's gradient with the in and out channels swapped (θ is (out, in, *kernel))")
    return out


def _where_on_the_map(bad: np.ndarray) -> list[str]:
    """Where on a feature map (m, C, *spatial) the wrong elements lie: one channel, or only the border."""
    out = []
    channels = np.flatnonzero(bad.any(axis=tuple(k for k in range(bad.ndim) if k != 1)))
    if bad.shape[1] > 1 and len(channels) == 1:
        out.append(f"the error is confined to channel {int(channels[0])}")
    inner = bad[(slice(None), slice(None), *(slice(1, -1),) * (bad.ndim - 2))]
    if all(n > 2 for n in bad.shape[2:]) and not inner.any():
        out.append("the error is confined to the border of the feature map: padding (or the positions the "
                   "kernel reaches only partly) handled wrongly")
    return out


#: the row blocks of a recurrent layer's weights (torch's gate order) and of attention's packed projection
GATES = {"lstm": ("i (input)", "f (forget)", "g (cell candidate)", "o (output)"),
         "gru": ("r (reset)", "z (update)", "n (new)"), "attention": ("q", "k", "v")}


def gate_hint(kind: str, bad: np.ndarray) -> list[str]:
    """Which gates' rows of a recurrent weight or bias (attention's q/k/v blocks of in_proj) hold the error."""
    names = GATES.get(kind)
    if names is None or bad.shape[0] % len(names) or not bad.any():
        return []
    rows = bad.reshape(len(names), -1).any(axis=1)
    if rows.all():
        return []
    what = "projection" if kind == "attention" else "gate"
    hit = [n for n, r in zip(names, rows) if r]
    return [f"the error is confined to the rows of {what}{'s' if len(hit) > 1 else ''} {', '.join(hit)} "
            f"(torch's order: {', '.join(n.split()[0] for n in names)})"]


def step_hint(bad: np.ndarray, cand, ref) -> list[str]:
    """Where in time a sequence gradient (m, T, ...) fails: counted back from the last step, and whether the error
    grows with the distance from it (what a dropped or wrong recurrent gradient does)."""
    if bad.ndim < 3 or not bad.any():
        return []
    T = bad.shape[1]
    steps = np.flatnonzero(bad.swapaxes(0, 1).reshape(T, -1).any(axis=1))
    diff = np.abs(np.asarray(cand, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    per_step = np.sqrt((diff.swapaxes(0, 1).reshape(T, -1) ** 2).sum(axis=1))
    back = T - 1 - int(steps.max())
    out = []
    if back > 0:
        out.append(f"the last {back} step{'s' if back > 1 else ''} match; the first step counted back from the last "
                   f"that diverges is {back} back (t = {T - 1 - back} of 0..{T - 1}): what is carried back through "
                   f"time (dh from step t + 1, through the hidden-to-hidden path) is wrong or dropped")
    elif len(steps) < T:
        out.append(f"only steps {', '.join(str(int(t)) for t in steps[:6])}{' …' if len(steps) > 6 else ''} of "
                   f"0..{T - 1} diverge")
    early = per_step[: int(steps.max()) + 1][::-1]  # from the last diverging step back to t = 0
    if len(early) >= 3 and np.all(np.diff(early) >= -1e-12 * early.max()) and early[-1] > 2 * early[0]:
        out.append("the error grows with the distance from the last step: a recurrent gradient dropped or wrong at "
                   "every step compounds back through time")
    return out
