"""The smart tools in Label Studio's real editor show our mask: Debian's Chromium drives the 1.23.2 editor.

One Label Studio, one backend (gunicorn, MobileSAM, as deployed) and one Chromium serve the module. Label Studio
reaches the backend through a recording reverse proxy (tests/browser_helpers.py), so the test knows the exact
bodies the editor caused. For each label convention (native values, and the seed's aliases) it:

1. creates a project, connects the backend for interactive pre-annotation, uploads skimage's chelsea as JPEG;
2. (once) logs in through the login page, then opens the task in the labeling editor;
3. turns on Auto-Annotation, picks the smart keypoint tool of the Auto-Detect group and a label, clicks the cat:
   the backend's mask shows as a pending suggestion;
4. adds a negative point (an alt-click; with the aliases, a click with the `-1` label), then draws a box with the
   smart rectangle tool; every step's answer replaces the suggestion;
5. accepts the suggestion, waits for the autosaved draft, submits, and reads the annotation back through the API.

Masks are decoded with label_studio_sdk's decode_rle and compared with MobileSAM run in this process on the same
JPEG with the prompt each recorded body means (IoU >= 0.8), and checked on their own (the clicked point is in,
the background point out, the area is the cat's head).

Artifacts (screenshots, the recorded bodies) go to artifacts/browser/ (git-ignored); their path is printed.
With BROWSER_TEST_RECORD=1 the run also rewrites tools/harness/bodies/editor_1_23_bodies.json (replayed by
tests/e2e/test_browser_fixtures.py without a browser) and docs/editor-mask.png.

Skipped only when Chromium cannot be installed (scripts/install_browser.sh), with a warning saying so.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

from browser_helpers import (  # noqa: E402
    BrowserUnavailable,
    Chromium,
    RecordingProxy,
    decode_brush,
    expected_prompts,
    install_browser,
    iou,
    log_in,
)
from labelstudio import ALIAS_CONFIG, NATIVE_CONFIG, Backend, HarnessError, LabelStudio, install_label_studio  # noqa: E402

from tools.harness import recordings  # noqa: E402

# pytest.ini should list the marker (see the report of issue #8); until it does, register it here so that
# --strict-markers accepts it.
_config = getattr(pytest.mark, "_config", None)
if _config is not None and not any(line.split(":")[0].strip() == "browser" for line in _config.getini("markers")):
    _config.addinivalue_line("markers", "browser: drives Label Studio's real editor in Debian's Chromium")

pytestmark = [pytest.mark.browser, pytest.mark.labelstudio]

W, H = 451, 300
ARTIFACTS = REPO / "artifacts" / "browser"
FIXTURE = recordings.EDITOR  # tools/harness/bodies/editor_1_23_bodies.json
DOCS_SCREENSHOT = REPO / "docs" / "editor-mask.png"
RECORD = os.environ.get("BROWSER_TEST_RECORD", "").strip().lower() in ("1", "true", "yes", "on")

#: Seconds for one interactive round trip (editor -> LS -> backend; the first one may embed the image).
PREDICT_TIMEOUT = 120
#: Seconds for anything the editor does on its own (render a suggestion, autosave a draft, submit).
UI_TIMEOUT = 30

# Prompts in percent of the image. (26, 40) is fur left of the cat's left eye: the answer is the whole head.
# (30, 40), the API tests' click, lies on the eye's rim, where one screen pixel flips the answer to the eye.
CLICK = (26.0, 40.0)
BACKGROUND = (95.0, 40.0)  # the blurred room right of the cat
# The editor shows the image slightly zoomed (a few percent of each border are off screen): keep the box inside.
BOX_CORNERS = ((5.0, 5.0), (88.0, 95.0))

# The projects are labelstudio.NATIVE_CONFIG / ALIAS_CONFIG, as in test_label_studio_e2e.py. The order of the
# controls matters here: a label is picked on screen among the labels of the same text, in config order.

#: Per convention: the config, the brush tag and label the answer must carry, and for each prompt step the
#: control, the label's text on screen, the label Label Studio must send (alias or value), whether it is an
#: alt-click, and the is_positive it must carry.
CONVENTIONS = {
    "native": {
        "config": NATIVE_CONFIG, "brush": ("tag", "Cat"),
        "positive": {"control": "tag2", "text": "Cat", "sent": "Cat", "alt": False, "is_positive": True},
        "negative": {"control": "tag2", "text": "Cat", "sent": "Cat", "alt": True, "is_positive": False},
        "box": {"control": "tag3", "text": "Cat", "sent": "Cat"},
    },
    "alias": {
        "config": ALIAS_CONFIG, "brush": ("brush", "1"),
        "positive": {"control": "tag2", "text": "(+1)", "sent": "1", "alt": False, "is_positive": True},
        # The seed's negative label: sent alone and with is_positive true; the backend reads `-1` as negative.
        "negative": {"control": "tag2", "text": "(-1)", "sent": "-1", "alt": False, "is_positive": True},
        "box": {"control": "tag4", "text": "[1]", "sent": "1"},
    },
}

_STATE: dict = {"browser": None, "processes": [], "proxy": None}


# ---- fixtures ---------------------------------------------------------------------------------------------------
def _report(request, line: str) -> None:
    """Write a line to the terminal now, past pytest's output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        print(line, file=sys.__stderr__)
        return
    if capture is not None and hasattr(capture, "global_and_fixture_disabled"):
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    else:
        reporter.write_line(line)


