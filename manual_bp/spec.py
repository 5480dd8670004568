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
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SpecError
from .layers import LAYER_TYPES, parse_named, positive_int, reject_unknown
from .losses import Loss, make_loss
from .named import count, show

FORMAT_VERSION = 1
SPEC_FIELDS = ("format_version", "name", "description", "input_size", "input", "layers", "loss")
#: version 1: {"input_size": n}, dense layers; version 2: {"input": {"shape": [C, H, W]}}, any layer type
FORMAT_VERSIONS = (1, 2)
#: most parameters (weights and biases, all layers together) a spec may have: 16 GiB in float64
MAX_PARAMETERS = 2**31
#: deepest nesting of lists and objects a spec may have; a valid one nests 4 deep (spec, layers, layer,
#: activation object), so this only stops documents built to exhaust the parser or the stack
MAX_DEPTH = 32
#: layer types that may end a network with a sequence (T, k): a loss at every step, on m·T rows of k
SEQUENCE_HEADS = ("temporal_dense",)
#: largest spec file read (a spec is a small JSON document; this stops /dev/zero and the like)
MAX_FILE_BYTES = 16 * 2**20
#: a name becomes part of a report folder's name: at most this many UTF-8 bytes
MAX_NAME_BYTES = 200


@dataclass(frozen=True)
class Spec:
    input_size: int                  # the number of input features (the product of input_shape)
    layers: tuple
    loss: Loss
    name: str = ""
    description: str = ""
    format_version: int = FORMAT_VERSION
    input_shape: tuple = None        # one example's shape, batch first omitted: (n,), (C, L), (C, H, W)
    _shapes: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _out_shapes: tuple = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _buffers: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self):
        if self.input_shape is None:
            object.__setattr__(self, "input_shape", (self.input_size,))
        shapes, buffers, shape, total, outs = {}, {}, tuple(self.input_shape), 0, []
        for i, layer in enumerate(self.layers):
            where = f"layers.{i}"
            if i > 0 and getattr(layer, "tokens", False):
                raise SpecError(where, f"{layer.type} takes integer token indices, so it must be the first layer",
                                "move it to the front, or use a dense layer here")
            layer_shapes = layer.param_shapes(shape, where)
            n = sum(math.prod(s) for s in layer_shapes.values())
            if n > MAX_PARAMETERS:
                dims = " + ".join(" × ".join(str(d) for d in s) for s in layer_shapes.values())
                raise SpecError(f"layers[{i}]", f"{count(n)} parameters ({dims}) is too large",
                                f"a spec may have at most {MAX_PARAMETERS} (2^31) parameters; use fewer units")
            total += n
            for pname, s in layer_shapes.items():
                shapes[f"{where}.{pname}"] = s
            for bname, s in getattr(layer, "buffer_shapes", lambda *_: {})(shape, where).items():
                buffers[f"{where}.{bname}"] = s
            shape = layer.out_shape(shape, where)
            outs.append(shape)
        if total > MAX_PARAMETERS:
            raise SpecError("layers", f"{count(total)} parameters in all is too large",
                            f"a spec may have at most {MAX_PARAMETERS} (2^31) parameters; use fewer or narrower layers")
        if len(outs[-1]) != 1 and not (len(outs[-1]) == 2 and self.layers[-1].type in SEQUENCE_HEADS):
            raise SpecError(f"layers.{len(self.layers) - 1}", f"the network ends in {outs[-1]}, but a loss needs a vector (n,)"
                            " or, after a temporal_dense head, a sequence (T, k)",
                            "end with a flatten and a dense layer, or (a loss at every step) with a temporal_dense layer")
        object.__setattr__(self, "_shapes", shapes)
        object.__setattr__(self, "_buffers", buffers)
        object.__setattr__(self, "_out_shapes", tuple(outs))

    def __repr__(self) -> str:  # paste-able, e.g. into a Hypothesis falsifying example
        return f"Spec.from_json({json.dumps(self.to_dict(), ensure_ascii=False)!r})"

    @property
    def output_size(self) -> int:
        """k, the units of the output (its last axis): one example's (k,), or each step's of a sequence (T, k)."""
        return self._out_shapes[-1][-1]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """One example's output, batch first omitted: (k,), or (T, k) for a sequence with a per-step head
        (the loss then applies to the m·T rows of k, see ``manual_bp.losses``)."""
        return self._out_shapes[-1]

    def out_shape(self, i: int) -> tuple[int, ...]:
        """The shape of layer i's output (and of its δ), one example, batch first omitted."""
        return self._out_shapes[i]

    def in_shape(self, i: int) -> tuple[int, ...]:
        """The shape of layer i's input, one example."""
        return tuple(self.input_shape) if i == 0 else self._out_shapes[i - 1]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in layer order: ``{"layers.0.weight": (out, in), ...}``."""
        return dict(self._shapes)

    @property
    def token_input(self) -> bool:
        """The input is integer token indices (the first layer is an embedding), not values."""
        return bool(self.layers) and getattr(self.layers[0], "tokens", False)

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """State that is not a parameter and gets no gradient, named as in torch's state_dict:
        ``{"layers.2.running_mean": (C,), "layers.2.running_var": (C,)}`` for a batch norm."""
        return dict(self._buffers)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Everything a case's params dict holds, as torch's ``state_dict()``: parameters, then buffers."""
        return {**self._shapes, **self._buffers}

    def check_batch(self, m: int) -> None:
        """Refuse a batch of m examples that some layer cannot take (batch norm in training mode with one
        value per channel), naming the layer."""
        for i, layer in enumerate(self.layers):
            if hasattr(layer, "check_batch"):
                layer.check_batch(m, self.in_shape(i), f"layers.{i}")

    def describe(self) -> str:
        """One line: ``3 -> 4 sigmoid -> 4 sigmoid -> 1 identity, half_sse``; ``3x8x8 -> conv2d 4 relu -> ...``."""
        parts = ["x".join(str(d) for d in self.input_shape)] + [describe_layer(layer) for layer in self.layers]
        return " -> ".join(parts) + f", {self.loss.name}"

    # -- JSON --------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """What a copy or a pickle of the spec keeps: everything but attributes named ``_cache_*`` (derived data
        another package attaches, such as the oracle's node list), which are rebuilt when next asked for."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache_")}

    def __deepcopy__(self, memo) -> "Spec":
        """``__getstate__``'s fields, each deep-copied: shares nothing mutable with this spec (half the time of
        the generic reduce-based copy)."""
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__getstate__().items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    def to_dict(self) -> dict[str, Any]:
        head = {"format_version": self.format_version, "name": self.name, "description": self.description}
        if self.format_version == 1:
            head["input_size"] = self.input_size
        else:
            head["input"] = {"shape": list(self.input_shape)}
        return {**head, "layers": [layer.to_json() for layer in self.layers], "loss": self.loss.to_json()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, obj: Any, source: str = "spec") -> "Spec":
        """Validate a parsed spec; ``source`` (a file name) names the whole document in messages."""
        if not isinstance(obj, dict):
            raise SpecError(source, f"the top level is a {type(obj).__name__}, not an object", "write a JSON object {...}")
        check_depth(obj, source)
        reject_unknown(obj, SPEC_FIELDS, "")
        if "format_version" not in obj:
            raise SpecError("format_version", "missing", "a spec starts with \"format_version\": 1 (vector input) or 2 (input shape)")
        version = obj["format_version"]
        if type(version) is not int or version not in FORMAT_VERSIONS:  # not True, not 1.0, not "1"
            raise SpecError("format_version", f"{show(version)} is not supported",
                            f"this version reads format_version {' or '.join(map(str, FORMAT_VERSIONS))} (the integer)")
        size_key = "input_size" if version == 1 else "input"
        wrong_key = "input" if version == 1 else "input_size"
        if wrong_key in obj:
            raise SpecError(wrong_key, f"is not a field of format_version {version}",
                            'version 1 gives "input_size": n, version 2 gives "input": {"shape": [...]}')
        for key in (size_key, "layers", "loss"):
            if key not in obj:
                raise SpecError(key, "missing", f"a spec needs format_version, {size_key}, layers and loss")
        for key in ("name", "description"):
            check_text(obj.get(key, ""), key)
        layers_json = obj["layers"]
        if not isinstance(layers_json, list) or not layers_json:
            raise SpecError("layers", f"{show(layers_json)} is not a non-empty list", "give at least one layer")
        layers = []
        for i, lj in enumerate(layers_json):
            where = f"layers[{i}]"
            if not isinstance(lj, dict):
                raise SpecError(where, f"{show(lj)} is not an object", 'write {"type": "dense", "units": ..., "activation": ...}')
            kind = lj.get("type")
            if not isinstance(kind, str) or kind not in LAYER_TYPES:
                raise SpecError(f"{where}.type", f"unknown layer type {show(kind)}", f"choose one of: {', '.join(LAYER_TYPES)}")
            if version == 1 and kind != "dense":
                raise SpecError(f"{where}.type", f"{kind} needs the input's shape",
                                'write format_version 2 with "input": {"shape": [C, H, W]} (or [C, L])')
            layer = LAYER_TYPES[kind].from_json(lj, where)
            if layer.activation.output_only and i != len(layers_json) - 1:
                raise SpecError(
                    f"{where}.activation", f"{layer.activation.name} couples the units and may only end the network",
                    "move it to the last layer or use an elementwise activation",
                )
            layers.append(layer)
        loss = parse_named(obj["loss"], "loss", make_loss)
        input_shape = (positive_int(obj["input_size"], "input_size"),) if version == 1 else _input_shape(obj["input"])
        spec = cls(
            input_size=math.prod(input_shape),
            layers=tuple(layers),
            loss=loss,
            name=obj.get("name", ""),
            description=obj.get("description", ""),
            format_version=version,
            input_shape=input_shape,
        )
        misfit = loss.check_output(layers[-1].activation, spec.output_size)
        if misfit:
            raise SpecError("loss", f"{loss.name!r} does not fit the output layer: {misfit[0]}", misfit[1])
        return spec

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "spec") -> "Spec":
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8-sig")  # a leading byte-order mark is allowed
            except UnicodeDecodeError as err:
                raise SpecError(source, f"is not UTF-8 text (byte {err.start})", "save the spec as UTF-8 JSON") from None
        if not isinstance(text, str):
            raise SpecError(source, f"is a {type(text).__name__}, not JSON text", "pass the spec as str or bytes")
        try:  # json's C parser guards its own recursion: nesting deeper than the stack allows is a RecursionError
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpecError(source, f"is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}", "fix the JSON syntax") from None
        except RecursionError:
            raise SpecError(source, f"is nested too deeply (more than {MAX_DEPTH} levels of [ and {{)", _DEPTH_FIX) from None
        except ValueError as err:  # e.g. an integer of more than 4300 digits
            raise SpecError(source, f"is not valid JSON: {str(err).partition(':')[0][:100]}", "fix the JSON") from None
        return cls.from_dict(obj, source)


