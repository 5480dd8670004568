"""One oracle check: run a candidate backward and torch.autograd on the same network, compare, explain.

Order of work:

1. validate spec, params and data (``SpecError`` naming the field);
2. run the torch twin in float64 (the truth) and refuse a case whose forward pass overflows, before
   any candidate code runs;
3. call the candidate ``grads_fn(spec, params, x, y)`` on copies of everything (the spec included),
   and validate what it returns (``CandidateError``: wrong keys, shapes or dtypes); a candidate that
   raises or exits gets the verdict ``crash``;
4. bound the rounding error any correct implementation may make on this case (``rounding``), and
   locate the elements with more than one right answer: kinks and torch's numerical guards
   (``conventions``);
5. compare the loss, every gradient, δ and ∂C/∂x: ``match`` under the strict bound, ``rounding``
   within the rounding allowance; failing that, re-run torch's backward following the candidate's
   valid choices at kinks and guards (``kink`` / ``convention``); failing that, ``forward`` (the loss
   differs) or ``bug``, localized to the first divergent layer walking back from the loss;
6. a pass short of ``match`` by a candidate that reports δ: judge each hidden δ once more against the one its
   own δ above implies, with that step's rounding only (``steps``); a step that fails is a ``bug`` there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

import manual_bp
from manual_bp import Spec, SpecError
from manual_bp.data import check_params, check_x, check_y, dtype_of, ensure_real
from manual_bp.named import show

from . import conventions, steps
from .compare import (TOLERANCES, Scales, TensorComparison, Tolerance, as_scales, compare_loss, compare_tensor,
                      mismatch_mask, scale_of)
from .noise import measured_allowance
from .rounding import allowance
from .graph import RECURRENT, consumers, nodes
from .magnitudes import magnitudes
from .twin import run_twin, threads_for

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
    buffers: dict | None = None  # running statistics after the forward, if it reports them (not judged)
    forward: dict | None = None  # z.<node> / a.<node> it computed, if it reports them (a program run by exec:)


@dataclass
class CheckResult:
    """The verdict of one check, with everything a report needs."""

    spec: Spec
    dtype: str
    passed: bool
    classification: str              # match | rounding | kink | convention | forward | bug | crash
    tolerance: Tolerance
    scale: float                     # S (a compare.Scales: S_δ for δ, S_θ for parameter gradients)
    loss: TensorComparison | None    # None only for a crash
    tensors: list                    # TensorComparison for grads, δ, ∂C/∂x in layer order
    first_divergent_layer: int | None
    localization: str
    notes: list = field(default_factory=list)
    arrays: dict = field(default_factory=dict, repr=False)  # name -> (candidate, reference) for plots
    hints: dict = field(default_factory=dict)  # failing tensor name -> diagnosis hints (oracle.diagnose)
    crash: dict | None = None        # CandidateCrash.to_dict() when the candidate did not return
    bounds: dict = field(default_factory=dict, repr=False)  # tensor name -> rounding allowance B, when computed

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
        s = as_scales(self.scale)
        lines.append(f"Criterion: {self.tolerance.describe()}, S_δ = {s.delta:.3g}, S_θ = {s.param:.3g}")
        return "\n".join(lines)


def _as_candidate(result: Any) -> Candidate:
    if isinstance(result, tuple) and len(result) in (2, 3):
        return Candidate(result[0], result[1], result[2] if len(result) == 3 else None)
    if hasattr(result, "loss") and hasattr(result, "grads"):
        return Candidate(result.loss, result.grads, getattr(result, "deltas", None), getattr(result, "grad_input", None),
                         getattr(result, "buffers", None), getattr(result, "forward", None))
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
        names = [node.name for node in nodes(spec)]
        unknown = [k for k in c.deltas if k not in names]
        if unknown:  # a misspelled key would leave that δ unchecked without a word
            raise CandidateError(f"returned a δ under an unknown key {show(unknown[0])}",
                                 f"key each δ by its layer's name: {', '.join(names)}")
        deltas = {}
        for node in nodes(spec):  # every layer's δ, and those inside blocks (layers.1.body.0)
            key = node.name
            if key in c.deltas:
                deltas[key] = arr(f"delta {key}", c.deltas[key], (m, *node.out_shape))
    grad_input = None
    if c.grad_input is not None and not spec.token_input:  # token indices have no gradient to compare
        grad_input = arr("grad_input", c.grad_input, (m, *spec.input_shape))
    buffers = None
    if isinstance(c.buffers, Mapping):  # reported only: kept when they are arrays of the buffers' shapes
        shapes = spec.buffer_shapes()
        buffers = {k: np.asarray(v) for k, v in c.buffers.items()
                   if k in shapes and isinstance(v, np.ndarray) and v.shape == shapes[k] and v.dtype.kind == "f"}
    forward = None
    if isinstance(c.forward, Mapping) and c.forward:  # z.<node> / a.<node>: each of its node's output shape
        shapes = {f"{w}.{node.name}": (m, *node.out_shape) for node in nodes(spec) for w in ("z", "a")}
        unknown = [k for k in c.forward if k not in shapes]
        if unknown:
            raise CandidateError(f"returned a forward tensor under an unknown key {show(unknown[0])}",
                                 "name them z.<layer> or a.<layer>, e.g. z.layers.0")
        forward = {k: arr(k, v, shapes[k]) for k, v in c.forward.items()}
    return Candidate(float(loss.reshape(())), grads, deltas or None, grad_input, buffers, forward)


class _Answered:
    """A candidate whose answer is already in hand (validated): given back without calling anything again."""

    def __init__(self, answer: Candidate):
        self.answer = answer

    def __call__(self, spec, params, x, y) -> Candidate:
        return self.answer


def run_candidate(grads_fn: GradsFn, spec: Spec, params: dict, x: np.ndarray, y: np.ndarray, dtype=None) -> Candidate:
    """Call ``grads_fn`` on copies (so it cannot change our inputs) and validate its answer, computed in ``dtype``
    (default x's: token indices are integers, so a check passes the parameters' dtype)."""
    try:
        result = grads_fn(_fresh_copy(spec), {k: v.copy() for k, v in params.items()}, x.copy(), y.copy())
    except CandidateCrash:
        raise
    except (Exception, SystemExit) as err:  # the candidate is user code: any failure is a crash verdict
        raise CandidateCrash("raised" if isinstance(err, Exception) else "exit",
                             f"raised {type(err).__name__}: {err}", _user_traceback(err)) from None
    return _validated(_as_candidate(result), spec, x.shape[0], np.dtype(dtype or x.dtype))


def _fresh_copy(spec: Spec) -> Spec:
    """A copy of ``spec`` the candidate may change at will (``Spec.__deepcopy__`` leaves derived caches out)."""
    return copy.deepcopy(spec)


def _user_traceback(err: BaseException) -> str:
    """The traceback of ``err`` from the candidate's first frame on (the oracle's own frames dropped)."""
    import traceback

    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(err), err, tb))


def _largest(t: np.ndarray) -> float:
    """max |tᵢ| (0 for an empty tensor; NaN when t holds one) without building |t|."""
    return max(float(t.max()), -float(t.min())) if t.size else 0.0


def _scale(ref, dt, tol) -> Scales:
    """S_δ and S_θ, the check's gradient scales (``compare.Scales``, each through ``compare.gradient_scale``): the
    largest |element| of the reference's δ, and of its parameter gradients.

    ∂C/∂x is left out on purpose. A batch norm over a nearly constant input batch multiplies ∂C/∂x by 1/σ
    (10⁵× the δ around it is common), but the parameter gradients and δ are formed *before* that 1/σ, so their
    rounding does not grow with it: an S taken from ∂C/∂x would let atol·S·√n swamp every δ and parameter
    gradient, a dropped Bessel factor included. ∂C/∂x itself is still judged, by rtol·‖ĝ‖, atol·S and its
    own rounding allowance B. (``rates.changes_something`` takes S the same way.)"""
    return Scales.of_reference(ref.grads.values(), ref.deltas.values(), ref.loss, dt, tol)


def _compare_all(spec, cand: Candidate, ref, bounds: dict, tol: Tolerance, scale: float, arrays: dict) -> list:
    """Every tensor the candidate gave, in layer order from the loss back."""
    out = []

    def one(name, got, want, layer=None):
        out.append(compare_tensor(name, got, want, tol, scale_of(scale, name), bounds.get(name), layer=layer))
        arrays[name] = (got, want)

    for i, node in reversed(list(enumerate(nodes(spec)))):
        key = node.name
        if cand.deltas and key in cand.deltas:
            one(f"{key}.delta", cand.deltas[key], ref.deltas[key], i)
        for name in node.param_names:
            one(name, cand.grads[name], ref.grads[name], i)
    if cand.grad_input is not None and ref.grad_input is not None:
        one("input.grad", cand.grad_input, ref.grad_input)
    return out


def _refuse_overflow(spec: Spec, ref, dt: np.dtype, x=None) -> None:
    """A forward pass that leaves the dtype's range cannot be judged: say where, as bad input."""
    big = float(np.finfo(dt).max)
    for node, z, a in zip(nodes(spec), ref.z, ref.acts):
        for what, t in (("z", z), ("a", a)):
            if not _largest(t) <= big:  # NaN, ±inf, or beyond the candidate's dtype
                raise SpecError("x", f"the forward pass overflows {dt.name} at {node.label} "
                                     f"({what} of {node.activation.name} is not finite in {dt.name})",
                                "scale the inputs or weights down")
    for k, node in enumerate(nodes(spec)):  # a norm adds up squares of its centred input: N σ² must fit too
        if node.layer.type.endswith("_norm") and getattr(node.layer, "training", True):
            a = x if node.src < 0 else ref.acts[node.src]
            mag = magnitudes(node.layer, {}, a)
            if not np.all(np.isfinite(mag.s)) or float(np.max(mag.s)) ** 2 * mag._n > big:
                raise SpecError("x", f"the forward pass overflows {dt.name} inside {node.label} ({node.layer.type}: "
                                     f"the sum of squares of its centred input is beyond {dt.name}'s range)",
                                "scale the inputs or weights down")
    tensors = [t for t in [ref.grad_input] if t is not None] + [*ref.grads.values(), *ref.deltas.values(), np.float64(ref.loss)]
    if not all(_largest(np.asarray(t)) <= big for t in tensors):
        raise SpecError("x", f"the loss or its gradients overflow {dt.name} on this case",
                        "scale the inputs, weights or targets down")


