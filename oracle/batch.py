"""Many cases of one network judged together: one batched torch reference, then each case by ``check``'s rules.

A campaign draws an architecture and then several weight and data cases for it. Running the twin once per case
costs a few hundred µs of Python and dispatch for a network of a few units. For a chain of dense layers the K cases
run as one: weights stacked (K, units, n), inputs (K, m, n), torch's batched matrix product, one backward of
Σ_k C_k (the cases share nothing, so each case's gradients are its own). Each case is then judged by ``checker.judge`` with that reference, which it
trusts for two things only: refusing a case whose forward pass overflows, and a strict match. Any other outcome
(rounding, kinks, guards, a bug) is judged again against ``run_twin``'s own reference of that case, so a verdict
here is always the one ``check`` gives, and the candidate is still called once per case.

Networks with other layers (``BATCHED_TWIN`` names those that batch) run ``run_twin`` per case, with the same
verdicts. (``torch.func.vmap`` over the whole twin batches any layer, but its fixed cost, about 2.5 ms a call, is as
much as running eight small cases one by one.)
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from manual_bp import Spec, SpecError
from manual_bp.losses import Loss

from .checker import CandidateError, CheckResult, GradsFn, judge, prepare
from .compare import Tolerance
from .graph import nodes
from .twin import Reference, activation_fn, loss_fn

#: layers whose twin runs over K cases at once (K stacked weight sets, inputs (K, m, ...)): ``fn(layer, w, a)`` with
#: ``w`` the layer's parameters stacked (K, ...). torch's own batched matrix product; the same F functions otherwise.
BATCHED_TWIN = {
    "dense": lambda l, w, a: _batched_linear(w, a),
    "temporal_dense": lambda l, w, a: _batched_linear(w, a),
    "flatten": lambda l, w, a: a.flatten(2),
}


def _batched_linear(w: dict, a):
    """z = a θᵀ + b for each case: a (K, m, [T,] n), θ (K, units, n), b (K, units)."""
    theta = w["weight"].transpose(-1, -2)
    lead = (1,) * (a.dim() - 3)  # a sequence's step axis
    z = a @ theta.reshape(theta.shape[0], *lead, *theta.shape[1:])
    if "bias" in w:
        z = z + w["bias"].reshape(w["bias"].shape[0], *lead, 1, -1)
    return z


def batchable(spec: Spec) -> bool:
    """Whether ``references`` runs this network's cases as one batch: every layer has a batched twin."""
    return all(node.layer.type in BATCHED_TWIN and not node.is_sum for node in nodes(spec))


def references(spec: Spec, cases: Sequence[tuple]) -> list[Reference | None] | None:
    """float64 references of ``cases`` [(params, x, y)] of one ``spec`` and one batch shape, from one batched torch
    run; None where the network has a layer without a batched twin (the caller runs ``run_twin`` per case), and None
    in place of a case with some z within rounding of a kink (``_near_kinks``: judged from ``run_twin`` alone).

    The K cases are stacked on a leading axis; every activation is elementwise or acts on the last axis, so it runs
    unchanged; the loss is ``torch.func.vmap`` of the twin's loss, one C_k per case; ``Σ_k C_k`` is backpropagated
    once, and since the cases share nothing, ∂(Σ C)/∂θ_k = ∂C_k/∂θ_k, and likewise for δ_k and ∂C_k/∂x_k."""
    import torch
    from torch.func import vmap

    if not cases or spec.token_input or not batchable(spec):
        return None
    if len({np.shape(c[1]) for c in cases}) != 1 or len({np.shape(c[2]) for c in cases}) != 1:
        return None
    graph = nodes(spec)
    names = list(spec.param_shapes())
    K = len(cases)
    stacked = {n: torch.from_numpy(np.stack([np.asarray(c[0][n], dtype=np.float64) for c in cases])).requires_grad_()
               for n in names}
    xs = torch.from_numpy(np.stack([np.asarray(c[1], dtype=np.float64) for c in cases])).requires_grad_()
    ydt = np.int64 if spec.loss.targets == "classes" else np.float64
    ys = torch.from_numpy(np.stack([np.asarray(c[2], dtype=ydt) for c in cases]))
    zs, acts, a = [], [], xs
    for node in graph:
        w = {n[len(node.name) + 1:]: stacked[n] for n in node.param_names}
        z = BATCHED_TWIN[node.layer.type](node.layer, w, a)
        if z is a:
            z = a.clone()
        a = activation_fn(node.activation)(z)
        for t in (z, a):
            t.retain_grad()
        zs.append(z)
        acts.append(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "performance drop" notes for a loss it runs case by case
        losses = vmap(loss_fn(spec.loss))(a, ys)
    losses.sum().backward()
    loss = losses.detach().numpy()
    gw = {n: stacked[n].grad.numpy() for n in names}
    gx = xs.grad.numpy()
    near = _near_kinks(spec, graph, stacked, xs, zs, acts, ys)
    z_np, a_np = [z.detach().numpy() for z in zs], [t.detach().numpy() for t in acts]
    gz = [z.grad.numpy() if z.grad is not None else np.zeros(tuple(z.shape)) for z in zs]
    ga = [t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape)) for t in acts]
    return [None if near[k] else Reference(
        loss=float(loss[k]),
        grads={n: gw[n][k] for n in names},
        deltas={node.name: gz[i][k] for i, node in enumerate(graph)},
        grad_input=gx[k],
        z=tuple(t[k] for t in z_np),
        acts=tuple(t[k] for t in a_np),
        upstream=tuple(g[k] for g in ga),
        output=a_np[-1][k],
        exact_kinks=0,  # not counted here: only run_twin's full reference is read beyond a strict match
        buffers={},
    ) for k in range(K)]


