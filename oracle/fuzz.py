"""``bp-oracle fuzz``: a Hypothesis campaign over random architectures with a live progress bar.

The campaign stops at the first discrepancy, lets Hypothesis shrink it to the smallest network that
still shows it, and writes that case's report (with its replay command). It always ends with a
summary: examples run, verdicts per dtype, the worst error seen, and what architectures were covered.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shlex
import time

import numpy as np
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import seed as hypothesis_seed
from tqdm import tqdm

from manual_bp import SpecError

from .checker import CandidateError, check
from .graph import nodes
from .strategies import cases

#: once a failure is found, stop trying new (smaller) cases after this many seconds of shrinking
SHRINK_BUDGET_S = 60.0


def _digest(case) -> str:
    """Identifies a generated case by its content (Hypothesis may generate the same case again)."""
    h = hashlib.sha256(case.spec.to_json().encode("utf-8"))
    h.update(case.dtype.encode())
    arrays = [(k, case.params[k]) for k in sorted(case.params)] + [("x", case.x), ("y", np.asarray(case.y))]
    for name, a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _replay_command(impl_name: str) -> str:
    cmd = "bp-oracle replay {folder}/report.json"
    return cmd if impl_name == "manual_bp" else f"{cmd} --impl {shlex.quote(impl_name)}"


NETS = ("dense", "cnn", "norm", "residual", "tokens", "sequence", "all")


def _nets(kind: str):
    """The architectures a campaign draws: dense chains, conv/pool nets, either with normalization and dropout
    layers inserted, nets with residual blocks, token nets (an embedding front), sequence nets (dense at every
    step, rnn/lstm/gru, attention and transformer blocks, into a flattened, last-step or per-step head with a loss at
    every step), or any of them."""
    from .strategies import (cnn_specs, embedding_specs, per_step_specs, sequence_model_specs, sequence_specs, specs,
                             with_norms, with_residuals)

    sequence = sequence_specs() | per_step_specs() | sequence_model_specs()
    return {"dense": specs(), "cnn": cnn_specs(), "norm": with_norms(), "residual": with_residuals(),
            "tokens": embedding_specs(), "sequence": sequence,
            "all": specs() | cnn_specs() | with_norms() | with_residuals() | embedding_specs() | sequence}[kind]


def _width(layer) -> int:
    """A layer's width for the coverage table: units, or output channels (0 for a pool or flatten)."""
    return getattr(layer, "units", None) or getattr(layer, "out_channels", 0)


