"""An OpenAI-compatible mock chat-completion server for tests, benchmarks and demos.

It answers ``POST /v1/chat/completions`` (and the Azure and bare variants)
and the Files and Batches API (``/v1/files``, ``/v1/batches``),
with :func:`reply_for` text in OpenAI's exact shapes, enforces optional
RPM/TPM limits with OpenAI's headers, and injects faults on request, either
by a ``[[fault:KIND]]`` marker in the prompt or by :class:`FaultRule`. It
binds to loopback only and imports nothing from the rest of batcher, so a
client bug cannot be mirrored in the fake that tests it.

>>> with MockServer(MockConfig(api_key="sk-test")) as srv:   # doctest: +SKIP
...     srv.base_url
'http://127.0.0.1:PORT/v1'

The settings (:class:`MockConfig`, :class:`FaultRule`) import without
aiohttp; :class:`MockServer` and :func:`serve_forever` load it on first use
(PEP 562), so code that only builds a config stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import FaultRule, MockConfig
from .replies import reply_for
from .stats import MockStats

if TYPE_CHECKING:  # loaded on first use by __getattr__ below
    from .thread import MockServer, serve_forever

__all__ = ["FaultRule", "MockConfig", "MockServer", "MockStats", "reply_for", "serve_forever"]


if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name stays an error there

    def __getattr__(name: str) -> Any:
        if name not in ("MockServer", "serve_forever"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from . import thread

        value = getattr(thread, name)
        globals()[name] = value
        return value
