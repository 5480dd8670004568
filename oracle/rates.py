r"""Detection rates and false alarms: how often the oracle catches a mutant, not whether it ever does.

``run_catalogue`` counts a mutant as killed after one failing example. A mutant the oracle lets
through one time in five is killed too. Here each bug mutant is measured per *cell*
(mutant × weight/data regime × dtype):

* ``per_cell`` cases are drawn reproducibly from the seed: the spec by Hypothesis from the mutant's
  own spec strategy (``@hypothesis.seed`` per mutant and regime, generate phase only, no database),
  the batch size and the data seed by NumPy from the same seed; weights and data by
  ``draw_params``/``draw_data`` in the cell's regime and dtype (exactly what ``cases()`` draws);
* a case counts (the denominator) only where the mutant *changes something*: its loss, gradients or
  δ, computed in float64 on the cell's (dtype-rounded) values, differ from the correct backward's
  beyond the strict bound of the cell's dtype, ‖g − ĝ‖ > rtol‖ĝ‖ + atol·S·√n
  (``oracle.compare.TOLERANCES``; S as the oracle takes it: S_δ, the largest |element| of the reference δ,
  for a δ, S_θ, of the reference parameter gradients, for those; the loss against rtol·|C| + atol·|C|).
  A bias averaged over a batch of one, or a bias left out of a forward whose biases are zero, changes
  nothing and is not counted; nor does a mutant whose only change is the other one-sided slope at
  elements exactly on a kink, at some of the layers that have them (a valid convention there); nor, in a
  float32 cell, one whose change vanishes when both it and the correct backward run in float32 (a
  saturated net whose every gradient underflows to the same zeros); nor one whose change to every tensor
  is within how far correct programs in the cell's dtype land from the float64 answer (torch, unless a
  bce guard makes it follow its own convention, and, in float32, manual_bp): no oracle that passes
  correct code can tell those apart by any norm;
* the numerator is the number of those cases where ``oracle.check`` does not pass the mutant
  (``bug``, ``forward``, ``crash``, or an unusable answer). A case the oracle refuses to judge at all
  (``SpecError``, e.g. a forward pass that overflows the dtype) is counted apart as ``refused``, and a
  pass that itself says "Weak check" (the rounding allowance is a large share of some gradient, so the
  case cannot tell: a norm of a nearly constant batch in float32, a gradient that is zero in exact
  arithmetic) apart as ``inconclusive``: neither claims anything about the mutant.
  The first missed case of each cell is kept with what replays it (``replay(info)``).

On the same draws, the correct backward and the kink-convention mutant run as controls: any verdict
that does not pass is a false alarm. ``false_alarms`` measures the same on ``cases()`` (every regime,
plus a share of saturated bce networks) for manual_bp and for an independently written second
correct implementation (``tests/impls/second_correct.py``).

``bp-oracle rates --per-cell 20 --false-alarms 100 --seed 0 [--until-changed N] [--workers W] [--report DIR]``
(or ``python -m oracle.rates`` with the same arguments) runs both and prints (and writes
``DIR/mutants/detection-rates.md`` and ``.json``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import manual_bp as bp
from manual_bp import Spec, SpecError

from .checker import CandidateError, check
from .compare import TOLERANCES, Scales
from .mutants import CATALOGUE, CORRECT, Mutant
from .strategies import (cases, cnn_specs, draw_data, draw_params, embedding_specs, fit_batch, per_step_specs,
                         sequence_model_specs, specs, with_norms, with_residuals)

RATE_REGIMES = ("well_conditioned", "saturated", "near_zero", "near_kinks", "exact_kinks")
DTYPES = ("float64", "float32")
THRESHOLD = 0.99
MAX_BATCH = 6
SCHEMA_VERSION = 1


# -- reproducible draws -----------------------------------------------------------------------------
def stable_seed(*parts) -> int:
    """A 32-bit seed from any parts, the same in every process (``hash`` is salted; crc32 is not)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def _hypothesis_draws(strategy: st.SearchStrategy, n: int, seed: int) -> list:
    """Up to ``n`` values of ``strategy``, the same ones for the same seed (generate phase, no database)."""
    out: list = []
    if n <= 0:
        return out

    @hypothesis.seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out[:n]


def draw_specs(strategy: st.SearchStrategy, n: int, seed: int) -> list:
    """(spec, batch, data_seed) for ``n`` cases: specs by Hypothesis, batch and data seed by NumPy."""
    drawn = _hypothesis_draws(strategy, n, seed)
    rng = np.random.default_rng(seed)
    return [(spec, fit_batch(spec, int(rng.integers(1, MAX_BATCH + 1))), int(rng.integers(0, 2**32))) for spec in drawn]


def build_case(spec: Spec, regime: str, dtype: str, batch: int, data_seed: int):
    """(params, x, y) of a case, exactly as ``cases()`` draws it from its seed."""
    rng = np.random.default_rng(data_seed)
    params = draw_params(spec, rng, regime, dtype)
    x, y = draw_data(spec, rng, regime, batch, dtype)
    return params, x, y


