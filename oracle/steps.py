r"""The step check: each δ judged against the one the candidate's own δ above it implies.

The check proper (``checker``) compares every tensor with torch's float64 answer, allowing each the rounding a
correct implementation could have made on the way there. Deep in a float32 net that allowance carries every
layer above: where the output's δ is uncertain by 1e-3 of itself (a z that cancels in float32, behind a
saturated output), every δ below is too, and a wrong g′ that moves one layer's δ by 7e-4 fits inside it.
Yet that uncertainty has a pattern the wrong g′ does not: it moves δᵢ only through δᵢ₊₁.

So where the candidate reports δ, each hidden step is judged on its own as well:

.. math::  δ_i \stackrel{?}{=} \Big(\sum_{r \text{ reads } a_{i+1}} J_r^\top δ_r^{\text{cand}}\Big) ⊙ g_i'(z_i)

(for a dense reader, (δ_{i+1}θ_{i+1}) ⊙ g′(zᵢ)): torch's backward of the readers, in float64, started from the
candidate's own δ of every reader. Its allowance is that step's rounding only, measured by the noise ensemble
(``noise.jittered_run``) with the same replacement made in every run: the jittered forward moves zᵢ (and so
g′(zᵢ)) as the candidate's rounded z would, and the readers' backward and the δ formula round as theirs would.
Nothing above the step can inflate it.

Left to the check proper: the output layer (its δ comes from the loss, with its guards), elements within
rounding of a kink of gᵢ (either side's slope is valid there), steps through a max pool with tied elements (the
candidate may route to another maximum), and cases where g's value jumps near some z (softplus's threshold:
the ensemble does not model that choice). A step judged here fails as ``bug`` at layer i.
"""

from __future__ import annotations

import numpy as np
import torch

from .compare import compare_tensor, scale_of
from .graph import consumers, nodes
from .noise import FACTOR, RUNS, case_rng, jittered_run, roundoff, value_jumps, widened
from .twin import run_twin


class FromCandidate:
    """The ``adopt`` hook that makes a run take the candidate's δ at every layer that has one, recording first
    the δ torch forms there from the candidate's δ above (``implied``); in a jittered run (``rounded``) also the
    rounding the run then adds to that layer's δ."""

    def __init__(self, spec, deltas: dict):
        self.names = [node.name for node in nodes(spec)]
        self.deltas = deltas
        self.implied: dict = {}
        self._replaced: dict = {}

    def __call__(self, i, up, g, z_run=None):
        self.implied[i] = g.detach().clone()
        name = self.names[i]
        if name not in self.deltas:
            return g
        cand = torch.from_numpy(np.asarray(self.deltas[name], dtype=np.float64).reshape(g.shape))
        self._replaced[i] = cand
        return cand

    def rounded(self, i, g):
        """After the run's rounding of δ_i: add that rounding to the implied δ_i (the candidate's formula rounds)."""
        if i in self._replaced:
            self.implied[i] = self.implied[i] + (g.detach() - self._replaced[i])
        return g


def checkable(spec, cand_deltas: dict, ties: list | None) -> list[int]:
    """The layers whose δ the step check judges: hidden layers with a candidate δ whose every reader has one too,
    none of them a max pool with tied elements (``rounding.Allowance.ties``)."""
    graph = nodes(spec)
    readers = consumers(spec)
    ties = ties or [None] * len(graph)
    return [i for i, node in enumerate(graph[:-1])
            if node.name in cand_deltas and readers.get(i)
            and all(graph[r].name in cand_deltas and ties[r] is None for r in readers[i])]


def check_steps(spec, params64, x64, y64, ref, allow, special, cand, dt, tol, scale) -> list:
    """[(layer i, TensorComparison of δ_i against its implied value, (got, implied), bound)] for every checkable
    layer, in layer order from the loss back; empty where nothing is checkable."""
    graph = nodes(spec)
    if value_jumps(spec, allow, ref):
        return []
    layers = checkable(spec, cand.deltas or {}, allow.ties)
    if not layers:
        return []
    hook = FromCandidate(spec, cand.deltas)
    run_twin(spec, params64, x64, y64, np.float64, adopt=hook)
    implied = {i: hook.implied[i].numpy() for i in layers}
    u, eta = roundoff(dt)
    rng = case_rng(spec, x64, b"steps")
    worst = {i: np.zeros(implied[i].shape) for i in layers}
    with np.errstate(invalid="ignore", over="ignore"):
        for _ in range(RUNS):
            run = FromCandidate(spec, cand.deltas)
            jittered_run(spec, params64, x64, y64, ref, allow, u, rng, adopt=run, eta=eta)
            for i in layers:
                worst[i] = widened(worst[i], run.implied[i].numpy(), implied[i])
    out = []
    readers = consumers(spec)
    for i in reversed(layers):
        name = graph[i].name
        got = np.asarray(cand.deltas[name], dtype=np.float64).reshape(implied[i].shape)
        kink = special.kink[i]
        if kink.any():  # either side's slope is valid there: the check proper judges them
            got = np.where(kink, implied[i], got)
        bound = FACTOR * worst[i]
        t = compare_tensor(f"{name}.delta", got, implied[i], tol, _step_scale(allow, readers[i], implied[i], tol,
                                                                            scale_of(scale, f"{name}.delta")),
                           bound, layer=i)
        out.append((i, t, (got, implied[i]), bound))
    return out


def _step_scale(allow, readers: list, implied: np.ndarray, tol, s_delta: float) -> float:
    """The S of a step's comparison: its own, the largest |δᵢ| it implies, where the ensemble models the readers'
    backward operation by operation; a vanishing gradient leaves the lower layers' δ far below the output's, where
    atol·S_δ would hide any error in them. Never below rtol·S_δ: a δ that small is under the check's resolution
    (float32 autograd returns gelu′ = 0 at z = −7.9, where it is −1e-13). And S_δ where a reader is many operations
    deep (rnn, lstm, gru, attention): its sampled rounding is first-order, so a product of two factors torch rounds
    to 0 (saturated gates) gets no noise where a closed form returns 1e-123."""
    if any(hasattr(allow.magnitudes[r], "sample_grads") for r in readers):
        return s_delta
    return min(max(float(np.max(np.abs(implied), initial=0.0)), tol.rtol * s_delta), s_delta)
