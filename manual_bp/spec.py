"""The network spec: one JSON document that both manual_bp and the oracle read.

Format (version 1)::

    {
      "format_version": 1,
      "name": "seed-simple",                       # optional
      "description": "...",                        # optional
      "input_size": 3,
      "layers": [
        {"type": "dense", "units": 4, "activation": "sigmoid", "bias": false},
        {"type": "dense", "units": 1, "activation": {"name": "leaky_relu", "negative_slope": 0.1}}
      ],
      "loss": "half_sse"                           # or {"name": "huber", "delta": 0.5}
    }

Every layer names its ``type``; new types join ``layers.LAYER_TYPES`` without changing old specs.
Parameters are named ``layers.{i}.weight`` / ``layers.{i}.bias``, i the layer's position in the list
(as in ``torch.nn.Sequential``), so they copy one to one into the PyTorch twin.

``Spec.to_json()`` writes the canonical form (every field explicit, parameters of activations and
losses filled in); reading it back gives an equal ``Spec`` and writing that gives the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SpecError
from .layers import LAYER_TYPES, parse_named, positive_int, reject_unknown
from .losses import Loss, make_loss

FORMAT_VERSION = 1
SPEC_FIELDS = ("format_version", "name", "description", "input_size", "layers", "loss")


@dataclass(frozen=True)
class Spec:
    input_size: int
    layers: tuple
    loss: Loss
    name: str = ""
    description: str = ""
    format_version: int = FORMAT_VERSION
    _shapes: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self):
        shapes, n_in = {}, self.input_size
        for i, layer in enumerate(self.layers):
            for pname, shape in layer.param_shapes(n_in).items():
                shapes[f"layers.{i}.{pname}"] = shape
            n_in = layer.units
        object.__setattr__(self, "_shapes", shapes)

    def __repr__(self) -> str:  # paste-able, e.g. into a Hypothesis falsifying example
        return f"Spec.from_json({json.dumps(self.to_dict(), ensure_ascii=False)!r})"

    @property
    def output_size(self) -> int:
        return self.layers[-1].units

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in layer order: ``{"layers.0.weight": (out, in), ...}``."""
        return dict(self._shapes)

    def describe(self) -> str:
        """One line: ``3 -> 4 sigmoid -> 4 sigmoid -> 1 identity, half_sse``."""
        parts = [str(self.input_size)] + [
            f"{l.units} {l.activation.name}{'' if l.bias else ' (no bias)'}" for l in self.layers
        ]
        return " -> ".join(parts) + f", {self.loss.name}"

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "description": self.description,
            "input_size": self.input_size,
            "layers": [layer.to_json() for layer in self.layers],
            "loss": self.loss.to_json(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, obj: Any) -> "Spec":
        if not isinstance(obj, dict):
            raise SpecError("spec", f"the top level is a {type(obj).__name__}, not an object", "write a JSON object {...}")
        reject_unknown(obj, SPEC_FIELDS, "")
        for key in ("format_version", "input_size", "layers", "loss"):
            if key not in obj:
                raise SpecError(key, "missing", f"a spec needs {', '.join(('format_version', 'input_size', 'layers', 'loss'))}")
        version = obj["format_version"]
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise SpecError("format_version", f"{version!r} is not supported", f"this version reads format_version {FORMAT_VERSION}")
        for key in ("name", "description"):
            if not isinstance(obj.get(key, ""), str):
                raise SpecError(key, f"{obj[key]!r} is not a string", "give text or leave it out")
        layers_json = obj["layers"]
        if not isinstance(layers_json, list) or not layers_json:
            raise SpecError("layers", f"{layers_json!r} is not a non-empty list", "give at least one layer")
        layers = []
        for i, lj in enumerate(layers_json):
            where = f"layers[{i}]"
            if not isinstance(lj, dict):
                raise SpecError(where, f"{lj!r} is not an object", 'write {"type": "dense", "units": ..., "activation": ...}')
            kind = lj.get("type")
            if kind not in LAYER_TYPES:
                raise SpecError(f"{where}.type", f"unknown layer type {kind!r}", f"choose one of: {', '.join(LAYER_TYPES)}")
            layer = LAYER_TYPES[kind].from_json(lj, where)
            if layer.activation.output_only and i != len(layers_json) - 1:
                raise SpecError(
                    f"{where}.activation", f"{layer.activation.name} couples the units and may only end the network",
                    "move it to the last layer or use an elementwise activation",
                )
            layers.append(layer)
        loss = parse_named(obj["loss"], "loss", make_loss)
        misfit = loss.check_output(layers[-1].activation, layers[-1].units)
        if misfit:
            raise SpecError("loss", f"{loss.name!r} does not fit the output layer: {misfit[0]}", misfit[1])
        return cls(
            input_size=positive_int(obj["input_size"], "input_size"),
            layers=tuple(layers),
            loss=loss,
            name=obj.get("name", ""),
            description=obj.get("description", ""),
            format_version=version,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "spec") -> "Spec":
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SpecError(source, f"is not UTF-8 text (byte {err.start})", "save the spec as UTF-8 JSON") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(source, f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}", "fix the JSON syntax") from None
        return cls.from_dict(obj)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; any problem raises one ``SpecError`` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(str(path), f"cannot be read ({err.strerror or err})", "check the path") from None
    return Spec.from_json(data, source=str(path))


def example_names() -> list[str]:
    """Names of the specs that ship with manual_bp (``seed-simple``, ...)."""
    return sorted(p.name[: -len(".json")] for p in resources.files("manual_bp.specs").iterdir() if p.name.endswith(".json"))


def example(name: str) -> Spec:
    """A built-in spec by name."""
    if name not in example_names():
        raise SpecError("example", f"no built-in spec called {name!r}", f"choose one of: {', '.join(example_names())}")
    text = resources.files("manual_bp.specs").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return Spec.from_json(text, source=f"example {name}")
