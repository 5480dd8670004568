"""Hypothesis strategies for random networks, weights and data (public API).

Architectures are drawn by Hypothesis itself, so a failure shrinks toward the smallest network
(fewer layers, fewer units, simpler activations). Weights and data are drawn by NumPy from a seed
that Hypothesis chooses, in one of five named regimes, so large tensors stay cheap to generate:

* ``well_conditioned``: PyTorch's default init U(±1/√fan_in) and N(0, 1) inputs;
* ``saturated``: large weights and inputs, so |z| reaches tens and sigmoid/tanh/softplus saturate;
* ``near_zero``: weights and inputs around 1e-3, where every activation is nearly linear;
* ``near_kinks``: weights and inputs on a coarse grid of halves, so pre-activations hit relu's 0,
  hardtanh's ±1 and l1's zero residual *exactly*;
* ``exact_kinks``: integer and half-integer weights and data, zero biases, and ties: a weight row
  copied onto another (two units with the same z), a batch row repeated, an input column repeated and
  an all-zero example, so relu-type units sit at z = 0 exactly, max-type ties occur, and value targets
  on the same grid make l1/huber residuals exactly 0. All arithmetic through piecewise-linear layers
  is exact here (dyadic numbers), so every implementation sees the same elements on a kink.

Signals and images (``cnn_specs``: conv, pool and flatten layers, format version 2) draw in the same
regimes, with x of shape (m, *input_shape) and fan_in = prod(θ.shape[1:]); in ``exact_kinks`` an
example made constant along its last axis, or two equal neighbouring positions, make max-pool windows
tie. Dense specs draw exactly what they drew before.

Targets are random (not ones), so the upstream gradient is a random direction: a sum would hide a
transposed or permuted gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from manual_bp import ACTIVATIONS, LOSSES, Spec, SpecError
from manual_bp.losses import IGNORE_INDEX
from .graph import RECURRENT

REGIMES = ("well_conditioned", "saturated", "near_zero", "near_kinks", "exact_kinks")
ELEMENTWISE = tuple(name for name, cls in ACTIVATIONS.items() if not cls.output_only)
VALUE_LOSSES = ("half_sse", "sse", "half_mse", "mse", "l1", "huber", "smooth_l1")


def _activation_strategy(name: str):
    """An activation in spec form, with its parameters drawn where it has any."""
    if name == "leaky_relu":
        return st.builds(lambda s: {"name": name, "negative_slope": s}, st.sampled_from([0.01, 0.1, 0.2, 0.5]))
    if name == "elu":
        return st.builds(lambda a: {"name": name, "alpha": a}, st.sampled_from([1.0, 0.5, 1.5]))
    if name == "softplus":
        return st.builds(lambda b, t: {"name": name, "beta": b, "threshold": t},
                         st.sampled_from([1.0, 0.5, 2.0]), st.sampled_from([20.0, 5.0]))
    if name == "hardtanh":
        return st.builds(lambda lo, hi: {"name": name, "min_val": lo, "max_val": hi},
                         st.sampled_from([-1.0, -0.5, -2.0]), st.sampled_from([1.0, 0.5, 2.0]))
    return st.just(name)


def _loss_strategy(loss: str):
    if loss == "huber":
        return st.builds(lambda d: {"name": loss, "delta": d}, st.sampled_from([1.0, 0.5, 2.0]))
    if loss == "smooth_l1":
        return st.builds(lambda b: {"name": loss, "beta": b}, st.sampled_from([1.0, 0.5, 2.0]))
    return st.just(loss)


# Built once: strategies made inside every draw cost Hypothesis more than the check they feed.
_ACTIVATION = {name: _activation_strategy(name) for name in ACTIVATIONS}
_LOSS = {name: _loss_strategy(name) for name in LOSSES}


def _outputs_for(loss: str) -> tuple:
    """Output activations that fit ``loss``, and the least number of output units."""
    if loss == "bce":
        names = ("sigmoid", "softmax")
    elif loss == "nll":
        names = ("log_softmax",)
    elif loss in ("cross_entropy", "bce_with_logits"):
        names = ("identity",) + ELEMENTWISE
    else:
        names = ("identity",) + ELEMENTWISE + ("softmax",)
    return names, 2 if loss in ("cross_entropy", "nll") else 1


def specs(
    *,
    min_depth: int = 1,
    max_depth: int = 6,
    max_width: int = 32,
    max_input: int = 32,
    activations=ELEMENTWISE,
    losses=tuple(LOSSES),
    bias=None,
    output_activations=None,
    square: bool = False,
) -> st.SearchStrategy:
    """Random valid specs.

    * ``min_depth``/``max_depth``: number of dense layers (1–6 by default);
    * ``max_width``/``max_input``: largest hidden/output layer and input size;
    * ``activations``: names allowed on hidden layers;
    * ``losses``: names of losses to draw from (the output activation is drawn to fit the loss);
    * ``bias``: True/False to force, None to draw per layer;
    * ``output_activations``: names allowed on the output layer (among those that fit the loss);
    * ``square``: every layer has as many units as the input has features (square weights).

    Built from flat tuples and lists (no per-draw strategy objects), so drawing is cheap and a failure
    shrinks by dropping layers, narrowing them and moving to the first-listed activation.
    """
    bias_st = st.booleans() if bias is None else st.just(bias)
    hidden_act = st.one_of([_ACTIVATION[n] for n in activations])
    hidden = st.lists(st.tuples(hidden_act, st.integers(1, max_width), bias_st),
                      min_size=max(min_depth - 1, 0), max_size=max_depth - 1)

    def tail(loss):  # (loss spec, output activation, output units), prebuilt per loss below
        names, least = _outputs_for(loss)
        names = tuple(output_activations) if output_activations is not None else names
        return st.tuples(_LOSS[loss], st.one_of([_ACTIVATION[n] for n in names]),
                         st.integers(least, max(least, min(max_width, 10))), bias_st, st.just(least))

    tails = {loss: tail(loss) for loss in losses}
    width = st.integers(1, max_width) if square else st.just(None)

    def assemble(hidden_layers, tail_parts, input_size, square_width):
        loss_spec, out_act, out_units, out_bias, least = tail_parts
        if square_width is not None:
            n = max(square_width, least)
            hidden_layers = [(act, n, b) for act, _, b in hidden_layers]
            out_units = input_size = n
        layers = [{"type": "dense", "units": u, "activation": act, "bias": b} for act, u, b in hidden_layers]
        layers.append({"type": "dense", "units": out_units, "activation": out_act, "bias": out_bias})
        return Spec.from_dict({"format_version": 1, "input_size": input_size, "layers": layers, "loss": loss_spec})

    return st.builds(assemble, hidden, st.sampled_from(list(losses)).flatmap(tails.__getitem__),
                     st.integers(1, max_input), width)


# -- convolutional networks (format version 2) --------------------------------------------------------
def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _groups(c_in: int, out: int, pick: int, groups: str, square: bool) -> tuple[int, int]:
    """(groups, out_channels) from the drawn ``out`` and ``pick``: groups divide both channel counts.

    ``groups`` is "any" (a common divisor, 1 first), "ungrouped" (1) or "grouped" (≥ 2 wherever
    c_in allows it; out_channels then a multiple of it); ``square`` makes out_channels = c_in.
    """
    c_out = c_in if square else out
    if groups == "ungrouped":
        return 1, c_out
    if groups == "grouped":
        big = [d for d in _divisors(c_in) if d >= 2]
        if big:
            g = big[pick % len(big)]
            return g, c_in if square else g * (1 + (out - 1) % 2)
    common = _divisors(math.gcd(c_in, c_out))
    return common[pick % len(common)], c_out


def _conv_fields(raw, nd: int, c_in: int, opts: dict) -> tuple[dict, int]:
    """A conv layer's fields (kernel, stride, padding, dilation as per-axis lists) and its out channels."""
    act, kernel, stride, dilation, padding, same, out, pick, bias = raw
    stride = list(stride[:nd])
    same = same and opts["same"] and all(s == 1 for s in stride)
    g, c_out = _groups(c_in, out, pick, opts["groups"], opts["square_channels"])
    return {"type": f"conv{nd}d", "out_channels": c_out, "kernel_size": list(kernel[:nd]), "stride": stride,
            "padding": "same" if same else list(padding[:nd]), "dilation": list(dilation[:nd]), "groups": g,
            "activation": act, "bias": bias}, c_out


