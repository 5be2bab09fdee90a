"""The whole dataset folder, complete or not at all.

Everything is written into a temporary folder beside the target (`.<name>.partial-*`), which is renamed to the
target only when every image was fetched and every file written; on any failure (an image that cannot be
fetched, nothing to export, an interrupt) the temporary folder is removed and the target left as it was.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sam_backend.encoding.yolo import EXPORT_TOLERANCE
from sam_backend.images import ImageLoader
from tools.dataset import mmdet_config, yolo_labels
from tools.dataset.images import Wanted, fetch_all, unique_names


class DatasetError(Exception):
    """The dataset cannot be written; nothing was."""


@dataclass(frozen=True)
class Options:
    yolo: bool = False
    mmdet_config: bool = False
    tolerance: float = EXPORT_TOLERANCE  # pixels, YOLO polygons of masks
    min_area: int = 16  # pixels, YOLO polygons of masks
    workers: int = 4
    progress: bool = True
    force: bool = False  # replace an existing target folder


@dataclass(frozen=True)
class Written:
    folder: Path
    classes: list[str]
    images: int
    annotations: int
    yolo_lines: int


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not (target.is_dir() and not any(target.iterdir())) and not force:
        raise DatasetError(f"{target} exists and is not an empty folder (remove it, choose another, or --force)")
    if not target.parent.is_dir():
        raise DatasetError(f"{target.parent} is not a folder")


def write_dataset(coco: dict, target: Path, loader: ImageLoader, options: Options, notes: list[str]) -> Written:
    """Write the dataset of `coco` (tools.export_coco.convert's dict; its images' coco_url are the task image
    references) to the folder `target`. Images without annotations are left out (a line in `notes`). Raises
    DatasetError (with nothing written) when no image has an annotation, an image cannot be fetched, or the
    target is taken."""
    target = target.absolute()
    _check_target(target, options.force)
    annotated = {a["image_id"] for a in coco["annotations"]}
    empty = [image["id"] for image in coco["images"] if image["id"] not in annotated]
    if empty:
        notes.append(f"tasks {', '.join(map(str, empty))}: no object left to export: their images are left out")
    images = [image for image in coco["images"] if image["id"] in annotated]
    if not images:
        raise DatasetError("no task has an object to export (brush or polygon regions with a label and pixels): "
                           "no dataset written")
    names = unique_names((image["id"], image["file_name"]) for image in images)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        (temporary / "images").mkdir()
        (temporary / "annotations").mkdir()
        wanted = [Wanted(image["id"], image["coco_url"], image["width"], image["height"], names[image["id"]])
                  for image in images]
        written = fetch_all(loader, wanted, temporary / "images", options.workers, options.progress)
        dataset = dict(coco, images=[dict(image, file_name=written[image["id"]]) for image in images])
        (temporary / "annotations" / "ann.json").write_text(json.dumps(dataset))
        classes = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        (temporary / "classes.txt").write_text("".join(name + "\n" for name in classes))
        lines = 0
        if options.yolo:
            lines = yolo_labels.write(dataset, temporary, options.tolerance, options.min_area, notes)
        if options.mmdet_config:
            (temporary / mmdet_config.FILE_NAME).write_text(mmdet_config.render(classes, target))
        _move_into_place(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return Written(target, classes, len(images), len(coco["annotations"]), lines)


def _move_into_place(temporary: Path, target: Path) -> None:
    """Rename `temporary` to `target`; an existing target (allowed by --force or empty) is moved aside first
    and removed once the new folder is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / "previous")
    try:
        temporary.rename(target)
    except OSError:
        if old is not None:
            (old / "previous").rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
