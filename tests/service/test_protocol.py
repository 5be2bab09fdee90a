"""The backend over real HTTP, fed the exact bodies a real Label Studio 1.23.2 sent (tools/harness/bodies), with real
MobileSAM weights. Masks are checked against the torch predictor called directly with the prompt the body means.

Every test runs twice: with the server on torch (AdvancedSAM) and on ONNX Runtime (RUN_ONNX_SAM=true; the files
of `make onnx`, or exported for the session), which must give the same masks (IoU >= 0.99)."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import skimage.data

from sam_backend.sam.types import Prompt
from tools.harness.scenes import iou, scene
from tools.harness.recordings import CHELSEA, decoded, recorded, with_image

W, H = 451, 300  # CHELSEA's size


@pytest.fixture(scope="module", params=["torch", "onnx"])
def served_predictor(request):
    """The predictor the server under test uses: MobileSAM on torch, or on ONNX Runtime."""
    return request.getfixturevalue("torch_predictor" if request.param == "torch" else "onnx_server_predictor")


@pytest.fixture(scope="module")
def live_backend(base_settings, served_predictor):
    """This module's server: the session's settings with the predictor of this run."""
    from conftest import make_live_backend

    server = make_live_backend(base_settings, served_predictor)
    yield server
    server.close()


@pytest.fixture(scope="module")
def chelsea_path(fake_label_studio):
    return fake_label_studio.add_image("/data/upload/2/chelsea.jpg", CHELSEA)


@pytest.fixture(scope="module")
def chelsea_embedding(torch_predictor, fake_label_studio, chelsea_path):
    """Embedding of the very JPEG the backend downloads (JPEG changes pixels a little)."""
    from sam_backend.images import ImageLoader

    pixels = ImageLoader.decode(fake_label_studio.files[chelsea_path], 10**8)
    return torch_predictor.embed(pixels)


def post(backend, body, path="/predict"):
    return requests.post(backend.url + path, json=body, timeout=120)


def expected(torch_predictor, embedding, points=(), labels=(), box=None) -> np.ndarray:
    prompt = Prompt(np.array(points, np.float32).reshape(-1, 2), np.array(labels, np.int32),
                    None if box is None else np.array(box, np.float32))
    return torch_predictor.decode(embedding, prompt).mask


def box_of(value: dict) -> list[float]:
    """Pixel box of a rectangle's percent `value`."""
    return [value["x"] * W / 100, value["y"] * H / 100, (value["x"] + value["width"]) * W / 100,
            (value["y"] + value["height"]) * H / 100]


def px(x_percent, y_percent):
    return x_percent * W / 100, y_percent * H / 100


# ---- the routes ----------------------------------------------------------------------------------------
def test_health_and_root_answer_json(live_backend):
    for path in ("/health", "/"):
        answer = requests.get(live_backend.url + path, timeout=5)
        assert answer.status_code == 200
        assert answer.json()["status"] == "UP"
        assert answer.json()["model_loaded"] is True


def test_setup_answers_the_version_predict_uses(live_backend, chelsea_path):
    setup = recorded("add_model", "/setup")
    answer = post(live_backend, setup, "/setup")
    assert answer.status_code == 200
    version = answer.json()["model_version"]
    body = with_image(recorded("keypoints_positive_and_negative"), chelsea_path)
    assert post(live_backend, body).json()["results"][0]["model_version"] == version


def test_webhook_takes_any_event(live_backend):
    body = recorded("annotation_created", "/webhook")
    answer = post(live_backend, body, "/webhook")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    # "Start training" starts a project job (tests/unit/test_jobs.py, tests/e2e/test_project_job.py): without
    # the project's id there is nothing to start, and the answer says so
    refused = post(live_backend, {"action": "START_TRAINING"}, "/webhook")
    assert refused.status_code == 400 and "body.project.id" in refused.json()["error"]


def test_metrics_count_requests(live_backend):
    requests.get(live_backend.url + "/health", timeout=5)
    metrics = requests.get(live_backend.url + "/metrics", timeout=5).json()
    assert metrics["routes"]["/health"]["count"] >= 1
    assert "embedding_cache" in metrics


