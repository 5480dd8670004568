"""Run a candidate gradient function in a child process, so that nothing it does can forge a verdict.

``IsolatedCandidate("path/to/mine.py:my_grads")`` (or ``"package.module:function"``) is an ordinary
``grads_fn(spec, params, x, y)`` for :func:`oracle.check`; the function it names runs in a worker
process started with ``python -c`` (never forked from us), so a candidate that calls ``sys.exit(0)``
or ``os._exit(0)``, never returns, or crashes the interpreter cannot end or hang the oracle. Each way
of not returning becomes :class:`oracle.checker.CandidateCrash`:

* ``raised``: an exception; the traceback is the candidate's own frames (ours dropped);
* ``exit``: ``sys.exit(code)`` (caught; the worker lives on), or the process ended by itself
  (``os._exit``) with the status named;
* ``killed``: a signal (SIGSEGV, SIGABRT, ...), named, with the faulthandler dump of where it was;
* ``timeout``: no answer within ``timeout`` seconds; the worker (its whole process group) is killed,
  after a faulthandler dump of where it was stuck.

The worker is started once and reused for every call (a fuzz campaign pays its start-up once), and
restarted after a crash or a timeout. It gets our ``sys.path`` (so ``module:function`` resolves as it
would here) with, for ``file.py:function``, the file's folder first (as ``python file.py`` has), and
its standard output goes to our standard error (our standard output carries only the verdict).

Protocol (two pipes, one request at a time): a message is an 8-byte big-endian length, a UTF-8 JSON
header, then the raw bytes of the arrays the header lists as ``[dtype, shape]`` (numeric dtypes only),
C order, one after the other. Nothing from the worker is ever unpickled: the reply is JSON and raw
numbers, checked against the sizes the spec allows before a byte of array data is read, and rebuilt
here into plain objects that ``checker.run_candidate`` validates as if the candidate had returned
them in-process (so wrong keys, shapes or dtypes still give the same ``CandidateError``). Anything
that is not a numeric array (a list, a tensor, an object array) comes back as a stand-in with the
same type name, shape, dtype and ``repr``, which the checker refuses with the usual message.

POSIX only (pipes passed by descriptor, process groups, signals). This module imports neither torch
nor the checker at import time: the worker imports it, and only NumPy and manual_bp besides.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from manual_bp import SpecError

DEFAULT_TIMEOUT = 60.0
#: extra seconds allowed for the worker's own start-up (interpreter, NumPy, the candidate's imports)
STARTUP_ALLOWANCE = 10.0
#: the largest JSON header accepted from the worker
MAX_HEADER = 4 * 2**20
#: bytes allowed per expected element of an array the worker returns (complex256 is 32)
BYTES_PER_ELEMENT = 32
#: the longest text (message, repr, traceback) kept from the worker
MAX_TEXT = 2000
MAX_TRACEBACK = 64 * 2**10
_LEN = struct.Struct(">Q")
_NUMERIC_DTYPE = re.compile(r"^[<>|=][biufc]\d{1,2}$")
_OTHER_DTYPE = re.compile(r"^[<>|=]?[A-Za-z]\d{0,6}(\[\w{1,8}\])?$")
_HERE = os.path.abspath(__file__)
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from oracle import isolate; isolate._worker_main(sys.argv[2:])"


# -- targets ------------------------------------------------------------------------------------------
def resolve_target(target: str) -> str:
    """``module:function`` unchanged; ``path/file.py:function`` with the path made absolute.

    Checks only the form and that the file exists; nothing is imported here.
    """
    module_name, sep, func = str(target).rpartition(":")
    if not sep or not module_name or not func:
        raise SpecError("--impl", f"{printable(target)!r} has no ':function' part", "write module:function or file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise SpecError("--impl", f"file {printable(module_name)} does not exist", "check the path")
        return f"{path.resolve()}:{func}"
    return f"{module_name}:{func}"


def describe_target(target: str) -> str:
    """What trusting ``target`` runs, in words (for ``replay --trust-recorded-impl``)."""
    if target.startswith("exec:"):
        return f"running the program {printable(target[len('exec:'):])}"
    module_name, _, func = target.rpartition(":")
    if module_name.endswith(".py"):
        return f"importing file {printable(module_name)}, function {printable(func)}"
    return f"importing module {printable(module_name)} (as found on sys.path), function {printable(func)}"


def printable(text, limit: int = MAX_TEXT) -> str:
    """``text`` with control characters escaped (no terminal escapes from untrusted strings), cut at ``limit``."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _one_line(text) -> str:
    return " ".join(printable(str(text).replace("\n", " ").replace("\r", " ")).split())


