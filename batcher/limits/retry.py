"""When to try a failed request again, and how long to wait first.

A small pure policy in the manner of tenacity's ``wait``/``stop``: an
attempt number and a classified error in, a delay or "give up" out. The
random source is a parameter, so tests check the delays exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from batcher.errors import ApiError, Verdict


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0

    def delay_before_retry(self, attempts_made: int, error: ApiError,
                           rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempts_made + 1``, or None to stop.

        Exponential backoff with full jitter (a uniform draw up to the cap)
        spreads retries so workers that failed together do not retry
        together. A server's ``retry-after`` replaces the backoff: it is a floor
        we always honour, lengthened by up to 20% so the rows it stopped
        together do not come back in one burst.
        """
        if error.verdict is not Verdict.RETRY or attempts_made >= self.max_attempts:
            return None
        if error.retry_after_s is not None:
            return error.retry_after_s * (1 + 0.2 * rng.random())
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempts_made - 1))
        return rng.uniform(0, cap)


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
