"""model.SamModel end to end without weights or sockets: the recorded Label Studio bodies go in, a
FakePredictor (tools/harness/fake_predictor.py) answers, and the results must carry its masks.

What is checked here is the Label Studio layer's own work: which prompt each call means (clicks and boxes of
both label conventions, the draft, the memory of earlier calls, refinement), which results come back, and
which field a 4xx names."""
from __future__ import annotations

import copy
import io
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import SamModel
from sam_backend.encoding import rle
from sam_backend.errors import ClientError, ConfigError, ContextError, ImageError, RequestError
from sam_backend.images import LabelStudioAccess
from sam_backend.sam import transforms
from sam_backend.sam.types import Prompt
from sam_backend.settings import Settings
from tools.harness import recordings
from tools.harness.fake_predictor import FakePredictor

ROOT = Path(__file__).resolve().parents[2]
CALLS = recordings.document()["calls"]
H, W = 300, 451  # the recorded image's size (skimage's chelsea)


def recorded(name: str, path: str = "/predict") -> dict:
    return copy.deepcopy(next(c["body"] for c in CALLS if c["name"] == name and c["path"] == path))


def png(height: int = H, width: int = W, shade: int = 0) -> bytes:
    """A PNG of that size; another shade is another image (another embedding)."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows % 256, cols % 256, np.full_like(rows, shade % 256)], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class StubImages:
    """Stands in for images.ImageLoader: serves fixed bytes by URL and records each fetch."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.fetches: list[tuple[str, LabelStudioAccess | None, int | None]] = []

    def fetch(self, url: str, fallback: LabelStudioAccess | None = None, task_id: int | None = None) -> bytes:
        self.fetches.append((url, fallback, task_id))
        if url not in self.files:
            raise ImageError(404, f"{url}: not found")
        return self.files[url]


RECORDED_URLS = sorted({task["data"]["image"] for call in CALLS if call["path"] == "/predict"
                        for task in call["body"]["tasks"]})


@pytest.fixture
def make():
    """make(**settings) -> (model, predictor, images); the model's background pool is closed afterwards."""
    made = []

    def factory(**changes):
        predictor = FakePredictor()
        images = StubImages({url: png(shade=i) for i, url in enumerate(RECORDED_URLS)})
        model = SamModel(predictor, replace(Settings(), **changes), images=images)
        made.append(model)
        return model, predictor, images

    yield factory
    for model in made:
        model.cache.close()


def only_result(answer: dict) -> list[dict]:
    (task,) = answer["results"]
    return task["result"]


def brush_mask(region: dict) -> np.ndarray:
    return rle.decode(region["value"]["rle"], region["original_height"], region["original_width"]) > 0


def points(*percent: tuple[float, float]) -> np.ndarray:
    return np.array([[x * W / 100, y * H / 100] for x, y in percent], np.float32)


# ---- one call -------------------------------------------------------------------------------------------------
def test_recorded_clicks_give_the_predictors_mask_as_a_brush_result(make):
    model, predictor, images = make()
    answer = model.predict(recorded("keypoints_positive_and_negative"))
    (prompt,) = predictor.prompts
    assert np.allclose(prompt.points, points((40, 45), (90, 10))) and prompt.labels.tolist() == [1, 0]
    assert prompt.box is None and prompt.mask_input is None
    (region,) = only_result(answer)
    assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
    assert region["value"]["brushlabels"] == ["Cat"]
    assert (region["original_width"], region["original_height"]) == (W, H)
    expected = predictor.mask(prompt, (H, W))
    assert expected.any() and np.array_equal(brush_mask(region), expected)
    assert region["score"] == 0.875
    assert answer["results"][0]["score"] == 0.875 and answer["results"][0]["model_version"] == "FakeSAM-test"
    assert images.fetches == [("/data/upload/2/40f73fbf-chelsea.jpg", None, 2)]
    assert predictor.images == [(H, W)]


