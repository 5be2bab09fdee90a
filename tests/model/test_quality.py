"""The click simulation of quality.py: correct on synthetic cases, and MobileSAM (real weights) gets clear scenes
right within three clicks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tools import quality
from sam_backend.sam.types import Prediction, Prompt
from tools.harness.scenes import interior_point, iou, scene

CLEAR_SCENES = ["ellipse-chelsea-gravel", "star-astronaut-brick", "horse-coffee-grass"]


def rectangle(shape, top, left, bottom, right) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


# ---- the next click -------------------------------------------------------------------------------------------
def test_no_error_means_no_click():
    truth = rectangle((40, 50), 10, 10, 30, 40)
    assert quality.error_click(truth.copy(), truth) is None


def test_false_negative_region_gets_a_positive_click_at_its_centre():
    truth = rectangle((60, 80), 10, 10, 50, 70)
    prediction = truth & ~rectangle((60, 80), 20, 40, 41, 61)  # a 21x21 hole, centre (50, 30)
    click = quality.error_click(prediction, truth)
    assert click == quality.Click(50.0, 30.0, positive=True)


def test_largest_region_wins_over_the_other_kind():
    truth = rectangle((60, 80), 10, 10, 50, 40)
    prediction = truth.copy()
    prediction[12:15, 12:15] = False  # 9 false negative pixels
    prediction |= rectangle((60, 80), 20, 55, 31, 66)  # 121 false positive pixels, centre (60, 25)
    click = quality.error_click(prediction, truth)
    assert click == quality.Click(60.0, 25.0, positive=False)
    # and the other way round: a big miss beats a small spill
    prediction = rectangle((60, 80), 10, 10, 50, 25) | rectangle((60, 80), 0, 75, 2, 77)
    click = quality.error_click(prediction, truth)
    assert click.positive and prediction[int(click.y), int(click.x)] == 0 and truth[int(click.y), int(click.x)]


def test_largest_is_one_connected_region_not_the_sum_of_many():
    """Twelve scattered 3x3 false negatives (108 pixels) lose to one 8x8 false positive (64 pixels)."""
    truth = rectangle((100, 100), 0, 0, 100, 50)
    prediction = truth.copy()
    for i in range(12):
        prediction[5 + 8 * i:8 + 8 * i, 20:23] = False
    prediction |= rectangle((100, 100), 40, 70, 48, 78)
    click = quality.error_click(prediction, truth)
    assert not click.positive and 70 <= click.x < 78 and 40 <= click.y < 48


def test_tie_goes_to_the_false_negative_region():
    truth = rectangle((40, 60), 10, 5, 30, 25)
    prediction = truth.copy()
    prediction[15:20, 10:15] = False  # 25 false negatives
    prediction |= rectangle((40, 60), 15, 40, 20, 45)  # 25 false positives
    assert quality.error_click(prediction, truth).positive


def test_first_click_is_the_most_interior_point():
    truth = rectangle((50, 90), 5, 10, 46, 51)  # 41 x 41 pixels, centre (30, 25)
    assert quality.first_click(truth) == quality.Click(30.0, 25.0, positive=True)


def test_tight_box_ends_one_past_the_last_pixel():
    truth = rectangle((50, 90), 5, 10, 45, 80)
    assert quality.tight_box(truth).tolist() == [10, 5, 80, 45]


# ---- the simulation loop, on a scripted predictor ------------------------------------------------------------
class ScriptedPredictor:
    """Answers the k-th decode with masks[k]; records every prompt."""

    model_version = "scripted"

    def __init__(self, masks):
        self.masks = list(masks)
        self.prompts: list[Prompt] = []

    def decode(self, embedding, prompt):
        self.prompts.append(prompt)
        index = len(self.prompts) - 1
        return Prediction(self.masks[index], 0.9, np.full((1, 256, 256), float(index), np.float32))


def test_simulation_clicks_where_the_errors_are_and_feeds_back_logits():
    truth = rectangle((60, 80), 10, 10, 50, 70)
    first = truth & ~rectangle((60, 80), 10, 40, 50, 70)  # right half missing
    second = truth | rectangle((60, 80), 0, 0, 10, 80)  # top strip spilled
    predictor = ScriptedPredictor([first, second, truth, truth, truth, truth])
    run = quality.simulate(predictor, None, truth, refine=True, max_clicks=20, min_clicks=5)
    assert run.ious[:3] == [pytest.approx(iou(first, truth)), pytest.approx(iou(second, truth)), 1.0]
    assert len(run.ious) == 3, "a perfect mask ends the simulation (nothing left to click)"
    assert run.iou_at(5) == 1.0 and run.noc(0.9, 20) == 3
    points = predictor.prompts[-1].points.tolist()
    labels = predictor.prompts[-1].labels.tolist()
    assert labels == [1, 1, 0]
    assert points[0] == list(interior_point(truth))
    assert 40 <= points[1][0] < 70, "the second click goes into the missing right half"
    assert points[2][1] < 10, "the third into the spilled strip above"
    assert predictor.prompts[0].mask_input is None
    assert [float(p.mask_input[0, 0, 0]) for p in predictor.prompts[1:]] == [0.0, 1.0]


def test_without_refinement_no_logits_go_back():
    truth = rectangle((60, 80), 10, 10, 50, 70)
    half = truth & ~rectangle((60, 80), 10, 40, 50, 70)
    predictor = ScriptedPredictor([half] * 4)
    run = quality.simulate(predictor, None, truth, refine=False, max_clicks=4, min_clicks=2)
    assert len(run.ious) == 4 and run.noc(0.85, 4) == 4 and not run.reached(0.85)
    assert all(p.mask_input is None for p in predictor.prompts)


def test_run_numbers():
    run = quality.Run(ious=[0.5, 0.86, 0.8, 0.92, 0.95])
    assert run.noc(0.85, 20) == 2 and run.noc(0.90, 20) == 4 and run.noc(0.99, 20) == 20
    assert run.drops() == 1 and run.iou_at(1) == 0.5 and run.iou_at(9) == 0.95


# ---- real weights ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embeddings(torch_predictor):
    return {name: torch_predictor.embed(scene(name).image) for name in CLEAR_SCENES}


@pytest.mark.parametrize("refine", [True, False], ids=["refine", "fresh"])
@pytest.mark.parametrize("name", CLEAR_SCENES)
def test_clear_scenes_reach_0_9_within_three_clicks(torch_predictor, embeddings, name, refine):
    run = quality.simulate(torch_predictor, embeddings[name], scene(name).mask, refine=refine, max_clicks=3,
                           min_clicks=3)
    assert run.noc(0.90, 99) <= 3, run.ious


def test_box_prompt_on_a_clear_scene(torch_predictor, embeddings):
    name = "ellipse-chelsea-gravel"
    assert quality.box_iou(torch_predictor, embeddings[name], scene(name).mask) >= 0.95


def test_benchmark_report_and_table(torch_predictor):
    report = quality.benchmark(torch_predictor, ["ellipse-chelsea-gravel", "pair-coffee-brick"], (240, 320),
                               clicks=3, max_clicks=6, log=lambda line: None)
    json.dumps(report)
    assert set(report["summary"]) == {"standard", "extra"}
    for group in report["summary"].values():
        for mode in quality.MODES:
            numbers = group[mode]
            assert {"mIoU@1", "mIoU@3", "NoC@85", "NoC@90", "failed@90", "drops", "box_IoU"} <= set(numbers)
            assert 1 <= numbers["NoC@90"] <= 6 and 0 <= numbers["mIoU@3"] <= 1
    scene_report = report["scenes"]["ellipse-chelsea-gravel"]["refine"]
    assert len(scene_report["clicks"]) == len(scene_report["ious"])
    assert "standard(1)" in quality.table(report) and "NoC@90" in quality.table(report)
