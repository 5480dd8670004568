"""Discrepancy reports: JSON for machines, Markdown for CI logs, one self-contained HTML page for people.

Layout of one check's report folder (written atomically: built in a temporary folder beside it,
then renamed into place, so an interrupted run leaves no half-written report)::

    DIR/<name>-<dtype>-seed<seed>/
        report.json    schema "bp-oracle/check" version 1 (see reports/README.md)
        report.md      verdict first, then one table row per tensor
        report.html    the same with plots (PNG embedded as data: URIs; no network needed)
        case.npz       params (layers.i.weight, ...), x and y: everything replay needs; no pickle
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from manual_bp import SpecError

SCHEMA = "bp-oracle/check"
SCHEMA_VERSION = 1


def _json_safe(value):
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def versions() -> dict:
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}


def result_dict(result, *, seed, impl: str, replay: str, source: str) -> dict:
    """The JSON report of one check (see reports/README.md for every field)."""
    return _json_safe({
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "passed": result.passed,
        "classification": result.classification,
        "summary": result.summary(),
        "first_divergent_layer": result.first_divergent_layer,
        "localization": result.localization,
        "notes": list(result.notes),
        "dtype": result.dtype,
        "seed": seed,
        "impl": impl,
        "source": source,
        "replay": replay,
        "tolerance": {"rtol": result.tolerance.rtol, "atol": result.tolerance.atol,
                      "rounding_factor": result.tolerance.rounding_factor,
                      "criterion": result.tolerance.describe(), "scale_S": result.scale},
        "loss": result.loss.to_dict(),
        "tensors": [{**t.to_dict(), "hints": result.hints.get(t.name, [])} for t in result.tensors],
        "spec": result.spec.to_dict(),
        "versions": versions(),
    })


def markdown(report: dict) -> str:
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [f"## bp-oracle: {verdict}: {report['summary']}", ""]
    if report["localization"]:
        lines += [f"**Where:** {report['localization']}", ""]
    lines += [f"> {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"Criterion: `{report['tolerance']['criterion']}`, S = {report['tolerance']['scale_S']:.3g}", "",
              "| tensor | shape | verdict | max abs err | max rel err | normwise rel err | mismatched |",
              "|---|---|---|---|---|---|---|"]
    for t in [report["loss"]] + report["tensors"]:
        mark = "✅" if t["passed"] else "❌"
        lines.append(f"| `{t['name']}` | {tuple(t['shape'])} | {mark} {t['verdict']} | {t['max_abs_err']:.3g} | "
                     f"{t['max_rel_err']:.3g} | {float(t['normwise_rel_err']):.3g} | {t['mismatched']}/{t['size']} |")
    hinted = [(t["name"], h) for t in report["tensors"] for h in t.get("hints", [])]
    if hinted:
        lines += ["", "Diagnosis:"] + [f"- `{name}`: {h}" for name, h in hinted]
    lines += ["", f"Replay: `{report['replay']}`", ""]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plots(result) -> dict:
    """Three PNGs: each tensor's error against its bound, δ error per layer, the worst tensor's element errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    tensors = [result.loss] + list(result.tensors)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(tensors) + 1.2))
    names = [t.name for t in tensors]
    positive = [v for t in tensors for v in (t.normwise_err, t.allowed_normwise, t.normwise_rel_err) if 0 < v < np.inf]
    tiny = min(positive) / 10 if positive else 1e-20  # where zero errors are drawn on a log axis
    ax.barh(names, [max(t.normwise_err, tiny) for t in tensors],
            color=["tab:green" if t.passed else "tab:red" for t in tensors], label="‖g − ĝ‖")
    ax.scatter([max(t.allowed_normwise, tiny) for t in tensors], names, color="black", marker="|", s=200, label="allowed")
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("normwise error (log scale)")
    ax.legend(loc="lower right")
    ax.set_title("Each tensor's error against its tolerance")
    out["errors"] = _png(fig)

    deltas = [t for t in result.tensors if t.name.endswith(".delta")]
    if deltas:
        fig, ax = plt.subplots(figsize=(6, 3))
        layers = [t.layer for t in deltas]
        ax.plot(layers, [max(t.normwise_rel_err, tiny) for t in deltas], "o-", label="δ relative error")
        ax.plot(layers, [max(t.allowed_normwise / max(t.normwise_err / max(t.normwise_rel_err, tiny), tiny), tiny)
                         for t in deltas], "k--", label="allowed")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_title("δ divergence per layer (walk back from the right)")
        ax.legend()
        out["deltas"] = _png(fig)

    worst = max(result.tensors, key=lambda t: t.normwise_err / max(t.allowed_normwise, tiny), default=None)
    if worst is not None and worst.name in result.arrays:
        cand, ref = result.arrays[worst.name]
        err = np.abs(np.asarray(cand, dtype=np.float64) - ref)
        err = np.atleast_2d(err)
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(np.log10(np.maximum(err, tiny)), aspect="auto", cmap="magma")
        fig.colorbar(im, ax=ax, label="log10 |g − ĝ|")
        ax.set_title(f"Element errors of {worst.name}")
        out["heatmap"] = _png(fig)
    return out


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bp-oracle: {{ r.summary }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
.pass{color:#176b2c}.fail{color:#b00020}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}
code{background:#f4f4f4}pre{white-space:pre-wrap}</style></head><body>
<h1 class="{{ 'pass' if r.passed else 'fail' }}">{{ 'PASS' if r.passed else 'FAIL' }}: {{ r.summary }}</h1>
{% if r.localization %}<p><b>Where:</b> {{ r.localization }}</p>{% endif %}
{% for n in r.notes %}<p><i>{{ n }}</i></p>{% endfor %}
<p>Criterion: <code>{{ r.tolerance.criterion }}</code>, S = {{ '%.3g' % r.tolerance.scale_S }};
classification <b>{{ r.classification }}</b>; dtype {{ r.dtype }}; implementation <code>{{ r.impl }}</code></p>
<table><tr><th>tensor</th><th>shape</th><th>verdict</th><th>max abs</th><th>max rel</th><th>normwise rel</th><th>mismatched</th><th>worst index</th></tr>
{% for t in [r.loss] + r.tensors %}<tr class="{{ 'pass' if t.passed else 'fail' }}"><td>{{ t.name }}</td><td>{{ t.shape }}</td>
<td>{{ t.verdict }}</td><td>{{ '%.3g' % t.max_abs_err }}</td><td>{{ '%.3g' % t.max_rel_err }}</td>
<td>{{ t.normwise_rel_err if t.normwise_rel_err is string else '%.3g' % t.normwise_rel_err }}</td><td>{{ t.mismatched }}/{{ t.size }}</td><td>{{ t.worst_index }}</td></tr>{% endfor %}
</table>
{% for key, title in [('errors', 'Errors against tolerance'), ('deltas', 'δ per layer'), ('heatmap', 'Worst tensor, element by element')] %}
{% if key in figs %}<h2>{{ title }}</h2><img alt="{{ title }}" src="{{ figs[key] }}">{% endif %}{% endfor %}
{% set hinted = r.tensors | selectattr('hints') | list %}{% if hinted %}<h2>Diagnosis</h2><ul>
{% for t in hinted %}{% for h in t.hints %}<li><code>{{ t.name }}</code>: {{ h }}</li>{% endfor %}{% endfor %}</ul>{% endif %}
<h2>Spec</h2><pre>{{ spec_json }}</pre>
<p>Replay: <code>{{ r.replay }}</code></p>
<p>Python {{ r.versions.python }}, NumPy {{ r.versions.numpy }}, torch {{ r.versions.torch }}</p>
</body></html>
"""


def html(report: dict, figs: dict) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True)  # every user-provided string is escaped
    return env.from_string(HTML_TEMPLATE).render(r=report, figs=figs, spec_json=json.dumps(report["spec"], indent=2, ensure_ascii=False))


def write_atomically(final: Path, files: dict) -> Path:
    """Write ``{filename: bytes|str}`` into the folder ``final`` all at once (temp folder, then rename)."""
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=parent))
    except OSError as err:
        raise SpecError("--report", f"cannot write to {parent} ({err.strerror or err})", "choose a writable folder") from None
    try:
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            (tmp / name).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_check_report(directory, result, *, params, x, y, seed, impl, replay, source) -> Path:
    """Write the four files of one check into DIRECTORY/<name>-<dtype>-seed<seed>/; returns that folder."""
    name = result.spec.name or "spec"
    folder = Path(directory) / f"{name}-{result.dtype}-seed{seed}"
    report = result_dict(result, seed=seed, impl=impl, replay=replay.replace("{folder}", str(folder)), source=source)
    figs = plots(result)
    files = {
        "report.json": json.dumps(report, indent=2, ensure_ascii=False) + "\n",
        "report.md": markdown(report),
        "report.html": html(report, figs),
        "case.npz": npz_bytes({**params, "x": x, "y": y}),
    }
    return write_atomically(folder, files)