def campaign(*, examples: int, seed: int, dtypes: str, impl, impl_name: str, report_dir, nets: str = "dense") -> int:
    """Run the campaign; 0 when every example passed, 1 on a failure (shrunk and reported).

    A candidate that crashes (raises, exits, is killed, times out) fails like any other: Hypothesis
    shrinks it and the smallest case gets a report. A candidate that returns something unusable
    (wrong keys, shapes, dtypes) is shrunk too, then refused as bad input (``CandidateError``, exit 2).
    The run is deterministic for a given ``seed`` (unless the shrinking budget runs out).
    """
    dts = ("float64", "float32") if dtypes == "both" else (dtypes,)
    verdicts = collections.Counter()
    worst = {dt: 0.0 for dt in dts}
    coverage = {"depth": collections.Counter(), "activation": collections.Counter(), "loss": collections.Counter(),
                "width": collections.Counter(), "layer": collections.Counter()}
    failing: dict = {}
    known: dict = {}    # digest -> ("result", CheckResult) | ("error", CandidateError), for every failing case seen
    state = {"first_failure": None, "stopped": None}
    bar = tqdm(total=examples, unit="ex", desc="fuzz", dynamic_ncols=True)

    def count(case, kind, result=None):
        bar.update(1)
        verdicts[(case.dtype, kind)] += 1
        if result is not None:
            worst[case.dtype] = max([worst[case.dtype]] + [t.normwise_rel_err for t in result.tensors if np.isfinite(t.normwise_rel_err)])
        coverage["depth"][len(case.spec.layers)] += 1
        coverage["loss"][case.spec.loss.name] += 1
        for node in nodes(case.spec):  # every layer, those inside residual blocks too (a block counts as its sum)
            layer = node.layer
            coverage["layer"][layer.type] += 1
            coverage["activation"][layer.activation.name] += 1
            if _width(layer):
                coverage["width"][min(32, 1 << (_width(layer) - 1).bit_length())] += 1

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(cases(specs_strategy=_nets(nets), dtypes=dts))
    def one(case):
        key = _digest(case)
        outcome = known.get(key)
        if outcome is None:
            if failing and not state["stopped"] and time.monotonic() - state["first_failure"] > SHRINK_BUDGET_S:
                state["stopped"] = f"the {SHRINK_BUDGET_S:g} s shrinking budget ran out"
            if state["stopped"]:
                reject()  # no new cases: each might cost a timeout; the failures seen so far stand
            try:
                outcome = ("result", check(case.spec, case.params, case.x, case.y, impl))
            except CandidateError as err:
                outcome = ("error", err)
            except SpecError:
                if not failing:
                    count(case, "refused")  # a case the oracle cannot judge (e.g. it overflows): not a failure
                reject()
        kind, value = outcome
        failed = kind == "error" or not value.passed or value.classification == "crash"
        if not failing:  # count the campaign, not the shrinking
            count(case, value.classification if kind == "result" else "unusable", value if kind == "result" else None)
        if failed:
            known[key] = outcome
            if state["first_failure"] is None:
                state["first_failure"] = time.monotonic()
            crash = getattr(value, "crash", None) if kind == "result" else None
            if crash and crash.get("kind") == "timeout" and not state["stopped"]:
                state["stopped"] = "a call timed out (every further shrinking step could wait --timeout again)"
            failing["case"], failing["outcome"] = case, outcome  # the last failure seen is the shrunk one
            bar.set_postfix(failures=1, refresh=True)
            raise AssertionError(value.summary() if kind == "result" else str(value))

    problem = None
    try:
        one()
    except AssertionError:
        if not failing:
            raise
    except Exception as err:  # Hypothesis's Flaky*, or our own bug: report what we have
        if not failing:
            raise
        problem = f"Hypothesis could not confirm the failure on a second run ({type(err).__name__}); the last failing case seen is reported."
    finally:
        bar.close()

    print(f"\nExamples run: {sum(verdicts.values())}")
    print(f"{'dtype':8s} {'verdict':10s} count")
    for (dt, kind), n in sorted(verdicts.items()):
        print(f"{dt:8s} {kind:10s} {n}")
    for dt, w in worst.items():
        print(f"worst normwise relative error, {dt}: {w:.3g}")
    print("depths:", dict(sorted(coverage["depth"].items())))
    print("losses:", dict(coverage["loss"].most_common()))
    print("activations:", dict(coverage["activation"].most_common()))
    print("layer types:", dict(coverage["layer"].most_common()))

    summary = {"schema": "bp-oracle/fuzz", "schema_version": 1, "examples": sum(verdicts.values()),
               "seed": seed, "impl": impl_name, "nets": nets,
               "verdicts": [{"dtype": dt, "classification": k, "count": n} for (dt, k), n in sorted(verdicts.items())],
               "worst_normwise_rel_err": worst,
               "coverage": {k: {str(kk): vv for kk, vv in v.items()} for k, v in coverage.items()},
               "failure": None}
    unusable = None
    if failing:
        case, (kind, value) = failing["case"], failing["outcome"]
        for note in (problem, state["stopped"] and f"Shrinking stopped early: {state['stopped']}; the case may not be the smallest."):
            if note:
                print(note)
        if kind == "error":
            unusable = value
            print(f"\nThe candidate's answer is unusable on {case!r}: {value}")
            summary["failure"] = {"error": str(value), "case": repr(case)}
        else:
            print("\n" + value.message())
            if report_dir:
                from .report import write_check_report

                replay = _replay_command(impl_name)
                try:
                    folder = write_check_report(report_dir, value, params=case.params, x=case.x, y=np.asarray(case.y),
                                                seed=case.seed, impl=impl_name, source=f"fuzz seed {seed}", replay=replay)
                except OSError as err:
                    raise SpecError("--report", f"cannot write the report under {report_dir} ({err.strerror or err})",
                                    "free some space or choose another --report folder") from None
                command = replay.replace("{folder}", shlex.quote(str(folder)))
                summary["failure"] = {"report": str(folder), "replay": command}
                print(f"Shrunk failure written to {folder}/report.html; replay: {command}")
    if report_dir:
        from pathlib import Path

        from .report import write_atomically

        try:
            write_atomically(Path(report_dir) / f"fuzz-seed{seed}", {"fuzz.json": json.dumps(summary, indent=2) + "\n"})
        except OSError as err:
            raise SpecError("--report", f"cannot write {report_dir}/fuzz-seed{seed} ({err.strerror or err})",
                            "free some space or choose another --report folder") from None
    if unusable is not None:
        raise unusable  # bad input, as `check` says it: exit 2, one line
    return 1 if failing else 0
