r"""Golden reference cases for ports in any language (``bp-oracle golden``), and their verification without
running torch (``bp-oracle verify``). The layout of one case is ``oracle.caseio``'s; the schema is written out in
``docs/case-layout.md``.

A golden set is a folder::

    DIR/manifest.json          schema "bp-oracle/golden" 1: versions, the rule, every case with its shapes and
                               the sha256 of each of its files
    DIR/<case>/case.json       the spec, the dtype, the tolerance and the scale S, the loss's reduction, the
                               parameters' layouts, and per compared tensor its scale and normwise bound
    DIR/<case>/inputs.*        x, y, the parameters and buffers, dropout masks (case's dtype)
    DIR/<case>/expected.*      torch's float64 answer on the case's own (dtype-rounded) values
    DIR/<case>/allowance.*     B per element of every compared tensor (the case's dtype)

A case ``<name>-float32`` holds float32 inputs and float64 expected values: torch in float64 on the float32
values, the truth a float32 port is judged against, with the float32 tolerance. A tensor g of a port passes when

    ‖g − ĝ‖ ≤ rtol·‖ĝ‖ + atol·S·√n,  or every |gᵢ − ĝᵢ| ≤ atol·S + rtol·|ĝᵢ| + rounding_factor·Bᵢ

(``oracle.compare``). B is the rounding allowance the checker computes for the case (``oracle.rounding``, measured
by ``oracle.noise``), plus, where an element has more than one right answer (z within rounding of a kink of its
activation, a max pool's window tied within rounding, torch's bce guard, l1 at a zero residual), how far taking the
other answer there moves every tensor, divided by rounding_factor: the checker follows a candidate's valid choice by
re-running torch (``oracle.conventions``); a golden file cannot, so it allows each choice's effect instead, the
effects of single elements added up (to first order they add). The forward tensors z and a are judged by the same
rule with S the largest |element| of that tensor and B the first-order bound on its rounding (``allowance``'s E_z,
and E_a from it).

``verify`` reads a port's ``outputs.safetensors`` (or ``.npz``) per case from a results folder of the same names,
checks every golden file's sha256 against the manifest first (a changed file is bad input, exit 2), and judges each
case as ``check`` does: the loss, every parameter gradient, ∂C/∂x and whatever δ the port gave, localized with
``checker.localize``; when the port wrote forward intermediates z.*/a.*, those first, so a forward bug is named
layer by layer. torch is imported (the oracle's modules import it) but never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

import manual_bp as bp
from manual_bp import Spec, SpecError

from . import caseio
from .compare import TOLERANCES, Scales, Tolerance, compare_loss, compare_tensor, scale_of
from .graph import RECURRENT, nodes

SCHEMA = "bp-oracle/golden"
SCHEMA_VERSION = 1
VERIFY_SCHEMA = "bp-oracle/verify"
VERIFY_SCHEMA_VERSION = 1
RULE = ("‖g − ĝ‖ ≤ rtol·‖ĝ‖ + atol·S·√n, or every |gᵢ − ĝᵢ| ≤ atol·S + rtol·|ĝᵢ| + rounding_factor·Bᵢ "
        "(ĝ the expected float64 value, n the tensor's size, S the case's scale, B the allowance); the loss: "
        "|C − Ĉ| ≤ max((rtol + atol)·|Ĉ|, rounding_factor·B_C)")
#: the golden files of a case, each hashed in the manifest
CASE_FILES = ("case.json", "inputs.safetensors", "inputs.npz", "expected.safetensors", "expected.npz",
              "allowance.safetensors", "allowance.npz")
#: single elements with two right answers whose effect is measured one by one; beyond, in groups
MAX_FLIPS = 96
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

LOSS_REDUCTIONS = {
    "half_sse": "C = ½ Σ_i Σ_j (ỹ_ij − y_ij)²: summed over examples and outputs, no mean",
    "sse": "C = Σ_i Σ_j (y_ij − ỹ_ij)²: summed, no ½, no mean",
    "half_mse": "C = (1/2m) Σ_i Σ_j (ỹ_ij − y_ij)²: m the number of examples (rows)",
    "mse": "C = (1/N) Σ (ỹ − y)², N = m·n_out (torch's default mean)",
    "l1": "C = (1/N) Σ |ỹ − y|, N = m·n_out",
    "huber": "C = (1/N) Σ h_δ(ỹ − y) (torch HuberLoss, mean), N = m·n_out",
    "smooth_l1": "C = (1/N) Σ s_β(ỹ − y) (torch SmoothL1Loss, mean), N = m·n_out",
    "bce": "C = −(1/N) Σ y log ỹ + (1 − y) log(1 − ỹ), each log clamped at ≥ −100 (torch), N = m·n_out",
    "bce_with_logits": "C = mean over N = m·n_out of bce on σ(ỹ), computed stably from the logits ỹ",
    "cross_entropy": "C = (1/m') Σ_i (log Σ_j e^ỹ_ij − ỹ_i,y_i) on logits; rows with target −100 are ignored and m' "
                     "counts the rows kept",
    "nll": "C = −(1/m') Σ_i ỹ_i,y_i on log-probabilities; rows with target −100 are ignored, m' the rows kept",
}
GATE_ORDER = {"rnn": "one block (h = tanh or relu of W_ih x + b_ih + W_hh h + b_hh)",
              "lstm": "4 blocks of H rows in torch's order i, f, g, o (input, forget, cell candidate, output)",
              "gru": "3 blocks of H rows in torch's order r, z, n (reset, update, candidate)"}


# -- what a golden case holds ---------------------------------------------------------------------------------------
def _param_layout(layer, short: str, shape) -> str:
    """The layout of one parameter in words."""
    kind, dims = layer.type, tuple(shape)
    if kind in ("dense", "temporal_dense"):
        at = " at every step (shared over time)" if kind == "temporal_dense" else ""
        return ("(out, in), like torch.nn.Linear: z = a·Wᵀ + b" + at) if short == "weight" else "(out,)"
    if kind.startswith("conv"):
        if short == "weight":
            return ("(out, in/groups, kH, kW), like torch.nn.Conv2d; a cross-correlation (no kernel flip)"
                    if kind == "conv2d" else "(out, in/groups, k), like torch.nn.Conv1d; a cross-correlation")
        return "(out,), one per output channel"
    if kind in RECURRENT:
        if short.startswith("weight_ih"):
            return f"(G·H, n): {GATE_ORDER[kind]}"
        if short.startswith("weight_hh"):
            return f"(G·H, H): {GATE_ORDER[kind]}"
        if short.startswith("bias_"):
            return f"(G·H,): {GATE_ORDER[kind]}; torch adds both b_ih and b_hh"
        return "(H,): the learned initial state, the same for every example"
    if kind == "attention":
        return {"in_proj_weight": "(3d, d): rows [W_q; W_k; W_v] stacked (torch.nn.MultiheadAttention), q = x W_qᵀ",
                "in_proj_bias": "(3d,): [b_q; b_k; b_v]",
                "out_proj.weight": "(d, d): out = O W_outᵀ + b_out, O the heads concatenated",
                "out_proj.bias": "(d,)"}.get(short, str(dims))
    if kind == "embedding":
        return "(num_embeddings, embedding_dim): row v is token v's vector"
    if kind.endswith("_norm"):
        if short in ("running_mean", "running_var"):
            return "(C,): a buffer (running statistics), no gradient"
        if short == "num_batches_tracked":
            return "(): a buffer, not used"
        return "γ (weight) or β (bias), the shape of what one γ scales"
    return str(dims)


def layouts(spec: Spec) -> dict:
    """``{parameter name: layout in words}`` for every parameter and buffer of the spec."""
    out = {}
    shapes = spec.state_shapes()
    for node in nodes(spec):
        if node.is_sum:
            continue
        prefix = node.name + "."
        for name, shape in shapes.items():
            if name.startswith(prefix) and "." not in name[len(prefix):].replace("out_proj.", ""):
                out[name] = _param_layout(node.layer, name[len(prefix):], shape)
    return {k: out.get(k, str(tuple(v))) for k, v in shapes.items()}


def _compared(ref) -> dict:
    """torch's compared tensors under the checker's names (loss left out)."""
    out = dict(ref.grads)
    out.update({f"{k}.delta": v for k, v in ref.deltas.items()})
    if ref.grad_input is not None:
        out["input.grad"] = ref.grad_input
    return out


class _Flip:
    """``run_twin(adopt=...)``: at node ``i``, elements ``flat`` take the other one-sided slope."""

    def __init__(self, i: int, flat, slope):
        self.i, self.flat, self.slope = i, np.asarray(flat), slope

    def __call__(self, i, up, g):
        if i != self.i:
            return g
        import torch

        new = g.detach().clone().reshape(-1)
        idx = torch.from_numpy(self.flat)
        new[idx] = up.reshape(-1)[idx] * torch.from_numpy(np.asarray(self.slope, dtype=np.float64))
        return new.reshape(g.shape)


def _choice_effects(spec, p64, x64, y64, ref, allow, special, guard, dt) -> tuple[dict, dict]:
    """How far the valid choices at multi-valued elements move every compared tensor (the loss included):
    ``({name: Σ |effect|}, counts)``. One element (or tied window routing, guard convention) at a time against
    torch's own run; single elements' effects add (first order)."""
    from . import conventions
    from .rounding import derivatives
    from .twin import run_twin

    base = _compared(ref)
    total = {k: np.zeros(np.shape(v)) for k, v in base.items()}
    loss_total = [0.0]
    counts = {"kink_elements": 0, "loss_kink_elements": 0, "guard_elements": 0, "tie_routings": 0}
    graph = nodes(spec)

    def effect(run) -> dict:
        got = _compared(run)
        with np.errstate(invalid="ignore", over="ignore"):
            return {k: np.nan_to_num(np.abs(got[k] - base[k]), nan=np.inf) for k in base}

    def add(*runs, loss_alternatives=()):
        """Add the largest effect among alternatives of one element (or one group)."""
        best = None
        for run in runs:
            e = effect(run)
            best = e if best is None else {k: np.maximum(best[k], e[k]) for k in e}
        if best is not None:
            for k in total:
                total[k] = total[k] + best[k]
        if loss_alternatives:
            loss_total[0] += max(abs(v - ref.loss) for v in loss_alternatives)

    # activations within rounding of a kink: the other one-sided slope, element by element
    flips = []
    for i, mask in enumerate(special.kink):
        if mask is None or not mask.any():
            continue
        z, points = ref.z[i], special.kink_points[i]
        d1 = derivatives(graph[i].activation, z)[0]
        nearest = np.argmin([np.abs(z - k) for k, _, _ in points], axis=0)
        other = np.zeros(z.shape)
        for j, (_, left, right) in enumerate(points):
            took_left = np.abs(d1 - left) <= np.abs(d1 - right)
            other = np.where(nearest == j, np.where(took_left, right, left), other)
        for flat in np.flatnonzero(mask):
            flips.append((i, flat, other.reshape(-1)[flat]))
    counts["kink_elements"] = len(flips)
    size = -(-len(flips) // MAX_FLIPS) if flips else 1  # beyond MAX_FLIPS elements, flipped in groups
    groups = [flips[k:k + size] for k in range(0, len(flips), size)]
    for group in groups:
        by_node: dict = {}
        for i, flat, slope in group:
            by_node.setdefault(i, ([], []))
            by_node[i][0].append(flat)
            by_node[i][1].append(slope)
        for i, (flat, slope) in by_node.items():
            add(run_twin(spec, p64, x64, y64, np.float64, adopt=_Flip(i, np.array(flat, dtype=np.int64), slope)))

    empty = [np.zeros(np.shape(m), dtype=bool) if m is not None else m for m in special.kink]
    # l1 at a zero residual: sign(0) = +1, −1 or 0, element by element
    if special.loss_kink is not None and special.loss_kink.any():
        counts["loss_kink_elements"] = int(special.loss_kink.sum())
        at = np.flatnonzero(special.loss_kink)
        for chunk in np.array_split(at, min(len(at), MAX_FLIPS)):
            one = np.zeros(special.loss_kink.shape, dtype=bool)
            one.reshape(-1)[chunk] = True
            sp = conventions.Special(empty, special.kink_points, one, None)
            add(*[run_twin(spec, p64, x64, y64, np.float64, adopt=conventions.Adopter(spec, ref, sp, None, {"loss": lab}))
                  for lab in ("+", "-", "0")])
    # torch's bce guard: the exact δ, or torch's float32 value, on the guarded elements
    if special.guard is not None and special.guard.any() and special.guard_deltas:
        counts["guard_elements"] = int(special.guard.sum())
        sp = conventions.Special(empty, special.kink_points, None, special.guard, special.guard_deltas,
                                 special.guard_losses)
        add(*[run_twin(spec, p64, x64, y64, np.float64, adopt=conventions.Adopter(spec, ref, sp, None, {"guard": lab}))
              for lab in special.guard_deltas],
            loss_alternatives=[v for v in special.guard_losses.values() if np.isfinite(v)])
    # max pools whose windows tie within rounding: each routing the checker would try
    tied = any(t is not None for t in allow.ties or [])
    if tied:
        in_dtype = run_twin(spec, p64, x64, y64, dt) if dt != np.float64 else None
        routings = conventions.routings(spec, allow, dt, in_dtype)
        counts["tie_routings"] = len(routings)
        if routings:
            add(*[run_twin(spec, p64, x64, y64, np.float64, routes=routes) for _, routes in routings])
    out = dict(total)
    out["loss"] = np.array(loss_total[0])
    return out, counts


def _forward_bounds(spec, ref, allow, dt) -> dict:
    """How far a correct implementation in ``dt`` may compute each z and a from torch's: the allowance's E_z and
    E_a (``oracle.rounding``), keyed z.<node>, a.<node>."""
    out = {}
    for i, node in enumerate(nodes(spec)):
        out[f"z.{node.name}"] = np.broadcast_to(np.asarray(allow.z_error[i], dtype=np.float64), ref.z[i].shape).copy()
        out[f"a.{node.name}"] = np.array(allow.act_error[i], dtype=np.float64)
    return out


@dataclass
class GoldenCase:
    expected: dict     # layout name -> float64 array
    allowance: dict    # layout name -> float64 array (B)
    meta: dict         # case.json's extra fields


def reference_case(spec: Spec, params: dict, x, y, dtype) -> GoldenCase:
    """torch's float64 answer on the case's own values, and the allowance of a port computing in ``dtype``, as
    ``checker.check`` computes them. A forward pass that overflows ``dtype`` is a ``SpecError``."""
    from . import conventions
    from .checker import _refuse_overflow, _scale
    from .noise import measured_allowance
    from .rounding import allowance
    from .twin import run_twin
    from manual_bp.data import check_params, check_x, check_y

    dt = check_params(spec, params)
    if dt != np.dtype(dtype):
        raise SpecError("dtype", f"the parameters are {dt.name}, not {np.dtype(dtype).name}", "cast them first")
    x, single = check_x(spec, x, dt)
    y = check_y(spec, y, x.shape[0], single, dt)
    tol = TOLERANCES[dt.name]
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    x64 = x if spec.token_input else x.astype(np.float64)
    y64 = y if spec.loss.targets == "classes" else y.astype(np.float64)
    ref = run_twin(spec, p64, x64, y64, np.float64)
    _refuse_overflow(spec, ref, dt, x64)
    scale = _scale(ref, dt, tol)
    guard = conventions.find_guards(spec, ref, params, x, y, y64, dt)
    allow = allowance(spec, p64, x64, y64, ref, dt, guard=guard.mask)
    special = conventions.find(spec, ref, allow, y64, guard)
    bounds = measured_allowance(spec, p64, x64, y64, ref, allow, dt)
    extra, counts = _choice_effects(spec, p64, x64, y64, ref, allow, special, guard, dt)
    f = tol.rounding_factor
    bounds = {k: np.asarray(v, dtype=np.float64) + np.asarray(extra.get(k, 0.0)) / f for k, v in bounds.items()}

    expected = caseio.expected_tensors(spec, ref)
    expected = {k: np.asarray(v, dtype=np.float64) for k, v in expected.items()}
    allowance_t = {caseio.comparison_key(k): np.broadcast_to(v, np.shape(expected[caseio.comparison_key(k)])).copy()
                   for k, v in bounds.items() if caseio.comparison_key(k) in expected}
    allowance_t.update(_forward_bounds(spec, ref, allow, dt))

    loss_scale = abs(ref.loss) or 1.0
    compare = {}
    for key, want in expected.items():
        if key == "loss":
            s = loss_scale
        elif key.startswith(("z.", "a.")):
            s = _forward_scale(want)
        else:
            s = scale_of(scale, key)
        n = int(np.size(want))
        compare[key] = {"scale": s, "n": n,
                        "allowed_normwise": tol.rtol * float(np.linalg.norm(want)) + tol.atol * s * float(np.sqrt(n)),
                        "max_allowance": float(np.max(allowance_t[key])) if np.size(allowance_t[key]) else 0.0}
    meta = {
        "describe": spec.describe(),
        "tolerance": {"rtol": tol.rtol, "atol": tol.atol, "rounding_factor": tol.rounding_factor, "scale_S": float(scale),
                      "loss_scale": loss_scale, "criterion": tol.describe(), "rule": RULE},
        "loss": {"name": spec.loss.name, "reduction": LOSS_REDUCTIONS.get(spec.loss.name, spec.loss.name),
                 "rows": ("a per-step output (m, T, k) is judged as m·T rows" if len(spec.output_shape) > 1
                          else "one row per example")},
        "layouts": layouts(spec),
        "conventions": counts,
        "expected": caseio.describe_tensors(expected),
        "allowance": caseio.describe_tensors(allowance_t),
        "compare": compare,
    }
    return GoldenCase(expected, allowance_t, meta)


def _forward_scale(t) -> float:
    """S of a forward tensor: its largest |element| (never 0)."""
    top = float(np.max(np.abs(t))) if np.size(t) else 0.0
    return top if top > 0 and np.isfinite(top) else 1.0


# -- where cases come from ------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One network to export, with how to draw its case in a dtype."""

    name: str
    spec: Spec
    origin: dict
    draw: Callable  # (dtype, attempt) -> (params, x, y, what to add to the source's description)


