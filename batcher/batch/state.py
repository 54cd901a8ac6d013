"""What a batch cycle remembers between invocations: its shards, their batches, and
the names of their requests.

The state lives in ``<checkpoint>.batch/state.json``, replaced atomically (written
whole, fsynced, renamed) at every change, so a kill at any moment leaves either
the state before the step or the state after it. Each request in a shard file is
named by its :func:`custom_id` (the row's position and request key), which is
how its answer finds its rows when the batch is collected.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import orjson

from batcher.errors import CheckpointError, OutputError, fresh_option
from batcher.io import platform
from batcher.io.safefiles import check_path, open_private, private_folder
from batcher.plan.paths import work_folder
from batcher.transport.batchwire import STATUS, is_safe_id, is_time

STATE_VERSION = 2  # 2: custom ids carry request keys, not request digests
PLANNED, COLLECTED = "planned", "collected"
WORK_FOLDER = "batch work folder"


def custom_id(position: int, key: bytes) -> str:
    """The row's name in a batch: its position when planned (for people reading
    the files) and its request key (what its answer is stored under)."""
    return f"{position}-{key.hex()}"


def position_of(name: str) -> int:
    return int(name.split("-", 1)[0])


def key_of(name: str) -> bytes:
    return bytes.fromhex(name.split("-", 1)[1])


@dataclass
class ShardRecord:
    """One shard of this cycle and what became of it."""

    digest: str
    file: str
    requests: int
    planned_at: float
    file_id: str | None = None
    batch_id: str | None = None
    created_at: float | None = None
    status: str = PLANNED  # the service's status, then collected
    unfinished: list[str] = field(default_factory=list)  # custom ids to send again (expired)

    @property
    def open(self) -> bool:
        return self.status != COLLECTED


_HEX = re.compile(r"[0-9a-f]{1,64}")
_SHARD_FILE = re.compile(r"shard-[0-9a-f]{1,64}\.jsonl")
_CUSTOM_ID = re.compile(r"[0-9]{1,18}-(?:[0-9a-f]{2}){1,64}")


def _damaged(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: the batch state is damaged ({reason}); batches may still "
                           "run at the service, so look there before running with "
                           f"{fresh_option()}")


def saved_shards(data: object) -> list[ShardRecord]:
    """The shards of a state file's contents, each field checked (a file edited by hand
    or damaged must be an error that says so, never a traceback or a path elsewhere);
    raises ``ValueError`` naming the first bad field."""
    shards = data.get("shards", []) if isinstance(data, dict) else None
    if not isinstance(shards, list):
        raise ValueError("shards: not a list")
    return [_saved_shard(number, entry) for number, entry in enumerate(shards, start=1)]


def _saved_shard(number: int, entry: object) -> ShardRecord:
    def bad(name: str) -> ValueError:
        return ValueError(f"shard {number}: {name} is not valid")

    if not isinstance(entry, dict):
        raise bad("the entry")
    unknown = set(entry) - {item.name for item in fields(ShardRecord)}
    if unknown:
        raise ValueError(f"shard {number}: an unknown field, {min(unknown)!r}")
    try:
        record = ShardRecord(**entry)
    except TypeError:  # a field missing
        raise ValueError(f"shard {number}: a field is missing") from None
    checks = {
        "digest": isinstance(record.digest, str) and _HEX.fullmatch(record.digest),
        "file": isinstance(record.file, str) and _SHARD_FILE.fullmatch(record.file),
        "requests": type(record.requests) is int and record.requests >= 0,
        "planned_at": is_time(record.planned_at),
        "file_id": record.file_id is None or is_safe_id(record.file_id),
        "batch_id": record.batch_id is None or is_safe_id(record.batch_id),
        "created_at": record.created_at is None or is_time(record.created_at),
        "status": isinstance(record.status, str) and STATUS.fullmatch(record.status),
        "unfinished": isinstance(record.unfinished, list) and all(
            isinstance(name, str) and _CUSTOM_ID.fullmatch(name) for name in record.unfinished),
    }
    for name, valid in checks.items():
        if not valid:
            raise bad(name)
    return record


class BatchState:
    """The cycle's shards, saved atomically to ``state.json`` after every change."""

    def __init__(self, folder: Path, job_name: str,
                 shards: list[ShardRecord] | None = None) -> None:
        self.folder = folder
        self.job_name = job_name
        self.shards = shards or []

    @property
    def path(self) -> Path:
        return self.folder / "state.json"

    @classmethod
    def load(cls, folder: Path, job_name: str) -> BatchState:
        path = folder / "state.json"
        private_folder(folder, WORK_FOLDER, create=False)
        try:
            data = orjson.loads(_read_private(path))
        except FileNotFoundError:
            return cls(folder, job_name)
        except (OSError, orjson.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the batch state ({exc}); batches "
                                  "may still run at the service, so look there before "
                                  f"running with {fresh_option()}") from None
        if not isinstance(data, dict):
            raise _damaged(path, "not a JSON object")
        # Requests are named by their keys, so batches of an earlier version of the job
        # or its input are still collected: each answer goes to the rows with its key.
        if data.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path}: batches were submitted by an older batcher; "
                                  "collect them with that version, or run with "
                                  f"{fresh_option()} to "
                                  "forget them (they still run and are billed at the service)")
        try:
            shards = saved_shards(data)
        except ValueError as exc:
            raise _damaged(path, str(exc)) from None
        return cls(folder, job_name, shards)

    def save(self) -> None:
        data = {"version": STATE_VERSION, "job": self.job_name,
                "shards": [asdict(shard) for shard in self.shards]}
        temp = self.path.with_name(f".state.{os.getpid()}.tmp")
        private_folder(self.folder, WORK_FOLDER)
        try:
            fd = open_private(temp, "batch state", os.O_WRONLY | os.O_TRUNC)
            with os.fdopen(fd, "wb") as handle:
                handle.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
                handle.flush()
                os.fsync(handle.fileno())
            temp.replace(self.path)
            platform.sync_folder(self.folder)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot save the batch state ({exc.strerror})"
                              ) from None

    def open_shards(self) -> list[ShardRecord]:
        return [shard for shard in self.shards if shard.open]

    def discard(self) -> None:
        """The cycle is over: forget it (shard files included)."""
        if not self.folder.exists() and not self.folder.is_symlink():
            return
        private_folder(self.folder, WORK_FOLDER, create=False)  # never empty a link's target
        for entry in self.folder.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        self.shards = []


def _read_private(path: Path) -> bytes:
    """A file of the work folder, read only when it is ours and others may not write it."""
    check_path(path, "batch state", private=True)
    fd = os.open(path, os.O_RDONLY | platform.SAFE_OPEN)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def forget_state(checkpoint_path: Path) -> int:
    """For ``--fresh``: drop the batch state; returns how many batches were still open."""
    folder = work_folder(checkpoint_path)
    path = folder / "state.json"
    still_open = 0
    with contextlib.suppress(OSError, orjson.JSONDecodeError, ValueError):
        still_open = sum(1 for shard in saved_shards(orjson.loads(path.read_bytes()))
                         if shard.open and shard.batch_id)
    BatchState(folder, "").discard()
    return still_open
