"""Which fault a request gets.

Faults come from two places:

* a marker in the last user message: ``[[fault:KIND]]`` faults every attempt
  at that prompt; ``[[fault:KIND*N]]`` only its first N attempts. With several
  markers the first one that applies to the current attempt wins, so
  ``[[fault:429*1]] [[fault:500*2]]`` gives 429, then 500, then a reply;
* :class:`~batcher.mock_server.config.FaultRule` entries in the config,
  applied by request count (``first_n``) or by chance (``rate``, seeded).

A marker beats a rule. What each kind looks like on the wire is in
:mod:`~batcher.mock_server.fault_replies`.
"""

from __future__ import annotations

import random
import re

from .config import FaultRule
from .fault_replies import FAULT_KINDS

_MARKER = re.compile(r"\[\[fault:([A-Za-z0-9_]+)(?:\*(\d+))?\]\]")
_MARKER_PREFIX = "[[fault:"


class UnknownFault(ValueError):
    """A prompt carries a ``[[fault:...]]`` marker naming no known fault."""

    def __init__(self, kind: str) -> None:
        known = ", ".join(sorted(FAULT_KINDS))
        super().__init__(f"Unknown mock fault {kind!r} in a [[fault:...]] marker; known: {known}.")


class FaultPlanner:
    """Decide the fault for each admitted request; stateful, owned by the event loop."""

    def __init__(self, rules: list[FaultRule], seed: int) -> None:
        self._rules = list(rules)
        self._seed = seed
        self.reset()

    def reset(self) -> None:
        """Forget attempt counts, restart request numbering and reseed the RNG."""
        self._rng = random.Random(self._seed)
        self._attempts: dict[str, int] = {}
        self._requests = 0

    def choose(self, prompt: str) -> str | None:
        """Return the fault kind for this attempt at ``prompt``, or None for a normal reply."""
        self._requests += 1
        by_rule = self._from_rules()
        return self._from_markers(prompt) or by_rule

    def _from_rules(self) -> str | None:
        chosen: str | None = None
        for rule in self._rules:
            # Draw for every rule on every request so one rule's outcome never
            # shifts the random stream another rule sees.
            draw = self._rng.random() if rule.rate else 1.0
            if chosen is None and (self._requests <= rule.first_n or draw < rule.rate):
                chosen = rule.kind
        return chosen

    def _from_markers(self, prompt: str) -> str | None:
        if _MARKER_PREFIX not in prompt:
            return None
        markers: list[tuple[str, str]] = _MARKER.findall(prompt)
        for kind, _ in markers:
            if kind not in FAULT_KINDS:
                raise UnknownFault(kind)
        if not markers:
            return None
        attempt = self._attempts.get(prompt, 0) + 1
        self._attempts[prompt] = attempt
        for kind, count in markers:
            if not count or attempt <= int(count):
                return kind
        return None
