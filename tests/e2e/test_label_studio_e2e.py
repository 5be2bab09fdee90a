"""End to end: a real Label Studio 1.23.2 drives the real backend (gunicorn, MobileSAM) over HTTP.

One Label Studio serves the whole module (its first start migrates a fresh database: about a minute). The backend
runs as deployed (`gunicorn _wsgi:app`), first with the legacy token, then in a second process with a personal
access token while the organization has legacy tokens disabled. Label Studio is driven through the REST calls its
editor and Data Manager make (see shared/label-studio-protocol.md): smart-tool clicks and boxes go through
`POST /api/ml/<id>/interactive-annotating`, the editor's autosave through the drafts API.

The photo is scikit-image's chelsea (a close-up of a cat's head, 451x300) saved as JPEG. Every mask is compared
with a reference computed in this process by the same MobileSAM weights on the same JPEG, and checked for
plausibility on its own.

Logs of Label Studio and of each backend go to pytest's tmp dir; their tails are printed when a test fails.
"""
from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]

from labelstudio import (  # noqa: E402
    ALIAS_CONFIG,
    NATIVE_CONFIG,
    Backend,
    HarnessError,
    LabelStudio,
    install_label_studio,
    keypoint,
    rectangle,
)

pytestmark = pytest.mark.labelstudio

W, H = 451, 300

# Prompts in percent of the image (Label Studio's coordinates). A click anywhere on the fur gives the whole cat
# (about 70 % of the picture); the box prompts are chosen so that the box visibly changes the answer.
CAT_CLICK = (30.0, 40.0)
BACKGROUND_CLICK = (95.0, 40.0)  # the blurred room right of the cat
CAT_BOX = (3.0, 0.0, 85.0, 100.0)  # x, y, width, height: the whole head
PART_BOX = (50.0, 0.0, 35.0, 60.0)  # the upper right quarter of the head (right ear and eye)
PART_CLICK = (70.0, 30.0)  # inside PART_BOX: with the box, the mask stays inside it; without, it is the cat


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label_studio_e2e")


@pytest.fixture(scope="module")
def image_path(workdir) -> Path:
    import skimage.data
    from PIL import Image

    path = workdir / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path, format="JPEG", quality=95)
    return path


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    from tools import weights

    return weights.fetch("mobile_sam")


