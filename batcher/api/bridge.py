"""The sync face of the async API: one definition, two ways to call it.

:func:`blocking` turns an ``async def`` into a function with the same
signature (``help()``, ``inspect.signature`` and mypy see the one
definition) that runs it to the end from sync code, even inside a running
event loop (Jupyter, IPython), without patching the loop: the coroutine gets
a fresh loop on a worker thread while the calling thread waits.

Ctrl-C (a kernel interrupt) while waiting asks the run to stop as the CLI's
Ctrl-C does: requests in flight get a grace period, a second Ctrl-C cancels
them, and ``KeyboardInterrupt`` is raised once the finished rows are safely
journaled. Calling again resumes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from batcher.errors import Interrupted
from batcher.online.runner import RunControl

P = ParamSpec("P")
T = TypeVar("T")

_CONTROL: contextvars.ContextVar[RunControl | None] = contextvars.ContextVar(
    "batcher_run_control", default=None)


def current_control() -> RunControl | None:
    """The stop control of the blocking call this coroutine runs under, if any."""
    return _CONTROL.get()


def blocking(function: Callable[P, Coroutine[Any, Any, T]], name: str
             ) -> Callable[P, T]:
    """``function``'s blocking twin, called ``name``: same parameters, same docs."""

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_blocking(lambda: function(*args, **kwargs))

    call.__name__ = name
    call.__qualname__ = name
    return call


def run_blocking(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end from sync code, even inside a running event loop.

    The coroutine gets a fresh loop on a worker thread; this thread waits.
    ``KeyboardInterrupt`` while waiting asks the run to stop (graceful the
    first time, immediate the second), waits for the checkpoint to be
    consistent, then is raised again with the resume hint.
    """
    control = RunControl()
    results: list[T] = []
    failures: list[BaseException] = []
    done = threading.Event()
    context = contextvars.copy_context()

    def main() -> T:
        _CONTROL.set(control)
        return asyncio.run(start())

    def work() -> None:
        try:
            results.append(context.run(main))
        except BaseException as exc:  # handed to the waiting thread below
            failures.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=work, name="batcher-run", daemon=True)
    worker.start()
    interrupted = False
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt:
            interrupted = True
            control.request_stop()
    worker.join()
    if failures:
        error = failures[0]
        if interrupted and isinstance(error, Interrupted):
            raise KeyboardInterrupt(str(error)) from None
        raise error
    return results[0]  # finished before the stop took effect: nothing is lost