def example_sources(names, seed: int, batch: int) -> list[Source]:
    out = []
    for name in names:
        spec = bp.example(name)
        out.append(_seeded(name, spec, {"kind": "example", "example": name}, seed, batch))
    return out


def spec_sources(paths, seed: int, batch: int) -> list[Source]:
    from .report import slug

    out = []
    for path in paths:
        spec = bp.load_spec(path)
        out.append(_seeded(slug(spec.name or Path(path).stem, 80), spec, {"kind": "spec", "file": str(path)}, seed, batch))
    return out


def _seeded(name, spec, origin, seed, batch) -> Source:
    from .strategies import fit_batch

    m = fit_batch(spec, batch)

    def draw(dtype, attempt=0):
        params, x, y = bp.random_case(spec, seed, batch=m, dtype=dtype)
        return params, x, y, {"seed": seed, "batch": m, "drawn_by": "manual_bp.random_case(spec, seed, batch, dtype)"}

    return Source(name, spec, {**origin}, draw)


RANDOM_KINDS = ("sequence", "cnn", "norm", "dense", "residual", "tokens", "per_step")
SKIP = 2


def _kind_strategy(kind: str):
    from . import strategies as s

    return {"dense": s.specs, "cnn": s.cnn_specs, "norm": s.with_norms, "residual": s.with_residuals,
            "tokens": s.embedding_specs, "sequence": s.sequence_model_specs, "per_step": s.per_step_specs}[kind]()


