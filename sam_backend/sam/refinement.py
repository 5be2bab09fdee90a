"""Refinement that never jumps: decode a prompt with the previous mask, and catch the rare answer that leaves it.

SAM's single output refined from the previous mask (`Prompt.mask_input`) is the best answer to an added click on
average, but now and then it jumps to another object or to almost nothing (GrabCut20 through the server: 0.92 ->
0.01 after a third click). Such an answer has little overlap with the previous mask, and the clicks decoded
afresh (SAM's three masks, without the previous one) then stay closer to it: that answer is taken instead. The
second decode runs only for a jump, so a click costs one decode as before. Measured with `python -m tools.quality`
(README, "Mask quality").

Two clicks are ambiguous (`Prompt.is_ambiguous`: SAM's three masks of the clicks alone, without the first mask):
the first click's mask comes along as `Prompt.previous` and only catches a jump the same way, SAM's single output
of the two clicks being the other answer when it honours the second click (holds it if positive, leaves it out
if negative). In a crop around a small object (`zoom`) the three-mask answer took the
object's surroundings now and then (GrabCut 37073 in a mosaic: 0.95 -> 0.21, the single output 0.98); on
GrabCut20 and the scenes it changes nothing.

A box drawn after clicks (`box_after_clicks`) has three answers: the box with the clicks, the box alone, and the
box with the clicks refining their last mask. SAM's predicted IoU picks among those that keep to the box about as
well as the box alone's answer does (their extent fits the box, little of them lies outside it): a box says
where the object ends, and SAM is sure of a refined mask even when the mask it was given missed half the
object (GrabCut 189080 after three clicks: 0.556, predicted 0.989, against 0.980 for the box with the clicks).
Tight boxes after 1, 2, 3, 5 and all clicks, through the server (ONNX): GrabCut20 0.967 -> 0.971 (box alone
0.963), the scenes 0.936 -> 0.952 (0.937), mosaic3 0.931 -> 0.948 (0.940); boxes drawn loosely (a tenth of the
object beyond it on every side) gain most, SAM's answer to a loose box alone being poor: see the README, "Mask
quality". Before, the better by predicted IoU of the first two alone (that lost > 0.05 to the box alone in six
of GrabCut20's objects when it was the box with the clicks only). Clicks added to an existing box are decoded
as before.

Two rules keep later clicks from wrecking a mask (GrabCut20, ONNX: objects with a drop > 0.05 4 -> 0):

* A click repeated on the pixel of an earlier one (same label) is decoded once (`distinct_clicks`). SAM was
  trained on clicks sampled from error regions, never on identical tokens; three copies of one negative click
  made its single output collapse (21077: 0.91 -> 0.06).
* A negative click removes only what lies near it (`bound_removal`): of the pixels the answer takes out of the
  previous mask, those farther from the click than REMOVAL_REACH times the click's depth in that mask (its
  distance to the mask's edge, at 256x256, the image's border not counting as one; at least MIN_DEPTH) are put
  back. A negative click says "this part is not the object"; an
  answer that also drops distant parts of a good mask is SAM losing the object (189080: 0.82 -> 0.63, 326038:
  0.97 -> 0.78). What the answer adds is kept, and positive clicks are not bounded: on the synthetic scenes
  large corrections by either kind are right, and a bound on growth (or on the removal's connected component
  instead of a disk) cost them up to 2 clicks of NoC@90.
"""
from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from sam_backend.sam import transforms
from sam_backend.sam.transforms import IMAGE_SIZE, LOW_RES
from sam_backend.sam.types import Embedding, Prediction, Predictor, Prompt, distinct_clicks

