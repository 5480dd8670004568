r"""The fault catalogue: realistic wrong backprops ("mutants"), each a one-step variation of the correct one.

``faulty_gradients`` is the correct δ recursion with a hook at every step where a real mistake
happens: the loss gradient, the step through an activation, the recursion :math:`δθ`, the parameter
gradients :math:`δ^T a` and :math:`Σδ`, and the cache backward reads; a layer that is not dense
(conv, pool, flatten) takes its whole backward through one hook, ``layer_backward``, which a conv/pool
mutant replaces for one layer type (kernel not flipped, stride or dilation ignored, padding cropped
off by one, groups ignored, channels swapped, bias averaged, max-pool δ misrouted, avg-pool divisor
wrong, flatten unflattened channels-last). A mutant replaces one hook.
Each declares what it corrupts first, walking back from the loss (``corrupts(spec) -> (layer, tensor)``),
which networks expose it (a Hypothesis strategy), and whether it is a ``bug`` or merely a ``kink``
convention (which the oracle must classify as such and never fail).

``run_catalogue`` searches random networks for each mutant until the oracle kills it and records how
many examples that took, whether the reported first divergent layer is the declared one, and the
diagnosis hint; it also runs the correct implementation, which must never fail (``kink`` is a pass: within
rounding of a kink its float64 z may land on the other side from torch's). How *often*
the oracle catches each mutant, per weight/data regime and dtype, is measured by ``oracle.rates``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import manual_bp as bp
from manual_bp.activations import GELUTanh
from manual_bp.data import check_y
from manual_bp.layers.attention import softmax as attention_softmax
from manual_bp.layers.norm import normalize_backward
from manual_bp.layers.recurrent import gru_step_backward, lstm_step_backward, rnn_step_backward, weight_grads
from manual_bp.layers.windows import col2im, pad, unpad, windows

from .checker import check
from .graph import RECURRENT, nodes
from .strategies import (REGIMES, VALUE_LOSSES, cnn_specs, draw_data, draw_params, embedding_specs, fit_batch,
                         sequence_model_specs, sequence_specs, specs, with_norms, with_residuals)


@dataclass(frozen=True)
class Hooks:
    """The steps of backward a mutant may replace (defaults: the correct equations)."""

    loss_grad: Callable = lambda spec, a, y: spec.loss.grad(a, y)
    vjp: Callable = lambda c, i, act, z, a, g: act.vjp(z, a, g)
    recurse: Callable = lambda c, i, delta, theta, a_prev: delta @ theta
    weight_grad: Callable = lambda c, i, delta, a_prev, deltas: delta.T @ a_prev
    bias_grad: Callable = lambda c, i, delta, deltas: delta.sum(axis=0)
    cache_x: Callable = lambda x: x   # the input the backward's cache was computed from
    forward_params: Callable = lambda spec, params: params
    # the backward of a layer that is not dense (conv, pool, flatten): (grads, ∂C/∂a_prev)
    layer_backward: Callable = lambda c, i, layer, p, a_prev, delta: layer.backward(p, a_prev, delta)


def faulty_gradients(spec, params, x, y, hooks: Hooks):
    """(loss, grads, deltas) by the δ recursion, with every step taken through ``hooks``.

    A dense layer takes its steps through the finer hooks (``weight_grad``, ``bias_grad``, ``recurse``);
    any other layer type through ``layer_backward``.
    """
    loss_cache = bp.forward(spec, hooks.forward_params(spec, params), x)
    y = check_y(spec, y, loss_cache.output.shape[0], False, loss_cache.output.dtype)
    loss = spec.loss.value(*spec.loss.as_rows(loss_cache.output, y))  # a sequence output: on m·T rows of k
    cache = bp.forward(spec, params, hooks.cache_x(x))
    grads, deltas = {}, {}
    grad_a = hooks.loss_grad(spec, *spec.loss.as_rows(cache.output, y)).reshape(cache.output.shape)
    for i in reversed(range(len(spec.layers))):
        layer = spec.layers[i]
        delta = hooks.vjp(cache, i, layer.activation, cache.z[i], cache.a[i + 1], grad_a)
        deltas[f"layers.{i}"] = delta
        if layer.type != "dense":
            nabla, grad_a = hooks.layer_backward(cache, i, layer, cache.layer_params(i), cache.a[i], delta)
            grads.update({f"layers.{i}.{name}": g for name, g in nabla.items()})
            continue
        theta = params[f"layers.{i}.weight"]
        grads[f"layers.{i}.weight"] = hooks.weight_grad(cache, i, delta, cache.a[i], deltas)
        if layer.bias:
            grads[f"layers.{i}.bias"] = hooks.bias_grad(cache, i, delta, deltas)
        grad_a = hooks.recurse(cache, i, delta, theta, cache.a[i])
    return loss, grads, deltas


# -- helpers the catalogue uses ----------------------------------------------------------------------
def _last(spec, names, cache=None, where=None) -> int:
    """The layer closest to the output whose activation is one of ``names`` (and, given a ``where``
    test on (activation, z), where that test holds for some element: only there does the mistake show)."""
    layers = [i for i, l in enumerate(spec.layers) if l.activation.name in names
              and (where is None or cache is None or bool(np.any(where(l.activation, cache.z[i]))))]
    return max(layers) if layers else None


def _out(spec) -> int:
    return len(spec.layers) - 1


def _vjp_with(names, derivative):
    """A vjp whose g' is replaced by ``derivative(act, z, a)`` on layers with these activations."""
    def vjp(c, i, act, z, a, g):
        if act.name in names:
            return g * derivative(act, z, a)
        return act.vjp(z, a, g)
    return vjp


def _hidden(names, **kw):
    """Specs with at least one hidden layer whose activation is in ``names``."""
    return specs(min_depth=2, activations=tuple(names), **kw)


@dataclass(frozen=True)
class Mutant:
    name: str
    mistake: str                         # the real mistake it models, in words
    hooks: Hooks
    corrupts: Callable                   # (spec, forward cache) -> (layer, tensor) it corrupts first, walking back
    specs: st.SearchStrategy = field(default_factory=lambda: specs())
    kind: str = "bug"                    # "bug" or "kink"
    regimes: tuple = REGIMES
    seed_ref: str = ""                   # E1..E6 for the seed's own mistakes

    def grads_fn(self, spec, params, x, y):
        return faulty_gradients(spec, params, x, y, self.hooks)


# -- helpers of the conv/pool mutants: the correct backward's pieces, one of them taken wrong ---------
def _backward_of(types, mistake):
    """A ``layer_backward`` hook: ``mistake(layer, p, a, delta) -> (grads, grad_a)`` on the layers of these
    types (a real implementation has one backward per layer type, used everywhere), correct elsewhere."""
    def layer_backward(c, i, layer, p, a, delta):
        return mistake(layer, p, a, delta) if layer.type in types else layer.backward(p, a, delta)
    return layer_backward


def _input_grad(wrong):
    """A mistake in ∂C/∂a only: ``wrong(layer, p, a, delta) -> grad_a``; the parameter gradients are right."""
    def mistake(layer, p, a, delta):
        return layer.backward(p, a, delta)[0], wrong(layer, p, a, delta)
    return mistake


