"""The simulated reply text and the token arithmetic the server charges.

Both are pure functions so a test can predict exactly what the server sends:
``reply == reply_for(prompt)`` for every row of a run.
"""

from __future__ import annotations

import hashlib

_ECHO_WORDS = 8


def count_tokens(text: str) -> int:
    """Estimate tokens as ``ceil(len(text) / 4)``: crude, deterministic and cheap."""
    return -(-len(text) // 4)


def reply_for(prompt: str, system: str | None = None) -> str:
    """Return the deterministic reply the mock sends for ``prompt``.

    ``prompt`` is the text of the request's last user message, and the reply
    depends on nothing else: ``system`` is accepted so a call site can pass a
    row's whole prompt pair, but it is ignored, so ``reply_for(prompt)``
    matches whatever system prompt a job sets. The text starts with
    ``[simulated]`` so nobody mistakes it for a model's answer, carries a
    digest of the prompt so it is unique per prompt, and echoes the prompt's
    first words so a human can match reply to row.
    """
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    words = prompt.split()
    echo = " ".join(words[:_ECHO_WORDS])
    if len(words) > _ECHO_WORDS:
        echo += " ..."
    return f'[simulated] {digest}: a mock reply to "{echo}"'


def truncate_to_tokens(text: str, max_tokens: int | None) -> tuple[str, bool]:
    """Cut ``text`` to ``max_tokens`` (by :func:`count_tokens`); say whether it was cut."""
    if max_tokens is None or count_tokens(text) <= max_tokens:
        return text, False
    return text[: max_tokens * 4], True