def replay(info: dict):
    """(spec, params, x, y) of a recorded case (a ``first_missed`` or false-alarm entry)."""
    spec = Spec.from_dict(info["spec"])
    return (spec, *build_case(spec, info["regime"], info["dtype"], info["batch"], info["data_seed"]))


# -- does the mutant change anything? ---------------------------------------------------------------
def _as_triple(result):
    if isinstance(result, tuple):
        return result[0], result[1], (result[2] if len(result) > 2 else None) or {}
    return result.loss, result.grads, getattr(result, "deltas", None) or {}


def _beyond(got, ref, rtol, atol, scale, floor=0.0, slack=0.0) -> bool:
    g = np.asarray(got, dtype=np.float64).ravel()
    r = np.asarray(ref, dtype=np.float64).ravel()
    if g.shape != r.shape:
        return True
    if r.size == 0:
        return False
    err = float(np.linalg.norm(g - r))
    if err != err:
        return True
    return err > max(rtol * float(np.linalg.norm(r)) + (atol * scale + floor) * np.sqrt(r.size), slack)


def changes_something(mutant: Mutant, spec: Spec, params: dict, x, y, dtype: str) -> bool:
    """Whether the mutant's loss, gradients or δ, in float64 on these values, differ from the correct
    backward's beyond the strict bound of ``dtype``, from every valid choice at exact kinks, and beyond how far
    correct programs in ``dtype`` land from the float64 answer (see the module docstring)."""
    p64 = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x64 = x if spec.token_input else np.asarray(x, dtype=np.float64)
    y64 = y if spec.loss.targets == "classes" else np.asarray(y, dtype=np.float64)
    tol = TOLERANCES[dtype]
    with np.errstate(all="ignore"):  # an overflow is an answer here (inf differs), not a warning
        try:
            ref = _as_triple(bp.gradients(spec, p64, x64, y64))
        except Exception:  # no float64 reference here: let the oracle judge (or refuse) the case
            return True
        try:
            got = _as_triple(mutant.grads_fn(spec, {k: v.copy() for k, v in p64.items()}, x64.copy(),
                                             np.array(y64, copy=True)))
        except Exception:  # a mutant that raises changes everything
            return True
        # a change below the dtype's smallest normal number cannot be represented there: not counted
        floor = float(np.finfo(dtype).tiny)
        if not _differ(got, ref, tol, floor, dtype):
            return False
        # a mutant that only takes the other one-sided slope at elements exactly on a kink, at some of the layers
        # that have them (the kink mutant is one; a ReLU mask dropped at layer 0 where every z₀ is exactly 0 is
        # another), makes a valid choice there: no oracle can call that a bug, so it is not counted
        if any(not _differ(got, other, tol, floor, dtype) for other in _kink_choices(spec, p64, x64, y64)):
            return False
        # run in the cell's own dtype, the mutant must still differ from the correct backward there: where
        # that arithmetic wipes the change out (both return the same float32 gradients, e.g. zeros where
        # a saturated net underflows), no oracle can tell the two programs apart on this case
        try:
            if np.dtype(dtype) == np.float64:
                witnesses = [_torch_in(spec, params, x, y, dtype)]
            else:
                ref_d = _as_triple(bp.gradients(spec, {k: v.copy() for k, v in params.items()}, np.array(x, copy=True), y))
                got_d = _as_triple(mutant.grads_fn(spec, {k: v.copy() for k, v in params.items()},
                                                   np.array(x, copy=True), np.array(y, copy=True)))
                if not _differ(got_d, ref_d, tol, floor, dtype):
                    return False
                witnesses = [_torch_in(spec, params, x, y, dtype), ref_d]
        except Exception:
            return True
        witnesses = [w for w in witnesses if w is not None]
        if not witnesses:
            return True
        # and the change must exceed, on some tensor, how far correct programs in the cell's dtype (torch, and
        # manual_bp) land from the float64 answer: an oracle that passes them cannot fail a smaller change by
        # any norm (a saturated l1 net whose float32 δ errs by 3e-5 where the mutant moves it by 2e-5; in float64,
        # a batch norm's bias gradient that cancels to 1e-9 of its terms, where torch and manual_bp differ by
        # 1e-6 of it and a Bessel factor moves it by 2e-7)
        distances = [_distance(w, ref) for w in witnesses]
        slack = {k: max(d.get(k, 0.0) for d in distances) for k in distances[0]}
        return _differ(got, ref, tol, floor, dtype, slack=slack)


def _kink_choices(spec: Spec, params: dict, x, y, most: int = 5):
    """The correct backward with the other one-sided slope at the exact kink elements of each subset of the
    places that have some (layers, and the loss): every subset where there are at most ``most`` such places,
    else each place alone and all of them."""
    cache = bp.forward(spec, params, x)
    places = [i for i, layer in enumerate(spec.layers)
              if layer.activation.other_side_slope() is not None and np.any(layer.activation.kinks(cache.z[i]))]
    if spec.loss.targets == "values" and np.any(spec.loss.kinks(*spec.loss.as_rows(cache.output, np.asarray(y)))):
        places.append("loss")
    if len(places) <= most:
        subsets = [set(c) for r in range(1, len(places) + 1) for c in itertools.combinations(places, r)]
    else:
        subsets = [{p} for p in places] + [set(places)]
    return (_as_triple(_other_slopes_at_kinks(spec, params, x, y, s)) for s in subsets)