#: a refined answer whose low-resolution mask overlaps the previous one less than this (IoU) is a jump
JUMP_IOU = 0.7
#: a negative click removes pixels of the previous mask up to this many times its depth in it (`bound_removal`);
#: GrabCut20 (ONNX): 4 -> no object with a drop > 0.05, 6 -> one (326038: 0.97 -> 0.90)
REMOVAL_REACH = 4.0
#: a box drawn after clicks: an answer whose mask's extent fits the box (IoU of the two boxes) by more than this
#: less than the box alone's answer does, or of which a larger share than BOX_OUTSIDE_SLACK more lies outside the
#: box, is not taken (`box_after_clicks`; README, "Mask quality": the same results from 0.05 to 0.2, and from 0.01
#: to 0.05, with tight boxes; with boxes drawn loosely, larger ones raise the mean and let a box of GrabCut20
#: fall more than 0.05 under the box alone, 0.1 and 0.03 none)
BOX_FIT_SLACK = 0.1
BOX_OUTSIDE_SLACK = 0.03
#: the least reach, in low-resolution pixels (4 pixels of the 1024-frame each), for a click at a mask's edge
MIN_DEPTH = 2.0


def overlap(logits: np.ndarray, previous: np.ndarray) -> float:
    """IoU of the masks (logit > 0) of two (1, 256, 256) logit maps; 1 when both are empty."""
    a, b = np.asarray(logits) > 0, np.asarray(previous) > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def decode(predictor: Predictor, embedding: Embedding, prompt: Prompt) -> Prediction:
    """`predictor.decode(embedding, prompt)` of the prompt's distinct clicks, unless it refines `prompt.mask_input`
    into a jump (see the module docstring): then the closer of it and the clicks' fresh three-mask answer, its
    removals bounded when the newest click is negative. Two clicks that jump away from `prompt.previous`: the
    closer of that answer and SAM's single output, if the single output honours the newest click. A box drawn
    after clicks (`prompt.new_box`): `box_after_clicks`."""
    prompt = distinct_clicks(prompt)
    if prompt.new_box and len(prompt.points):
        return box_after_clicks(predictor, embedding, prompt)
    refined = predictor.decode(embedding, prompt)
    if prompt.mask_input is None and prompt.previous is not None and prompt.box is None:
        # an ambiguous prompt (two clicks): the whole object of SAM's three masks, or its single output when
        # that stays closer to a previous mask the other jumps away from
        close = overlap(refined.low_res_logits, prompt.previous)
        if close < JUMP_IOU:
            single = predictor.decode(embedding, replace(prompt, multimask=False))
            if overlap(single.low_res_logits, prompt.previous) > close and honours_newest(single.mask, prompt):
                return single
        return refined
    if prompt.mask_input is None or prompt.box is not None:
        return refined
    close = overlap(refined.low_res_logits, prompt.mask_input)
    if close < JUMP_IOU:
        fresh = predictor.decode(embedding, replace(prompt, mask_input=None, multimask=True))
        if overlap(fresh.low_res_logits, prompt.mask_input) > close:
            refined = fresh
    return bound_removal(refined, prompt, embedding)


def box_after_clicks(predictor: Predictor, embedding: Embedding, prompt: Prompt) -> Prediction:
    """The answer to a box drawn after clicks (`prompt.new_box`; `prompt.mask_input`: the clicks' last mask, or
    None): of the box with the clicks, the box alone and the box with the clicks refining that mask, the one SAM
    predicts best among those that keep to the box about as well as the box alone's answer does (`box_fit`:
    their extent fits it, little of them lies outside it; module docstring)."""
    if prompt.box is None:
        raise ValueError("a box drawn after clicks needs its box")
    with_clicks = predictor.decode(embedding, replace(prompt, mask_input=None))
    alone = predictor.decode(embedding, replace(prompt, points=prompt.points[:0], labels=prompt.labels[:0],
                                                mask_input=None, new_box=False))
    answers = [with_clicks, alone]
    if prompt.mask_input is not None:
        answers.append(predictor.decode(embedding, prompt))
    fit, outside = box_fit(alone.mask, prompt.box)
    outside = 0.0 if fit == 0.0 else outside  # the box alone found nothing: an answer must lie inside the box

    def keeps_to_box(answer: Prediction) -> bool:
        its_fit, its_outside = box_fit(answer.mask, prompt.box)
        return its_fit >= fit - BOX_FIT_SLACK and its_outside <= outside + BOX_OUTSIDE_SLACK

    return max((a for a in answers if a is alone or keeps_to_box(a)), key=lambda answer: answer.score)


