"""Reading `/data/local-files/?d=<path>` images straight from LOCAL_FILES_DOCUMENT_ROOT.

The path is relative to the root, as in Label Studio: a leading `/` is ignored; the resolved real path, symlinks
included, must stay inside the root, and the file is opened without following a last symlink. A root of `/` is
not used (`local_root` gives None): such files are fetched through Label Studio instead.

In: the settings (LOCAL_FILES_DOCUMENT_ROOT, MAX_IMAGE_BYTES) and the query of a local-files URL.
Out: the file's bytes.
Raises ImageError: 400 no path or a NUL byte in it; 403 outside the root, not readable or not openable; 404
missing, the root itself or not a regular file; 413 more than MAX_IMAGE_BYTES.
"""
from __future__ import annotations

import logging
import os
import posixpath
import stat
from urllib.parse import parse_qs

from sam_backend.errors import ImageError
from sam_backend.settings import Settings

log = logging.getLogger("sam_backend.images")  # the package's one logger, as before the split


def local_root(settings: Settings) -> str | None:
    root = settings.local_files_root
    if root is None or not str(root):
        return None
    real = os.path.realpath(root)
    if real == os.path.realpath(os.sep):
        return None  # "/" would make every readable file an image source: go through Label Studio
    return real


def read_local(root: str, query: str, shown: str, limit: int) -> bytes:
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
