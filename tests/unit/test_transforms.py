"""SAM's mask geometry: the strip-wise upscaling of large images gives the one-piece masks in bounded memory."""
from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from sam_backend.sam import transforms
from sam_backend.sam.types import Prompt


def smooth_logits(seed: int) -> np.ndarray:
    """(256, 256) float32 logits shaped like a decoder's: smooth blobs, positive and negative, some near 0."""
    noise = np.random.default_rng(seed).standard_normal((256, 256)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), 3) * 40


@pytest.mark.parametrize("size", [(3000, 2500), (2501, 4001), (4097, 977), (1080, 1920)])
def test_strips_give_the_one_piece_mask(size):
    logits = smooth_logits(sum(size))
    in_size = transforms.input_size(size)
    whole = transforms.upscale_logits(logits, in_size, size) > transforms.MASK_THRESHOLD
    strips = transforms.upscale_mask(logits, in_size, size, strip_pixels=0)
    assert strips.shape == size and strips.dtype == bool
    assert 0.05 < whole.mean() < 0.95, "the test logits should cut the image into both parts"
    assert np.array_equal(strips, whole)


def test_a_100_megapixel_mask_needs_little_more_memory_than_itself():
    size = (10_000, 10_000)
    logits = smooth_logits(7)
    tracemalloc.start()
    try:
        mask = transforms.upscale_mask(logits, transforms.input_size(size), size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\n100 Mpx mask: peak {peak / 1e6:.0f} MB traced, the mask {mask.nbytes / 1e6:.0f} MB")
    # One piece: a 400 MB float32 logit image besides the 100 MB mask (600 MB traced).
    assert peak < mask.nbytes + 120e6


def test_whole_object_takes_the_largest_mask_sam_rates_about_as_good():
    logits = np.full((3, 256, 256), -5.0, np.float32)
    logits[0, :10, :10] = 5  # a part
    logits[1, :40, :40] = 5  # a larger part
    logits[2, :, :] = 5  # everything, but most of it in the padding of a wide image
    wide = (256, 1024)  # the image covers the top quarter of the 1024-frame: 64 low-res rows
    assert transforms.whole_object(logits, np.array([0.99, 0.975, 0.80]), wide) == 1  # 0.80: not about as good
    assert transforms.whole_object(logits, np.array([0.99, 0.975, 0.97]), wide) == 2
    assert transforms.whole_object(logits, np.array([0.99, 0.93, 0.80]), wide) == 0
    assert transforms.whole_object(logits, np.array([0.99, 0.93, 0.80]), wide, margin=0.1) == 1
    logits[2, :64, :] = -5  # now empty over the image: the padding does not count
    assert transforms.whole_object(logits, np.array([0.9, 0.9, 0.9]), wide) == 1


def test_stability_is_the_iou_of_the_mask_one_logit_either_side_of_the_threshold():
    logits = np.full((256, 256), -5.0, np.float32)
    logits[:10, :10] = 5.0  # 100 pixels well inside
    logits[10:20, :10] = 0.5  # 100 pixels in the mask, but not above +1
    logits[20:40, :10] = -0.5  # 200 pixels out of it, but above -1
    assert transforms.stability(logits) == pytest.approx(100 / 400)
    assert transforms.stability(logits, offset=0.4) == 1.0  # no logit within 0.4 of the threshold
    assert transforms.stability(np.full((256, 256), -5.0, np.float32)) == 1.0  # nothing either way


def test_whole_object_passes_over_a_larger_mask_that_is_a_guess():
    logits = np.full((3, 256, 256), -5.0, np.float32)
    logits[0, :10, :10] = 5  # a part
    logits[1, :40, :40] = 5  # the object
    logits[2, :80, :80] = 0.5  # larger, rated about as good, but its logits hover around the threshold
    square = (1024, 1024)
    scores = np.array([0.95, 0.99, 0.97])
    assert transforms.whole_object(logits, scores, square) == 1
    assert transforms.whole_object(logits, scores, square, min_stability=0.0) == 2  # without the rule
    logits[1, :40, :40] = 0.5  # both larger masks are guesses: the stable part
    assert transforms.whole_object(logits, scores, square) == 0
    logits[0, :10, :10] = 0.5  # all three are: the largest, as without the rule
    assert transforms.whole_object(logits, scores, square) == 2
    logits[0, :10, :10] = 5
    # the best score is counted over all three: the object at 0.90 is not about as good as the guess at 0.99
    # (208001 of GrabCut20, its second click: counted over the stable ones only, a worse guess got in), the part is
    logits[1, :40, :40] = 5
    assert transforms.whole_object(logits, np.array([0.95, 0.90, 0.99]), square) == 0


def test_an_empty_mask_is_no_stable_whole_object():
    logits = np.full((3, 256, 256), -5.0, np.float32)  # mask 0: empty, all logits far below the threshold
    logits[1, :60, :60] = 0.5  # an object SAM is unsure of
    logits[2, 200:, :] = 5  # only in the padding of a wide image: empty over the image
    wide = (256, 1024)
    assert transforms.whole_object(logits, np.array([0.99, 0.97, 0.98]), wide) == 1


def test_one_click_alone_has_the_wider_margin():
    one = Prompt(np.array([[5.0, 5.0]], np.float32), np.array([1], np.int32))
    two = Prompt(np.array([[5.0, 5.0], [9.0, 9.0]], np.float32), np.array([1, 0], np.int32))
    boxed = Prompt(one.points, one.labels, box=np.array([0, 0, 20, 20], np.float32), multimask=True)
    assert transforms.margin_for(one) == transforms.WHOLE_OBJECT_MARGIN > transforms.CLICKS_MARGIN
    assert transforms.margin_for(two) == transforms.margin_for(boxed) == transforms.CLICKS_MARGIN


def test_in_a_crop_around_the_object_a_mask_that_fills_the_crop_is_not_taken():
    logits = np.full((3, 256, 256), -5.0, np.float32)
    logits[0, 60:90, 60:90] = 5  # a part of the object
    logits[1, 50:120, 40:130] = 5  # the object, in the middle of the crop
    logits[2, 0:256, 0:200] = 5  # the whole photo around it: three edges of the (square) crop's frame
    square = (1024, 1024)
    scores = np.array([0.95, 0.97, 0.975])
    assert transforms.whole_object(logits, scores, square) == 2  # the whole image: the largest is fine
    assert transforms.whole_object(logits, scores, square, enclosed=True) == 1
    logits[1, 0:256, 0:20] = 5  # every mask but the part reaches three edges: the part
    logits[1, 0:20, 0:256] = 5
    assert transforms.whole_object(logits, scores, square, enclosed=True) == 0
    logits[0, 0:256, 250:256], logits[0, 0, :] = 5, 5  # all of them do: chosen as without the rule
    assert transforms.whole_object(logits, scores, square, enclosed=True) == 2
