"""What differs between operating systems, in one place, each with its fallback.

Linux and macOS have all of it; Windows has none of ``fcntl``, ``os.pread``,
``O_NOFOLLOW``, file owners or POSIX modes; macOS has no ``/proc``. The rest of
batcher calls these names only, so ``import batcher`` and a run work wherever
Python does:

- **the run lock** (:func:`try_lock`, :func:`unlock`): ``flock`` where ``fcntl``
  exists; ``msvcrt.locking`` on Windows; elsewhere a claim file beside the lock
  file (``<lock>.pid``, naming the run's process, linked into place so only
  one run can make it), taken over once that process is gone. The kernel drops the first two when
  their process dies; a claim is left by a killed run but names a dead
  process, so the next run takes it over.
- **whether a run holds it** (:func:`lock_held`, for ``batcher status``):
  read from :data:`PROC_LOCKS` where that file exists, so the lock is never
  touched; otherwise by trying a shared lock for an instant (a run starting
  in that very instant is refused as if one were running), or reading the
  claim.
- **positional reads and writes** (:func:`pread`, :func:`pwrite`): ``os.pread``
  where it exists; otherwise seek, read and seek back, under a lock, so the
  file offset ``append`` relies on is kept.
- **opening and owning files** (:data:`SAFE_OPEN`, :data:`OWNER`,
  :func:`set_mode`, :func:`open_folder`): flags, owners and modes where the
  system has them; where it does not (Windows), its access lists guard a
  user's files and the modes Python reports there are made up, so there is
  nothing to check or narrow.

>>> from batcher.io import platform                          # doctest: +SKIP
>>> platform.PROC_LOCKS = Path("/nowhere")   # check locks as on macOS: by trying one
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


fcntl = _optional("fcntl")  # not on Windows
msvcrt = _optional("msvcrt")  # only on Windows

#: Where Linux lists every lock held. Public so a test can point it at a missing
#: path and check locks the way a system without ``/proc`` does.
PROC_LOCKS = Path("/proc/locks")

#: Bytes as written: without it Windows turns ``\n`` into ``\r\n`` (0 elsewhere).
BINARY: int = getattr(os, "O_BINARY", 0)
#: Flags every open of one of batcher's own files adds: bytes as written, never
#: through a link, not inherited by child processes. Each is 0 where the system
#: lacks it.
SAFE_OPEN: int = (BINARY | getattr(os, "O_NOFOLLOW", 0)
                  | getattr(os, "O_CLOEXEC", getattr(os, "O_NOINHERIT", 0)))

#: This process's user id, where files have owners and POSIX modes; None where
#: they do not (Windows), and batcher's owner and mode checks have nothing to read.
OWNER: int | None = os.geteuid() if hasattr(os, "geteuid") else None

_FOLDER_OPEN: int | None = getattr(os, "O_DIRECTORY", None)
_pread: Callable[[int, int, int], bytes] | None = getattr(os, "pread", None)
_pwrite: Callable[[int, bytes, int], int] | None = getattr(os, "pwrite", None)
_seeking = threading.Lock()  # the fallbacks move a shared offset: one at a time


def pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset``, leaving the file offset where it was."""
    if _pread is not None:
        return _pread(fd, size, offset)
    with _positioned(fd, offset):
        return os.read(fd, size)


def pwrite(fd: int, data: bytes, offset: int) -> int:
    """Write ``data`` at ``offset``, leaving the file offset where it was."""
    if _pwrite is not None:
        return _pwrite(fd, data, offset)
    with _positioned(fd, offset):
        return os.write(fd, data)


@contextlib.contextmanager
def _positioned(fd: int, offset: int) -> Iterator[None]:
    """The fallback of pread and pwrite: the shared offset moved there and back."""
    with _seeking:
        kept = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            yield
        finally:
            os.lseek(fd, kept, os.SEEK_SET)


def set_mode(target: int | Path, mode: int) -> None:
    """Set the permission bits of an open file (or, where a folder cannot be
    opened, of a path), where files have them."""
    if OWNER is None:
        return
    if isinstance(target, int):
        os.fchmod(target, mode)
    else:
        target.chmod(mode)


