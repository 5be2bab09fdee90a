"""One project job: every task of a Label Studio project embedded ahead and, optionally, pre-annotated.

Steps (`JobOptions.steps`):

* `embed`: the task's image is downloaded as the server downloads it and its embedding stored in the state store,
  unless it is there already; the server's clicks then find it (a shared store: disk or Redis);
* `boxes`: one mask per rectangle the task has (annotations, or predictions such as a detector's) of the box's
  class, written as one Label Studio prediction with model version "<model version> boxes";
* `auto`: SAM's automatic masks (`sam.automatic`) as one prediction of the class `auto_label`, model version
  "<model version> auto".

Never twice, never lost: a task is skipped when its done marker of this job exists, and a prediction step when
the task already has a prediction of that step's model version; annotations are only read. A job that is stopped
(`stop` set, Ctrl-C, SIGTERM) or dies resumes with the next run: the record in the state store says which job it
was, and the tasks it finished are skipped. A run that went through every task but had failures ends
"incomplete", and the next run retries just those. Failures of one task (a broken image, a call Label Studio refused)
are recorded with the reason and the job goes on; the `Report` lists them all.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from sam_backend.errors import ClientError
from sam_backend.jobs.api import CallFailed, LabelStudioApi
from sam_backend.jobs.progress import Progress, ProgressBook
from sam_backend.labelstudio import label_config
from sam_backend.sam.automatic import AutoMaskOptions
from sam_backend.sam.lanes import lower_priority
from sam_backend.sam.types import Embedding

STEPS = ("embed", "boxes", "auto")
log = logging.getLogger(__name__)


class TaskWorker(Protocol):
    """What a job needs of the server (`model.SamModel`)."""

    model_version: str

    #: images `embed_tasks` embeds at once (more than 1 on a GPU)
    embed_batch_size: int

    def embed_task(self, task: Mapping, config: label_config.ProjectConfig) -> Embedding: ...

    def embed_tasks(self, tasks: list[Mapping], config: label_config.ProjectConfig) -> list[Embedding | Exception]:
        ...

    def box_prediction(self, task: Mapping, config: label_config.ProjectConfig, embedding: Embedding,
                       own_versions: tuple[str, ...]) -> list[dict]: ...

    def auto_prediction(self, task: Mapping, config: label_config.ProjectConfig, embedding: Embedding,
                        label: str, options: AutoMaskOptions) -> list[dict]: ...


@dataclass(frozen=True)
class JobOptions:
    """steps: of STEPS; auto_label: the brush label of `auto`'s masks; page_size: tasks per listing call;
    workers: tasks in progress at once (downloads overlap the encoder; embeddings still run one by one);
    max_embeddings: embed at most this many images this run (the store's budget; None: no bound);
    max_tasks: stop after this many tasks this run (None: all); nice: how much lower the CPU priority of the
    job's threads is (a job inside the server: its decodes then yield to the annotators' clicks)."""

    steps: tuple[str, ...] = ("embed", "boxes")
    auto_label: str | None = None
    auto: AutoMaskOptions = AutoMaskOptions()
    page_size: int = 50
    workers: int = 2
    max_embeddings: int | None = None
    max_tasks: int | None = None
    nice: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown or not self.steps:
            raise ValueError(f"steps must be some of {', '.join(STEPS)}; got {', '.join(self.steps) or 'none'}")
        if "auto" in self.steps and not self.auto_label:
            raise ValueError("the auto step needs the brush label its masks get (--auto-label)")
        if self.page_size < 1 or self.workers < 1:
            raise ValueError("page_size and workers must be at least 1")


@dataclass
class Report:
    """What one run did. failures: (task id, reason) of every task that failed this run."""

    progress: Progress
    seconds: float = 0.0
    failures: list[tuple[Any, str]] = field(default_factory=list)
    retries: int = 0

    def lines(self) -> list[str]:
        lines = [f"project {self.progress.project}: {self.progress.summary()} in {self.seconds:.1f} s "
                 f"({self.retries} retried calls)"]
        lines += [f"  task {task}: {reason}" for task, reason in self.failures]
        return lines


class JobBusy(RuntimeError):
    """Another job holds the project's lease."""


