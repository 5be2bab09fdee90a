"""A mask as Label Studio results: the brush region (RLE), PolygonLabels and RectangleLabels regions, and the
task's prediction around them. The geometry (polygons, boxes) is `sam_backend.encoding.outlines`', the brush
RLE `sam_backend.encoding.rle`'.

Every region gets a fresh 10-character id and SAM's predicted IoU, clamped to 0..1, as its score; the task's
score is the mean of its regions'.

Label Studio puts regions in percent of the image, 0 at the left / top edge, 100 at the right / bottom edge;
outlines works in pixel-edge coordinates, so percent = pixel-edge coordinate / image size * 100.

Polygons: one Label Studio region per 8-connected component of the mask, holes filled (Label Studio polygons
have none; the brush region keeps them), small components dropped (see outlines.polygons).

Which outputs a mask gets (`mask_results`):

* the brush region with OUT_MASK (`--with out_mask`, default on);

* polygons only with OUT_POLY (`--with out_poly`, default off, as in the seed), into a PolygonLabels tag on the
  image with a label for the mask's class (a label naming the brush label as a prompt label would: the same
  value, or the seed's numeric aliases). Such a tag alone is not enough: the seed's config has one for drawing
  polygons by hand, and polygons on every click would give each accepted object two regions. With OUT_POLY
  and no such tag nothing is emitted and a warning says why;
* a rectangle only with OUT_BBOX (`--with out_bbox`) on, into a RectangleLabels tag of the image with a label
  for the class. Such a tag is usually the smart rectangle *prompt* tool: filling it on every click would
  give users boxes they did not draw, so a RectangleLabels tag alone is not enough. Note that with OUT_BBOX a
  box the user accepts lands in the task's draft, where later calls read prompt rectangles from.
"""
from __future__ import annotations

import logging
import uuid
from functools import lru_cache
from typing import Callable

import numpy as np

from sam_backend.encoding import rle
from sam_backend.encoding.outlines import DEFAULT_MIN_AREA, DEFAULT_TOLERANCE, bounding_box, check_mask, polygons
from sam_backend.labelstudio.label_config import ProjectConfig
from sam_backend.settings import Settings

log = logging.getLogger(__name__)

#: decimals of the percent coordinates (1e-4 % of a 10 000-pixel side is 0.01 px)
DECIMALS = 4


def _new_id() -> str:
    return uuid.uuid4().hex[:10]


def _score(score: float) -> float:
    """A score as Label Studio shows it: 0..1, four decimals."""
    return round(min(max(float(score), 0.0), 1.0), 4)


def _percent(value: float, size: int) -> float:
    return round(min(max(float(value) / size * 100.0, 0.0), 100.0), DECIMALS)


def _result(kind: str, value: dict, *, from_name: str, to_name: str, label: str, score: float,
            width: int, height: int, region_id: str) -> dict:
    return {
        "id": region_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "readonly": False,
        "score": _score(score),
        "value": {**value, kind: [label]},
    }


def brush_region(mask: np.ndarray, *, from_name: str, to_name: str, label: str, score: float,
                 new_id: Callable[[], str] = _new_id) -> dict:
    """A BrushLabels result: all of the mask's pixels (holes kept) as Label Studio brush RLE.

    mask: (H, W) bool, or uint8 alpha (see rle.encode). value: {"format": "rle", "rle": [...], "brushlabels": [label]}.
    """
    encoded = rle.encode(mask)
    height, width = np.shape(mask)
    return _result("brushlabels", {"format": "rle", "rle": encoded}, from_name=from_name, to_name=to_name,
                   label=label, score=score, width=width, height=height, region_id=new_id())


def polygon_regions(mask: np.ndarray, *, from_name: str, to_name: str, label: str, score: float,
                    tolerance: float = DEFAULT_TOLERANCE, min_area: int = DEFAULT_MIN_AREA,
                    new_id: Callable[[], str] = _new_id) -> list[dict]:
    """PolygonLabels results for `mask`, one per connected component (largest first); [] for an empty mask.

    value: {"points": [[x%, y%], ...], "closed": true, "polygonlabels": [label]}; the first point is not
    repeated at the end (Label Studio closes the polygon).
    """
    mask = check_mask(mask)
    height, width = mask.shape
    regions = []
    for border in polygons(mask, tolerance, min_area):
        points = [[_percent(x, width), _percent(y, height)] for x, y in border.tolist()]
        regions.append(_result("polygonlabels", {"points": points, "closed": True}, from_name=from_name,
                               to_name=to_name, label=label, score=score, width=width, height=height,
                               region_id=new_id()))
    return regions


def rectangle_region(mask: np.ndarray, *, from_name: str, to_name: str, label: str, score: float,
                     new_id: Callable[[], str] = _new_id) -> dict | None:
    """A RectangleLabels result around all of the mask's pixels (rotation 0); None for an empty mask."""
    mask = check_mask(mask)
    height, width = mask.shape
    box = bounding_box(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    value = {"x": _percent(x0, width), "y": _percent(y0, height), "width": _percent(x1 - x0, width),
             "height": _percent(y1 - y0, height), "rotation": 0}
    return _result("rectanglelabels", value, from_name=from_name, to_name=to_name, label=label, score=score,
                   width=width, height=height, region_id=new_id())


def mask_results(mask: np.ndarray, score: float, target: tuple[str, str], image: str, config: ProjectConfig,
                 settings: Settings) -> list[dict]:
    """Every result `config` and `settings` ask for of one mask: the brush region, then the outlines.

    target: (brush tag, brush label value) of the mask's class; image: the Image tag's name.
    """
    found = []
    if settings.out_mask:
        found.append(brush_region(mask, from_name=target[0], to_name=image, label=target[1], score=score))
    return found + outline_results(mask, score, target, image, config, settings)


def outline_results(mask: np.ndarray, score: float, target: tuple[str, str], image: str, config: ProjectConfig,
                    settings: Settings) -> list[dict]:
    """The polygon and rectangle results `config` and `settings` ask for.

    target: (brush tag, brush label value) of the mask's class; image: the Image tag's name.
    """
    results = []
    if settings.out_poly:
        polygon_tag = config.output_tag("polygonlabels", image, tuple(target))
        if polygon_tag is None:
            _warn_once("OUT_POLY is on, but the labeling config has no PolygonLabels tag on %r with a label for "
                       "brush label %r: no polygon", image, target[1])
        else:
            results += polygon_regions(mask, from_name=polygon_tag[0], to_name=image, label=polygon_tag[1],
                                       score=score, tolerance=settings.polygon_tolerance,
                                       min_area=settings.polygon_min_area)
    if settings.out_bbox:
        rectangle_tag = config.output_tag("rectanglelabels", image, tuple(target))
        if rectangle_tag is None:
            _warn_once("OUT_BBOX is on, but the labeling config has no RectangleLabels tag on %r with a label "
                       "for brush label %r: no rectangle", image, target[1])
        else:
            region = rectangle_region(mask, from_name=rectangle_tag[0], to_name=image, label=rectangle_tag[1],
                                      score=score)
            results += [region] if region is not None else []
    return results


def task_result(regions: list[dict], model_version: str) -> dict:
    """One task's prediction: its regions, their mean score (0 without any) and the model that made them."""
    score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
    return {"result": regions, "score": round(score, 4), "model_version": model_version}


@lru_cache(maxsize=256)
def _warn_once(message: str, *args) -> None:
    log.warning(message, *args)
