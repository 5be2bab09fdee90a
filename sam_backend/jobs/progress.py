"""Where a project job's progress lives: in the state store, so that the server's /health and /metrics show it
whichever worker or machine runs the job, and a job started again resumes where the last one stopped.

Namespace `project-job`: one JSON record per project (`Progress`), plus `index`, the projects with a record
(newest last, at most INDEX_SIZE). Namespace `project-job-done`: one marker per (job, step, task) done, so that a resumed job skips those tasks without downloading their images again. The predictions
themselves are never written twice whatever the markers say: the job also skips a task that already has a
prediction of its model version (Label Studio is the record of what was written).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from sam_backend.store import StateStore

PROGRESS = "project-job"
DONE = "project-job-done"
INDEX_SIZE = 20
MAX_ERRORS = 100  # per record; the report of the run has them all
DONE_TTL = 30 * 24 * 3600.0  # seconds a task's marker lives
RECORD_TTL = 30 * 24 * 3600.0


@dataclass
class Progress:
    """One job's counts. state: running | done | incomplete (went through every task, some failed) | stopped |
    failed (the project could not be read); steps: what it does ("embed", "boxes", "auto"); total: the
    project's tasks (None until known); done, embedded, predicted: over every run of the job; skipped (done by
    an earlier run), failed and errors ((task id, reason) of the newest failures): this run's."""

    project: int
    steps: list[str]
    model_version: str
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "running"
    total: int | None = None
    done: int = 0
    embedded: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    runs: int = 1
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    message: str = ""
    errors: list[list] = field(default_factory=list)

    def summary(self) -> str:
        total = "?" if self.total is None else str(self.total)
        return (f"{self.state}: {self.done}/{total} tasks, {self.embedded} embedded, {self.predicted} predicted, "
                f"{self.skipped} skipped, {self.failed} failed")


class ProgressBook:
    """Reads and writes progress records and done markers in `store` (thread-safe)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._lock = threading.Lock()

    def load(self, project: int) -> Progress | None:
        raw = self.store.get(PROGRESS, str(project))
        if raw is None:
            return None
        try:
            return Progress(**json.loads(raw))
        except (ValueError, TypeError):
            return None

    def save(self, progress: Progress) -> None:
        with self._lock:
            progress.updated_at = time.time()
            progress.errors = progress.errors[-MAX_ERRORS:]
            self.store.put(PROGRESS, str(progress.project), json.dumps(asdict(progress)).encode(), RECORD_TTL)

    def index(self, project: int) -> None:
        projects = [p for p in self.projects() if p != project][-(INDEX_SIZE - 1):] + [project]
        self.store.put(PROGRESS, "index", json.dumps(projects).encode(), RECORD_TTL)

    def projects(self) -> list[int]:
        raw = self.store.get(PROGRESS, "index")
        try:
            found = json.loads(raw) if raw is not None else []
        except ValueError:
            return []
        return [p for p in found if isinstance(p, int)] if isinstance(found, list) else []

    def all(self) -> list[Progress]:
        """The records of the indexed projects, newest last."""
        return [p for p in (self.load(project) for project in self.projects()) if p is not None]

    # ---- per-task markers ---------------------------------------------------------------------------------
    def is_done(self, job: Progress, task: int) -> bool:
        return self.store.get(DONE, f"{job.job_id}:{task}") is not None

    def mark_done(self, job: Progress, task: int) -> None:
        self.store.put(DONE, f"{job.job_id}:{task}", b"1", DONE_TTL)