# -- framing (both sides) ------------------------------------------------------------------------------
def _message(header: dict, arrays: list) -> list:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    head = json.dumps(header, allow_nan=True).encode("utf-8")
    return [_LEN.pack(len(head)), head] + [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays if a.size]


def _array_layout(entries, budget: int | None) -> list:
    """``[(dtype, shape, nbytes)]`` from a header's array list; refuses anything but numeric arrays."""
    if not isinstance(entries, list):
        raise _ProtocolError("arrays is not a list")
    out, total = [], 0
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and _NUMERIC_DTYPE.match(entry[0])):
            raise _ProtocolError("an array entry is malformed")
        dtype = np.dtype(entry[0])
        if dtype.kind not in "biufc":
            raise _ProtocolError(f"dtype {entry[0]!r} is not numeric")
        shape = _shape(entry[1])
        nbytes = math.prod(shape) * dtype.itemsize
        total += nbytes
        if budget is not None and total > budget:
            raise _ProtocolError(f"it announced {total} bytes of arrays where the spec allows at most {budget}")
        out.append((dtype, shape, nbytes))
    return out


def _shape(value) -> tuple:
    if not (isinstance(value, list) and len(value) <= 32 and all(type(d) is int and 0 <= d <= 2**40 for d in value)):
        raise _ProtocolError("a shape is malformed")
    return tuple(value)


def _arrays_from(buf, layout) -> list:
    out, offset = [], 0
    for dtype, shape, nbytes in layout:
        if nbytes == 0:
            out.append(np.zeros(shape, dtype=dtype))
            continue
        a = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        out.append(a.reshape(shape).copy())  # aligned, writable, ours
        offset += nbytes
    return out


class _ProtocolError(Exception):
    pass


class _Timeout(Exception):
    pass


class _Gone(Exception):
    pass


# -- the parent side -----------------------------------------------------------------------------------
class _Returned:
    """What the worker said the candidate returned, rebuilt for ``checker._as_candidate``."""

    def __init__(self, loss, grads, deltas, grad_input, buffers=None):
        self.loss, self.grads, self.deltas, self.grad_input = loss, grads, deltas, grad_input
        self.buffers = buffers


class _Standin:
    """Stands for a value that stayed in the worker (not a numeric array): only its type name and repr."""

    __slots__ = ("_repr",)

    def __repr__(self) -> str:
        return self._repr


def _standin(type_name, text):
    name = printable(type_name if isinstance(type_name, str) else "object", 80) or "object"
    obj = type(name, (_Standin,), {"__slots__": ()})()
    obj._repr = printable(text if isinstance(text, str) else "?", 300)
    return obj


def _decode_leaf(node, arrays):
    if not isinstance(node, dict):
        raise _ProtocolError("a value node is malformed")
    kind = node.get("t")
    if kind == "none":
        return None
    if kind == "str":
        if not isinstance(node.get("v"), str):
            raise _ProtocolError("a key node is malformed")
        return node["v"]
    if kind == "array":
        i = node.get("i")
        if type(i) is not int or not 0 <= i < len(arrays):
            raise _ProtocolError("an array index is out of range")
        return arrays[i]
    if kind == "shaped":
        shape = _shape(node.get("shape"))
        text = node.get("dtype")
        try:
            dtype = np.dtype(text) if isinstance(text, str) and _OTHER_DTYPE.match(text) else np.dtype(object)
        except (TypeError, ValueError):
            dtype = np.dtype(object)
        try:
            return np.broadcast_to(np.zeros((), dtype=dtype), shape)  # no memory: shape and dtype only
        except (ValueError, MemoryError):
            raise _ProtocolError("a shape is too large") from None
    if kind == "opaque":
        return _standin(node.get("type"), node.get("repr"))
    raise _ProtocolError(f"unknown node kind {printable(kind, 40)!r}")


def _decode_map(node, arrays):
    if isinstance(node, dict) and node.get("t") == "map":
        items = node.get("items")
        if not isinstance(items, list):
            raise _ProtocolError("a map node is malformed")
        out = {}
        for item in items:
            if not (isinstance(item, list) and len(item) == 2):
                raise _ProtocolError("a map item is malformed")
            out[_decode_leaf(item[0], arrays)] = _decode_leaf(item[1], arrays)
        return out
    return _decode_leaf(node, arrays)


