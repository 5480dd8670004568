"""``--impl exec:COMMAND``: any program as the candidate (oracle/execute.py), the JavaScript port in
examples/js-dense/ passing check and fuzz, a bug injected into a copy of it caught and localized, every way a
program can fail to answer judged ``crash`` (never a pass), and a Python program on conv and norm specs."""

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import manual_bp as bp
import oracle
from oracle.cli import main
from oracle.execute import ExecCandidate
from oracle.strategies import ELEMENTWISE, cases, specs

ROOT = Path(__file__).resolve().parent.parent
PORT = ROOT / "examples" / "js-dense" / "bp.js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not on PATH: the JavaScript port's tests need Node.js")

#: everything the JS port supports: dense layers, every elementwise activation (softmax/log_softmax on the output, as
#: specs() draws them) and every loss. Listed here so that a narrower port would narrow the tests in one place.
PORT_ACTIVATIONS = ELEMENTWISE
PORT_LOSSES = tuple(bp.LOSSES)

#: a small Python program in the exec protocol: reads the case with oracle.caseio, runs manual_bp, writes outputs.npz
MANUAL_BP_PROGRAM = """\
import sys
import numpy as np
import manual_bp as bp
from oracle.caseio import read_case

folder = sys.argv[1]
spec, params, x, y, meta = read_case(folder)
r = bp.gradients(spec, params, x, y)
out = {"loss": np.asarray(r.loss)}
out.update({f"grad.{k}": v for k, v in r.grads.items()})
out.update({f"delta.{k}": v for k, v in r.deltas.items()})
if r.grad_input is not None:
    out["input.grad"] = r.grad_input
np.savez(f"{folder}/outputs.npz", **out)
"""

#: writes a loss and a gradient under a name the case does not have
UNKNOWN_NAME_PROGRAM = """\
import sys
import numpy as np
np.savez(sys.argv[1] + "/outputs.npz", loss=np.float64(0.5), **{"grad.layers.7.weight": np.zeros((2, 2))})
"""


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Case folders go to a private temp dir, which must be empty again after every test (crashes included)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    left = [p.name for p in d.iterdir() if p.name.startswith("bp-oracle-exec-")]
    assert not left, f"case folders left behind: {left}"


def js(path=PORT) -> str:
    return f"exec:node {shlex.quote(str(path))}"


def py(script: Path) -> str:
    return f"exec:{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def bugged_port(tmp_path, old: str, new: str) -> Path:
    """A copy of bp.js with one line changed (the line must be there: the test fails loudly if bp.js moved on)."""
    text = PORT.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"bp.js no longer has {old!r}"
    path = tmp_path / "bp_bugged.js"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


DROPPED_SIGMA_PRIME = ("const D = activationBackward(net.layers[i].act, zs[i], acts[i + 1], GA); // δ_i = ∂C/∂z_i",
                       "const D = i === L - 1 ? activationBackward(net.layers[i].act, zs[i], acts[i + 1], GA) : GA; // BUG")
MISSING_TRANSPOSE = ("s += at(D, r, j) * at(W, j, k); // δ θ", "s += at(D, r, j) * at(W, k, j); // BUG: θ, not θᵀ")
SQUARE = bp.Spec.from_dict({"format_version": 1, "name": "square", "input_size": 3, "loss": "half_sse", "layers": [
    {"type": "dense", "units": 3, "activation": "tanh", "bias": True},
    {"type": "dense", "units": 3, "activation": "tanh", "bias": True},
    {"type": "dense", "units": 3, "activation": "identity", "bias": True}]})


# -- (a) the JavaScript port passes ----------------------------------------------------------------------------------
@needs_node
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_js_port_passes_check_on_the_seed_examples(capsys, dtype):
    for example in ("seed-simple", "seed-nielsen", "seed-logistic-regression"):
        code, out, _ = run(capsys, "check", "--example", example, "--impl", js(), "--dtype", dtype, "--no-report")
        assert code == 0 and "gradients match torch.autograd" in out, out


@needs_node
@settings(max_examples=20, deadline=None)
@given(cases(specs_strategy=specs(max_depth=4, max_width=8, max_input=8, activations=PORT_ACTIVATIONS,
                                  losses=PORT_LOSSES), dtypes=("float64", "float32")))
