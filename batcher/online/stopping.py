"""How an online run is asked to stop: from another thread (a notebook's main
thread, :class:`RunControl`) or by a signal (SIGINT, SIGTERM:
:func:`signals_handled`). Either way the run's ``request_stop`` is called in
its own event loop: graceful the first time, immediate the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Protocol


class Stoppable(Protocol):
    """A run that can be asked to stop (``batcher.online.runner.Run``)."""

    def request_stop(self, signum: int = signal.SIGINT) -> None: ...


class RunControl:
    """Lets code outside the run's event loop (a notebook's main thread, say)
    ask the run to stop, exactly as Ctrl-C would."""

    def __init__(self) -> None:
        self._run: Stoppable | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_before_start: int | None = None

    def attach(self, run: Stoppable, loop: asyncio.AbstractEventLoop) -> None:
        self._run, self._loop = run, loop
        if self._stop_before_start is not None:
            run.request_stop(self._stop_before_start)

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Thread-safe: graceful on the first call, immediate on the second."""
        if self._run is None or self._loop is None:
            self._stop_before_start = signum
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to stop
            self._loop.call_soon_threadsafe(self._run.request_stop, signum)


@contextlib.contextmanager
def signals_handled(stop: Callable[[int], None], *, enabled: bool = True) -> Iterator[None]:
    """SIGINT and SIGTERM call ``stop(signum)`` while the block runs (only possible
    on the main thread; elsewhere the block runs without them)."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or a platform without signal support
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