def _other_slopes_at_kinks(spec: Spec, params: dict, x, y, flip=None):
    """The correct backward with the other one-sided derivative at every element exactly on a kink, at the layers
    (indices) and the loss (``"loss"``) in ``flip`` (all of them when None)."""
    from .mutants import Hooks, faulty_gradients

    def vjp(c, i, act, z, a, g):
        delta = act.vjp(z, a, g)
        slope = act.other_side_slope()
        if slope is None or (flip is not None and i not in flip):
            return delta
        return np.where(act.kinks(z), g * slope, delta)

    def loss_grad(spec_, a, y_):
        grad = spec_.loss.grad(a, y_)
        if spec_.loss.targets != "values" or (flip is not None and "loss" not in flip):
            return grad
        return np.where(spec_.loss.kinks(a, y_), 1.0 / a.size, grad)

    return faulty_gradients(spec, params, x, y, Hooks(vjp=vjp, loss_grad=loss_grad))


def _torch_in(spec: Spec, params: dict, x, y, dtype):
    """torch's (loss, grads, δ) run in ``dtype`` on the case's values, or None where a bce guard or log clamp is
    active (in float64 or in ``dtype``): torch then follows its own convention there, not the exact derivative
    manual_bp gives, and their distance says nothing about rounding."""
    from .conventions import find_guards
    from .twin import run_twin

    t = run_twin(spec, params, x, y, np.dtype(dtype))
    if spec.loss.name == "bce":
        p64 = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        t64 = t if np.dtype(dtype) == np.float64 else run_twin(spec, p64, np.asarray(x, np.float64),
                                                                  np.asarray(y, np.float64), np.float64)
        if find_guards(spec, t64, params, x, y, np.asarray(y, np.float64), dtype).mask is not None:
            return None
    return t.loss, t.grads, t.deltas


def _distance(got, ref) -> dict:
    """‖g − ĝ‖ of each tensor (and of the loss, ``"loss"``) of ``got`` from ``ref``."""
    (loss, grads, deltas), (ref_loss, ref_grads, ref_deltas) = got, ref
    out = {"loss": abs(float(loss) - float(ref_loss))}
    for mine, theirs in ((grads, ref_grads), (deltas, ref_deltas)):
        for name, r in theirs.items():
            if name in mine and np.shape(mine[name]) == np.shape(r):
                out[name] = float(np.linalg.norm(np.asarray(mine[name], np.float64).ravel() - np.asarray(r, np.float64).ravel()))
    return out


def _differ(got, ref, tol, floor: float = 0.0, dtype="float64", slack: dict | None = None) -> bool:
    """Whether some tensor of ``got`` (or the loss) lies beyond the strict bound of ``ref``'s, and beyond its
    ``slack`` (a distance per tensor: torch's own float32 error) where one is given."""
    (loss, grads, deltas), (ref_loss, ref_grads, ref_deltas) = got, ref
    ref_loss = float(ref_loss)
    scales = Scales.of_reference(ref_grads.values(), ref_deltas.values(), ref_loss, dtype, tol)  # as the oracle's
    s_theta, s_delta = scales.param, scales.delta
    slack = slack or {}

    def beyond(name, g, r, scale_):
        return _beyond(g, r, tol.rtol, tol.atol, scale_, floor, slack.get(name, 0.0))

    if beyond("loss", [float(loss)], [ref_loss], abs(ref_loss) or 1.0):
        return True
    for name, r in ref_grads.items():
        if name not in grads or beyond(name, grads[name], r, s_theta):
            return True
    return any(name in deltas and beyond(name, deltas[name], r, s_delta) for name, r in ref_deltas.items())


def verdict(spec: Spec, params: dict, x, y, grads_fn):
    """(classification, passed, CheckResult or None): ``oracle.check``'s verdict, or ``refused`` (passed None)
    where the oracle declines the case as one it cannot judge (e.g. a forward pass that overflows), or
    ``candidate_error`` (not passed) where the candidate's answer is unusable (wrong keys, shapes, dtypes)."""
    try:
        result = check(spec, params, x, y, grads_fn)
    except CandidateError:
        return "candidate_error", False, None
    except SpecError:
        return "refused", None, None
    return result.classification, result.passed, result


def is_weak(result) -> bool:
    """A pass whose notes say the case cannot tell a correct backward from a wrong one that close (the rounding
    allowance is a large share of some gradient itself: ``checker._weak_notes``). It claims nothing, so a mutant
    that passes this way is counted as *inconclusive*, apart from detected and missed."""
    return any(str(n).startswith("Weak check") for n in getattr(result, "notes", None) or [])


