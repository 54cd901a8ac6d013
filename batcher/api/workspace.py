"""Where a DataFrame call's files live: a scratch folder, or a folder kept
for this Python session when the call names no checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from batcher.config import InputSpec, Job
from batcher.store.keys import shared_digest

INPUT_NAME = "input.parquet"
RESULTS_NAME = "results.parquet"


def relocated(job: Job, folder: Path) -> Job:
    """The validated job pointed at its working folder (all three paths distinct)."""
    assert job.output is not None
    return job.model_copy(update={
        "input": InputSpec(path=folder / INPUT_NAME),
        "output": job.output.model_copy(update={"path": folder / RESULTS_NAME}),
    })


def session_key(job: Job) -> str:
    """Calls to one endpoint whose requests may coincide share a folder, and so a
    store of answers: a frame that grew, or changed in a few cells, sends only
    what is new. (The endpoint's URL is part of it here, unlike in a row's
    key: a cache the caller did not ask for is not shared between servers.)"""
    return hashlib.blake2b(shared_digest(job) + str(job.endpoint.base_url).encode(),
                           digest_size=16).hexdigest()


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="batcher-") as folder:
        yield Path(folder)


class _SessionFolders:
    """Working folders of calls made without ``checkpoint=``.

    A call's folder is named after its endpoint and the model, params and
    system message of its requests, and its store of answers stays there for
    this Python session: an interrupted call resumes, the same call made
    again sends nothing, and a call with more or changed rows sends only
    those. All of them are removed at interpreter exit; ``fresh=True``
    discards one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: tempfile.TemporaryDirectory[str] | None = None
        self._busy: set[str] = set()

    @contextlib.contextmanager
    def folder(self, key: str) -> Iterator[Path]:
        with self._lock:
            if self._root is None:
                self._root = tempfile.TemporaryDirectory(prefix="batcher-session-")
            root = Path(self._root.name)
            busy = key in self._busy
            self._busy.add(key)
        if busy:  # the same call is running right now (asyncio.gather?): run it apart
            with scratch_folder() as folder:
                yield folder
            return
        path = root / key
        try:
            path.mkdir(parents=True, exist_ok=True)
            yield path
        finally:
            with self._lock:
                self._busy.discard(key)


SESSION = _SessionFolders()
