"""End to end: a project job against a real Label Studio 1.23.2 (tools/project_job, then "Start training").

The project: 12 real photos of GrabCut20 (read from ../shared, uploaded through Label Studio's import) and one
broken JPEG. Six tasks get an annotation with the box around their object (from the ground truth), one more a
detector's prediction with such a box. The job runs as a user runs it (`python -m tools.project_job`, MobileSAM
on ONNX Runtime, a disk state store), is killed mid-run and started again; the server then answers a click on an
embedded task from the store, and Label Studio's "Start training" runs a job inside the server.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labelstudio import (  # noqa: E402
    NATIVE_CONFIG,
    Backend,
    HarnessError,
    LabelStudio,
    install_label_studio,
    keypoint,
    rectangle,
)

from sam_backend.jobs.progress import ProgressBook  # noqa: E402
from sam_backend.store import open_store  # noqa: E402
from tools.quality import GRABCUT20, folder_items, loose_box  # noqa: E402

pytestmark = pytest.mark.labelstudio

PHOTOS = 12
BOXED = (0, 2, 4, 6, 8, 10)  # photos whose task gets an annotation with the object's box
DETECTED = 11  # the photo whose task gets a detector's prediction with the box


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("project_job")


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


@pytest.fixture(scope="module")
def items():
    if not GRABCUT20.is_dir():
        pytest.fail(f"{GRABCUT20} is missing (../shared/datasets beside the repository)")
    return folder_items(GRABCUT20)[:PHOTOS]


def percent_box(box: np.ndarray, size: tuple[int, int]) -> tuple[float, float, float, float]:
    height, width = size
    x0, y0, x1, y1 = (float(v) for v in box)
    return 100 * x0 / width, 100 * y0 / height, 100 * (x1 - x0) / width, 100 * (y1 - y0) / height


@pytest.fixture(scope="module")
def project(label_studio, items, workdir):
    """{"project", "tasks" (by photo index; "broken"), "boxes" (task id -> pixel box)}."""
    created = label_studio.create_project(NATIVE_CONFIG, title="project job")
    tasks, boxes = {}, {}
    for index, item in enumerate(items):
        tasks[index] = label_studio.import_file(created["id"], GRABCUT20 / "images" / f"{item.name}.jpg")
        height, width = item.truth.shape
        box = loose_box(item.truth, 0.05)
        region = rectangle(*percent_box(box, (height, width)), "Cat", width=width, height=height)
        if index in BOXED:
            label_studio.create_annotation(tasks[index]["id"], [region])
            boxes[tasks[index]["id"]] = box
        elif index == DETECTED:
            label_studio.api("POST", "/api/predictions/", json={"task": tasks[index]["id"], "result": [region],
                                                                "score": 0.8, "model_version": "detector-v1"})
            boxes[tasks[index]["id"]] = box
    broken = workdir / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all" * 8)
    tasks["broken"] = label_studio.import_file(created["id"], broken)
    return {"project": created, "tasks": tasks, "boxes": boxes}


@pytest.fixture(scope="module")
def job_env(label_studio, onnx_files, workdir, mobile_sam_checkpoint):
    encoder, decoder = onnx_files
    return {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LabelStudio.TOKEN,
            "STATE_STORE": f"disk:{workdir / 'store'}", "RUN_ONNX_SAM": "true", "ONNX_ENCODER_PATH": str(encoder),
            "ONNX_DECODER_PATH": str(decoder), "ORT_NUM_THREADS": "2", "SAM_CHOICE": "MobileSAM",
            "MOBILESAM_CHECKPOINT": str(mobile_sam_checkpoint), "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": "",
            "LOG_LEVEL": "INFO", "JOB_ON_TRAINING": "embed,boxes"}


def job_command(project_id: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tools.project_job", "--project", str(project_id), "--no-progress",
            "--lease-seconds", "4", *extra]


def child_env(env: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("STATE_STORE", "LABEL_STUDIO"))},
            "PYTHONPATH": str(REPO), **env}


@pytest.fixture(scope="module")
def finished(project, job_env, workdir):
    """The job killed (SIGKILL) after four tasks, then run again to the end: (record at the kill, report)."""
    project_id = project["project"]["id"]
    book = ProgressBook(open_store(job_env["STATE_STORE"]))
    with open(workdir / "job-1.log", "wb") as log:
        first = subprocess.Popen(job_command(project_id), cwd=REPO, env=child_env(job_env), stdout=log,
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            record = book.load(project_id)
            if record is not None and record.done >= 4:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    at_kill = book.load(project_id)
    assert at_kill is not None and at_kill.state == "running", (workdir / "job-1.log").read_text()[-3000:]
    time.sleep(4.5)  # the killed job's lease expires (--lease-seconds 4)
    report_path = workdir / "report.json"
    second = subprocess.run(job_command(project_id, "--report", str(report_path)), cwd=REPO, env=child_env(job_env),
                            capture_output=True, text=True, timeout=600)
    (workdir / "job-2.log").write_text(second.stdout + second.stderr)
    assert second.returncode == 1, f"expected 1 (a task failed): {second.stdout[-2000:]}{second.stderr[-3000:]}"
    return at_kill, json.loads(report_path.read_text())


def brush_mask(region: dict) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    height, width = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_a_killed_job_resumes_and_reports_the_broken_image(project, finished):
    at_kill, report = finished
    progress = report["progress"]
    assert 4 <= at_kill.done < PHOTOS
    assert progress["state"] == "incomplete" and progress["runs"] == 2
    assert progress["done"] == PHOTOS and progress["total"] == PHOTOS + 1
    assert progress["skipped"] >= at_kill.done  # what the killed run finished was not done again
    broken = project["tasks"]["broken"]["id"]
    assert [f["task"] for f in report["failures"]] == [broken]
    assert "corrupt" in report["failures"][0]["reason"]


def test_each_box_became_one_mask_of_its_class_and_annotations_are_untouched(label_studio, project, finished, items,
                                                                              onnx_server_predictor):
    from PIL import Image

    from sam_backend.sam.types import Prompt

    by_task = {task["id"]: index for index, task in project["tasks"].items() if index != "broken"}
    for task_id, index in by_task.items():
        task = label_studio.task(task_id)
        ours = [p for p in task["predictions"] if p["model_version"].endswith(" boxes")]
        annotations = task["annotations"]
        if task_id not in project["boxes"]:
            assert ours == [], f"task {task_id} has no box but got {len(ours)} predictions"
            assert annotations == []
            continue
        assert len(ours) == 1, f"task {task_id}: {len(ours)} predictions of the job (written twice?)"
        assert len(annotations) == (1 if index in BOXED else 0)
        if annotations:
            assert [r["type"] for r in annotations[0]["result"]] == ["rectanglelabels"]  # as imported
        (region,) = ours[0]["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Cat"]
        assert region["from_name"] == "tag" and 0 < ours[0]["score"] <= 1
        mask = brush_mask(region)
        image = np.asarray(Image.open(io.BytesIO((GRABCUT20 / "images" / f"{items[index].name}.jpg").read_bytes()))
                           .convert("RGB"))
        embedding = onnx_server_predictor.embed(image)
        box = project["boxes"][task_id]
        expected = onnx_server_predictor.decode(embedding, Prompt(points=np.zeros((0, 2), np.float32),
                                                                  labels=np.zeros(0, np.int32), box=box)).mask
        assert iou(mask, expected) >= 0.98, f"task {task_id}: IoU {iou(mask, expected):.3f} with the reference"
        assert iou(mask, items[index].truth) >= 0.6, f"task {task_id}: IoU with the ground truth " \
                                                     f"{iou(mask, items[index].truth):.3f}"


@pytest.fixture(scope="module")
def backend(label_studio, job_env, workdir, finished):
    process = Backend(workdir / "backend.log")
    process.start(job_env)
    yield process
    process.stop()


def test_a_click_on_a_task_embedded_ahead_is_warm_from_the_first_call(label_studio, project, backend, items):
    ml = label_studio.add_ml_backend(project["project"]["id"], backend.url, title="SAM")
    task = project["tasks"][1]
    height, width = items[1].truth.shape
    before = backend.get("/metrics").json()["state_store"]
    ys, xs = np.nonzero(items[1].truth)
    click = keypoint(100 * float(np.median(xs)) / width, 100 * float(np.median(ys)) / height, "Cat",
                     width=width, height=height)
    answer = label_studio.interactive_annotating(ml["id"], task["id"], {"result": [click]})
    assert "errors" not in answer, answer
    assert [r["type"] for r in answer["data"]["result"]] == ["brushlabels"]
    after = backend.get("/metrics").json()["state_store"]
    assert after["encoder_runs"] == before["encoder_runs"] == 0, "the server ran its encoder: not embedded ahead"
    assert after["store_hits"] > before["store_hits"]
    health = backend.get("/health").json()
    assert health["project_jobs"][str(project["project"]["id"])].startswith("incomplete: 12/13 tasks")


def test_start_training_in_label_studio_runs_a_job_in_the_server(label_studio, backend, items):
    created = label_studio.create_project(NATIVE_CONFIG, title="start training")
    boxed = []
    for item in items[:3]:
        task = label_studio.import_file(created["id"], GRABCUT20 / "images" / f"{item.name}.jpg")
        height, width = item.truth.shape
        box = percent_box(loose_box(item.truth, 0.05), (height, width))
        label_studio.create_annotation(task["id"], [rectangle(*box, "Cat", width=width, height=height)])
        boxed.append(task["id"])
    ml = label_studio.add_ml_backend(created["id"], backend.url, title="SAM")
    label_studio.api("POST", f"/api/ml/{ml['id']}/train", json={})
    deadline, state = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        state = backend.get("/health").json()["project_jobs"].get(str(created["id"]))
        if state and not state.startswith("running"):
            break
        time.sleep(0.5)
    assert state == "done: 3/3 tasks, 3 embedded, 3 predicted, 0 skipped, 0 failed", state
    for task_id in boxed:
        ours = [p for p in label_studio.predictions(task_id) if p["model_version"].endswith(" boxes")]
        assert len(ours) == 1 and ours[0]["result"][0]["value"]["brushlabels"] == ["Cat"]
    metrics = backend.get("/metrics").json()
    record = next(r for r in metrics["project_jobs"] if r["project"] == created["id"])
    assert record["steps"] == ["embed", "boxes"] and record["errors"] == []
    assert requests.get(f"{backend.url}/health", timeout=5).status_code == 200
