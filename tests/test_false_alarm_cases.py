"""Regression: false alarms of ``oracle.rates.false_alarms`` and of a detection run's controls (5000–20000 cases per
dtype): correct implementations judged ``bug`` or ``forward``, in float32 unless said. Each case is rebuilt from its recorded
seed by ``oracle.rates.replay``; next to each, a real bug on the same case must still fail.

1. seed 31, norm share: ``15 -> 4 softplus -> layer_norm selu -> batch_norm selu -> batch_norm selu -> 2 sigmoid,
   half_mse``, near_zero, batch 7. Both batch norms see a nearly constant batch (σ² ≈ 1e-7 ≪ eps), so z₂ and z₃ carry
   float32 errors of several percent, and every element of both selu layers lies within rounding of the kink at 0.
   The noise ensemble held the slope there at torch's value *at torch's z*; but on the negative side
   selu′ = λαe^z moves with z (|g″|·Δz, 1e-3 relative here), a correct candidate evaluates it at its own z, and
   batch norm's backward multiplies that by 1/s ≈ 316 twice: δ₁[1, 0] was 2% off, 3× the measured allowance.
   Fixed in ``noise.side_slope``: the *side* of the kink is held, the slope is that side's g′ at the jittered z.
2. seed 51, saturated bce share: ``6 -> 15 relu -> 32 relu -> 32 relu -> 15 selu -> 25 gelu_tanh -> 8 softmax, bce``,
   batch 6. torch's 1e-12 guard is active on every row; second_correct returns the exact δ (an accepted convention),
   δ_j = (p_j − y_j) − Σ_k (p_k − y_k) p_j/(1 − p_k), where p_j/(1 − p_k) is the softmax of the logits without k:
   of order 1 for two near-tied logits (1328.75 and 1329.81) behind a dominant one (21433), so it moves with z's
   absolute float32 rounding (up to 6e-3 at |z| ~ 1e4). The exact formula at second_correct's own float32 z gives
   its answer to 9e-9 (δ[3, 2] = −0.0142055; at the float64 z −0.0142040); the allowance held only the formula's own
   rounding (2.9e-7). Fixed in ``rounding.allowance`` with ``conventions.exact_bce_drift`` (Σ|∂δ/∂z|·E_z on guard rows).
3. seed 29, saturated bce share: ``12 -> 1 mish -> 2 sigmoid (no bias), bce``, batch 7. One output is σ(−99.84) =
   4.36e-44, a float32 subnormal with about 5 significant bits (torch's float32 sigmoid even returns 0 there, its log
   clamped to −100). Rounding a by up to 1.6% moves its loss term −y·log a by up to 0.016·y: manual_bp's C is off by
   2.4e-4, where the allowance was 6e-5. Two things were missing: the noise ensemble rounded every value relatively only (now
   also by the dtype's smallest subnormal, ``noise.jittered_run``'s η), and the worst case that caps it took C's
   change through a as torch's *guarded* gradient times E_a (6e10 where the slope y/(aN) is 1e42; now the change
   of the clamped log itself, ``rounding._clamped_log_change``).
4. exact_kinks share: ``1x3 -> temporal_dense silu -> layer_norm -> temporal_dense silu -> layer_norm -> temporal_dense
   relu, l1``, batch 1, seed 727232. Two rows of layer 2's weight are equal, so the last layer norm's x̂ is (2t, −t, −t)
   and z₄[2] = −0.5·(−0.5·2t) − 1·(−0.5·(−t)) = 0 exactly, with target y₂ = 0: the element lies on relu's kink *and* on
   l1's. torch in float64 gets z₄[2] = −3.9e-16, so relu′ = 0, a = 0, sign(0) = 0: δ₄[2] = 0. Both correct float32
   implementations get z₄[2] = +1.8e-7: relu′ = 1 and residual +1.8e-7, δ₄[2] = +1/6 (the right-hand slope of
   relu(z)/N, a valid one). The Adopter offered each choice alone, relu's other slope times torch's ∂C/∂a = 0, or
   ±1/N times torch's relu′ = 0, both 0; δ₃, δ₂ (40% off, allowance 2e-3) and every θ below followed. Fixed in
   ``conventions.Adopter.options``: on output elements within rounding of both kinks, the two choices together.
5. data seed 4121707716, saturated bce: ``16 -> 9 softmax, bce``, batch 5; manual_bp judged ``bug`` (δ[3, 3] −787.1
   where torch has −0.0168). Row 3's p₅ = 1 − 9.68e-8, 1.6 float32 ulps below 1: float64 has p₅(1 − p₅) ≈ 1e-7, no
   guard at p₅. manual_bp's normalizer 1 + Σ tiny terms sums to exactly 1.0 in float32 (each term under half an ulp),
   so p₅ = 1, torch's guard switches on, G₅ = (1 − y₅)/1e-12/N ≈ 1.38e10 and δ_k = p_k(G_k − Σ G p) ≈ −p_k G₅ (−787 at
   k = 3), δ₅ = 0 after the cancellation. torch's float32 softmax sums in another order, gets p₅ = 1 − 1.19e-7 and no
   guard (its value −0.0153), so the "float32" alternative did not hold it (on row 1 torch too rounds p₅ to 1, and
   manual_bp matched it there). Both roundings are correct float32; fixed in ``conventions.find_guards``: a float32
   softmax output within rounding of 1 joins the guard mask, with torch's guarded float32 formula taking it as 1.
6. exact_kinks, in float64 and float32: ``1x9 -> conv1d 4 silu -> batch_norm selu -> avg_pool1d -> batch_norm
   leaky_relu -> batch_norm mish -> conv1d 4 silu -> flatten -> 3 relu (no bias), bce_with_logits``, batch 1, manual_bp
   judged ``bug``. x is constant (−1.5), so the first batch norm normalizes 9 tied values per channel: exactly, x − μ = 0
   and every z after it is 0 (all three relu outputs on their kink, y = (1, ½, ½)). The mean's last-bit rounding
   (torch 1.8e-14 after 1/√ε, manual_bp 8.8e-15, in float64) is amplified by 1/√ε ≈ 316 at each later norm (σ² ≪ ε):
   torch's z₇ = (−2.2e-11, −3.1e-10, −2.5e-10), manual_bp's (−2.7e-11, +1.2e-11, −7.7e-12). torch's relu has slope 0
   on all three, so its every gradient is 0; manual_bp's z₇[1] > 0 gives δ₇[1] = (σ(1.2e-11) − ½)/3 = 9.7e-13, valid
   (z₇ is within E_z ≈ 2e-6 of the kink). Two gaps: (a) the candidate's side was never adopted, because both sides'
   δ at torch's values are 0 (∂C/∂a = σ(relu(z)) − ½ = 0 at torch's a = 0), so nothing counted as taken and the
   noise stayed on torch's zero-slope side, where δ is 0 in every run (B = 0). ``conventions.Adopter`` now reads a
   nonzero δ where torch's slope is 0 as the other side (a zero slope makes δ exactly 0 in any arithmetic). (b) in
   float32 the residue reaches O(0.1) (manual_bp's z₄ = 0.27, E_z₄ ≈ 228): ∂C/∂θ₇ row 2 = δ₇[2]·a₆ is 1.7e-4 where
   torch's δ₇[2] and a₆ are both ≈ 0, and the worst case that caps the noise had only the first-order eᵀa + δᵀf
   (8e-9), not the product of the two errors eᵀf (``Magnitudes.param_bounds`` now adds it; it is u² small elsewhere).
   On this case the gradient is rounding through and through (its exact value is 0 in float64), so a 1% scaling of
   it is not detectable; a wrong backward of a norm still is.
7. detection run seed 17, a control (the correct backward on a case drawn for batch_norm_variance_path_dropped):
   ``1 -> 7 selu (no bias) -> 7 selu (no bias) -> batch_norm -> batch_norm selu -> 6 softmax, bce``, saturated,
   batch 2. Row 0's p₁ = 4.3e-13 is guarded, so torch's δ₁ = t₁(1 − p₁) − p₁Σt with t₁ = p₁(p₁ − y₁)/1e-12/N: ∝ p₁,
   whose relative error is z's absolute one. Behind two batch norms over two examples the float32 logits err by
   ~0.03, so manual_bp's δ[0, 1] is 2% off torch's (−0.02789 against −0.02736), where the allowance was 1.2e-5. Two
   gaps: the worst case bounded δ_k's change through its own p_k as E_p/N, true only unguarded (guarded it is
   (1 − p_k)|2p_k − y_k|E_p/1e-12/N, ``rounding._softmax_bce_bound``); and where a guard alternative was adopted,
   that looser worst case was the whole allowance (the four batch-norm mutants then passed as ``convention``). The
   noise ensemble now follows the alternative too, each convention's formula evaluated at the run's own jittered
   logits (``conventions.Guards.formulas``), so it measures how far the alternative moves with rounding.
8. adversarial run, float64, saturated: ``2x10 -> conv1d 2 tanh -> batch_norm (eval) gelu -> max_pool1d(3, stride 1) ->
   flatten -> 1 mish -> 4 identity, half_sse``, batch 6. Saturated tanh makes pool inputs that tie exactly, or within an
   ulp where manual_bp's last bit differs from torch's; manual_bp sends each window's δ to its own argmax. Reading that
   routing from its δ, window by window, started from the first contender: where overlapping windows route δ of
   opposite signs, the descent stopped at a routing that was not the candidate's (row 1, channel 0: 4.0e-7 sent to
   position 4, where both send all to 5). It now also starts from torch's own picks (``conventions.torch_picks``).
   The same in float32, near_zero (``overlapping_pool_ties_behind_layer_norm_float32``): a layer norm over 4 values
   that tie to 1e-7 makes x̂ rounding noise, so the pool above it ties almost everywhere (188 windows), and its
   backward's 1/s (316) shows a routing difference in δ₁ that δ₂ hides under atol·S_δ.
9. detection run seed 19, a control, float32, saturated: ``2x6x4 -> residual[dropout mish] -> conv2d 3 leaky_relu ->
   flatten -> residual[8 leaky_relu + 8 identity] -> 4 sigmoid, bce``, batch 3: judged ``forward``. Two outputs are
   guarded, and manual_bp's loss follows a different convention at each: a[2, 3] = 1 − 2e-8 is exactly 1 in
   float32, its log(1 − a) clamped at −100 as torch's float32 does, while a[1, 0] = 8.2e-43 stays a float32 subnormal
   with log −96.9 (torch's float32 sigmoid returns 0 there, clamped to −100). The loss was compared only with whole
   conventions (torch's, the exact one, torch's float32): 0.107 off the nearest, 0.085 allowed. Each guard element may
   now follow its own (``conventions.mixed_loss``).
"""