@pytest.fixture(scope="module")
def chromium_path(request) -> Path:
    """Debian's Chromium, installed if missing; the module is skipped (loudly) only when that is impossible."""
    try:
        return install_browser()
    except BrowserUnavailable as error:
        message = f"BROWSER TESTS SKIPPED: Chromium cannot be installed on this machine: {error}"
        banner = "!" * 100
        _report(request, f"\n{banner}\n{message}\n{banner}")
        warnings.warn(message, pytest.PytestWarning, stacklevel=1)
        pytest.skip(message)


@pytest.fixture(scope="module")
def playwright_ok(chromium_path) -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as error:
        pytest.fail(f"the Python package playwright is missing ({error}): it belongs in requirements-dev.txt")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


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
    """mask_of({"points": [(x%, y%, positive)], "box": (x%, y%, w%, h%) | None}) by MobileSAM in this process."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from advanced_sam import TorchSamPredictor
    from sam_backend.sam.types import Prompt

    image = np.asarray(Image.open(io.BytesIO(image_path.read_bytes())).convert("RGB"))
    assert image.shape == (H, W, 3)
    predictor = TorchSamPredictor.load("vit_t", checkpoint, "cpu")
    embedding = predictor.embed(image)

    def mask_of(prompt: dict) -> np.ndarray:
        points = prompt.get("points") or []
        xy = np.array([(x * W / 100, y * H / 100) for x, y, _ in points], np.float32).reshape(-1, 2)
        labels = np.array([1 if positive else 0 for *_, positive in points], np.int32)
        corners = None
        if prompt.get("box") is not None:
            x, y, w, h = prompt["box"]
            corners = np.array([x * W / 100, y * H / 100, (x + w) * W / 100, (y + h) * H / 100], np.float32)
        return predictor.decode(embedding, Prompt(points=xy, labels=labels, box=corners)).mask

    return mask_of


@pytest.fixture(scope="module")
def label_studio(workdir, playwright_ok):
    try:
        executable = install_label_studio()
    except HarnessError as error:
        pytest.fail(f"cannot install Label Studio: {error}")
    server = LabelStudio(workdir / "label-studio.log", executable)
    _STATE["processes"].append(server)
    server.start(workdir / "ls-data")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(label_studio, workdir, checkpoint):
    process = Backend(workdir / "backend.log")
    _STATE["processes"].append(process)
    process.start({
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LabelStudio.TOKEN,
        "SAM_CHOICE": "MobileSAM", "MOBILESAM_CHECKPOINT": str(checkpoint), "RUN_ONNX_SAM": "false",
        "DEVICE": "cpu", "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "", "LOG_LEVEL": "DEBUG",
    })
    yield process
    process.stop()


@pytest.fixture(scope="module")
def proxy(backend):
    """Label Studio -> this recording proxy -> the backend."""
    server = RecordingProxy(backend.url)
    _STATE["proxy"] = server
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser(label_studio, chromium_path):
    """One Chromium for the module, logged in through Label Studio's login page."""
    chromium = Chromium(chromium_path)
    _STATE["browser"] = chromium
    try:
        log_in(chromium.page, label_studio.url, LabelStudio.USERNAME, LabelStudio.PASSWORD)
        yield chromium
    finally:
        _STATE["browser"] = None
        chromium.close()


