"""The command runs in a watched child process, so that nothing ends it without a word.

User code runs inside netshrink's process — a ``--model`` factory, a ``--data`` or ``--eval``
function, a model's ``forward`` — and can end that process where no exception handler sees it:
``os._exit(0)``, ``os.abort()``, a signal sent to itself, a C library's ``exit()``, a crash in
an extension. :func:`supervise` therefore forks: the child runs the command while the first
process waits for it. Through a pipe the child says which user call it enters and leaves
(:func:`user_call`) and, as its last act, its exit code. A child that ends without saying its
exit code did not finish: the parent prints one line naming the user call it was in (exit 2,
the user's code is at fault) or how the process ended (exit 1), and removes the temporary
folders the child named (:func:`remove_if_killed`: the staging folder beside ``--out``).

A fork costs no second import of torch and changes nothing in the child's own state (no function
is replaced while user code runs). The child dies with its parent (``PR_SET_PDEATHSIG``), so a
``kill -9`` of the command stops the work as before. Ctrl-C reaches the child directly (the two
share the terminal's process group), so the parent ignores it; ``SIGTERM`` and ``SIGHUP`` sent to
the parent are passed on.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import select
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)
_POLL_S = 0.2
_report_fd: int | None = None
"""The write end of the pipe to the watching parent, in the child only."""


def _say(line: str) -> None:
    if _report_fd is not None:
        with contextlib.suppress(OSError):
            os.write(_report_fd, (" ".join(line.split()) + "\n").encode(errors="replace"))


@contextlib.contextmanager
def user_call(description: str) -> Iterator[None]:
    """Tell the watching parent (if any) that user code ``description`` runs inside the block."""
    _say(f"call {description}")
    try:
        yield
    finally:
        _say("back")


def remove_if_killed(folder: Path) -> None:
    """Have the watching parent (if any) remove the temporary ``folder`` should this process end
    abruptly (a staging folder no ``finally`` block will ever clean up)."""
    _say(f"own {os.fsencode(folder).hex()}")


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this child when ``parent`` dies (Linux); elsewhere a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


_C_EXIT_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_c_exit_hook: Any = None
"""The C callback of :func:`_end_c_exit_at_once`, kept alive for as long as the process."""


def _end_c_exit_at_once() -> None:
    """Make the C library's ``exit()`` end this forked child at once.

    ``exit()`` called by user code (through ctypes or an extension) runs the C exit handlers, and
    the static destructor of a thread pool inherited from the parent waits forever for threads a
    forked child does not have. Exit handlers run last-registered first, so this one runs before
    those and ends the process (status 1; the parent reports it). Where the C library offers no
    ``__cxa_atexit``, nothing is registered.
    """
    global _c_exit_hook
    _c_exit_hook = _C_EXIT_HOOK(lambda _arg: os._exit(1))
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).__cxa_atexit(_c_exit_hook, None, None)


def _child(run: Callable[[], int], parent: int, write_fd: int) -> None:
    """Run the command, say its exit code, and exit with it (never returns)."""
    global _report_fd
    _die_with_parent(parent)
    _end_c_exit_at_once()
    _report_fd = write_fd
    try:
        code = run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a bug: its traceback, as an unsupervised run would print it
        traceback.print_exc()
        code = 1
    # Python's exit handlers run (flushing logs, removing temporary folders), but not the C
    # library's: a thread pool's static destructor would wait forever for threads that a forked
    # child does not have. atexit offers no public way to run the handlers without exiting.
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _say(f"exit {code}")
    os._exit(code)


def _signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; the number for a signal without a name (a real-time one)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class _Watch:
    """What the parent has heard from the child: the user calls open, its exit code, and which
    signal the parent passed on to it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.calls: list[str] = []
        self.code: int | None = None
        self.forwarded: int | None = None
        self.owned: list[Path] = []
        self._partial = b""

    def forward(self, signum: int, _frame: object) -> None:
        self.forwarded = signum
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def hear(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            kind, _, rest = raw.decode(errors="replace").partition(" ")
            if kind == "call":
                self.calls.append(rest)
            elif kind == "back" and self.calls:
                self.calls.pop()
            elif kind == "exit" and rest.lstrip("-").isdigit():
                self.code = int(rest)
            elif kind == "own":
                with contextlib.suppress(ValueError):
                    self.owned.append(Path(os.fsdecode(bytes.fromhex(rest))))

    def wait(self, read_fd: int) -> int:
        """Read the pipe until the child is gone; return its wait status."""
        while True:
            ready, _, _ = select.select([read_fd], [], [], _POLL_S)
            if ready:
                chunk = os.read(read_fd, 65536)
                if chunk:
                    self.hear(chunk)
                    continue
                return os.waitpid(self.pid, 0)[1]  # end of file: the child has exited
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:  # exited, though a process it started still holds the pipe open
                while select.select([read_fd], [], [], 0)[0] and (chunk := os.read(read_fd, 65536)):
                    self.hear(chunk)
                return status

    def verdict(self, status: int) -> tuple[int, str | None]:
        """The exit code to end with, and the line to print when the child did not finish."""
        if self.code is not None:
            return self.code, None
        code = os.waitstatus_to_exitcode(status)
        how = f"exit status {code}" if code >= 0 else f"signal {_signal_name(-code)}"
        if self.forwarded is not None:
            return 1, f"failed: stopped by {_signal_name(self.forwarded)}"
        if self.calls:
            return 2, (
                f"error: {self.calls[-1]} ended netshrink's process ({how}) instead of returning;"
                " user code must return its result or raise an exception, never exit the process"
            )
        outside = " (killed from outside, or out of memory)" if code == -signal.SIGKILL else ""
        return 1, f"failed: netshrink's process ended before it finished ({how}){outside}"


def supervise(run: Callable[[], int]) -> int:
    """Run ``run`` (the command; returns its exit code) in a watched child process and return
    the code to exit with. Where ``os.fork`` is missing, ``run`` runs in this process."""
    if not hasattr(os, "fork"):
        return run()
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(run, parent, write_fd)
    os.close(write_fd)
    watch = _Watch(pid)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, *_FORWARDED)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in _FORWARDED:
        signal.signal(signum, watch.forward)
    try:
        status = watch.wait(read_fd)
    finally:
        os.close(read_fd)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    code, line = watch.verdict(status)
    if line is not None:
        print(line, file=sys.stderr)
        for folder in watch.owned:
            shutil.rmtree(folder, ignore_errors=True)
    return code