import importlib.util

import numpy as np
import pytest

import oracle
from oracle import conventions, rates
from oracle.mutants import CATALOGUE

CASES = {
    "norm_selu_kink_float32": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [15]}, "layers": [
            {"type": "dense", "units": 4, "activation": {"name": "softplus", "beta": 0.5, "threshold": 5.0}, "bias": True},
            {"type": "layer_norm", "eps": 1e-05, "normalized_shape": [4], "elementwise_affine": True, "activation": "selu"},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": False, "training": True, "activation": "selu"},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": False, "training": True, "activation": "selu"},
            {"type": "dense", "units": 2, "activation": "sigmoid", "bias": True}], "loss": "half_mse"},
        "regime": "near_zero", "dtype": "float32", "batch": 7, "data_seed": 61970517},
    "softmax_bce_exact_guard_float32": {
        "spec": {"format_version": 1, "name": "", "description": "", "input_size": 6, "layers": [
            {"type": "dense", "units": 15, "activation": "relu", "bias": True},
            {"type": "dense", "units": 32, "activation": "relu", "bias": False},
            {"type": "dense", "units": 32, "activation": "relu", "bias": False},
            {"type": "dense", "units": 15, "activation": "selu", "bias": True},
            {"type": "dense", "units": 25, "activation": "gelu_tanh", "bias": True},
            {"type": "dense", "units": 8, "activation": "softmax", "bias": False}], "loss": "bce"},
        "regime": "saturated", "dtype": "float32", "batch": 6, "data_seed": 638983871},
    "bce_subnormal_output_float32": {
        "spec": {"format_version": 1, "name": "", "description": "", "input_size": 12, "layers": [
            {"type": "dense", "units": 1, "activation": "mish", "bias": True},
            {"type": "dense", "units": 2, "activation": "sigmoid", "bias": False}], "loss": "bce"},
        "regime": "saturated", "dtype": "float32", "batch": 7, "data_seed": 153},
    "relu_l1_double_kink_float32": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [1, 3]}, "layers": [
            {"type": "temporal_dense", "units": 6, "activation": "silu", "bias": True},
            {"type": "layer_norm", "eps": 1e-05, "normalized_shape": [6], "elementwise_affine": True, "activation": "identity"},
            {"type": "temporal_dense", "units": 3, "activation": "silu", "bias": False},
            {"type": "layer_norm", "eps": 1e-05, "normalized_shape": [3], "elementwise_affine": True, "activation": "identity"},
            {"type": "temporal_dense", "units": 6, "activation": "relu", "bias": False}], "loss": "l1"},
        "regime": "exact_kinks", "dtype": "float32", "batch": 1, "data_seed": 727232},
    "softmax_bce_output_rounds_to_1_float32": {
        "spec": {"format_version": 1, "name": "", "description": "", "input_size": 16, "layers": [
            {"type": "dense", "units": 9, "activation": "softmax", "bias": True}], "loss": "bce"},
        "regime": "saturated", "dtype": "float32", "batch": 5, "data_seed": 4121707716},
    **{f"tied_norm_relu_output_{dt}": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [1, 9]}, "layers": [
            {"type": "conv1d", "out_channels": 4, "kernel_size": 1, "stride": 1, "padding": "same", "dilation": 1,
             "groups": 1, "activation": "silu", "bias": True},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": False, "training": True, "activation": "selu"},
            {"type": "avg_pool1d", "kernel_size": 2, "stride": 2, "padding": 1, "count_include_pad": True},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": False, "training": True,
             "activation": {"name": "leaky_relu", "negative_slope": 0.1}},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": False, "training": True, "activation": "mish"},
            {"type": "conv1d", "out_channels": 4, "kernel_size": 1, "stride": 1, "padding": "same", "dilation": 1,
             "groups": 1, "activation": "silu", "bias": True},
            {"type": "flatten"},
            {"type": "dense", "units": 3, "activation": "relu", "bias": False}], "loss": "bce_with_logits"},
        "regime": "exact_kinks", "dtype": dt, "batch": 1, "data_seed": 2232319846} for dt in ("float64", "float32")},
    "guarded_softmax_behind_two_example_norm_float32": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [1]}, "layers": [
            {"type": "dense", "units": 7, "activation": "selu", "bias": False},
            {"type": "dense", "units": 7, "activation": "selu", "bias": False},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": True, "training": True, "activation": "identity"},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": True, "training": True, "activation": "selu"},
            {"type": "dense", "units": 6, "activation": "softmax", "bias": True}], "loss": "bce"},
        "regime": "saturated", "dtype": "float32", "batch": 2, "data_seed": 2250653542},
    "overlapping_pool_ties_saturated_float64": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [2, 10]}, "layers": [
            {"type": "conv1d", "out_channels": 2, "kernel_size": 1, "stride": 1, "padding": 1, "dilation": 2, "groups": 1, "activation": "tanh", "bias": False},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": True, "training": False, "activation": "gelu"},
            {"type": "max_pool1d", "kernel_size": 3, "stride": 1, "padding": 0},
            {"type": "flatten"},
            {"type": "dense", "units": 1, "activation": "mish", "bias": False},
            {"type": "dense", "units": 4, "activation": "identity", "bias": False}], "loss": "half_sse"},
        "regime": "saturated", "dtype": "float64", "batch": 6, "data_seed": 3533843446},
    "overlapping_pool_ties_behind_layer_norm_float32": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [1, 7, 1]}, "layers": [
            {"type": "conv2d", "out_channels": 4, "kernel_size": 2, "stride": [2, 1], "padding": 2, "dilation": [2, 1], "groups": 1, "activation": {"name": "hardtanh", "min_val": -2.0, "max_val": 0.5}, "bias": True},
            {"type": "batch_norm", "eps": 1e-05, "momentum": 0.1, "affine": False, "training": False, "activation": {"name": "leaky_relu", "negative_slope": 0.2}},
            {"type": "layer_norm", "eps": 1e-05, "normalized_shape": [4], "elementwise_affine": False, "activation": "softsign"},
            {"type": "max_pool2d", "kernel_size": [1, 3], "stride": [2, 1], "padding": [0, 1]},
            {"type": "conv2d", "out_channels": 2, "kernel_size": [3, 4], "stride": 2, "padding": [0, 1], "dilation": 1, "groups": 2, "activation": "identity", "bias": False},
            {"type": "max_pool2d", "kernel_size": [2, 3], "stride": [2, 3], "padding": 1},
            {"type": "flatten"},
            {"type": "layer_norm", "eps": 1e-05, "normalized_shape": [2], "elementwise_affine": False, "activation": "silu"},
            {"type": "dense", "units": 5, "activation": {"name": "elu", "alpha": 1.0}, "bias": True},
            {"type": "dense", "units": 6, "activation": "gelu", "bias": True}], "loss": {"name": "smooth_l1", "beta": 0.5}},
        "regime": "near_zero", "dtype": "float32", "batch": 4, "data_seed": 2654856166},
    "bce_conventions_mixed_per_element_float32": {
        "spec": {"format_version": 2, "name": "", "description": "", "input": {"shape": [2, 6, 4]}, "layers": [
            {"type": "residual", "body": [{"type": "dropout", "p": 0.9, "seed": 41518, "training": False, "activation": "mish"}], "projection": None, "activation": "identity"},
            {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": 3, "padding": [1, 2], "dilation": [2, 1], "groups": 1, "activation": {"name": "leaky_relu", "negative_slope": 0.5}, "bias": True},
            {"type": "flatten"},
            {"type": "residual", "body": [{"type": "dense", "units": 8, "activation": {"name": "leaky_relu", "negative_slope": 0.5}, "bias": True}], "projection": {"type": "dense", "units": 8, "activation": "identity", "bias": False}, "activation": "identity"},
            {"type": "dense", "units": 4, "activation": "sigmoid", "bias": False}], "loss": "bce"},
        "regime": "saturated", "dtype": "float32", "batch": 3, "data_seed": 4022428611},
}


