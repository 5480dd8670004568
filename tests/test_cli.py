"""bp-oracle end to end: every subcommand, the reports, and each kind of bad input (exit 2, one line)."""

import json

import pytest
import subprocess
import sys
from pathlib import Path

import numpy as np

import manual_bp as bp
from oracle.cli import main

IMPLS = Path(__file__).parent / "impls" / "candidates.py"


def only_folder(parent, prefix):
    """The one report folder in ``parent`` whose name starts with ``prefix`` (names end in a case hash)."""
    found = [p for p in Path(parent).iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_fast_because_torch_is_not_imported():
    code = "import sys, oracle.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    done = subprocess.run([sys.executable, "-m", "oracle", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "replay" in done.stdout


def test_examples_lists_the_seed_specs(capsys):
    code, out, _ = run(capsys, "examples")
    assert code == 0
    for name in ("seed-simple", "seed-linear-regression", "seed-logistic-regression", "seed-sse"):
        assert name in out


def test_check_writes_all_four_report_files_and_replay_agrees(capsys, tmp_path):
    code, out, _ = run(capsys, "check", "--example", "seed-simple", "--report", str(tmp_path))
    assert code == 0 and "gradients match torch.autograd" in out
    folder = only_folder(tmp_path, "seed-simple-float64-seed0-manual_bp-")
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] is True and report["first_divergent_layer"] is None
    assert {t["name"] for t in report["tensors"]} >= {"layers.0.weight", "layers.2.delta", "input.grad"}
    for key in ("max_abs_err", "max_rel_err", "normwise_rel_err", "passed"):
        assert key in report["tensors"][0]
    assert report["versions"]["torch"] and report["replay"].startswith("bp-oracle replay")
    assert (folder / "report.md").read_text().startswith("## bp-oracle: PASS")
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    code, out, _ = run(capsys, "replay", str(folder / "report.json"))
    assert code == 0 and "Same verdict" in out


def test_a_wrong_impl_exits_1_and_its_report_replays_to_1(capsys, tmp_path):
    code, out, _ = run(capsys, "check", "--example", "seed-nielsen", "--impl", f"{IMPLS}:doubled_first_weight",
                       "--report", str(tmp_path), "--seed", "3")
    assert code == 1 and "layers.0.weight (layer 0)" in out
    report_json = only_folder(tmp_path, "seed-nielsen-float64-seed3-candidates.doubled_first_weight-") / "report.json"
    report = json.loads(report_json.read_text())
    assert report["passed"] is False and report["classification"] == "bug" and report["first_divergent_layer"] == 0
    code, out, _ = run(capsys, "replay", str(report_json), "--trust-recorded-impl")
    assert code == 1 and "Same verdict" in out


def test_module_impl_and_float32(capsys, tmp_path):
    sys.path.insert(0, str(IMPLS.parent))
    try:
        code, out, _ = run(capsys, "check", "--example", "seed-sse", "--impl", "candidates:correct",
                           "--dtype", "float32", "--no-report")
    finally:
        sys.path.remove(str(IMPLS.parent))
    assert code == 0 and "float32" in out


def test_html_escapes_user_strings(capsys, tmp_path):
    spec = bp.example("seed-simple").to_dict()
    spec["name"] = "evil"
    spec["description"] = "<script>alert(1)</script>"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(spec))
    code, _, _ = run(capsys, "check", str(path), "--report", str(tmp_path / "r"))
    html = (only_folder(tmp_path / "r", "evil-float64-seed0-") / "report.html").read_text()
    assert code == 0 and "<script>" not in html and "&lt;script&gt;" in html


def test_params_and_data_files_are_used(capsys, tmp_path):
    spec = bp.example("seed-nielsen")
    rng = np.random.default_rng(5)
    params = bp.init_params(spec, rng)
    x, y = bp.random_batch(spec, rng, batch=7)
    np.savez(tmp_path / "p.npz", **params)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, _, _ = run(capsys, "check", "--example", "seed-nielsen", "--params", str(tmp_path / "p.npz"),
                     "--data", str(tmp_path / "d.npz"), "--report", str(tmp_path / "r"))
    case = np.load(only_folder(tmp_path / "r", "seed-nielsen-float64-seed0-") / "case.npz")
    assert code == 0 and case["x"].shape == (7, 4) and np.array_equal(case["layers.1.bias"], params["layers.1.bias"])


def test_fuzz_campaign_passes_and_writes_its_summary(capsys, tmp_path):
    code, out, _ = run(capsys, "fuzz", "--examples", "15", "--report", str(tmp_path))
    assert code == 0 and "Examples run: 15" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    assert summary["examples"] == 15 and summary["failure"] is None and summary["coverage"]["depth"]


def test_fuzz_over_random_cnns_covers_the_conv_and_pool_layers(capsys, tmp_path):
    code, out, _ = run(capsys, "fuzz", "--examples", "15", "--nets", "cnn", "--report", str(tmp_path))
    assert code == 0 and "layer types:" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    assert summary["nets"] == "cnn" and {"conv1d", "conv2d"} & set(summary["coverage"]["layer"])
    assert "flatten" in summary["coverage"]["layer"] and summary["failure"] is None


@pytest.mark.parametrize("nets, types", [("norm", {"batch_norm", "layer_norm", "group_norm", "dropout"}), ("tokens", {"embedding"}), ("residual", {"residual"}), ("sequence", {"temporal_dense"})])
def test_fuzz_over_norm_and_token_nets_covers_their_layers(capsys, tmp_path, nets, types):
    code, out, _ = run(capsys, "fuzz", "--examples", "15", "--nets", nets, "--report", str(tmp_path))
    assert code == 0 and "layer types:" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    assert summary["nets"] == nets and types & set(summary["coverage"]["layer"]) and summary["failure"] is None


