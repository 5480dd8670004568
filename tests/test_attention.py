"""attention (multi-head self-attention on (T, d)): manual_bp against torch.nn.MultiheadAttention itself, the spec
rules, the stable softmax, and closed forms for the backward's knobs (what the mutants bend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import manual_bp as bp
from manual_bp import SpecError
from manual_bp.layers.attention import Attention, future_mask, softmax_vjp

D = 8  # d = embed_dim: 1, 2 and 4 heads divide it


def spec_of(layers, shape, loss="half_mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


def attention_net(T, h, causal, bias, activation="identity"):
    return spec_of([{"type": "attention", "num_heads": h, "causal": causal, "bias": bias, "activation": activation},
                    {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}], (T, D))


def torch_mha(params, prefix, d, h, bias):
    """nn.MultiheadAttention in float64 holding the spec's weights, copied in by their state_dict names."""
    mha = torch.nn.MultiheadAttention(d, h, bias=bias, batch_first=True, dtype=torch.float64)
    mha.load_state_dict({k[len(prefix):]: torch.tensor(v) for k, v in params.items() if k.startswith(prefix)})
    return mha


def self_attention(mha, x, causal, hint=False):
    """mha(x, x, x) with torch's additive causal mask (−∞ above the diagonal); ``hint``: is_causal=True with it."""
    T = x.shape[1]
    mask = torch.triu(torch.full((T, T), float("-inf"), dtype=x.dtype), 1) if causal else None
    out, weights = mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=bool(causal and hint))
    assert weights is None
    return out


def assert_close(have, want, name, rtol=1e-10):
    """Element by element; the atol is 1e-12 of the reference's largest value (for entries that cancel)."""
    assert have.shape == want.shape and have.dtype == np.float64, name
    np.testing.assert_allclose(have, want, rtol=rtol, atol=1e-12 * max(float(np.abs(want).max()), 1e-300), err_msg=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 3, 6])
@pytest.mark.parametrize("h", [1, 2, 4])
def test_attention_matches_torch_multihead_attention(h, T, causal, bias):
    spec = attention_net(T, h, causal, bias)
    params, x, y = bp.random_case(spec, 10 * h + T, batch=3, scale=2.0)
    ours = bp.gradients(spec, params, x, y)

    mha = torch_mha(params, "layers.0.", D, h, bias)
    head = {k: torch.tensor(params[f"layers.2.{k}"], requires_grad=True) for k in ("weight", "bias")}
    xt = torch.tensor(x, requires_grad=True)
    z = self_attention(mha, xt, causal, hint=h == 2)
    z.retain_grad()
    out = F.linear(z.flatten(1), head["weight"], head["bias"])
    loss = ((out - torch.tensor(y)) ** 2).sum() / (2 * x.shape[0])  # half_mse
    loss.backward()

    assert float(ours.loss) == pytest.approx(loss.item(), rel=1e-12)
    want = {f"layers.0.{k}": t.grad.numpy() for k, t in mha.named_parameters()}
    want.update({f"layers.2.{k}": t.grad.numpy() for k, t in head.items()})
    assert list(ours.grads) == list(want) == list(spec.param_shapes())  # torch's state_dict order
    for k, g in want.items():
        assert_close(ours.grads[k], g, k)
    assert_close(ours.deltas["layers.0"], z.grad.numpy(), "δ of the attention layer")
    assert_close(ours.grad_input, xt.grad.numpy(), "grad_input")


def test_stacked_attention_with_activations_and_in_a_residual_block():
    """Two attention layers, a tanh after one and a residual block around the other: every saved dict goes
    to its own backward."""
    spec = spec_of([{"type": "attention", "num_heads": 2, "causal": True, "activation": "tanh"},
                    {"type": "residual", "body": [{"type": "attention", "num_heads": 4, "bias": False}]},
                    {"type": "flatten"}, {"type": "dense", "units": 3, "activation": "identity"}], (5, D))
    params, x, y = bp.random_case(spec, 7, batch=4, scale=2.0)
    ours = bp.gradients(spec, params, x, y)
    first, second = torch_mha(params, "layers.0.", D, 2, True), torch_mha(params, "layers.1.body.0.", D, 4, False)
    head = {k: torch.tensor(params[f"layers.3.{k}"], requires_grad=True) for k in ("weight", "bias")}
    xt = torch.tensor(x, requires_grad=True)
    a = torch.tanh(self_attention(first, xt, True))
    a = self_attention(second, a, False) + a
    out = F.linear(a.flatten(1), head["weight"], head["bias"])
    (((out - torch.tensor(y)) ** 2).sum() / (2 * x.shape[0])).backward()
    want = {f"layers.0.{k}": t.grad.numpy() for k, t in first.named_parameters()}
    want.update({f"layers.1.body.0.{k}": t.grad.numpy() for k, t in second.named_parameters()})
    want.update({f"layers.3.{k}": t.grad.numpy() for k, t in head.items()})
    assert list(ours.grads) == list(want)
    for k, g in want.items():
        assert_close(ours.grads[k], g, k)
    assert_close(ours.grad_input, xt.grad.numpy(), "grad_input")