def _worst_message(result) -> str:
    """The explanation of the worst failing tensor (largest error over its bound), or the crash."""
    if result is None:
        return "the candidate's answer is unusable (CandidateError)"
    if getattr(result, "crash", None):
        return f"the candidate {result.crash.get('message', '')}"
    try:
        loss = getattr(result, "loss", None)
        bad = [t for t in ([loss] if loss is not None else []) + list(result.tensors) if not t.passed]

        def excess(t):
            allowed = getattr(t, "allowed_normwise", 0.0) or np.finfo(np.float64).tiny
            return getattr(t, "normwise_err", 0.0) / allowed

        return max(bad, key=excess).message() if bad else result.message()
    except Exception:  # the verdict's fields changed shape: its own full message still explains it
        return result.message()


def _tally(entry: dict, examples: str, keep: int, classification: str, passed, info) -> None:
    """Count one verdict of a correct implementation into ``entry``; keep the first ``keep`` false alarms."""
    entry["checks"] += 1
    entry["classifications"][classification] += 1
    entry["refused"] += passed is None
    if passed is False:
        entry["false_alarms"] += 1
        if len(entry[examples]) < keep:
            entry[examples].append(info())


def _case_info(spec, regime, dtype, batch, data_seed, **extra) -> dict:
    return {"spec": spec.to_dict(), "describe": spec.describe(), "regime": regime, "dtype": dtype,
            "batch": batch, "data_seed": data_seed, **extra}


# -- detection rates --------------------------------------------------------------------------------
def bug_mutants() -> list:
    return [m for m in CATALOGUE if m.kind == "bug"]


def kink_mutants() -> list:
    return [m for m in CATALOGUE if m.kind == "kink"]


def _control_entry() -> dict:
    return {"checks": 0, "refused": 0, "false_alarms": 0, "classifications": Counter(), "first_false_alarms": []}


def detection_rates(per_cell: int, seed: int, progress: Callable | None = None, *, mutants=None, regimes=RATE_REGIMES,
                    dtypes=DTYPES, controls: bool = True, keep: int = 3, until_changed: int | None = None,
                    workers: int = 1) -> dict:
    """Detection rate of every bug mutant per regime and dtype (see the module docstring).

    ``mutants`` (names) restricts the catalogue; ``regimes``/``dtypes`` the cells; ``controls=False``
    skips the correct and kink-mutant runs; ``progress(cell)`` is called after each cell. A case the
    oracle refuses to judge (``SpecError``, e.g. a forward pass that overflows the dtype) is counted in
    ``refused``, not in the denominator; an unusable answer (``CandidateError``) counts as detected.
    ``until_changed``: a cell stops drawing once that many of its cases changed something (``per_cell`` is then
    the most it draws), so that every cell's rate rests on about as many cases; ``workers`` > 1 measures the
    (mutant, regime) pairs in that many processes, with the same result as one.

    Returns ``{"schema", "schema_version", "per_cell", "until_changed", "seed", "threshold", "regimes", "dtypes",
    "cells": [{"mutant", "regime", "dtype", "drawn", "refused", "changed", "detected", "missed", "rate"
    (None when nothing changed), "verdicts", "first_missed", "hypothesis_seed", "seconds"}],
    "summary": {regime: {dtype: {"cells", "changed", "detected", "rate", "missed_as", "cells_below_threshold"}}},
    "controls": {name: {"checks", "refused", "false_alarms", "classifications", "first_false_alarms"}},
    "below_threshold": ["mutant/regime/dtype"], "empty_cells": [...], "passed", "checks",
    "seconds", "seconds_per_check"}``.
    """
    chosen = [m for m in bug_mutants() if mutants is None or m.name in mutants]
    units = [(m.name, r, per_cell, seed, tuple(dtypes), controls, keep, until_changed)
             for m in chosen for r in regimes if r in m.regimes]
    ctrl = {}
    cells, checks = [], 0
    start = time.perf_counter()
    for unit_cells, unit_ctrl, unit_checks in _mapped(_measure_pair, units, workers):
        checks += unit_checks
        for name, entry in unit_ctrl.items():
            _merge_control(ctrl.setdefault(name, _control_entry()), entry, keep)
        for cell in unit_cells:
            cells.append(cell)
            if progress:
                progress(cell)
    for entry in ctrl.values():
        entry["classifications"] = dict(entry["classifications"])
    seconds = time.perf_counter() - start
    summary = _summary(cells, regimes, dtypes)
    below = [f"{c['mutant']}/{c['regime']}/{c['dtype']}" for c in cells if c["rate"] is not None and c["rate"] < THRESHOLD]
    empty = [f"{c['mutant']}/{c['regime']}/{c['dtype']}" for c in cells if c["rate"] is None]
    return {
        "schema": "bp-oracle/detection-rates", "schema_version": SCHEMA_VERSION,
        "per_cell": per_cell, "until_changed": until_changed, "seed": seed, "threshold": THRESHOLD,
        "regimes": list(regimes), "dtypes": list(dtypes),
        "cells": cells, "summary": summary, "controls": ctrl, "below_threshold": below, "empty_cells": empty,
        "passed": not below, "checks": checks, "seconds": round(seconds, 2),
        "seconds_per_check": round(seconds / checks, 4) if checks else None,
    }


