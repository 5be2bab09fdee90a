"""HTTP for task images: reachable hosts, connections that check their peer, redirects, credentials per hop,
body and time limits.

Reachable hosts (server-side request forgery): a target is allowed when it is Label Studio's origin, or when
ALLOWED_IMAGE_HOSTS is empty or names its host. Targets resolving to a loopback, private, link-local, shared,
multicast, reserved or unspecified address (IPv4 or IPv6, also IPv4-mapped, 6to4, Teredo and NAT64 forms) are
refused unless they are Label Studio's origin or ALLOW_PRIVATE_IMAGE_HOSTS is true. The check is done twice:
before connecting, on every address the host name resolves to (so nothing is sent to a refused address), and
on the peer address of the socket actually connected, before a byte of the request is written (so a name that
resolves differently the second time -- DNS rebinding -- cannot slip through). Redirects are followed here,
at most 5, and every hop is checked the same way. Environment proxies are not used (the check must see the
real target).

Credentials go only to Label Studio's origin (scheme, host and port), only for media paths (the caller says so),
and only while a redirect chain has not left Label Studio. Userinfo in a URL is sent as Basic auth to that URL's
host only.

Limits: IMAGE_TIMEOUT is the connect timeout and the timeout of every read; one fetch as a whole (redirects,
token refresh and body included) must finish by the deadline the caller gives (TOTAL_TIMEOUT_FACTOR x
IMAGE_TIMEOUT). Bodies larger than MAX_IMAGE_BYTES are refused (from Content-Length up front, and while
streaming).

In: an absolute http(s) URL, the Label Studio of the fetch (or None), whether credentials may be sent, the
deadline. Out: the body's bytes (`Transport.download`); and the PAT -> access token exchange (`Transport`'s
`refresh`, which it gives to its `AccessTokens`).
Raises ImageError: 400 invalid URL, host or port; 403 host not allowed, or a refused address (resolved or
connected); 404 upstream 404/410; 413 body too large; 502 upstream failure, too many redirects, a redirect to a
non-http(s) URL, Label Studio refusing the credentials or the token refresh; 504 timeout.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import socket
import time
from typing import Callable
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationValueError, NameResolutionError,
                                NewConnectionError, ReadTimeoutError, SSLError)

from sam_backend.errors import ImageError
from sam_backend.images.credentials import (ACCESS_TOKEN_LIFETIME, Access, AccessTokens, LabelStudio, TokenKind,
                                            jwt_claims, refusal_message)
from sam_backend.images.redact import redact_url
from sam_backend.images.references import origin_of
from sam_backend.settings import Settings

try:  # requests depends on certifi, so it is normally there; otherwise the system's CA store is used
    import certifi
    _CA_CERTS: str | None = certifi.where()
except ImportError:  # pragma: no cover
    _CA_CERTS = None

log = logging.getLogger("sam_backend.images")  # the package's one logger, as before the split
# urllib3 logs each request's full URL at DEBUG, query included (presigned signatures, tokens): keep it at INFO or
# above wherever this module is used (the server, the tools, the tests); fetches are logged here, redacted.
_urllib3_log = logging.getLogger("urllib3")
_urllib3_log.setLevel(max(_urllib3_log.level, logging.INFO))

MAX_REDIRECTS = 5
TOTAL_TIMEOUT_FACTOR = 3  # a whole fetch may take this many IMAGE_TIMEOUTs
CHUNK = 64 << 10
MAX_TOKEN_RESPONSE = 64 << 10
USER_AGENT = "label-studio-sam-backend"


class _ForbiddenPeer(Exception):
    """The socket connected to an address the target may not have (raised before the request is written)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address} is {reason}")
        self.address = address
        self.reason = reason


