r"""One check case as files: the layout that golden vectors (``bp-oracle golden``), their verification
(``bp-oracle verify``) and programs run as candidates (``--impl exec:COMMAND``) share, readable from any language.

A case is a folder::

    case.json               what the case is: schema, name, dtype, the spec, every tensor's shape and dtype
    inputs.safetensors      x, y, every parameter and buffer by its state_dict name (layers.0.weight, ...),
    inputs.npz              and each dropout layer's keep mask (mask.layers.3); the same tensors in both files
    expected.safetensors    (golden cases only) torch's answer, float64: loss, grad.<param>, delta.<node>,
    expected.npz            input.grad, and the forward's z.<node> and a.<node>
    allowance.safetensors   (golden cases only) the rounding allowance of each compared tensor in the case's
    allowance.npz           dtype, keyed like expected

A program's answer, written into the case folder (or a results folder of the same layout)::

    outputs.safetensors     loss, grad.<param> (every parameter), input.grad (none for token input);
    (or outputs.npz)        optionally delta.<node> (any of them), z.<node>, a.<node>

Names: parameters as torch's ``state_dict`` (``layers.{i}.weight`` (out, in); conv (out, in/groups, kH, kW);
``layers.{i}.weight_ih_l0``; ``layers.{i}.out_proj.weight``), nodes as ``manual_bp.network.delta_names``
(``layers.{i}``, ``layers.{i}.body.{j}``). Tensors are C-order, float32 or float64 as the case's dtype; y is int64
for class losses (−100 masks a step); x is int64 for token input; the loss is a 0-d tensor.
safetensors is the format ports read natively (a Rust crate, readers in C++, JS, Go...); npz is for NumPy.
Nothing is ever unpickled: ``np.load(allow_pickle=False)``, and names and shapes are checked against the spec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from manual_bp import Spec, SpecError, keep_mask
from manual_bp.network import delta_names

SCHEMA = "bp-oracle/case"
SCHEMA_VERSION = 1
FORMATS = ("safetensors", "npz")


# -- tensors to and from files ------------------------------------------------------------------------------------
def write_tensors(folder: Path, stem: str, tensors: dict, formats=FORMATS) -> list[Path]:
    """``{name: array}`` as ``stem.safetensors`` and ``stem.npz`` (each written beside, then renamed into place)."""
    from safetensors.numpy import save

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray makes a 0-d loss 1-d)
    written = []
    for fmt in formats:
        path = folder / f"{stem}.{fmt}"
        tmp = folder / f".{stem}.{os.getpid()}.tmp.{fmt}"
        if fmt == "safetensors":
            tmp.write_bytes(save(arrays))  # written by Python, so the file's mode follows the umask (save_file: 0600)
        else:
            with open(tmp, "wb") as f:
                _savez_fixed(f, arrays)
        os.replace(tmp, path)
        written.append(path)
    return written


def _savez_fixed(f, arrays: dict) -> None:
    """``np.savez`` with every zip entry dated 1980-01-01 (np.savez stamps the current time), so the same tensors
    always give the same bytes, and a golden set's sha256 per file is reproducible."""
    import zipfile

    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)


def read_tensors(folder: Path, stem: str, what: str) -> dict:
    """``stem.safetensors`` or else ``stem.npz`` from ``folder`` as ``{name: array}``; a missing, unreadable or
    malformed file is a ``SpecError`` naming it (``what`` says whose file it is)."""
    st, npz = folder / f"{stem}.safetensors", folder / f"{stem}.npz"
    try:
        if st.exists():
            from safetensors.numpy import load_file
            return {k: np.asarray(v) for k, v in load_file(str(st)).items()}
        if npz.exists():
            with np.load(npz, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
    except Exception as err:  # a truncated or forged file: whatever the reader raises, one message
        bad = st if st.exists() else npz
        raise SpecError(what, f"{bad} cannot be read ({type(err).__name__}: {err})",
                        f"write {stem}.safetensors or {stem}.npz with numeric tensors only") from None
    raise SpecError(what, f"{folder} holds neither {stem}.safetensors nor {stem}.npz",
                    f"write the {stem} file into the case folder")


# -- what a case holds --------------------------------------------------------------------------------------------
def input_tensors(spec: Spec, params: dict, x, y) -> dict:
    """x, y, every parameter and buffer, and each training-mode dropout layer's keep mask (``mask.layers.{i}``:
    the case's own mask, which a port cannot draw from NumPy's generator)."""
    out = {"x": np.asarray(x), "y": np.asarray(y)}
    out.update({k: np.asarray(v) for k, v in params.items()})
    m = np.shape(x)[0]
    for name, layer, in_shape in _walk(spec):
        if layer.type == "dropout" and layer.training and layer.p > 0:
            out[f"mask.{name}"] = keep_mask(layer.seed, layer.p, (m, *in_shape)).astype(np.asarray(x).dtype)
    return out


def _walk(spec: Spec):
    """(node name, layer, one example's input shape) of every layer, blocks opened (``oracle.graph``)."""
    from .graph import nodes

    for node in nodes(spec):
        if not node.is_sum:
            yield node.name, node.layer, node.in_shape


def expected_tensors(spec: Spec, ref) -> dict:
    """torch's answer (``twin.run_twin``) under the names of the layout."""
    from .graph import nodes

    out = {"loss": np.array(ref.loss, dtype=np.float64)}
    out.update({f"grad.{k}": v for k, v in ref.grads.items()})
    out.update({f"delta.{k}": v for k, v in ref.deltas.items()})
    if ref.grad_input is not None:
        out["input.grad"] = ref.grad_input
    for node, z, a in zip(nodes(spec), ref.z, ref.acts):
        out[f"z.{node.name}"], out[f"a.{node.name}"] = z, a
    return out


def comparison_key(name: str) -> str:
    """The layout's name of a compared tensor (``layers.0.weight`` → ``grad.layers.0.weight``,
    ``layers.0.delta`` → ``delta.layers.0``, ``loss`` and ``input.grad`` unchanged)."""
    if name in ("loss", "input.grad"):
        return name
    if name.endswith(".delta"):
        return "delta." + name[: -len(".delta")]
    return "grad." + name


def describe_tensors(tensors: dict) -> dict:
    return {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name} for k, v in tensors.items()}


