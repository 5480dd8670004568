r"""Forward and backward passes, written out as the four backprop equations.

Notation (the seed's, shifted to 0-based code indices): layer i maps :math:`a_i` to
:math:`z_i = a_i θ_i^T + b_i` and :math:`a_{i+1} = g_i(z_i)`; :math:`a_0 = x` is the input
(the seed's :math:`a^{(1)}`; our ``z[i]`` is the seed's :math:`z^{(i+2)}` and θ_i its :math:`θ^{(i+1)}`),
and the last activation is the prediction ỹ. ``delta[i]`` is :math:`δ_i = ∂C/∂z_i`, the error signal
at the output of layer i (the seed's s, Nielsen's δ). With rows as examples:

1. :math:`δ_{L-1} = ∇_a C ⊙ g'_{L-1}(z_{L-1})`             (output layer; a JVP for softmax)
2. :math:`δ_{i-1} = (δ_i\, θ_i) ⊙ g'_{i-1}(z_{i-1})`       (the recursion: :math:`θ^T δ` per column)
3. :math:`∂C/∂θ_i = δ_i^T a_i`                              ("∂C/∂w = a_in · δ_out", summed over rows)
4. :math:`∂C/∂b_i = \sum_{rows} δ_i`

``forward`` returns an explicit :class:`Cache`; ``backward`` is a pure function of that cache and y.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import check_params, check_x, check_y
from .layers.base import forward_keeping, kept
from .spec import Spec


@dataclass(frozen=True)
class Cache:
    """What forward computed: ``z[i]`` = pre-activation of layer i, ``a[i]`` its input (a[0] = x, a[L] = ỹ)."""

    spec: Spec
    params: dict
    z: tuple
    a: tuple
    x_shape: tuple  # the shape x was given in: (m, n), or one column example (n,) / (n, 1)
    saved: tuple = ()  # per layer: what a block's or a norm's forward keeps for its backward (``forward_saved``)

    @property
    def single(self) -> bool:
        """x came as one column example: δ and ∂C/∂x are given back in that form."""
        return self.x_shape != self.a[0].shape

    @property
    def output(self) -> np.ndarray:
        """ỹ = a_L, the prediction, one row per example."""
        return self.a[-1]

    def layer_params(self, i: int) -> dict[str, np.ndarray]:
        return layer_params(self.params, i)


def layer_params(params: dict, i: int) -> dict[str, np.ndarray]:
    """``{"weight": θ_i, "bias": b_i}`` of layer i, from the flat ``layers.{i}.*`` names."""
    prefix = f"layers.{i}."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class Gradients:
    """Named results of backward.

    * ``loss``: the spec's reduced loss C;
    * ``grads``: ∂C/∂θ and ∂C/∂b keyed ``layers.{i}.weight`` (out, in) / ``layers.{i}.bias`` (out,);
    * ``deltas``: δ_i = ∂C/∂z_i keyed ``layers.{i}``, shape (m, units), or (units,) for one column example;
    * ``grad_input``: ∂C/∂x, in the shape x was given (None for token input: an embedding's x has none);
    * ``buffers``: the state a forward in training mode updates (batch norm's running statistics), keyed
      like the params (``layers.{i}.running_mean``); not gradients.
    """

    loss: np.floating
    grads: dict
    deltas: dict
    grad_input: np.ndarray
    buffers: dict = field(default_factory=dict)


def forward(spec: Spec, params: dict, x: np.ndarray) -> Cache:
    """Run x through the network, keeping every z and a."""
    dtype = check_params(spec, params)
    a, _ = check_x(spec, x, dtype)
    zs, acts, saved = [], [a], []
    for i, layer in enumerate(spec.layers):
        z, keep = forward_keeping(layer, layer_params(params, i), acts[-1])  # a conv's cols, a norm's x̂ and s, ...
        zs.append(z)
        saved.append(keep)
        acts.append(layer.activation.value(z))
    return Cache(spec, dict(params), tuple(zs), tuple(acts), np.shape(x), tuple(saved))


def backward(cache: Cache, y: np.ndarray) -> Gradients:
    """The δ recursion from the loss back to the input; a pure function of (cache, y)."""
    spec, L = cache.spec, len(cache.spec.layers)
    y = check_y(spec, y, cache.output.shape[0], cache.single, cache.output.dtype)
    out_rows, y_rows = spec.loss.as_rows(cache.output, y)  # a sequence output (m, T, k): the loss on m·T rows of k
    loss = spec.loss.value(out_rows, y_rows)
    grads, deltas = {}, {}
    saved = cache.saved or (None,) * L  # a Cache built by hand may keep nothing
    grad_a = spec.loss.grad(out_rows, y_rows).reshape(cache.output.shape)   # ∇_a C at a_L
    for i in reversed(range(L)):
        layer = spec.layers[i]
        delta = layer.activation.vjp(cache.z[i], cache.a[i + 1], grad_a)   # δ_i = ∇_a C ⊙ g'(z_i)
        deltas[f"layers.{i}"] = delta
        if hasattr(layer, "backward_with_deltas"):  # a block also reports the δ of the layers inside it
            nabla, grad_a, inner = layer.backward_with_deltas(cache.layer_params(i), cache.a[i], delta, *kept(saved[i]))
            deltas.update({f"layers.{i}.{k}": d for k, d in inner.items()})
        else:
            nabla, grad_a = layer.backward(cache.layer_params(i), cache.a[i], delta, *kept(saved[i]))  # δ_i^T a_i, Σ δ_i, δ_i θ_i
        for pname, g in nabla.items():
            grads[f"layers.{i}.{pname}"] = g
    grads = {name: grads[name] for name in spec.param_shapes()}  # layer order, as torch lists them
    deltas = {k: deltas[k] for k in delta_names(spec)}  # layer order, a block's inner δ after its own
    if cache.single:
        deltas = {k: d[0] for k, d in deltas.items()}
        grad_a = None if grad_a is None else grad_a.reshape(cache.x_shape)
    buffers = {}
    for i, layer in enumerate(spec.layers):
        if hasattr(layer, "updated_buffers"):
            buffers.update({f"layers.{i}.{k}": v
                            for k, v in layer.updated_buffers(cache.layer_params(i), cache.a[i], *kept(saved[i])).items()})
    return Gradients(loss=loss, grads=grads, deltas=deltas, grad_input=grad_a, buffers=buffers)


def delta_names(spec: Spec) -> list[str]:
    """The name of every δ backward reports, in layer order: ``layers.{i}``, and after a residual block's own
    the δ of each layer inside it, ``layers.{i}.body.{j}`` (nested blocks likewise), and its projection's."""
    def walk(prefix, layer):
        yield prefix
        for j, inner in enumerate(getattr(layer, "body", ())):
            yield from walk(f"{prefix}.body.{j}", inner)
        if getattr(layer, "projection", None) is not None:
            yield f"{prefix}.projection"
    return [name for i, layer in enumerate(spec.layers) for name in walk(f"layers.{i}", layer)]


def gradients(spec: Spec, params: dict, x: np.ndarray, y: np.ndarray) -> Gradients:
    """forward then backward: the loss, every parameter gradient, every δ and ∂C/∂x.

    This is the "bring your own gradients" signature the oracle checks: ``(spec, params, x, y)``.
    """
    return backward(forward(spec, params, x), y)
