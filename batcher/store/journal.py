"""Reading a checkpoint from another process: ``batcher status``, a budget.

Without the lock and without writing anything, so a run that is appending is
not disturbed: a last line still being written (or torn by a kill) is left
out, and whether a run holds the lock is asked of ``batcher.io.platform``
(``/proc/locks`` where there is one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from batcher.errors import CheckpointError
from batcher.io import platform
from batcher.store.checkpoint import READ_CHUNK, check_version, lock_path_for, read_header


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """The answers stored in a checkpoint, in the order written, for a reader
    beside a run that may still be appending (``batcher status``, a budget).

    The file is opened read-only and no lock is taken, so the run is not
    disturbed; a last line still being written (or torn by a kill) is left
    out. Raises ``CheckpointError`` when the file is not a checkpoint this
    version reads.
    """
    try:
        fd = os.open(path, os.O_RDONLY | platform.BINARY)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint yet (the job has not run)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    try:
        header_line, header = read_header(fd, path)
        check_version(header, path)
    except BaseException:
        os.close(fd)
        raise
    return _records(path, fd, len(header_line) + 1)


def _records(path: Path, fd: int, offset: int) -> Iterator[dict[str, Any]]:
    try:
        pending = b""
        while chunk := platform.pread(fd, READ_CHUNK, offset):
            offset += len(chunk)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()  # no newline yet: still being written, or torn
            for line in lines:
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise CheckpointError(f"{path}: corrupt line near byte "
                                          f"{offset - len(pending)}") from None
    finally:
        os.close(fd)


def run_in_progress(path: Path) -> bool | None:
    """Whether a run holds this checkpoint's lock (None where that cannot be told)."""
    return platform.lock_held(lock_path_for(path))
