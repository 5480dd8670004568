"""``bp-oracle campaign``: a reproducible campaign that keeps going after a failure and reports every distinct one.

Case i of a campaign is a pure function of (seed, i) (and of ``--nets`` and ``--dtype``, which choose what is drawn):

* cases come in shards of ``CHUNK`` consecutive indices, and a shard in networks of ``PER_NET`` consecutive cases:
  shard k's ``CHUNK // PER_NET`` specs are seeded Hypothesis draws from the nets' strategy (generate phase only, no
  database, ``@hypothesis.seed(stable_seed(seed, "campaign", nets, k))``, as ``oracle.rates`` draws its cells;
  Hypothesis's first, simplest value is kept in shard 0 only), so a spec never depends on how many cases were asked
  for or on who ran the shard before; each network's batch size comes from its own seeded generator;
* the regime, dtype and data seed of case i come from ``numpy.random.default_rng(stable_seed(seed, "case", i))``;
  weights and data from ``oracle.rates.build_case`` (exactly what ``strategies.cases()`` draws). A network's cases
  are judged together (``oracle.batch.check_many``: one batched torch reference, each verdict the one ``check``
  gives).

So the same seed and case count give the same cases on any machine and with any number of workers
(``workers > 1``: a ``ProcessPoolExecutor`` runs whole shards; results are merged in case order). The campaign does
not stop at a failure: every case that does not pass (``bug``, ``forward``, ``crash``, or an ``unusable`` answer)
gets a *signature*, (first divergent layer type or "output"/"input", that layer's activation, the loss, the
classification, the first hint's kind), and failures are grouped by it. Each group's first case is shrunk toward the
smallest network that still shows the same signature (``shrink``: its shard's seeded Hypothesis run replayed as a
property that fails on that signature, so Hypothesis shrinks the network; then its batch and data), and written
with a check report and its replay command.

The report ``DIR/campaign-<seed>/`` (``campaign.json`` schema "bp-oracle/campaign" version 1, ``campaign.md``,
``campaign.html``, ``worst-error.png``, ``groups/<group>/`` check reports) is written atomically. Everything in it but
the ``timing`` section is the same for the same seed, case count and options, whatever the number of workers
(and unless a time budget cut the run or the shrinking short, which the report says). Torch runs on one thread in
the campaign's process and in every worker, so a case gives the same numbers whichever process checks it; worst
errors are rounding noise, rounded to 4 digits, and their last digits can still differ on another CPU or BLAS.

Outcomes are folded into the report (``Tally``) as they are merged, so memory does not grow with the case count. With
``ray_address`` the shards run as Ray tasks (``oracle.cluster.run_ray``; the same report); with ``database`` (a Redis
URL) the campaign first replays the failures saved in Hypothesis's example database for its nets and candidate
(``replay_database``: groups "replayed from the database", listed first, in the report's ``database`` section too),
workers save each new signature's first failing case as they meet it, and each group's shrunk reproducer is saved at
the end (``oracle.cluster`` describes the keys and values). Those reports also depend on what the database held.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import json
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from manual_bp import Spec, SpecError

SCHEMA = "bp-oracle/campaign"
SCHEMA_VERSION = 1
#: cases per shard: one Hypothesis run draws a shard's specs, one worker task checks it
CHUNK = 32
#: cases per network: a shard draws CHUNK // PER_NET networks and checks each on PER_NET weight and data draws with
#: one batched torch reference (``oracle.batch``)
PER_NET = 16
#: batch sizes are drawn from 1..MAX_BATCH
MAX_BATCH = 6
#: random cases ``hypothesis.find`` may try before it has one with the group's signature (most are set aside at once:
#: a case without the signature's loss or layer type × activation is not checked)
SHRINK_EXAMPLES = 1000
#: seconds of shrinking for one group at most, and for all groups together by default
SHRINK_GROUP_SECONDS = 30.0
SHRINK_TOTAL_SECONDS = 120.0
#: classifications that fail a case (``refused``: the oracle cannot judge it; counted apart)
FAILING = ("forward", "bug", "crash", "unusable")
NETS = ("dense", "cnn", "norm", "residual", "tokens", "sequence", "all")
#: hints that say *where* (which batch row, channel or steps), not what: they depend on the draw, so they are
#: skipped when a signature takes its hint kind
LOCATION_HINTS = ("the error is confined to batch row", "only batch row", "the error is confined to channel", "only steps")

_STRATEGIES: dict = {}


def nets_strategy(nets: str):
    """The spec strategy of ``--nets`` (built once per process)."""
    if nets not in NETS:
        raise SpecError("--nets", f"{nets!r} is not a kind of network", f"choose one of {', '.join(NETS)}")
    if nets not in _STRATEGIES:
        from .fuzz import _nets

        _STRATEGIES[nets] = _nets(nets)
    return _STRATEGIES[nets]


def _dtypes(dtype: str) -> tuple:
    if dtype == "both":
        return ("float64", "float32")
    if dtype in ("float64", "float32"):
        return (dtype,)
    raise SpecError("--dtype", f"{dtype!r} is not a dtype", "choose float64, float32 or both")


# -- reproducible draws ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draw:
    """What case ``index`` of a campaign is: everything ``rates.build_case`` needs."""

    index: int
    spec: Spec
    regime: str
    dtype: str
    batch: int
    data_seed: int


def _settings(**kw):
    """Hypothesis settings built on the *default* profile, so a loaded test profile cannot change a draw."""
    from hypothesis import HealthCheck, settings

    base = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                derandomize=False)
    base.update(kw)
    return settings(settings.get_profile("default"), **base)


def _generate(strategy, n: int, seed: int) -> list:
    """``n`` values of ``strategy``, the same for the same seed in every process (``rates._hypothesis_draws`` with
    every setting explicit)."""
    import hypothesis
    from hypothesis import Phase, given

    out: list = []

    @hypothesis.seed(seed)
    @_settings(max_examples=n, phases=[Phase.generate])
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out[:n]


def draw_shard(seed: int, nets: str, dtypes: tuple, shard: int, strategy=None, regimes=None,
               per_net: int = PER_NET) -> list:
    """The ``CHUNK`` draws of shard ``shard`` (cases shard·CHUNK …): ``CHUNK // per_net`` specs by Hypothesis, each with
    one batch size for its ``per_net`` consecutive cases, and each case's regime, dtype and data seed by NumPy."""
    from .rates import stable_seed
    from .strategies import REGIMES, fit_batch

    strategy = nets_strategy(nets) if strategy is None else strategy
    regimes = tuple(regimes or REGIMES)
    n_specs = CHUNK // _per_net(per_net)
    # Hypothesis tries its simplest value first: shard 0 keeps it (the smallest net, checked once), the others drop it
    specs = _generate(strategy, n_specs + 1, stable_seed(seed, "campaign", nets, shard))[(shard > 0):]
    extra = 0
    while len(specs) < n_specs:  # Hypothesis gave fewer (a small strategy ran out): top up, still from the seed
        extra += 1
        specs += _generate(strategy, n_specs - len(specs), stable_seed(seed, "campaign", nets, shard, "more", extra))
        if extra > 50:
            raise SpecError("--nets", "the strategy gives too few distinct networks", "use a larger strategy")
    batches = [fit_batch(spec, int(np.random.default_rng(stable_seed(seed, "net", shard, n)).integers(1, MAX_BATCH + 1)))
               for n, spec in enumerate(specs[:n_specs])]
    out = []
    for j in range(CHUNK):
        index = shard * CHUNK + j
        rng = np.random.default_rng(stable_seed(seed, "case", index))
        regime = regimes[int(rng.integers(len(regimes)))]
        dtype = dtypes[int(rng.integers(len(dtypes)))]
        out.append(Draw(index, specs[j // per_net], regime, dtype, batches[j // per_net], int(rng.integers(0, 2**32))))
    return out


def draw_case(seed: int, index: int, *, nets: str = "all", dtype: str = "both", strategy=None, regimes=None,
              per_net: int = PER_NET) -> Draw:
    """Case ``index`` of the campaign ``seed`` (what ``bp-oracle campaign --seed seed`` checked as that case)."""
    return draw_shard(seed, nets, _dtypes(dtype), index // CHUNK, strategy, regimes, per_net)[index % CHUNK]


def _per_net(per_net) -> int:
    if type(per_net) is not int or per_net < 1 or CHUNK % per_net:
        divisors = ", ".join(str(d) for d in range(1, CHUNK + 1) if CHUNK % d == 0)
        raise SpecError("--per-net", f"{per_net!r} does not divide a shard of {CHUNK} cases", f"choose one of {divisors}")
    return per_net


def case_arrays(draw: Draw):
    """(params, x, y) of a draw."""
    from .rates import build_case

    return build_case(draw.spec, draw.regime, draw.dtype, draw.batch, draw.data_seed)


# -- judging one case ------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalize_kind(text: str) -> str:
    """A hint's kind: the text before its first colon, numbers replaced by #, at most 80 characters."""
    head = str(text).split(":", 1)[0]
    head = _NUMBER.sub("#", head)
    return " ".join(head.split())[:80] or "none"


def hint_kind(result) -> str:
    """The kind of the first hint on the tensor that localizes the failure: the first divergent layer's δ when it
    fails (its parameter gradients follow from it, and a one-element δ makes any of them "a constant ratio"), else
    that layer's failing parameter gradients, else the first failing tensor with a hint. Hints that only say which
    batch rows, channels or steps hold the error (``LOCATION_HINTS``) depend on the draw and are skipped; "none"
    without one."""
    k = result.first_divergent_layer
    failing = [t for t in result.tensors if not t.passed]
    own = [t for t in failing if t.layer == k and (k is not None or t.name == "input.grad")]
    delta = [t for t in own if t.name.endswith(".delta")]
    for tensors in (delta, own, failing):
        if not tensors:
            continue
        for t in tensors:
            for h in result.hints.get(t.name, []):
                if not str(h).startswith(LOCATION_HINTS):
                    return normalize_kind(h)
        return "none"
    return "none"


def signature(spec: Spec, classification: str, value) -> tuple:
    """(layer type or "output"/"input"/"none", its activation, loss, classification, hint kind) of a failing case;
    ``value`` is the CheckResult, or the CandidateError of an unusable answer."""
    from .graph import nodes

    loss = spec.loss.name
    if classification == "unusable":
        return ("none", "-", loss, classification, normalize_kind(getattr(value, "problem", value)))
    if classification == "crash":
        crash = value.crash or {}
        return ("none", "-", loss, classification, normalize_kind(crash.get("message") or crash.get("kind", "")))
    graph = nodes(spec)
    k = value.first_divergent_layer
    if k is not None and 0 <= k < len(graph):
        layer, act = graph[k].layer.type, graph[k].activation.name
    elif classification == "bug" and any(t.layer is None and not t.passed for t in value.tensors):
        layer, act = "input", "-"
    else:
        layer, act = "output", graph[-1].activation.name
    return (layer, act, loss, classification, hint_kind(value))


def judge(spec: Spec, params, x, y, impl):
    """(classification, passed, CheckResult | CandidateError | None): ``refused`` (passed None) where the oracle
    cannot judge the case, ``unusable`` (not passed) where the candidate's answer is unusable."""
    from .checker import CandidateError, check

    try:
        return verdict_of(check(spec, params, x, y, impl))
    except SpecError as err:
        return verdict_of(err)


def verdict_of(value):
    """``judge``'s triple from what ``check`` returned or raised (``batch.check_many`` hands back either)."""
    from .checker import CandidateError

    if isinstance(value, CandidateError):
        return "unusable", False, value
    if isinstance(value, SpecError):
        return "refused", None, None
    return value.classification, bool(value.passed and value.classification != "crash"), value


def _cells(spec: Spec) -> tuple:
    from .graph import nodes

    return tuple((n.layer.type, n.activation.name) for n in nodes(spec))


@dataclass
class Outcome:
    """One judged case, small enough to send back from a worker."""

    index: int
    classification: str
    passed: bool | None
    cells: tuple
    loss: str
    regime: str
    dtype: str
    batch: int
    data_seed: int
    worst: dict = field(default_factory=dict)  # (layer type, activation) -> worst normwise rel error (passing only)
    signature: tuple | None = None
    spec: dict | None = None                   # failures only
    summary: str = ""
    timeout: bool = False                      # a crash by --timeout (not shrunk: every try could wait that long)
    crash: dict | None = None                  # a timeout's crash record, for its report without calling again
    localization: str = ""

    @property
    def failed(self) -> bool:
        return self.passed is False


def evaluate(draw: Draw, impl, verdict=None) -> Outcome:
    """The outcome of one case; ``verdict`` (``judge``'s triple) when it was already judged (in a batch)."""
    if verdict is None:
        params, x, y = case_arrays(draw)
        verdict = judge(draw.spec, params, x, y, impl)
    classification, passed, value = verdict
    cells = _cells(draw.spec)
    out = Outcome(draw.index, classification, passed, cells, draw.spec.loss.name, draw.regime, draw.dtype,
                  draw.batch, draw.data_seed)
    if passed:
        for t in value.tensors:
            if t.layer is None or not (0 <= t.layer < len(cells)) or not math.isfinite(t.normwise_rel_err):
                continue
            cell = cells[t.layer]
            out.worst[cell] = max(out.worst.get(cell, 0.0), float(t.normwise_rel_err))
    elif passed is False:
        out.signature = signature(draw.spec, classification, value)
        out.spec = draw.spec.to_dict()
        out.summary = value.summary() if classification != "unusable" else str(value)
        out.timeout = classification == "crash" and (value.crash or {}).get("kind") == "timeout"
        if out.timeout:
            out.crash, out.localization = dict(value.crash), value.localization
    return out


def evaluate_net(draws: list, impl) -> list[Outcome]:
    """The outcomes of consecutive draws of one network, judged together (``batch.check_many``: one batched torch
    reference, the verdicts ``check`` gives)."""
    from .batch import check_many

    arrays = [case_arrays(d) for d in draws]
    results = check_many(draws[0].spec, arrays, impl, early=True)  # only verdicts are read: stop the ensemble early
    return [evaluate(d, impl, verdict_of(r)) for d, r in zip(draws, results)]


def run_shard(seed: int, nets: str, dtypes: tuple, shard: int, start: int, stop: int, impl, *, strategy=None,
              regimes=None, deadline: float | None = None, max_failures: int | None = None, on_case=None,
              record=None, per_net: int = PER_NET):
    """Judge cases ``start``..``stop`` − 1 of shard ``shard``; (outcomes, complete). Stops early (complete False)
    when the wall clock passes ``deadline`` (``time.time()``) or after ``max_failures`` failures. ``record(draw,
    outcome)`` is called on every failing case (``cluster.Recorder``: its first of each signature goes to the example
    database at once)."""
    draws = draw_shard(seed, nets, dtypes, shard, strategy, regimes, per_net)[start - shard * CHUNK: stop - shard * CHUNK]
    out, failures = [], 0
    nets_in_shard = [list(g) for _, g in itertools.groupby(draws, key=lambda d: id(d.spec))]
    for group in nets_in_shard:
        if deadline is not None and time.time() >= deadline:
            return out, False
        for d, o in zip(group, evaluate_net(group, impl)):
            out.append(o)
            failures += o.failed
            if o.failed and record is not None:
                record(d, o)
            if on_case is not None:
                on_case(o)
            if max_failures is not None and failures >= max_failures:
                return out, d.index == stop - 1
    return out, True


# -- worker processes ------------------------------------------------------------------------------------
_WORKER: dict = {}


def _worker_init(target, grads_fn, timeout):
    """A worker's candidate: started once per process (an --impl runs in its own child process, as in check).
    Each worker runs torch on one thread: the workers share the cores, and small checks gain nothing from more.
    Idempotent (a Ray worker calls it before every shard): a started --impl is kept while the target is the same."""
    import torch

    torch.set_num_threads(1)
    if not target:
        _WORKER["impl"] = grads_fn
        return
    if _WORKER.get("target") != (target, timeout):
        old = _WORKER.pop("started", None)
        if old is not None:
            old.close()
        from .cli import _start_impl

        impl = _start_impl(target, timeout)
        impl.ensure_loaded()
        atexit.register(impl.close)
        _WORKER["target"], _WORKER["started"] = (target, timeout), impl
    _WORKER["impl"] = _WORKER["started"]


def _worker_shard(job: dict):
    from .cluster import worker_recorder

    record = worker_recorder(job.get("database"), job.get("db_key"), job["seed"], job.get("run_id", ""))
    return run_shard(job["seed"], job["nets"], job["dtypes"], job["shard"], job["start"], job["stop"], _WORKER.get("impl"),
                     regimes=job["regimes"], deadline=job["deadline"], max_failures=job["max_failures"], record=record,
                     per_net=job.get("per_net", PER_NET))


# -- shrinking -------------------------------------------------------------------------------------------
def _digest(case) -> str:
    from .fuzz import _digest as digest

    return digest(case)


def spec_size(spec: Spec) -> tuple:
    """(nodes, parameters): what "smaller network" means here."""
    from .graph import nodes

    return len(nodes(spec)), int(sum(math.prod(s) for s in spec.param_shapes().values()))


def _no_bigger(a: Spec, b: Spec) -> bool:
    (na, pa), (nb, pb) = spec_size(a), spec_size(b)
    return na <= nb and pa <= pb


class _Found(Exception):
    """Raised inside the replayed shard when a spec shows the signature: Hypothesis then shrinks it."""


def shrink(rep: Draw, sig: tuple, strategy, impl, *, seed: int, nets: str, seconds: float,
           examples: int = SHRINK_EXAMPLES, per_net: int = PER_NET):
    """The smallest case Hypothesis finds with signature ``sig``, or ``rep`` itself. Returns (Draw, how,
    (classification, passed, value)), ``how`` one of "shrunk", "data shrunk", "not shrunk".

    1. The network: rep's shard is drawn again, the same seeded Hypothesis run over the nets' strategy, now as a
       property that fails on the first spec showing the signature with rep's regime, dtype, batch and data seed
       (rep's own spec does, so it is found again), and Hypothesis shrinks that spec toward the smallest network.
       Where the run does not reach it, ``hypothesis.find`` over the nets' cases looks for any case with the
       signature instead (kept only if its network is no bigger than rep's).
    2. The data: ``hypothesis.find`` over that network alone shrinks its batch and data seed.

    Deterministic for the same seed, unless ``seconds`` runs out (then the smallest case so far is returned)."""
    import hypothesis
    from hypothesis import Phase, find, given, strategies as st
    from hypothesis.errors import HypothesisException

    from .rates import build_case, stable_seed
    from .strategies import Case, cases, fit_batch

    deadline = time.monotonic() + max(0.0, seconds)
    memo: dict = {}
    layer, act, loss = sig[:3]

    def verdict(case):
        key = _digest(case)
        if key not in memo:
            if time.monotonic() > deadline:
                return None  # out of time: try nothing new (a case seen before still answers as it did)
            memo[key] = judge(case.spec, case.params, case.x, case.y, impl)
        return memo[key]

    def matches(case) -> bool:
        # cheap first: a case without the signature's loss, or without its layer type × activation, cannot show it
        if case.spec.loss.name != loss:
            return False
        if layer not in ("output", "input", "none") and (layer, act) not in _cells(case.spec):
            return False
        v = verdict(case)
        return v is not None and v[1] is False and signature(case.spec, v[0], v[2]) == sig

    def with_rep_data(spec):
        batch = fit_batch(spec, rep.batch)
        try:
            params, x, y = build_case(spec, rep.regime, rep.dtype, batch, rep.data_seed)
        except SpecError:
            return None
        return Case(spec, params, x, y, rep.dtype, rep.regime, rep.data_seed)

    def network_from_shard():
        last: list = []

        @hypothesis.seed(stable_seed(seed, "campaign", nets, rep.index // CHUNK))
        @_settings(max_examples=CHUNK // per_net + 1, phases=[Phase.generate, Phase.shrink])
        @given(strategy)
        def replayed(spec):
            case = with_rep_data(spec)
            if case is not None and matches(case):
                last[:] = [case]
                raise _Found

        try:
            replayed()
        except _Found:
            return last[0] if last else None
        except HypothesisException:
            return None
        return None

    def attempt(spec_strategy, label):
        strat = cases(specs_strategy=spec_strategy, regimes=(rep.regime,), dtypes=(rep.dtype,), max_batch=MAX_BATCH)
        try:
            return find(strat, matches, settings=_settings(max_examples=examples, phases=[Phase.generate, Phase.shrink]),
                        random=random.Random(stable_seed(seed, "shrink", label, *sig)))
        except HypothesisException:  # NoSuchExample, Unsatisfiable, Flaky
            return None

    best = network_from_shard()
    if best is None:
        found = attempt(strategy, "nets")
        if found is not None and _no_bigger(found.spec, rep.spec):
            best = found
    how = "shrunk" if best is not None else "data shrunk"
    if best is None:
        best = with_rep_data(rep.spec)
    smaller_data = attempt(st.just(best.spec), "data")
    if smaller_data is not None and smaller_data.x.shape[0] <= best.x.shape[0]:
        best = smaller_data
    elif how == "data shrunk":
        params, x, y = case_arrays(rep)
        return rep, "not shrunk", judge(rep.spec, params, x, y, impl)
    key = _digest(best)
    if key not in memo:  # rep's own case (only when nothing was tried): judge it
        memo[key] = judge(best.spec, best.params, best.x, best.y, impl)
    draw = Draw(rep.index, best.spec, best.regime, best.dtype, int(best.x.shape[0]), int(best.seed))
    return draw, how, memo[key]


# -- the campaign ----------------------------------------------------------------------------------------
def _round(v: float) -> float:
    """4 significant digits: a worst error is reported, not recomputed (and the last bits may differ across BLAS
    thread counts)."""
    return float(f"{v:.4g}")


def _case_info(draw: Draw) -> dict:
    return {"index": draw.index, "describe": draw.spec.describe(), "dtype": draw.dtype, "regime": draw.regime,
            "batch": draw.batch, "data_seed": draw.data_seed, "spec": draw.spec.to_dict(),
            "size": dict(zip(("nodes", "parameters"), spec_size(draw.spec)))}


def _command(*, examples, seed, nets, dtype, impl_name, max_failures, time_budget, per_net=PER_NET) -> str:
    parts = ["bp-oracle campaign", f"--examples {examples}", f"--seed {seed}", f"--nets {nets}", f"--dtype {dtype}"]
    if per_net != PER_NET:
        parts.append(f"--per-net {per_net}")
    if impl_name != "manual_bp":
        parts.append(f"--impl {shlex.quote(impl_name)}")
    if max_failures:
        parts.append(f"--max-failures {max_failures}")
    if time_budget:
        parts.append(f"--time-budget {time_budget:g}")
    return " ".join(parts)


def _one_torch_thread(fn):
    """Run ``fn`` with torch on one thread in this process, as in every worker: the cases are small, parallelism comes
    from ``workers``, and one setting everywhere gives the same numbers whichever process checks a case (torch's
    thread count can move a result's last bits). The caller's setting is restored after."""
    @functools.wraps(fn)
    def wrapper(**kw):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(**kw)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_one_torch_thread
def run_campaign(*, examples: int, seed: int, nets: str = "all", dtype: str = "both", impl=None,
                 impl_name: str = "manual_bp", impl_target: str | None = None, timeout: float = 60.0,
                 report_dir=None, max_failures: int | None = None, time_budget: float | None = None, workers: int | None = None,
                 shrink_seconds: float = SHRINK_TOTAL_SECONDS, shrink_examples: int = SHRINK_EXAMPLES,
                 specs_strategy=None, regimes=None, progress: bool = True, out=None, ray_address: str | None = None,
                 database: str | None = None, per_net: int = PER_NET) -> dict:
    """Run a campaign; returns the campaign report (the ``campaign.json`` dict, with ``"exit_code"`` added: 0 when no
    case failed, 1 when any did). Raises ``CandidateError`` (bad input, exit 2) after writing the report when the
    candidate's answer was unusable on some case.

    ``impl``: the grads function checked in this process (None: manual_bp; an ``IsolatedCandidate``/``ExecCandidate``
    already started); ``impl_target``: the ``--impl`` string each worker process starts for itself (workers > 1; without
    it the workers get ``impl`` pickled, which must then be a module-level function or None). ``specs_strategy``
    (with ``nets`` as its name in seeds) and ``regimes`` replace what is drawn (one worker only: a strategy does not
    travel to another process). ``ray_address``: run the shards as tasks on that Ray cluster (``oracle.cluster``);
    ``database``: a ``redis://`` URL: replay what its example database holds for this property first, and save every
    new failure there."""
    from tqdm import tqdm

    from .cluster import database_key, encode_entry, redact

    from .strategies import REGIMES

    out = out or sys.stdout
    if type(examples) is not int or examples < 1:
        raise SpecError("--examples", f"{examples!r} must be at least 1", "give --examples N with N ≥ 1")
    if workers is None:  # every core, once there is enough work to pay for starting the worker processes
        workers = default_workers(examples) if specs_strategy is None and ray_address is None else 1
    if type(workers) is not int or workers < 1:
        raise SpecError("--workers", f"{workers!r} must be at least 1", "give --workers W with W ≥ 1")
    if max_failures is not None and (type(max_failures) is not int or max_failures < 1):
        raise SpecError("--max-failures", f"{max_failures!r} must be at least 1", "give --max-failures K with K ≥ 1")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and math.isfinite(time_budget)
                                         and time_budget > 0):
        raise SpecError("--time-budget", f"{time_budget!r} is not a positive number of seconds", "give e.g. --time-budget 600")
    if not (math.isfinite(shrink_seconds) and shrink_seconds >= 0):
        raise SpecError("--shrink-seconds", f"{shrink_seconds!r} is not a number of seconds", "give e.g. --shrink-seconds 120")
    dtypes = _dtypes(dtype)
    per_net = _per_net(per_net)
    if specs_strategy is None:
        strategy = nets_strategy(nets)
    else:
        strategy = specs_strategy
        if workers > 1:
            raise SpecError("--workers", "a custom spec strategy runs in one process only", "give workers=1")
    if ray_address is not None and specs_strategy is not None:
        raise SpecError("--ray", "a custom spec strategy runs in one process only", "run it without ray_address")
    regimes = tuple(regimes or REGIMES)
    if hasattr(impl, "ensure_loaded"):
        impl.ensure_loaded()  # a started --impl: its import finished (SpecError naming --impl when it failed)
    db = None
    if database is not None:  # the extra, the URL and the server, each a one-line error (exit 2) before any case runs
        from .cluster import open_database

        db = _Guarded(open_database(database))
    session = None
    if ray_address is not None:
        from .cluster import connect_ray

        session = connect_ray(ray_address)

    t0, wall0 = time.perf_counter(), time.time()
    deadline = wall0 + time_budget if time_budget else None
    n_shards = math.ceil(examples / CHUNK)
    run_id = f"{os.getpid()}-{wall0!r}-{random.random()!r}"
    db_key = database_key(nets, impl_name) if db is not None else None

    def make_job(k: int) -> dict:
        return {"seed": seed, "nets": nets, "dtypes": dtypes, "shard": k, "start": k * CHUNK,
                "stop": min((k + 1) * CHUNK, examples), "regimes": regimes, "deadline": deadline,
                "max_failures": max_failures, "database": database, "db_key": db_key, "run_id": run_id,
                "per_net": per_net}

    # 1. what the example database holds for this property, replayed before any new case
    replay_groups, db_stats = [], None
    if db is not None:
        replay_groups, db_stats = replay_database(db, db_key, strategy=strategy, nets=nets, impl=impl,
                                                  shrink_seconds=shrink_seconds, shrink_examples=shrink_examples)
    replay_time = time.perf_counter() - t0

    # 2. the seeded cases, folded in case order
    tally = Tally(max_failures)
    stopped = None
    cluster_info = None
    bar = tqdm(total=examples, unit="case", desc="campaign", dynamic_ncols=True, file=sys.stderr,
               disable=None if progress else True)

    def show(n: int, fails: int):
        bar.update(n)
        bar.set_postfix(failures=fails, refresh=False)

    def consume(part, complete) -> bool:
        for o in part:
            if not tally.add(o):
                break
        return not tally.full

    impl_spec = _impl_spec(impl, impl_target, timeout)
    tc = time.perf_counter()
    try:
        if ray_address:
            from .cluster import run_ray

            cluster_info = run_ray(n_shards, make_job, session=session, address=ray_address, impl_spec=impl_spec, consume=consume,
                                   show=show, in_flight=workers if workers > 1 else None)
        elif workers == 1:
            record = None
            if db is not None:
                from .cluster import Recorder

                record = Recorder(db, db_key, seed)
            failures = 0
            for k in range(n_shards):
                def step(o):
                    nonlocal failures
                    failures += o.failed
                    show(1, failures)

                job = make_job(k)
                part, complete = run_shard(seed, nets, dtypes, k, job["start"], job["stop"], impl, strategy=strategy,
                                           regimes=regimes, deadline=deadline,
                                           max_failures=None if max_failures is None else max_failures - tally.failed,
                                           on_case=step, record=record, per_net=per_net)
                if not consume(part, complete) or not complete:
                    break
        else:
            _run_pool(n_shards, make_job, impl_spec=impl_spec, workers=workers, consume=consume, show=show)
    finally:
        bar.close()
    if tally.full and tally.cases < examples:
        stopped = {"reason": "max_failures",
                   "message": f"stopped after {max_failures} failure{'s' if max_failures > 1 else ''} "
                              f"(--max-failures {max_failures}): {tally.cases} of {examples} cases ran"}
    elif tally.cases < examples and cluster_info is not None and cluster_info.get("lost"):
        lost = cluster_info["lost"]
        stopped = {"reason": "lost_shard",
                   "message": f"shard {lost['shard']} (cases {lost['shard'] * CHUNK}…) was lost on the Ray cluster after "
                              f"its retries ({lost['error']}): {tally.cases} of {examples} cases ran"}
    elif tally.cases < examples:
        stopped = {"reason": "time_budget",
                   "message": f"stopped by --time-budget {time_budget:g}: {tally.cases} of {examples} cases ran"}
    case_seconds = time.perf_counter() - tc

    summary = tally.summary()
    groups = summary.pop("_groups")

    # 3. shrink each new group's first case, in order of first appearance; a signature the database already had keeps
    #    the reproducer replayed from it (no second shrink), and counts this campaign's cases with it
    shrink_left = max(0.0, shrink_seconds - (db_stats or {}).get("shrink_seconds", 0.0))
    if deadline is not None:
        shrink_left = min(shrink_left, max(10.0, deadline - time.time()))
    ts = time.perf_counter()
    main_impl = impl
    by_sig = {rg["signature"]: rg for rg in replay_groups}
    shrunk: list = []
    for rg in replay_groups:
        rg["campaign"] = None
        shrunk.append(("database", rg, rg["draw"], rg["how"], rg["note"], rg["verdict"]))
    for g in groups:
        if g["signature"] in by_sig:
            by_sig[g["signature"]]["campaign"] = g
            continue
        rep_o = g["rep"]
        rep = Draw(rep_o.index, Spec.from_dict(rep_o.spec), rep_o.regime, rep_o.dtype, rep_o.batch, rep_o.data_seed)
        budget = min(SHRINK_GROUP_SECONDS, shrink_left - (time.perf_counter() - ts))
        final = False
        if rep_o.timeout:  # its verdict as recorded: calling the candidate again could wait --timeout again
            from .checker import CheckResult
            from .compare import TOLERANCES

            note = "not shrunk: the candidate timed out on it (every try could wait --timeout again)"
            result = CheckResult(rep.spec, rep.dtype, False, "crash", TOLERANCES[rep.dtype], 0.0, None, [], None,
                                 rep_o.localization, crash=rep_o.crash)
            draw, how, verdict = rep, "not shrunk", ("crash", False, result)
            final = True
        elif budget <= 0:
            note = "not shrunk: the shrinking budget ran out"
            params, x, y = case_arrays(rep)
            draw, how, verdict = rep, "not shrunk", judge(rep.spec, params, x, y, main_impl)
        else:
            g0 = time.perf_counter()
            draw, how, verdict = shrink(rep, g["signature"], strategy, main_impl, seed=seed, nets=nets, seconds=budget,
                                        examples=shrink_examples, per_net=per_net)
            note = SHRINK_NOTES[how]
            final = True
            if time.perf_counter() - g0 >= budget:
                note += f" (the {budget:.0f} s shrinking budget ran out: it may not be the smallest)"
                final = False
        if db is not None and verdict[1] is False and signature(draw.spec, verdict[0], verdict[2]) == g["signature"]:
            db.save(db_key, encode_entry(draw, g["signature"], seed=seed, how=how, final=final))
            db_stats["saved"] += 1
        shrunk.append(("campaign", g, draw, how, note, verdict))
    shrink_time = time.perf_counter() - ts
    if db is not None:
        db_stats["removed"] += _drop_raw(db, db_key, {row[1]["signature"] for row in shrunk})

    report = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "command": _command(examples=examples, seed=seed, nets=nets, dtype=dtype, impl_name=impl_name,
                            max_failures=max_failures, time_budget=time_budget, per_net=per_net),
        "seed": seed, "examples": examples, "nets": nets, "dtypes": list(dtypes), "regimes": list(regimes),
        "impl": impl_name, "chunk": CHUNK, "per_net": per_net, "max_batch": MAX_BATCH,
        "stopped_early": stopped,
        **summary,
        "database": None,
        "groups": [],
    }
    if db is not None:
        report["database"] = {"url": redact(database), "key": db_key.decode(),
                              **{k: db_stats[k] for k in ("entries", "failing", "removed", "saved")},
                              "replayed_groups": len(replay_groups), "error": db.error}
    group_rows = []
    for n, (source, g, draw, how, note, verdict) in enumerate(shrunk, 1):
        classification, passed, value = verdict
        reproduced = passed is False and signature(draw.spec, classification, value) == g["signature"]
        camp = g if source == "campaign" else g["campaign"]
        summary_text = ((value.summary() if classification != "unusable" else str(value)) if value is not None else "")
        row = {"id": n, "source": source,
               "signature": dict(zip(("layer", "activation", "loss", "classification", "hint"), g["signature"])),
               "count": camp["count"] if camp else 0, "first_case": camp["rep"].index if camp else None,
               "cases": camp["cases"][:20] if camp else [],
               "dtypes": dict(sorted(camp["dtypes"].items())) if camp else {},
               "regimes": dict(sorted(camp["regimes"].items())) if camp else {},
               "first_summary": camp["rep"].summary if camp else summary_text,
               "replayed": None if source == "campaign" else {"entries": g["entries"], **g["from"]},
               "shrunk": {**_case_info(draw), "how": how, "note": note, "reproduces": reproduced,
                          "summary": summary_text},
               "report": None, "replay": None}
        group_rows.append((row, draw, value, classification))
        report["groups"].append(row)
    report["totals"]["groups"] = sum(1 for row in report["groups"] if row["count"])  # groups of this campaign's cases
    wall = time.perf_counter() - t0
    report["timing"] = {"seconds": round(wall, 3), "case_seconds": round(case_seconds, 3),
                        "shrink_seconds": round(shrink_time, 3),
                        "cases_per_second": round(tally.cases / case_seconds, 1) if case_seconds > 0 else None,
                        "workers": cluster_info["cpus"] if cluster_info else workers, "time_budget": time_budget}
    if cluster_info is not None:
        report["timing"]["ray"] = cluster_info
    if db is not None:
        report["timing"]["replay_seconds"] = round(replay_time, 3)

    folder = None
    if report_dir is not None:
        folder = _write_report(Path(report_dir), report, group_rows, impl_name=impl_name, seed=seed)
        report["timing"]["seconds"] = round(time.perf_counter() - t0, 3)
    _print_summary(report, folder, out)
    unusable = next((value for row, _, value, cls in group_rows if cls == "unusable"), None)
    report["exit_code"] = 1 if summary["totals"]["failed"] or report["groups"] else 0
    if unusable is not None:
        raise unusable
    return report


SHRINK_NOTES = {"shrunk": "shrunk by Hypothesis toward the smallest network with the same signature",
                "data shrunk": "its network kept; batch and data shrunk by Hypothesis",
                "not shrunk": "not shrunk: Hypothesis found no smaller case with the same signature"}


#: below this many cases a campaign runs in one process by default: a worker takes ~2 s to start (torch's import)
POOL_MIN_EXAMPLES = 1000


def default_workers(examples: int) -> int:
    """Every core this process may use, for campaigns of at least ``POOL_MIN_EXAMPLES`` cases; else 1."""
    if examples < POOL_MIN_EXAMPLES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores)


def _impl_spec(impl, impl_target, timeout) -> tuple:
    """(target, grads_fn, timeout) for ``_worker_init`` in another process: a started --impl is started again there
    from its target; an in-process function travels pickled (a module-level function, or None for manual_bp)."""
    grads_fn = None
    if not impl_target:
        impl_target = getattr(impl, "target", None)
        grads_fn = None if impl_target else impl
    return impl_target, grads_fn, timeout


#: outstanding shards per local worker process
POOL_IN_FLIGHT = 4



class InOrder:
    """Finished shards handed to ``consume(part, complete)`` in shard order, as far as they are contiguous (so the
    report is the same however they finished), progress shown (``show(n, failures so far)``) as each arrives.
    ``stop`` turns True once ``consume`` says so or a shard comes back incomplete; ``next`` is the next shard due."""

    def __init__(self, consume, show):
        self.consume, self.show = consume, show
        self.done: dict = {}
        self.next = self.failures = 0
        self.stop = False

    def add(self, k: int, part: list, complete: bool) -> bool:
        """Shard k finished with outcomes ``part``; merge what is now contiguous. Returns ``stop``."""
        self.done[k] = (part, complete)
        self.failures += sum(o.failed for o in part)
        self.show(len(part), self.failures)
        while not self.stop and self.next in self.done:
            part, complete = self.done.pop(self.next)
            self.next += 1
            self.stop = not self.consume(part, complete) or not complete
        return self.stop


def _run_pool(n_shards: int, make_job, *, impl_spec, workers: int, consume, show) -> None:
    """Shards in a spawn process pool, at most ``POOL_IN_FLIGHT`` per worker outstanding; ``consume(part, complete)``
    gets them in case order (False: stop) up to the first shard that stopped early."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    merged = InOrder(consume, show)
    next_submit = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=impl_spec) as pool:
        futures: dict = {}
        try:
            while merged.next < n_shards and not merged.stop:
                while next_submit < n_shards and len(futures) < POOL_IN_FLIGHT * workers:
                    futures[pool.submit(_worker_shard, make_job(next_submit))] = next_submit
                    next_submit += 1
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in finished:
                    merged.add(futures.pop(fut), *fut.result())
        finally:
            for fut in futures:
                fut.cancel()


# -- the example database -------------------------------------------------------------------------------
class _Guarded:
    """The example database with every call guarded: after the first error (Redis gone mid-campaign) the campaign goes
    on without it, and the report says so in ``database.error``."""

    def __init__(self, db):
        self.db, self.error = db, None

    def _call(self, what, *args, default=None):
        if self.error is not None:
            return default
        try:
            out = getattr(self.db, what)(*args)
            return list(out) if what == "fetch" else out
        except Exception as err:  # redis.RedisError, OSError
            self.error = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
            print(f"bp-oracle: warning: the example database failed ({self.error}); going on without it",
                  file=sys.stderr)
            return default

    def fetch(self, key):
        return self._call("fetch", key, default=[])

    def save(self, key, value):
        self._call("save", key, value)

    def delete(self, key, value):
        self._call("delete", key, value)


def _drop_raw(db, key: bytes, signatures: set) -> int:
    """Delete the raw entries (``<key>.secondary``) of signatures that now have a reproducer in the primary key."""
    from .cluster import decode_entry, secondary

    removed = 0
    for value in db.fetch(secondary(key)):
        dec = decode_entry(value)
        if dec is None or dec[1]["signature"] in signatures:
            db.delete(secondary(key), value)
            removed += 1
    return removed


@dataclass
class _Saved:
    key: bytes
    value: bytes
    draw: Draw
    entry: dict
    verdict: tuple
    sig: tuple


def replay_database(db, key: bytes, *, strategy, nets: str, impl, shrink_seconds: float = SHRINK_TOTAL_SECONDS,
                    shrink_examples: int = SHRINK_EXAMPLES):
    """Replay every reproducer saved under ``key`` (shrunk ones) and ``<key>.secondary`` (raw failing cases saved by
    workers), before any new case. Returns (groups, stats): one group per signature still failing, in a fixed order
    (primary entries first, each key's values in byte order), with its smallest reproducer; stats counts the entries,
    those still failing, those removed and those saved.

    The database is tidied as Hypothesis tidies its own: an entry that no longer fails (the bug was fixed), or that
    this version cannot read, is deleted; of the entries with the same signature only the smallest is kept, in the
    primary key; a raw or unfinished one is shrunk first (its own campaign's seed and case index replay its shard),
    within ``shrink_seconds`` altogether."""
    from .cluster import decode_entry, encode_entry, secondary

    stats = {"entries": 0, "failing": 0, "removed": 0, "saved": 0, "shrink_seconds": 0.0}
    saved: list = []
    for k in (key, secondary(key)):
        for value in sorted(set(db.fetch(k))):
            stats["entries"] += 1
            dec = decode_entry(value)
            verdict = None
            if dec is not None:
                try:
                    params, x, y = case_arrays(dec[0])
                    verdict = judge(dec[0].spec, params, x, y, impl)
                except SpecError:
                    verdict = None
            if verdict is None or verdict[1] is not False:
                db.delete(k, value)  # unreadable, or it passes now
                stats["removed"] += 1
                continue
            saved.append(_Saved(k, value, dec[0], dec[1], verdict, signature(dec[0].spec, verdict[0], verdict[2])))
    stats["failing"] = len(saved)
    by_sig: dict = {}
    for s in saved:
        by_sig.setdefault(s.sig, []).append(s)
    groups = []
    ts = time.perf_counter()
    for sig, members in by_sig.items():
        best = min(members, key=lambda s: (spec_size(s.draw.spec), s.draw.batch, not s.entry["final"], s.key != key,
                                           s.value))
        for s in members:
            if s is not best:
                db.delete(s.key, s.value)
                stats["removed"] += 1
        draw, verdict, how, final = best.draw, best.verdict, best.entry["how"], bool(best.entry["final"])
        note = "replayed from the database" + (f" ({SHRINK_NOTES[how].split(':')[0]} when it was saved)"
                                               if how in SHRINK_NOTES else "")
        timed_out = verdict[0] == "crash" and ((getattr(verdict[2], "crash", None) or {}).get("kind") == "timeout")
        budget = min(SHRINK_GROUP_SECONDS, shrink_seconds - (time.perf_counter() - ts))
        if not final and not timed_out and budget > 0:
            g0 = time.perf_counter()
            s_draw, s_how, s_verdict = shrink(draw, sig, strategy, impl, seed=int(best.entry["seed"]), nets=nets,
                                              seconds=budget, examples=shrink_examples)
            if s_verdict[1] is False and signature(s_draw.spec, s_verdict[0], s_verdict[2]) == sig:
                draw, verdict, how = s_draw, s_verdict, s_how
                final = time.perf_counter() - g0 < budget
                note = "replayed from the database, then " + SHRINK_NOTES[how]
        value = encode_entry(draw, sig, seed=int(best.entry["seed"]), how=how, final=final)
        if (best.key, best.value) != (key, value):
            db.save(key, value)
            db.delete(best.key, best.value)
            stats["saved"] += 1
        groups.append({"signature": sig, "entries": len(members), "draw": draw, "verdict": verdict, "how": how,
                       "note": note, "from": {"seed": int(best.entry["seed"]), "index": int(best.entry["index"])}})
    stats["shrink_seconds"] = time.perf_counter() - ts
    return groups, stats


class Tally:
    """The report's totals, coverage, worst errors and failure groups, folded from outcomes taken in case order: its
    memory grows with the groups and the cells, not with the number of cases. It takes no outcome after the
    ``max_failures``-th failure."""

    def __init__(self, max_failures: int | None = None):
        self.max_failures = max_failures
        self.cases = self.passed = self.failed = self.refused = self.layers_checked = 0
        self.classifications = collections.Counter()
        self.by_dtype = collections.defaultdict(collections.Counter)
        self.layers = collections.Counter()
        self.losses, self.regimes, self.dtypes = collections.Counter(), collections.Counter(), collections.Counter()
        self.worst: dict = {}
        self.checks = collections.Counter()
        self.groups: dict = {}

    @property
    def full(self) -> bool:
        return self.max_failures is not None and self.failed >= self.max_failures

    def add(self, o: Outcome) -> bool:
        """Take ``o`` (the next case in order); False when the tally is full (``o`` was not taken, or was the last
        failure it takes)."""
        if self.full:
            return False
        self.cases += 1
        self.classifications[o.classification] += 1
        self.by_dtype[o.dtype][o.classification] += 1
        if o.passed is None:
            self.refused += 1
            return True
        self.passed += bool(o.passed)
        self.failed += not o.passed
        self.layers_checked += len(o.cells)
        for cell in o.cells:
            self.layers[cell] += 1
        self.losses[o.loss] += 1
        self.regimes[o.regime] += 1
        self.dtypes[o.dtype] += 1
        if o.passed:
            for cell, err in o.worst.items():
                k = (*cell, o.dtype)
                self.worst[k] = max(self.worst.get(k, 0.0), err)
                self.checks[k] += 1
        else:
            g = self.groups.get(o.signature)
            if g is None:
                g = self.groups[o.signature] = {"signature": o.signature, "rep": o, "count": 0, "cases": [],
                                                "dtypes": collections.Counter(), "regimes": collections.Counter()}
            g["count"] += 1
            if len(g["cases"]) < 20:
                g["cases"].append(o.index)
            g["dtypes"][o.dtype] += 1
            g["regimes"][o.regime] += 1
        return not self.full

    def summary(self) -> dict:
        layers = self.layers
        types = sorted({c[0] for c in layers}, key=lambda t: (-sum(v for c, v in layers.items() if c[0] == t), t))
        acts = sorted({c[1] for c in layers}, key=lambda a: (-sum(v for c, v in layers.items() if c[1] == a), a))
        return {
            "totals": {"cases": self.cases, "passed": self.passed, "failed": self.failed, "refused": self.refused,
                       "groups": len(self.groups), "classifications": dict(sorted(self.classifications.items())),
                       "by_dtype": {dt: dict(sorted(c.items())) for dt, c in sorted(self.by_dtype.items())}},
            "coverage": {"layers_checked": self.layers_checked,
                         "layer_types": types, "activations": acts,
                         "matrix": [[layers.get((t, a), 0) for a in acts] for t in types],
                         "cells": [{"layer": t, "activation": a, "count": n} for (t, a), n in sorted(layers.items())],
                         "losses": dict(sorted(self.losses.items())), "regimes": dict(sorted(self.regimes.items())),
                         "dtypes": dict(sorted(self.dtypes.items()))},
            "worst_error": {"what": "the worst normwise relative error ‖g − ĝ‖/‖ĝ‖ of a layer's tensors (δ and parameter "
                                    "gradients) among passing checks, per layer type × activation and dtype (where a gradient is nearly zero "
                                    "its bound is absolute, so a passing check may show a large relative error there)",
                            "cells": [{"layer": t, "activation": a, "dtype": dt, "worst": _round(v),
                                       "checks": self.checks[(t, a, dt)]}
                                      for (t, a, dt), v in sorted(self.worst.items())]},
            "_groups": list(self.groups.values()),
        }


def _aggregate(merged: list) -> dict:
    """The summary of outcomes in case order (``Tally`` over a list)."""
    tally = Tally()
    for o in merged:
        tally.add(o)
    return tally.summary()


# -- the report ------------------------------------------------------------------------------------------
def _write_tree(final: Path, build) -> Path:
    """Build a folder with ``build(tmp)`` in a temporary folder beside ``final``, then swap it into place
    (``oracle.report``'s atomic swap): the final name holds the old or the new complete campaign, never half."""
    from . import report as rp

    if not rp._safe_component(final.name):
        raise rp._report_error(f"{str(final)!r} is not a valid report folder path")
    parent = final.parent
    rp._prepare_parent(parent)
    rp.clean_stale(parent)
    rp._check_final(final)
    mask = rp._umask()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".bpo-tmp-{os.getpid()}-", suffix=f".{final.name}", dir=parent))
    except OSError as err:
        raise rp._report_error(f"cannot write to {parent} ({rp._why(err)})", "choose a writable folder") from None
    try:
        os.chmod(tmp, 0o777 & ~mask)
        build(tmp)
        rp._swap_into_place(tmp, final)
    except OSError as err:
        raise rp._report_error(f"cannot write the campaign report {final} ({rp._why(err)}); nothing was changed there",
                               "free some space or choose another --report folder") from None
    finally:
        rp._remove(str(tmp))
    return final


def _write_report(report_dir: Path, report: dict, group_rows: list, *, impl_name: str, seed: int) -> Path:
    from .report import slug, write_check_report

    final = report_dir / f"campaign-{seed}"
    for row, draw, value, classification in group_rows:
        s = row["signature"]
        name = slug(f"group-{row['id']:02d}-{s['layer']}-{s['activation']}-{s['loss']}-{s['classification']}", 150, "report")
        row["_name"] = name
        if value is not None and classification != "unusable" and draw is not None:
            path = final / "groups" / name / "report.json"
            replay = f"bp-oracle replay {shlex.quote(str(path))}"
            if impl_name != "manual_bp":
                replay += f" --impl {shlex.quote(impl_name)}"
            row["report"] = f"groups/{name}"
            row["replay"] = replay

    def build(tmp: Path):
        for row, draw, value, classification in group_rows:
            if row["report"] is None:
                continue
            params, x, y = case_arrays(draw)
            x2 = x
            write_check_report(tmp / "groups", value, params=params, x=x2, y=np.asarray(y), seed=draw.data_seed,
                               impl=impl_name, replay=row["replay"],
                               source=f"campaign seed {seed}, group {row['id']}", folder_name=row["_name"])
        for row, *_ in group_rows:
            row.pop("_name", None)
        png = heatmap_png(report)
        files = {"campaign.json": json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                 "campaign.md": markdown(report), "campaign.html": html(report, png), "worst-error.png": png}
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            with open(tmp / name, "wb") as f:
                f.write(data)

    return _write_tree(final, build)


def comparable(report: dict) -> dict:
    """The report without its timing section (what must be the same for the same seed, any number of workers)."""
    return {k: v for k, v in report.items() if k not in ("timing", "exit_code")}


def _worst_grid(report: dict):
    """(layer types, activations, dtypes, {dtype: matrix of worst errors or None})."""
    cells = report["worst_error"]["cells"]
    types = [t for t in report["coverage"]["layer_types"] if any(c["layer"] == t for c in cells)]
    acts = [a for a in report["coverage"]["activations"] if any(c["activation"] == a for c in cells)]
    dts = [d for d in ("float64", "float32") if any(c["dtype"] == d for c in cells)]
    grids = {}
    for dt in dts:
        m = [[None] * len(acts) for _ in types]
        for c in cells:
            if c["dtype"] == dt:
                m[types.index(c["layer"])][acts.index(c["activation"])] = c["worst"]
        grids[dt] = m
    return types, acts, dts, grids


def heatmap_png(report: dict) -> bytes:
    """worst-error.png: layer type × activation, one panel per dtype; colour = log10 of the worst normwise relative
    error among passing checks (pale: small, dark red: large); each cell labelled with that exponent as an
    power of ten (1e-15); an exact zero is a white cell labelled 0; a combination never checked is grey and blank."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    types, acts, dts, grids = _worst_grid(report)
    if not dts:
        fig = Figure(figsize=(6, 1.2))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, "no passing check: no worst error to show", ha="center", va="center")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return buf.getvalue()
    values = [v for g in grids.values() for row in g for v in row if v]
    lo = 10 ** math.floor(math.log10(min(values))) if values else 1e-17
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 1e-15
    if hi <= lo:
        hi = lo * 10
    norm = LogNorm(vmin=lo, vmax=hi)
    cmap = __import__("matplotlib").colormaps["YlOrRd"]
    width = 1.2 + len(dts) * (0.55 * len(acts) + 1.6)
    height = 1.6 + 0.42 * len(types)
    fig = Figure(figsize=(max(6.0, width), max(2.8, height)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(dts), squeeze=False)[0]
    image = None
    for ax, dt in zip(axes, dts):
        grid = grids[dt]
        rgba = np.ones((len(types), len(acts), 4))
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is None:
                    rgba[i, j] = (0.86, 0.86, 0.86, 1.0)
                elif v == 0:
                    rgba[i, j] = (1.0, 1.0, 1.0, 1.0)
                else:
                    rgba[i, j] = cmap(norm(v))
        image = ax.imshow(np.zeros((len(types), len(acts))), cmap=cmap, norm=norm, aspect="auto")  # for the colour bar
        ax.imshow(rgba, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is None:
                    continue
                if v == 0:
                    text, dark = "0", False
                else:
                    text = f"1e{int(round(math.log10(v)))}"
                    r, g, b, _ = cmap(norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, text.replace("-", "−"), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(acts)))
        ax.set_xticklabels(acts, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(types)))
        ax.set_yticklabels(types, fontsize=8)
        ax.set_xticks(np.arange(-0.5, len(acts)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(types)), minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
        ax.set_title(dt, fontsize=10)
    bar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.02)
    bar.set_label("worst ‖g − ĝ‖ / ‖ĝ‖", fontsize=9)
    fig.suptitle("Worst normwise relative error among passing checks, layer type × activation\n"
                 "(label: nearest power of ten; white 0: exactly zero; grey: never checked)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_code(text) -> str:
    text = str(text).replace("\n", " ")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _database_text(d: dict) -> str:
    text = (f"Example database {d['url']}, key {d['key']}: replayed {d['entries']} saved case"
            f"{'s' if d['entries'] != 1 else ''} before any new case ({d['failing']} still failing, in "
            f"{d['replayed_groups']} group{'s' if d['replayed_groups'] != 1 else ''}); {d['removed']} removed (passing "
            f"now, redundant or unreadable), {d['saved']} reproducer{'s' if d['saved'] != 1 else ''} saved")
    if d.get("error"):
        text += f"; the database failed during the campaign ({d['error']})"
    return text


def _replayed_tag(g: dict) -> str:
    return " (replayed from the database)" if g.get("replayed") else ""


def _replayed_text(g: dict) -> str:
    r = g["replayed"]
    return (f"replayed from the database before any new case: {r['entries']} saved case"
            f"{'s' if r['entries'] != 1 else ''} with this signature still {'fail' if r['entries'] != 1 else 'fails'}; first found as case {r['index']} of "
            f"the campaign with seed {r['seed']}")


def _sig_text(s: dict) -> str:
    return f"{s['layer']} / {s['activation']} / {s['loss']} / {s['classification']} / {s['hint']}"


def markdown(report: dict) -> str:
    t, cov = report["totals"], report["coverage"]
    verdict = "PASS" if t["failed"] == 0 and not report["groups"] else "FAIL"
    lines = [f"# bp-oracle campaign, seed {report['seed']}: {verdict}", "",
             f"{t['cases']} cases ({t['passed']} passed, {t['failed']} failed in {t['groups']} group"
             f"{'' if t['groups'] == 1 else 's'}, {t['refused']} refused), nets `{report['nets']}`, dtypes "
             f"{', '.join(report['dtypes'])}, implementation {_md_code(report['impl'])}.", "",
             f"Reproduce: {_md_code(report['command'])}", ""]
    if report["stopped_early"]:
        lines += [f"**Stopped early:** {_md_cell(report['stopped_early']['message'])}.", ""]
    if report.get("database"):
        lines += [_database_text(report["database"]), ""]
    lines += ["## Verdicts", "", "| classification | cases |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in t["classifications"].items()]
    lines += ["", "| dtype | " + " | ".join(t["classifications"]) + " |", "|---|" + "---|" * len(t["classifications"])]
    for dt, c in t["by_dtype"].items():
        lines.append(f"| {dt} | " + " | ".join(str(c.get(k, 0)) for k in t["classifications"]) + " |")
    lines += ["", "## Failure groups", ""]
    if not report["groups"]:
        lines += ["None: every case passed.", ""]
    for g in report["groups"]:
        s = g["shrunk"]
        lines += [f"### Group {g['id']}{_replayed_tag(g)}: {_md_cell(_sig_text(g['signature']))}", ""]
        if g.get("replayed"):
            lines.append(f"- {_replayed_text(g)}")
        lines += [f"- cases in this campaign: {g['count']}" + (" (none)" if not g["count"] else
                  f" (first: case {g['first_case']}; "
                  f"{', '.join(f'{k} {v}' for k, v in g['dtypes'].items())}; "
                  f"{', '.join(f'{k} {v}' for k, v in g['regimes'].items())})"),
                  f"- first seen: {_md_cell(g['first_summary'])}",
                  f"- reproducer ({_md_cell(s['note'])}): {_md_code(s['describe'])}, {s['dtype']}, {s['regime']}, "
                  f"batch {s['batch']}, data seed {s['data_seed']} ({s['size']['nodes']} nodes, "
                  f"{s['size']['parameters']} parameters)"
                  + ("" if s["reproduces"] else " — **it did not show the same signature again**")]
        if g["replay"]:
            lines += [f"- replay: {_md_code(g['replay'])}", f"- report: [{g['report']}/report.md]({g['report']}/report.md)"]
        lines.append("")
    lines += ["## Coverage", "", f"{cov['layers_checked']} layers checked (blocks opened), per layer type × activation:", ""]
    if cov["layer_types"]:
        lines += ["| layer \\ activation | " + " | ".join(cov["activations"]) + " | total |",
                  "|---|" + "---|" * (len(cov["activations"]) + 1)]
        for ty, row in zip(cov["layer_types"], cov["matrix"]):
            lines.append(f"| {ty} | " + " | ".join(str(v) if v else "·" for v in row) + f" | {sum(row)} |")
    for what in ("losses", "regimes", "dtypes"):
        lines += ["", f"{what.capitalize()}: " + (", ".join(f"{k} {v}" for k, v in cov[what].items()) or "none")]
    lines += ["", "## Worst error per cell", "", report["worst_error"]["what"] + ".", "", "![worst error](worst-error.png)", ""]
    types, acts, dts, grids = _worst_grid(report)
    if dts:
        lines += ["| layer | activation | " + " | ".join(dts) + " |", "|---|---|" + "---|" * len(dts)]
        for i, ty in enumerate(types):
            for j, a in enumerate(acts):
                vals = [grids[dt][i][j] for dt in dts]
                if any(v is not None for v in vals):
                    lines.append(f"| {ty} | {a} | " + " | ".join("—" if v is None else f"{v:.3g}" for v in vals) + " |")
    tm = report["timing"]
    lines += ["", "## Throughput", "",
              f"{report['totals']['cases']} cases in {tm['case_seconds']:.2f} s: **{tm['cases_per_second']} cases/s** "
              f"with {tm['workers']} worker{'s' if tm['workers'] != 1 else ''}; shrinking {tm['shrink_seconds']:.2f} s; "
              f"{tm['seconds']:.2f} s in all.", ""]
    return "\n".join(lines)


HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bp-oracle campaign, seed {{ r.seed }}: {{ verdict }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}
.pass{color:#176b2c}.fail{color:#b00020}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{background:#f4f4f4}img{max-width:100%}
.caption{color:#555;font-size:.9rem}</style></head><body>
<h1 class="{{ 'pass' if verdict == 'PASS' else 'fail' }}">bp-oracle campaign, seed {{ r.seed }}: {{ verdict }}</h1>
<p>{{ r.totals.cases }} cases ({{ r.totals.passed }} passed, {{ r.totals.failed }} failed in {{ r.totals.groups }} groups,
{{ r.totals.refused }} refused); nets <code>{{ r.nets }}</code>, dtypes {{ r.dtypes | join(', ') }}, implementation
<code>{{ r.impl }}</code>.</p>
<p>Reproduce: <code>{{ r.command }}</code></p>
{% if r.stopped_early %}<p class="fail"><b>Stopped early:</b> {{ r.stopped_early.message }}.</p>{% endif %}
{% if r.database %}<p>{{ database_text }}.</p>{% endif %}
<h2>Verdicts</h2>
<table><tr><th>dtype</th>{% for k in r.totals.classifications %}<th>{{ k }}</th>{% endfor %}</tr>
{% for dt, c in r.totals.by_dtype.items() %}<tr><td>{{ dt }}</td>{% for k in r.totals.classifications %}<td class="num">{{ c.get(k, 0) }}</td>{% endfor %}</tr>{% endfor %}
<tr><th>all</th>{% for k, v in r.totals.classifications.items() %}<th class="num">{{ v }}</th>{% endfor %}</tr></table>
<h2>Failure groups</h2>
{% if not r.groups %}<p class="pass">None: every case passed.</p>{% endif %}
{% for g in r.groups %}<h3 class="fail">Group {{ g.id }}{{ ' (replayed from the database)' if g.replayed }}: {{ g.signature.layer }} / {{ g.signature.activation }} / {{ g.signature.loss }} /
{{ g.signature.classification }} / {{ g.signature.hint }}</h3>
<ul>{% if g.replayed %}<li>replayed from the database before any new case: {{ g.replayed.entries }} saved case(s) with this
signature still fail; first found as case {{ g.replayed.index }} of the campaign with seed {{ g.replayed.seed }}</li>{% endif %}
<li>{{ g.count }} case{{ '' if g.count == 1 else 's' }} in this campaign{% if g.count %} (first: case {{ g.first_case }}){% endif %}</li>
<li>first seen: {{ g.first_summary }}</li>
<li>reproducer ({{ g.shrunk.note }}): <code>{{ g.shrunk.describe }}</code>, {{ g.shrunk.dtype }}, {{ g.shrunk.regime }},
batch {{ g.shrunk.batch }}, data seed {{ g.shrunk.data_seed }} ({{ g.shrunk.size.nodes }} nodes, {{ g.shrunk.size.parameters }} parameters)
{% if not g.shrunk.reproduces %}<b>: it did not show the same signature again</b>{% endif %}</li>
{% if g.replay %}<li>replay: <code>{{ g.replay }}</code></li>
<li>report: <a href="{{ g.report }}/report.html">{{ g.report }}/report.html</a></li>{% endif %}</ul>
{% endfor %}
<h2>Coverage</h2>
<p>{{ r.coverage.layers_checked }} layers checked (blocks opened), per layer type × activation:</p>
{% if r.coverage.layer_types %}<table><tr><th>layer \\ activation</th>{% for a in r.coverage.activations %}<th>{{ a }}</th>{% endfor %}<th>total</th></tr>
{% for row in rows %}<tr><td>{{ row.0 }}</td>{% for v in row.1 %}<td class="num">{{ v if v else '·' }}</td>{% endfor %}<td class="num">{{ row.1 | sum }}</td></tr>{% endfor %}
</table>{% endif %}
{% for what in ['losses', 'regimes', 'dtypes'] %}<p>{{ what | capitalize }}: {% for k, v in r.coverage[what].items() %}{{ k }} {{ v }}{{ ', ' if not loop.last }}{% endfor %}</p>{% endfor %}
<h2>Worst error per cell</h2>
<p>{{ r.worst_error.what }}.</p>
<img alt="heatmap: worst normwise relative error per layer type and activation" src="data:image/png;base64,{{ png }}">
<p class="caption">Each cell is labelled with the worst error's nearest power of ten (1e-16); white with 0: exactly zero;
grey: never checked.</p>
{% if worst_rows %}<table><tr><th>layer</th><th>activation</th>{% for dt in dts %}<th>{{ dt }}</th>{% endfor %}</tr>
{% for row in worst_rows %}<tr><td>{{ row.0 }}</td><td>{{ row.1 }}</td>{% for v in row.2 %}<td class="num">{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
<h2>Throughput</h2>
<p>{{ r.totals.cases }} cases in {{ '%.2f' % r.timing.case_seconds }} s: <b>{{ r.timing.cases_per_second }} cases/s</b> with
{{ r.timing.workers }} worker(s); shrinking {{ '%.2f' % r.timing.shrink_seconds }} s; {{ '%.2f' % r.timing.seconds }} s in all.</p>
</body></html>
"""


def html(report: dict, png: bytes) -> str:
    import base64

    import jinja2

    types, acts, dts, grids = _worst_grid(report)
    worst_rows = []
    for i, ty in enumerate(types):
        for j, a in enumerate(acts):
            vals = [grids[dt][i][j] for dt in dts]
            if any(v is not None for v in vals):
                worst_rows.append((ty, a, ["—" if v is None else f"{v:.3g}" for v in vals]))
    env = jinja2.Environment(autoescape=True)  # every string from a spec, a hint or a path is escaped
    return env.from_string(HTML_TEMPLATE).render(
        r=report, verdict="PASS" if report["totals"]["failed"] == 0 and not report["groups"] else "FAIL",
        rows=list(zip(report["coverage"]["layer_types"], report["coverage"]["matrix"])),
        png=base64.b64encode(png).decode("ascii"), worst_rows=worst_rows, dts=dts,
        database_text=_database_text(report["database"]) if report.get("database") else "")


def _print_summary(report: dict, folder, out) -> None:
    t, tm = report["totals"], report["timing"]
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"Cases run: {t['cases']} of {report['examples']} ({tm['cases_per_second']} cases/s, {tm['workers']} worker"
      f"{'s' if tm['workers'] != 1 else ''}); passed {t['passed']}, failed {t['failed']}, refused {t['refused']}")
    if report["stopped_early"]:
        p(f"Stopped early: {report['stopped_early']['message']}")
    if report.get("database"):
        p(_database_text(report["database"]))
    p("Verdicts: " + ", ".join(f"{k} {v}" for k, v in t["classifications"].items()))
    cov = report["coverage"]
    p(f"Coverage: {cov['layers_checked']} layers; losses {len(cov['losses'])}, regimes {len(cov['regimes'])}, "
      f"layer type × activation cells {sum(1 for c in cov['cells'])}")
    for g in report["groups"]:
        s = g["shrunk"]
        count = f"{g['count']} case{'s' if g['count'] != 1 else ''}" + (" in this campaign" if report.get("database") else "")
        p(f"\nGroup {g['id']} ({'replayed from the database; ' if g.get('replayed') else ''}{count}): "
          f"{_sig_text(g['signature'])}")
        p(f"  smallest: {s['describe']}, {s['dtype']}, {s['regime']}, batch {s['batch']}, data seed {s['data_seed']} ({s['how']})")
        if g["replay"]:
            p(f"  replay: {g['replay']}")
    if folder is not None:
        p(f"\nCampaign report: {folder}/campaign.html (also campaign.md, campaign.json, worst-error.png)")
    replayed = sum(1 for g in report["groups"] if g.get("replayed"))
    if t["failed"] == 0 and not replayed:
        p("No failure.")
    elif not replayed:
        p(f"{t['failed']} failing case{'s' if t['failed'] != 1 else ''} in {t['groups']} group{'s' if t['groups'] != 1 else ''}.")
    else:
        p(f"{t['failed']} failing case{'s' if t['failed'] != 1 else ''} in {t['groups']} group{'s' if t['groups'] != 1 else ''} "
          f"in this campaign; {replayed} group{'s' if replayed != 1 else ''} replayed from the database.")
