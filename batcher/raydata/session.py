"""What a run on Ray holds while it runs: the job's lock, the mock server when
the job asks for one, Ray itself (a private local one unless a cluster is
named), and SIGTERM taken as Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.data

from batcher.config import Job
from batcher.errors import RunInProgress
from batcher.io import platform
from batcher.io.safefiles import open_private, private_folder
from batcher.mock_server import MockConfig, MockServer


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """One run of a job at a time: a lock in its journal folder."""
    private_folder(folder, "journal folder")
    lock = folder / ".lock"
    fd = open_private(lock, "lock file")
    try:
        if not platform.try_lock(fd, lock):
            raise RunInProgress(f"{folder}: another batcher run of this job is in progress; "
                                "wait for it to finish")
        try:
            yield
        finally:
            platform.unlock(fd, lock)
    finally:
        os.close(fd)


@contextlib.contextmanager
def mock_for(job: Job) -> Iterator[str | None]:
    """The built-in mock server's URL while the block runs, when the job asks for it."""
    mock = job.endpoint.mock
    if mock is None:
        yield None
        return
    with MockServer(MockConfig(latency_s=mock.latency_s, seed=mock.seed)) as server:
        yield server.base_url


@contextlib.contextmanager
def ray_for(address: str | None) -> Iterator[None]:
    """Ray for the run: this process's, if it already has one; the cluster the user
    names (``--ray-address``, then ``RAY_ADDRESS``); otherwise a private local Ray.

    Left to itself, ``ray.init()`` joins the cluster named by the address file in
    Ray's temp folder (``/tmp/ray``, which Ray makes writable by every user), so
    another user could point batcher at their cluster and see every prompt. A local
    Ray is started in a temp folder of its own (0700, removed afterwards), and asked
    for with ``address="local"``, which reads no address file.
    """
    if ray.is_initialized():
        _quiet_ray()
        yield
        return
    named = address or os.environ.get("RAY_ADDRESS") or None
    private = None if named else tempfile.mkdtemp(
        prefix="bray-", dir=os.environ.get("RAY_TMPDIR") or None)  # short: Ray's socket paths
    try:
        ray.init(address=named or "local", _temp_dir=private, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=False)
        _quiet_ray()
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _quiet_ray() -> None:
    for name in ("ray", "ray.data"):  # Ray's own progress and errors: batcher reports its own
        logging.getLogger(name).setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the driver as Ctrl-C does (exit 143), where a handler can be set."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
