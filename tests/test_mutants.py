"""The fault catalogue: every bug mutant is killed, localized, diagnosed; the kink mutant is a kink."""

import numpy as np
import pytest

from oracle.diagnose import hints
from oracle.mutants import CATALOGUE, run_catalogue

BUDGET = 60  # examples per mutant: the hardest needs a handful; the correct implementation gets all 60


@pytest.fixture(scope="module")
def catalogue():
    return run_catalogue(examples=BUDGET, seed=0)


def test_catalogue_has_the_seed_mistakes_and_at_least_25_mutants():
    names = [m.name for m in CATALOGUE]
    assert len([m for m in CATALOGUE if m.kind == "bug"]) >= 25
    assert {m.seed_ref for m in CATALOGUE} >= {"E1", "E2", "E3", "E4", "E5", "E6"}
    assert len(set(names)) == len(names)


def test_every_bug_mutant_is_killed(catalogue):
    alive = [r["mutant"] for r in catalogue["rows"] if r["kind"] == "bug" and not r["killed"]]
    assert not alive and catalogue["killed"] == catalogue["total"]


def test_localization_is_correct_for_at_least_90_percent(catalogue):
    assert catalogue["localization_correct"] >= 0.9 * catalogue["total"], [
        (r["mutant"], r["declared_layer"], r["reported_layer"]) for r in catalogue["rows"] if r["localization_correct"] is False]


def test_kink_mutant_is_classified_as_kink_never_as_bug(catalogue):
    row = next(r for r in catalogue["rows"] if r["kind"] == "kink")
    assert row["killed"] and row["classification"] == "kink"


def test_correct_implementation_is_never_flagged(catalogue):
    assert not catalogue["correct_flagged"] and catalogue["correct_examples"] == BUDGET


@pytest.mark.parametrize("mutant,words", [
    ("missing_half", "a missing ½"), ("sign_flip", "sign is flipped"), ("missing_one_over_m", "a missing 1/m"),
    ("weights_averaged", "a spurious 1/m"), ("weight_grad_transposed", "transposed"),
])
def test_diagnosis_names_the_mistake(catalogue, mutant, words):
    row = next(r for r in catalogue["rows"] if r["mutant"] == mutant)
    assert words in row["diagnosis"], row


def test_hints_on_synthetic_arrays():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 4))
    assert any("transposed" in h for h in hints("layers.0.weight", ref.T, ref, batch=4))
    assert any("zero everywhere" in h for h in hints("layers.0.weight", np.zeros_like(ref), ref, batch=4))
    assert any("m = 4" in h for h in hints("layers.0.weight", 4 * ref, ref, batch=4))
    wrong_row = ref.copy()
    wrong_row[2] += 1
    assert any("batch row 2" in h for h in hints("layers.0.delta", wrong_row, ref, batch=4))
    first_only = np.zeros_like(ref)
    first_only[0] = ref[0]
    assert any("only batch row 0" in h for h in hints("layers.0.delta", first_only, ref, batch=4))
    other = rng.normal(size=(4, 4))
    assert any("layers.1.weight" in h for h in hints("layers.0.weight", other, ref, batch=4, others={"layers.1.weight": other}))
    kink = np.zeros_like(ref, dtype=bool)
    kink[1, 1] = True
    off = ref.copy()
    off[1, 1] += 1
    assert any("kink" in h for h in hints("layers.0.delta", off, ref, batch=4, kink_mask=kink))
    assert hints("layers.0.weight", ref, ref, batch=4) == []