def test_recorded_rectangle_gives_a_box_prompt(make):
    model, predictor, _ = make()
    (region,) = only_result(model.predict(recorded("rectangle")))
    (prompt,) = predictor.prompts
    assert np.allclose(prompt.box, [0.10 * W, 0.05 * H, 0.70 * W, 0.95 * H]) and len(prompt.points) == 0
    assert np.array_equal(brush_mask(region), predictor.mask(prompt, (H, W)))


def test_the_drafts_rectangle_joins_the_calls_clicks(make):
    model, predictor, _ = make()
    model.predict(recorded("keypoint_with_rectangle_in_draft"))
    (prompt,) = predictor.prompts
    assert np.allclose(prompt.box, [0.10 * W, 0.05 * H, 0.70 * W, 0.95 * H])
    assert np.allclose(prompt.points, points((40, 45), (50, 40))) and prompt.labels.tolist() == [1, 1]


def test_the_newest_rectangle_of_a_class_counts(make):
    model, predictor, _ = make()
    body = recorded("rectangle")
    first = body["params"]["context"]["result"][0]
    newer = dict(first, id="newer", value={**first["value"], "x": 50, "y": 50, "width": 20, "height": 20})
    body["params"]["context"]["result"].append(newer)
    model.predict(body)
    assert np.allclose(predictor.prompts[0].box, [0.5 * W, 0.5 * H, 0.7 * W, 0.7 * H])


def test_alias_labels_name_the_brush_label_and_the_sign(make):
    model, predictor, _ = make()
    (region,) = only_result(model.predict(recorded("alias_positive_keypoint")))
    assert region["from_name"] == "brush" and region["value"]["brushlabels"] == ["1"]
    assert predictor.prompts[0].labels.tolist() == [1]


def test_a_negative_click_alone_decodes_nothing(make):
    model, predictor, _ = make()
    answer = model.predict(recorded("alias_negative_keypoint_alone"))
    assert answer["results"] == [{"result": [], "score": 0.0, "model_version": "FakeSAM-test"}]
    assert predictor.prompts == []


def test_an_empty_mask_gives_no_region(make):
    model, predictor, _ = make()
    body = recorded("keypoints_positive_and_negative")
    body["params"]["context"]["result"][1]["value"].update(x=40, y=45)  # the negative click erases the disk
    assert only_result(model.predict(body)) == []
    assert len(predictor.prompts) == 1


# ---- across calls -------------------------------------------------------------------------------------------
def test_clicks_are_remembered_across_calls_and_refine_the_previous_mask(make):
    """With the alias convention a positive and a negative click never come in one call: the memory joins
    them. Two clicks are still ambiguous (SAM's three masks of the clicks alone, Prompt.is_ambiguous); from the
    third click on, a prompt that only adds a click carries the previous mask."""
    model, predictor, images = make()
    model.predict(recorded("alias_positive_keypoint"))
    (region,) = only_result(model.predict(recorded("alias_negative_keypoint_alone")))
    first, second = predictor.prompts
    assert np.allclose(second.points, points((40, 45), (90, 10))) and second.labels.tolist() == [1, 0]
    assert second.mask_input is None and second.is_ambiguous
    assert np.array_equal(brush_mask(region), predictor.mask(second, (H, W)))
    another = recorded("alias_positive_keypoint")  # the positive group's regions, as Label Studio sends them
    (click,) = another["params"]["context"]["result"]
    added = copy.deepcopy(click)
    added.update(id="third-click")
    added["value"].update(x=50.0, y=50.0)
    another["params"]["context"]["result"].append(added)
    model.predict(another)
    third = predictor.prompts[2]
    assert sorted(third.labels.tolist()) == [0, 1, 1] and third.mask_input is not None
    assert np.all(third.mask_input == 2)  # decode 2's logits
    # a rectangle drawn after the clicks: the box with the clicks, the box alone, and the box with the clicks
    # refining decode 3's mask (refinement.box_after_clicks)
    model.predict(recorded("alias_rectangle"))
    with_clicks, alone, refined = predictor.prompts[3:]
    assert sorted(with_clicks.labels.tolist()) == [0, 1, 1] and with_clicks.box is not None
    assert with_clicks.mask_input is None and len(alone.points) == 0 and alone.mask_input is None
    assert sorted(refined.labels.tolist()) == [0, 1, 1] and np.all(refined.mask_input == 3)  # decode 3's logits
    assert len(images.fetches) == 1 and predictor.images == [(H, W)]  # one download, one embedding


