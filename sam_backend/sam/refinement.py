"""Refinement that never jumps: decode a prompt with the previous mask, and catch the rare answer that leaves it.

SAM's single output refined from the previous mask (`Prompt.mask_input`) is the best answer to an added click on
average, but now and then it jumps to another object or to almost nothing (GrabCut20 through the server: 0.92 ->
0.01 after a third click). Such an answer has little overlap with the previous mask, and the clicks decoded
afresh (SAM's three masks, without the previous one) then stay closer to it: that answer is taken instead. The
second decode runs only for a jump, so a click costs one decode as before. Measured with `python -m tools.quality`
(README, "Mask quality").
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from sam_backend.sam.types import Embedding, Prediction, Predictor, Prompt

#: a refined answer whose low-resolution mask overlaps the previous one less than this (IoU) is a jump
JUMP_IOU = 0.7


def overlap(logits: np.ndarray, previous: np.ndarray) -> float:
    """IoU of the masks (logit > 0) of two (1, 256, 256) logit maps; 1 when both are empty."""
    a, b = np.asarray(logits) > 0, np.asarray(previous) > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def decode(predictor: Predictor, embedding: Embedding, prompt: Prompt) -> Prediction:
    """`predictor.decode(embedding, prompt)`, unless it refines `prompt.mask_input` into a jump (see the module
    docstring): then the closer of it and the clicks' fresh three-mask answer."""
    refined = predictor.decode(embedding, prompt)
    if prompt.mask_input is None or prompt.box is not None:
        return refined
    close = overlap(refined.low_res_logits, prompt.mask_input)
    if close >= JUMP_IOU:
        return refined
    fresh = predictor.decode(embedding, replace(prompt, mask_input=None, multimask=True))
    return fresh if overlap(fresh.low_res_logits, prompt.mask_input) > close else refined
