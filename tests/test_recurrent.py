"""rnn, lstm and gru (backprop through time by hand): manual_bp against torch's own nn.RNN / nn.LSTM / nn.GRU, the
spec rules, stability, and the knobs a mutant uses (``step_backward``, ``sum_over_time``, ``backward_hidden``)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import manual_bp as bp
from manual_bp import SpecError
from manual_bp.layers import recurrent as rec

TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
CELLS = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}
KINDS = [("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"}), ("lstm", {}), ("gru", {})]
STEP_BACKWARD = {"rnn": rec.rnn_step_backward, "lstm": rec.lstm_step_backward, "gru": rec.gru_step_backward}


def spec_of(layers, shape=(5, 3), loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


def recurrent_spec(kind, T, n=3, H=4, head="flatten", **fields):
    """The recurrent layer, then a head that makes a vector: flatten + dense, or temporal_dense + flatten + dense
    (a sequence output), or a dense alone (the last step only)."""
    layer = {"type": kind, "hidden_size": H, **fields}
    if not fields.get("return_sequences", True):
        tail = [{"type": "dense", "units": 2, "activation": "identity"}]
    elif head == "temporal":
        tail = [{"type": "temporal_dense", "units": 3, "activation": "tanh"}, {"type": "flatten"},
                {"type": "dense", "units": 2, "activation": "identity"}]
    else:
        tail = [{"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]
    return spec_of([layer, *tail], (T, n))


def torch_recurrent(layer, n, params, prefix="layers.0."):
    """torch's module for ``layer``, float64, with manual_bp's parameters copied in."""
    kw = {"nonlinearity": layer.nonlinearity} if layer.type == "rnn" else {}
    mod = TORCH[layer.type](n, layer.hidden_size, bias=layer.bias, batch_first=True, dtype=torch.float64, **kw)
    with torch.no_grad():
        for name, prm in mod.named_parameters():
            prm.copy_(torch.from_numpy(params[prefix + name]))
    return mod


def torch_reference(spec, params, x, y):
    """(loss, grads, grad_input) from torch.autograd: the recurrent layer as torch's module, the head functional."""
    layer = spec.layers[0]
    m, H = x.shape[0], layer.hidden_size
    mod = torch_recurrent(layer, spec.input_shape[1], params)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in params.items() if not k.startswith("layers.0.")}
    state = None
    if layer.initial_state == "learned":
        for k in ("h0", "c0"):
            if f"layers.0.{k}" in params:
                leaves[f"layers.0.{k}"] = torch.tensor(params[f"layers.0.{k}"], requires_grad=True)
        h0 = leaves["layers.0.h0"].expand(1, m, H)
        state = (h0, leaves["layers.0.c0"].expand(1, m, H)) if layer.type == "lstm" else h0
    xt = torch.tensor(x, requires_grad=True)
    out, _ = mod(xt, state)
    a = out if layer.return_sequences else out[:, -1]
    for i, l in enumerate(spec.layers[1:], start=1):
        if l.type == "flatten":
            a = a.flatten(1)
        else:
            a = F.linear(a, leaves[f"layers.{i}.weight"], leaves.get(f"layers.{i}.bias"))
            a = torch.tanh(a) if l.activation.name == "tanh" else a
    loss = F.mse_loss(a, torch.tensor(y))
    loss.backward()
    grads = {f"layers.0.{k}": p.grad.numpy() for k, p in mod.named_parameters()}
    grads.update({k: t.grad.numpy() for k, t in leaves.items()})
    return loss.item(), grads, xt.grad.numpy()


def assert_matches_torch(spec, params, x, y, rtol=1e-10):
    ours = bp.gradients(spec, params, x, y)
    loss, grads, grad_input = torch_reference(spec, params, x, y)
    np.testing.assert_allclose(ours.loss, loss, rtol=rtol)
    assert set(ours.grads) == set(grads) == set(spec.param_shapes())
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for k, want in grads.items():
        np.testing.assert_allclose(ours.grads[k], want, rtol=rtol, atol=1e-13 * scale, err_msg=f"{spec.describe()}: {k}")
    np.testing.assert_allclose(ours.grad_input, grad_input, rtol=rtol, atol=1e-13 * scale, err_msg=spec.describe())


def random_case(spec, seed, batch=3, scale=1.0):
    """Params U(−scale, scale) (h0 and c0 too, so a learned state is not small), x N(0, 1)."""
    rng = np.random.default_rng(seed)
    params = {k: rng.uniform(-scale, scale, s) for k, s in spec.param_shapes().items()}
    x, y = bp.random_batch(spec, rng, batch=batch)
    return params, x, y


