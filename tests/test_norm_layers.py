"""Batch, layer and group norm and dropout: manual_bp against torch.nn.functional written out here
(independent of both manual_bp and the oracle's twin), the spec rules, and the oracle on random
networks that mix them with everything else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import manual_bp as bp
import oracle
from manual_bp import SpecError
from oracle.strategies import cases, with_norms

from .helpers import functional_reference

def spec_of(layers, shape, loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


def torch_reference(spec, params, x, y):
    """loss, grads, ∂C/∂x and the running statistics after the forward, by torch.nn.functional."""
    loss, grads, _, dx, buffers = functional_reference(spec, params, x, y)
    return loss, grads, dx, buffers


NETS = {
    "bn1d-train": ([{"type": "dense", "units": 5, "activation": "identity"}, {"type": "batch_norm", "activation": "relu"},
                    {"type": "dense", "units": 2, "activation": "identity"}], (3,)),
    "bn1d-eval-no-affine": ([{"type": "batch_norm", "training": False, "affine": False, "activation": "tanh"},
                             {"type": "dense", "units": 2, "activation": "identity"}], (4,)),
    "bn-on-(C,L)": ([{"type": "batch_norm", "momentum": 0.3, "eps": 1e-3}, {"type": "flatten"},
                     {"type": "dense", "units": 2, "activation": "identity"}], (3, 5)),
    "conv-bn2d-gn-ln": ([{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "activation": "identity"},
                         {"type": "batch_norm"}, {"type": "group_norm", "num_groups": 2, "activation": "tanh"},
                         {"type": "layer_norm", "normalized_shape": [4, 4, 4]}, {"type": "flatten"},
                         {"type": "dropout", "p": 0.3, "seed": 5}, {"type": "dense", "units": 2, "activation": "identity"}],
                        (2, 6, 6)),
    "ln-last-axis-no-affine": ([{"type": "layer_norm", "elementwise_affine": False}, {"type": "dropout", "p": 0.9, "seed": 1},
                                {"type": "dense", "units": 3, "activation": "identity"}], (6,)),
    "gn-instance-norm": ([{"type": "group_norm", "num_groups": 3, "affine": True}, {"type": "flatten"},
                          {"type": "dropout", "p": 0.0}, {"type": "dense", "units": 2, "activation": "identity"}], (3, 4)),
    "dropout-eval": ([{"type": "dropout", "p": 0.5, "training": False}, {"type": "dense", "units": 2, "activation": "identity"}], (4,)),
}


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("batch", [2, 3, 7])
def test_manual_backprop_matches_torch_functional(name, batch):
    spec = spec_of(*NETS[name])
    params, x, y = bp.random_case(spec, batch, batch=batch)
    ours = bp.gradients(spec, params, x, y)
    loss, grads, dx, buffers = torch_reference(spec, params, x, y)
    assert float(ours.loss) == pytest.approx(loss, rel=1e-12)
    for k, g in grads.items():
        np.testing.assert_allclose(ours.grads[k], g, rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(ours.grad_input, dx, rtol=1e-9, atol=1e-12)
    assert set(ours.buffers) == set(buffers)
    for k, v in buffers.items():  # torch updates them in place in training mode (unbiased variance there)
        np.testing.assert_allclose(ours.buffers[k], v, rtol=1e-12, atol=1e-15, err_msg=k)


def test_batch_norm_input_gradient_is_orthogonal_to_one_and_to_xhat():
    """A closed form, independent of torch: x̂ is invariant to shifting and scaling a set, so ∂C/∂a sums to 0
    over each set and is orthogonal to x̂ there (for γ = 1, any upstream δ, and ε → 0: ε shrinks x̂'s spread)."""
    layer = bp.LAYER_TYPES["batch_norm"](affine=False, eps=1e-14)
    rng = np.random.default_rng(0)
    a, delta = rng.normal(3, 2, (5, 3, 4)), rng.normal(size=(5, 3, 4))
    _, grad = layer.backward({}, a, delta)
    xhat, _ = layer.statistics({}, a)
    np.testing.assert_allclose(grad.sum(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose((grad * xhat).sum(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(xhat.mean(axis=(0, 2)), 0, atol=1e-12)


def test_keep_mask_is_reproducible_and_keeps_one_minus_p():
    m1, m2 = bp.keep_mask(7, 0.3, (200, 50)), bp.keep_mask(7, 0.3, (200, 50))
    np.testing.assert_array_equal(m1, m2)
    assert abs(m1.mean() - 0.7) < 0.02 and bp.keep_mask(7, 0.0, (3, 3)).all()
    assert not np.array_equal(m1, bp.keep_mask(8, 0.3, (200, 50)))


@pytest.mark.parametrize("layer, match", [
    ({"type": "dropout", "p": 1}, r"layers\[0\]\.p: 1 is outside \[0, 1\)"),
    ({"type": "dropout", "p": -0.1}, r"layers\[0\]\.p"),
    ({"type": "dropout", "p": "0.5"}, r"layers\[0\]\.p: '0\.5' is not a finite number"),
    ({"type": "batch_norm", "eps": 0}, r"layers\[0\]\.eps"),
    ({"type": "batch_norm", "momentum": 2}, r"layers\[0\]\.momentum"),
    ({"type": "batch_norm", "training": "yes"}, r"layers\[0\]\.training"),
    ({"type": "batch_norm", "track": True}, r"layers\[0\]\.track: unknown field"),
    ({"type": "group_norm"}, r"layers\[0\]\.num_groups: missing"),
    ({"type": "group_norm", "num_groups": 4}, r"layers\.0\.num_groups: 4 groups do not divide 6 channels"),
    ({"type": "layer_norm", "normalized_shape": [5]}, r"layers\.0\.normalized_shape: \[5\] is not the trailing sizes"),
    ({"type": "layer_norm", "normalized_shape": [6, 0]}, r"normalized_shape\[1\]"),
    ({"type": "batch_norm", "activation": "nope"}, r"layers\[0\]\.activation"),
])
def test_bad_norm_and_dropout_fields_are_refused_naming_the_field(layer, match):
    with pytest.raises(SpecError, match=match):
        spec_of([layer, {"type": "flatten"}], (6, 2))


def test_batch_norm_in_training_mode_refuses_one_value_per_channel_as_torch_does():
    spec = spec_of(NETS["bn1d-train"][0], (3,))
    params, x, y = bp.random_case(spec, 0, batch=1)
    with pytest.raises(SpecError, match=r"x: layers\.1: batch_norm in training mode sees 1 value per channel"):
        bp.gradients(spec, params, x, y)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # torch refuses the same case
        torch_reference(spec, params, x, y)
    evaluating = spec_of([{"type": "batch_norm", "training": False}, {"type": "dense", "units": 2, "activation": "identity"}], (3,))
    bp.gradients(evaluating, *bp.random_case(evaluating, 0, batch=1))  # eval mode takes a batch of 1
    conv = spec_of([{"type": "batch_norm"}, {"type": "flatten"}], (2, 3))
    bp.gradients(conv, *bp.random_case(conv, 0, batch=1))  # (C, L): L values per channel


def test_a_negative_running_variance_is_refused():
    spec = spec_of(NETS["bn1d-eval-no-affine"][0], (4,))
    params, x, y = bp.random_case(spec, 0, batch=2)
    params["layers.0.running_var"][1] = -1.0
    with pytest.raises(SpecError, match=r"params\['layers\.0\.running_var'\]: holds a negative variance"):
        bp.gradients(spec, params, x, y)
    del params["layers.0.running_var"]
    with pytest.raises(SpecError, match=r"params\['layers\.0\.running_var'\]: missing"):
        bp.gradients(spec, params, x, y)


def test_the_twin_module_loads_buffers_and_gives_the_same_gradients():
    from oracle.twin import Twin, loss_fn
    spec = bp.example("mlp-batchnorm")
    params, x, y = bp.random_case(spec, 3, batch=6)
    model = Twin(spec).load_params(params)
    assert {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} == set(spec.state_shapes())
    assert isinstance(model.layers[1], torch.nn.BatchNorm1d) and model.layers[1].training
    loss = loss_fn(spec.loss)(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    ours = bp.gradients(spec, params, x, y)
    for k, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), ours.grads[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.layers[1].running_var.detach().numpy(), ours.buffers["layers.1.running_var"], rtol=1e-12)


def test_a_nearly_constant_batch_is_judged_without_false_alarms_and_bugs_still_fail():
    """Batch norm on a batch whose spread is 1e-4 of its mean: the variance cancels; correct code in float32
    stays within the allowance; dropping the mean path still fails in float64, at the layer below it."""
    from oracle.mutants import CATALOGUE
    spec = spec_of([{"type": "dense", "units": 4, "activation": "identity"}, {"type": "batch_norm", "eps": 1e-8},
                    {"type": "dense", "units": 2, "activation": "tanh"}], (3,))
    rng = np.random.default_rng(1)
    params, _, y = bp.random_case(spec, 1, batch=5)
    x = 100 + 1e-2 * rng.standard_normal((5, 3))  # z_0 = θx + b: nearly the same row for every example
    for dt in (np.float64, np.float32):
        p = {k: v.astype(dt) for k, v in params.items()}
        result = oracle.check(spec, p, x.astype(dt), y.astype(dt))
        assert result.passed, result.message()
    mutant = next(m for m in CATALOGUE if m.name == "batch_norm_mean_path_dropped")
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert not result.passed and result.classification == "bug" and result.first_divergent_layer == 0, result.message()


@settings(deadline=None)
@given(cases(specs_strategy=with_norms()))
def test_correct_backprop_passes_on_random_nets_with_norm_and_dropout(case):
    result = oracle.check(case.spec, case.params, case.x, case.y)
    assert result.passed, result.message()


def test_bad_batch_for_batch_norm_exits_2_from_the_cli(tmp_path):
    spec = tmp_path / "bn.json"
    spec.write_text(json.dumps(bp.example("mlp-batchnorm").to_dict()))
    run = subprocess.run([sys.executable, "-m", "oracle", "check", str(spec), "--batch", "1", "--report", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "batch_norm in training mode" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_running_statistics_are_reported_against_torch_but_not_judged():
    spec = bp.example("mlp-batchnorm")
    params, x, y = bp.random_case(spec, 0, batch=4)
    result = oracle.check(spec, params, x, y)
    assert result.passed and any("Running statistics" in n and "match torch's update" in n for n in result.notes)

    def stale_variance(spec, params, x, y):  # the biased σ² in the running update: a forward-state bug only
        g = bp.gradients(spec, params, x, y)
        n = x.shape[0]
        mom = spec.layers[1].momentum
        var_new = g.buffers["layers.1.running_var"]
        old = params["layers.1.running_var"]
        g.buffers["layers.1.running_var"] = old + (var_new - old) * (n - 1) / n  # momentum · σ² instead of σ²·N/(N − 1)
        assert mom > 0
        return g

    result = oracle.check(spec, params, x, y, stale_variance)
    assert result.passed  # gradients are right: the verdict is about them
    assert any("differ from torch's update: layers.1.running_var" in n for n in result.notes), result.notes


#: a false alarm of the 20,000-case norm run (seed 7): saturated tanh → group norm: in float32 the candidate's
#: values tie exactly in 625 overlapping max-pool windows (kernel 2×3, stride 1) where float64 tells them apart,
#: and a second pool above is tied too. Reading each pool's routing from the candidate's δ failed when the
#: read used torch's δ of the pool (routed torch's way above) and started from the first contender.
OVERLAPPING_TIES = json.loads((Path(__file__).parent / "data" / "overlapping_ties_after_group_norm.json").read_text())


def test_exact_float32_ties_in_overlapping_windows_after_a_norm_are_a_convention():
    from oracle.rates import replay
    spec, params, x, y = replay(OVERLAPPING_TIES)
    result = oracle.check(spec, params, x, y)
    assert result.passed and result.classification == "kink", result.message()
    assert any("Tie convention" in n for n in result.notes)


#: a false alarm of the norm run (seed 8): dropout's ×10 puts z exactly on softplus's threshold 5 in float64,
#: and float32 lands on the other side, where the *value* jumps by log(1 + e^−5) = 0.0067 (torch switches to z)
SOFTPLUS_JUMP = json.loads((Path(__file__).parent / "data" / "softplus_threshold_after_dropout.json").read_text())


def test_softplus_threshold_is_a_kink_whose_value_jump_either_side_may_take_and_bugs_still_fail():
    from oracle.mutants import CATALOGUE
    from oracle.rates import replay
    spec, params, x, y = replay(SOFTPLUS_JUMP)
    assert spec.layers[5].activation.kink_points() == (5.0,)
    result = oracle.check(spec, params, x, y)
    assert result.passed and result.classification == "kink", result.message()
    mutant = next(m for m in CATALOGUE if m.name == "dropout_scale_forgotten_in_backward")
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert result.classification == "bug" and result.first_divergent_layer == 4, result.message()


def _near_constant_case():
    """dense → batch_norm → dense with a bias of 1e5 before the norm: mean/spread ≈ 1e5, hopeless in float32."""
    spec = spec_of([{"type": "dense", "units": 6, "activation": "identity"}, {"type": "batch_norm"},
                    {"type": "dense", "units": 3, "activation": "identity"}], (5,), loss="half_sse")
    rng = np.random.default_rng(1)
    params, _, y = bp.random_case(spec, 1, batch=8)
    params["layers.0.weight"] = 0.5 * rng.standard_normal((6, 5))
    params["layers.0.bias"] = np.full(6, 1e5)
    return spec, params, rng.standard_normal((8, 5)), y


def test_a_pass_that_rounding_could_fake_says_it_is_weak_and_the_classic_bug_still_fails():
    from oracle.mutants import CATALOGUE
    spec, params, x, y = _near_constant_case()
    result = oracle.check(spec, params, x, y, dtype="float32")
    assert result.passed and any(n.startswith("Weak check") for n in result.notes), result.notes
    assert not any(n.startswith("Weak check") for n in oracle.check(spec, params, x, y).notes)  # float64 is fine
    mutant = next(m for m in CATALOGUE if m.name == "batch_norm_mean_path_dropped")
    assert oracle.check(spec, params, x, y, mutant.grads_fn, dtype="float32").classification == "bug"


def test_a_norm_whose_sum_of_squares_overflows_the_dtype_is_refused_not_judged():
    spec = spec_of([{"type": "layer_norm"}, {"type": "dense", "units": 2, "activation": "identity"}], (4,))
    params, x, y = bp.random_case(spec, 0, batch=3, dtype="float32")
    x = (x * np.float32(1e20)).astype(np.float32)
    with pytest.raises(SpecError, match=r"overflows float32 inside layer 0 \(layer_norm"):
        oracle.check(spec, params, x, y)


def test_eps_must_fit_float32():
    with pytest.raises(SpecError, match=r"layers\[0\]\.eps: 1e\+308 is outside"):
        spec_of([{"type": "batch_norm", "eps": 1e308}, {"type": "flatten"}], (2, 2))


def test_running_statistics_come_back_from_an_impl_in_its_own_process(tmp_path):
    run = subprocess.run([sys.executable, "-m", "oracle", "check", "--example", "mlp-batchnorm", "--impl", "manual_bp:gradients",
                          "--report", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0 and "Running statistics after the forward (not gradients, not judged): match" in run.stdout


def test_a_weak_pass_counts_as_inconclusive_in_detection_rates():
    from oracle.mutants import CATALOGUE
    from oracle.rates import is_weak
    spec, params, x, y = _near_constant_case()
    mutant = next(m for m in CATALOGUE if m.name == "batch_norm_variance_path_dropped")
    weak = oracle.check(spec, params, x, y, mutant.grads_fn, dtype="float32")
    assert weak.passed and is_weak(weak)     # it passes, and says it cannot tell
    assert not is_weak(oracle.check(spec, params, x, y, mutant.grads_fn))  # float64 tells: a bug


def test_a_torch_state_dict_with_num_batches_tracked_loads_from_the_cli(tmp_path):
    """A user's saved torch model (state_dict → npz) has num_batches_tracked beside the running statistics."""
    from oracle.twin import Twin
    spec = bp.example("mlp-batchnorm")
    model = Twin(spec).train()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert state["layers.1.num_batches_tracked"].dtype == np.int64
    np.savez(tmp_path / "p.npz", **state)
    run = subprocess.run([sys.executable, "-m", "oracle", "check", "--example", "mlp-batchnorm", "--params", str(tmp_path / "p.npz"),
                          "--batch", "6", "--report", str(tmp_path / "r")], capture_output=True, text=True)
    assert run.returncode == 0 and "gradients match" in run.stdout, run.stdout + run.stderr


#: a false alarm of the full detection run's controls (seed 11): two batch norms on a batch of 2 where one
#: feature is exactly constant in float64 (variance 0) but 1 ulp apart in float32; the second norm amplifies
#: that to ±1.5e-3 around leaky_relu's kink, and the candidate's two examples land on opposite sides. Its
#: *value* differs by (s' − s)(z − k): the noise now evaluates g at the jittered z (torch's slope kept).
KINK_VALUE = json.loads((Path(__file__).parent / "data" / "kink_value_after_two_batch_norms.json").read_text())


def test_a_kinks_value_on_either_side_within_rounding_is_not_a_false_alarm():
    from oracle.rates import replay
    spec, params, x, y = replay(KINK_VALUE)
    result = oracle.check(spec, params, x, y)
    assert result.passed, result.message()
