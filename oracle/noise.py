r"""Rounding noise measured on the case itself: torch re-run with every rounding a correct implementation
could make injected at random, and every non-smooth choice held fixed.

The analytic bound (``oracle.rounding``) is a worst case: it adds every error with one sign, so over a
deep float32 network it compounds to a large share of the gradient and would let real bugs pass.
Real rounding errors have random signs and partly cancel, *with* the correlations of the network (one
rounded probability moves a whole softmax row; one rounded activation feeds every unit above it).
An ensemble reproduces exactly that: each run perturbs every intermediate by a random fraction of the
rounding its formula can make, and autograd carries the perturbations through the real structure.

What is injected (u = unit roundoff of the candidate's dtype plus float64's, ξ ~ N(0, 1) fresh per
element and run):

* z = a θᵀ + b gets √(n+2)·u·(|a||θ|ᵀ + |b|)·ξ (an n-term dot product, random-sign roundings), and every
  other layer type its own sums' sizes and counts (``oracle.magnitudes``); a max pool keeps torch's winners;
  a layer many operations deep (rnn, lstm, gru, attention) gets a sample of every one of its operations'
  roundings, carried through it (``oracle.composite``), in z, in ∂C/∂a and in its parameters' gradients;
* a = g(z) gets c·u·M_g·ξ and δ = ∇ₐC ⊙ g′ gets c·u·(|∇ₐC|·M_g′ + |δ|)·ξ (M from ``rounding._scales``:
  the cancellations of each formula, e.g. σ′ = a(1 − a) from a rounded a), each plus c·η·ξ, η the dtype's
  smallest subnormal: a value below the normal range keeps fewer bits (σ(−99.8) = 4.4e-44 in float32 is rounded
  by 1.6%, which moves a bce loss term −y·log a by 0.016·y);
* ∂C/∂a = δθ, ∂C/∂θ = δᵀa and ∂C/∂b = Σδ get √(k+1)·u·(their |terms|)·ξ;
* ∇ₐC of the loss gets c·u·|∇ₐC|·ξ; its dependence on the rounded a is autograd's own;
* the loss value C gets its own rounding's worst case (``rounding._loss_rounding``: each element loss's formula,
  the k-term sum inside cross-entropy's log-sum-exp, the N-term sum of the element losses, underflow) times ξ.
  Its sums are not given √N: each is one plain sum of terms of one sign and often of one size, which a loop
  rounds with one bias (a float32 loop over 65,536 equal squares errs by 0.18·N·u·|C|, 4.5× what 10·√N·u·|C|
  would allow). Its change through the rounded output is autograd's own, not injected again.

Held fixed: at elements within rounding of a kink, g keeps torch's *side* of the kink in the backward, so the
slope cannot flip; along that side it is the side's own g′ at the jittered z (selu′ = λαe^z moves with z, as a
correct implementation's does: ``side_slope``). Its value is g's own at the jittered z (either side's, as a correct
implementation's). The loss's guard elements are judged by the convention rule.
The allowance is ``FACTOR`` times the largest deviation any run makes, element by element, and never
more than the analytic worst case.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from manual_bp.losses import IGNORE_INDEX

from .rounding import UNIT_ROUNDOFF, other_branch_offset
from .graph import consumers, node_weights, nodes
from .twin import TWIN_LAYERS, activation_fn, input_tensor, leaf_weights, loss_fn, routed_max_pool

RUNS = 6      # ensemble size
FACTOR = 10   # allowance = FACTOR × the largest deviation seen
EVAL = 2.0    # ulps per formula evaluation in the jitter (the analytic bound allows rounding.ULPS)


def _gauss(rng, shape):
    return torch.from_numpy(rng.standard_normal(tuple(shape)))


def _loss_gradient_terms(loss, a, y, upstream) -> torch.Tensor:
    """The size of the terms ∇ₐC is formed from (its rounding is u times that, not u times the result):
    softmax(a) − onehot for cross-entropy, a − y for the squared and Huber losses, σ(a) − y, ...

    On the rows the loss applies to: a sequence output (m, T, k) as its m·T rows of k (the result in a's shape);
    a class target −100 ignores its row (0 there, and m counts the kept rows only)."""
    if a.dim() > 2:
        k = a.shape[-1]
        rows = y.reshape(-1) if loss.targets == "classes" else y.reshape(-1, k)
        return _loss_gradient_terms(loss, a.reshape(-1, k), rows, np.reshape(upstream, (-1, k))).reshape(a.shape)
    N, m = a.numel(), a.shape[0]
    name = loss.name
    if name == "cross_entropy":
        kept = y != IGNORE_INDEX
        m = max(int(kept.sum()), 1)
        onehot = torch.zeros_like(a)
        onehot[torch.arange(a.shape[0])[kept], y[kept]] = 1.0
        return (torch.softmax(a, dim=-1) + onehot) * kept[:, None] / m
    if name == "nll":
        return torch.zeros_like(a)
    if name == "bce_with_logits":
        return (torch.sigmoid(a) + y.abs()) / N
    scale = {"half_sse": 1.0, "sse": 2.0, "half_mse": 1.0 / m, "mse": 2.0 / N, "huber": 1.0 / N,
             "smooth_l1": 1.0 / (loss.params.get("beta", 1.0) * N), "l1": 0.0}.get(name)
    if scale is None:  # bce: the composite bound covers it; the result's own size
        return torch.from_numpy(np.abs(upstream))
    return scale * (a.abs() + y.abs())


def side_slope(act, g, z_ref: np.ndarray, z: torch.Tensor) -> torch.Tensor:
    """g′ at the jittered ``z``, on the side of each element's nearest kink that torch takes at ``z_ref``.

    The *choice* is held: z is first moved onto torch's piece of g (strictly between that kink and the next kink
    point on its side, a few ulps in), so the slope can never flip to the other side's. Its *value* is not: on a
    piece where g′ varies (selu′ = λαe^z and elu′ = αe^z for z < 0, softplus′ = σ(βz) below its threshold) a correct
    implementation evaluates g′ at its own rounded z, |g″|·|Δz| from torch's. Holding torch's slope at torch's z
    would drop that rounding from the ensemble, and a norm behind it (1/s of a nearly constant batch) amplifies it.
    On a piecewise-linear g (relu, leaky relu, hardtanh) it is torch's slope itself.
    """
    zr = np.asarray(z_ref, dtype=np.float64)
    points = np.sort(np.asarray(act.kink_points(), dtype=np.float64))

    def nudged(p, sign):  # a few ulps from p toward its side (±∞ stays as it is)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(p), p + sign * 4 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(p)), p)

    with torch.enable_grad():  # the one-sided slopes at each kink, and torch's g′ at the reference z
        probe = torch.tensor(np.stack([nudged(points, -1), nudged(points, 1)]), dtype=torch.float64, requires_grad=True)
        (sides,) = torch.autograd.grad(g(probe).sum(), probe)
        zt = torch.from_numpy(zr.copy()).requires_grad_(True)
        (d_ref,) = torch.autograd.grad(g(zt).sum(), zt)
    nearest = np.argmin(np.abs(zr[..., None] - points), axis=-1)
    k = points[nearest]
    left_slope, right_slope, d_ref = sides[0].numpy()[nearest], sides[1].numpy()[nearest], d_ref.numpy()
    # torch's side: where z_ref lies, or on the kink itself the side whose slope torch's g′(k) is
    left = np.where(zr == k, np.abs(d_ref - left_slope) <= np.abs(d_ref - right_slope), zr < k)
    prev = np.concatenate([[-np.inf], points])[nearest]        # the kink point before k (−∞ for the first)
    nxt = np.concatenate([points, [np.inf]])[nearest + 1]      # and after it (+∞ for the last)
    lo = np.where(left, nudged(prev, 1), nudged(k, 1))
    hi = np.where(left, nudged(k, -1), nudged(nxt, -1))
    on_side = torch.minimum(torch.maximum(z, torch.from_numpy(lo)), torch.from_numpy(hi))
    with torch.enable_grad():
        zs = on_side.clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(g(zs).sum(), zs)
    return slope


def jittered_run(spec, params: dict, x: np.ndarray, y, ref, allow, u: float, rng, adopt=None, routes=None,
                 eta: float = 0.0) -> dict:
    """One torch run in float64 with rounding-sized noise injected everywhere (see the module docstring).

    ``eta``: the absolute rounding of a value below the dtype's normal range (its smallest subnormal), which an
    activation and a δ get besides their relative rounding.

    ``adopt`` and ``routes`` (as in ``twin.run_twin``) make the run follow a candidate's choices at kinks,
    guards and max-pool ties, so that the noise is measured around the re-run that follows them.

    Returns ``{name: array}`` keyed like the comparisons: loss, layers.{i}.delta/.weight/.bias, input.grad.
    """
    weights = leaf_weights(spec, params, torch.float64)
    xt = input_tensor(spec, x, torch.float64)
    zs, acts, ins = [], [], []
    cu = EVAL * u
    mags = allow.magnitudes
    graph = nodes(spec)
    for i, node in enumerate(graph):
        mag, layer = mags[i], node.layer
        a = xt if node.src < 0 else acts[node.src]
        a_in = a.detach().abs().numpy()
        if node.is_sum:  # h + s, one rounding
            s = xt if node.skip < 0 else acts[node.skip]
            z = a + s
            terms = torch.from_numpy(a_in + s.detach().abs().numpy())
            z = z + u * terms * _gauss(rng, terms.shape)
        else:
            z = routed_max_pool(layer, a, routes[i]) if routes and i in routes else mag.held(a)
            if z is None:
                z = TWIN_LAYERS[layer.type](layer, node_weights(weights, node), a)
            if z is a:  # its own tensor, as in twin_forward
                z = a.clone()
            if hasattr(mag, "sample_z"):  # a layer many operations deep: its own roundings, carried through it
                z = z + torch.from_numpy(mag.sample_z(rng, u, EVAL))
            elif mag.k_z:
                terms = torch.from_numpy(mag.terms(a_in))
                z = z + math.sqrt(mag.k_z) * u * terms * _gauss(rng, terms.shape)
        act = node.activation
        g = activation_fn(act)
        mask = allow.kink_masks[i]
        if mask.any():  # hold the side of the kink: torch's branch of g′, at the jittered z
            slope = side_slope(act, g, ref.z[i], z.detach())
            # g's own value at the jittered z (a correct implementation whose z lands on the other side of the
            # kink computes that side's value: (s' − s)(z − k) apart, which a norm with a near-zero variance can
            # amplify), but torch's side's slope for the backward: held = g(z) in value, slope·dz in gradient
            held = g(z).detach() + slope * (z - z.detach())
            a = torch.where(torch.from_numpy(mask), held, g(z))
        else:
            a = g(z)
        sc = allow.scales[i]
        if sc is not None:
            size = torch.from_numpy(np.broadcast_to(sc[0], a.shape).copy())
        elif act.name == "log_softmax":  # (z − max) − log Σ e^{z − max}: the log of a sum ≥ 1 errs by u
            zd = z.detach()
            size = (zd - zd.max(dim=-1, keepdim=True).values).abs() + math.log(zd.shape[-1]) + 1
        else:                            # softmax: every p to a few ulps of itself
            size = a.detach().abs()
        jolt = (cu * size + EVAL * eta) * _gauss(rng, a.shape)
        if spec.loss.name == "bce" and i == len(graph) - 1:  # probabilities stay probabilities, and where torch's
            # output is exactly 1 its log clamp (log(1 − a) ≥ −100) stays active: a choice held fixed, like a kink's
            # side (a jolt to 1 − 1e-7 would move that element's loss from 100·(1 − y) to 16·(1 − y))
            jolt = torch.maximum(torch.minimum(jolt, 1 - a.detach()), -a.detach())
            jolt = torch.where(torch.from_numpy(np.asarray(ref.acts[-1]) == 1), 1 - a.detach(), jolt)
        a = a + jolt
        zs.append(z)
        acts.append(a)
        ins.append(a_in)

    stash: dict = {}
    L = len(graph)
    yt = torch.from_numpy(np.asarray(y)) if spec.loss.targets == "classes" else torch.tensor(y, dtype=torch.float64)
    loss_terms = _loss_gradient_terms(spec.loss, acts[-1].detach(), yt, ref.upstream[-1])
    for i, (z, a) in enumerate(zip(zs, acts)):
        z.retain_grad()
        sc = allow.scales[i]
        mgp = torch.from_numpy(np.broadcast_to(0.0 if sc is None else sc[1], z.shape).copy())

        def on_a(g, i=i):
            stash[("up", i)] = g.detach()
            return g + cu * loss_terms * _gauss(rng, g.shape) if i == L - 1 else g

        name = graph[i].activation.name
        p = torch.softmax(z.detach(), dim=-1) if name in ("softmax", "log_softmax") else None

        def on_z(g, i=i, mgp=mgp, name=name, p=p):
            up = stash.get(("up", i), g).abs()
            if name == "softmax":        # p ⊙ (up − Σ up p): the terms, not the result, set the rounding
                size = p * (up + (up * p).sum(-1, keepdim=True))
            elif name == "log_softmax":  # up − p Σ up
                size = up + p * up.sum(-1, keepdim=True)
            else:
                size = up * mgp + g.abs()
            g = g + (cu * size + EVAL * eta) * _gauss(rng, g.shape)
            stash[("delta", i)] = g.detach()
            return g

        if a is not z:
            a.register_hook(on_a)
        if adopt is not None:  # the candidate's choice first, then the rounding of computing it
            z.register_hook(lambda g, i=i, z=z: adopt(i, stash.get(("up", i), g), g, z_run=z.detach()))
        z.register_hook(on_z)
        if hasattr(adopt, "rounded"):  # and what that rounding made of it (``steps.FromCandidate``)
            z.register_hook(lambda g, i=i: adopt.rounded(i, g))

    def rounded(g, size, k):  # a result that adds up k rounded terms of the given size
        return g + math.sqrt(k) * u * torch.from_numpy(size) * _gauss(rng, g.shape)

    def sampled(i) -> dict:  # a layer many operations deep: its backward's own roundings, one sample per run
        if ("sample", i) not in stash:
            stash[("sample", i)] = mags[i].sample_grads(stash[("delta", i)].numpy(), rng, u, EVAL)
        return stash[("sample", i)]

    # the input of node i (x, or a node's output) gets δ_i θ_i from it, rounded; where several nodes read one
    # tensor (a block's input: its body and its skip path), their gradients add, one more rounding each
    readers = consumers(spec)
    for j in range(-1, L):
        target = xt if j < 0 else acts[j]
        if not target.requires_grad or j not in readers:
            continue

        def at_input(g, j=j):
            size, k = 0, 0
            for i in readers[j]:
                d = stash[("delta", i)].abs().numpy()
                if hasattr(mags[i], "sample_grads"):
                    g = g + torch.from_numpy(sampled(i)["input"])
                elif graph[i].is_sum:
                    size, k = size + d, k + 1
                elif mags[i].k_in:
                    size, k = size + mags[i].input_terms(d), k + mags[i].k_in
            return rounded(g, size, k + len(readers[j]) - 1) if k else g
        target.register_hook(at_input)
    for i, node in enumerate(graph):
        mag = mags[i]
        for full in node.param_names:  # each parameter's gradient, rounded as its layer type says
            short = full[len(node.name) + 1:]
            if full in weights and weights[full].requires_grad and hasattr(mag, "sample_grads"):
                weights[full].register_hook(lambda g, i=i, short=short: g + torch.from_numpy(sampled(i)[short]))
            elif full in weights and weights[full].requires_grad:
                weights[full].register_hook(lambda g, i=i, mag=mag, short=short: rounded(
                    g, *mag.param_rounding(short, stash[("delta", i)].abs().numpy(), ins[i])))
    loss = loss_fn(spec.loss)(acts[-1], yt)
    loss = loss + allow.loss_rounding * float(rng.standard_normal())  # the loss value's own rounding (see above)
    loss.backward()
    out = {"loss": np.array(float(loss.item()))}
    if xt.grad is not None:
        out["input.grad"] = xt.grad.numpy()
    for i, node in enumerate(graph):
        out[f"{node.name}.delta"] = zs[i].grad.numpy() if zs[i].grad is not None else np.zeros(tuple(zs[i].shape))
    out.update({name: weights[name].grad.numpy() for name in spec.param_shapes()})
    return out


def widened(worst: np.ndarray, run: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The largest deviation from ``ref`` so far, element by element, after one more run (∞ where it is not finite)."""
    dev = np.abs(run - ref)
    return np.maximum(worst, np.where(np.isfinite(dev), dev, np.inf))