@pytest.fixture(scope="module")
def reference(checkpoint, image_path):
    """mask_of(points=[(x%, y%, positive)], box=(x%, y%, w%, h%)) by MobileSAM in this process, on the JPEG."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from advanced_sam import TorchSamPredictor
    from sam_backend.sam.types import Prompt

    image = np.asarray(Image.open(io.BytesIO(image_path.read_bytes())).convert("RGB"))
    assert image.shape == (H, W, 3)
    predictor = TorchSamPredictor.load("vit_t", checkpoint, "cpu")
    embedding = predictor.embed(image)

    def prediction(points, box, mask_input=None):
        xy = np.array([(x * W / 100, y * H / 100) for x, y, _ in points], np.float32).reshape(-1, 2)
        labels = np.array([1 if positive else 0 for _, _, positive in points], np.int32)
        corners = None
        if box is not None:
            x, y, w, h = box
            corners = np.array([x * W / 100, y * H / 100, (x + w) * W / 100, (y + h) * H / 100], np.float32)
        return predictor.decode(embedding, Prompt(points=xy, labels=labels, box=corners, mask_input=mask_input))

    def mask_of(points=(), box=None, refining=None) -> np.ndarray:
        """refining=(points, box): the earlier prompt of the same object, whose mask is fed back (REFINE_MASKS)."""
        previous = prediction(*refining).low_res_logits if refining is not None else None
        return prediction(points, box, previous).mask

    return mask_of


@pytest.fixture(scope="module")
def label_studio(workdir):
    try:
        executable = install_label_studio()
    except HarnessError as error:
        pytest.fail(f"cannot install Label Studio: {error}")
    server = LabelStudio(workdir / "label-studio.log", executable)
    server.start(workdir / "ls-data")
    yield server
    server.stop()


def _backend_env(label_studio: LabelStudio, api_key: str, checkpoint: Path) -> dict[str, str]:
    return {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": api_key,
        "TORCH_NUM_THREADS": "2",
        "SAM_CHOICE": "MobileSAM",
        "MOBILESAM_CHECKPOINT": str(checkpoint),
        "RUN_ONNX_SAM": "false",
        "DEVICE": "cpu",
        "BASIC_AUTH_USER": "",
        "BASIC_AUTH_PASS": "",
        "LOG_LEVEL": "DEBUG",
    }


@pytest.fixture(scope="module", params=["torch", "onnx"])
def backend(request, label_studio, workdir, checkpoint):
    """The backend with the legacy token, as the seed's users configure it: on torch, then on ONNX Runtime
    (RUN_ONNX_SAM=true with the session's ONNX files). Every test using it runs against both."""
    if not (REPO / "_wsgi.py").is_file():
        pytest.fail("_wsgi.py is missing: the backend is not in the repository")
    env = _backend_env(label_studio, LabelStudio.TOKEN, checkpoint)
    if request.param == "onnx":
        encoder, decoder = request.getfixturevalue("onnx_files")
        env.update(RUN_ONNX_SAM="true", ONNX_ENCODER_PATH=str(encoder), ONNX_DECODER_PATH=str(decoder),
                   ORT_NUM_THREADS="2")
    process = Backend(workdir / f"backend-legacy-{request.param}.log")
    process.start(env)
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request, workdir):
    """On a failing test, print the lines each log gained during the test (pytest keeps the logs in tmp)."""
    logs = sorted(workdir.glob("*.log"))
    sizes = {path: path.stat().st_size for path in logs}
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        return
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else (lambda line: print(line, file=sys.__stderr__))
    for path in sorted(workdir.glob("*.log")):
        text = path.read_bytes()[sizes.get(path, 0):].decode(errors="replace")
        write(f"\n===== {path} (lines written during {request.node.name}, last 8000 chars) =====")
        write(text[-8000:] or "(nothing)")


@pytest.fixture(scope="module")
def native(label_studio, backend, image_path):
    """The native-convention project with the backend connected for interactive pre-annotation."""
    project = label_studio.create_project(NATIVE_CONFIG, title=f"e2e native ({backend.log_path.stem})")
    ml = label_studio.add_ml_backend(project["id"], backend.url, title="SAM legacy token")
    return {"project": project, "ml": ml}


@pytest.fixture(scope="module")
def alias(label_studio, backend, image_path):
    project = label_studio.create_project(ALIAS_CONFIG, title=f"e2e alias ({backend.log_path.stem})")
    ml = label_studio.add_ml_backend(project["id"], backend.url, title="SAM alias")
    return {"project": project, "ml": ml}


def new_task(label_studio: LabelStudio, project: dict, image_path: Path) -> dict:
    """A fresh task (the backend remembers earlier prompts per task: each scenario gets its own)."""
    return label_studio.import_file(project["id"], image_path)


# ---- checks -----------------------------------------------------------------------------------------------------
def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def pixel(x_percent: float, y_percent: float) -> tuple[int, int]:
    """(row, column) of a point given in percent."""
    return min(int(y_percent * H / 100), H - 1), min(int(x_percent * W / 100), W - 1)


def regions_of(answer: dict) -> list[dict]:
    """The regions of an interactive-annotating answer; fails with Label Studio's errors if there are any."""
    assert "errors" not in answer, f"Label Studio reports: {answer['errors']}"
    assert isinstance(answer.get("data"), dict), answer
    result = answer["data"].get("result")
    assert isinstance(result, list), answer
    return result