def test_js_port_passes_random_dense_specs(case):
    with ExecCandidate(js(), timeout=30) as port:
        result = oracle.check(case.spec, case.params, case.x, case.y, port)
    assert result.passed and result.classification != "crash", result.message()
    assert {t.name for t in result.tensors} >= {"layers.0.delta", "input.grad"}  # its δ and ∂C/∂x were judged too


@needs_node
def test_js_port_passes_a_fuzz_campaign(capsys, tmp_path):
    code, out, _ = run(capsys, "fuzz", "--nets", "dense", "--dtype", "both", "--examples", 30, "--seed", 3,
                       "--impl", js(), "--report", tmp_path)
    summary = json.loads((tmp_path / "fuzz-seed3" / "fuzz.json").read_text())
    assert code == 0, out
    assert summary["examples"] == 30 and summary["failure"] is None and summary["impl"] == js()


@needs_node
def test_js_port_refuses_what_it_does_not_support_and_that_is_a_crash(capsys):
    code, out, _ = run(capsys, "check", "--example", "lenet", "--impl", js(), "--no-report")
    assert code == 1 and "CANDIDATE CRASHED" in out
    assert "exited with status 3" in out and "conv2d" in out and "not supported by this port" in out


# -- (b) a bug injected into a copy is caught and localized ---------------------------------------------------------
@needs_node
@pytest.mark.parametrize("bug, spec", [(DROPPED_SIGMA_PRIME, bp.example("seed-nielsen")), (MISSING_TRANSPOSE, SQUARE)],
                         ids=["dropped-sigma-prime", "missing-transpose"])
def test_bugged_copy_is_caught_and_localized(capsys, tmp_path, bug, spec):
    bugged = bugged_port(tmp_path, *bug)
    params, x, y = bp.random_case(spec, 0, batch=4)
    with ExecCandidate(js(bugged), timeout=30) as port:
        result = oracle.check(spec, params, x, y, port)
    assert not result.passed and result.classification == "bug"
    # the output layer's δ and gradients are right; the first wrong δ is the layer below it
    assert result.first_divergent_layer == 1, result.message()
    failed = {t.name for t in result.failed_tensors}
    assert "layers.1.delta" in failed and not any(n.startswith("layers.2.") for n in failed)
    # the command line says so too (exit 1), and replays it with the same verdict
    spec_path = tmp_path / "net.json"
    spec_path.write_text(spec.to_json())
    code, out, _ = run(capsys, "check", spec_path, "--impl", js(bugged), "--report", tmp_path / "r")
    assert code == 1 and "GRADIENT MISMATCH" in out and "layers.1" in out
    report = next((tmp_path / "r").glob("*/report.json"))
    assert json.loads(report.read_text())["impl"] == js(bugged)
    code, out, _ = run(capsys, "replay", report, "--impl", js(bugged))
    assert code == 1 and "Same verdict" in out
    code, out, _ = run(capsys, "replay", report, "--impl", js())  # the correct port on the same case
    assert code == 0


@needs_node
def test_fuzz_catches_the_bugged_copy(capsys, tmp_path):
    bugged = bugged_port(tmp_path, *DROPPED_SIGMA_PRIME)
    code, out, _ = run(capsys, "fuzz", "--nets", "dense", "--dtype", "float64", "--examples", 30, "--impl", js(bugged),
                       "--report", tmp_path)
    assert code == 1 and "Shrunk failure written to" in out
    summary = json.loads((tmp_path / "fuzz-seed0" / "fuzz.json").read_text())
    assert shlex.quote(js(bugged)) in summary["failure"]["replay"]


# -- (c) every way of not answering is a crash, never a pass ---------------------------------------------------------
def _crash_cases(tmp_path):
    unknown = tmp_path / "unknown_name.py"
    unknown.write_text(UNKNOWN_NAME_PROGRAM)
    return {
        "exit-3": ("exec:sh -c 'echo cannot do this >&2; exit 3'", ["(exit)", "exited with status 3", "cannot do this"]),
        "signal": ("exec:sh -c 'kill -9 $$'", ["(killed)", "SIGKILL"]),
        "no-outputs": ("exec:true", ["wrote no outputs.safetensors or outputs.npz"]),
        "malformed": ("exec:sh -c 'printf garbage > \"$0/outputs.safetensors\"'", ["wrote unusable outputs", "cannot be read"]),
        "unknown-name": (py(unknown), ["wrote unusable outputs", "unknown tensor 'grad.layers.7.weight'"]),
        "fifo": ("exec:sh -c 'mkfifo \"$0/outputs.safetensors\"'", ["outputs.safetensors as something other than a plain file"]),
    }


