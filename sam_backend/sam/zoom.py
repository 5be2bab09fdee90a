"""Zoom-in: the clicks on an object that is small in its image are decoded in a crop around it.

SAM's encoder sees every image at 1024 pixels on its longest side, so an object a fifth of a 2000-pixel photo wide
is about 200 pixels wide to it, and its boundary is decided on a 64x64 grid of features where it spans a dozen
cells. After the first click the mask tells where the object is: a crop of EXPAND times the mask's box (and the
clicks), embedded on its own, shows the object to the encoder MIN_GAIN or more times larger, and the later clicks
are decoded there (the zoom-in of RITM and FocalClick, which their published numbers use). The crop follows the
object: it is kept while the mask and every click stay inside it (KEEP_MARGIN), so a click costs no new
embedding, and it is chosen afresh when they leave it.

Where it pays is measured through the server (`python -m tools.quality --dataset mosaic3`, README "Zoom-in on
small objects"): on the GrabCut20 objects at a third of their size, among eight other photos (ONNX), mIoU@3
0.913 -> 0.968, @20 0.961 -> 0.981, NoC@90 2.25 -> 1.35, objects with a drop 4 -> 1, for 63 crop embeddings over
20 objects of 20 clicks; on GrabCut20 and the synthetic scenes the objects are large, the crop would be most of
the image, and none is made (MIN_GAIN).

A View is (x0, y0, x1, y1) in the image's pixels, x1 and y1 one past the last column and row.
"""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from sam_backend.sam import transforms
from sam_backend.sam.transforms import IMAGE_SIZE, LOW_RES
from sam_backend.sam.types import Prompt

View = tuple[int, int, int, int]

#: the crop's sides: this many times those of the box around the mask and the clicks (2.0: the object in the
#: middle half of the crop; 1.4 cut off context and lost to the whole image, measured)
EXPAND = 2.0
#: zoom only when the crop's longest side is at most the image's over this, i.e. the encoder sees the object at
#: least this many times larger than in the whole image
MIN_GAIN = 1.5
#: a crop is at least this many image pixels a side: the encoder never enlarges the image more than 4x
MIN_SIDE = IMAGE_SIZE // 4
#: the crop is kept while the mask's box, grown by this factor about its centre, and the clicks lie inside it
KEEP_MARGIN = 1.05
#: images of more pixels are decoded as a reduced copy (`images.decode.REDUCE_ABOVE_PIXELS`, the same value,
#: tested): a crop of that copy would have too few pixels for the encoder, so they are not zoomed
MAX_PIXELS = 16_000_000


def whole(image_size: tuple[int, int]) -> View:
    """The view of the whole image of (H, W) = image_size."""
    return 0, 0, int(image_size[1]), int(image_size[0])


