"""URLs fit for messages and logs.

In: anything that should be a URL (a task's image reference, a Label Studio URL, a redirect target).
Out: a string with no userinfo, query values hidden except the harmless `d`, `fileuri` (shown as the redacted
cloud URI it encodes) and `filepath`, no fragment, control characters replaced, at most about 200 characters.
Raises nothing. Every module of the package uses it for its messages and logs, and so does model.py.
"""
from __future__ import annotations

import base64
import re
from urllib.parse import unquote, urlsplit

SAFE_QUERY_KEYS = frozenset({"d", "fileuri", "filepath"})


def redact_url(url: str) -> str:
    """`url` fit for messages and logs: no userinfo, query values hidden (but d, fileuri, filepath), no fragment,
    at most about 200 characters."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    text = url.strip()
    if text[:5].lower() == "data:":
        return "data:..."
    try:
        parts = urlsplit(text)
    except ValueError:
        return "<an unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = []
    for item in parts.query.split("&") if parts.query else []:
        key, sep, value = item.partition("=")
        if key.lower() == "fileuri" and sep:
            # Label Studio's presign parameter is the urlsafe base64 of the whole cloud URI, whose own query or
            # userinfo may hold a signature: show the URI it names, redacted, instead of its encoding.
            query.append(f"{key}={_redacted_fileuri(value)}")
        else:
            query.append(item if key.lower() in SAFE_QUERY_KEYS or not sep else f"{key}=***")
    shown = (f"{parts.scheme}:" if parts.scheme else "") + (f"//{netloc}" if netloc or parts.scheme else "")
    shown += parts.path + (("?" + "&".join(query)) if query else "")
    shown = re.sub(r"[\x00-\x1f\x7f]", "?", shown)
    return shown if len(shown) <= 200 else shown[:197] + "..."


def _redacted_fileuri(value: str) -> str:
    """A presign `fileuri=` value (urlsafe base64 of a cloud URI) as the redacted URI it encodes."""
    encoded = unquote(value)
    try:
        uri = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return "***"
    return redact_url(uri) if "://" in uri else "***"