def _second_module():
    """A fresh copy of tests/impls/second_correct.py (so that patching it for a control touches nothing else)."""
    spec = importlib.util.spec_from_file_location("second_correct_for_controls", rates.SECOND_CORRECT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _delta_of_layer_1_off(eps):
    """second_correct with δ of layer 1 (the selu after the layer norm) off by a factor 1 + eps, and everything
    below computed from it: the backward's act_vjp calls run layers 3, 2, 1 (the output layer's δ is its own)."""
    return _act_vjp_call_off(3, eps)


def _act_vjp_call_off(n, eps):
    """second_correct with the δ formed by its n-th act_vjp call off by a factor 1 + eps (and everything below)."""
    sc = _second_module()
    vjp, calls = sc.act_vjp, {"n": 0}

    def wrong(name, p, z, g):
        calls["n"] += 1
        d = vjp(name, p, z, g)
        return d * (1 + eps) if calls["n"] == n else d

    def grads(*args):
        calls["n"] = 0
        return sc.grads(*args)

    sc.act_vjp = wrong
    return grads


def _output_delta_off(eps):
    """second_correct with the exact softmax + bce δ_L off by a factor 1 + eps (and every gradient below from it)."""
    sc = _second_module()
    exact = sc._softmax_bce_delta
    sc._softmax_bce_delta = lambda z, y: exact(z, y) * (1 + eps)
    return sc.grads


def _loss_off(eps):
    """manual_bp with the loss value off by a factor 1 + eps (its gradients right)."""
    import manual_bp as bp

    def grads(spec, params, x, y):
        r = bp.gradients(spec, params, x, y)
        return r.loss * (1 + eps), r.grads, r.deltas

    return grads


def _output_delta_scaled(eps):
    """manual_bp with its output δ, and every gradient below from it, off by a factor 1 + eps (one dense layer)."""
    import manual_bp as bp

    def grads(spec, params, x, y):
        r = bp.gradients(spec, params, x, y)
        scale = np.float32(1 + eps)
        return r.loss, {k: v * scale for k, v in r.grads.items()}, {k: v * scale for k, v in r.deltas.items()}

    return grads


def _mutant(name):
    return next(m for m in CATALOGUE if m.name == name).grads_fn


@pytest.mark.parametrize("name", list(CASES))
def test_second_correct_float32_is_not_a_bug(name):
    spec, params, x, y = rates.replay(CASES[name])
    result = oracle.check(spec, params, x, y, rates.load_second_correct())
    assert result.passed, result.message()


@pytest.mark.parametrize("name", list(CASES))
def test_manual_bp_float32_is_not_a_bug(name):
    spec, params, x, y = rates.replay(CASES[name])
    result = oracle.check(spec, params, x, y)
    assert result.passed, result.message()


@pytest.mark.parametrize("name, bug", [
    ("norm_selu_kink_float32", lambda: _mutant("batch_norm_mean_path_dropped")),    # the backward that forms δ₁
    ("norm_selu_kink_float32", lambda: _mutant("layer_norm_backward_over_batch_axis")),
    ("norm_selu_kink_float32", lambda: _delta_of_layer_1_off(0.03)),   # correct float32 answers differ by ~2% here
    ("softmax_bce_exact_guard_float32", lambda: _output_delta_off(0.01)),
    ("softmax_bce_exact_guard_float32", lambda: _mutant("softmax_jvp_dropped")),
    ("bce_subnormal_output_float32", lambda: _mutant("bias_missing_in_forward")),
    ("bce_subnormal_output_float32", lambda: _loss_off(0.05)),  # f·B_C is 2% of C here
    ("relu_l1_double_kink_float32", lambda: _act_vjp_call_off(3, 0.01)),  # calls run layers 4, 3, 2: δ₂ 1% off
    ("relu_l1_double_kink_float32", lambda: _mutant("layer_norm_backward_over_batch_axis")),
    ("relu_l1_double_kink_float32", lambda: _mutant("sign_flip")),
    ("softmax_bce_output_rounds_to_1_float32", lambda: _mutant("softmax_jvp_dropped")),
    ("softmax_bce_output_rounds_to_1_float32", lambda: _output_delta_scaled(0.01)),
    ("tied_norm_relu_output_float64", lambda: _mutant("batch_norm_mean_path_dropped")),
    ("tied_norm_relu_output_float32", lambda: _mutant("batch_norm_mean_path_dropped")),
    *[("guarded_softmax_behind_two_example_norm_float32", lambda name=name: _mutant(name)) for name in (
        "batch_norm_mean_path_dropped", "batch_norm_variance_path_dropped", "batch_norm_bessel_in_backward_only",
        "batch_norm_running_stats_in_training", "softmax_jvp_dropped")],
    ("overlapping_pool_ties_saturated_float64", lambda: _mutant("max_pool_grad_to_every_tie")),
    ("overlapping_pool_ties_saturated_float64", lambda: _mutant("max_pool_grad_to_window_start")),
    ("overlapping_pool_ties_behind_layer_norm_float32", lambda: _mutant("sign_flip")),
    ("overlapping_pool_ties_behind_layer_norm_float32", lambda: _act_vjp_call_off(1, 0.5)),
    ("bce_conventions_mixed_per_element_float32", lambda: _loss_off(0.02)),   # the mixes span 1% of C here
    ("bce_conventions_mixed_per_element_float32", lambda: _loss_off(-0.02)),
])
def test_a_real_bug_on_the_same_case_still_fails(name, bug):
    spec, params, x, y = rates.replay(CASES[name])
    classification, passed, _ = rates.verdict(spec, params, x, y, bug())
    assert passed is False, classification


def test_an_output_on_a_relu_kink_and_the_l1_kink_takes_both_choices_together():
    """Case 4's mechanism: δ₄[2] = +1/N (relu′ = 1 and sign = +1, the float32 side) is accepted as ``kink``, from
    the candidate's δ and, without δ, from the consistent choices; each choice alone would give torch's 0."""
    spec, params, x, y = rates.replay(CASES["relu_l1_double_kink_float32"])
    result = oracle.check(spec, params, x, y)
    assert result.classification == "kink", result.message()
    assert any("both a kink of relu and the kink of l1" in note for note in result.notes), result.notes

    def without_deltas(spec, params, x, y):
        import manual_bp as bp
        r = bp.gradients(spec, params, x, y)
        return r.loss, r.grads

    assert oracle.check(spec, params, x, y, without_deltas).classification == "kink"


def test_the_noise_holds_the_side_of_a_kink_but_not_the_slope_along_it():
    """selu at jittered z: torch's side of 0 is kept (never λ where torch took λαe^z, nor the reverse), but on the
    negative side the slope is λαe^z at the jittered z, not at torch's."""
    import torch

    from manual_bp.activations import make_activation
    from oracle.noise import side_slope
    from oracle.twin import activation_fn

    act = make_activation("selu")
    g = activation_fn(act)
    lam, alpha = act.scale, act.alpha
    z_ref = np.array([-0.03, -1e-9, 0.0, 1e-9, 0.02])
    z = torch.tensor([-0.02, 5e-9, 3e-9, -2e-9, -0.01], dtype=torch.float64)
    slope = side_slope(act, g, z_ref, z).numpy()
    assert slope[0] == pytest.approx(lam * alpha * np.exp(-0.02), rel=1e-12)   # along the branch, at the jittered z
    assert slope[1] == pytest.approx(lam * alpha, rel=1e-12)                  # torch's side (left), not λ
    assert slope[2] == pytest.approx(lam * alpha, rel=1e-12)                  # on the kink: torch's selu′(0) = λα
    assert slope[3] == pytest.approx(lam, rel=1e-12)                          # torch's side (right), not λα
    assert slope[4] == pytest.approx(lam, rel=1e-12)


def test_the_exact_bce_moves_with_z_within_its_drift():
    """Case 2's mechanism: second_correct's δ_L is the exact formula at its *own* float32 z (to float32 rounding),
    far (beyond the formula's own rounding) from the formula at the float64 z, and within ``exact_bce_drift``."""
    from oracle.twin import run_twin

    spec, params, x, y = rates.replay(CASES["softmax_bce_exact_guard_float32"])
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    y64 = y.astype(np.float64)
    z64 = run_twin(spec, p64, x.astype(np.float64), y64, np.float64).z[-1]
    sc = _second_module()
    tape, values, cur = [], [x], 0
    for i, layer in enumerate(spec.layers):  # second_correct's own float32 forward
        cur = sc._unroll(tape, f"layers.{i}", layer, cur, params, values, np.float32)
    z32 = tape[-1]["z"].astype(np.float64)
    _, _, deltas = sc.grads(spec, params, x, y)
    got = deltas["layers.5"].astype(np.float64)
    at64, _ = conventions.exact_bce(spec, z64, y64)
    at32, _ = conventions.exact_bce(spec, z32, y64)
    assert np.abs(got - at32).max() <= 1e-6 * np.abs(at32).max()    # its own z explains its answer ...
    assert np.abs(got - at64).max() > 1e-5 * np.abs(at64).max()      # ... not the formula's rounding
    drift = conventions.exact_bce_drift(spec, z64, y64, np.abs(z32 - z64))
    assert np.all(np.abs(at32 - at64) <= 1.01 * drift + 1e-15)


def test_a_float32_softmax_output_within_rounding_of_1_may_switch_the_guard_on():
    """Case 4's mechanism: p₅ of row 3 is 1 in manual_bp's float32 softmax, not in torch's; the guarded formula with
    p₅ = 1 is an accepted alternative on that row, and it is manual_bp's answer."""
    import manual_bp as bp
    from manual_bp.activations import softmax
    from oracle.twin import run_twin

    spec, params, x, y = rates.replay(CASES["softmax_bce_output_rounds_to_1_float32"])
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    y64 = y.astype(np.float64)
    ref = run_twin(spec, p64, x.astype(np.float64), y64, np.float64)
    assert 0 < 1 - ref.output[3, 5] < 2 * 2.0 ** -24                          # within 2 float32 ulps of 1
    assert ref.output[3, 5] * (1 - ref.output[3, 5]) > conventions.BCE_GUARD  # no guard in float64
    assert softmax(x @ params["layers.0.weight"].T + params["layers.0.bias"])[3, 5] == 1  # manual_bp's p₅
    assert run_twin(spec, params, x, y, np.float32).output[3, 5] < 1                   # torch's float32 p₅
    guards = conventions.find_guards(spec, ref, params, x, y, y64, np.float32)
    assert guards.mask[3, 5]
    alt = guards.deltas["float32, outputs near 1 taken as 1"][3]
    got = bp.gradients(spec, params, x, y).deltas["layers.0"][3].astype(np.float64)
    assert got[3] == pytest.approx(-787.11, rel=1e-4)
    assert np.abs(got - alt).max() <= 1e-5 * np.abs(alt).max()
def test_a_nonzero_delta_where_torch_has_slope_zero_takes_the_other_side():
    """Case 4's mechanism (float64): torch's relu slope is 0 on all three outputs, so its δ₇ is exactly 0, and the
    other side's δ at torch's values is 0 too at element 1 (σ(relu(z)) − ½ = 0 at torch's a = 0); manual_bp's δ₇[1]
    is not 0, which only the other side can give: the Adopter takes it there (and nowhere δ is 0)."""
    from oracle.checker import prepare, run_candidate
    from oracle.rounding import allowance
    from oracle.twin import run_twin

    spec, params, x, y, dt, _ = prepare(*rates.replay(CASES["tied_norm_relu_output_float64"]))
    ref = run_twin(spec, params, x, y, np.float64)
    assert not ref.deltas["layers.7"].any()
    guard = conventions.find_guards(spec, ref, params, x, y, y, dt)
    special = conventions.find(spec, ref, allowance(spec, params, x, y, ref, dt, guard=guard.mask), y, guard)
    assert special.kink[7].all()
    cand = run_candidate(oracle.mutants.CORRECT.grads_fn, spec, dict(params), x, y, dt)
    assert list(np.flatnonzero(cand.deltas["layers.7"])) == [1]
    adopter = conventions.Adopter(spec, ref, special, cand.deltas, {})
    run_twin(spec, params, x, y, np.float64, adopt=adopter)
    assert adopter.taken.get((7, "kink", "other")) == 1
