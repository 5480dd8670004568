"""Golden reference cases (``bp-oracle golden``) and their verification without torch (``bp-oracle verify``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import manual_bp as bp
from oracle import caseio, golden
from oracle.cli import main


def _golden(out: Path, *args) -> Path:
    assert main(["golden", "--out", str(out), *args]) == 0
    return out


def _cases(g: Path) -> list[dict]:
    return json.loads((g / "manifest.json").read_text(encoding="utf-8"))["cases"]


def _copy_expected(g: Path, results: Path) -> Path:
    """A port whose answer is exactly the golden expected values (float64, every δ, z and a)."""
    for c in _cases(g):
        (results / c["name"]).mkdir(parents=True)
        shutil.copy(g / c["name"] / "expected.safetensors", results / c["name"] / "outputs.safetensors")
    return results


def _manual_bp(g: Path, results: Path, fmt="safetensors") -> Path:
    """manual_bp's own answers, computed in each case's dtype, in the layout's names."""
    for c in _cases(g):
        spec, params, x, y, meta = caseio.read_case(g / c["name"])
        r = bp.gradients(spec, params, x, y)
        golden.write_outputs(results / c["name"], golden.answer_tensors(r.loss, r.grads, r.deltas, r.grad_input),
                             formats=(fmt,))
    return results


