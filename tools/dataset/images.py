"""The task images of a dataset, fetched as the server fetches them.

`sam_backend.images.ImageLoader` with the server's settings (`sam_backend.settings.from_environment`:
LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY, LOCAL_FILES_DOCUMENT_ROOT, ALLOWED_IMAGE_HOSTS, IMAGE_TIMEOUT,
MAX_IMAGE_BYTES, ...): Label Studio uploads and local files with Label Studio's credentials (or read from the
local files root), cloud URIs (s3://, gs://, azure-blob://) presigned by Label Studio for the task, other
http(s) URLs without credentials. Each image is decoded once (the server's `decode_image`: its EXIF orientation
applied) to check that it is an image of the size its regions were drawn on; its bytes are written unchanged.
"""
from __future__ import annotations

import concurrent.futures
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from sam_backend.errors import ImageError
from sam_backend.images import ImageLoader
from sam_backend.images.redact import redact_url

#: file name suffixes training tools take as images (Ultralytics' list, less video)
IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".avif", ".gif"}
SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
                    "WEBP": ".webp", "AVIF": ".avif"}


class FetchError(Exception):
    """Images could not be fetched or are not what their regions say; the message names every such task."""


@dataclass(frozen=True)
class Wanted:
    """One task's image: its task id, its reference in the task, the size its regions give, a file name."""

    task_id: int
    url: str
    width: int
    height: int
    name: str


def unique_names(wanted: Iterable[tuple[int, str]]) -> dict[int, str]:
    """task id -> a safe file name for each (task id, name from its URL): characters outside letters, digits,
    `.`, `-`, `_` become `_`; a name whose stem another task already has (case-insensitively: the YOLO label
    file is named for the stem) gets `<task id>_` in front."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for task_id, name in wanted:
        safe = re.sub(r"[^\w.-]", "_", name).lstrip(".") or f"task{task_id}"
        stem = Path(safe).stem.lower()
        if stem in taken:
            safe = f"{task_id}_{safe}"
            stem = Path(safe).stem.lower()
        taken.add(stem)
        names[task_id] = safe
    return names


def _fetch_one(loader: ImageLoader, want: Wanted, folder: Path) -> str:
    """Fetch, check and write one image; returns the file name written (a suffix added when the name had no
    image suffix). Raises FetchError naming the task."""
    where = f"task {want.task_id} ({redact_url(want.url)})"
    try:
        data = loader.fetch(want.url, None, task_id=want.task_id)
        image = loader.decode(data, loader.settings.max_image_pixels)
    except ImageError as error:
        raise FetchError(f"{where}: {error}") from None
    height, width = image.shape[:2]
    if (width, height) != (want.width, want.height):
        raise FetchError(f"{where}: the image is {width}x{height} but its regions were drawn on "
                         f"{want.width}x{want.height}")
    name = want.name
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        with Image.open(io.BytesIO(data)) as opened:
            name += SUFFIX_OF_FORMAT.get(opened.format or "", ".img")
    (folder / name).write_bytes(data)
    return name


def fetch_all(loader: ImageLoader, wanted: list[Wanted], folder: Path, workers: int = 4,
              progress: bool = True) -> dict[int, str]:
    """Write every wanted image into `folder`; task id -> file name. Fetches `workers` at a time with a progress
    bar on stderr (`progress`); raises FetchError listing every task whose image failed, after trying all."""
    written: dict[int, str] = {}
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_fetch_one, loader, want, folder): want for want in wanted}
        bar = tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="images", unit="image",
                   disable=None if progress else True)  # None: off when stderr is no terminal
        for future in bar:
            try:
                written[futures[future].task_id] = future.result()
            except FetchError as error:
                failures.append(str(error))
    if failures:
        shown = "\n  ".join(sorted(failures)[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        raise FetchError(f"{len(failures)} of {len(wanted)} images could not be used:\n  {shown}{more}")
    return written
