"""Project jobs without Label Studio or weights: polite calls, the boxes of a task, automatic masks on a scripted
decoder, and the runner over a Label Studio double (its pages, predictions and failures) with FakePredictor."""
from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import httpx

import numpy as np
import pytest

from model import SamModel
from sam_backend.errors import ImageError, RequestError
from sam_backend.jobs.api import LabelStudioApi
from sam_backend.jobs.polite import CallFailed, Polite
from sam_backend.jobs.progress import ProgressBook
from sam_backend.jobs.runner import JobOptions, ProjectJob
from sam_backend.labelstudio import label_config
from sam_backend.labelstudio.boxes import task_boxes
from sam_backend.sam import automatic
from sam_backend.sam.types import Embedding
from sam_backend.settings import Settings
from sam_backend.store.memory import MemoryStore
from tools.harness.fake_predictor import FakePredictor
from tools.harness.stub_project import StubProject

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="Cat"/><Label value="Dog"/><Label value="Car"/></RectangleLabels>
</View>"""


def rect(x, y, w, h, label, from_name="box", to_name="image"):
    return {"type": "rectanglelabels", "from_name": from_name, "to_name": to_name, "original_width": 200,
            "original_height": 100, "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]}}


# ---- Polite -------------------------------------------------------------------------------------------------
class Busy(Exception):
    pass


def classify(error):
    return isinstance(error, Busy), 503 if isinstance(error, Busy) else 400


def test_polite_retries_busy_answers_with_growing_backoff():
    sleeps, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise Busy("503")
        return "ok"

    polite = Polite(classify, rate=0, retries=5, backoff=0.5, sleep=sleeps.append)
    assert polite.call("listing", flaky) == "ok"
    assert len(calls) == 4 and polite.retried == 3
    assert [0.5, 1.0, 2.0] == [pytest.approx(s, rel=0.5) for s in sleeps]
    assert sleeps[0] < sleeps[1] < sleeps[2]


def test_polite_gives_up_after_its_retries_and_never_retries_a_client_error():
    polite = Polite(classify, rate=0, retries=2, backoff=0.01, sleep=lambda s: None)
    with pytest.raises(CallFailed, match="listing: Busy: 503 after 3 tries") as failed:
        polite.call("listing", lambda: (_ for _ in ()).throw(Busy("503")))
    assert failed.value.status == 503
    calls = []

    def refused():
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(CallFailed, match="writing: ValueError: bad request$"):
        polite.call("writing", refused)
    assert calls == [1]


def test_polite_spaces_calls_by_its_rate():
    now, sleeps = [0.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    polite = Polite(classify, rate=4.0, sleep=sleep, clock=lambda: now[0])
    for _ in range(5):
        polite.call("x", lambda: None)
    assert sum(sleeps) == pytest.approx(1.0)  # 5 calls at 4 per second: the last starts 1 s after the first


def test_polite_bounds_calls_in_flight():
    polite = Polite(classify, concurrency=2, rate=0)
    inside, most, lock, release = [0], [0], threading.Lock(), threading.Event()

    def call():
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        release.wait(0.2)
        with lock:
            inside[0] -= 1

    threads = [threading.Thread(target=polite.call, args=("x", call)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 2


# ---- boxes of a task ----------------------------------------------------------------------------------------
def test_task_boxes_from_annotations_and_predictions_once_each():
    config = label_config.parse(CONFIG)
    task = {"annotations": [{"result": [rect(10, 10, 20, 20, "Cat"), {"type": "brushlabels"}]},
                            {"was_cancelled": True, "result": [rect(50, 50, 10, 10, "Cat")]}],
            "predictions": [{"model_version": "yolo", "result": [rect(10, 10, 20, 20, "Cat"),
                                                                 rect(60, 5, 30, 30, "Dog"),
                                                                 rect(1, 1, 5, 5, "Car"),  # no brush label
                                                                 rect(1, 1, 5, 5, "Dog", to_name="other"),
                                                                 rect(1, 1, -5, 5, "Dog")]},  # malformed
                            {"model_version": "SAM boxes", "result": [rect(0, 0, 50, 50, "Cat")]}]}
    found = task_boxes(task, config, "image", own_versions=("SAM boxes",))
    assert [(b.target_key, b.x, b.y) for b in found] == [(("brush", "Cat"), 10, 10), (("brush", "Dog"), 60, 5)]
    assert task_boxes({"annotations": None, "predictions": "x"}, config, "image") == []


# ---- automatic masks ----------------------------------------------------------------------------------------
class ScriptedDecoder:
    """Two objects on a 256x256 low-res frame over a 200x200 image: the left half (points with x < 100) and a
    small square top right (the grid point at (125, 25)); points elsewhere on the right give an unstable mask."""

    def decode_low_res(self, embedding, prompt):
        x, y = prompt.points[0]
        logits = np.full((4, 256, 256), -10.0, np.float32)
        iou = np.full(4, 0.5, np.float32)
        if x < 100:
            logits[1:, :, :128] = 10.0
            iou[1:] = 0.95
        elif 120 <= x <= 130 and 20 <= y <= 30:
            logits[2, 20:60, 150:190] = 10.0
            iou[2] = 0.97
        else:
            logits[1:, :, 128:] = 0.5  # barely above the threshold: unstable
            iou[1:] = 0.9
        return logits, iou


def test_automatic_masks_keep_good_stable_masks_once_best_first():
    embedding = Embedding(features=np.zeros((1, 256, 64, 64), np.float32), original_size=(200, 200),
                          input_size=(1024, 1024))
    masks = automatic.generate(ScriptedDecoder(), embedding, automatic.AutoMaskOptions(points_per_side=4))
    assert [round(m.score, 2) for m in masks] == [0.97, 0.95]  # the square, then the half; no duplicate halves
    assert masks[0].mask.shape == (200, 200) and masks[0].mask[30, 130] and not masks[0].mask[80, 80]
    assert masks[1].mask[:, :95].all() and not masks[1].mask[:, 105:].any()
    assert automatic.grid(2, (100, 200)).tolist() == [[50, 25], [150, 25], [50, 75], [150, 75]]


# ---- the runner ---------------------------------------------------------------------------------------------
def stub_api(tasks, fail_predictions=()):
    return StubProject(tasks, CONFIG, fail_predictions)


class Worker:
    """SamModel's job methods, without images: an embedding per task, one region per box; task 4's image is
    broken."""

    model_version = "FakeSAM"

    def __init__(self):
        self.embedded: list[int] = []

    def embed_task(self, task, config):
        if task["id"] == 4:
            raise ImageError(422, "data.image: the image is corrupt")
        self.embedded.append(task["id"])
        return Embedding(features=np.zeros((1, 256, 64, 64), np.float32), original_size=(100, 200),
                         input_size=(512, 1024))

    def box_prediction(self, task, config, embedding, own_versions):
        return [{"score": 0.9} for _ in task_boxes(task, config, "image", own_versions)]


def project_tasks(count=10):
    return [{"id": i, "data": {"image": f"/data/upload/{i}.jpg"},
             "annotations": [{"result": [rect(10, 10, 20, 20, "Cat")]}] if i % 2 == 0 else []}
            for i in range(1, count + 1)]


def test_a_job_embeds_predicts_and_reports_a_broken_task():
    api, worker, book = stub_api(project_tasks()), Worker(), ProgressBook(MemoryStore())
    report = ProjectJob(api, worker, book, 7, JobOptions(page_size=3, workers=2)).run()
    assert sorted(worker.embedded) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert sorted(t for t, _, _ in api.written) == [2, 6, 8, 10]  # the even tasks have a box; 4's image broke
    assert {v for _, v, _ in api.written} == {"FakeSAM boxes"}
    assert report.failures == [(4, "data.image: the image is corrupt")]
    progress = book.load(7)
    assert (progress.state, progress.done, progress.failed, progress.total) == ("incomplete", 9, 1, 10)
    assert progress.errors == [[4, "data.image: the image is corrupt"]] and book.projects() == [7]


def test_a_stopped_job_resumes_where_it_stopped_and_writes_nothing_twice():
    api, book = stub_api(project_tasks(12)), ProgressBook(MemoryStore())
    stop = threading.Event()
    first = Worker()
    job = ProjectJob(api, first, book, 7, JobOptions(page_size=4, workers=1),
                     on_task=lambda p: stop.set() if p.done >= 5 else None)
    assert job.run(stop).progress.state == "stopped"
    assert book.load(7).state == "stopped" and 5 <= book.load(7).done < 12
    second = Worker()
    report = ProjectJob(api, second, book, 7, JobOptions(page_size=4, workers=2)).run()
    assert report.progress.state == "incomplete" and report.progress.runs == 2  # task 4 failed
    assert not set(first.embedded) & set(second.embedded)  # the finished tasks were skipped, not embedded again
    assert sorted(first.embedded + second.embedded) == [i for i in range(1, 13) if i != 4]
    written = [t for t, _, _ in api.written]
    assert sorted(written) == [2, 6, 8, 10, 12] and len(set(written)) == len(written)


def test_a_new_job_skips_tasks_that_have_its_prediction_already():
    api, book = stub_api(project_tasks(6)), ProgressBook(MemoryStore())
    api.tasks = [t for t in api.tasks if t["id"] != 4]
    first = ProjectJob(api, Worker(), book, 7).run().progress
    assert first.state == "done"
    second = ProjectJob(api, Worker(), book, 7).run().progress  # a new job: Label Studio says what exists
    assert second.job_id != first.job_id and second.predicted == 0
    written = [t for t, _, _ in api.written]
    assert sorted(written) == [2, 6] and len(set(written)) == len(written)


def test_a_refused_prediction_is_a_task_failure_and_the_job_goes_on():
    api, book = stub_api(project_tasks(6), fail_predictions={2}), ProgressBook(MemoryStore())
    report = ProjectJob(api, Worker(), book, 7).run()
    assert [t for t, _ in report.failures] == [2, 4] or [t for t, _ in report.failures] == [4, 2]
    assert sorted(t for t, _, _ in api.written) == [6]
    api.fail_predictions.clear()
    again = ProjectJob(api, Worker(), book, 7).run()  # resumes the incomplete job: only its failures again
    assert again.progress.runs == 2 and again.progress.skipped == 4 and [t for t, _ in again.failures] == [4]
    assert sorted(t for t, _, _ in api.written) == [2, 6]


def test_one_job_per_project_at_a_time():
    store = MemoryStore()
    token = store.acquire("project-job:7", 60)
    with pytest.raises(RuntimeError, match="running already"):
        ProjectJob(stub_api(project_tasks(2)), Worker(), ProgressBook(store), 7).run()
    store.release("project-job:7", token)


def test_job_options_are_checked():
    with pytest.raises(ValueError, match="steps must be some of"):
        JobOptions(steps=("embed", "train"))
    with pytest.raises(ValueError, match="auto-label"):
        JobOptions(steps=("auto",))


# ---- the server's side --------------------------------------------------------------------------------------
def model(**changes) -> SamModel:
    return SamModel(FakePredictor(), Settings(state_store="memory", **changes))


def test_webhook_acknowledges_events_and_skips_a_training_start_it_cannot_run(caplog):
    sam = model()
    assert sam.webhook({"action": "ANNOTATION_CREATED", "project": {"id": 1}}) == {
        "status": "ok", "action": "ANNOTATION_CREATED"}
    assert sam.webhook(None) == {"status": "ok", "action": None}
    with pytest.raises(RequestError, match="body.project.id"):
        sam.webhook({"action": "START_TRAINING", "project": {"id": "x"}})
    # without credentials: skipped with the reason, logged (an error answer would put the model in Label Studio's
    # error state, showing only the status line)
    with caplog.at_level(logging.WARNING):
        skipped = sam.webhook({"action": "START_TRAINING", "project": {"id": 3}})
    assert skipped["status"] == "skipped" and "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY" in skipped["reason"]
    assert "START_TRAINING for project 3 skipped" in caplog.text and not sam.jobs.all()
    off = model(job_on_training=())
    assert off.webhook({"action": "START_TRAINING", "project": {"id": 3}})["status"] == "ok"


def test_health_and_metrics_show_each_jobs_progress():
    sam = model()
    api = stub_api(project_tasks(4))
    ProjectJob(api, Worker(), sam.jobs, 5).run()
    assert sam.health()["project_jobs"] == {"5": "incomplete: 3/4 tasks, 3 embedded, 1 predicted, 0 skipped, 1 failed"}
    (record,) = sam.stats()["project_jobs"]
    assert record["project"] == 5 and record["errors"] == [[4, "data.image: the image is corrupt"]]


def test_box_prediction_gives_one_mask_per_box_of_its_class():
    sam = model()
    config = label_config.parse(CONFIG)
    embedding = sam.predictor.embed(np.zeros((100, 200, 3), np.uint8))
    task = {"annotations": [{"result": [rect(10, 10, 20, 20, "Cat"), rect(60, 50, 30, 40, "Dog")]}]}
    regions = sam.box_prediction(task, config, embedding)
    assert [(r["from_name"], r["value"]["brushlabels"]) for r in regions] == [("brush", ["Cat"]), ("brush", ["Dog"])]
    assert [tuple(np.round(p.box)) for p in sam.predictor.prompts] == [(20, 10, 60, 30), (120, 50, 180, 90)]
    assert sam.box_prediction({"annotations": []}, config, embedding) == []


class BatchWorker(Worker):
    """A worker on a GPU: `embed_tasks` takes the images of up to three tasks at once."""

    embed_batch_size = 3

    def __init__(self):
        super().__init__()
        self.batches: list[list[int]] = []

    def embed_tasks(self, tasks, config):
        self.batches.append([t["id"] for t in tasks])
        found = []
        for task in tasks:
            try:
                found.append(self.embed_task(task, config))
            except ImageError as error:
                found.append(error)
        return found

    def embed_task(self, task, config):
        if not self.batches or task["id"] not in self.batches[-1]:
            raise AssertionError(f"task {task['id']} embedded outside a batch")
        return super().embed_task(task, config)


def test_on_a_gpu_images_are_embedded_in_batches_with_the_same_outcome():
    one, batched = stub_api(project_tasks(10)), stub_api(project_tasks(10))
    ProjectJob(one, Worker(), ProgressBook(MemoryStore()), 7, JobOptions(page_size=4)).run()
    worker = BatchWorker()
    report = ProjectJob(batched, worker, ProgressBook(MemoryStore()), 7, JobOptions(page_size=4)).run()
    assert worker.batches == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    assert sorted(one.written, key=str) == sorted(batched.written, key=str)
    assert report.failures == [(4, "data.image: the image is corrupt")]  # one broken image fails its task only


def test_max_tasks_stops_the_run_and_the_next_run_goes_on_from_there():
    api, book = stub_api(project_tasks(8)), ProgressBook(MemoryStore())
    first, second = Worker(), Worker()
    assert ProjectJob(api, first, book, 7, JobOptions(workers=1, max_tasks=3)).run().progress.state == "stopped"
    report = ProjectJob(api, second, book, 7, JobOptions(workers=1, max_tasks=3)).run()
    assert sorted(first.embedded) == [1, 2, 3] and sorted(second.embedded) == [5, 6]  # 4's image is broken
    assert report.progress.skipped == 3 and report.progress.runs == 2


def test_a_job_that_loses_its_lease_stops():
    store = MemoryStore()
    api, book = stub_api(project_tasks(40)), ProgressBook(store)
    worker = Worker()
    job = ProjectJob(api, worker, book, 7, JobOptions(workers=1), lease_s=0.3)

    def slow_and_stolen(progress):
        time.sleep(0.05)
        if progress.done == 2:  # the store lost the lease (expired in an outage) and another job took it
            store.release("project-job:7", job._lease)
            store.acquire("project-job:7", 30)

    job.on_task = slow_and_stolen
    report = job.run()
    assert job.lost_lease and report.progress.state == "stopped" and "lease" in report.progress.message
    assert len(worker.embedded) < 39


class FailingBatches(BatchWorker):
    def embed_tasks(self, tasks, config):
        if len(self.batches) == 1:
            self.batches.append([t["id"] for t in tasks])
            raise RuntimeError("CUDA out of memory")
        return super().embed_tasks(tasks, config)


def test_a_batch_that_fails_fails_its_tasks_and_the_job_goes_on():
    api, worker = stub_api(project_tasks(9)), FailingBatches()
    report = ProjectJob(api, worker, ProgressBook(MemoryStore()), 7).run()
    assert worker.batches == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert sorted(t for t, _ in report.failures) == [4, 5, 6]
    assert all("CUDA out of memory" in reason for _, reason in report.failures)
    assert sorted(t for t, _, _ in api.written) == [2, 8] and report.progress.state == "incomplete"


def test_an_unforeseen_fault_ends_the_job_as_failed_not_running():
    api, book = stub_api(project_tasks(3)), ProgressBook(MemoryStore())
    api.total = lambda project: {}["no such key"]
    report = ProjectJob(api, Worker(), book, 7).run()
    assert report.progress.state == "failed" and "KeyError" in book.load(7).message


class LostAnswers:
    """label-studio-sdk's predictions client whose first create is saved but its answer lost (a timeout)."""

    def __init__(self):
        self.saved = []

    def create(self, *, task, result, score, model_version, request_options):
        self.saved.append(SimpleNamespace(id=len(self.saved) + 1, task=task, model_version=model_version))
        if len(self.saved) == 1:
            raise httpx.ReadTimeout("timed out")
        return self.saved[-1]

    def list(self, *, task, request_options):
        return [p for p in self.saved if p.task == task]


def test_a_prediction_whose_answer_was_lost_is_not_written_again():
    predictions = LostAnswers()
    api = LabelStudioApi("http://ls", "token", client=SimpleNamespace(predictions=predictions), rate=0,
                         backoff=0.0)
    assert api.create_prediction(3, [], 0.9, "SAM boxes") == 1
    assert len(predictions.saved) == 1 and api.polite.retried == 1
    assert api.create_prediction(4, [], 0.9, "SAM boxes") == 2  # no retry: no list call needed