# -- the exact_kinks regime ------------------------------------------------------------------------
def test_exact_kinks_regime_puts_z_on_kinks_exactly_with_ties():
    from hypothesis import Phase, find, settings

    import manual_bp as bp
    from oracle.strategies import REGIMES, cases, draw_data, draw_params

    assert "exact_kinks" in REGIMES and "near_kinks" in REGIMES
    quick = settings(phases=[Phase.generate], database=None, max_examples=200)
    assert find(cases(), lambda c: c.regime == "exact_kinks", settings=quick).regime == "exact_kinks"  # drawn by default
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 4, "loss": "l1", "layers": [
        {"type": "dense", "units": 5, "activation": "relu", "bias": True},
        {"type": "dense", "units": 3, "activation": "hardtanh", "bias": True},
        {"type": "dense", "units": 2, "activation": "identity", "bias": True}]})
    zero_z = tied_units = tied_rows = zero_residual = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        params = draw_params(spec, rng, "exact_kinks")
        x, y = draw_data(spec, rng, "exact_kinks", 4)
        for arr in [x, y, *params.values()]:
            assert np.array_equal(2 * arr, np.round(2 * arr))  # integers and half-integers only
        assert all(not params[k].any() for k in params if k.endswith("bias"))
        cache = bp.forward(spec, params, x)
        zero_z += any((z == 0).any() for z in cache.z)
        w = params["layers.0.weight"]
        tied_units += any((w[i] == w[j]).all() for i in range(len(w)) for j in range(i))
        tied_rows += any((x[i] == x[j]).all() for i in range(len(x)) for j in range(i))
        zero_residual += bool((cache.output == y).any())
    assert zero_z >= 30 and tied_units >= 10 and tied_rows >= 10 and zero_residual >= 5, (zero_z, tied_units, tied_rows, zero_residual)
    cls = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": "bce", "layers": [
        {"type": "dense", "units": 2, "activation": "sigmoid"}]})
    _, y = draw_data(cls, np.random.default_rng(0), "exact_kinks", 8)
    assert set(np.unique(y)) <= {0.0, 0.5, 1.0}


# -- the mutants that act below the output layer -----------------------------------------------------
def _two_layer_relu_case():
    import manual_bp as bp

    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 2, "loss": "half_sse", "layers": [
        {"type": "dense", "units": 3, "activation": "relu", "bias": True},
        {"type": "dense", "units": 2, "activation": "identity", "bias": True}]})
    params = {"layers.0.weight": np.array([[1.0, -0.5], [-1.0, 0.25], [0.5, 0.5]]), "layers.0.bias": np.array([0.1, -0.2, 0.3]),
              "layers.1.weight": np.array([[0.5, -1.0, 0.25], [1.0, 0.5, -0.5]]), "layers.1.bias": np.array([0.0, 0.1])}
    x = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]])  # z_0 has negative elements in every column
    y = np.array([[0.2, -0.1], [0.4, 0.3], [-0.5, 0.6]])
    return spec, params, x, y


@pytest.mark.parametrize("name,tensor", [("bias_averaged_layer0", "bias"), ("relu_mask_dropped_layer0", "delta")])
def test_layer0_mutants_are_declared_at_layer_0_and_caught(name, tensor):
    import manual_bp as bp
    import oracle

    mutant = next(m for m in CATALOGUE if m.name == name)
    spec, params, x, y = _two_layer_relu_case()
    assert mutant.kind == "bug" and mutant.corrupts(spec, bp.forward(spec, params, x)) == (0, tensor)
    _, grads, deltas = mutant.grads_fn(spec, params, x, y)
    right = bp.gradients(spec, params, x, y)
    for key in ("layers.1.weight", "layers.1.bias", "layers.1"):  # the output layer is untouched
        np.testing.assert_array_equal({**grads, **deltas}[key], {**right.grads, **right.deltas}[key])
    result = oracle.check(spec, params, x, y, mutant.grads_fn)
    assert not result.passed and result.classification == "bug", result.message()
    assert result.first_divergent_layer == 0, result.localization


def test_layer0_mutant_strategies_make_them_visible():
    from hypothesis import given, settings

    bias_mutant = next(m for m in CATALOGUE if m.name == "bias_averaged_layer0")
    relu_mutant = next(m for m in CATALOGUE if m.name == "relu_mask_dropped_layer0")

    @settings(max_examples=20)
    @given(bias_mutant.specs, relu_mutant.specs)
    def shapes(bias_spec, relu_spec):
        assert len(bias_spec.layers) >= 2 and bias_spec.layers[0].bias
        assert len(relu_spec.layers) >= 2 and relu_spec.layers[0].activation.name == "relu"

    shapes()


