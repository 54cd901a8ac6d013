"""What a request costs: prices from the maintained ``genai-prices`` data, or the job's own.

A run resolves its price once, before the first request (:func:`resolve_price`):

1. A ``pricing:`` block with rates (custom, fine-tuned, self-hosted models)
   is used as written: USD per million input, cached-input and output tokens,
   and ``batch_discount`` off all three in Batch API mode.
2. Otherwise the model is looked up in the ``genai-prices`` package's bundled
   data (no network: updates are never fetched at run time), under the
   provider ``pricing.provider`` names, or the one the endpoint's URL
   identifies, or, when the URL is none it knows (a proxy, a self-hosted
   server, the built-in mock), by the model name alone.
3. Nothing found: there is no price. The run says why and ``cost_usd`` stays
   empty; a number is never made up.

Tokens are billed the way OpenAI's chat API reports them: ``prompt_tokens``
includes ``cached_tokens``, which cost the cached-input price;
``completion_tokens`` includes ``reasoning_tokens``, which cost the output
price (unless the price data gives reasoning its own rate).

Every component of a listed price is accounted for, in the estimate, the
budget's reservations and each row's cost:

- tokens a reply reports (input, cached input, output, reasoning) and a
  per-request fee (some search models) are priced;
- what batcher's requests never incur is left out: non-text input (it sends
  text only) and cache writes (billed only for blocks marked for caching);
- tool calls (web or file searches, code runs) are billed only when the job
  turns tools on (``params.tools``, ``params.web_search_options``), and
  replies do not count them;
- anything else (audio or image output, citation tokens, characters,
  seconds, pages) is billed by a count no reply reports.

A budget is refused (:meth:`Price.unbounded`) for a price with a component
the replies cannot report, since what it spends could not be known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genai_prices.types import ModelPrice, PriceCalculation

    from batcher.config import PricingSpec

_MILLION = 1_000_000
_BATCH_CONTEXT = {"processing": "batch"}

# genai-prices' price keys by what a chat reply tells of them (see the module docstring).
_REPORTED = frozenset({"input_mtok", "cache_read_mtok", "output_mtok", "output_reasoning_mtok",
                       "requests_kcount"})
_NEVER_SENT_PREFIXES = ("input_audio", "input_image", "input_video", "cache_audio",
                        "cache_image", "cache_video", "cache_write", "cache_text_write")
_TOOL_CALLS = frozenset({"web_searches_kcount", "storage_searches_kcount",
                         "code_executions_kcount", "social_searches_kcount"})
#: Request parameters that turn on tools billed per call.
TOOL_PARAMS = ("tools", "web_search_options")


@dataclass(frozen=True, slots=True)
class Usage:
    """One response's token counts, as the chat-completions API reports them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # part of prompt_tokens
    reasoning_tokens: int = 0  # part of completion_tokens


