"""Getting a task's image: resolve the reference Label Studio put in the task, download or read it, decode it.

Everything about task images lives in this package, so that the rules on credentials and reachable hosts are in
one place. `ImageLoader.fetch` dispatches; the modules do the work:

* references.py -- what a reference means, and which Label Studio applies;
* credentials.py -- token kinds, PAT -> access token cache;
* transport.py -- reachable hosts (SSRF checks), guarded connections, redirects, body and time limits;
* local_files.py -- reads from LOCAL_FILES_DOCUMENT_ROOT;
* decode.py -- bytes -> (H, W, 3) uint8 RGB;
* redact.py -- URLs fit for messages and logs.

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

import logging
import time

from sam_backend.errors import ImageError
from sam_backend.images.credentials import LabelStudio, LabelStudioAccess
from sam_backend.images.decode import decode as decode_reduced
from sam_backend.images.decode import decode_image
from sam_backend.images.local_files import local_root, read_local
from sam_backend.images.redact import redact_url
from sam_backend.images.references import (CLOUD_SCHEMES, LOCAL_FILES_PATH, NoLabelStudio, label_studio_media_path,
                                           media_parts, origin_of, presign_path, require, resolve_label_studio,
                                           scheme_of)
from sam_backend.images.transport import TOTAL_TIMEOUT_FACTOR, Transport
from sam_backend.settings import Settings

log = logging.getLogger(__name__)


class ImageLoader:
    """Fetches task images (bytes) and decodes them (RGB arrays). Thread-safe.

    Its only state is the cache of Label Studio access tokens obtained from PATs, guarded by a lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._transport = Transport(settings)

    #: bytes -> the whole (H, W, 3) uint8 RGB array (decode.decode_image)
    decode = staticmethod(decode_image)
    #: bytes -> DecodedImage: pixels reduced for the encoder when large, and the size as displayed (decode.decode)
    decode_for_encoder = staticmethod(decode_reduced)

    def fetch(self, url: str, fallback: LabelStudioAccess | None = None, task_id: int | None = None) -> bytes:
        """The bytes of the image `url` refers to (at most settings.max_image_bytes of them).

        `url`: the task's image reference (see the module docstring); `fallback`: the Label Studio that sent
        `/setup` for this project, used when LABEL_STUDIO_URL is unset; `task_id`: the task's id, needed for
        cloud URIs (`s3://`, `gs://`, `azure-blob://`). Raises ImageError.
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageError(400, "the task's image URL is empty")
        url = url.strip()
        if not url.isascii():
            try:
                url.encode("utf-8")
            except UnicodeEncodeError:  # JSON's "\ud800" escapes decode to lone surrogates, which no URL can hold
                raise ImageError(400, "the task's image URL is not valid Unicode text (it holds a lone surrogate "
                                      "code point)") from None
        deadline = time.monotonic() + TOTAL_TIMEOUT_FACTOR * self.settings.image_timeout
        ls = resolve_label_studio(self.settings, fallback)
        scheme = scheme_of(url)
        shown = redact_url(url)
        log.debug("fetching image %s", shown)

        if scheme in CLOUD_SCHEMES:
            path = presign_path(url, task_id)
            known = require(ls, f"cloud storage URI {shown} can only be fetched through Label Studio, but none "
                                f"is known: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            return self._transport.download(known.base + path, known, credentials=True, deadline=deadline)
        if scheme == "data":
            raise ImageError(400, "data: URIs are not supported as task images; upload the image to Label Studio")
        if not scheme:
            if not url.startswith("/") or url.startswith("//"):
                raise ImageError(400, f"image URL {shown} is neither absolute nor a Label Studio path (/data/...)")
            return self._fetch_label_studio_path(url, ls, deadline)
        if scheme not in ("http", "https"):
            raise ImageError(400, f"image URL {shown}: the {scheme}: scheme is not supported")
        if origin_of(url) is None:
            raise ImageError(400, f"image URL {shown} has no valid host")
        relative = label_studio_media_path(url, ls)
        if relative is not None:
            return self._fetch_label_studio_path(relative, ls, deadline)
        return self._transport.download(url, ls if isinstance(ls, LabelStudio) else None, credentials=False,
                                        deadline=deadline)

    def _fetch_label_studio_path(self, path: str, ls: LabelStudio | NoLabelStudio, deadline: float) -> bytes:
        """`path`: relative to Label Studio's base URL, starting with `/`; `ls`: the Label Studio, or why there is
        none usable."""
        shown = redact_url(path)
        parts = media_parts(path)
        if LOCAL_FILES_PATH.match(parts.path):
            root = local_root(self.settings)
            if root is not None:
                return read_local(root, parts.query, shown, self.settings.max_image_bytes)
        known = require(ls, f"image URL {shown} is relative to Label Studio, but no Label Studio is known: "
                            f"set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) or connect the model in "
                            f"Label Studio")
        return self._transport.download(known.base + path, known, credentials=True, deadline=deadline)
