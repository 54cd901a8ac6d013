"""A job's budget (``limits.max_cost_usd``, ``limits.max_total_tokens``) as a run
meets it: checked before the first request, opened with what earlier runs
spent, and the message when it is reached.

How a budget holds while requests are in flight is ``batcher.limits.budget``'s;
this module is what the job and its checkpoint say about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batcher.errors import BudgetReached, ConfigError
from batcher.limits.budget import Budget
from batcher.plan.jobplan import JobPlan
from batcher.plan.usage import row_cost
from batcher.pricing import NoPrice
from batcher.store.checkpoint import Checkpoint
from batcher.store.journal import read_journal
from batcher.store.unsettled import Unsettled, ledger_path_for

if TYPE_CHECKING:  # the prepared job is built on the plan; only named here
    from batcher.plan.preflight import Prepared


def check_budget_price(plan: JobPlan) -> None:
    """A cost budget needs a price whose every component the replies report."""
    job = plan.job
    if job.limits.max_cost_usd is None:
        return
    price = plan.online_price
    if isinstance(price, NoPrice):
        raise ConfigError(f"limits.max_cost_usd: cannot keep to a budget without a price: "
                          f"{price.reason}")
    unbounded = price.unbounded(job.request_params)
    if unbounded:
        raise ConfigError(
            f"limits.max_cost_usd: cannot keep to a budget for '{job.model}': its price "
            f"({price.source}) also bills {', '.join(unbounded)}, which replies do not "
            "report; remove the budget, or give the job a pricing: block (input, output: "
            "USD per million tokens) to budget by tokens alone")


def open_budget(plan: JobPlan, checkpoint: Checkpoint, *, fresh: bool = False) -> Budget | None:
    """The job's budget, less what earlier runs of it spent: read from the checkpoint
    (each answered row's cost, or for a row recorded without one, its usage at the
    online price) and from the ledger of requests they sent and never settled."""
    limits = plan.job.limits
    if limits.max_cost_usd is None and limits.max_total_tokens is None:
        return None
    price = plan.known_online_price
    spent_usd, spent_tokens = 0.0, 0
    for record in read_journal(checkpoint.path):
        cost = record.get("cost_usd")
        if cost is None:
            cost = row_cost(price, record.get("prompt_tokens"), record.get("completion_tokens"),
                            record.get("cached_tokens"), record.get("reasoning_tokens"))
        spent_usd += cost or 0.0
        spent_tokens += record.get("total_tokens") or 0
    ledger = Unsettled.open(ledger_path_for(checkpoint.path), fresh=fresh)
    return Budget(limits.max_cost_usd, limits.max_total_tokens,
                  spent_usd=spent_usd + ledger.carried_usd,
                  spent_tokens=spent_tokens + ledger.carried_tokens, ledger=ledger)


def budget_reached(prepared: Prepared, budget: Budget, checkpoint: Checkpoint
                   ) -> BudgetReached:
    """The error that ends a run out of budget: what was spent of what, and how far
    the job got (by every run of it)."""
    limits = prepared.job.limits
    spent = []
    if limits.max_cost_usd is not None:
        spent.append(f"${budget.spent_usd:,.4f} spent of limits.max_cost_usd "
                     f"${limits.max_cost_usd:,.4f}")
    if limits.max_total_tokens is not None:
        spent.append(f"{budget.spent_tokens:,} tokens of limits.max_total_tokens "
                     f"{limits.max_total_tokens:,}")
    ledger = budget.ledger
    if isinstance(ledger, Unsettled) and ledger.carried:
        spent.append(f"{len(ledger.carried):,} requests sent by earlier runs without a "
                     "usable answer count at their worst case until one comes")
    checkpoint.refresh()
    done = sum(int(checkpoint.answered(keys).sum()) for keys in prepared.input_keys())
    return BudgetReached(
        f"budget reached before the next request: {'; '.join(spent)} (by every run of "
        f"this job); {done:,} of {prepared.row_count:,} rows done, the checkpoint is "
        "kept. Raise the limit in the job and run the same command again to go on; "
        "answered rows are not sent again")