def frame_size(view: View | None, image_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of what a view shows: the crop, or the whole image for None."""
    x0, y0, x1, y1 = view if view is not None else whole(image_size)
    return y1 - y0, x1 - x0


def mask_box(logits: np.ndarray, view: View | None, image_size: tuple[int, int]) -> np.ndarray | None:
    """(4,) float x0, y0, x1, y1 in the image's pixels around the mask of (1, 256, 256) or (256, 256) `logits`
    decoded in `view` (None: the whole image); None when the mask is empty."""
    height, width = frame_size(view, image_size)
    rows, cols = transforms.low_res_extent(transforms.input_size((height, width)))
    inside = np.asarray(logits).reshape(LOW_RES, LOW_RES)[:rows, :cols] > transforms.MASK_THRESHOLD
    ys, xs = np.nonzero(inside)
    if not len(ys):
        return None
    left, top = (view[0], view[1]) if view is not None else (0, 0)
    return np.array([left + xs.min() * width / cols, top + ys.min() * height / rows,
                     left + (xs.max() + 1) * width / cols, top + (ys.max() + 1) * height / rows])


def _contains(view: View, box: np.ndarray) -> bool:
    return view[0] <= box[0] and view[1] <= box[1] and box[2] <= view[2] and box[3] <= view[3]


def _grown(box: np.ndarray, factor: float, least: float = 0.0) -> np.ndarray:
    centre = (box[:2] + box[2:]) / 2
    half = np.maximum((box[2:] - box[:2]) * factor, least) / 2
    return np.concatenate([centre - half, centre + half])


def _crop(box: np.ndarray, expand: float, image_size: tuple[int, int]) -> View:
    """`expand` times `box` about its centre, at least MIN_SIDE a side, clipped to the image of (H, W)."""
    x0, y0, x1, y1 = _grown(box, expand, MIN_SIDE)
    height, width = image_size
    return (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))),
            min(int(width), int(np.ceil(x1))), min(int(height), int(np.ceil(y1))))


def choose(previous: View | None, logits: np.ndarray, prompt: Prompt, image_size: tuple[int, int],
           expand: float = EXPAND, min_gain: float = MIN_GAIN) -> View | None:
    """The view to decode `prompt` (clicks in the image's pixels) in, given the last mask of the object: its
    (1, 256, 256) `logits`, decoded in the view `previous` (None: the whole image). `image_size`: (H, W).

    `previous` while the mask (grown by KEEP_MARGIN) and the clicks lie inside it; else a crop of `expand` times
    the mask's box (or the box around the mask and the clicks, when that crop leaves a click out), at least
    MIN_SIDE a side and clipped to the image, when its longest side is at most the image's over `min_gain`; None
    (the whole image) otherwise.
    """
    if previous is not None and not _contains(whole(image_size), np.asarray(previous, dtype=np.float64)):
        return None  # a view of another image (replaced in place by a smaller one): the whole image
    if image_size[0] * image_size[1] > MAX_PIXELS:
        return None
    box = mask_box(logits, previous, image_size)
    points = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2)
    if box is None or not len(points):
        return None
    clicks = np.concatenate([points.min(axis=0), points.max(axis=0) + 1])
    height, width = image_size
    kept = _grown(box, KEEP_MARGIN)  # the margin stops at the image's border (where a clipped crop ends too)
    kept = np.concatenate([np.maximum(np.minimum(kept[:2], clicks[:2]), 0.0),
                           np.minimum(np.maximum(kept[2:], clicks[2:]), [width, height])])
    if previous is not None and _contains(previous, kept):
        return previous
    # around the mask alone when that holds the clicks: the crop `model` embeds ahead after a click is then the
    # one the next click (wherever in it) is decoded in
    view = _crop(box, expand, image_size)
    if not _contains(view, clicks):
        view = _crop(np.concatenate([np.minimum(box[:2], clicks[:2]), np.maximum(box[2:], clicks[2:])]), expand,
                     image_size)
    crop_h, crop_w = frame_size(view, image_size)
    if crop_h <= 0 or crop_w <= 0 or max(height, width) < min_gain * max(crop_h, crop_w):
        return None
    return view


def into(prompt: Prompt, view: View | None) -> Prompt:
    """`prompt` in the pixels of the crop `view`, as a prompt on the crop's own embedding (view None, enclosed);
    itself for None. Its mask_input and previous are already the view's (`project`)."""
    if view is None:
        return prompt
    offset = np.array(view[:2], dtype=np.float32)
    box = None if prompt.box is None else np.asarray(prompt.box, dtype=np.float32) - np.tile(offset, 2)
    return replace(prompt, points=np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2) - offset, box=box,
                   view=None, enclosed=True)


def paste(mask: np.ndarray, view: View | None, image_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask of the image for a (h, w) `mask` decoded in `view` (itself for None)."""
    if view is None:
        return mask
    full = np.zeros(tuple(int(s) for s in image_size), dtype=bool)
    x0, y0, x1, y1 = view
    full[y0:y1, x0:x1] = mask
    return full


def crop_pixels(pixels: np.ndarray, size: tuple[int, int], view: View) -> tuple[np.ndarray, tuple[int, int]]:
    """What `Predictor.embed` takes for the crop `view`: the crop of an image's (h, w, 3) encoder pixels (those of
    an image of (H, W) = size, or a reduced copy of it) and the crop's (H, W) in the image's pixels."""
    height, width = size
    scale_y, scale_x = pixels.shape[0] / height, pixels.shape[1] / width
    x0, y0, x1, y1 = view
    top, left = int(round(y0 * scale_y)), int(round(x0 * scale_x))
    bottom, right = max(top + 1, int(round(y1 * scale_y))), max(left + 1, int(round(x1 * scale_x)))
    return np.ascontiguousarray(pixels[top:bottom, left:right]), (y1 - y0, x1 - x0)


def project(logits: np.ndarray, source: View | None, target: View | None,
            image_size: tuple[int, int]) -> np.ndarray:
    """(1, 256, 256) low-resolution logits decoded in the view `source` as those of the view `target` (None: the
    whole image of (H, W) = image_size), for `Prompt.mask_input` when the crop changes between two clicks.

    Each low-resolution cell of `target` takes the bilinear sample of `source`'s logits at the same image point;
    cells that `source` does not show take the lowest logit it holds (as sure as anything in it is not the object).
    """
    if source == target:
        return logits
    (src_h, src_w), (dst_h, dst_w) = frame_size(source, image_size), frame_size(target, image_size)
    src_rows, src_cols = transforms.low_res_extent(transforms.input_size((src_h, src_w)))
    dst_rows, dst_cols = transforms.low_res_extent(transforms.input_size((dst_h, dst_w)))
    src = np.asarray(logits, dtype=np.float32).reshape(LOW_RES, LOW_RES)[:src_rows, :src_cols]
    outside = float(min(src.min(), -1.0))
    (sx0, sy0), (dx0, dy0) = (source or whole(image_size))[:2], (target or whole(image_size))[:2]
    # image pixels per low-resolution cell of each frame, and the cell index (centres at integers) of a point
    src_x, src_y, dst_x, dst_y = src_w / src_cols, src_h / src_rows, dst_w / dst_cols, dst_h / dst_rows
    matrix = np.array([[dst_x / src_x, 0.0, (dx0 - sx0 + dst_x / 2) / src_x - 0.5],
                       [0.0, dst_y / src_y, (dy0 - sy0 + dst_y / 2) / src_y - 0.5]])
    sampled = cv2.warpAffine(np.ascontiguousarray(src), matrix, (dst_cols, dst_rows),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=outside)
    out = np.full((1, LOW_RES, LOW_RES), outside, dtype=np.float32)
    out[0, :dst_rows, :dst_cols] = sampled
    return out
