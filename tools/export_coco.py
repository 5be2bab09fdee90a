"""Label Studio JSON export -> COCO instance segmentation JSON, brush masks as COCO compressed RLE.

    python -m tools.export_coco export.json -o coco.json [--polygons polygon|rle] [--predictions] [--latest]
                          [--image-key image] [--alpha-threshold 128] [--masks rle|polygon]
    python -m tools.export_coco export.json --dataset FOLDER [--yolo] [--mmdet-config] [same options]

`--dataset` writes a training set instead of one file (tools/dataset/: annotations/ann.json, images/ fetched
with the server's image settings and credentials from the environment, classes.txt; labels/ + data.yaml with
`--yolo`; mask_rcnn_config.py with `--mmdet-config`), complete or not at all, and prints the class list in
category-id order. `--masks polygon` stores brush masks as COCO polygons, one per part with its holes joined in
(`--tolerance`, `--min-area`; sam_backend/encoding/yolo.py says what that loses). Brush masks without a pixel at
the alpha threshold are left out; messages on stderr name the tasks left out and those with several
annotations.

Input: what Label Studio's "Export -> JSON" gives, a list of tasks, each with `data` (the image URL under
`--image-key`, default: `image`, else the task's only string value) and `annotations[].result` holding
`brushlabels` regions (Label Studio brush RLE, decoded with rle.py) and `polygonlabels` regions (points in
percent of the image). Other region types (keypoints, rectangles, choices...) are counted and skipped.
`--predictions` reads `predictions[].result` instead (e.g. what this backend pre-annotated, with scores).

Output (COCO, https://cocodataset.org/#format-data):

* images: id = the task id, width / height from the regions' original_width / original_height, file_name =
  the last path segment of the image URL (`coco_url` keeps the whole value). A task without regions gets
  an image entry only when its size is known, which it is not from the export alone, so it is left out;
* categories: every brush and polygon label, sorted by name, ids from 1;
* annotations: one per region (a brush region is one instance even when its mask has several parts),
  iscrowd 0, bbox [x, y, w, h] and area in pixels; with --predictions the region's (else the
  prediction's) score is kept as `score` (annotations are ground truth: an accepted suggestion's score is
  dropped).
  - brush: segmentation = {"size": [h, w], "counts": "..."}, COCO compressed RLE (column-major runs,
    starting with background, as pycocotools' `encode` writes it) of the pixels whose alpha is at least
    --alpha-threshold (this backend writes 0 / 255; strokes painted in the browser may have soft edges);
    area = pixel count, bbox = the pixels' tight box;
  - polygon: with --polygons polygon (default) segmentation = [[x1, y1, x2, y2, ...]] in pixels (exact),
    area by the shoelace formula, bbox from the points; with --polygons rle the polygon is rasterised
    (pixel centres inside, as outlines.rasterise) and stored like a brush mask.

Several annotations of one task are all exported (each annotator's objects) unless --latest keeps only the
task's last one; cancelled (skipped) annotations are left out.

Compressed RLE is sam_backend/encoding/coco.py's (`rle_encode` / `rle_decode`), so pycocotools is not needed;
tests/unit/test_coco.py checks it against pycocotools when that is installed.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from sam_backend.encoding import outlines, rle, yolo
from sam_backend.encoding.coco import rle_encode
from sam_backend.images import ImageLoader
from sam_backend.settings import from_environment
from tools.dataset.folder import DatasetError, Options, Written, write_dataset
from tools.dataset.images import FetchError

SEGMENT_TYPES = ("brushlabels", "polygonlabels")


def _mask_bbox(mask: np.ndarray) -> list[int]:
    box = outlines.bounding_box(mask)
    if box is None:
        return [0, 0, 0, 0]
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


# ---- Label Studio export -> COCO ---------------------------------------------------------------------
class ExportError(ValueError):
    """The input is not a Label Studio JSON export this converter understands."""


def _image_value(task: Mapping, image_key: str | None) -> str:
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise ExportError(f"task {task.get('id')}: no data object")
    if image_key is not None:
        value = data.get(image_key)
    else:
        value = data.get("image")
        if value is None:
            strings = [v for v in data.values() if isinstance(v, str)]
            value = strings[0] if len(strings) == 1 else None
    if not isinstance(value, str) or not value:
        raise ExportError(f"task {task.get('id')}: data has no image URL (name its key with --image-key)")
    return value


def _file_name(url: str) -> str:
    """The last path segment of the image's URL: of the `d` parameter for a Label Studio local file
    (`/data/local-files/?d=dir/x.jpg`), of the URI in `fileuri` for a presign URL."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    query = parse_qs(parts.query)
    if query.get("d") and path.rstrip("/").endswith("/data/local-files"):
        path = query["d"][0]
    elif query.get("fileuri") and "/presign" in path:
        try:
            text = query["fileuri"][0]
            path = urlsplit(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()).path
        except (ValueError, UnicodeDecodeError):
            pass
    return path.rstrip("/").rsplit("/", 1)[-1] or url


