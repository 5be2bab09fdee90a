"""encoding.yolo and outlines.parts without a model: masks with holes, islands and several parts as one ring
(zero-width bridges), filled back by three rasterisers; YOLO lines; real GrabCut masks within IoU 0.98."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sam_backend.encoding import outlines, yolo
from tools.harness.scenes import iou

# pycocotools (optional, the cross-check) warns about numpy 2's copy keyword on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
GRABCUT = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "GrabCut_BSDS20"


def _awkward_mask() -> np.ndarray:
    """A frame with a hole holding an island, a second part touching the first only at a corner, a speck."""
    mask = np.zeros((20, 24), bool)
    mask[2:14, 3:15] = True
    mask[5:11, 6:12] = False  # the hole
    mask[7:9, 8:10] = True  # an island in it
    mask[14:18, 15:20] = True  # touches the frame at one corner (8-connected: the same component)
    mask[18, 0] = True  # a one-pixel part in the image's corner
    return mask


def test_parts_keep_holes_and_islands():
    mask = _awkward_mask()
    found = outlines.parts(mask, tolerance=0, min_area=0)
    assert [len(holes) for _, holes in found] == [1, 0, 0]  # frame (+ corner part) with its hole, island, speck
    assert [outlines.pixel_area(outer) for outer, _ in found] == [12 * 12 + 4 * 5, 4, 1]
    assert outlines.pixel_area(found[0][1][0]) == 36  # the hole's own pixels (the island inside is its own part)
    rings = [ring for outer, holes in found for ring in (outer, *holes)]
    xor = np.logical_xor.reduce([outlines.rasterise([ring], 20, 24) for ring in rings])
    assert np.array_equal(xor, mask)
    (big, holes), = outlines.parts(mask, tolerance=0, min_area=37)  # hole, island and speck under 37 px
    assert holes == [] and outlines.pixel_area(big) == 164


def test_one_ring_fills_back_to_the_mask_in_every_rasteriser():
    mask = _awkward_mask()
    ring = yolo.mask_ring(mask, tolerance=0, min_area=0)
    assert np.array_equal(outlines.rasterise([ring], 20, 24), mask)
    coco_mask = pytest.importorskip("pycocotools.mask")
    theirs = coco_mask.decode(coco_mask.frPyObjects([ring.ravel().tolist()], 20, 24))[:, :, 0] > 0
    assert np.array_equal(theirs, mask)
    # cv2.fillPoly (Ultralytics' training masks) paints the polygon's edges too: the hole stays open
    painted = np.zeros((20, 24), np.uint8)
    cv2.fillPoly(painted, [np.round(ring).astype(np.int32)], 1)
    assert painted[6, 7] == 0 and painted[3, 4] == 1 and painted[16, 17] == 1


@hypothesis_settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_any_mask_is_one_exact_ring_at_tolerance_zero(mask):
    ring = yolo.mask_ring(mask, tolerance=0, min_area=0)
    assert np.array_equal(outlines.rasterise([ring], *mask.shape), mask)
    per_part = yolo.mask_rings(mask, tolerance=0, min_area=0)
    assert np.array_equal(outlines.rasterise(per_part, *mask.shape), mask)  # COCO: the union of the parts


def test_lines_round_trip_and_bad_lines_are_refused():
    ring = np.array([[0, 0], [451, 0], [451, 300], [0, 150.5]])
    line = yolo.format_line(3, ring, 451, 300)
    assert line.startswith("3 0.000000 0.000000 1.000000 0.000000 1.000000 1.000000 0.000000 0.501667")
    index, back = yolo.parse_line(line, 451, 300)
    assert index == 3 and np.allclose(back, ring, atol=451e-6)
    assert yolo.mask_ring(np.zeros((4, 4), bool)).shape == (0, 2)
    with pytest.raises(ValueError, match="3 points"):
        yolo.format_line(0, ring[:2], 451, 300)
    with pytest.raises(ValueError, match="x y pairs"):
        yolo.parse_line("0 0.1 0.2 0.3 0.4", 10, 10)


@pytest.mark.skipif(not GRABCUT.is_dir(), reason="../shared/datasets/GrabCut_BSDS20 is not beside the repo")
@pytest.mark.parametrize("tolerance, least", [(yolo.EXPORT_TOLERANCE, 0.98), (1.0, 0.97)])
def test_real_object_masks_keep_their_iou_through_a_yolo_line(tolerance, least):
    from PIL import Image

    ious = []
    for path in sorted((GRABCUT / "masks").glob("*.png")):
        mask = np.array(Image.open(path).convert("L")) == 255  # 128: GrabCut's unsure band, left out
        height, width = mask.shape
        line = yolo.format_line(0, yolo.mask_ring(mask, tolerance), width, height)
        ious.append(iou(outlines.rasterise([yolo.parse_line(line, width, height)[1]], height, width), mask))
    print(f"\nGrabCut masks -> one YOLO line ({tolerance} px) -> rasterised: IoU min {min(ious):.4f} "
          f"mean {np.mean(ious):.4f} over {len(ious)}")
    assert len(ious) == 20 and min(ious) >= least