def _byte_budget(spec, m: int) -> dict:
    """The most bytes the worker may send per returned array name (and ``"*"``: in all)."""
    limits = {k: math.prod(s) * BYTES_PER_ELEMENT + 64 for k, s in spec.param_shapes().items()}
    from .graph import nodes
    for node in nodes(spec):  # every δ, those inside blocks too
        limits[node.name] = m * math.prod(node.out_shape) * BYTES_PER_ELEMENT + 64
    limits["input.grad"] = m * spec.input_size * BYTES_PER_ELEMENT + 64
    limits.update({k: math.prod(s) * BYTES_PER_ELEMENT + 64 for k, s in spec.buffer_shapes().items()})
    limits["loss"] = BYTES_PER_ELEMENT + 64
    limits["*"] = sum(limits.values())
    return limits


def _signal_name(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    what = signal.strsignal(signum) if hasattr(signal, "strsignal") else None
    return f"{name} ({what})" if what else name


class IsolatedCandidate:
    """``grads_fn(spec, params, x, y)`` that runs ``target`` in a worker process (see the module docstring).

    ``start()`` launches the worker and asks it to import the target without waiting, so the import
    overlaps whatever we do next; ``ensure_loaded()`` waits for it and raises ``SpecError`` (field
    ``--impl``) when the target does not import or is not a function. Use as a context manager, or
    call ``close()``; a worker left behind is killed when this object is collected or at exit.
    """

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise SpecError("--timeout", f"{timeout!r} is not a positive number of seconds", "give e.g. --timeout 60")
        self.target = resolve_target(target)
        self.timeout = float(timeout)
        self.starts = 0  # how many workers were started (a restart follows each crash or timeout)
        self._seq = 0
        self._proc = None
        self._loaded = False
        self._finalizer = None

    # -- lifecycle
    def start(self) -> "IsolatedCandidate":
        if self._proc is not None:
            return self
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        fault = tempfile.TemporaryFile()
        root = str(Path(_HERE).parent.parent)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, root, str(req_r), str(resp_w), str(fault.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=sys.__stderr__.fileno() if _has_fd(sys.__stderr__) else None,
                pass_fds=(req_r, resp_w, fault.fileno()), start_new_session=True, close_fds=True)
        except BaseException:
            for fd in (req_r, req_w, resp_r, resp_w):
                os.close(fd)
            fault.close()
            raise
        os.close(req_r)
        os.close(resp_w)
        os.set_blocking(req_w, False)
        self._proc, self._req, self._resp, self._fault = proc, req_w, io.FileIO(resp_r, "r"), fault
        self._loaded = False
        self.starts += 1
        self._finalizer = weakref.finalize(self, _reap, proc, req_w, self._resp, fault)
        self._load_deadline = time.monotonic() + self.timeout + STARTUP_ALLOWANCE
        try:
            self._send({"op": "load", "target": self.target, "sys_path": [p for p in sys.path if isinstance(p, str)]}, [],
                       self._load_deadline)
        except (_Timeout, _Gone):
            pass  # ensure_loaded() finds out how the worker ended
        return self

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc, self._finalizer, self._loaded = None, None, False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def ensure_loaded(self) -> None:
        """Wait until the worker has imported the target; ``SpecError`` naming ``--impl`` if it could not."""
        if self._proc is None:
            self.start()
        if self._loaded:
            return
        what = f"importing {printable(self.target)}"
        try:
            reply, _ = self._recv(self._load_deadline, {"*": 0})
        except _Timeout:
            self._stop(dump=False)
            raise SpecError("--impl", f"{what} did not finish within {self.timeout + STARTUP_ALLOWANCE:g} s",
                            "make the module importable quickly (no work at import time), or raise --timeout") from None
        except _Gone:
            _, how = self._how_it_ended()
            self.close()
            raise SpecError("--impl", f"{what} ended the worker process ({how})", "fix the module so it imports") from None
        except _ProtocolError as err:
            self.close()
            raise SpecError("--impl", f"{what} broke the worker's channel ({_one_line(err)})", "fix the module so it imports") from None
        if reply.get("status") == "loaded":
            self._loaded = True
            return
        self.close()
        if reply.get("status") == "load_error":
            raise SpecError("--impl", _one_line(reply.get("problem", "does not import")), _one_line(reply.get("fix", "fix the module")))
        raise SpecError("--impl", f"{what} gave an unexpected answer", "fix the module so it imports")

    # -- one call
    def __call__(self, spec, params, x, y):
        from .checker import CandidateCrash

        if self._proc is None or self._proc.poll() is not None:
            self.close()
            try:
                self.start()
                self.ensure_loaded()
            except SpecError as err:
                raise CandidateCrash("raised", f"could not be imported again after its worker was restarted ({err})") from None
        x, y = np.asarray(x), np.asarray(y)
        names = list(params)
        budget = _byte_budget(spec, x.shape[0] if x.ndim == 2 else 1)
        deadline = time.monotonic() + self.timeout
        self._seq += 1
        try:
            self._send({"op": "call", "seq": self._seq, "spec": spec.to_dict(), "names": names}, [params[n] for n in names] + [x, y], deadline)
            reply, arrays = self._recv(deadline, budget)
        except _Timeout:
            where = self._stop(dump=True)
            raise CandidateCrash("timeout", f"did not return within {self.timeout:g} s (--timeout); its worker process was killed",
                                 where) from None
        except _Gone:
            kind, how = self._how_it_ended()
            dump = self._fault_text()
            self.close()
            raise CandidateCrash(kind, f"ended its process ({how}) instead of returning", dump) from None
        except _ProtocolError as err:
            self._stop(dump=False)
            raise CandidateCrash("raised", f"broke the oracle's channel to its worker process ({_one_line(err)})") from None
        try:
            return self._result(reply, arrays, spec)
        except _ProtocolError as err:
            self._stop(dump=False)
            raise CandidateCrash("raised", f"broke the oracle's channel to its worker process ({_one_line(err)})") from None

    def _result(self, reply, arrays, spec):
        from .checker import CandidateCrash

        if reply.get("seq") != self._seq:
            raise _ProtocolError("a reply to another call")
        status = reply.get("status")
        if status == "raised":
            raise CandidateCrash("raised", printable(reply.get("message", "raised"), MAX_TEXT),
                                 printable_block(reply.get("traceback", "")))
        if status == "exit":
            raise CandidateCrash("exit", f"called sys.exit({printable(reply.get('code', ''), 200)})",
                                 printable_block(reply.get("traceback", "")))
        if status != "ok":
            raise _ProtocolError("unknown reply status")
        if "whole" in reply:
            return _decode_leaf(reply["whole"], arrays)  # not a tuple nor an object with .loss/.grads
        loss = _decode_leaf(reply.get("loss"), arrays)
        grads = _decode_map(reply.get("grads"), arrays)
        deltas = _decode_map(reply.get("deltas", {"t": "none"}), arrays)
        grad_input = _decode_leaf(reply.get("grad_input", {"t": "none"}), arrays)
        buffers = _decode_map(reply.get("buffers", {"t": "none"}), arrays)
        return _Returned(loss, grads, deltas, grad_input, buffers)

    # -- plumbing
    def _send(self, header: dict, arrays: list, deadline: float) -> None:
        poller = select.poll()
        poller.register(self._req, select.POLLOUT)
        for chunk in _message(header, arrays):
            view = memoryview(chunk)
            while len(view):
                try:
                    n = os.write(self._req, view)
                    view = view[n:]
                    continue
                except BlockingIOError:
                    pass
                except (BrokenPipeError, OSError):
                    raise _Gone() from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout()
                if not poller.poll(min(remaining, 0.5) * 1000) and self._proc.poll() is not None:
                    raise _Gone()

    def _read_exact(self, n: int, deadline: float) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        poller = select.poll()
        poller.register(self._resp.fileno(), select.POLLIN)
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            if not poller.poll(min(remaining, 0.5) * 1000):
                if self._proc.poll() is not None:
                    raise _Gone()  # dead, though something else holds the pipe open
                continue
            k = self._resp.readinto(view[got:got + min(n - got, 1 << 20)])
            if not k:
                raise _Gone()
            got += k
        return buf

    def _recv(self, deadline: float, budget: dict):
        (size,) = _LEN.unpack(self._read_exact(_LEN.size, deadline))
        if size > MAX_HEADER:
            raise _ProtocolError(f"a {size}-byte header")
        try:
            header = json.loads(self._read_exact(size, deadline).decode("utf-8"))
        except (_Timeout, _Gone):
            raise
        except Exception as err:  # bad UTF-8, bad JSON, nesting that exhausts the parser
            raise _ProtocolError(f"unreadable header: {type(err).__name__}") from None
        if not isinstance(header, dict):
            raise _ProtocolError("the header is not an object")
        layout = _array_layout(header.get("arrays", []), budget["*"])
        data = self._read_exact(sum(nb for _, _, nb in layout), deadline)
        return header, _arrays_from(data, layout)

    def _how_it_ended(self) -> tuple:
        """(crash kind, words) for a worker whose channel closed."""
        code = self._wait()
        if code is None:
            return "exit", "it closed its channel to the oracle and was killed"
        if code < 0:
            return "killed", f"killed by signal {_signal_name(-code)}"
        return "exit", f"exit status {code}, as os._exit({code}) gives"

    def _wait(self):
        try:
            return self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(self._proc)
            self._proc.wait()
            return None

    def _stop(self, *, dump: bool) -> str:
        """Kill the worker (its process group); with ``dump``, first ask faulthandler where it is."""
        text = ""
        if dump and self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, signal.SIGUSR1)
                size, stable_since, give_up = -1, time.monotonic(), time.monotonic() + 1.0
                while time.monotonic() < give_up:  # until the dump stops growing for 50 ms
                    time.sleep(0.02)
                    now = os.fstat(self._fault.fileno()).st_size
                    if now != size:
                        size, stable_since = now, time.monotonic()
                    elif now and time.monotonic() - stable_since > 0.05:
                        break
            except OSError:
                pass
            text = self._fault_text()
        self.close()
        return text

    def _fault_text(self) -> str:
        try:
            self._fault.seek(0)
            raw = self._fault.read(MAX_TRACEBACK).decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        keep = [line for line in raw.splitlines() if _HERE not in line and 'File "<string>"' not in line]
        return printable_block("\n".join(keep).strip())