# ---- interactive calls as Label Studio sent them ----------------------------------------------------------
def test_positive_and_negative_click(live_backend, torch_predictor, chelsea_embedding, chelsea_path):
    body = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=101)
    answer = post(live_backend, body)
    assert answer.status_code == 200, answer.text
    (task,) = answer.json()["results"]
    (region,) = task["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Cat"] and region["value"]["format"] == "rle"
    assert (region["original_width"], region["original_height"]) == (W, H)
    assert isinstance(region["id"], str) and region["id"]
    assert 0 < region["score"] <= 1 and task["score"] == pytest.approx(region["score"], abs=1e-3)
    clicks = body["params"]["context"]["result"]
    points = [px(c["value"]["x"], c["value"]["y"]) for c in clicks]
    labels = [1 if c.get("is_positive", True) else 0 for c in clicks]
    assert labels == [1, 0]
    truth = expected(torch_predictor, chelsea_embedding, points, labels)
    assert iou(decoded(region), truth) >= 0.99


def test_rectangle_only(live_backend, torch_predictor, chelsea_embedding, chelsea_path):
    body = with_image(recorded("rectangle"), chelsea_path, task_id=102)
    (rect,) = body["params"]["context"]["result"]
    value = rect["value"]
    box = box_of(value)
    (region,) = post(live_backend, body).json()["results"][0]["result"]
    assert iou(decoded(region), expected(torch_predictor, chelsea_embedding, box=box)) >= 0.99


def test_keypoints_mix_with_the_rectangle_in_the_draft(live_backend, torch_predictor, chelsea_embedding,
                                                       chelsea_path):
    body = with_image(recorded("keypoint_with_rectangle_in_draft"), chelsea_path, task_id=103)
    rect = next(r for r in body["tasks"][0]["drafts"][0]["result"] if r["type"] == "rectanglelabels")["value"]
    box = box_of(rect)
    clicks = body["params"]["context"]["result"]
    points = [px(c["value"]["x"], c["value"]["y"]) for c in clicks]
    (region,) = post(live_backend, body).json()["results"][0]["result"]
    mixed = expected(torch_predictor, chelsea_embedding, points, [1] * len(points), box)
    points_only = expected(torch_predictor, chelsea_embedding, points, [1] * len(points))
    assert iou(decoded(region), mixed) >= 0.99
    assert iou(mixed, points_only) < 0.95, "the fixture must be one where the box changes the mask"


def test_rectangle_remembered_from_an_earlier_call(live_backend, torch_predictor, chelsea_embedding, chelsea_path):
    """Label Studio never sends keypoints with rectangles; the server remembers the task's rectangle."""
    rectangle = with_image(recorded("rectangle"), chelsea_path, task_id=104)
    assert post(live_backend, rectangle).status_code == 200
    click = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=104)
    click["project"] = rectangle["project"]
    value = rectangle["params"]["context"]["result"][0]["value"]
    box = box_of(value)
    clicks = click["params"]["context"]["result"]
    points = [px(c["value"]["x"], c["value"]["y"]) for c in clicks]
    (region,) = post(live_backend, click).json()["results"][0]["result"]
    assert iou(decoded(region), expected(torch_predictor, chelsea_embedding, points, [1, 0], box)) >= 0.99


def _click(body: dict, x: float, y: float, region_id: str) -> dict:
    """`body` (a recorded keypoint call) with one positive click at (x, y) percent."""
    (first, *_) = body["params"]["context"]["result"]
    click = copy.deepcopy(first)
    click.update(id=region_id, is_positive=True)
    click["value"].update(x=x, y=y)
    body["params"]["context"]["result"] = [click]
    return body


def _rectangle(body: dict, x: float, y: float, width: float, height: float, region_id: str) -> dict:
    (rect,) = body["params"]["context"]["result"]
    rect["id"] = region_id
    rect["value"].update(x=x, y=y, width=width, height=height, rotation=0)
    return body


def test_a_box_away_from_the_remembered_clicks_starts_a_new_object(live_backend, torch_predictor,
                                                                    chelsea_embedding, chelsea_path):
    """Click, accept (the editor deletes the clicks and tells the backend nothing), then a box elsewhere: the box
    encloses none of the remembered positive clicks, so they belong to the accepted object and are left out."""
    click = _click(with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=111), 30, 40, "k1")
    assert post(live_backend, click).status_code == 200
    box = _rectangle(with_image(recorded("rectangle"), chelsea_path, task_id=111), 88, 5, 11, 40, "r1")
    box["project"] = click["project"]
    (region,) = post(live_backend, box).json()["results"][0]["result"]
    alone = expected(torch_predictor, chelsea_embedding, box=box_of(box["params"]["context"]["result"][0]["value"]))
    mixed = expected(torch_predictor, chelsea_embedding, [px(30, 40)], [1],
                     box_of(box["params"]["context"]["result"][0]["value"]))
    assert iou(alone, mixed) < 0.9, "test data: the stale click should change the mask"
    assert iou(decoded(region), alone) >= 0.99


