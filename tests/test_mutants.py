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
