"""The run's one rate limit on Ray: a named actor holding a
``batcher.limits.leases.ClusterLimit``, which every worker's limiter leases
slices of, and where workers' counters and a failure that ends the run meet.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray
from ray.actor import ActorHandle

from batcher.config import Job
from batcher.limits.leases import ClusterLimit, Feedback, Lease

Actor = ActorHandle[Any]
State = tuple[dict[str, int], str | None, tuple[str, int] | None]
"""The limit actor's state: progress counters, the server's verdict, another failure."""


@ray.remote(num_cpus=0)
class LimitActor:
    """The run's :class:`batcher.limits.leases.ClusterLimit`, shared by every worker."""

    def __init__(self, requests_per_minute: float | None,
                 tokens_per_minute: float | None) -> None:
        self._limit = ClusterLimit(requests_per_minute, tokens_per_minute, time.monotonic)
        self._failure: tuple[str, int] | None = None

    def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease:
        return self._limit.lease(worker, feedback, min_tokens)

    def report(self, feedback: Feedback) -> None:
        self._limit.report(feedback)

    def fail(self, message: str, exit_code: int) -> None:
        """A worker's error that ends the run (other than the server's verdict)."""
        if self._failure is None:
            self._failure = (message, exit_code)

    def state(self) -> State:
        return dict(self._limit.counts), self._limit.abort, self._failure


class ActorLeases:
    """A :class:`batcher.limits.leases.LeaseSource` behind the limit's actor."""

    def __init__(self, actor: Actor) -> None:
        self._actor = actor

    async def lease(self, worker: str, feedback: Feedback, min_tokens: int) -> Lease:
        lease: Lease = await self._actor.lease.remote(worker, feedback, min_tokens)
        return lease


def limit_actor(job: Job) -> Actor:
    """A new limit actor for one run of ``job``, under a name of its own."""
    name = f"batcher-limit-{uuid.uuid4().hex[:12]}"
    actor: Actor = LimitActor.options(name=name).remote(  # type: ignore[attr-defined]
        job.limits.requests_per_minute, job.limits.tokens_per_minute)
    return actor
