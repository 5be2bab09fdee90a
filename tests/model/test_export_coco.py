"""tools/export_coco.py: round trips from masks the backend produced (real weights, real HTTP) through a Label
Studio export to COCO and back (the COCO RLE itself: tests/unit/test_coco.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from tools import export_coco
from sam_backend.encoding import outlines
from sam_backend.encoding.coco import rle_decode
from sam_backend.encoding import rle
from tools.harness.recordings import CHELSEA, recorded, with_image
from tools.harness.scenes import iou

ROOT = Path(__file__).resolve().parents[2]
# pycocotools (optional, the cross-check) warns about numpy 2's copy keyword on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/></KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>
</View>"""


# ---- round trips through the backend --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live_backend(base_settings, torch_predictor):
    """The backend over real HTTP with OUT_POLY on, so that its polygons go into the export too."""
    from conftest import make_live_backend

    server = make_live_backend(base_settings, torch_predictor, out_poly=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def chelsea_path(fake_label_studio):
    return fake_label_studio.add_image("/data/upload/2/chelsea.jpg", CHELSEA)


def _predict(backend, body):
    answer = requests.post(backend.url + "/predict", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]["result"]


@pytest.fixture(scope="module")
def backend_results(live_backend, chelsea_path):
    """Regions the backend answered over real HTTP: a Cat (brush + polygons, from a positive and a negative
    click) and a Dog (brush, from a click elsewhere), on the recorded Label Studio body."""
    cat = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=601)
    cat["label_config"] = POLYGON_CONFIG
    dog = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=602)
    clicks = dog["params"]["context"]["result"][:1]
    clicks[0]["value"].update(x=85, y=80, keypointlabels=["Dog"], labels=["Dog"])
    dog["params"]["context"]["result"] = clicks
    return _predict(live_backend, cat), _predict(live_backend, dog)


def _brush_mask(region) -> np.ndarray:
    return rle.decode(region["value"]["rle"], region["original_height"], region["original_width"]) > 0


def _export(cat_regions, dog_regions, chelsea_path) -> list[dict]:
    """What Label Studio's JSON export holds after a user accepted these regions (two tasks, one image)."""
    return [
        {"id": 601, "data": {"image": chelsea_path},
         "annotations": [{"id": 1, "result": cat_regions, "was_cancelled": False}],
         "predictions": []},
        {"id": 602, "data": {"image": chelsea_path + "?v=2"},
         "annotations": [{"id": 2, "result": [], "was_cancelled": True},
                         {"id": 3, "result": dog_regions + [{"type": "choices", "value": {"choices": ["x"]}}]}],
         "predictions": [{"id": 9, "score": 0.5, "result": dog_regions}]},
    ]


def test_brush_masks_survive_the_round_trip(backend_results, chelsea_path):
    cat, dog = backend_results
    coco, stats = export_coco.convert(_export(cat, dog, chelsea_path))
    assert [c["name"] for c in coco["categories"]] == ["Cat", "Dog"]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (601, "chelsea.jpg", 451, 300), (602, "chelsea.jpg", 451, 300)]
    assert stats["brushlabels"] == 2 and stats["skipped choices"] == 1
    brushes = [a for a in coco["annotations"] if isinstance(a["segmentation"], dict)]
    sources = [r for r in cat + dog if r["type"] == "brushlabels"]
    assert len(brushes) == len(sources) == 2
    for annotation, region in zip(brushes, sources):
        source = _brush_mask(region)
        assert annotation["segmentation"]["size"] == [300, 451]
        assert isinstance(annotation["segmentation"]["counts"], str)
        decoded = rle_decode(annotation["segmentation"])
        assert np.array_equal(decoded, source)
        ys, xs = np.nonzero(source)
        assert annotation["area"] == int(source.sum())
        assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        label = region["value"]["brushlabels"][0]
        assert annotation["category_id"] == {"Cat": 1, "Dog": 2}[label] and annotation["iscrowd"] == 0
    coco_mask = pytest.importorskip("pycocotools.mask")
    for annotation, region in zip(brushes, sources):
        rle_object = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        assert np.array_equal(coco_mask.decode(rle_object).astype(bool), _brush_mask(region))
        assert coco_mask.area(rle_object) == annotation["area"]


