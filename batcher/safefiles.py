"""Opening the files batcher writes without being led astray.

The results, checkpoint and lock paths are refused when they are symbolic
links (a link planted in a shared folder would redirect batcher's writes),
not regular files, or owned by someone else; the checkpoint and lock are
also refused when others may write them (anyone could have planted or
altered their content). The checkpoint holds every prompt and reply: it is
created 0600, and one of ours that others may read is narrowed to 0600
once batcher knows it is a checkpoint.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from batcher.errors import OutputError

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_OPEN_TO_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def check_path(path: Path, what: str, *, private: bool) -> None:
    """Refuse ``path`` (when it exists) if batcher could not safely write it."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{path}: cannot use it as the {what} ({exc.strerror})") from None
    _check_stat(path, what, info, private=private)


def open_private(path: Path, what: str, flags: int = os.O_RDWR) -> int:
    """Open (creating, mode 0600) a file only this user may read; never through a link."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if path.is_symlink():
            _refuse_link(path, what)
        raise OutputError(f"{path}: cannot open the {what} ({exc.strerror})") from None
    try:
        _check_stat(path, what, os.fstat(fd), private=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_stat(path: Path, what: str, info: os.stat_result, *, private: bool) -> None:
    if stat.S_ISLNK(info.st_mode):
        _refuse_link(path, what)
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{path}: the {what} path exists and is not a regular file")
    if info.st_uid != os.geteuid():
        raise OutputError(f"{path}: the {what} belongs to another user (uid {info.st_uid}); "
                          "batcher only reuses its own files: delete it or choose another path")
    if private and info.st_mode & _WRITABLE_BY_OTHERS:
        raise OutputError(
            f"{path}: other users may write the {what} (mode {stat.S_IMODE(info.st_mode):04o}), "
            "so its content cannot be trusted; delete it, or run chmod 600 on it if you "
            "know it is yours")


def make_private(fd: int) -> None:
    """Narrow an open file of ours to 0600 (a checkpoint copied with a umask of 022)."""
    if os.fstat(fd).st_mode & _OPEN_TO_OTHERS:
        os.fchmod(fd, 0o600)


def _refuse_link(path: Path, what: str) -> None:
    raise OutputError(f"{path}: the {what} path is a symbolic link; batcher does not write "
                      "through links: name the real file")