def printable_block(text) -> str:
    """Like ``printable`` for multi-line text: newlines kept, other control characters escaped."""
    if not isinstance(text, str):
        return ""
    return "\n".join(printable(line, MAX_TRACEBACK) for line in text[:MAX_TRACEBACK].split("\n"))


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _kill(proc) -> None:
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _reap(proc, req_fd, resp, fault) -> None:
    """Close our ends (the worker sees end-of-file and exits), then make sure it is gone."""
    try:
        os.close(req_fd)
    except OSError:
        pass
    if proc.poll() is None:
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    _kill(proc)  # the whole group: anything the candidate started, too
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    resp.close()
    fault.close()


# -- the worker side -----------------------------------------------------------------------------------
def _worker_main(argv) -> None:
    req_fd, resp_fd, fault_fd, parent = (int(a) for a in argv)
    _die_with_parent(parent)
    import faulthandler

    for fd in (req_fd, resp_fd, fault_fd):
        os.set_inheritable(fd, False)
    faulthandler.enable(file=fault_fd, all_threads=True)
    if hasattr(faulthandler, "register"):
        faulthandler.register(signal.SIGUSR1, file=fault_fd, all_threads=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the oracle handles Ctrl-C and stops us
    rfile, wfile = io.FileIO(req_fd, "r"), io.FileIO(resp_fd, "w")
    fn = None
    while True:
        msg = _worker_recv(rfile)
        if msg is None:
            return
        header, arrays = msg
        if header.get("op") == "load":
            reply, fn = _worker_load(header)
            out = []
        else:
            reply, out = _worker_call(fn, header, arrays)
            reply["seq"] = header.get("seq")
        for chunk in _message(reply, out):
            wfile.write(chunk)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    if os.getppid() != parent:
        os._exit(70)


def _worker_read(rfile, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = rfile.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _worker_recv(rfile):
    head = _worker_read(rfile, _LEN.size)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    header = json.loads(_worker_read(rfile, size).decode("utf-8"))
    layout = _array_layout(header.get("arrays", []), None)
    data = _worker_read(rfile, sum(nb for _, _, nb in layout)) if layout else b""
    return header, _arrays_from(bytearray(data), layout)


def _worker_load(header):
    import importlib
    import importlib.util

    sys.path[:] = list(header["sys_path"])
    target = header["target"]
    module_name, _, func = target.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            sys.path.insert(0, str(path.parent))  # as `python file.py` has: modules beside it import
            sys.argv = [str(path)]
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            sys.argv = [module_name]
            module = importlib.import_module(module_name)
    except SystemExit as err:
        return _load_error(f"{module_name} called sys.exit({_safe_repr(err.code)}) while being imported",
                           "remove the exit from the module's top level"), None
    except BaseException as err:
        return _load_error(f"{module_name} does not import ({type(err).__name__}: {_safe_str(err)})",
                           "fix the module or the path"), None
    fn = getattr(module, func, None)
    if fn is None:
        return _load_error(f"{module_name} has no {func!r}", "name a function defined in that module"), None
    if not callable(fn):
        return _load_error(f"{target} is not callable", "name a function grads_fn(spec, params, x, y)"), None
    return {"status": "loaded"}, fn


def _load_error(problem, fix):
    return {"status": "load_error", "problem": problem, "fix": fix}


def _safe_str(obj) -> str:
    try:
        return str(obj)[:MAX_TEXT]
    except BaseException:
        return f"<{type(obj).__name__} whose str() failed>"


def _safe_repr(obj) -> str:
    try:
        return repr(obj)[:300]
    except BaseException:
        return f"<{type(obj).__name__} whose repr() failed>"


def _user_traceback(err: BaseException) -> str:
    """The traceback from the candidate's first frame on (this module's frames dropped)."""
    import traceback

    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _HERE:
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(err), err, tb))[:MAX_TRACEBACK]
    except BaseException:
        return f"{type(err).__name__} (its traceback could not be formatted)"


