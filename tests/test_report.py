"""The report writer: folders that stay inside --report, atomic and concurrent replacement, stale temp
folders, modes, bad report paths, and reports that survive NaN/Inf values and crashed candidates."""

import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import manual_bp as bp
import oracle
from manual_bp import SpecError
from oracle import report as R

ROOT = Path(__file__).resolve().parent.parent
SLUG = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
FILES = {"report.json", "report.md", "report.html", "case.npz"}
REPLAY = "bp-oracle replay {folder}/report.json"


def _doubled(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, {**r.grads, "layers.0.weight": 2 * r.grads["layers.0.weight"]}


def _non_finite(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    grads = dict(r.grads)
    w = grads["layers.0.weight"].copy()
    w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, -np.inf
    grads["layers.0.weight"] = w
    return r.loss, grads, r.deltas


def _raises(spec, params, x, y):
    raise ZeroDivisionError("my <b>bug</b>")


@pytest.fixture(scope="module")
def case():
    spec = bp.example("seed-nielsen")
    params, x, y = bp.random_case(spec, 0)
    return spec, params, x, y


@pytest.fixture(scope="module")
def passing(case):
    return oracle.check(*case)


@pytest.fixture(scope="module")
def failing(case):
    return oracle.check(*case, _doubled)


@pytest.fixture(scope="module")
def non_finite(case):
    return oracle.check(*case, _non_finite)


@pytest.fixture(scope="module")
def crashed(case):
    return oracle.check(*case, _raises)


@pytest.fixture
def no_plots(monkeypatch):
    """File-system tests do not need the pictures (they are tested below); this keeps them fast."""
    monkeypatch.setattr(R, "plots", lambda result: {"problems": []})


def write(directory, result, case, **kw):
    spec, params, x, y = case
    args = dict(params=params, x=x, y=y, seed=0, impl="manual_bp", replay=REPLAY, source="test")
    args.update(kw)
    return R.write_check_report(directory, result, **args)


def leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.startswith(".")]


def strict_json(path):
    def refuse(token):
        raise AssertionError(f"invalid JSON constant {token}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


# -- names: nothing outside the report folder ------------------------------------------------------------
@given(st.text())
def test_slug_is_always_a_plain_safe_folder_name(text):
    s = R.slug(text)
    assert SLUG.match(s) and len(s) <= R.SLUG_MAX and s not in (".", "..")


HOSTILE = ["/abs/path/victim", "../escaped", "../../x", "a/b", "a\\b", "nul\0byte", "", ".", "..", ".hidden",
           "x" * 5000, "réseau ∂L/∂θ 网络", "\n\t ", "CON", "-rf --no-preserve-root"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_spec_names_land_inside_the_report_dir(tmp_path, passing, case, no_plots, name):
    victim = tmp_path / "abs" / "path" / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    reports = tmp_path / "reports"
    result = dataclasses.replace(passing, spec=dataclasses.replace(passing.spec, name=name))
    if name.startswith("/abs"):
        result = dataclasses.replace(passing, spec=dataclasses.replace(passing.spec, name=str(victim)))
    folder = write(reports, result, case)
    assert folder.parent == reports and folder.is_dir() and not folder.is_symlink()
    assert SLUG.match(folder.name) and len(folder.name) < 200
    assert {p.name for p in reports.iterdir()} == {folder.name}
    assert {p.name for p in folder.iterdir()} == FILES
    assert (victim / "precious.txt").read_text() == "keep me" and sorted(os.listdir(victim)) == ["precious.txt"]
    assert sorted(os.listdir(tmp_path)) == ["abs", "reports"]


def test_a_fuzz_folder_name_override_is_sanitized_too(tmp_path, passing, case, no_plots):
    folder = write(tmp_path, passing, case, folder_name="../../fuzz seed0/failure")
    assert folder.parent == tmp_path and SLUG.match(folder.name)
    assert write(tmp_path, passing, case, folder_name="fuzz-seed0-failure").name == "fuzz-seed0-failure"


def test_distinct_cases_get_distinct_folders_and_the_same_case_the_same_folder(tmp_path, passing, case, no_plots):
    spec, params, x, y = case
    first = write(tmp_path, passing, case)
    assert first.name.startswith("seed-nielsen-float64-seed0-manual_bp-")
    assert write(tmp_path, passing, case) == first  # same inputs: replaced in place
    other_params = {**params, "layers.1.bias": params["layers.1.bias"] + 1e-12}
    variants = [
        write(tmp_path, passing, case, params=other_params),
        write(tmp_path, passing, case, x=x.copy() * 1.5),
        write(tmp_path, passing, case, y=y[::-1].copy()),
        write(tmp_path, passing, case, impl="a.py:f"),
        write(tmp_path, passing, case, impl="b.py:f"),
        write(tmp_path, passing, case, seed=1),
        write(tmp_path, dataclasses.replace(passing, dtype="float32"), case),
        write(tmp_path, dataclasses.replace(passing, spec=dataclasses.replace(spec, description="other")), case),
    ]
    names = [first.name] + [v.name for v in variants]
    assert len(set(names)) == len(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert R.case_folder_name(spec, dtype="float64", seed=0, impl="manual_bp", params=dict(reversed(params.items())),
                              x=x, y=y) == first.name  # the order of the params dict does not matter


# -- atomic replacement ---------------------------------------------------------------------------------
def test_a_failed_rewrite_keeps_the_old_report_and_leaves_nothing_behind(tmp_path, passing, failing, case, no_plots,
                                                                         monkeypatch):
    folder = write(tmp_path, passing, case)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_write = R._write_file
    calls = []

    def disk_full_on_the_third_file(path, data):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(R, "_write_file", disk_full_on_the_third_file)
    with pytest.raises(SpecError) as err:
        write(tmp_path, failing, case)
    assert err.value.field == "--report" and "No space left" in str(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(tmp_path) == []

    monkeypatch.setattr(R, "_write_file", real_write)

    def swap_fails(tmp, final):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(R, "_swap_into_place", swap_fails)
    with pytest.raises(SpecError, match="--report"):
        write(tmp_path, failing, case)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and leftovers(tmp_path) == []


def test_an_interrupt_while_writing_keeps_the_old_report(tmp_path, passing, case, no_plots, monkeypatch):
    folder = write(tmp_path, passing, case)
    before = (folder / "report.json").read_bytes()

    def interrupted(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "_write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, passing, case, source="changed")
    assert (folder / "report.json").read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_rewrites_replace_the_whole_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(R, "_exchange", None)
    final = tmp_path / "r"
    R.write_atomically(final, {"a.txt": "1", "b.txt": "1"})
    R.write_atomically(final, {"a.txt": "2"})
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a.txt": "2"} and leftovers(tmp_path) == []


KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from oracle import report as R
    R._exchange = None                 # the two-rename path
    real, calls = os.rename, []
    def rename(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == 1:            # the old report has just been moved aside
            os._exit(9)
    os.rename = rename
    R.write_atomically({final!r}, {{"report.json": "new"}})
""")


def test_a_writer_killed_between_its_two_renames_is_recovered_by_the_next_write(tmp_path):
    final = tmp_path / "r"
    R.write_atomically(final, {"report.json": "old"})
    done = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES.format(root=str(ROOT), final=str(final))])
    assert done.returncode == 9
    assert not final.exists() and any(n.startswith(".bpo-old-") for n in os.listdir(tmp_path))
    assert R.clean_stale(tmp_path)  # the dead writer's folders: the old report goes back under its name
    assert (final / "report.json").read_text() == "old" and leftovers(tmp_path) == []
    subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES.format(root=str(ROOT), final=str(final))])
    R.write_atomically(tmp_path / "other", {"x": "1"})  # any write in that directory recovers as well
    assert (final / "report.json").read_text() == "old" and leftovers(tmp_path) == []


# -- concurrency ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_concurrent_writers_to_one_folder_never_fail_and_it_never_disappears(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(R, "_exchange", None)
    final = tmp_path / "r"
    R.write_atomically(final, {"report.json": "seed", "case.npz": "seed"})
    errors, seen, stop = [], [], threading.Event()

    def writer(k):
        for i in range(40):
            try:
                R.write_atomically(final, {"report.json": f"{k}.{i}", "case.npz": f"{k}.{i}"})
            except SpecError as err:  # allowed: a clear --report message, never a traceback
                assert err.field == "--report"
            except BaseException as err:  # noqa: BLE001 - collected and reported below
                errors.append(repr(err))

    def reader():  # each file looked up by its path, as a reader of the report does
        while not stop.is_set():
            seen.append([name for name in ("case.npz", "report.json") if (final / name).is_file()])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert sorted(os.listdir(final)) == ["case.npz", "report.json"]
    assert (final / "report.json").read_text() == (final / "case.npz").read_text()  # one writer's complete folder
    assert leftovers(tmp_path) == []
    if exchange:  # one atomic exchange: the folder is complete at every moment
        assert seen and all(s == ["case.npz", "report.json"] for s in seen)


RACER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from oracle import report as R
    for i in range(30):
        R.write_atomically({final!r}, {{"report.json": "{k}" * 1000, "case.npz": "{k}"}})
""")


def test_concurrent_processes_writing_the_same_report_both_succeed(tmp_path):
    final = tmp_path / "r"
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(root=str(ROOT), final=str(final), k=k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in "ab"]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
    assert (final / "case.npz").read_text() in ("a", "b") and leftovers(tmp_path) == []


# -- leftovers, modes, bad paths --------------------------------------------------------------------------
def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_stale_temp_folders_are_cleaned_and_live_ones_kept(tmp_path):
    hour_ago = time.time() - 3600
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def make(name, files=("report.json",), mtime=None):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text("x")
        if mtime:
            os.utime(d, (mtime, mtime))
        return name

    dead = make(f".bpo-tmp-{_dead_pid()}-abc123.seed-a")
    dead_old = make(f".bpo-old-{_dead_pid()}-abc124.seed-b")  # a report a killed writer had moved aside
    stale_own = make(f".bpo-tmp-{os.getpid()}-zz.seed-c", mtime=hour_ago)
    legacy = make(".seed-d-float64-seed0.k2j4_x9q", mtime=hour_ago)
    live = make(f".bpo-tmp-{alive.pid}-abc125.seed-e")  # a concurrent writer, alive and fresh
    live_own = make(f".bpo-tmp-{os.getpid()}-abc126.seed-f")
    fresh_legacy = make(".seed-g.abcdefgh")
    not_ours = make(".config.abcdefgh", files=("settings.ini",), mtime=hour_ago)
    user = make(".git", mtime=hour_ago)
    try:
        R.write_atomically(tmp_path / "new", {"report.json": "{}"})
    finally:
        alive.kill()
        alive.wait()
    names = set(os.listdir(tmp_path))
    assert not {dead, dead_old, stale_own, legacy} & names
    assert {live, live_own, fresh_legacy, not_ours, user, "new", "seed-b"} <= names
    assert (tmp_path / "seed-b" / "report.json").read_text() == "x"  # restored, not deleted


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_folder_and_file_modes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        final = R.write_atomically(tmp_path / "r", {"report.json": "{}"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((final / "report.json").stat().st_mode) == 0o666 & ~mask


def test_report_paths_that_are_files_or_symlinks_are_refused(tmp_path, passing, case, no_plots):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    spec, params, x, y = case
    name = R.case_folder_name(spec, dtype="float64", seed=0, impl="manual_bp", params=params, x=x, y=y)

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(elsewhere, target_is_directory=True)
    file_final = tmp_path / "d1"
    file_final.mkdir()
    (file_final / name).write_text("a file where the report folder goes")
    link_final = tmp_path / "d2"
    link_final.mkdir()
    (link_final / name).symlink_to(elsewhere, target_is_directory=True)
    dangling = tmp_path / "d3"
    dangling.mkdir()
    (dangling / name).symlink_to(tmp_path / "nowhere")

    for directory, words in [(a_file, "is a file"), (a_file / "below", "cannot create"), (linked_dir, "symbolic link"),
                             (file_final, "is a file"), (link_final, "symbolic link"), (dangling, "symbolic link")]:
        with pytest.raises(SpecError) as err:
            write(directory, passing, case)
        assert err.value.field == "--report" and words in str(err.value), (directory, str(err.value))
    assert a_file.read_text() == "not a folder"
    assert (file_final / name).read_text() == "a file where the report folder goes"
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"] and (link_final / name).is_symlink()
    for d in (file_final, link_final, dangling):
        assert leftovers(d) == []


FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    from manual_bp import SpecError
    from oracle import report as R
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    try:
        R.write_atomically({final!r}, {{"report.json": "{{}}", "case.npz": b"x" * 100000}})
    except SpecError as err:
        print(err)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_file_size_limit_is_a_clear_error_and_leaves_no_folder(tmp_path):
    final = tmp_path / "r"
    done = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT.format(root=str(ROOT), final=str(final))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.startswith("--report: cannot write the report") and "too large" in done.stdout
    assert os.listdir(tmp_path) == []


# -- contents -------------------------------------------------------------------------------------------
def test_case_sha256_matches_the_npz_written_beside_it(tmp_path, passing, case, no_plots):
    folder = write(tmp_path, passing, case)
    report = strict_json(folder / "report.json")
    assert report["case_sha256"] == hashlib.sha256((folder / "case.npz").read_bytes()).hexdigest()
    with np.load(folder / "case.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["x"], case[2]) and np.array_equal(npz["layers.0.weight"], case[1]["layers.0.weight"])
    assert str(folder) in report["replay"]


def test_nan_and_inf_gradients_give_a_complete_valid_report(tmp_path, non_finite, case):
    assert not non_finite.passed
    figs = R.plots(non_finite)
    assert figs["problems"] == [] and {"errors", "deltas", "heatmap"} <= set(figs)
    folder = write(tmp_path, non_finite, case)
    report = strict_json(folder / "report.json")
    weight = next(t for t in report["tensors"] if t["name"] == "layers.0.weight")
    assert weight["normwise_err"] == "inf" and weight["passed"] is False
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert md.startswith("## bp-oracle: FAIL") and "∞" in md
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 and "could not be drawn" not in page
    cand, ref = non_finite.arrays["layers.0.weight"]
    counts = np.bincount(R.element_classes(cand, ref, non_finite.tolerance, non_finite.scale).ravel(), minlength=9)
    assert counts[8] == 1 and counts[7] == 2


def _scaled(result, factor):
    """The same result with every array (and so every error) multiplied by ``factor``."""
    from oracle.compare import compare_tensor

    arrays = {k: (np.asarray(c, dtype=np.float64) * factor, np.asarray(r, dtype=np.float64) * factor)
              for k, (c, r) in result.arrays.items()}
    with np.errstate(all="ignore"):
        tensors = [compare_tensor(t.name, *arrays[t.name], result.tolerance, result.scale * factor, layer=t.layer)
                   for t in result.tensors]
    return dataclasses.replace(result, arrays=arrays, tensors=tensors, scale=result.scale * factor)


@pytest.mark.parametrize("factor", [1e160, 1e300, 1e-300, 0.0])
def test_plots_survive_huge_tiny_and_all_zero_values(failing, factor):
    figs = R.plots(_scaled(failing, factor))
    assert figs["problems"] == [] and "errors" in figs and "heatmap" in figs


def test_a_crashed_candidate_gets_a_crash_report_with_its_traceback(tmp_path, crashed, case):
    assert crashed.classification == "crash" and crashed.loss is None and crashed.tensors == []
    folder = write(tmp_path, crashed, case)
    report = strict_json(folder / "report.json")
    assert report["classification"] == "crash" and report["passed"] is False and report["loss"] is None
    assert report["crash"]["kind"] == "raised" and "ZeroDivisionError" in report["crash"]["traceback"]
    assert "_raises" in report["crash"]["traceback"]  # the candidate's own frame
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert md.startswith("## bp-oracle: CRASH") and "```text" in md and "ZeroDivisionError" in md
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "<h1 class=\"fail\">CRASH:" in page and "data:image" not in page and "No plots" in page
    assert "<b>bug</b>" not in page and "my &lt;b&gt;bug&lt;/b&gt;" in page
    pre = re.search(r"<pre>(.*?)</pre>", page, re.S).group(1)
    assert "ZeroDivisionError" in pre and "Traceback (most recent call last)" in pre


def test_a_passing_report_is_calm(passing):
    """Every passing tensor sits left of the bound; exact zeros have their own class, never the worst colour."""
    for t in [passing.loss] + passing.tensors:
        assert R._ratio(t.normwise_err, R._bound(t, passing.tolerance)) <= 1
    name = max(passing.tensors, key=lambda t: t.normwise_err / t.allowed_normwise).name
    codes = R.element_classes(*passing.arrays[name], passing.tolerance, passing.scale)
    assert codes.max() <= 3  # within the elementwise bound: shades of green, never orange or red
    cand = np.array([0.0, 1.0, 1.0, 1.0, np.inf, np.nan])
    ref = np.array([0.0, 1.0, 1.0 + 1e-12, 1.5, 1.0, 1.0])
    exact = R.element_classes(cand, ref, passing.tolerance, 1.0)
    assert list(exact) == [0, 0, 3, 6, 7, 8]


def _outside(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    return legend.x0 >= box.x1


def test_legends_sit_outside_the_axes_and_heatmaps_have_integer_labelled_axes(failing, non_finite):
    fig = R.errors_figure(failing)
    ax = fig.axes[0]
    assert _outside(fig, ax)
    bar_colours = {tuple(round(c, 3) for c in p.get_facecolor()) for p in ax.patches}
    legend_colours = {tuple(round(c, 3) for c in h.get_facecolor()) for h in ax.get_legend().get_patches()}
    assert bar_colours <= legend_colours  # every bar's colour is explained by the legend
    assert ax.get_xlim()[0] < 1 < ax.get_xlim()[1] and any(line.get_xdata()[0] == 1 for line in ax.get_lines())

    for t_name, labels in [("layers.0.weight", ("output unit", "input unit")), ("layers.1.delta", ("example", "unit"))]:
        t = next(t for t in non_finite.tensors if t.name == t_name)
        fig, _ = R.heatmap_figure(non_finite, t)
        ax = fig.axes[0]
        assert _outside(fig, ax)
        assert (ax.get_ylabel(), ax.get_xlabel()) == labels
        fig.canvas.draw()
        ticks = [float(x) for x in ax.get_xticks() if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]]
        assert ticks and all(x == int(x) for x in ticks)
    weight = next(t for t in non_finite.tensors if t.name == "layers.0.weight")
    assert "1 NaN, 2 Inf" in R.heatmap_figure(non_finite, weight)[0].axes[0].get_title()


def test_a_single_element_worst_tensor_is_shown_as_a_number(tmp_path):
    spec = bp.Spec.from_dict({"format_version": 1, "name": "one", "input_size": 1, "loss": "half_sse",
                              "layers": [{"type": "dense", "units": 1, "activation": "identity", "bias": True}]})
    params, x, y = bp.random_case(spec, 0)

    def tripled_bias(spec, params, x, y):
        r = bp.gradients(spec, params, x, y)
        return r.loss, {**r.grads, "layers.0.bias": 3 * r.grads["layers.0.bias"]}

    figs = R.plots(oracle.check(spec, params, x, y, tripled_bias))
    assert "heatmap" not in figs and figs["scalar"].startswith("layers.0.bias has a single element: candidate")


def test_numbers_are_formatted_whatever_their_type():
    assert [R.fmt(v) for v in (None, "inf", "-inf", "nan", float("nan"), float("-inf"), 3, 0.000123456, np.float32(2.5))] == \
        ["—", "∞", "−∞", "NaN", "NaN", "−∞", "3", "0.000123", "2.5"]
