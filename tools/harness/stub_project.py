"""A Label Studio project as a project job sees it, in memory: tasks in pages, the predictions written (with
injected refusals), and the API's `polite` counters. Stands in for `sam_backend.jobs.api.LabelStudioApi` in the
unit tests and in `tools.bench.project_job`; the real API is exercised against a real Label Studio in
tests/e2e/test_project_job.py.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

from sam_backend.jobs.polite import CallFailed, Polite


def _never(error: BaseException) -> tuple[bool, int | None]:
    return False, None


class StubProject:
    """tasks: Label Studio tasks ({"id", "data", "annotations", "predictions"}); label_config: the project's XML;
    fail_predictions: task ids whose prediction Label Studio refuses (HTTP 400)."""

    def __init__(self, tasks: list[dict], label_config: str, fail_predictions: Iterable[int] = ()) -> None:
        self.tasks = tasks
        self.config = label_config
        self.written: list[tuple[int, str, list[dict]]] = []
        self.fail_predictions = set(fail_predictions)
        self.polite = Polite(_never, rate=0)
        self._lock = threading.Lock()

    def label_config(self, project: int) -> str:
        return self.config

    def total(self, project: int) -> int:
        return len(self.tasks)

    def task_pages(self, project: int, page_size: int = 100, first_page: int = 1):
        """Pages as Label Studio lists them, each task with the predictions written so far."""
        for start in range((first_page - 1) * page_size, len(self.tasks), page_size):
            page = []
            for task in self.tasks[start:start + page_size]:
                with self._lock:
                    ours = [{"model_version": v, "result": r} for t, v, r in self.written if t == task["id"]]
                page.append({**task, "predictions": list(task.get("predictions") or []) + ours})
            yield start // page_size + 1, page

    def create_prediction(self, task: int, result: list[dict], score: float, model_version: str) -> int:
        if task in self.fail_predictions:
            raise CallFailed(f"writing the prediction of task {task}: HTTP 400: bad", 400)
        with self._lock:
            self.written.append((task, model_version, result))
            return len(self.written)
