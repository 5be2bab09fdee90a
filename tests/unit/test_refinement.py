"""sam.refinement: a refined answer that jumps away from the previous mask is caught by a second, fresh decode; a
repeated click is decoded once; a negative click removes only what lies near it."""
from __future__ import annotations

import numpy as np

from sam_backend.sam import refinement
from sam_backend.sam.types import Embedding, Prediction, Prompt, distinct_clicks

PREVIOUS = np.full((1, 256, 256), -5.0, np.float32)
PREVIOUS[:, 64:192, 64:192] = 5.0  # the object's previous mask: a square


def logits_of(top: int, left: int, side: int = 128) -> np.ndarray:
    logits = np.full((1, 256, 256), -5.0, np.float32)
    logits[:, top:top + side, left:left + side] = 5.0
    return logits


class Scripted:
    """Answers a prompt with the previous mask (`mask_input`) by `refined`, one asking for SAM's single output
    (multimask False) by `single` when given, any other (a fresh three-mask answer) by `fresh`."""

    model_version = "scripted"

    def __init__(self, refined: np.ndarray | None = None, fresh: np.ndarray | None = None,
                 single: np.ndarray | None = None) -> None:
        self.refined, self.fresh, self.single = refined, fresh, single
        self.prompts: list[Prompt] = []

    def embed(self, image, original_size=None):
        raise AssertionError("not used")

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        self.prompts.append(prompt)
        if prompt.mask_input is not None:
            logits = self.refined
        else:
            logits = self.single if prompt.multimask is False and self.single is not None else self.fresh
        return Prediction(mask=logits[0] > 0, score=0.9, low_res_logits=logits)


