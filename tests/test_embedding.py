"""The embedding layer: manual_bp against torch's F.embedding written out here, token validation, and the
oracle on random token networks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp import SpecError
from oracle.strategies import cases, embedding_specs


def spec_of(layers, tokens=4, loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": [tokens]}, "layers": layers, "loss": loss})


EMB = {"type": "embedding", "num_embeddings": 5, "embedding_dim": 3}
HEAD = [{"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]


@pytest.mark.parametrize("padding_idx", [None, 0, 4, -1])
def test_repeated_tokens_accumulate_and_the_padding_row_gets_nothing_as_in_torch(padding_idx):
    spec = spec_of([{**EMB, "padding_idx": padding_idx}, {"type": "layer_norm", "activation": "tanh"}, *HEAD])
    params, _, y = bp.random_case(spec, 0, batch=3)
    x = np.array([[0, 0, 4, 1], [4, 4, 4, 2], [1, 0, 3, 3]])
    ours = bp.gradients(spec, params, x, y)
    W = torch.tensor(params["layers.0.weight"], requires_grad=True)
    rest = {k: torch.tensor(v, requires_grad=True) for k, v in params.items() if k != "layers.0.weight"}
    z = F.embedding(torch.from_numpy(x), W, padding_idx)
    a = torch.tanh(F.layer_norm(z, (3,), rest["layers.1.weight"], rest["layers.1.bias"]))
    out = F.linear(a.flatten(1), rest["layers.3.weight"], rest["layers.3.bias"])
    F.mse_loss(out, torch.tensor(y)).backward()
    np.testing.assert_allclose(ours.grads["layers.0.weight"], W.grad.numpy(), rtol=1e-12, atol=1e-15)
    assert ours.grad_input is None
    if padding_idx is not None:
        assert not ours.grads["layers.0.weight"][padding_idx % 5].any()
    # token 4 occurs four times: its row is the sum of four δ rows (an assignment would keep one)
    delta = ours.deltas["layers.0"]
    expected = sum(delta[i, t] for i, t in zip(*np.nonzero(x == 4)))
    if padding_idx is None:
        np.testing.assert_allclose(ours.grads["layers.0.weight"][4], expected, rtol=1e-12)


@pytest.mark.parametrize("x, match", [
    (np.zeros((2, 4)), r"x: has dtype float64, but the first layer is an embedding"),
    (np.array([[0, 1, 2, 5]]), r"x: holds token 5; token indices must lie in \[0, 5\)"),
    (np.array([[0, -1, 2, 3]]), r"x: holds token -1"),
    (np.zeros((2, 3), dtype=int), r"x: has shape \(2, 3\)"),
])
def test_bad_tokens_are_refused_with_the_field_named(x, match):
    spec = spec_of([EMB, *HEAD])
    params, _, y = bp.random_case(spec, 0, batch=max(1, x.shape[0]))
    with pytest.raises(SpecError, match=match):
        oracle.check(spec, params, x, y[: x.shape[0]])


@pytest.mark.parametrize("layers, match", [
    ([{"type": "dense", "units": 3, "activation": "identity"}, {**EMB}], r"layers\.1: embedding takes integer token indices, so it must be the first layer"),
    ([{**EMB, "padding_idx": 5}, *HEAD], r"layers\[0\]\.padding_idx: 5 is not a token index in \[-5, 5\)"),
    ([{**EMB, "padding_idx": 1.0}, *HEAD], r"padding_idx"),
    ([{"type": "embedding", "embedding_dim": 3}, *HEAD], r"layers\[0\]\.num_embeddings: missing"),
    ([{**EMB, "num_embeddings": 0}, *HEAD], r"layers\[0\]\.num_embeddings: 0 is not positive"),
])
def test_bad_embedding_specs_are_refused(layers, match):
    with pytest.raises(SpecError, match=match):
        spec_of(layers)


def test_an_embedding_needs_a_one_axis_token_input():
    with pytest.raises(SpecError, match=r"layers\.0: embedding needs \(T,\) token input, got \(2, 3\)"):
        bp.Spec.from_dict({"format_version": 2, "input": {"shape": [2, 3]}, "layers": [EMB, *HEAD], "loss": "mse"})


def test_the_oracle_catches_an_assigned_gradient_and_names_the_step():
    spec = spec_of([EMB, *HEAD])
    params, _, y = bp.random_case(spec, 0, batch=2)
    x = np.array([[1, 1, 2, 3], [1, 0, 0, 4]])

    def assigned(spec, params, x, y):
        g = bp.gradients(spec, params, x, y)
        W = np.zeros_like(params["layers.0.weight"])
        W[x.reshape(-1)] = g.deltas["layers.0"].reshape(-1, 3)
        return g.loss, {**g.grads, "layers.0.weight": W}, g.deltas

    result = oracle.check(spec, params, x, y, assigned)
    assert result.classification == "bug" and result.first_divergent_layer == 0
    assert "repeated tokens accumulate" in result.localization


@settings(deadline=None)
@given(cases(specs_strategy=embedding_specs()))
def test_correct_backprop_passes_on_random_token_nets(case):
    assert case.x.dtype.kind == "i"
    result = oracle.check(case.spec, case.params, case.x, case.y)
    assert result.passed, result.message()


def test_a_token_case_checks_from_the_cli_with_an_impl_in_its_own_process(tmp_path):
    spec = spec_of([EMB, {"type": "layer_norm"}, *HEAD])
    (tmp_path / "s.json").write_text(spec.to_json())
    np.savez(tmp_path / "d.npz", x=np.array([[0, 1, 1, 4], [3, 3, 3, 3]]), y=np.zeros((2, 2)))
    (tmp_path / "mine.py").write_text("import manual_bp\ndef grads(spec, params, x, y):\n    return manual_bp.gradients(spec, params, x, y)\n")
    run = subprocess.run([sys.executable, "-m", "oracle", "check", str(tmp_path / "s.json"), "--data", str(tmp_path / "d.npz"),
                          "--impl", f"{tmp_path / 'mine.py'}:grads", "--report", str(tmp_path / "r")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "gradients match" in run.stdout


def test_boolean_tokens_with_a_dtype_get_the_token_message():
    spec = spec_of([EMB, *HEAD])
    params, _, y = bp.random_case(spec, 0, batch=2)
    with pytest.raises(SpecError, match=r"x: has dtype bool, but the first layer is an embedding"):
        oracle.check(spec, params, np.zeros((2, 4), dtype=bool), y, dtype="float32")