@pytest.fixture(scope="module")
def recordings(request, artifacts):
    """What each scenario recorded; written to artifacts/ (and with BROWSER_TEST_RECORD=1 to the fixture)."""
    flows: dict[str, dict] = {}
    yield flows
    _report(request, f"\nbrowser test artifacts (screenshots, recorded bodies): {artifacts}")
    if not flows:
        return
    document = {
        "label_studio_version": "1.23.2",
        "how": ("Recorded by tests/test_browser.py: Debian's Chromium (Playwright) drove Label Studio 1.23.2's "
                "labeling editor; Label Studio reached the backend through a recording reverse proxy. Each flow "
                "lists, in order, every call Label Studio made to the backend with the user action that caused "
                "it ('step'); interactive steps also hold what the editor itself posted to Label Studio "
                "(editor_request). Answers are summarised, not stored. Image: skimage.data.chelsea() as JPEG "
                "(quality 95), 451x300; percent coordinates of the image."),
        "chromium": _STATE.get("chromium_version"),
        "flows": flows,
    }
    text = json.dumps(document, indent=1, sort_keys=False) + "\n"
    (artifacts / "editor_1_23_bodies.json").write_text(text)
    if RECORD and set(flows) == set(CONVENTIONS):
        FIXTURE.write_text(text)
        _report(request, f"browser test: wrote {FIXTURE.relative_to(REPO)} and {DOCS_SCREENSHOT.relative_to(REPO)}")


@pytest.fixture(autouse=True)
def _evidence_on_failure(request, workdir, artifacts):
    """On a failing test: a screenshot, the browser console, the proxy's calls and the logs' new lines."""
    logs = sorted(workdir.glob("*.log"))
    sizes = {path: path.stat().st_size for path in logs}
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        return
    write = lambda line: _report(request, line)  # noqa: E731
    chromium = _STATE.get("browser")
    if chromium is not None:
        shot = artifacts / f"FAILED-{request.node.name}.png"
        try:
            chromium.page.screenshot(path=str(shot), timeout=10_000)
            write(f"\n===== screenshot of the failure: {shot}")
        except Exception as error:  # noqa: BLE001 - evidence is best effort
            write(f"\n===== no screenshot: {error!r}")
        write("===== browser console (warnings and errors, last 30) =====")
        for line in [line for line in chromium.console if not line.startswith(("info:", "log:", "debug:"))][-30:]:
            write(line[:400])
    proxy_server = _STATE.get("proxy")
    if proxy_server is not None:
        write("===== calls Label Studio made to the backend (through the proxy) =====")
        for call in proxy_server.snapshot()[-20:]:
            write(f"{call.method} {call.path} -> {call.status} in {call.seconds:.2f}s: "
                  f"request {json.dumps(call.body)[:300]} answer {json.dumps(call.answer)[:300]}")
    for path in sorted(workdir.glob("*.log")):
        text = path.read_bytes()[sizes.get(path, 0):].decode(errors="replace")
        write(f"\n===== {path} (lines written during {request.node.name}, last 8000 chars) =====")
        write(text[-8000:] or "(nothing)")


# ---- the editor, as a person uses it ---------------------------------------------------------------------------
STORE_STATE = """() => {
  const a = Htx.annotationStore.selected;
  return {
    regions: a.regionStore.regions.map(r => ({id: r.id, type: r.type, dynamic: !!r.dynamic})),
    suggestions: [...a.suggestions.values()].map(r => ({id: r.id, type: r.type})),
    result: a.serializeAnnotation(),
    awaiting: !!Htx.awaitingSuggestions,
  };
}"""

IMAGE_GEOMETRY = """() => {
  const image = Htx.annotationStore.selected.names.get('image');
  const stage = document.querySelector('.konvajs-content').getBoundingClientRect();
  return {left: stage.x, top: stage.y, width: stage.width, height: stage.height,
          x: stage.x + image.zoomingPositionX, y: stage.y + image.zoomingPositionY,
          w: image.stageWidth * image.zoomScale, h: image.stageHeight * image.zoomScale};
}"""