def random_sources(n: int, seed: int, batch: int | None = None, regime: str = "well_conditioned") -> list[Source]:
    """``n`` random architectures, every layer type in turn (sequence, conv/pool, norm/dropout, dense, residual,
    token and per-step nets), each drawn by Hypothesis from a seed stable across processes; weights and data by
    ``strategies.draw_params``/``draw_data`` in ``regime``, from a data seed drawn with the spec."""
    from .rates import draw_specs, stable_seed
    from .strategies import fit_batch

    per_kind = {k: (n - i + len(RANDOM_KINDS) - 1) // len(RANDOM_KINDS) for i, k in enumerate(RANDOM_KINDS)}
    drawn = {}
    for k, c in per_kind.items():
        if c:  # Hypothesis's first draws are the simplest (1 -> 1 identity) and each next one is often a variation
            pool = draw_specs(_kind_strategy(k), SKIP + 2 * c, stable_seed(seed, "golden", k))  # of the last: skip
            drawn[k] = (pool[SKIP::2] + pool[SKIP + 1::2] + pool[:SKIP])[:c]              # those, take every other
    out = []
    for i in range(n):
        kind = RANDOM_KINDS[i % len(RANDOM_KINDS)]
        spec, m, data_seed = drawn[kind][i // len(RANDOM_KINDS)]
        m = fit_batch(spec, batch) if batch else m
        out.append(_random_source(i, kind, spec, m, data_seed, seed, regime))
    return out


def _random_source(i, kind, spec, m, data_seed, seed, regime) -> Source:
    from .rates import build_case, stable_seed

    def draw(dtype, attempt=0):
        s = data_seed if attempt == 0 else stable_seed(data_seed, "again", attempt)
        params, x, y = build_case(spec, regime, dtype, m, s)
        return params, x, y, {"batch": m, "data_seed": s, "regime": regime,
                              "drawn_by": "oracle.rates.build_case(spec, regime, dtype, batch, data_seed)"}

    return Source(f"random-{i:04d}", spec, {"kind": "random", "family": kind, "index": i, "seed": seed}, draw)


# -- writing a golden set -------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    import importlib.metadata
    import platform

    import torch

    try:
        ours = importlib.metadata.version("bp-oracle")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {"bp-oracle": ours, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _unique(names: list) -> list:
    """The names, a repeat suffixed -2, -3, ... (never colliding with another name)."""
    taken, out = set(names), []
    for n in names:
        name, k = n, 1
        while name in out or (name != n and name in taken):
            k += 1
            name = f"{n}-{k}"
        out.append(name)
    return out


def _prepare_out(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SpecError("--out", f"{out} exists and is not a folder", "give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SpecError("--out", f"{out} exists and is not empty", "give a new or empty folder, or --force to replace it")
        try:
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            raise SpecError("--out", f"{out} is not a golden set (no bp-oracle manifest.json in it), so --force "
                                     "will not replace it", "give a new or empty folder")


def export(out, sources: list, dtypes=("float64", "float32"), *, force: bool = False, command: str = "",
           progress: Callable | None = None) -> dict:
    """Write the golden set of ``sources`` × ``dtypes`` to ``out`` (built beside it, renamed into place at the
    end: a run that fails or is interrupted leaves nothing half-written). Returns the manifest."""
    out = Path(out)
    _prepare_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.golden-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        names = _unique([s.name for s in sources])
        cases = []
        for src, name in zip(sources, names):
            for dtype in dtypes:
                case_name = f"{name}-{dtype}"
                cases.append(_write_one(tmp / case_name, case_name, src, dtype))
                if progress:
                    progress(case_name)
        manifest = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "case_schema": caseio.SCHEMA, "case_schema_version": caseio.SCHEMA_VERSION,
            "versions": versions(), "command": command, "rule": RULE,
            "tolerances": {k: {"rtol": v.rtol, "atol": v.atol, "rounding_factor": v.rounding_factor}
                           for k, v in TOLERANCES.items()},
            "outputs": ("a port writes RESULTS/<case>/outputs.safetensors (or .npz): loss (0-d), grad.<parameter> for "
                        "every parameter, input.grad (unless the input is tokens), optionally delta.<node>, z.<node>, "
                        "a.<node>; then bp-oracle verify GOLDEN RESULTS"),
            "cases": cases,
        }
        _write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        os.replace(tmp, out)  # over an empty folder
        return
    old = out.parent / f".{out.name}.golden-old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_one(folder: Path, name: str, src: Source, dtype: str) -> dict:
    attempts = 8 if src.origin.get("kind") == "random" else 1  # a random draw that overflows is drawn again
    for attempt in range(attempts):
        params, x, y, how = src.draw(dtype, attempt)
        try:
            case = reference_case(src.spec, params, x, y, dtype)
            break
        except SpecError as err:
            if attempt == attempts - 1:
                raise SpecError(f"{name}: {err.field}", err.problem, err.fix) from None
    source = {**src.origin, **how}
    caseio.write_case(folder, src.spec, params, x, y, dtype, name=name,
                      extra={"source": source, **case.meta})
    caseio.write_tensors(folder, "expected", case.expected)
    caseio.write_tensors(folder, "allowance", case.allowance)
    files = {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in CASE_FILES}
    inputs = caseio.describe_tensors(caseio.input_tensors(src.spec, params, x, y))
    return {"name": name, "dtype": np.dtype(dtype).name, "spec_name": src.spec.name, "describe": src.spec.describe(),
            "source": source, "batch": int(np.shape(x)[0]),
            "tensors": {"inputs": inputs, "expected": case.meta["expected"], "allowance": case.meta["allowance"]},
            "files": files}


# -- a port's answer ------------------------------------------------------------------------------------------------
def answer_tensors(loss, grads: dict, deltas: dict | None = None, grad_input=None, forward: dict | None = None) -> dict:
    """A port's answer under the layout's names (``outputs``): loss, grad.<param>, delta.<node>, input.grad and
    any z.<node>/a.<node> given in ``forward``."""
    out = {"loss": np.asarray(loss).reshape(())}
    out.update({f"grad.{k}": np.asarray(v) for k, v in grads.items()})
    out.update({f"delta.{k}": np.asarray(v) for k, v in (deltas or {}).items()})
    if grad_input is not None:
        out["input.grad"] = np.asarray(grad_input)
    out.update({k: np.asarray(v) for k, v in (forward or {}).items()})
    return out


def write_outputs(folder, tensors: dict, formats=("safetensors",)) -> list:
    """Write ``tensors`` (``answer_tensors``) as ``folder/outputs.safetensors`` (and/or ``.npz``)."""
    return caseio.write_tensors(Path(folder), "outputs", tensors, formats)


# -- verifying a port's outputs -------------------------------------------------------------------------------------
def read_manifest(golden: Path) -> dict:
    path = golden / "manifest.json"
    if not golden.is_dir():
        raise SpecError("GOLDEN_DIR", f"{golden} is not a folder", "give the folder bp-oracle golden wrote")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError("GOLDEN_DIR", f"{path} cannot be read ({err.strerror or err})",
                        "give the folder bp-oracle golden wrote") from None
    except (ValueError, RecursionError):
        raise SpecError(str(path), "is not JSON", "regenerate the golden set") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise SpecError(str(path), f"is not a {SCHEMA} manifest", "give the folder bp-oracle golden wrote")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise SpecError(f"{path}.schema_version", f"{manifest.get('schema_version')!r} is not {SCHEMA_VERSION}",
                        "regenerate the golden set with this bp-oracle")
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not cases:
        raise SpecError(f"{path}.cases", "is missing or empty", "regenerate the golden set")
    seen = set()
    for k, c in enumerate(cases):
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in seen:
            raise SpecError(f"{path}.cases[{k}].name", "is missing, repeated or not a plain folder name",
                            "regenerate the golden set")
        seen.add(name)
        files = c.get("files")
        if not isinstance(files, dict) or set(files) != set(CASE_FILES):
            raise SpecError(f"{path}.cases[{k}].files", f"does not list the case's {len(CASE_FILES)} files",
                            "regenerate the golden set")
        for f, info in files.items():
            digest = info.get("sha256") if isinstance(info, dict) else None
            if f not in CASE_FILES or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise SpecError(f"{path}.cases[{k}].files", f"has a bad entry {f!r}", "regenerate the golden set")
    return manifest


def check_hashes(golden: Path, manifest: dict) -> None:
    """Every golden file against its manifest sha256, before any is trusted; the first that differs (or is
    missing) is a ``SpecError`` naming it."""
    for c in manifest["cases"]:
        for f, info in c["files"].items():
            path = golden / c["name"] / f
            try:
                digest = sha256_file(path)
            except OSError as err:
                raise SpecError(str(path), f"cannot be read ({err.strerror or err})",
                                "restore the golden set as bp-oracle golden wrote it") from None
            if digest != info["sha256"]:
                raise SpecError(str(path), "does not match its sha256 in manifest.json: the golden file was changed "
                                           "after it was written", "restore it, or regenerate the golden set")


@dataclass
class CaseVerdict:
    name: str
    dtype: str
    verdict: str                  # match | rounding | forward | bug | no outputs | bad outputs
    passed: bool
    layer: str | None = None      # the first divergent node's name (layers.3), or "input" / "loss"
    localization: str = ""
    worst: str | None = None      # the worst tensor's name
    worst_excess: float | None = None  # its largest |g − ĝ| ÷ what the elementwise rule allows
    notes: list = field(default_factory=list)
    messages: list = field(default_factory=list)  # torch.testing-style lines of every failing tensor
    result: object = None         # the CheckResult (for the report)
    case: tuple | None = None     # (spec, params, x, y)
    tensors: list = field(default_factory=list)   # TensorComparison dicts (forward ones included)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "verdict": self.verdict, "passed": self.passed,
                "first_divergent": self.layer, "localization": self.localization, "worst_tensor": self.worst,
                "worst_excess": self.worst_excess, "notes": list(self.notes), "messages": list(self.messages),
                "tensors": self.tensors}


def _excess(got, want, tol: Tolerance, scale: float, bound, either: bool = False) -> float:
    """max |gᵢ − ĝᵢ| ÷ (atol·S + rtol·|ĝᵢ| + f·Bᵢ) (the loss, ``either``: ÷ max of the two): at most 1 passes the
    elementwise rule."""
    g, r = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if r.size == 0:
        return 0.0
    allowed = tol.atol * scale + tol.rtol * np.abs(r)
    if bound is not None:
        fb = tol.rounding_factor * np.asarray(bound, dtype=np.float64)
        allowed = np.maximum(allowed, fb) if either else allowed + fb
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.abs(g - r)
        ratio = np.where(d == 0, 0.0, d / allowed)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    return float(np.max(ratio))


def _golden_tensors(folder: Path, spec: Spec, meta: dict):
    expected = caseio.read_tensors(folder, "expected", str(folder / "expected"))
    allowance = caseio.read_tensors(folder, "allowance", str(folder / "allowance"))
    need = ["loss", *[f"grad.{k}" for k in spec.param_shapes()],
            *[f"delta.{n.name}" for n in nodes(spec)], *([] if spec.token_input else ["input.grad"])]
    for key in need:
        if key not in expected or key not in allowance:
            raise SpecError(str(folder / "expected"), f"has no {key!r} (or its allowance)", "regenerate the golden set")
        if np.shape(allowance[key]) != np.shape(expected[key]):
            raise SpecError(str(folder / "allowance"), f"{key!r} has shape {np.shape(allowance[key])}",
                            f"its shape must be {np.shape(expected[key])}")
    tol_meta = meta.get("tolerance")
    compare = meta.get("compare")
    if not isinstance(tol_meta, dict) or not isinstance(compare, dict):
        raise SpecError(str(folder / "case.json"), "has no tolerance or compare section", "regenerate the golden set")
    try:
        tol = Tolerance(tol_meta["rtol"], tol_meta["atol"], tol_meta["rounding_factor"])
        scale = float(tol_meta["scale_S"])
        scales = {k: float(compare[k]["scale"]) for k in expected}
    except (KeyError, TypeError, ValueError):
        raise SpecError(str(folder / "case.json"), "has an incomplete tolerance or compare section",
                        "regenerate the golden set") from None
    if not all(np.isfinite(s) and s > 0 for s in [scale, *scales.values()]):
        raise SpecError(str(folder / "case.json"), "holds a scale that is not a positive number", "regenerate the golden set")
    # S_δ and S_θ as the set recorded them, tensor by tensor (a set written before they were told apart has S for both)
    of_kind = {kind: [v for k, v in scales.items() if k.startswith(prefix)] for kind, prefix in (("delta", "delta."), ("param", "grad."))}
    scale = Scales(*(of_kind[kind][0] if of_kind[kind] else scale for kind in ("delta", "param")))
    return expected, allowance, tol, scale, scales


def _bad(name, dtype, verdict, message, case=None) -> CaseVerdict:
    return CaseVerdict(name, dtype, verdict, False, None, message, notes=[], messages=[message], case=case)


def _check_answer(spec: Spec, expected: dict, loss, grads, deltas, grad_input, forward, dtype: str) -> tuple[str | None, list]:
    """A problem with the answer's names, shapes or dtypes (one sentence), or None; and notes."""
    notes = []
    arrays = {"loss": loss, **{f"grad.{k}": v for k, v in grads.items()},
              **{f"delta.{k}": v for k, v in (deltas or {}).items()}, **forward}
    if grad_input is not None:
        arrays["input.grad"] = grad_input
    missing = [f"grad.{k}" for k in spec.param_shapes() if k not in grads]
    if "input.grad" in expected and grad_input is None:
        missing.append("input.grad")
    if missing:
        return f"has no {missing[0]} (a port writes every parameter gradient and input.grad)", notes
    if grad_input is not None and "input.grad" not in expected:
        return "holds input.grad, but token input has no gradient", notes
    other = set()
    for key, v in arrays.items():
        v = np.asarray(v)
        if key not in expected:
            return f"holds {key}, which this case does not have", notes
        if v.dtype.kind != "f":
            return f"holds {key} as {v.dtype.name}; write float32 or float64", notes
        want = np.shape(expected[key]) if key != "loss" else ()
        if (v.shape if key != "loss" else (() if v.size == 1 else v.shape)) != want:
            return f"holds {key} with shape {v.shape}; its shape must be {want}", notes
        if v.dtype.name != dtype:
            other.add(v.dtype.name)
    if other:
        notes.append(f"Some outputs are {', '.join(sorted(other))} for a {dtype} case; they are judged as given.")
    return None, notes


def verify_case(gfolder: Path, rfolder: Path, name: str) -> CaseVerdict:
    """Judge one case of a port's results against its golden case (already hash-checked)."""
    from .checker import Candidate, CheckResult, _compare_all, _hints, _through_time, localize
    from .graph import label

    spec, params, x, y, meta = caseio.read_case(gfolder)
    dtype = str(meta.get("dtype"))
    if dtype not in TOLERANCES:
        raise SpecError(str(gfolder / "case.json"), f"has dtype {dtype!r}", "regenerate the golden set")
    expected, allowance, tol, scale, scales = _golden_tensors(gfolder, spec, meta)
    case = (spec, params, x, y)
    if not ((rfolder / "outputs.safetensors").is_file() or (rfolder / "outputs.npz").is_file()):
        why = "no outputs: " + (f"{rfolder} holds neither outputs.safetensors nor outputs.npz" if rfolder.is_dir()
                                else f"{rfolder} does not exist")
        return _bad(name, dtype, "no outputs", why, case)
    try:
        loss, grads, deltas, grad_input, forward = caseio.read_outputs(rfolder, spec, str(rfolder / "outputs"))
    except SpecError as err:
        return _bad(name, dtype, "bad outputs", f"bad outputs: {err}", case)
    problem, notes = _check_answer(spec, expected, loss, grads, deltas, grad_input, forward, dtype)
    if problem:
        return _bad(name, dtype, "bad outputs", f"bad outputs: {rfolder / 'outputs'} {problem}", case)

    # the forward first, node by node, when the port wrote it
    graph = nodes(spec)
    fwd = []
    for i, node in enumerate(graph):
        for what in ("z", "a"):
            key = f"{what}.{node.name}"
            if key in forward and key in expected:
                fwd.append((i, what, compare_tensor(key, forward[key], expected[key], tol, scales[key],
                                                    allowance.get(key), layer=i)))
    bounds = {k: allowance[caseio.comparison_key(k)] for k in
              ["loss", *spec.param_shapes(), *[f"{n.name}.delta" for n in graph], "input.grad"]
              if caseio.comparison_key(k) in allowance}
    loss_cmp = compare_loss(np.float64(np.asarray(loss).reshape(())), expected["loss"].reshape(()), tol, bounds.get("loss"))
    ref = SimpleNamespace(grads={k: expected[f"grad.{k}"] for k in spec.param_shapes()},
                          deltas={n.name: expected[f"delta.{n.name}"] for n in graph},
                          grad_input=expected.get("input.grad"))
    cand = Candidate(float(np.asarray(loss).reshape(())), grads, deltas, grad_input)
    arrays: dict = {}
    tensors = _compare_all(spec, cand, ref, bounds, tol, scale, arrays)

    excess = {t.name: _excess(*arrays[t.name], tol, scale_of(scale, t.name), bounds.get(t.name)) for t in tensors}
    excess["loss"] = _excess(np.asarray(loss).reshape(()), expected["loss"].reshape(()), tol, scales["loss"],
                             bounds.get("loss"), either=True)
    for _, _, t in fwd:
        excess[t.name] = _excess(forward[t.name], expected[t.name], tol, scales[t.name], allowance.get(t.name))
    bad_fwd = next(((i, what, t) for i, what, t in fwd if not t.passed), None)
    failing = [t for t in tensors if not t.passed]
    layer_name, where = None, ""
    if bad_fwd is not None:
        i, what, t = bad_fwd
        node = graph[i]
        earlier = ("every earlier z and a the port wrote matches" if i > 0 or what == "a" else "it is the first node")
        source = "x" if node.src < 0 else f"{label(graph[node.src].name, graph[node.src].is_sum)}'s output a"
        step = (f"{source} to z ({node.layer.type})" if what == "z" else f"z to a (the activation {node.activation.name})")
        where = (f"FORWARD: {what} of {node.label} ({node.name}) is the first forward tensor to differ; {earlier}: "
                 f"the step from {step} is wrong")
        verdict, layer_name, first = "forward", node.name, i
    elif not loss_cmp.passed:
        verdict, layer_name, first = "forward", "loss", None
        where = ("the loss differs before any gradient: the forward pass or the loss value is wrong"
                 + (" (every z and a the port wrote matches, so the loss itself)" if fwd else ""))
    elif not failing:
        verdict = "match" if all(t.verdict == "match" for t in [loss_cmp, *tensors, *(t for _, _, t in fwd)]) else "rounding"
        first = None
    else:
        verdict = "bug"
        first, where = localize(spec, tensors)
        where += _through_time(spec, first, arrays, bounds, tol, scale)
        layer_name = graph[first].name if first is not None else "input"
    passed = verdict in ("match", "rounding")
    result = CheckResult(spec, dtype, passed, verdict, tol, scale, loss_cmp, tensors, first, where, list(notes), arrays,
                         bounds=bounds)
    if verdict == "bug":
        x64 = x if spec.token_input else np.asarray(x, dtype=np.float64)
        y64 = y if spec.loss.targets == "classes" else np.asarray(y, dtype=np.float64)
        special = SimpleNamespace(kink=[None] * len(graph))
        result.hints = _hints(spec, result, ref, special, x64, y64)
    worst = max(excess, key=lambda k: (excess[k], k == "loss", k.startswith(("z.", "a."))), default=None)
    worst_x = excess.get(worst)
    if not worst_x:  # everything exact
        worst = None
    messages = [t.message() + "".join(f"\n  Hint: {h}" for h in result.hints.get(t.name, []))
                for t in ([t for _, _, t in fwd if not t.passed] + ([loss_cmp] if not loss_cmp.passed else []) + failing)]
    rows = [{**t.to_dict(), "excess": excess.get(t.name), "hints": result.hints.get(t.name, [])}
            for t in [*(t for _, _, t in fwd), loss_cmp, *tensors]]
    return CaseVerdict(name, dtype, verdict, passed, layer_name, where, worst, worst_x, result.notes, messages,
                       result, case, rows)


def verify(golden, results) -> list[CaseVerdict]:
    """Judge every case of the golden set; ``SpecError`` for bad input (a changed golden file, a missing folder)."""
    golden, results = Path(golden), Path(results)
    manifest = read_manifest(golden)
    if not results.is_dir():
        raise SpecError("RESULTS_DIR", f"{results} is not a folder", "give the folder the port wrote its outputs into")
    check_hashes(golden, manifest)
    return [verify_case(golden / c["name"], results / c["name"], c["name"]) for c in manifest["cases"]]


# -- the table and the reports --------------------------------------------------------------------------------------
def _fmt_excess(v) -> str:
    if v is None:
        return ""
    if not np.isfinite(v):
        return "∞×"
    return "0 (exact)" if v == 0 else f"{v:.2g}×"


def table_rows(verdicts: list) -> list[list[str]]:
    return [[v.name, v.dtype, v.verdict, v.layer or "—",
             f"{v.worst} ({_fmt_excess(v.worst_excess)})" if v.worst else
             ("— (all exact)" if v.passed else "—")] for v in verdicts]


HEADER = ["case", "dtype", "verdict", "first divergent", "worst tensor (error ÷ allowed)"]


def text_table(verdicts: list) -> str:
    rows = [HEADER] + table_rows(verdicts)
    widths = [max(len(r[k]) for r in rows) for k in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_line(verdicts: list) -> str:
    n_ok = sum(v.passed for v in verdicts)
    word = "PASS" if n_ok == len(verdicts) else "FAIL"
    return f"{word}: {n_ok}/{len(verdicts)} cases pass"


def markdown(verdicts: list, golden: str, results: str) -> str:
    from .report import _md_code, _md_fence, _md_text

    lines = [f"## bp-oracle verify: {summary_line(verdicts)}", "",
             f"Golden set {_md_code(golden)}, results {_md_code(results)}. Rule: {_md_code(RULE)}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for v, row in zip(verdicts, table_rows(verdicts)):
        mark = "✅" if v.passed else "❌"
        lines.append(f"| `{row[0]}` | {row[1]} | {mark} {row[2]} | {_md_text(row[3])} | {_md_text(row[4])} |")
    for v in verdicts:
        if v.passed:
            continue
        lines += ["", f"### {_md_text(v.name)}: {_md_text(v.verdict)}", ""]
        if v.localization:
            lines += [f"**Where:** {_md_text(v.localization)}", ""]
        lines += [f"> {_md_text(n)}" for n in v.notes]
        if v.messages:
            lines += _md_fence("\n".join(v.messages))
    return "\n".join(lines) + "\n"


def write_reports(folder, verdicts: list, golden: str, results: str) -> Path:
    """``folder/verify.json`` and ``verify.md`` (each replaced atomically), and for each case that does not pass,
    a check report (``folder/cases/<case>/report.{json,md,html}``, ``case.npz``)."""
    from .report import write_atomic_files, write_check_report

    folder = Path(folder)
    reports = {}
    for v in verdicts:
        if v.passed or v.case is None:
            continue
        spec, params, x, y = v.case
        result = v.result
        if result is None:  # no outputs or bad outputs: a crash-like report
            from .checker import CheckResult

            result = CheckResult(spec, v.dtype, False, "crash", TOLERANCES[v.dtype], 0.0, None, [], None, v.localization,
                                 crash={"kind": v.verdict, "message": v.localization, "traceback": ""})
        replay = f"bp-oracle verify {golden} {results}"
        path = write_check_report(folder / "cases", result, params=params, x=np.asarray(x), y=np.asarray(y), seed=0,
                                  impl="port (verify)", replay=replay, source=f"{golden}/{v.name}", folder_name=v.name)
        reports[v.name] = str(path)
    doc = {"schema": VERIFY_SCHEMA, "schema_version": VERIFY_SCHEMA_VERSION, "golden": golden, "results": results,
           "passed": all(v.passed for v in verdicts), "summary": summary_line(verdicts),
           "counts": {k: sum(v.verdict == k for v in verdicts) for k in sorted({v.verdict for v in verdicts})},
           "rule": RULE, "cases": [{**v.to_dict(), "report": reports.get(v.name)} for v in verdicts]}
    from .report import _json_text

    write_atomic_files({folder / "verify.json": _json_text(doc), folder / "verify.md": markdown(verdicts, golden, results)})
    return folder
