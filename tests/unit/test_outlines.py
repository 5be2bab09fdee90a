"""encoding.outlines without a model: exact borders, their area and rasterisation, the tight box."""
from __future__ import annotations

import numpy as np
import pytest

from sam_backend.encoding import outlines


def test_exact_border_area_box_and_rasterisation():
    mask = np.zeros((12, 16), bool)
    mask[2:7, 3:11] = True
    mask[4, 6] = False  # a hole: filled in the polygon, counted in the area
    mask[9:11, 13:15] = True  # a small second part
    big, small = outlines.polygons(mask, tolerance=0, min_area=0)
    assert outlines.pixel_area(big) == 40 and outlines.pixel_area(small) == 4
    (simplified, _) = outlines.polygons(mask, tolerance=1, min_area=0)
    assert sorted(map(tuple, simplified.tolist())) == [(3, 2), (3, 7), (11, 2), (11, 7)]  # pixel corners
    filled = mask.copy()
    filled[4, 6] = True
    assert np.array_equal(outlines.rasterise([big, small], 12, 16), filled)
    (only,) = outlines.polygons(mask, tolerance=0, min_area=5)  # the small part is a speckle
    assert np.array_equal(only, big)
    assert outlines.bounding_box(mask) == (3, 2, 15, 11)
    assert outlines.bounding_box(np.zeros((3, 3), bool)) is None and outlines.polygons(np.zeros((3, 3))) == []


def test_pixel_area_of_any_polygon():
    assert outlines.pixel_area(np.array([[0.0, 0.0], [4.5, 0.0], [0.0, 2.0]])) == pytest.approx(4.5)
    assert outlines.pixel_area(np.array([[0, 0], [0, 3], [2, 3], [2, 0]])) == 6  # either orientation


def test_bad_masks_and_tolerances_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        outlines.check_mask(np.zeros(4))
    with pytest.raises(ValueError, match="tolerance"):
        outlines.polygons(np.ones((2, 2), bool), tolerance=-1)
