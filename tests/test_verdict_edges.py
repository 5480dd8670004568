"""The verdict at its edges (issue 9): exact kinks, saturated and guarded BCE, tiny gradients, and the
rounding allowance itself. Each case was a wrong verdict before; each asserts the verdict a user
should get, and the exact references are computed independently (decimal arithmetic, long double)."""

from decimal import Decimal, getcontext

import numpy as np
import pytest

import manual_bp as bp
import oracle
from oracle.compare import Tolerance


def _spec(n_in, layers, loss):
    return bp.Spec.from_dict({"format_version": 1, "input_size": n_in, "loss": loss, "layers": [
        {"type": "dense", "units": u, "activation": a, "bias": b} for u, a, b in layers]})


def _with_hook(change):
    """A candidate: manual_bp's gradients, then ``change(grads, deltas, spec)`` edits them in place."""
    def fn(spec, params, x, y):
        r = bp.gradients(spec, params, x, y)
        grads, deltas = dict(r.grads), dict(r.deltas)
        change(grads, deltas, spec, params, x, y)
        return r.loss, grads, deltas
    return fn


def _without_deltas(fn):
    def g(spec, params, x, y):
        loss, grads, _ = fn(spec, params, x, y)
        return loss, grads
    return g


# -- (1) bugs below a layer whose pre-activations sit exactly on a kink ---------------------------------
def _nice_case(seed):
    """Integer and half-integer inputs and weights, zero biases: many z are exactly 0."""
    rng = np.random.default_rng(seed)
    spec = _spec(4, [(6, "relu", True), (5, "relu", True), (2, "identity", True)], "half_mse")
    params = {}
    n_in = 4
    for i, (units, _, _) in enumerate([(6, 0, 0), (5, 0, 0), (2, 0, 0)]):
        params[f"layers.{i}.weight"] = rng.integers(-2, 3, (units, n_in)) / 2
        params[f"layers.{i}.bias"] = np.zeros(units)
        n_in = units
    x = rng.integers(-2, 3, (6, 4)) / 2
    y = rng.integers(-2, 3, (6, 2)) / 2
    return spec, params, x, y


def _bias_averaged_at_layer0(grads, deltas, spec, params, x, y):
    grads["layers.0.bias"] = deltas["layers.0"].mean(axis=0)


def _relu_mask_dropped_at_layer0(grads, deltas, spec, params, x, y):
    up = deltas["layers.1"] @ params["layers.1.weight"]  # δ_1 θ_1, without relu' of layer 0
    deltas["layers.0"] = up
    grads["layers.0.weight"], grads["layers.0.bias"] = up.T @ x, up.sum(axis=0)


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("mistake", [_bias_averaged_at_layer0, _relu_mask_dropped_at_layer0])
def test_a_bug_below_exact_kinks_is_caught_in_every_seed(mistake, with_deltas):
    caught = shown = 0
    for seed in range(10):
        spec, params, x, y = _nice_case(seed)
        z0 = x @ params["layers.0.weight"].T
        assert np.any(z0 == 0), "the case must put pre-activations exactly on the kink"
        fn = _with_hook(mistake)
        right = bp.gradients(spec, params, x, y).grads
        wrong = fn(spec, params, x, y)[1]
        if all(np.allclose(right[k], wrong[k], rtol=0, atol=1e-12) for k in right):
            continue  # this draw happens not to expose the mistake (e.g. every unit dead): nothing to catch
        shown += 1
        result = oracle.check(spec, params, x, y, fn if with_deltas else _without_deltas(fn))
        caught += result.classification == "bug"
        assert result.classification == "bug", result.message()
        assert result.first_divergent_layer == 0, result.message()
    assert shown >= 5


def test_a_candidate_on_exact_kinks_with_torchs_convention_matches():
    for seed in range(10):
        spec, params, x, y = _nice_case(seed)
        result = oracle.check(spec, params, x, y)
        assert result.classification == "match", result.message()


# -- (2) saturated BCE in float32: the allowance must not swallow a sign flip ---------------------------
def _saturated_bce(z_out, dtype="float32", m=4):
    spec = _spec(3, [(4, "tanh", True), (1, "sigmoid", True)], "bce")
    rng = np.random.default_rng(5)
    params = bp.init_params(spec, rng, dtype="float64")
    x = rng.standard_normal((m, 3))
    # choose the output bias so that the output pre-activation is about z_out for every example
    h = np.tanh(x @ params["layers.0.weight"].T + params["layers.0.bias"])
    params["layers.1.bias"] = np.array([z_out - float(np.mean(h @ params["layers.1.weight"].T))])
    y = rng.uniform(0.2, 0.8, (m, 1))
    return spec, {k: v.astype(dtype) for k, v in params.items()}, x.astype(dtype), y.astype(dtype)