def test_a_click_away_from_the_remembered_box_starts_a_new_object(live_backend, torch_predictor,
                                                                   chelsea_embedding, chelsea_path):
    box = _rectangle(with_image(recorded("rectangle"), chelsea_path, task_id=112), 88, 5, 11, 40, "r2")
    assert post(live_backend, box).status_code == 200
    click = _click(with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=112), 30, 40, "k2")
    click["project"] = box["project"]
    (region,) = post(live_backend, click).json()["results"][0]["result"]
    alone = expected(torch_predictor, chelsea_embedding, [px(30, 40)], [1])
    assert iou(decoded(region), alone) >= 0.99


def test_a_click_inside_the_remembered_box_still_mixes_with_it(live_backend, torch_predictor, chelsea_embedding,
                                                               chelsea_path):
    box = _rectangle(with_image(recorded("rectangle"), chelsea_path, task_id=113), 50, 0, 35, 60, "r3")
    assert post(live_backend, box).status_code == 200
    click = _click(with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=113), 70, 30, "k3")
    click["project"] = box["project"]
    (region,) = post(live_backend, click).json()["results"][0]["result"]
    mixed = expected(torch_predictor, chelsea_embedding, [px(70, 30)], [1], box_of(
        box["params"]["context"]["result"][0]["value"]))
    assert iou(decoded(region), mixed) >= 0.99
    assert iou(mixed, expected(torch_predictor, chelsea_embedding, [px(70, 30)], [1])) < 0.9


def test_later_clicks_on_a_task_skip_the_image_download(base_settings, served_predictor, fake_label_studio):
    """The image is downloaded for the first click only (IMAGE_URL_TTL); with IMAGE_URL_TTL=0, for every click."""
    from conftest import make_live_backend

    path = fake_label_studio.add_image("/data/upload/2/downloads.jpg", CHELSEA)
    for ttl, downloads in ((600.0, 1), (0.0, 3)):
        backend = make_live_backend(base_settings, served_predictor, image_url_ttl=ttl)
        try:
            before = fake_label_studio.count(path)
            masks = []
            for dx in (0, 1, 2):
                body = with_image(recorded("keypoints_positive_and_negative"), path, task_id=120)
                body["params"]["context"]["result"][0]["value"]["x"] += dx
                (region,) = post(backend, body).json()["results"][0]["result"]
                masks.append(decoded(region))
            assert fake_label_studio.count(path) - before == downloads, f"IMAGE_URL_TTL={ttl}"
            assert all(iou(mask, masks[0]) > 0.9 for mask in masks)
        finally:
            backend.close()


def test_plain_tool_keypoint_counts_as_positive(live_backend, torch_predictor, chelsea_embedding, chelsea_path):
    body = with_image(recorded("plain_tool_keypoint"), chelsea_path, task_id=105)
    clicks = body["params"]["context"]["result"]
    assert any("is_positive" not in c for c in clicks)
    points = [px(c["value"]["x"], c["value"]["y"]) for c in clicks]
    labels = [1 if c.get("is_positive", True) else 0 for c in clicks]
    drafted = [r for r in body["tasks"][0]["drafts"][0]["result"] if r["type"] == "rectanglelabels"]
    box = box_of(drafted[-1]["value"]) if drafted else None  # the editor had autosaved a rectangle
    (region,) = post(live_backend, body).json()["results"][0]["result"]
    assert iou(decoded(region), expected(torch_predictor, chelsea_embedding, points, labels, box)) >= 0.99


def test_alias_convention_remembers_the_other_group(live_backend, torch_predictor, chelsea_embedding, chelsea_path):
    """Seed aliases: `1` clicks, then a `-1` click that arrives alone; the answer mixes both, as brush `1`."""
    positive = with_image(recorded("alias_positive_keypoint"), chelsea_path, task_id=106)
    first = post(live_backend, positive).json()["results"][0]["result"]
    assert [r["value"]["brushlabels"] for r in first] == [["1"]]
    assert first[0]["from_name"] == "brush"
    negative = with_image(recorded("alias_negative_keypoint_alone"), chelsea_path, task_id=106)
    negative["project"] = positive["project"]
    assert all(c["value"]["keypointlabels"] == ["-1"] and c.get("is_positive", True)
               for c in negative["params"]["context"]["result"])
    (region,) = post(live_backend, negative).json()["results"][0]["result"]
    points = [px(c["value"]["x"], c["value"]["y"]) for c in positive["params"]["context"]["result"]]
    negatives = [px(c["value"]["x"], c["value"]["y"]) for c in negative["params"]["context"]["result"]]
    truth = expected(torch_predictor, chelsea_embedding, points + negatives, [1] * len(points) + [0] * len(negatives))
    assert iou(decoded(region), truth) >= 0.99
    assert region["value"]["brushlabels"] == ["1"]


