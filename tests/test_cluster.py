"""``bp-oracle campaign --ray`` and ``--database``: the same report on a local Ray instance, a lost worker's shard
retried, failures saved to a real Redis server and replayed first by the next campaign, and one-line errors without
the cluster extra. The servers are started here on loopback and stopped at the end, failing or not."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import manual_bp as bp
from oracle import cli
from oracle.campaign import Draw, comparable, replay_database, run_campaign
from oracle.cluster import INSTALL_HINT, Recorder, database_key, decode_entry, encode_entry, redact, secondary

from .helpers import dense_backprop_source

IN_CI = bool(os.environ.get("CI"))

RELU_BUG = dense_backprop_source("manual_bp's dense backprop with relu's mask dropped in the backward (delta = g for a "
                                 "relu layer).", delta="g if act.name == 'relu' else act.vjp(z, a, g)")

FIXED = '''
import manual_bp as bp


def grads(spec, params, x, y):
    return bp.gradients(spec, params, x, y)
'''


def _missing(what: str):
    """Skip without the cluster extra, except in CI, which installs it: there a missing package is a failure."""
    message = f"{what} is not installed ({INSTALL_HINT})"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _report(folder, seed) -> dict:
    return json.loads((Path(folder) / f"campaign-{seed}" / "campaign.json").read_text(encoding="utf-8"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers ------------------------------------------------------------------------------------------------
@pytest.fixture
def redis_url(tmp_path):
    """A fresh redis-server on a free loopback port, its files in a temporary folder; stopped (killed if it must be)
    when the test ends, whatever happened."""
    try:
        import redis
    except ImportError:
        _missing("the redis package")
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is not installed (.ci/run installs the Debian package redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    folder = tmp_path / "redis"
    folder.mkdir()
    proc = port = None
    for _ in range(5):  # the port could be taken between finding it free and the server binding it
        port = _free_port()
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(folder), "--daemonize", "no", "--protected-mode", "yes"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.RedisError:
                time.sleep(0.05)
        client.close()
        if proc.poll() is None and time.monotonic() < deadline:
            break
        _stop(proc)
    else:
        pytest.fail("redis-server did not start on a free loopback port")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


def _stop(proc) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for this module (2 CPUs, no dashboard, on loopback); shut down at the end."""
    try:
        import ray
    except ImportError:
        _missing("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 2**20)  # campaign results are small; xdist may run two of these side by side
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dense64(tmp_path_factory) -> dict:
    """64 cases of dense nets (two shards), in this process: the report every other run is compared with."""
    folder = tmp_path_factory.mktemp("single")
    assert cli.main(["campaign", "--examples", "64", "--seed", "11", "--nets", "dense", "--report", str(folder)]) == 0
    return _report(folder, 11)


class KillOnce:
    """manual_bp, except that the first call made anywhere (one marker file decides) kills the process it runs in,
    as a worker lost with its node would be."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, spec, params, x, y):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return bp.gradients(spec, params, x, y)
        os._exit(1)


# -- Ray ----------------------------------------------------------------------------------------------------
def test_ray_gives_the_single_process_report(ray_local, dense64, tmp_path):
    assert cli.main(["campaign", "--examples", "64", "--seed", "11", "--nets", "dense", "--report", str(tmp_path),
                     "--ray", "auto"]) == 0
    report = _report(tmp_path, 11)
    assert report["timing"]["ray"]["shards"] == 2 and report["timing"]["ray"]["lost"] is None
    assert report["totals"]["cases"] == 64
    assert comparable(report) == comparable(dense64)


def test_ray_retries_the_shard_of_a_lost_worker(ray_local, dense64, tmp_path):
    marker = tmp_path / "killed"
    run_campaign(examples=64, seed=11, nets="dense", impl=KillOnce(str(marker)), impl_name="manual_bp",
                 ray_address="auto", report_dir=tmp_path, progress=False, out=io.StringIO())
    assert marker.exists()  # a worker died in the middle of a shard ...
    report = _report(tmp_path, 11)
    assert report["stopped_early"] is None and report["totals"]["cases"] == 64  # ... and its shard ran again
    assert comparable(report) == comparable(dense64)


class KillAlways:
    """Kills every process that calls it."""

    def __call__(self, spec, params, x, y):
        os._exit(1)


def test_a_shard_lost_after_its_retries_stops_the_campaign_there(ray_local, tmp_path, monkeypatch):
    import oracle.cluster

    monkeypatch.setattr(oracle.cluster, "RAY_MAX_RETRIES", 0)  # so that the first death loses the shard
    report = run_campaign(examples=64, seed=11, nets="dense", impl=KillAlways(), impl_name="manual_bp",
                          ray_address="auto", report_dir=None, progress=False, out=io.StringIO())
    stopped = report["stopped_early"]
    assert stopped["reason"] == "lost_shard" and report["totals"]["cases"] == 0
    assert "shard 0" in stopped["message"] and report["timing"]["ray"]["lost"]["shard"] == 0


# -- Redis --------------------------------------------------------------------------------------------------
def test_a_failure_saved_in_redis_is_replayed_first_by_the_next_campaign(redis_url, tmp_path):
    import redis

    impl = tmp_path / "relu_bug.py"
    impl.write_text(RELU_BUG)
    target = f"{impl}:grads"
    common = ["campaign", "--nets", "dense", "--dtype", "float64", "--impl", target, "--database", redis_url]
    # 1. two worker processes check 64 cases; each saves the first failing case of each signature it meets at once,
    #    and the campaign saves each group's shrunk reproducer
    assert cli.main(common + ["--examples", "64", "--seed", "1", "--workers", "2", "--shrink-seconds", "8",
                              "--report", str(tmp_path / "one")]) == 1
    first = _report(tmp_path / "one", 1)
    saved = {tuple(g["signature"].values()) for g in first["groups"] if g["shrunk"]["reproduces"]}
    assert first["groups"] and saved and all(g["source"] == "campaign" for g in first["groups"])
    assert first["database"]["saved"] == len(saved)
    assert first["database"]["removed"] >= 1  # the workers' raw saves, dropped once the groups had reproducers
    client = redis.Redis.from_url(redis_url)
    key = b"hypothesis-example:" + database_key("dense", target)
    assert client.scard(key) == len(saved) and client.scard(secondary(key)) == 0
    client.close()
    # 2. another seed, one case: the saved failures are replayed before it and reported as their own groups
    assert cli.main(common + ["--examples", "1", "--seed", "99", "--shrink-seconds", "0",
                              "--report", str(tmp_path / "two")]) == 1
    second = _report(tmp_path / "two", 99)
    replayed = [g for g in second["groups"] if g["source"] == "database"]
    assert {tuple(g["signature"].values()) for g in replayed} == saved
    assert second["groups"][: len(replayed)] == replayed  # first
    assert all(g["replayed"]["seed"] == 1 and g["shrunk"]["reproduces"] for g in replayed)
    assert second["database"]["entries"] == second["database"]["failing"] == len(saved)
    md = (tmp_path / "two" / "campaign-99" / "campaign.md").read_text(encoding="utf-8")
    assert "(replayed from the database)" in md
    for g in replayed:  # each with a check report and a replay command that shows the bug again
        assert g["replay"] and (tmp_path / "two" / "campaign-99" / g["report"] / "report.json").exists()
    # 3. the bug fixed (same candidate): the saved cases pass now and are removed, as Hypothesis removes them
    impl.write_text(FIXED)
    assert cli.main(common + ["--examples", "1", "--seed", "5", "--no-report"]) == 0
    client = redis.Redis.from_url(redis_url)
    assert client.scard(key) == 0
    client.close()


def test_ray_workers_save_to_redis(ray_local, redis_url, tmp_path):
    impl = tmp_path / "relu_bug.py"
    impl.write_text(RELU_BUG)
    target = f"{impl}:grads"
    report = run_campaign(examples=64, seed=1, nets="dense", dtype="float64", impl=cli._start_impl(target, 60),
                          impl_name=target, impl_target=target, ray_address="auto", database=redis_url,
                          shrink_seconds=0, report_dir=None, progress=False, out=io.StringIO())
    assert report["exit_code"] == 1 and report["groups"]
    # with no time to shrink, each group's first case is saved as it is; the raw saves of the Ray workers are dropped
    assert report["database"]["saved"] == len(report["groups"]) and report["database"]["removed"] >= 1


def test_replay_and_recorder_on_an_in_memory_database():
    """The database logic without a server: raw saves are deduplicated, replayed, shrunk and moved to the primary key;
    an unreadable entry is removed."""
    from hypothesis.database import InMemoryExampleDatabase

    from oracle.campaign import evaluate, nets_strategy

    db = InMemoryExampleDatabase()
    key = database_key("dense", "manual_bp")
    spec = bp.Spec.from_dict({"format_version": 1, "input_size": 3, "loss": "mse",
                              "layers": [{"type": "dense", "units": 4, "activation": "relu"},
                                         {"type": "dense", "units": 2, "activation": "identity"}]})
    draw = Draw(5, spec, "well_conditioned", "float64", 3, 1234)

    def wrong(spec, params, x, y):  # every gradient doubled
        r = bp.gradients(spec, params, x, y)
        return r.loss, {k: 2 * v for k, v in r.grads.items()}

    o = evaluate(draw, wrong)
    assert o.failed
    rec = Recorder(db, key, seed=7)
    rec(draw, o)
    rec(draw, o)  # the same signature again: saved once
    assert len(list(db.fetch(secondary(key)))) == 1
    db.save(secondary(key), b"not json")
    groups, stats = replay_database(db, key, strategy=nets_strategy("dense"), nets="dense", impl=wrong, shrink_seconds=5)
    assert stats["entries"] == 2 and stats["failing"] == 1 and stats["removed"] == 1
    assert len(groups) == 1 and groups[0]["signature"] == o.signature and groups[0]["from"] == {"seed": 7, "index": 5}
    assert list(db.fetch(secondary(key))) == []
    (primary,) = list(db.fetch(key))
    redraw, entry = decode_entry(primary)
    assert entry["signature"] == o.signature and entry["how"] != "raw"
    # the same reproducer replays with any seed: entries carry the case, not a Hypothesis choice sequence
    assert encode_entry(redraw, o.signature, seed=entry["seed"], how=entry["how"], final=entry["final"]) == primary


# -- without the extra, and bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("option,value,modules", [("--ray", "auto", ("ray",)),
                                                  ("--database", "redis://127.0.0.1:6379/0", ("redis", "hypothesis.extra.redis"))])
def test_without_the_cluster_extra_one_line_and_exit_2(option, value, modules, monkeypatch, capsys):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if the package were not installed
    assert cli.main(["campaign", "--examples", "1", "--no-report", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("bp-oracle: error:") and "pip install bp-oracle[cluster]" in err
    # everything else works without it
    assert cli.main(["campaign", "--examples", "3", "--nets", "dense", "--no-report"]) == 0


def test_bad_database_urls_exit_2_in_one_line(capsys):
    pytest.importorskip("redis")
    for url in ("http://127.0.0.1:1/0", f"redis://127.0.0.1:{_free_port()}/0"):
        assert cli.main(["campaign", "--examples", "1", "--no-report", "--database", url]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("bp-oracle: error: --database:")
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"


def test_ray_address_where_nothing_answers_is_one_line_at_once():
    pytest.importorskip("ray")
    from manual_bp import SpecError
    from oracle.cluster import _probe

    t0 = time.monotonic()
    with pytest.raises(SpecError, match="--ray: nothing answers at") as err:
        _probe(f"127.0.0.1:{_free_port()}")  # ray.init would retry for minutes
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 10