@pytest.mark.parametrize("which", ["exit-3", "signal", "no-outputs", "malformed", "unknown-name", "fifo"])
def test_a_program_that_does_not_answer_is_a_crash(capsys, tmp_path, which):
    command, says = _crash_cases(tmp_path)[which]
    code, out, _ = run(capsys, "check", "--example", "seed-nielsen", "--impl", command, "--timeout", 20, "--no-report")
    assert code == 1 and "CANDIDATE CRASHED" in out, out
    for text in says:
        assert text in out, out


def test_a_program_past_the_timeout_is_killed_with_its_children(capsys, tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    command = f"exec:sh -c 'sleep 60 & echo $! > {shlex.quote(str(pid_file))}; wait'"
    start = time.monotonic()
    code, out, _ = run(capsys, "check", "--example", "seed-nielsen", "--impl", command, "--timeout", 1, "--no-report")
    assert time.monotonic() - start < 30
    assert code == 1 and "CANDIDATE CRASHED" in out and "(timeout)" in out and "did not exit within 1 s" in out
    pid = int(pid_file.read_text())
    for _ in range(50):  # its background child went with its process group
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the program's child {pid} is still running")


def test_a_crashing_program_fails_a_fuzz_campaign(capsys, tmp_path):
    code, out, _ = run(capsys, "fuzz", "--examples", 5, "--impl", "exec:true", "--report", tmp_path)
    assert code == 1 and "wrote no outputs" in out


@pytest.mark.parametrize("command, says", [
    ("exec:no-such-program-bp-oracle --flag", "'no-such-program-bp-oracle' is not found on PATH"),
    ("exec:", "exec: names no command"),
    ("exec:   ", "exec: names no command"),
    ("exec:./no/such/file.js", "does not exist"),
    ("exec:node 'unclosed", "cannot be split into words"),
])
def test_a_program_that_cannot_be_run_is_bad_input(capsys, command, says):
    code, out, err = run(capsys, "check", "--example", "seed-nielsen", "--impl", command, "--no-report")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("bp-oracle: error: --impl:") and says in err, err


def test_a_file_that_is_not_executable_is_bad_input(capsys, tmp_path):
    script = tmp_path / "bp.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    code, _, err = run(capsys, "check", "--example", "seed-nielsen", "--impl", f"exec:{script}", "--no-report")
    assert code == 2 and "is not an executable file" in err


# -- (d) a Python program in the same protocol, on every kind of layer -----------------------------------------------
@pytest.mark.parametrize("example", ["seed-nielsen", "lenet", "mlp-batchnorm", "resnet-tiny"])
def test_a_python_program_using_manual_bp_passes(capsys, tmp_path, example):
    script = tmp_path / "manual_bp_program.py"
    script.write_text(MANUAL_BP_PROGRAM)
    code, out, _ = run(capsys, "check", "--example", example, "--impl", py(script), "--timeout", 60, "--no-report")
    assert code == 0 and "gradients match torch.autograd" in out, out


def test_a_python_program_passes_a_fuzz_campaign_over_norm_nets(capsys, tmp_path):
    script = tmp_path / "manual_bp_program.py"
    script.write_text(MANUAL_BP_PROGRAM)
    code, out, _ = run(capsys, "fuzz", "--nets", "norm", "--examples", 8, "--impl", py(script), "--report", tmp_path)
    assert code == 0, out


def test_exec_candidate_is_a_grads_fn_with_the_isolated_interface(tmp_path):
    script = tmp_path / "manual_bp_program.py"
    script.write_text(MANUAL_BP_PROGRAM)
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 1, batch=3, dtype="float32")
    cand = ExecCandidate(py(script), timeout=30).start()
    cand.ensure_loaded()
    try:
        answer = cand(spec, params, x, y)
    finally:
        cand.close()
    assert cand.target == py(script) and cand.calls == 1
    want = bp.gradients(spec, params, x, y)
    assert answer.grads.keys() == want.grads.keys() and answer.grads["layers.0.weight"].dtype == np.float32
    np.testing.assert_array_equal(answer.grads["layers.0.weight"], want.grads["layers.0.weight"])
    np.testing.assert_array_equal(answer.grad_input, want.grad_input)
    assert oracle.check(spec, params, x, y, cand).passed
    with pytest.raises(bp.SpecError, match="--timeout"):
        ExecCandidate("true", timeout=0)