def value_jumps(spec, allow, ref) -> bool:
    """Whether some z lies within rounding of a point at which g's *value* jumps (softplus's threshold): a correct
    implementation may take either value there, element by element, a discrete choice, not random noise, whose
    every combination the analytic worst case covers (and an ensemble does not)."""
    return any(mask.any() and np.any(other_branch_offset(node.activation, z)[mask])
               for node, mask, z in zip(nodes(spec), allow.kink_masks, ref.z))


def roundoff(dtype) -> tuple[float, float]:
    """(u, η) of the ensemble for a candidate in ``dtype``: its unit roundoff plus float64's, and its smallest
    subnormal (IEEE gradual underflow; flush-to-zero hardware is not modelled)."""
    u = UNIT_ROUNDOFF[np.dtype(dtype)] + UNIT_ROUNDOFF[np.dtype(np.float64)]
    return u, float(np.finfo(dtype).smallest_subnormal)


def case_rng(spec, x, salt: bytes = b"") -> np.random.Generator:
    """The ensemble's generator, seeded from the case itself: the same case always gets the same allowance."""
    return np.random.default_rng(zlib.crc32(np.ascontiguousarray(x).tobytes() + spec.describe().encode() + salt))


def measured_allowance(spec, params: dict, x: np.ndarray, y, ref, allow, dtype, runs: int = RUNS,
                       adopt=None, routes=None, enough=None) -> dict:
    """FACTOR × the largest deviation of ``runs`` jittered runs from ``ref``, capped by the analytic bound.

    Seeded from the case itself, so the same case always gets the same allowance. ``enough(bounds)``, if given, is
    asked after each run but the last with the allowance so far, and a True ends the ensemble there: the allowance
    only grows with more runs, so whatever passes within it passes within the full one (a campaign's correct
    candidate rarely needs more than one run; a failing one always gets all of them).
    """
    if value_jumps(spec, allow, ref):
        return dict(allow.bounds)
    u, eta = roundoff(dtype)
    rng = case_rng(spec, x)
    reference = {"loss": np.array(ref.loss), **ref.grads, **{f"{k}.delta": v for k, v in ref.deltas.items()}}
    if ref.grad_input is not None:
        reference["input.grad"] = ref.grad_input
    worst = {k: np.zeros(np.shape(v)) for k, v in reference.items()}
    # fmin: where the analytic cap is not a number (0·∞ in an underflowed corner) the measurement stands
    def so_far():
        return {k: np.fmin(FACTOR * worst[k], allow.bounds[k]) for k in allow.bounds if k in worst}

    with np.errstate(invalid="ignore", over="ignore"):
        for n in range(1, runs + 1):
            run = jittered_run(spec, params, x, y, ref, allow, u, rng, adopt, routes, eta=eta)
            for k, v in run.items():
                worst[k] = widened(worst[k], v, reference[k])
            if enough is not None and n < runs:
                bounds = so_far()
                if enough(bounds):
                    return bounds
    return so_far()
