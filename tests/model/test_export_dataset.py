"""tools/export_coco.py --dataset: masks the backend answered over real HTTP (real MobileSAM weights) on real
photos (CHELSEA, GrabCut photos from ../shared), exported to a dataset folder whose images are fetched from a
stand-in Label Studio with its token; COCO decoded by pycocotools equals the masks, YOLO lines rasterised back
keep IoU >= 0.98; tasks without masks, empty masks, several annotators and unfetchable images."""
from __future__ import annotations

import base64
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from sam_backend.encoding import outlines, rle, yolo
from tools import export_coco
from tools.harness.recordings import CHELSEA, recorded, with_image
from tools.harness.scenes import interior_point, iou
from tools.harness.stub_label_studio import TOKEN, FakeLabelStudio

ROOT = Path(__file__).resolve().parents[2]
GRABCUT = ROOT.parent / "shared" / "datasets" / "GrabCut_BSDS20"
GRABCUT_PHOTOS = ("106024", "153077", "304074")  # 304074: the mask that loses most at a 1 px tolerance
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
SEGMENTS = ("brushlabels", "polygonlabels")
CAT_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Cat" smart="true"/>
    <Label value="Dog" smart="true"/></KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels>
</View>"""


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(fake_label_studio) -> dict[int, tuple[str, bytes, np.ndarray | None]]:
    """task id -> (image path in Label Studio, the bytes served, a ground-truth mask to click in or None)."""
    served = {701: ("/data/upload/7/chelsea.jpg", _jpeg(CHELSEA), None)}
    if GRABCUT.is_dir():
        for task_id, name in enumerate(GRABCUT_PHOTOS, 702):
            truth = np.array(Image.open(GRABCUT / "masks" / f"{name}.png").convert("L")) == 255
            served[task_id] = (f"/data/upload/7/{name}.jpg", (GRABCUT / "images" / f"{name}.jpg").read_bytes(), truth)
    for path, data, _ in served.values():
        fake_label_studio.files[path] = data
    return served


@pytest.fixture(scope="module")
def live_backend(base_settings, torch_predictor):
    """The backend over real HTTP with OUT_POLY on, so that its polygons go into the export too."""
    from conftest import make_live_backend

    server = make_live_backend(base_settings, torch_predictor, out_poly=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def answered(live_backend, photos) -> dict[int, list[dict]]:
    """task id -> the regions the backend answered over HTTP: CHELSEA from the recorded Cat clicks (a brush mask
    and polygons), each GrabCut photo from one Dog click at its object's most interior point (a brush mask)."""
    results = {}
    for task_id, (path, data, truth) in photos.items():
        body = with_image(recorded("keypoints_positive_and_negative"), path, task_id=task_id)
        if truth is None:
            body["label_config"] = CAT_CONFIG
        else:
            height, width = truth.shape
            x, y = interior_point(truth)
            click = body["params"]["context"]["result"][0]
            click.update(original_width=width, original_height=height)
            click["value"].update(x=100 * (x + 0.5) / width, y=100 * (y + 0.5) / height, keypointlabels=["Dog"],
                                  labels=["Dog"])
            body["params"]["context"]["result"] = [click]
        answer = requests.post(live_backend.url + "/predict", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        results[task_id] = answer.json()["results"][0]["result"]
        assert results[task_id] and results[task_id][0]["type"] == "brushlabels"
    return results


def _mask(region: dict) -> np.ndarray:
    return rle.decode(region["value"]["rle"], region["original_height"], region["original_width"]) >= 128


def _export(photos, answered) -> list[dict]:
    return [{"id": task_id, "data": {"image": photos[task_id][0]}, "annotations": [{"id": task_id, "result": regions}]}
            for task_id, regions in answered.items()]


def _run(tmp_path: Path, tasks: list, *options: str, url: str, token: str = TOKEN) -> subprocess.CompletedProcess:
    source = tmp_path / "export.json"
    source.write_text(json.dumps(tasks))
    env = dict(os.environ, LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=token)
    return subprocess.run([sys.executable, "-m", "tools.export_coco", str(source), *options], check=False,
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _left_in(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_dataset_round_trip(photos, answered, fake_label_studio, tmp_path):
    target = tmp_path / "dataset"
    done = _run(tmp_path, _export(photos, answered), "--dataset", str(target), "--yolo", "--mmdet-config",
                url=fake_label_studio.url)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert "classes (category id: name):\n  1: Cat\n" in done.stdout
    assert _left_in(tmp_path) == ["dataset", "export.json"]  # no temporary folder left behind
    coco = json.loads((target / "annotations" / "ann.json").read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    assert (target / "classes.txt").read_text().splitlines() == names
    if len(photos) > 1:
        assert names == ["Cat", "Dog"] and "  2: Dog\n" in done.stdout
    images = {image["id"]: image for image in coco["images"]}
    assert sorted(images) == sorted(photos)
    coco_mask = pytest.importorskip("pycocotools.mask")
    coco_api = pytest.importorskip("pycocotools.coco").COCO
    sources = {task_id: [r for r in regions if r["type"] in SEGMENTS] for task_id, regions in answered.items()}
    assert any(r["type"] == "polygonlabels" for r in sources[701])
    api = coco_api(str(target / "annotations" / "ann.json"))  # what mmdetection's loader and evaluator read
    ious, painted_ious = [], []
    for task_id, (path, data, _) in photos.items():
        image = images[task_id]
        assert image["file_name"] == Path(path).name
        assert (target / "images" / image["file_name"]).read_bytes() == data  # the bytes Label Studio served
        annotations = [a for a in coco["annotations"] if a["image_id"] == task_id]
        assert len(annotations) == len(sources[task_id])
        lines = (target / "labels" / (Path(path).stem + ".txt")).read_text().splitlines()
        assert len(lines) == len(annotations)
        for annotation, region, line in zip(annotations, sources[task_id], lines):
            index, ring = yolo.parse_line(line, image["width"], image["height"])
            assert index == annotation["category_id"] - 1
            label = region["value"][region["type"]][0]
            assert names[annotation["category_id"] - 1] == label
            if region["type"] == "polygonlabels":  # a Label Studio polygon goes to YOLO as it is
                points = np.array(region["value"]["points"]) * [image["width"] / 100, image["height"] / 100]
                assert np.allclose(ring, points, atol=1e-6 * image["width"])
                continue
            source = _mask(region)
            assert np.array_equal(api.annToMask(annotation).astype(bool), source)
            encoded = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
            assert np.array_equal(coco_mask.decode(encoded).astype(bool), source)
            assert annotation["area"] == int(source.sum()) == coco_mask.area(encoded)
            ious.append(iou(outlines.rasterise([ring], *source.shape), source))
            painted = np.zeros(source.shape, np.uint8)  # as Ultralytics builds its training masks
            cv2.fillPoly(painted, [np.round(ring).astype(np.int32)], 1)
            painted_ious.append(iou(painted > 0, source))
    print(f"YOLO lines rasterised back (pixel centres): IoU {', '.join(f'{v:.4f}' for v in ious)}; "
          f"with cv2.fillPoly (edges painted): {', '.join(f'{v:.4f}' for v in painted_ious)}")
    assert min(ious) >= 0.98
    data_yaml = (target / "data.yaml").read_text()
    assert "train: images\nval: images\n" in data_yaml and f"nc: {len(names)}" in data_yaml
    assert [line.split(": ", 1)[1] for line in data_yaml.splitlines() if line.startswith("  ")] == \
        [json.dumps(n) for n in names]
    config = runpy.run_path(str(target / "mask_rcnn_config.py"))  # plain Python: no mmdetection needed
    assert config["metainfo"]["classes"] == tuple(names) and config["num_classes"] == len(names)
    assert config["model"]["roi_head"]["mask_head"]["num_classes"] == len(names)
    assert Path(config["data_root"]) == target and (Path(config["val_evaluator"]["ann_file"])).is_file()
    assert (Path(config["data_root"]) / config["train_dataloader"]["dataset"]["data_prefix"]["img"]).is_dir()


def test_masks_as_coco_polygons_keep_holes_and_parts(photos, answered):
    coco_mask = pytest.importorskip("pycocotools.mask")
    coco, _ = export_coco.convert(_export(photos, answered), masks="polygon")
    regions = [r for regions in answered.values() for r in regions if r["type"] in SEGMENTS]
    assert len(regions) == len(coco["annotations"])
    for annotation, region in zip(coco["annotations"], regions):
        if region["type"] != "brushlabels":
            continue
        source = _mask(region)
        assert isinstance(annotation["segmentation"], list) and annotation["area"] == int(source.sum())
        polygons = coco_mask.frPyObjects(annotation["segmentation"], *source.shape)
        decoded = coco_mask.decode(coco_mask.merge(polygons)).astype(bool)
        assert iou(decoded, source) >= 0.98


def test_several_annotators_and_latest(photos, answered, fake_label_studio, tmp_path):
    cat = answered[701]
    tasks = [{"id": 701, "data": {"image": photos[701][0]},
              "annotations": [{"id": 1, "completed_by": 1, "result": cat},
                              {"id": 2, "completed_by": 2, "result": cat[:1]}]}]
    done = _run(tmp_path, tasks, "--dataset", str(tmp_path / "all"), "--yolo", url=fake_label_studio.url)
    assert done.returncode == 0, done.stderr
    assert "task 701: 2 annotations (several annotators?)" in done.stderr and "--latest" in done.stderr
    objects = sum(r["type"] in SEGMENTS for r in cat)
    assert len((tmp_path / "all" / "labels" / "chelsea.txt").read_text().splitlines()) == objects + 1
    done = _run(tmp_path, tasks, "--dataset", str(tmp_path / "latest"), "--yolo", "--latest",
                url=fake_label_studio.url)
    assert done.returncode == 0 and "several annotators" not in done.stderr
    assert len((tmp_path / "latest" / "labels" / "chelsea.txt").read_text().splitlines()) == 1


def test_tasks_without_masks_and_empty_masks(photos, answered, fake_label_studio, tmp_path):
    empty = dict(answered[701][0], value=dict(answered[701][0]["value"], rle=rle.encode(np.zeros((300, 451), bool))))
    tasks = [{"id": 701, "data": {"image": photos[701][0]}, "annotations": [{"result": answered[701][:1]}]},
             {"id": 710, "data": {"image": "/data/upload/7/never-fetched.jpg"}, "annotations": []},
             {"id": 711, "data": {"image": "/data/upload/7/also-never.jpg"}, "annotations": [{"result": [empty]}]},
             {"id": 712, "data": {"image": "/data/upload/7/photo"}, "annotations": [{"result": answered[701][:1]}]}]
    fake_label_studio.files["/data/upload/7/photo"] = photos[701][1]  # no suffix: named for its format
    done = _run(tmp_path, tasks, "--dataset", str(tmp_path / "ds"), "--yolo", url=fake_label_studio.url)
    assert done.returncode == 0, done.stderr
    assert "task 710: no brush or polygon region with a label: left out" in done.stderr
    assert "task 711: a Cat brush mask has no pixel with alpha >= 128: left out" in done.stderr
    assert "tasks 711: no object left to export" in done.stderr
    coco = json.loads((tmp_path / "ds" / "annotations" / "ann.json").read_text())
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [(701, "chelsea.jpg"), (712, "photo.jpg")]
    assert len(coco["annotations"]) == 2
    assert sorted(p.name for p in (tmp_path / "ds" / "images").iterdir()) == ["chelsea.jpg", "photo.jpg"]
    assert sorted(p.name for p in (tmp_path / "ds" / "labels").iterdir()) == ["chelsea.txt", "photo.txt"]
    done = _run(tmp_path, tasks[1:3], "--dataset", str(tmp_path / "none"), url=fake_label_studio.url)
    assert done.returncode == 1 and "no task has an object to export" in done.stderr
    assert "nothing written" in done.stderr and _left_in(tmp_path) == ["ds", "export.json"]


def test_images_that_cannot_be_fetched_leave_no_dataset(photos, answered, fake_label_studio, tmp_path):
    good = {"id": 701, "data": {"image": photos[701][0]}, "annotations": [{"result": answered[701][:1]}]}
    missing = dict(good, id=720, data={"image": "/data/upload/7/gone.jpg"})
    resized = dict(good, id=721, data={"image": "/data/upload/7/small.jpg"})
    fake_label_studio.files["/data/upload/7/small.jpg"] = _jpeg(CHELSEA[::2, ::2])
    done = _run(tmp_path, [good, missing, resized], "--dataset", str(tmp_path / "ds"), "--yolo",
                url=fake_label_studio.url)
    assert done.returncode == 1
    assert "2 of 3 images could not be used" in done.stderr
    assert "task 720 (/data/upload/7/gone.jpg)" in done.stderr and "404" in done.stderr
    assert "task 721 (/data/upload/7/small.jpg): the image is 226x150 but its regions were drawn on 451x300" \
        in done.stderr
    assert _left_in(tmp_path) == ["export.json"]
    done = _run(tmp_path, [good], "--dataset", str(tmp_path / "ds"), url=fake_label_studio.url, token="wrong")
    assert done.returncode == 1 and "legacy token" in done.stderr and TOKEN not in done.stderr
    assert _left_in(tmp_path) == ["export.json"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    done = _run(tmp_path, [good], "--dataset", str(tmp_path / "taken"), url=fake_label_studio.url)
    assert done.returncode == 1 and "exists and is not an empty folder" in done.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    done = _run(tmp_path, [good], "--dataset", str(tmp_path / "taken"), "--force", url=fake_label_studio.url)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "taken" / "keep.txt").exists() and _left_in(tmp_path) == ["export.json", "taken"]


class PresigningLabelStudio(FakeLabelStudio):
    """Label Studio with a cloud storage: GET /tasks/<id>/presign/?fileuri=<base64 URI> (with the token) answers
    303 to a presigned URL, which serves the object without Label Studio's token (as S3 would)."""

    def __init__(self) -> None:
        super().__init__(TOKEN)
        self.objects: dict[str, bytes] = {}  # s3:// URI -> bytes
        self.presigned: list[str] = []

    def app(self, h, body: bytes) -> None:
        parts = urlsplit(h.path)
        if parts.path.startswith("/presigned/"):
            return h.send(200, self.objects[unquote(parts.path[len("/presigned/"):])], {"Content-Type": "image/jpeg"})
        if not self.authorized(h.headers.get("Authorization")):
            return h.send(401, b"{}", {"Content-Type": "application/json"})
        if "/presign/" in parts.path:
            uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
            self.presigned.append(uri)
            return h.send(303, headers={"Location": f"{self.url}/presigned/{quote(uri, safe='')}?X-Amz-Signature=s"})
        self.serve_file(h)


def test_cloud_storage_and_local_files_are_fetched_as_the_server_does(photos, answered, tmp_path):
    """s3:// through Label Studio's presign endpoint for the task; /data/local-files/ from
    LOCAL_FILES_DOCUMENT_ROOT; a Label Studio upload with the token."""
    ls = PresigningLabelStudio()
    try:
        chelsea = photos[701][1]
        ls.objects["s3://bucket/cats/chelsea.jpg"] = chelsea
        ls.files["/data/upload/9/upload.jpg"] = chelsea
        root = tmp_path / "root"
        (root / "photos").mkdir(parents=True)
        (root / "photos" / "local.jpg").write_bytes(chelsea)
        regions = answered[701][:1]
        tasks = [{"id": 731, "data": {"image": "s3://bucket/cats/chelsea.jpg"}, "annotations": [{"result": regions}]},
                 {"id": 732, "data": {"image": "/data/local-files/?d=photos/local.jpg"},
                  "annotations": [{"result": regions}]},
                 {"id": 733, "data": {"image": f"{ls.url}/data/upload/9/upload.jpg"},
                  "annotations": [{"result": regions}]}]
        source = tmp_path / "export.json"
        source.write_text(json.dumps(tasks))
        env = dict(os.environ, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=TOKEN,
                   LOCAL_FILES_DOCUMENT_ROOT=str(root))
        done = subprocess.run([sys.executable, "-m", "tools.export_coco", str(source), "--dataset",
                               str(tmp_path / "ds"), "--no-progress"], check=False, capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr
        assert ls.presigned == ["s3://bucket/cats/chelsea.jpg"]
        assert [r["path"] for r in ls.requests if "local" in r["path"]] == []  # read from the root, not fetched
        images = sorted((tmp_path / "ds" / "images").iterdir())
        assert [p.name for p in images] == ["chelsea.jpg", "local.jpg", "upload.jpg"]
        assert all(p.read_bytes() == chelsea for p in images)
    finally:
        ls.close()