def sync_folder(path: Path) -> None:
    """Make a rename inside ``path`` durable (where a folder can be opened; Windows
    cannot, and its rename is durable once it returns)."""
    if _FOLDER_OPEN is None:
        return
    fd = os.open(path, os.O_RDONLY | _FOLDER_OPEN)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_folder(path: Path) -> int | None:
    """``path`` opened as a folder, never through a link; None where folders cannot
    be opened (Windows: the caller reads ``lstat``). FileNotFoundError if missing."""
    if _FOLDER_OPEN is None:
        path.lstat()  # raises FileNotFoundError as the open would
        return None
    return os.open(path, os.O_RDONLY | _FOLDER_OPEN | SAFE_OPEN)


# -- the run lock ----------------------------------------------------------------------------


def try_lock(fd: int, path: Path) -> bool:
    """Take the exclusive lock of the lock file ``path`` (open as ``fd``) without
    waiting: False when another run, in this process or another, holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:
        return _msvcrt_lock(msvcrt, fd, msvcrt.LK_NBLCK)
    return _claim(_claim_path(path))


def unlock(fd: int, path: Path) -> None:
    """Give up the lock taken by :func:`try_lock` (the caller then closes ``fd``)."""
    if fcntl is not None:
        return  # closing the file drops a flock
    if msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    claim = _claim_path(path)
    if _claimant(claim) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            claim.unlink()


def lock_held(path: Path) -> bool | None:
    """Whether a run holds the lock file ``path``; None when that cannot be told."""
    if fcntl is None and msvcrt is None:
        claimant = _claimant(_claim_path(path))
        return claimant is not None and _alive(claimant)
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    if fcntl is not None and PROC_LOCKS.exists():
        return _listed_in_proc(info)
    try:
        fd = os.open(path, os.O_RDONLY | SAFE_OPEN)
    except OSError:
        return None
    try:
        # A shared lock for an instant: refused while a run holds the exclusive one.
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
        assert msvcrt is not None  # flock or msvcrt: the claim was read above
        if not _msvcrt_lock(msvcrt, fd, msvcrt.LK_NBRLCK):
            return True
        unlock(fd, path)
        return False
    finally:
        os.close(fd)


def _listed_in_proc(info: os.stat_result) -> bool | None:
    try:
        table = PROC_LOCKS.read_text(encoding="ascii")
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(fields[1] == "FLOCK" and fields[5] == device
               for fields in (line.split() for line in table.splitlines()) if len(fields) > 5)


def _msvcrt_lock(module: ModuleType, fd: int, mode: int) -> bool:
    os.lseek(fd, 0, os.SEEK_SET)  # msvcrt locks bytes from the offset: always the first
    try:
        module.locking(fd, mode, 1)
    except OSError:
        return False
    return True


def _claim_path(path: Path) -> Path:
    return path.with_name(path.name + ".pid")


def _claim(claim: Path) -> bool:
    """Create the claim naming this process; take over one whose process is gone.

    The claim is written whole under another name and linked into place, so it
    is never seen half written. Two runs taking over the same stale claim in the
    same instant could both succeed: the window is between one's read and its
    unlink, on a system with neither ``flock`` nor ``msvcrt``.
    """
    staged = claim.with_name(f"{claim.name}.{os.getpid()}.tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | SAFE_OPEN, 0o600)
    try:
        os.write(fd, str(os.getpid()).encode("ascii"))
    finally:
        os.close(fd)
    try:
        for _attempt in range(2):
            try:
                os.link(staged, claim)
            except FileExistsError:
                claimant = _claimant(claim)
                if claimant is not None and _alive(claimant):
                    return False
                with contextlib.suppress(FileNotFoundError):
                    claim.unlink()  # its run was killed: the claim is stale
            else:
                return True
        return False
    finally:
        staged.unlink()


def _claimant(claim: Path) -> int | None:
    try:
        return int(claim.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists. Only reached without msvcrt: on Windows
    ``os.kill`` would end the process instead of asking about it."""
    if pid == os.getpid():
        return True  # this process holds it, for another checkpoint object
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True
