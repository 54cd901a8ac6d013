"""Requests a budget still counts: sent, and not yet settled by an answer.

A request that got no answer (a timeout, a dropped connection, a run killed
while it was in flight) may still have run and been billed. Its worst case
stays spent not only for the run that sent it but for every later run of the
job, until an answer for the same request settles it: the next run of a
small budget must not spend it again. The same holds for an answer whose
``usage`` cannot be trusted (missing, negative, beyond what was asked): it is
priced at its worst case for good.

The ledger is a JSON-lines file beside the checkpoint
(``NAME.ckpt.unsettled``), written under the checkpoint's lock and by its
rules (``batcher.io.safefiles``: mode 0600, never through a link, refused when
others may write it), one short line per event, each a single append:

- ``{"k": KEY, "usd": COST, "tokens": N}``: a request for ``KEY`` (the row's
  request key, in hex) goes out, holding its worst case;
- ``{"k": KEY}``: an answer for ``KEY`` came, which settles every request
  for it sent before (the answer's own cost is in the checkpoint).

Opening it (:meth:`Unsettled.open`) reads what earlier runs left unsettled
and rewrites the file with only that, so it never grows beyond one line per
unsettled request plus the current run's.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from batcher.errors import OutputError
from batcher.io import platform
from batcher.io.safefiles import make_private, open_private

_WHAT = "budget's record of unanswered requests"


def ledger_path_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".unsettled")


class Unsettled:
    """The ledger of one job, open for appending; use as a context manager.

    ``carried`` is what earlier runs left unsettled, by request key: worst-case
    USD and tokens summed over its requests.
    """

    def __init__(self, path: Path, fd: int, carried: dict[bytes, tuple[float, int]]) -> None:
        self.path = path
        self._fd = fd
        self.carried = carried

    @classmethod
    def open(cls, path: Path, *, fresh: bool = False) -> Unsettled:
        """Read what earlier runs left (nothing with ``fresh``) and keep only that."""
        fd = open_private(path, _WHAT)
        try:
            make_private(fd)
            carried = {} if fresh else _read(fd)
            if not carried:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        if carried:
            _replace(path, b"".join(_line(key, usd, tokens)
                                    for key, (usd, tokens) in carried.items()))
        return cls(path, open_private(path, _WHAT, os.O_WRONLY | os.O_APPEND), carried)

    @property
    def carried_usd(self) -> float:
        return sum(usd for usd, _tokens in self.carried.values())

    @property
    def carried_tokens(self) -> int:
        return sum(tokens for _usd, tokens in self.carried.values())

    def sent(self, key: bytes, usd: float, tokens: int) -> None:
        """A request for ``key`` goes out holding this worst case."""
        self._append(_line(key, usd, tokens))

    def answered(self, key: bytes) -> tuple[float, int]:
        """An answer for ``key`` came: earlier requests for it are settled. Returns
        what earlier runs had left unsettled for it (to take off their spend)."""
        self._append(b'{"k":"%s"}\n' % key.hex().encode("ascii"))
        return self.carried.pop(key, (0.0, 0))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Unsettled:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _append(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the {_WHAT} ({exc.strerror})"
                              ) from None
        if written != len(data):
            raise OutputError(f"{self.path}: cannot write the {_WHAT} (disk full?)")


def _line(key: bytes, usd: float, tokens: int) -> bytes:
    return orjson.dumps({"k": key.hex(), "usd": usd, "tokens": tokens}) + b"\n"


def _read(fd: int) -> dict[bytes, tuple[float, int]]:
    """Unsettled worst cases by key. A line that is not the ledger's (torn by a kill
    mid-write) is skipped: it is the last one, and at most one request's."""
    data = b""
    while chunk := platform.pread(fd, 1 << 20, len(data)):
        data += chunk
    carried: dict[bytes, tuple[float, int]] = {}
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
            key = bytes.fromhex(entry["k"])
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
            continue
        usd, tokens = entry.get("usd"), entry.get("tokens")
        if usd is None and tokens is None:
            carried.pop(key, None)  # answered: settled
        elif isinstance(usd, int | float) and isinstance(tokens, int) and usd >= 0 <= tokens:
            held_usd, held_tokens = carried.get(key, (0.0, 0))
            carried[key] = (held_usd + usd, held_tokens + tokens)
    return carried


def _replace(path: Path, data: bytes) -> None:
    """Replace the ledger by one holding ``data``, renamed over it, so a kill leaves
    either the old content or the new, never none."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    fd = open_private(temporary, _WHAT, os.O_WRONLY)
    try:
        if os.write(fd, data) != len(data):
            raise OutputError(f"{path}: cannot write the {_WHAT} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
    temporary.replace(path)
