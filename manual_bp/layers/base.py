r"""What every layer type shares: the contract, and the helpers that parse its spec fields.

A layer maps the previous activation :math:`a^{(l)}` to a pre-activation :math:`z^{(l+1)}`; its
activation g then gives :math:`a^{(l+1)} = g(z^{(l+1)})` (layers without an activation field, such as
pooling and flatten, carry the identity). Backward is handed
:math:`\delta = \partial C/\partial z^{(l+1)}`, in z's shape, and returns the parameter gradients and
:math:`\partial C/\partial a^{(l)}` for the layer below. Tensors are batch first: vectors (m, n),
1-D signals (m, C, L), images (m, C, H, W); a layer's ``in_shape``/``out_shape`` leave out m.

The contract of a layer class (a frozen dataclass; see :class:`~manual_bp.layers.dense.Dense`)::

    type: ClassVar[str]                    # its spec "type"
    activation: Activation                 # g, applied by the network after forward
    from_json(obj, where) -> layer         # SpecErrors name the field, e.g. "layers[3].stride"
    to_json() -> dict                      # the canonical form, every field explicit
    out_shape(in_shape, where) -> tuple    # refuses a wrong rank or an empty output, naming both shapes
    param_shapes(in_shape) -> dict         # torch's layouts, named as in its nn.Module's state_dict
    forward(p, a) -> z                     # a: (m, *in_shape)
    backward(p, a, delta) -> (grads, grad_a)

Adding a layer type means four parts, one on each side plus its tests of the oracle:

1. the NumPy class in ``manual_bp/layers/<family>.py`` (``dense.py``, ``conv.py``, ``pool.py``,
   ``reshape.py``, ...), exported from ``manual_bp/layers/__init__.py`` and registered there in
   ``LAYER_TYPES`` under its ``type``;
2. its torch twin, built from ``torch.nn.functional`` (never from manual_bp code), registered by
   type in ``oracle/twin.py``;
3. its Hypothesis strategy (fields with valid sizes, and the edge cases) in ``oracle/strategies.py``;
4. its mutants, realistic wrong backwards for it, in ``oracle/mutants.py``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..activations import Activation, make_activation
from ..errors import SpecError
from ..named import count, show, show_key

#: the largest units or input_size a spec may give (a layer of more is no network one can check)
MAX_SIZE = 2**31


def parse_named(value: Any, field: str, make) -> Any:
    """An activation or loss from its spec form: a name, or ``{"name": ..., param: value, ...}``."""
    if isinstance(value, str):
        params: dict[str, Any] = {}
        name = value
    elif isinstance(value, dict):
        if "name" not in value:
            raise SpecError(field, f"{show(value)} has no 'name'", 'write e.g. {"name": "leaky_relu", "negative_slope": 0.1}')
        params = {k: v for k, v in value.items() if k != "name"}
        for key in params:
            if not isinstance(key, str):
                raise SpecError(f"{field}.{show_key(key)}", "is not a parameter name", "name parameters with strings")
        name = value["name"]
        if not isinstance(name, str):
            raise SpecError(f"{field}.name", f"{show(name)} is not a string", "give the name as a string")
    else:
        raise SpecError(field, f"{show(value)} is neither a name nor an object", 'write a name such as "tanh"')
    try:
        return make(name, **params)
    except SpecError as err:
        # re-anchor the message at the full path of the field
        sub = err.field.partition(".")[2]
        raise SpecError(f"{field}.{sub}" if sub else field, err.problem, err.fix) from None


def positive_int(value: Any, field: str, maximum: int = MAX_SIZE) -> int:
    """A whole number in [1, maximum] (a JSON integer: not a bool, not 3.0, not "3")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"{show(value)} is not an integer", "give a whole number ≥ 1")
    if value < 1:
        raise SpecError(field, f"{show(value)} is not positive", "give a whole number ≥ 1")
    if value > maximum:
        raise SpecError(field, f"{count(value)} is too large", f"give at most {maximum}")
    return int(value)


