"""The oracle on sequence models (rnn, lstm, gru, attention): the first-order error tape against float32 torch and
exact Jacobians, the functional and module twins against each other and against torch's cells and the attention
equations written out, manual_bp passing on random sequence models, the sequence mutants killed where they act,
the hints through time, and ``bp-oracle check`` on an lstm network end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp.data import check_y
from manual_bp.layers import recurrent as rec
from oracle.composite import TAPES, CompositeMagnitudes
from oracle.mutants import SEQUENCE_MUTANTS, hunt
from oracle.strategies import cases, sequence_model_specs
from oracle.cli import main
from oracle.twin import TWIN_LAYERS, Twin, input_tensor, leaf_weights, run_twin, twin_forward

from .test_cnn_mutants import drawn_cases
from .test_norm_mutants import first_divergent

U32 = 2.0 ** -24   # float32's unit roundoff
U64 = 2.0 ** -53
REPO = Path(__file__).resolve().parents[1]


def spec_of(layers, shape, loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


def one_layer_spec(layer: dict, shape):
    """The layer, then the head a spec needs to end in a vector (flatten + dense, or a dense on h_T)."""
    tail = [{"type": "flatten"}] if layer.get("return_sequences", True) else []
    return spec_of([layer, *tail, {"type": "dense", "units": 2, "activation": "identity"}], shape)


#: the composite layers the tape models, each with its input shape (T, n)
LAYERS = {
    "rnn_tanh": ({"type": "rnn", "hidden_size": 4, "nonlinearity": "tanh"}, (5, 3)),
    "rnn_relu": ({"type": "rnn", "hidden_size": 4, "nonlinearity": "relu", "initial_state": "learned"}, (5, 3)),
    "lstm_learned": ({"type": "lstm", "hidden_size": 4, "initial_state": "learned"}, (5, 3)),
    "gru_last_step": ({"type": "gru", "hidden_size": 4, "return_sequences": False}, (5, 3)),
    "attention": ({"type": "attention", "num_heads": 2}, (5, 4)),
    "attention_causal": ({"type": "attention", "num_heads": 2, "causal": True}, (5, 4)),
}
SEEDS = (0, 1, 2)


def layer_case(name: str, seed: int, m: int = 3):
    """(layer, w by short name, a): well-conditioned weights U(−1, 1) and data N(0, 1), every value a float32 number
    (so that float32 and float64 start from the same inputs and differ only by the arithmetic's rounding)."""
    layer_dict, shape = LAYERS[name]
    spec = one_layer_spec(layer_dict, shape)
    rng = np.random.default_rng(seed)
    w = {k[len("layers.0."):]: rng.uniform(-1, 1, s).astype(np.float32).astype(np.float64)
         for k, s in spec.param_shapes().items() if k.startswith("layers.0.")}
    a = rng.standard_normal((m, *shape)).astype(np.float32).astype(np.float64)
    return spec.layers[0], w, a


def torch_layer(layer, w, a, dtype):
    """The functional twin in ``dtype`` on leaf copies: (weights, input, output)."""
    W = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in w.items()}
    A = torch.tensor(a, dtype=dtype, requires_grad=True)
    return W, A, TWIN_LAYERS[layer.type](layer, W, A)


def assert_within(err, bound, what):
    """err ≤ bound element by element (a bound of 0 asks for an exact 0), with the element named when not."""
    err, bound = np.asarray(err, dtype=np.float64), np.asarray(bound, dtype=np.float64)
    assert err.shape == bound.shape, (what, err.shape, bound.shape)
    over = err > bound
    if over.any():
        idx = tuple(int(i) for i in np.argwhere(over)[0])
        raise AssertionError(f"{what}: {int(over.sum())} elements beyond the bound, e.g. at {idx}: "
                             f"error {err[idx]:.3e} > bound {bound[idx]:.3e}")


