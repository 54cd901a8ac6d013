"""Keep the API key out of everything batcher prints or stores.

The key is read once from the environment; every piece of text that could
carry it (a server's error body, an exception, a URL with a query-string
key) passes through ``Redactor.clean`` before it reaches a log line, an
error message, the checkpoint or the results.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that gateways use for keys; their values are masked in any URL shown.
SECRET_QUERY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token",
                                 "sig", "signature"})
_SK_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")


class Redactor:
    """Replaces known secrets (and anything shaped like an OpenAI key) with ``***``."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets or [] if len(s) >= 4}, key=len, reverse=True)

    def clean(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _SK_PATTERN.sub(MASK, text)


def redact_url(url: str) -> str:
    """A URL safe to print: userinfo and key-like query values masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in SECRET_QUERY_PARAMS else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
