"""The click simulation of tools/quality.py: the RITM protocol on synthetic masks, and one real GrabCut object
through the server over loopback HTTP (real MobileSAM weights, the data read in place from ../shared)."""
from __future__ import annotations

import numpy as np
import pytest

from tools import quality


def rectangle(shape, top, left, bottom, right) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


def test_no_error_means_no_click():
    truth = rectangle((40, 50), 10, 10, 30, 40)
    assert quality.error_click(truth.copy(), truth) is None


def test_false_negative_region_gets_a_positive_click_at_its_centre():
    truth = rectangle((60, 80), 10, 10, 50, 70)
    prediction = truth & ~rectangle((60, 80), 20, 40, 41, 61)  # a 21x21 hole, centre (50, 30)
    assert quality.error_click(prediction, truth) == quality.Click(50.0, 30.0, positive=True)


def test_deeper_region_wins_and_ignore_pixels_are_no_error():
    truth = rectangle((60, 80), 10, 10, 50, 40)
    prediction = truth.copy()
    prediction[12:15, 12:15] = False  # a shallow miss
    prediction |= rectangle((60, 80), 20, 55, 31, 66)  # a deep spill, centre (60, 25)
    assert quality.error_click(prediction, truth) == quality.Click(60.0, 25.0, positive=False)
    ignore = rectangle((60, 80), 18, 53, 33, 68)  # the spill lies in the ignore band: the miss is left
    click = quality.error_click(prediction, truth, ignore)
    assert click.positive and 12 <= click.x < 15 and 12 <= click.y < 15


def test_iou_leaves_the_ignore_band_out():
    truth = rectangle((20, 20), 5, 5, 15, 15)
    band = rectangle((20, 20), 4, 4, 16, 16) & ~rectangle((20, 20), 6, 6, 14, 14)
    assert quality.iou(rectangle((20, 20), 4, 4, 16, 16), truth, band) == 1.0


def test_run_numbers():
    run = quality.Run(ious=[0.5, 0.86, 0.8, 0.92, 0.95])
    assert run.noc(0.85, 20) == 2 and run.noc(0.90, 20) == 4 and run.noc(0.99, 20) == 20
    assert run.drops() == 1 and run.iou_at(1) == 0.5 and run.iou_at(9) == 0.95


def through_server(predictor, item: quality.Item, max_clicks: int, boxes: bool = True,
                   box_margin: float = 0.0) -> tuple[quality.Run, int]:
    """`quality.simulate` of `item` through a fresh backend around `predictor`, Label Studio's bodies over HTTP:
    (the run, the embeddings the backend computed)."""
    backend = quality.Backend(predictor)
    try:
        return quality.simulate(quality.server_decoder(backend, item, 1), item, max_clicks, boxes, box_margin), \
            backend.model.cache.computed
    finally:
        backend.close()


def test_grabcut_object_through_the_server(torch_predictor):
    """Label Studio's bodies over HTTP: the first click finds the object, every click is resent, the box works."""
    item = quality.folder_items(quality.GRABCUT20, 128, ["86016"])[0]
    assert item.ignore.any() or item.truth.any()
    run, _ = through_server(torch_predictor, item, max_clicks=3)
    assert len(run.ious) == 3 and len(run.clicks) == 3 and run.clicks[0].positive
    assert run.ious[0] >= 0.9 and run.box_alone >= 0.9 and max(run.box_after.values()) >= 0.9, (run.ious, run.box_after)


def test_the_second_click_keeps_a_good_mask_through_the_server(torch_predictor):
    """Issue #17's "the second click wrecks good masks": on GrabCut 37073 SAM's single output refined from the
    first mask fell from 0.97 to 0.06 at the second click. Two clicks are now answered as ambiguous (SAM's three
    masks of both clicks) and refinement guards against jumps: none of the first five clicks lowers the IoU by
    more than 0.05 (the no-regression rule of the issue), and each mask stays the object's."""
    item = quality.folder_items(quality.GRABCUT20, 128, ["37073"])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=5, boxes=False)
    assert run.ious[0] >= 0.9, run.ious
    assert run.drops() == 0 and min(run.ious) >= 0.9, run.ious


@pytest.mark.parametrize("name", ["21077", "326038"])
def test_later_negative_clicks_keep_a_good_mask_through_the_server(torch_predictor, name):
    """Issue #17's no-regression rule at the third and fourth clicks. 21077: the simulator's negative click lands
    on the same pixel three times and SAM's single output collapsed (0.91 -> 0.06); 326038: a negative click
    beside the first one took a quarter of the object with it (0.97 -> 0.78). Repeated clicks are decoded once
    and a negative click removes only what lies near it (`refinement.bound_removal`): none of the first six
    clicks lowers the IoU by more than 0.05, and the masks stay the object's."""
    item = quality.folder_items(quality.GRABCUT20, 128, [name])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=6, boxes=False)
    assert not all(c.positive for c in run.clicks[1:]), "the rule under test is a negative click's"
    assert run.drops() == 0 and min(run.ious) >= 0.85, run.ious