def write_case(folder, spec: Spec, params: dict, x, y, dtype, name: str = "case", extra: dict | None = None,
               formats=FORMATS) -> Path:
    """The inputs of a case, and its ``case.json``; golden cases add ``expected`` and ``allowance`` (``extra``
    entries go into case.json)."""
    folder = Path(folder)
    inputs = input_tensors(spec, params, x, y)
    write_tensors(folder, "inputs", inputs, formats)
    meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": name, "dtype": np.dtype(dtype).name,
            "batch": int(np.shape(x)[0]), "spec": spec.to_dict(), "inputs": describe_tensors(inputs),
            "deltas": delta_names(spec), **(extra or {})}
    tmp = folder / f".case.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "case.json")
    return folder


def read_case(folder) -> tuple:
    """(spec, params, x, y, meta) of a case folder, checked: the schema, the spec, and every tensor the spec needs
    with its shape. Any problem is one ``SpecError`` naming the file."""
    folder = Path(folder)
    path = folder / "case.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpecError(str(path), f"cannot be read ({err})", "give a case folder written by bp-oracle golden") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise SpecError(f"{path}.schema", f"is not {SCHEMA!r}", "give a case folder written by bp-oracle golden")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SpecError(f"{path}.schema_version", f"{meta.get('schema_version')!r} is not {SCHEMA_VERSION}",
                        "regenerate the case with this version of bp-oracle")
    spec = Spec.from_dict(meta.get("spec"), source=f"{path}.spec")
    tensors = read_tensors(folder, "inputs", str(folder / "inputs"))
    for key in ("x", "y"):
        if key not in tensors:
            raise SpecError(str(folder / "inputs"), f"has no {key!r}", f"write {key} into the inputs file")
    shapes = spec.state_shapes()
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise SpecError(str(folder / "inputs"), f"has no parameter {missing[0]!r}", "write every parameter the spec names")
    for k, shape in shapes.items():
        if tensors[k].shape != tuple(shape):
            raise SpecError(f"{folder / 'inputs'}[{k}]", f"has shape {tensors[k].shape}", f"its shape must be {tuple(shape)}")
    params = {k: tensors[k] for k in shapes}
    return spec, params, tensors["x"], tensors["y"], meta


def read_outputs(folder, spec: Spec, what: str = "outputs") -> tuple:
    """A program's answer in the layout: (loss, grads, deltas or None, grad_input or None, forward) with forward
    ``{"z.layers.0": ..., "a.layers.0": ...}`` (whatever it wrote). Unknown names are refused, so a typo cannot
    leave a tensor unchecked; shapes and dtypes are the checker's to judge."""
    folder = Path(folder)
    t = read_tensors(folder, "outputs", what)
    params, nodes_ = set(spec.param_shapes()), set(delta_names(spec))
    grads, deltas, forward, loss, grad_input = {}, {}, {}, None, None
    for k, v in t.items():
        if k == "loss":
            loss = v
        elif k == "input.grad":
            grad_input = v
        elif k.startswith("grad.") and k[5:] in params:
            grads[k[5:]] = v
        elif k.startswith("delta.") and k[6:] in nodes_:
            deltas[k[6:]] = v
        elif k.split(".", 1)[0] in ("z", "a") and k.split(".", 1)[-1] in nodes_:
            forward[k] = v
        else:
            raise SpecError(what, f"holds an unknown tensor {k!r}",
                            "name tensors loss, input.grad, grad.<parameter>, delta.<layer>, z.<layer> or a.<layer>")
    if loss is None:
        raise SpecError(what, "has no 'loss'", "write the loss as a 0-d tensor named loss")
    return loss, grads, deltas or None, grad_input, forward