def _verify(capsys, g, results, *extra) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["verify", str(g), str(results), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _row(text: str, case: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(case + " "))


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    return _golden(tmp_path_factory.mktemp("g") / "golden", "--example", "lenet", "--example", "lstm-tagger")


@pytest.fixture(scope="module")
def randoms(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("r")
    return (_golden(base / "one", "--random", "6", "--seed", "1"), _golden(base / "two", "--random", "6", "--seed", "1"))


def test_the_set_holds_both_dtypes_with_a_manifest_of_hashes(examples):
    cases = _cases(examples)
    assert [c["name"] for c in cases] == ["lenet-float64", "lenet-float32", "lstm-tagger-float64", "lstm-tagger-float32"]
    manifest = json.loads((examples / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["schema"] == "bp-oracle/golden" and set(manifest["versions"]) >= {"bp-oracle", "torch", "numpy"}
    for c in cases:
        assert set(c["files"]) == set(golden.CASE_FILES)
        for f, info in c["files"].items():
            assert golden.sha256_file(examples / c["name"] / f) == info["sha256"]
        meta = json.loads((examples / c["name"] / "case.json").read_text(encoding="utf-8"))
        assert meta["tolerance"]["scale_S"] > 0 and "rounding_factor·Bᵢ" in meta["tolerance"]["rule"]
        assert meta["loss"]["name"] == "cross_entropy" and "m'" in meta["loss"]["reduction"]
    lstm = json.loads((examples / "lstm-tagger-float64" / "case.json").read_text(encoding="utf-8"))
    assert "i, f, g, o" in lstm["layouts"]["layers.0.weight_ih_l0"]
    lenet = json.loads((examples / "lenet-float64" / "case.json").read_text(encoding="utf-8"))
    assert "(out, in/groups, kH, kW)" in lenet["layouts"]["layers.0.weight"]
    assert not list(examples.parent.glob(".golden*"))  # the temporary folder was renamed into place


def test_float32_cases_carry_float32_inputs_and_float64_expected(examples):
    spec, params, x, y, meta = caseio.read_case(examples / "lenet-float32")
    assert meta["dtype"] == "float32" and x.dtype == np.float32 and y.dtype == np.int64
    assert all(v.dtype == np.float32 for v in params.values())
    expected = caseio.read_tensors(examples / "lenet-float32", "expected", "expected")
    assert all(v.dtype == np.float64 for v in expected.values())
    assert {"loss", "grad.layers.0.weight", "delta.layers.7", "input.grad", "z.layers.0", "a.layers.7"} <= set(expected)
    assert expected["loss"].shape == ()
    # torch in float64 on the float32 values: the float64 case's values differ from the float32 case's inputs
    _, params64, x64, _, _ = caseio.read_case(examples / "lenet-float64")
    assert np.array_equal(x64.astype(np.float32), x)
    # both files hold the same tensors
    from_npz = dict(np.load(examples / "lenet-float32" / "expected.npz", allow_pickle=False))
    assert all(np.array_equal(from_npz[k], v) for k, v in expected.items())
    meta = json.loads((examples / "lenet-float32" / "case.json").read_text(encoding="utf-8"))
    assert meta["tolerance"]["rtol"] == 1e-5 and meta["tolerance"]["atol"] == 1e-6


def test_the_expected_values_as_outputs_pass(examples, tmp_path, capsys):
    code, out, _ = _verify(capsys, examples, _copy_expected(examples, tmp_path / "res"))
    assert code == 0, out
    assert "PASS: 4/4 cases pass" in out


def test_manual_bp_passes_in_both_dtypes(examples, randoms, tmp_path, capsys):
    for g, name in [(examples, "ex"), (randoms[0], "rand")]:
        code, out, _ = _verify(capsys, g, _manual_bp(g, tmp_path / name, fmt="npz"))
        assert code == 0, out
        assert "float32" in out and "float64" in out and " bug " not in out


def test_a_doubled_gradient_fails_and_names_its_layer(examples, tmp_path, capsys):
    res = _copy_expected(examples, tmp_path / "res")
    folder = res / "lenet-float64"
    t = caseio.read_tensors(folder, "outputs", "outputs")
    t["grad.layers.5.weight"] = 2 * t["grad.layers.5.weight"]
    golden.write_outputs(folder, t)
    code, out, _ = _verify(capsys, examples, res, "--report", str(tmp_path / "rep"))
    assert code == 1
    row = _row(out, "lenet-float64")
    assert " bug " in row and "layers.5" in row and "layers.5.weight" in row
    assert " match " in _row(out, "lenet-float32")
    assert "FAIL: 3/4 cases pass" in out
    md = (tmp_path / "rep" / "verify.md").read_text(encoding="utf-8")
    assert "❌ bug | layers.5" in md and "constant ratio candidate/torch = 2" in md
    doc = json.loads((tmp_path / "rep" / "verify.json").read_text(encoding="utf-8"))
    bad = next(c for c in doc["cases"] if c["name"] == "lenet-float64")
    assert bad["first_divergent"] == "layers.5" and not doc["passed"]
    assert (Path(bad["report"]) / "report.html").is_file()


def test_a_forward_bug_is_named_node_by_node(examples, tmp_path, capsys):
    res = _copy_expected(examples, tmp_path / "res")
    folder = res / "lenet-float32"
    t = caseio.read_tensors(folder, "outputs", "outputs")
    t["z.layers.2"] = t["z.layers.2"] * 1.001  # and every later z, a and gradient as they are
    golden.write_outputs(folder, t)
    code, out, _ = _verify(capsys, examples, res)
    assert code == 1
    row = _row(out, "lenet-float32")
    assert " forward " in row and "layers.2" in row
    assert "z of layer 2 (layers.2) is the first forward tensor to differ" in out


def test_missing_outputs_are_a_failure_not_bad_input(examples, tmp_path, capsys):
    res = _copy_expected(examples, tmp_path / "res")
    shutil.rmtree(res / "lstm-tagger-float32")
    code, out, _ = _verify(capsys, examples, res)
    assert code == 1
    assert "no outputs" in _row(out, "lstm-tagger-float32")


def test_malformed_outputs_are_a_failure(examples, tmp_path, capsys):
    res = _copy_expected(examples, tmp_path / "res")
    t = caseio.read_tensors(res / "lenet-float64", "outputs", "outputs")
    t["grad.layers.0.wieght"] = t.pop("grad.layers.0.weight")
    golden.write_outputs(res / "lenet-float64", t)
    t = caseio.read_tensors(res / "lstm-tagger-float64", "outputs", "outputs")
    t["grad.layers.1.weight"] = t["grad.layers.1.weight"].T.copy()
    golden.write_outputs(res / "lstm-tagger-float64", t)
    code, out, _ = _verify(capsys, examples, res)
    assert code == 1
    assert "bad outputs" in _row(out, "lenet-float64") and "wieght" in out
    assert "bad outputs" in _row(out, "lstm-tagger-float64") and "shape" in out


def test_a_changed_golden_file_is_refused_naming_it(examples, tmp_path, capsys):
    g = tmp_path / "golden"
    shutil.copytree(examples, g)
    target = g / "lenet-float32" / "allowance.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    code, out, err = _verify(capsys, g, _copy_expected(examples, tmp_path / "res"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(target) in err and "sha256" in err


def test_bad_verify_input_is_exit_2(examples, tmp_path, capsys):
    code, _, err = _verify(capsys, examples, tmp_path / "nowhere")
    assert code == 2 and "RESULTS_DIR" in err
    code, _, err = _verify(capsys, tmp_path, tmp_path)
    assert code == 2 and "manifest.json" in err


def test_random_sets_are_reproducible_and_cover_many_layer_types(randoms):
    one, two = randoms
    assert (one / "manifest.json").read_bytes() == (two / "manifest.json").read_bytes()
    cases = _cases(one)
    assert [c["name"] for c in cases[:2]] == ["random-0000-float64", "random-0000-float32"]
    assert len({c["source"]["family"] for c in cases}) == 6
    assert all(c["describe"] != "1 -> 1 identity (no bias), half_sse" for c in cases)


def test_out_must_be_new_or_empty_unless_forced(examples, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["golden", "--out", str(tmp_path / "full"), "--example", "seed-simple"]) == 2
    assert main(["golden", "--out", str(tmp_path / "full"), "--example", "seed-simple", "--force"]) == 2
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"  # --force replaces only a golden set
    g = _golden(tmp_path / "g", "--example", "seed-simple", "--dtype", "float32")
    assert [c["name"] for c in _cases(g)] == ["seed-simple-float32"]
    assert main(["golden", "--out", str(g), "--example", "seed-sse", "--dtype", "float64"]) == 2
    _golden(g, "--example", "seed-sse", "--dtype", "float64", "--force")
    assert [c["name"] for c in _cases(g)] == ["seed-sse-float64"]
    assert sorted(p.name for p in g.iterdir()) == ["manifest.json", "seed-sse-float64"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "g"]
    err = capsys.readouterr().err
    assert "--out" in err and "--force" in err


def test_each_compared_tensor_records_the_scale_of_its_kind(examples):
    """δ on S_δ (the largest |expected δ| of the case), parameter gradients on S_θ (the largest |expected ∂C/∂θ|),
    ∂C/∂x on their maximum, computed here from the expected arrays themselves."""
    for case in ("lenet-float64", "lstm-tagger-float64"):
        meta = json.loads((examples / case / "case.json").read_text(encoding="utf-8"))
        expected = caseio.read_tensors(examples / case, "expected", "expected")
        s_delta = max(float(np.max(np.abs(v))) for k, v in expected.items() if k.startswith("delta."))
        s_theta = max(float(np.max(np.abs(v))) for k, v in expected.items() if k.startswith("grad."))
        assert s_delta != s_theta  # the premise: the two kinds differ here
        for key, entry in meta["compare"].items():
            if key.startswith("delta."):
                assert entry["scale"] == pytest.approx(s_delta, rel=1e-12), key
            elif key.startswith("grad."):
                assert entry["scale"] == pytest.approx(s_theta, rel=1e-12), key
            elif key == "input.grad":
                assert entry["scale"] == pytest.approx(max(s_delta, s_theta), rel=1e-12)