def _mapped(fn, items: list, workers: int):
    """``fn`` over ``items`` in order: here, or in ``workers`` spawned processes (torch's thread pools do not
    survive a fork)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, items)


def _merge_control(into: dict, entry: dict, keep: int) -> None:
    for k in ("checks", "refused", "false_alarms"):
        into[k] += entry[k]
    into["classifications"].update(entry["classifications"])
    into["first_false_alarms"].extend(entry["first_false_alarms"][:max(0, keep - len(into["first_false_alarms"]))])


def _measure_pair(unit) -> tuple[list, dict, int]:
    """The cells of one mutant in one regime (one per dtype), the controls' tallies on its draws, and the checks run."""
    name, regime, per_cell, seed, dtypes, controls, keep, until_changed = unit
    mutant = next(m for m in CATALOGUE if m.name == name)
    control_impls = ([("correct", CORRECT)] + [(m.name, m) for m in kink_mutants()]) if controls else []
    ctrl = {n: _control_entry() for n, _ in control_impls}
    hseed = stable_seed(seed, mutant.name, regime)
    draws = draw_specs(mutant.specs, per_cell, hseed)
    cells, checks = [], 0
    for dtype in dtypes:
        t0 = time.perf_counter()
        cell = {"mutant": mutant.name, "regime": regime, "dtype": dtype, "drawn": 0, "refused": 0,
                "inconclusive": 0,
                "changed": 0, "detected": 0, "missed": 0, "rate": None, "verdicts": Counter(), "first_missed": None,
                "hypothesis_seed": hseed}
        for k, (spec, batch, data_seed) in enumerate(draws):
            if until_changed is not None and cell["changed"] >= until_changed:
                break
            cell["drawn"] += 1
            params, x, y = build_case(spec, regime, dtype, batch, data_seed)
            for cname, impl in control_impls:
                classification, passed, r = verdict(spec, params, x, y, impl.grads_fn)
                checks += 1
                _tally(ctrl[cname], "first_false_alarms", keep, classification, passed, lambda: _case_info(
                    spec, regime, dtype, batch, data_seed, classification=classification,
                    drawn_for=mutant.name, case_index=k, hypothesis_seed=hseed, message=_worst_message(r)))
            if not changes_something(mutant, spec, params, x, y, dtype):
                continue
            classification, passed, r = verdict(spec, params, x, y, mutant.grads_fn)
            checks += 1
            if passed is None:  # the oracle cannot judge this case at all: not counted
                cell["refused"] += 1
                continue
            if passed and is_weak(r):  # a pass the oracle itself calls inconclusive: counted apart
                cell["inconclusive"] += 1
                continue
            cell["changed"] += 1
            cell["verdicts"][classification] += 1
            if not passed:
                cell["detected"] += 1
            elif cell["first_missed"] is None:
                cell["first_missed"] = _case_info(spec, regime, dtype, batch, data_seed,
                                                  classification=classification, case_index=k,
                                                  hypothesis_seed=hseed, notes=list(getattr(r, "notes", [])))
        cell["missed"] = cell["changed"] - cell["detected"]
        cell["rate"] = cell["detected"] / cell["changed"] if cell["changed"] else None
        cell["verdicts"] = dict(cell["verdicts"])
        cell["seconds"] = round(time.perf_counter() - t0, 3)
        cells.append(cell)
    return cells, ctrl, checks


PASSING = ("match", "rounding", "kink", "convention")


def _summary(cells, regimes, dtypes) -> dict:
    """Pooled over mutants, per regime and dtype: changed, detected, rate, and what the misses were called."""
    out = {}
    for regime in regimes:
        for dtype in dtypes:
            group = [c for c in cells if c["regime"] == regime and c["dtype"] == dtype]
            if not group:
                continue
            changed = sum(c["changed"] for c in group)
            detected = sum(c["detected"] for c in group)
            missed_as = Counter()
            for c in group:
                missed_as.update({k: v for k, v in c["verdicts"].items() if k in PASSING})
            out.setdefault(regime, {})[dtype] = {
                "cells": len(group), "changed": changed, "detected": detected,
                "rate": detected / changed if changed else None, "missed_as": dict(missed_as),
                "cells_below_threshold": sum(1 for c in group if c["rate"] is not None and c["rate"] < THRESHOLD)}
    return out


