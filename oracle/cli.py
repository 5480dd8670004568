"""The ``bp-oracle`` command line. Exit codes: 0 match, 1 discrepancy found, 2 bad input.

torch is imported only by the commands that need it, so ``bp-oracle --help`` answers at once.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import numpy as np

from manual_bp import SpecError

DEFAULT_REPORTS = "reports"           # mutants, bench: regenerating the committed reports is explicit
DEFAULT_RUN_REPORTS = "reports/runs"  # check, fuzz: git-ignored, so running the documented commands changes no tracked file
SEED_LIMIT = 2**32                    # NumPy's legacy seeding refuses larger seeds; one range for every command


def _start_impl(target: str | None, timeout: float):
    """The candidate ``target`` in its own worker process, already importing (None: manual_bp in-process)."""
    if not target:
        return None
    if target.startswith("exec:"):  # any program, run on a case folder (oracle/execute.py)
        from .execute import ExecCandidate

        return ExecCandidate(target, timeout).start()
    from .isolate import IsolatedCandidate

    return IsolatedCandidate(target, timeout).start()


def _load_npz(source, field: str, label: str | None = None) -> dict:
    """Arrays of an .npz given as a path or as its bytes; ``SpecError(field)`` for anything unreadable."""
    label = label or str(source)
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise SpecError(field, f"{label} does not exist", "check the path") from None
    except ValueError as err:
        if "pickle" in str(err):
            raise SpecError(field, f"{label} holds object arrays that need pickle", "save plain numeric arrays (np.savez)") from None
        raise SpecError(field, f"{label} is not a readable .npz file ({err})", "save it with np.savez") from None
    except Exception as err:  # zipfile errors, OSError, ...
        raise SpecError(field, f"{label} is not a readable .npz file ({type(err).__name__})", "save it with np.savez") from None


def _spec_from_args(args):
    import manual_bp as bp

    if args.example and args.spec:
        raise SpecError("spec", "both a spec file and --example were given", "give one of them")
    if args.example:
        return bp.example(args.example), f"--example {args.example}"
    if not args.spec:
        raise SpecError("spec", "no spec given", "give SPEC.json or --example NAME (see `bp-oracle examples`)")
    try:
        return bp.load_spec(args.spec), args.spec
    except RecursionError:
        raise SpecError("spec", f"{args.spec} nests lists or objects too deeply to parse", "a spec nests a few levels at most") from None


def _case(spec, args):
    """params, x, y from --params/--data, or drawn from --seed."""
    import manual_bp as bp

    params, x, y = bp.random_case(spec, args.seed, batch=args.batch, dtype=args.dtype)
    if args.params:
        params = _load_npz(args.params, "--params")
        bp.check_params(spec, params)
        params = {k: v.astype(args.dtype) for k, v in params.items()}
    if args.data:
        data = _load_npz(args.data, "--data")
        for key in ("x", "y"):
            if key not in data:
                raise SpecError("--data", f"{args.data} has no array {key!r}", "save it with np.savez(path, x=..., y=...)")
        x, y = data["x"], data["y"]
        if x.dtype.kind == "f":
            x = x.astype(args.dtype)
        if y.dtype.kind == "f":
            y = y.astype(args.dtype)
    return params, x, y


def cmd_examples(args) -> int:
    import manual_bp as bp

    for name in bp.example_names():
        spec = bp.example(name)
        print(f"{name:26s} {spec.describe()}")
        print(f"{'':26s} {spec.description}")
    return 0


def _replay_command(impl_name: str) -> str:
    """The replay command a report records ({folder} is filled in by the report writer)."""
    cmd = "bp-oracle replay {folder}/report.json"
    return cmd if impl_name == "manual_bp" else f"{cmd} --impl {shlex.quote(impl_name)}"


def run_check(spec, params, x, y, *, impl, dtype, seed, report_dir, source) -> int:
    """One check; ``impl`` a started ``IsolatedCandidate`` or None (manual_bp, in-process).

    0 only when the comparison completed and passed; 1 for any other verdict (a crash included).
    """
    from .checker import check

    if impl is not None:
        impl.ensure_loaded()  # SpecError naming --impl when it does not import (bad input, exit 2)
    result = check(spec, params, x, y, impl, dtype=dtype)
    print(result.message())
    if report_dir:
        from .report import write_check_report

        impl_name = impl.target if impl is not None else "manual_bp"
        x2 = np.asarray(x).astype(dtype) if np.asarray(x).dtype.kind == "f" else x
        try:
            folder = write_check_report(report_dir, result, params=params, x=x2, y=np.asarray(y), seed=seed,
                                        impl=impl_name, replay=_replay_command(impl_name), source=source)
        except OSError as err:  # e.g. EFBIG under `ulimit -f` (SIGXFSZ is ignored in main)
            raise SpecError("--report", f"cannot write the report under {report_dir} ({err.strerror or err})",
                            "free some space or choose another --report folder") from None
        print(f"Report: {folder}/report.html (also report.md, report.json)")
    return 0 if result.passed and result.classification != "crash" else 1


def cmd_check(args) -> int:
    impl = _start_impl(args.impl, args.timeout)  # it imports while we build the case and import torch
    try:
        spec, source = _spec_from_args(args)
        params, x, y = _case(spec, args)
        return run_check(spec, params, x, y, impl=impl, dtype=args.dtype, seed=args.seed,
                         report_dir=None if args.no_report else args.report, source=source)
    finally:
        if impl is not None:
            impl.close()


def _field(report: dict, key: str, ok, what: str):
    value = report.get(key)
    if not ok(value):
        raise SpecError("REPORT.json", f"its field {key!r} is missing or not {what}", "give the report.json that bp-oracle wrote")
    return value


def _read_report(path: Path):
    """The report's fields, its spec and its case, each checked; ``SpecError`` naming what is wrong."""
    import manual_bp as bp

    from .isolate import printable

    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError("REPORT.json", f"{path} cannot be read ({err.strerror or err})", "check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SpecError("REPORT.json", f"{path} is not a JSON report", "give the report.json that bp-oracle wrote") from None
    if not isinstance(report, dict) or report.get("schema") != "bp-oracle/check":
        raise SpecError("REPORT.json", f"{path} is not a bp-oracle check report", "give the report.json that bp-oracle wrote")
    version = report.get("schema_version")
    if type(version) is not int or version != 1:
        raise SpecError("REPORT.json", f"schema_version {printable(json.dumps(version), 40)} is not supported",
                        "this bp-oracle reads schema_version 1; replay it with the bp-oracle that wrote it")
    try:
        spec = bp.Spec.from_dict(report.get("spec"))
    except (SpecError, RecursionError) as err:
        why = str(err) if isinstance(err, SpecError) else "nested too deeply"
        raise SpecError("REPORT.json", f"its spec does not parse ({why})", "give an unmodified report.json") from None
    dtype = _field(report, "dtype", lambda v: v in ("float64", "float32"), '"float64" or "float32"')
    seed = _field(report, "seed", lambda v: type(v) is int, "an integer")
    passed = _field(report, "passed", lambda v: type(v) is bool, "true or false")
    impl = _field(report, "impl", lambda v: isinstance(v, str) and v, "a string")
    case_path = path.parent / "case.npz"
    try:
        case_bytes = case_path.read_bytes()
    except OSError as err:
        raise SpecError("case.npz", f"{case_path} cannot be read ({err.strerror or err})", "keep case.npz beside report.json") from None
    if "case_sha256" in report and report["case_sha256"] is not None:
        want = report["case_sha256"]
        if not (isinstance(want, str) and re.fullmatch(r"[0-9a-f]{64}", want)):
            raise SpecError("REPORT.json", "its field 'case_sha256' is not a SHA-256 hex digest", "give an unmodified report.json")
        if hashlib.sha256(case_bytes).hexdigest() != want:
            raise SpecError("case.npz", f"{case_path} does not match the report's case_sha256: it was changed after the report was written",
                            "restore the original case.npz, or check that case with `bp-oracle check --params/--data`")
    case = _load_npz(case_bytes, "case.npz", str(case_path))
    for key in ("x", "y"):
        if key not in case:
            raise SpecError("case.npz", f"{case_path} has no array {key!r}", "keep the case.npz that bp-oracle wrote")
    return spec, case, dtype, seed, passed, impl


def _same_target(a: str, b: str) -> bool:
    from .isolate import resolve_target

    def norm(t):
        try:
            return resolve_target(t)
        except SpecError:
            return t

    return norm(a) == norm(b)


def cmd_replay(args) -> int:
    """Re-run a recorded case. Runs manual_bp unless the user names the code to run (--impl), or
    explicitly trusts the report's own ``impl`` (--trust-recorded-impl, which says first what it imports)."""
    from .isolate import describe_target, printable, resolve_target

    path = Path(args.report_json)
    if args.impl and args.trust_recorded_impl:
        raise SpecError("--trust-recorded-impl", "cannot be combined with --impl", "give one of them")
    spec, case, dtype, seed, passed, recorded = _read_report(path)
    x, y = case.pop("x"), case.pop("y")
    target = None
    if args.impl:
        target = args.impl
    elif args.trust_recorded_impl and recorded != "manual_bp":
        target = resolve_target(recorded)
        print(f"Trusting the report: {describe_target(target)}")
    impl = _start_impl(target, args.timeout)
    try:
        code = run_check(spec, case, x, y, impl=impl, dtype=dtype, seed=seed, report_dir=None, source=str(path))
    finally:
        if impl is not None:
            impl.close()
    ran = impl.target if impl is not None else "manual_bp"
    if ran == recorded or (target is not None and recorded != "manual_bp" and _same_target(ran, recorded)):
        was = 0 if passed else 1
        print("Same verdict as recorded." if code == was else "The verdict CHANGED since the report was written.")
    else:
        shown = printable(recorded, 300)
        again = (f"bp-oracle replay {shlex.quote(str(path))}" if recorded == "manual_bp" else
                 f"bp-oracle replay {shlex.quote(str(path))} --impl {shlex.quote(shown)} (or --trust-recorded-impl)")
        print(f"Replayed with {printable(ran, 300)}; the report was written for {shown}, so the verdicts are not compared. "
              f"To run that implementation: {again}")
    return code


def cmd_fuzz(args) -> int:
    impl = _start_impl(args.impl, args.timeout)  # it imports while we import Hypothesis and torch
    try:
        from .fuzz import campaign

        if impl is not None:
            impl.ensure_loaded()
        return campaign(examples=args.examples, seed=args.seed, dtypes=args.dtype, impl=impl,
                        impl_name=impl.target if impl is not None else "manual_bp",
                        report_dir=None if args.no_report else args.report, nets=args.nets)
    finally:
        if impl is not None:
            impl.close()


def cmd_campaign(args) -> int:
    """A reproducible campaign that reports every distinct failure (oracle/campaign.py); 0 none, 1 any."""
    if args.max_failures is not None and args.max_failures < 1:
        raise SpecError("--max-failures", f"{args.max_failures} must be at least 1", "give --max-failures K with K ≥ 1")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise SpecError("--time-budget", f"{args.time_budget} is not a positive number of seconds", "give e.g. --time-budget 600")
    if args.workers is not None and args.workers < 1:
        raise SpecError("--workers", f"{args.workers} must be at least 1", "give --workers W with W ≥ 1")
    if not (math.isfinite(args.shrink_seconds) and args.shrink_seconds >= 0):
        raise SpecError("--shrink-seconds", f"{args.shrink_seconds} is not a number of seconds", "give e.g. --shrink-seconds 120")
    impl = _start_impl(args.impl, args.timeout)  # it imports while we import Hypothesis and torch
    try:
        from .campaign import run_campaign

        if impl is not None:
            impl.ensure_loaded()
        report = run_campaign(examples=args.examples, seed=args.seed, nets=args.nets, dtype=args.dtype, impl=impl,
                              impl_name=impl.target if impl is not None else "manual_bp", impl_target=args.impl,
                              timeout=args.timeout, report_dir=None if args.no_report else args.report,
                              max_failures=args.max_failures, time_budget=args.time_budget, workers=args.workers,
                              shrink_seconds=args.shrink_seconds, ray_address=args.ray, database=args.database,
                              per_net=args.per_net)
        return report["exit_code"]
    finally:
        if impl is not None:
            impl.close()


def cmd_mutants(args) -> int:
    from .mutants import CATALOGUE, markdown_table, run_catalogue
    from tqdm import tqdm

    bar = tqdm(total=len(CATALOGUE) + 1, unit="mutant", desc="mutants", disable=args.json, dynamic_ncols=True)

    def step(row):
        bar.set_postfix_str(f"{row.mutant}: {'killed' if row.killed else 'alive'}")
        bar.update(1)

    summary = run_catalogue(args.examples, args.seed, progress=step)
    bar.close()
    table = markdown_table(summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(table)
    if args.report:
        from .report import write_atomic_files

        folder = Path(args.report) / "mutants"
        write_atomic_files({folder / "mutants.md": table, folder / "mutants.json": json.dumps(summary, indent=2) + "\n"})
        if not args.json:
            print(f"Written to {Path(args.report) / 'mutants'}/mutants.md")
    ok = summary["killed"] == summary["total"] and not summary["correct_flagged"] and summary["kink_mutants_classified_as_kink"]
    return 0 if ok else 1


def cmd_rates(args) -> int:
    from tqdm import tqdm

    from .rates import bug_mutants, detection_rates, false_alarms, rates_markdown, verdict_summary, write_reports

    for name in ("per_cell", "workers", "until_changed"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')}", "must be at least 1", f"give --{name.replace('_', '-')} N with N ≥ 1")
    known = {m.name for m in bug_mutants()}
    unknown = sorted(set(args.mutants or ()) - known)
    if unknown:
        raise SpecError("--mutants", f"no bug mutant is called {', '.join(unknown)}",
                        f"give names from: {', '.join(sorted(known))}")
    cells = sum(len(m.regimes) for m in bug_mutants() if args.mutants is None or m.name in args.mutants) * 2
    bar = tqdm(total=cells, unit="cell", desc="detection", disable=args.json, dynamic_ncols=True)

    def step(cell):
        bar.set_postfix_str(f"{cell['mutant']} {cell['regime']} {cell['dtype']}")
        bar.update(1)

    result = {"schema": "bp-oracle/rates", "schema_version": 1,
              "detection": detection_rates(args.per_cell, args.seed, step, mutants=args.mutants,
                                           until_changed=args.until_changed, workers=args.workers)}
    bar.close()
    if args.false_alarms:
        result["false_alarms"] = false_alarms(args.false_alarms, args.seed)
    print(json.dumps(result, indent=2, default=str) if args.json else rates_markdown(result))
    if args.report:
        md, _ = write_reports(result, Path(args.report) / "mutants")
        if not args.json:
            print(f"Written to {md} and detection-rates.json")
    return 0 if verdict_summary(result) else 1


def cmd_bench(args) -> int:
    from .bench import markdown, run

    res = run(quick=args.quick, progress=(lambda line: None) if args.json else print)
    md = markdown(res)
    print(json.dumps(res, indent=2) if args.json else md)
    from .report import write_atomic_files

    folder = Path(args.report)
    write_atomic_files({folder / "benchmarks.json": json.dumps(res, indent=2) + "\n", folder / "benchmarks.md": md})
    if not args.json:
        print(f"Written to {folder}/benchmarks.md and benchmarks.json")
    return 0


def cmd_golden(args) -> int:
    """Export golden reference cases (oracle/golden.py); 0 when written."""
    import manual_bp as bp

    if args.random is not None and args.random < 1:
        raise SpecError("--random", f"{args.random} is not a number of cases", "give --random N with N ≥ 1")
    if args.golden_batch is not None and args.golden_batch < 1:
        raise SpecError("--batch", "must be at least 1", "give --batch B with B ≥ 1")
    from tqdm import tqdm

    from . import golden

    batch = args.golden_batch or 4
    sources = golden.example_sources(args.example or [], args.seed, batch)
    sources += golden.spec_sources(args.spec or [], args.seed, batch)
    if args.random:
        sources += golden.random_sources(args.random, args.seed, args.golden_batch, args.regime)
    if not (args.example or args.spec or args.random):
        sources = golden.example_sources(bp.example_names(), args.seed, batch)
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    parts = [f"--example {shlex.quote(e)}" for e in args.example or []] + [f"--spec {shlex.quote(f)}" for f in args.spec or []]
    parts += [f"--random {args.random}"] if args.random else []
    parts += [f"--seed {args.seed}", f"--dtype {args.dtype}"] + ([f"--batch {args.golden_batch}"] if args.golden_batch else [])
    parts += [f"--regime {args.regime}"] if args.random else []
    command = "bp-oracle golden --out DIR " + " ".join(parts)  # DIR: the manifest is the same wherever it is written
    bar = tqdm(total=len(sources) * len(dtypes), unit="case", desc="golden", dynamic_ncols=True, disable=None)

    def step(name):
        bar.set_postfix_str(name)
        bar.update(1)

    try:
        manifest = golden.export(args.out, sources, dtypes, force=args.force, command=command, progress=step)
    finally:
        bar.close()
    print(f"Wrote {len(manifest['cases'])} golden cases to {args.out} (manifest.json; schema: docs/case-layout.md)")
    return 0


def cmd_verify(args) -> int:
    """Judge a port's outputs against a golden set without running torch; 0 all pass, 1 any fails."""
    from . import golden

    verdicts = golden.verify(args.golden_dir, args.results_dir)
    print(golden.text_table(verdicts))
    for v in verdicts:
        if not v.passed:
            print(f"{v.name}: {v.localization}")
    print(golden.summary_line(verdicts))
    if args.report:
        folder = golden.write_reports(args.report, verdicts, args.golden_dir, args.results_dir)
        print(f"Report: {folder}/verify.md (also verify.json; a check report per failing case under cases/)")
    return 0 if all(v.passed for v in verdicts) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bp-oracle", description="Check hand-written backprop against torch.autograd and say where it goes wrong.",
                                epilog="Exit codes: 0 match, 1 discrepancy found (a crashing candidate included), 2 bad input, "
                                       "3 internal error.")
    sub = p.add_subparsers(dest="command", required=True)
    impl_help = ("module:function or file.py:function to check (default: manual_bp); it runs in a separate worker "
                 "process, its standard output goes to our standard error. Or exec:'COMMAND ARGS': any program, run "
                 "with a case folder's path appended (docs/case-layout.md)")
    timeout_help = "seconds one call of the candidate may take before it is stopped and judged a crash (default 60)"

    sub.add_parser("examples", help="list the built-in specs").set_defaults(func=cmd_examples)

    c = sub.add_parser("check", help="check one network against torch.autograd")
    c.add_argument("spec", nargs="?", help="spec JSON file")
    c.add_argument("--example", help="a built-in spec instead of a file (see `examples`)")
    c.add_argument("--impl", help=impl_help)
    c.add_argument("--timeout", type=float, default=60.0, help=timeout_help)
    c.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    c.add_argument("--batch", type=int, default=4, help="examples drawn when --data is not given (default 4)")
    c.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    c.add_argument("--params", help=".npz of parameters keyed layers.{i}.weight / layers.{i}.bias")
    c.add_argument("--data", help=".npz with arrays x and y")
    c.add_argument("--report", default=DEFAULT_RUN_REPORTS, help=f"folder for reports (default: {DEFAULT_RUN_REPORTS}/)")
    c.add_argument("--no-report", action="store_true", help="print the verdict only")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fuzz", help="Hypothesis campaign over random architectures")
    f.add_argument("--examples", type=int, default=200, help="examples to run (default 200)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    f.add_argument("--nets", choices=["dense", "cnn", "norm", "residual", "tokens", "sequence", "all"], default="all",
                   help="architectures to draw: dense chains, conv/pool/flatten nets, either with batch/layer/group "
                        "norm and dropout inserted, nets with residual blocks, token nets with an embedding front, sequence nets "
                        "(temporal_dense), or all of them "
                        "(default all)")
    f.add_argument("--impl", help=impl_help)
    f.add_argument("--timeout", type=float, default=60.0, help=timeout_help)
    f.add_argument("--report", default=DEFAULT_RUN_REPORTS, help=f"folder for reports (default: {DEFAULT_RUN_REPORTS}/)")
    f.add_argument("--no-report", action="store_true")
    f.set_defaults(func=cmd_fuzz)

    cp = sub.add_parser("campaign", help="reproducible campaign: every distinct failure grouped, shrunk and reported, "
                                         "with coverage, throughput and worst error per layer type x activation")
    cp.add_argument("--examples", type=int, default=1000, help="cases to run (default 1000)")
    cp.add_argument("--seed", type=int, default=0, help="case i is a pure function of (seed, i) (default 0)")
    cp.add_argument("--nets", choices=["dense", "cnn", "norm", "residual", "tokens", "sequence", "all"], default="all",
                    help="architectures to draw, as in fuzz (default all)")
    cp.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    cp.add_argument("--impl", help=impl_help)
    cp.add_argument("--timeout", type=float, default=60.0, help=timeout_help)
    cp.add_argument("--report", default=DEFAULT_RUN_REPORTS,
                    help=f"writes DIR/campaign-<seed>/ (default: {DEFAULT_RUN_REPORTS}/)")
    cp.add_argument("--no-report", action="store_true")
    cp.add_argument("--max-failures", type=int, default=None, metavar="K", help="stop after K failing cases")
    cp.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no case after SECONDS; shrinking gets what is left of it (at least 10 s)")
    cp.add_argument("--workers", type=int, default=None, metavar="W",
                    help="processes checking shards of cases (default: every core, or 1 below 1000 cases); the "
                         "report is the same for any W")
    cp.add_argument("--per-net", type=int, default=16, metavar="K",
                    help="weight and data cases drawn for each network, judged with one batched torch reference "
                         "(default 16; 1 draws a new network for every case; a divisor of 32)")
    cp.add_argument("--shrink-seconds", type=float, default=120.0, metavar="SECONDS",
                    help="time for shrinking all failure groups together, 30 s each at most (default 120)")
    cp.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="run the shards as tasks on a Ray cluster: auto (the one this machine joined), local (start "
                         "one for this run) or HOST:PORT; the same report (needs pip install bp-oracle[cluster])")
    cp.add_argument("--database", default=None, metavar="redis://HOST:PORT/N",
                    help="share Hypothesis's example database through Redis: saved failures are replayed first, new "
                         "ones saved (needs pip install bp-oracle[cluster])")
    cp.set_defaults(func=cmd_campaign)

    m = sub.add_parser("mutants", help="run the fault catalogue: every known-wrong backprop must be caught")
    m.add_argument("--examples", type=int, default=200, help="examples per mutant at most (default 200)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.add_argument("--report", default=DEFAULT_REPORTS, help="folder for mutants.md/json (default: reports/)")
    m.set_defaults(func=cmd_mutants)

    rt = sub.add_parser("rates", help="detection rate of every mutant per regime and dtype, and false alarms of correct code")
    rt.add_argument("--per-cell", type=int, default=20,
                    help="cases per mutant x regime x dtype (default 20; with --until-changed, the most drawn)")
    rt.add_argument("--until-changed", type=int, default=None, metavar="N",
                    help="draw a cell's cases until N of them change something (one miss then reads 99%%, not 98%%)")
    rt.add_argument("--workers", type=int, default=1, metavar="W", help="processes measuring the cells (default 1)")
    rt.add_argument("--mutants", nargs="+", default=None, metavar="NAME", help="only these mutants")
    rt.add_argument("--false-alarms", type=int, default=200, help="cases per dtype for two correct implementations (default 200; 0 skips)")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--json", action="store_true", help="print the result as JSON")
    rt.add_argument("--report", default=None, help="write DIR/mutants/detection-rates.md and .json")
    rt.set_defaults(func=cmd_rates)

    b = sub.add_parser("bench", help="speed and memory against torch and gradcheck, side by side")
    b.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under a minute)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("--report", default=DEFAULT_REPORTS, help="folder for benchmarks.md/json (default: reports/)")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("replay", help="re-run exactly the case a report recorded (with manual_bp unless told otherwise)")
    r.add_argument("report_json", metavar="REPORT.json")
    r.add_argument("--impl", help="module:function, file.py:function or exec:'COMMAND ARGS' to run on the recorded case "
                                  "(default: manual_bp)")
    r.add_argument("--trust-recorded-impl", action="store_true",
                   help="run the implementation the report names (it says first what it will import)")
    r.add_argument("--timeout", type=float, default=60.0, help=timeout_help)
    r.set_defaults(func=cmd_replay)

    g = sub.add_parser("golden", help="export reference cases (inputs, torch's gradients, tolerances) for ports in any language")
    g.add_argument("--out", required=True, metavar="DIR", help="folder to write (refused if it exists and is not empty, unless --force)")
    g.add_argument("--example", action="append", metavar="NAME", help="a built-in spec (repeatable; default: every built-in example)")
    g.add_argument("--spec", action="append", metavar="FILE", help="a spec JSON file (repeatable)")
    g.add_argument("--random", type=int, metavar="N", help="N random architectures across every layer type, reproducible from --seed")
    g.add_argument("--seed", type=int, default=0, help="seed of the random architectures and of every case's data (default 0)")
    g.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    g.add_argument("--batch", type=int, dest="golden_batch", default=None, metavar="B",
                   help="examples per case (default 4; random cases draw theirs)")
    g.add_argument("--regime", default="well_conditioned",
                   choices=["well_conditioned", "saturated", "near_zero", "near_kinks", "exact_kinks"],
                   help="weights and data of the random cases (default well_conditioned)")
    g.add_argument("--force", action="store_true", help="replace an existing golden set")
    g.set_defaults(func=cmd_golden)

    v = sub.add_parser("verify", help="judge a port's outputs against a golden set, without running torch")
    v.add_argument("golden_dir", metavar="GOLDEN_DIR")
    v.add_argument("results_dir", metavar="RESULTS_DIR", help="RESULTS_DIR/<case>/outputs.safetensors (or .npz) per case")
    v.add_argument("--report", metavar="DIR", help="write DIR/verify.json, DIR/verify.md and a check report per failing case")
    v.set_defaults(func=cmd_verify)
    return p


def _number_problem(args) -> str | None:
    """The first out-of-range number among the options, as a one-line message, or None."""
    for name in ("batch", "examples"):
        if getattr(args, name, 1) < 1:
            return f"--{name}: must be at least 1"
    seed = getattr(args, "seed", 0)
    if not 0 <= seed < SEED_LIMIT:
        return f"--seed: {seed} is out of range; give a whole number from 0 to {SEED_LIMIT - 1}"
    timeout = getattr(args, "timeout", 1.0)
    if not (math.isfinite(timeout) and timeout > 0):
        return f"--timeout: {timeout} is not a positive number of seconds; give e.g. --timeout 60"
    return None


def _say(line: str) -> None:
    """One line on standard error (newlines inside it flattened), never raising."""
    try:
        print(" ".join(str(line).split("\n")), file=sys.stderr)
    except (OSError, ValueError):
        pass


def _stdout_to_devnull() -> None:
    """After a broken pipe: point standard output at /dev/null, so exiting flushes without a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def _ignore_sigxfsz() -> None:
    """Over a file-size limit (``ulimit -f``), let writes fail with EFBIG instead of killing us."""
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass


def main(argv=None) -> int:
    """Exit 0 only for a comparison that completed and passed (or a command that is not a verdict, such
    as ``examples``); 1 a discrepancy or a crashing candidate; 2 bad input, one line; 3 our own bug;
    130 Ctrl-C; 141 standard output closed early (a broken pipe)."""
    _ignore_sigxfsz()
    args = build_parser().parse_args(argv)
    try:
        problem = _number_problem(args)
        if problem:
            _say(f"bp-oracle: error: {problem}")
            code = 2
        else:
            code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return 141
    except SpecError as err:
        _say(f"bp-oracle: error: {err}")
        code = 2
    except RecursionError:
        _say("bp-oracle: error: spec: nested too deeply to parse; a spec nests a few levels at most")
        code = 2
    except KeyboardInterrupt:
        _say("bp-oracle: interrupted; no report was left half-written")
        return 130
    except BaseException as err:  # our own bug, or something that called sys.exit: never a verdict
        if os.environ.get("BP_ORACLE_DEBUG"):
            import traceback

            traceback.print_exc()
        _say(f"bp-oracle: internal error: {type(err).__name__}: {err} (a bug in bp-oracle, not in your input; "
             "BP_ORACLE_DEBUG=1 shows the traceback)")
        code = 3
    if type(code) is not int or code not in (0, 1, 2):
        _say(f"bp-oracle: internal error: a command returned {code!r}")
        code = 3
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        return 141
    except (OSError, ValueError):
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