class Transport:
    """Downloads with the checks above. Thread-safe; its only state is its `AccessTokens`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = AccessTokens(self._refresh)

    def download(self, url: str, ls: LabelStudio | None, credentials: bool, deadline: float) -> bytes:
        """GET `url`, following up to MAX_REDIRECTS redirects; Label Studio's credentials are attached while
        `credentials` holds and every hop so far was on Label Studio's origin."""
        first = redact_url(url)
        current = url
        retried_refresh = False
        left = False  # the redirect chain has been on another host: no credentials from then on
        hop = 0
        while True:
            parts = urlsplit(current)
            shown = redact_url(current)
            on_ls = ls is not None and origin_of(current) == ls.origin
            left = left or not on_ls
            credentials = credentials and not left
            private_ok = self._check_target(current, on_ls)
            headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
            sent: TokenKind = "none"
            if credentials and ls is not None and ls.token:
                sent = ls.kind
                headers["Authorization"] = self.tokens.authorization(ls, deadline)
            elif parts.username is not None:
                userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
            response, pool = self._request("GET", current, headers, None, private_ok, deadline)
            try:
                status = response.status
                if status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                    hop += 1
                    if hop > MAX_REDIRECTS:
                        raise ImageError(502, f"{first}: more than {MAX_REDIRECTS} redirects")
                    location = response.headers["Location"]
                    target = urljoin(current, location.strip())
                    if urlsplit(target).scheme.lower() not in ("http", "https"):
                        raise ImageError(502, f"{shown} redirected to an unsupported URL {redact_url(target)}")
                    log.debug("%s redirected to %s", shown, redact_url(target))
                    current = target
                    continue
                if status == 401 and sent == "pat" and not retried_refresh and ls is not None:
                    # The cached access token expired or was revoked early: refresh once and retry this hop
                    retried_refresh = True
                    self.tokens.invalidate(ls, headers["Authorization"].split(" ", 1)[1])
                    continue
                if status in (401, 403) and on_ls:
                    raise ImageError(502, refusal_message(ls, sent, status, shown, left))
                if status in (404, 410):
                    raise ImageError(404, f"{shown}: not found (HTTP {status})")
                if status in (401, 403):
                    raise ImageError(502, f"{shown}: the image host refused access (HTTP {status})")
                if status in (200, 203):
                    return self._read_body(response, shown, deadline)
                raise ImageError(502, f"{shown}: the image host answered HTTP {status}")
            finally:
                response.close()
                pool.close()

    def _check_target(self, url: str, on_ls: bool) -> bool:
        """Refuse a target by host name and by the addresses it resolves to; returns whether private addresses
        are allowed for it (which the connection's peer check then enforces)."""
        parts = urlsplit(url)
        shown = redact_url(url)
        host = (parts.hostname or "").rstrip(".")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise ImageError(400, f"image URL {shown} has an invalid port") from None
        if not host:
            raise ImageError(400, f"image URL {shown} has no host")
        allowed = self.settings.allowed_hosts
        if not on_ls and allowed and not _host_allowed(host, port, allowed):
            raise ImageError(403, f"image host {host!r} of {shown} is not in ALLOWED_IMAGE_HOSTS")
        if on_ls or self.settings.allow_private_hosts:
            return True
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageError(502, f"cannot resolve the image host {host!r} of {shown}: {exc}") from None
        for info in infos:
            address = str(info[4][0])
            reason = address_problem(address)
            if reason is not None:
                raise ImageError(403, f"image host {host!r} of {shown} resolves to {address}, a {reason} "
                                      f"address (set ALLOW_PRIVATE_IMAGE_HOSTS=true to allow)")
        return False

    def _request(self, method: str, url: str, headers: dict[str, str], body: bytes | None, private_ok: bool,
                 deadline: float) -> tuple[urllib3.BaseHTTPResponse, HTTPConnectionPool]:
        """One request (no redirects, no retries), its body left unread; errors become ImageError."""
        parts = urlsplit(url)
        shown = redact_url(url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageError(504, f"{shown}: timed out (the whole download may take "
                                  f"{TOTAL_TIMEOUT_FACTOR} x IMAGE_TIMEOUT)")
        limit = min(self.settings.image_timeout, remaining)
        timeout = urllib3.Timeout(connect=limit, read=limit)
        guard = None if private_ok else _refuse_forbidden_peer
        https = parts.scheme.lower() == "https"
        try:
            port = parts.port
            if https:
                pool: HTTPConnectionPool = _GuardedHTTPSPool(
                    parts.hostname, port, timeout=timeout, retries=False, maxsize=1, cert_reqs="CERT_REQUIRED",
                    ca_certs=_CA_CERTS, peer_guard=guard)
            else:
                pool = _GuardedHTTPPool(parts.hostname, port, timeout=timeout, retries=False, maxsize=1,
                                        peer_guard=guard)
        except (LocationValueError, ValueError) as exc:
            raise ImageError(400, f"image URL {shown} is invalid: {exc}") from None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            response = pool.urlopen(method, target, body=body, headers=headers, redirect=False, retries=False,
                                    preload_content=False, assert_same_host=False, timeout=timeout)
        except BaseException as exc:
            pool.close()
            raise _http_error(exc, shown, limit) from None
        return response, pool

    def _read_body(self, response: urllib3.BaseHTTPResponse, shown: str, deadline: float) -> bytes:
        limit = self.settings.max_image_bytes
        length = response.headers.get("Content-Length", "")
        if length.strip().isdigit() and int(length) > limit:
            raise ImageError(413, f"{shown}: {int(length)} bytes, more than MAX_IMAGE_BYTES={limit}")
        chunks: list[bytes] = []
        total = 0
        connection = getattr(response, "connection", None)
        try:
            while True:
                # Each read may wait only what is left of the deadline: a host trickling a byte per IMAGE_TIMEOUT
                # would otherwise stretch the download far past it.
                sock = getattr(connection, "sock", None)
                if sock is not None:
                    sock.settimeout(max(0.05, min(self.settings.image_timeout, deadline - time.monotonic())))
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise ImageError(413, f"{shown}: more than MAX_IMAGE_BYTES={limit} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise ImageError(504, f"{shown}: download too slow (more than {TOTAL_TIMEOUT_FACTOR} x "
                                          f"IMAGE_TIMEOUT={self.settings.image_timeout} s)")
        except ImageError:
            raise
        except BaseException as exc:
            raise _http_error(exc, shown, self.settings.image_timeout, received=total) from None
        log.debug("downloaded %s (%d bytes)", shown, total)
        return b"".join(chunks)


    def _refresh(self, ls: LabelStudio, deadline: float) -> Access:
        url = f"{ls.base}/api/token/refresh/"
        shown = redact_url(url)
        body = json.dumps({"refresh": ls.token}).encode()
        headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json", "Accept": "application/json"}
        response, pool = self._request("POST", url, headers, body, True, deadline)
        try:
            status = response.status
            if status in (401, 403):
                raise ImageError(502, f"Label Studio at {redact_url(ls.base)} refused the personal access token "
                                      f"(PAT) from {ls.source} at {shown} (HTTP {status}): it is invalid, expired "
                                      f"or revoked")
            if status == 404:
                raise ImageError(502, f"Label Studio at {redact_url(ls.base)} has no {shown} (HTTP 404): it is too "
                                      f"old for personal access tokens; use a legacy token")
            if status != 200:
                raise ImageError(502, f"Label Studio at {redact_url(ls.base)} answered HTTP {status} to the "
                                      f"token refresh at {shown}")
            raw = response.read(MAX_TOKEN_RESPONSE + 1, decode_content=True)
        except ImageError:
            raise
        except BaseException as exc:
            raise _http_error(exc, shown, self.settings.image_timeout) from None
        finally:
            response.close()
            pool.close()
        try:
            access = json.loads(raw[:MAX_TOKEN_RESPONSE])["access"]
            if not isinstance(access, str) or not access or any(c.isspace() for c in access):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ImageError(502, f"Label Studio's token refresh at {shown} did not answer {{\"access\": ...}}") \
                from None
        lifetime = ACCESS_TOKEN_LIFETIME
        claims = jwt_claims(access)
        if claims is not None and isinstance(claims.get("exp"), (int, float)):
            lifetime = max(0.0, float(claims["exp"]) - time.time())
        log.info("refreshed the Label Studio access token for %s (valid %.0f s)", redact_url(ls.base), lifetime)
        return Access(token=access, expires=time.monotonic() + lifetime)


def address_problem(address: str) -> str | None:
    """Why an IP address may not be an image host (e.g. "loopback", "private"), or None if it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "unparseable"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        elif ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        elif ip.teredo is not None:
            embedded.extend(ip.teredo)
        elif ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if embedded:
            for inner in embedded:
                reason = address_problem(str(inner))
                if reason is not None:
                    return reason
            return None
    for name in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    if not ip.is_global:
        return "non-public"
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _refuse_forbidden_peer(address: str) -> None:
    reason = address_problem(address)
    if reason is not None:
        raise _ForbiddenPeer(address, reason)


def _host_allowed(host: str, port: int, allowed: tuple[str, ...]) -> bool:
    """`host` matches an ALLOWED_IMAGE_HOSTS entry: `name`, `name:port`, `[v6]`, `[v6]:port` or `*.domain`."""
    host = host.lower()
    for entry in allowed:
        entry = entry.strip().lower().rstrip(".")
        name, entry_port = entry, None
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+):(\d+)", entry)
        if match:
            name = match.group(1) or match.group(3)
            digits = match.group(2) or match.group(4)
            entry_port = int(digits) if digits else None
        if entry_port is not None and entry_port != port:
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def _http_error(exc: BaseException, shown: str, timeout: float, received: int | None = None) -> ImageError:
    """The ImageError for an exception of urllib3 (or of the peer check)."""
    if isinstance(exc, ImageError):
        return exc
    cause: BaseException | None = exc
    while cause is not None:  # the peer check may come wrapped
        if isinstance(cause, _ForbiddenPeer):
            return ImageError(403, f"{shown}: connected to {cause.address}, a {cause.reason} address "
                                   f"(set ALLOW_PRIVATE_IMAGE_HOSTS=true to allow)")
        cause = cause.__cause__ or cause.__context__
    # before the timeouts: urllib3's NewConnectionError derives from ConnectTimeoutError
    if isinstance(exc, NameResolutionError):
        return ImageError(502, f"{shown}: cannot resolve the host")
    if isinstance(exc, NewConnectionError):
        return ImageError(502, f"{shown}: cannot connect ({_short(exc)})")
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, socket.timeout)):
        return ImageError(504, f"{shown}: timed out after {timeout:g} s (IMAGE_TIMEOUT)")
    if isinstance(exc, SSLError):
        return ImageError(502, f"{shown}: TLS error ({_short(exc)})")
    if isinstance(exc, (HTTPError, OSError)):
        got = f" after {received} bytes" if received is not None else ""
        return ImageError(502, f"{shown}: connection failed{got} ({type(exc).__name__})")
    if isinstance(exc, (ValueError, UnicodeError)):
        return ImageError(400, f"{shown}: invalid URL ({type(exc).__name__})")
    if isinstance(exc, Exception):
        return ImageError(502, f"{shown}: request failed ({type(exc).__name__})")
    raise exc  # KeyboardInterrupt, SystemExit


def _short(exc: BaseException) -> str:
    text = str(exc)
    text = re.sub(r"<urllib3[^>]*>: ", "", text)
    return text[:200]


# ---- connections that check their peer ---------------------------------------------------------------------------

class _PeerCheck:
    """Mixin for urllib3 connections: after the TCP connect and before anything is written (TLS included),
    pass the peer's address to `peer_guard`, which raises to refuse it."""

    def __init__(self, *args, peer_guard: Callable[[str], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._peer_guard = peer_guard

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        if self._peer_guard is not None:
            try:
                self._peer_guard(str(sock.getpeername()[0]))
            except BaseException:
                sock.close()
                raise
        return sock


class _GuardedHTTPConnection(_PeerCheck, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_PeerCheck, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection
