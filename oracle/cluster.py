"""Campaigns beyond one machine: shards as Ray tasks (``--ray``) and a shared example database in Redis
(``--database``). Both need the optional extra ``pip install bp-oracle[cluster]`` (``ray``, ``redis``); without it
every other command works, and these two options fail in one line (exit 2) naming the extra.

**Ray.** ``bp-oracle campaign --ray ADDRESS`` (``auto``: the cluster this machine belongs to, e.g. after ``ray start
--head``; ``local``: a private local instance started for this run and stopped after it; or ``HOST:PORT`` of the
cluster's head) runs the campaign's shards as Ray tasks, one task per shard of ``campaign.CHUNK`` cases, each a pure
function of (seed, shard). A task lost with its worker or its node is retried by Ray (``RAY_MAX_RETRIES``), which gives
the same outcomes again; results are merged in case order, so the report is the single-process one apart from its
``timing`` section. At most ``RAY_IN_FLIGHT`` tasks per CPU of the cluster are outstanding at once (a 10⁸-case campaign
is three million shards: they are submitted as results come back, and folded into the report as they are merged, so
the driver's memory does not grow with the case count). A shard still lost after its retries stops the campaign there,
as a time budget would: the report says so and covers the cases before it. Every node needs the same environment as
the driver (bp-oracle, torch, Hypothesis; the same Python and Ray), as for any Ray job.

**Redis.** ``--database redis://HOST:PORT/N`` keeps the campaign's failing cases in Hypothesis's example database
(``hypothesis.extra.redis.RedisExampleDatabase`` over a ``redis.Redis`` client), under a key that depends on the
property being tested: the nets drawn and the candidate (``database_key``). Campaign cases are drawn from seeds, not
from a Hypothesis run that could replay a choice sequence, and a choice sequence replays another network once the
strategies change; so each value is a reproducer in canonical JSON (the spec, regime, dtype, batch and data seed, with
the campaign seed and case index it came from, its signature and whether it is shrunk), which replays the same case
with any seed, any Hypothesis version and any strategy. As in Hypothesis's own layout, the primary key holds each
failure group's shrunk representative and ``<key>.secondary`` the raw failing cases the workers saved as they found
them (the first per signature in each worker process), so a failure found on any worker is in the database at once,
even if the campaign never reaches its shrinking step. Every campaign with ``--database`` replays what the database
holds for its key before any new case (``campaign.replay_database``): entries that no longer fail are deleted (as
Hypothesis deletes examples that are no longer interesting), each signature keeps its smallest reproducer (a raw one is
shrunk first), and the report lists them first, as groups "replayed from the database".
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.parse

from manual_bp import SpecError

#: the install line the error messages give
INSTALL_HINT = "install the cluster extra: pip install bp-oracle[cluster]"
#: Ray retries a task lost with its worker or node this many times (the outcomes of a shard do not depend on who ran it)
RAY_MAX_RETRIES = 3
#: outstanding shard tasks per CPU of the cluster (enough to keep every CPU busy while results are merged)
RAY_IN_FLIGHT = 2
#: version of the JSON reproducers saved in the database (part of the key: another layout gets another key)
ENTRY_VERSION = 1
SCHEMES = ("redis", "rediss", "unix")


def _optional(module: str, option: str, what: str):
    """Import ``module`` for ``option``, or a one-line ``SpecError`` naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpecError(option, f"needs {what}, which is not installed", INSTALL_HINT) from None


def require_ray():
    return _optional("ray", "--ray", "Ray (the package ray)")


def require_redis():
    _optional("redis", "--database", "the Redis client (the package redis)")
    return _optional("hypothesis.extra.redis", "--database", "the Redis client (the package redis)")


