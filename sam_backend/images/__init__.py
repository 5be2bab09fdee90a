"""Getting a task's image: resolve the reference Label Studio put in the task, download or read it, decode it.

Everything about task images lives here, so that the rules on credentials and reachable hosts are in one place.

What `ImageLoader.fetch` accepts (the value of the task's `<Image value="$key">` field):

* Label Studio media paths, relative (`/data/upload/12/x.jpg`, `/data/local-files/?d=dir/x.jpg`,
  `/storage-data/...`, `/tasks/<id>/presign/?fileuri=...`) or absolute on Label Studio's origin. They are fetched
  from Label Studio with its credentials: LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY when LABEL_STUDIO_URL is set,
  otherwise the `hostname` + `access_token` Label Studio sent in `/setup` (the `fallback`, passed per call).
  The configured LABEL_STUDIO_API_KEY is only ever sent to the configured LABEL_STUDIO_URL, never to a
  hostname that arrived in a request.
* `/data/local-files/?d=<path>` is read from LOCAL_FILES_DOCUMENT_ROOT when that is set (the path is relative to
  the root, as in Label Studio: a leading `/` is ignored; the resolved real path, symlinks included, must stay
  inside the root). A root of `/` is not used for direct reads: such files are fetched through Label Studio.
* Cloud URIs (`s3://`, `gs://`, `azure-blob://`) go through Label Studio's presign endpoint,
  `GET <LS>/tasks/<task_id>/presign/?fileuri=<urlsafe base64 of the URI>`, which answers with a redirect to a
  presigned URL (or with the file itself when the storage proxies).
* Other http(s) URLs are fetched without Label Studio credentials (also after any redirect).

Credentials: a legacy token is sent as `Authorization: Token <t>`. A personal access token (PAT) is a JWT refresh
token (payload `token_type == "refresh"`); it is exchanged at `POST <LS>/api/token/refresh/` for an access token
(lives 5 minutes), sent as `Authorization: Bearer <access>`, cached per (Label Studio URL, PAT) until 30 s before
it expires and refreshed once more when Label Studio answers 401. Credentials go only to Label Studio's origin
(scheme, host and port), only for media paths, and only while a redirect chain has not left Label Studio.

Reachable hosts (server-side request forgery): a target is allowed when it is Label Studio's origin, or when
ALLOWED_IMAGE_HOSTS is empty or names its host. Targets resolving to a loopback, private, link-local, shared,
multicast, reserved or unspecified address (IPv4 or IPv6, also IPv4-mapped, 6to4, Teredo and NAT64 forms) are
refused unless they are Label Studio's origin or ALLOW_PRIVATE_IMAGE_HOSTS is true. The check is done twice:
before connecting, on every address the host name resolves to (so nothing is sent to a refused address), and
on the peer address of the socket actually connected, before a byte of the request is written (so a name that
resolves differently the second time -- DNS rebinding -- cannot slip through). Redirects are followed here,
at most 5, and every hop is checked the same way. Environment proxies are not used (the check must see the
real target).

Limits: IMAGE_TIMEOUT is the connect timeout and the timeout of every read; one `fetch` as a whole (redirects,
token refresh and body included) must finish within 3 x IMAGE_TIMEOUT. Bodies larger than MAX_IMAGE_BYTES are
refused (from Content-Length up front, and while streaming).

Status codes of `ImageError` (for the backend's own client, i.e. Label Studio):
400 the reference is malformed or unsupported (data: URIs, unknown schemes, no task id for a cloud URI, a
relative path but no Label Studio known); 403 the target is forbidden (private address, host not allowed, path
outside the local files root, file not readable); 404 the image does not exist (upstream 404/410, missing local
file); 413 too large (bytes or pixels); 415 not an image or an unsupported format; 422 a truncated or corrupt
image; 502 an upstream failure -- including Label Studio refusing our credentials (401/403): that is not the
caller's fault, so it is reported as a bad gateway with the kind of token that was refused; 504 an upstream
timeout; 500 the backend's own configuration (LABEL_STUDIO_URL) is invalid.

Messages never contain credentials: URLs in messages and logs have their userinfo and query values removed
(except the harmless `d`, `fileuri` and `filepath`), and tokens are never logged.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import json
import logging
import os
import posixpath
import re
import socket
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Literal
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationValueError, NameResolutionError,
                                NewConnectionError, ReadTimeoutError, SSLError)

from sam_backend.errors import ImageError
from sam_backend.settings import Settings

try:  # requests depends on certifi, so it is normally there; otherwise the system's CA store is used
    import certifi
    _CA_CERTS: str | None = certifi.where()
except ImportError:  # pragma: no cover
    _CA_CERTS = None

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
TOTAL_TIMEOUT_FACTOR = 3  # a whole fetch may take this many IMAGE_TIMEOUTs
ACCESS_TOKEN_LIFETIME = 300.0  # seconds, when the access token carries no `exp`
ACCESS_TOKEN_MARGIN = 30.0  # refresh this long before the access token expires
TOKEN_CACHE_SIZE = 64  # (Label Studio, PAT) pairs
CHUNK = 64 << 10
MAX_TOKEN_RESPONSE = 64 << 10
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
SAFE_QUERY_KEYS = frozenset({"d", "fileuri", "filepath"})
USER_AGENT = "label-studio-sam-backend"
#: paths (after Label Studio's base path) that serve task media and get credentials
MEDIA_PATH = re.compile(r"/(?:data/|storage-data/|(?:tasks|projects)/\d+/(?:presign|resolve)/?$)")
LOCAL_FILES_PATH = re.compile(r"/data/local-files/?$")
#: formats decode() accepts; Pillow's other plugins (many rarely used, some fragile) are not exposed
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "AVIF")  # JPEG includes MPO (multi-picture JPEG)
#: leading bytes of those formats: data starting so that Pillow cannot read is corrupt (422), not foreign (415)
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

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
class _LabelStudio:
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
class _Access:
    token: str = field(repr=False)
    expires: float  # time.monotonic() seconds


class _ForbiddenPeer(Exception):
    """The socket connected to an address the target may not have (raised before the request is written)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"{address} is {reason}")
        self.address = address
        self.reason = reason