def test_the_same_prompt_again_is_not_refined(make):
    model, predictor, _ = make()
    for _ in range(2):
        model.predict(recorded("keypoints_positive_and_negative"))
    assert [p.mask_input is None for p in predictor.prompts] == [True, True]


def test_refinement_can_be_switched_off(make):
    model, predictor, _ = make(refine_masks=False)
    model.predict(recorded("alias_positive_keypoint"))
    model.predict(recorded("alias_negative_keypoint_alone"))
    assert predictor.prompts[1].labels.tolist() == [1, 0] and predictor.prompts[1].mask_input is None


def test_the_memory_is_kept_per_task(make):
    model, predictor, _ = make()
    model.predict(recorded("alias_positive_keypoint"))
    other = recorded("alias_negative_keypoint_alone")
    other["tasks"][0]["id"] = 99
    assert only_result(model.predict(other)) == [] and len(predictor.prompts) == 1


# ---- outputs --------------------------------------------------------------------------------------------
POLYGONS = '<PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels></View>'


def test_out_poly_adds_polygon_results_and_out_bbox_a_rectangle(make):
    model, predictor, _ = make(out_bbox=True, out_poly=True)
    body = recorded("keypoints_positive_and_negative")
    body["label_config"] = body["label_config"].replace("</View>", POLYGONS)
    regions = only_result(model.predict(body))
    assert [(r["type"], r["from_name"]) for r in regions] == [("brushlabels", "tag"), ("polygonlabels", "poly"),
                                                              ("rectanglelabels", "tag3")]
    assert all(r["to_name"] == "image" and r["score"] == 0.875 for r in regions)
    assert len({r["id"] for r in regions}) == 3
    ys, xs = np.nonzero(predictor.mask(predictor.prompts[0], (H, W)))
    box = regions[2]["value"]
    assert box["x"] == pytest.approx(xs.min() / W * 100, abs=1e-4)
    assert box["width"] == pytest.approx((xs.max() + 1 - xs.min()) / W * 100, abs=1e-4)


def test_out_mask_off_leaves_the_brush_region_out(make):
    model, _, _ = make(out_mask=False, out_poly=True)
    body = recorded("keypoints_positive_and_negative")
    body["label_config"] = body["label_config"].replace("</View>", POLYGONS)
    assert [r["type"] for r in only_result(model.predict(body))] == ["polygonlabels"]


# ---- opening a task, /setup ---------------------------------------------------------------------------------
def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_opened_tasks_are_embedded_in_the_background_and_the_click_is_warm(make):
    model, predictor, images = make()
    answer = model.predict(recorded("retrieve_predictions"))
    assert answer["results"] == [{"result": [], "score": 0.0, "model_version": "FakeSAM-test"}] * 2
    wait_for(lambda: len(model.cache) == 2)  # stored, not only computed
    click = recorded("keypoints_positive_and_negative")
    click["tasks"][0]["data"]["image"] = recorded("retrieve_predictions")["tasks"][1]["data"]["image"]
    fetched = len(images.fetches)
    assert only_result(model.predict(click))
    assert len(images.fetches) == fetched and len(predictor.images) == 2  # nothing downloaded or embedded


def test_setup_remembers_the_projects_label_studio_for_image_downloads(make):
    model, _, images = make()
    setup = recorded("add_model", "/setup")
    assert setup["hostname"].startswith("http://localhost:")  # as Label Studio sent it, from 127.0.0.1
    assert model.setup(setup, peer="127.0.0.1") == {"model_version": "FakeSAM-test"}
    body = recorded("keypoints_positive_and_negative")
    body["project"] = setup["project"]
    model.predict(body)
    ((_, fallback, _),) = images.fetches
    assert fallback == LabelStudioAccess(url=setup["hostname"], token=setup["access_token"])
    other = recorded("keypoints_positive_and_negative")
    other["project"] = "another"
    model.predict(other)
    assert images.fetches[1][1] is None


def test_setup_takes_a_hostname_only_from_the_host_it_names(make):
    """Without LABEL_STUDIO_URL anyone reaching the backend could re-point a project's downloads (and its token)
    at an internal host; the hostname is taken only from the caller it names."""
    model, _, images = make()
    body = recorded("keypoints_positive_and_negative")
    for hostname, peer in (("http://localhost:8080", "10.0.0.9"), ("http://10.0.0.9:8080", "127.0.0.1"),
                           ("http://169.254.169.254", None), ("http://no-such-host.invalid:8080", "127.0.0.1")):
        setup = {"project": "p1", "hostname": hostname, "access_token": "t0ken0123"}
        assert model.setup(setup, peer=peer) == {"model_version": "FakeSAM-test"}
        body["project"] = "p1"
        model.predict(body)
        assert images.fetches[-1][1] is None, (hostname, peer)
    model.setup({"project": "p1", "hostname": "http://10.0.0.9:8080", "access_token": "t0ken0123"}, peer="10.0.0.9")
    model.predict(body)
    assert images.fetches[-1][1] == LabelStudioAccess(url="http://10.0.0.9:8080", token="t0ken0123")
    configured, _, configured_images = make(label_studio_url="http://ls.example:8080")
    configured.setup({"project": "p1", "hostname": "http://x:1", "access_token": "t0ken0123"}, peer="10.1.1.1")
    configured.predict(body)  # the configured Label Studio wins; the token may still be the /setup one
    assert configured_images.fetches[-1][1] is not None


def test_setup_refuses_a_config_it_cannot_serve(make):
    model, predictor, _ = make()
    with pytest.raises(ConfigError) as caught:
        model.setup({"schema": "<View><Image name='image' value='$image'/></View>"})
    assert caught.value.status == 422 and "BrushLabels" in caught.value.message
    with pytest.raises(RequestError, match="body must be a JSON object"):
        model.setup([])
    assert model.setup({}) == {"model_version": "FakeSAM-test"} and predictor.images == []


def test_health_and_metrics_facts(make):
    model, _, _ = make()
    model.predict(recorded("keypoints_positive_and_negative"))
    assert model.model_class == "FakePredictor" and model.model_version == "FakeSAM-test"
    assert model.stats()["embedding_cache"] == {"items": 1, "bytes": 1 << 21, "hits": 0, "misses": 1}


# ---- 4xx naming the field -------------------------------------------------------------------------------------
def edited(edit) -> dict:
    body = recorded("keypoints_positive_and_negative")
    edit(body)
    return body


def set_region(key, value):
    return lambda body: body["params"]["context"]["result"][0]["value"].__setitem__(key, value)


@pytest.mark.parametrize("body, error, status, words", [
    ([], RequestError, 400, "body must be a JSON object"),
    (edited(lambda b: b.pop("tasks")), RequestError, 400, "body.tasks must be a non-empty list"),
    (edited(lambda b: b.__setitem__("tasks", [])), RequestError, 400, "body.tasks must be a non-empty list"),
    (edited(lambda b: b.__setitem__("label_config", " ")), RequestError, 400, "body.label_config must be"),
    (edited(lambda b: b.__setitem__("params", [])), RequestError, 400, "body.params must be an object or null"),
    (edited(lambda b: b.__setitem__("project", [2])), RequestError, 400, "body.project must be the project's id"),
    (edited(lambda b: b.__setitem__("tasks", [b["tasks"][0], "x"])), RequestError, 400,
     "body.tasks[1] must be a JSON object"),
    (edited(lambda b: b["tasks"][0].__setitem__("id", True)), RequestError, 400, "body.tasks[0].id must be"),
    (edited(lambda b: b["tasks"][0]["data"].pop("image")), RequestError, 400,
     "body.tasks[0].data.image must be the URL of the task's image"),
    (edited(lambda b: b["params"].__setitem__("context", [])), ContextError, 400,
     "params.context must be an object or null"),
    (edited(set_region("x", "40")), ContextError, 400, "params.context.result[0].value.x must be a number"),
    (edited(set_region("keypointlabels", ["Bird"])), ConfigError, 422, "label 'Bird' of 'tag2'"),
    (edited(lambda b: b.__setitem__("label_config", "<View>")), ConfigError, 422, "labeling config does not parse"),
])
def test_malformed_bodies_are_refused_naming_the_field(make, body, error, status, words):
    model, predictor, images = make()
    with pytest.raises(error) as caught:
        model.predict(body)
    assert caught.value.status == status and words in caught.value.message
    assert images.fetches == [] and predictor.prompts == []  # refused before any work


