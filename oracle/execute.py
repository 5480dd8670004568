"""Run any program as the candidate: ``--impl exec:'COMMAND ARGS'``.

``ExecCandidate("node examples/js-dense/bp.js")`` is an ordinary ``grads_fn(spec, params, x, y)`` for
:func:`oracle.check` (the same interface as :class:`oracle.isolate.IsolatedCandidate`: ``start()``,
``ensure_loaded()``, ``close()``, ``target``). Each call

1. writes the case into a fresh temporary folder in the layout of :mod:`oracle.caseio` (``case.json``, and
   ``inputs.safetensors`` and ``inputs.npz`` holding x, y, the parameters and buffers by their state_dict names
   and each dropout layer's keep mask);
2. runs ``shlex.split(COMMAND ARGS) + [folder]`` (no shell), in our working directory, in its own process group,
   with standard input closed and its standard output and error captured (into files, so a chatty program
   cannot fill a pipe or our memory);
3. reads back ``outputs.safetensors`` (or ``outputs.npz``) from that folder: ``loss``, ``grad.<param>``,
   ``input.grad``, optionally ``delta.<node>``, ``z.<node>``, ``a.<node>`` (``caseio.read_outputs``);
4. removes the folder, whatever happened.

Every way of not answering is :class:`oracle.checker.CandidateCrash`, so the verdict is ``crash`` (exit 1),
never a pass: a non-zero exit status (``exit``), death by a signal (``killed``), no exit within ``timeout``
seconds (``timeout``: the whole process group is killed), and no outputs file, or one that is unreadable,
oversized, malformed, not a plain file (a FIFO, a link) or holds a tensor name the case does not have
(``raised``). The program's standard error (its last lines) is the crash's traceback. What it answers is then
validated by the checker as any candidate's answer: wrong shapes or a float64 answer to a float32 case are
``CandidateError`` (bad input, exit 2), as for a Python function.

A command that names no program, or a program that cannot be found or is not executable, is ``SpecError``
naming ``--impl`` (bad input, exit 2), found by ``start()`` before any case is run.

The forward intermediates a program writes (``z.<node>``, ``a.<node>``) come back as ``result.forward``; the
checker does not compare them (yet).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from manual_bp import SpecError

from .isolate import DEFAULT_TIMEOUT, _signal_name, printable, printable_block

PREFIX = "exec:"
#: the most bytes of the program's standard error (and of its standard output) kept for a crash report
MAX_STREAM = 4000
#: seconds to wait for a killed process to be reaped
REAP_S = 5.0


def is_exec_target(target) -> bool:
    return isinstance(target, str) and target.startswith(PREFIX)


class _Answer:
    """What the program wrote, in the form ``checker._as_candidate`` takes (an object with .loss and .grads)."""

    def __init__(self, loss, grads, deltas, grad_input, forward):
        self.loss, self.grads, self.deltas, self.grad_input, self.forward = loss, grads, deltas, grad_input, forward
        self.buffers = None


class ExecCandidate:
    """``grads_fn(spec, params, x, y)`` that runs ``command`` on each case (see the module docstring).

    ``command`` is the text after ``exec:``, split as a POSIX shell would split it (quotes, backslashes) but run
    without a shell; the case folder's path is appended as the last argument.
    """

    def __init__(self, command: str, timeout: float = DEFAULT_TIMEOUT):
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise SpecError("--timeout", f"{timeout!r} is not a positive number of seconds", "give e.g. --timeout 60")
        command = str(command)
        if command.startswith(PREFIX):
            command = command[len(PREFIX):]
        try:
            argv = shlex.split(command)
        except ValueError as err:  # an unclosed quote
            raise SpecError("--impl", f"exec:{printable(command, 300)} cannot be split into words ({err})",
                            "close every quote, as in a shell: --impl \"exec:node 'my port/bp.js'\"") from None
        if not argv:
            raise SpecError("--impl", "exec: names no command", "write --impl \"exec:PROGRAM ARGS\", e.g. exec:node bp.js")
        argv[0] = os.path.expanduser(argv[0])  # ~/bin/port as a shell would have it
        self.argv = argv
        self.target = PREFIX + command
        self.timeout = float(timeout)
        self.calls = 0
        self._program = None

    # -- lifecycle (the same as IsolatedCandidate's; there is no worker to keep)
    def start(self) -> "ExecCandidate":
        self.ensure_loaded()
        return self

    def ensure_loaded(self) -> None:
        """Find the program now, so that a typo is bad input (exit 2) and not a crash of every case."""
        if self._program is None:
            self._program = _find_program(self.argv[0])

    def close(self) -> None:
        pass  # each call's process is waited for (or killed) and its folder removed before the call returns

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- one call
    def __call__(self, spec, params, x, y):
        from .caseio import write_case

        self.calls += 1
        folder = Path(tempfile.mkdtemp(prefix="bp-oracle-exec-"))
        try:
            try:
                write_case(folder, spec, params, x, y, _case_dtype(params, x), name=spec.name or "case")
            except OSError as err:
                raise _crash("raised", f"could not be given its case: the oracle could not write {folder} "
                                       f"({err.strerror or err})") from None
            streams = self._run(folder)
            return self._answer(folder, spec, np.shape(x)[0], streams)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, folder: Path) -> str:
        """Run the program on ``folder``; what it wrote to stderr/stdout (tails) when it exited 0, else a crash."""
        argv = [*self.argv, str(folder)]  # as given: Popen looks the program up on PATH as start() did
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True)
            except OSError as e:  # removed or made unexecutable since start()
                raise _crash("raised", f"could not be started: {printable(self.argv[0], 300)}: {e.strerror or e}") from None
            try:
                code = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)  # the leader is not reaped yet, so its group id is still ours to kill
                raise _crash("timeout", f"did not exit within {self.timeout:g} s (--timeout); its process group was killed",
                             _streams(out, err)) from None
            except BaseException:  # KeyboardInterrupt: leave nothing running
                _kill_group(proc)
                raise
            if code < 0:
                raise _crash("killed", f"was killed by signal {_signal_name(-code)}", _streams(out, err))
            if code != 0:
                raise _crash("exit", f"exited with status {code}", _streams(out, err))
            return _streams(out, err)

    def _answer(self, folder: Path, spec, m: int, streams: str) -> _Answer:
        from .caseio import read_outputs

        files = [folder / "outputs.safetensors", folder / "outputs.npz"]
        for p in files:  # a FIFO or a device would block or never end the read
            if (p.exists() or p.is_symlink()) and not (p.is_file() and not p.is_symlink()):
                raise _crash("raised", f"wrote {p.name} as something other than a plain file", streams)
        present = [p for p in files if p.is_file()]
        if not present:
            raise _crash("raised", "exited with status 0 but wrote no outputs.safetensors or outputs.npz into the case "
                                   "folder (its last argument)", streams)
        limit = _size_limit(spec, m)
        size = present[0].stat().st_size
        if size > limit:
            raise _crash("raised", f"wrote {present[0].name} of {size} bytes, more than the {limit} bytes this case's "
                                   "tensors can take", streams)
        try:
            loss, grads, deltas, grad_input, forward = read_outputs(folder, spec, what=present[0].name)
        except SpecError as e:
            raise _crash("raised", f"wrote unusable outputs: {printable(str(e), 1000)}", streams) from None
        return _Answer(loss, grads, deltas, grad_input, forward)


# -- helpers -------------------------------------------------------------------------------------------------------
def _find_program(name: str) -> str:
    """The program's path: ``name`` itself when it has a slash, else looked up on PATH; ``SpecError(--impl)``."""
    shown = printable(name, 300)
    if os.sep in name or (os.altsep and os.altsep in name):
        path = Path(name)
        if not path.exists():
            raise SpecError("--impl", f"exec: program {shown} does not exist", "check the path")
        if path.is_dir() or not os.access(path, os.X_OK):
            raise SpecError("--impl", f"exec: {shown} is not an executable file",
                            "name the interpreter first (exec:node prog.js, exec:python prog.py) or chmod +x it")
        return str(path.resolve())
    found = shutil.which(name)
    if found is None:
        raise SpecError("--impl", f"exec: program {shown!r} is not found on PATH", "install it or give its path")
    return found