def _input_step(node, k) -> str:
    """∂C/∂a that node k hands down, from its δ, written for its type (``node`` a graph node or a layer; ``k`` its
    index, or the subscript to write: "_3", "[layers.1.body.0]")."""
    layer = getattr(node, "layer", node)
    k = k if isinstance(k, str) else f"_{k}"
    if getattr(node, "is_sum", False):
        return f"δ{k} of the block's sum, unchanged, down its body and its skip path"
    kind = layer.type
    if kind.startswith("conv"):
        return f"δ{k} fully convolved with the flipped kernel θ{k}"
    if kind.startswith("max_pool"):
        return f"δ{k} routed to each window's maximum"
    if kind.startswith("avg_pool"):
        return f"δ{k} / N spread over each window"
    if kind == "flatten":
        return f"δ{k} reshaped back"
    if kind == "dropout":
        return f"δ{k} ⊙ M/(1 − p), the forward's mask and scale"
    if kind.endswith("_norm") and getattr(layer, "training", True):
        return (f"(g − mean g − x̂ ⊙ mean(g ⊙ x̂))/s with g = γ ⊙ δ{k}: the paths through x̂, the mean and the "
                f"variance of each set it normalizes")
    if kind.endswith("_norm"):
        return f"γ ⊙ δ{k} / √(running_var + ε)"
    if kind in RECURRENT:
        return (f"backprop through time from δ{k}: dh_t = δ{k}[t] + what step t + 1 hands back through W_hh, through "
                f"step t's gates, then the gate gradients times W_ih at every step")
    if kind == "attention":
        return (f"δ{k} W_out split into heads, back through O = P v, the softmax's Jacobian and S = q kᵀ/√d_h, "
                f"then [dq dk dv] W_in")
    return f"δ{k} θ{k}"