@pytest.mark.parametrize("name", ["181079", "37073"])
def test_a_box_after_clicks_is_no_worse_than_the_box_alone_through_the_server(torch_predictor, name):
    """Issue #17's "a box drawn after clicking makes it worse": the box mixed with the clicks gave 0.653 against
    0.968 alone on 181079 after one click, 0.836 against 0.971 on 37073. The box after clicks is now answered by
    `refinement.box_after_clicks` (the box alone is one of its answers): after 1, 2, 3 and all 5 clicks it loses
    at most 0.05 to the box alone."""
    item = quality.folder_items(quality.GRABCUT20, 128, [name])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=5)
    assert run.box_alone >= 0.9 and len(run.box_after) >= 3, (run.box_alone, run.box_after)
    assert all(value >= run.box_alone - 0.05 for value in run.box_after.values()), (run.box_alone, run.box_after)


@pytest.mark.parametrize("name", ["181079", "69020"])
def test_a_box_drawn_by_hand_after_clicks_keeps_the_clicks_mask_through_the_server(torch_predictor, name):
    """A box drawn loosely (a tenth of the object's size beyond it on every side) after clicks: SAM answers the
    box alone with 0.93 on 181079 and with nothing on 69020, and the box with the clicks lost the object
    (181079 after two clicks: 0.32). The clicks' last mask, refined with the box and the clicks, is one of the
    answers now (`refinement.box_after_clicks`): after 1, 2 and 3 clicks the mask stays at 0.9 or more."""
    item = quality.folder_items(quality.GRABCUT20, 128, [name])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=3, box_margin=0.1)
    assert len(run.box_after) == 3, (run.ious, run.box_after)
    assert all(value >= max(0.9, run.box_alone - 0.05) for value in run.box_after.values()), \
        (run.box_alone, run.box_after)


def test_a_box_after_clicks_leaves_out_a_refined_mask_that_misses_the_box_through_the_server(torch_predictor):
    """GrabCut 189080 after three clicks: SAM refines the clicks' mask (0.56, half the object) with the box into
    the same mask and predicts 0.99 for it; the box with the clicks gives 0.98. The refined mask's extent does
    not fit the box, so it is not taken."""
    item = quality.folder_items(quality.GRABCUT20, 128, ["189080"])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=5)
    assert min(run.box_after[3], run.box_after[5]) >= max(0.9, run.box_alone - 0.05), \
        (run.ious, run.box_alone, run.box_after)


@pytest.mark.parametrize("name", ["124084", "37073"])
def test_the_first_click_is_no_worse_than_sams_single_output_through_the_server(torch_predictor, name):
    """Issue #17's "the lone first click is worse than SAM's single-mask output": the server's first click (the
    whole object among SAM's three masks, `transforms.whole_object`) against SAM's single output for the same
    click straight from the predictor. On these two objects the single output is a part of the object (0.07 and
    0.40 on ONNX), the server's answer the object."""
    item = quality.folder_items(quality.GRABCUT20, 128, [name])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=1, boxes=False)
    single = quality.single_output_first(torch_predictor, item)
    assert single < 0.85, f"SAM's single output is already good on {name} ({single:.3f}): the test says nothing"
    assert run.ious[0] >= 0.9 and run.ious[0] >= single - quality.DROP, (run.ious, single)


@pytest.mark.parametrize("dataset, name, least", [("scenes", "horse-rocket-motorcycle", 0.75),
                                                   ("grabcut20", "153093", 0.87)])
def test_the_first_click_passes_over_a_part_sam_is_surest_of_through_the_server(torch_predictor, dataset, name,
                                                                                least):
    """The first click where SAM rates a part of the object highest and the object a few hundredths lower
    (`transforms.whole_object`: margin 0.05, masks that are guesses left out). Within the old margin of 0.03 only
    the part: the horse's head and neck, 0.39, SAM's single output 0.58; 153093's person without the legs,
    0.83. Within 0.05 the object: 0.79 and 0.90 on ONNX."""
    item = quality.dataset_items(dataset, 128, (480, 640), [name])[0]
    run, _ = through_server(torch_predictor, item, max_clicks=1, boxes=False)
    single = quality.single_output_first(torch_predictor, item)
    assert run.ious[0] >= least and run.ious[0] >= single - quality.DROP, (run.ious, single)


@pytest.mark.parametrize("name, after, least", [("106024", 4, 0.935), ("304074", 3, 0.9)])
def test_clicks_on_a_small_object_are_decoded_zoomed_in_through_the_server(torch_predictor, name, after, least):
    """Issue #17's zoom-in: GrabCut objects at a third of their size, one tile of a 3x3 mosaic of GrabCut photos
    (1443 x 963). Decoded in the whole image (ZOOM_IN=false, ONNX) 106024 stays at 0.91 from its second click on
    (the encoder sees too little of its boundary) and 304074 has 0.74 and 0.84 after its third and fourth; with
    the clicks after the first decoded in a crop around the object, embedded on its own (`sam.zoom`), 0.96 and
    0.95 / 0.97. From click `after` on every mask is >= `least`, and no click lowers the IoU by more than 0.05."""
    item = next(i for i in quality.mosaic_items(quality.folder_items(quality.GRABCUT20, 128)) if i.name == name)
    run, embedded = through_server(torch_predictor, item, max_clicks=4, boxes=False)
    assert embedded >= 2, "the image and at least one crop around the object"
    assert run.drops() == 0 and min(run.ious[after - 1:]) >= least, run.ious
