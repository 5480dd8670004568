"""Per-time-step losses: a network that ends in a temporal_dense head outputs (m, T, k), and every loss judges it as
m·T rows of k, as a torch user writes it (``F.cross_entropy(logits.reshape(-1, k), y.reshape(-1))``,
``F.mse_loss(out, y)``). For cross_entropy and nll a target of −100 masks a step (torch's default ``ignore_index``):
it contributes nothing and the mean is over the kept steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp import LOSSES, SpecError
from oracle.mutants import Hooks, faulty_gradients
from oracle.strategies import cases, draw_data, per_step_specs

#: the head's activation that fits each loss (identity elsewhere)
HEAD = {"nll": "log_softmax", "bce": "sigmoid"}
#: each loss written directly in torch on the sequence output (m, T, k), independently of oracle.twin
TORCH = {
    "half_sse": lambda out, y: 0.5 * ((out - y) ** 2).sum(),
    "sse": lambda out, y: ((y - out) ** 2).sum(),
    "half_mse": lambda out, y: ((out - y) ** 2).sum() / (2 * out.shape[0] * out.shape[1]),  # ½ mean over m·T rows
    "mse": lambda out, y: F.mse_loss(out, y),
    "l1": lambda out, y: F.l1_loss(out, y),
    "huber": lambda out, y: F.huber_loss(out, y, delta=0.5),
    "smooth_l1": lambda out, y: F.smooth_l1_loss(out, y, beta=2.0),
    "bce": lambda out, y: F.binary_cross_entropy(out, y),
    "bce_with_logits": lambda out, y: F.binary_cross_entropy_with_logits(out, y),
    "cross_entropy": lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    "nll": lambda out, y: F.nll_loss(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
}
LOSS_SPECS = {"huber": {"name": "huber", "delta": 0.5}, "smooth_l1": {"name": "smooth_l1", "beta": 2.0}}


def test_every_loss_is_covered():
    assert set(TORCH) == set(LOSSES)


def per_step_spec(loss: str, k: int = 3, steps: int = 4, features: int = 3) -> bp.Spec:
    """(T, n) -> temporal_dense 5 tanh -> temporal_dense head of k units, the loss at every step."""
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": [steps, features]}, "layers": [
        {"type": "temporal_dense", "units": 5, "activation": "tanh"},
        {"type": "temporal_dense", "units": k, "activation": HEAD.get(loss, "identity")},
    ], "loss": LOSS_SPECS.get(loss, loss)})


def masked_case(spec, seed=0, batch=3, masked=((0, 1), (1, 3), (2, 0), (2, 2))):
    """A random case whose class targets have the given (example, step) pairs masked with −100."""
    params, x, y = bp.random_case(spec, seed, batch=batch)
    if spec.loss.targets == "classes":
        y = y.copy()
        for i, t in masked:
            y[i, t] = -100
    return params, x, y


def torch_gradients(spec, params, x, y):
    """The two-layer per-step net and its loss in torch, directly: (loss, grads, δ of the head, ∂C/∂x)."""
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt = torch.tensor(x, requires_grad=True)
    a = torch.tanh(F.linear(xt, P["layers.0.weight"], P["layers.0.bias"]))
    z = F.linear(a, P["layers.1.weight"], P["layers.1.bias"])
    z.retain_grad()
    head = spec.layers[-1].activation.name
    out = {"identity": z, "sigmoid": torch.sigmoid(z), "log_softmax": F.log_softmax(z, dim=-1)}[head]
    yt = torch.from_numpy(y) if spec.loss.targets == "classes" else torch.tensor(y)
    loss = TORCH[spec.loss.name](out, yt)
    loss.backward()
    return loss.item(), {k: P[k].grad.numpy() for k in params}, z.grad.numpy(), xt.grad.numpy()


# -- manual_bp against torch --------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_manual_bp_matches_torch_on_every_loss_at_every_step(loss):
    spec = per_step_spec(loss)
    assert spec.output_shape == (4, 3) and spec.output_size == 3
    params, x, y = masked_case(spec)
    ours = bp.gradients(spec, params, x, y)
    t_loss, t_grads, t_delta, t_input = torch_gradients(spec, params, x, y)
    np.testing.assert_allclose(ours.loss, t_loss, rtol=1e-10)
    for k in spec.param_shapes():
        np.testing.assert_allclose(ours.grads[k], t_grads[k], rtol=1e-10, atol=1e-15, err_msg=k)
    assert ours.deltas["layers.1"].shape == (3, 4, 3)
    np.testing.assert_allclose(ours.deltas["layers.1"], t_delta, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ours.grad_input, t_input, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_masked_steps_get_zero_delta_and_the_mean_is_over_kept_steps(loss):
    spec = per_step_spec(loss)
    masked = ((0, 1), (1, 3), (2, 0), (2, 2))
    params, x, y = masked_case(spec, seed=5, masked=masked)
    ours = bp.gradients(spec, params, x, y)
    delta = ours.deltas["layers.1"]
    for i, t in masked:
        assert np.all(delta[i, t] == 0), (i, t)
    kept = y != -100
    n = int(kept.sum())
    assert n == 3 * 4 - len(masked)
    cache = bp.forward(spec, params, x)
    logp = cache.output if loss == "nll" else cache.output - np.log(np.exp(cache.output).sum(-1, keepdims=True))
    np.testing.assert_allclose(ours.loss, -logp[kept, y[kept]].sum() / n, rtol=1e-12)
    # the kept steps: (softmax − onehot)/n, n the kept count (for nll: log_softmax's vjp of −onehot/n), masked: 0
    p = np.exp(logp)
    onehot = np.eye(3)[np.where(kept, y, 0)] * kept[..., None]
    want = (p * kept[..., None] - onehot) / n  # the same for both: log_softmax's vjp of −onehot/n gives it
    np.testing.assert_allclose(delta, want, rtol=1e-10, atol=1e-15)
    # and torch, with its default ignore_index = −100
    t_loss, _, t_delta, _ = torch_gradients(spec, params, x, y)
    np.testing.assert_allclose(ours.loss, t_loss, rtol=1e-12)
    np.testing.assert_allclose(delta, t_delta, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_a_masked_example_of_a_vector_output_is_ignored_as_torch(loss):
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "layers": [
        {"type": "dense", "units": 4, "activation": HEAD.get(loss, "identity")}], "loss": loss})
    params, x, y = bp.random_case(spec, 2, batch=5)
    y = y.copy()
    y[[1, 3]] = -100
    ours = bp.gradients(spec, params, x, y)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    z = F.linear(torch.tensor(x), P["layers.0.weight"], P["layers.0.bias"])
    out = F.log_softmax(z, dim=-1) if loss == "nll" else z
    t = (F.nll_loss if loss == "nll" else F.cross_entropy)(out, torch.from_numpy(y))
    t.backward()
    np.testing.assert_allclose(ours.loss, t.item(), rtol=1e-12)
    for k in params:
        np.testing.assert_allclose(ours.grads[k], P[k].grad.numpy(), rtol=1e-10, atol=1e-15)
    assert np.all(ours.deltas["layers.0"][[1, 3]] == 0)
    assert oracle.check(spec, params, x, y).passed


def test_value_targets_of_one_unit_may_come_as_m_by_t():
    spec = per_step_spec("mse", k=1)
    params, x, y = bp.random_case(spec, 1, batch=2)
    assert y.shape == (2, 4, 1)
    flat = bp.gradients(spec, params, x, y[..., 0])
    full = bp.gradients(spec, params, x, y)
    assert flat.loss == full.loss
    for k in full.grads:
        np.testing.assert_array_equal(flat.grads[k], full.grads[k])
    assert oracle.check(spec, params, x, y[..., 0]).passed


# -- refused targets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_every_target_masked_is_refused_naming_y(loss):
    spec = per_step_spec(loss)
    params, x, _ = bp.random_case(spec, 0, batch=2)
    y = np.full((2, 4), -100)
    with pytest.raises(SpecError, match=r"^y: every target is −100 \(ignored\): nothing to average") as err:
        bp.gradients(spec, params, x, y)
    assert err.value.field == "y"
    with pytest.raises(SpecError, match="every target is −100"):
        oracle.check(spec, params, x, y)


@pytest.mark.parametrize("loss, y_shape, want", [
    ("cross_entropy", (2,), r"give \(2, 4\) class indices, one per step of each example"),
    ("cross_entropy", (2, 4, 3), r"give \(2, 4\) class indices"),
    ("nll", (8,), r"give \(2, 4\) class indices"),
    ("mse", (2, 4), r"give \(2, 4, 3\) targets, one row per step of each example"),
    ("mse", (2, 12), r"give \(2, 4, 3\) targets"),
    ("bce", (8, 3), r"give \(2, 4, 3\) targets"),
])
def test_a_wrong_target_shape_is_refused_naming_y(loss, y_shape, want):
    spec = per_step_spec(loss)
    params, x, _ = bp.random_case(spec, 0, batch=2)
    y = np.zeros(y_shape, dtype=np.int64 if spec.loss.targets == "classes" else np.float64)
    with pytest.raises(SpecError, match=rf"^y: has shape \({y_shape[0]},") as err:
        bp.gradients(spec, params, x, y)
    assert err.value.field == "y" and err.match(want)


@pytest.mark.parametrize("bad, word", [(-1, "holds class -1"), (-99, "holds class -99"), (3, "holds class 3")])
def test_other_negative_or_too_large_classes_stay_refused(bad, word):
    spec = per_step_spec("cross_entropy")
    params, x, y = bp.random_case(spec, 0, batch=2)
    y = y.copy()
    y[1, 2] = bad
    with pytest.raises(SpecError, match=rf"^y: {word}.*or be −100 to ignore a step"):
        bp.gradients(spec, params, x, y)


def test_a_network_ending_in_a_sequence_without_a_per_step_head_is_refused():
    with pytest.raises(SpecError, match=r"a loss needs a vector \(n,\) or, after a temporal_dense head"):
        bp.Spec.from_dict({"format_version": 2, "input": {"shape": [4, 3]}, "layers": [
            {"type": "temporal_dense", "units": 2, "activation": "tanh"}, {"type": "layer_norm"}], "loss": "mse"})


# -- the oracle ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_the_oracle_passes_manual_bp_on_per_step_specs(loss, dtype):
    spec = per_step_spec(loss)
    for seed in range(2):
        params, x, y = masked_case(spec, seed=seed)
        result = oracle.check(spec, params, x, y, dtype=dtype)
        assert result.passed, result.message()


def _rounded(spec, params, x, y):
    """manual_bp with every gradient moved by a few ulps: the oracle's rounding allowance must take it."""
    r = bp.gradients(spec, params, x, y)
    nudge = lambda g: g * (1 + 4 * np.finfo(g.dtype).eps)
    return r.loss, {k: nudge(g) for k, g in r.grads.items()}, {k: nudge(d) for k, d in r.deltas.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", ["cross_entropy", "nll", "mse", "half_mse", "bce"])
def test_the_rounding_allowance_covers_per_step_outputs(loss, dtype):
    spec = per_step_spec(loss)
    params, x, y = masked_case(spec, seed=3)
    result = oracle.check(spec, params, x, y, _rounded, dtype=dtype)
    assert result.passed and result.classification in ("match", "rounding"), result.message()


@pytest.mark.parametrize("loss", ["half_sse", "sse", "half_mse", "mse", "huber", "smooth_l1", "bce_with_logits"])
def test_the_noise_rounds_a_per_step_value_losss_gradient_by_its_own_terms(loss):
    """The ensemble rounds ∇ₐC by u times the terms it is formed from (a and y, scaled as the loss scales them),
    on the m·T rows of a sequence output (m, T, k), each row with its own k targets. Where a and y have opposite
    signs those terms are |∇ₐC| itself: torch.autograd's, of the loss written on (m, T, k) directly (``TORCH``).
    bce_with_logits forms (σ(a) − y)/N from σ(a) and y: its terms times |σ(a) − y| are |∇ₐC| times σ(a) + y."""
    from oracle.noise import _loss_gradient_terms

    spec = per_step_spec(loss)
    rng = np.random.default_rng(7)
    a = 0.2 * rng.random((2, 4, 3))  # |a − y| < 0.4: inside huber's (δ = 0.5) and smooth_l1's quadratic zone
    y = -0.2 * rng.random((2, 4, 3)) if loss != "bce_with_logits" else rng.random((2, 4, 3))
    at = torch.tensor(a, requires_grad=True)
    (grad,) = torch.autograd.grad(TORCH[loss](at, torch.tensor(y)), at)
    grad = grad.numpy()
    terms = _loss_gradient_terms(spec.loss, torch.tensor(a), torch.tensor(y), grad).numpy()
    assert terms.shape == (2, 4, 3)
    if loss == "bce_with_logits":
        s = 1 / (1 + np.exp(-a))
        np.testing.assert_allclose(terms * np.abs(s - y), np.abs(grad) * (s + y), rtol=1e-12)
    else:
        np.testing.assert_allclose(terms, np.abs(grad), rtol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_a_per_step_value_loss_that_cancels_is_judged_by_the_measured_noise(loss):
    """Targets within 10⁻⁵ of the output: ∇ₐC = a − y cancels, and manual_bp in float32 misses torch's δ by more
    than the strict bound, so the verdict needs the noise ensemble run on the (m, T, k) output and its per-step
    targets (the rounding of a, u·|a|, is as large as a − y there). The correct answer passes as rounding; a head
    δ 3/2 of the right one is still a bug."""
    spec = per_step_spec(loss)
    params, x, _ = bp.random_case(spec, 3, batch=3)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    x = (10 * x).astype(np.float32)
    out = bp.forward(spec, {k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64)).output
    y = (out * (1 + 1e-5 * np.random.default_rng(0).standard_normal(out.shape))).astype(np.float32)
    result = oracle.check(spec, params, x, y)
    assert result.passed and result.classification == "rounding", result.message()
    assert any(t.verdict == "rounding" for t in result.tensors if t.name == "layers.1.delta")

    def too_large(spec, params, x, y):
        g = bp.gradients(spec, params, x, y)
        return g.loss, g.grads, {**g.deltas, "layers.1": g.deltas["layers.1"] * np.float32(1.5)}

    result = oracle.check(spec, params, x, y, too_large)
    assert not result.passed and result.classification == "bug", result.message()
    assert [t.name for t in result.tensors if not t.passed] == ["layers.1.delta"]


@pytest.mark.parametrize("loss", ["cross_entropy", "nll"])
def test_the_allowance_of_a_masked_step_is_nothing_and_follows_the_output_shape(loss):
    from manual_bp.data import check_y
    from oracle.noise import measured_allowance
    from oracle.rounding import allowance
    from oracle.twin import run_twin

    spec = per_step_spec(loss)
    params, x, y = masked_case(spec, seed=3)
    y = check_y(spec, y, 3, False, np.float64)
    ref = run_twin(spec, params, x, y, np.float64)
    assert ref.output.shape == (3, 4, 3)
    allow = allowance(spec, params, x, y, ref, np.float32)
    measured = measured_allowance(spec, params, x, y, ref, allow, np.float32)
    for bounds in (allow.bounds, measured):
        d = bounds["layers.1.delta"]
        assert d.shape == (3, 4, 3)
        assert np.all(d[y == -100] < 1e-30) and np.all(d[y != -100] > 1e-12)  # masked steps: exactly 0 either way
        assert bounds["layers.1.weight"].shape == (3, 5)


def _mask_forgotten(divide_by_every_row: bool):
    """A backward that forgets the mask: the kept steps' gradient divided by all m·T steps (the mean over every
    row), or the masked steps given softmax/n as if their one-hot were empty. The loss itself is right."""
    def loss_grad(spec, a, y):
        kept = y != -100
        if divide_by_every_row:
            return spec.loss.grad(a, y) * int(kept.sum()) / a.shape[0]
        return spec.loss.grad(a, y) + np.where(kept[:, None], 0, bp.activations.softmax(a) / int(kept.sum()))

    return lambda spec, params, x, y: faulty_gradients(spec, params, x, y, Hooks(loss_grad=loss_grad))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("every_row", [True, False])
def test_a_candidate_that_forgets_the_mask_is_a_bug(every_row, dtype):
    spec = per_step_spec("cross_entropy")
    params, x, y = masked_case(spec, seed=4)
    result = oracle.check(spec, params, x, y, _mask_forgotten(every_row), dtype=dtype)
    assert not result.passed and result.classification == "bug", result.message()
    assert result.first_divergent_layer == 1  # the head: ∇_a C of the loss


def test_the_correct_candidate_through_the_same_hooks_passes():
    spec = per_step_spec("cross_entropy")
    params, x, y = masked_case(spec, seed=4)
    good = lambda spec, params, x, y: faulty_gradients(spec, params, x, y, Hooks())
    assert oracle.check(spec, params, x, y, good).classification == "match"


def test_draw_data_masks_some_steps_never_all():
    spec = per_step_spec("cross_entropy", steps=3)
    seen_masked = False
    for seed in range(40):
        rng = np.random.default_rng(seed)
        _, y = draw_data(spec, rng, "well_conditioned", batch=1 + seed % 3)
        assert y.shape == (1 + seed % 3, 3) and (y != -100).any()
        assert set(np.unique(y)) <= {-100, 0, 1, 2}
        seen_masked |= bool((y == -100).any())
    assert seen_masked
    _, y = draw_data(per_step_spec("bce"), np.random.default_rng(0), "exact_kinks", batch=2)
    assert y.shape == (2, 4, 3)


@settings(deadline=None)
@given(cases(specs_strategy=per_step_specs()))
def test_correct_backprop_passes_on_random_per_step_nets(case):
    assert case.spec.layers[-1].type == "temporal_dense" and len(case.spec.output_shape) == 2
    result = oracle.check(case.spec, case.params, case.x, case.y)
    assert result.passed, result.message()
