"""Reading `/data/local-files/?d=<path>` images straight from LOCAL_FILES_DOCUMENT_ROOT.

The path is relative to the root, as in Label Studio: a leading `/` is ignored. The file is opened component by
component from the root (`openat`), following no symbolic link on the way: a check of the resolved path before
the open could be raced by a directory swapped for a link to outside the root. So links under the root are
refused (403); the root itself may be a link. The file is opened without blocking, so a FIFO or device under the
root is refused (404, not a regular file) instead of hanging the request. A root of `/` is not used (`local_root`
gives None): such files are fetched through Label Studio instead.

In: the settings (LOCAL_FILES_DOCUMENT_ROOT, MAX_IMAGE_BYTES) and the query of a local-files URL.
Out: the file's bytes.
Raises ImageError: 400 no path or a NUL byte in it; 403 outside the root, not readable or not openable; 404
missing, the root itself or not a regular file; 413 more than MAX_IMAGE_BYTES.
"""
from __future__ import annotations

import errno
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


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_beneath(root: str, parts: list[str], relative: str) -> int:
    """A descriptor of root/parts[0]/.../parts[-1], opened without following any link and without blocking."""
    where = "local file " + repr(relative)
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                opened = os.open(part, _FILE if last else _DIRECTORY, dir_fd=directory)
            except FileNotFoundError:
                raise ImageError(404, f"{where} does not exist under LOCAL_FILES_DOCUMENT_ROOT") from None
            except PermissionError:
                raise ImageError(403, f"{where} is not readable by the backend") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(part, directory)):
                    raise ImageError(403, f"{where}: {'/'.join(parts[: index + 1])} is a symbolic link; links "
                                          f"under LOCAL_FILES_DOCUMENT_ROOT are not followed") from None
                if exc.errno in (errno.ENOTDIR, errno.ENXIO, errno.ENODEV):  # a file on the way; a socket
                    raise ImageError(404, f"{where} is not a regular file") from None
                raise ImageError(403, f"{where} cannot be opened: {exc.strerror}") from None
            os.close(directory)
            directory = opened
            if last:
                result, directory = directory, -1
                return result
    finally:
        if directory >= 0:
            os.close(directory)
    raise AssertionError("unreachable: parts is not empty")


def _is_link(name: str, directory: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=directory).st_mode)
    except OSError:
        return False


def read_local(root: str, query: str, shown: str, limit: int) -> bytes:
    values = parse_qs(query, keep_blank_values=True).get("d")
    relative = values[-1] if values else ""  # the last value wins, as in Label Studio
    if not relative:
        raise ImageError(400, f"local files URL {shown} has no path (?d=...)")
    if "\x00" in relative:
        raise ImageError(400, f"local files URL {shown} has a NUL byte in its path")
    # As Label Studio: ?d= is relative to the root, whatever leading slashes it has
    normal = posixpath.normpath(relative).lstrip("/")
    parts = [part for part in normal.split("/") if part not in ("", ".")]
    if parts and parts[0] == "..":
        raise ImageError(403, f"local file {relative!r} resolves outside LOCAL_FILES_DOCUMENT_ROOT")
    if not parts:
        raise ImageError(404, f"local file {relative!r} is the document root, not a file")
    fd = _open_beneath(root, parts, relative)
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