# (not z = +30: float32 rounds σ(30) to 1, where torch's own float32 answer is δ = 0 and every gradient 0,
# so a negated or zeroed gradient is exactly what a correct torch-like float32 implementation returns)
@pytest.mark.parametrize("z_out", [-16.0, -20.0, -30.0, 16.0])
@pytest.mark.parametrize("mistake", ["negate_all", "zero_first_weight"])
def test_saturated_bce_float32_bugs_are_caught(z_out, mistake):
    spec, params, x, y = _saturated_bce(z_out)

    def change(grads, deltas, *_):
        if mistake == "negate_all":
            for k in grads:
                grads[k] = -grads[k]
            for k in deltas:
                deltas[k] = -deltas[k]
        else:
            grads["layers.0.weight"] = np.zeros_like(grads["layers.0.weight"])

    for fn in (_with_hook(change), _without_deltas(_with_hook(change))):
        result = oracle.check(spec, params, x, y, fn)
        assert result.classification == "bug", result.message()


# -- (3) torch's BCE guard is a convention: the exact derivative passes too -----------------------------
def _exact_sigmoid_bce_bias_grad(z, y):
    """∂C/∂b of mean-bce on σ(z) for a one-layer net: mean(σ(z) − y), in 50-digit decimal arithmetic."""
    getcontext().prec = 50
    total = Decimal(0)
    for zi, yi in zip(z.ravel(), y.ravel()):
        s = 1 / (1 + (-Decimal(float(zi))).exp())
        total += s - Decimal(float(yi))
    return float(total / len(z.ravel()))


def _nielsen_bce(spec, params, x, y):
    """Nielsen's network2 CrossEntropyCost: δ = a − y at the output, no σ' and no guard (exact)."""
    z = x @ params["layers.0.weight"].T + params["layers.0.bias"]
    a = np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))
    N = a.size
    delta = (a - y) / N
    loss = np.mean(np.logaddexp(0, z) - z * y)  # exact bce from the logits
    return loss, {"layers.0.weight": delta.T @ x, "layers.0.bias": delta.sum(axis=0)}, {"layers.0": delta}


@pytest.mark.parametrize("with_deltas", [True, False])
@pytest.mark.parametrize("z_out", [-30.0, -40.0, 40.0])
def test_exact_bce_at_a_saturated_output_passes_as_convention(z_out, with_deltas):
    spec = _spec(2, [(1, "sigmoid", True)], "bce")
    params = {"layers.0.weight": np.array([[0.5, -0.25]]), "layers.0.bias": np.array([z_out])}
    x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    y = np.array([[0.1], [0.05], [0.9]])
    z = x @ params["layers.0.weight"].T + params["layers.0.bias"]
    exact = _exact_sigmoid_bce_bias_grad(z, y)
    got = _nielsen_bce(spec, params, x, y)
    assert got[1]["layers.0.bias"][0] == pytest.approx(exact, rel=1e-14)
    fn = _nielsen_bce if with_deltas else _without_deltas(_nielsen_bce)
    result = oracle.check(spec, params, x, y, fn)
    assert result.passed and result.classification == "convention", result.message()
    assert any("guard" in n for n in result.notes)
    # torch's own guarded values pass too (manual_bp follows torch there)
    assert oracle.check(spec, params, x, y).classification in ("match", "rounding")
    # and a wrong answer on the guarded elements is still a bug
    def wrong(s, p, xx, yy):
        loss, g, d = _nielsen_bce(s, p, xx, yy)
        return loss, {k: -v for k, v in g.items()}, {k: -v for k, v in d.items()}
    assert oracle.check(spec, params, x, y, wrong).classification == "bug"


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_the_guarded_formula_the_noise_ensemble_moves_is_torchs_guarded_bce(act):
    """``conventions.guarded_bce_delta``, the formula the ensemble evaluates at each run's jittered logits when a
    candidate follows a guard alternative, is torch's own guarded bce backward (autograd through
    ``F.binary_cross_entropy``) wherever its held branch is the one torch takes; and moving z moves it as autograd
    at the moved z does (the 'float32' convention held at a = 1 keeps that output at exactly 1)."""
    import torch
    import torch.nn.functional as F
    from oracle import conventions

    spec = _spec(3, [(5, act, True)], "bce")
    rng = np.random.default_rng(3)
    z = np.array([[-31.0, 2.0, 0.5, -1.0, 3.0], [1.0, -0.5, 40.0, 2.0, -35.0]]) + rng.normal(0, 1e-3, (2, 5))
    y = rng.uniform(0, 1, z.shape)

    def autograd(zz):
        zt = torch.tensor(zz, requires_grad=True)
        a = torch.softmax(zt, -1) if act == "softmax" else torch.sigmoid(zt)
        (g,) = torch.autograd.grad(F.binary_cross_entropy(a, torch.from_numpy(y)), zt)
        return g.numpy(), a.detach().numpy()

    want, a = autograd(z)
    on = a * (1 - a) < conventions.BCE_GUARD
    assert on.any() and not on.all()
    none = np.zeros(z.shape, dtype=bool)
    for zz in (z, z + rng.normal(0, 1e-2, z.shape)):
        got = conventions.guarded_bce_delta(spec, torch.from_numpy(zz), y, on, none, a).numpy()
        np.testing.assert_allclose(got, autograd(zz)[0], rtol=1e-12, atol=1e-300)
    # an output held at exactly 1 stays there as z moves: torch's guarded backward at that a, not at softmax(z)
    held = np.zeros(z.shape, dtype=bool)
    held[1, 2] = True
    values = np.where(held, 1.0, a)
    got = conventions.guarded_bce_delta(spec, torch.from_numpy(z + 0.01), y, on | held, held, values).numpy()
    at = torch.tensor(np.where(held, 1.0, autograd(z + 0.01)[1]), requires_grad=True)
    (up,) = torch.autograd.grad(F.binary_cross_entropy(at, torch.from_numpy(y)), at)
    at = at.detach()
    expect = at * (1 - at) * up if act == "sigmoid" else at * (up - (up * at).sum(-1, keepdim=True))
    np.testing.assert_allclose(got, expect.numpy(), rtol=1e-12, atol=1e-300)