def brush_mask(region: dict, from_name: str, label: str) -> np.ndarray:
    """Check one brush region's shape and decode its RLE with the SDK Label Studio itself relies on."""
    from label_studio_sdk.converter.brush import decode_rle

    assert region["type"] == "brushlabels", region
    assert region["from_name"] == from_name
    assert region["to_name"] == "image"
    assert region["original_width"] == W and region["original_height"] == H
    assert region["value"]["format"] == "rle"
    assert region["value"]["brushlabels"] == [label]
    assert isinstance(region.get("id"), str) and region["id"]
    if "score" in region:
        assert 0.0 <= region["score"] <= 1.0
    flat = decode_rle(region["value"]["rle"])
    assert flat.size == W * H * 4, f"RLE decodes to {flat.size} values, not {W}*{H}*4"
    return flat.reshape(H, W, 4)[:, :, 3] > 0


def one_mask(answer: dict, from_name: str = "tag", label: str = "Cat") -> np.ndarray:
    regions = regions_of(answer)
    assert len(regions) == 1, f"expected one brush region, got {len(regions)}: {[r.get('type') for r in regions]}"
    data = answer["data"]
    assert isinstance(data.get("model_version"), str) and data["model_version"]
    return brush_mask(regions[0], from_name, label)


def assert_is_the_cat(mask: np.ndarray, expected: np.ndarray) -> None:
    area = mask.mean()
    assert 0.10 <= area <= 0.90, f"mask covers {area:.1%} of the image"
    assert mask[pixel(*CAT_CLICK)], "the mask misses the clicked point"
    assert not mask[pixel(*BACKGROUND_CLICK)], "the mask spills onto the background right of the cat"
    overlap = iou(mask, expected)
    assert overlap >= 0.9, f"IoU with the reference mask is {overlap:.3f} (area {area:.1%} vs {expected.mean():.1%})"


# ---- connection -------------------------------------------------------------------------------------------------
def test_backend_connects_and_versions_agree(label_studio, backend, native):
    ml = label_studio.ml_backend(native["ml"]["id"])
    assert ml["state"] == "CO", f"Label Studio reports the backend as {ml['readable_state']}: {ml['error_message']}"
    assert ml["is_interactive"] is True
    listed = label_studio.ml_backends(native["project"]["id"])
    assert [item["state"] for item in listed] == ["CO"]

    health = backend.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "UP" and health.json()["model_loaded"] is True

    setup = backend.post("/setup", {"project": f"{native['project']['id']}.0", "schema": NATIVE_CONFIG,
                                    "hostname": label_studio.url, "access_token": LabelStudio.TOKEN,
                                    "extra_params": None})
    assert setup.status_code == 200, setup.text
    version = setup.json()["model_version"]
    assert version.startswith("MobileSAM"), version
    assert ml["model_version"] == version

    # "Retrieve predictions" skips tasks whose prediction has the /setup version: /predict must report the same.
    predicted = backend.post("/predict", {"tasks": [{"id": 1, "data": {"image": "/data/upload/none.jpg"}}],
                                          "project": "1.0", "label_config": NATIVE_CONFIG,
                                          "params": {"login": None, "password": None, "context": None}})
    assert predicted.status_code == 200, predicted.text
    assert [item["model_version"] for item in predicted.json()["results"]] == [version]


# ---- the native convention --------------------------------------------------------------------------------------
def test_one_positive_click_segments_the_cat(label_studio, native, image_path, reference):
    task = new_task(label_studio, native["project"], image_path)
    context = {"result": [keypoint(*CAT_CLICK, "Cat", width=W, height=H)]}
    answer = label_studio.interactive_annotating(native["ml"]["id"], task["id"], context)
    mask = one_mask(answer)
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True)]))


def test_positive_and_negative_click(label_studio, native, image_path, reference):
    task = new_task(label_studio, native["project"], image_path)
    context = {"result": [keypoint(*CAT_CLICK, "Cat", width=W, height=H),
                          keypoint(*BACKGROUND_CLICK, "Cat", width=W, height=H, is_positive=False)]}
    mask = one_mask(label_studio.interactive_annotating(native["ml"]["id"], task["id"], context))
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True), (*BACKGROUND_CLICK, False)]))


