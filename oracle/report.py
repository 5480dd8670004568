"""Discrepancy reports: JSON for machines, Markdown for CI logs, one self-contained HTML page for people.

Layout of one check's report folder::

    DIR/<name>-<dtype>-seed<seed>-<impl>-<hash>/
        report.json    schema "bp-oracle/check" version 1 (see reports/README.md)
        report.md      verdict first, then one table row per tensor
        report.html    the same with plots (PNG embedded as data: URIs; no network needed)
        case.npz       params (layers.i.weight, ...), x and y: everything replay needs; no pickle

The folder name is built from slugs (lowercase ``[a-z0-9._-]``, never empty, never hidden, never
``.``/``..``), so a spec's ``name`` can never become a path; ``<hash>`` is 10 hex digits of a
SHA-256 over the canonical spec, the implementation string, the dtype and the case arrays: the same
inputs land in the same folder (which is replaced), different inputs never overwrite each other.

Files on disk (``write_atomically``): the new folder is written completely in a temporary folder
``.bpo-tmp-<pid>-<random>.<name>`` beside the final one and then swapped in with one atomic
``renameat2(RENAME_EXCHANGE)`` where the OS offers it, or else with two renames (old report to
``.bpo-old-<pid>-<random>.<name>``, new one into place, then the old one deleted). At every moment
the final name holds the old or the new complete report, or, after a kill between the two
renames, the old one lies in its ``.bpo-old-`` folder and the next write in that directory puts it
back. Leftover temporary folders whose writer is dead (or that are older than ten minutes) are
removed by the next write; a live writer's are left alone. Folder and file modes follow the umask.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np

from manual_bp import SpecError
from .compare import as_scales, scale_of

SCHEMA = "bp-oracle/check"
SCHEMA_VERSION = 1


# -- JSON ---------------------------------------------------------------------------------------------
def _json_safe(value):
    """Plain JSON values: non-finite floats become the strings "inf", "-inf", "nan"; NumPy scalars unwrapped."""
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def _json_text(report: dict) -> str:
    # allow_nan=False: anything non-finite that slipped past _json_safe fails here, never as invalid JSON
    return json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def versions() -> dict:
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}


def result_dict(result, *, seed, impl: str, replay: str, source: str, case_sha256: str | None = None) -> dict:
    """The JSON report of one check (see reports/README.md for every field)."""
    crash = getattr(result, "crash", None)
    return _json_safe({
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "passed": result.passed,
        "classification": result.classification,
        "summary": result.summary(),
        "first_divergent_layer": result.first_divergent_layer,
        "localization": result.localization,
        "notes": list(result.notes),
        "crash": dict(crash) if crash is not None else None,
        "dtype": result.dtype,
        "seed": seed,
        "impl": impl,
        "source": source,
        "replay": replay,
        "case_sha256": case_sha256,
        "tolerance": {"rtol": result.tolerance.rtol, "atol": result.tolerance.atol,
                      "rounding_factor": result.tolerance.rounding_factor,
                      "criterion": result.tolerance.describe(), "scale_S": float(result.scale),
                      "scale_S_delta": as_scales(result.scale).delta, "scale_S_param": as_scales(result.scale).param},
        "loss": result.loss.to_dict() if result.loss is not None else None,
        "tensors": [{**t.to_dict(), "hints": result.hints.get(t.name, [])} for t in result.tensors],
        "spec": result.spec.to_dict(),
        "versions": versions(),
    })


# -- formatting helpers (every numeric field may be a float, an int, None or "inf"/"nan") ---------------
def fmt(value, spec: str = ".3g") -> str:
    """A number for people: NaN and ±∞ spelled out, None as a dash; never raises."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return {"inf": "∞", "-inf": "−∞", "nan": "NaN"}.get(value, value)
    if isinstance(value, bool):
        return str(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return format(f, spec)


def verdict_word(report: dict) -> str:
    if report.get("classification") == "crash":
        return "CRASH"
    return "PASS" if report["passed"] else "FAIL"


def _md_text(text) -> str:
    """User text on one Markdown line: no newlines, no raw HTML, no table breaks."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _md_code(text) -> str:
    """An inline code span that no backtick inside ``text`` can close early."""
    text = " ".join(str(text).split())
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _md_fence(text) -> list:
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return [fence + "text", text.rstrip("\n"), fence]


def markdown(report: dict) -> str:
    lines = [f"## bp-oracle: {verdict_word(report)}: {_md_text(report['summary'])}", ""]
    if report.get("localization") and not report.get("crash"):
        lines += [f"**Where:** {_md_text(report['localization'])}", ""]
    lines += [f"> {_md_text(n)}" for n in report["notes"]] + ([""] if report["notes"] else [])
    crash = report.get("crash")
    if crash:
        lines += [f"**The candidate did not return** ({_md_text(crash.get('kind', ''))}): it {_md_text(crash.get('message', ''))}", ""]
        if crash.get("traceback"):
            lines += ["Its traceback:", ""] + _md_fence(str(crash["traceback"])) + [""]
    rows = ([report["loss"]] if report.get("loss") else []) + list(report["tensors"])
    if rows:
        tol = report["tolerance"]
        scales = (f"S_δ = {fmt(tol['scale_S_delta'])}, S_θ = {fmt(tol['scale_S_param'])}, S = {fmt(tol['scale_S'])}"
                  if "scale_S_delta" in tol else f"S = {fmt(tol['scale_S'])}")
        lines += [f"Criterion: {_md_code(tol['criterion'])}, {scales}", "",
                  "| tensor | shape | verdict | max abs err | max rel err | normwise rel err | mismatched |",
                  "|---|---|---|---|---|---|---|"]
        for t in rows:
            mark = "✅" if t["passed"] else "❌"
            lines.append(f"| `{t['name']}` | {tuple(t['shape'])} | {mark} {t['verdict']} | {fmt(t['max_abs_err'])} | "
                         f"{fmt(t['max_rel_err'])} | {fmt(t['normwise_rel_err'])} | {fmt(t['mismatched'])}/{fmt(t['size'])} |")
    hinted = [(t["name"], h) for t in report["tensors"] for h in t.get("hints", [])]
    if hinted:
        lines += ["", "Diagnosis:"] + [f"- `{name}`: {_md_text(h)}" for name, h in hinted]
    lines += ["", f"Replay: {_md_code(report['replay'])}", ""]
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------------------------------
# Every plot shows errors *relative to what the criterion allows*, so a pass looks calm (bars far left of
# the line at 1) and a failure stands out, whatever the loss's scale. Figures are drawn without pyplot
# (no global backend change, safe from threads).
CATEGORY_COLOURS = {
    "match": ("#2e7d32", "within the bound"),
    "rounding": ("#9e9d24", "within torch's own rounding noise"),
    "convention": ("#ef6c00", "differs only at a convention (not a failure)"),
    "mismatch": ("#c62828", "beyond the bound"),
}
# element categories of the heatmap, in order of severity (block pooling keeps the most severe)
ELEMENT_EDGES = (1e-6, 1e-3, 1.0, 10.0, 1e3)
ELEMENT_CLASSES = [
    ("#ffffff", "exactly equal (error 0)"),
    ("#e8f5e9", "≤ 1e-6 × allowed"),
    ("#c8e6c9", "1e-6 … 1e-3 × allowed"),
    ("#81c784", "1e-3 … 1 × allowed (passes)"),
    ("#ffb74d", "1 … 10 × allowed"),
    ("#e53935", "10 … 1000 × allowed"),
    ("#7f0000", "> 1000 × allowed"),
    ("#1565c0", "candidate is ±Inf"),
    ("#8e24aa", "candidate is NaN"),
]
HEATMAP_MAX_CELLS = (64, 96)  # larger tensors are shown in blocks, each block as its worst element


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plain_log_ticks(axis) -> None:
    """Decade labels as plain text (1e-06, 0.01, 1, 100): matplotlib's default 10^k labels go through its mathtext
    parser, whose first use in a process costs ~0.2 s of a check command."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # its own canvas: no pyplot, no global backend
    return fig, fig.subplots()


def _bound(t, tol) -> float:
    """What the verdict allowed for ‖g − ĝ‖: the strict bound, widened by the rounding allowance where there is one.

    A ``rounding`` tensor has every |gᵢ − ĝᵢ| ≤ atol·S + rtol·|ĝᵢ| + f·Bᵢ, so ‖g − ĝ‖ ≤ allowed_normwise + ‖f·B‖.
    """
    bound = float(t.allowed_normwise)
    allowance = getattr(t, "rounding_allowance", None)  # ‖f·B‖ (oracle.rounding)
    if allowance is not None and math.isfinite(allowance):
        bound += float(allowance)
    noise = getattr(t, "torch_noise_err", None)  # earlier form: torch's own rounding noise, allowed f times
    if noise is not None and math.isfinite(noise):
        bound = max(bound, tol.rounding_factor * float(noise))
    return bound


def _element_allowance(result, name):
    """f·Bᵢ per element when the result carries the rounding allowance B (``result.bounds``), else None."""
    bounds = getattr(result, "bounds", None)
    if not isinstance(bounds, dict) or bounds.get(name) is None:
        return None
    return result.tolerance.rounding_factor * np.asarray(bounds[name], dtype=np.float64)


def _ratio(err, bound) -> float:
    """err ÷ bound: 0 for an exact match, inf when nothing was allowed, nan when err is nan."""
    err, bound = float(err), float(bound)
    if math.isnan(err):
        return math.nan
    if err == 0:
        return 0.0
    if not bound > 0:
        return math.inf
    with np.errstate(all="ignore"):
        return float(np.float64(err) / np.float64(bound))


def _category(t, result) -> str:
    if t.passed:
        return "rounding" if t.verdict == "rounding" else "match"
    return "convention" if result.passed else "mismatch"


def _log_limits(ratios) -> tuple:
    """x limits of a log axis of ratios: always showing the line at 1, never beyond 1e±300."""
    finite = [r for r in ratios if r > 0 and math.isfinite(r)]
    lo_exp = math.floor(math.log10(min(finite))) - 1 if finite else -3
    hi_exp = math.ceil(math.log10(max(finite))) + 1 if finite else 1
    lo_exp, hi_exp = max(min(lo_exp, -3), -300), min(max(hi_exp, 1), 300)
    return 10.0 ** lo_exp, 10.0 ** hi_exp


def _ratio_label(r) -> str:
    if math.isnan(r):
        return "NaN"
    if math.isinf(r):
        return "∞"
    return "0 (exact)" if r == 0 else f"{r:.2g}×"


def errors_figure(result):
    """Each tensor's ‖g − ĝ‖ ÷ allowed as a bar on a log axis, the bound a dashed line at 1 (a Figure)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tensors = [result.loss] + list(result.tensors)
    ratios = [_ratio(t.normwise_err, _bound(t, result.tolerance)) for t in tensors]
    lo, hi = _log_limits(ratios)
    span = math.log10(hi) - math.log10(lo)
    fig, ax = _figure(7.0, 0.34 * len(tensors) + 1.3)
    present, nonfinite, exact = [], False, False
    for i, (t, r) in enumerate(zip(tensors, ratios)):
        cat = _category(t, result)
        colour = CATEGORY_COLOURS[cat][0]
        if cat not in present:
            present.append(cat)
        if r == 0:
            exact = True
            ax.plot([lo], [i], marker="o", color=colour, markersize=7, clip_on=False, zorder=3)
            ax.text(lo * 10 ** (0.02 * span), i, "  0 (exact)", va="center", fontsize=8)
            continue
        shown = min(max(r, lo), hi) if math.isfinite(r) else hi
        hatch = None if math.isfinite(r) else "//"
        nonfinite |= not math.isfinite(r)
        ax.barh(i, shown - lo, left=lo, height=0.6, color=colour, hatch=hatch, edgecolor="white" if hatch else colour)
        pos = (math.log10(shown) - math.log10(lo)) / span
        if not math.isfinite(r):
            ax.text(shown / 10 ** (0.01 * span), i, "NaN or ∞", va="center", ha="right", fontsize=8, color="black",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5})
        elif pos > 0.8:  # near the right edge: the number goes inside the bar
            ax.text(shown / 10 ** (0.01 * span), i, _ratio_label(r) + " ", va="center", ha="right", fontsize=8, color="white",
                    fontweight="bold")
        else:
            ax.text(shown * 10 ** (0.01 * span), i, _ratio_label(r), va="center", ha="left", fontsize=8)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlim(lo, hi)
    ax.set_ylim(len(tensors) - 0.5, -0.5)
    ax.set_yticks(range(len(tensors)), [t.name for t in tensors])
    ax.set_xlabel("‖g − ĝ‖ ÷ allowed (log scale): at most 1 passes")
    ax.set_title("Each tensor's error, in units of what the criterion allows")
    handles = [Patch(color=CATEGORY_COLOURS[c][0], label=CATEGORY_COLOURS[c][1]) for c in CATEGORY_COLOURS if c in present]
    handles.append(Line2D([], [], color="black", linestyle="--", label="the bound (error = allowed)"))
    if exact:
        handles.append(Line2D([], [], color="grey", marker="o", linestyle="none", label="error exactly 0"))
    if nonfinite:
        handles.append(Patch(facecolor="grey", hatch="//", edgecolor="white", label="NaN or ∞ (drawn to the edge)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize=8)
    return fig


def deltas_figure(result, deltas):
    """‖δ − δ̂‖ ÷ allowed per layer (a Figure)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    ratios = [_ratio(t.normwise_err, _bound(t, result.tolerance)) for t in deltas]
    lo, hi = _log_limits(ratios)
    fig, ax = _figure(6.0, 3.0)
    layers = [int(t.layer) for t in deltas]
    shown = [(r if math.isfinite(r) else hi) if r > 0 or math.isnan(r) else lo for r in ratios]
    shown = [min(max(s, lo), hi) for s in shown]
    ax.plot(layers, shown, color="#616161", linewidth=1, zorder=1)
    for layer, r, s, t in zip(layers, ratios, shown, deltas):
        colour = CATEGORY_COLOURS[_category(t, result)][0]
        marker = "o" if math.isfinite(r) and r > 0 else ("s" if r == 0 else "X")
        ax.plot([layer], [s], marker=marker, color=colour, markersize=8, linestyle="none", zorder=2, clip_on=False)
        if not (math.isfinite(r) and r > 0):
            ax.annotate(_ratio_label(r), (layer, s), textcoords="offset points", xytext=(7, -10 if s >= hi else 4), fontsize=8)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("layer (a block's layers in the order they run)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(layers) - 0.5, max(layers) + 0.5)
    ax.set_ylabel("‖δ − δ̂‖ ÷ allowed")
    ax.set_title("δ per layer (read from the right: the first point above 1 is where it breaks)", fontsize=10)
    handles = [Line2D([], [], color=CATEGORY_COLOURS[c][0], marker="o", linestyle="none", label=CATEGORY_COLOURS[c][1])
               for c in CATEGORY_COLOURS if any(_category(t, result) == c for t in deltas)]
    handles.append(Line2D([], [], color="black", linestyle="--", label="the bound"))
    if any(r == 0 for r in ratios):
        handles.append(Line2D([], [], color="grey", marker="s", linestyle="none", label="error exactly 0"))
    if any(not math.isfinite(r) for r in ratios):
        handles.append(Line2D([], [], color="grey", marker="X", linestyle="none", label="NaN or ∞"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize=8)
    return fig


def element_classes(cand, ref, tol, scale, extra=None) -> np.ndarray:
    """Per element, an index into ELEMENT_CLASSES: 0 exact, 1–6 by |g − ĝ| ÷ (atol·S + rtol·|ĝ| [+ extra]),
    7 ±Inf, 8 NaN in the candidate."""
    c = np.asarray(cand, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    with np.errstate(all="ignore"):
        diff = np.abs(c - r)
        allowed = tol.atol * float(scale) + tol.rtol * np.abs(r)
        if extra is not None:
            allowed = allowed + np.broadcast_to(extra, allowed.shape)
        ratio = diff / allowed
    codes = np.full(c.shape, 6, dtype=np.int8)
    ok = np.isfinite(ratio) & (diff > 0)
    codes[ok] = 1 + np.searchsorted(np.asarray(ELEMENT_EDGES), ratio[ok], side="left")
    codes[diff == 0] = 0
    codes[np.isinf(c)] = 7
    codes[np.isnan(c)] = 8
    return codes


def _pooled(codes: np.ndarray) -> tuple:
    """Codes reduced to at most HEATMAP_MAX_CELLS, each block shown as its most severe element."""
    rows, cols = codes.shape
    br, bc = -(-rows // HEATMAP_MAX_CELLS[0]), -(-cols // HEATMAP_MAX_CELLS[1])
    if br == 1 and bc == 1:
        return codes, (1, 1)
    padded = np.full((-(-rows // br) * br, -(-cols // bc) * bc), -1, dtype=np.int8)
    padded[:rows, :cols] = codes
    blocks = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc).max(axis=(1, 3))
    return blocks, (br, bc)


def _axis_names(name: str, ndim: int) -> tuple:
    if ndim > 2:  # tiles: see ``tiled``
        inner = "one kernel" if name.endswith(".weight") else "one feature map"
        rows = "output channel" if name.endswith(".weight") else "example"
        cols = "input channel" if name.endswith(".weight") else "channel"
        return f"{rows} (tiles)", f"{cols} (tiles; each tile is {inner})"
    if name.endswith(".weight"):
        return "output unit", "input unit"
    if name.endswith(".bias"):
        return "", "output unit"
    if name.endswith(".delta"):
        return "example", "unit"
    if name == "input.grad":
        return "example", "input"
    return ("", "element") if ndim < 2 else ("row", "column")


SEPARATOR = -2  # a grid cell between tiles, not an element


def tiled(codes: np.ndarray) -> tuple:
    """A rank-3 or rank-4 tensor laid out as a 2-D grid of tiles, one blank cell between tiles:
    (A, B, L) as A rows (a blank row between) of B tiles of L cells; (A, B, H, W) as A × B tiles of H × W cells (a conv weight:
    one kernel per output × input channel; a δ: one feature map per example × channel).
    Returns (grid, (tile rows, tile columns)); rank ≤ 2 is returned as a grid of rows."""
    if codes.ndim <= 2:
        return (codes.reshape(1, -1) if codes.ndim < 2 else codes), (1, 1)
    if codes.ndim == 3:
        codes = codes[:, :, None, :]
    A, B, H, W = codes.shape
    grid = np.full((A * (H + 1) - 1, B * (W + 1) - 1), SEPARATOR, dtype=np.int8)
    for a in range(A):
        for b in range(B):
            grid[a * (H + 1): a * (H + 1) + H, b * (W + 1): b * (W + 1) + W] = codes[a, b]
    return grid, (H, W)


def heatmap_figure(result, t) -> tuple:
    """(Figure, caption): one tensor's element errors in units of their elementwise bound."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    cand, ref = result.arrays[t.name]
    extra = _element_allowance(result, t.name)
    codes = element_classes(cand, ref, result.tolerance, scale_of(result.scale, t.name), extra)
    ndim = codes.ndim
    grid, (th, tw) = tiled(codes)
    rows, cols = grid.shape
    shown, (br, bc) = _pooled(grid)
    colours = np.array([_rgb(c) for c, _ in ELEMENT_CLASSES])
    image = np.where((shown < 0)[..., None], _rgb("#ffffff"), colours[np.maximum(shown, 0)])
    fig, ax = _figure(7.0, min(6.0, max(1.4, 0.28 * shown.shape[0] + 1.2)))
    ax.imshow(image, interpolation="nearest", aspect="auto", extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
    ylabel, xlabel = _axis_names(t.name, ndim)
    ax.set_xlabel(xlabel)
    if ndim > 2:  # one tick per tile, at its centre, numbered by its channel (or example)
        tiles_x = np.arange(codes.shape[1]) * (tw + 1) + (tw - 1) / 2
        tiles_y = np.arange(codes.shape[0]) * (th + 1) + (th - 1) / 2
        step_x, step_y = max(1, len(tiles_x) // 12), max(1, len(tiles_y) // 10)
        ax.set_xticks(tiles_x[::step_x], [str(k) for k in range(0, len(tiles_x), step_x)])
        ax.set_yticks(tiles_y[::step_y], [str(k) for k in range(0, len(tiles_y), step_y)])
        ax.set_ylabel(ylabel)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    if ndim <= 2 and rows == 1:
        ax.set_yticks([])
    elif ndim <= 2:
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    if br == 1 and bc == 1 and rows <= 40 and cols <= 60:  # thin lines between cells, so white cells show
        ax.set_xticks(np.arange(-0.5, cols), minor=True)
        ax.set_yticks(np.arange(-0.5, rows), minor=True)
        ax.grid(which="minor", color="#bdbdbd", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    counts = np.bincount(codes.ravel(), minlength=len(ELEMENT_CLASSES))
    n_nan, n_inf = int(counts[8]), int(counts[7])
    title = f"{t.name} {tuple(t.shape)}: |g − ĝ| ÷ (atol·S + rtol·|ĝ|) per element"
    if n_nan or n_inf:
        title += f"\n{n_nan} NaN, {n_inf} Inf element(s) in the candidate"
    ax.set_title(title, fontsize=10)
    handles = [Patch(facecolor=colour, edgecolor="#9e9e9e", label=f"{label}: {counts[k]}")
               for k, (colour, label) in enumerate(ELEMENT_CLASSES) if k < 7 or counts[k]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize=8,
              title="elements", title_fontsize=8)
    if extra is not None:
        caption = "Allowed per element: atol·S + rtol·|ĝ| + f·B (B the rounding allowance), as in the verdict."
    elif t.verdict == "rounding":
        caption = ("Allowed per element here: atol·S + rtol·|ĝ| only; this tensor passed within the rounding allowance, "
                   "which these colours do not include.")
    else:
        caption = "Allowed per element: atol·S + rtol·|ĝ|."
    if ndim > 2:
        caption += f" Each tile is one {'kernel' if t.name.endswith('.weight') else 'feature map'} ({th}×{tw}); blank lines separate the tiles."
    if (br, bc) != (1, 1):
        caption += (f" {rows}×{cols} elements shown in blocks of {br}×{bc}; each block takes the colour of its worst "
                    "element (the axes give element indices).")
    return fig, caption


def _rgb(colour: str) -> tuple:
    colour = colour.lstrip("#")
    return tuple(int(colour[i:i + 2], 16) / 255 for i in (0, 2, 4))


def _scalar_text(result, t) -> str:
    cand, ref = result.arrays[t.name]
    c, r = float(np.asarray(cand, dtype=np.float64).ravel()[0]), float(np.asarray(ref, dtype=np.float64).ravel()[0])
    return (f"{t.name} has a single element: candidate {fmt(c, '.6g')}, torch {fmt(r, '.6g')}, "
            f"|g − ĝ| = {fmt(t.max_abs_err)} (allowed {fmt(_bound(t, result.tolerance))}; "
            f"{_ratio_label(_ratio(t.normwise_err, _bound(t, result.tolerance)))} the bound).")


def plots(result) -> dict:
    """The figures of the HTML page, as data: URIs, plus text where a picture would mislead.

    Keys: ``errors`` (each tensor's error ÷ allowed), ``deltas`` (δ per layer, when the candidate
    returned δ), ``heatmap`` with ``heatmap_name`` and ``heatmap_caption`` (the worst tensor element by
    element), ``scalar`` (instead of a heatmap when the worst tensor has one element), ``note`` (why
    there are no plots) and ``problems`` (a plot that could not be drawn; the report is written anyway).
    """
    out: dict = {"problems": []}
    if getattr(result, "crash", None) is not None or result.loss is None:
        out["note"] = "No plots: the candidate did not return any gradients to compare."
        return out

    def attempt(key, draw):
        try:
            draw()
        except Exception as err:  # a report must never be lost to a plotting problem; say so instead
            out["problems"].append(f"the {key} plot could not be drawn ({type(err).__name__}: {err})")

    def errors():
        out["errors"] = _png(errors_figure(result))

    def deltas():
        found = [t for t in result.tensors if t.name.endswith(".delta") and t.layer is not None]
        if found:
            out["deltas"] = _png(deltas_figure(result, found))

    def heatmap():
        candidates = [t for t in result.tensors if t.name in result.arrays]
        if not candidates:
            return

        def severity(t):
            r = _ratio(t.normwise_err, _bound(t, result.tolerance))
            return math.inf if math.isnan(r) else r

        worst = max(candidates, key=severity)
        if worst.size == 1:
            out["scalar"] = _scalar_text(result, worst)
        else:
            fig, out["heatmap_caption"] = heatmap_figure(result, worst)
            out["heatmap"] = _png(fig)
            out["heatmap_name"] = worst.name

    attempt("errors", errors)
    attempt("δ", deltas)
    attempt("heatmap", heatmap)
    return out


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bp-oracle: {{ word }}: {{ r.summary }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem}
.pass{color:#176b2c}.fail{color:#b00020}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f4f4f4}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5rem;border:1px solid #ddd}
img{max-width:100%}.caption{color:#555;font-size:.9rem}</style></head><body>
<h1 class="{{ 'pass' if r.passed else 'fail' }}">{{ word }}: {{ r.summary }}</h1>
{% if r.localization and not r.crash %}<p><b>Where:</b> {{ r.localization }}</p>{% endif %}
{% for n in r.notes %}<p><i>{{ n }}</i></p>{% endfor %}
{% if r.crash %}<h2>The candidate did not return ({{ r.crash.kind }})</h2>
<p>The candidate {{ r.crash.message }}</p>
{% if r.crash.traceback %}<p>Its traceback:</p><pre>{{ r.crash.traceback }}</pre>{% endif %}{% endif %}
<p>{% if not r.crash %}Criterion: <code>{{ r.tolerance.criterion }}</code>, {% if r.tolerance.scale_S_delta is defined %}S_δ = {{ r.tolerance.scale_S_delta | num }}, S_θ = {{ r.tolerance.scale_S_param | num }}, {% endif %}S = {{ r.tolerance.scale_S | num }};
{% endif %}classification <b>{{ r.classification }}</b>; dtype {{ r.dtype }}; implementation <code>{{ r.impl }}</code></p>
{% set rows = ([r.loss] if r.loss else []) + r.tensors %}{% if rows %}
<table><tr><th>tensor</th><th>shape</th><th>verdict</th><th>max abs</th><th>max rel</th><th>normwise rel</th><th>mismatched</th><th>worst index</th></tr>
{% for t in rows %}<tr class="{{ 'pass' if t.passed else 'fail' }}"><td>{{ t.name }}</td><td>{{ t.shape | join('×') or 'scalar' }}</td>
<td>{{ t.verdict }}</td><td class="num">{{ t.max_abs_err | num }}</td><td class="num">{{ t.max_rel_err | num }}</td>
<td class="num">{{ t.normwise_rel_err | num }}</td><td class="num">{{ t.mismatched }}/{{ t.size }}</td><td>{{ t.worst_index }}</td></tr>{% endfor %}
</table>{% endif %}
{% if figs.note %}<p class="caption">{{ figs.note }}</p>{% endif %}
{% for p in figs.problems %}<p class="fail">Note: {{ p }}.</p>{% endfor %}
{% if figs.errors %}<h2>Errors against the tolerance</h2><img alt="each tensor's error divided by what is allowed" src="{{ figs.errors }}">
<p class="caption">Each bar is ‖g − ĝ‖ divided by what the criterion allows for that tensor (widened by the rounding
allowance where the tensor has one): left of the dashed line at 1 passes; a dot at the left edge is an exact match.</p>{% endif %}
{% if figs.deltas %}<h2>δ per layer</h2><img alt="δ error per layer divided by what is allowed" src="{{ figs.deltas }}">{% endif %}
{% if figs.heatmap %}<h2>{{ figs.heatmap_name }}, element by element</h2><img alt="element errors of {{ figs.heatmap_name }}" src="{{ figs.heatmap }}">
<p class="caption">The tensor with the largest error relative to its bound, each element's |g − ĝ| in units of what is
allowed for it; white is an exact match. {{ figs.heatmap_caption }}</p>{% endif %}
{% if figs.scalar %}<h2>The worst tensor</h2><p>{{ figs.scalar }}</p>{% endif %}
{% set hinted = r.tensors | selectattr('hints') | list %}{% if hinted %}<h2>Diagnosis</h2><ul>
{% for t in hinted %}{% for h in t.hints %}<li><code>{{ t.name }}</code>: {{ h }}</li>{% endfor %}{% endfor %}</ul>{% endif %}
<h2>Spec</h2><pre>{{ spec_json }}</pre>
<p>Replay: <code>{{ r.replay }}</code></p>
<p>Case: <code>case.npz</code>{% if r.case_sha256 %}, SHA-256 <code>{{ r.case_sha256 }}</code>{% endif %}</p>
<p>Python {{ r.versions.python }}, NumPy {{ r.versions.numpy }}, torch {{ r.versions.torch }}</p>
</body></html>
"""


def html(report: dict, figs: dict) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True)  # every user-provided string is escaped
    env.filters["num"] = fmt
    figs = {"problems": [], **figs}
    return env.from_string(HTML_TEMPLATE).render(r=report, figs=figs, word=verdict_word(report),
                                                 spec_json=json.dumps(report["spec"], indent=2, ensure_ascii=False))


# -- folder names -----------------------------------------------------------------------------------------
SLUG_MAX = 48


def slug(text, max_len: int = SLUG_MAX, empty: str = "spec") -> str:
    """A safe folder-name part: lowercase [a-z0-9._-], separators collapsed, capped, never empty,
    never starting with '.', '-' or '_' (so never '.', '..' or a hidden name)."""
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"[^a-z0-9._-]+", "-", text)
    text = re.sub(r"([._-])[._-]+", r"\1", text)
    text = text.strip("._-")[:max_len].rstrip("._-")
    return text or empty


def _impl_slug(impl: str) -> str:
    module, sep, func = str(impl).rpartition(":")
    if not sep:
        return slug(impl, 40, "impl")
    base = re.split(r"[\\/]", module)[-1]
    if base.endswith(".py"):
        base = base[:-3]
    return slug(f"{base}.{func}", 40, "impl")


def case_digest(spec, *, dtype, impl, params, x, y, seed=None) -> str:
    """SHA-256 (hex) over the canonical spec, the implementation string, the dtype, the seed and every case array
    (name, dtype, shape and bytes, in a fixed order)."""
    h = hashlib.sha256()

    def put(data: bytes):
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put(b"bp-oracle case v1")
    spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else spec
    put(json.dumps(_json_safe(spec_dict), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii"))
    put(str(impl).encode("utf-8", "surrogatepass"))
    put(str(dtype).encode("utf-8"))
    put(repr(seed).encode("utf-8", "surrogatepass"))
    arrays = [(f"param:{k}", params[k]) for k in sorted(params)] + [("x", x), ("y", y)]
    for name, value in arrays:
        a = np.ascontiguousarray(value)
        put(name.encode("utf-8", "surrogatepass"))
        put(a.dtype.str.encode("ascii"))
        put(repr(tuple(a.shape)).encode("ascii"))
        put(a.tobytes())
    return h.hexdigest()


def case_folder_name(spec, *, dtype, seed, impl, params, x, y) -> str:
    """``<name>-<dtype>-seed<seed>-<impl>-<hash>``: every part a slug, the hash 10 hex digits of ``case_digest``."""
    parts = [slug(getattr(spec, "name", None) or "spec"), slug(dtype, 16, "dtype")]
    if seed is not None:
        parts.append("seed" + slug(seed, 20, "x"))
    parts.append(_impl_slug(impl))
    parts.append(case_digest(spec, dtype=dtype, impl=impl, params=params, x=x, y=y, seed=seed)[:10])
    return "-".join(parts)


# -- writing folders atomically ---------------------------------------------------------------------------
_TEMP_RE = re.compile(r"^\.bpo-(tmp|old)-(\d+)-[A-Za-z0-9_]+\.(.+)$")
_LEGACY_RE = re.compile(r"^\.(.+)\.[a-z0-9_]{8}$")  # temp folders of earlier versions: .<name>.<mkdtemp suffix>
KNOWN_FILES = {"report.json", "report.md", "report.html", "case.npz", "fuzz.json", "mutants.md", "mutants.json"}
STALE_LIVE_AFTER = 600.0   # a temp folder whose writer pid still exists is left alone this long (pid reuse)
STALE_LEGACY_AFTER = 60.0  # an old-style temp folder (no pid in its name) is stale after a minute
_UMASK_LOCK = threading.Lock()
_EXCHANGE_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP))
_SWAP_ATTEMPTS = 100


def _report_error(problem: str, fix: str = "choose another --report folder") -> SpecError:
    return SpecError("--report", problem, fix)


def _why(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # reading the umask means setting it; keep that window as short as possible
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _load_exchange():
    """``exchange(a, b)``: swap two paths atomically (Linux renameat2 RENAME_EXCHANGE), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a, b):
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(a), None, str(b))

    return exchange


_exchange = _load_exchange()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; judge by age only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _remove(path: str):
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def clean_stale(directory) -> list:
    """Remove the temporary folders that dead writers left in ``directory``; put back a report that a
    writer killed between its two renames had moved aside. Returns what was done, one line each.

    Ours and stale: ``.bpo-tmp-<pid>-*`` / ``.bpo-old-<pid>-*`` whose pid is gone (or that are
    older than STALE_LIVE_AFTER), and old-style ``.<name>.<8 chars>`` folders holding only report
    files and older than a minute. A live writer's folders are never touched.
    """
    directory = Path(directory)
    done = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return done
    now = time.time()
    for entry in entries:
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        m = _TEMP_RE.match(entry.name)
        if m:
            kind, pid, target = m.group(1), int(m.group(2)), m.group(3)
            if _pid_alive(pid) and age <= STALE_LIVE_AFTER:
                continue
            if kind == "old" and entry.is_dir(follow_symlinks=False) and not os.path.lexists(directory / target):
                try:
                    os.rename(entry.path, directory / target)
                    done.append(f"restored {target}")
                    continue
                except OSError:
                    pass
            _remove(entry.path)
            done.append(f"removed {entry.name}")
            continue
        m = _LEGACY_RE.match(entry.name)
        if m and age > STALE_LEGACY_AFTER and entry.is_dir(follow_symlinks=False):
            try:
                names = set(os.listdir(entry.path))
            except OSError:
                continue
            if names <= KNOWN_FILES:
                _remove(entry.path)
                done.append(f"removed {entry.name}")
    return done


def _safe_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "\0" not in name and "/" not in name and \
        not (os.altsep and os.altsep in name) and os.sep not in name and not name.startswith(".bpo-")


def _prepare_parent(parent: Path):
    if parent.is_symlink():
        real = os.path.realpath(parent)
        raise _report_error(f"{parent} is a symbolic link (to {real}); reports are not written through links",
                            f"give the real folder {real} instead")
    if parent.exists() and not parent.is_dir():
        raise _report_error(f"{parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _report_error(f"cannot create the folder {parent} ({_why(err)})", "choose a writable folder") from None
    if not parent.is_dir():
        raise _report_error(f"{parent} is not a folder")


def _check_final(final: Path):
    if final.is_symlink():
        raise _report_error(f"{final} is a symbolic link; reports replace folders, they do not follow links",
                            "remove the link or choose another --report folder")
    if final.exists() and not final.is_dir():
        raise _report_error(f"{final} is a file where the report folder goes", "remove it or choose another --report folder")


def _write_file(path: Path, data: bytes):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # mode: 0o666 & ~umask
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _swap_by_renames(tmp: Path, final: Path) -> bool:
    """Without an atomic exchange: old → .bpo-old-*, new → final, old deleted. False: lost a race, try again."""
    old = final.parent / f".bpo-old-{os.getpid()}-{secrets.token_hex(4)}.{final.name}"
    try:
        os.rename(final, old)
    except FileNotFoundError:
        old = None
    try:
        os.rename(tmp, final)
    except BaseException as err:
        if old is not None:
            try:
                os.rename(old, final)  # put the old report back (fails harmlessly if another writer won)
            except OSError:
                shutil.rmtree(old, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def _swap_into_place(tmp: Path, final: Path):
    """Make the complete folder ``tmp`` appear under ``final``; afterwards ``tmp`` holds the old report or nothing."""
    global _exchange
    for _ in range(_SWAP_ATTEMPTS):
        _check_final(final)
        if _exchange is not None:
            try:
                _exchange(tmp, final)
                return
            except FileNotFoundError:  # nothing there yet: a plain rename below
                try:
                    os.rename(tmp, final)
                    return
                except OSError as err:
                    if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        continue  # another writer put its report there first: exchange with it
                    raise
            except OSError as err:
                if err.errno not in _EXCHANGE_UNSUPPORTED:
                    raise
                _exchange = None  # this system or file system has no atomic exchange
        if _swap_by_renames(tmp, final):
            return
    raise _report_error(f"{final} kept changing while this report was written (another bp-oracle writing the same "
                        "report at the same time?)", "run again")


def write_atomically(final, files: dict) -> Path:
    """Write ``{filename: bytes|str}`` as the folder ``final``, all at once: built in a temporary folder
    beside it, then swapped in (see the module docstring). Any OSError becomes ``SpecError('--report')``
    and leaves no half-written folder; the previous report, if any, is kept."""
    final = Path(final)
    if not _safe_component(final.name):
        raise _report_error(f"{str(final)!r} is not a valid report folder path")
    parent = final.parent
    _prepare_parent(parent)
    clean_stale(parent)
    _check_final(final)
    mask = _umask()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".bpo-tmp-{os.getpid()}-", suffix=f".{final.name}", dir=parent))
    except OSError as err:
        raise _report_error(f"cannot write to {parent} ({_why(err)})", "choose a writable folder") from None
    try:
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700; a report folder follows the umask
        for name, content in files.items():
            if not _safe_component(name):
                raise ValueError(f"bad report file name {name!r}")
            data = content.encode("utf-8", "backslashreplace") if isinstance(content, str) else bytes(content)
            _write_file(tmp / name, data)
        _swap_into_place(tmp, final)
    except OSError as err:
        raise _report_error(f"cannot write the report {final} ({_why(err)}); nothing was changed there",
                            "free some space or choose another --report folder") from None
    finally:
        _remove(str(tmp))  # the old report after a swap, or the unfinished new one
    return final


def write_atomic_files(files: dict) -> list:
    """Replace each file ``{path: text}`` atomically (a temporary file beside it, then a rename), leaving
    the other files of its folder alone; any OSError becomes one ``SpecError('--report')``."""
    written = []
    for path, text in files.items():
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            _remove(str(tmp))
            raise _report_error(f"cannot write {path} ({_why(err)})", "choose a writable --report folder") from None
        written.append(path)
    return written


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def report_folder(directory, name: str) -> Path:
    """``directory / name``, verified to lie directly inside ``directory``."""
    directory = Path(directory)
    if not _safe_component(name) or name != slug(name, len(name), ""):
        raise _report_error(f"{name!r} is not a safe report folder name")
    folder = directory / name
    if os.path.dirname(os.path.abspath(folder)) != os.path.abspath(directory):
        raise _report_error(f"{folder} would lie outside {directory}")
    return folder


def write_check_report(directory, result, *, params, x, y, seed, impl, replay, source, folder_name=None) -> Path:
    """Write the four files of one check into DIRECTORY/<folder>/ and return that folder.

    The folder is ``case_folder_name(...)`` (the spec name, dtype, seed, implementation and a hash
    of the case), or ``slug(folder_name)`` when given (e.g. a fuzz campaign's failure). ``replay`` may
    contain ``{folder}``, replaced by the folder path (shell-quoted).
    """
    impl = str(impl)
    if folder_name is not None:
        name = slug(folder_name, 150, "report")
    else:
        name = case_folder_name(result.spec, dtype=result.dtype, seed=seed, impl=impl, params=params, x=x, y=y)
    folder = report_folder(directory, name)
    case = npz_bytes({**params, "x": x, "y": y})
    report = result_dict(result, seed=seed, impl=impl, replay=replay.replace("{folder}", shlex.quote(str(folder))),
                         source=source, case_sha256=hashlib.sha256(case).hexdigest())
    figs = plots(result)
    files = {
        "report.json": _json_text(report),
        "report.md": markdown(report),
        "report.html": html(report, figs),
        "case.npz": case,
    }
    return write_atomically(folder, files)
