"""The one retry engine: when a failed server call is tried again, and how long to wait.

Every call batcher makes to a server goes through here: chat requests (the
row path, ``batcher.plan.pipeline``), and the Batch API's uploads, downloads,
creates, lists, polls and cancels (``batcher.batch``). In the manner of
tenacity, the parts are small:

- :func:`classify` is the one place that says what a failure means: the
  transport has already read the status and the error body into the
  error's :class:`~batcher.errors.Verdict` (``batcher.transport.wire``); here
  that verdict meets what the run knows (a gateway that fails in itself
  before any request got through is misconfigured, not overloaded);
- :class:`RetryPolicy` is a pure policy: an attempt number and a failure in,
  a delay or "give up" out, with the random source a parameter;
- :class:`Retrying` is the loop: sleep and clock are injected, so a test
  records the delays instead of waiting. A loop that must do more between
  attempts than call again (the row path paces, budgets and re-asks) takes
  its decisions from :meth:`Retrying.decide` and sleeps through
  :meth:`Retrying.sleep`, so it follows the same rules.

>>> retrying = Retrying(RetryPolicy(max_attempts=3), sleep=recorded_sleep)  # doctest: +SKIP
>>> file_id = await retrying.call(lambda: api.upload(path))                 # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from batcher.errors import ApiError, Verdict
from batcher.limits.pacing import Clock, Sleep

if TYPE_CHECKING:
    from batcher.config import RetrySpec

T = TypeVar("T")


def classify(error: ApiError, *, answered: bool = True) -> Verdict:
    """What ``error`` means for the call and the run. ``answered``: whether any
    request of the run has succeeded yet (a gateway that failed in itself before
    that is misconfigured: retrying would only fail every row the same way)."""
    if error.gateway_fault and not answered:
        return Verdict.ABORT
    return error.verdict


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures up to ``max_attempts`` attempts in all, waiting
    a jittered exponential backoff between them."""

    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0

    @classmethod
    def from_spec(cls, spec: RetrySpec) -> RetryPolicy:
        """The policy of a job's ``retry:`` settings."""
        return cls(spec.max_attempts, spec.base_delay_s, spec.max_delay_s)

    def delay_before_retry(self, attempts_made: int, error: ApiError,
                           rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempts_made + 1``, or None to stop.

        Exponential backoff with full jitter (a uniform draw up to the cap)
        spreads retries so workers that failed together do not retry
        together. A server's ``retry-after`` replaces the backoff: it is a floor
        we always honour, lengthened by up to 20% so the rows it stopped
        together do not come back in one burst.
        """
        if classify(error) is not Verdict.RETRY or attempts_made >= self.max_attempts:
            return None
        if error.retry_after_s is not None:
            return error.retry_after_s * (1 + 0.2 * rng.random())
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempts_made - 1))
        return rng.uniform(0, cap)


@dataclass(frozen=True)
class Decision:
    """What to do after a failed attempt: wait ``delay_s`` and try again, or, when
    it is None, stop; ``verdict`` says why (``ABORT``: the whole run must stop)."""

    verdict: Verdict
    delay_s: float | None

    @property
    def aborts(self) -> bool:
        return self.verdict is Verdict.ABORT


class GaveUp(Exception):
    """A call :meth:`Retrying.call` stopped trying: its last error, classified,
    after ``attempts`` attempts over ``elapsed_s`` seconds."""

    def __init__(self, error: ApiError, verdict: Verdict, attempts: int,
                 elapsed_s: float) -> None:
        super().__init__(error.message)
        self.error = error
        self.verdict = verdict
        self.attempts = attempts
        self.elapsed_s = elapsed_s

    @property
    def aborts(self) -> bool:
        return self.verdict is Verdict.ABORT

    def tries(self) -> str:
        """How long it tried, for a message: empty after a single attempt."""
        if self.attempts == 1:
            return ""
        return f" ({self.attempts} attempts over {self.elapsed_s:.0f} s)"


async def _no_recheck() -> None:
    return None


class Retrying:
    """Calls a server under a :class:`RetryPolicy`, sleeping between attempts."""

    def __init__(self, policy: RetryPolicy, *, sleep: Sleep, rng: random.Random | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock

    def decide(self, attempts_made: int, error: ApiError, *, answered: bool = True
               ) -> Decision:
        """The decision after attempt ``attempts_made`` failed with ``error``."""
        verdict = classify(error, answered=answered)
        if verdict is not Verdict.RETRY:
            return Decision(verdict, None)
        return Decision(verdict, self.policy.delay_before_retry(attempts_made, error, self._rng))

    async def sleep(self, delay_s: float) -> None:
        await self._sleep(delay_s)

    async def call(self, attempt: Callable[[], Awaitable[T]], *,
                   recheck: Callable[[], Awaitable[T | None]] = _no_recheck) -> T:
        """``attempt()``'s result, trying again while the policy allows; raises
        :class:`GaveUp` when it does not. ``recheck``, run after each wait, may
        return the result instead (a create whose answer was lost may have
        happened: look before creating again)."""
        started = self._clock()
        attempts = 0
        while True:
            attempts += 1
            try:
                return await attempt()
            except ApiError as error:
                decision = self.decide(attempts, error)
                if decision.delay_s is None:
                    raise GaveUp(error, decision.verdict, attempts,
                                 self._clock() - started) from None
            await self._sleep(decision.delay_s)
            found = await recheck()
            if found is not None:
                return found


class FailureStreak:
    """Trips when ``limit`` rows in a row fail with the same error signature.

    One bad row is the row's problem; twenty identical failures in a row
    (every request a 400 for an unknown parameter, a server that is down)
    are the job's, and going on would burn through the whole input.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.signature: str | None = None
        self.count = 0

    def record(self, signature: str | None) -> bool:
        """Note one finished row (``None`` for a success); True when tripped."""
        if signature is None or signature != self.signature:
            self.signature = signature
            self.count = 0 if signature is None else 1
        else:
            self.count += 1
        return self.count >= self.limit
