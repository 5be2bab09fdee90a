"""Masks as single polygons (rings joined by zero-width bridges) and YOLO segmentation label lines.

A format that stores an object as one polygon (YOLO segmentation: one line per instance) or one polygon per part
(COCO polygons) has no room for holes or, in YOLO's case, for several parts. `join` makes one ring of several:
it walks from the ring built so far to the nearest vertex of the next ring, around that ring, and back along the
same segment. The way there and back cancel in any fill rule (even-odd, as `outlines.rasterise`, pycocotools and
cv2.fillPoly fill; or non-zero winding), so a hole stays a hole and separate parts stay separate.

What a YOLO line of a mask (`mask_ring`, then `format_line`) loses:

* the simplification (Douglas-Peucker at `tolerance` pixels, `outlines.parts`; `EXPORT_TOLERANCE` for the
  export); 0 keeps the exact pixel border;
* parts and holes of fewer than `min_area` pixels (a dropped hole is filled);
* in a rasteriser that paints polygon edges as pixels (cv2.fillPoly, which Ultralytics uses to build its
  training masks), each bridge is a line of pixels up to its length; the pixel-centre rule of `rasterise` and
  pycocotools paints none;
* coordinates are rounded to `DECIMALS` places of the image size (1e-6 of 10,000 px is 0.01 px).

Coordinates: pixel-edge x, y (as `outlines`); YOLO lines hold them divided by the image width and height, in
[0, 1].
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sam_backend.encoding import outlines

DECIMALS = 6
#: Douglas-Peucker tolerance of exported polygons (the server's POLYGON_TOLERANCE default is 1 px): on the 20
#: GrabCut masks (../shared/datasets/GrabCut_BSDS20) one ring per mask re-rasterises with IoU 1.0 (min and mean)
#: at 0.5 px and about 570 points, 0.991..0.9996 at 0.75 px (290 points), 0.978..0.996 (mean 0.991) at 1 px
#: (140 points); 0 keeps the exact border (about 1400 points)
EXPORT_TOLERANCE = 0.5


def join(rings: Sequence[np.ndarray]) -> np.ndarray:
    """One (N, 2) float64 ring through all `rings` (each (n, 2), n >= 3), joined by zero-width bridges, in the
    given order: each next ring is entered from the vertex of the joined ring nearest to it. Empty for none."""
    rings = [np.asarray(r, np.float64).reshape(-1, 2) for r in rings]
    rings = [r for r in rings if len(r) >= 3]
    if not rings:
        return np.zeros((0, 2))
    joined = rings[0]
    for ring in rings[1:]:
        distance = ((joined[:, None, :] - ring[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(distance)), distance.shape)
        # ... joined[i], ring[j], ring[j + 1], ..., ring[j - 1], ring[j], joined[i], joined[i + 1] ...
        joined = np.concatenate([joined[:i + 1], ring[j:], ring[:j + 1], joined[i:]])
    return joined


def mask_rings(mask: np.ndarray, tolerance: float = outlines.DEFAULT_TOLERANCE,
               min_area: int = outlines.DEFAULT_MIN_AREA) -> list[np.ndarray]:
    """One ring per part of the (H, W) mask, its holes joined in, largest part first (COCO polygons)."""
    return [join([outer, *holes]) for outer, holes in outlines.parts(mask, tolerance, min_area)]


def mask_ring(mask: np.ndarray, tolerance: float = outlines.DEFAULT_TOLERANCE,
              min_area: int = outlines.DEFAULT_MIN_AREA) -> np.ndarray:
    """The whole (H, W) mask as one ring (N, 2) float64 pixel corners: its parts and their holes joined, largest
    part first; empty when no part has `min_area` pixels."""
    return join(mask_rings(mask, tolerance, min_area))


def format_line(class_index: int, ring: np.ndarray, width: int, height: int) -> str:
    """`class x1 y1 x2 y2 ...`: the ring's pixel-edge points divided by the image's width and height."""
    points = np.asarray(ring, np.float64).reshape(-1, 2)
    if len(points) < 3:
        raise ValueError(f"a YOLO polygon needs 3 points or more, got {len(points)}")
    normalised = np.clip(points / np.array([width, height], np.float64), 0.0, 1.0)
    return " ".join([str(int(class_index)), *(f"{v:.{DECIMALS}f}" for v in normalised.ravel())])


def parse_line(line: str, width: int, height: int) -> tuple[int, np.ndarray]:
    """(class index, (N, 2) pixel-edge points) of a YOLO segmentation line; ValueError if it is not one."""
    fields = line.split()
    if len(fields) < 7 or len(fields) % 2 == 0:
        raise ValueError(f"a YOLO segmentation line is a class and 3 or more x y pairs, got {len(fields)} fields")
    values = np.array([float(v) for v in fields[1:]]).reshape(-1, 2)
    return int(fields[0]), values * np.array([width, height], np.float64)
