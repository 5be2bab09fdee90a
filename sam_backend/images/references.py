"""What a task's image reference means: a Label Studio media path (relative, or absolute on Label Studio's
origin), a local-files path, a cloud URI to presign, or a plain http(s) URL; and which Label Studio applies.

In: the settings (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY) and the Label Studio that sent `/setup`.
Out: `resolve_label_studio` gives the Label Studio of a fetch (`LabelStudio`, or None), or the ImageError to raise
when an image needs it but the URL of the one that applies is unusable (500 for LABEL_STUDIO_URL, 400 for the
hostname from `/setup`); `origin_of` gives an http(s) URL's (scheme, host, port); the patterns say which paths
are media paths (they get credentials) and which are local files.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sam_backend.errors import ImageError
from sam_backend.images.credentials import LabelStudio
from sam_backend.images.redact import redact_url
from sam_backend.settings import Settings

if TYPE_CHECKING:
    from sam_backend.images import LabelStudioAccess

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
#: paths (after Label Studio's base path) that serve task media and get credentials
MEDIA_PATH = re.compile(r"/(?:data/|storage-data/|(?:tasks|projects)/\d+/(?:presign|resolve)/?$)")
LOCAL_FILES_PATH = re.compile(r"/data/local-files/?$")


def resolve_label_studio(settings: Settings, fallback: LabelStudioAccess | None
                         ) -> tuple[LabelStudio | None, ImageError | None]:
    """The Label Studio of this fetch: the configured one, else the one from /setup, else None; and, when
    the one that applies has an unusable URL, the error to raise if the image needs Label Studio."""
    s = settings
    try:
        if s.label_studio_url:
            token, source = s.label_studio_api_key, "LABEL_STUDIO_API_KEY"
            if not token and fallback is not None and fallback.token:
                token, source = fallback.token, "the access_token Label Studio sent in /setup"
            return make_label_studio(s.label_studio_url, token, source, 500, "LABEL_STUDIO_URL"), None
        if fallback is not None and fallback.url:
            return make_label_studio(fallback.url, fallback.token or "",
                                     "the access_token Label Studio sent in /setup "
                                     "(set LABEL_STUDIO_URL to use LABEL_STUDIO_API_KEY)",
                                     400, "the hostname Label Studio sent in /setup"), None
    except ImageError as problem:
        return None, problem
    return None, None


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