def _worker_call(fn, header, arrays):
    from manual_bp import Spec

    spec = Spec.from_dict(header["spec"])
    names = header["names"]
    params = dict(zip(names, arrays[:-2]))
    x, y = arrays[-2], arrays[-1]
    try:
        result = fn(spec, params, x, y)
        return _encode_result(result, spec, x)
    except SystemExit as err:
        return {"status": "exit", "code": _safe_repr(err.code), "traceback": _user_traceback(err)}, []
    except BaseException as err:
        return {"status": "raised", "message": f"raised {type(err).__name__}: {_safe_str(err)}",
                "traceback": _user_traceback(err)}, []


def _opaque(value) -> dict:
    return {"t": "opaque", "type": type(value).__name__, "repr": _safe_repr(value)}


def _encode_result(result, spec, x):
    """The reply for what the candidate returned: arrays to send, stand-ins for everything else."""
    from collections.abc import Mapping

    limits = _byte_budget(spec, x.shape[0])
    param_keys = set(spec.param_shapes())
    from .graph import nodes
    delta_keys = {node.name for node in nodes(spec)}
    out: list = []

    def array(value, limit):
        if value is None:
            return {"t": "none"}
        if isinstance(value, np.ndarray):
            if (value.dtype.kind in "biufc" and value.dtype.fields is None and _NUMERIC_DTYPE.match(value.dtype.str)
                    and limit is not None and value.nbytes <= limit):
                out.append(value)
                return {"t": "array", "i": len(out) - 1}
            return {"t": "shaped", "dtype": value.dtype.str, "shape": [int(d) for d in value.shape]}
        return _opaque(value)

    def mapping(value, known, keep_unknown: bool):
        if value is None:
            return {"t": "none"}
        if not isinstance(value, Mapping):
            return _opaque(value)
        items, unknown = [], 0
        for key in value:
            if isinstance(key, str) and key in known:
                items.append([{"t": "str", "v": key}, array(value[key], limits[key])])
            elif keep_unknown and unknown < 10:  # the checker names the first unknown key; its value is never read
                unknown += 1
                items.append([{"t": "str", "v": key} if isinstance(key, str) else _opaque(key), {"t": "none"}])
        return {"t": "map", "items": items}

    if isinstance(result, tuple) and len(result) in (2, 3):
        loss, grads, deltas, grad_input = result[0], result[1], result[2] if len(result) == 3 else None, None
        buffers = None
    elif hasattr(result, "loss") and hasattr(result, "grads"):
        loss, grads = result.loss, result.grads
        deltas, grad_input = getattr(result, "deltas", None), getattr(result, "grad_input", None)
        buffers = getattr(result, "buffers", None)
    else:
        return {"status": "ok", "whole": _opaque(result)}, out
    try:
        value = np.asarray(loss)
    except Exception:
        value = None
    if value is not None and value.dtype.kind in "fiu" and value.size == 1 and _NUMERIC_DTYPE.match(value.dtype.str):
        out.append(value.reshape(()))
        loss_node = {"t": "array", "i": len(out) - 1}
    else:
        loss_node = _opaque(loss)
    reply = {"status": "ok", "loss": loss_node, "grads": mapping(grads, param_keys, True),
             "deltas": mapping(deltas, delta_keys, False), "grad_input": array(grad_input, limits["input.grad"]),
             "buffers": mapping(buffers if isinstance(buffers, Mapping) else None, set(spec.buffer_shapes()), False)}
    return reply, out
