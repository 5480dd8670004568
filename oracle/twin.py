"""The PyTorch twin: the identical model built from the same spec, differentiated by torch.autograd.

The twin uses torch's own functions (``F.leaky_relu``, ``F.huber_loss``, ...), never manual_bp's
formulas, so it is an independent reference. It copies the given weights and data unchanged
(θ is (out, in) on both sides), runs ``loss.backward()``, and returns every parameter gradient,
∂C/∂x, and δ_i = ∂C/∂z_i for every layer (through ``retain_grad`` on each pre-activation).

``jitter=rng`` perturbs every a = g(z) by a factor (1 ± ε) and every δ of an elementwise activation
by ±ε·|∂C/∂a| (ε the dtype's machine epsilon): the rounding errors any implementation makes when it
evaluates g(z) and g'(z). Nudging the inputs alone does not reproduce them where a result is a
difference of nearly equal numbers (1 − tanh², or 1 − p in BCE with p near 1).

``flip_kinks=True`` recomputes the reference with the *other* one-sided derivative at every element
that lies exactly on a kink (relu'(0) = 1 instead of 0, sign(0) = +1 in l1, ...): a candidate that
matches this reference differs from torch only by a convention at non-differentiable points.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from manual_bp import Spec, keep_mask

from .graph import node_weights, nodes


def activation_fn(act):
    """The torch function for a manual_bp activation object (same name, same parameters)."""
    p = act.params
    return {
        "identity": lambda z: z,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, p.get("negative_slope", 0.01)),
        "elu": lambda z: F.elu(z, p.get("alpha", 1.0)),
        "selu": F.selu,
        "softplus": lambda z: F.softplus(z, p.get("beta", 1.0), p.get("threshold", 20.0)),
        "gelu": F.gelu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "silu": F.silu,
        "mish": F.mish,
        "softsign": F.softsign,
        "hardtanh": lambda z: F.hardtanh(z, p.get("min_val", -1.0), p.get("max_val", 1.0)),
        "softmax": lambda z: F.softmax(z, dim=-1),
        "log_softmax": lambda z: F.log_softmax(z, dim=-1),
    }[act.name]


def loss_fn(loss):
    """The torch computation of a manual_bp loss, with the same reduction.

    A sequence output (m, T, k) is judged as m·T rows of k, as torch users write it:
    ``F.cross_entropy(out.reshape(-1, k), y.reshape(-1))`` (class targets −100 ignored: F.cross_entropy's and
    F.nll_loss's default ``ignore_index``), ``F.mse_loss(out.reshape(-1, k), y.reshape(-1, k))``, ...
    """
    fn = _row_loss(loss)
    if loss.targets == "classes":
        return lambda a, y: fn(a.reshape(-1, a.shape[-1]), y.reshape(-1)) if a.dim() > 2 else fn(a, y)
    return lambda a, y: fn(a.reshape(-1, a.shape[-1]), y.reshape(-1, a.shape[-1])) if a.dim() > 2 else fn(a, y)


def _row_loss(loss):
    """``loss_fn`` on rows (m, k)."""
    p = loss.params
    return {
        "half_sse": lambda a, y: 0.5 * ((a - y) ** 2).sum(),
        "sse": lambda a, y: ((y - a) ** 2).sum(),
        "half_mse": lambda a, y: ((a - y) ** 2).sum() / (2 * a.shape[0]),
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "huber": lambda a, y: F.huber_loss(a, y, delta=p["delta"]),
        "smooth_l1": lambda a, y: F.smooth_l1_loss(a, y, beta=p["beta"]),
        "bce": F.binary_cross_entropy,
        "bce_with_logits": F.binary_cross_entropy_with_logits,
        "cross_entropy": F.cross_entropy,
        "nll": F.nll_loss,
    }[loss.name]


def _padding(layer):
    return layer.padding if layer.padding == "same" else tuple(layer.padding)


def _conv(fn, l, w, a):
    """F.conv1d/F.conv2d with the layer's fields. torch warns that "same" padding with an even kernel
    pads one side more; that is the layer's documented behaviour, not news for every check."""
    if l.padding != "same":
        return fn(a, w["weight"], w.get("bias"), l.stride, _padding(l), l.dilation, l.groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'")
        return fn(a, w["weight"], w.get("bias"), l.stride, "same", l.dilation, l.groups)


#: The torch twin of every layer type, registered by its spec "type": ``fn(layer, w, a) -> z`` with
#: ``w`` the layer's parameters by short name ("weight", "bias"). Built from torch.nn.functional only,
#: never from manual_bp's code. A new layer type adds its line here (see manual_bp/layers/base.py).
TWIN_LAYERS = {
    "dense": lambda l, w, a: F.linear(a, w["weight"], w.get("bias")),
    "conv1d": lambda l, w, a: _conv(F.conv1d, l, w, a),
    "conv2d": lambda l, w, a: _conv(F.conv2d, l, w, a),
    "max_pool1d": lambda l, w, a: F.max_pool1d(a, l.kernel_size, l.stride, l.padding),
    "max_pool2d": lambda l, w, a: F.max_pool2d(a, l.kernel_size, l.stride, l.padding),
    "avg_pool1d": lambda l, w, a: F.avg_pool1d(a, l.kernel_size, l.stride, l.padding, count_include_pad=l.count_include_pad),
    "avg_pool2d": lambda l, w, a: F.avg_pool2d(a, l.kernel_size, l.stride, l.padding, count_include_pad=l.count_include_pad),
    "flatten": lambda l, w, a: a.flatten(1),
    # training mode updates the running statistics in place: the twin's are copies (``twin_buffers``)
    "batch_norm": lambda l, w, a: F.batch_norm(a, w.get("running_mean"), w.get("running_var"), w.get("weight"),
                                               w.get("bias"), l.training, l.momentum, l.eps),
    "layer_norm": lambda l, w, a: F.layer_norm(a, _normalized_shape(l, a), w.get("weight"), w.get("bias"), l.eps),
    "group_norm": lambda l, w, a: F.group_norm(a, l.num_groups, w.get("weight"), w.get("bias"), l.eps),
    "dropout": lambda l, w, a: a * _dropout_scale(l, a) if l.training else a,
    "embedding": lambda l, w, a: F.embedding(a, w["weight"], l.padding_idx),
    "temporal_dense": lambda l, w, a: F.linear(a, w["weight"], w.get("bias")),
    "rnn": lambda l, w, a: _recurrent(l, w, a),
    "lstm": lambda l, w, a: _recurrent(l, w, a),
    "gru": lambda l, w, a: _recurrent(l, w, a),
    "attention": lambda l, w, a: _attention(l, w, a),
}


@functools.lru_cache(maxsize=64)  # a campaign draws thousands of layers: keep the recent ones, not all
def _built_recurrent(layer, n: int, dtype) -> torch.nn.Module:
    return _recurrent_twin(layer, (n,), dtype)


def _recurrent(layer, w: dict, a: torch.Tensor) -> torch.Tensor:
    """The layer run by torch's own nn.RNN / nn.LSTM / nn.GRU (``TWIN_MODULES``, built once per layer, size and
    dtype) on the case's weights, by ``torch.func.functional_call``."""
    return torch.func.functional_call(_built_recurrent(layer, a.shape[-1], a.dtype), w, (a,))


def causal_mask(T: int, dtype) -> torch.Tensor:
    """torch's additive causal mask: −∞ above the diagonal (step t attends to steps s ≤ t)."""
    return torch.triu(torch.full((T, T), -math.inf, dtype=dtype), diagonal=1)


def _attention(layer, w: dict, a: torch.Tensor) -> torch.Tensor:
    """Self-attention as ``nn.MultiheadAttention(d, h, batch_first=True)(a, a, a)`` computes it, by torch's own
    ``F.multi_head_attention_forward`` (which takes (T, m, d))."""
    d, T = a.shape[-1], a.shape[1]
    seq_first = a.transpose(0, 1)
    mask = causal_mask(T, a.dtype) if layer.causal else None
    out, _ = F.multi_head_attention_forward(
        seq_first, seq_first, seq_first, d, layer.num_heads, w["in_proj_weight"], w.get("in_proj_bias"), None, None,
        False, 0.0, w["out_proj.weight"], w.get("out_proj.bias"), training=False, need_weights=False,
        attn_mask=mask, is_causal=False)
    return out.transpose(0, 1)


def _normalized_shape(layer, a: torch.Tensor) -> tuple[int, ...]:
    """A layer norm's normalized_shape: as given, or a's last axis."""
    return tuple(a.shape[-1:]) if layer.normalized_shape is None else tuple(layer.normalized_shape)


def _dropout_scale(layer, a: torch.Tensor) -> torch.Tensor:
    """M/(1 − p): the case's mask (``manual_bp.keep_mask``, data shared by both sides, like x) scaled as
    ``F.dropout`` scales the elements it keeps."""
    mask = torch.from_numpy(keep_mask(layer.seed, layer.p, tuple(a.shape)))
    return mask.to(a.dtype) / (1.0 - layer.p)


def pool_windows(layer, t: torch.Tensor, fill: float) -> torch.Tensor:
    """The windows a pool reads, (m, C, *out, *kernel), from t padded with ``fill`` (−∞ for max, 0 for sums)."""
    t = F.pad(t, [p for p in reversed(layer.padding) for _ in (0, 1)], value=fill)
    for axis, (k, s) in enumerate(zip(layer.kernel_size, layer.stride)):
        t = t.unfold(2 + axis, k, s)
    return t


def route_weights(contenders: torch.Tensor, nd: int, mode: str) -> torch.Tensor:
    """How a max pool may share each window's δ among the elements that tie for its max (``contenders``,
    a bool mask of the windows): all to the ``first`` in row-major order (torch's CPU kernel, and NumPy's
    argmax), all to the ``last``, or ``split`` evenly. Each window's weights sum to 1."""
    flat = contenders.flatten(-nd).to(torch.float64)
    if mode == "split":
        w = flat / flat.sum(-1, keepdim=True).clamp(min=1)
    else:
        order = torch.arange(flat.shape[-1], dtype=torch.float64)
        score = torch.where(flat > 0, order if mode == "last" else -order, -math.inf)
        w = torch.zeros_like(flat).scatter_(-1, score.argmax(-1, keepdim=True), 1.0)
    return w.view(contenders.shape)


class _RoutedMaxPool(torch.autograd.Function):
    """torch's max pool forward; backward sends each window's δ by the given weights (``route_weights``)."""

    @staticmethod
    def forward(ctx, a, layer, weights):
        ctx.layer = layer
        ctx.save_for_backward(a, weights)
        return TWIN_LAYERS[layer.type](layer, {}, a)

    @staticmethod
    def backward(ctx, g):
        a, weights = ctx.saved_tensors
        nd = len(ctx.layer.kernel_size)
        with torch.enable_grad():  # lay each window's share back onto the input positions it read
            probe = torch.zeros_like(a).requires_grad_(True)
            (grad,) = torch.autograd.grad(pool_windows(ctx.layer, probe, 0.0), probe, g[(..., *(None,) * nd)] * weights)
        return grad, None, None


def routed_max_pool(layer, a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """torch's max pool of ``a`` whose backward shares each window's δ by ``weights`` (``route_weights``)."""
    return _RoutedMaxPool.apply(a, layer, weights)


def twin_forward(spec: Spec, weights: dict, x, routes=None):
    """The twin's forward, node by node (``oracle.graph``: a chain's layers, blocks opened up): each layer's torch
    twin (``TWIN_LAYERS``: F.linear for dense, as ``nn.Linear`` calls it; F.conv2d, F.max_pool2d, ...) then torch's
    g; a block's sum adds its skip path. ``routes`` may give a max pool node k the routing weights its backward
    uses at ties (``route_weights``), instead of torch's.

    Returns (ỹ, [z_0, ..., z_{N-1}], [a_1, ..., a_N]), one z and a per node.
    """
    zs, acts = [], []
    for k, node in enumerate(nodes(spec)):
        a = x if node.src < 0 else acts[node.src]
        if node.is_sum:
            z = a + (x if node.skip < 0 else acts[node.skip])
        elif routes and k in routes:
            z = routed_max_pool(node.layer, a, routes[k])
        else:
            z = TWIN_LAYERS[node.layer.type](node.layer, node_weights(weights, node), a)
        if z is a:  # eval dropout, a flatten of a vector: its own tensor, so that its δ is its own (a block's
            z = a.clone()  # input also feeds the skip path, whose gradient must not be counted as this δ)
        a = activation_fn(node.activation)(z)
        zs.append(z)
        acts.append(a)
    return acts[-1], zs, acts


#: The same twins as ``torch.nn`` modules, so that a user can see, load and run the identical model:
#: ``build(layer, in_shape, dtype) -> nn.Module`` with parameters named as the spec names them.
TWIN_MODULES = {
    "dense": lambda l, shape, dt: torch.nn.Linear(shape[0], l.units, bias=l.bias, dtype=dt),
    "conv1d": lambda l, shape, dt: torch.nn.Conv1d(shape[0], l.out_channels, l.kernel_size, l.stride, _padding(l),
                                                   l.dilation, l.groups, l.bias, dtype=dt),
    "conv2d": lambda l, shape, dt: torch.nn.Conv2d(shape[0], l.out_channels, l.kernel_size, l.stride, _padding(l),
                                                   l.dilation, l.groups, l.bias, dtype=dt),
    "max_pool1d": lambda l, shape, dt: torch.nn.MaxPool1d(l.kernel_size, l.stride, l.padding),
    "max_pool2d": lambda l, shape, dt: torch.nn.MaxPool2d(l.kernel_size, l.stride, l.padding),
    "avg_pool1d": lambda l, shape, dt: torch.nn.AvgPool1d(l.kernel_size, l.stride, l.padding,
                                                          count_include_pad=l.count_include_pad),
    "avg_pool2d": lambda l, shape, dt: torch.nn.AvgPool2d(l.kernel_size, l.stride, l.padding,
                                                          count_include_pad=l.count_include_pad),
    "flatten": lambda l, shape, dt: torch.nn.Flatten(1),
    "batch_norm": lambda l, shape, dt: (torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d)(
        shape[0], l.eps, l.momentum, l.affine, dtype=dt).train(l.training),
    "layer_norm": lambda l, shape, dt: torch.nn.LayerNorm(shape[-1:] if l.normalized_shape is None else l.normalized_shape,
                                                          l.eps, l.affine, dtype=dt),
    "group_norm": lambda l, shape, dt: torch.nn.GroupNorm(l.num_groups, shape[0], l.eps, l.affine, dtype=dt),
    "dropout": lambda l, shape, dt: _MaskedDropout(l),
    "embedding": lambda l, shape, dt: torch.nn.Embedding(l.num_embeddings, l.embedding_dim, l.padding_idx, dtype=dt),
    "residual": lambda l, shape, dt: _ResidualModule(l, shape, dt),
    "temporal_dense": lambda l, shape, dt: torch.nn.Linear(shape[-1], l.units, bias=l.bias, dtype=dt),
    "rnn": lambda l, shape, dt: _recurrent_twin(l, shape, dt),
    "lstm": lambda l, shape, dt: _recurrent_twin(l, shape, dt),
    "gru": lambda l, shape, dt: _recurrent_twin(l, shape, dt),
    "attention": lambda l, shape, dt: _SelfAttention(l, shape, dt),
}


class _LearnedState:
    """What a recurrent twin adds to torch's nn.RNN / nn.LSTM / nn.GRU (one layer, batch first): a learned initial
    state ``h0`` (and ``c0``) shared by every example, if the layer has one, and the last step alone when it does
    not return the sequence. Its ``state_dict`` names are torch's own (``weight_ih_l0``, ...), then h0, c0."""

    def _learned(self, layer, dt):
        self.layer = layer
        if layer.initial_state == "learned":
            self.h0 = torch.nn.Parameter(torch.zeros(layer.hidden_size, dtype=dt))
            if layer.type == "lstm":
                self.c0 = torch.nn.Parameter(torch.zeros(layer.hidden_size, dtype=dt))
        return self

    def forward(self, a):
        if self.layer.initial_state == "learned":
            h0 = self.h0.expand(1, a.shape[0], -1)
            out, _ = super().forward(a, (h0, self.c0.expand(1, a.shape[0], -1)) if self.layer.type == "lstm" else h0)
        else:
            out, _ = super().forward(a)
        return out if self.layer.return_sequences else out[:, -1]


class _RNN(_LearnedState, torch.nn.RNN):
    pass


class _LSTM(_LearnedState, torch.nn.LSTM):
    pass


class _GRU(_LearnedState, torch.nn.GRU):
    pass


def _recurrent_twin(layer, shape, dt) -> torch.nn.Module:
    n, H = shape[-1], layer.hidden_size
    if layer.type == "rnn":
        module = _RNN(n, H, nonlinearity=layer.nonlinearity, bias=layer.bias, batch_first=True, dtype=dt)
    else:
        module = (_LSTM if layer.type == "lstm" else _GRU)(n, H, bias=layer.bias, batch_first=True, dtype=dt)
    return module._learned(layer, dt)


class _SelfAttention(torch.nn.MultiheadAttention):
    """``nn.MultiheadAttention(d, h, bias, batch_first=True)`` used as self-attention, with the causal mask if any."""

    def __init__(self, layer, shape, dt):
        super().__init__(shape[-1], layer.num_heads, bias=layer.bias, batch_first=True, dtype=dt)
        self.layer = layer

    def forward(self, a):
        mask = causal_mask(a.shape[1], a.dtype) if self.layer.causal else None
        return super().forward(a, a, a, need_weights=False, attn_mask=mask)[0]


class _ResidualModule(torch.nn.Module):
    """A residual block as torch users write one: ``body`` (a ModuleList, each followed by its activation), an
    optional ``projection``, and the block's activation after the sum; names as the spec's (``body.0.weight``)."""

    def __init__(self, layer, shape, dt):
        super().__init__()
        self.layer = layer
        shapes = layer.body_shapes(shape)
        self.body = torch.nn.ModuleList(TWIN_MODULES[sub.type](sub, shapes[j], dt) for j, sub in enumerate(layer.body))
        self.projection = (None if layer.projection is None
                           else TWIN_MODULES[layer.projection.type](layer.projection, tuple(shape), dt))

    def forward(self, a):
        h = a
        for sub, module in zip(self.layer.body, self.body):
            h = activation_fn(sub.activation)(module(h))
        return h + (a if self.projection is None else self.projection(a))


class _MaskedDropout(torch.nn.Module):
    """``nn.Dropout`` whose mask is the case's (``keep_mask``), so that the module twin drops what the manual side drops."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, a):
        return TWIN_LAYERS["dropout"](self.layer, {}, a)


class Twin(torch.nn.Module):
    """The twin as an ``nn.Module``: ``layers`` is a ModuleList of torch's own modules (``nn.Linear``,
    ``nn.Conv2d``, ``nn.MaxPool2d``, ...), so ``state_dict()`` names are the spec's (``layers.{i}.weight``)
    and ``load_state_dict`` takes the same params the oracle checks; each layer's activation follows it.

    ``run_twin`` evaluates the functional twins (``TWIN_LAYERS``) on plain leaf tensors (no module to build
    per check); this class is the same model as a torch user would write it (the benchmark uses it).
    """

    def __init__(self, spec: Spec, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.spec = spec
        self.layers = torch.nn.ModuleList(
            TWIN_MODULES[layer.type](layer, spec.in_shape(i), dtype) for i, layer in enumerate(spec.layers))

    def load_params(self, params: dict) -> "Twin":
        """Load NumPy params keyed ``layers.{i}.weight``/``.bias`` (``load_state_dict``, strict)."""
        state = self.state_dict()  # batch norm's num_batches_tracked is torch's own bookkeeping, kept as built
        missing = sorted(set(self.spec.state_shapes()) - set(params))
        unexpected = sorted(set(params) - set(state))
        if missing or unexpected:
            raise RuntimeError(f"Twin.load_params: missing keys {missing}, unexpected keys {unexpected}")
        state.update({k: torch.as_tensor(np.asarray(v), dtype=state[k].dtype) for k, v in params.items()})
        self.load_state_dict(state, strict=True)
        return self

    def forward(self, x):
        """ỹ for a batch x, (m, *input shape)."""
        return self.forward_all(x)[0]

    def forward_all(self, x):
        """(ỹ, [z_0, ..., z_{L-1}], [a_1, ..., a_L]), as ``twin_forward``."""
        zs, acts = [], []
        for layer, module in zip(self.spec.layers, self.layers):
            zs.append(module(x))
            x = activation_fn(layer.activation)(zs[-1])
            acts.append(x)
        return x, zs, acts


#: below this much work (m·Σ output elements + Σ parameters) torch runs a check on one thread
SMALL_WORK = 1 << 16


@contextlib.contextmanager
def threads_for(spec: Spec, m: int):
    """torch on one thread for a small network, as set otherwise. ``import oracle`` lets idle OpenMP workers sleep at
    once (``OMP_WAIT_POLICY=PASSIVE``) so that they do not spin on the cores NumPy's BLAS needs next; waking them costs
    more than a small op (measured: a 16-32-32-4 step, batch 32, 1.05 ms on two threads, 0.29 ms on one), while a
    large one still gains from both (256-512-512-10, batch 256: 11.9 ms on two, 18.0 on one)."""
    work = m * sum(math.prod(node.out_shape) for node in nodes(spec)) + sum(map(math.prod, spec.param_shapes().values()))
    if work >= SMALL_WORK or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Reference:
    """torch.autograd's answer, as NumPy arrays in the dtype it ran in."""

    loss: float
    grads: dict          # layers.{i}.weight / layers.{i}.bias
    deltas: dict         # layers.{i}: ∂C/∂z_i
    grad_input: np.ndarray | None  # None for token input (an embedding's x has no gradient)
    z: tuple             # pre-activations z_0 .. z_{L-1}
    acts: tuple          # a_1 .. a_L (a_L = ỹ)
    upstream: tuple      # ∂C/∂a_{i+1} for each layer i: what the backward step through g_i receives
    output: np.ndarray
    exact_kinks: int     # how many elements lie exactly on a kink (activations and the l1 loss)
    buffers: dict = None  # the running statistics after the forward (layers.{i}.running_mean, ...)


def run_twin(spec: Spec, params: dict, x: np.ndarray, y: np.ndarray, dtype, adopt=None, routes=None) -> Reference:
    """Run the twin in ``dtype`` (float32/float64) on copies of params and data, and backprop with autograd.

    ``x`` are rows (m, input_size); ``y`` the loss's targets (m, n_out) or (m,) class indices; for a per-step
    head (output (m, T, k), kept as ``Reference.output``), (m, T, k) or (m, T), the loss taken on m·T rows.
    ``adopt(i, up, delta)``, if given, may replace δ_i (a torch tensor) given the upstream ∂C/∂a_{i+1}
    as the backward reaches layer i; everything below is then computed from the replaced δ_i.
    That is how the oracle follows a candidate's equally valid choice at a kink or a numerical guard;
    ``routes`` (see ``twin_forward``) its choice among a max pool's tied elements.
    """
    tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
    weights = leaf_weights(spec, params, tdt)
    xt = input_tensor(spec, x, tdt)
    yt = torch.from_numpy(np.asarray(y)) if spec.loss.targets == "classes" else torch.tensor(y, dtype=tdt)
    out, zs, acts = twin_forward(spec, weights, xt, routes)
    for t in (*zs, *acts):
        if t.requires_grad:
            t.retain_grad()
    if adopt is not None:
        _install_adoption(zs, acts, adopt)
    loss = loss_fn(spec.loss)(out, yt)
    loss.backward()
    graph = nodes(spec)
    masks = [node.activation.kinks(z.detach().numpy()) for node, z in zip(graph, zs)]
    loss_mask = spec.loss.kinks(out.detach().numpy(), np.asarray(y)) if spec.loss.targets == "values" else None
    kinks = int(sum(m.sum() for m in masks) + (0 if loss_mask is None else loss_mask.sum()))
    return Reference(
        loss=float(loss.item()),
        grads={name: weights[name].grad.numpy() for name in spec.param_shapes()},
        deltas={node.name: _grad(z) for node, z in zip(graph, zs)},
        grad_input=None if spec.token_input else xt.grad.numpy(),
        z=tuple(z.detach().numpy() for z in zs),
        acts=tuple(a.detach().numpy() for a in acts),
        upstream=tuple(_grad(a) for a in acts),
        output=out.detach().numpy(),
        exact_kinks=kinks,
        buffers={name: weights[name].detach().numpy() for name in spec.buffer_shapes()},
    )


def _grad(t: torch.Tensor) -> np.ndarray:
    """t's gradient (zeros where nothing below the loss reads t, e.g. no parameter and no input gradient)."""
    return t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape))


