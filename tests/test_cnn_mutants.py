"""The conv/pool/flatten mutants: each changes some gradient relative to torch (strictly) on the networks
its strategy draws, first where its ``corrupts`` says, and ``oracle.check`` calls it a bug; the split
among max-pool ties is a convention (``kink``); the correct backward through the new hook is exact.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import manual_bp as bp
import oracle
from manual_bp import Spec
from oracle.mutants import CATALOGUE, CNN_KINKS, SEQUENCE_MUTANTS, Hooks, faulty_gradients
from oracle.rates import build_case, detection_rates, draw_specs
from oracle.strategies import cnn_specs
from oracle.twin import run_twin

from .test_cnn_strategies import strict_mismatches


CNN_TYPES = ("conv1d", "conv2d", "max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "flatten")
CNN_BUGS = [m for m in CATALOGUE if m.name.startswith(("conv_", "max_pool_", "avg_pool_", "flatten_"))]
DRAWS = 8  # specs per mutant: each check of a small CNN takes a few tens of milliseconds


def first_divergent(spec, got, ref):
    """Walking back from the loss, the first layer whose δ or parameter gradient differs strictly."""
    loss, grads, deltas = got
    bad = set(strict_mismatches(spec, bp.Gradients(loss, grads, deltas, None), ref))
    for i in reversed(range(len(spec.layers))):
        if f"layers.{i}" in bad or any(name.startswith(f"layers.{i}.") for name in bad):
            return i
    return None


def drawn_cases(mutant, n=DRAWS, seed=0):
    """(spec, params, x, y) in float64 from the mutant's own strategy and its last regime (ties where it needs them)."""
    regime = "well_conditioned" if "well_conditioned" in mutant.regimes else mutant.regimes[-1]
    for spec, batch, data_seed in draw_specs(mutant.specs, n, seed):
        yield (spec, *build_case(spec, regime, "float64", batch, data_seed))


def test_at_least_eight_conv_pool_mutants_each_one_mistake():
    assert len(CNN_BUGS) >= 8 and all(m.kind == "bug" for m in CNN_BUGS)
    names = [m.name for m in CATALOGUE + CNN_KINKS]
    assert len(set(names)) == len(names)
    norm = [m for m in CATALOGUE if m.name.startswith(("batch_norm", "layer_norm", "group_norm", "norm_", "dropout", "embedding", "residual", "temporal"))]
    sequence = [m for m in CATALOGUE if m in SEQUENCE_MUTANTS]
    assert len(sequence) >= 8
    assert len([m for m in CATALOGUE if m not in CNN_BUGS + norm + sequence]) == 30  # the dense catalogue: 29 bugs and the kink mutant
    for m in CNN_BUGS + CNN_KINKS:
        assert m.mistake and m.hooks.layer_backward is not Hooks().layer_backward


@pytest.mark.parametrize("mutant", CNN_BUGS + CNN_KINKS, ids=lambda m: m.name)
def test_mutant_strategy_draws_networks_where_the_mistake_can_show(mutant):
    drawn = [spec for spec, *_ in drawn_cases(mutant, 12, seed=1)]
    declared = [mutant.corrupts(spec, None) for spec in drawn]
    assert all(s.format_version == 2 and any(layer.type in CNN_TYPES for layer in s.layers) for s in drawn)
    assert sum(layer is not None for layer, _ in declared) >= 10, declared


@pytest.mark.parametrize("mutant", CNN_BUGS, ids=lambda m: m.name)
def test_mutant_changes_gradients_where_it_shows_and_first_where_declared(mutant):
    changed = 0
    for spec, params, x, y in drawn_cases(mutant):
        ref = run_twin(spec, params, x, y, np.float64)
        first = first_divergent(spec, mutant.grads_fn(spec, params, x, y), ref)
        layer, tensor = mutant.corrupts(spec, bp.forward(spec, params, x))
        if layer is None:
            assert first is None, (spec, first)  # a mistake no layer of this network can show changes nothing
            continue
        changed += first is not None
        if first is not None:
            assert first == layer, (spec.describe(), first, layer, tensor)
    assert changed >= DRAWS // 2, changed


def _changed_case(mutant):
    """The first drawn case where the mutant differs from torch strictly."""
    for spec, params, x, y in drawn_cases(mutant, 20, seed=2):
        ref = run_twin(spec, params, x, y, np.float64)
        if first_divergent(spec, mutant.grads_fn(spec, params, x, y), ref) is not None:
            return spec, params, x, y
    raise AssertionError(f"{mutant.name} changed nothing on 20 draws")


@pytest.mark.parametrize("mutant", CNN_BUGS, ids=lambda m: m.name)
def test_oracle_check_calls_each_mutant_a_bug_where_it_declared(mutant):
    spec, params, x, y = _changed_case(mutant)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert not result.passed and result.classification == "bug", result.message()
    declared, _ = mutant.corrupts(spec, bp.forward(spec, params, x))
    assert result.first_divergent_layer == declared, (result.localization, declared)