def _param_step(layer) -> str:
    """The parameter-gradient equations of a layer type."""
    if layer.type.startswith("conv"):
        return "∂C/∂θ = δ ⋆ a, δ correlated with the layer's input; ∂C/∂b = Σ δ over the batch and every position"
    if layer.type.endswith("_norm"):
        return "∂C/∂γ = Σ δ ⊙ x̂, ∂C/∂β = Σ δ, summed over everything one γ is shared across"
    if layer.type == "temporal_dense":
        return "∂C/∂θ = Σ over the batch and every step of δᵀa, ∂C/∂b = Σ δ over the batch and every step"
    if layer.type == "embedding":
        return ("∂C/∂W[v] = Σ δ over every occurrence of token v: repeated tokens accumulate, and padding_idx's row "
                "gets no gradient")
    if layer.type in RECURRENT:
        return ("∂C/∂W_ih = Σ_t dgates_tᵀ x_t, ∂C/∂W_hh = Σ_t dgates_tᵀ h_(t−1), the biases Σ_t dgates_t: every "
                "step's share summed through time")
    if layer.type == "attention":
        return "∂C/∂W_out = Σ δᵀ O, ∂C/∂W_in = Σ [dq dk dv]ᵀ x, the biases Σ over the batch and every step"
    return "∂C/∂θ = δᵀa, ∂C/∂b = Σ δ"


