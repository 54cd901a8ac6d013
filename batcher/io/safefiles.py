"""Opening the files batcher writes without being led astray.

The results, checkpoint and lock paths are refused when they are symbolic
links (a link planted in a shared folder would redirect batcher's writes),
not regular files, or owned by someone else; the checkpoint and lock are
also refused when others may write them (anyone could have planted or
altered their content). The checkpoint holds every prompt and reply: it is
created 0600, and one of ours that others may read is narrowed to 0600
once batcher knows it is a checkpoint.

Every other file batcher makes follows the same rules: the folders it keeps
beside the checkpoint (the batch work folder, the Ray journals) are made
0700 by :func:`private_folder`, which refuses a link, another user's folder
and a folder others may write (they could plant, swap or delete what is
in it); files are opened by :func:`open_private` (0600, never through a
link) or replaced whole by :func:`write_private` (the report, the summary,
the results stamp).

Where files have no owners or POSIX modes (Windows: ``batcher.io.platform``'s
``OWNER`` is None), the user's access lists guard them and the owner and mode
checks are skipped; the link checks remain.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from batcher.errors import OutputError
from batcher.io import platform

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
        fd = os.open(path, flags | os.O_CREAT | platform.SAFE_OPEN, 0o600)
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
    if platform.OWNER is None:
        return
    if info.st_uid != platform.OWNER:
        raise OutputError(f"{path}: the {what} belongs to another user (uid {info.st_uid}); "
                          "batcher only reuses its own files: delete it or choose another path")
    if private and info.st_mode & _WRITABLE_BY_OTHERS:
        raise OutputError(
            f"{path}: other users may write the {what} (mode {stat.S_IMODE(info.st_mode):04o}), "
            "so its content cannot be trusted; delete it, or run chmod 600 on it if you "
            "know it is yours")


def private_folder(path: Path, what: str, *, create: bool = True) -> None:
    """Make (mode 0700) or check a folder that only batcher's files go in.

    Refused: a symbolic link, not a folder, another user's folder, one that others
    may write. One of ours that others may only read or enter (made by an older
    batcher with a umask of 022) is narrowed to 0700. With ``create`` false, a
    missing folder is left missing.
    """
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
        fd = platform.open_folder(path)
    except FileNotFoundError:
        if create:
            raise OutputError(f"{path}: cannot create the {what}") from None
        return
    except OSError as exc:
        if path.is_symlink():
            _refuse_link(path, what)
        if path.exists() and not path.is_dir():
            raise OutputError(f"{path}: the {what} path exists and is not a folder") from None
        raise OutputError(f"{path}: cannot use it as the {what} ({exc.strerror})") from None
    try:
        # Without an open folder (Windows), lstat: the link and type checks come first.
        info = path.lstat() if fd is None else os.fstat(fd)
        if stat.S_ISLNK(info.st_mode):
            _refuse_link(path, what)
        if not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{path}: the {what} path exists and is not a folder")
        if platform.OWNER is None:
            return
        if info.st_uid != platform.OWNER:
            raise OutputError(f"{path}: the {what} belongs to another user (uid "
                              f"{info.st_uid}); batcher only uses its own folders: delete it "
                              "or choose another output.checkpoint")
        if info.st_mode & _WRITABLE_BY_OTHERS:
            raise OutputError(
                f"{path}: other users may write the {what} (mode "
                f"{stat.S_IMODE(info.st_mode):04o}), so they could plant, swap or delete its "
                "files; delete it, or run chmod 700 on it if you know its files are yours")
        if info.st_mode & _OPEN_TO_OTHERS:
            platform.set_mode(path if fd is None else fd, 0o700)
    finally:
        if fd is not None:
            os.close(fd)


def write_private(path: Path, data: bytes, what: str) -> None:
    """Replace ``path`` whole with ``data``, mode 0600, never writing through a link.

    The bytes go to a temporary file beside ``path`` (created exclusively, so a
    file or link planted under its name is never opened) that is renamed over it;
    ``path`` itself is refused when it is a link, not a regular file or not ours.
    """
    check_path(path, what, private=False)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | platform.SAFE_OPEN, 0o600)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the {what} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        temp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise OutputError(f"{path}: cannot write the {what} ({exc.strerror})") from None


def make_private(fd: int) -> None:
    """Narrow an open file of ours to 0600 (a checkpoint copied with a umask of 022)."""
    if platform.OWNER is not None and os.fstat(fd).st_mode & _OPEN_TO_OTHERS:
        platform.set_mode(fd, 0o600)


def _refuse_link(path: Path, what: str) -> None:
    raise OutputError(f"{path}: the {what} path is a symbolic link; batcher does not write "
                      "through links: name the real file")
