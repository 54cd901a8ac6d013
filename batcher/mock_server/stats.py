"""What the server saw, for tests to assert on.

The server's event loop writes; test threads read. Every update and
:meth:`MockStats.snapshot` take one lock. Reading a single attribute directly
is fine for a quick check; use ``snapshot()`` for a consistent copy or to
iterate.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

HISTORY = 100
"""How many recent requests' headers and paths are kept."""

PRESENT = "***"
"""What the stats keep of a credential: only that one was there."""
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key",
                                "cookie"})
CREDENTIAL_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token",
                               "sig", "signature"})


def _without_secret(name: str, value: str) -> str:
    if name not in CREDENTIAL_HEADERS:
        return value
    scheme, space, _ = value.partition(" ")
    return f"{scheme} {PRESENT}" if space else PRESENT  # "Bearer ***" keeps the scheme


def _path_without_secrets(path_qs: str) -> str:
    parts = urlsplit(path_qs)
    if not parts.query:
        return path_qs
    pairs = [(name, PRESENT if name.lower() in CREDENTIAL_PARAMS else value)
             for name, value in parse_qsl(parts.query, keep_blank_values=True)]
    return f"{parts.path}?{urlencode(pairs, safe='*')}"


def _push(history: list[Any], item: Any) -> None:
    history.append(item)
    if len(history) > HISTORY:
        del history[0]


class MockStats:
    """Counters over the API routes (everything except ``/health`` and ``/_mock/*``).

    * ``requests_total``, ``by_status``: every API request and the status it got;
      a dropped connection has no status and counts in ``dropped`` instead.
    * ``prompts``: requests per last-user-message text, faulted and rejected
      ones included (any request whose body parsed).
    * ``ok_prompts``: 200 ``chat.completion`` replies with choices, per prompt.
    * ``answer_formats``: requests per way of asking for the answer (``text``,
      ``json_schema``, ``json_schema+strict``, ``json_object``,
      ``json_object+schema``, ``prompt+schema``).
    * ``in_flight`` / ``max_in_flight``: concurrent API requests now / at peak.
    * ``counters``: events of the Files/Batches API, by name (see :meth:`count`).
    * ``headers_seen`` (names lower-cased) and ``paths_seen`` (with query
      string): the last :data:`HISTORY` requests, oldest first. Credentials are
      never kept: a key header's value and a key parameter's value read
      :data:`PRESENT` (``Bearer ***`` for a bearer token).

    ``GET /_mock/stats`` answers the counters only (:meth:`public`): any local
    user can reach it, so it shows no prompts, headers or paths.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests_total = 0
        self.by_status: dict[int, int] = {}
        self.prompts: Counter[str] = Counter()
        self.ok_prompts: Counter[str] = Counter()
        self.answer_formats: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.dropped = 0
        self.headers_seen: list[dict[str, str]] = []
        self.paths_seen: list[str] = []
        self.counters: Counter[str] = Counter()

    def count(self, name: str) -> None:
        """Count one event of the Files/Batches API (``files_uploaded``,
        ``batches_created``, ``batches_cancelled``, ``file_downloads``)."""
        with self._lock:
            self.counters[name] += 1

    def request_started(self, path_qs: str, headers: Mapping[str, str]) -> None:
        seen = {name.lower(): _without_secret(name.lower(), value)
                for name, value in headers.items()}
        path = _path_without_secrets(path_qs)
        with self._lock:
            self.requests_total += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            _push(self.headers_seen, seen)
            _push(self.paths_seen, path)

    def request_finished(self, status: int | None) -> None:
        """Record the end of a request; ``status`` None means the connection was dropped."""
        with self._lock:
            self.in_flight -= 1
            if status is None:
                self.dropped += 1
            else:
                self.by_status[status] = self.by_status.get(status, 0) + 1

    def record_prompt(self, prompt: str) -> None:
        with self._lock:
            self.prompts[prompt] += 1

    def record_answer_format(self, answer_format: str) -> None:
        with self._lock:
            self.answer_formats[answer_format] += 1

    def record_ok(self, prompt: str) -> None:
        with self._lock:
            self.ok_prompts[prompt] += 1

    def reset(self) -> None:
        """Zero every counter in place (``in_flight`` tracks live requests and is kept)."""
        with self._lock:
            self.requests_total = 0
            self.by_status.clear()
            self.prompts.clear()
            self.ok_prompts.clear()
            self.answer_formats.clear()
            self.max_in_flight = self.in_flight
            self.dropped = 0
            self.headers_seen.clear()
            self.paths_seen.clear()
            self.counters.clear()

    def public(self) -> dict[str, Any]:
        """The counters, without prompts, headers or paths: what ``/_mock/stats`` serves."""
        with self._lock:
            return self._counters()

    def _counters(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "by_status": dict(sorted(self.by_status.items())),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "dropped": self.dropped,
        }

    def snapshot(self) -> dict[str, Any]:
        """A consistent plain-dict copy (JSON-serialisable apart from int status keys)."""
        with self._lock:
            return {
                **self._counters(),
                "prompts": dict(self.prompts),
                "ok_prompts": dict(self.ok_prompts),
                "answer_formats": dict(self.answer_formats),
                "headers_seen": [dict(h) for h in self.headers_seen],
                "paths_seen": list(self.paths_seen),
                "counters": dict(self.counters),
            }