def test_a_context_drawn_on_another_image_is_refused(make):
    model, predictor, images = make()
    body = recorded("keypoints_positive_and_negative")
    url = "http://images.example/cat.png?token=secret"
    body["tasks"][0]["data"]["image"] = url
    images.files[url] = png(200, 200)
    with pytest.raises(ContextError) as caught:
        model.predict(body)
    assert caught.value.status == 400
    assert caught.value.message == ("region 05b3000e92 was drawn on a 451x300 image, but the task's image "
                                    "http://images.example/cat.png?token=*** is 200x200")
    assert predictor.prompts == []


def test_image_errors_name_the_tasks_field(make):
    model, _, images = make()
    body = recorded("keypoints_positive_and_negative")
    images.files[body["tasks"][0]["data"]["image"]] = b"not an image"
    with pytest.raises(ImageError) as caught:
        model.predict(body)
    assert caught.value.status == 415
    assert caught.value.message.startswith("body.tasks[0].data.image (/data/upload/2/40f73fbf-chelsea.jpg): ")
    missing = recorded("keypoints_positive_and_negative")
    missing["tasks"][0]["data"]["image"] = "/data/upload/nowhere.jpg"
    with pytest.raises(ClientError) as caught:
        model.predict(missing)
    assert caught.value.status == 404