def _near_kinks(spec: Spec, graph, stacked: dict, xs, zs: list, acts: list, ys) -> np.ndarray:
    """For each of the K cases, whether some z lies within its own rounding of an activation's kink (or an l1-type
    loss's output within rounding of its target). There the batched product and ``run_twin``'s may land on different
    sides, so torch's one-sided slope, and with it a "match" or a "kink" verdict, could differ: such a case is judged
    from ``run_twin`` alone. The rounding of z = aθᵀ + b is bounded by 2(n + 1)·ε·(|a||θ|ᵀ + |b|) (n terms,
    float64), |a||θ|ᵀ + |b| being the layer's own batched twin on absolute values."""
    import torch

    K = zs[0].shape[0]
    near = torch.zeros(K, dtype=torch.bool)
    eps = float(np.finfo(np.float64).eps)
    with torch.no_grad():
        for node, z in zip(graph, zs):
            if not node.activation.kink_points() or node.layer.type not in ("dense", "temporal_dense"):
                continue  # (a flatten's z is its input exactly: judged where that was made)
            a = xs if node.src < 0 else acts[node.src]
            w = {n[len(node.name) + 1:]: stacked[n].abs() for n in node.param_names}
            tol = 2 * (w["weight"].shape[-1] + 1) * eps * _batched_linear(w, a.abs())
            for k in node.activation.kink_points():
                near |= ((z - k).abs() <= tol).reshape(K, -1).any(dim=1)
        if spec.loss.targets == "values" and type(spec.loss).kinks is not Loss.kinks:  # l1: |ỹ − y| at 0
            out = acts[-1]
            near |= ((out - ys).abs() <= 4 * eps * (out.abs() + ys.abs())).reshape(K, -1).any(dim=1)
    return near.numpy()


def check_many(spec: Spec, cases: Sequence[tuple], grads_fn: GradsFn | None = None, *, dtype: str | None = None,
               tolerance: Tolerance | None = None, early: bool = False) -> list:
    """``check`` on each (params, x, y) of ``cases`` (one spec), with one batched torch reference for all of those
    that share a batch size. Returns one entry per case, in order: its ``CheckResult``, or the ``SpecError``
    (bad input; a ``CandidateError`` for an unusable answer) that ``check`` would have raised on it. ``early``: see
    ``checker.judge`` (the same verdicts; a campaign's setting)."""
    prepared: list = []
    for params, x, y in cases:
        try:
            prepared.append(prepare(spec, params, x, y, dtype=dtype, tolerance=tolerance))
        except SpecError as err:
            prepared.append(err)
    quick: dict = {}
    by_shape: dict = {}
    for i, p in enumerate(prepared):
        if not isinstance(p, SpecError):
            by_shape.setdefault((np.shape(p[2]), np.shape(p[3])), []).append(i)
    for idx in by_shape.values():
        if len(idx) < 2:
            continue
        refs = references(spec, [(prepared[i][1], prepared[i][2], prepared[i][3]) for i in idx])
        if refs is not None:
            quick.update((i, r) for i, r in zip(idx, refs) if r is not None)
    results: list = []
    for i, p in enumerate(prepared):
        if isinstance(p, SpecError):
            results.append(p)
            continue
        s, params, x, y, dt, tol = p
        try:
            results.append(judge(s, params, x, y, grads_fn, dt, tol, quick=quick.get(i), early=early))
        except (SpecError, CandidateError) as err:
            results.append(err)
    return results


__all__ = ["references", "check_many", "CheckResult"]