def _entries(task: Mapping, predictions: bool) -> list[Mapping]:
    key = "predictions" if predictions else "annotations"
    return [e for e in task.get(key) or [] if isinstance(e, Mapping) and not e.get("was_cancelled")]


def _regions(task: Mapping, predictions: bool, latest: bool) -> list[dict]:
    entries = _entries(task, predictions)
    if latest and entries:
        entries = entries[-1:]
    regions = []
    for entry in entries:
        for region in entry.get("result") or []:
            if isinstance(region, Mapping):
                score = region.get("score", entry.get("score")) if predictions else None
                regions.append({**region, "_score": score})
    return regions


def _polygon_pixels(value: Mapping, width: int, height: int) -> np.ndarray:
    points = np.asarray(value.get("points") or [], np.float64).reshape(-1, 2)
    return points * np.array([width / 100.0, height / 100.0])


def convert(tasks: list, *, polygons: str = "polygon", predictions: bool = False, latest: bool = False,
            image_key: str | None = None, alpha_threshold: int = 128, masks: str = "rle",
            tolerance: float = yolo.EXPORT_TOLERANCE, min_area: int = outlines.DEFAULT_MIN_AREA,
            notes: list[str] | None = None) -> tuple[dict, Counter]:
    """COCO dict and a Counter of what was exported and skipped.

    `masks`: brush masks as COCO compressed RLE ("rle", exact) or as polygons ("polygon": one per part, holes
    joined in by zero-width bridges, simplified at `tolerance` pixels, parts and holes under `min_area` pixels
    dropped; sam_backend/encoding/yolo.py). `notes`, when given, gets one line per task worth a word (several
    annotations, no segmentation region, a region left out and why).
    """
    if not isinstance(tasks, list):
        raise ExportError("a Label Studio JSON export is a list of tasks")
    if polygons not in ("polygon", "rle"):
        raise ExportError(f"polygons must be 'polygon' or 'rle', not {polygons!r}")
    if masks not in ("polygon", "rle"):
        raise ExportError(f"masks must be 'polygon' or 'rle', not {masks!r}")
    notes = [] if notes is None else notes
    stats: Counter = Counter()
    images, annotations, found = [], [], []
    labels: set[str] = set()
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise ExportError(f"task {index} is not an object")
        task_id = task.get("id") if isinstance(task.get("id"), int) else index + 1
        url = _image_value(task, image_key)
        entries = _entries(task, predictions)
        if len(entries) > 1 and not latest:
            notes.append(f"task {task_id}: {len(entries)} {'predictions' if predictions else 'annotations'} "
                         f"(several annotators?): the objects of all of them are exported; --latest keeps the "
                         f"last one")
        size = None
        for region in _regions(task, predictions, latest):
            kind = region.get("type")
            value = region.get("value")
            if kind not in SEGMENT_TYPES or not isinstance(value, Mapping):
                stats[f"skipped {kind}"] += 1
                continue
            names = value.get(kind) or []
            if not names:
                stats[f"skipped {kind} without a label"] += 1
                continue
            width, height = int(region["original_width"]), int(region["original_height"])
            if size is not None and size != (width, height):
                raise ExportError(f"task {task_id}: regions disagree on the image size ({size} vs {width}x{height})")
            size = (width, height)
            labels.add(names[0])
            found.append((task_id, names[0], kind, value, width, height, region["_score"]))
        if size is None:
            stats["images left out (no segmentation region, size unknown)"] += 1
            notes.append(f"task {task_id}: no brush or polygon region with a label: left out")
            continue
        images.append({"id": task_id, "file_name": _file_name(url), "coco_url": url, "width": size[0],
                       "height": size[1]})
    categories = [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(sorted(labels), 1)]
    category_ids = {c["name"]: c["id"] for c in categories}
    for task_id, name, kind, value, width, height, score in found:
        annotation = {"id": len(annotations) + 1, "image_id": task_id, "category_id": category_ids[name],
                      "iscrowd": 0}
        if kind == "brushlabels":
            alpha = rle.decode(value["rle"], height, width)
            mask = alpha >= alpha_threshold
            if not mask.any():
                stats["skipped empty brushlabels"] += 1
                notes.append(f"task {task_id}: a {name} brush mask has no pixel with alpha >= {alpha_threshold}: "
                             f"left out")
                continue
            segmentation: dict | list = rle_encode(mask)
            if masks == "polygon":
                segmentation = [[round(float(v), 3) for v in ring.ravel()]
                                for ring in yolo.mask_rings(mask, tolerance, min_area)]
                if not segmentation:
                    stats["skipped brushlabels smaller than --min-area"] += 1
                    notes.append(f"task {task_id}: a {name} brush mask has no part of {min_area} pixels or more, "
                                 f"so no polygon: left out")
                    continue
            annotation.update(segmentation=segmentation, area=int(mask.sum()), bbox=_mask_bbox(mask))
        else:
            points = _polygon_pixels(value, width, height)
            if len(points) < 3:
                stats["skipped polygonlabels with fewer than 3 points"] += 1
                notes.append(f"task {task_id}: a {name} polygon has fewer than 3 points: left out")
                continue
            if polygons == "rle":
                mask = outlines.rasterise([points], height, width)
                annotation.update(segmentation=rle_encode(mask), area=int(mask.sum()), bbox=_mask_bbox(mask))
            else:
                x, y = points[:, 0], points[:, 1]
                area = outlines.pixel_area(points)
                annotation.update(segmentation=[[round(float(v), 3) for v in points.ravel()]], area=round(area, 3),
                                  bbox=[round(float(v), 3) for v in (x.min(), y.min(), x.max() - x.min(),
                                                                      y.max() - y.min())])
        if score is not None:
            annotation["score"] = score
        annotations.append(annotation)
        stats[kind] += 1
    coco = {
        "info": {"description": "Label Studio export converted by export_coco.py",
                 "date_created": datetime.now(UTC).isoformat(timespec="seconds")},
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }
    return coco, stats


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="Label Studio JSON export (a list of tasks)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", type=Path, help="COCO JSON to write")
    target.add_argument("--dataset", type=Path, metavar="FOLDER",
                        help="write a dataset folder: annotations/ann.json, images/, classes.txt")
    parser.add_argument("--polygons", choices=("polygon", "rle"), default="polygon",
                        help="keep polygons as COCO polygons (default) or rasterise them to RLE")
    parser.add_argument("--masks", choices=("rle", "polygon"), default="rle",
                        help="brush masks as COCO compressed RLE (default, exact) or polygons")
    parser.add_argument("--predictions", action="store_true", help="export predictions instead of annotations")
    parser.add_argument("--latest", action="store_true", help="only each task's last annotation")
    parser.add_argument("--image-key", default=None, help="task data key of the image (default: image)")
    parser.add_argument("--alpha-threshold", type=int, default=128, help="brush alpha counted as the object")
    parser.add_argument("--tolerance", type=float, default=yolo.EXPORT_TOLERANCE,
                        help="polygons of masks (--masks polygon, --yolo): simplification in pixels, 0 = exact")
    parser.add_argument("--min-area", type=int, default=outlines.DEFAULT_MIN_AREA,
                        help="polygons of masks: parts and holes of fewer pixels are dropped")
    dataset = parser.add_argument_group("dataset folder (--dataset)")
    dataset.add_argument("--yolo", action="store_true", help="also write YOLO segmentation labels and data.yaml")
    dataset.add_argument("--mmdet-config", action="store_true",
                         help="also write mask_rcnn_config.py for mmdetection 3.x (optional; mmdet not needed)")
    dataset.add_argument("--label-studio-url", default=None,
                         help="Label Studio to fetch images from (default: LABEL_STUDIO_URL; the key is always "
                              "LABEL_STUDIO_API_KEY)")
    dataset.add_argument("--workers", type=int, default=4, help="images fetched at once")
    dataset.add_argument("--no-progress", action="store_true", help="no progress bar")
    dataset.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    args = parser.parse_args(argv)
    if args.output is not None and (args.yolo or args.mmdet_config):
        parser.error("--yolo and --mmdet-config write into a dataset folder: use --dataset FOLDER")
    return args