def test_model_imports_no_torch_onnxruntime_flask_or_predictor():
    code = ("import sys, model; bad = [m for m in ('torch', 'onnxruntime', 'flask', 'advanced_sam', 'onnx_sam')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_at_most_max_concurrent_decodes_clicks_decode_at_once(make):
    """Clicks beyond MAX_CONCURRENT_DECODES wait their turn (each holds a full-size mask), and all get answers."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model, predictor, _ = make(max_concurrent_decodes=2)
    model.predict(recorded("keypoints_positive_and_negative"))  # embedded once, before the crowd
    lock, active, most = threading.Lock(), [0], [0]
    decode = predictor.decode

    def slow_decode(embedding, prompt):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return decode(embedding, prompt)
        finally:
            with lock:
                active[0] -= 1

    predictor.decode = slow_decode
    bodies = []
    for task_id in range(100, 108):
        body = recorded("keypoints_positive_and_negative")
        body["tasks"][0]["id"] = task_id
        bodies.append(body)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(model.predict, bodies))
    assert most[0] == 2
    assert all(len(only_result(answer)) == 1 for answer in answers)


# ---- zoom-in ----------------------------------------------------------------------------------------------------
class MaskLogitsPredictor(FakePredictor):
    """A FakePredictor whose low-resolution logits show its mask (the decode's serial number on the cells whose
    centre the mask holds, -1 elsewhere), so that zoom-in (sam.zoom) sees where the object is."""

    def decode(self, embedding, prompt):
        prediction = super().decode(embedding, prompt)
        (height, width), (rows, cols) = embedding.original_size, transforms.low_res_extent(embedding.input_size)
        ys = ((np.arange(rows) + 0.5) * height / rows).astype(int)
        xs = ((np.arange(cols) + 0.5) * width / cols).astype(int)
        logits = np.full_like(prediction.low_res_logits, -1.0)
        logits[0, :rows, :cols][prediction.mask[ys][:, xs]] = prediction.low_res_logits.max()
        return replace(prediction, low_res_logits=logits)


BIG = (963, 1443)  # (H, W)
BIG_URL = "/data/upload/3/big.png"


def big_image_call(*percent: tuple[float, float]) -> dict:
    """alias_positive_keypoint on a 1443 x 963 image, with a positive click at each (x %, y %)."""
    body = recorded("alias_positive_keypoint")
    body["tasks"][0]["data"]["image"] = BIG_URL
    (click,) = body["params"]["context"]["result"]
    body["params"]["context"]["result"] = []
    for index, (x, y) in enumerate(percent):
        region = copy.deepcopy(click)
        region.update(id=f"click-{index}", original_width=BIG[1], original_height=BIG[0])
        region["value"].update(x=x, y=y)
        body["params"]["context"]["result"].append(region)
    return body


@pytest.mark.parametrize("zoom_in", [True, False])
def test_later_clicks_on_a_small_object_are_decoded_in_a_crop_around_it(zoom_in):
    """The first click's mask is a disk of 10 pixels in a 1443 x 963 image: the second click is decoded in a crop
    around it, embedded on its own (ZOOM_IN, on by default), and its mask comes back in the image's pixels."""
    predictor = MaskLogitsPredictor()
    images = StubImages({BIG_URL: png(*BIG)})
    model = SamModel(predictor, replace(Settings(), zoom_in=zoom_in), images=images)
    try:
        model.predict(big_image_call((40, 45)))
        (region,) = only_result(model.predict(big_image_call((40, 45), (41, 45.5))))
    finally:
        model.cache.close()
    full = Prompt(points=np.array([[0.40 * BIG[1], 0.45 * BIG[0]], [0.41 * BIG[1], 0.455 * BIG[0]]], np.float32),
                  labels=np.array([1, 1], np.int32))
    second = predictor.prompts[1]
    assert np.array_equal(brush_mask(region), predictor.mask(full, BIG))  # the disks, where they are in the image
    if not zoom_in:
        assert predictor.images == [BIG] and np.allclose(second.points, full.points)
        return
    assert len(predictor.images) == 2 and predictor.images[0] == BIG
    crop_h, crop_w = predictor.images[1]
    assert max(BIG) >= 1.5 * max(crop_h, crop_w)  # the encoder sees the object at least 1.5x larger
    offset = full.points[0] - second.points[0]
    assert np.allclose(full.points - offset, second.points) and (offset > 0).all()
    assert (second.points >= 0).all() and (second.points < [crop_w, crop_h]).all()


def test_a_click_in_a_crop_downloads_a_replaceable_image_once():
    """A local file (or cloud object) may be replaced under its URL, so each call reads it again, but once: the
    crop of a zoomed click, and the crop embedded ahead for the next one, are cut from the bytes the call got."""
    predictor = MaskLogitsPredictor()
    url = "/data/local-files/?d=big.png"
    images = StubImages({url: png(*BIG)})
    model = SamModel(predictor, Settings(), images=images)
    first, second = big_image_call((40, 45)), big_image_call((40, 45), (41, 45.5))
    for body in (first, second):
        body["tasks"][0]["data"]["image"] = url
    try:
        model.predict(first)
        model.cache._prewarm_pool.submit(lambda: None).result(30)  # one thread: the crop ahead is embedded
        assert len(predictor.images) == 2  # the whole image, and the crop embedded ahead
        model.predict(second)
        model.cache._prewarm_pool.submit(lambda: None).result(30)
    finally:
        model.cache.close()
    assert len(predictor.images) == 2 and predictor.images[1] != BIG  # the second click: in the crop
    assert predictor.prompts[1].points[0][0] < 0.40 * BIG[1] - 1  # (in the crop's pixels)
    assert [fetched[0] for fetched in images.fetches] == [url, url]  # one download a call


def test_a_predictor_whose_frame_is_stretched_is_not_zoomed():
    """SAM 2's low-resolution masks stretch the image over the 256x256 frame (`stretches_frame`), where zoom-in's
    geometry is SAM's padded frame: such a predictor decodes every click in the whole image."""
    predictor = MaskLogitsPredictor()
    predictor.stretches_frame = True
    model = SamModel(predictor, Settings(), images=StubImages({BIG_URL: png(*BIG)}))
    try:
        model.predict(big_image_call((40, 45)))
        model.predict(big_image_call((40, 45), (41, 45.5)))
    finally:
        model.cache.close()
    assert predictor.images == [BIG] and predictor.prompts[1].view is None