def localize(spec: Spec, tensors: list) -> tuple[int | None, str]:
    """Walk back from the loss: the first layer (node, ``oracle.graph``) whose δ (or, without δ, parameter
    gradient) diverges. Returns its node index (a chain's layer index) and the sentence saying so."""
    graph = nodes(spec)
    readers = consumers(spec)
    by_layer: dict = {}
    for t in tensors:
        by_layer.setdefault(t.layer, []).append(t)
    has_deltas = any(t.name.endswith(".delta") for t in tensors)
    L = len(graph)
    for i in reversed(range(L)):
        node = graph[i]
        act, me = node.activation.name, node.label
        group = by_layer.get(i, [])
        delta = next((t for t in group if t.name.endswith(".delta")), None)
        params_bad = [t.name for t in group if not t.name.endswith(".delta") and not t.passed]
        if delta is not None and not delta.passed:
            if i == L - 1:
                return i, (f"the output δ ({me}) diverges: ∇_a C of the loss ({spec.loss.name}) "
                           f"or the output activation's derivative ({act}) is wrong")
            return i, _step_back(graph, readers, i)
        if params_bad:
            if has_deltas:
                return i, (f"δ of {me} matches but {', '.join(params_bad)} "
                           f"{'does' if len(params_bad) == 1 else 'do'} not: the parameter-gradient "
                           f"step of {me} ({_param_step(node.layer)}) is wrong")
            later = "" if i == L - 1 else (f"{graph[L - 1].label} matches; " if i == L - 2 else
                                           f"layers {i + 1}..{L - 1} match; " if len(graph) == len(spec.layers)
                                           else "the layers after it match; ")
            where = (f"the output layer: check ∇_a C of {spec.loss.name} and the derivative of {act}"
                     if i == L - 1 else f"the backward step through {me} ({act}) or its parameter gradients")
            return i, f"{later}{me} is the first to diverge ({', '.join(params_bad)}): {where}"
    bad_input = [t for t in tensors if t.layer is None and not t.passed]
    if bad_input:
        steps = " + ".join(_input_step(graph[r], r) for r in readers.get(-1, []))
        return None, f"every parameter gradient matches, ∂C/∂x does not: the last step {steps} is wrong"
    return None, ""


def _sub(graph, k) -> str:
    """How an equation names node k's δ and z: its index in a chain (δ_3), its name where blocks open up
    (δ[layers.1.body.0])."""
    chain = all("." not in n.name[len("layers."):] for n in graph)
    return f"_{k}" if chain else f"[{graph[k].name}]"


def _step_back(graph, readers, i) -> str:
    """δ of node i diverges while every node reading its output matches: the step back into it is wrong."""
    node, r = graph[i], readers.get(i, [])
    act = node.activation.name
    if len(r) == 1:
        after = graph[r[0]]
        return (f"δ of {after.label} matches, δ of {node.label} diverges: the backward step through {node.label} "
                f"({act}) is wrong: ({_input_step(after, _sub(graph, r[0]))}) ⊙ g'(z{_sub(graph, i)})")
    names = " and ".join(graph[k].label for k in r)
    sums = " + ".join(f"({_input_step(graph[k], _sub(graph, k))})" for k in r)
    return (f"δ of {names} match, δ of {node.label} diverges: the backward step into {node.label} ({act}) is wrong: "
            f"it adds what each of them sends back, ({sums}) ⊙ g'(z{_sub(graph, i)}); a missing or doubled path (a residual "
            f"block's identity path) shows here")


WEAK = 0.25  # a pass where rounding alone may move a tensor by this share of its norm says little


