"""Keep the API key out of everything batcher prints or stores.

The key is read once from the environment; every piece of text that could
carry it (a server's error body, an exception, a URL with a query-string
key) passes through ``Redactor.clean`` before it reaches a log line, an
error message, the checkpoint or the results, and before any cut to length.

A secret travels in more shapes than its own: percent-encoded in a URL
(``quote`` and ``quote_plus``, either case of hex digit), base64 inside a
Basic ``Authorization`` header, and a proxy's ``user:password`` both as
written in ``HTTPS_PROXY`` and decoded. ``Redactor`` masks every one of them.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that gateways use for keys; their values are masked in any URL shown.
SECRET_QUERY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token",
                                 "sig", "signature"})
_SK_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
_MIN_SECRET = 4  # shorter strings are too common in text to mask
# What a terminal would act on rather than show: escape sequences (CSI such as a screen
# clear, OSC such as a title change, and the two-byte kind), then any other C0 control
# but tab and newline, DEL, and the C1 controls (U+0080-U+009F, 8-bit CSI among them).
_TERMINAL_CONTROLS = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[ -~]?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def encodings(secret: str) -> set[str]:
    """Every form ``secret`` can take in a URL, a header or an error text."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
             quote_plus(secret, safe="/"), base64.b64encode(secret.encode()).decode()}
    decoded = unquote(secret)  # a proxy password is written %-encoded in HTTPS_PROXY
    if decoded != secret:
        forms |= encodings(decoded)
    return {form for form in forms if len(form) >= _MIN_SECRET}


def proxy_secrets(proxy_url: str | None) -> list[str]:
    """The credentials in a proxy URL (``http://user:password@host:port``)."""
    if not proxy_url:
        return []
    try:
        parts = urlsplit(proxy_url)
    except ValueError:
        return []
    if "@" not in parts.netloc:
        return []
    userinfo = parts.netloc.rsplit("@", 1)[0]
    secrets = [userinfo, unquote(userinfo)]
    if parts.password:
        secrets.append(parts.password)
    return secrets


class Redactor:
    """Replaces known secrets, in every encoding (and anything shaped like an
    OpenAI key), with ``***``."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        forms: set[str] = set()
        for secret in secrets or []:
            if len(secret) >= _MIN_SECRET:
                forms |= encodings(secret)
        # Longest first, so a secret that contains another is masked whole; case-blind,
        # so %2f and %2F are both caught (masking a case variant of a key costs nothing).
        alternatives = "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
        self._pattern = re.compile(alternatives, re.IGNORECASE) if alternatives else None

    def clean(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return _SK_PATTERN.sub(MASK, text)


def printable(text: str) -> str:
    """``text`` with every terminal control removed: what batcher prints passes here, so
    a server's error text cannot retitle, clear or rewrite the user's terminal."""
    return _TERMINAL_CONTROLS.sub("", text)


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