class Editor:
    """The labeling editor of one task in the page, driven with the mouse and keyboard."""

    def __init__(self, page, label_studio: LabelStudio, project_id: int, task_id: int, shots: Path,
                 prefix: str) -> None:
        self.page = page
        self.ls = label_studio
        self.project_id = project_id
        self.task_id = task_id
        self.shots = shots
        self.prefix = prefix
        self.screenshots: list[Path] = []

    def open(self) -> None:
        self.page.goto(f"{self.ls.url}/projects/{self.project_id}/data?task={self.task_id}")
        self.page.wait_for_function(
            "() => window.Htx && Htx.annotationStore && Htx.annotationStore.selected && "
            "Htx.annotationStore.selected.names.get('image') && "
            "Htx.annotationStore.selected.names.get('image').imageIsLoaded !== false && "
            "document.querySelector('.konvajs-content')", timeout=UI_TIMEOUT * 2000)
        # The image's size on screen settles after it has loaded.
        self.page.wait_for_function(
            "() => { const i = Htx.annotationStore.selected.names.get('image'); "
            "return i.naturalWidth > 1 && i.stageWidth > 1 && i.zoomScale > 0; }", timeout=UI_TIMEOUT * 1000)
        self.page.locator("[data-testid=bottombar-auto-annotation-toggle]").wait_for(timeout=UI_TIMEOUT * 1000)
        # Clicks are placed from the image's geometry on screen: wait until it holds still.
        deadline = time.monotonic() + UI_TIMEOUT
        last = None
        while True:
            geometry = self.page.evaluate(IMAGE_GEOMETRY)
            if geometry == last:
                break
            assert time.monotonic() < deadline, f"the image keeps moving on screen: {last} -> {geometry}"
            last = geometry
            self.page.wait_for_timeout(300)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{self.prefix}-{name}.png"
        self.page.screenshot(path=str(path), timeout=20_000)
        self.screenshots.append(path)
        return path

    def state(self) -> dict:
        return self.page.evaluate(STORE_STATE)

    def auto_annotation(self, on: bool = True) -> None:
        """The bottom bar's Auto-Annotation toggle (remembered by the editor in localStorage across tasks)."""
        if bool(self.page.evaluate("() => Htx.autoAnnotation")) != on:
            self.page.click("[data-testid=bottombar-auto-annotation-toggle]")
        self.page.wait_for_function(f"() => Htx.autoAnnotation === {'true' if on else 'false'}",
                                    timeout=UI_TIMEOUT * 1000)

    def smart_tool(self, name: str) -> None:
        """Hover the Auto-Detect button and pick one of its smart tools (`key-point-tool`, `rectangle-tool`)."""
        self.page.locator(".lsf-tool_smart:not([aria-label])").hover()
        self.page.locator(f".lsf-tool__extra .lsf-tool_smart[aria-label={name}]").click()
        active = self.page.evaluate(
            "() => [...document.querySelectorAll('.lsf-tool_active.lsf-tool_smart')].map(e => e.getAttribute('aria-label'))")
        assert name in active, f"the smart {name} is not active after choosing it: {active}"

    def label(self, control: str, text: str, sent: str) -> None:
        """Click the label `text` of `control` (labels of the same text are told apart by the config's order)."""
        index = self.page.evaluate("""([control, text]) => {
            const names = [...Htx.annotationStore.selected.names.values()]
              .filter(tag => tag.type && tag.type.endsWith('labels') && tag.children
                      && tag.children.some(l => l.value === text));
            return names.findIndex(tag => tag.name === control);
        }""", [control, text])
        assert index >= 0, f"no label {text!r} in control {control}"
        labels = self.page.locator(".lsf-label").filter(
            has=self.page.locator(".lsf-label__text", has_text=text))
        exact = [i for i in range(labels.count()) if labels.nth(i).locator(".lsf-label__text").inner_text() == text]
        labels.nth(exact[index]).click()
        selected = self.page.evaluate(
            "(control) => Htx.annotationStore.selected.names.get(control).selectedValues()", control)
        assert selected == [sent], f"after clicking {text!r}, {control} has {selected} selected, not [{sent!r}]"

    def point(self, x_percent: float, y_percent: float) -> tuple[float, float]:
        """Screen position of a point of the image, in percent; it must be visible."""
        # The editor re-renders its stage after some actions (accepting a suggestion); under load the canvas can
        # be briefly absent (seen once in CI conditions: querySelector('.konvajs-content') was null).
        self.page.wait_for_selector(".konvajs-content", timeout=UI_TIMEOUT * 1000)
        geometry = self.page.evaluate(IMAGE_GEOMETRY)
        x = geometry["x"] + geometry["w"] * x_percent / 100
        y = geometry["y"] + geometry["h"] * y_percent / 100
        inside = (geometry["left"] + 1 <= x <= geometry["left"] + geometry["width"] - 1
                  and geometry["top"] + 1 <= y <= geometry["top"] + geometry["height"] - 1)
        assert inside, f"({x_percent}%, {y_percent}%) of the image is off screen: {geometry}"
        return x, y

    def click(self, x_percent: float, y_percent: float, alt: bool = False) -> None:
        x, y = self.point(x_percent, y_percent)
        if alt:
            self.page.keyboard.down("Alt")
        try:
            self.page.mouse.click(x, y)
        finally:
            if alt:
                self.page.keyboard.up("Alt")

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
        (x0, y0), (x1, y1) = self.point(*start), self.point(*end)
        self.page.mouse.move(x0, y0)
        self.page.mouse.down()
        for i in range(1, steps + 1):
            self.page.mouse.move(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps)
        self.page.mouse.up()

    def interactive(self, action) -> tuple[dict, dict]:
        """Run `action`; return (what the editor posted to Label Studio's interactive-annotating, LS's answer)."""
        with self.page.expect_response(lambda r: "/interactive-annotating" in r.url,
                                       timeout=PREDICT_TIMEOUT * 1000) as info:
            action()
        response = info.value
        assert response.status == 200, f"interactive-annotating -> {response.status}: {response.text()[:2000]}"
        return response.request.post_data_json, response.json()

    def wait_suggestion(self, region_id: str) -> dict:
        """Wait until the editor shows the answer's region as the (only) pending suggestion."""
        self.page.wait_for_function("""(id) => {
            const a = Htx.annotationStore.selected;
            const s = [...a.suggestions.values()];
            return !Htx.awaitingSuggestions && s.length === 1 && s[0].id.split('#')[0] === id;
        }""", arg=region_id, timeout=UI_TIMEOUT * 1000, polling=200)
        return self.state()