EMBEDDING = Embedding(np.zeros((1, 256, 64, 64), np.float32), (256, 256), (1024, 1024))
# the newest click (last) is positive: negative ones have their removals bounded (tests below)
CLICKS = Prompt(points=np.array([[100, 100], [20, 20], [150, 150]], np.float32), labels=np.array([1, 0, 1], np.int32),
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


class ByScore:
    """Answers the box alone with `alone_score`, the box with clicks with `clicks_score`."""

    def __init__(self, alone_score: float, clicks_score: float) -> None:
        self.alone_score, self.clicks_score = alone_score, clicks_score
        self.prompts: list[Prompt] = []

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        self.prompts.append(prompt)
        alone = len(prompt.points) == 0
        logits = logits_of(0, 0) if alone else logits_of(64, 64)
        return Prediction(mask=logits[0] > 0, score=self.alone_score if alone else self.clicks_score,
                          low_res_logits=logits)


BOX_AFTER_CLICKS = Prompt(points=CLICKS.points, labels=CLICKS.labels, box=np.array([10, 10, 200, 200], np.float32),
                          new_box=True)


def test_a_box_after_clicks_is_answered_by_the_better_of_box_with_clicks_and_box_alone():
    for alone_score, clicks_score, alone_wins in ((0.95, 0.80, True), (0.80, 0.95, False)):
        predictor = ByScore(alone_score, clicks_score)
        answer = refinement.decode(predictor, EMBEDDING, BOX_AFTER_CLICKS)
        assert answer.score == max(alone_score, clicks_score)
        with_clicks, alone = predictor.prompts
        assert len(with_clicks.points) == 3 and with_clicks.mask_input is None
        assert len(alone.points) == 0 and np.array_equal(alone.box, BOX_AFTER_CLICKS.box) and not alone.new_box
        assert np.array_equal(answer.low_res_logits, logits_of(0, 0) if alone_wins else logits_of(64, 64))


class ByKind:
    """Answers the box alone, the box with clicks, and the box with clicks refining `mask_input` each with its own
    (logits, score)."""

    def __init__(self, alone: tuple, clicks: tuple, refined: tuple) -> None:
        self.answers = {"alone": alone, "clicks": clicks, "refined": refined}
        self.prompts: list[Prompt] = []

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        self.prompts.append(prompt)
        kind = "alone" if len(prompt.points) == 0 else "refined" if prompt.mask_input is not None else "clicks"
        logits, score = self.answers[kind]
        return Prediction(mask=logits[0] > 0, score=score, low_res_logits=logits)


BOX = np.array([40, 40, 200, 200], np.float32)  # EMBEDDING's low-resolution cells are its image's pixels


def test_a_box_after_clicks_takes_the_clicks_refined_mask_when_it_fills_the_box_and_scores_best():
    fills = logits_of(40, 40, side=160)  # the box itself
    predictor = ByKind(alone=(fills, 0.90), clicks=(logits_of(40, 40, side=150), 0.93), refined=(fills, 0.97))
    prompt = Prompt(CLICKS.points, CLICKS.labels, box=BOX, mask_input=PREVIOUS, new_box=True)
    answer = refinement.decode(predictor, EMBEDDING, prompt)
    assert answer.score == 0.97 and len(predictor.prompts) == 3
    assert predictor.prompts[-1].mask_input is PREVIOUS and np.array_equal(predictor.prompts[-1].box, BOX)


def test_a_box_after_clicks_leaves_out_an_answer_that_does_not_fill_the_box_however_sure_sam_is():
    fills, part = logits_of(40, 40, side=160), logits_of(40, 40, side=100)  # part: a box fit of 0.39
    for refined, clicks, expected in (((part, 0.99), (fills, 0.93), 0.93),  # the clicks' old mask, kept by SAM
                                      ((fills, 0.95), (part, 0.99), 0.95),  # the clicks without the mask
                                      ((part, 0.99), (part, 0.98), 0.90)):  # only the box alone fits
        predictor = ByKind(alone=(fills, 0.90), clicks=clicks, refined=refined)
        prompt = Prompt(CLICKS.points, CLICKS.labels, box=BOX, mask_input=PREVIOUS, new_box=True)
        assert refinement.decode(predictor, EMBEDDING, prompt).score == expected


def test_a_box_after_clicks_leaves_out_an_answer_that_spills_out_of_the_box():
    fills = logits_of(40, 40, side=160)
    spills = fills.copy()
    spills[:, 40:200, 200:215] = 5.0  # 9 % of it right of the box; its extent still fits the box (IoU 0.91)
    predictor = ByKind(alone=(fills, 0.90), clicks=(spills, 0.99), refined=(spills, 0.98))
    prompt = Prompt(CLICKS.points, CLICKS.labels, box=BOX, mask_input=PREVIOUS, new_box=True)
    assert refinement.decode(predictor, EMBEDDING, prompt).score == 0.90


def test_box_fit_is_the_iou_of_the_box_and_the_masks_extent_and_the_share_outside_it():
    def fit(logits: np.ndarray) -> tuple[float, float]:
        return refinement.box_fit(logits[0] > 0, BOX)

    assert fit(logits_of(40, 40, side=160)) == (1.0, 0.0)
    assert fit(logits_of(40, 40, side=80)) == (0.25, 0.0)
    extent, outside = fit(logits_of(0, 40, side=80))  # rows 0..40 above the box
    assert abs(extent - 40 * 80 / (160 * 160 + 80 * 80 - 40 * 80)) < 1e-6 and outside == 0.5
    assert fit(np.full((1, 256, 256), -1.0, np.float32)) == (0.0, 1.0)
    assert refinement.box_fit(np.ones((20, 30), bool), np.array([-5, -5, 35, 25], np.float32)) == (0.5, 0.0)


def test_clicks_added_to_a_box_are_decoded_once_as_before():
    predictor = ByScore(0.99, 0.5)
    prompt = Prompt(points=CLICKS.points, labels=CLICKS.labels, box=BOX_AFTER_CLICKS.box)
    assert refinement.decode(predictor, EMBEDDING, prompt).score == 0.5 and len(predictor.prompts) == 1


def test_a_repeated_click_is_decoded_once_and_the_newest_click_stays_last():
    points = np.array([[100, 100], [120, 90], [100, 100], [120, 90], [120, 90]], np.float32)
    labels = np.array([1, 0, 1, 0, 1], np.int32)  # (120, 90) negative twice, then positive at the same pixel
    predictor = Scripted(refined=PREVIOUS, fresh=PREVIOUS)
    refinement.decode(predictor, EMBEDDING, Prompt(points, labels, mask_input=PREVIOUS))
    (sent,) = predictor.prompts
    assert sent.points.tolist() == [[100, 100], [120, 90], [120, 90]] and sent.labels.tolist() == [1, 0, 1]
    alone = Prompt(points[:2], labels[:2])
    assert distinct_clicks(alone) is alone
    moved = Prompt(np.array([[100.2, 100.7], [100.9, 100.1]], np.float32), np.array([1, 1], np.int32))
    assert np.allclose(distinct_clicks(moved).points, [[100.9, 100.1]]), "one pixel, the newer click's place"


# the previous mask is the square 64..192; a negative click at (100, 100) is about 37 pixels deep (to the edge at
# 64), so with REMOVAL_REACH 4 it may remove anything of the square (at most 130 pixels from it)
NEGATIVE = Prompt(points=np.array([[128, 128], [100, 100]], np.float32), labels=np.array([1, 0], np.int32),
                  mask_input=PREVIOUS)


def test_a_negative_click_near_the_edge_removes_only_what_lies_near_it():
    """A click 4 pixels inside the square (depth about 5, reach about 20): the answer that drops the square's far
    quarter (columns 160..192) as well as the corner around the click gets the far quarter back; what lies
    within reach of the click stays removed, and the full-size mask is that of the merged logits."""
    click = Prompt(points=np.array([[128, 128], [68, 68]], np.float32), labels=np.array([1, 0], np.int32),
                   mask_input=PREVIOUS)
    answer = logits_of(64, 64)
    answer[:, 64:192, 160:192] = -5.0  # the far quarter lost
    answer[:, 64:76, 64:76] = -5.0  # the corner around the click removed, as asked
    predictor = Scripted(refined=answer, fresh=PREVIOUS)
    result = refinement.decode(predictor, EMBEDDING, click)
    kept = result.low_res_logits[0] > 0
    assert kept[64:192, 160:192].all(), "the far quarter is put back"
    assert not kept[66:70, 66:70].any(), "the pixels around the click stay removed"
    distance = np.hypot(*np.mgrid[:256, :256][::-1] - 68)
    removed = (PREVIOUS[0] > 0) & ~kept
    assert removed.any() and distance[removed].max() <= refinement.REMOVAL_REACH * 5 + 1
    assert np.array_equal(result.mask, kept), "the full-size mask (256x256 image here) follows the merged logits"
    assert result.score == 0.9 and len(predictor.prompts) == 1


def test_a_deep_negative_click_may_remove_a_large_part_and_additions_are_kept():
    answer = logits_of(64, 64)
    answer[:, 64:192, 64:128] = -5.0  # half the square removed, the click's side, to 92 pixels from it
    answer[:, 10:20, 10:20] = 5.0  # and something added far away
    predictor = Scripted(refined=answer, fresh=answer)  # (a jump with no closer fresh answer: kept)
    result = refinement.decode(predictor, EMBEDDING, NEGATIVE)
    assert np.array_equal(result.low_res_logits, answer) and np.array_equal(result.mask, answer[0] > 0)


def test_positive_clicks_and_answers_that_remove_nothing_far_are_kept_as_they_are():
    answer = logits_of(64, 64, side=64)  # three quarters of the square removed
    positive = Prompt(points=NEGATIVE.points, labels=np.array([0, 1], np.int32), mask_input=PREVIOUS)
    for prompt in (positive, Prompt(NEGATIVE.points, NEGATIVE.labels)):  # positive newest; no previous mask
        predictor = Scripted(refined=answer, fresh=answer)
        assert np.array_equal(refinement.decode(predictor, EMBEDDING, prompt).low_res_logits, answer)


def test_the_image_border_is_no_edge_of_the_mask():
    """A false floor along the image's bottom border (rows 200..256, columns 0..128 of the previous mask, beside
    the object): a negative click 3 pixels above the border is as deep as the floor is tall (about 53), not 3
    pixels, so SAM's answer that removes the whole floor stands. (A floor much longer than 4 x its height needs
    more than one click: the reach is a disk.)"""
    previous = logits_of(64, 64)
    previous[:, 200:256, 0:128] = 5.0
    answer = logits_of(64, 64)  # the strip removed, the object kept
    click = Prompt(points=np.array([[128, 128], [30, 252]], np.float32), labels=np.array([1, 0], np.int32),
                   mask_input=previous)
    predictor = Scripted(refined=answer, fresh=answer)
    result = refinement.decode(predictor, EMBEDDING, click)
    assert not (result.low_res_logits[0, 200:256] > 0).any(), "the whole strip stays removed"


TWO_CLICKS = Prompt(points=np.array([[100, 100], [150, 150]], np.float32), labels=np.array([1, 1], np.int32),
                    previous=PREVIOUS)


def test_two_clicks_that_jump_from_the_previous_mask_take_the_single_output_when_it_stays_closer():
    """Two clicks are ambiguous (the whole object of SAM's three masks, no mask_input); the object's last mask
    (`Prompt.previous`) only catches a jump: GrabCut 37073 in a mosaic, zoomed in, went 0.95 -> 0.21 (a mask four
    times the object) where SAM's single output kept 0.98."""
    predictor = Scripted(fresh=logits_of(0, 0, side=250), single=logits_of(66, 66))
    answer = refinement.decode(predictor, EMBEDDING, TWO_CLICKS)
    assert np.array_equal(answer.low_res_logits, predictor.single) and len(predictor.prompts) == 2
    assert predictor.prompts[0].is_ambiguous and predictor.prompts[1].multimask is False


def test_two_clicks_close_to_the_previous_mask_or_without_one_decode_once():
    predictor = Scripted(fresh=logits_of(60, 60, side=136), single=logits_of(0, 0, side=16))
    assert np.array_equal(refinement.decode(predictor, EMBEDDING, TWO_CLICKS).low_res_logits, predictor.fresh)
    predictor = Scripted(fresh=logits_of(0, 0, side=250), single=logits_of(66, 66))
    alone = Prompt(points=TWO_CLICKS.points, labels=TWO_CLICKS.labels)
    assert np.array_equal(refinement.decode(predictor, EMBEDDING, alone).low_res_logits, predictor.fresh)
    assert len(predictor.prompts) == 1


def test_the_single_output_is_not_taken_when_it_ignores_the_newest_click():
    """A negative second click on the first mask: SAM's single output that keeps the mask (and the click in it) is
    closer to the previous mask, but it ignores what the user just said."""
    negative = Prompt(points=np.array([[100, 100], [128, 128]], np.float32), labels=np.array([1, 0], np.int32),
                      previous=PREVIOUS)
    predictor = Scripted(fresh=logits_of(0, 0, side=100), single=logits_of(64, 64))  # the single output: PREVIOUS
    answer = refinement.decode(predictor, EMBEDDING, negative)
    assert np.array_equal(answer.low_res_logits, predictor.fresh) and len(predictor.prompts) == 2