# -- the example database ---------------------------------------------------------------------------------
def redact(url: str) -> str:
    """``url`` without its password (for reports and messages)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urllib.parse.urlunsplit((parts.scheme, f"{user}:***@{netloc}", parts.path, parts.query, parts.fragment))


def check_url(url: str) -> str:
    """``url`` if it names a Redis database; ``SpecError("--database")`` otherwise."""
    try:
        scheme = urllib.parse.urlsplit(str(url)).scheme
    except ValueError:
        scheme = ""
    if scheme not in SCHEMES:
        raise SpecError("--database", f"{redact(str(url))!r} is not a Redis URL",
                        "give redis://HOST:PORT/N (or rediss://, unix://)")
    return url


def open_database(url: str, *, check: bool = True):
    """A ``RedisExampleDatabase`` on ``url`` (a ``redis.Redis`` client with short timeouts). ``check``: ping the
    server now, a one-line ``SpecError`` when it cannot be reached."""
    check_url(url)
    extra = require_redis()
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    except ValueError as err:
        raise SpecError("--database", f"{redact(url)!r} is not a usable Redis URL ({err})",
                        "give redis://HOST:PORT/N") from None
    if check:
        try:
            client.ping()
        except redis.RedisError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SpecError("--database", f"cannot reach Redis at {redact(url)} ({first})",
                            "start redis-server there or check the address") from None
    return extra.RedisExampleDatabase(client)


def database_key(nets: str, impl_name: str) -> bytes:
    """The key of a campaign's property in the example database: the nets drawn and the candidate (its ``--impl``
    string, hashed; manual_bp by name), and the entry layout's version. Not the seed, the dtypes or the case count:
    a later campaign with another seed replays the same failures."""
    impl = "manual_bp" if impl_name == "manual_bp" else hashlib.sha256(str(impl_name).encode()).hexdigest()[:16]
    return f"bp-oracle/campaign/v{ENTRY_VERSION}/nets={nets}/impl={impl}".encode()


def secondary(key: bytes) -> bytes:
    return key + b".secondary"


def encode_entry(draw, sig, *, seed: int, how: str, final: bool) -> bytes:
    """A reproducer as canonical JSON bytes: the same case saved twice (by two workers, or a retried task) is the same
    set member in Redis."""
    return json.dumps({"v": ENTRY_VERSION, "spec": draw.spec.to_dict(), "regime": draw.regime, "dtype": draw.dtype,
                       "batch": int(draw.batch), "data_seed": int(draw.data_seed), "seed": int(seed),
                       "index": int(draw.index), "signature": list(sig), "how": how, "final": bool(final)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_entry(value: bytes):
    """(Draw, entry dict) of a saved reproducer, or None when it is not one this version can replay."""
    from manual_bp import Spec

    from .campaign import Draw

    try:
        e = json.loads(value.decode("utf-8"))
        if not isinstance(e, dict) or e.get("v") != ENTRY_VERSION:
            return None
        draw = Draw(int(e["index"]), Spec.from_dict(e["spec"]), str(e["regime"]), str(e["dtype"]), int(e["batch"]),
                    int(e["data_seed"]))
        e["signature"] = tuple(e["signature"])
        int(e["seed"])
        return draw, e
    except (ValueError, KeyError, TypeError, SpecError, UnicodeDecodeError):
        return None


class Recorder:
    """A worker's side of the database: saves the first failing case of each signature this process sees in a
    campaign to ``<key>.secondary``. Best effort: Redis going away mid-campaign costs the saves (one warning on
    stderr), never the campaign."""

    def __init__(self, db, key: bytes, seed: int):
        self.db, self.key, self.seed = db, secondary(key), seed
        self.saved: set = set()
        self.failed = False

    def __call__(self, draw, outcome) -> None:
        if self.failed or outcome.signature in self.saved:
            return
        self.saved.add(outcome.signature)
        try:
            self.db.save(self.key, encode_entry(draw, outcome.signature, seed=self.seed, how="raw", final=False))
        except Exception as err:  # redis.RedisError, OSError: the campaign goes on without the database
            self.failed = True
            print(f"bp-oracle: warning: cannot save a failing case to the database ({type(err).__name__}: {err}); "
                  "this worker saves no more", file=sys.stderr)


_RECORDERS: dict = {}


def worker_recorder(url: str | None, key: bytes | None, seed: int, run_id: str):
    """The recorder of campaign ``run_id`` in this process (one Redis client per process), or None."""
    if not url:
        return None
    rec = _RECORDERS.get(run_id)
    if rec is None:
        try:
            db = open_database(url, check=False)
        except SpecError as err:
            print(f"bp-oracle: warning: no database in this worker ({err})", file=sys.stderr)
            return None
        _RECORDERS.clear()  # one campaign at a time per process
        rec = _RECORDERS[run_id] = Recorder(db, key, seed)
    return rec


# -- Ray ----------------------------------------------------------------------------------------------------
def connect_ray(address: str):
    """(ray module, owned): ``owned`` when this call connected (or started ``local``), so the campaign disconnects
    after; a Ray already initialized in this process (a notebook, a test) is used as it is."""
    ray = require_ray()
    if not address or not str(address).strip():
        raise SpecError("--ray", "no address given", "give --ray auto, --ray local or --ray HOST:PORT")
    if ray.is_initialized():
        return ray, False
    import logging

    _probe(address)
    kw = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address == "local":
        kw.update(include_dashboard=False)
    try:
        ray.init(address=address, **kw)
    except Exception as err:  # ConnectionError, ValueError, RuntimeError, ImportError for ray:// without the client
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SpecError("--ray", f"cannot connect to Ray at {address!r} ({type(err).__name__}: {first})",
                        "start a cluster (ray start --head) and give --ray auto, its HOST:PORT, or --ray local") from None
    return ray, True


def _probe(address: str) -> None:
    """A one-line error at once when nothing listens at the cluster's address (``ray.init`` would retry for minutes)."""
    import socket

    if address == "local" or address.startswith("ray://"):
        return
    fix = "start a cluster (ray start --head) and give --ray auto, its HOST:PORT, or --ray local"
    try:
        from ray._private.services import canonicalize_bootstrap_address  # where "auto" points, as ray.init finds it

        hostport = canonicalize_bootstrap_address(address)
    except ConnectionError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SpecError("--ray", f"no Ray cluster found for {address!r} ({first})", fix) from None
    except Exception:  # another Ray version: let ray.init find it
        return
    if not hostport:
        return
    host, _, port = str(hostport).rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise SpecError("--ray", f"nothing answers at {hostport} for {address!r} ({why})", fix) from None