# -- the spec ---------------------------------------------------------------------------------------------
TAIL = [{"type": "flatten"}, {"type": "dense", "units": 1, "activation": "identity"}]


@pytest.mark.parametrize("layer, shape, match", [
    ({"type": "attention", "num_heads": 3}, (4, 8), r"layers\.0\.num_heads: 3 heads do not divide d = 8 .*heads must divide d"),
    ({"type": "attention", "num_heads": 2}, (6,), r"layers\.0: attention needs \(T, d\) input, got \(6,\)"),
    ({"type": "attention", "num_heads": 2}, (2, 3, 4), r"layers\.0: attention needs \(T, d\) input, got \(2, 3, 4\)"),
    ({"type": "attention", "num_heads": 2, "dropout": 0.1}, (4, 8), r"layers\[0\]\.dropout: unknown field; allowed fields are: type, num_heads"),
    ({"type": "attention"}, (4, 8), r"layers\[0\]\.num_heads: missing"),
    ({"type": "attention", "num_heads": 0}, (4, 8), r"layers\[0\]\.num_heads: 0 is not positive"),
    ({"type": "attention", "num_heads": 2, "causal": "yes"}, (4, 8), r"layers\[0\]\.causal: 'yes' is not true or false"),
    ({"type": "attention", "num_heads": 2, "bias": 1}, (4, 8), r"layers\[0\]\.bias: 1 is not true or false"),
])
def test_bad_attention_is_refused(layer, shape, match):
    with pytest.raises(SpecError, match=match):
        spec_of([layer] + TAIL, shape)


def test_canonical_form_shapes_and_description():
    spec = spec_of([{"type": "attention", "num_heads": 2}] + TAIL, (4, 8))
    assert spec.to_dict()["layers"][0] == {"type": "attention", "num_heads": 2, "causal": False, "bias": True,
                                           "activation": "identity"}
    assert bp.Spec.from_json(spec.to_json()) == spec
    assert spec.param_shapes() == {"layers.0.in_proj_weight": (24, 8), "layers.0.in_proj_bias": (24,),
                                   "layers.0.out_proj.weight": (8, 8), "layers.0.out_proj.bias": (8,),
                                   "layers.2.weight": (1, 32), "layers.2.bias": (1,)}
    assert spec.describe() == "4x8 -> attention 2 heads -> flatten -> 1 identity, half_mse"
    causal = spec_of([{"type": "attention", "num_heads": 1, "causal": True, "bias": False, "activation": "relu"}] + TAIL, (4, 8))
    assert causal.describe().startswith("4x8 -> attention 1 head causal relu (no bias) -> ")


# -- the layer on its own -----------------------------------------------------------------------------------
def layer_case(h=2, T=5, causal=True, bias=True, seed=0, m=3):
    layer = Attention(num_heads=h, causal=causal, bias=bias)
    rng = np.random.default_rng(seed)
    p = {k: rng.standard_normal(s) / np.sqrt(D) for k, s in layer.param_shapes((T, D)).items()}
    return layer, p, rng.standard_normal((m, T, D)), rng.standard_normal((m, T, D))


def test_huge_scores_keep_the_softmax_finite():
    """Scores of ~1e6 overflow a plain exp; less the row maximum, a row becomes one-hot and stays finite."""
    layer, p, x, delta = layer_case(causal=False)
    p["in_proj_weight"] = p["in_proj_weight"] * 1e3
    z, saved = layer.forward_saved(p, x)
    S = saved["q"] @ saved["k"].swapaxes(-1, -2) / np.sqrt(D // 2)
    assert np.abs(S).max() > 1e5
    P = saved["probs"]
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(P))
    np.testing.assert_allclose(P.sum(axis=-1), 1, rtol=1e-12)
    np.testing.assert_allclose(P.max(axis=-1), 1, rtol=1e-12)  # one-hot at these scales
    grads, grad_a = layer.backward(p, x, delta, saved)
    assert all(np.all(np.isfinite(g)) for g in (*grads.values(), grad_a))