def _weak_notes(tensors: list, arrays: dict, dt=np.dtype(np.float64), spec: Spec | None = None, bounds=None,
                tol: Tolerance | None = None) -> list[str]:
    """Where the rounding allowance is a large share of a tensor itself, a pass cannot rule out a wrong backward
    of that size: say so (ill-conditioned cases, e.g. a norm of a nearly constant batch in float32). A weight that
    stacks several matrices (an lstm's gates, attention's q, k, v) is judged block by block: a saturated softmax
    can leave dq and dk to rounding while dv, far larger, fills the tensor's norm."""
    from .diagnose import GATES

    weak = []
    graph = nodes(spec) if spec is not None else ()
    for t in tensors:
        if t.rounding_allowance is None or t.name not in arrays:
            continue
        want = np.asarray(arrays[t.name][1], dtype=np.float64)
        size = float(np.linalg.norm(want))
        if size > 0 and t.rounding_allowance > WEAK * size:
            weak.append(f"{t.name} ({t.rounding_allowance / size:.2g}×)")
            continue
        node = graph[t.layer] if t.layer is not None and t.layer < len(graph) else None
        blocks = GATES.get(node.layer.type) if node is not None and not t.name.endswith(".delta") else None
        short = t.name[len(node.name) + 1:] if node is not None else ""
        if not blocks or not short.startswith(("weight_", "bias_", "in_proj")) or bounds is None or t.name not in bounds:
            continue
        b = tol.rounding_factor * np.broadcast_to(np.asarray(bounds[t.name], dtype=np.float64), want.shape)
        for label, w, bb in zip(blocks, np.split(want, len(blocks)), np.split(b, len(blocks))):
            part = float(np.linalg.norm(w))
            if part > 0 and float(np.linalg.norm(bb)) > WEAK * part:
                weak.append(f"{t.name} rows {label.split()[0]} ({float(np.linalg.norm(bb)) / part:.2g}×)")
    if not weak:
        return []
    return [f"Weak check: rounding alone may move a correct answer by a large share of the gradient itself on "
            f"{', '.join(weak[:4])}{' and more' if len(weak) > 4 else ''}, so a wrong backward that close would "
            f"pass too. The case is ill-conditioned in {np.dtype(dt).name} (or its gradient is nearly zero); "
            f"check it {'in float64 or ' if np.dtype(dt) != np.float64 else ''}on better-scaled data."]


def _running_statistics_note(spec: Spec, got: Mapping, want: dict, tol: Tolerance) -> str:
    """Batch norm's running statistics after the forward, against torch's update: reported, not judged (they
    are state, not gradients; a wrong update shows only in a later eval-mode forward)."""
    off = []
    for name in spec.buffer_shapes():
        g = got.get(name)
        if g is None or np.shape(g) != want[name].shape:
            off.append(f"{name} missing or of the wrong shape")
        elif not np.allclose(np.asarray(g, dtype=np.float64), want[name], rtol=100 * tol.rtol, atol=100 * tol.atol):
            worst = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - want[name])))
            off.append(f"{name} (max |Δ| {worst:.3g})")
    if not off:
        return "Running statistics after the forward (not gradients, not judged): match torch's update."
    return ("Running statistics after the forward (not gradients, not judged) differ from torch's update: "
            + ", ".join(off) + ". torch moves them by momentum toward the batch mean and the unbiased variance σ²·N/(N − 1).")


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
    spec, params, x, y, dt, tol = prepare(spec, params, x, y, dtype=dtype, tolerance=tolerance)
    return judge(spec, params, x, y, grads_fn, dt, tol)


def prepare(spec: Spec, params, x, y, *, dtype: str | None = None, tolerance: Tolerance | None = None):
    """(spec, params, x, y, dtype, tolerance) of a case, validated (``SpecError`` naming the field) and cast to
    ``dtype`` when one is given: what ``judge`` takes."""
    if dtype is not None:
        dt = dtype_of(dtype)
        check_params(spec, params)  # refuses complex or object params before any cast
        x, y = (x if spec.token_input else ensure_real("x", x)), ensure_real("y", y)  # tokens: check_x says what
        params = {k: v.astype(dt) for k, v in params.items()}
        x = x if spec.token_input else x.astype(dt)
        if spec.loss.targets == "values":
            y = y.astype(dt)
    dt = check_params(spec, params)
    x, single = check_x(spec, x, dt)
    y = check_y(spec, y, x.shape[0], single, dt)
    return spec, params, x, y, dt, tolerance or TOLERANCES[dt.name]


def judge(spec: Spec, params, x, y, grads_fn: GradsFn | None, dt: np.dtype, tol: Tolerance, quick=None,
          early: bool = False) -> CheckResult:
    """Steps 2-5 of a check on a case ``prepare`` validated. ``quick`` is this case's float64 reference computed
    elsewhere (``oracle.batch``: many cases in one vmapped torch call): trusted for the overflow refusal and a strict
    match only; any other outcome recomputes the reference with ``run_twin``, so the verdict is ``check``'s.
    ``early``: stop the noise ensemble as soon as the candidate passes within the allowance measured so far (the same
    verdict and classification, a smaller B in the result, and so fewer "weak check" notes: for campaigns, which read
    only verdicts)."""
    with threads_for(spec, x.shape[0]):
        return _judge(spec, params, x, y, grads_fn, dt, tol, quick, early)


