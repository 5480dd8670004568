"""Many cases of one network judged together (oracle.batch): the batched reference is torch's per-case reference,
and every verdict is the one ``check`` gives case by case, passes and failures alike."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from manual_bp import Spec
from oracle.batch import batchable, check_many, references
from oracle.checker import check
from oracle.mutants import CATALOGUE
from oracle.rates import build_case
from oracle.strategies import REGIMES, fit_batch, per_step_specs, specs
from oracle.twin import run_twin

CHAINS = st.one_of(specs(max_depth=4, max_width=8), per_step_specs(norms=False))


def _cases(spec, n, batch, seed, dtype="float64"):
    batch = fit_batch(spec, batch)
    return [build_case(spec, REGIMES[(seed + i) % len(REGIMES)], dtype, batch, seed * 100 + i) for i in range(n)]


def _as64(case):
    params, x, y = case
    return ({k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64),
            y if y.dtype.kind in "iu" else y.astype(np.float64))


@settings(max_examples=25, deadline=None)
@given(spec=CHAINS, batch=st.integers(1, 5), seed=st.integers(0, 1000))
def test_batched_reference_is_torchs_reference_of_each_case(spec, batch, seed):
    assert batchable(spec)
    cases = [_as64(c) for c in _cases(spec, 5, batch, seed)]
    refs = references(spec, cases)
    assert refs is not None and len(refs) == len(cases)
    for case, got in zip(cases, refs):
        if got is None:  # some z within rounding of a kink: that case is left to run_twin (test below)
            continue
        want = run_twin(spec, *case, np.float64)
        scale = max(1.0, *(float(np.max(np.abs(g))) for g in [*want.grads.values(), *want.deltas.values()]))
        np.testing.assert_allclose(got.loss, want.loss, rtol=1e-10, atol=1e-300)
        for name in want.grads:
            np.testing.assert_allclose(got.grads[name], want.grads[name], rtol=1e-9, atol=1e-12 * scale, err_msg=name)
        for name in want.deltas:
            np.testing.assert_allclose(got.deltas[name], want.deltas[name], rtol=1e-9, atol=1e-12 * scale, err_msg=name)
        np.testing.assert_allclose(got.grad_input, want.grad_input, rtol=1e-9, atol=1e-12 * scale)
        for a, b in zip(got.upstream, want.upstream):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * scale)
        for a, b in zip(got.z, want.z):  # a sum that cancels may differ by its terms' rounding, in either order
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(b)))))


def _same_verdict(a, b):
    assert type(a) is type(b)
    if hasattr(a, "classification"):
        assert (a.passed, a.classification, a.first_divergent_layer) == (b.passed, b.classification, b.first_divergent_layer)
        assert [t.name for t in a.failed_tensors] == [t.name for t in b.failed_tensors]


#: the bug mutants of dense chains (every layer batchable on their specs), the seed's own mistakes among them
DENSE_BUGS = [m for m in CATALOGUE if m.kind == "bug" and (m.seed_ref or m.name.endswith("_layer0"))]


@pytest.mark.parametrize("mutant", DENSE_BUGS, ids=lambda m: m.name)
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_check_many_gives_checks_verdict_on_every_case_of_a_mutant(mutant, data):
    spec = data.draw(mutant.specs)
    if not batchable(spec):
        return
    cases = _cases(spec, 4, data.draw(st.integers(1, 4)), data.draw(st.integers(0, 99)),
                   data.draw(st.sampled_from(["float64", "float32"])))
    one = [check(spec, *c, mutant.grads_fn) for c in cases]
    for early in (False, True):
        for a, b in zip(check_many(spec, cases, mutant.grads_fn, early=early), one):
            _same_verdict(a, b)


def test_the_dense_mutants_are_there():
    assert len(DENSE_BUGS) >= 6


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_check_many_gives_checks_verdicts_on_correct_code_and_bugs(dtype):
    spec = Spec.from_dict({"format_version": 1, "input_size": 3, "loss": "mse", "layers": [
        {"type": "dense", "units": 4, "activation": "relu"}, {"type": "dense", "units": 2, "activation": "identity"}]})
    import manual_bp as bp

    def bias_mean(spec, params, x, y):  # bias gradient averaged over the batch
        loss, grads = bp.gradients(spec, params, x, y)[:2]
        grads = dict(grads)
        grads["layers.0.bias"] = grads["layers.0.bias"] / x.shape[0]
        return loss, grads

    def raises_sometimes(spec, params, x, y):
        if float(x[0, 0]) > 0:
            raise ValueError("positive input")
        return bp.gradients(spec, params, x, y)

    cases = _cases(spec, 12, 4, 3, dtype)
    for fn in (None, bias_mean, raises_sometimes):
        many = check_many(spec, cases, fn)
        one = [check(spec, *c, fn) for c in cases]
        for a, b in zip(many, one):
            _same_verdict(a, b)
    assert not all(r.passed for r in check_many(spec, cases, bias_mean))
    assert {r.classification for r in check_many(spec, cases, raises_sometimes)} >= {"crash"}


def test_networks_without_a_batched_twin_are_judged_one_by_one():
    spec = Spec.from_dict({"format_version": 2, "input": {"shape": [1, 5]}, "loss": "mse", "layers": [
        {"type": "conv1d", "out_channels": 2, "kernel_size": 2, "activation": "tanh"}, {"type": "flatten"},
        {"type": "dense", "units": 1, "activation": "identity"}]})
    assert not batchable(spec)
    cases = _cases(spec, 4, 3, 1)
    assert references(spec, [_as64(c) for c in cases]) is None
    for a, b in zip(check_many(spec, cases), [check(spec, *c) for c in cases]):
        _same_verdict(a, b)


def test_bad_cases_come_back_as_the_error_check_raises():
    spec = Spec.from_dict({"format_version": 1, "input_size": 2, "loss": "mse",
                           "layers": [{"type": "dense", "units": 1, "activation": "identity"}]})
    good = _cases(spec, 2, 2, 0)
    params, x, y = good[0]
    bad = ({**params, "layers.0.weight": np.full_like(params["layers.0.weight"], np.nan)}, x, y)
    out = check_many(spec, [good[0], bad, good[1]])
    assert out[0].passed and out[2].passed
    assert type(out[1]).__name__ == "SpecError" and "layers.0.weight" in str(out[1])


@settings(max_examples=15, deadline=None)
@given(spec=specs(max_depth=4, max_width=8), seed=st.integers(0, 1000), dtype=st.sampled_from(["float64", "float32"]))
def test_an_ensemble_cut_short_gives_the_same_verdicts(spec, seed, dtype):
    """Correct code in the regimes that need the rounding allowance (saturation, kinks, float32): the same verdict
    and classification whether the noise ensemble runs in full or stops at the first allowance that passes."""
    cases = _cases(spec, 4, 3, seed, dtype)
    for a, b in zip(check_many(spec, cases, early=True), [check(spec, *c) for c in cases]):
        _same_verdict(a, b)


def test_a_case_with_z_within_rounding_of_a_kink_is_left_to_run_twin():
    """Exact kinks: integer weights and inputs make z = 0 exactly in one summation order and ±1e-17 in another, and
    torch's relu slope there decides "match" or "kink". Such a case gets no batched reference; its neighbours do."""
    spec = Spec.from_dict({"format_version": 1, "input_size": 2, "loss": "mse", "layers": [
        {"type": "dense", "units": 2, "activation": "relu"}, {"type": "dense", "units": 1, "activation": "identity"}]})
    params = {"layers.0.weight": np.array([[1.0, -1.0], [0.5, 2.0]]), "layers.0.bias": np.zeros(2),
              "layers.1.weight": np.array([[1.0, 1.0]]), "layers.1.bias": np.zeros(1)}
    on_kink = (params, np.array([[3.0, 3.0]]), np.array([[1.0]]))        # z₀ = 0 in its first unit
    off_kink = (params, np.array([[3.0, 1.0]]), np.array([[1.0]]))
    refs = references(spec, [on_kink, off_kink])
    assert refs[0] is None and refs[1] is not None
    for a, b in zip(check_many(spec, [on_kink, off_kink]), [check(spec, *on_kink), check(spec, *off_kink)]):
        _same_verdict(a, b)