def box_fit(mask: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """How the (H, W) bool `mask` keeps to `box` (x0, y0, x1, y1 in its pixels): the IoU of the box and the mask's
    extent (its bounding box), and the share of the mask's pixels outside the box. (0, 1) for an empty mask.

    From the full-size mask, not the 256x256 logits: a speck the upscaling smooths away can stretch the
    low-resolution extent by a tenth of the image (GrabCut and the scenes, a box after many clicks)."""
    filled_rows, filled_cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(filled_rows):
        return 0.0, 1.0
    x0, x1, y0, y1 = filled_cols[0], filled_cols[-1] + 1, filled_rows[0], filled_rows[-1] + 1
    height, width = mask.shape
    bx0, by0, bx1, by1 = (float(v) for v in box)
    inter = max(0.0, min(x1, bx1) - max(x0, bx0)) * max(0.0, min(y1, by1) - max(y0, by0))
    union = float((x1 - x0) * (y1 - y0)) + (bx1 - bx0) * (by1 - by0) - inter
    top, left = min(max(int(round(by0)), 0), height), min(max(int(round(bx0)), 0), width)
    bottom, right = min(max(int(round(by1)), top), height), min(max(int(round(bx1)), left), width)
    total = int(np.count_nonzero(mask[y0:y1, x0:x1]))
    outside = 1.0 - np.count_nonzero(mask[top:bottom, left:right]) / total
    return (float(inter / union) if union > 0 else 0.0), float(outside)


def honours_newest(mask: np.ndarray, prompt: Prompt) -> bool:
    """Whether the (H, W) `mask` holds the newest click of `prompt` if it is positive, and leaves it out if it is
    negative: an answer closer to the previous mask is no answer when it ignores the click just made (GrabCut
    304074 in a mosaic, int8: a negative click on the mask, answered by the same mask, got the same click again
    for 18 more clicks)."""
    height, width = mask.shape
    x, y = prompt.points[-1]
    return bool(mask[min(height - 1, max(0, int(y))), min(width - 1, max(0, int(x)))]) == bool(prompt.labels[-1])


def bound_removal(answer: Prediction, prompt: Prompt, embedding: Embedding,
                  reach: float = REMOVAL_REACH) -> Prediction:
    """`answer` to `prompt` (clicks refining `prompt.mask_input`, the newest one last) with the pixels it took out of
    the previous mask farther than `reach` x the newest click's depth from that click put back, when that click
    is negative (module docstring); `answer` itself otherwise, or when nothing is put back.

    Works on the (1, 256, 256) logits over the image's part of the frame (`embedding.input_size`); the mask of
    an answer that changes is `transforms.upscale_mask` of the merged logits."""
    if prompt.mask_input is None or not len(prompt.labels) or prompt.labels[-1] != 0:
        return answer
    in_size = embedding.input_size
    rows, cols = transforms.low_res_extent(in_size)
    previous = np.asarray(prompt.mask_input, dtype=np.float32).reshape(LOW_RES, LOW_RES)
    logits = np.asarray(answer.low_res_logits, dtype=np.float32).reshape(LOW_RES, LOW_RES)
    before, after = previous[:rows, :cols] > 0, logits[:rows, :cols] > 0
    removed = before & ~after
    if not removed.any():
        return answer
    height, width = embedding.original_size
    x, y = prompt.points[-1]
    column = min(cols - 1, max(0, int(x * in_size[1] / width * LOW_RES / IMAGE_SIZE)))
    row = min(rows - 1, max(0, int(y * in_size[0] / height * LOW_RES / IMAGE_SIZE)))
    # distance to the nearest pixel outside the previous mask; the image's border is no edge of the mask (a
    # false floor or sky along it is as deep as it is tall)
    inside = np.pad(before.astype(np.uint8), 1, constant_values=1)
    depth = float(cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_5)[row + 1, column + 1])
    radius = reach * max(depth, MIN_DEPTH)
    ys, xs = np.ogrid[:rows, :cols]
    restore = removed & ((xs - column) ** 2 + (ys - row) ** 2 > radius ** 2)
    if not restore.any():
        return answer
    merged = logits.copy()
    merged[:rows, :cols][restore] = previous[:rows, :cols][restore]
    mask = transforms.upscale_mask(merged, in_size, embedding.original_size)
    return Prediction(mask=mask, score=answer.score, low_res_logits=merged[None])