# -- false alarms -----------------------------------------------------------------------------------
def manual_bp_grads(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, r.grads, r.deltas


SECOND_CORRECT = Path(__file__).resolve().parents[1] / "tests" / "impls" / "second_correct.py"


def load_second_correct(path: Path | str = SECOND_CORRECT) -> Callable:
    """``grads`` of the independently written second correct implementation (a file in the repository)."""
    if not Path(path).is_file():
        raise SpecError("second_correct", f"{path} is not there (it ships with the repository, not the package)",
                        "run from a clone of the repository")
    spec = importlib.util.spec_from_file_location("bp_oracle_second_correct", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.grads


def default_impls() -> dict:
    impls = {"manual_bp": manual_bp_grads}
    if SECOND_CORRECT.exists():
        impls["second_correct"] = load_second_correct()
    return impls


def false_alarms(n: int, seed: int, impls: dict | None = None, progress: Callable | None = None, *,
                 dtypes=DTYPES, bce_share: float = 0.2, cnn_share: float = 0.2, norm_share: float = 0.15,
                 residual_share: float = 0.15, token_share: float = 0.05, sequence_share: float = 0.15,
                 keep: int = 5) -> dict:
    """Run ``n`` cases per dtype through ``oracle.check`` for each correct implementation in ``impls``
    (default: manual_bp and ``tests/impls/second_correct.py``); every verdict that does not pass is a
    false alarm.

    A share ``bce_share`` of the cases are saturated networks ending in bce (sigmoid or softmax), where
    torch's 1e-12 guard and the exact gradient part; a share ``cnn_share`` are random conv/pool nets
    (``cnn_specs()``, every regime); a share ``norm_share`` are dense or conv nets with normalization and dropout
    layers inserted (``with_norms()``, every regime), ``residual_share`` nets with residual blocks
    (``with_residuals()``), ``token_share`` token nets (``embedding_specs()``), ``sequence_share`` sequence models
    (``sequence_model_specs()``: rnn, lstm, gru, attention and transformer blocks, and ``per_step_specs()``, losses
    at every step); the rest come from ``cases()`` (dense, every regime).
    ``progress(impl, dtype, case, result)`` is called after each check.

    Returns ``{"schema", "schema_version", "n", "seed", "bce_share", "cnn_share", "dtypes", "impls": {impl: {dtype:
    {"checks", "refused", "false_alarms", "classifications", "examples"}}}, "total_false_alarms", "checks",
    "seconds", "seconds_per_check"}``; ``examples`` holds the first ``keep`` false alarms with the spec,
    regime, dtype, seed, batch, classification and the worst tensor's message. A case the oracle refuses
    (``SpecError``: it cannot judge it) is counted as ``refused``, not as a false alarm.
    """
    impls = impls if impls is not None else default_impls()
    out = {name: {} for name in impls}
    start, checks = time.perf_counter(), 0
    n_bce, n_cnn, n_norm = int(round(n * bce_share)), int(round(n * cnn_share)), int(round(n * norm_share))
    n_res, n_tok, n_seq = int(round(n * residual_share)), int(round(n * token_share)), int(round(n * sequence_share))
    for dtype in dtypes:
        general = _hypothesis_draws(cases(dtypes=(dtype,)), max(0, n - n_bce - n_cnn - n_norm - n_res - n_tok - n_seq),
                                    stable_seed(seed, "cases", dtype))
        bce = _hypothesis_draws(cases(specs_strategy=specs(losses=("bce",)), regimes=("saturated",), dtypes=(dtype,)),
                           n_bce, stable_seed(seed, "saturated-bce", dtype))
        cnn = _hypothesis_draws(cases(specs_strategy=cnn_specs(), dtypes=(dtype,)), n_cnn, stable_seed(seed, "cnn", dtype))
        norm = _hypothesis_draws(cases(specs_strategy=with_norms(), dtypes=(dtype,)), n_norm, stable_seed(seed, "norm", dtype))
        res = _hypothesis_draws(cases(specs_strategy=with_residuals(), dtypes=(dtype,)), n_res, stable_seed(seed, "residual", dtype))
        tok = _hypothesis_draws(cases(specs_strategy=embedding_specs(), dtypes=(dtype,)), n_tok, stable_seed(seed, "tokens", dtype))
        seq = _hypothesis_draws(cases(specs_strategy=sequence_model_specs() | per_step_specs(), dtypes=(dtype,), max_batch=4),
                                n_seq, stable_seed(seed, "sequence", dtype))
        drawn = ([("cases", c) for c in general] + [("saturated_bce", c) for c in bce] + [("cnn", c) for c in cnn]
                 + [("norm", c) for c in norm] + [("residual", c) for c in res] + [("tokens", c) for c in tok]
                 + [("sequence", c) for c in seq])
        for name, fn in impls.items():
            entry = {"checks": 0, "refused": 0, "false_alarms": 0, "classifications": Counter(), "examples": []}
            for source, case in drawn:
                classification, passed, r = verdict(case.spec, case.params, case.x, case.y, fn)
                checks += 1
                _tally(entry, "examples", keep, classification, passed, lambda: _case_info(
                    case.spec, case.regime, case.dtype, case.x.shape[0], case.seed, source=source,
                    classification=classification, message=_worst_message(r)))
                if progress:
                    progress(name, dtype, case, r)
            entry["classifications"] = dict(entry["classifications"])
            out[name][dtype] = entry
    seconds = time.perf_counter() - start
    return {
        "schema": "bp-oracle/false-alarms", "schema_version": SCHEMA_VERSION, "n": n, "seed": seed,
        "bce_share": bce_share, "cnn_share": cnn_share, "norm_share": norm_share, "residual_share": residual_share, "token_share": token_share, "sequence_share": sequence_share, "dtypes": list(dtypes), "impls": out,
        "total_false_alarms": sum(e["false_alarms"] for per in out.values() for e in per.values()),
        "checks": checks, "seconds": round(seconds, 2),
        "seconds_per_check": round(seconds / checks, 4) if checks else None,
    }


def measure(per_cell: int, n_false: int, seed: int = 0, progress: Callable | None = None) -> dict:
    """Both measurements, as one result for ``rates_markdown`` and ``write_reports``."""
    return {"schema": "bp-oracle/rates", "schema_version": SCHEMA_VERSION,
            "detection": detection_rates(per_cell, seed, progress),
            "false_alarms": false_alarms(n_false, seed)}


# -- tables -----------------------------------------------------------------------------------------
def _pct(rate) -> str:
    return "—" if rate is None else f"{100 * rate:.1f}%"


def shortfall_chance(detected: int, changed: int, target: float) -> float:
    """P(X ≤ detected) for X ~ Binomial(changed, target): how often a cell whose true detection rate *is* ``target``
    shows this few detections. Below 0.05 the cell's own data contradict the target; above it, the shortfall may be
    chance (50 cases cannot show 99%: a cell detecting 99% of all cases misses at least one of 50 four times in ten)."""
    return float(sum(math.comb(changed, k) * target ** k * (1 - target) ** (changed - k) for k in range(detected + 1)))


def _detection_md(d: dict) -> list:
    thr = d["threshold"]
    ok = d["passed"]
    below = [c for c in d["cells"] if c["rate"] is not None and c["rate"] < thr]
    contradict = [c for c in below if shortfall_chance(c["detected"], c["changed"], thr) < 0.05]
    lines = [
        f"## Detection rate ≥ {100 * thr:.0f}% in every cell: {'PASS' if ok else 'FAIL'}",
        "",
        f"{len(d['cells'])} cells (bug mutant × regime × dtype), "
        + (f"cases drawn per cell until {d['until_changed']} changed something (at most {d['per_cell']})"
           if d.get("until_changed") else f"{d['per_cell']} cases drawn per cell")
        + f", seed {d['seed']}; "
        f"{len(d['below_threshold'])} cell(s) below {100 * thr:.0f}%, {len(d['empty_cells'])} cell(s) where the mutant "
        f"changed nothing on any draw. A case counts only where the mutant changes the loss, a gradient or a δ "
        f"beyond the dtype's strict bound and beyond how far correct programs in that dtype (torch, manual_bp) "
        f"land from the float64 answer on that tensor, and not where it only takes the other valid slope at exact "
        f"kinks; the rate is the share of those the oracle does "
        f"not pass. A pass that "
        f"says \"Weak check\" (rounding alone could move the answer by a large share of the gradient, so the case "
        f"cannot tell) is counted apart as inconclusive: {sum(c.get('inconclusive', 0) for c in d['cells'])} in all. "
        f"{d['checks']} checks in {d['seconds']:.0f} s ({d['seconds_per_check'] or 0:.3f} s per check).",
        "",
        f"Of the cells below {100 * thr:.0f}%, {len(contradict)} contradict a true rate of {100 * thr:.0f}% at the 5% "
        f"level (P, the chance of so few detections at exactly {100 * thr:.0f}%, binomial, is below 0.05"
        + (": " + ", ".join(f"`{c['mutant']}/{c['regime']}/{c['dtype']}`" for c in contradict) if contradict else "")
        + "); for the others the shortfall may be chance at this many cases per cell.",
        "",
    ]
    if d.get("summary"):
        lines += ["Pooled over mutants:", "", "| regime | dtype | rate | detected / changed | cells below | missed as |",
                  "|---|---|---|---|---|---|"]
        for regime, per in d["summary"].items():
            for dtype, e in per.items():
                missed_as = ", ".join(f"{k} {v}" for k, v in sorted(e["missed_as"].items()))
                lines.append(f"| {regime} | {dtype} | {_pct(e['rate'])} | {e['detected']} / {e['changed']} | "
                             f"{e['cells_below_threshold']} / {e['cells']} | {missed_as or '—'} |")
        lines.append("")
    if d["below_threshold"]:
        lines += ["Below the threshold: " + ", ".join(f"`{c}`" for c in d["below_threshold"]), ""]
    lines += ["| mutant | regime | dtype | rate | detected / changed | drawn | missed as |", "|---|---|---|---|---|---|---|"]
    for c in d["cells"]:
        missed_as = ", ".join(f"{k} {v}" for k, v in sorted(c["verdicts"].items()) if k in PASSING)
        flag = (f" ❌ (P = {shortfall_chance(c['detected'], c['changed'], thr):.2g})"
                if c["rate"] is not None and c["rate"] < thr else "")
        refused = f" ({c['refused']} refused)" if c.get("refused") else ""
        refused += f" ({c['inconclusive']} inconclusive)" if c.get("inconclusive") else ""
        lines.append(f"| `{c['mutant']}` | {c['regime']} | {c['dtype']} | {_pct(c['rate'])}{flag} | "
                     f"{c['detected']} / {c['changed']} | {c['drawn']}{refused} | {missed_as or '—'} |")
    if d["controls"]:
        lines += ["", "Controls on the same draws (every verdict that does not pass is a false alarm):", "",
                  "| implementation | checks | false alarms | verdicts |", "|---|---|---|---|"]
        for name, e in d["controls"].items():
            verdicts = ", ".join(f"{k} {v}" for k, v in sorted(e["classifications"].items()))
            lines.append(f"| `{name}` | {e['checks']} | {e['false_alarms']} | {verdicts} |")
    missed = [c for c in d["cells"] if c["first_missed"]]
    if missed:
        lines += ["", "First missed case per cell (replay: `oracle.rates.replay(info)` on the JSON entry):", ""]
        for c in missed:
            f = c["first_missed"]
            lines.append(f"- `{c['mutant']}` / {c['regime']} / {c['dtype']}: {f['describe']}, batch {f['batch']}, "
                         f"data seed {f['data_seed']}, judged `{f['classification']}`")
    return lines


def _false_alarms_md(fa: dict) -> list:
    total = fa["total_false_alarms"]
    lines = [
        f"## False alarms of correct implementations: {total} in {fa['checks']} checks — {'PASS' if total == 0 else 'FAIL'}",
        "",
        f"{fa['n']} cases per dtype from `cases()` (every regime), {100 * fa['bce_share']:.0f}% of them saturated "
        f"networks ending in bce, {100 * fa.get('cnn_share', 0):.0f}% random conv/pool nets (`cnn_specs()`), "
        f"{100 * fa.get('norm_share', 0):.0f}% with norm/dropout layers (`with_norms()`), "
        f"{100 * fa.get('residual_share', 0):.0f}% with residual blocks (`with_residuals()`), "
        f"{100 * fa.get('token_share', 0):.0f}% token nets (`embedding_specs()`), "
        f"{100 * fa.get('sequence_share', 0):.0f}% sequence models (`sequence_model_specs()`, `per_step_specs()`); "
        f"seed {fa['seed']}; "
        f"{fa['seconds']:.0f} s ({fa['seconds_per_check'] or 0:.3f} s per check).",
        "",
        "| implementation | dtype | checks | false alarms | verdicts |", "|---|---|---|---|---|",
    ]
    for name, per in fa["impls"].items():
        for dtype, e in per.items():
            verdicts = ", ".join(f"{k} {v}" for k, v in sorted(e["classifications"].items()))
            lines.append(f"| `{name}` | {dtype} | {e['checks']} | {e['false_alarms']} | {verdicts} |")
    examples = [(name, ex) for name, per in fa["impls"].items() for e in per.values() for ex in e["examples"]]
    if examples:
        lines += ["", "First false alarms:", ""]
        for name, ex in examples:
            first = ex["message"].splitlines()
            lines.append(f"- `{name}`, {ex['dtype']}, {ex['regime']} ({ex['source']}): {ex['describe']}, batch {ex['batch']}, "
                         f"seed {ex['data_seed']}, judged `{ex['classification']}`: "
                         + " / ".join(s.strip() for s in first[:2]).replace("|", "/"))
    return lines


def rates_markdown(result: dict) -> str:
    """Markdown: the detection table (verdict line first) and the false-alarm table.

    ``result`` is ``measure()``'s dict, or a ``detection_rates`` or ``false_alarms`` dict on its own.
    """
    lines: list = []
    detection = result.get("detection") if "detection" in result else (result if "cells" in result else None)
    fa = result.get("false_alarms") if "false_alarms" in result else (result if "impls" in result else None)
    if detection is not None:
        lines += _detection_md(detection)
    if fa is not None:
        lines += ([""] if lines else []) + _false_alarms_md(fa)
    return "\n".join(lines) + "\n"


def write_reports(result: dict, folder: str | Path = "reports/mutants") -> tuple[Path, Path]:
    """Write ``detection-rates.md`` and ``detection-rates.json`` into ``folder`` (replacing them atomically)."""
    from .report import write_atomic_files

    folder = Path(folder)
    md, js = folder / "detection-rates.md", folder / "detection-rates.json"
    write_atomic_files({md: rates_markdown(result), js: json.dumps(result, indent=2, default=_json_default) + "\n"})
    return md, js


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Counter):
        return dict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def verdict_summary(result: dict) -> bool:
    """True when every cell reaches the threshold and no correct implementation was flagged."""
    fa_ok = result.get("false_alarms", {}).get("total_false_alarms", 0) == 0
    return bool(result["detection"]["passed"]) and fa_ok


def main(argv=None) -> int:
    """``python -m oracle.rates ARGS`` is ``bp-oracle rates ARGS``."""
    import sys

    from .cli import main as cli_main

    return cli_main(["rates", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