_DEPTH_FIX = ("a layer nests 3 levels (spec, layers, layer, activation) and each residual block 2 more (body, layer): "
              f"at most {32} levels in all, about 14 blocks inside one another")


def describe_layer(layer) -> str:
    """One layer in ``Spec.describe``: ``8 tanh``, ``conv2d 4 relu``, ``batch_norm relu``, ``residual[...] relu``."""
    act = layer.activation.name
    if layer.type == "dense":
        return f"{layer.units} {act}{'' if layer.bias else ' (no bias)'}"
    if hasattr(layer, "out_channels"):
        return f"{layer.type} {layer.out_channels} {act}{'' if layer.bias else ' (no bias)'}"
    if layer.type == "residual":
        proj = "" if layer.projection is None else f" + {describe_layer(layer.projection)}"
        head = f"residual[{' -> '.join(describe_layer(inner) for inner in layer.body)}{proj}]"
        return head if act == "identity" else f"{head} {act}"
    if layer.type == "attention":  # ``attention 4 heads causal``, ``attention 1 head relu (no bias)``
        head = f"attention {layer.num_heads} head{'s' if layer.num_heads > 1 else ''}{' causal' if layer.causal else ''}"
        return f"{head}{'' if act == 'identity' else ' ' + act}{'' if layer.bias else ' (no bias)'}"
    if hasattr(layer, "hidden_size"):  # rnn, lstm, gru: "lstm 16 (last step)"
        return layer.describe() if act == "identity" else f"{layer.describe()} {act}"
    return layer.type if act == "identity" else f"{layer.type} {act}"