def test_plain_tool_keypoint_counts_as_positive(label_studio, native, image_path, reference):
    """A keypoint drawn with the non-smart tool comes back in later calls without is_positive and labels."""
    task = new_task(label_studio, native["project"], image_path)
    context = {"result": [keypoint(*CAT_CLICK, "Cat", width=W, height=H, smart=False)]}
    mask = one_mask(label_studio.interactive_annotating(native["ml"]["id"], task["id"], context))
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True)]))


def test_second_label_on_the_same_task(label_studio, native, image_path, reference):
    """Calls are grouped by label: a Dog click after a Cat click answers for Dog alone, without the Cat click."""
    task = new_task(label_studio, native["project"], image_path)
    ml_id = native["ml"]["id"]
    cat = keypoint(*CAT_CLICK, "Cat", width=W, height=H)
    one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [cat]}))
    dog = keypoint(*BACKGROUND_CLICK, "Dog", width=W, height=H)
    mask = one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [dog]}), label="Dog")
    assert mask[pixel(*BACKGROUND_CLICK)] and not mask[pixel(*CAT_CLICK)], "the Cat click leaked into Dog's mask"
    overlap = iou(mask, reference([(*BACKGROUND_CLICK, True)]))
    assert overlap >= 0.9, f"IoU with the reference mask is {overlap:.3f}"


def test_rectangle_around_the_cat(label_studio, native, image_path, reference):
    task = new_task(label_studio, native["project"], image_path)
    context = {"result": [rectangle(*CAT_BOX, "Cat", width=W, height=H)]}
    mask = one_mask(label_studio.interactive_annotating(native["ml"]["id"], task["id"], context))
    assert_is_the_cat(mask, reference(box=CAT_BOX))


def _assert_box_and_point(mask: np.ndarray, reference, refining=None) -> None:
    expected = reference([(*PART_CLICK, True)], box=PART_BOX, refining=refining)
    point_only = reference([(*PART_CLICK, True)])
    assert iou(expected, point_only) < 0.5, "test data: the box should change the reference answer"
    assert mask[pixel(*PART_CLICK)], "the mask misses the clicked point"
    x, y, w, h = PART_BOX
    inside = np.zeros_like(mask)
    inside[int(y * H / 100):int((y + h) * H / 100) + 2, int(x * W / 100) - 1:int((x + w) * W / 100) + 2] = True
    outside = (mask & ~inside).sum() / max(mask.sum(), 1)
    assert outside < 0.05, f"{outside:.1%} of the mask lies outside the box: the box was not used"
    overlap = iou(mask, expected)
    assert overlap >= 0.9, f"IoU with the box+point reference is {overlap:.3f} (point alone: " \
                           f"{iou(mask, point_only):.3f})"


def test_box_from_the_draft_and_a_click(label_studio, native, image_path, reference):
    """Keypoints and rectangles never arrive in one call: a click finds the box in the autosaved draft."""
    task = new_task(label_studio, native["project"], image_path)
    box = rectangle(*PART_BOX, "Cat", width=W, height=H)
    label_studio.save_draft(task["id"], [box])
    drafts = label_studio.task(task["id"])["drafts"]
    assert [region["id"] for region in drafts[0]["result"]] == [box["id"]]
    context = {"result": [keypoint(*PART_CLICK, "Cat", width=W, height=H)]}
    mask = one_mask(label_studio.interactive_annotating(native["ml"]["id"], task["id"], context))
    _assert_box_and_point(mask, reference)


def test_box_then_click_without_draft(label_studio, native, image_path, reference):
    """With no draft saved yet, the backend remembers the box of its previous call on the same task."""
    task = new_task(label_studio, native["project"], image_path)
    ml_id = native["ml"]["id"]
    box = rectangle(*PART_BOX, "Cat", width=W, height=H)
    first = one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [box]}))
    assert first.any()
    context = {"result": [keypoint(*PART_CLICK, "Cat", width=W, height=H)]}
    mask = one_mask(label_studio.interactive_annotating(ml_id, task["id"], context))
    # The click adds to the box's prompt, so the box's mask is fed back with it (REFINE_MASKS, on by default).
    _assert_box_and_point(mask, reference, refining=((), PART_BOX))