# -- detection rates and false alarms, at tiny size --------------------------------------------------
def test_detection_rates_run_reproducibly_and_return_the_documented_structure():
    from oracle.rates import detection_rates, rates_markdown, replay

    kw = dict(mutants=["bias_averaged_layer0", "sign_flip"], regimes=("well_conditioned", "exact_kinks"))
    result = detection_rates(2, 0, **kw)
    assert result["schema"] == "bp-oracle/detection-rates" and result["per_cell"] == 2
    assert len(result["cells"]) == 2 * 2 * 2
    for cell in result["cells"]:
        assert {"mutant", "regime", "dtype", "drawn", "refused", "changed", "detected", "missed", "rate", "verdicts",
                "first_missed", "seconds"} <= set(cell)
        assert cell["drawn"] == 2 and 0 <= cell["detected"] <= cell["changed"] <= cell["drawn"] - cell["refused"]
        assert cell["rate"] == (cell["detected"] / cell["changed"] if cell["changed"] else None)
        if cell["first_missed"]:
            spec, params, x, y = replay(cell["first_missed"])
            assert x.dtype == np.dtype(cell["dtype"])
    assert set(result["controls"]) == {"correct", "relu_prime_at_zero_is_one"}
    assert all(c["checks"] == 2 * 2 * 2 * 2 for c in result["controls"].values())
    assert isinstance(result["passed"], bool) and isinstance(result["below_threshold"], list)
    assert set(result["summary"]) == {"well_conditioned", "exact_kinks"}
    assert result["summary"]["exact_kinks"]["float64"]["changed"] == sum(
        c["changed"] for c in result["cells"] if c["regime"] == "exact_kinks" and c["dtype"] == "float64")
    again = detection_rates(2, 0, controls=False, **kw)
    strip = lambda r: [{k: v for k, v in c.items() if k != "seconds"} for c in r["cells"]]  # noqa: E731
    assert strip(again) == strip(result)  # the same draws and verdicts from the same seed
    md = rates_markdown(result)
    assert md.startswith("## Detection rate ≥ 99% in every cell: ") and "| `sign_flip` | exact_kinks | float32 |" in md


def test_false_alarms_run_and_return_the_documented_structure():
    import json

    from oracle.rates import false_alarms, rates_markdown

    result = false_alarms(3, 0)
    assert result["schema"] == "bp-oracle/false-alarms"
    assert set(result["impls"]) == {"manual_bp", "second_correct"}
    for per in result["impls"].values():
        assert set(per) == {"float64", "float32"}
        for entry in per.values():
            assert entry["checks"] == 3 and sum(entry["classifications"].values()) == 3
            assert entry["false_alarms"] == sum(v for k, v in entry["classifications"].items()
                                                if k not in ("match", "rounding", "kink", "convention"))
            for ex in entry["examples"]:
                assert {"spec", "regime", "dtype", "data_seed", "batch", "classification", "message"} <= set(ex)
    json.dumps(result)
    md = rates_markdown({"false_alarms": result})
    assert md.startswith("## False alarms of correct implementations: ")


def test_a_case_the_oracle_refuses_is_not_a_verdict():
    import manual_bp as bp
    from oracle.rates import verdict

    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 2, "loss": "half_sse", "layers": [
        {"type": "dense", "units": 2, "activation": "identity", "bias": False}]})
    huge = {"layers.0.weight": np.full((2, 2), 1e20, dtype=np.float32)}  # z = 2e40 overflows float32
    x, y = np.full((1, 2), 1e20, dtype=np.float32), np.zeros((1, 2), dtype=np.float32)
    assert verdict(spec, huge, x, y, bp.gradients)[:2] == ("refused", None)
    fine = {"layers.0.weight": np.eye(2)}
    assert verdict(spec, fine, np.ones((1, 2)), np.zeros((1, 2)), bp.gradients)[:2] == ("match", True)


