"""The backend over real HTTP, fed the bodies Label Studio 1.23.2 sent while its real editor was used in Chromium.

tools/harness/bodies/editor_1_23_bodies.json was recorded by tests/test_browser.py (BROWSER_TEST_RECORD=1): a recording
proxy between Label Studio and the backend kept every request while a person's actions were played in the
labeling editor — open the task, a smart-keypoint click on the cat, a negative point (alt-click, or the seed's
`-1` label), a box with the smart rectangle tool, accept, submit — for the native and the alias label convention.

Here each flow is replayed in order against the backend (conftest's `live_backend`, real MobileSAM weights), with
the image path rewritten to conftest's fake Label Studio, and each mask is compared with MobileSAM called directly
with the prompt the body means. No browser and no Label Studio are needed.
"""
from __future__ import annotations

import copy

import pytest
import requests
import skimage.data

from browser_helpers import decode_brush, expected_prompts, iou
from sam_backend.sam.types import Prompt
from tools.harness import recordings

FIXTURE = recordings.EDITOR
RECORDING = recordings.document(FIXTURE)
FLOWS = RECORDING["flows"]
W, H = 451, 300
#: Each flow gets its own task id and image path: the backend remembers prompts per (project, task, image).
TASK_IDS = {"native": 9101, "alias": 9102}
BRUSH = {"native": ("tag", "Cat"), "alias": ("brush", "1")}


def calls(flow: str, path: str | None = None, step: str | None = None) -> list[dict]:
    """Deep copies of the flow's recorded calls, optionally only one path / one step."""
    return [copy.deepcopy(c) for c in FLOWS[flow]["calls"]
            if (path is None or c["path"] == path) and (step is None or c["step"] == step)]


def interactive_calls(flow: str) -> list[dict]:
    return [c for c in calls(flow, "/predict") if (c["body"]["params"] or {}).get("context")]


@pytest.fixture(scope="module")
def image_paths(fake_label_studio) -> dict[str, str]:
    return {flow: fake_label_studio.add_image(f"/data/upload/91/editor-{flow}-chelsea.jpg", skimage.data.chelsea())
            for flow in FLOWS}


@pytest.fixture(scope="module")
def reference(torch_predictor, fake_label_studio, image_paths):
    """mask_of({"points": [(x%, y%, positive)], "box": (x%, y%, w%, h%) | None}) on the JPEG the backend gets."""
    import numpy as np

    from sam_backend.images import ImageLoader

    pixels = ImageLoader.decode(fake_label_studio.files[image_paths["native"]], 10**8)
    assert pixels.shape[:2] == (H, W)
    embedding = torch_predictor.embed(pixels)

    def mask_of(prompt: dict):
        points = prompt["points"]
        xy = np.array([(x * W / 100, y * H / 100) for x, y, _ in points], np.float32).reshape(-1, 2)
        labels = np.array([1 if positive else 0 for *_, positive in points], np.int32)
        box = None
        if prompt["box"] is not None:
            x, y, w, h = prompt["box"]
            box = np.array([x * W / 100, y * H / 100, (x + w) * W / 100, (y + h) * H / 100], np.float32)
        return torch_predictor.decode(embedding, Prompt(xy, labels, box)).mask

    return mask_of


def replay(backend, body: dict, image_path: str | None = None, task_id: int | None = None) -> requests.Response:
    if image_path is not None:
        for task in body["tasks"]:
            task["data"]["image"] = image_path
            if task_id is not None:
                task["id"] = task_id
    return requests.post(backend.url + "/predict", json=body, timeout=120)


# ---- the recording itself ---------------------------------------------------------------------------------------
def test_the_recording_is_what_the_editor_sent():
    assert RECORDING["label_studio_version"] == "1.23.2"
    assert set(FLOWS) == {"native", "alias"}
    for flow, recorded in FLOWS.items():
        steps = [c["step"] for c in interactive_calls(flow)]
        assert steps == ["smart_keypoint_click", "smart_keypoint_negative", "smart_rectangle"], (flow, steps)
        for call in interactive_calls(flow):
            # Label Studio passes the editor's context through unchanged.
            assert call["body"]["params"]["context"] == call["editor_request"]["context"]
            assert call["status"] == 200
        # Accepting a suggestion and the draft's autosave call nothing; submitting sends the webhook only.
        counts = {s["step"]: s["calls"] for s in recorded["steps"]}
        assert counts["accept_suggestion"] == 0, counts
        assert [c["path"] for c in calls(flow, step="submit")] == ["/webhook"]
        # Opening the task: /health and /setup twice, then one /predict without a context.
        assert [c["path"] for c in calls(flow, step="open_task")] == ["/health", "/setup", "/health", "/setup",
                                                                      "/predict"]


def test_editor_specifics_the_backend_must_accept():
    """What the real editor sends that the API-driven recordings (ls_1_23_interactive_bodies.json) do not show."""
    native = [c["body"]["params"]["context"]["result"] for c in interactive_calls("native")]
    click, negative, box = native
    (point,) = click
    assert point["value"]["width"] != 0.5  # the keypoint's width is the editor's stroke width in percent
    assert set(point["value"]) == {"x", "y", "width", "labels", "keypointlabels"}
    assert [r["is_positive"] for r in negative] == [True, False]  # an alt-click resends the earlier click
    assert [r["id"] for r in negative][0] == point["id"]
    (rect,) = box  # the box comes alone: the keypoints are not resent with it
    assert rect["type"] == "rectanglelabels" and "is_positive" not in rect and "labels" not in rect["value"]
    alias = [c["body"]["params"]["context"]["result"] for c in interactive_calls("alias")]
    assert [[r["value"]["keypointlabels"] for r in call] for call in alias[:2]] == [[["1"]], [["-1"]]]
    assert alias[1][0]["is_positive"] is True  # the `-1` click comes alone and marked positive
    for call in interactive_calls("native") + interactive_calls("alias"):
        assert call["body"]["tasks"][0]["drafts"] == []  # no autosave happened between the quick actions