def _one_brush(answer_regions: list[dict], brush: tuple[str, str]) -> dict:
    assert len(answer_regions) == 1, f"expected one region, got {[r.get('type') for r in answer_regions]}"
    (region,) = answer_regions
    assert region["type"] == "brushlabels", region
    assert (region["from_name"], region["value"]["brushlabels"]) == (brush[0], [brush[1]]), region
    assert region["to_name"] == "image" and (region["original_width"], region["original_height"]) == (W, H)
    return region


def _pixel(x_percent: float, y_percent: float) -> tuple[int, int]:
    return min(int(y_percent * H / 100), H - 1), min(int(x_percent * W / 100), W - 1)


def _check_head(mask: np.ndarray, what: str) -> None:
    area = mask.mean()
    assert 0.40 <= area <= 0.90, f"{what}: the mask covers {area:.1%} of the image, not a cat's head (~70 %)"
    assert mask[_pixel(*CLICK)], f"{what}: the mask misses the clicked point"
    assert not mask[_pixel(*BACKGROUND)], f"{what}: the mask spills onto the background right of the cat"


def _summary(answer) -> dict | None:
    """An answer without its RLE: enough to see what came back."""
    if not isinstance(answer, dict):
        return answer
    if "results" not in answer:
        return answer
    return {"results": [{"model_version": item.get("model_version"), "score": item.get("score"),
                         "result": [{"type": r.get("type"), "from_name": r.get("from_name"),
                                     "labels": (r.get("value") or {}).get(r.get("type")),
                                     "score": r.get("score"),
                                     "area": round(float(decode_brush(r).mean()), 4)
                                     if r.get("type") == "brushlabels" else None}
                                    for r in item.get("result") or []]}
                        for item in answer["results"]]}