def _ray_shard(job: dict, impl_spec: tuple):
    """One shard, in a Ray worker process (its candidate started once per process, as in the local pool)."""
    from .campaign import _worker_init, _worker_shard

    _worker_init(*impl_spec)
    return _worker_shard(job)


def run_ray(n_shards: int, make_job, *, session: tuple, address: str, impl_spec: tuple, consume, show,
            in_flight: int | None = None) -> dict:
    """Run shards 0 … ``n_shards`` − 1 (``make_job(k)``: shard k's job) as Ray tasks on ``session`` (``connect_ray``'s
    answer; disconnected at the end when it owns the connection); ``consume(part, complete)`` gets each shard's
    outcomes in case order and returns False to stop. Returns what the report's timing says about the cluster, with
    ``lost``: the first shard lost after its retries (the campaign stops there), or None."""
    from .campaign import InOrder

    ray, owned = session
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        task = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=False)(_ray_shard)
        limit = max(1, in_flight or RAY_IN_FLIGHT * cpus)
        spec_ref = ray.put(impl_spec)
        refs: dict = {}
        merged = InOrder(consume, show)
        next_submit = 0
        lost = None
        t0 = time.perf_counter()
        # No ray.cancel for the shards still out when the campaign stops (a failure limit, a lost shard): a cancel
        # interrupts a worker wherever it is, even inside an import, and a worker left half-importing torch fails its
        # next task. They finish within a shard's time, or end with the job when this call owns the connection.
        while merged.next < n_shards and not merged.stop:
            while next_submit < n_shards and len(refs) < limit:
                refs[task.remote(make_job(next_submit), spec_ref)] = next_submit
                next_submit += 1
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                k = refs.pop(ref)
                try:
                    part, complete = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # an exception in the task: not a lost worker
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, SpecError):  # e.g. an --impl file that this node does not have
                        raise SpecError(cause.field, f"on a Ray worker: {cause.problem}", cause.fix) from None
                    raise err.as_instanceof_cause() from None
                except ray.exceptions.RayError as err:    # worker, node or object lost after its retries
                    part, complete = [], False
                    if lost is None or k < lost["shard"]:
                        lost = {"shard": k, "error": f"{type(err).__name__}: "
                                f"{(str(err).strip().splitlines() or [''])[0][:200]}"}
                merged.add(k, part, complete)
        return {"address": address, "nodes": nodes, "cpus": cpus, "in_flight": limit, "max_retries": RAY_MAX_RETRIES,
                "shards": next_submit, "seconds": round(time.perf_counter() - t0, 3), "lost": lost}
    finally:
        if owned:
            ray.shutdown()