def test_splitting_delta_among_max_pool_ties_is_a_kink_not_a_bug():
    (mutant,) = CNN_KINKS
    assert mutant.kind == "kink" and set(mutant.regimes) <= {"near_kinks", "exact_kinks"}
    spec, params, x, y = _changed_case(mutant)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert result.passed and result.classification == "kink", result.message()


def test_every_tie_bug_and_split_convention_differ_only_at_ties():
    """One max pool window with a tie: torch sends δ to the first, the split halves it, the bug doubles it."""
    spec = Spec.from_dict({"format_version": 2, "input": {"shape": [1, 4]}, "loss": "half_sse", "layers": [
        {"type": "conv1d", "out_channels": 1, "kernel_size": 1, "activation": "identity", "bias": False},
        {"type": "max_pool1d", "kernel_size": 2}, {"type": "flatten"}]})
    params, x, y = {"layers.0.weight": np.ones((1, 1, 1))}, np.array([[[3.0, 3.0, 1.0, 2.0]]]), np.zeros((1, 2))
    delta0 = {m.name: m.grads_fn(spec, params, x, y)[2]["layers.0"] for m in CNN_BUGS + CNN_KINKS if "max_pool" in m.name}
    np.testing.assert_array_equal(bp.gradients(spec, params, x, y).deltas["layers.0"], [[[3, 0, 0, 2]]])
    np.testing.assert_array_equal(delta0["max_pool_ties_split"], [[[1.5, 1.5, 0, 2]]])
    np.testing.assert_array_equal(delta0["max_pool_grad_to_every_tie"], [[[3, 3, 0, 2]]])
    np.testing.assert_array_equal(delta0["max_pool_grad_to_window_start"], [[[3, 0, 2, 0]]])


def test_flatten_channels_last_and_avg_pool_mutants_on_a_hand_case():
    spec = Spec.from_dict({"format_version": 2, "input": {"shape": [2, 2]}, "loss": "half_sse", "layers": [
        {"type": "avg_pool1d", "kernel_size": 2, "stride": 1, "padding": 1, "count_include_pad": False},
        {"type": "flatten"}]})
    x, y = np.zeros((1, 2, 2)), -np.arange(1.0, 7.0).reshape(1, 6)  # δ of the flatten = ỹ − y = 1..6
    deltas = {m.name: m.grads_fn(spec, {}, x, y)[2]["layers.0"] for m in CNN_BUGS if m.name.startswith("flatten")}
    np.testing.assert_array_equal(deltas["flatten_backward_channels_last"], [[[1, 3, 5], [2, 4, 6]]])
    right = faulty_gradients(spec, {}, x, y, Hooks())[2]
    np.testing.assert_array_equal(right["layers.0"], [[[1, 2, 3], [4, 5, 6]]])
    # into the pool: windows [pad, a0], [a0, a1], [a1, pad] hold 1, 2, 1 elements of the input
    mutant = {m.name: m for m in CNN_BUGS}
    pooled = bp.Spec.from_dict({**spec.to_dict(), "layers": [
        {"type": "conv1d", "out_channels": 2, "kernel_size": 1, "activation": "identity", "bias": False},
        *spec.to_dict()["layers"]]})
    params = {"layers.0.weight": np.eye(2)[:, :, None]}
    got = {name: mutant[name].grads_fn(pooled, params, x, y)[2]["layers.0"]
           for name in ("avg_pool_missing_one_over_k", "avg_pool_count_include_pad_flipped")}
    np.testing.assert_array_equal(bp.gradients(pooled, params, x, y).deltas["layers.0"], [[[2, 4], [6.5, 8.5]]])
    np.testing.assert_array_equal(got["avg_pool_missing_one_over_k"], [[[3, 5], [9, 11]]])
    np.testing.assert_array_equal(got["avg_pool_count_include_pad_flipped"], [[[1.5, 2.5], [4.5, 5.5]]])


def test_correct_backward_through_the_layer_hook_is_manual_bp_exactly():
    for spec, batch, data_seed in draw_specs(cnn_specs(), 10, 3):
        params, x, y = build_case(spec, "well_conditioned", "float64", batch, data_seed)
        loss, grads, deltas = faulty_gradients(spec, params, x, y, Hooks())
        right = bp.gradients(spec, params, x, y)
        assert loss == right.loss and grads.keys() == right.grads.keys()
        assert all(np.array_equal(grads[k], right.grads[k]) for k in grads)
        assert all(np.array_equal(deltas[k], right.deltas[k]) for k in right.deltas)


def test_rates_include_the_cnn_mutants():
    names = [m.name for m in CNN_BUGS[:2]]
    result = detection_rates(1, 0, mutants=names, regimes=("well_conditioned",), dtypes=("float64",), controls=False)
    assert [c["mutant"] for c in result["cells"]] == names
    done = subprocess.run([sys.executable, "-m", "oracle", "rates", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--per-cell" in done.stdout
