"""sam.refinement: a refined answer that jumps away from the previous mask is caught by a second, fresh decode."""
from __future__ import annotations

import numpy as np

from sam_backend.sam import refinement
from sam_backend.sam.types import Embedding, Prediction, Prompt

PREVIOUS = np.full((1, 256, 256), -5.0, np.float32)
PREVIOUS[:, 64:192, 64:192] = 5.0  # the object's previous mask: a square


def logits_of(top: int, left: int, side: int = 128) -> np.ndarray:
    logits = np.full((1, 256, 256), -5.0, np.float32)
    logits[:, top:top + side, left:left + side] = 5.0
    return logits


class Scripted:
    """Answers a prompt with the previous mask (`mask_input`) by `refined`, a fresh multimask one by `fresh`."""

    model_version = "scripted"

    def __init__(self, refined: np.ndarray, fresh: np.ndarray) -> None:
        self.refined, self.fresh = refined, fresh
        self.prompts: list[Prompt] = []

    def embed(self, image, original_size=None):
        raise AssertionError("not used")

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        self.prompts.append(prompt)
        logits = self.refined if prompt.mask_input is not None else self.fresh
        return Prediction(mask=logits[0] > 0, score=0.9, low_res_logits=logits)


EMBEDDING = Embedding(np.zeros((1, 256, 64, 64), np.float32), (256, 256), (1024, 1024))
CLICKS = Prompt(points=np.array([[100, 100], [150, 150], [20, 20]], np.float32), labels=np.array([1, 1, 0], np.int32),
                mask_input=PREVIOUS)


def test_a_close_refinement_is_answered_with_one_decode():
    predictor = Scripted(refined=logits_of(70, 70), fresh=logits_of(0, 0))
    answer = refinement.decode(predictor, EMBEDDING, CLICKS)
    assert np.array_equal(answer.low_res_logits, predictor.refined) and len(predictor.prompts) == 1


def test_a_jump_is_replaced_by_the_fresh_answer_when_that_stays_closer():
    predictor = Scripted(refined=logits_of(0, 0, side=16), fresh=logits_of(66, 66))
    answer = refinement.decode(predictor, EMBEDDING, CLICKS)
    assert np.array_equal(answer.low_res_logits, predictor.fresh)
    fresh = predictor.prompts[1]
    assert fresh.mask_input is None and fresh.multimask is True and fresh.is_ambiguous
    assert np.array_equal(fresh.points, CLICKS.points) and np.array_equal(fresh.labels, CLICKS.labels)


def test_a_jump_stays_when_the_fresh_answer_is_no_closer():
    predictor = Scripted(refined=logits_of(0, 0, side=60), fresh=logits_of(200, 200, side=40))
    answer = refinement.decode(predictor, EMBEDDING, CLICKS)
    assert np.array_equal(answer.low_res_logits, predictor.refined) and len(predictor.prompts) == 2


def test_prompts_without_a_previous_mask_or_with_a_box_decode_once():
    for prompt in (Prompt(CLICKS.points, CLICKS.labels),
                   Prompt(CLICKS.points, CLICKS.labels, box=np.array([0, 0, 50, 50], np.float32),
                          mask_input=PREVIOUS)):
        predictor = Scripted(refined=logits_of(0, 0, side=8), fresh=logits_of(64, 64))
        refinement.decode(predictor, EMBEDDING, prompt)
        assert len(predictor.prompts) == 1