def _judge(spec: Spec, params, x, y, grads_fn, dt: np.dtype, tol: Tolerance, quick, early=False) -> CheckResult:
    grads_fn = grads_fn or manual_bp.gradients
    params64 = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x64 = x if spec.token_input else np.asarray(x, dtype=np.float64)
    y64 = y if spec.loss.targets == "classes" else np.asarray(y, dtype=np.float64)
    ref = quick if quick is not None else run_twin(spec, params64, x64, y64, np.float64)
    _refuse_overflow(spec, ref, dt, x64)
    try:
        cand = run_candidate(grads_fn, spec, dict(params), x, y, dt)
    except CandidateCrash as crash:
        return CheckResult(spec, dt.name, False, "crash", tol, 0.0, None, [], None,
                           f"the candidate did not return ({crash.kind}): {crash.message}", crash=crash.to_dict())

    scale = _scale(ref, dt, tol)
    notes: list = []
    if not np.isfinite(cand.loss) or any(not np.all(np.isfinite(g)) for g in cand.grads.values()):
        notes.append("The candidate returned NaN or Inf values.")
    if spec.buffer_shapes() and isinstance(cand.buffers, Mapping):
        notes.append(_running_statistics_note(spec, cand.buffers, ref.buffers, tol))
    arrays: dict = {}
    loss_cmp = compare_loss(cand.loss, ref.loss, tol)
    tensors = _compare_all(spec, cand, ref, {}, tol, scale, arrays)

    bounds: dict = {}

    def result(passed, kind, layer=None, where=""):
        if passed and kind != "match" and cand.deltas:  # judged within rounding: each δ also step by step
            step = next((s for s in steps.check_steps(spec, params64, x64, y64, ref, allow, special, cand, dt, tol,
                                                      scale) if not s[1].passed), None)
            if step is not None:
                return _failed_step(step)
        if passed and kind != "match":
            notes.extend(_weak_notes(tensors, arrays, dt, spec, bounds, tol))
        return CheckResult(spec, dt.name, passed, kind, tol, scale, loss_cmp, tensors, layer, where, notes, arrays,
                           bounds=bounds)

    def _failed_step(step):  # δ_i against what the candidate's own δ above implies (``steps``)
        i, t, pair, bound = step
        tensors[:] = [t if c.name == t.name else c for c in tensors]
        arrays[t.name], bounds[t.name] = pair, bound
        failed = result(False, "bug", i, "judged step by step from the candidate's own δ (the δ above it taken as "
                                         "given): " + _step_back(nodes(spec), consumers(spec), i))
        failed.hints = _hints(spec, failed, ref, special, x64, y64)
        return failed

    if loss_cmp.passed and all(t.passed for t in tensors):
        return result(True, "match")
    if quick is not None:  # judged from here on against run_twin's own reference, exactly as check does
        return _judge(spec, params, x, y, _Answered(cand), dt, tol, None, early)
    # Only now are the rounding allowance and the multi-valued elements worth computing.
    guard = conventions.find_guards(spec, ref, params, x, y, y64, dt)
    allow = allowance(spec, params64, x64, y64, ref, dt, guard=guard.mask)
    special = conventions.find(spec, ref, allow, y64, guard)
    losses = {"torch": ref.loss, **{k: v for k, v in special.guard_losses.items() if np.isfinite(v)}}
    mixed = conventions.mixed_loss(special, ref.loss, float(cand.loss)) if np.isfinite(cand.loss) else None
    if mixed is not None:  # each guard element's term following its own convention
        losses["mixed conventions"] = mixed

    def passes(b) -> bool:  # the verdict below, for an ensemble cut short (``early``)
        return (any(compare_loss(cand.loss, v, tol, b["loss"]).passed for v in losses.values())
                and all(t.passed for t in _compare_all(spec, cand, ref, b, tol, scale, {})))

    # B: torch's rounding noise measured on this case with kinks held fixed, capped by the worst case
    bounds = measured_allowance(spec, params64, x64, y64, ref, allow, dt, enough=passes if early else None)
    # the loss: within the strict bound or within f·B_C, the larger (compare_loss: B_C is a complete bound)
    loss_cmp = min((compare_loss(cand.loss, v, tol, bounds["loss"]) for v in losses.values()),
                   key=lambda t: (not t.passed, t.normwise_err))
    arrays.clear()
    tensors = _compare_all(spec, cand, ref, bounds, tol, scale, arrays)
    if loss_cmp.passed and all(t.passed for t in tensors):
        return result(True, "match" if all(t.verdict == "match" for t in [loss_cmp, *tensors]) else "rounding")
    tied = any(t is not None for t in allow.ties or [])
    run_in_dtype = run_twin(spec, params64, x64, y64, dt) if tied and dt != np.float64 else None
    routings = conventions.routings(spec, allow, dt, run_in_dtype)
    if routings and cand.deltas:  # the candidate's δ shows its routing window by window: try that first, read
        # starting from the first contender, from torch's own picks and from its picks in the candidate's dtype
        # (where windows overlap, the descent can stop at a routing that is not the candidate's)
        starts = [None, conventions.torch_picks(spec, allow, ref)] + [
            r for label, r in routings if label.startswith("maximum that torch picks")]
        for start in reversed(starts):
            read = conventions.routes_from_deltas(spec, ref, allow, cand.deltas, start)
            if read:
                routings.insert(0, ("tied element (or split) its own δ shows, window by window", read))
    if special.any or routings:  # follow the candidate's valid choices at kinks, guards and ties; judge all again
        # with every δ, the candidate's choices are read from it; with some or none, each consistent choice is
        # also tried on the layers whose δ is missing
        every_delta = bool(cand.deltas) and all(node.name in cand.deltas for node in nodes(spec))
        tries = ([None] if every_delta else [None] * bool(cand.deltas) + conventions.choices(special)) if special.any else []
        best = None
        for label, routes in [(None, None), *routings]:
            for choice in ([None, *tries] if routes is not None else tries):
                adopter = conventions.Adopter(spec, ref, special, cand.deltas, choice or {}) if special.any else None
                again = run_twin(spec, params64, x64, y64, np.float64, adopt=adopter, routes=routes)
                if routes is None and not adopter.taken:
                    continue
                # the re-run's own magnitudes bound its rounding (a guarded δ may be far larger than torch's), and
                # the noise is measured around it, following the same choices (kinks, ties, a guard's alternative
                # evaluated at each run's own logits): never the looser worst case alone
                allow2 = allowance(spec, params64, x64, y64, again, dt, guard=guard.mask, alternatives=guard.deltas,
                                   routes=routes)
                follow = conventions.Adopter(spec, ref, special, cand.deltas, choice or {}) if special.any else None
                bounds2 = measured_allowance(spec, params64, x64, y64, again, allow2, dt, adopt=follow, routes=routes)
                arrays2: dict = {}
                t2 = _compare_all(spec, cand, again, bounds2, tol, scale, arrays2)
                failing = sum(not t.passed for t in t2)
                if best is None or failing < best[0]:
                    best = (failing, t2, arrays2, adopter, bounds2, label, routes)
                if failing == 0 and loss_cmp.passed:
                    break
            if best is not None and best[0] == 0 and loss_cmp.passed:
                break
        failing, t2, arrays2, adopter, bounds2, label, routes = (
            best if best is not None else (len(tensors), tensors, arrays, None, bounds, None, None))
        taken = adopter.taken if adopter is not None else {}
        if failing == 0 and loss_cmp.passed and (taken or routes is not None):
            layer, _ = localize(spec, tensors)  # where the candidate's choice first departs from torch's
            where = ("the candidate's valid choice first departs from torch's at the output" if layer is None else
                     f"the candidate's valid choice first departs from torch's at layer {layer}")
            tensors[:], arrays, bounds = t2, arrays2, bounds2
            notes.extend(conventions.notes(spec, taken))
            if routes is not None:
                notes.append(conventions.routing_note(spec, label, routes))
            kind = "convention" if any(cat == "guard" for _, cat, _ in taken) else "kink"
            return result(True, kind, layer, where)
        if cand.deltas or failing < sum(not t.passed for t in tensors):
            tensors[:], arrays, bounds = t2, arrays2, bounds2  # localize against the re-run following the candidate
    if not loss_cmp.passed:
        layer, where = _forward_divergence(spec, cand, ref, allow, tol)
        return result(False, "forward", layer,
                      where or "the loss differs before any gradient: the forward pass or the loss value is wrong")
    if all(t.passed for t in tensors):
        return result(True, "rounding")
    layer, where = localize(spec, tensors)
    where += _through_time(spec, layer, arrays, bounds, tol, scale)
    failed = result(False, "bug", layer, where)
    failed.arrays = arrays
    failed.hints = _hints(spec, failed, ref, special, x64, y64)
    return failed


