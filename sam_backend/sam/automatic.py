"""SAM's automatic mask generation over the one predictor interface: every object of an image without a prompt.

As in SAM's paper (section 7.1, `SamAutomaticMaskGenerator`): a regular grid of single-click prompts, each
decoded into SAM's three masks; masks are kept when their predicted IoU and their stability (how little the mask
changes when the logit threshold moves by `stability_offset`) are high enough, and duplicates are removed by
non-maximum suppression, best first. Differences, each for a CPU: the filters and the suppression run on the
decoder's low-resolution logits (256 x 256 for the padded 1024-frame), and only the masks kept are scaled to the
image; no crops of the image are embedded again (one embedding per image, the one the clicks use).

Cost: `points_per_side` ** 2 decodes (16 -> 256: about 10 s per image for MobileSAM on ONNX Runtime, 2 cores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sam_backend.sam.transforms import LOW_RES, stability, upscale_mask
from sam_backend.sam.types import Embedding, Prompt


class LowResDecoder(Protocol):
    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
        """(4, 256, 256) float32 logits and (4,) predicted IoUs: the single output, then the three."""
        ...


@dataclass(frozen=True)
class AutoMaskOptions:
    """points_per_side: the grid is points_per_side x points_per_side clicks over the image.
    pred_iou_thresh, stability_thresh: keep masks at least this good (SAM's defaults 0.88 and 0.95).
    stability_offset: the logit offset of the stability score (SAM's 1.0).
    nms_iou: a mask overlapping a better kept one by more than this (mask IoU; SAM uses box IoU, 0.7) is a
        duplicate.
    min_area: smallest mask kept, as a fraction of the image; max_masks: at most this many, best first.
    """

    points_per_side: int = 16
    pred_iou_thresh: float = 0.88
    stability_thresh: float = 0.95
    stability_offset: float = 1.0
    nms_iou: float = 0.7
    min_area: float = 0.0005
    max_masks: int = 100


@dataclass(frozen=True)
class AutoMask:
    """mask: (H, W) bool in the original image; score: SAM's predicted IoU; stability: 0..1."""

    mask: np.ndarray
    score: float
    stability: float


def grid(points_per_side: int, original_size: tuple[int, int]) -> np.ndarray:
    """(n * n, 2) float32 x, y pixel centres of a regular grid over an (H, W) image, row by row."""
    height, width = original_size
    steps = (np.arange(points_per_side, dtype=np.float32) + 0.5) / points_per_side
    xs, ys = np.meshgrid(steps * width, steps * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def generate(predictor: LowResDecoder, embedding: Embedding, options: AutoMaskOptions = AutoMaskOptions()
             ) -> list[AutoMask]:
    """Every object SAM finds on the embedded image, best predicted IoU first, without duplicates."""
    valid_h = max(1, round(embedding.input_size[0] * LOW_RES / 1024))  # the low-res frame's part over the image
    valid_w = max(1, round(embedding.input_size[1] * LOW_RES / 1024))
    min_pixels = options.min_area * valid_h * valid_w
    candidates: list[tuple[float, float, np.ndarray]] = []
    for point in grid(options.points_per_side, embedding.original_size):
        low_res, iou = predictor.decode_low_res(
            embedding, Prompt(points=point[None], labels=np.ones(1, np.int32), multimask=True))
        low_res, iou = np.asarray(low_res), np.asarray(iou)
        for index in range(1, len(iou)):  # the three multimask outputs
            score = float(iou[index])
            if score < options.pred_iou_thresh:
                continue
            logits = low_res[index, :valid_h, :valid_w]
            area = np.count_nonzero(logits > 0)
            if area == 0 or area < min_pixels:
                continue
            stable = stability(logits, options.stability_offset)
            if stable < options.stability_thresh:
                continue
            candidates.append((score, stable, low_res[index].astype(np.float16)))  # 128 KiB each, up to 3 a point
    kept: list[tuple[float, float, np.ndarray]] = []
    kept_masks: list[np.ndarray] = []
    for score, stable, logits in sorted(candidates, key=lambda c: (-c[0], -c[1])):
        mask = logits[:valid_h, :valid_w] > 0
        if any(_iou(mask, other) > options.nms_iou for other in kept_masks):
            continue
        kept.append((score, stable, logits))
        kept_masks.append(mask)
        if len(kept) == options.max_masks:
            break
    return [AutoMask(mask=upscale_mask(logits.astype(np.float32), embedding.input_size, embedding.original_size),
                     score=score, stability=stable) for score, stable, logits in kept]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0
