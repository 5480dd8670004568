"""One oracle check: run a candidate backward and torch.autograd on the same network, compare, explain.

Order of work:

1. validate spec, params and data (``SpecError`` naming the field);
2. call the candidate ``grads_fn(spec, params, x, y)`` on copies of the inputs, and validate what it
   returns (``CandidateError``: wrong keys, shapes or dtypes, or it raised);
3. run the torch twin in float64 (the truth) and compare under the strict bound; only where a tensor
   misses it, measure torch's own rounding noise on this problem (``noise_ensemble``) to tell
   rounding from a bug;
4. compare the loss first (a forward mismatch is reported as such), then every gradient, δ and ∂C/∂x;
5. localize the first divergent layer walking back from the loss, and classify the result:
   ``match``, ``rounding`` (within torch's own rounding noise), ``kink`` (a convention at a
   non-differentiable point, never a failure), ``forward`` or ``bug``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

import manual_bp
from manual_bp import Spec, SpecError
from manual_bp.data import check_params, check_x, check_y, dtype_of

from .compare import TOLERANCES, TensorComparison, Tolerance, compare_tensor
from .twin import near_kink_masks, run_twin

GradsFn = Callable[[Spec, dict, np.ndarray, np.ndarray], Any]


class CandidateError(SpecError):
    """The gradient function under test returned something unusable (wrong keys, shapes or dtypes)."""

    def __init__(self, problem: str, fix: str):
        super().__init__("impl", problem, fix)


class CandidateCrash(Exception):
    """The gradient function under test did not return: it raised, exited, was killed or timed out.

    ``kind`` is one of ``raised``, ``exit``, ``killed``, ``timeout``; ``traceback`` is the
    candidate's own traceback text (its frames, not the oracle's), or a description of how it ended.
    That is a verdict on the implementation (``crash``, exit code 1), never bad input.
    """

    def __init__(self, kind: str, message: str, traceback: str = ""):
        super().__init__(message)
        self.kind, self.message, self.traceback = kind, message, traceback

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "traceback": self.traceback}


@dataclass(frozen=True)
class Candidate:
    """What a gradient function returned, normalised."""

    loss: float
    grads: dict
    deltas: dict | None = None
    grad_input: np.ndarray | None = None


@dataclass
class CheckResult:
    """The verdict of one check, with everything a report needs."""

    spec: Spec
    dtype: str
    passed: bool
    classification: str              # match | rounding | kink | convention | forward | bug | crash
    tolerance: Tolerance
    scale: float                     # S, the largest reference gradient element
    loss: TensorComparison | None    # None only for a crash
    tensors: list                    # TensorComparison for grads, δ, ∂C/∂x in layer order
    first_divergent_layer: int | None
    localization: str
    notes: list = field(default_factory=list)
    arrays: dict = field(default_factory=dict, repr=False)  # name -> (candidate, reference) for plots
    hints: dict = field(default_factory=dict)  # failing tensor name -> diagnosis hints (oracle.diagnose)
    crash: dict | None = None        # CandidateCrash.to_dict() when the candidate did not return

    @property
    def failed_tensors(self) -> list:
        return [t for t in self.tensors if not t.passed]

    def summary(self) -> str:
        head = {
            "match": "gradients match torch.autograd",
            "rounding": "gradients match torch.autograd within rounding (ill-conditioned in places)",
            "kink": "gradients match torch.autograd up to a convention at kinks",
            "convention": "gradients match torch.autograd up to torch's numerical guards (exact where torch clamps)",
            "forward": "FORWARD MISMATCH: the loss differs from torch's",
            "bug": "GRADIENT MISMATCH: the backward pass is wrong",
            "crash": "CANDIDATE CRASHED: the gradient function did not return",
        }[self.classification]
        name = self.spec.name or "spec"
        return f"{head} ({name}: {self.spec.describe()}, {self.dtype})"

    def message(self) -> str:
        """The full explanation: verdict, where, and torch.testing-style lines per failing tensor."""
        lines = [self.summary()]
        if self.localization:
            lines.append(f"Where: {self.localization}")
        lines.extend(self.notes)
        if self.crash is not None:
            lines.append(f"The candidate {self.crash['message']}")
            if self.crash["traceback"]:
                lines.append(self.crash["traceback"].rstrip())
            return "\n".join(lines)
        bad = ([self.loss] if not self.loss.passed else []) + self.failed_tensors
        for t in bad:
            lines.append(t.message())
            lines.extend(f"  Hint: {h}" for h in self.hints.get(t.name, []))
        lines.append(f"Criterion: {self.tolerance.describe()}, S = {self.scale:.3g}")
        return "\n".join(lines)


def _as_candidate(result: Any) -> Candidate:
    if isinstance(result, tuple) and len(result) in (2, 3):
        return Candidate(result[0], result[1], result[2] if len(result) == 3 else None)
    if hasattr(result, "loss") and hasattr(result, "grads"):
        return Candidate(result.loss, result.grads, getattr(result, "deltas", None), getattr(result, "grad_input", None))
    raise CandidateError(
        f"returned a {type(result).__name__}",
        "return (loss, grads) or (loss, grads, deltas), grads a dict of arrays keyed like layers.0.weight",
    )


def _validated(c: Candidate, spec: Spec, m: int, dtype: np.dtype) -> Candidate:
    loss = np.asarray(c.loss)
    if loss.size != 1 or loss.dtype.kind not in "fiu":
        raise CandidateError(f"returned loss {c.loss!r}", "return the reduced loss as one number")
    if not isinstance(c.grads, Mapping):
        raise CandidateError(f"returned grads as a {type(c.grads).__name__}", "return a dict {name: array}")
    expected = spec.param_shapes()
    missing, extra = [k for k in expected if k not in c.grads], [k for k in c.grads if k not in expected]
    if missing or extra:
        problem = f"returned no gradient for {missing[0]!r}" if missing else f"returned an unknown key {extra[0]!r}"
        raise CandidateError(problem, f"return exactly these keys: {', '.join(expected)}")

    def arr(name, value, shape):
        if not isinstance(value, np.ndarray):
            raise CandidateError(f"returned {name} as a {type(value).__name__}", "return NumPy arrays")
        if value.shape != tuple(shape):
            raise CandidateError(f"returned {name} with shape {value.shape}", f"its shape must be {tuple(shape)}")
        if value.dtype != dtype:
            raise CandidateError(f"returned {name} as {value.dtype} for {dtype} inputs", f"compute and return {dtype}")
        return value

    grads = {k: arr(k, c.grads[k], s) for k, s in expected.items()}
    deltas = None
    if c.deltas is not None:
        if not isinstance(c.deltas, Mapping):
            raise CandidateError(f"returned deltas as a {type(c.deltas).__name__}", "return a dict {'layers.i': δ_i} or None")
        deltas = {}
        for i, layer in enumerate(spec.layers):
            key = f"layers.{i}"
            if key in c.deltas:
                deltas[key] = arr(f"delta {key}", c.deltas[key], (m, layer.units))
    grad_input = None
    if c.grad_input is not None:
        grad_input = arr("grad_input", c.grad_input, (m, spec.input_size))
    return Candidate(float(loss.reshape(())), grads, deltas or None, grad_input)


def run_candidate(grads_fn: GradsFn, spec: Spec, params: dict, x: np.ndarray, y: np.ndarray) -> Candidate:
    """Call ``grads_fn`` on copies (so it cannot change our inputs) and validate its answer."""
    try:
        result = grads_fn(copy.deepcopy(spec), {k: v.copy() for k, v in params.items()}, x.copy(), y.copy())
    except CandidateCrash:
        raise
    except (Exception, SystemExit) as err:  # the candidate is user code: any failure is a crash verdict
        raise CandidateCrash("raised" if isinstance(err, Exception) else "exit",
                             f"raised {type(err).__name__}: {err}", _user_traceback(err)) from None
    return _validated(_as_candidate(result), spec, x.shape[0], x.dtype)


def _user_traceback(err: BaseException) -> str:
    """The traceback of ``err`` from the candidate's first frame on (the oracle's own frames dropped)."""
    import traceback

    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb))


ENSEMBLE = 5  # torch runs (in the candidate's dtype) whose largest error is torch's own rounding noise


class _Ensemble:
    """Several torch runs seen as one: each attribute is a list with one entry per run."""

    def __init__(self, refs):
        self.loss = [np.float64(r.loss) for r in refs]
        self.grads = {k: [r.grads[k] for r in refs] for k in refs[0].grads}
        self.deltas = {k: [r.deltas[k] for r in refs] for k in refs[0].deltas}
        self.grad_input = [r.grad_input for r in refs]


def noise_ensemble(spec, params, x, y, first=None) -> _Ensemble:
    """torch in the params' dtype on the given values, and on copies with each nonzero input nudged ±1 ulp,
    half of them also with g'(z) jittered by its own rounding error (see ``twin.run_twin``).

    ``first`` is a run on the given values already made (the float64 reference in float64 mode).
    """
    rng = np.random.default_rng(0)
    dtype = next(iter(params.values())).dtype
    runs = [first if first is not None else run_twin(spec, params, x, y, dtype)]

    def nudge(a):
        direction = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype)
        return np.where(a != 0, np.nextafter(a, direction), a)

    for k in range(ENSEMBLE - 1):
        jitter = rng if k % 2 else None  # alternate: inputs nudged; inputs nudged and g' jittered
        runs.append(run_twin(spec, {k: nudge(v) for k, v in params.items()}, nudge(x), y, dtype, jitter=jitter))
    return _Ensemble(runs)


def _scale(ref) -> float:
    tensors = list(ref.grads.values()) + list(ref.deltas.values()) + [ref.grad_input]
    return max(float(np.max(np.abs(t))) if t.size else 0.0 for t in tensors) or np.finfo(np.float64).tiny


def _compare_all(spec, cand: Candidate, ref, noise, tol: Tolerance, scale: float, arrays: dict) -> list:
    """Every tensor the candidate gave, in layer order from the loss back; ``noise`` an ensemble or None."""
    out = []
    for i, _ in reversed(list(enumerate(spec.layers))):
        key = f"layers.{i}"
        if cand.deltas and key in cand.deltas:
            out.append(compare_tensor(f"{key}.delta", cand.deltas[key], ref.deltas[key], tol, scale,
                                      None if noise is None else noise.deltas[key], layer=i))
            arrays[f"{key}.delta"] = (cand.deltas[key], ref.deltas[key])
        for name in spec.param_shapes():
            if name.startswith(key + "."):
                out.append(compare_tensor(name, cand.grads[name], ref.grads[name], tol, scale,
                                          None if noise is None else noise.grads[name], layer=i))
                arrays[name] = (cand.grads[name], ref.grads[name])
    if cand.grad_input is not None:
        out.append(compare_tensor("input.grad", cand.grad_input, ref.grad_input, tol, scale,
                                  None if noise is None else noise.grad_input))
        arrays["input.grad"] = (cand.grad_input, ref.grad_input)
    return out


def localize(spec: Spec, tensors: list) -> tuple[int | None, str]:
    """Walk back from the loss: the first layer whose δ (or, without δ, parameter gradient) diverges."""
    by_layer: dict = {}
    for t in tensors:
        by_layer.setdefault(t.layer, []).append(t)
    has_deltas = any(t.name.endswith(".delta") for t in tensors)
    L = len(spec.layers)
    for i in reversed(range(L)):
        act = spec.layers[i].activation.name
        group = by_layer.get(i, [])
        delta = next((t for t in group if t.name.endswith(".delta")), None)
        params_bad = [t.name for t in group if not t.name.endswith(".delta") and not t.passed]
        if delta is not None and not delta.passed:
            if i == L - 1:
                return i, (f"the output δ (layer {i}) diverges: ∇_a C of the loss ({spec.loss.name}) "
                           f"or the output activation's derivative ({act}) is wrong")
            return i, (f"δ of layer {i + 1} matches, δ of layer {i} diverges: the backward step through "
                       f"layer {i} ({act}) is wrong: (δ_{i + 1} θ_{i + 1}) ⊙ g'(z_{i})")
        if params_bad:
            if has_deltas:
                return i, (f"δ of layer {i} matches but {', '.join(params_bad)} does not: the parameter-gradient "
                           f"step of layer {i} (∂C/∂θ = δᵀa, ∂C/∂b = Σ δ) is wrong")
            later = "" if i == L - 1 else (f"layer {L - 1} matches; " if i == L - 2 else f"layers {i + 1}..{L - 1} match; ")
            where = (f"the output layer: check ∇_a C of {spec.loss.name} and the derivative of {act}"
                     if i == L - 1 else f"the backward step through layer {i} ({act}) or its parameter gradients")
            return i, f"{later}layer {i} is the first to diverge ({', '.join(params_bad)}): {where}"
    bad_input = [t for t in tensors if t.layer is None and not t.passed]
    if bad_input:
        return None, "every parameter gradient matches, ∂C/∂x does not: the last step δ_0 θ_0 is wrong"
    return None, ""


def check(
    spec: Spec,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    grads_fn: GradsFn | None = None,
    *,
    dtype: str | None = None,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """Check ``grads_fn`` (default: manual_bp) against torch.autograd on one network and batch.

    ``dtype`` ("float64" or "float32") casts params and data first; by default the params' dtype
    is used. In float32 mode the reference is torch in float64 on the same float32 values.
    """
    grads_fn = grads_fn or manual_bp.gradients
    if dtype is not None:
        dt = dtype_of(dtype)
        check_params(spec, params)
        params = {k: v.astype(dt) for k, v in params.items()}
        x = np.asarray(x).astype(dt)
        if spec.loss.targets == "values":
            y = np.asarray(y).astype(dt)
    dt = check_params(spec, params)
    x, single = check_x(spec, x, dt)
    y = check_y(spec, y, x.shape[0], single, dt)
    tol = tolerance or TOLERANCES[dt.name]

    try:
        cand = run_candidate(grads_fn, spec, dict(params), x, y)
    except CandidateCrash as crash:
        return CheckResult(spec, dt.name, False, "crash", tol, 0.0, None, [], None,
                           f"the candidate {crash.kind}: {crash.message}", crash=crash.to_dict())
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    x64 = x.astype(np.float64)
    y64 = y if spec.loss.targets == "classes" else y.astype(np.float64)
    ref = run_twin(spec, params64, x64, y64, np.float64)

    scale = _scale(ref)
    arrays: dict = {}

    def compare_everything(noise):
        loss = compare_tensor("loss", np.float64(cand.loss), np.float64(ref.loss), tol, abs(ref.loss) or 1.0,
                              None if noise is None else noise.loss)
        return loss, _compare_all(spec, cand, ref, noise, tol, scale, arrays)

    loss_cmp, tensors = compare_everything(None)
    notes: list = []
    if not np.isfinite(cand.loss) or any(not np.all(np.isfinite(g)) for g in cand.grads.values()):
        notes.append("The candidate returned NaN or Inf values.")

    def result(passed, kind, layer=None, where=""):
        return CheckResult(spec, dt.name, passed, kind, tol, scale, loss_cmp, tensors, layer, where, notes, arrays)

    if loss_cmp.passed and all(t.passed for t in tensors):
        return result(True, "match")
    if loss_cmp.passed:  # a convention at kinks is judged before any rounding allowance widens the bounds
        layer, where = localize(spec, tensors)
        kink = _kink_classification(spec, params64, x64, y64, cand, ref, tensors, tol, scale, layer, dt)
        if kink:
            notes.append(kink)
            return result(True, "kink", layer, where)
    # Only now is torch's own rounding noise on this problem worth measuring.
    noise = noise_ensemble(spec, dict(params), x, y, first=ref if dt == np.float64 else None)
    loss_cmp, tensors = compare_everything(noise)
    if not loss_cmp.passed:
        return result(False, "forward", None, "the loss differs before any gradient: the forward pass or the loss value is wrong")
    if all(t.passed for t in tensors):
        return result(True, "rounding")
    layer, where = localize(spec, tensors)
    failed = result(False, "bug", layer, where)
    failed.hints = _hints(spec, failed, ref, params64, x64, dt)
    return failed


def _hints(spec, result, ref, params64, x64, dt) -> dict:
    """Diagnosis hints for every failing tensor."""
    from .diagnose import hints

    others = {**ref.grads, **{f"{k}.delta": v for k, v in ref.deltas.items()}}
    masks = near_kink_masks(spec, params64, x64, ref.z, float(np.finfo(dt).eps))
    out = {}
    for t in result.failed_tensors:
        cand, reference = result.arrays[t.name]
        kink = masks[t.layer] if t.name.endswith(".delta") and t.layer is not None else None
        allowed = result.tolerance.atol * result.scale + result.tolerance.rtol * np.abs(reference)
        found = hints(t.name, cand, reference, batch=x64.shape[0], others=others, kink_mask=kink, allowed=allowed)
        if found:
            out[t.name] = found
    return out


def _kink_classification(spec, params64, x64, y64, cand, ref, tensors, tol, scale, layer, dt) -> str | None:
    """A note when every disagreement is explained by a convention at non-differentiable points."""
    masks = near_kink_masks(spec, params64, x64, ref.z, float(np.finfo(dt).eps))
    loss_kinks = spec.loss.kinks(ref.output, y64) if spec.loss.targets == "values" else None
    if cand.deltas and layer is not None and f"layers.{layer}" in cand.deltas:
        # With δ: the first divergent δ may differ from torch's only at elements on a kink.
        key = f"layers.{layer}"
        first = next(t for t in tensors if t.layer == layer)
        if first.name != f"{key}.delta" or first.passed:
            return None
        mask = masks[layer].copy()
        if layer == len(spec.layers) - 1 and loss_kinks is not None:
            mask |= loss_kinks
        if not mask.any():
            return None
        diff = np.abs(cand.deltas[key].astype(np.float64) - ref.deltas[key])
        allowed = tol.atol * scale + tol.rtol * np.abs(ref.deltas[key])
        off_kink = (diff > allowed) & ~mask
        if off_kink.any():
            return None
        n = int(((diff > allowed) & mask).sum())
        return (f"Kink convention: δ of layer {layer} differs from torch's only at {n} element(s) whose z lies on "
                f"(or within rounding of) a non-differentiable point of {spec.layers[layer].activation.name}; "
                f"torch's convention there is one valid choice, not the only one. Layers below are not judged.")
    if ref.exact_kinks == 0:
        return None
    # Without δ: recompute torch with the other one-sided derivative at every exact kink.
    flipped = run_twin(spec, params64, x64, y64, np.float64, flip_kinks=True)
    again = _compare_all(spec, cand, flipped, None, tol, scale, {})
    if all(t.passed for t in again):
        return (f"Kink convention: the gradients equal torch's once the other one-sided derivative is used at "
                f"the {ref.exact_kinks} element(s) lying exactly on a kink; that is a convention, not a bug.")
    return None


def assert_gradients_match(
    spec: Spec,
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    grads_fn: GradsFn | None = None,
    *,
    dtype: str | None = None,
    tolerance: Tolerance | None = None,
) -> CheckResult:
    """pytest-friendly: raise AssertionError with a torch.testing-style message unless the check passes."""
    result = check(spec, params, x, y, grads_fn, dtype=dtype, tolerance=tolerance)
    if not result.passed:
        raise AssertionError(result.message())
    return result