def _case_dtype(params: dict, x) -> np.dtype:
    """The case's dtype: its parameters' (token x is integer), else x's, else float64."""
    for v in params.values():
        if np.asarray(v).dtype.kind == "f":
            return np.asarray(v).dtype
    x = np.asarray(x)
    return x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)


def _size_limit(spec, m: int) -> int:
    """The most bytes an outputs file may have: every gradient, δ and forward intermediate at 8 bytes an element, 4×,
    plus 1 MiB for headers (a larger file is not a plausible answer; it is refused before it is read)."""
    from .graph import nodes

    elements = sum(math.prod(s) for s in spec.param_shapes().values()) + m * math.prod(spec.input_shape) + 1
    elements += 3 * sum(m * math.prod(node.out_shape) for node in nodes(spec))  # δ, z and a of every node
    return 4 * 8 * elements + 2**20


def _streams(out, err) -> str:
    """The tail of the program's standard error (and of its standard output, if it wrote any), printable."""
    parts = []
    for label, f in (("stderr", err), ("stdout", out)):
        try:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - MAX_STREAM))
            text = f.read(MAX_STREAM).decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        if text.strip():
            cut = "…" if size > MAX_STREAM else ""
            parts.append(f"--- its {label} (last {MAX_STREAM} bytes) ---\n{cut}{text.rstrip()}" if cut else
                         f"--- its {label} ---\n{text.rstrip()}")
    return printable_block("\n".join(parts)) if parts else "(it wrote nothing to stderr or stdout)"


def _crash(kind: str, message: str, details: str = ""):
    from .checker import CandidateCrash

    return CandidateCrash(kind, message, details)


def _kill_group(proc) -> None:
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except OSError:
            pass
    try:
        proc.wait(timeout=REAP_S)
    except subprocess.TimeoutExpired:
        pass