# -- (8) tiny gradients beside ordinary activations: rounding of the intermediates is allowed -----------
def _long_double_gradients(spec, params, x, y):
    """A correct implementation that rounds differently: everything in long double, then float64."""
    ld = np.longdouble
    p = {k: v.astype(ld) for k, v in params.items()}
    a, zs, acts = x.astype(ld), [], [x.astype(ld)]
    k = np.sqrt(ld(2) / ld(np.pi))
    for i, layer in enumerate(spec.layers):
        z = a @ p[f"layers.{i}.weight"].T + (p[f"layers.{i}.bias"] if layer.bias else 0)
        t = np.tanh(k * (z + ld(0.044715) * z ** 3))
        a = 0.5 * z * (1 + t) if layer.activation.name == "gelu_tanh" else z
        zs.append(z)
        acts.append(a)
    g_a = a - y.astype(ld)
    loss = 0.5 * np.sum(g_a * g_a)
    grads, deltas = {}, {}
    for i in reversed(range(len(spec.layers))):
        z = zs[i]
        if spec.layers[i].activation.name == "gelu_tanh":
            t = np.tanh(k * (z + ld(0.044715) * z ** 3))
            d = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * ld(0.044715) * z * z)
        else:
            d = np.ones_like(z)
        delta = g_a * d
        deltas[f"layers.{i}"] = delta.astype(np.float64)
        grads[f"layers.{i}.weight"] = (delta.T @ acts[i]).astype(np.float64)
        if spec.layers[i].bias:
            grads[f"layers.{i}.bias"] = delta.sum(axis=0).astype(np.float64)
        g_a = delta @ p[f"layers.{i}.weight"]
    return float(loss), {k: grads[k] for k in spec.param_shapes()}, deltas


@pytest.mark.parametrize("offset", [1e-6, 1e-8, 1e-10])
def test_tiny_gradients_beside_ordinary_activations_are_not_a_bug(offset):
    spec = _spec(5, [(1, "gelu_tanh", True), (8, "identity", True), (1, "identity", True), (1, "gelu_tanh", True)],
                 "half_sse")
    for seed in range(5):
        rng = np.random.default_rng(seed)
        params = bp.init_params(spec, rng, scale=3.0)
        x = rng.standard_normal((3, 5))
        y = bp.forward(spec, params, x).output + offset  # residuals far smaller than the activations
        for fn in (None, _long_double_gradients):
            result = oracle.check(spec, params, x, y, fn)
            assert result.passed, result.message()
        # ... and a real bug at this scale is still one
        wrong = _with_hook(lambda g, d, *_: g.__setitem__("layers.0.weight", 2 * g["layers.0.weight"]))
        assert oracle.check(spec, params, x, y, wrong).classification == "bug"