def test_fuzz_finds_shrinks_and_records_a_bug(capsys, tmp_path):
    code, out, _ = run(capsys, "fuzz", "--examples", "30", "--impl", f"{IMPLS}:doubled_first_weight",
                       "--report", str(tmp_path), "--dtype", "float64")
    assert code == 1 and "Shrunk failure written to" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    report = json.loads((Path(summary["failure"]["report"]) / "report.json").read_text())
    assert len(report["spec"]["layers"]) == 1  # shrunk to the smallest network that shows the bug
    code, out, _ = run(capsys, "replay", str(Path(summary["failure"]["report"]) / "report.json"), "--trust-recorded-impl")
    assert code == 1 and "Same verdict" in out


# -- bad input: exit 2, one clear line naming the problem, no traceback, no report --------------------
def _bad_inputs(tmp_path):
    spec_path = tmp_path / "net.json"
    spec_path.write_text(bp.example("seed-nielsen").to_json())
    (tmp_path / "broken.json").write_text('{"format_version": 1,')
    (tmp_path / "latin1.json").write_bytes(b'{"name": "r\xe9seau"}')
    unknown = bp.example("seed-nielsen").to_dict()
    unknown["colour"] = "red"
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    rng = np.random.default_rng(0)
    good = bp.init_params(bp.example("seed-nielsen"), rng)
    np.savez(tmp_path / "small.npz", **{**good, "layers.0.weight": np.zeros((2, 2))})
    np.savez(tmp_path / "nan.npz", **{**good, "layers.1.bias": np.array([np.nan, 0, 0])})
    np.savez(tmp_path / "inf_data.npz", x=np.array([[np.inf, 0, 0, 0]]), y=np.zeros((1, 2)))
    np.savez(tmp_path / "pickled.npz", **{**good, "layers.0.bias": np.array([object()] * 5, dtype=object)})
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly" / "seed-nielsen-float64-seed0").write_text("a file where the report folder would go")
    spec = str(spec_path)
    return [
        (["check", str(tmp_path / "broken.json")], "not valid JSON"),
        (["check", str(tmp_path / "latin1.json")], "not UTF-8"),
        (["check", str(tmp_path / "unknown.json")], "colour: unknown field"),
        (["check", str(tmp_path / "missing.json")], "cannot be read"),
        (["check", spec, "--params", str(tmp_path / "small.npz")], "has shape (2, 2) but the spec needs (5, 4)"),
        (["check", spec, "--params", str(tmp_path / "nan.npz")], "params['layers.1.bias']: holds nan"),
        (["check", spec, "--data", str(tmp_path / "inf_data.npz")], "x: holds inf"),
        (["check", spec, "--params", str(tmp_path / "pickled.npz")], "need pickle"),
        (["check", spec, "--impl", "no_such_module_xyz:f"], "does not import"),
        (["check", spec, "--impl", f"{IMPLS}:NOT_A_FUNCTION"], "is not callable"),
        (["check", spec, "--impl", f"{IMPLS}:nope"], "has no 'nope'"),
        (["check", spec, "--impl", f"{IMPLS}:wrong_keys"], "no gradient for 'layers.0.weight'"),
        (["check", spec, "--impl", f"{IMPLS}:wrong_shape"], "with shape (20,)"),
        (["check", spec, "--impl", f"{IMPLS}:wrong_dtype"], "as float32 for float64 inputs"),
        (["check", spec, "--report", str(tmp_path / "readonly" / "seed-nielsen-float64-seed0" / "x")], "--report"),
        (["replay", str(tmp_path / "broken.json")], "not a JSON report"),
        (["check"], "no spec given"),
    ]


def test_every_bad_input_exits_2_with_one_line(capsys, tmp_path):
    for argv, words in _bad_inputs(tmp_path):
        report_dir = tmp_path / "reports-should-stay-empty"
        extra = [] if "--report" in argv or argv[0] == "replay" else ["--report", str(report_dir)]
        code, out, err = run(capsys, *argv, *extra)
        assert code == 2, (argv, out, err)
        assert words in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert not report_dir.exists() or not any(report_dir.iterdir())


def test_a_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "broken.json").write_text("{")
    done = subprocess.run([sys.executable, "-m", "oracle", "check", str(tmp_path / "broken.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.startswith("bp-oracle: error:")


def test_rates_options_are_checked_before_any_work(capsys):
    for argv, words in ((["--workers", "0"], "--workers: must be at least 1"),
                        (["--until-changed", "0"], "--until-changed: must be at least 1"),
                        (["--per-cell", "0"], "--per-cell: must be at least 1"),
                        (["--mutants", "sign_flip", "no_such_mutant"], "no bug mutant is called no_such_mutant")):
        code, out, err = run(capsys, "rates", *argv)
        assert code == 2 and words in err and err.count("\n") == 1 and "detection" not in err, (argv, err)


def test_rates_for_one_mutant_with_until_changed_writes_its_table(capsys, tmp_path):
    code, out, err = run(capsys, "rates", "--mutants", "sign_flip", "--per-cell", "3", "--until-changed", "1",
                         "--false-alarms", "0", "--report", str(tmp_path))
    result = json.loads((tmp_path / "mutants" / "detection-rates.json").read_text())["detection"]
    assert result["until_changed"] == 1 and {c["mutant"] for c in result["cells"]} == {"sign_flip"}
    assert all(c["changed"] == 1 for c in result["cells"] if c["drawn"] < 3)
    assert code == (0 if result["passed"] else 1) and "until 1 changed something (at most 3)" in out
