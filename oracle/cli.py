"""The ``bp-oracle`` command line. Exit codes: 0 match, 1 discrepancy found, 2 bad input.

torch is imported only by the commands that need it, so ``bp-oracle --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from manual_bp import SpecError

DEFAULT_REPORTS = "reports"


def _load_impl(target: str | None):
    """``package.module:function`` or ``path/to/file.py:function`` -> the callable (None: manual_bp)."""
    if not target:
        return None
    module_name, sep, func = target.rpartition(":")
    if not sep or not module_name or not func:
        raise SpecError("--impl", f"{target!r} has no ':function' part", "write module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise SpecError("--impl", f"file {module_name} does not exist", "check the path")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except SpecError:
        raise
    except Exception as err:
        raise SpecError("--impl", f"{module_name} does not import ({type(err).__name__}: {err})", "fix the module or the path") from None
    fn = getattr(module, func, None)
    if fn is None:
        raise SpecError("--impl", f"{module_name} has no {func!r}", "name a function defined in that module")
    if not callable(fn):
        raise SpecError("--impl", f"{target} is not callable", "name a function grads_fn(spec, params, x, y)")
    return fn


def _load_npz(path: str, field: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise SpecError(field, f"{path} does not exist", "check the path") from None
    except ValueError as err:
        if "pickle" in str(err):
            raise SpecError(field, f"{path} holds object arrays that need pickle", "save plain numeric arrays (np.savez)") from None
        raise SpecError(field, f"{path} is not a readable .npz file ({err})", "save it with np.savez") from None
    except Exception as err:  # zipfile errors, OSError, ...
        raise SpecError(field, f"{path} is not a readable .npz file ({type(err).__name__})", "save it with np.savez") from None


def _spec_from_args(args):
    import manual_bp as bp

    if args.example and args.spec:
        raise SpecError("spec", "both a spec file and --example were given", "give one of them")
    if args.example:
        return bp.example(args.example), f"--example {args.example}"
    if not args.spec:
        raise SpecError("spec", "no spec given", "give SPEC.json or --example NAME (see `bp-oracle examples`)")
    return bp.load_spec(args.spec), args.spec


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


def run_check(spec, params, x, y, *, impl, dtype, seed, report_dir, source) -> int:
    import oracle

    fn = _load_impl(impl)
    result = oracle.check(spec, params, x, y, fn, dtype=dtype)
    print(result.message())
    if report_dir:
        from .report import write_check_report

        x2 = np.asarray(x).astype(dtype) if np.asarray(x).dtype.kind == "f" else x
        folder = write_check_report(report_dir, result, params=params, x=x2, y=np.asarray(y), seed=seed,
                                    impl=impl or "manual_bp", replay="bp-oracle replay {folder}/report.json", source=source)
        print(f"Report: {folder}/report.html (also report.md, report.json)")
    return 0 if result.passed else 1


def cmd_check(args) -> int:
    spec, source = _spec_from_args(args)
    params, x, y = _case(spec, args)
    return run_check(spec, params, x, y, impl=args.impl, dtype=args.dtype, seed=args.seed,
                     report_dir=None if args.no_report else args.report, source=source)


def cmd_replay(args) -> int:
    import manual_bp as bp

    path = Path(args.report_json)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise SpecError("REPORT.json", f"{path} cannot be read ({err.strerror or err})", "check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SpecError("REPORT.json", f"{path} is not a JSON report", "give the report.json that bp-oracle wrote") from None
    if not isinstance(report, dict) or report.get("schema") != "bp-oracle/check":
        raise SpecError("REPORT.json", f"{path} is not a bp-oracle check report", "give the report.json that bp-oracle wrote")
    spec = bp.Spec.from_dict(report["spec"])
    case = _load_npz(str(path.parent / "case.npz"), "case.npz")
    x, y = case.pop("x"), case.pop("y")
    impl = None if report["impl"] == "manual_bp" else report["impl"]
    code = run_check(spec, case, x, y, impl=impl, dtype=report["dtype"], seed=report["seed"],
                     report_dir=None, source=str(path))
    was = 0 if report["passed"] else 1
    print("Same verdict as recorded." if code == was else "The verdict CHANGED since the report was written.")
    return code


def cmd_fuzz(args) -> int:
    from .fuzz import campaign

    return campaign(examples=args.examples, seed=args.seed, dtypes=args.dtype, impl=_load_impl(args.impl),
                    impl_name=args.impl or "manual_bp", report_dir=None if args.no_report else args.report)


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
        from .report import write_atomically

        write_atomically(Path(args.report) / "mutants", {"mutants.md": table, "mutants.json": json.dumps(summary, indent=2) + "\n"})
        if not args.json:
            print(f"Written to {Path(args.report) / 'mutants'}/mutants.md")
    ok = summary["killed"] == summary["total"] and not summary["correct_flagged"] and summary["kink_mutants_classified_as_kink"]
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from .bench import markdown, run

    res = run(quick=args.quick, progress=(lambda line: None) if args.json else print)
    md = markdown(res)
    print(json.dumps(res, indent=2) if args.json else md)
    folder = Path(args.report)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (("benchmarks.json", json.dumps(res, indent=2) + "\n"), ("benchmarks.md", md)):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(folder / name)
    except OSError as err:
        raise SpecError("--report", f"cannot write to {folder} ({err.strerror or err})", "choose a writable folder") from None
    if not args.json:
        print(f"Written to {folder}/benchmarks.md and benchmarks.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bp-oracle", description="Check hand-written backprop against torch.autograd and say where it goes wrong.",
                                epilog="Exit codes: 0 match, 1 discrepancy found, 2 bad input.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("examples", help="list the built-in specs").set_defaults(func=cmd_examples)

    c = sub.add_parser("check", help="check one network against torch.autograd")
    c.add_argument("spec", nargs="?", help="spec JSON file")
    c.add_argument("--example", help="a built-in spec instead of a file (see `examples`)")
    c.add_argument("--impl", help="module:function or file.py:function to check (default: manual_bp)")
    c.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    c.add_argument("--batch", type=int, default=4, help="examples drawn when --data is not given (default 4)")
    c.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    c.add_argument("--params", help=".npz of parameters keyed layers.{i}.weight / layers.{i}.bias")
    c.add_argument("--data", help=".npz with arrays x and y")
    c.add_argument("--report", default=DEFAULT_REPORTS, help="folder for reports (default: reports/)")
    c.add_argument("--no-report", action="store_true", help="print the verdict only")
    c.set_defaults(func=cmd_check)

    f = sub.add_parser("fuzz", help="Hypothesis campaign over random architectures")
    f.add_argument("--examples", type=int, default=200, help="examples to run (default 200)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    f.add_argument("--impl", help="module:function or file.py:function to check (default: manual_bp)")
    f.add_argument("--report", default=DEFAULT_REPORTS, help="folder for reports (default: reports/)")
    f.add_argument("--no-report", action="store_true")
    f.set_defaults(func=cmd_fuzz)

    m = sub.add_parser("mutants", help="run the fault catalogue: every known-wrong backprop must be caught")
    m.add_argument("--examples", type=int, default=200, help="examples per mutant at most (default 200)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.add_argument("--report", default=DEFAULT_REPORTS, help="folder for mutants.md/json (default: reports/)")
    m.set_defaults(func=cmd_mutants)

    b = sub.add_parser("bench", help="speed and memory against torch and gradcheck, side by side")
    b.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under a minute)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("--report", default=DEFAULT_REPORTS, help="folder for benchmarks.md/json (default: reports/)")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("replay", help="re-run exactly the case a report recorded")
    r.add_argument("report_json", metavar="REPORT.json")
    r.set_defaults(func=cmd_replay)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch", "examples"):
        if getattr(args, name, 1) < 1:
            print(f"bp-oracle: error: --{name}: must be at least 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except SpecError as err:
        print(f"bp-oracle: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bp-oracle: interrupted; no report was left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