def _forward_divergence(spec: Spec, cand: Candidate, ref, allow, tol) -> tuple[int | None, str]:
    """Where the candidate's own forward (z.<node>, a.<node>, when it reports them) first leaves torch's, walking
    from the input: each tensor judged as a gradient is, its scale S its own largest element, its rounding
    allowance the first-order E_z and E_a (``oracle.rounding``)."""
    for i, node in enumerate(nodes(spec)):
        for what, want, bound in (("z", ref.z[i], allow.z_error[i]), ("a", ref.acts[i], allow.act_error[i])):
            got = (cand.forward or {}).get(f"{what}.{node.name}")
            if got is None:
                continue
            top = float(np.max(np.abs(want))) if np.size(want) else 0.0
            t = compare_tensor(f"{what}.{node.name}", got, want, tol, top if top > 0 else 1.0, bound, i)
            if not t.passed:
                step = ("its layer's map" if what == "z" else f"its activation ({node.activation.name})")
                return i, (f"FORWARD: {what} of {node.label} is the first forward tensor to differ (worst at "
                           f"{list(t.worst_index)}: {t.worst_candidate:.6g} vs torch's {t.worst_reference:.6g}); "
                           f"everything before it matches: {step} computes it wrong")
    return None, ""


def _input_gradient_name(spec: Spec, k: int) -> str:
    """The compared tensor that holds ∂C/∂(node k's input): the δ of the node it reads, or ∂C/∂x."""
    src = nodes(spec)[k].src
    return "input.grad" if src < 0 else f"{nodes(spec)[src].name}.delta"