def test_polygons_come_back_close_to_the_source_mask(backend_results, chelsea_path):
    cat, dog = backend_results
    brush = _brush_mask(next(r for r in cat if r["type"] == "brushlabels"))
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(brush)  # polygons have no holes (outlines.py)
    sources = [r for r in cat if r["type"] == "polygonlabels"]
    assert sources, "the polygon config must give polygons"
    assert cat[0]["type"] == "brushlabels"  # so the Cat's polygons are annotations 2..
    for mode in ("polygon", "rle"):
        coco, stats = export_coco.convert(_export(cat, dog, chelsea_path), polygons=mode)
        polygons = [a for a in coco["annotations"] if a["image_id"] == 601 and a["id"] > 1]
        assert len(polygons) == len(sources) == stats["polygonlabels"]
        masks = []
        for annotation in polygons:
            assert annotation["category_id"] == 1
            if mode == "polygon":
                (flat,) = annotation["segmentation"]
                points = np.array(flat).reshape(-1, 2)
                masks.append(outlines.rasterise([points], 300, 451))
                x, y, w, h = annotation["bbox"]
                assert points[:, 0].min() == pytest.approx(x) and points[:, 1].max() == pytest.approx(y + h)
                assert annotation["area"] == pytest.approx(masks[-1].sum(), rel=0.02)
            else:
                masks.append(rle_decode(annotation["segmentation"]))
                assert annotation["area"] == masks[-1].sum()
        union = np.logical_or.reduce(masks)
        assert iou(union, filled) >= 0.95, mode


def test_polygons_rasterised_by_pycocotools_agree(backend_results, chelsea_path):
    coco_mask = pytest.importorskip("pycocotools.mask")
    cat, dog = backend_results
    coco, _ = export_coco.convert(_export(cat, dog, chelsea_path))
    for annotation in coco["annotations"]:
        if isinstance(annotation["segmentation"], list):
            theirs = coco_mask.decode(coco_mask.frPyObjects(annotation["segmentation"], 300, 451))[:, :, 0] > 0
            ours = outlines.rasterise([np.array(annotation["segmentation"][0]).reshape(-1, 2)], 300, 451)
            assert iou(theirs, ours) >= 0.98


def test_latest_and_predictions(backend_results, chelsea_path):
    cat, dog = backend_results
    export = _export(cat, dog, chelsea_path)
    export[0]["annotations"].append({"id": 4, "result": dog})
    everything, _ = export_coco.convert(export)
    latest, _ = export_coco.convert(export, latest=True)
    assert len(latest["annotations"]) == len(everything["annotations"]) - len(cat)
    predicted, _ = export_coco.convert(export, predictions=True)
    assert [a["image_id"] for a in predicted["annotations"]] == [602]
    assert predicted["annotations"][0]["score"] == dog[0]["score"]
    assert "score" not in everything["annotations"][0]


def test_cli_round_trip(backend_results, chelsea_path, tmp_path):
    cat, dog = backend_results
    source, target = tmp_path / "export.json", tmp_path / "coco.json"
    source.write_text(json.dumps(_export(cat, dog, chelsea_path)))
    done = subprocess.run([sys.executable, "-m", "tools.export_coco", str(source), "-o", str(target)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "2 images, 2 categories" in done.stdout
    coco = json.loads(target.read_text())
    first = coco["annotations"][0]
    assert np.array_equal(rle_decode(first["segmentation"]), _brush_mask(cat[0]))
    source.write_text(json.dumps({"not": "a list"}))
    done = subprocess.run([sys.executable, "-m", "tools.export_coco", str(source), "-o", str(target)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "list of tasks" in done.stderr


def test_soft_brush_edges_follow_the_alpha_threshold():
    alpha = np.zeros((4, 5), np.uint8)
    alpha[1, 1:4] = [255, 128, 40]
    region = {"type": "brushlabels", "original_width": 5, "original_height": 4,
              "value": {"format": "rle", "rle": rle.encode(alpha), "brushlabels": ["Cat"]}}
    tasks = [{"id": 1, "data": {"img": "s3://bucket/a%20b.png"}, "annotations": [{"result": [region]}]}]
    coco, _ = export_coco.convert(tasks)
    assert coco["images"][0]["file_name"] == "a b.png"
    assert rle_decode(coco["annotations"][0]["segmentation"]).sum() == 2
    coco, _ = export_coco.convert(tasks, alpha_threshold=1)
    assert coco["annotations"][0]["area"] == 3
