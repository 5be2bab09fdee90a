"""Masks as PolygonLabels / RectangleLabels results: exact borders, percent coordinates, components, holes,
which config and settings produce them, and the outputs over real HTTP."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import requests
from hypothesis import given, settings as hypothesis_settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from sam_backend.labelstudio import label_config
from sam_backend.encoding import outlines
from sam_backend.labelstudio import results
from sam_backend.sam.types import Prompt
from tools.harness.recordings import CHELSEA, decoded, recorded, with_image
from tools.harness.scenes import all_scenes, extra_scenes, interior_point, iou, scene
from sam_backend.settings import Settings

NATIVE = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true"><Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/></RectangleLabels>
  {extra}
</View>"""
POLYGONS = '<PolygonLabels name="poly" toName="image"><Label value="Cat"/><Label value="Bird"/></PolygonLabels>'


def config(extra: str = "") -> label_config.ProjectConfig:
    return label_config.parse(NATIVE.replace("{extra}", extra))


def region_points(region: dict) -> np.ndarray:
    """Pixel-edge coordinates of a polygon result."""
    width, height = region["original_width"], region["original_height"]
    return np.array(region["value"]["points"], np.float64) * [width / 100, height / 100]


def rasterised(regions: list[dict]) -> np.ndarray:
    height, width = regions[0]["original_height"], regions[0]["original_width"]
    return outlines.rasterise([region_points(r) for r in regions], height, width)


@pytest.fixture(scope="module")
def sam_masks(torch_predictor):
    """MobileSAM's one-click masks of every scene (real weights), by scene name."""
    masks = {}
    for item in all_scenes() + extra_scenes():
        embedding = torch_predictor.embed(item.image)
        prompt = Prompt(np.array([interior_point(item.mask)], np.float32), np.array([1], np.int32))
        masks[item.name] = torch_predictor.decode(embedding, prompt).mask
    return masks


# ---- polygons --------------------------------------------------------------------------------------------
def test_polygons_rerasterise_to_the_mask(sam_masks):
    """Default tolerance: IoU >= 0.95 with every real mask (hole-free here, or compared filled)."""
    for name, mask in sam_masks.items():
        regions = results.polygon_regions(mask, from_name="poly", to_name="image", label="Cat", score=0.9)
        assert regions, name
        filled = ndimage.binary_fill_holes(mask)
        assert iou(rasterised(regions), filled) >= 0.95, name
        truth = scene(name).mask
        assert iou(rasterised(results.polygon_regions(truth, from_name="p", to_name="i", label="C", score=1)),
                   ndimage.binary_fill_holes(truth)) >= 0.95, name


def test_tolerance_zero_is_exact(sam_masks):
    for name, mask in sam_masks.items():
        borders = outlines.polygons(mask, tolerance=0, min_area=0)
        assert np.array_equal(outlines.rasterise(borders, *mask.shape), ndimage.binary_fill_holes(mask)), name


@hypothesis_settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_exact_border_on_any_mask(mask):
    """Any pixel pattern (diagonal touches, one-pixel lines, border pixels) comes back exactly, holes filled."""
    borders = outlines.polygons(mask, tolerance=0, min_area=0)
    assert np.array_equal(outlines.rasterise(borders, *mask.shape), ndimage.binary_fill_holes(mask))
    for border in borders:
        assert border[:, 0].min() >= 0 and border[:, 0].max() <= mask.shape[1]
        assert border[:, 1].min() >= 0 and border[:, 1].max() <= mask.shape[0]


def test_coarser_tolerance_gives_fewer_points(sam_masks):
    mask = sam_masks["horse-coffee-grass"]
    counts = [sum(len(b) for b in outlines.polygons(mask, tolerance)) for tolerance in (0, 0.5, 1, 2, 4)]
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0] / 10


