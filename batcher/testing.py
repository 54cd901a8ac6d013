"""Fakes for testing code that embeds batcher, and batcher's own tests.

- :class:`MockServer` (with :class:`MockConfig`, :class:`FaultRule` and
  :func:`reply_for`): the built-in OpenAI-compatible server on loopback, with
  rate limits, faults and the Batch API; a run against it goes through the
  real HTTP client. ``reply_for(prompt)`` is the reply it gives, to compare.
- :class:`FunctionSender`: a sender that is a plain function from the request
  body (a dict) to ``(status, body)``, no socket; the reply is read and
  classified by the same code as a real server's. It records ``requests``.
- :class:`FakeClock`: a clock that moves only when something sleeps on it (or
  the test moves it), to pass wherever batcher takes ``clock=`` and
  ``sleep=``, so retries, backoff and pacing are tested without waiting.

A job run end to end against the mock server:

>>> import batcher, pandas as pd                                    # doctest: +SKIP
>>> from batcher.testing import MockConfig, MockServer, reply_for
>>> frame = pd.DataFrame({"text": ["hello", "[[fault:503*1]] busy once"]})
>>> with MockServer(MockConfig(api_key="sk-test")) as server:
...     out = batcher.run_dataframe(frame, model="gpt-4o-mini", prompt_column="text",
...                                 base_url=server.base_url, api_key="sk-test")
>>> out["reply"][0] == reply_for("hello"), list(out["status"])  # the 503 was retried
(True, ['ok', 'ok'])

Time that only moves when slept on:

>>> clock = FakeClock(start=100.0)                                  # doctest: +SKIP
>>> asyncio.run(clock.sleep(2.5))
>>> clock.clock(), clock.sleeps
(102.5, [2.5])

A sender with no server, as the row pipeline's tests use it:

>>> sender = FunctionSender(lambda request: (                       # doctest: +SKIP
...     200, {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}))

Importing this module is cheap: :class:`FunctionSender` and :class:`MockServer`
load the pipeline and aiohttp on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batcher.mock_server import FaultRule, MockConfig, reply_for

if TYPE_CHECKING:  # loaded on first use by __getattr__ below
    from batcher.mock_server import MockServer
    from batcher.plan.pipeline import FunctionSender

__all__ = ["FakeClock", "FaultRule", "FunctionSender", "MockConfig", "MockServer", "reply_for"]

_LAZY = {"FunctionSender": "batcher.plan.pipeline", "MockServer": "batcher.mock_server"}


class FakeClock:
    """A clock that only moves when something sleeps on it, or :meth:`advance`
    moves it (``now`` may also be set). Every sleep asked for is recorded in
    ``sleeps``; a negative one is recorded but does not move the clock."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        """The time now: pass as ``clock=``."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Pass as ``sleep=``: returns at once, the clock ``seconds`` later."""
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        """Time passing while nothing sleeps (a worker idle, another client busy)."""
        self.now += seconds


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error there

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