def test_a_change_that_float32_arithmetic_wipes_out_is_not_counted_in_a_float32_cell():
    """tanh′(10) ≈ 8e-9 in float64, exactly 0 in float32 (tanh(10) rounds to 1): a flipped sign changes the
    float64 gradient but not the float32 one, where it and the correct backward both return zeros."""
    import manual_bp as bp
    from oracle.rates import changes_something

    sign_flip = next(m for m in CATALOGUE if m.name == "sign_flip")
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 1, "loss": "half_sse",
                              "layers": [{"type": "dense", "units": 1, "activation": "tanh"}]})
    for dtype, counted in (("float64", True), ("float32", False)):
        params = {"layers.0.weight": np.array([[10.0]], dtype=dtype), "layers.0.bias": np.zeros(1, dtype=dtype)}
        x, y = np.ones((1, 1), dtype=dtype), np.full((1, 1), 0.5, dtype=dtype)
        assert changes_something(sign_flip, spec, params, x, y, dtype) is counted


def test_a_valid_slope_at_exact_kinks_of_some_layers_only_is_not_counted():
    """2 -> 1 relu -> 2 selu with every weight of layer 0 zero: z₀ = 0 and z₁ = 0 exactly. Dropping the ReLU mask at
    layer 0 takes relu′(0) = 1 there and selu's torch slope at layer 1, a valid combination no oracle may fail; the
    same mistake is counted where some z₀ < 0, where relu′ = 0 is not a choice."""
    import manual_bp as bp
    from oracle.rates import changes_something

    dropped = next(m for m in CATALOGUE if m.name == "relu_mask_dropped_layer0")
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 2, "loss": "half_sse", "layers": [
        {"type": "dense", "units": 1, "activation": "relu", "bias": False},
        {"type": "dense", "units": 2, "activation": "selu", "bias": False}]})
    y = np.array([[0.0, 1.0]])
    on_kinks = {"layers.0.weight": np.zeros((1, 2)), "layers.1.weight": np.full((2, 1), -0.5)}
    assert changes_something(dropped, spec, on_kinks, np.zeros((1, 2)), y, "float64") is False
    below = {"layers.0.weight": np.array([[-1.0, 0.5]]), "layers.1.weight": np.full((2, 1), -0.5)}
    assert changes_something(dropped, spec, below, np.array([[1.0, 1.0]]), y, "float64") is True


def test_a_float32_change_within_torchs_own_float32_error_is_not_counted():
    """A saturated elu -> tanh net with an l1 loss (a detection run's case): torch's own float32 δ₀ errs by 3e-5 of
    the float64 truth, and the mutant (elu's α dropped) moves it by 2e-5; the same mistake on a well-conditioned
    draw moves it far beyond that and is counted."""
    import manual_bp as bp
    from oracle.rates import _as_triple, _distance, _torch_in, changes_something, replay

    info = {'spec': {'format_version': 1, 'name': '', 'description': '', 'input_size': 29, 'layers': [{'type': 'dense', 'units': 31, 'activation': {'name': 'elu', 'alpha': 1.5}, 'bias': True}, {'type': 'dense', 'units': 7, 'activation': 'tanh', 'bias': True}], 'loss': 'l1'}, 'regime': 'saturated', 'dtype': 'float32', 'batch': 6, 'data_seed': 235335859}  # noqa: E501
    dropped = next(m for m in CATALOGUE if m.name == "elu_alpha_dropped")
    spec, params, x, y = replay(info)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    truth = _as_triple(bp.gradients(spec, p64, x.astype(np.float64), y.astype(np.float64)))
    mutated = _as_triple(dropped.grads_fn(spec, p64, x.astype(np.float64), y.astype(np.float64)))
    own = _distance(_torch_in(spec, params, x, y, "float32"), truth)["layers.0"]
    moved = _distance(mutated, truth)["layers.0"]
    assert 0 < moved < own  # the premise: a change smaller than torch's own float32 error
    assert changes_something(dropped, spec, params, x, y, "float32") is False
    spec, params, x, y = replay({**info, "regime": "well_conditioned"})
    assert changes_something(dropped, spec, params, x, y, "float32") is True


