"""What a reply is worth: how much of its usage to trust, what it cost, what the
server counts against the token limit, and the row's result made from it.

Every reply a row gets adds to its tokens and cost (:class:`Spent`): a reply
rejected by the row's checks and asked again costs too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

from batcher.plan.rows import Rejection
from batcher.pricing import Price, Usage
from batcher.records import STATUS_ERROR, STATUS_OK, RowResult
from batcher.transport.wire import Completion


def trusted_usage(completion: Completion, body_bytes: int, max_output: int | None,
                  n_choices: int) -> Completion:
    """The completion, without its usage when that cannot be right: more prompt
    tokens than the request had bytes, more output than ``max_tokens`` allowed,
    parts larger than their whole (negative counts are dropped when parsed). Such
    usage is treated as missing: no cost is made up from it, and a budget keeps
    the request's worst case."""
    prompt, output = completion.prompt_tokens, completion.completion_tokens
    output_bound = None if max_output is None else max_output * n_choices
    plausible = (
        (prompt is None or prompt <= body_bytes)
        and (output is None or output_bound is None or output <= output_bound)
        and (completion.cached_tokens or 0) <= (prompt or 0)
        and (completion.reasoning_tokens or 0) <= (output or 0)
        and (completion.total_tokens is None or output_bound is None
             or completion.total_tokens <= body_bytes + output_bound))
    if plausible:
        return completion
    return dataclasses.replace(completion, prompt_tokens=None, completion_tokens=None,
                               total_tokens=None, cached_tokens=None, reasoning_tokens=None)


def row_cost(price: Price | None, prompt_tokens: int | None, completion_tokens: int | None,
             cached_tokens: int | None, reasoning_tokens: int | None) -> float | None:
    """A reply's cost as the provider bills it (None: no price, or no usage sent)."""
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return round(price.cost(Usage(prompt_tokens, completion_tokens, cached_tokens or 0,
                                  reasoning_tokens or 0)), 10)


@dataclass(slots=True)
class Spent:
    """Tokens and cost over every reply a row got: a rejected reply asked again costs
    too, so the row's columns add them all up."""

    prompt: int | None = None
    completion: int | None = None
    total: int | None = None
    cost_usd: float | None = None

    def add(self, completion: Completion, cost_usd: float | None) -> None:
        self.prompt = _plus(self.prompt, completion.prompt_tokens)
        self.completion = _plus(self.completion, completion.completion_tokens)
        self.total = _plus(self.total, completion.total_tokens)
        self.cost_usd = _plus(self.cost_usd, cost_usd)


_N = TypeVar("_N", int, float)


def _plus(total: _N | None, more: _N | None) -> _N | None:
    return total if more is None else (more if total is None else total + more)


def result_of(completion: Completion, chosen: int, spent: Spent, attempts: int,
              n_choices: int, *, latency_s: float | None = None,
              rejected: Rejection | None = None) -> RowResult:
    """The row's outcome from its last reply: the chosen choice's text, every choice's
    when the job asks for several, and why it failed when it was ``rejected`` (the
    reply is kept either way)."""
    choice = completion.choices[chosen] if chosen < len(completion.choices) else None
    return RowResult(
        reply=choice.reply if choice else completion.reply,
        finish_reason=choice.finish_reason if choice else completion.finish_reason,
        prompt_tokens=spent.prompt,
        completion_tokens=spent.completion,
        total_tokens=spent.total,
        cached_tokens=completion.cached_tokens,
        reasoning_tokens=completion.reasoning_tokens,
        refusal=choice.refusal if choice else completion.refusal,
        status=STATUS_OK if rejected is None else STATUS_ERROR,
        error=None if rejected is None else rejected.message,
        attempts=attempts,
        latency_s=None if latency_s is None else round(latency_s, 4),
        cost_usd=None if spent.cost_usd is None else round(spent.cost_usd, 10),
        error_class=None if rejected is None else rejected.signature,
        replies=[c.reply for c in completion.choices] if n_choices > 1 else None,
    )


def charged_tokens(prompt: int | None, completion: int | None, max_output: int | None,
                   n_choices: int) -> int | None:
    """Tokens the server counts against TPM: it keeps the whole ``max_tokens``
    reservation, so only the prompt part is reconciled when one is set."""
    if prompt is None:
        return None
    if max_output is not None:
        return prompt + max_output * n_choices
    return None if completion is None else prompt + completion