# -- against torch's modules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, extra, bias, sequences, state, T", [
    (kind, extra, bias, sequences, state, T)
    for (kind, extra), bias, sequences, state, T in itertools.product(
        KINDS, (True, False), (True, False), ("zero", "learned"), (1, 2, 5))])
def test_gradients_match_torch(kind, extra, bias, sequences, state, T):
    spec = recurrent_spec(kind, T, bias=bias, return_sequences=sequences, initial_state=state, **extra)
    params, x, y = random_case(spec, T + 10 * bias + 100 * sequences)
    assert_matches_torch(spec, params, x, y)


@pytest.mark.parametrize("kind, extra", KINDS)
def test_a_sequence_output_feeds_temporal_dense(kind, extra):
    spec = recurrent_spec(kind, 4, H=5, head="temporal", initial_state="learned", **extra)
    params, x, y = random_case(spec, 7, batch=4)
    assert_matches_torch(spec, params, x, y)


def test_recurrent_after_an_embedding_matches_torch():
    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [6]}, "loss": "mse", "layers": [
        {"type": "embedding", "num_embeddings": 7, "embedding_dim": 3},
        {"type": "gru", "hidden_size": 4, "return_sequences": False},
        {"type": "dense", "units": 2, "activation": "identity"}]})
    params, x, y = bp.random_case(spec, 1, batch=3)
    ours = bp.gradients(spec, params, x, y)
    table = torch.tensor(params["layers.0.weight"], requires_grad=True)
    gru = torch_recurrent(spec.layers[1], 3, params, prefix="layers.1.")
    out, _ = gru(table[torch.from_numpy(x)])
    loss = F.mse_loss(F.linear(out[:, -1], torch.tensor(params["layers.2.weight"]), torch.tensor(params["layers.2.bias"])),
                      torch.tensor(y))
    loss.backward()
    np.testing.assert_allclose(ours.grads["layers.0.weight"], table.grad.numpy(), rtol=1e-10, atol=1e-14)
    for name, prm in gru.named_parameters():
        np.testing.assert_allclose(ours.grads[f"layers.1.{name}"], prm.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_float32_stays_float32():
    spec = recurrent_spec("lstm", 3)
    params, x, y = bp.random_case(spec, 0, batch=2, dtype="float32")
    ours = bp.gradients(spec, params, x, y)
    assert all(g.dtype == np.float32 for g in ours.grads.values()) and ours.grad_input.dtype == np.float32


# -- stability ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, extra", KINDS)
def test_huge_pre_activations_stay_finite_without_warnings(kind, extra):
    spec = recurrent_spec(kind, 5, bias=True, initial_state="learned", **extra)
    params, x, y = random_case(spec, 3)
    for k in ("weight_ih_l0", "bias_ih_l0", "weight_hh_l0"):
        params[f"layers.0.{k}"] = params[f"layers.0.{k}"] * 1e3     # |pre-activation| ~ 1e3
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        ours = bp.gradients(spec, params, x, y)
    assert all(np.all(np.isfinite(g)) for g in ours.grads.values()) and np.all(np.isfinite(ours.grad_input))
    if kind != "rnn" or extra["nonlinearity"] == "tanh":            # relu's 1e3-sized states make torch's loss huge
        assert_matches_torch(spec, params, x, y, rtol=1e-9)


# -- the spec -------------------------------------------------------------------------------------------------
HEAD = [{"type": "flatten"}, {"type": "dense", "units": 1, "activation": "identity"}]


@pytest.mark.parametrize("layer, shape, match", [
    ({"type": "rnn", "hidden_size": 4}, (6,), r"layers\.0: rnn needs \(T, n\) input, got \(6,\)"),
    ({"type": "lstm", "hidden_size": 4}, (2, 3, 4), r"layers\.0: lstm needs \(T, n\) input, got \(2, 3, 4\)"),
    ({"type": "lstm", "hidden_size": 4, "nonlinearity": "tanh"}, (2, 3), r"layers\[0\]\.nonlinearity: unknown field"),
    ({"type": "gru", "hidden_size": 4, "units": 4}, (2, 3), r"layers\[0\]\.units: unknown field"),
    ({"type": "rnn", "hidden_size": 4, "nonlinearity": "sigmoid"}, (2, 3),
     r"layers\[0\]\.nonlinearity: 'sigmoid' is not an rnn nonlinearity; write \"tanh\" or \"relu\""),
    ({"type": "rnn"}, (2, 3), r"layers\[0\]\.hidden_size: missing"),
    ({"type": "gru", "hidden_size": 0}, (2, 3), r"layers\[0\]\.hidden_size: 0 is not positive"),
    ({"type": "gru", "hidden_size": 2.0}, (2, 3), r"layers\[0\]\.hidden_size: 2\.0 is not an integer"),
    ({"type": "lstm", "hidden_size": 4, "bias": "yes"}, (2, 3), r"layers\[0\]\.bias: 'yes' is not true or false"),
    ({"type": "lstm", "hidden_size": 4, "return_sequences": 1}, (2, 3), r"layers\[0\]\.return_sequences: 1 is not true"),
    ({"type": "rnn", "hidden_size": 4, "initial_state": "random"}, (2, 3),
     r"layers\[0\]\.initial_state: 'random' is not an initial state"),
])
def test_bad_recurrent_layers_are_refused(layer, shape, match):
    with pytest.raises(SpecError, match=match):
        spec_of([layer, *HEAD], shape)


def test_canonical_json_round_trips_and_names_torchs_parameters():
    spec = spec_of([{"type": "rnn", "hidden_size": 4, "nonlinearity": "relu", "initial_state": "learned"},
                    {"type": "lstm", "hidden_size": 2, "bias": False, "initial_state": "learned"},
                    {"type": "gru", "hidden_size": 3, "return_sequences": False, "activation": "tanh"},
                    {"type": "dense", "units": 1, "activation": "identity"}], (5, 6))
    assert spec.to_dict()["layers"][:3] == [
        {"type": "rnn", "hidden_size": 4, "nonlinearity": "relu", "bias": True, "return_sequences": True,
         "initial_state": "learned", "activation": "identity"},
        {"type": "lstm", "hidden_size": 2, "bias": False, "return_sequences": True, "initial_state": "learned",
         "activation": "identity"},
        {"type": "gru", "hidden_size": 3, "bias": True, "return_sequences": False, "initial_state": "zero",
         "activation": "tanh"}]
    assert bp.Spec.from_json(spec.to_json()) == spec
    assert spec.param_shapes() == {
        "layers.0.weight_ih_l0": (4, 6), "layers.0.weight_hh_l0": (4, 4), "layers.0.bias_ih_l0": (4,),
        "layers.0.bias_hh_l0": (4,), "layers.0.h0": (4,),
        "layers.1.weight_ih_l0": (8, 4), "layers.1.weight_hh_l0": (8, 2), "layers.1.h0": (2,), "layers.1.c0": (2,),
        "layers.2.weight_ih_l0": (9, 2), "layers.2.weight_hh_l0": (9, 3), "layers.2.bias_ih_l0": (9,),
        "layers.2.bias_hh_l0": (9,), "layers.3.weight": (1, 3), "layers.3.bias": (1,)}
    assert [spec.out_shape(i) for i in range(3)] == [(5, 4), (5, 2), (3,)]
    assert spec.describe() == ("5x6 -> rnn[relu] 4 (learned h0) -> lstm 2 (learned h0, no bias) -> gru 3 (last step) tanh"
                               " -> 1 identity, mse")
    # the names are torch's own, in its order
    for layer, i in zip(spec.layers[:3], range(3)):
        names = [k for k, _ in torch_recurrent(layer, spec.in_shape(i)[1], bp.init_params(spec, np.random.default_rng(0)),
                                               prefix=f"layers.{i}.").named_parameters()]
        assert names == [k.partition(f"layers.{i}.")[2] for k in spec.param_shapes()
                         if k.startswith(f"layers.{i}.") and not k.endswith(("h0", "c0"))]


# -- the knobs ---------------------------------------------------------------------------------------------------
def layer_case(kind, extra, T=4, m=3, n=3, H=4, seed=0, **fields):
    spec = recurrent_spec(kind, T, n=n, H=H, initial_state="learned", **extra, **fields)
    layer = spec.layers[0]
    rng = np.random.default_rng(seed)
    p = {k.partition("layers.0.")[2]: rng.uniform(-1, 1, s) for k, s in spec.param_shapes().items() if k.startswith("layers.0.")}
    a = rng.standard_normal((m, T, n))
    delta = rng.standard_normal((m, *spec.out_shape(0)))
    return layer, p, a, delta


@pytest.mark.parametrize("kind, extra", KINDS)
@pytest.mark.parametrize("sequences", [True, False])
def test_backward_without_saved_equals_with_saved(kind, extra, sequences):
    layer, p, a, delta = layer_case(kind, extra, return_sequences=sequences)
    z, saved = layer.forward_saved(p, a)
    np.testing.assert_array_equal(z, layer.forward(p, a))
    (g1, da1), (g2, da2) = layer.backward(p, a, delta, saved), layer.backward(p, a, delta)
    assert g1.keys() == g2.keys()
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    np.testing.assert_array_equal(da1, da2)


@pytest.mark.parametrize("kind, extra", KINDS)
@pytest.mark.parametrize("sum_over_time", [True, False])
def test_the_step_functions_give_the_fast_loops_gradients(kind, extra, sum_over_time):
    """Passing the correct step backward (cs231n's per-step form) gives what the batched loop gives."""
    layer, p, a, delta = layer_case(kind, extra, T=5)
    fast, da_fast = layer.backward(p, a, delta, sum_over_time=sum_over_time)
    slow, da_slow = layer.backward(p, a, delta, step_backward=STEP_BACKWARD[kind], sum_over_time=sum_over_time)
    assert list(fast) == list(slow) == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "h0"] + (
        ["c0"] if kind == "lstm" else [])
    for k in fast:
        np.testing.assert_allclose(slow[k], fast[k], rtol=1e-12, atol=1e-14, err_msg=k)
    np.testing.assert_allclose(da_slow, da_fast, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind, extra", KINDS)
def test_sum_over_time_off_keeps_the_last_steps_hidden_to_hidden_gradients(kind, extra):
    layer, p, a, delta = layer_case(kind, extra, T=5)
    right, da_right = layer.backward(p, a, delta)
    wrong, da_wrong = layer.backward(p, a, delta, sum_over_time=False)
    _, saved = layer.forward_saved(p, a)
    dc = (np.zeros_like(delta[:, -1]),) if kind == "lstm" else ()
    last = STEP_BACKWARD[kind](p, saved.steps[-1], delta[:, -1], *dc)[0]  # the last step gets δ_T alone
    for k in right:
        if k in rec.HIDDEN_TO_HIDDEN:
            np.testing.assert_allclose(wrong[k], last[k], rtol=1e-12, atol=1e-14)
            assert not np.allclose(wrong[k], right[k])
        else:
            np.testing.assert_array_equal(wrong[k], right[k])
    np.testing.assert_array_equal(da_wrong, da_right)


def test_a_faulty_step_backward_is_used():
    layer, p, a, delta = layer_case("gru", {})

    def no_recurrent_path(p, cache, dh):
        grads, dx, dh_prev = rec.gru_step_backward(p, cache, dh)
        return grads, dx, np.zeros_like(dh_prev)

    wrong, _ = layer.backward(p, a, delta, step_backward=no_recurrent_path)
    right, _ = layer.backward(p, a, delta)
    assert not np.allclose(wrong["weight_hh_l0"], right["weight_hh_l0"]) and np.all(wrong["h0"] == 0)


@pytest.mark.parametrize("kind, extra", KINDS)
@pytest.mark.parametrize("sequences", [True, False])
def test_backward_hidden_is_the_total_gradient_of_each_step_as_torchs_unrolled_cells(kind, extra, sequences):
    layer, p, a, delta = layer_case(kind, extra, return_sequences=sequences)
    dh = layer.backward_hidden(p, a, delta)
    m, T, H = a.shape[0], a.shape[1], layer.hidden_size
    assert dh.shape == (m, T, H)
    np.testing.assert_array_equal(dh[:, -1], delta[:, -1] if sequences else delta)  # nothing flows from after T
    kw = {"nonlinearity": layer.nonlinearity} if kind == "rnn" else {}
    cell = CELLS[kind](a.shape[2], H, dtype=torch.float64, **kw)
    with torch.no_grad():
        for name, prm in cell.named_parameters():
            prm.copy_(torch.from_numpy(p[f"{name}_l0"]))
    h = torch.tensor(p["h0"]).expand(m, H)
    c = torch.tensor(p["c0"]).expand(m, H) if kind == "lstm" else None
    hs = []
    for t in range(T):
        if kind == "lstm":
            h, c = cell(torch.from_numpy(a[:, t]), (h, c))
        else:
            h = cell(torch.from_numpy(a[:, t]), h)
        h.retain_grad()
        hs.append(h)
    out = torch.stack(hs, 1) if sequences else hs[-1]
    (out * torch.from_numpy(delta)).sum().backward()
    np.testing.assert_allclose(dh, torch.stack([h.grad for h in hs], 1).numpy(), rtol=1e-10, atol=1e-14)
