"""Label Studio tokens: their kinds, and the access tokens obtained for personal access tokens.

A legacy token is sent as `Authorization: Token <t>`. A personal access token (PAT) is a JWT refresh token
(payload `token_type == "refresh"`); it is exchanged at `POST <LS>/api/token/refresh/` for an access token
(lives 5 minutes), sent as `Authorization: Bearer <access>`, cached per (Label Studio URL, PAT) until 30 s before
it expires and refreshed once more when Label Studio answers 401. A JWT that is not a refresh token is sent as
is, as a Bearer token.

In: a token (legacy, PAT, JWT access token or empty) and the Label Studio it belongs to (`LabelStudio`).
Out: its kind (`token_kind`), its unverified claims (`jwt_claims`), the `Authorization` header for a request to
that Label Studio (`AccessTokens.authorization`), and the message for Label Studio refusing it
(`refusal_message`). The exchange itself is an HTTP request, so transport.py does it and hands it to
`AccessTokens` as its `refresh` function; the ImageErrors of a refresh (502, 504) come from there. This module
raises none of its own. Tokens are never logged and never appear in messages.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from sam_backend.images.redact import redact_url
from sam_backend.lru import BoundedLRU

ACCESS_TOKEN_LIFETIME = 300.0  # seconds, when the access token carries no `exp`
ACCESS_TOKEN_MARGIN = 30.0  # refresh this long before the access token expires
TOKEN_CACHE_SIZE = 64  # (Label Studio, PAT) pairs

TokenKind = Literal["legacy", "pat", "access", "none"]
TOKEN_NAMES = {"legacy": "legacy token", "pat": "personal access token (PAT)", "access": "JWT access token",
               "none": "no token"}


@dataclass(frozen=True)
class LabelStudioAccess:
    """Where a Label Studio is and how to authenticate to it.

    `url`: its base URL, e.g. `http://127.0.0.1:8080`; `token`: a legacy token or a personal access token (PAT).
    """

    url: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class LabelStudio:
    """A Label Studio resolved for one fetch: base URL without trailing slash, its origin, its token."""

    base: str
    origin: tuple[str, str, int]
    path: str  # base path, "" or e.g. "/label-studio"
    token: str = field(repr=False)
    source: str  # where the token came from, for messages

    @property
    def kind(self) -> TokenKind:
        return token_kind(self.token)


@dataclass
class Access:
    token: str = field(repr=False)
    expires: float  # time.monotonic() seconds


class AccessTokens:
    """The `Authorization` header for each Label Studio request, with the access tokens obtained from PATs cached
    (the TOKEN_CACHE_SIZE most recently used) and refreshed one at a time per PAT. Thread-safe.

    `refresh(ls, deadline)` exchanges the PAT of `ls` for a new `Access` (it raises ImageError).
    """

    def __init__(self, refresh: Callable[[LabelStudio, float], Access]) -> None:
        self._refresh = refresh
        self._lock = threading.Lock()  # the cache and the refresh locks change together under it
        self._tokens: BoundedLRU[tuple[str, str], Access] = BoundedLRU(TOKEN_CACHE_SIZE)
        self._refresh_locks: dict[tuple[str, str], threading.Lock] = {}

    def authorization(self, ls: LabelStudio, deadline: float) -> str:
        kind = ls.kind
        if kind == "legacy":
            return f"Token {ls.token}"
        if kind == "access":
            return f"Bearer {ls.token}"
        return f"Bearer {self._access_token(ls, deadline)}"

    def _token_key(self, ls: LabelStudio) -> tuple[str, str]:
        return ls.base, hashlib.sha256(ls.token.encode()).hexdigest()

    def invalidate(self, ls: LabelStudio, access: str) -> None:
        key = self._token_key(ls)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.token == access:
                self._tokens.pop(key)

    def _access_token(self, ls: LabelStudio, deadline: float) -> str:
        """A valid access token for the PAT of `ls`: cached, or refreshed (one refresh at a time per PAT)."""
        key = self._token_key(ls)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and time.monotonic() < cached.expires - ACCESS_TOKEN_MARGIN:
                return cached.token
            refresh_lock = self._refresh_locks.get(key)
            if refresh_lock is None:
                if len(self._refresh_locks) >= 2 * TOKEN_CACHE_SIZE:  # forget idle locks of evicted or failed PATs
                    for old in [k for k, lock in self._refresh_locks.items()
                                if k not in self._tokens and not lock.locked()]:
                        del self._refresh_locks[old]
                refresh_lock = self._refresh_locks[key] = threading.Lock()
        with refresh_lock:
            with self._lock:  # another thread may have refreshed while this one waited
                cached = self._tokens.get(key)
                if cached is not None and time.monotonic() < cached.expires - ACCESS_TOKEN_MARGIN:
                    return cached.token
            access = self._refresh(ls, deadline)
            with self._lock:
                self._tokens.put(key, access)
            return access.token


def token_kind(token: str) -> TokenKind:
    """`"pat"` for a JWT refresh token (a personal access token), `"access"` for another JWT, `"legacy"`
    for anything else non-empty, `"none"` for an empty token. The JWT is decoded, not verified."""
    if not token:
        return "none"
    claims = jwt_claims(token)
    if claims is None:
        return "legacy"
    return "pat" if claims.get("token_type") == "refresh" else "access"


def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (three base64url parts), unverified; None if `token` is not one."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    if not all(re.fullmatch(r"[A-Za-z0-9_-]*", part) for part in parts):
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(header, dict) and isinstance(claims, dict) else None


def refusal_message(ls: LabelStudio | None, sent: TokenKind, status: int, shown: str, left: bool) -> str:
    where = redact_url(ls.base) if ls is not None else "?"
    if left:
        return (f"Label Studio at {where} refused {shown} (HTTP {status}): it was reached by a redirect from "
                f"another host, and credentials are never sent after one")
    if sent == "none":
        return (f"Label Studio at {where} refused {shown} (HTTP {status}): no credentials for it; set "
                f"LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    source = ls.source if ls is not None else "?"
    hint = ""
    if sent == "legacy" and status == 401:
        hint = " (legacy tokens may be disabled in the organization: use a personal access token)"
    elif status == 403:
        hint = " (the token's user may have no access to this project)"
    return (f"Label Studio at {where} refused the {TOKEN_NAMES[sent]} from {source} for {shown} "
            f"(HTTP {status}){hint}")
