"""encoding.coco: COCO compressed RLE, hand-worked strings, round trips, and the same strings as pycocotools."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from hypothesis.extra.numpy import arrays

from sam_backend.encoding import coco

# pycocotools (optional, the cross-check) warns about numpy 2's copy keyword on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")



def test_known_rle_strings():
    """Hand-worked: counts [0, 4] -> "04"; from the fourth count on, the difference to the count two before
    is stored; a count of 32 or more spans two 5-bit groups; a negative difference sets the sign bit."""
    assert coco.rle_encode(np.ones((2, 2), bool)) == {"size": [2, 2], "counts": "04"}
    assert coco.rle_counts(np.array([[0, 1], [0, 1]], bool)) == [2, 2]  # column-major
    assert coco.compress_counts([1, 2, 6, 5]) == "1263"  # 5 - 2 = 3
    assert coco.compress_counts([40]) == "X1"  # 40 = 8 + 1 * 32: group 8 with the more flag, then 1
    assert coco.compress_counts([5, 1, 2, 0]) == "512O"  # 0 - 1 = -1: 0x1F, sign bit set -> 'O'
    assert coco.decompress_counts("X1") == [40] and coco.decompress_counts("512O") == [5, 1, 2, 0]


@hypothesis_settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_rle_round_trip(mask):
    encoded = coco.rle_encode(mask)
    assert encoded["size"] == list(mask.shape)
    assert np.array_equal(coco.rle_decode(encoded), mask)
    assert sum(coco.rle_counts(mask)) == mask.size


@hypothesis_settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**7), max_size=12))
def test_counts_compression_round_trip(counts):
    assert coco.decompress_counts(coco.compress_counts(counts)) == counts


@hypothesis_settings(max_examples=100, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_same_strings_as_pycocotools(mask):
    coco_mask = pytest.importorskip("pycocotools.mask")
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert coco.rle_encode(mask)["counts"] == theirs["counts"].decode("ascii")
    assert np.array_equal(coco.rle_decode(theirs), mask)


def test_bad_rle_is_refused():
    with pytest.raises(ValueError, match="cover"):
        coco.rle_decode({"size": [2, 2], "counts": "03"})
    with pytest.raises(ValueError, match="ends inside"):
        coco.decompress_counts("X")