# ---- public API ------------------------------------------------------------------------------------------------

class ImageLoader:
    """Fetches task images (bytes) and decodes them (RGB arrays). Thread-safe.

    Its only state is the cache of Label Studio access tokens obtained from PATs, guarded by a lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._tokens: OrderedDict[tuple[str, str], _Access] = OrderedDict()
        self._refresh_locks: dict[tuple[str, str], threading.Lock] = {}

    # ---- fetch --------------------------------------------------------------------------------------------------
    def fetch(self, url: str, fallback: LabelStudioAccess | None = None, task_id: int | None = None) -> bytes:
        """The bytes of the image `url` refers to (at most settings.max_image_bytes of them).

        `url`: the task's image reference (see the module docstring); `fallback`: the Label Studio that sent
        `/setup` for this project, used when LABEL_STUDIO_URL is unset; `task_id`: the task's id, needed for
        cloud URIs (`s3://`, `gs://`, `azure-blob://`). Raises ImageError.
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageError(400, "the task's image URL is empty")
        url = url.strip()
        deadline = time.monotonic() + TOTAL_TIMEOUT_FACTOR * self.settings.image_timeout
        ls, ls_problem = self._label_studio(fallback)
        scheme = url.split(":", 1)[0].lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url) else ""
        shown = redact_url(url)
        log.debug("fetching image %s", shown)

        if scheme in CLOUD_SCHEMES:
            return self._fetch_cloud(url, ls or ls_problem, task_id, deadline)
        if scheme == "data":
            raise ImageError(400, "data: URIs are not supported as task images; upload the image to Label Studio")
        if not scheme:
            if not url.startswith("/") or url.startswith("//"):
                raise ImageError(400, f"image URL {shown} is neither absolute nor a Label Studio path (/data/...)")
            return self._fetch_label_studio_path(url, ls or ls_problem, deadline)
        if scheme not in ("http", "https"):
            raise ImageError(400, f"image URL {shown}: the {scheme}: scheme is not supported")
        origin = _origin(url)
        if origin is None:
            raise ImageError(400, f"image URL {shown} has no valid host")
        if ls is not None and origin == ls.origin:
            parts = urlsplit(url)
            if parts.path.startswith(ls.path + "/") and MEDIA_PATH.match(parts.path[len(ls.path):]):
                relative = parts.path[len(ls.path):] + (f"?{parts.query}" if parts.query else "")
                return self._fetch_label_studio_path(relative, ls, deadline)
        return self._download(url, ls, credentials=False, deadline=deadline)

    def _fetch_label_studio_path(self, path: str, ls: _LabelStudio | ImageError | None, deadline: float) -> bytes:
        """`path`: relative to Label Studio's base URL, starting with `/`; `ls`: the Label Studio, or why there is
        none usable."""
        shown = redact_url(path)
        parts = urlsplit(path)
        if not MEDIA_PATH.match(parts.path):
            raise ImageError(400, f"image URL {shown} is not a Label Studio media path "
                                  f"(/data/..., /storage-data/..., /tasks/<id>/presign/...)")
        if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
            raise ImageError(400, f"image URL {shown} has . or .. segments")
        if LOCAL_FILES_PATH.match(parts.path):
            root = self._local_root()
            if root is not None:
                return self._read_local(root, parts.query, shown)
        if isinstance(ls, ImageError):
            raise ls
        if ls is None:
            raise ImageError(400, f"image URL {shown} is relative to Label Studio, but no Label Studio is known: "
                                  f"set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) or connect the model in "
                                  f"Label Studio")
        return self._download(ls.base + path, ls, credentials=True, deadline=deadline)

    def _fetch_cloud(self, uri: str, ls: _LabelStudio | ImageError | None, task_id: int | None,
                     deadline: float) -> bytes:
        shown = redact_url(uri)
        if not re.match(r"[A-Za-z0-9-]+://[^/\s]+/\S", uri):
            raise ImageError(400, f"cloud storage URI {shown} must look like scheme://bucket/key")
        if isinstance(task_id, str) and task_id.isdigit():
            task_id = int(task_id)
        if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id < 0:
            raise ImageError(400, f"cloud storage URI {shown} needs the task's id (task.id) to be presigned by "
                                  f"Label Studio")
        if isinstance(ls, ImageError):
            raise ls
        if ls is None:
            raise ImageError(400, f"cloud storage URI {shown} can only be fetched through Label Studio, but none "
                                  f"is known: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return self._download(f"{ls.base}/tasks/{task_id}/presign/?fileuri={fileuri}", ls, credentials=True,
                              deadline=deadline)

    def _label_studio(self, fallback: LabelStudioAccess | None) -> tuple[_LabelStudio | None, ImageError | None]:
        """The Label Studio of this fetch: the configured one, else the one from /setup, else None; and, when
        the one that applies has an unusable URL, the error to raise if the image needs Label Studio."""
        s = self.settings
        try:
            if s.label_studio_url:
                token, source = s.label_studio_api_key, "LABEL_STUDIO_API_KEY"
                if not token and fallback is not None and fallback.token:
                    token, source = fallback.token, "the access_token Label Studio sent in /setup"
                return _make_label_studio(s.label_studio_url, token, source, 500, "LABEL_STUDIO_URL"), None
            if fallback is not None and fallback.url:
                return _make_label_studio(fallback.url, fallback.token or "",
                                          "the access_token Label Studio sent in /setup "
                                          "(set LABEL_STUDIO_URL to use LABEL_STUDIO_API_KEY)",
                                          400, "the hostname Label Studio sent in /setup"), None
        except ImageError as problem:
            return None, problem
        return None, None

    # ---- local files --------------------------------------------------------------------------------------------
    def _local_root(self) -> str | None:
        root = self.settings.local_files_root
        if root is None or not str(root):
            return None
        real = os.path.realpath(root)
        if real == os.path.realpath(os.sep):
            return None  # "/" would make every readable file an image source: go through Label Studio
        return real

    def _read_local(self, root: str, query: str, shown: str) -> bytes:
        values = parse_qs(query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""  # the last value wins, as in Label Studio
        if not relative:
            raise ImageError(400, f"local files URL {shown} has no path (?d=...)")
        if "\x00" in relative:
            raise ImageError(400, f"local files URL {shown} has a NUL byte in its path")
        # As Label Studio: ?d= is relative to the root, whatever leading slashes it has
        candidate = os.path.join(root, posixpath.normpath(relative).lstrip("/"))
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, root]) != root:
            raise ImageError(403, f"local file {relative!r} resolves outside LOCAL_FILES_DOCUMENT_ROOT")
        if real == root:
            raise ImageError(404, f"local file {relative!r} is the document root, not a file")
        limit = self.settings.max_image_bytes
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise ImageError(404, f"local file {relative!r} does not exist under LOCAL_FILES_DOCUMENT_ROOT") from None
        except PermissionError:
            raise ImageError(403, f"local file {relative!r} is not readable by the backend") from None
        except OSError as exc:  # ELOOP (a symlink swapped in), EISDIR, ...
            raise ImageError(403, f"local file {relative!r} cannot be opened: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ImageError(404, f"local file {relative!r} is not a regular file")
        with os.fdopen(fd, "rb") as handle:
            if info.st_size > limit:
                raise ImageError(413, f"local file {relative!r} has {info.st_size} bytes, more than "
                                      f"MAX_IMAGE_BYTES={limit}")
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ImageError(413, f"local file {relative!r} has more than MAX_IMAGE_BYTES={limit} bytes")
        log.debug("read local file %r (%d bytes)", relative, len(data))
        return data

    # ---- HTTP ---------------------------------------------------------------------------------------------------
    def _download(self, url: str, ls: _LabelStudio | None, credentials: bool, deadline: float) -> bytes:
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
            on_ls = ls is not None and _origin(current) == ls.origin
            left = left or not on_ls
            credentials = credentials and not left
            private_ok = self._check_target(current, on_ls)
            headers = {"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
            sent: TokenKind = "none"
            if credentials and ls is not None and ls.token:
                sent = ls.kind
                headers["Authorization"] = self._authorization(ls, deadline)
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
                    self._invalidate(ls, headers["Authorization"].split(" ", 1)[1])
                    continue
                if status in (401, 403) and on_ls:
                    raise ImageError(502, _refusal_message(ls, sent, status, shown, left))
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
        try:
            while True:
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

    # ---- Label Studio tokens ------------------------------------------------------------------------------------
    def _authorization(self, ls: _LabelStudio, deadline: float) -> str:
        kind = ls.kind
        if kind == "legacy":
            return f"Token {ls.token}"
        if kind == "access":
            return f"Bearer {ls.token}"
        return f"Bearer {self._access_token(ls, deadline)}"

    def _token_key(self, ls: _LabelStudio) -> tuple[str, str]:
        return ls.base, hashlib.sha256(ls.token.encode()).hexdigest()

    def _invalidate(self, ls: _LabelStudio, access: str) -> None:
        key = self._token_key(ls)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.token == access:
                del self._tokens[key]

    def _access_token(self, ls: _LabelStudio, deadline: float) -> str:
        """A valid access token for the PAT of `ls`: cached, or refreshed (one refresh at a time per PAT)."""
        key = self._token_key(ls)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and time.monotonic() < cached.expires - ACCESS_TOKEN_MARGIN:
                return cached.token
            refresh_lock = self._refresh_locks.get(key)
            if refresh_lock is None:
                if len(self._refresh_locks) >= 2 * TOKEN_CACHE_SIZE:  # forget idle locks of refreshes that failed
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
                self._tokens[key] = access
                self._tokens.move_to_end(key)
                while len(self._tokens) > TOKEN_CACHE_SIZE:
                    old, _ = self._tokens.popitem(last=False)
                    self._refresh_locks.pop(old, None)
            return access.token

    def _refresh(self, ls: _LabelStudio, deadline: float) -> _Access:
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
        return _Access(token=access, expires=time.monotonic() + lifetime)

    # ---- decode -------------------------------------------------------------------------------------------------
    @staticmethod
    def decode(data: bytes, max_pixels: int) -> np.ndarray:
        """Decode image bytes into a C-contiguous (H, W, 3) uint8 RGB array, H x W as displayed.

        EXIF orientation is applied (so H and W are those the Label Studio editor shows); animated images and
        multi-page TIFFs give their first frame; grayscale, palette, CMYK, YCbCr and bilevel images are converted
        to RGB; 16-bit samples are scaled to 8 bits (v * 255 / 65535, rounded); an alpha channel is dropped (the
        stored colours are kept, as cv2.imread does for SAM), not composited. Images with more than `max_pixels`
        pixels are refused from their header, before their pixels are decoded.
        Raises ImageError: 415 not an image (or a format outside JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF),
        422 truncated or corrupt, 413 too many pixels.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise ImageError(415, "the image is empty (0 bytes)")
        data = bytes(data)
        try:
            Image.init()  # registers every plugin once; after that a no-op
            image = Image.open(io.BytesIO(data), formats=[name for name in FORMATS if name in Image.OPEN])
        except Image.DecompressionBombError as exc:
            raise ImageError(413, f"the image has too many pixels ({exc}); MAX_IMAGE_PIXELS={max_pixels}") \
                from None
        except UnidentifiedImageError:
            if data.startswith(MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
                raise ImageError(422, "the image is corrupt (its header cannot be read)") from None
            raise ImageError(415, f"not an image in a supported format ({', '.join(FORMATS)})") from None
        except Exception as exc:  # Pillow plugins raise many kinds on malformed headers
            raise ImageError(422, f"the image is corrupt: {type(exc).__name__}: {exc}") from None
        with image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(422, f"the image has zero size ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(413, f"the image has {width}x{height} = {width * height} pixels, more than "
                                      f"MAX_IMAGE_PIXELS={max_pixels}")
            try:
                image.seek(0)
                image.load()
                rgb = _to_rgb(_oriented(image))
            except Image.DecompressionBombError as exc:
                raise ImageError(413, f"the image has too many pixels ({exc}); MAX_IMAGE_PIXELS={max_pixels}") \
                    from None
            except MemoryError:
                raise ImageError(413, f"the image ({width}x{height}) does not fit in memory") from None
            except ImageError:
                raise
            except Exception as exc:
                raise ImageError(422, f"the {image.format or ''} image is truncated or corrupt: "
                                      f"{type(exc).__name__}: {exc}".replace("  ", " ")) from None
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] * rgb.shape[1] > max_pixels:
            raise ImageError(422, f"the image decoded to an unexpected shape {rgb.shape}")
        return np.ascontiguousarray(rgb, dtype=np.uint8)


# ---- helpers ---------------------------------------------------------------------------------------------------

def _oriented(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says; as is when the EXIF data cannot be read."""
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block: keep the pixels, lose the orientation
        log.debug("ignoring unreadable EXIF data: %s: %s", type(exc).__name__, exc)
        return image
    return oriented if oriented is not None else image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded image in any mode Pillow gives for the accepted formats."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as exc:
            raise ImageError(415, f"unsupported pixel format {mode}: {exc}") from None
    return np.array(image, dtype=np.uint8)


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


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, default ports filled in; None if it has none."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port
    except ValueError:
        return None
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower().rstrip("."), port or (443 if scheme == "https" else 80)


def _make_label_studio(url: str, token: str, source: str, status: int, what: str) -> _LabelStudio:
    origin = _origin(url.strip())
    parts = urlsplit(url.strip())
    if origin is None or parts.query or parts.fragment or parts.username is not None:
        raise ImageError(status, f"{what} ({redact_url(url)}) must be an http(s) URL like http://host:8080")
    path = parts.path.rstrip("/")
    base = f"{parts.scheme.lower()}://{parts.netloc}{path}"
    return _LabelStudio(base=base, origin=origin, path=path, token=token.strip(), source=source)


def _refusal_message(ls: _LabelStudio | None, sent: TokenKind, status: int, shown: str, left: bool) -> str:
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