def test_alias_negative_alone_on_a_fresh_task_answers_no_region(live_backend, chelsea_path):
    body = with_image(recorded("alias_negative_keypoint_alone"), chelsea_path, task_id=107)
    answer = post(live_backend, body)
    assert answer.status_code == 200
    assert answer.json()["results"][0]["result"] == []


def test_alias_rectangle(live_backend, chelsea_path):
    body = with_image(recorded("alias_rectangle"), chelsea_path, task_id=108)
    (region,) = post(live_backend, body).json()["results"][0]["result"]
    assert region["value"]["brushlabels"] == ["1"] and decoded(region).mean() > 0.1


def test_each_added_click_refines_the_previous_mask(base_settings, served_predictor, torch_predictor,
                                                    chelsea_embedding, chelsea_path):
    """With REFINE_MASKS on, two clicks are still ambiguous (SAM's three masks of the clicks alone); a third click
    feeds the second answer's low-res logits back to SAM (through sam.refinement's jump guard)."""
    from conftest import make_live_backend
    from sam_backend.sam import refinement

    backend = make_live_backend(base_settings, served_predictor, refine_masks=True)
    try:
        body = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=110)
        clicks = body["params"]["context"]["result"]
        first, second, third = copy.deepcopy(body), copy.deepcopy(body), copy.deepcopy(body)
        first["params"]["context"]["result"] = clicks[:1]
        added = copy.deepcopy(clicks[0])
        added.update(id="added-click")
        added["value"].update(x=30.0, y=70.0)  # on the cat's body
        third["params"]["context"]["result"] = clicks + [added]
        two_points = [px(c["value"]["x"], c["value"]["y"]) for c in clicks]
        three_points = two_points + [px(30.0, 70.0)]
        assert post(backend, first).status_code == 200
        (region,) = post(backend, second).json()["results"][0]["result"]
        two = torch_predictor.decode(chelsea_embedding, Prompt(np.array(two_points, np.float32),
                                                               np.array([1, 0], np.int32)))
        assert iou(decoded(region), two.mask) >= 0.99  # the clicks alone, SAM's three masks
        (region,) = post(backend, third).json()["results"][0]["result"]
        refined = refinement.decode(torch_predictor, chelsea_embedding,
                                    Prompt(np.array(three_points, np.float32), np.array([1, 0, 1], np.int32),
                                           mask_input=two.low_res_logits)).mask
        fresh = expected(torch_predictor, chelsea_embedding, three_points, [1, 0, 1])
        assert iou(decoded(region), refined) >= 0.99
        assert not np.array_equal(refined, fresh), "the previous mask must make a difference here"
        # Moving a click is not "adding" one: that prompt starts afresh.
        moved = copy.deepcopy(third)
        moved["params"]["context"]["result"][0]["value"]["x"] += 5
        (region,) = post(backend, moved).json()["results"][0]["result"]
        points = [px(c["value"]["x"], c["value"]["y"]) for c in moved["params"]["context"]["result"]]
        assert iou(decoded(region), expected(torch_predictor, chelsea_embedding, points, [1, 0, 1])) >= 0.99
    finally:
        backend.close()


# ---- no context: open a task, retrieve predictions ----------------------------------------------------------
def test_open_task_returns_no_region_and_prewarms(live_backend, fake_label_studio):
    path = fake_label_studio.add_image("/data/upload/2/coffee.jpg", skimage.data.coffee())
    body = with_image(recorded("open_task"), path)
    answer = post(live_backend, body)
    assert answer.status_code == 200
    (task,) = answer.json()["results"]
    assert task["result"] == [] and task["model_version"]
    model = live_backend.app.extensions["sam_model"]
    key = (model.model_version, hashlib.sha256(fake_label_studio.files[path]).hexdigest())
    deadline = time.monotonic() + 120
    while key not in model.cache:
        assert time.monotonic() < deadline, "the opened task's image was never embedded"
        time.sleep(0.2)