def test_a_float64_change_within_torch_and_manual_bps_own_disagreement_is_not_counted():
    """A conv net whose second batch norm hands down a zero-mean gradient: the first batch norm's bias gradient
    Σδ cancels to 1e-9 of its terms, so torch and manual_bp (both correct, both float64) differ on it by 1e-6 of
    itself, more than the Bessel mutant moves it; the same mistake where nothing cancels is counted."""
    import manual_bp as bp
    from oracle.rates import _as_triple, _distance, _torch_in, build_case, changes_something

    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [2, 7, 10]}, "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": [1, 4], "stride": 3, "padding": 1, "dilation": 2,
         "activation": "relu", "bias": False},
        {"type": "conv2d", "out_channels": 3, "kernel_size": [1, 4], "stride": 3, "padding": 1, "dilation": [2, 1],
         "activation": "relu", "bias": False},
        {"type": "batch_norm", "affine": True, "activation": "softsign"},
        {"type": "batch_norm", "affine": False, "activation": "tanh"},
        {"type": "max_pool2d", "kernel_size": [3, 1], "stride": [3, 1], "padding": [1, 0]},
        {"type": "flatten"}, {"type": "dense", "units": 8, "activation": "log_softmax", "bias": False}], "loss": "nll"})
    bessel = next(m for m in CATALOGUE if m.name == "batch_norm_bessel_in_backward_only")
    params, x, y = build_case(spec, "near_zero", "float64", 6, 2099694712)
    truth = _as_triple(bp.gradients(spec, params, x, y))
    moved = _distance(_as_triple(bessel.grads_fn(spec, params, x, y)), truth)
    apart = _distance(_torch_in(spec, params, x, y, "float64"), truth)
    assert 0 < moved["layers.2.bias"] < apart["layers.2.bias"]  # the premise
    assert changes_something(bessel, spec, params, x, y, "float64") is False
    params, x, y = build_case(spec, "well_conditioned", "float64", 6, 2099694712)
    assert changes_something(bessel, spec, params, x, y, "float64") is True


def test_detection_rates_until_changed_and_in_workers_give_the_same_cells():
    """``until_changed`` stops a cell's draws once that many changed something; two worker processes measure the
    same cells, in the same order, as one."""
    from oracle.rates import detection_rates

    kw = dict(mutants=["sign_flip"], regimes=("well_conditioned", "saturated"), controls=True)
    one = detection_rates(6, 5, until_changed=2, **kw)
    for cell in one["cells"]:
        assert cell["changed"] <= 2 and (cell["changed"] == 2 or cell["drawn"] == 6)  # stopped at 2, or ran out
        assert cell["drawn"] == 6 or cell["changed"] == 2
    two = detection_rates(6, 5, until_changed=2, workers=2, **kw)
    strip = lambda r: [{k: v for k, v in c.items() if k != "seconds"} for c in r["cells"]]  # noqa: E731
    assert strip(two) == strip(one) and two["controls"] == one["controls"]
    assert one["until_changed"] == 2


def test_shortfall_chance_is_the_binomial_tail():
    """P(X ≤ d) for X ~ Binomial(n, 0.99), against closed forms: all detected is certain; one miss in 50 is seen
    whenever not all 50 are detected, 1 − 0.99⁵⁰; three misses in 28 is rare."""
    from math import comb

    from oracle.rates import shortfall_chance

    assert shortfall_chance(50, 50, 0.99) == pytest.approx(1.0)
    assert shortfall_chance(49, 50, 0.99) == pytest.approx(1 - 0.99 ** 50)
    exact = sum(comb(28, k) * 0.99 ** k * 0.01 ** (28 - k) for k in range(26))
    assert shortfall_chance(25, 28, 0.99) == pytest.approx(exact) and exact < 0.005
    assert shortfall_chance(0, 10, 0.99) == pytest.approx(0.01 ** 10)


def test_a_ratio_beyond_float64_is_no_constant_ratio_and_warns_nothing():
    """A candidate of ±1e300 against a reference of ±1e-10: the ratio overflows; no hint, and no RuntimeWarning
    (the suite turns warnings into errors)."""
    big = np.array([[1e300, -1e300]])
    assert not any("constant ratio" in h for h in hints("layers.0.weight", big, np.array([[1e-10, -1e-10]]), batch=4))
