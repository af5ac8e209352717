"""Keep credentials out of MLflow: params, tags and logged config files go through ``scrub``.

MLflow stores params and tags in plain text that anyone with read access to the
tracking server sees, so anything that looks like a key, a password, a token or a URL
carrying credentials is redacted before it is logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

# Names whose values are secrets whatever they hold.
_SECRET_NAME = re.compile(
    r"(secret|password|passwd|pwd|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth|session[_-]?key)",
    re.IGNORECASE,
)
# Values that are secrets whatever their name: AWS access key ids, bearer tokens, PEM blocks.
_SECRET_VALUE = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|Bearer\s+\S+|-----BEGIN [A-Z ]*PRIVATE KEY-----")
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")
# Query parameters of presigned URLs and token-in-URL schemes.
_SECRET_QUERY = re.compile(r"(signature|credential|token|key|secret|sig|password)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def scrub_url(url: str) -> str:
    """Drop ``user:password@`` and credential-bearing query parameters from a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = [(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub_text(text: str) -> str:
    """Redact secret-looking values and the credentials inside any URL in ``text``."""
    text = _URL.sub(lambda m: scrub_url(m.group(0)), text)
    return _SECRET_VALUE.sub(REDACTED, text)


def scrub(value: Any, name: str = "") -> Any:
    """A copy of ``value`` (nested dicts/lists/strings) with secrets replaced by ``***``."""
    if name and is_secret_name(name) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(v) for v in value)
    if isinstance(value, str):
        return scrub_text(value)
    return value


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