def _param_grad(name, wrong):
    """A mistake in one parameter gradient only: ``wrong(layer, p, a, delta, right) -> ∂C/∂p[name]``."""
    def mistake(layer, p, a, delta):
        grads, grad_a = layer.backward(p, a, delta)
        if name in grads:
            grads[name] = wrong(layer, p, a, delta, grads[name])
        return grads, grad_a
    return mistake


def _window_grads(layer, theta, delta, channels, ungrouped=False):
    r"""∂C/∂(the windows of â) of a conv, (m, C, *out, *kernel): per group θᵀδ, laid out as windows.

    ``ungrouped``: every input channel c gathers :math:`Σ_o δ[o] θ[o, c \bmod C/G]` from *all* output
    channels, as a backward written for groups = 1 would, tiled over the groups."""
    nd, G, O = layer.nd, layer.groups, layer.out_channels
    m, out = delta.shape[0], delta.shape[2:]
    if ungrouped:
        dcols = theta.reshape(O, -1).T @ delta.reshape(m, O, -1).swapaxes(0, 1).reshape(O, -1)
        dcols = np.broadcast_to(dcols, (G, *dcols.shape))
    else:
        d = delta.reshape(m, O, -1).swapaxes(0, 1).reshape(G, O // G, -1)
        dcols = theta.reshape(G, O // G, -1).swapaxes(1, 2) @ d
    dw = dcols.reshape(channels, *layer.kernel_size, m, *out)
    return dw.transpose(1 + nd, 0, *range(2 + nd, 2 + 2 * nd), *range(1, 1 + nd))


def _padded_shape(a, pads):
    return (*a.shape[:2], *(n + lo + hi for n, (lo, hi) in zip(a.shape[2:], pads)))


def _conv_input_grad(layer, p, a, delta, *, theta=None, stride=None, dilation=None, crop=None, ungrouped=False):
    """The conv's ∂C/∂a with one piece replaceable: the kernel, the stride or dilation that ``col2im``
    scatters with, the crop that drops the padding (``crop(g, pads)``), the grouping."""
    theta = p["weight"] if theta is None else theta
    dw = _window_grads(layer, theta, delta, a.shape[1], ungrouped)
    g = col2im(dw, _padded_shape(a, layer.pads), stride or layer.stride, dilation or layer.dilation)
    return (crop or unpad)(g, layer.pads)


def _crop_one_off(g, pads):
    """The padding cropped one position off: the window [lo − 1, lo − 1 + n) (or [lo + 1, …) with lo = 0)."""
    def window(t, lo, hi):
        n = g.shape[2 + t] - lo - hi
        start = lo - 1 if lo else lo + 1 if hi else lo
        return slice(start, start + n)
    return g[(slice(None), slice(None), *(window(t, lo, hi) for t, (lo, hi) in enumerate(pads)))]


def _max_windows(layer, a):
    """The max pool's windows of â (−∞ padded), flattened row-major: (m, C, *out, K)."""
    w = windows(pad(a, layer.pads, -np.inf), layer.kernel_size, layer.stride, (1,) * layer.nd)
    return w.reshape(*w.shape[:2 + layer.nd], -1)


def _max_routed(route):
    """A max pool backward that shares each window's δ by ``route(w) -> weights`` over its K elements."""
    def wrong(layer, p, a, delta):
        dw = route(_max_windows(layer, a)) * delta[..., None]
        dw = dw.reshape(*dw.shape[:-1], *layer.kernel_size)
        return unpad(col2im(dw, _padded_shape(a, layer.pads), layer.stride, (1,) * layer.nd), layer.pads)
    return wrong


def _window_start(w):
    """δ to the first element of the window (its top-left corner), wherever the max is."""
    first = np.zeros_like(w)
    first[..., 0] = 1
    return first


def _every_max(w):
    """δ to every element equal to the window's max: ``mask = (w == w.max())``, not normalised."""
    return (w == w.max(axis=-1, keepdims=True)).astype(w.dtype)


def _split_among_ties(w):
    """δ shared evenly among the elements tied for the window's max (a valid subgradient)."""
    mask = _every_max(w)
    return mask / mask.sum(axis=-1, keepdims=True)


def _avg_spread(divisor):
    """An avg pool backward that spreads δ/``divisor(layer, a)`` over each window."""
    def wrong(layer, p, a, delta):
        share = delta / divisor(layer, a)
        dw = np.broadcast_to(share.reshape(*share.shape, *(1,) * layer.nd), (*share.shape, *layer.kernel_size))
        return unpad(col2im(dw, _padded_shape(a, layer.pads), layer.stride, (1,) * layer.nd), layer.pads)
    return wrong


def _other_count(layer, a):
    """The divisor of the other ``count_include_pad`` setting."""
    return replace(layer, count_include_pad=not layer.count_include_pad).divisor(a.shape[1:], a.dtype)


def _channels_last(layer, p, a, delta):
    """Flatten's δ unflattened as if the forward had flattened (m, *S, C) (channels last, NumPy/TF habit)."""
    return np.moveaxis(delta.reshape(a.shape[0], *a.shape[2:], a.shape[1]), -1, 1)


def _flip(theta):
    return np.flip(theta, axis=tuple(range(2, theta.ndim)))


CONVS, MAX_POOLS, AVG_POOLS = ("conv1d", "conv2d"), ("max_pool1d", "max_pool2d"), ("avg_pool1d", "avg_pool2d")


def _shows(spec, i, layer, mistake, tensor: str, ties: bool) -> bool:
    """Whether ``mistake`` changes layer i's ∂C/∂a (``tensor`` "delta") or its parameter gradient
    ``tensor`` on a random probe of the layer's shapes (4 examples; with ``ties``, 0/1 inputs, so that
    max-pool windows tie). Exact where a formula cannot say it: a kernel flip is invisible where only
    its centre tap meets the input, a missing 1/k where the padding leaves one element in every window."""
    rng = np.random.default_rng(0)
    a = (rng.integers(0, 2, (4, *spec.in_shape(i))) if ties else rng.standard_normal((4, *spec.in_shape(i)))).astype(float)
    if getattr(layer, "tokens", False):  # token indices with repeats, the padding token among them
        a = rng.integers(0, min(layer.num_embeddings, 2), (4, *spec.in_shape(i)))
        if layer.padding_idx is not None:
            a.reshape(-1)[0] = layer.padding_idx
    p = {k: rng.standard_normal(s) for k, s in layer.param_shapes(spec.in_shape(i)).items()}
    p.update({k: rng.uniform(0.5, 2.0, s) for k, s in getattr(layer, "buffer_shapes", lambda _: {})(spec.in_shape(i)).items()})
    delta = rng.standard_normal((4, *spec.out_shape(i)))
    right, wrong = layer.backward(p, a, delta), mistake(layer, p, a, delta)
    got, want = (wrong[1], right[1]) if tensor == "delta" else (wrong[0].get(tensor), right[0].get(tensor))
    return want is not None and not np.allclose(got, want, rtol=1e-9, atol=1e-12)


def _first_shown(types, mistake, tensor: str, ties: bool):
    """corrupts() of a conv/pool mistake: walking back, the first tensor it changes. A mistake in ∂C/∂a of
    layer i shows first in the δ of layer i − 1 (so only for i ≥ 1); one in a parameter gradient, there."""
    lowest = 1 if tensor == "delta" else 0
    if tensor == "any":  # a mistake in several tensors of a layer: its parameter gradients, else the δ below
        params, below = _first_shown(types, mistake, "weight", ties), _first_shown(types, mistake, "delta", ties)
        bias = _first_shown(types, mistake, "bias", ties)
        return lambda spec, cache: max((r for r in (params(spec, cache), bias(spec, cache), below(spec, cache))
                                        if r[0] is not None), default=(None, "delta"), key=lambda r: r[0])

    def corrupts(spec, cache):
        shown = [i for i, l in enumerate(spec.layers)
                 if i >= lowest and l.type in types and _shows(spec, i, l, mistake, tensor, ties)]
        if not shown:
            return None, tensor
        return (max(shown) - 1, tensor) if tensor == "delta" else (max(shown), tensor)
    return corrupts


def _cnn_mutant(name, mistake_text, types, mistake, strategy, *, tensor="delta", ties=False, **kw) -> Mutant:
    """A mutant whose ``mistake(layer, p, a, delta) -> (grads, grad_a)`` replaces the backward of ``types``."""
    return Mutant(name, mistake_text, Hooks(layer_backward=_backward_of(types, mistake)),
                  _first_shown(types, mistake, tensor, ties), strategy, **kw)


TIE_REGIMES = ("near_kinks", "exact_kinks")


# -- helpers of the normalization and dropout mutants -----------------------------------------------------
def _norm_input_grad(formula):
    """A norm's ∂C/∂a by a wrong ``formula(layer, a, g, xhat, s) -> grad_a`` (g = γ ⊙ δ), in training mode;
    the parameter gradients stay right."""
    def wrong(layer, p, a, delta):
        if not getattr(layer, "training", True):
            return layer.backward(p, a, delta)[1]
        xhat, s = layer.statistics(p, a)
        g = delta * p["weight"].reshape(layer._affine_shape(a)) if layer.affine else delta
        return formula(layer, a, g, xhat, s)
    return _input_grad(wrong)


def _over_sets(layer, a, fn, *arrays):
    """``fn(*arrays viewed set by set, axes)`` laid back out in a's shape."""
    v, axes = layer._sets(a)
    return fn(*(t.reshape(v.shape) for t in arrays), axes).reshape(a.shape)


def _mean_path_dropped(layer, a, g, xhat, s):
    return _over_sets(layer, a, lambda g, x, s, ax: (g - x * (g * x).mean(axis=ax, keepdims=True)) / s, g, xhat, s)


def _variance_path_dropped(layer, a, g, xhat, s):
    return _over_sets(layer, a, lambda g, x, s, ax: (g - g.mean(axis=ax, keepdims=True)) / s, g, xhat, s)


def _bessel_in_backward(layer, a, g, xhat, s):
    """The backward recomputes x̂ and s with the unbiased variance σ² N/(N − 1); the forward used σ²."""
    v, axes = layer._sets(a)
    n = v.size // np.mean(v, axis=axes, keepdims=True).size
    d = v - v.mean(axis=axes, keepdims=True)
    s_b = np.sqrt((d * d).sum(axis=axes, keepdims=True) / (n - 1) + layer.eps)
    return normalize_backward(g.reshape(v.shape), d / s_b, np.broadcast_to(s_b, v.shape), axes).reshape(a.shape)


def _running_stats_in_training(layer, p, a, delta):
    """The eval-mode backward in training mode: x̂ and s from the running statistics."""
    return replace(layer, training=False).backward(p, a, delta)


def _layer_norm_over_batch(layer, a, g, xhat, s):
    return normalize_backward(g, xhat, s, (0,))


def _one_group(layer, a, g, xhat, s):
    """Group norm's backward with the means taken over the whole example (all channels), as if G = 1."""
    flat = lambda t: t.reshape(a.shape[0], -1)  # noqa: E731
    return normalize_backward(flat(g), flat(xhat), flat(s), (1,)).reshape(a.shape)


def _dropout_grad(scaled: bool):
    """Dropout's ∂C/∂a with the mask forgotten (δ passes unchanged) or with its 1/(1 − p) scale forgotten."""
    def wrong(layer, p, a, delta):
        mask = layer.scaled_mask(a)
        if mask is None:
            return delta.copy()
        return delta * mask * (1 - layer.p) if scaled else delta.copy()
    return _input_grad(wrong)


NORM_TYPES = ("batch_norm", "layer_norm", "group_norm")


def _residual_mistake(identity: bool):
    """A residual block's backward with the skip path's gradient dropped at the input (``identity``), or with
    the projection's weight gradient left at zero."""
    def mistake(layer, p, a, delta):
        grads, grad_a, _ = layer.backward_with_deltas(p, a, delta)
        if identity:
            through = delta if layer.projection is None else layer.projection.backward(
                {k[len("projection."):]: v for k, v in p.items() if k.startswith("projection.")}, a, delta)[1]
            return grads, grad_a - through
        return {k: (np.zeros_like(g) if k.startswith("projection.") else g) for k, g in grads.items()}, grad_a
    return mistake


def _block_corrupts(identity: bool):
    """corrupts() of a residual mistake, as a node index (``oracle.graph``): the δ of the node feeding the block
    (the identity path), or the projection's weight; the top-level block nearest the loss."""
    def corrupts(spec, cache):
        graph, found = nodes(spec), []
        for k, node in enumerate(graph):
            if not node.is_sum or node.name.count(".") != 1:
                continue
            if identity and node.skip >= 0 and graph[node.skip].name.endswith(".projection"):
                found.append(graph[node.skip].src)        # P's backward dropped: the node feeding the block
            elif identity:
                found.append(node.skip)
            elif node.skip >= 0 and graph[node.skip].name.endswith(".projection") and graph[node.skip].param_names:
                found.append(node.skip)
        found = [k for k in found if k >= 0]
        return (max(found), "weight" if not identity else "delta") if found else (None, "delta")
    return corrupts


def _embedding_grad(assign: bool, zero_padding: bool):
    """An embedding's ∂C/∂W with repeated tokens assigned (the last occurrence wins) instead of accumulated,
    or with padding_idx's row left with its gradient."""
    def mistake(layer, p, a, delta):
        grad = np.zeros_like(p["weight"])
        rows, d = a.reshape(-1), delta.reshape(-1, layer.embedding_dim)
        if assign:
            grad[rows] = d
        else:
            np.add.at(grad, rows, d)
        if zero_padding and layer.padding_idx is not None:
            grad[layer.padding_idx] = 0
        return {"weight": grad}, None
    return mistake


SQUARE = dict(square=True, max_width=8)
CORRECT = Mutant("correct", "the correct backward (must never be flagged)", Hooks(), lambda s, c: (None, ""), kind="correct")

# -- helpers of the sequence mutants: a recurrent step or attention's backward taken wrong ---------------------------
STEP_BACKWARD = {"rnn": rnn_step_backward, "lstm": lstm_step_backward, "gru": gru_step_backward}


def _recurrent_mistake(wrong_step=None, **knobs):
    """A recurrent layer's BPTT with ``wrong_step(right_step) -> step_backward`` in place of its step backward,
    or with ``knobs`` (``sum_over_time=False``)."""
    def mistake(layer, p, a, delta):
        step = None if wrong_step is None else wrong_step(STEP_BACKWARD[layer.type])
        return layer.backward(p, a, delta, step_backward=step, **knobs)
    return mistake


def _truncated(right):
    """A step that hands nothing back to the step before it: BPTT cut to one step (dh_prev, and dc_prev, dropped)."""
    return lambda p, cache, *carried: (lambda out: (*out[:2], *(np.zeros_like(c) for c in out[2:])))(
        right(p, cache, *carried))


def _forget_path_dropped(right):
    """An LSTM step that carries no cell-state gradient back: dc_{t−1} = dc_t ⊙ f left out."""
    return lambda p, cache, dh, dc: (lambda out: (*out[:3], np.zeros_like(out[3])))(right(p, cache, dh, dc))


def _tanh_c_derivative_wrong(right):
    """An LSTM step whose dh path into the cell uses 1 − c² for tanh′(c) (not 1 − tanh² c): the step's own
    dc = dc_in + dh ⊙ o ⊙ (1 − tanh² c), shifted by dh ⊙ o ⊙ (tanh² c − c²)."""
    return lambda p, cache, dh, dc: right(p, cache, dh, dc + dh * cache.o * (cache.tanh_c ** 2 - cache.c ** 2))


def _gru_update_sign_flipped(right):
    """A GRU step with ∂h/∂z taken as n − h_{t−1} (its sign flipped: the (1 − z) of h = (1 − z) n + z h_{t−1}
    put on the other term)."""
    def step(p, cache, dh):
        r, z, n = cache.r, cache.z, cache.n
        d_n = dh * (1 - z) * (1 - n * n)
        d_z = dh * (n - cache.h_prev) * z * (1 - z)          # the mistake: (h_{t−1} − n) belongs here
        d_r = d_n * cache.hn * r * (1 - r)
        d_x = np.concatenate((d_r, d_z, d_n), axis=1)
        d_h = np.concatenate((d_r, d_z, d_n * r), axis=1)
        grads, dx = weight_grads(p, cache.x, cache.h_prev, d_x, d_h)
        return grads, dx, d_h @ p["weight_hh_l0"] + dh * z
    return lambda right_step: step


def _attention_mistake(**knobs):
    """Attention's backward with a knob of ``Attention.backward`` turned (scale, softmax Jacobian, k/v routing)."""
    return lambda layer, p, a, delta: layer.backward(p, a, delta, **knobs)


def _mask_after_softmax(layer, p, a, delta):
    """Attention's backward with P recomputed as softmax(S) masked afterwards (the future entries zeroed, the rest
    not renormalized), as when the causal mask is applied after the softmax."""
    _, saved = layer.forward_saved(p, a)
    S = saved["q"] @ saved["k"].swapaxes(-1, -2) / math.sqrt(saved["q"].shape[-1])
    T = S.shape[-1]
    wrong = dict(saved, probs=np.where(np.triu(np.ones((T, T), dtype=bool), 1), 0.0, attention_softmax(S)))
    return layer.backward(p, a, delta, wrong)


def _sequence_corrupts(types, mistake):
    """corrupts() of a mistake in a recurrent or attention layer's backward, as a node index: the layer itself when
    its parameter gradients change (on a random probe), else the node feeding it (its ∂C/∂a); the one nearest the
    loss. Only top-level layers take the mistake (a block calls its body's backward itself)."""
    def corrupts(spec, cache):
        graph, found = nodes(spec), []
        rng = np.random.default_rng(0)
        for k, node in enumerate(graph):
            if node.layer.type not in types or node.name.count(".") != 1:
                continue
            i = int(node.name.split(".")[1])
            a = rng.standard_normal((3, *spec.in_shape(i)))
            p = {n: rng.standard_normal(s) for n, s in node.layer.param_shapes(spec.in_shape(i)).items()}
            delta = rng.standard_normal((3, *spec.out_shape(i)))
            right, wrong = node.layer.backward(p, a, delta), mistake(node.layer, p, a, delta)
            if any(not np.allclose(wrong[0][n], g, rtol=1e-9, atol=1e-12) for n, g in right[0].items()):
                found.append((k, "weight"))
            elif node.src >= 0 and not np.allclose(wrong[1], right[1], rtol=1e-9, atol=1e-12):
                found.append((node.src, "delta"))
        return max(found) if found else (None, "delta")
    return corrupts


def _sequence_mutant(name, mistake_text, types, mistake, strategy) -> Mutant:
    return Mutant(name, mistake_text, Hooks(layer_backward=_backward_of(types, mistake)),
                  _sequence_corrupts(types, mistake), strategy)


def _recurrent_specs(*kinds):
    return sequence_model_specs(kinds=kinds, min_steps=2, max_blocks=1)


def _attention_specs(causal=None):
    out = sequence_model_specs(kinds=("attention",), pre_norm=False, min_steps=2, max_blocks=1)
    return out if causal is None else out.filter(lambda s: any(getattr(l, "causal", False) for l in s.layers))


def _head_wider_than_one(spec) -> bool:
    """An attention layer whose heads have d_h ≥ 2 (with d_h = 1 the scale 1/√d_h is 1: leaving it out changes nothing)."""
    return any(layer.type == "attention" and spec.in_shape(i)[-1] // layer.num_heads >= 2
               for i, layer in enumerate(spec.layers))


SEQUENCE_MUTANTS = [
    _sequence_mutant("bptt_truncated_to_one_step", "backprop through time cut to one step: each step's gradient of "
                     "h_{t−1} (and c_{t−1}) dropped, so dh_t = δ_t only", RECURRENT,
                     _recurrent_mistake(_truncated), _recurrent_specs(*RECURRENT)),
    _sequence_mutant("lstm_forget_path_dropped", "the LSTM cell-state gradient not carried back through the forget "
                     "gate: dc_{t−1} = dc_t ⊙ f left out", ("lstm",),
                     _recurrent_mistake(_forget_path_dropped), _recurrent_specs("lstm")),
    _sequence_mutant("lstm_tanh_c_derivative_wrong", "the output gate's path into the cell with tanh′(c) taken as "
                     "1 − c² instead of 1 − tanh² c", ("lstm",),
                     _recurrent_mistake(_tanh_c_derivative_wrong), _recurrent_specs("lstm")),
    _sequence_mutant("gru_update_gate_sign_flipped", "the GRU update gate's derivative with its sign flipped: "
                     "∂h/∂z = n − h_{t−1} (the (1 − z) of h = (1 − z) n + z h_{t−1} on the wrong term)", ("gru",),
                     _recurrent_mistake(_gru_update_sign_flipped(None)), _recurrent_specs("gru")),
    _sequence_mutant("recurrent_hh_grad_not_summed_over_time", "the hidden-to-hidden gradients (W_hh, b_hh) taken "
                     "from the last step only, not summed through time", RECURRENT,
                     _recurrent_mistake(sum_over_time=False), _recurrent_specs(*RECURRENT)),
    _sequence_mutant("attention_scale_missing_in_backward", "attention's backward without the 1/√d_h of "
                     "S = q kᵀ/√d_h in dq and dk", ("attention",), _attention_mistake(scale_in_backward=False),
                     _attention_specs().filter(_head_wider_than_one)),
    _sequence_mutant("attention_causal_mask_after_softmax", "the causal mask applied after the softmax: P = "
                     "softmax(S) with the future entries zeroed afterwards, rows no longer summing to 1", ("attention",),
                     _mask_after_softmax, _attention_specs(causal=True)),
    _sequence_mutant("attention_softmax_jacobian_identity", "the softmax of the attention weights differentiated as "
                     "the identity: dS = dP", ("attention",), _attention_mistake(softmax_vjp=lambda P, dP: dP),
                     _attention_specs()),
    _sequence_mutant("attention_value_key_grads_swapped", "the value and key gradients swapped (dk written where dv "
                     "belongs in ∂C/∂W_in)", ("attention",), _attention_mistake(swap_kv=True), _attention_specs()),
]


CATALOGUE = [
    # -- the seed notes' own mistakes (SEED-NOTES E1–E6) ------------------------------------------
    Mutant("E1_sigmoid_prime_twice", "σ'(z)(1 − σ(z)) used as the sigmoid derivative: (1 − σ) applied twice",
           Hooks(vjp=_vjp_with({"sigmoid"}, lambda act, z, a: a * (1 - a) * (1 - a))),
           lambda s, c: (_last(s, {"sigmoid"}), "delta"), _hidden(["sigmoid"]), seed_ref="E1"),
    Mutant("E2_activation_for_theta", "∂J/∂θ(2) = (ỹ − y) a(3) σ'(θ(2)a(2)) a(2): the activation a(3) used where θ(3) belongs",
           Hooks(recurse=lambda c, i, d, th, a: d.sum(axis=1, keepdims=True) * a if i == _out(c.spec) else d @ th),
           lambda s, c: (_out(s) - 1, "delta"), specs(min_depth=2, output_activations=("identity",), losses=VALUE_LOSSES),
           seed_ref="E2"),
    Mutant("E3_recursion_without_transpose", "δ(L) = (w(L+1) · δ(L+1)) ⊙ σ'(z(L)) without the transpose (square layers)",
           Hooks(recurse=lambda c, i, d, th, a: d @ th.T if i == _out(c.spec) else d @ th),
           lambda s, c: (_out(s) - 1, "delta"), specs(min_depth=2, **SQUARE), seed_ref="E3"),
    Mutant("E4_cost_factor_dropped", "∂J/∂θ(2) = θ(3) σ'(z(3)) a(2): the factor s(3) = ỹ − y dropped",
           Hooks(loss_grad=lambda spec, a, y: np.ones_like(a)),
           lambda s, c: (_out(s), "delta"), specs(losses=VALUE_LOSSES), seed_ref="E4"),
    Mutant("E5_output_derivative_dropped", "∂J/∂θ(3) = (ỹ − y) a(3) with f ≠ identity: f'(z(4)) dropped",
           Hooks(vjp=lambda c, i, act, z, a, g: g if i == _out(c.spec) else act.vjp(z, a, g)),
           lambda s, c: (_out(s), "delta"),
           specs(losses=("half_sse", "mse"), output_activations=("sigmoid", "tanh", "softplus", "elu")), seed_ref="E5"),
    Mutant("E6_derivative_one_layer_off", "the chain taken through σ'(z(2)) where σ'(z(3)) belongs (square layers)",
           Hooks(vjp=lambda c, i, act, z, a, g: g * act.derivative(c.z[i - 1], c.a[i])
                 if 0 < i < _out(c.spec) else act.vjp(z, a, g)),
           lambda s, c: (_out(s) - 1, "delta"), specs(min_depth=3, activations=("sigmoid", "tanh"), **SQUARE), seed_ref="E6"),
    # -- classic mistakes ----------------------------------------------------------------------------
    Mutant("missing_transpose_everywhere", "δθᵀ instead of δθ at every step of the recursion (square layers)",
           Hooks(recurse=lambda c, i, d, th, a: d @ th.T),
           lambda s, c: (_out(s) - 1, "delta"), specs(min_depth=2, **SQUARE)),
    Mutant("bias_not_summed", "bias gradient averaged over the batch instead of summed",
           Hooks(bias_grad=lambda c, i, d, ds: d.mean(axis=0)),
           lambda s, c: (max(i for i, l in enumerate(s.layers) if l.bias), "bias"), specs(bias=True)),
    Mutant("missing_one_over_m", "the 1/m of a mean loss forgotten in its gradient",
           Hooks(loss_grad=lambda spec, a, y: spec.loss.grad(a, y) * a.shape[0]),
           lambda s, c: (_out(s), "delta"), specs(losses=("half_mse", "cross_entropy", "nll"))),
    Mutant("missing_half", "the ½ of ½(ỹ − y)² not cancelled: gradient 2(ỹ − y)",
           Hooks(loss_grad=lambda spec, a, y: 2 * spec.loss.grad(a, y)),
           lambda s, c: (_out(s), "delta"), specs(losses=("half_sse", "half_mse"))),
    Mutant("sign_flip", "y − ỹ where ỹ − y belongs",
           Hooks(loss_grad=lambda spec, a, y: -spec.loss.grad(a, y)),
           lambda s, c: (_out(s), "delta")),
    Mutant("derivative_at_a", "g'(a) instead of g'(z): the derivative evaluated at the activation",
           Hooks(vjp=_vjp_with({"sigmoid", "tanh"}, lambda act, z, a: act.derivative(a, act.value(a)))),
           lambda s, c: (_last(s, {"sigmoid", "tanh"}), "delta"), _hidden(["sigmoid", "tanh"])),
    Mutant("softmax_jvp_dropped", "the softmax output's Jacobian dropped: δ = ∇_a C",
           Hooks(vjp=lambda c, i, act, z, a, g: g if act.name == "softmax" else act.vjp(z, a, g)),
           lambda s, c: (_out(s), "delta"), specs(losses=("mse", "half_sse"), output_activations=("softmax",))),
    Mutant("cross_entropy_without_onehot", "softmax-cross-entropy gradient without subtracting the one-hot",
           Hooks(loss_grad=lambda spec, a, y: bp.activations.softmax(a) / a.shape[0]),
           lambda s, c: (_out(s), "delta"), specs(losses=("cross_entropy",))),
    Mutant("leaky_slope_ignored", "leaky_relu's negative side treated as relu's (slope 0)",
           Hooks(vjp=_vjp_with({"leaky_relu"}, lambda act, z, a: (z > 0).astype(z.dtype))),
           lambda s, c: (_last(s, {"leaky_relu"}, c, lambda g, z: z < 0), "delta"), _hidden(["leaky_relu"])),
    Mutant("gelu_tanh_derivative_for_exact", "the tanh-approximate GELU derivative used for exact GELU",
           Hooks(vjp=_vjp_with({"gelu"}, lambda act, z, a: GELUTanh().derivative(z, None))),
           lambda s, c: (_last(s, {"gelu"}), "delta"), _hidden(["gelu"])),
    Mutant("weight_grad_transposed", "∂C/∂θ = aᵀδ (transposed) for square layers",
           Hooks(weight_grad=lambda c, i, d, a, ds: a.T @ d),
           lambda s, c: (_out(s), "weight"), specs(**SQUARE)),
    Mutant("delta_of_wrong_layer", "the weight gradient built from the δ of the layer above",
           Hooks(weight_grad=lambda c, i, d, a, ds: (ds.get(f"layers.{i + 1}", d)).T @ a),
           lambda s, c: (_out(s) - 1, "weight"), specs(min_depth=2, **SQUARE)),
    Mutant("stale_cache", "backward reads the cache of the previous batch",
           Hooks(cache_x=lambda x: np.roll(x, 1, axis=0)),
           lambda s, c: (_out(s), "delta"), specs()),
    Mutant("first_example_only", "only the first example of the batch is back-propagated",
           Hooks(loss_grad=lambda spec, a, y: np.where(np.arange(a.shape[0])[:, None] == 0, spec.loss.grad(a, y), 0)),
           lambda s, c: (_out(s), "delta"), specs()),
    Mutant("float32_inside_float64", "a float32 cast inside a float64 backward (precision bug)",
           Hooks(vjp=lambda c, i, act, z, a, g: act.vjp(z, a, g).astype(np.float32).astype(z.dtype)),
           lambda s, c: (_out(s), "delta"), specs(), regimes=("well_conditioned",)),
    Mutant("tanh_prime_one_minus_tanh", "tanh' written as 1 − tanh instead of 1 − tanh²",
           Hooks(vjp=_vjp_with({"tanh"}, lambda act, z, a: 1 - a)),
           lambda s, c: (_last(s, {"tanh"}), "delta"), _hidden(["tanh"])),
    Mutant("softplus_beta_dropped", "softplus' = σ(z) where σ(βz) belongs",
           Hooks(vjp=_vjp_with({"softplus"}, lambda act, z, a: bp.activations.stable_sigmoid(z))),
           lambda s, c: (_last(s, {"softplus"}), "delta"), _hidden(["softplus"])),
    Mutant("elu_alpha_dropped", "elu' = e^z on the negative side, without α",
           Hooks(vjp=_vjp_with({"elu"}, lambda act, z, a: np.where(z > 0, 1.0, np.exp(np.minimum(z, 0))))),
           lambda s, c: (_last(s, {"elu"}, c, lambda g, z: (z < 0) & (g.alpha != 1)), "delta"), _hidden(["elu"])),
    Mutant("weights_averaged", "∂C/∂θ divided by the batch size (mean of per-example gradients)",
           Hooks(weight_grad=lambda c, i, d, a, ds: d.T @ a / a.shape[0]),
           lambda s, c: (_out(s), "weight"), specs()),
    Mutant("hardtanh_passes_everything", "hardtanh' = 1 everywhere (the clipping forgotten)",
           Hooks(vjp=_vjp_with({"hardtanh"}, lambda act, z, a: np.ones_like(z))),
           lambda s, c: (_last(s, {"hardtanh"}, c, lambda g, z: (z <= g.min_val) | (z >= g.max_val)), "delta"),
           _hidden(["hardtanh"])),
    Mutant("bias_missing_in_forward", "the bias left out of the forward pass (a forward bug)",
           Hooks(forward_params=lambda spec, p: {k: (np.zeros_like(v) if k.endswith("bias") else v) for k, v in p.items()}),
           lambda s, c: (None, "loss"), specs(bias=True)),
    # -- mistakes that act only below the output layer ------------------------------------------------
    Mutant("bias_averaged_layer0", "∂C/∂b of the first layer averaged over the batch instead of summed (other layers right)",
           Hooks(bias_grad=lambda c, i, d, ds: d.mean(axis=0) if i == 0 else d.sum(axis=0)),
           lambda s, c: (0, "bias"), specs(min_depth=2, bias=True)),
    Mutant("relu_mask_dropped_layer0", "δ_0 = δ_1 θ_1 without the relu mask: relu' taken as 1 everywhere on the first layer",
           Hooks(vjp=lambda c, i, act, z, a, g: g.copy() if i == 0 and act.name == "relu" else act.vjp(z, a, g)),
           lambda s, c: (0, "delta"), _hidden(["relu"])),
    Mutant("relu_prime_at_zero_is_one", "relu'(0) = 1 instead of torch's 0 — a kink convention, not a bug",
           Hooks(vjp=_vjp_with({"relu"}, lambda act, z, a: (z >= 0).astype(z.dtype))),
           lambda s, c: (_last(s, {"relu"}, c, lambda g, z: z == 0), "delta"), _hidden(["relu"], bias=False),
           kind="kink", regimes=("near_kinks", "exact_kinks")),
    # -- convolution and pooling (cnn_specs), each restricted to networks where the mistake can show -------
    _cnn_mutant("conv_kernel_not_flipped", "∂C/∂a as the full *correlation* of δ with θ: the kernel not flipped "
                "(the full convolution needs θ[k − 1 − j])",
                CONVS, _input_grad(lambda l, p, a, d: _conv_input_grad(l, p, a, d, theta=_flip(p["weight"]))),
                cnn_specs(min_convs=2, max_convs=2, kernel=(2, 4), pools=(None,), min_side=5)),
    _cnn_mutant("conv_stride_ignored_in_backward", "∂C/∂a without spreading δ out by the stride: δ[x] sent to "
                "x + d·j instead of s·x + d·j (no s − 1 zeros between its entries)",
                CONVS, _input_grad(lambda l, p, a, d: _conv_input_grad(l, p, a, d, stride=(1,) * l.nd)),
                cnn_specs(min_convs=2, max_convs=2, stride=(2, 3), padding=(1, 2), pools=(None,), min_side=8)),
    _cnn_mutant("conv_padding_crop_off_by_one", "the padding cropped off by one: ∂C/∂a read from ∂C/∂â one "
                "position early (â[i + lo − 1] where â[i + lo] belongs)",
                CONVS, _input_grad(lambda l, p, a, d: _conv_input_grad(l, p, a, d, crop=_crop_one_off)),
                cnn_specs(min_convs=2, max_convs=2, padding=(1, 2), pools=(None,), min_side=4)),
    _cnn_mutant("conv_dilation_ignored_in_backward", "∂C/∂a scattered with dilation 1: kernel tap j sent to "
                "s·x + j instead of s·x + d·j",
                CONVS, _input_grad(lambda l, p, a, d: _conv_input_grad(l, p, a, d, dilation=(1,) * l.nd)),
                cnn_specs(min_convs=2, kernel=(2, 3), dilation=(2, 3), padding=(1, 2), stride=(1, 2))),
    _cnn_mutant("conv_groups_ignored_in_backward", "∂C/∂a of a grouped conv as if groups = 1: every input "
                "channel gathers δ from every output channel, not only its own group's",
                CONVS, _input_grad(lambda l, p, a, d: _conv_input_grad(l, p, a, d, ungrouped=True)),
                cnn_specs(min_convs=2, groups="grouped", in_channels=(2, 3))),
    _cnn_mutant("conv_weight_grad_channels_swapped", "∂C/∂θ with the in and out channels swapped (a ⋆ δ laid "
                "out as (C, O, k) and stored as (O, C, k); square channels)",
                CONVS, _param_grad("weight", lambda l, p, a, d, g: g.swapaxes(0, 1)),
                cnn_specs(square_channels=True, groups="ungrouped", in_channels=(2, 3)), tensor="weight"),
    _cnn_mutant("conv_bias_averaged_over_positions", "∂C/∂b summed over the batch but averaged over the "
                "output positions (Σ_m mean_x δ instead of Σ_{m,x} δ)",
                CONVS, _param_grad("bias", lambda l, p, a, d, g: d.sum(axis=0).reshape(l.out_channels, -1).mean(axis=1)),
                cnn_specs(bias=True, pools=(None,), min_side=3), tensor="bias"),
    _cnn_mutant("max_pool_grad_to_window_start", "max pool's δ routed to the first element of each window "
                "instead of its argmax",
                MAX_POOLS, _input_grad(_max_routed(_window_start)), cnn_specs(pools=("max",), pool_kernel=(2, 3))),
    _cnn_mutant("max_pool_grad_to_every_tie", "max pool's δ sent in full to every element equal to the window's "
                "max (mask = (w == max), not normalised): tied elements get δ each",
                MAX_POOLS, _input_grad(_max_routed(_every_max)), cnn_specs(pools=("max",), pool_kernel=(2, 3)),
                ties=True, regimes=TIE_REGIMES),
    _cnn_mutant("avg_pool_missing_one_over_k", "avg pool's δ spread over the window without the 1/k (δ copied "
                "to every element)",
                AVG_POOLS, _input_grad(_avg_spread(lambda l, a: 1.0)), cnn_specs(pools=("avg",), pool_kernel=(2, 3))),
    _cnn_mutant("avg_pool_count_include_pad_flipped", "avg pool's backward divides border windows by the other "
                "count: k where count_include_pad=False asks for the elements inside, or the reverse",
                AVG_POOLS, _input_grad(_avg_spread(_other_count)),
                cnn_specs(pools=("avg",), pool_kernel=(2, 3), pool_stride=(1, 2), pool_padding=(1, 1))),
    _cnn_mutant("flatten_backward_channels_last", "flatten's backward unflattens δ channels-last, (m, H, W, C), "
                "where the forward flattened (m, C, H, W)",
                ("flatten",), _input_grad(_channels_last),
                cnn_specs(in_channels=(2, 3), channels=(2, 4), kernel=(1, 3), stride=(1, 1), dilation=(1, 1), pools=(None,), min_side=4)),
    # -- normalization and dropout: the training-mode backwards people get wrong --------------------------
    _cnn_mutant("batch_norm_mean_path_dropped", "batch norm's ∂C/∂a without the terms through the mean: "
                "(g − x̂ mean(g x̂))/s, the − mean g forgotten",
                ("batch_norm",), _norm_input_grad(_mean_path_dropped), with_norms(kinds=("batch_norm",), training=True)),
    _cnn_mutant("batch_norm_variance_path_dropped", "batch norm's ∂C/∂a without the terms through the variance: "
                "(g − mean g)/s, the − x̂ mean(g x̂) forgotten",
                ("batch_norm",), _norm_input_grad(_variance_path_dropped), with_norms(kinds=("batch_norm",), training=True)),
    _cnn_mutant("batch_norm_bessel_in_backward_only", "batch norm's backward recomputes x̂ and s with the unbiased "
                "variance σ² N/(N − 1) while the forward normalized with the biased σ²",
                ("batch_norm",), _norm_input_grad(_bessel_in_backward), with_norms(kinds=("batch_norm",), training=True)),
    _cnn_mutant("batch_norm_running_stats_in_training", "batch norm's backward in training mode uses the running "
                "statistics (the eval-mode backward: γδ/√(r_σ² + ε), ∂C/∂γ from the running x̂)",
                ("batch_norm",), _running_stats_in_training, with_norms(kinds=("batch_norm",), training=True),
                tensor="any"),
    _cnn_mutant("layer_norm_backward_over_batch_axis", "layer norm's backward takes its means over the batch axis "
                "instead of the normalized features",
                ("layer_norm",), _norm_input_grad(_layer_norm_over_batch), with_norms(kinds=("layer_norm",))),
    _cnn_mutant("group_norm_backward_as_one_group", "group norm's backward takes its means over every channel of "
                "the example (as if one group) while the forward normalized each group",
                ("group_norm",), _norm_input_grad(_one_group),
                with_norms(cnn_specs(max_convs=2, channels=(2, 4)), kinds=("group_norm",))),
    _cnn_mutant("norm_weight_grad_without_xhat", "∂C/∂γ = Σ δ, the x̂ factor forgotten (γ's gradient made β's)",
                NORM_TYPES, _param_grad("weight", lambda l, p, a, d, g: d.sum(axis=l._shared(a)).reshape(g.shape)),
                with_norms(kinds=NORM_TYPES), tensor="weight"),
    _cnn_mutant("embedding_grad_assigned_not_accumulated", "an embedding's ∂C/∂W[x] = δ assigned by fancy indexing: "
                "a token that repeats keeps only its last occurrence's δ instead of their sum",
                ("embedding",), _embedding_grad(assign=True, zero_padding=True), embedding_specs(), tensor="weight"),
    _cnn_mutant("embedding_padding_row_gets_gradient", "an embedding's padding_idx row gets the gradient of its "
                "occurrences (torch gives it none)", ("embedding",), _embedding_grad(assign=False, zero_padding=False),
                embedding_specs().filter(lambda s: s.layers[0].padding_idx is not None), tensor="weight"),
    Mutant("residual_identity_path_dropped", "a residual block's backward returns only the body's ∂C/∂a: the identity "
           "path's δ (or the projection's backward) is not added at the block's input",
           Hooks(layer_backward=_backward_of(("residual",), _residual_mistake(identity=True))), _block_corrupts(True),
           with_residuals()),
    Mutant("residual_projection_grad_dropped", "a residual block's projection gets no weight gradient (its backward "
           "forgotten; the body's gradients are right)",
           Hooks(layer_backward=_backward_of(("residual",), _residual_mistake(identity=False))), _block_corrupts(False),
           with_residuals().filter(lambda s: any(l.type == "residual" and l.projection is not None for l in s.layers))),
    _cnn_mutant("temporal_dense_grad_from_last_step", "∂C/∂θ of a dense layer applied at every step taken from the "
                "last step only (δ_Tᵀ a_T), not summed through time", ("temporal_dense",),
                _param_grad("weight", lambda l, p, a, d, g: d[:, -1].T @ a[:, -1]),
                sequence_specs().filter(lambda s: s.input_shape[0] > 1), tensor="weight"),
    _cnn_mutant("temporal_dense_bias_averaged_over_steps", "∂C/∂b of a dense layer applied at every step averaged over "
                "the steps instead of summed", ("temporal_dense",),
                _param_grad("bias", lambda l, p, a, d, g: d.sum(axis=0).mean(axis=0)),
                sequence_specs().filter(lambda s: s.input_shape[0] > 1), tensor="bias"),
    _cnn_mutant("dropout_mask_forgotten_in_backward", "dropout's mask applied in the forward but not the backward: "
                "∂C/∂a = δ", ("dropout",), _dropout_grad(scaled=False), with_norms(kinds=("dropout",), training=True)),
    _cnn_mutant("dropout_scale_forgotten_in_backward", "dropout's backward applies the mask without its 1/(1 − p): "
                "∂C/∂a = δ ⊙ M", ("dropout",), _dropout_grad(scaled=True), with_norms(kinds=("dropout",), training=True)),
    *SEQUENCE_MUTANTS,
]

#: Valid conventions of conv/pool layers, run like the kink mutant (the oracle must call them ``kink``,
#: never ``bug``), but kept out of CATALOGUE: ``bp-oracle rates`` runs every kink mutant as a control on
#: every draw. Splitting a window's δ among elements tied for its max is a convex combination of the
#: one-hot routings, so an element of max's (Clarke) subdifferential: a valid gradient, torch's
#: first-element choice being another. Routing the full δ to *every* tie is not (the shares sum to more
#: than 1): that is the bug ``max_pool_grad_to_every_tie``.
CNN_KINKS = [
    _cnn_mutant("max_pool_ties_split", "max pool's δ split evenly among the elements tied for the window's max "
                "(torch sends it all to the first) — a convention at ties, not a bug",
                MAX_POOLS, _input_grad(_max_routed(_split_among_ties)), cnn_specs(pools=("max",), pool_kernel=(2, 3)),
                ties=True, kind="kink", regimes=TIE_REGIMES),
]

@dataclass
class Row:
    mutant: str
    kind: str
    seed_ref: str
    killed: bool
    examples: int
    classification: str
    declared_layer: int | None
    reported_layer: int | None
    localization_correct: bool | None
    diagnosis: str
    seconds: float

    def to_dict(self):
        return dict(self.__dict__)


def hunt(mutant: Mutant, examples: int, seed: int = 0) -> Row:
    """Search networks for one that shows the mutant; stop at the first (no shrinking: we count examples)."""
    seen = {"n": 0, "result": None, "spec": None}
    start = time.perf_counter()
    regimes = st.sampled_from(list(mutant.regimes))
    target = {"bug": ("bug", "forward"), "kink": ("kink",), "correct": ("bug", "forward", "crash")}[mutant.kind]

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutant.specs, regimes, st.integers(1, 6), st.integers(0, 2**32 - 1))
    def search(spec, regime, batch, data_seed):
        rng = np.random.default_rng(data_seed)
        params = draw_params(spec, rng, regime)
        x, y = draw_data(spec, rng, regime, fit_batch(spec, batch))
        result = check(spec, params, x, y, mutant.grads_fn)
        seen["n"] += 1
        if result.classification in target or result.classification == "bug":  # a kink mutant called a bug: stop too
            seen["result"], seen["spec"], seen["cache"] = result, spec, bp.forward(spec, params, x)
            raise _Found()

    try:
        search()
    except _Found:
        pass
    result, spec = seen["result"], seen["spec"]
    seconds = time.perf_counter() - start
    if result is None:
        return Row(mutant.name, mutant.kind, mutant.seed_ref, False, seen["n"], "", None, None, None, "", seconds)
    declared, _tensor = mutant.corrupts(spec, seen["cache"])
    reported = result.first_divergent_layer
    hint = "; ".join(next(iter(result.hints.values()), []))  # the hints on the first failing tensor
    return Row(mutant.name, mutant.kind, mutant.seed_ref, result.classification in target, seen["n"],
               result.classification, declared, reported,
               (reported == declared) if mutant.kind == "bug" else None, hint or result.localization, seconds)


class _Found(Exception):
    pass


def markdown_table(summary: dict) -> str:
    """The catalogue as a Markdown table, verdict line first."""
    ok = summary["killed"] == summary["total"] and not summary["correct_flagged"] and summary["kink_mutants_classified_as_kink"]
    lines = [
        f"## Fault catalogue: {summary['killed']}/{summary['total']} bug mutants killed, "
        f"localization correct for {summary['localization_correct']}/{summary['total']}, "
        f"kink mutant {'classified as kink' if summary['kink_mutants_classified_as_kink'] else 'MISCLASSIFIED'}, "
        f"correct implementation {'FLAGGED' if summary['correct_flagged'] else 'never flagged'} "
        f"in {summary['correct_examples']} examples — {'PASS' if ok else 'FAIL'}",
        "",
        f"Budget: {summary['examples_budget']} examples per mutant, seed {summary['seed']}.",
        "",
        "| mutant | seed | kind | killed | examples | verdict | declared layer | reported layer | localization | diagnosis |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        loc = {True: "✅", False: "❌", None: "—"}[r["localization_correct"]]
        lines.append(f"| `{r['mutant']}` | {r['seed_ref']} | {r['kind']} | {'yes' if r['killed'] else 'no'} | {r['examples']} | "
                     f"{r['classification'] or '—'} | {r['declared_layer']} | {r['reported_layer']} | {loc} | "
                     f"{r['diagnosis'].replace('|', '/')} |")
    lines += ["", "What each mutant models:", ""]
    lines += [f"- `{m.name}`: {m.mistake}" for m in CATALOGUE]
    return "\n".join(lines) + "\n"


def run_catalogue(examples: int = 200, seed: int = 0, progress=None) -> dict:
    """Hunt every mutant and run the correct implementation; returns the table as a dict."""
    rows = []
    for m in CATALOGUE + [CORRECT]:
        rows.append(hunt(m, examples, seed))
        if progress:
            progress(rows[-1])
    bugs = [r for r in rows if r.kind == "bug"]
    correct = next(r for r in rows if r.kind == "correct")
    kinks = [r for r in rows if r.kind == "kink"]
    return {
        "schema": "bp-oracle/mutants", "schema_version": 1, "examples_budget": examples, "seed": seed,
        "total": len(bugs), "killed": sum(r.killed for r in bugs),
        "localization_correct": sum(bool(r.localization_correct) for r in bugs),
        "kink_mutants_classified_as_kink": all(r.killed for r in kinks),
        "correct_flagged": correct.killed, "correct_examples": correct.examples,
        "rows": [r.to_dict() for r in rows],
    }
