"""Server-side RPM/TPM enforcement and the rate-limit headers OpenAI and LiteLLM send.

Each limit admits at most ``limit * window_s / 60`` requests (or tokens) per
window of ``window_s`` seconds (:mod:`.windows`). The window is, by ``window_kind``:

* ``sliding``: the last ``window_s`` seconds (OpenAI's short-window enforcement);
* ``calendar``: fixed windows aligned to multiples of ``window_s`` in wall-clock
  time, the whole allowance coming back at once at each boundary (LiteLLM's
  router on calendar minutes);
* ``from_first``: fixed windows that start with the first request after the
  previous one ended (LiteLLM's per-key limiter).

Optional quirks of real limiters: ``remaining_off_by_one`` reports one more
request remaining than will be admitted (LiteLLM's router); ``scope`` reports
the limits under LiteLLM's per-key or per-team names
(``x-ratelimit-api_key-remaining-requests``, no reset header); another client
on the same key (``background_rpm``) takes its requests from the same windows
at an even pace, each request it cannot fit being dropped. What a 429 says, in
each dialect, is :mod:`.limit_replies`.

The limiter is a plain object driven by an explicit ``now``, so its arithmetic
is tested without sleeping. It runs on the server's event loop only and needs
no lock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from .limit_replies import (
    Rejection,
    RejectionStyle,
    go_duration,
    rejection_body,
    rejection_headers,
)
from .windows import Admitted, FixedWindow, Log, WindowKind, WindowLog


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    headers: dict[str, str]
    rejection: Rejection | None = None


class RateLimiter:
    """RPM and TPM limits, either optional; a request must fit both to be admitted.

    Rejected requests still count toward RPM ("unsuccessful requests contribute
    to your per-minute limit"), so the wait a 429 reports includes the slot the
    rejected request itself took. Tokens are only charged on admission.
    Calendar windows read wall-clock time: ``now`` (monotonic) plus the offset
    between the two clocks, taken once.
    """

    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        window_s: float,
        *,
        send_headers: bool = True,
        window_kind: WindowKind = "sliding",
        remaining_off_by_one: bool = False,
        scope: str | None = None,
        rejection_style: RejectionStyle = "openai",
        background_rpm: float | None = None,
        background_tokens: int = 0,
        report_limit: bool = True,
        now: float = 0.0,
    ) -> None:
        self.report_limit = report_limit
        self.window_s = window_s
        self.send_headers = send_headers
        self.window_kind = window_kind
        self.remaining_off_by_one = remaining_off_by_one
        self.scope = scope
        self.rejection_style = rejection_style
        self._wall_offset = time.time() - time.monotonic() if window_kind == "calendar" else 0.0
        self._requests = self._log(requests_per_minute)
        self._tokens = self._log(tokens_per_minute)
        self._background_gap = 60 / background_rpm if background_rpm else None
        self._background_tokens = background_tokens
        self._background_next = self._clock(now)
        self.background_admitted = 0
        self.background_dropped = 0
        self.admitted = Admitted(window_s)

    def _log(self, limit: int | None) -> Log | None:
        if not limit:
            return None
        if self.window_kind == "sliding":
            return WindowLog(limit, self.window_s)
        return FixedWindow(limit, self.window_s, start_at_first=self.window_kind == "from_first")

    @property
    def enabled(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def _clock(self, now: float) -> float:
        return now + self._wall_offset

    def headers(self, now: float) -> dict[str, str]:
        """The rate-limit headers for the current state (empty when not configured)."""
        if not self.send_headers:
            return {}
        now = self._clock(now)
        self._catch_up(now)
        out: dict[str, str] = {}
        for name, log in (("requests", self._requests), ("tokens", self._tokens)):
            if log is None:
                continue
            log.prune(now)
            remaining = log.remaining()
            if name == "requests" and self.remaining_off_by_one:
                remaining += 1
            if self.scope is not None:  # LiteLLM: per-scope names, no reset time
                out[f"x-ratelimit-{self.scope}-limit-{name}"] = str(log.limit)
                out[f"x-ratelimit-{self.scope}-remaining-{name}"] = str(remaining)
                continue
            if self.report_limit:
                out[f"x-ratelimit-limit-{name}"] = str(log.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(remaining)
            out[f"x-ratelimit-reset-{name}"] = go_duration(log.reset_in(now))
        return out

    def _catch_up(self, now: float) -> None:
        """Let the other client send everything it was due to send up to ``now``."""
        gap = self._background_gap
        if gap is None:
            return
        due = self._background_next
        if due < now - self.window_s:  # long idle: what it sent back then has expired
            due += math.ceil((now - self.window_s - due) / gap) * gap
        while due <= now:
            self._admit_background(due)
            due += gap
        self._background_next = due

    def _admit_background(self, moment: float) -> None:
        req, tok = self._requests, self._tokens
        for log in (req, tok):
            if log is not None:
                log.prune(moment)
        tokens = self._background_tokens
        if (req is not None and not req.fits(1)) or (tok is not None and not tok.fits(tokens)):
            self.background_dropped += 1
            return
        self.background_admitted += 1
        if req is not None:
            req.add(moment, 1)
        if tok is not None and tokens:
            tok.add(moment, tokens)

    def admit(self, now: float, tokens: int) -> Verdict:
        """Admit one request that reserves ``tokens``, or say why not and for how long."""
        headers_now = now
        now = self._clock(now)
        self._catch_up(now)
        req, tok = self._requests, self._tokens
        if req is not None:
            req.prune(now)
        if tok is not None:
            tok.prune(now)

        refused_by: Log | None = None
        requested = 1
        if req is not None and not req.fits(1):
            refused_by = req
        elif tok is not None and not tok.fits(tokens):
            refused_by, requested = tok, tokens

        if req is not None:
            req.add(now, 1)
        if refused_by is None:
            if tok is not None:
                tok.add(now, tokens)
            self.admitted.add(now, tokens)
            return Verdict(True, self.headers(headers_now))

        wait: float | None = None
        if requested <= refused_by.capacity:
            wait = max(
                log.wait_for(amount, now)
                for log, amount in ((req, 1), (tok, tokens))
                if log is not None
            )
        kind = "requests" if refused_by is req else "tokens"
        used = refused_by.used - (1 if refused_by is req else 0)
        rejection = Rejection(kind, refused_by.limit, used, requested, wait)
        return Verdict(False, self.headers(headers_now), rejection)

    def rejection_headers(self, rejection: Rejection) -> dict[str, str]:
        """The wait a 429 advertises, in the headers its ``rejection_style`` uses."""
        return rejection_headers(rejection, self.rejection_style, self.window_s)

    def reset(self) -> None:
        for log in (self._requests, self._tokens):
            if log is not None:
                log.clear()
        self.admitted.clear()

    def error_body(self, model: str, rejection: Rejection) -> dict[str, Any]:
        """The 429 body for ``rejection`` in the ``rejection_style``'s shape."""
        return rejection_body(model, rejection, self.rejection_style, self.window_s, self.scope)