def test_retrieve_predictions_answers_every_task_in_order(live_backend, chelsea_path):
    body = with_image(recorded("retrieve_predictions"), chelsea_path)
    answer = post(live_backend, body)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == len(body["tasks"]) >= 2
    assert all(r["result"] == [] for r in results)


# ---- bad input: a clear 4xx and the server stays up ---------------------------------------------------------
def _context(body, **value_changes):
    body["params"]["context"]["result"][0]["value"].update(value_changes)
    return body


BAD = [
    ("invalid JSON", lambda b: "{not json", 400, "not valid JSON"),
    ("empty body", lambda b: "", 400, "empty"),
    ("tasks missing", lambda b: {k: v for k, v in b.items() if k != "tasks"}, 400, "body.tasks"),
    ("tasks not a list", lambda b: {**b, "tasks": {"id": 1}}, 400, "body.tasks"),
    ("no label config", lambda b: {**b, "label_config": ""}, 400, "label_config"),
    ("context not an object", lambda b: {**b, "params": {"context": [1]}}, 400, "params.context"),
    ("unknown region type", lambda b: (b["params"]["context"]["result"][0].update(type="polygonlabels"), b)[1],
     400, "params.context.result[0].type"),
    ("unknown label", lambda b: _context(b, keypointlabels=["Zebra"], labels=["Zebra"]), 422, "'Zebra'"),
    ("unknown from_name", lambda b: (b["params"]["context"]["result"][0].update(from_name="nope"), b)[1],
     422, "'nope'"),
    ("coordinate not a number", lambda b: _context(b, x="40"), 400, "value.x"),
    ("coordinate infinite", lambda b: _context(b, x=math.inf), 400, "value.x"),
    ("image missing from task", lambda b: (b["tasks"][0].update(data={}), b)[1], 400, "data.image"),
    ("size disagrees with image", lambda b: (b["params"]["context"]["result"][0].update(original_width=1000), b)[1],
     400, "1000x300"),
    ("image not found", lambda b: (b["tasks"][0]["data"].update(image="/data/upload/2/none.jpg"), b)[1], 404, ""),
]


@pytest.mark.parametrize("name,change,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(live_backend, chelsea_path, name, change, status, message):
    body = change(with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=200))
    data = body if isinstance(body, str) else json.dumps(body, allow_nan=True)
    answer = requests.post(live_backend.url + "/predict", data=data, timeout=60,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    assert requests.get(live_backend.url + "/health", timeout=5).status_code == 200


def test_zero_size_rectangle_is_refused(live_backend, chelsea_path):
    body = with_image(recorded("rectangle"), chelsea_path, task_id=201)
    body["params"]["context"]["result"][0]["value"].update(width=0)
    answer = post(live_backend, body)
    assert answer.status_code == 400 and "positive width and height" in answer.json()["error"]


def test_out_of_image_click_is_clamped_to_the_border(live_backend, chelsea_path):
    body = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=202)
    body["params"]["context"]["result"] = body["params"]["context"]["result"][:1]
    body["params"]["context"]["result"][0]["value"].update(x=-5.0, y=104.0)
    answer = post(live_backend, body)
    assert answer.status_code == 200


# ---- concurrency -------------------------------------------------------------------------------------------
def test_concurrent_users_on_different_images_get_their_own_masks(live_backend, fake_label_studio):
    """Eight requests at once on four images and two positions each equal the same requests made alone."""
    names = ["horse-coffee-grass", "ellipse-chelsea-gravel", "star-astronaut-brick", "star-chelsea-grass"]
    jobs = []
    for index, name in enumerate(names):
        path = fake_label_studio.add_image(f"/data/upload/9/{name}.jpg", scene(name, (300, 451)).image)
        for x, y in ((45, 55), (30, 40)):
            body = with_image(recorded("keypoints_positive_and_negative"), path, task_id=300 + index)
            body["params"]["context"]["result"] = body["params"]["context"]["result"][:1]
            body["params"]["context"]["result"][0]["value"].update(x=x, y=y)
            jobs.append(body)

    def run(body):
        answer = post(live_backend, body)
        assert answer.status_code == 200, answer.text
        return decoded(answer.json()["results"][0]["result"][0])

    alone = [run(body) for body in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    for single, parallel in zip(alone, together):
        assert np.array_equal(single, parallel)
