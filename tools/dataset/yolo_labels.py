"""YOLO segmentation labels (Ultralytics' layout) from a COCO dict of the dataset.

`labels/<image stem>.txt` beside `images/`: one line per instance, `class x1 y1 x2 y2 ...` with x, y the
polygon's pixel-edge coordinates divided by the image's width and height; class = COCO category id - 1 (the
categories are numbered from 1 in the order of `classes.txt`). `data.yaml` names the classes and takes
`images` as both train and val (split it yourself); it has no `path:`, so Ultralytics takes its own folder as
the dataset root, and the folder can be moved.

YOLO holds one polygon per instance: the mask's parts and holes are joined into one ring by zero-width bridges
(sam_backend/encoding/yolo.py, where what that loses is listed); a Label Studio polygon region is written as it
is (exact); a COCO polygon list (several parts) is joined the same way.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from sam_backend.encoding import yolo
from sam_backend.encoding.coco import rle_decode


def annotation_ring(annotation: dict, tolerance: float, min_area: int) -> np.ndarray:
    """The instance as one ring, (N, 2) pixel-edge points (empty if nothing is left of it)."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, dict):
        return yolo.mask_ring(rle_decode(segmentation), tolerance, min_area)
    return yolo.join([np.asarray(flat, np.float64).reshape(-1, 2) for flat in segmentation])


def write(coco: dict, folder: Path, tolerance: float, min_area: int, notes: list[str]) -> int:
    """Write labels/ and data.yaml into the dataset `folder` for `coco`'s images (file_name under images/);
    returns the number of lines written. An instance with nothing left (every part under `min_area` pixels)
    is left out, with a line in `notes`."""
    labels = folder / "labels"
    labels.mkdir()
    by_image: dict[int, list[dict]] = defaultdict(list)
    for annotation in coco["annotations"]:
        by_image[annotation["image_id"]].append(annotation)
    lines_written = 0
    for image in coco["images"]:
        lines = []
        for annotation in by_image[image["id"]]:
            ring = annotation_ring(annotation, tolerance, min_area)
            if len(ring) < 3:
                notes.append(f"task {image['id']}: annotation {annotation['id']} has no part of {min_area} pixels "
                             f"or more: no YOLO polygon")
                continue
            lines.append(yolo.format_line(annotation["category_id"] - 1, ring, image["width"], image["height"]))
        (labels / (Path(image["file_name"]).stem + ".txt")).write_text("".join(line + "\n" for line in lines))
        lines_written += len(lines)
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    yaml = ["# YOLO segmentation dataset written by tools/export_coco.py --dataset --yolo.",
            "# No 'path:': Ultralytics then takes this file's folder as the dataset root.",
            "train: images", "val: images", f"nc: {len(names)}", "names:"]
    yaml += [f"  {index}: {json.dumps(name)}" for index, name in enumerate(names)]  # JSON strings are YAML
    (folder / "data.yaml").write_text("\n".join(yaml) + "\n")
    return lines_written