# ---- replayed against the backend -------------------------------------------------------------------------------
def test_setup_and_webhook_bodies(live_backend):
    for flow in FLOWS:
        for call in calls(flow, "/setup"):
            answer = requests.post(live_backend.url + "/setup", json=call["body"], timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"]
        for call in calls(flow, "/webhook"):
            answer = requests.post(live_backend.url + "/webhook", json=call["body"], timeout=30)
            assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_opening_the_task_returns_no_region(live_backend, image_paths, flow):
    (call,) = calls(flow, "/predict", step="open_task")
    assert call["body"]["params"]["context"] is None
    answer = replay(live_backend, call["body"], image_paths[flow], TASK_IDS[flow] + 1000)
    assert answer.status_code == 200, answer.text
    (task,) = answer.json()["results"]
    assert task["result"] == [] and task["model_version"]


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_replayed_clicks_and_box_give_the_recorded_masks(live_backend, image_paths, reference, flow):
    recorded = interactive_calls(flow)
    meant = expected_prompts([c["body"]["params"]["context"] for c in recorded])
    if flow == "alias":  # the `-1` click is a negative point of class 1
        assert [p for *_, p in meant[1]["points"]] == [True, False]
    masks = []
    for call, prompt in zip(recorded, meant):
        answer = replay(live_backend, call["body"], image_paths[flow], TASK_IDS[flow])
        assert answer.status_code == 200, f"{call['step']}: {answer.status_code} {answer.text[:2000]}"
        (task,) = answer.json()["results"]
        assert len(task["result"]) == 1, f"{call['step']}: {[r.get('type') for r in task['result']]}"
        (region,) = task["result"]
        assert region["type"] == "brushlabels" and region["to_name"] == "image"
        assert (region["from_name"], region["value"]["brushlabels"]) == (BRUSH[flow][0], [BRUSH[flow][1]])
        mask = decode_brush(region)
        expected = reference(prompt)
        overlap = iou(mask, expected)
        assert overlap >= 0.9, f"{call['step']}: IoU {overlap:.3f} with MobileSAM on {prompt}"
        recorded_area = call["answer"]["results"][0]["result"][0]["area"]
        # the recording holds the answers of the backend before one or two clicks took the whole-object mask of
        # SAM's three (transforms.whole_object): the first click's area went from 0.707 to 0.728
        assert mask.mean() == pytest.approx(recorded_area, abs=0.04), \
            f"{call['step']}: area {mask.mean():.3f}, the editor got {recorded_area:.3f}"
        masks.append(mask)
    # The whole head, and what Label Studio stored on submit is the last answer.
    assert 0.4 <= masks[-1].mean() <= 0.9
    (webhook,) = calls(flow, "/webhook", step="submit")
    stored = [r for r in webhook["body"]["annotation"]["result"] if r["type"] == "brushlabels"]
    assert len(stored) == 1 and iou(decode_brush(stored[0]), masks[-1]) >= 0.95


def test_another_annotators_click_on_the_task_changes_nothing_of_the_first_ones_object(live_backend, image_paths,
                                                                                         reference):
    """The alias flow by annotator A, who has an object accepted already (the drafts name A, an action behind,
    as after autosaves), and between A's first click and A's negative one, annotator B's first clicks on the
    same task (no draft yet): B's lone `-1` asks for nothing (it got A's `1` click: A's object), B's `1` click
    is B's alone, and A's masks are those of A's clicks (the memory is per annotator)."""
    recorded = interactive_calls("alias")
    meant = expected_prompts([c["body"]["params"]["context"] for c in recorded])
    task_id = TASK_IDS["alias"] + 2000
    # A's annotation as A's last autosave holds it: an object accepted before (a brush region), then the clicks
    shown: list[dict] = [dict(recorded[0]["answer"]["results"][0]["result"][0], id="accepted-before")]

    def of_b(step: int, region_id: str) -> dict:
        body = copy.deepcopy(recorded[step]["body"])
        (point,) = body["params"]["context"]["result"]
        body["params"]["context"]["result"] = [dict(point, id=region_id, value=dict(point["value"], x=8, y=85))]
        return body

    for step, (call, prompt) in enumerate(zip(recorded, meant)):
        if step == 1:  # B's first clicks, on the background
            answer = replay(live_backend, of_b(1, "b-negative"), image_paths["alias"], task_id)
            assert answer.status_code == 200 and answer.json()["results"][0]["result"] == [], answer.text[:300]
            answer = replay(live_backend, of_b(0, "b-positive"), image_paths["alias"], task_id)
            assert answer.status_code == 200, answer.text
            (region,) = answer.json()["results"][0]["result"]
            alone = reference({"points": [(8, 85, False), (8, 85, True)], "box": None})
            assert iou(decode_brush(region), alone) >= 0.9, "B's click was mixed with A's"
        body = call["body"]
        body["tasks"][0]["drafts"] = [{"id": 1, "user": "a@example.com", "result": copy.deepcopy(shown)}]
        answer = replay(live_backend, body, image_paths["alias"], task_id)
        assert answer.status_code == 200, answer.text
        (region,) = answer.json()["results"][0]["result"]
        overlap = iou(decode_brush(region), reference(prompt))
        assert overlap >= 0.9, f"A's {call['step']}: IoU {overlap:.3f} with MobileSAM on {prompt}"
        shown += body["params"]["context"]["result"]