def reject_unknown(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            key = show_key(key)
            raise SpecError(f"{where}.{key}" if where else key, "unknown field", f"allowed fields are: {', '.join(allowed)}")


# -- helpers of the layers with spatial axes (conv, pool, reshape) -------------------------------------
def at(where: str, key: str) -> str:
    """The field ``key`` of the layer at ``where`` (just ``key`` when there is no ``where``)."""
    return f"{where}.{key}" if where else key


def parse_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(field, f"{show(value)} is not true or false", "write true or false")
    return value


def whole(value: Any, field: str, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """A whole number in [minimum, maximum] (``positive_int`` for minimum 1; padding allows 0)."""
    if minimum >= 1:
        return positive_int(value, field, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"{show(value)} is not an integer", f"give a whole number ≥ {minimum}")
    if value < minimum:
        raise SpecError(field, f"{show(value)} is negative", f"give a whole number ≥ {minimum}")
    if value > maximum:
        raise SpecError(field, f"{count(value)} is too large", f"give at most {maximum}")
    return int(value)


def int_tuple(value: Any, field: str, nd: int, minimum: int = 1) -> tuple[int, ...]:
    """One whole number per spatial axis: an int (the same on every axis) or a list of ``nd`` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != nd:
            axes = "one number" if nd == 1 else f"{nd} numbers"
            raise SpecError(field, f"{show(value)} has {len(value)} entries", f"give a whole number or a list of {axes}, one per spatial axis")
        return tuple(whole(v, f"{field}[{j}]", minimum) for j, v in enumerate(value))
    return (whole(value, field, minimum),) * nd


def tuple_json(values: tuple[int, ...]) -> int | list[int]:
    """The canonical JSON of a per-axis setting: one int when all axes agree, else the list."""
    return values[0] if len(set(values)) == 1 else list(values)


def shape_text(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple: ``(64,)``, ``(3, 32, 32)``."""
    return str(tuple(int(d) for d in shape))


#: the axes a layer with nd spatial axes reads, for error messages
AXES = {1: "(C, L)", 2: "(C, H, W)"}


def check_rank(kind: str, in_shape: Sequence[int], nd: int, where: str) -> tuple[int, ...]:
    """``in_shape`` as a tuple of ints if it has ``nd`` spatial axes after the channels, else the
    error ``layers[3]: conv2d needs (C, H, W) input, got (64,)``."""
    shape = tuple(int(d) for d in in_shape)
    if len(shape) != nd + 1:
        raise SpecError(where, f"{kind} needs {AXES[nd]} input, got {shape_text(shape)}")
    return shape


def check_nonempty(kind: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], where: str, fix: str) -> tuple[int, ...]:
    """``out_shape`` if every size in it is ≥ 1, else an error naming both shapes."""
    if min(out_shape) < 1:
        raise SpecError(where, f"{kind} maps {shape_text(in_shape)} to {shape_text(out_shape)}, an empty output", fix)
    return out_shape


def number(value: Any, field: str, low: float, high: float, *, open_low: bool = False, open_high: bool = False,
           hint: str = "") -> float:
    """A finite JSON number in [low, high] (either end open on request), e.g. eps > 0 or p in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(field, f"{show(value)} is not a finite number", hint or "give a number")
    value = float(value)
    if value < low or value > high or (open_low and value == low) or (open_high and value == high):
        span = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise SpecError(field, f"{value:g} is outside {span}", hint or f"give a number in {span}")
    return value


def optional_activation(obj: dict, where: str) -> Activation:
    """The optional ``activation`` of a layer that is usually followed by none (norm, dropout): identity."""
    if "activation" not in obj:
        return make_activation("identity")
    return parse_named(obj["activation"], at(where, "activation"), make_activation)


# -- what a forward keeps for its backward (conv's im2col, a norm's x̂ and s, a block's body) -------------------
def forward_keeping(layer, p: dict, a):
    """(z, saved): ``layer.forward_saved`` where the type has one (what its backward reuses), else (z, None)."""
    if hasattr(layer, "forward_saved"):
        return layer.forward_saved(p, a)
    return layer.forward(p, a), None


def kept(saved) -> tuple:
    """The extra argument a backward (or ``updated_buffers``) takes: (saved,), or () when nothing was kept."""
    return () if saved is None else (saved,)