# == 1. the error tape bounds rounding ==============================================================================
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", LAYERS)
def test_the_tapes_value_is_the_twins(name, seed):
    layer, w, a = layer_case(name, seed)
    mag = CompositeMagnitudes(layer, w, a)
    assert mag.tape is not None and TAPES[layer.type] is not None
    _, _, z = torch_layer(layer, w, a, torch.float64)
    value = mag.tape.v(mag.out)
    assert value.shape == tuple(z.shape)
    np.testing.assert_allclose(value, z.detach().numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", LAYERS)
def test_float32_forward_of_torch_is_within_the_tapes_terms(name, seed):
    layer, w, a = layer_case(name, seed)
    mag = CompositeMagnitudes(layer, w, a)
    _, _, z64 = torch_layer(layer, w, a, torch.float64)
    _, _, z32 = torch_layer(layer, w, a, torch.float32)
    err = np.abs(z32.detach().numpy().astype(np.float64) - z64.detach().numpy())
    want = z64.detach().numpy()
    # float64's own rounding of the reference is far below the float32 bound, but the bound may be 0 (a dead relu)
    assert_within(err, U32 * mag.terms(None) + 4 * U64 * np.abs(want), f"{name}: forward")
    # not absurd: the forward allowance is a small multiple of u relative to the output
    assert np.linalg.norm(U32 * mag.terms(None)) < 1e-3 * np.linalg.norm(want)


def backward_in(layer, w, a, g, dtype):
    """torch.autograd's (∂C/∂a, {short name: ∂C/∂w}) in ``dtype`` for the upstream gradient g."""
    W, A, z = torch_layer(layer, w, a, dtype)
    got = torch.autograd.grad(z, [A, *W.values()], torch.tensor(g, dtype=dtype))
    return got[0].numpy().astype(np.float64), {k: t.numpy().astype(np.float64) for k, t in zip(W, got[1:])}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", LAYERS)
def test_float32_backward_of_torch_is_within_the_tapes_bounds_which_are_tight(name, seed):
    layer, w, a = layer_case(name, seed)
    mag = CompositeMagnitudes(layer, w, a)
    out_shape = mag.tape.v(mag.out).shape
    g = np.random.default_rng(100 + seed).standard_normal(out_shape).astype(np.float32).astype(np.float64)
    gin64, gw64 = backward_in(layer, w, a, g, torch.float64)
    gin32, gw32 = backward_in(layer, w, a, g, torch.float32)
    ag, aa = np.abs(g), np.abs(a)
    bounds = mag.param_bounds(U32 * ag, ag, None, U32 * aa, gamma=lambda k: k * U32, eta=0)
    assert set(bounds) == set(w)
    for k in w:
        want = gw64[k]
        assert_within(np.abs(gw32[k] - want), bounds[k] + 4 * U64 * np.abs(want), f"{name}: {k}")
        # a bound, but not one that could hide a bug: far below the gradient itself
        assert np.linalg.norm(bounds[k]) < 1e-2 * np.linalg.norm(want), (k, np.linalg.norm(bounds[k]), np.linalg.norm(want))
    input_bound = mag.back_input(U32 * ag) + mag.back_drift(ag, U32 * aa) + U32 * mag.input_terms(ag)
    assert_within(np.abs(gin32 - gin64), input_bound + 4 * U64 * np.abs(gin64), f"{name}: ∂C/∂a")
    assert np.linalg.norm(input_bound) < 1e-2 * np.linalg.norm(gin64)


def jacobian(layer, w, a) -> np.ndarray:
    """The exact Jacobian ∂z/∂a in float64, (z.size, a.size), by reverse mode (one vjp per output element; the
    twin's attention kernel has no forward mode)."""
    W = {k: torch.tensor(v) for k, v in w.items()}
    J = torch.autograd.functional.jacobian(lambda A: TWIN_LAYERS[layer.type](layer, W, A), torch.tensor(a))
    out_size = int(np.prod(J.shape[: J.dim() - a.ndim]))
    return J.reshape(out_size, a.size).numpy()


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("name", LAYERS)
def test_the_tape_linearizes_the_layer_with_absolute_values(name, seed):
    layer, w, a = layer_case(name, seed, m=2)  # the Jacobian costs one backward per output element
    mag = CompositeMagnitudes(layer, w, a)
    rng = np.random.default_rng(200 + seed)
    out_shape = mag.tape.v(mag.out).shape
    J = jacobian(layer, w, a)
    g = rng.standard_normal(out_shape)
    e = 1e-6 * rng.standard_normal(a.shape)
    JTg = (g.reshape(-1) @ J).reshape(a.shape)
    Je = (J @ e.reshape(-1)).reshape(out_shape)
    assert_within(np.abs(JTg), mag.back_input(np.abs(g)) * (1 + 1e-9), f"{name}: |Jᵀg| ≤ |J|ᵀ|g|")
    assert_within(np.abs(Je), mag.forward(np.abs(e)) * (1 + 1e-9), f"{name}: |Je| ≤ |J||e|")
    # and |J|ᵀ|g| is |J|ᵀ, not something larger: it equals Σ |J_ij| |g_i| where the tape has no relu kink to widen
    if layer.type != "rnn" or layer.nonlinearity == "tanh":
        upper = (np.abs(g).reshape(-1) @ np.abs(J)).reshape(a.shape)
        assert np.all(mag.back_input(np.abs(g)) >= upper * (1 - 1e-9))


def one_tanh_step(seed=4, m=3, n=3, H=4):
    """An rnn(tanh) of one step from h0 = 0, with biases: h = tanh(x W_ihᵀ + b_ih + (0 W_hhᵀ + b_hh))."""
    spec = one_layer_spec({"type": "rnn", "hidden_size": H, "nonlinearity": "tanh"}, (1, n))
    rng = np.random.default_rng(seed)
    w = {k[len("layers.0."):]: rng.uniform(-1, 1, s) for k, s in spec.param_shapes().items() if k.startswith("layers.0.")}
    a = rng.standard_normal((m, 1, n))
    return spec.layers[0], w, a


def test_one_tanh_step_its_maps_are_the_absolute_jacobian_exactly():
    """With one step there is one path from x to h, so |J| of the composition is the composition of the |J|s: the
    tape's forward and back_input are |J|E and |J|ᵀv exactly (for T > 1 only ≥, tested above)."""
    layer, w, a = one_tanh_step()
    mag = CompositeMagnitudes(layer, w, a)
    J = np.abs(jacobian(layer, w, a))
    rng = np.random.default_rng(9)
    E, v = np.abs(rng.standard_normal(a.shape)), np.abs(rng.standard_normal(mag.tape.v(mag.out).shape))
    np.testing.assert_allclose(mag.forward(E), (J @ E.reshape(-1)).reshape(v.shape), rtol=1e-12)
    np.testing.assert_allclose(mag.back_input(v), (v.reshape(-1) @ J).reshape(a.shape), rtol=1e-12)


def test_one_tanh_step_its_rounding_is_the_closed_form():
    """terms (the forward's rounding in units of u) and input_terms (the backward's, with the drift of the rounded h
    it reuses), written out for h = tanh(p), p = (x W_ihᵀ + b_ih) + b_hh: each k-term sum rounds by γ_k = min(k, λ√k)
    times its |terms|, the add by |x| + |y|, tanh by ULPS·|h|; backward: tanh′ = 1 − h² from an h off by E_h moves by
    2|h| E_h, and δ W_ih rounds by γ_H."""
    from oracle.rounding import LAMBDA, ULPS

    def gamma(k):
        return min(k, LAMBDA * math.sqrt(k))

    layer, w, a = one_tanh_step()
    mag = CompositeMagnitudes(layer, w, a)
    x, W, b_ih, b_hh = a[:, 0], w["weight_ih_l0"], w["bias_ih_l0"], w["bias_hh_l0"]
    n, H = W.shape[1], W.shape[0]
    xw = x @ W.T + b_ih
    h = np.tanh(xw + b_hh)
    E_xw = gamma(n + 1) * (np.abs(x) @ np.abs(W).T + np.abs(b_ih))
    E_hh = gamma(H + 1) * np.abs(b_hh)                      # 0·W_hhᵀ + b_hh: the bias is its one nonzero term
    E_p = E_xw + E_hh + np.abs(xw) + np.abs(b_hh)
    E_h = (1 - h * h) * E_p + ULPS * np.abs(h)
    np.testing.assert_allclose(mag.terms(None)[:, 0], E_h, rtol=1e-12)

    v = np.abs(np.random.default_rng(10).standard_normal((a.shape[0], 1, H)))
    g = v[:, 0]
    e_p = g * (2 * np.abs(h) * E_h + ULPS * (1 - h * h))    # the drift of tanh′ and its own rounding
    want = e_p @ np.abs(W) + gamma(H) * ((g * (1 - h * h)) @ np.abs(W))
    np.testing.assert_allclose(mag.input_terms(v)[:, 0], want, rtol=1e-12)


# == 2. the twins agree ===============================================================================================
TWIN_SPECS = {
    "rnn_tanh_bias": [{"type": "rnn", "hidden_size": 3, "initial_state": "learned"}],
    "rnn_relu_no_bias": [{"type": "rnn", "hidden_size": 3, "nonlinearity": "relu", "bias": False}],
    "lstm_learned": [{"type": "lstm", "hidden_size": 4, "initial_state": "learned"}],
    "lstm_last_learned_no_bias": [{"type": "lstm", "hidden_size": 2, "initial_state": "learned", "bias": False,
                                   "return_sequences": False}],
    "gru_learned": [{"type": "gru", "hidden_size": 3, "initial_state": "learned"}],
    "gru_last": [{"type": "gru", "hidden_size": 3, "return_sequences": False}],
    "attention": [{"type": "attention", "num_heads": 2}],
    "attention_causal_no_bias": [{"type": "attention", "num_heads": 4, "causal": True, "bias": False}],
    "stacked": [{"type": "temporal_dense", "units": 4, "activation": "tanh"},
                {"type": "attention", "num_heads": 2, "causal": True, "activation": "relu"},
                {"type": "lstm", "hidden_size": 3, "initial_state": "learned", "activation": "tanh"},
                {"type": "gru", "hidden_size": 2, "initial_state": "learned", "return_sequences": False}],
}


def twin_spec(name):
    layers = TWIN_SPECS[name]
    tail = [{"type": "flatten"}] if layers[-1].get("return_sequences", True) else []
    return spec_of([*layers, *tail, {"type": "dense", "units": 2, "activation": "identity"}], (4, 4))


def independent_layer(layer, w: dict, a: torch.Tensor) -> torch.Tensor:
    """The layer's output from torch's single-step cells unrolled here (nn.RNNCell / LSTMCell / GRUCell), or the
    attention equations written out (q, k, v split into heads, softmax(q kᵀ/√d_h) v): no twin code involved."""
    m, T, n = a.shape
    if layer.type in ("rnn", "lstm", "gru"):
        H = layer.hidden_size
        kw = {"nonlinearity": layer.nonlinearity} if layer.type == "rnn" else {}
        cell = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[layer.type](
            n, H, bias=layer.bias, dtype=a.dtype, **kw)
        names = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0", "bias_ih": "bias_ih_l0", "bias_hh": "bias_hh_l0"}
        with torch.no_grad():
            for k, prm in cell.named_parameters():
                prm.copy_(w[names[k]])
        h = w["h0"].expand(m, H) if "h0" in w else torch.zeros(m, H, dtype=a.dtype)
        c = w["c0"].expand(m, H) if "c0" in w else torch.zeros(m, H, dtype=a.dtype)
        hs = []
        for t in range(T):
            if layer.type == "lstm":
                h, c = cell(a[:, t], (h, c))
            else:
                h = cell(a[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1) if layer.return_sequences else hs[-1]
    d, heads = n, layer.num_heads
    dh = d // heads
    qkv = a @ w["in_proj_weight"].T + (w["in_proj_bias"] if "in_proj_bias" in w else 0)
    q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(m, T, heads, dh).transpose(1, 2) for j in range(3))
    S = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if layer.causal:
        S = S.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
    ctx = (torch.softmax(S, -1) @ v).transpose(1, 2).reshape(m, T, d)
    return ctx @ w["out_proj.weight"].T + (w["out_proj.bias"] if "out_proj.bias" in w else 0)


def sequence_layers(spec):
    return [(i, l) for i, l in enumerate(spec.layers) if l.type in ("rnn", "lstm", "gru", "attention")]


@pytest.mark.parametrize("name", TWIN_SPECS)
def test_module_twin_names_are_the_specs_and_it_computes_what_the_functional_twin_and_torchs_cells_do(name):
    spec = twin_spec(name)
    twin = Twin(spec)
    assert list(twin.state_dict()) == list(spec.state_shapes())
    assert {k: tuple(p.shape) for k, p in twin.named_parameters()} == {k: tuple(s) for k, s in spec.param_shapes().items()}
    params, x, _ = bp.random_case(spec, 5, batch=3)
    for k in params:
        if k.endswith(("h0", "c0")):  # a learned state far from zero, so that forgetting it shows
            params[k] = params[k] + 1.0
    twin.load_params(params)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        out, zs, _ = twin.forward_all(xt)
        weights = leaf_weights(spec, params, torch.float64)
        f_out, f_zs, f_acts = twin_forward(spec, weights, input_tensor(spec, x, torch.float64))
    np.testing.assert_allclose(out.numpy(), f_out.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert len(zs) == len(f_zs)
    for z, fz in zip(zs, f_zs):
        np.testing.assert_allclose(z.numpy(), fz.detach().numpy(), rtol=1e-12, atol=1e-14)
    for i, layer in sequence_layers(spec):
        a_in = xt if i == 0 else f_acts[i - 1].detach()
        w = {k[len(f"layers.{i}."):]: torch.from_numpy(v) for k, v in params.items() if k.startswith(f"layers.{i}.")}
        np.testing.assert_allclose(zs[i].numpy(), independent_layer(layer, w, a_in).detach().numpy(),
                                   rtol=1e-10, atol=1e-12, err_msg=f"{name}: layer {i}")


@settings(deadline=None)
@given(cases(specs_strategy=sequence_model_specs(), dtypes=("float64",), max_batch=3))
def test_module_and_functional_twins_agree_on_random_sequence_models(case):
    spec = case.spec
    twin = Twin(spec)
    assert list(twin.state_dict()) == list(spec.state_shapes())
    twin.load_params(case.params)
    with torch.no_grad():
        out = twin(input_tensor(spec, case.x, torch.float64))
        f_out = twin_forward(spec, leaf_weights(spec, case.params, torch.float64),
                             input_tensor(spec, case.x, torch.float64))[0]
    np.testing.assert_allclose(out.numpy(), f_out.detach().numpy(), rtol=1e-10, atol=1e-12)


# == 3. manual_bp passes on random sequence models ====================================================================
@settings(deadline=None)
@given(cases(specs_strategy=sequence_model_specs(), max_batch=4))
def test_correct_backprop_passes_on_random_sequence_models(case):
    result = oracle.check(case.spec, case.params, case.x, case.y)
    assert result.classification != "crash", result.message()
    assert result.passed and result.classification in ("match", "rounding", "kink", "convention"), result.message()


# == 4. the sequence mutants ==========================================================================================
@pytest.mark.parametrize("mutant", SEQUENCE_MUTANTS, ids=lambda m: m.name)
def test_each_sequence_mutant_is_killed_where_it_acts(mutant):
    row = hunt(mutant, 60, 0)
    assert row.killed and row.classification == "bug", row
    assert row.declared_layer is not None and row.reported_layer == row.declared_layer, row
    # the declared layer is where the gradients first differ from torch's (strictly, walking back from the loss), on
    # networks of the mutant's own strategy: checked here without the oracle
    changed = 0
    for spec, params, x, y in drawn_cases(mutant, 4, seed=5):
        ref = run_twin(spec, params, x, y, np.float64)
        first = first_divergent(spec, mutant.grads_fn(spec, params, x, y), ref)
        declared, _ = mutant.corrupts(spec, bp.forward(spec, params, x))
        assert first in (declared, None), (spec.describe(), first, declared)
        changed += first is not None
    assert changed >= 1


# == 5. hints and localization through time ===========================================================================
def backprop_with(spec, params, x, y, override=None):
    """(loss, grads, deltas) by the δ recursion over manual_bp's layers, where ``override[i](layer, p, a, delta)``
    replaces layer i's backward: a hand-made candidate that is wrong in one layer only."""
    override = override or {}
    cache = bp.forward(spec, params, x)
    y = check_y(spec, y, cache.output.shape[0], False, cache.output.dtype)
    rows = spec.loss.as_rows(cache.output, y)
    loss = spec.loss.value(*rows)
    grad_a = spec.loss.grad(*rows).reshape(cache.output.shape)
    grads, deltas = {}, {}
    for i in reversed(range(len(spec.layers))):
        layer = spec.layers[i]
        delta = layer.activation.vjp(cache.z[i], cache.a[i + 1], grad_a)
        deltas[f"layers.{i}"] = delta
        backward = override.get(i, lambda l, p, a, d: l.backward(p, a, d))
        nabla, grad_a = backward(layer, cache.layer_params(i), cache.a[i], delta)
        grads.update({f"layers.{i}.{k}": g for k, g in nabla.items()})
    return loss, grads, deltas


def truncated_bptt(layer, p, a, delta):
    """BPTT cut to one step: each step hands nothing back to the step before it (dh_{t−1}, dc_{t−1} dropped)."""
    right = {"rnn": rec.rnn_step_backward, "lstm": rec.lstm_step_backward, "gru": rec.gru_step_backward}[layer.type]

    def step(p, cache, *carried):
        out = right(p, cache, *carried)
        return (*out[:2], *(np.zeros_like(c) for c in out[2:]))
    return layer.backward(p, a, delta, step_backward=step)


LSTM_NET = [{"type": "temporal_dense", "units": 4, "activation": "tanh"},
            {"type": "lstm", "hidden_size": 4, "initial_state": "learned"},
            {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]


def test_manual_bp_through_the_hand_made_walker_is_right():
    """The walker the candidates below are built on, unmodified, passes: each of them is wrong only where it says."""
    spec = spec_of(LSTM_NET, (5, 3))
    params, x, y = bp.random_case(spec, 0, batch=3)
    result = oracle.check(spec, params, x, y, lambda *c: backprop_with(*c))
    assert result.passed, result.message()


def test_truncated_bptt_is_localized_to_the_lstm_and_the_first_diverging_step_is_named():
    spec = spec_of(LSTM_NET, (5, 3))
    params, x, y = bp.random_case(spec, 0, batch=3)
    candidate = lambda s, p, x_, y_: backprop_with(s, p, x_, y_, {1: truncated_bptt})  # noqa: E731
    result = oracle.check(spec, params, x, y, candidate)
    assert not result.passed and result.classification == "bug", result.message()
    assert result.first_divergent_layer == 1, result.localization
    # independently: the steps of the front's δ that differ from torch's, counted back from the last
    ref = run_twin(spec, params, x, y, np.float64)
    got = candidate(spec, params, x, y)[2]["layers.0"]
    want = ref.deltas["layers.0"]
    T = want.shape[1]
    per_step = np.abs(got - want).reshape(got.shape[0], T, -1).max(axis=(0, 2))
    differs = per_step > 1e-9 * np.abs(want).max()
    back = T - 1 - int(np.flatnonzero(differs).max())
    assert back == 1 and not differs[-1]
    assert f"is {back} back" in result.localization, result.localization
    step_hints = [h for h in result.hints.get("layers.0.delta", []) if f"is {back} back" in h]
    assert step_hints, result.hints


def test_a_broken_forget_gate_is_named():
    spec = spec_of(LSTM_NET, (5, 3))
    params, x, y = bp.random_case(spec, 1, batch=3)
    H = spec.layers[1].hidden_size

    def candidate(s, p, x_, y_):
        loss, grads, deltas = backprop_with(s, p, x_, y_)
        wrong = grads["layers.1.weight_hh_l0"].copy()
        wrong[H:2 * H] *= 2          # torch's gate order i, f, g, o: rows H..2H are the forget gate's
        return loss, {**grads, "layers.1.weight_hh_l0": wrong}, deltas

    result = oracle.check(spec, params, x, y, candidate)
    assert not result.passed and result.classification == "bug" and result.first_divergent_layer == 1, result.message()
    assert [t.name for t in result.failed_tensors] == ["layers.1.weight_hh_l0"]
    hints = result.hints["layers.1.weight_hh_l0"]
    assert any("gate f (forget)" in h and "gates" not in h for h in hints), hints


def test_swapped_key_and_value_gradients_name_projections_k_and_v():
    spec = spec_of([{"type": "attention", "num_heads": 2, "causal": False}, {"type": "flatten"},
                    {"type": "dense", "units": 2, "activation": "identity"}], (4, 4))
    params, x, y = bp.random_case(spec, 2, batch=3)
    candidate = lambda s, p, x_, y_: backprop_with(  # noqa: E731
        s, p, x_, y_, {0: lambda l, p_, a, d: l.backward(p_, a, d, swap_kv=True)})
    result = oracle.check(spec, params, x, y, candidate)
    assert not result.passed and result.classification == "bug" and result.first_divergent_layer == 0, result.message()
    hints = result.hints["layers.0.in_proj_weight"]
    assert any("projections k, v" in h for h in hints), hints
    # independently: torch's gradient of in_proj_weight differs from the candidate's in the k and v rows only
    d = 4
    ref = run_twin(spec, params, x, y, np.float64).grads["layers.0.in_proj_weight"]
    got = candidate(spec, params, x, y)[1]["layers.0.in_proj_weight"]
    differs = [not np.allclose(got[j * d:(j + 1) * d], ref[j * d:(j + 1) * d], rtol=1e-9, atol=1e-12) for j in range(3)]
    assert differs == [False, True, True]


def test_an_error_only_at_masked_steps_gets_the_masked_steps_hint():
    spec = spec_of([{"type": "gru", "hidden_size": 4}, {"type": "temporal_dense", "units": 3, "activation": "identity"}],
                   (5, 3), loss="cross_entropy")
    params, x, _ = bp.random_case(spec, 3, batch=3)
    y = np.random.default_rng(3).integers(0, 3, (3, 5))
    y[0, 1] = y[1, 3] = y[2, 0] = y[2, 4] = -100
    masked = y == -100

    def mask_forgotten(s, p, x_, y_):
        """δ of the head as softmax − one-hot over the kept rows, but the masked steps given softmax/N too."""
        loss, grads, deltas = backprop_with(s, p, x_, y_)
        out = bp.forward(s, p, x_).output
        probs = np.exp(out - out.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        extra = np.where(masked[..., None], probs / (~masked).sum(), 0.0)
        return loss, grads, {**deltas, "layers.1": deltas["layers.1"] + extra}

    ref = run_twin(spec, params, x, y, np.float64)
    assert not np.any(ref.deltas["layers.1"][masked])   # torch: no gradient at a masked step
    result = oracle.check(spec, params, x, y, mask_forgotten)
    assert not result.passed and result.classification == "bug", result.message()
    hints = result.hints.get("layers.1.delta", [])
    assert any("confined to the masked steps" in h for h in hints), result.hints


# == 6. bp-oracle check on an lstm network =============================================================================
CANDIDATE = '''
"""BPTT truncated to one step in the lstm, by wrapping manual_bp; everything else manual_bp's."""
import numpy as np
import manual_bp as bp
from manual_bp.data import check_y
from manual_bp.layers.recurrent import lstm_step_backward


def _step(p, cache, dh, dc):
    grads, dx, _, _ = lstm_step_backward(p, cache, dh, dc)
    return grads, dx, np.zeros_like(dh), np.zeros_like(dc)


def grads(spec, params, x, y):
    cache = bp.forward(spec, params, x)
    y = check_y(spec, y, cache.output.shape[0], False, cache.output.dtype)
    rows = spec.loss.as_rows(cache.output, y)
    g = spec.loss.grad(*rows).reshape(cache.output.shape)
    out, deltas = {}, {}
    for i in reversed(range(len(spec.layers))):
        layer = spec.layers[i]
        d = layer.activation.vjp(cache.z[i], cache.a[i + 1], g)
        deltas[f"layers.{i}"] = d
        kw = {"step_backward": _step} if layer.type == "lstm" else {}
        nabla, g = layer.backward(cache.layer_params(i), cache.a[i], d, **kw)
        out.update({f"layers.{i}.{k}": v for k, v in nabla.items()})
    return spec.loss.value(*rows), out, deltas
'''


def only_folder(parent: Path) -> Path:
    found = [p for p in parent.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def bp_oracle(capsys, *argv):
    """``bp-oracle`` in this process (torch already imported), as tests/test_cli.py runs it. (exit code, stdout, stderr)"""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bp_oracle_check_on_an_lstm_network_passes_manual_bp_and_names_the_step_a_truncated_bptt_breaks(capsys, tmp_path):
    spec_file = tmp_path / "lstm-net.json"
    spec_file.write_text(json.dumps({
        "format_version": 2, "name": "lstm-net", "input": {"shape": [5, 3]}, "loss": "mse",
        "layers": [{"type": "temporal_dense", "units": 4, "activation": "tanh"},
                   {"type": "lstm", "hidden_size": 4, "initial_state": "learned"},
                   {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]}))
    (tmp_path / "truncated.py").write_text(textwrap.dedent(CANDIDATE))

    code, out, err = bp_oracle(capsys, "check", str(spec_file), "--report", str(tmp_path / "good"), "--seed", "1")
    assert code == 0 and "gradients match torch.autograd" in out, out + err
    folder = only_folder(tmp_path / "good")
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] is True and report["first_divergent_layer"] is None
    assert (folder / "report.md").read_text().startswith("## bp-oracle: PASS")
    assert "data:image/png;base64," in (folder / "report.html").read_text()

    # the failing run as its own process, as a user types it
    done = subprocess.run([sys.executable, "-m", "oracle", "check", str(spec_file), "--impl",
                           f"{tmp_path / 'truncated.py'}:grads", "--report", str(tmp_path / "bad"), "--seed", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1 and "GRADIENT MISMATCH" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    folder = only_folder(tmp_path / "bad")
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] is False and report["classification"] == "bug" and report["first_divergent_layer"] == 1
    md = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    assert "FAIL" in md.splitlines()[0]
    # the step to name, worked out here from the recorded case: the candidate's δ of the front against torch's
    spec = bp.Spec.from_dict(json.loads(spec_file.read_text()))
    with np.load(folder / "case.npz") as case:
        params = {k: case[k] for k in case.files if k not in ("x", "y")}
        x, y = case["x"], case["y"]
    module = importlib.util.spec_from_file_location("truncated_candidate", tmp_path / "truncated.py")
    truncated = importlib.util.module_from_spec(module)
    module.loader.exec_module(truncated)
    got = truncated.grads(spec, params, x, y)[2]["layers.0"]
    want = run_twin(spec, params, x, y, np.float64).deltas["layers.0"]
    T = want.shape[1]
    differs = np.abs(got - want).max(axis=(0, 2)) > 1e-9 * np.abs(want).max()
    back = T - 1 - int(np.flatnonzero(differs).max())
    named = f"is {back} back (t = {T - 1 - back} of 0..{T - 1})"
    assert back >= 1 and named in md and named in html, (named, md)
    assert "data:image/png;base64," in html