def check_depth(obj: Any, source: str = "spec") -> None:
    """Refuse lists and objects nested more than MAX_DEPTH deep (iteratively: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise SpecError(source, f"is nested too deeply (more than {MAX_DEPTH} levels of lists and objects)", _DEPTH_FIX)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def check_text(value: Any, field: str) -> str:
    """``name`` and ``description``: text that can be printed and written as UTF-8; a name is also a
    short label without path separators or control characters, since it names the report folder."""
    if not isinstance(value, str):
        raise SpecError(field, f"{show(value)} is not a string", "give text or leave it out")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SpecError(field, f"holds a lone surrogate at character {err.start}", "give valid Unicode text") from None
    if field == "name":
        if len(encoded) > MAX_NAME_BYTES:
            raise SpecError(field, f"is {len(encoded)} bytes long", f"give a short name (at most {MAX_NAME_BYTES} bytes)")
        bad = next((c for c in value if c in "/\\" or not c.isprintable()), None)
        if bad is not None:
            raise SpecError(field, f"{show(value)} holds {bad!r}", "a name labels the report folder: no '/', '\\' or control characters")
    return value


def _input_shape(obj: Any) -> tuple[int, ...]:
    """``{"shape": [C, H, W]}`` (1 to 3 positive sizes) as a tuple."""
    if not isinstance(obj, dict):
        raise SpecError("input", f"{show(obj)} is not an object", 'write "input": {"shape": [3, 32, 32]}')
    reject_unknown(obj, ("shape",), "input")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3:
        raise SpecError("input.shape", f"{show(shape)} is not a list of 1 to 3 sizes", "write [n], [C, L] or [C, H, W]")
    return tuple(positive_int(d, f"input.shape[{k}]") for k, d in enumerate(shape))


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; any problem raises one ``SpecError`` naming it."""
    try:
        path = Path(path)
    except TypeError:
        raise SpecError("spec", f"{show(path)} is not a file path", "give the path of a JSON file") from None
    where = str(path) if str(path).isprintable() else ascii(str(path))  # one line, whatever the name holds
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise SpecError(where, f"cannot be read ({getattr(err, 'strerror', None) or err})", "check the path") from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(where, f"is larger than {MAX_FILE_BYTES // 2**20} MiB", "a spec is a small JSON file; check the path")
    return Spec.from_json(data, source=where)


def example_names() -> list[str]:
    """Names of the specs that ship with manual_bp (``seed-simple``, ...)."""
    return sorted(p.name[: -len(".json")] for p in resources.files("manual_bp.specs").iterdir() if p.name.endswith(".json"))


def example(name: str) -> Spec:
    """A built-in spec by name."""
    if name not in example_names():
        raise SpecError("example", f"no built-in spec called {name!r}", f"choose one of: {', '.join(example_names())}")
    text = resources.files("manual_bp.specs").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return Spec.from_json(text, source=f"example {name}")
