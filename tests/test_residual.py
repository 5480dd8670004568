"""Residual blocks: manual_bp against torch's own modules (the twin as nn.Modules, ``Twin``), nested names and
inner δ, the spec rules, localization inside blocks, and the oracle on random networks with blocks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp import SpecError
from oracle.strategies import cases, with_residuals
from oracle.twin import Twin, loss_fn, run_twin

DENSE = lambda n, act="identity", bias=True: {"type": "dense", "units": n, "activation": act, "bias": bias}  # noqa: E731
CONV = lambda c, k=3, act="identity": {"type": "conv2d", "out_channels": c, "kernel_size": k, "padding": k // 2,  # noqa: E731
                                       "activation": act, "bias": False}


def spec_of(layers, shape, loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


NETS = {
    "identity skip": ([DENSE(4, "tanh"), {"type": "residual", "body": [DENSE(6, "relu"), DENSE(4)], "activation": "relu"},
                       DENSE(2)], (4,)),
    "dense projection": ([{"type": "residual", "body": [DENSE(5, "tanh")], "projection": DENSE(5, bias=False)}, DENSE(2)], (3,)),
    "conv block with bn": ([CONV(3, act="relu"), {"type": "residual", "body": [CONV(3), {"type": "batch_norm", "activation": "relu"},
                                                                               CONV(4)], "projection": CONV(4, k=1),
                                                  "activation": "relu"}, {"type": "flatten"}, DENSE(2)], (2, 5, 5)),
    "nested": ([{"type": "residual", "body": [{"type": "residual", "body": [{"type": "layer_norm", "activation": "tanh"}]},
                                              DENSE(4, "sigmoid")]}, DENSE(2)], (4,)),
    "block first and last": ([{"type": "residual", "body": [DENSE(3, "relu")]}, {"type": "residual", "body": [DENSE(3)],
                                                                                 "activation": "tanh"}], (3,)),
}


@pytest.mark.parametrize("name", NETS)
def test_manual_backprop_matches_torch_modules_with_nested_names_and_inner_deltas(name):
    spec = spec_of(*NETS[name], loss="mse")
    params, x, y = bp.random_case(spec, 3, batch=4)
    ours = bp.gradients(spec, params, x, y)
    model = Twin(spec).load_params(params)
    assert {k for k, _ in model.named_parameters()} == set(spec.param_shapes())
    loss = loss_fn(spec.loss)(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    assert float(ours.loss) == pytest.approx(loss.item(), rel=1e-12)
    for k, p in model.named_parameters():
        np.testing.assert_allclose(ours.grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    ref = run_twin(spec, params, x, y, np.float64)  # every δ, those inside blocks too
    assert list(ours.deltas) == list(bp.network.delta_names(spec)) and set(ours.deltas) == set(ref.deltas)
    for k, d in ours.deltas.items():
        np.testing.assert_allclose(d, ref.deltas[k], rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(ours.grad_input, ref.grad_input, rtol=1e-9, atol=1e-12)


def test_the_identity_path_adds_delta_at_the_block_input():
    """A closed form: a block whose body is a dense layer with zero weights passes δ through its skip only."""
    spec = spec_of([{"type": "residual", "body": [DENSE(3)]}], (3,), loss="half_sse")
    params = {"layers.0.body.0.weight": np.zeros((3, 3)), "layers.0.body.0.bias": np.zeros(3)}
    x, y = np.array([[1.0, 2.0, 3.0]]), np.zeros((1, 3))
    g = bp.gradients(spec, params, x, y)
    np.testing.assert_array_equal(g.grad_input, x)        # ∂C/∂x = δ = ỹ − y = x (the body adds 0·δ)
    np.testing.assert_array_equal(g.grads["layers.0.body.0.weight"], x.T @ x)


@pytest.mark.parametrize("layers, match", [
    ([{"type": "residual", "body": [DENSE(5)]}], r"layers\.0: residual body maps \(3,\) to \(5,\), but the skip path carries \(3,\); give a projection"),
    ([{"type": "residual", "body": []}], r"layers\[0\]\.body: \[\] is not a non-empty list"),
    ([{"type": "residual", "body": [DENSE(3)], "projection": {"type": "max_pool1d", "kernel_size": 1}}], r"layers\[0\]\.projection\.type"),
    ([{"type": "residual", "body": [DENSE(3)], "projection": DENSE(3, "relu")}], r"layers\[0\]\.projection\.activation: relu on a projection"),
    ([{"type": "residual", "body": [DENSE(3, "softmax")]}], r"layers\[0\]\.body\[0\]\.activation: softmax couples"),
    ([{"type": "residual", "body": [{"type": "nope"}]}], r"layers\[0\]\.body\[0\]\.type: unknown layer type 'nope'"),
    ([{"type": "residual", "body": [DENSE(3)], "skip": True}], r"layers\[0\]\.skip: unknown field"),
])
def test_bad_blocks_are_refused_naming_the_field(layers, match):
    with pytest.raises(SpecError, match=match):
        spec_of(layers + [DENSE(2)], (3,))


def test_a_dropped_identity_path_is_localized_where_body_and_skip_meet():
    from oracle.mutants import CATALOGUE
    mutant = next(m for m in CATALOGUE if m.name == "residual_identity_path_dropped")
    spec = spec_of(*NETS["identity skip"])
    params, x, y = bp.random_case(spec, 0, batch=3)
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert result.classification == "bug" and result.first_divergent_layer == 0, result.message()
    assert "identity path" in result.localization and "block 1 (its sum)" in result.localization


def test_a_wrong_layer_inside_a_block_is_named_inside_the_block():
    spec = spec_of(*NETS["identity skip"])
    params, x, y = bp.random_case(spec, 0, batch=3)

    def halved(spec, params, x, y):
        g = bp.gradients(spec, params, x, y)
        return g.loss, {**g.grads, "layers.1.body.0.weight": g.grads["layers.1.body.0.weight"] / 2}, g.deltas

    result = oracle.check(spec, params, x, y, halved)
    assert result.classification == "bug" and "inside block 1, layer 0" in result.localization, result.localization


@settings(deadline=None)
@given(cases(specs_strategy=with_residuals()))
def test_correct_backprop_passes_on_random_nets_with_blocks(case):
    result = oracle.check(case.spec, case.params, case.x, case.y)
    assert result.passed, result.message()


def test_resnet_tiny_checks_from_the_cli(tmp_path):
    run = subprocess.run([sys.executable, "-m", "oracle", "check", "--example", "resnet-tiny", "--report", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "gradients match" in run.stdout and "residual[" in run.stdout, run.stdout + run.stderr


def test_a_delta_under_a_misspelled_key_is_refused_not_silently_skipped():
    from oracle.checker import CandidateError
    spec = spec_of(*NETS["identity skip"])
    params, x, y = bp.random_case(spec, 0, batch=3)

    def typo(spec, params, x, y):
        g = bp.gradients(spec, params, x, y)
        deltas = dict(g.deltas)
        deltas["layers.1.body0"] = 3 * deltas.pop("layers.1.body.0")
        return g.loss, g.grads, deltas

    with pytest.raises(CandidateError, match=r"unknown key 'layers\.1\.body0'.*layers\.1\.body\.0"):
        oracle.check(spec, params, x, y, typo)


def test_localization_inside_blocks_writes_node_names_not_indices():
    from oracle.mutants import CATALOGUE
    mutant = next(m for m in CATALOGUE if m.name == "residual_identity_path_dropped")
    spec = spec_of(*NETS["identity skip"])
    params, x, y = bp.random_case(spec, 0, batch=3)
    where = oracle.check(spec, params, x, y, mutant.grads_fn).localization
    assert "δ[layers.1.body.0] θ[layers.1.body.0]" in where and "g'(z[layers.0])" in where, where