def input_tensor(spec: Spec, x, tdt) -> torch.Tensor:
    """x as a leaf tensor that collects ∂C/∂x; token indices (an embedding's input) as int64, with no gradient."""
    if spec.token_input:
        return torch.as_tensor(np.asarray(x, dtype=np.int64))
    return torch.tensor(x, dtype=tdt, requires_grad=True)


def leaf_weights(spec: Spec, params: dict, tdt) -> dict:
    """Copies of the case's parameters as leaf tensors that collect gradients, and of its buffers (running
    statistics, which a batch norm in training mode updates in place) as plain tensors."""
    weights = {name: torch.tensor(params[name], dtype=tdt, requires_grad=True) for name in spec.param_shapes()}
    weights.update({name: torch.tensor(params[name], dtype=tdt) for name in spec.buffer_shapes()})
    return weights


def _install_adoption(zs, acts, adopt):
    """Hooks that let ``adopt(i, up, delta)`` replace each δ_i, seeing the upstream gradient of layer i."""
    for i, (z, a) in enumerate(zip(zs, acts)):
        upstream = {}
        if a is not z:
            a.register_hook(lambda g, upstream=upstream: upstream.__setitem__("g", g))
        z.register_hook(lambda g, i=i, upstream=upstream: adopt(i, upstream.get("g", g), g))
