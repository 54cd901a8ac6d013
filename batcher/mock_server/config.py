"""Settings for the mock server, validated once when they are built.

The dataclasses are the whole configuration surface: tests, the benchmark and
the ``batcher mock-server`` command all build a :class:`MockConfig` and hand it
to :class:`~batcher.mock_server.MockServer` or
:func:`~batcher.mock_server.serve_forever`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import get_args

from .fault_replies import FAULT_KINDS
from .limit_replies import RejectionStyle
from .windows import WindowKind


def check_loopback(host: str) -> None:
    """Refuse any host that is not a loopback address.

    The mock accepts any key and answers with fake text, so it must never be
    reachable from another machine.
    """
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"mock server host {host!r} is not a loopback address; use 127.0.0.1, ::1 or localhost"
        )


@dataclass
class FaultRule:
    """Inject ``kind`` into requests that pass the key check.

    More exactly, into requests that pass the key check, body validation and
    any rate limit: those are the requests counted here. ``first_n`` faults the
    first N of them (counted from server start or the last ``/_mock/reset``);
    ``rate`` faults each request with that probability, drawn from the
    server's seeded RNG. A ``[[fault:...]]`` marker in the prompt wins over
    every rule.
    """

    kind: str
    rate: float = 0.0
    first_n: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            known = ", ".join(sorted(FAULT_KINDS))
            raise ValueError(f"FaultRule.kind: unknown fault {self.kind!r}; known kinds: {known}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"FaultRule.rate: must be between 0 and 1, got {self.rate}")
        if self.first_n < 0:
            raise ValueError(f"FaultRule.first_n: must be >= 0, got {self.first_n}")


@dataclass
class MockConfig:
    """How the mock server behaves; every default gives a plain, fast server.

    * ``latency_s``: added before the reply to every admitted request;
      401/400/429 refusals come back at once, as from a real gateway.
    * ``api_key``: when set, required as ``Authorization: Bearer``, ``api-key``
      or ``X-Api-Key``. ``echo_key_in_errors`` makes the 401 show the full key
      sent (instead of OpenAI's mask) and appends it to every other JSON error
      message, to test that a client redacts echoed secrets.
    * Rate limits are enforced per ``window_s``: each sliding window admits at
      most ``requests_per_minute * window_s / 60`` requests and
      ``tokens_per_minute * window_s / 60`` tokens. ``window_s=1`` reproduces
      OpenAI's habit of enforcing "60,000 RPM" as 1,000 requests per second.
    * ``fault_retry_after_s``: the wait advertised by the ``429``, ``503`` and
      ``azure_429`` faults (``retry-after-ms``, and ``retry-after`` rounded up).
    * ``model_name``: the ``model`` echoed in replies; default: the request's.
    * Files and Batches: each batch phase (validating, in_progress,
      finalizing, cancelling) lasts ``batch_phase_s``; an upload with
      ``purpose=batch`` over ``batch_file_max_bytes`` gets a 413, and a file of
      more than ``batch_max_requests`` lines fails validation.
      ``upload_latency_s``, ``create_latency_s`` and ``download_latency_s``
      delay the answer to an upload, to a batch creation (the batch already
      exists while its creator waits) and to a file download.
    * ``cached_tokens``: reported as cached in every successful reply's
      ``usage.prompt_tokens_details`` (at most the prompt's tokens);
      ``reasoning_tokens``: added to every reply's ``completion_tokens`` and
      reported in ``completion_tokens_details``, as a reasoning model does.
    * ``window_kind``: ``sliding`` (default), ``calendar`` (fixed windows on
      multiples of ``window_s`` of wall-clock time, as LiteLLM's router counts
      calendar minutes) or ``from_first`` (fixed windows from the first request, as
      LiteLLM's per-key limiter). ``remaining_off_by_one`` reports one request more
      remaining than will be admitted (LiteLLM's router).
    * ``ratelimit_scope``: report the limits under LiteLLM's per-scope names
      (``api_key``: ``x-ratelimit-api_key-remaining-requests``; ``team``...), with
      no reset header. ``rejection_style``: the 429's headers and body: ``openai``,
      ``litellm_key`` (``retry-after`` of a whole window, ``rate_limit_type``,
      ``reset_at``) or ``litellm_router`` (only ``llm_provider-retry-after``).
    * ``background_rpm``: another client on the same key, sending this many
      requests a minute evenly (``background_tokens`` each) into the same windows;
      a request of its that does not fit is dropped. ``/_mock/stats`` counts both.
    * ``report_limit``: False sends only the remaining count and reset time, no
      limit (a router enforcing a deployment limit the client is not told).
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency_s: float = 0.0
    api_key: str | None = None
    echo_key_in_errors: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    window_s: float = 60.0
    ratelimit_headers: bool = True
    faults: list[FaultRule] = field(default_factory=list)
    seed: int = 0
    stall_s: float = 30.0
    model_name: str | None = None
    fault_retry_after_s: float = 0.05
    batch_phase_s: float = 0.0
    batch_file_max_bytes: int = 200 * 1024 * 1024
    batch_max_requests: int = 50_000
    upload_latency_s: float = 0.0
    create_latency_s: float = 0.0
    download_latency_s: float = 0.0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    window_kind: WindowKind = "sliding"
    remaining_off_by_one: bool = False
    ratelimit_scope: str | None = None
    rejection_style: RejectionStyle = "openai"
    background_rpm: float | None = None
    background_tokens: int = 0
    report_limit: bool = True

    def __post_init__(self) -> None:
        check_loopback(self.host)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"MockConfig.port: must be 0..65535, got {self.port}")
        for name in ("latency_s", "stall_s", "fault_retry_after_s", "batch_phase_s",
                     "upload_latency_s", "create_latency_s", "download_latency_s",
                     "cached_tokens", "reasoning_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"MockConfig.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("batch_file_max_bytes", "batch_max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"MockConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.window_s <= 0:
            raise ValueError(f"MockConfig.window_s: must be > 0, got {self.window_s}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            limit = getattr(self, name)
            if limit is None:
                continue
            if limit * self.window_s / 60 < 1:
                raise ValueError(
                    f"MockConfig.{name}: {limit} per minute allows less than one per "
                    f"{self.window_s:g}s window; raise the limit or window_s"
                )
        if self.window_kind not in get_args(WindowKind):
            raise ValueError(f"MockConfig.window_kind: one of {get_args(WindowKind)}, "
                             f"got {self.window_kind!r}")
        if self.rejection_style not in get_args(RejectionStyle):
            raise ValueError(f"MockConfig.rejection_style: one of {get_args(RejectionStyle)}, "
                             f"got {self.rejection_style!r}")
        if self.ratelimit_scope is not None and not self.ratelimit_scope.replace("_", "").isalpha():
            raise ValueError("MockConfig.ratelimit_scope: letters and underscores only, "
                             f"got {self.ratelimit_scope!r}")
        if self.background_rpm is not None and self.background_rpm <= 0:
            raise ValueError(f"MockConfig.background_rpm: must be > 0, got {self.background_rpm}")
        if self.background_tokens < 0:
            raise ValueError(
                f"MockConfig.background_tokens: must be >= 0, got {self.background_tokens}")
        for rule in self.faults:
            if not isinstance(rule, FaultRule):
                raise ValueError(f"MockConfig.faults: expected FaultRule items, got {rule!r}")
