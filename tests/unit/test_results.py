"""labelstudio.results: a mask as Label Studio brush, polygon and rectangle results (percent coordinates,
ids, scores), which of them config and settings ask for, and the task's prediction."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from sam_backend.encoding import rle
from sam_backend.labelstudio import label_config, results
from sam_backend.settings import Settings

XML = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true"><Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/></RectangleLabels>
  {extra}
</View>"""
POLYGONS = '<PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>'
COMMON = {"image_rotation": 0, "readonly": False}


def config(extra: str = "") -> label_config.ProjectConfig:
    return label_config.parse(XML.replace("{extra}", extra))


def block(height: int = 20, width: int = 40) -> np.ndarray:
    """A mask of rows 5..9 and columns 10..29."""
    mask = np.zeros((height, width), bool)
    mask[5:10, 10:30] = True
    return mask


def test_brush_region_carries_the_mask_as_rle():
    mask = block()
    mask[7, 15] = False  # a hole: the brush keeps it
    region = results.brush_region(mask, from_name="tag", to_name="image", label="Cat", score=0.87654,
                                  new_id=lambda: "id1")
    assert {k: v for k, v in region.items() if k != "value"} == {
        "id": "id1", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 40,
        "original_height": 20, "score": 0.8765, **COMMON}
    value = region["value"]
    assert value["format"] == "rle" and value["brushlabels"] == ["Cat"]
    assert np.array_equal(rle.decode(value["rle"], 20, 40) > 0, mask)
    sdk = decode_rle(value["rle"]).reshape(20, 40, 4)[:, :, 3]  # what Label Studio's own decoder reads
    assert np.array_equal(sdk > 0, mask)


@pytest.mark.parametrize("score, shown", [(1.7, 1.0), (-0.2, 0.0), (0.123456, 0.1235), (np.float32(0.5), 0.5)])
def test_scores_are_clamped_to_zero_one_with_four_decimals(score, shown):
    made = [results.brush_region(block(), from_name="t", to_name="i", label="C", score=score),
            results.rectangle_region(block(), from_name="t", to_name="i", label="C", score=score),
            *results.polygon_regions(block(), from_name="t", to_name="i", label="C", score=score)]
    assert [r["score"] for r in made] == [shown] * 3
    assert all(type(r["score"]) is float for r in made)


def test_every_region_gets_a_fresh_ten_character_id():
    mask = block()
    mask[15:19, 0:5] = True  # a second part: two polygons
    made = [results.brush_region(mask, from_name="t", to_name="i", label="C", score=1) for _ in range(20)]
    made += results.polygon_regions(mask, from_name="p", to_name="i", label="C", score=1)
    ids = [r["id"] for r in made]
    assert len(set(ids)) == len(ids) == 22
    assert all(len(i) == 10 and int(i, 16) >= 0 for i in ids)


def test_rectangle_region_in_percent_of_the_image():
    region = results.rectangle_region(block(), from_name="tag3", to_name="image", label="Cat", score=0.5)
    assert region["type"] == "rectanglelabels" and region["from_name"] == "tag3"
    assert region["value"] == {"x": 25.0, "y": 25.0, "width": 50.0, "height": 25.0, "rotation": 0,
                               "rectanglelabels": ["Cat"]}
    assert results.rectangle_region(np.zeros((4, 4), bool), from_name="r", to_name="i", label="C", score=1) is None


def test_polygon_region_in_percent_of_the_image():
    (region,) = results.polygon_regions(block(), from_name="poly", to_name="image", label="Cat", score=0.5)
    assert region["type"] == "polygonlabels" and region["value"]["closed"] is True
    assert region["value"]["polygonlabels"] == ["Cat"]
    assert sorted(map(tuple, region["value"]["points"])) == [(25.0, 25.0), (25.0, 50.0), (75.0, 25.0),
                                                             (75.0, 50.0)]
    with pytest.raises(ValueError, match="2-D"):
        results.polygon_regions(np.zeros((2, 2, 2)), from_name="p", to_name="i", label="C", score=1)


def test_mask_results_follow_config_and_settings():
    def kinds(parsed, **changes):
        made = results.mask_results(block(), 0.9, ("tag", "Cat"), "image", parsed, Settings(**changes))
        assert all(r["to_name"] == "image" for r in made)
        return [(r["type"], r["from_name"], r["value"][r["type"]]) for r in made]

    brush = ("brushlabels", "tag", ["Cat"])
    assert kinds(config()) == [brush]  # a smart rectangle tag alone gets no boxes
    assert kinds(config(POLYGONS)) == [brush]  # a PolygonLabels tag alone (the seed's, for drawing by hand) neither
    assert kinds(config(POLYGONS), out_poly=True) == [brush, ("polygonlabels", "poly", ["Cat"])]
    assert kinds(config(POLYGONS), out_poly=True, out_bbox=True) == [brush, ("polygonlabels", "poly", ["Cat"]),
                                                                     ("rectanglelabels", "tag3", ["Cat"])]
    assert kinds(config(POLYGONS), out_poly=True, out_mask=False) == [("polygonlabels", "poly", ["Cat"])]


def test_outputs_follow_the_seed_aliases():
    xml = """<View><Image name="img" value="$url"/>
      <BrushLabels name="brush" toName="img"><Label value="1" alias="1_brush"/></BrushLabels>
      <KeypointLabels name="kp" toName="img"><Label value="(+1)" alias="1"/><Label value="(-1)" alias="-1"/>
      </KeypointLabels>
      <RectangleLabels name="box" toName="img"><Label value="[1]" alias="1"/></RectangleLabels></View>"""
    made = results.mask_results(block(), 0.9, ("brush", "1"), "img", label_config.parse(xml),
                                Settings(out_bbox=True))
    assert [(r["from_name"], r["value"][r["type"]]) for r in made] == [("brush", ["1"]), ("box", ["[1]"])]


def test_a_missing_output_tag_is_warned_about_once(caplog):
    results._warn_once.cache_clear()  # once per process: an earlier test (a Dog click with OUT_POLY) may have warned
    with caplog.at_level(logging.WARNING, logger="sam_backend.labelstudio.results"):
        for _ in range(3):
            made = results.mask_results(block(), 0.9, ("tag", "Dog"), "image", config(POLYGONS),
                                        Settings(out_poly=True, out_mask=False))
            assert made == []
    assert caplog.text.count("no PolygonLabels tag on 'image' with a label for brush label 'Dog'") == 1


def test_task_result_means_the_scores():
    regions = [{"score": 0.5}, {"score": 0.8}, {"score": 0.81234}]
    assert results.task_result(regions, "MobileSAM-x") == {"result": regions, "score": 0.7041,
                                                           "model_version": "MobileSAM-x"}
    assert results.task_result([], "v") == {"result": [], "score": 0.0, "model_version": "v"}