def _through_time(spec: Spec, k, arrays: dict, bounds: dict, tol, scale) -> str:
    """For a recurrent layer found first to diverge: at which step, counted back from the last, the gradient it
    hands its input first diverges (read from that tensor, when the candidate gave it)."""
    from .diagnose import step_hint

    if k is None or nodes(spec)[k].layer.type not in RECURRENT:
        return ""
    name = _input_gradient_name(spec, k)
    if name not in arrays:  # the candidate gave no δ (an embedding's token input has no gradient at all)
        return "" if name == "input.grad" else " (give δ to see at which step its backward first diverges)"
    got, want = arrays[name]
    found = step_hint(mismatch_mask(got, want, tol, scale_of(scale, name), bounds.get(name)), got, want)
    return f"; through time: {'; '.join(found)}" if found else ""


def _hints(spec, result, ref, special, x64, y64=None) -> dict:
    """Diagnosis hints for every failing tensor."""
    from .diagnose import hints

    others = {**ref.grads, **{f"{k}.delta": v for k, v in ref.deltas.items()}}
    out = {}
    for t in result.failed_tensors:
        cand, reference = result.arrays[t.name]
        kink = special.kink[t.layer] if t.name.endswith(".delta") and t.layer is not None else None
        allowed = result.tolerance.atol * scale_of(result.scale, t.name) + result.tolerance.rtol * np.abs(reference)
        found = hints(t.name, cand, reference, batch=x64.shape[0], others=others, kink_mask=kink, allowed=allowed,
                      factors=_net_factors(spec))
        found += _sequence_hints(spec, t, cand, reference, result, y64)
        if found:
            out[t.name] = found
    return out


def _sequence_hints(spec, t, cand, reference, result, y) -> list[str]:
    """The sequence patterns of a failing tensor: which gates' rows of a recurrent weight (q/k/v of attention's
    in_proj) hold the error; where in time the gradient a recurrent layer hands down diverges; an error confined
    to the steps a class loss ignores (targets −100)."""
    from .diagnose import GATES, gate_hint, step_hint

    graph = nodes(spec)
    bad = mismatch_mask(cand, reference, result.tolerance, scale_of(result.scale, t.name), (result.bounds or {}).get(t.name))
    out = []
    if t.layer is not None and not t.name.endswith(".delta"):
        node = graph[t.layer]
        if node.layer.type in GATES and t.name[len(node.name) + 1:].startswith(("weight_", "bias_", "in_proj")):
            out += gate_hint(node.layer.type, bad)
        return out
    src = -1 if t.name == "input.grad" else t.layer
    if any(graph[r].layer.type in RECURRENT for r in consumers(spec).get(src, [])):
        out += step_hint(bad, cand, reference)
    if (y is not None and spec.loss.targets == "classes" and np.ndim(y) == 2 and t.layer == len(graph) - 1
            and np.shape(bad)[:2] == np.shape(y) and bad.any()):
        ignored = np.asarray(y) == -100
        steps = bad.reshape(bad.shape[0], bad.shape[1], -1).any(axis=-1)
        if ignored.any() and not (steps & ~ignored).any():
            out.append("the error is confined to the masked steps (targets −100, which the loss ignores): "
                       "they must get no gradient")
    return out


def _net_factors(spec) -> list:
    """Ratios this network's own layers make likely: an average pool's window size N (a missing or a
    spurious 1/N)."""
    out = []
    for node in nodes(spec):
        layer = node.layer
        if layer.type.startswith("avg_pool"):
            n = float(np.prod(layer.kernel_size))
            out += [(n, f"a missing 1/N in the backward of avg pool {node.label} (N = {n:g}, its window size)"),
                    (1 / n, f"a spurious 1/N in the backward of avg pool {node.label} (N = {n:g}, its window size)")]
    return out


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