# ---- the seed's alias convention --------------------------------------------------------------------------------
def test_alias_positive_click(label_studio, alias, image_path, reference):
    task = new_task(label_studio, alias["project"], image_path)
    context = {"result": [keypoint(*CAT_CLICK, "1", width=W, height=H, from_name="tag2")]}
    mask = one_mask(label_studio.interactive_annotating(alias["ml"]["id"], task["id"], context),
                    from_name="brush", label="1")
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True)]))


def test_alias_negative_click_alone_is_negative(label_studio, alias, image_path):
    """A '-1' click arrives alone and with is_positive true: the backend must read the alias as negative."""
    task = new_task(label_studio, alias["project"], image_path)
    context = {"result": [keypoint(*CAT_CLICK, "-1", width=W, height=H, from_name="tag2")]}
    answer = label_studio.interactive_annotating(alias["ml"]["id"], task["id"], context)
    for region in regions_of(answer):
        mask = brush_mask(region, "brush", "1")
        assert not mask[pixel(*CAT_CLICK)], "a '-1' click was segmented as a positive one"


def test_alias_negative_click_after_positive(label_studio, alias, image_path, reference):
    """'1' then '-1' on the same task: the second call carries only the '-1' click; the backend remembers the '1'."""
    task = new_task(label_studio, alias["project"], image_path)
    ml_id = alias["ml"]["id"]
    positive = keypoint(*CAT_CLICK, "1", width=W, height=H, from_name="tag2")
    one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [positive]}), "brush", "1")
    negative = keypoint(*BACKGROUND_CLICK, "-1", width=W, height=H, from_name="tag2")
    mask = one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [negative]}), "brush", "1")
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True), (*BACKGROUND_CLICK, False)]))


def test_alias_rectangle(label_studio, alias, image_path, reference):
    task = new_task(label_studio, alias["project"], image_path)
    context = {"result": [rectangle(*CAT_BOX, "1", width=W, height=H, from_name="tag4")]}
    mask = one_mask(label_studio.interactive_annotating(alias["ml"]["id"], task["id"], context), "brush", "1")
    assert_is_the_cat(mask, reference(box=CAT_BOX))


def test_two_annotators_on_one_task_keep_their_clicks_apart(label_studio, alias, image_path, reference):
    """Annotator A clicks the cat twice (`1`; the editor autosaved after the first), then annotator B, a second
    user of the organization, opens the same task: B's first lone `-1` click asks for nothing (it got A's `1`
    clicks, and B was shown A's cat, when the backend kept one memory per task), B's `1` click on the background
    is B's alone, and A's `-1` still refines A's cat. Label Studio sends each caller's own drafts only."""
    task = new_task(label_studio, alias["project"], image_path)
    ml_id = alias["ml"]["id"]
    first = keypoint(*CAT_CLICK, "1", width=W, height=H)
    one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [first]}), "brush", "1")
    label_studio.save_draft(task["id"], [first])
    second = keypoint(*PART_CLICK, "1", width=W, height=H)
    one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [first, second]}), "brush", "1")
    other = label_studio.sign_up(f"b-{task['id']}@example.com", "b-password-123")
    negative = keypoint(*PART_CLICK, "-1", width=W, height=H)
    assert regions_of(other.interactive_annotating(ml_id, task["id"], {"result": [negative]})) == []
    background = keypoint(*BACKGROUND_CLICK, "1", width=W, height=H)
    mask = one_mask(other.interactive_annotating(ml_id, task["id"], {"result": [background]}), "brush", "1")
    assert mask[pixel(*BACKGROUND_CLICK)] and not mask[pixel(*CAT_CLICK)], "B's mask holds A's cat"
    label_studio.save_draft(task["id"], [first, second])
    a_negative = keypoint(*BACKGROUND_CLICK, "-1", width=W, height=H)
    mask = one_mask(label_studio.interactive_annotating(ml_id, task["id"], {"result": [a_negative]}), "brush", "1")
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True), (*PART_CLICK, True), (*BACKGROUND_CLICK, False)],
                                      refining=([(*CAT_CLICK, True), (*PART_CLICK, True)], None)))


