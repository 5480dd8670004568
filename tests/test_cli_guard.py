"""The verdict cannot be fooled: a candidate that exits, hangs, crashes or raises gets exit 1 and a
'crash' verdict (never exit 0, never a hang); replay runs only code the user names; bad numbers, a
closed pipe and a file-size limit give one line and exit 2 (or a quiet exit), never a traceback."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from oracle.cli import main

IMPLS = Path(__file__).parent / "impls"
HOSTILE = IMPLS / "hostile.py"
CANDIDATES = IMPLS / "candidates.py"
ROOT = Path(__file__).parent.parent


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def only_report(folder: Path) -> Path:
    found = [p for p in folder.rglob("report.json")]
    assert len(found) == 1, found
    return found[0]


def cli(*argv, shell_prefix="", stdin_pipe=""):
    """bp-oracle in a real process (through a shell when a prefix or a pipe is given)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = " ".join([f"{shell_prefix}exec" if shell_prefix else "", sys.executable, "-m", "oracle", *argv]).strip()
    return subprocess.run(["bash", "-c", cmd + stdin_pipe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


# -- a candidate that does not return is a crash verdict, exit 1 ---------------------------------------
def test_sys_exit_0_is_a_crash_verdict_not_a_pass(capsys, tmp_path):
    code, out, _ = run(capsys, "check", "--example", "seed-simple", "--impl", f"{HOSTILE}:exits_0", "--report", str(tmp_path))
    assert code == 1
    assert "CANDIDATE CRASHED" in out and "sys.exit(0)" in out
    report = json.loads(only_report(tmp_path).read_text())
    assert report["passed"] is False and report["classification"] == "crash"
    assert report["crash"]["kind"] == "exit" and "hostile.py" in report["crash"]["traceback"]
    assert report["impl"] == f"{HOSTILE.resolve()}:exits_0"  # absolute: replay works from anywhere


def test_os_exit_0_is_a_crash_verdict_in_a_real_process():
    done = cli("check", "--example", "seed-simple", "--impl", f"{HOSTILE}:os_exits_0", "--no-report")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "CANDIDATE CRASHED" in done.stdout and "exit status 0" in done.stdout


def test_os_exit_0_in_process(capsys):
    code, out, _ = run(capsys, "check", "--example", "seed-simple", "--impl", f"{HOSTILE}:os_exits_0", "--no-report")
    assert code == 1 and "os._exit(0)" in out


def test_a_candidate_that_never_returns_times_out(capsys):
    start = time.monotonic()
    code, out, _ = run(capsys, "check", "--example", "seed-simple", "--impl", f"{HOSTILE}:sleeps_forever",
                       "--timeout", "2", "--no-report")
    elapsed = time.monotonic() - start
    assert code == 1 and "did not return within 2 s" in out
    assert "sleeps_forever" in out  # where it was stuck (faulthandler), its own frame
    assert elapsed < 15, elapsed


def test_a_segfault_is_killed_by_a_named_signal(capsys):
    code, out, _ = run(capsys, "check", "--example", "seed-simple", "--impl", f"{HOSTILE}:segfaults", "--no-report")
    assert code == 1 and "killed by signal SIGSEGV" in out
    assert "hostile.py" in out and "segfaults" in out


def test_a_raising_candidate_shows_its_own_traceback_not_ours(capsys):
    code, out, _ = run(capsys, "check", "--example", "seed-simple", "--impl", f"{HOSTILE}:raises_deep", "--no-report")
    assert code == 1 and "raised ZeroDivisionError" in out
    assert "_inner_helper" in out and "hostile.py" in out
    assert "isolate.py" not in out and "checker.py" not in out and "cli.py" not in out


def test_unusable_answers_are_still_bad_input_with_the_usual_message(capsys):
    code, _, err = run(capsys, "check", "--example", "seed-nielsen", "--impl", f"{HOSTILE}:returns_a_list", "--no-report")
    assert code == 2 and "returned layers.0.weight as a list" in err and err.count("\n") == 1
    code, _, err = run(capsys, "check", "--example", "seed-nielsen", "--impl", f"{HOSTILE}:returns_a_string", "--no-report")
    assert code == 2 and "returned a str" in err


def test_a_printed_fake_verdict_does_not_change_the_exit_code(capsys):
    code, out, _ = run(capsys, "check", "--example", "seed-nielsen", "--impl", f"{HOSTILE}:prints_a_fake_verdict", "--no-report")
    assert code == 1 and out.startswith("GRADIENT MISMATCH")  # the candidate's print went to stderr, not our stdout


def test_file_impl_imports_modules_beside_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(IMPLS / "pkg_sibling" / "cand.py", tmp_path)
    code, out, _ = run(capsys, "check", "--example", "seed-nielsen", "--impl", f"{rel}:grads", "--report", "r")
    assert code == 0 and "gradients match" in out, out
    report_json = only_report(tmp_path / "r")
    report = json.loads(report_json.read_text())
    assert report["impl"] == f"{(IMPLS / 'pkg_sibling' / 'cand.py').resolve()}:grads"
    monkeypatch.chdir(ROOT)  # replay from another folder, running the recorded implementation on request
    code, out, _ = run(capsys, "replay", str(report_json), "--trust-recorded-impl")
    assert code == 0 and "importing file" in out and "cand.py" in out and "Same verdict" in out


# -- fuzz: a crash is a failure like any other --------------------------------------------------------
def test_fuzz_with_a_raising_candidate_reports_the_shrunk_crash(capsys, tmp_path):
    code, out, err = run(capsys, "fuzz", "--examples", "5", "--impl", f"{CANDIDATES}:raises", "--report", str(tmp_path),
                         "--dtype", "float64")
    assert code == 1
    assert "ExceptionGroup" not in out + err and "Examples run:" in out
    assert "raised ZeroDivisionError: my bug" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    folder = Path(summary["failure"]["report"])
    assert "--impl" in summary["failure"]["replay"]
    report = json.loads((folder / "report.json").read_text())
    assert report["classification"] == "crash" and report["crash"]["kind"] == "raised"
    assert len(report["spec"]["layers"]) == 1
    code, out, _ = run(capsys, "replay", str(folder / "report.json"), "--impl", f"{CANDIDATES}:raises")
    assert code == 1 and "Same verdict" in out


def test_fuzz_shrinks_an_exiting_candidate_to_the_smallest_net_that_exits(capsys, tmp_path):
    code, out, err = run(capsys, "fuzz", "--examples", "40", "--impl", f"{HOSTILE}:exits_on_deep_nets",
                         "--report", str(tmp_path), "--dtype", "float64")
    assert code == 1 and "ExceptionGroup" not in out + err and "sys.exit(0)" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    report = json.loads((Path(summary["failure"]["report"]) / "report.json").read_text())
    assert len(report["spec"]["layers"]) == 3


# -- replay runs only code the user names --------------------------------------------------------------
def _recorded(capsys, tmp_path, impl=None, example="seed-nielsen"):
    argv = ["check", "--example", example, "--report", str(tmp_path / "r"), "--seed", "3"]
    if impl:
        argv += ["--impl", impl]
    run(capsys, *argv)
    return only_report(tmp_path / "r")


def test_replay_does_not_import_a_tampered_impl(capsys, tmp_path):
    report_json = _recorded(capsys, tmp_path)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef grads(spec, params, x, y):\n    raise SystemExit(0)\n")
    report = json.loads(report_json.read_text())
    report["impl"] = f"{evil}:grads"
    report_json.write_text(json.dumps(report))
    code, out, _ = run(capsys, "replay", str(report_json))
    assert code == 0 and not marker.exists()
    assert "Replayed with manual_bp" in out and "evil.py" in out
    code, out, _ = run(capsys, "replay", str(report_json), "--trust-recorded-impl")  # the user opts in, told what runs
    assert f"importing file {evil}" in out and marker.exists() and code == 1


def test_replay_runs_the_impl_named_on_its_command_line(capsys, tmp_path):
    report_json = _recorded(capsys, tmp_path, impl=f"{CANDIDATES}:doubled_first_weight")
    assert "--impl" in json.loads(report_json.read_text())["replay"]
    code, out, _ = run(capsys, "replay", str(report_json), "--impl", f"{CANDIDATES}:doubled_first_weight")
    assert code == 1 and "Same verdict" in out
    code, out, _ = run(capsys, "replay", str(report_json))  # manual_bp by default
    assert code == 0 and "verdicts are not compared" in out


def _refused(capsys, report_json, words, *extra):
    code, out, err = run(capsys, "replay", str(report_json), *extra)
    assert code == 2, (out, err)
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_replay_refuses_other_schema_versions_tampered_cases_and_broken_specs(capsys, tmp_path):
    report_json = _recorded(capsys, tmp_path)
    original = report_json.read_text()
    report = json.loads(original)
    assert len(report.get("case_sha256") or "") == 64
    report_json.write_text(json.dumps({**report, "schema_version": 2}))
    _refused(capsys, report_json, "schema_version 2 is not supported")
    report_json.write_text(json.dumps({**report, "spec": {"format_version": 1, "layers": "nope"}}))
    _refused(capsys, report_json, "its spec does not parse")
    deep = json.dumps({**report, "spec": "DEEP"}).replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
    report_json.write_text(deep)
    _refused(capsys, report_json, "not a JSON report")
    report_json.write_text(original)
    case_path = report_json.parent / "case.npz"
    with np.load(case_path) as case:
        arrays = {k: case[k] for k in case.files}
    arrays["x"] = arrays["x"] + 1
    np.savez(case_path, **arrays)
    _refused(capsys, report_json, "case.npz")
    without = {k: v for k, v in report.items() if k != "case_sha256"}  # an older report: no digest, no check
    report_json.write_text(json.dumps(without))
    code, _, _ = run(capsys, "replay", str(report_json))
    assert code in (0, 1)


# -- bad input: one line, exit 2; a closed pipe: quiet ------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["check", "--example", "seed-simple", "--seed", "-1"], "--seed: -1 is out of range"),
    (["check", "--example", "seed-simple", "--seed", str(2**32)], "--seed"),
    (["fuzz", "--seed", "-1"], "--seed"),
    (["check", "--example", "seed-simple", "--timeout", "0"], "--timeout"),
    (["fuzz", "--timeout", "nan"], "--timeout"),
    (["check", "--example", "seed-simple", "--impl", f"{HOSTILE}"], "no ':function' part"),
    (["replay", "nowhere/report.json", "--impl", "x:y", "--trust-recorded-impl"], "cannot be combined"),
])
def test_bad_numbers_exit_2_with_one_line(capsys, tmp_path, argv, words):
    code, out, err = run(capsys, *argv, *(["--no-report"] if argv[0] != "replay" else []))
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_deeply_nested_spec_json_is_one_line(capsys, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = run(capsys, "check", str(path), "--no-report")
    assert code == 2 and err.startswith("bp-oracle: error:") and err.count("\n") == 1


def test_a_closed_pipe_gives_no_traceback():
    # `| true` closes the pipe before bp-oracle writes (it imports torch first): a sure EPIPE
    done = cli("check", "--example", "seed-simple", "--no-report", stdin_pipe=" | true; exit ${PIPESTATUS[0]}")
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)
    done = cli("examples", stdin_pipe=" | head -c 10; exit ${PIPESTATUS[0]}")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode in (0, 141)


def test_a_file_size_limit_is_a_one_line_report_error(tmp_path):
    done = cli("check", "--example", "seed-nielsen", "--report", str(tmp_path), shell_prefix="ulimit -f 16; ")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("bp-oracle: error: --report") and done.stderr.count("\n") == 1


def test_the_default_report_folder_is_git_ignored(tmp_path):
    from oracle.cli import build_parser

    args = build_parser().parse_args(["check", "--example", "seed-simple"])
    assert args.report == "reports/runs"
    assert build_parser().parse_args(["fuzz"]).report == "reports/runs"
    assert "/reports/runs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_module_that_exits_or_crashes_while_imported_is_bad_input(capsys, tmp_path):
    for body, words in (("import sys\nsys.exit(0)\n", "called sys.exit(0) while being imported"),
                        ("import os\nos._exit(0)\n", "ended the worker process (exit status 0"),
                        ("import ctypes\nctypes.string_at(0)\n", "killed by signal SIGSEGV")):
        path = tmp_path / "at_import.py"
        path.write_text(body)
        code, out, err = run(capsys, "check", "--example", "seed-simple", "--impl", f"{path}:f", "--no-report")
        assert code == 2 and words in err and err.count("\n") == 1 and out == "", (body, err)