def test_saved_shapes_and_backward_without_saved_recomputes_the_same():
    layer, p, x, delta = layer_case(h=4, T=6)
    z, saved = layer.forward_saved(p, x)
    assert {k: v.shape for k, v in saved.items() if k in ("q", "k", "v", "probs", "context")} == {
        "q": (3, 4, 6, 2), "k": (3, 4, 6, 2), "v": (3, 4, 6, 2), "probs": (3, 4, 6, 6), "context": (3, 6, D)}
    np.testing.assert_array_equal(layer.forward(p, x), z)
    assert np.all(saved["probs"][..., future_mask(6)] == 0)  # causal: no weight on a later step
    with_saved, without = layer.backward(p, x, delta, saved), layer.backward(p, x, delta)
    assert list(with_saved[0]) == list(without[0]) == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    for k in with_saved[0]:
        np.testing.assert_array_equal(with_saved[0][k], without[0][k], err_msg=k)
    np.testing.assert_array_equal(with_saved[1], without[1])


@pytest.mark.parametrize("bias", [True, False])
def test_one_step_attends_only_to_itself(bias):
    """T = 1: P = 1 whatever q and k are, so z = v W_outᵀ + b_out and q's and k's rows of W_in get no gradient."""
    layer, p, x, delta = layer_case(h=2, T=1, causal=False, bias=bias)
    z = layer.forward(p, x)
    v = x @ p["in_proj_weight"][2 * D:].T + (p["in_proj_bias"][2 * D:] if bias else 0)
    np.testing.assert_allclose(z, v @ p["out_proj.weight"].T + (p["out_proj.bias"] if bias else 0), rtol=1e-12)
    grads, grad_a = layer.backward(p, x, delta)
    assert np.all(grads["in_proj_weight"][:2 * D] == 0)
    dv = delta @ p["out_proj.weight"]
    np.testing.assert_allclose(grads["in_proj_weight"][2 * D:], dv.reshape(-1, D).T @ x.reshape(-1, D), rtol=1e-12)
    np.testing.assert_allclose(grad_a, dv @ p["in_proj_weight"][2 * D:], rtol=1e-12)


# -- the knobs the mutants turn --------------------------------------------------------------------------------
def test_softmax_vjp_is_the_jacobian_of_the_softmax():
    rng = np.random.default_rng(1)
    S, dP = rng.standard_normal(5), rng.standard_normal(5)
    P = np.exp(S) / np.exp(S).sum()
    J = np.diag(P) - np.outer(P, P)  # ∂P_i/∂S_j, symmetric
    np.testing.assert_allclose(softmax_vjp(P, dP), J.T @ dP, rtol=1e-12, atol=1e-15)


def test_knobs_change_only_what_they_name():
    layer, p, x, delta = layer_case(h=4, T=5)
    right, right_a = layer.backward(p, x, delta)
    blocks = lambda g: np.split(g, 3)  # noqa: E731  the q, k and v rows of W_in (or b_in)
    # 1/√d_h left out: dq and dk, and only they, come out √d_h times too large
    loud, _ = layer.backward(p, x, delta, scale_in_backward=False)
    for name in ("in_proj_weight", "in_proj_bias"):
        (q0, k0, v0), (q1, k1, v1) = blocks(right[name]), blocks(loud[name])
        tiny = 1e-12 * np.abs(right[name]).max()  # (k's bias gets a zero gradient: rounding only, see below)
        np.testing.assert_allclose(q1, q0 * np.sqrt(2), rtol=1e-12, atol=tiny)
        np.testing.assert_allclose(k1, k0 * np.sqrt(2), rtol=1e-12, atol=tiny)
        np.testing.assert_array_equal(v1, v0)
    # a shift of every key by the same vector adds a constant to each row of S, which the softmax ignores
    np.testing.assert_allclose(blocks(right["in_proj_bias"])[1], 0, atol=1e-12 * np.abs(right["in_proj_bias"]).max())
    # dk and dv swapped: their blocks of W_in's and b_in's gradients trade places
    swapped, _ = layer.backward(p, x, delta, swap_kv=True)
    for name in ("in_proj_weight", "in_proj_bias"):
        (q0, k0, v0), (q1, k1, v1) = blocks(right[name]), blocks(swapped[name])
        np.testing.assert_array_equal(q1, q0)
        np.testing.assert_array_equal(k1, v0)
        np.testing.assert_array_equal(v1, k0)
    # the default softmax_vjp is the module's; whatever one is given, the masked (−∞) entries get no gradient
    given, given_a = layer.backward(p, x, delta, softmax_vjp=softmax_vjp)
    np.testing.assert_array_equal(given_a, right_a)
    naive = lambda P, dP: dP  # noqa: E731
    noisy = lambda P, dP: dP + 1e3 * future_mask(P.shape[-1])  # noqa: E731
    a, b = layer.backward(p, x, delta, softmax_vjp=naive), layer.backward(p, x, delta, softmax_vjp=noisy)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[1], right_a)  # (and the naive one is wrong)
    for k in right:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
