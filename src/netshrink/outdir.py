"""A run's output folder as one unit: staged beside ``--out``, swapped in whole, never mixed.

``netshrink compress --out OUT`` writes the model, the baseline, the report and the plots into a
staging folder ``.OUT.netshrink-staging-<random>`` beside ``OUT`` and, once everything is
written, exchanges it with ``OUT`` in one ``renameat2(RENAME_EXCHANGE)`` call: a kill at any
moment leaves ``OUT`` either as it was or complete, never the new model beside the old report.

Before any work, :func:`claim` checks that ``OUT`` can be written (a probe file in the staging
folder), takes a lock so that a second run on the same ``OUT`` is refused rather than
interleaved, removes staging folders that killed runs left behind, and refuses an ``OUT`` holding
anything netshrink did not write: every run leaves a marker (:data:`MARKER`) listing its files,
and only a folder whose entries are all listed there (or an empty one) is replaced. Files and
folders are created with the process's umask, like any other tool's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from netshrink.errors import InputError
from netshrink.quote import excerpt
from netshrink.supervisor import remove_if_killed

if TYPE_CHECKING:
    from torch import nn

MARKER = ".netshrink-run.json"
"""File in every finished run folder listing the entries netshrink wrote there."""
TAG = ".netshrink-"
"""Part of the names of the lock, staging and swapped-out folders beside an output folder."""
REPORT_OVERHEAD = 16 * 2**20
"""Bytes a run writes besides its two artifacts (report, plots), generously rounded up."""
PROBE_BYTES = 4096
MAX_MARKER_BYTES = 2**20
LOCK_GRACE_S = 2.0
"""How long a run waits for the lock before calling ``--out`` busy: a run just killed with -9
holds it until the kernel has ended its worker process, which a loaded machine can delay."""

P = TypeVar("P")


class OutputError(InputError):
    """``--out`` cannot take the run: not a folder, not writable, busy, full, or not ours."""


def _beside(target: Path, kind: str) -> str:
    return f".{target.name}{TAG}{kind}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder, renamed
    into place; the file gets the usual ``0o666 & ~umask`` mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """``0o666`` less the process's umask: the mode an ordinary new file gets. Read from
    /proc/self/status where Linux shows it (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def make_dir_beside(target: Path, kind: str) -> Path:
    """A new, empty folder ``.<target name>.netshrink-<kind>-<random>`` beside ``target``,
    created with the umask's mode (``tempfile.mkdtemp`` would force 0o700)."""
    while True:
        path = target.parent / f"{_beside(target, kind)}-{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


_RENAMEAT2 = _renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at ``a`` and ``b`` in one step; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target``, replacing what is there as a whole.

    Safe against a concurrent writer of the same ``target``: each swap is one rename or one
    exchange, and what a writer swaps out is removed by that writer, so no orphan stays.
    """
    while True:
        try:
            os.rename(new, target)  # target absent or an empty folder
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            if _exchange(new, target):
                shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old content
                return
        except FileNotFoundError:
            continue  # another writer moved target away meanwhile: try again
        old = make_dir_beside(target, "old")
        try:
            os.rename(target, old / "previous")
            os.rename(new, target)
            return
        except FileNotFoundError:
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)


def check_replaceable(target: Path, ours: Iterable[str], what: str | None = None) -> None:
    """Refuse to replace ``target`` unless it is absent, an empty folder, or a folder holding
    only entries named in ``ours`` (what netshrink wrote there). ``what`` names it in errors."""
    name = what or str(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputError(f"{name} is not a folder (a file or a link); netshrink replaces folders")
    foreign = sorted(set(os.listdir(target)) - set(ours))
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(excerpt(f, 60) for f in foreign[:5]) + more
        raise OutputError(
            f"{name} holds files netshrink did not write ({shown}); it is replaced as a whole, "
            "so give a new or empty folder, or one netshrink wrote"
        )


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Raise :class:`OutputError` unless ``path`` could be created: it lies below folders only,
    the nearest existing one writable. ``what`` names it (``--onnx model.onnx``)."""
    ancestor = _first_existing(path.absolute().parent)
    if not ancestor.is_dir():
        raise OutputError(f"{what} lies below {str(ancestor)!r}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: no permission to write in {str(ancestor)!r}")


def _owned(out: Path) -> set[str]:
    """Entries of the previous run recorded in ``out``'s marker (empty without one).

    Only a small regular file is read: a FIFO in its place would block the reader forever.
    """
    try:
        info = os.lstat(out / MARKER)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MARKER_BYTES:
            return set()
        files = json.loads((out / MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(files, list):
        return set()
    return {f for f in files if isinstance(f, str)} | {MARKER}


def check_target(out: Path) -> None:
    """Raise :class:`OutputError` unless ``out`` can become this run's output folder."""
    ancestor = _first_existing(out.absolute())
    if ancestor != out.absolute() and not ancestor.is_dir():
        raise OutputError(f"--out {str(out)!r} lies below {str(ancestor)!r}, which is a file")
    if not out.exists() and not out.is_symlink():
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"--out {str(out)!r}: no permission to create it in {ancestor}")
        return
    check_replaceable(out, _owned(out), f"--out {str(out)!r}")
    for path in (out, out.parent):
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(
                f"--out {str(out)!r}: no permission to replace it ({path} is read-only)"
            )


def _flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive ``flock`` on ``fd``, trying for up to ``seconds``; whether it was taken."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


class _Lock:
    """An exclusive ``flock`` on ``.OUT.netshrink-lock`` beside ``OUT``; removed on release."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / _beside(out, "lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _flock_within(fd, LOCK_GRACE_S):
                os.close(fd)
                raise OutputError(
                    f"--out {str(out)!r} is in use by another netshrink run; wait for it to "
                    "finish or give another folder"
                ) from None
            # The holder before us may have removed the file after we opened it: lock the
            # file that is there now, or a third run could lock a new one beside us.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return
            os.close(fd)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def _clean_stale(out: Path) -> None:
    """Remove staging and swapped-out folders of killed runs (we hold the lock: none is live).

    A run killed between the two renames of the fallback swap left ``OUT`` missing and its
    previous content in an ``old`` folder: that is put back first.
    """
    for path in out.parent.glob(f"{glob.escape(_beside(out, ''))}*"):
        if not path.is_dir() or path.is_symlink():
            continue
        previous = path / "previous"
        if path.name.startswith(_beside(out, "old")) and previous.is_dir() and not out.exists():
            os.rename(previous, out)
        shutil.rmtree(path, ignore_errors=True)


class RunOutput:
    """A claimed output folder: ``staging`` takes the files; :meth:`commit` swaps it in.

    Use as a context manager: leaving it without :meth:`commit` (an error, Ctrl-C) removes the
    staging folder and leaves ``out`` as it was.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        try:  # a name the file system refuses (too long, say) fails here as an OSError
            check_target(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _Lock(out)
        except OSError as exc:
            raise OutputError(f"--out {str(out)!r}: cannot write there: {exc.strerror}") from None
        try:
            _clean_stale(out)
            check_target(out)  # what a killed run's recovery put back must be ours too
            self.staging = make_dir_beside(out, "staging")
            remove_if_killed(self.staging)
            write_atomic(self.staging / ".probe", b"\0" * PROBE_BYTES)
            (self.staging / ".probe").unlink()
        except OSError as exc:
            self.close()
            raise OutputError(f"--out {str(out)!r}: cannot write there: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_space(self, need: int) -> None:
        """Raise :class:`OutputError` when ``out``'s disk has under ``need`` bytes free."""
        free = shutil.disk_usage(self.staging).free
        if free < need:
            raise OutputError(
                f"--out {str(self.out)!r}: the run needs about {need / 2**20:.0f} MiB and the "
                f"disk has {free / 2**20:.0f} MiB free"
            )

    def final(self, paths: Mapping[str, P]) -> dict[str, P | Path]:
        """``paths`` inside the staging folder mapped to where they are after :meth:`commit`."""
        return {
            k: self.out / p.relative_to(self.staging)
            if isinstance(p, Path) and p.is_relative_to(self.staging)
            else p
            for k, p in paths.items()
        }

    def commit(self) -> None:
        """Record the staged entries in the marker and swap the staging folder in as ``out``."""
        files = sorted(os.listdir(self.staging))
        write_atomic(self.staging / MARKER, json.dumps({"files": files}).encode())
        swap_in(self.staging, self.out)
        self.close()

    def close(self) -> None:
        """Drop the staging folder (when not committed) and release the lock."""
        staging = getattr(self, "staging", None)
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None


def destination(folder: Path) -> Path:
    """Where ``folder`` will be once swapped in: ``OUT`` for ``OUT``'s staging folder."""
    name, sep, _ = folder.name.partition(f"{TAG}staging-")
    return folder.parent / name[1:] if sep and name.startswith(".") else folder


def space_needed(model: nn.Module) -> int:
    """Bytes a run of ``model`` writes at most: two artifacts no larger than its state dict
    (the baseline and the compressed model) plus the report."""
    state = model.state_dict().values()
    return 2 * sum(t.numel() * t.element_size() for t in state) + REPORT_OVERHEAD