# -- the judge's own parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(rtol=-1, atol=1e-10), dict(rtol=float("nan"), atol=1e-10),
                                 dict(rtol=1e-10, atol=float("inf")), dict(rtol=1e-10, atol=1e-10, rounding_factor=-1)])
def test_invalid_tolerances_are_refused(bad):
    with pytest.raises(bp.SpecError, match="tolerance"):
        Tolerance(**bad)


def test_the_rounding_allowance_grows_with_the_conditioning_not_with_s():
    """σ' = a(1 − a) from a rounded a: relative error ~u/σ'(z), tiny at z = 0, large at z = 30."""
    from oracle.rounding import allowance
    from oracle.twin import run_twin

    spec = _spec(1, [(1, "sigmoid", False)], "half_sse")
    x, y = np.array([[1.0]]), np.array([[0.25]])
    rel = []
    for z in (0.0, 30.0):
        params = {"layers.0.weight": np.array([[z]])}
        ref = run_twin(spec, params, x, y, np.float64)
        b = allowance(spec, params, x, y, ref, np.float64).bounds["layers.0.delta"]
        rel.append(float(b[0, 0] / abs(ref.deltas["layers.0"][0, 0])))
    assert rel[0] < 1e-13 and 1e-4 < rel[1] < 1e-1
    # the gradient scale S does not enter: rescaling the loss rescales the bound, not its relative size


# -- (7) a forward pass that overflows is refused before judging, naming the layer ------------------------
@pytest.mark.parametrize("dtype,scale", [("float64", 1e160), ("float32", 1e20)])
def test_an_overflowing_forward_pass_is_refused_naming_the_layer(dtype, scale, capsys, tmp_path):
    spec = _spec(3, [(4, "identity", True), (4, "tanh", True), (1, "identity", True)], "half_sse")
    params, x, y = bp.random_case(spec, 0, batch=2, dtype=dtype)
    params["layers.0.weight"] = params["layers.0.weight"] * np.asarray(scale, dtype=dtype)
    x = x * np.asarray(scale, dtype=dtype)
    with pytest.raises(bp.SpecError, match=f"overflows {dtype} at layer 0"):
        oracle.check(spec, params, x, y)
    from oracle.cli import main

    np.savez(tmp_path / "p.npz", **params)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "s.json").write_text(spec.to_json())
    code = main(["check", str(tmp_path / "s.json"), "--params", str(tmp_path / "p.npz"), "--data", str(tmp_path / "d.npz"),
                 "--dtype", dtype, "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "overflows" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
def test_the_per_element_loss_terms_of_each_bce_convention_add_up_to_its_loss(act):
    """``conventions.clamped_bce_terms`` sums to torch's own bce (logs clamped at −100), in float64 and on float32
    outputs, and ``exact_bce_terms`` to the unclamped loss from the logits (bce_with_logits behind a sigmoid; for a
    softmax, −Σ(y log p + (1 − y) log(1 − p))/N summed in long double from the logits): the terms
    ``mixed_loss`` mixes element by element."""
    import torch
    import torch.nn.functional as F
    from oracle import conventions

    spec = _spec(3, [(4, act, True)], "bce")
    rng = np.random.default_rng(5)
    z = np.array([[-120.0, 2.0, 0.5, 30.0], [1.0, -0.5, 40.0, -200.0]]) + rng.normal(0, 1e-3, (2, 4))
    y = rng.uniform(0, 1, z.shape)
    zt = torch.from_numpy(z)
    a = (torch.softmax(zt, -1) if act == "softmax" else torch.sigmoid(zt))
    for dt in (torch.float64, torch.float32):
        ad = a.to(dt)
        want = float(F.binary_cross_entropy(ad.double(), torch.from_numpy(y)))
        assert conventions.clamped_bce_terms(ad.numpy(), y).sum() == pytest.approx(want, rel=1e-12)
    if act == "sigmoid":
        want = float(F.binary_cross_entropy_with_logits(zt, torch.from_numpy(y)))
    else:
        zl = z.astype(np.longdouble)
        m = zl.max(-1, keepdims=True)
        lse = m + np.log(np.exp(zl - m).sum(-1, keepdims=True))
        logp = zl - lse
        log1mp = np.log(np.array([[np.exp(zl[r, np.arange(4) != j] - lse[r, 0]).sum() for j in range(4)]
                                  for r in range(2)]))
        want = float(-(y * logp + (1 - y) * log1mp).sum() / y.size)
    assert conventions.exact_bce_terms(spec, z, y).sum() == pytest.approx(want, rel=1e-12)
