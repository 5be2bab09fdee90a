"""What a task's image reference means, and which Label Studio serves it.

In: the reference (a Label Studio media path, relative or absolute on Label Studio's origin; a local-files path;
a cloud URI to presign; a plain http(s) URL), the settings (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY) and the Label
Studio that sent `/setup`.
Out: `resolve_label_studio` -> the `LabelStudio` of a fetch, or a `NoLabelStudio` saying why there is none
(`require` raises that when an image needs one); `scheme_of`, `origin_of`; `media_parts` (a relative media path,
checked), `label_studio_media_path` (an absolute URL that is a media path of that Label Studio, made relative),
`presign_path` (the presign request for a cloud URI); the patterns telling media paths (they get credentials)
and local files apart.
Raises ImageError: 400 for a malformed reference (not a media path, `.`/`..` segments, a cloud URI that is not
scheme://bucket/key or comes without a task id, no Label Studio known); the unusable Label Studio URL's error,
500 for LABEL_STUDIO_URL and 400 for the hostname from `/setup`.
"""
from __future__ import annotations

import base64
import concurrent.futures
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from sam_backend.errors import ImageError
from sam_backend.images.credentials import LabelStudio, LabelStudioAccess
from sam_backend.images.redact import redact_url
from sam_backend.settings import Settings


CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
#: paths (after Label Studio's base path) that serve task media and get credentials
MEDIA_PATH = re.compile(r"/(?:data/|storage-data/|(?:tasks|projects)/\d+/(?:presign|resolve)/?$)")
LOCAL_FILES_PATH = re.compile(r"/data/local-files/?$")


@dataclass(frozen=True)
class NoLabelStudio:
    """No Label Studio usable for a fetch: none is configured or known (`problem` None), or the URL of the one
    that applies is unusable (`problem`: the error to raise when an image needs it)."""

    problem: ImageError | None = None


def resolve_label_studio(settings: Settings, fallback: LabelStudioAccess | None) -> LabelStudio | NoLabelStudio:
    """The Label Studio of this fetch: the configured one, else the one from /setup; else a NoLabelStudio (with,
    when the one that applies has an unusable URL, the error to raise if the image needs Label Studio)."""
    s = settings
    try:
        if s.label_studio_url:
            token, source = s.label_studio_api_key, "LABEL_STUDIO_API_KEY"
            if not token and fallback is not None and fallback.token:
                token, source = fallback.token, "the access_token Label Studio sent in /setup"
            return make_label_studio(s.label_studio_url, token, source, 500, "LABEL_STUDIO_URL")
        if fallback is not None and fallback.url:
            return make_label_studio(fallback.url, fallback.token or "",
                                     "the access_token Label Studio sent in /setup "
                                     "(set LABEL_STUDIO_URL to use LABEL_STUDIO_API_KEY)",
                                     400, "the hostname Label Studio sent in /setup")
    except ImageError as problem:
        return NoLabelStudio(problem)
    return NoLabelStudio()


def require(ls: LabelStudio | NoLabelStudio, missing: str) -> LabelStudio:
    """`ls` when it is usable; else raises why not, or ImageError(400, `missing`) when none is known at all."""
    if isinstance(ls, NoLabelStudio):
        raise ls.problem if ls.problem is not None else ImageError(400, missing)
    return ls


def scheme_of(url: str) -> str:
    """The scheme of `url`, lower case; "" for a path."""
    return url.split(":", 1)[0].lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url) else ""


def media_parts(path: str) -> SplitResult:
    """`path` (relative to Label Studio's base URL, starting with `/`) split, once it is known to be a media
    path without `.` or `..` segments."""
    shown = redact_url(path)
    parts = urlsplit(path)
    if not MEDIA_PATH.match(parts.path):
        raise ImageError(400, f"image URL {shown} is not a Label Studio media path "
                              f"(/data/..., /storage-data/..., /tasks/<id>/presign/...)")
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        raise ImageError(400, f"image URL {shown} has . or .. segments")
    return parts


#: Label Studio's uploads (/data/upload/<project>/<uuid prefix>-<name>): each upload gets a new name, so an
#: upload path never names other content later (local files, cloud keys and other hosts' URLs may)
UPLOAD_PATH = re.compile(r"(?:^|/)data/upload/[^?#]+$")


def is_immutable(url: str) -> bool:
    """Whether `url` (a task's image reference) names content that never changes: a Label Studio upload."""
    try:
        path = urlsplit(url.strip()).path
    except ValueError:
        return False
    return bool(UPLOAD_PATH.search(path))


def names_peer(url: str, peer: str | None, timeout: float = 1.0) -> bool:
    """Whether the host of `url` is the address `peer` (an IP), or resolves to it within `timeout` seconds."""
    if not peer:
        return False
    try:
        host = urlsplit(url.strip()).hostname
        wanted = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if not host:
        return False
    try:
        return _same_address(ipaddress.ip_address(host), wanted)
    except ValueError:
        pass
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM)
    try:
        addresses = {info[4][0] for info in lookup.result(timeout=timeout)}
    except (concurrent.futures.TimeoutError, OSError, UnicodeError):
        return False
    return any(_same_address(ipaddress.ip_address(a.split("%")[0]), wanted) for a in addresses)


def _same_address(a: ipaddress.IPv4Address | ipaddress.IPv6Address,
                  b: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    def plain(x):
        return x.ipv4_mapped or x if isinstance(x, ipaddress.IPv6Address) else x
    a, b = plain(a), plain(b)
    return a == b or (a.is_loopback and b.is_loopback)


#: look-ups for names_peer: a few at a time, each bounded by its caller's timeout
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="setup-dns")


def label_studio_media_path(url: str, ls: LabelStudio | NoLabelStudio) -> str | None:
    """`url` relative to the base URL of `ls` (query kept) when it is a media path of that Label Studio (its
    origin, under its base path); else None."""
    if not isinstance(ls, LabelStudio) or origin_of(url) != ls.origin:
        return None
    parts = urlsplit(url)
    if parts.path.startswith(ls.path + "/") and MEDIA_PATH.match(parts.path[len(ls.path):]):
        return parts.path[len(ls.path):] + (f"?{parts.query}" if parts.query else "")
    return None


def presign_path(uri: str, task_id: int | None) -> str:
    """The path (relative to Label Studio's base URL) that presigns the cloud URI `uri` of task `task_id`."""
    shown = redact_url(uri)
    if not re.match(r"[A-Za-z0-9-]+://[^/\s]+/\S", uri):
        raise ImageError(400, f"cloud storage URI {shown} must look like scheme://bucket/key")
    if isinstance(task_id, str) and task_id.isdigit():
        task_id = int(task_id)
    if not isinstance(task_id, int) or isinstance(task_id, bool) or task_id < 0:
        raise ImageError(400, f"cloud storage URI {shown} needs the task's id (task.id) to be presigned by "
                              f"Label Studio")
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    return f"/tasks/{task_id}/presign/?fileuri={fileuri}"


def origin_of(url: str) -> tuple[str, str, int] | None:
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


def make_label_studio(url: str, token: str, source: str, status: int, what: str) -> LabelStudio:
    origin = origin_of(url.strip())
    parts = urlsplit(url.strip())
    if origin is None or parts.query or parts.fragment or parts.username is not None:
        raise ImageError(status, f"{what} ({redact_url(url)}) must be an http(s) URL like http://host:8080")
    path = parts.path.rstrip("/")
    base = f"{parts.scheme.lower()}://{parts.netloc}{path}"
    return LabelStudio(base=base, origin=origin, path=path, token=token.strip(), source=source)
