"""SAM's mask geometry: the strip-wise upscaling of large images gives the one-piece masks in bounded memory."""
from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from sam_backend.sam import transforms


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