class ProjectJob:
    """Runs the steps over one project. Thread-safe progress; one `run` at a time per project: a lease in the
    store, renewed every third of `lease_s` by a heartbeat while the job runs, so that a job killed without a
    word frees its project `lease_s` seconds later. A job that loses its lease (the store was down longer than
    that) stops, since another may have taken the project over."""

    def __init__(self, api: LabelStudioApi, worker: TaskWorker, book: ProgressBook, project: int,
                 options: JobOptions = JobOptions(), on_task: Callable[[Progress], None] | None = None,
                 lease_s: float = 60.0) -> None:
        self.api, self.worker, self.book, self.project, self.options = api, worker, book, project, options
        self.lease_s = lease_s
        self.on_task = on_task  # called after every task (a progress bar)
        self.versions = {"boxes": f"{worker.model_version} boxes", "auto": f"{worker.model_version} auto"}
        self._lock = threading.Lock()
        self._lease_name = f"project-job:{project}"
        self._lease: str | None = None

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> Report:
        """Go through the project (resuming the job the store remembers for it); stops early when `stop` is set.
        JobBusy when another job holds the project."""
        stop = stop or threading.Event()
        self._lease = self.book.store.acquire(self._lease_name, self.lease_s)
        if self._lease is None:
            raise JobBusy(f"a job for project {self.project} is running already (one that was killed frees the "
                          f"project within {self.lease_s:g} s)")
        beating = self._heartbeat(stop)
        started = time.monotonic()
        try:
            progress = self._resume_or_start()
            report = Report(progress)
            try:
                config = label_config.parse(self.api.label_config(self.project))
                progress.total = self.api.total(self.project)
                self.book.save(progress)
                limited = self._walk(config, progress, report, stop)
                progress.state = ("stopped" if stop.is_set() or limited else "incomplete" if progress.failed
                                  else "done")
                if self.lost_lease:
                    progress.message = "stopped: its lease in the state store was lost (the store was down)"
            except (CallFailed, ClientError) as error:  # the project itself cannot be read: the job ends
                progress.state, progress.message = "failed", str(error)[:500]
                log.error("project job %s failed: %s", self.project, error)
            except Exception as error:  # the job's boundary: the record must not say "running" for ever
                progress.state, progress.message = "failed", f"{type(error).__name__}: {error}"[:500]
                log.exception("project job %s failed", self.project)
            progress.message = progress.message or progress.summary()
            self.book.save(progress)
            report.seconds = time.monotonic() - started
            report.retries = self.api.polite.retried
            log.info("project job %s %s", self.project, progress.summary())
            return report
        finally:
            beating.set()
            self.book.store.release(self._lease_name, self._lease)

    def _heartbeat(self, stop: threading.Event) -> threading.Event:
        """Renew the lease every third of `lease_s` until the returned event is set; a renewal refused means
        the lease expired (another job may hold it now): `stop` is set and `lost_lease` says why."""
        done = threading.Event()
        self.lost_lease = False

        def beat() -> None:
            while not done.wait(self.lease_s / 3):
                if not self.book.store.renew(self._lease_name, self._lease, self.lease_s):
                    if self.book.store.held(self._lease_name) or not getattr(self.book.store, "degraded", False):
                        self.lost_lease = True
                        log.error("project job %s lost its lease in the state store; stopping", self.project)
                        stop.set()
                        return

        threading.Thread(target=beat, name=f"project-job-lease-{self.project}", daemon=True).start()
        return done

    def _resume_or_start(self) -> Progress:
        steps = list(self.options.steps)
        old = self.book.load(self.project)
        if (old is not None and old.state != "done" and old.steps == steps
                and old.model_version == self.worker.model_version):
            old.state, old.runs, old.message = "running", old.runs + 1, ""
            old.skipped = old.failed = 0  # of this run; `done` counts every run's finished tasks
            old.errors = []
            log.info("project job %s resumes job %s (%d tasks done before)", self.project, old.job_id, old.done)
            progress = old
        else:
            progress = Progress(project=self.project, steps=steps, model_version=self.worker.model_version)
        self.book.index(self.project)
        self.book.save(progress)
        return progress

    def _walk(self, config: label_config.ProjectConfig, progress: Progress, report: Report,
              stop: threading.Event) -> bool:
        """Every task of the project through the steps; True when it stopped at `max_tasks` (tasks done by an
        earlier run do not count)."""
        budget = self.options.max_embeddings
        handled = 0
        batch = max(1, int(getattr(self.worker, "embed_batch_size", 1)))
        group: list[tuple[Mapping, bool]] = []
        with ThreadPoolExecutor(self.options.workers, thread_name_prefix="project-job", initializer=lower_priority,
                                initargs=(self.options.nice,)) as pool:
            running: set[Future] = set()
            for _, tasks in self.api.task_pages(self.project, self.options.page_size):
                for task in tasks:
                    task_id = task.get("id")
                    if isinstance(task_id, int) and self.book.is_done(progress, task_id):
                        self._count(progress, skipped=1)  # done by an earlier run of this job
                        continue
                    limited = self.options.max_tasks is not None and handled >= self.options.max_tasks
                    if stop.is_set() or limited:
                        if group:
                            self._submit_group(pool, running, group, config, progress, report)
                        wait(running)
                        return limited and not stop.is_set()
                    handled += 1
                    if len(running) >= self.options.workers:
                        _, running = wait(running, return_when=FIRST_COMPLETED)
                    embed = "embed" in self.options.steps and (budget is None or budget > 0)
                    if embed and budget is not None:
                        budget -= 1
                    if batch > 1:  # a GPU: the images of `batch` tasks go through the encoder together
                        group.append((task, embed))
                        if len(group) == batch:
                            self._submit_group(pool, running, group, config, progress, report)
                            group = []
                        continue
                    running.add(pool.submit(self._task, task, config, progress, report, embed))
            if group:
                self._submit_group(pool, running, group, config, progress, report)
            wait(running)
        return False

    def _submit_group(self, pool: ThreadPoolExecutor, running: set[Future], group: list[tuple[Mapping, bool]],
                      config: label_config.ProjectConfig, progress: Progress, report: Report) -> None:
        """Embed the group's images in one batch (those its tasks need), then run each task's steps."""
        wanted = [task for task, embed in group if self._needs_embedding(task, progress, embed)]
        try:
            found = self.worker.embed_tasks(wanted, config) if wanted else []
        except Exception as error:  # e.g. CUDA out of memory: this batch's tasks fail, the job goes on
            log.exception("project job %s: embedding a batch of %d images", self.project, len(wanted))
            found = [error] * len(wanted)
        embeddings = dict(zip((id(task) for task in wanted), found))
        for task, embed in group:
            running.add(pool.submit(self._task, task, config, progress, report, embed, embeddings.get(id(task))))

    # ---- one task ---------------------------------------------------------------------------------------
    def _task(self, task: Mapping, config: label_config.ProjectConfig, progress: Progress, report: Report,
              embed: bool, embedding: Embedding | Exception | None = None) -> None:
        """One task's steps; `embedding`: its image's, computed in a batch (or the error that gave)."""
        task_id = task.get("id")
        try:
            if isinstance(embedding, Exception):
                raise embedding
            outcome = self._do(task, config, progress, embed, embedding)
        except (ClientError, CallFailed, OSError, ValueError) as error:
            reason = getattr(error, "message", None) or str(error)
        except Exception as error:  # the job's boundary: one task's unforeseen fault must not end the job
            log.exception("project job %s: task %s", self.project, task_id)
            reason = f"{type(error).__name__}: {error}"
        else:
            self._count(progress, **outcome)
            return
        with self._lock:
            report.failures.append((task_id, reason))
        self._count(progress, failed=1, error=(task_id, reason[:500]))
        log.warning("project job %s: task %s failed: %s", self.project, task_id, reason)

    def _predict_steps(self, task: Mapping) -> list[str]:
        """The prediction steps the task still needs (none of its predictions has the step's model version)."""
        written = {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, Mapping)}
        return [s for s in ("boxes", "auto") if s in self.options.steps and self.versions[s] not in written]

    def _needs_embedding(self, task: Mapping, progress: Progress, embed: bool) -> bool:
        task_id = task.get("id")
        return (isinstance(task_id, int) and not isinstance(task_id, bool) and not self.book.is_done(progress, task_id)
                and (embed or bool(self._predict_steps(task))))

    def _do(self, task: Mapping, config: label_config.ProjectConfig, progress: Progress, embed: bool,
            embedding: Embedding | None = None) -> dict:
        task_id = task.get("id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            raise ValueError(f"task without an integer id: {task_id!r}")
        if self.book.is_done(progress, task_id):
            return {"skipped": 1}  # done by an earlier run of this job
        predict = self._predict_steps(task)
        outcome = {"done": 1, "embedded": 0, "predicted": 0}
        if embed or predict:
            if embedding is None:
                embedding = self.worker.embed_task(task, config)
            outcome["embedded"] = int(embed)
            for step in predict:
                if step == "boxes":
                    regions = self.worker.box_prediction(task, config, embedding, tuple(self.versions.values()))
                else:
                    regions = self.worker.auto_prediction(task, config, embedding, self.options.auto_label or "",
                                                          self.options.auto)
                if regions:
                    score = sum(r.get("score", 0.0) for r in regions) / len(regions)
                    self.api.create_prediction(task_id, regions, round(score, 4), self.versions[step])
                    outcome["predicted"] += 1
        self.book.mark_done(progress, task_id)
        return outcome

    def _count(self, progress: Progress, error: tuple | None = None, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(progress, name, getattr(progress, name) + value)
            if error is not None:
                progress.errors.append(list(error))
            self.book.save(progress)
        if self.on_task is not None:
            self.on_task(progress)