def test_percent_coordinates_stay_within_the_image():
    mask = np.ones((30, 40), bool)
    mask[10:20, 10:30] = False  # a hole: dropped
    (region,) = results.polygon_regions(mask, from_name="poly", to_name="image", label="Cat", score=0.5)
    points = np.array(region["value"]["points"])
    assert points.min() == 0 and points.max() == 100
    assert sorted(map(tuple, points.tolist())) == [(0, 0), (0, 100), (100, 0), (100, 100)]


def test_percent_coordinates_of_real_masks_are_in_range(sam_masks):
    for mask in sam_masks.values():
        for region in results.polygon_regions(mask, from_name="poly", to_name="image", label="Cat", score=0.5):
            points = np.array(region["value"]["points"])
            assert len(points) >= 3 and points.min() >= 0 and points.max() <= 100
            assert region["value"]["closed"] is True


def test_each_component_is_its_own_region_largest_first():
    item = scene("pair-coffee-brick")
    regions = results.polygon_regions(item.mask, from_name="poly", to_name="image", label="Cat", score=0.8)
    assert len(regions) == 2 and len({r["id"] for r in regions}) == 2
    parts = [rasterised([r]) for r in regions]
    assert not (parts[0] & parts[1]).any()
    assert iou(parts[0] | parts[1], item.mask) >= 0.99
    mask = np.zeros((50, 50), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[30:35, 30:45] = True  # 75 px
    mask[45:48, 2:5] = True  # 9 px: a speckle under the default min_area
    regions = results.polygon_regions(mask, from_name="poly", to_name="image", label="Cat", score=0.8)
    assert [rasterised([r]).sum() for r in regions] == [400, 75]
    assert len(outlines.polygons(mask, min_area=0)) == 3


def test_holes_are_filled_and_what_that_costs():
    """Label Studio polygons have no holes: the ring's polygon is its outer border, IoU = area / filled area."""
    ring = scene("ring-rocket-gravel").mask
    (region,) = results.polygon_regions(ring, from_name="poly", to_name="image", label="Cat", score=0.8)
    filled = ndimage.binary_fill_holes(ring)
    assert iou(rasterised([region]), filled) >= 0.99
    loss = iou(rasterised([region]), ring)
    assert loss == pytest.approx(ring.sum() / filled.sum(), abs=0.01)
    assert 0.75 < loss < 0.82  # the documented 0.79
    island = np.zeros((40, 40), bool)
    island[5:35, 5:35] = True
    island[10:30, 10:30] = False
    island[17:23, 17:23] = True  # an island inside the hole: covered by the outer polygon, not repeated
    assert len(outlines.polygons(island, min_area=0)) == 1


def test_polygon_result_fields():
    mask = np.zeros((30, 40), bool)
    mask[3:9, 4:16] = True
    (region,) = results.polygon_regions(mask, from_name="poly", to_name="image", label="Cat", score=1.7)
    assert region["type"] == "polygonlabels" and region["from_name"] == "poly" and region["to_name"] == "image"
    assert (region["original_width"], region["original_height"], region["image_rotation"]) == (40, 30, 0)
    assert isinstance(region["id"], str) and region["id"] and region["score"] == 1.0
    assert region["value"]["polygonlabels"] == ["Cat"]
    assert sorted(map(tuple, region["value"]["points"])) == [(10, 10), (10, 30), (40, 10), (40, 30)]
    assert results.polygon_regions(np.zeros((5, 5), bool), from_name="p", to_name="i", label="C", score=1) == []


# ---- rectangles ------------------------------------------------------------------------------------------
def test_rectangle_is_the_masks_bounding_box(sam_masks):
    for name, mask in sam_masks.items():
        region = results.rectangle_region(mask, from_name="tag3", to_name="image", label="Cat", score=0.7)
        height, width = mask.shape
        ys, xs = np.nonzero(mask)
        value = region["value"]
        assert value["x"] * width / 100 == pytest.approx(xs.min(), abs=1e-3)
        assert value["y"] * height / 100 == pytest.approx(ys.min(), abs=1e-3)
        assert (value["x"] + value["width"]) * width / 100 == pytest.approx(xs.max() + 1, abs=1e-3)
        assert (value["y"] + value["height"]) * height / 100 == pytest.approx(ys.max() + 1, abs=1e-3)
        assert value["rotation"] == 0 and value["rectanglelabels"] == ["Cat"]
        assert region["type"] == "rectanglelabels" and region["image_rotation"] == 0
        assert (region["original_width"], region["original_height"]) == (width, height), name
    full = results.rectangle_region(np.ones((7, 9), bool), from_name="r", to_name="i", label="C", score=1)["value"]
    assert (full["x"], full["y"], full["width"], full["height"]) == (0, 0, 100, 100)
    assert results.rectangle_region(np.zeros((7, 9), bool), from_name="r", to_name="i", label="C", score=1) is None


# ---- which outputs a config and the settings ask for ----------------------------------------------------
def test_output_tags_are_discovered_per_image_and_label():
    parsed = config(POLYGONS)
    assert parsed.output_tag("polygonlabels", "image", ("tag", "Cat")) == ("poly", "Cat")
    assert parsed.output_tag("polygonlabels", "image", ("tag", "Dog")) is None  # poly has no Dog
    assert parsed.output_tag("rectanglelabels", "image", ("tag", "Dog")) == ("tag3", "Dog")
    assert parsed.output_tag("polygonlabels", "other", ("tag", "Cat")) is None
    assert config().output_tag("polygonlabels", "image", ("tag", "Cat")) is None


def test_output_tags_follow_the_seed_aliases():
    xml = recorded("alias_rectangle")["label_config"]
    parsed = label_config.parse(xml)
    assert parsed.output_tag("rectanglelabels", "image", ("brush", "1")) == ("tag4", "[1]")
    polygon = xml.replace("</View>", '<PolygonLabels name="p" toName="image"><Label value="2"/></PolygonLabels></View>')
    assert label_config.parse(polygon).output_tag("polygonlabels", "image", ("brush", "2")) == ("p", "2")


def test_outline_results_follow_config_and_settings(caplog):
    mask = np.zeros((20, 30), bool)
    mask[4:12, 5:20] = True

    def kinds(parsed, **changes):
        made = results.outline_results(mask, 0.9, ("tag", "Cat"), "image", parsed, Settings(**changes))
        return [r["type"] for r in made]

    assert kinds(config()) == []  # a smart rectangle tag alone gets no boxes
    assert kinds(config(POLYGONS)) == []  # polygons only with OUT_POLY
    assert kinds(config(POLYGONS), out_poly=True) == ["polygonlabels"]
    assert kinds(config(POLYGONS), out_poly=True, out_bbox=True) == ["polygonlabels", "rectanglelabels"]
    assert kinds(config(), out_bbox=True) == ["rectanglelabels"]
    with caplog.at_level(logging.WARNING, logger="sam_backend.labelstudio.results"):
        assert kinds(config(), out_poly=True) == []
    assert "no PolygonLabels tag" in caplog.text


# ---- over real HTTP --------------------------------------------------------------------------------------
def _post(backend, body):
    answer = requests.post(backend.url + "/predict", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["result"]


def _click_body(chelsea_path, task_id, xml=None):
    body = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=task_id)
    if xml is not None:
        body["label_config"] = xml
    return body


@pytest.fixture(scope="module")
def chelsea_path(fake_label_studio):
    return fake_label_studio.add_image("/data/upload/2/chelsea.jpg", CHELSEA)


def test_server_adds_polygons_with_out_poly(live_backend, base_settings, torch_predictor, chelsea_path):
    from conftest import make_live_backend

    body = _click_body(chelsea_path, 501, NATIVE.replace("{extra}", POLYGONS))
    # by default (the seed's out_poly=False) a PolygonLabels tag gets nothing: it may be there to draw by hand
    assert [r["type"] for r in _post(live_backend, body)] == ["brushlabels"]
    backend = make_live_backend(base_settings, torch_predictor, out_poly=True)
    try:
        results = _post(backend, body)
    finally:
        backend.close()
    brush = [r for r in results if r["type"] == "brushlabels"]
    polygons = [r for r in results if r["type"] == "polygonlabels"]
    assert len(brush) == 1 and polygons and not [r for r in results if r["type"] == "rectanglelabels"]
    assert all(r["from_name"] == "poly" and r["to_name"] == "image" and r["value"]["polygonlabels"] == ["Cat"]
               for r in polygons)
    assert all(r["score"] == brush[0]["score"] for r in polygons)
    assert len({r["id"] for r in results}) == len(results)
    mask = decoded(brush[0])
    assert iou(rasterised(polygons), ndimage.binary_fill_holes(mask)) >= 0.95
    # the recorded config (no PolygonLabels tag, a smart RectangleLabels tag) gets the brush region only
    assert [r["type"] for r in _post(live_backend, _click_body(chelsea_path, 502))] == ["brushlabels"]


def test_polygon_tolerance_is_a_setting(base_settings, torch_predictor, chelsea_path):
    """POLYGON_TOLERANCE=0 sends the exact pixel border (which re-rasterises to the brush mask exactly); the
    default 1 px sends far fewer points."""
    from conftest import make_live_backend
    from sam_backend.settings import from_environment

    assert from_environment({"POLYGON_TOLERANCE": "0"}).polygon_tolerance == 0
    with pytest.raises(ValueError, match="POLYGON_TOLERANCE"):
        from_environment({"POLYGON_TOLERANCE": "-1"})
    xml = NATIVE.replace("{extra}", POLYGONS)
    points = {}
    for tolerance in (0.0, 1.0):
        backend = make_live_backend(base_settings, torch_predictor, polygon_tolerance=tolerance, out_poly=True)
        try:
            results = _post(backend, _click_body(chelsea_path, 505 + int(tolerance), xml))
        finally:
            backend.close()
        polygons = [r for r in results if r["type"] == "polygonlabels"]
        points[tolerance] = sum(len(r["value"]["points"]) for r in polygons)
        if tolerance == 0:
            (brush,) = [r for r in results if r["type"] == "brushlabels"]
            assert iou(rasterised(polygons), ndimage.binary_fill_holes(decoded(brush))) >= 0.999
    assert points[1.0] * 3 < points[0.0], points


def test_server_adds_a_rectangle_with_out_bbox(base_settings, torch_predictor, chelsea_path):
    from conftest import make_live_backend

    backend = make_live_backend(base_settings, torch_predictor, out_bbox=True)
    try:
        results = _post(backend, _click_body(chelsea_path, 503))
        brush, rectangle = results
        assert brush["type"] == "brushlabels" and rectangle["type"] == "rectanglelabels"
        assert rectangle["from_name"] == "tag3" and rectangle["value"]["rectanglelabels"] == ["Cat"]
        mask = decoded(brush)
        ys, xs = np.nonzero(mask)
        value, width, height = rectangle["value"], rectangle["original_width"], rectangle["original_height"]
        assert value["x"] * width / 100 == pytest.approx(xs.min(), abs=1e-3)
        assert (value["y"] + value["height"]) * height / 100 == pytest.approx(ys.max() + 1, abs=1e-3)
    finally:
        backend.close()


def test_server_without_out_mask_sends_only_the_outlines(base_settings, torch_predictor, chelsea_path):
    from conftest import make_live_backend

    backend = make_live_backend(base_settings, torch_predictor, out_mask=False, out_bbox=True, out_poly=True)
    try:
        body = _click_body(chelsea_path, 504, NATIVE.replace("{extra}", POLYGONS))
        types = [r["type"] for r in _post(backend, body)]
        assert "brushlabels" not in types and "rectanglelabels" in types and "polygonlabels" in types
    finally:
        backend.close()
