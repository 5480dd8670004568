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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from manual_bp import Spec


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
    """The torch computation of a manual_bp loss, with the same reduction."""
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


def twin_forward(spec: Spec, weights: dict, x, jitter: np.random.Generator | None = None):
    """The twin's forward, z = F.linear(a, θ, b) (what ``nn.Linear`` calls) then torch's g.

    Returns (ỹ, [z_0, ..., z_{L-1}], [a_1, ..., a_L]). With ``jitter``, each a = g(z) is multiplied by
    (1 ± ε): the rounding error of evaluating g.
    """
    zs, acts, a = [], [], x
    eps = torch.finfo(x.dtype).eps
    last = len(spec.layers) - 1
    for i, layer in enumerate(spec.layers):
        z = F.linear(a, weights[f"layers.{i}.weight"], weights.get(f"layers.{i}.bias"))
        a = activation_fn(layer.activation)(z)
        if jitter is not None:
            signs = torch.from_numpy(jitter.choice([-1.0, 1.0], size=tuple(z.shape))).to(z.dtype)
            a = a * (1 + eps * signs)
            if spec.loss.name == "bce" and i == last:
                a = a.clamp(0, 1)  # probabilities stay probabilities
        zs.append(z)
        acts.append(a)
    return a, zs, acts


class Twin(torch.nn.Module):
    """The twin as an ``nn.Module``: ``layers`` is a ModuleList of ``nn.Linear`` (names ``layers.{i}.weight``).

    ``run_twin`` uses the same ``twin_forward`` on plain leaf tensors (no module to build per check);
    the benchmark uses this class, as a torch user would.
    """

    def __init__(self, spec: Spec, dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        sizes = [spec.input_size] + [layer.units for layer in spec.layers]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(sizes[i], layer.units, bias=layer.bias, dtype=dtype) for i, layer in enumerate(spec.layers)
        )

    def forward(self, x, jitter: np.random.Generator | None = None):
        return twin_forward(self.spec, dict(self.named_parameters()), x, jitter)


@dataclass(frozen=True)
class Reference:
    """torch.autograd's answer, as NumPy arrays in the dtype it ran in."""

    loss: float
    grads: dict          # layers.{i}.weight / layers.{i}.bias
    deltas: dict         # layers.{i}: ∂C/∂z_i
    grad_input: np.ndarray
    z: tuple             # pre-activations
    output: np.ndarray
    exact_kinks: int     # how many elements lie exactly on a kink (activations and the l1 loss)


def near_kink_masks(spec: Spec, params: dict, x: np.ndarray, zs, eps: float) -> list[np.ndarray]:
    r"""Per layer, the elements whose z lies on a kink *or within rounding of one*.

    The radius is the forward rounding bound of a dot product, grown with depth:
    :math:`|z - k| \le 4 (i + 1)(n_{in} + 1)\,ε\,(|a|\,|θ|^T + |b|)`. Inside it, two correct
    implementations may put z on different sides of the kink and so use different one-sided slopes.
    """
    masks, a = [], np.abs(x)
    for i, (layer, z) in enumerate(zip(spec.layers, zs)):
        w = np.abs(params[f"layers.{i}.weight"])
        mag = a @ w.T + (np.abs(params[f"layers.{i}.bias"]) if layer.bias else 0)
        radius = 4 * (i + 1) * (w.shape[1] + 1) * eps * mag
        mask = np.zeros(z.shape, dtype=bool)
        for k in layer.activation.kink_points():
            mask |= np.abs(z - k) <= radius
        masks.append(mask)
        a = np.abs(layer.activation.value(z))
    return masks


def run_twin(spec: Spec, params: dict, x: np.ndarray, y: np.ndarray, dtype, flip_kinks: bool = False,
             jitter: np.random.Generator | None = None) -> Reference:
    """Run the twin in ``dtype`` (float32/float64) on copies of params and data, and backprop with autograd.

    ``x`` are rows (m, input_size); ``y`` the loss's targets (m, n_out) or (m,) class indices.
    """
    tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
    weights = {name: torch.tensor(params[name], dtype=tdt, requires_grad=True) for name in spec.param_shapes()}
    xt = torch.tensor(x, dtype=tdt, requires_grad=True)
    yt = torch.from_numpy(np.asarray(y)) if spec.loss.targets == "classes" else torch.tensor(y, dtype=tdt)
    out, zs, acts = twin_forward(spec, weights, xt, jitter)
    for z in zs:
        z.retain_grad()
    masks = [layer.activation.kinks(z.detach().numpy()) for layer, z in zip(spec.layers, zs)]
    loss_mask = spec.loss.kinks(out.detach().numpy(), np.asarray(y)) if spec.loss.targets == "values" else None
    if flip_kinks:
        _install_flips(spec, zs, acts, out, masks, loss_mask)
    if jitter is not None:
        _install_jitter(spec, zs, acts, float(torch.finfo(tdt).eps), jitter)
    loss = loss_fn(spec.loss)(out, yt)
    loss.backward()
    kinks = int(sum(m.sum() for m in masks) + (0 if loss_mask is None else loss_mask.sum()))
    return Reference(
        loss=float(loss.item()),
        grads={name: t.grad.numpy() for name, t in weights.items()},
        deltas={f"layers.{i}": z.grad.numpy() for i, z in enumerate(zs)},
        grad_input=xt.grad.numpy(),
        z=tuple(z.detach().numpy() for z in zs),
        output=out.detach().numpy(),
        exact_kinks=kinks,
    )


def _install_flips(spec, zs, acts, out, masks, loss_mask):
    """Hooks that replace torch's one-sided derivative at kink elements by the other side's."""
    if loss_mask is not None and loss_mask.any():  # l1 at a zero residual: sign(0) taken as +1
        lm = torch.from_numpy(loss_mask)
        out.register_hook(lambda g: torch.where(lm, torch.full_like(g, 1.0 / g.numel()), g))
    for layer, z, a, mask in zip(spec.layers, zs, acts, masks):
        slope = layer.activation.other_side_slope()
        if slope is None or not mask.any() or a is z:
            continue
        upstream = {}
        m = torch.from_numpy(mask)
        a.register_hook(lambda g, upstream=upstream: upstream.__setitem__("g", g))
        z.register_hook(lambda g, upstream=upstream, m=m, slope=slope: torch.where(m, upstream["g"] * slope, g))


def _install_jitter(spec, zs, acts, eps, rng):
    """Hooks that add the rounding error of evaluating g'(z) in this dtype to every δ: ±ε·|∂C/∂a|."""
    for layer, z, a in zip(spec.layers, zs, acts):
        if a is z:
            continue
        upstream = {}
        signs = torch.from_numpy(rng.choice([-1.0, 1.0], size=tuple(z.shape)).astype(np.float64)).to(z.dtype)
        a.register_hook(lambda g, upstream=upstream: upstream.__setitem__("g", g))
        if layer.activation.output_only:
            # softmax-like: δ = p ⊙ (g − Σ g p) cancels where p ≈ 1; its rounding is ε·p ⊙ (|g| + Σ|g| p)
            p = torch.softmax(z.detach(), dim=-1)
            z.register_hook(lambda g, upstream=upstream, signs=signs, p=p: g + eps * signs * p * (
                upstream["g"].abs() + (upstream["g"].abs() * p).sum(-1, keepdim=True)))
        else:
            z.register_hook(lambda g, upstream=upstream, signs=signs: g + eps * signs * upstream["g"].abs())
