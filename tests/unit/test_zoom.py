"""sam.zoom: which crop a click on a small object is decoded in, and the way in and out of it."""
from __future__ import annotations

import numpy as np
import pytest

from sam_backend.sam import transforms, zoom
from sam_backend.sam.types import Prompt

SIZE = (963, 1443)  # (H, W): a 3x3 mosaic of GrabCut photos


def logits_of(box: tuple[float, float, float, float], view: zoom.View | None, size=SIZE) -> np.ndarray:
    """(1, 256, 256) logits, +5 on the low-resolution cells whose centres lie in `box` (image pixels), -5 elsewhere,
    for a decode in `view`."""
    height, width = zoom.frame_size(view, size)
    rows, cols = transforms.low_res_extent(transforms.input_size((height, width)))
    left, top = (view[0], view[1]) if view else (0, 0)
    ys = top + (np.arange(rows) + 0.5) * height / rows
    xs = left + (np.arange(cols) + 0.5) * width / cols
    inside = ((ys[:, None] >= box[1]) & (ys[:, None] < box[3]) & (xs[None] >= box[0]) & (xs[None] < box[2]))
    logits = np.full((1, 256, 256), -5.0, np.float32)
    logits[0, :rows, :cols][inside] = 5.0
    return logits


def clicks(*xy: tuple[float, float]) -> Prompt:
    return Prompt(points=np.array(xy, np.float32), labels=np.ones(len(xy), np.int32))


def test_a_small_object_gets_a_crop_twice_its_box_around_it():
    view = zoom.choose(None, logits_of((600, 400, 760, 520), None), clicks((680, 460)), SIZE)
    assert view is not None
    x0, y0, x1, y1 = view
    # twice the box's 160 pixels (to a low-resolution cell, 5.6 pixels here), and the least side for its 120
    assert (x1 - x0) == pytest.approx(2 * 160, abs=14) and (y1 - y0) == pytest.approx(zoom.MIN_SIDE, abs=2)
    assert x0 < 600 and y0 < 400 and x1 > 760 and y1 > 520  # the object in it, with room around
    assert max(SIZE) >= zoom.MIN_GAIN * max(x1 - x0, y1 - y0)


def test_a_large_object_is_decoded_in_the_whole_image():
    assert zoom.choose(None, logits_of((200, 150, 1200, 800), None), clicks((700, 480)), SIZE) is None
    assert zoom.choose(None, np.full((1, 256, 256), -1, np.float32), clicks((700, 480)), SIZE) is None  # empty


def test_the_crop_stays_while_the_mask_and_clicks_stay_in_it_and_moves_when_they_leave():
    first = zoom.choose(None, logits_of((600, 400, 760, 520), None), clicks((680, 460)), SIZE)
    # the mask grew a little inside the crop, a click inside it: the same crop (no new embedding)
    grown = logits_of((590, 395, 770, 530), first)
    assert zoom.choose(first, grown, clicks((680, 460), (765, 500)), SIZE) == first
    # a click outside the crop: a new crop that holds it
    moved = zoom.choose(first, grown, clicks((680, 460), (first[2] + 40, 500)), SIZE)
    assert moved is not None and moved != first and moved[2] > first[2] + 40
    # the mask reaches the crop's edge: a new, larger crop
    edge = logits_of((first[0] + 2, 395, 770, 530), first)
    assert zoom.choose(first, edge, clicks((680, 460)), SIZE) != first


def test_crops_stay_inside_the_image():
    view = zoom.choose(None, logits_of((0, 0, 90, 70), None), clicks((20, 20)), SIZE)
    assert view is not None and view[0] == 0 and view[1] == 0 and view[2] <= SIZE[1] and view[3] <= SIZE[0]


def test_into_and_paste_map_prompts_and_masks_through_the_crop():
    view = (100, 50, 420, 290)
    prompt = Prompt(points=np.array([[150.5, 60.0], [400, 280]], np.float32), labels=np.array([1, 0], np.int32),
                    view=view)
    inside = zoom.into(prompt, view)
    assert np.allclose(inside.points, [[50.5, 10.0], [300, 230]]) and inside.view is None and inside.enclosed
    assert zoom.into(prompt, None) is prompt
    mask = np.zeros((240, 320), bool)
    mask[10:20, 50:60] = True
    full = zoom.paste(mask, view, SIZE)
    assert full.shape == SIZE and full.sum() == 100 and full[60:70, 150:160].all()
    assert zoom.paste(mask, None, SIZE) is mask


def test_crop_pixels_takes_the_view_from_whole_and_reduced_pixels():
    image = np.zeros((400, 600, 3), np.uint8)
    image[100:200, 300:450] = 255
    crop, size = zoom.crop_pixels(image, (400, 600), (300, 100, 450, 200))
    assert crop.shape == (100, 150, 3) and crop.all() and size == (100, 150)
    reduced = image[::2, ::2]  # the pixels of a reduced copy: same crop, half the pixels, the same size
    crop, size = zoom.crop_pixels(reduced, (400, 600), (300, 100, 450, 200))
    assert crop.shape == (50, 75, 3) and crop.all() and size == (100, 150)


@pytest.mark.parametrize("source, target", [(None, (500, 300, 900, 640)), ((500, 300, 900, 640), None),
                                            ((500, 300, 900, 640), (560, 340, 1000, 700))])
def test_logits_carried_into_another_view_keep_the_object_where_it_is(source, target):
    box = (620, 400, 780, 560)
    carried = zoom.project(logits_of(box, source), source, target, SIZE)
    expected = logits_of(box, target)
    rows, cols = transforms.low_res_extent(transforms.input_size(zoom.frame_size(target, SIZE)))
    inside = (carried > 0)[0, :rows, :cols]
    wrong = (inside != (expected > 0)[0, :rows, :cols]).sum()
    assert inside.sum() > 0 and wrong <= 0.15 * (expected > 0).sum(), (wrong, (expected > 0).sum())
    assert (carried[0, rows:, :] < 0).all() and (carried[0, :, cols:] < 0).all()  # the padding: not the object
    assert zoom.project(expected, target, target, SIZE) is expected


def test_a_crop_at_the_image_border_stays_while_the_mask_reaches_that_border():
    """An object at the image's edge: the crop is clipped there, and the mask touching that edge is no reason to
    move it (each move is one more embedding)."""
    first = zoom.choose(None, logits_of((0, 400, 120, 520), None), clicks((40, 460)), SIZE)
    assert first is not None and first[0] == 0
    assert zoom.choose(first, logits_of((0, 395, 125, 525), first), clicks((40, 460), (10, 500)), SIZE) == first


def test_images_decoded_reduced_and_views_of_another_image_are_not_zoomed():
    from sam_backend.images.decode import REDUCE_ABOVE_PIXELS

    assert zoom.MAX_PIXELS == REDUCE_ABOVE_PIXELS  # above it a crop would come from a 2048-pixel copy
    huge = (4000, 6000)
    assert zoom.choose(None, logits_of((2000, 1500, 2300, 1800), None, huge), clicks((2100, 1600)), huge) is None
    # a remembered crop that does not fit the image any more (the URL now holds a smaller one): the whole image
    assert zoom.choose((900, 600, 1300, 900), logits_of((1000, 650, 1100, 750), (900, 600, 1300, 900)),
                       clicks((1050, 700)), (700, 1000)) is None