def _pool_fields(raw, nd: int) -> dict | None:
    """A pooling layer's fields (padding ≤ kernel/2, as torch requires), or None for no pool."""
    kind, kernel, stride, padding, include = raw
    if kind is None:
        return None
    kernel = list(kernel[:nd])
    fields = {"type": f"{kind}_pool{nd}d", "kernel_size": kernel, "stride": list(kernel) if stride is None else list(stride[:nd]),
              "padding": [min(p, k // 2) for p, k in zip(padding[:nd], kernel)]}
    if kind == "avg":
        fields["count_include_pad"] = include
    return fields


def _extent(layer: dict, t: int) -> tuple[int, int, int, int]:
    """(e, s, lo + hi, same) along axis t: the window's extent d(k − 1) + 1, stride, total padding."""
    k, s = layer["kernel_size"][t], layer["stride"][t]
    d = layer["dilation"][t] if "dilation" in layer else 1
    if layer["padding"] == "same":
        return d * (k - 1) + 1, 1, d * (k - 1), True
    return d * (k - 1) + 1, s, 2 * layer["padding"][t], False


def _least_input(layers: list, t: int) -> int:
    """The smallest size of axis t for which every layer has an output: walk back from one position,
    n_in = s(n_out − 1) + e − (lo + hi) (n_in = n_out for "same")."""
    need = 1
    for layer in reversed(layers):
        e, s, pads, same = _extent(layer, t)
        need = need if same else max(1, s * (need - 1) + e - pads)
    return need


def _fit(layer: dict, t: int, n: int) -> int:
    """Shrink layer's dilation, then kernel, on axis t until its output is not empty; the output size.

    Only needed where the drawn layers want a larger input than ``max_side``; kernel 1 always fits."""
    while True:
        e, s, pads, same = _extent(layer, t)
        out = n if same else (n + pads - e) // s + 1
        if out >= 1:
            return out
        if layer.get("dilation", [1] * 3)[t] > 1:
            layer["dilation"][t] -= 1
        else:
            layer["kernel_size"][t] -= 1
            if "dilation" not in layer:  # a pool: padding ≤ kernel/2
                layer["padding"][t] = min(layer["padding"][t], layer["kernel_size"][t] // 2)


def _range(bounds) -> st.SearchStrategy:
    lo, hi = bounds
    return st.integers(lo, hi)


def cnn_specs(
    *,
    nd=(1, 2),
    min_convs: int = 1,
    max_convs: int = 3,
    min_side: int = 1,
    max_side: int = 10,
    in_channels=(1, 3),
    channels=(1, 4),
    kernel=(1, 4),
    stride=(1, 3),
    dilation=(1, 2),
    padding=(0, 2),
    same: bool = True,
    groups: str = "any",
    square_channels: bool = False,
    pools=(None, "max", "avg"),
    pool_kernel=(1, 3),
    pool_stride=(1, 3),
    pool_padding=(0, 1),
    count_include_pad=None,
    max_dense: int = 2,
    max_width: int = 8,
    activations=ELEMENTWISE,
    losses=tuple(LOSSES),
    bias=None,
    output_activations=None,
) -> st.SearchStrategy:
    """Random valid convolutional specs (format version 2): conv blocks, flatten, dense layers, a loss.

    The input is (C, L) or (C, H, W) (``nd`` 1 or 2 spatial axes, C in ``in_channels``, sides in
    [``min_side``, ``max_side``]), then ``min_convs``–``max_convs`` blocks of a conv layer, each optionally followed by a
    pool, then flatten and 0–``max_dense`` dense layers (the last one fits the loss, as in ``specs()``;
    with none, the flatten's identity output must fit it, else one dense layer is added).

    Conv fields are drawn per axis from the ranges ``kernel``, ``stride``, ``dilation``, ``padding``
    (inclusive); ``same`` lets a stride-1 conv draw ``padding="same"``; ``groups`` is "any" (a common
    divisor of the channel counts), "grouped" (≥ 2 wherever the input channels allow) or "ungrouped";
    out_channels are drawn from ``channels``, or ``square_channels`` keeps them = in_channels; ``pools`` lists what may follow a conv (None:
    nothing, "max", "avg"; the first is where shrinking goes), with kernel and stride ranges
    ``pool_kernel``/``pool_stride`` (or the default stride k), padding from ``pool_padding`` but ≤ k/2, and ``count_include_pad``
    drawn (None) or forced. ``activations`` are drawn on conv and hidden dense layers; ``losses``,
    ``bias`` and ``output_activations`` as in ``specs()``.

    Sizes never give an empty output: the input is made at least as large as the drawn layers need
    (walking back from one output position), and where that exceeds ``max_side`` the layers' dilation
    and kernel shrink until they fit. Everything is drawn from flat tuples, so a failure shrinks to
    fewer blocks, no pools, no dense layers, kernel/stride/dilation 1, no padding, groups 1, 1-D.
    """
    bias_st = st.booleans() if bias is None else st.just(bias)
    act = st.one_of([_ACTIVATION[n] for n in activations])
    pair = lambda bounds: st.tuples(_range(bounds), _range(bounds))  # noqa: E731  (one value per axis)
    conv = st.tuples(act, pair(kernel), pair(stride), pair(dilation), pair(padding),
                     st.booleans() if same else st.just(False), _range(channels), st.integers(0, 3), bias_st)
    include = st.booleans() if count_include_pad is None else st.just(count_include_pad)
    pool = st.tuples(st.sampled_from(list(pools)), pair(pool_kernel), st.none() | pair(pool_stride),
                     pair(pool_padding), include)
    blocks = st.lists(st.tuples(conv, pool), min_size=min_convs, max_size=max_convs)
    hidden = st.lists(st.tuples(act, st.integers(1, max_width), bias_st), max_size=max(max_dense - 1, 0))

    def tail(loss):  # as in specs(): (loss spec, output activation, output units, bias, least units, identity fits)
        names, least = _outputs_for(loss)
        names = tuple(output_activations) if output_activations is not None else names
        return st.tuples(_LOSS[loss], st.one_of([_ACTIVATION[n] for n in names]),
                         st.integers(least, max(least, min(max_width, 10))), bias_st, st.just(least),
                         st.just("identity" in names))

    tails = {loss: tail(loss) for loss in losses}
    sides = st.tuples(st.integers(min_side, max_side), st.integers(min_side, max_side))
    dense_end = st.booleans() if max_dense > 0 else st.just(False)

    def assemble(n_axes, channels, drawn_sides, block_parts, hidden_layers, use_dense, tail_parts):
        layers, c = [], channels
        for conv_raw, pool_raw in block_parts:
            fields, c = _conv_fields(conv_raw, n_axes, c, opts)
            layers.append(fields)
            pooled = _pool_fields(pool_raw, n_axes)
            if pooled is not None:
                layers.append(pooled)
        spatial = []
        for t in range(n_axes):
            n = min(max(drawn_sides[t], _least_input(layers, t)), max_side)
            spatial.append(n)
            for layer in layers:
                n = _fit(layer, t, n)
        loss_spec, out_act, out_units, out_bias, least, identity_fits = tail_parts
        layers.append({"type": "flatten"})
        flat = c * math.prod(_out_sides(layers, spatial))
        if hidden_layers or use_dense or not identity_fits or flat < least:
            layers += [{"type": "dense", "units": u, "activation": a, "bias": b} for a, u, b in hidden_layers]
            layers.append({"type": "dense", "units": out_units, "activation": out_act, "bias": out_bias})
        return Spec.from_dict({"format_version": 2, "input": {"shape": [channels, *spatial]}, "layers": layers,
                               "loss": loss_spec})

    opts = {"same": same, "groups": groups, "square_channels": square_channels}
    return st.builds(assemble, st.sampled_from(list(nd)), _range(in_channels), sides, blocks, hidden, dense_end,
                     st.sampled_from(list(losses)).flatmap(tails.__getitem__))


NORMS = ("batch_norm", "layer_norm", "group_norm", "dropout")
DROP_P = (0.5, 0.0, 0.1, 0.9, 0.99)  # the first is where shrinking goes


def with_norms(base: st.SearchStrategy | None = None, *, kinds=NORMS, min_inserts: int = 1, max_inserts: int = 3,
               training=None, activations=("identity",) + ELEMENTWISE) -> st.SearchStrategy:
    """Specs from ``base`` (default: dense ``specs()`` or ``cnn_specs()``, half each) with normalization and
    dropout layers inserted: ``min_inserts``–``max_inserts`` layers of ``kinds``, each before a layer other than
    the input (so after a dense or conv, a pool or another norm) or on the input itself, never after the
    output layer (whose output must fit the loss).

    Each inserted layer draws its fields: batch norm in training or eval mode (``training`` forces one),
    affine or not; layer norm over the last axis or the whole example; group norm with a divisor of the
    channels as its groups; dropout with p from ``DROP_P`` and a mask seed; and an activation after it
    (``activations``, identity first). Shrinking drops insertions and moves to batch norm, p = 0.5,
    identity, the position after the first layer.
    """
    base = st.one_of(specs(max_depth=4, max_width=12), cnn_specs(max_convs=2)) if base is None else base
    act = st.one_of([_ACTIVATION[n] for n in activations])
    mode = st.booleans() if training is None else st.just(training)
    insert = st.tuples(st.integers(0, 15), st.sampled_from(list(kinds)), act, mode, st.booleans(),
                       st.integers(0, 7), st.sampled_from(DROP_P), st.integers(0, 2**16))

    def assemble(spec, inserts):
        obj = spec.to_dict()
        layers = list(obj["layers"])
        if obj.get("format_version") == 1:  # a dense spec grows into format version 2 to hold the new types
            obj = {**{k: v for k, v in obj.items() if k != "input_size"}, "format_version": 2,
                   "input": {"shape": [obj["input_size"]]}}
        for pos, kind, a, train, affine, pick, p, seed in inserts:
            at = (pos % len(layers) + 1) % len(layers)  # before layer `at` (after layer 0 first; 0: on the input)
            shape = Spec.from_dict({**obj, "layers": layers}).in_shape(at)
            layer = {"type": kind, "activation": a}
            if kind == "batch_norm":
                layer.update(training=train, affine=affine)
            elif kind == "layer_norm":
                layer.update(normalized_shape=list(shape[-1:] if pick % 2 == 0 else shape), elementwise_affine=affine)
            elif kind == "group_norm":
                groups = _divisors(shape[0])
                layer.update(num_groups=groups[pick % len(groups)], affine=affine)
            else:
                layer.update(p=p, seed=seed, training=train or pick == 0)
            layers.insert(at, layer)
        return Spec.from_dict({**obj, "layers": layers})

    return st.builds(assemble, base, st.lists(insert, min_size=min_inserts, max_size=max_inserts))


def with_residuals(base: st.SearchStrategy | None = None, *, min_blocks: int = 1, max_blocks: int = 2,
                   activations=("identity", "relu", "tanh")) -> st.SearchStrategy:
    """Specs from ``base`` (default: ``with_norms()`` over dense and conv nets, at most one insertion) with runs
    of hidden layers wrapped into residual blocks, ``min_blocks``–``max_blocks`` times (a later wrap may hold an
    earlier block: blocks nest). A run whose output shape is its input's needs no projection (one is drawn
    sometimes anyway); a vector run of another width gets a dense projection, an image or signal run with the
    same positions and other channels a 1×1 conv; any other run is left unwrapped. The block's activation is
    drawn from ``activations``. Shrinks toward one block of one layer, no projection, identity."""
    if base is None:
        base = with_norms(st.one_of(specs(min_depth=2, max_depth=4, max_width=12), cnn_specs(max_convs=2)),
                          min_inserts=0, max_inserts=1)
    act = st.one_of([_ACTIVATION[n] for n in activations])
    wrap = st.tuples(st.integers(0, 15), st.integers(1, 3), st.booleans(), act)

    def assemble(spec, wraps):
        obj = spec.to_dict()
        if obj.get("format_version") == 1:
            obj = {**{k: v for k, v in obj.items() if k != "input_size"}, "format_version": 2,
                   "input": {"shape": [obj["input_size"]]}}
        layers = list(obj["layers"])
        for pos, length, project, a in wraps:
            if len(layers) < 2:
                break
            start = pos % (len(layers) - 1)                      # never the output layer
            stop = min(start + length, len(layers) - 1)
            if spec_tokens(layers[start]):
                continue
            here = Spec.from_dict({**obj, "layers": layers})
            shape_in, shape_out = here.in_shape(start), here.out_shape(stop - 1)
            block = {"type": "residual", "body": layers[start:stop], "projection": None, "activation": a}
            if shape_in != shape_out or project:
                proj = _projection(shape_in, shape_out)
                if proj is None:
                    continue
                block["projection"] = proj
            layers[start:stop] = [block]
        return Spec.from_dict({**obj, "layers": layers})

    return st.builds(assemble, base, st.lists(wrap, min_size=min_blocks, max_size=max_blocks))


def spec_tokens(layer: dict) -> bool:
    return layer.get("type") == "embedding"


def _projection(shape_in: tuple, shape_out: tuple) -> dict | None:
    """A layer mapping shape_in to shape_out for a block's skip path: dense between vectors, a 1×1 conv between
    maps with the same positions; None where neither fits."""
    if len(shape_in) == 1 and len(shape_out) == 1:
        return {"type": "dense", "units": shape_out[0], "activation": "identity", "bias": False}
    if len(shape_in) == len(shape_out) > 1 and shape_in[1:] == shape_out[1:]:
        return {"type": f"conv{len(shape_in) - 1}d", "out_channels": shape_out[0], "kernel_size": 1,
                "activation": "identity", "bias": False}
    return None


def sequence_specs(*, max_steps: int = 6, max_features: int = 6, max_layers: int = 3, norms: bool = True,
                   head: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """Specs over sequences (T, n): 1–``max_layers`` ``temporal_dense`` layers (each drawing its width, activation
    and bias, optionally followed by a layer norm over its features when ``norms``), then a flatten and a dense
    head drawn by ``head`` (default ``specs(max_depth=2, max_width=8)``). Shrinks toward one step, one feature,
    one layer, no norm."""
    head = specs(max_depth=2, max_width=8) if head is None else head
    act = st.one_of([_ACTIVATION[n] for n in ELEMENTWISE])
    layer = st.tuples(st.integers(1, 8), act, st.booleans(), st.booleans() if norms else st.just(False))

    def assemble(t, n, parts, dense):
        layers = []
        for units, a, bias, norm in parts:
            layers.append({"type": "temporal_dense", "units": units, "activation": a, "bias": bias})
            if norm:
                layers.append({"type": "layer_norm", "normalized_shape": [units]})
        layers.append({"type": "flatten"})
        layers += dense.to_dict()["layers"]
        return Spec.from_dict({"format_version": 2, "input": {"shape": [t, n]}, "layers": layers,
                               "loss": dense.loss.to_json()})

    return st.builds(assemble, st.integers(1, max_steps), st.integers(1, max_features),
                     st.lists(layer, min_size=1, max_size=max_layers), head)


def per_step_specs(*, max_steps: int = 6, max_features: int = 6, max_layers: int = 2, max_units: int = 6,
                   norms: bool = True, losses=tuple(LOSSES)) -> st.SearchStrategy:
    """Sequence specs with a loss at every step: input (T, n), 0–``max_layers`` hidden ``temporal_dense`` layers
    (each drawing its width, activation and bias, optionally followed by a layer norm over its features when
    ``norms``), then a ``temporal_dense`` head of k ≤ ``max_units`` units whose activation fits the loss (as in
    ``specs()``), no flatten: the output is (T, k) per example and the loss (drawn from ``losses``) applies to
    its m·T rows of k. ``draw_data`` gives such specs (m, T) class targets with some steps masked (−100, never
    all) or (m, T, k) values. Shrinks toward one step, one feature, no hidden layer, the first loss."""
    act = st.one_of([_ACTIVATION[n] for n in ELEMENTWISE])
    layer = st.tuples(st.integers(1, max_units), act, st.booleans(), st.booleans() if norms else st.just(False))

    def tail(loss):  # (loss spec, head activation, head units, head bias), prebuilt per loss below
        names, least = _outputs_for(loss)
        return st.tuples(_LOSS[loss], st.one_of([_ACTIVATION[n] for n in names]),
                         st.integers(least, max(least, max_units)), st.booleans())

    tails = {loss: tail(loss) for loss in losses}

    def assemble(t, n, parts, tail_parts):
        loss_spec, out_act, k, bias = tail_parts
        layers = []
        for units, a, b, norm in parts:
            layers.append({"type": "temporal_dense", "units": units, "activation": a, "bias": b})
            if norm:
                layers.append({"type": "layer_norm", "normalized_shape": [units]})
        layers.append({"type": "temporal_dense", "units": k, "activation": out_act, "bias": bias})
        return Spec.from_dict({"format_version": 2, "input": {"shape": [t, n]}, "layers": layers, "loss": loss_spec})

    return st.builds(assemble, st.integers(1, max_steps), st.integers(1, max_features),
                     st.lists(layer, max_size=max_layers), st.sampled_from(list(losses)).flatmap(tails.__getitem__))


def embedding_specs(*, max_tokens: int = 6, max_vocab: int = 8, max_dim: int = 6, norms: bool = True,
                    head: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """Specs that start from token indices: an embedding (V ≤ ``max_vocab`` so that tokens repeat, optional
    padding_idx), then optionally a layer norm over each token's vector (``norms``), a flatten, and a dense head
    drawn by ``head`` (default ``specs(max_depth=3, max_width=12)``; its input size is replaced). Shrinks toward one
    token, a vocabulary of 1, no padding, no norm."""
    head = specs(max_depth=3, max_width=12) if head is None else head
    front = st.tuples(st.integers(1, max_tokens), st.integers(1, max_vocab), st.integers(1, max_dim),
                      st.none() | st.integers(0, max_vocab - 1), st.booleans() if norms else st.just(False),
                      st.one_of([_ACTIVATION[n] for n in ("identity",) + ELEMENTWISE]))

    def assemble(parts, dense):
        t, v, d, pad, norm, act = parts
        layers = [{"type": "embedding", "num_embeddings": v, "embedding_dim": d,
                   "padding_idx": None if pad is None else pad % v}]
        if norm:
            layers.append({"type": "layer_norm", "normalized_shape": [d], "activation": act})
        layers.append({"type": "flatten"})
        layers += dense.to_dict()["layers"]
        return Spec.from_dict({"format_version": 2, "input": {"shape": [t]}, "layers": layers,
                               "loss": dense.loss.to_json()})

    return st.builds(assemble, front, head)


SEQUENCE_BLOCKS = RECURRENT + ("attention", "transformer")


def sequence_model_specs(*, max_steps: int = 5, max_width: int = 6, max_blocks: int = 2, kinds=SEQUENCE_BLOCKS,
                         fronts=("input", "embedding", "dense"), head: st.SearchStrategy | None = None,
                         pre_norm: bool = True, min_steps: int = 1) -> st.SearchStrategy:
    """Sequence models: a front-end (the sequence itself, an embedding of tokens, or a ``temporal_dense``), then
    1–``max_blocks`` blocks drawn from ``kinds``, then a head (``head``, default ``specs(max_depth=2, max_width=8)``).

    * ``rnn`` (tanh or relu), ``lstm``, ``gru``: hidden size, bias, a zero or learned initial state; the last one
      may return its last hidden state only (the head reads h_T), else a flatten reads every step;
    * ``attention``: heads dividing the model size, causal or not, alone or pre-norm in a residual block
      (x + attention(layer_norm(x))) when ``pre_norm``;
    * ``transformer``: a pre-norm attention block and a pre-norm MLP block (x + W₂ g(W₁ layer_norm(x))),
      the block of ``transformer-tiny``.

    The head reads h_T (a recurrent layer that returns its last state), every step flattened, or every step on its
    own: the same dense layers at each step (``temporal_dense``) with the loss on each step's row (class targets
    with some steps masked, −100).

    Lengths start at T = 1; heads are drawn as the k-th divisor of the model size, so shrinking goes toward one
    step, one head, one block, the plain sequence front-end and the first kind.
    """
    head = specs(max_depth=2, max_width=8) if head is None else head
    act = st.one_of([_ACTIVATION[n] for n in ELEMENTWISE])
    block = st.tuples(st.sampled_from(list(kinds)), st.integers(1, max_width), st.integers(0, 3), st.booleans(),
                      st.booleans(), st.booleans(), st.sampled_from(["tanh", "relu"]), act)
    front = st.tuples(st.sampled_from(list(fronts)), st.integers(1, max_width), st.integers(1, 8), act)

    def assemble(t, front_parts, blocks, last_only, per_step, dense):
        kind, d, vocab, front_act = front_parts
        if kind == "embedding":
            inp, layers = [t], [{"type": "embedding", "num_embeddings": vocab, "embedding_dim": d}]
        elif kind == "dense":
            inp, layers = [t, vocab], [{"type": "temporal_dense", "units": d, "activation": front_act}]
        else:
            inp, layers = [t, d], []
        for j, (b, width, pick, flag, bias, learned, nonlin, a) in enumerate(blocks):
            if b in RECURRENT:
                layer = {"type": b, "hidden_size": width, "bias": bias,
                         "initial_state": "learned" if learned else "zero"}
                if b == "rnn":
                    layer["nonlinearity"] = nonlin
                if j == len(blocks) - 1 and last_only:
                    layer["return_sequences"] = False
                layers.append(layer)
                d = width
                continue
            heads = _divisors(d)[pick % len(_divisors(d))]
            attention = {"type": "attention", "num_heads": heads, "causal": flag, "bias": bias}
            if b == "attention" and not (learned and pre_norm):
                layers.append(attention)
            else:  # pre-norm residual blocks
                layers.append({"type": "residual", "body": [{"type": "layer_norm"}, attention]})
            if b == "transformer":
                layers.append({"type": "residual", "body": [
                    {"type": "layer_norm"}, {"type": "temporal_dense", "units": 2 * d, "activation": a},
                    {"type": "temporal_dense", "units": d, "activation": "identity"}]})
        tail = dense.to_dict()["layers"]
        if not layers[-1].get("return_sequences", True):
            layers += tail                       # the head reads h_T
        elif per_step:                           # the same head at every step, the loss on every step's row
            layers += [dict(layer, type="temporal_dense") for layer in tail]
        else:
            layers += [{"type": "flatten"}, *tail]
        return Spec.from_dict({"format_version": 2, "input": {"shape": inp}, "layers": layers,
                               "loss": dense.loss.to_json()})

    return st.builds(assemble, st.integers(min_steps, max_steps), front, st.lists(block, min_size=1, max_size=max_blocks),
                     st.booleans(), st.booleans(), head)


def _out_sides(layers: list, spatial: list) -> list:
    """The spatial sizes after ``layers`` (already fitted to ``spatial``)."""
    out = []
    for t, n in enumerate(spatial):
        for layer in layers:
            if layer["type"] == "flatten":
                break
            e, s, pads, same = _extent(layer, t)
            n = n if same else (n + pads - e) // s + 1
        out.append(n)
    return out


def _grid(rng: np.random.Generator, shape, limit: int) -> np.ndarray:
    """Integers and half-integers in [-limit, limit], zero among them (exact in float32 and float64)."""
    return rng.integers(-2 * limit, 2 * limit + 1, shape) / 2


def _tie(rng: np.random.Generator, arr: np.ndarray, axis: int) -> None:
    """With probability ½, copy one row (axis 0) or column (axis 1) of ``arr`` onto another, in place."""
    n = arr.shape[axis]
    if n < 2 or rng.random() < 0.5:
        return
    src, dst = rng.choice(n, 2, replace=False)
    if axis == 0:
        arr[dst] = arr[src]
    else:
        arr[:, dst] = arr[:, src]


def _flat_run(rng: np.random.Generator, x: np.ndarray) -> None:
    """Ties for max pooling in a signal or image batch x (m, C, *S), in place: with probability ½ one
    example is made constant along the last spatial axis (a zero-bias conv keeps it constant away from
    the padded borders, so pooled windows tie after any conv), and with probability ½ one position of
    the last axis is copied onto its neighbour (ties in a window of x itself)."""
    n = x.shape[-1]
    if rng.random() < 0.5:
        x[rng.integers(x.shape[0])] = x[rng.integers(x.shape[0])][..., :1]
    if n > 1 and rng.random() < 0.5:
        j = rng.integers(n - 1)
        x[..., j + 1] = x[..., j]


def _weights(rng: np.random.Generator, regime: str, shape, n_out, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight of ``shape`` and its bias of ``n_out`` in a named regime (``saturated``: large enough that
    sigmoid and tanh gates sit near ±1)."""
    if regime == "well_conditioned":
        k = 1 / np.sqrt(fan_in)
        return rng.uniform(-k, k, shape), rng.uniform(-k, k, n_out)
    if regime == "saturated":
        return rng.normal(0, 6 / np.sqrt(fan_in), shape), rng.normal(0, 3, n_out)
    if regime == "near_zero":
        return rng.normal(0, 1e-3, shape), rng.normal(0, 1e-3, n_out)
    if regime == "near_kinks":
        return rng.integers(-2, 3, shape) / 2, rng.integers(-2, 3, n_out) / 2
    if regime == "exact_kinks":
        w = _grid(rng, shape, 1)
        _tie(rng, w, axis=0)  # two units (or filters) with the same weights: tied z (softmax/max ties)
        return w, np.zeros(n_out)
    raise ValueError(f"unknown regime {regime!r}; choose one of {REGIMES}")


def draw_params(spec: Spec, rng: np.random.Generator, regime: str, dtype="float64") -> dict:
    """Weights for ``spec`` in a named regime (see the module docstring), for any layer type.

    Each weight θ (out, …) has fan_in = prod(θ.shape[1:]) (a dense layer's inputs, a conv filter's
    C/G·k entries); layers without parameters (pooling, flatten) draw nothing, so a dense spec draws
    exactly what it always did.
    """
    params = {}
    shapes = spec.param_shapes()
    for name, shape in shapes.items():  # layer order (blocks' layers in place), each weight with its bias
        if not name.endswith(".weight"):
            continue
        prefix = name[: -len("weight")]
        n_out, fan_in = shapes.get(prefix + "bias", shape[:1]), math.prod(shape[1:])
        w, b = _weights(rng, regime, shape, n_out, fan_in)
        params[name] = w.astype(dtype)
        if prefix + "bias" in shapes:
            params[prefix + "bias"] = b.astype(dtype)
    for name, shape in shapes.items():  # the rest, by torch's names: weight_ih_l0 with bias_ih_l0, in_proj_weight with
        if name in params:               # in_proj_bias, a recurrent layer's learned initial state h0, c0
            continue
        if len(shape) >= 2:
            pair = name[: name.rindex(".") + 1] + name[name.rindex(".") + 1:].replace("weight", "bias")
            n_out, fan_in = shapes.get(pair, shape[:1]), math.prod(shape[1:])
            w, b = _weights(rng, regime, shape, n_out, fan_in)
            params[name] = w.astype(dtype)
            if pair in shapes and pair != name:
                params[pair] = b.astype(dtype)
        elif not name.rsplit(".", 1)[-1].startswith("bias"):  # an initial state: data-like
            params[name] = (rng.integers(-2, 3, shape) / 2 if regime in ("near_kinks", "exact_kinks")
                            else rng.normal(0, 1, shape)).astype(dtype)
    for name, shape in spec.buffer_shapes().items():  # running statistics: on the regime's grid where it has one
        if name.endswith("running_var"):
            v = rng.integers(1, 5, shape) / 2 if regime in ("near_kinks", "exact_kinks") else rng.uniform(0.25, 4, shape)
        else:
            v = rng.integers(-2, 3, shape) / 2 if regime in ("near_kinks", "exact_kinks") else rng.normal(0, 1, shape)
        params[name] = v.astype(dtype)
    return params


def draw_data(spec: Spec, rng: np.random.Generator, regime: str, batch: int, dtype="float64"):
    """(x, y) for ``spec`` in a named regime; y fits the loss (values, probabilities or class indices).

    x has shape (m, *input_shape). In ``exact_kinks`` a tie copies a feature (a vector input) or a
    channel (a signal or image); a signal or image also gets ``_flat_run`` ties along its last axis.
    y is one target per example, or, after a per-step head (``per_step_specs``), one per step: (m, T) class
    indices with about a quarter of the steps masked (−100, never all), or (m, T, k) values.
    """
    shape = (batch, *spec.input_shape)
    if spec.token_input:  # token indices from a small vocabulary: repeats are the rule, not the exception
        x = rng.integers(0, spec.layers[0].num_embeddings, shape)
    elif regime == "saturated":
        x = rng.normal(0, 5, shape)
    elif regime == "near_zero":
        x = rng.normal(0, 1e-3, shape)
    elif regime == "near_kinks":
        x = rng.integers(-2, 3, shape) / 2
    elif regime == "exact_kinks":
        x = _grid(rng, shape, 2)
        _tie(rng, x, axis=0)  # a repeated example
        _tie(rng, x, axis=1)  # a repeated input feature
        if rng.random() < (0.5 if batch > 1 else 0.25):
            x[rng.integers(batch)] = 0  # an all-zero example: with zero biases, z = 0 exactly on every relu path
        if x.ndim > 2:
            _flat_run(rng, x)  # equal neighbours: ties in max-pool windows
    else:
        x = rng.normal(0, 1, shape)
    out = (batch, *spec.output_shape)  # (batch, n_out), or (batch, T, n_out) after a per-step head
    n_out = out[-1]
    if spec.loss.targets == "classes":
        y = rng.integers(0, n_out, out[:-1])
        if len(out) > 2:  # a loss at every step: some steps masked (torch's ignore_index, −100), never all
            masked = rng.random(y.shape) < 0.25
            masked.flat[rng.integers(y.size)] = False
            y = np.where(masked, IGNORE_INDEX, y)
    elif spec.loss.name in ("bce", "bce_with_logits"):
        if regime == "exact_kinks":
            y = (rng.integers(0, 3, out) / 2).astype(dtype)
        else:
            y = rng.uniform(0, 1, out).astype(dtype)
    elif regime in ("near_kinks", "exact_kinks"):
        y = (rng.integers(-2, 3, out) / 2).astype(dtype)
    else:
        y = rng.normal(0, 1, out).astype(dtype)
    return (x if spec.token_input else x.astype(dtype)), y


@dataclass(frozen=True)
class Case:
    """One generated check: a spec, its weights and data, how they were drawn."""

    spec: Spec
    params: dict
    x: np.ndarray
    y: np.ndarray
    dtype: str
    regime: str
    seed: int

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        return f"Case({self.spec.describe()}, batch={self.x.shape[0]}, {self.dtype}, {self.regime}, seed={self.seed})"


def fit_batch(spec: Spec, batch: int) -> int:
    """``batch``, or 2 where the spec cannot take it (batch norm in training mode with one value per channel)."""
    try:
        spec.check_batch(batch)
    except SpecError:
        return 2
    return batch


_DEFAULT_SPECS: list = []


def _default_specs() -> st.SearchStrategy:
    """``specs()``, built once: a strategy is a value, and rebuilding it on every draw cost more than the draw."""
    if not _DEFAULT_SPECS:
        _DEFAULT_SPECS.append(specs())
    return _DEFAULT_SPECS[0]


def cases(*, specs_strategy=None, regimes=REGIMES, dtypes=("float64", "float32"), max_batch: int = 8) -> st.SearchStrategy:
    """A full check case.

    * ``specs_strategy``: where specs come from (default ``specs()``);
    * ``regimes``: names of weight/data regimes to draw from;
    * ``dtypes``: "float64" and/or "float32";
    * ``max_batch``: largest batch size (≥ 1).

    Built from strategies made once, here (a strategy made inside every draw cost Hypothesis 0.65 ms of validation
    and labels per example, 40% of drawing the network itself); weights and data come from the drawn seed.
    """
    def case(drawn) -> Case:
        spec, regime, dtype, batch, seed = drawn
        rng = np.random.default_rng(seed)
        params = draw_params(spec, rng, regime, dtype)
        x, y = draw_data(spec, rng, regime, fit_batch(spec, batch), dtype)
        return Case(spec, params, x, y, dtype, regime, seed)

    return st.tuples(specs_strategy if specs_strategy is not None else _default_specs(), st.sampled_from(list(regimes)),
                     st.sampled_from(list(dtypes)), st.integers(1, max_batch), st.integers(0, 2**32 - 1)).map(case)