@dataclass(frozen=True)
class Price:
    """A model's price for one run. Rates are USD per million tokens; for
    tiered prices they are the highest tier's (a worst case for estimates)."""

    input: float
    cached_input: float
    output: float
    source: str  # where the figures come from, for summaries and the dry run
    batch: bool = False
    # Set when the price data is more than three flat rates (tiers by prompt
    # size, a separate reasoning rate): rows are then costed by genai-prices.
    model_price: ModelPrice | None = None
    per_request: float = 0.0  # USD billed for every request, whatever its tokens
    reasoning: float | None = None  # USD per million reasoning tokens, when not ``output``
    # Components no reply reports (labels, e.g. "output audio tokens"), and the
    # per-call tool fees billed when the job turns tools on.
    unreported: tuple[str, ...] = ()
    tool_calls: tuple[str, ...] = ()

    def cost(self, usage: Usage) -> float:
        """What one response cost in USD, as the provider bills it (its fee included)."""
        if self.model_price is not None:  # genai-prices counts the request's fee itself
            return float(self.model_price.calc_price(_genai_usage(usage))["total_price"])
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        return ((usage.prompt_tokens - cached) * self.input + cached * self.cached_input
                + usage.completion_tokens * self.output) / _MILLION + self.per_request

    def worst_case(self, prompt_tokens: int, completion_tokens: int, requests: int = 1
                   ) -> float:
        """An upper bound on the cost of ``requests`` requests with these tokens in all:
        no cache hits, the highest tier and rate, every request's fee."""
        input_rate = max(self.input, self.cached_input)
        output_rate = max(self.output, self.reasoning or 0.0)
        return ((prompt_tokens * input_rate + completion_tokens * output_rate) / _MILLION
                + requests * self.per_request)

    def unbounded(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """What requests with ``params`` may be billed for that no reply reports
        (empty: a budget can hold)."""
        tools = self.tool_calls if any(name in params for name in TOOL_PARAMS) else ()
        return self.unreported + tools

    def describe(self) -> str:
        rates = (f"${_figure(self.input)} input, ${_figure(self.cached_input)} cached input, "
                 f"${_figure(self.output)} output per million tokens")
        if self.per_request:
            rates += f", ${_figure(self.per_request * 1000)} per thousand requests"
        return f"{rates} ({self.source}{', Batch API price' if self.batch else ''})"


@dataclass(frozen=True)
class NoPrice:
    """Why a run has no price: said in the summary instead of a made-up number."""

    reason: str


def resolve_price(model: str, *, pricing: PricingSpec | None = None,
                  base_url: str | None = None, batch: bool = False,
                  when: datetime | None = None) -> Price | NoPrice:
    """The price of ``model`` for a run (``batch``: the Batch API's rates).

    ``base_url`` is the endpoint's URL (None for the built-in mock); ``when``
    the request time the price data is read at (default: now).
    """
    if pricing is not None and pricing.input is not None:
        assert pricing.output is not None  # the job's validation requires both
        factor = 1.0 - (pricing.batch_discount if batch else 0.0)
        cached = pricing.input if pricing.cached_input is None else pricing.cached_input
        return Price(input=pricing.input * factor, cached_input=cached * factor,
                     output=pricing.output * factor, source="the job's pricing block",
                     batch=batch)
    provider = pricing.provider if pricing is not None else None
    return _listed_price(model, provider, base_url, batch, when or datetime.now(UTC))


def _listed_price(model: str, provider: str | None, base_url: str | None, batch: bool,
                  when: datetime) -> Price | NoPrice:
    from genai_prices import Usage as GenaiUsage
    from genai_prices import __version__, calc_price

    context = _BATCH_CONTEXT if batch else None
    zero = GenaiUsage(input_tokens=0, output_tokens=0)
    try:
        if provider is not None:
            found = calc_price(zero, model, provider_id=provider, genai_request_timestamp=when,
                               price_context=context)
        else:
            found = _by_url_then_name(zero, model, base_url, when, context)
    except LookupError:
        where = f"provider '{provider}'" if provider else (
            "any provider" if base_url is None else f"{base_url} or by name")
        return NoPrice(f"genai-prices {__version__} has no price for model '{model}' at "
                       f"{where}; add a pricing: block (input, output: USD per million tokens) "
                       "to the job to supply one")
    model_price = found.model_price
    rates = [_top_rate(model_price.input_mtok), _top_rate(model_price.cache_read_mtok),
             _top_rate(model_price.output_mtok)]
    if rates[0] is None or rates[2] is None:
        return NoPrice(f"genai-prices {__version__} lists '{found.model.id}' at "
                       f"{found.provider.name} without token prices; add a pricing: block "
                       "to the job")
    flat = all(isinstance(rate, Decimal | None) for rate in (
        model_price.input_mtok, model_price.cache_read_mtok, model_price.output_mtok,
        model_price.requests_kcount))
    flat = flat and model_price.output_reasoning_mtok is None
    input_rate, cached_rate, output_rate = (float(rate) if rate is not None else None
                                            for rate in rates)
    assert input_rate is not None and output_rate is not None
    fee, reasoning = (_top_rate(model_price.requests_kcount),
                      _top_rate(model_price.output_reasoning_mtok))
    components = _components(model_price)
    return Price(
        input=input_rate,
        cached_input=input_rate if cached_rate is None else cached_rate,
        output=output_rate,
        source=f"genai-prices {__version__}: {found.provider.name} {found.model.id}",
        batch=batch,
        model_price=None if flat else model_price,
        per_request=0.0 if fee is None else float(fee) / 1000,
        reasoning=None if reasoning is None else float(reasoning),
        unreported=tuple(_label(key) for key in components
                         if key not in _REPORTED and key not in _TOOL_CALLS
                         and not key.startswith(_NEVER_SENT_PREFIXES)),
        tool_calls=tuple(_label(key) for key in components if key in _TOOL_CALLS),
    )


def _components(model_price: ModelPrice) -> list[str]:
    """The price keys the price sets (``input_mtok``, ``requests_kcount``, ...)."""
    return [key for key, value in vars(model_price).items()
            if not key.startswith("_") and value is not None]


def _label(key: str) -> str:
    """A price key as a reader says it: ``output_audio_mtok`` -> "output audio tokens"."""
    for suffix, unit in (("_mtok", " tokens"), ("_kcount", ""), ("_kpages", " pages"),
                         ("_mchars", " characters"), ("_hours", " time"),
                         ("_gpixels", " pixels")):
        if key.endswith(suffix):
            return key.removesuffix(suffix).replace("_", " ") + unit
    return key.replace("_", " ")


def _by_url_then_name(zero: object, model: str, base_url: str | None, when: datetime,
                      context: dict[str, str] | None) -> PriceCalculation:
    from genai_prices import calc_price

    if base_url is not None:
        try:
            return calc_price(zero, model, provider_api_url=base_url,
                              genai_request_timestamp=when, price_context=context)
        except LookupError:
            pass  # a URL genai-prices does not know (a proxy, a local server): try the name
    return calc_price(zero, model, genai_request_timestamp=when, price_context=context)


def _top_rate(rate: object) -> Decimal | None:
    """A flat rate as it is; a tiered one as its highest tier."""
    from genai_prices.types import TieredPrices

    if isinstance(rate, TieredPrices):
        return max([rate.base, *(tier.price for tier in rate.tiers)])
    return rate if isinstance(rate, Decimal) else None


def _genai_usage(usage: Usage) -> object:
    from genai_prices import Usage as GenaiUsage

    return GenaiUsage(input_tokens=usage.prompt_tokens,
                      cache_read_tokens=min(usage.cached_tokens, usage.prompt_tokens),
                      output_tokens=usage.completion_tokens,
                      output_reasoning_tokens=min(usage.reasoning_tokens,
                                                  usage.completion_tokens))


def _figure(value: float) -> str:
    """A price without float noise: 0.15, 2.5, 0.075."""
    return f"{value:.6f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
