"""The normalization and dropout mutants: each changes some gradient relative to torch (strictly) on the
networks its strategy draws, first where its ``corrupts`` says, and ``oracle.check`` calls it a bug there."""

from __future__ import annotations

import numpy as np
import pytest

import manual_bp as bp
import oracle
from oracle.mutants import CATALOGUE, Hooks
from oracle.twin import run_twin

from oracle.graph import nodes

from .test_cnn_mutants import drawn_cases


def first_divergent(spec, got, ref):
    """Walking back through the nodes (blocks opened up), the first whose δ (where the candidate gives it) or
    parameter gradient differs from torch's beyond 1e-10 normwise (S-scaled): its node index."""
    loss, grads, deltas = got
    refs = {**ref.grads, **ref.deltas}
    scale = max(float(np.max(np.abs(t))) for t in refs.values() if t.size) or 1.0

    def differs(g, r):
        return np.linalg.norm(g - r) > 1e-10 * np.linalg.norm(r) + 1e-10 * scale * np.sqrt(r.size)

    for k in reversed(range(len(nodes(spec)))):
        node = nodes(spec)[k]
        if node.name in deltas and differs(deltas[node.name], ref.deltas[node.name]):
            return k
        if any(differs(grads[n], ref.grads[n]) for n in node.param_names):
            return k
    return None

NORM_TYPES = ("batch_norm", "layer_norm", "group_norm", "dropout", "embedding", "residual", "temporal_dense")
NORM_BUGS = [m for m in CATALOGUE if m.name.startswith(("batch_norm", "layer_norm", "group_norm", "norm_", "dropout", "embedding", "residual", "temporal"))]


def test_at_least_eight_norm_and_dropout_mutants_each_one_mistake():
    assert len(NORM_BUGS) >= 8 and all(m.kind == "bug" for m in NORM_BUGS)
    for m in NORM_BUGS:
        assert m.mistake and m.hooks.layer_backward is not Hooks().layer_backward


@pytest.mark.parametrize("mutant", NORM_BUGS, ids=lambda m: m.name)
def test_mutant_changes_gradients_first_where_declared_and_the_oracle_calls_it_a_bug_there(mutant):
    changed, judged = 0, 0
    for spec, params, x, y in drawn_cases(mutant, 10, seed=3):
        assert any(layer.type in NORM_TYPES for layer in spec.layers)
        ref = run_twin(spec, params, x, y, np.float64)
        got = mutant.grads_fn(spec, params, x, y)
        first = first_divergent(spec, got, ref)
        layer, _ = mutant.corrupts(spec, bp.forward(spec, params, x))
        if layer is None:
            continue
        assert first in (layer, None), (spec.describe(), first, layer)
        if first is None:
            continue
        changed += 1
        if judged < 2:  # the full check is the slow part: two per mutant
            judged += 1
            result = oracle.check(spec, params, x, y, mutant.grads_fn)
            assert not result.passed and result.classification == "bug", result.message()
            assert result.first_divergent_layer == layer, (result.localization, layer)
    assert changed >= 4 and judged == 2, changed