# ---- predictions without a prompt -------------------------------------------------------------------------------
def test_retrieve_predictions_returns_no_regions(label_studio, native, image_path):
    """Data Manager "Retrieve predictions": one /predict with context null, stored as an empty prediction."""
    tasks = [new_task(label_studio, native["project"], image_path) for _ in range(2)]
    ids = [task["id"] for task in tasks]
    answer = label_studio.retrieve_predictions(native["project"]["id"], ids)
    assert answer.get("processed_items") == 2, answer
    version = label_studio.ml_backend(native["ml"]["id"])["model_version"]
    for task_id in ids:
        predictions = label_studio.predictions(task_id)
        # Label Studio stores nothing when the backend fails or answers the wrong shape.
        assert len(predictions) == 1, f"task {task_id}: {predictions} (the backend failed: see its log)"
        assert predictions[0]["result"] == []
        assert predictions[0]["model_version"] == version


def test_opening_a_task_prefills_nothing(label_studio, native, image_path):
    """Opening a task (GET /api/tasks/<id>/) makes Label Studio call /predict with context null."""
    task = new_task(label_studio, native["project"], image_path)
    opened = label_studio.task(task["id"])
    assert [prediction["result"] for prediction in opened["predictions"]] == [[]], opened["predictions"]


# ---- a personal access token, with legacy tokens disabled ------------------------------------------------------
@pytest.fixture(scope="module")
def pat_backend(label_studio, workdir, checkpoint, backend):
    """A second backend process holding a personal access token instead of the legacy token.

    The organization's legacy tokens are disabled for its tests, so the legacy token Label Studio hands over in
    /setup is useless and images can only be downloaded with a refreshed access token.
    """
    pat = label_studio.personal_access_token()
    process = Backend(workdir / "backend-pat.log")
    process.start(_backend_env(label_studio, pat, checkpoint))
    label_studio.authenticate_with(pat)
    label_studio.set_token_settings(legacy=False)
    try:
        yield process
    finally:
        try:
            label_studio.set_token_settings(legacy=True)
        finally:
            label_studio.authenticate_with(None)
            process.stop()


def test_personal_access_token(label_studio, pat_backend, image_path, reference):
    settings = label_studio.token_settings()
    assert settings["legacy_api_tokens_enabled"] is False
    refused = requests.get(f"{label_studio.url}/api/current-user/whoami",
                           headers={"Authorization": f"Token {LabelStudio.TOKEN}"}, timeout=30)
    assert refused.status_code == 401, "legacy tokens should be refused now"

    project = label_studio.create_project(NATIVE_CONFIG, title="e2e personal access token")
    ml = label_studio.add_ml_backend(project["id"], pat_backend.url, title="SAM PAT")
    assert ml["state"] == "CO", ml
    task = new_task(label_studio, project, image_path)
    context = {"result": [keypoint(*CAT_CLICK, "Cat", width=W, height=H)]}
    mask = one_mask(label_studio.interactive_annotating(ml["id"], task["id"], context))
    assert_is_the_cat(mask, reference([(*CAT_CLICK, True)]))


def test_legacy_token_refused_is_reported_not_crashed(label_studio, pat_backend, backend, image_path):
    """The other side of the PAT test: the legacy-token backend cannot fetch the image now, and says so.

    Label Studio hands a backend's failure to the editor as HTTP 200 {"errors": [...]}.
    """
    assert label_studio.token_settings()["legacy_api_tokens_enabled"] is False
    project = label_studio.create_project(NATIVE_CONFIG, title="e2e legacy token refused")
    ml = label_studio.add_ml_backend(project["id"], backend.url, title="SAM legacy token, refused")
    task = new_task(label_studio, project, image_path)
    context = {"result": [keypoint(*CAT_CLICK, "Cat", width=W, height=H)]}
    answer = label_studio.interactive_annotating(ml["id"], task["id"], context)
    assert answer.get("errors"), answer
    assert backend.get("/health").status_code == 200