# ---- the scenarios ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_smart_tools_show_our_mask(convention, label_studio, backend, proxy, browser, image_path, reference,
                                   recordings, artifacts):
    conv = CONVENTIONS[convention]
    started = time.monotonic()
    _STATE["chromium_version"] = browser.page.evaluate("() => navigator.userAgent")
    steps: list[tuple[str, int]] = []  # (step name, index of the proxy's first call of that step)

    def step(name: str) -> None:
        steps.append((name, len(proxy.snapshot())))

    step("add_model")
    project = label_studio.create_project(conv["config"], title=f"browser {convention}")
    ml = label_studio.add_ml_backend(project["id"], proxy.url, title=f"SAM via recording proxy ({convention})",
                                     is_interactive=True)
    assert ml["state"] == "CO", f"Label Studio reports the backend as {ml.get('readable_state')}: {ml}"
    step("import_task")
    task = label_studio.import_file(project["id"], image_path)

    step("open_task")
    editor = Editor(browser.page, label_studio, project["id"], task["id"], artifacts, convention)
    editor.open()
    editor.shot("1-opened")
    assert editor.state()["regions"] == [], "opening the task pre-filled regions"

    editor.auto_annotation(True)
    editor.smart_tool("key-point-tool")

    interactive: list[dict] = []  # per prompt step: what the editor sent, what LS answered, the proxy's call

    def prompt_step(name: str, action, screenshot: str) -> dict:
        step(name)
        before = len(proxy.snapshot())
        request, answer = editor.interactive(action)
        assert "errors" not in answer, f"{name}: Label Studio reports {answer['errors']}"
        regions = answer["data"]["result"]
        region = _one_brush(regions, conv["brush"])
        shown = editor.wait_suggestion(region["id"])
        calls = proxy.predict_calls(before, interactive=True)
        assert len(calls) == 1, f"{name}: {len(calls)} interactive /predict calls reached the backend"
        assert calls[0].status == 200, f"{name}: the backend answered {calls[0].status}: {calls[0].answer}"
        assert request["task"] == task["id"]
        assert calls[0].body["params"]["context"] == request["context"], \
            f"{name}: Label Studio did not pass the editor's context through unchanged"
        editor.shot(screenshot)
        item = {"name": name, "editor_request": request, "call": calls[0], "region": region, "shown": shown}
        interactive.append(item)
        return item

    # 1. a positive click with the smart keypoint tool
    positive = conv["positive"]
    editor.label(positive["control"], positive["text"], positive["sent"])
    first = prompt_step("smart_keypoint_click", lambda: editor.click(*CLICK), "2-click")
    (kp,) = first["editor_request"]["context"]["result"]
    assert kp["type"] == "keypointlabels" and kp["from_name"] == positive["control"], kp
    assert kp["value"]["keypointlabels"] == [positive["sent"]] and kp["value"]["labels"] == [positive["sent"]]
    assert kp["is_positive"] is True
    assert kp["value"]["x"] == pytest.approx(CLICK[0], abs=0.5) and kp["value"]["y"] == pytest.approx(CLICK[1], abs=0.5)
    assert (kp["original_width"], kp["original_height"]) == (W, H)

    # 2. a negative point: an alt-click, or with the seed's aliases a click with the `-1` label
    negative = conv["negative"]
    editor.label(negative["control"], negative["text"], negative["sent"])  # the editor unselects it after a click
    second = prompt_step("smart_keypoint_negative", lambda: editor.click(*BACKGROUND, alt=negative["alt"]),
                         "3-negative")
    sent = second["editor_request"]["context"]["result"]
    if convention == "native":
        assert [r["is_positive"] for r in sent] == [True, False], "an alt-click should come as is_positive false"
        assert [r["id"] for r in sent][0] == kp["id"], "the first click should be resent with the second"
    else:
        assert len(sent) == 1 and sent[0]["value"]["keypointlabels"] == ["-1"] and sent[0]["is_positive"] is True, \
            "with the seed's aliases a `-1` click arrives alone, marked positive"
    assert sent[-1]["value"]["x"] == pytest.approx(BACKGROUND[0], abs=0.5)

    # 3. a box with the smart rectangle tool
    editor.smart_tool("rectangle-tool")
    box = conv["box"]
    editor.label(box["control"], box["text"], box["sent"])
    third = prompt_step("smart_rectangle", lambda: editor.drag(*BOX_CORNERS), "4-box")
    (rect,) = third["editor_request"]["context"]["result"]
    assert rect["type"] == "rectanglelabels" and rect["value"]["rectanglelabels"] == [box["sent"]], rect
    assert "is_positive" not in rect
    (x0, y0), (x1, y1) = BOX_CORNERS
    assert rect["value"]["x"] == pytest.approx(x0, abs=0.5) and rect["value"]["width"] == pytest.approx(x1 - x0, abs=1)

    # Every answer against MobileSAM run here on what the body means (the backend remembers earlier groups).
    meant = expected_prompts([item["editor_request"]["context"] for item in interactive])
    masks = []
    for item, prompt in zip(interactive, meant):
        mask = decode_brush(item["region"])
        expected = reference(prompt)
        overlap = iou(mask, expected)
        assert overlap >= 0.8, f"{item['name']}: IoU {overlap:.3f} with MobileSAM on {prompt} " \
                               f"(area {mask.mean():.1%} vs {expected.mean():.1%})"
        _check_head(mask, item["name"])
        item["iou"] = round(overlap, 4)
        masks.append(mask)

    # 4. accept the suggestion: the brush region joins the annotation, the smart tools' prompts leave it
    step("accept_suggestion")
    browser.page.click("[data-testid=bottombar-accept-suggestions-button]")
    browser.page.wait_for_function(
        "() => Htx.annotationStore.selected.suggestions.size === 0 && "
        "Htx.annotationStore.selected.serializeAnnotation().some(r => r.type === 'brushlabels')",
        timeout=UI_TIMEOUT * 1000)
    accepted = editor.state()
    held = [r for r in accepted["result"] if r["type"] == "brushlabels"]
    assert len(held) == 1, f"the editor holds {[r['type'] for r in accepted['result']]}"
    assert held[0]["id"] == third["region"]["id"]
    assert iou(decode_brush(held[0]), masks[-1]) >= 0.999, "the editor's region is not the backend's last mask"
    editor.shot("5-accepted")

    # ... and the editor autosaves it as a draft
    draft = _wait_api(label_studio, task["id"], "drafts")
    drafted = [r for r in draft["result"] if r["type"] == "brushlabels"]
    assert len(drafted) == 1 and iou(decode_brush(drafted[0]), masks[-1]) >= 0.999

    # 5. submit, and read the annotation back
    step("submit")
    browser.page.click("[data-testid=bottombar-submit-button]")
    annotation = _wait_api(label_studio, task["id"], "annotations")
    brushes = [r for r in annotation["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1, f"the annotation holds {[r['type'] for r in annotation['result']]}"
    saved = decode_brush(_one_brush(brushes, conv["brush"]))
    assert iou(saved, masks[-1]) >= 0.999
    _check_head(saved, "the submitted annotation")
    final = iou(saved, reference(meant[-1]))
    head = iou(saved, reference({"points": [(*CLICK, True)], "box": None}))
    assert final >= 0.8 and head >= 0.8, f"IoU {final:.3f} with the last prompt's reference, {head:.3f} with " \
                                         f"the whole head (one click)"
    editor.shot("6-submitted")
    _wait_quiet(proxy)
    step("end")

    # Nothing failed on the way, in the backend or in Label Studio's answers to the editor.
    calls = proxy.snapshot()[steps[0][1]:steps[-1][1]]
    bad = [(c.method, c.path, c.status, c.answer) for c in calls if c.status != 200
           or (isinstance(c.answer, dict) and c.answer.get("errors"))]
    assert not bad, f"calls that failed: {bad}"

    recordings[convention] = _flow_record(convention, project, task, steps, proxy.snapshot(), interactive,
                                          {"final_iou_with_last_prompt": round(final, 4),
                                           "final_iou_with_one_click_head": round(head, 4),
                                           "final_area": round(float(saved.mean()), 4),
                                           "seconds": round(time.monotonic() - started, 1)})
    if convention == "native":
        _docs_screenshot(editor.screenshots, artifacts)


PART_BOX_CORNERS = ((50.0, 5.0), (85.0, 60.0))  # the upper right quarter of the head: right ear and eye


def test_a_box_after_accepting_ignores_the_accepted_clicks(label_studio, backend, proxy, browser, image_path,
                                                           reference, artifacts):
    """Click, accept, then a box elsewhere: the clicks are gone from the editor, so the box alone should count.

    Accepting a suggestion deletes the smart tools' regions from the annotation (acceptAllSuggestions ->
    deleteAllDynamicregions), and the box's call never carries keypoints anyway. A click remembered from before
    the acceptance, outside the box, drags the mask out of it.
    """
    project = label_studio.create_project(NATIVE_CONFIG, title="browser accept then box")
    label_studio.add_ml_backend(project["id"], proxy.url, title="SAM via recording proxy (accept then box)")
    task = label_studio.import_file(project["id"], image_path)
    editor = Editor(browser.page, label_studio, project["id"], task["id"], artifacts, "accept-then-box")
    editor.open()
    editor.auto_annotation(True)
    editor.smart_tool("key-point-tool")
    editor.label("tag2", "Cat", "Cat")
    _, answer = editor.interactive(lambda: editor.click(*CLICK))
    editor.wait_suggestion(_one_brush(answer["data"]["result"], ("tag", "Cat"))["id"])
    browser.page.click("[data-testid=bottombar-accept-suggestions-button]")
    browser.page.wait_for_function(
        "() => Htx.annotationStore.selected.suggestions.size === 0 && "
        "!Htx.annotationStore.selected.regionStore.regions.some(r => r.type === 'keypointregion')",
        timeout=UI_TIMEOUT * 1000)
    editor.smart_tool("rectangle-tool")
    editor.label("tag3", "Cat", "Cat")
    before = len(proxy.snapshot())
    request, answer = editor.interactive(lambda: editor.drag(*PART_BOX_CORNERS))
    editor.wait_suggestion(_one_brush(answer["data"]["result"], ("tag", "Cat"))["id"])
    editor.shot("box")
    (call,) = proxy.predict_calls(before, interactive=True)
    (artifacts / "accept-then-box.json").write_text(json.dumps(
        {"request": call.body, "status": call.status, "answer": _summary(call.answer)}, indent=1))
    (rect,) = request["context"]["result"]
    mask = decode_brush(_one_brush(answer["data"]["result"], ("tag", "Cat")))
    value = rect["value"]
    inside = np.zeros_like(mask)
    inside[max(int(value["y"] * H / 100) - 1, 0):int((value["y"] + value["height"]) * H / 100) + 2,
           max(int(value["x"] * W / 100) - 1, 0):int((value["x"] + value["width"]) * W / 100) + 2] = True
    box = (value["x"], value["y"], value["width"], value["height"])
    box_only = reference({"points": [], "box": box})
    with_click = reference({"points": [(*CLICK, True)], "box": box})
    assert iou(box_only, with_click) < 0.8, "test data: the stale click should change the box's mask"
    # SAM's mask for a box alone may spill a little (here the ear tip above it): compare with that, not the box.
    outside = (mask & ~inside).sum() / max(mask.sum(), 1)
    assert iou(mask, box_only) >= 0.9 and not mask[_pixel(*CLICK)], \
        f"IoU {iou(mask, box_only):.3f} with the box alone, {iou(mask, with_click):.3f} with the box and the " \
        f"accepted click ({outside:.0%} of the mask outside the box, clicked point inside the mask: " \
        f"{bool(mask[_pixel(*CLICK)])}); request context {request['context']}"


def _wait_api(label_studio: LabelStudio, task_id: int, key: str) -> dict:
    """The task's first draft/annotation holding a brush region, polled through the API (bounded)."""
    deadline = time.monotonic() + UI_TIMEOUT
    items = []
    while time.monotonic() < deadline:
        # GET /api/tasks/<id>/ with drafts and annotations (this user's drafts).
        items = label_studio.task(task_id).get(key) or []
        with_brush = [item for item in items if any(r.get("type") == "brushlabels" for r in item.get("result") or [])]
        if with_brush:
            assert len(with_brush) == 1, f"{len(with_brush)} {key} with a brush region"
            return with_brush[0]
        time.sleep(0.5)
    raise AssertionError(f"no {key[:-1]} with a brush region within {UI_TIMEOUT} s: {json.dumps(items)[:2000]}")


def _wait_quiet(proxy: RecordingProxy, seconds: float = 1.5, timeout: float = 15) -> None:
    """Let the calls an action causes (the webhook after submitting) arrive before the recording is cut."""
    deadline = time.monotonic() + timeout
    count = len(proxy.snapshot())
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = len(proxy.snapshot())
        if now != count:
            count, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= seconds:
            return


def _flow_record(convention, project, task, steps, calls, interactive, outcome) -> dict:
    by_call = {id(item["call"]): item for item in interactive}
    records = []
    for (name, start), (_, end) in zip(steps, steps[1:]):
        for call in calls[start:end]:
            record = {"step": name, "method": call.method, "path": call.path, "status": call.status,
                      "body": call.body, "answer": _summary(call.answer)}
            item = by_call.get(id(call))
            if item is not None:
                record["editor_request"] = item["editor_request"]
                record["iou_with_reference"] = item["iou"]
            records.append(record)
    # Steps that made Label Studio call nothing (accepting a suggestion, the draft's autosave) are listed too.
    counts = [{"step": name, "calls": end - start} for (name, start), (_, end) in zip(steps, steps[1:])]
    return {"convention": convention, "project_id": project["id"], "task_id": task["id"],
            "label_config": CONVENTIONS[convention]["config"], "outcome": outcome, "steps": counts,
            "calls": records}


def _docs_screenshot(screenshots: list[Path], artifacts: Path) -> None:
    """The editor after the click and the negative point, cropped to the editor and made small for the README."""
    from PIL import Image

    source = next(path for path in screenshots if path.name.endswith("3-negative.png"))
    image = Image.open(source).convert("RGB")
    width, height = image.size
    # The data manager's task list on the left and the empty side panel on the right add nothing.
    cropped = image.crop((int(width * 0.175), 0, int(width * 0.77), height))
    target = artifacts / "editor-mask.png"
    for scale in (0.75, 0.65, 0.55, 0.45):
        small = cropped.resize((round(cropped.width * scale), round(cropped.height * scale)), Image.LANCZOS)
        small.save(target, optimize=True)
        if target.stat().st_size < 290_000:
            break
    assert target.stat().st_size < 300_000, f"{target} is {target.stat().st_size} bytes"
    if RECORD:
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target, DOCS_SCREENSHOT)


# ---- the committed recording still says what this editor sends -------------------------------------------------
def _shape(flow: dict) -> list:
    """What must not change between recordings: the interactive calls' region fields, types, labels, flags."""
    shapes = []
    for call in flow["calls"]:
        if call["path"] != "/predict" or not (call["body"]["params"] or {}).get("context"):
            continue
        shapes.append([(r["type"], r["from_name"], sorted(r), sorted(r["value"]), r["value"][r["type"]],
                        r.get("is_positive")) for r in call["body"]["params"]["context"]["result"]])
    return shapes


def test_recorded_fixture_matches_this_editor(recordings):
    """tools/harness/bodies/editor_1_23_bodies.json (replayed without a browser) must describe what the editor sent now."""
    if not recordings:
        pytest.skip("no scenario ran")
    if RECORD:
        pytest.skip("BROWSER_TEST_RECORD=1: the fixture is being rewritten")
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: run with BROWSER_TEST_RECORD=1 to record it"
    committed = json.loads(FIXTURE.read_text())["flows"]
    for convention, flow in recordings.items():
        expected = [[list(map(_as_list, item)) for item in call] for call in _shape(committed[convention])]
        now = [[list(map(_as_list, item)) for item in call] for call in _shape(json.loads(json.dumps(flow)))]
        assert now == expected, f"{convention}: the editor now sends other regions than the fixture records"


def _as_list(value):
    return list(value) if isinstance(value, tuple) else value