def _write_dataset(coco: dict, args: argparse.Namespace, notes: list[str]) -> Written:
    """The dataset folder (tools/dataset/), images fetched with the server's settings from the environment."""
    settings = from_environment()
    if args.label_studio_url:
        settings = replace(settings, label_studio_url=args.label_studio_url)
    options = Options(yolo=args.yolo, mmdet_config=args.mmdet_config, tolerance=args.tolerance,
                      min_area=args.min_area, workers=args.workers, progress=not args.no_progress,
                      force=args.force)
    return write_dataset(coco, args.dataset, ImageLoader(settings), options, notes)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    notes: list[str] = []
    try:
        tasks = json.loads(args.export.read_text())
        coco, stats = convert(tasks, polygons=args.polygons, predictions=args.predictions, latest=args.latest,
                              image_key=args.image_key, alpha_threshold=args.alpha_threshold, masks=args.masks,
                              tolerance=args.tolerance, min_area=args.min_area, notes=notes)
        for note in notes:
            print(f"export_coco: {note}", file=sys.stderr)
        notes.clear()
        written = _write_dataset(coco, args, notes) if args.dataset is not None else None
    except (OSError, json.JSONDecodeError, ExportError, KeyError, ValueError, DatasetError, FetchError) as error:
        for note in notes:
            print(f"export_coco: {note}", file=sys.stderr)
        print(f"export_coco: {error}", file=sys.stderr)
        if args.dataset is not None:
            print(f"export_coco: nothing written to {args.dataset}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"export_coco: {note}", file=sys.stderr)
    summary = ", ".join(f"{count} {what}" for what, count in sorted(stats.items()))
    if written is None:
        args.output.write_text(json.dumps(coco))
        print(f"wrote {args.output}: {len(coco['images'])} images, {len(coco['categories'])} categories, "
              f"{len(coco['annotations'])} annotations ({summary or 'nothing else'})")
        return 0
    print(f"wrote {written.folder}: {written.images} images, {len(written.classes)} categories, "
          f"{written.annotations} annotations ({summary or 'nothing else'})"
          + (f", {written.yolo_lines} YOLO polygons" if args.yolo else ""))
    print("classes (category id: name):")
    for index, name in enumerate(written.classes, 1):
        print(f"  {index}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
