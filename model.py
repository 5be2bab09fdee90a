"""The Label Studio layer: `/setup` and `/predict` bodies in, Label Studio results out. Orchestration only;
each step of a /predict call lives in the library:

1. validate the body: here (tasks, labeling config, params, project), the config by
   `sam_backend.labelstudio.label_config`, the interactive context by `labelstudio.context`;
2. assemble the prompts: `labelstudio.prompting.assemble` (the call's regions, `labelstudio.memory`'s regions
   of earlier calls and the task's draft -> one `Prompt` per object class, with the previous mask to refine);
3. get the embedding: `sam_backend.images` downloads and decodes the task's image, `sam_backend.cache` runs the
   encoder once per image (and ahead of time when Label Studio opens a task);
4. decode: the `Predictor` handed in (`sam_backend.sam.types`; torch or ONNX Runtime, picked by
   `sam_backend.sam.loading`), in the prompt's view: the whole image, or a crop around a small object
   (`sam_backend.sam.zoom`) with an embedding of its own, started in the background after the click before;
5. build the results: `labelstudio.results` (brush RLE by `encoding.rle`, polygons and boxes by
   `encoding.outlines`).

Nothing here imports torch, onnxruntime, flask or a predictor module: `sam_backend.http` serves a SamModel,
`_wsgi` puts the two together.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, replace
from typing import Any, Mapping

from sam_backend.cache import EmbeddingCache, RecentImages
from sam_backend.errors import ClientError, ImageError, RequestError
from sam_backend.images import ImageLoader, LabelStudioAccess
from sam_backend.images.redact import redact_url
from sam_backend.images.references import is_immutable, names_peer
from sam_backend.jobs.api import LabelStudioApi
from sam_backend.jobs.progress import ProgressBook
from sam_backend.jobs.runner import JobBusy, JobOptions, ProjectJob
from sam_backend.labelstudio import boxes, context, label_config, prompting, results
from sam_backend.labelstudio.memory import PromptMemory, SharedPromptMemory
from sam_backend.lru import BoundedLRU
from sam_backend.sam import automatic, refinement, zoom
from sam_backend.sam.types import Embedding, Predictor
from sam_backend.settings import Settings
from sam_backend.store import GuardedStore, StateStore, open_store
from sam_backend.store.sealing import Sealer

ACCESS = "ls-access"  # store namespace of /setup's Label Studio access, sealed
ACCESS_TTL = 7 * 24 * 3600.0  # seconds; Label Studio sends /setup again when a project's model is (re)connected
#: bytes of one stored MobileSAM / SAM embedding (float16 features and the record's header), for job budgets
EMBEDDING_RECORD_BYTES = 2_097_364


log = logging.getLogger(__name__)

class SamModel:
    """Answers Label Studio's calls with one predictor. Thread-safe; holds no per-request state."""

    def __init__(self, predictor: Predictor, settings: Settings, images: ImageLoader | None = None,
                 cache: EmbeddingCache | None = None, memory: PromptMemory | None = None,
                 store: StateStore | None = None) -> None:
        """`store`: the state store (default: the one settings.state_store_spec names, opened here)."""
        self.predictor = predictor
        self.settings = settings
        # zoom-in (sam.zoom) works in SAM's padded low-resolution frame; SAM 2's stretches the image over it
        self._zoom_in = settings.zoom_in and not getattr(predictor, "stretches_frame", False)
        self.store = GuardedStore(store if store is not None
                                  else open_store(settings.state_store_spec, settings.state_store_max_bytes))
        shared = self.store if self.store.shared else None
        self.images = images or ImageLoader(settings)
        self.cache = cache or EmbeddingCache(settings.embedding_cache_size, compact=settings.embedding_float16,
                                             max_computing=settings.max_concurrent_embeddings, store=shared)
        self.memory = memory or (SharedPromptMemory(shared, settings.prompt_memory_size, settings.prompt_memory_ttl)
                                 if shared is not None
                                 else PromptMemory(settings.prompt_memory_size, settings.prompt_memory_ttl))
        self.recent = RecentImages(ttl=settings.image_url_ttl, store=shared)
        self._projects: BoundedLRU[str, LabelStudioAccess] = BoundedLRU(max_items=256)
        self.jobs = ProgressBook(self.store)  # project jobs' progress (sam_backend.jobs), whoever runs them
        self._job_threads: dict[int, threading.Thread] = {}
        self._jobs_lock = threading.Lock()
        # Clicks computing at once (decode, mask, results): more than the cores only makes each one slower, and
        # each holds a mask of its image's size. The others wait their turn (THREADS allows 32 requests).
        self._clicks = threading.BoundedSemaphore(settings.max_concurrent_decodes or _usable_cpus())
        # /setup's token goes to a shared store only sealed (sam_backend/store/sealing.py)
        self._sealer = Sealer(settings.state_store_secret) if shared is not None and settings.state_store_secret \
            else None
        if shared is not None:
            log.info("state store: %s", self.store.describe())
            if self._sealer is None and not settings.label_studio_url:
                log.warning("STATE_STORE is shared but STATE_STORE_SECRET is unset: Label Studio access sent by "
                            "/setup stays in the worker that received it; set LABEL_STUDIO_URL and "
                            "LABEL_STUDIO_API_KEY (or STATE_STORE_SECRET) so that every worker can fetch images")

    @property
    def model_version(self) -> str:
        return self.predictor.model_version

    @property
    def model_class(self) -> str:
        """The predictor's class name, for /health."""
        return type(self.predictor).__name__

    def stats(self) -> dict:
        """Counts for /metrics."""
        return {"embedding_cache": {"items": len(self.cache), "bytes": self.cache.nbytes,
                                    "hits": self.cache.hits, "misses": self.cache.misses},
                "state_store": {**self.store.status(), "store_hits": self.cache.store_hits,
                                "encoder_runs": self.cache.computed},
                "project_jobs": [asdict(progress) for progress in self.jobs.all()],
                "worker_pid": os.getpid()}

    def health(self) -> dict:
        """For /health: the state store's backend and whether it is ok or degraded; each project job's state."""
        return {"state_store": self.store.status(),
                "project_jobs": {str(p.project): p.summary() for p in self.jobs.all()}}

    # ---- /setup -------------------------------------------------------------------------------------
    def setup(self, body: Any, peer: str | None = None) -> dict:
        """Remember where the project's Label Studio is (a fallback for image downloads); never loads a model.

        `peer`: the address the call came from. Without LABEL_STUDIO_URL, the body's `hostname` (and the token
        that goes with it) is taken only when it names that caller: Label Studio telling where it is. Anyone
        else who can reach the backend could otherwise point a project's image downloads at an internal host.
        """
        body = _object(body, "body")
        project, hostname, token = body.get("project"), body.get("hostname"), body.get("access_token")
        if (isinstance(project, str) and isinstance(hostname, str) and hostname and isinstance(token, str) and token
                and token.isprintable() and token.isascii()):
            if self.settings.label_studio_url or names_peer(hostname, peer):
                self._projects.put(project, LabelStudioAccess(url=hostname, token=token))
                self._share_access(project, hostname, token)
            else:
                log.warning("/setup for project %r names Label Studio at %s, but came from %s: not used for image "
                            "downloads (set LABEL_STUDIO_URL when a proxy stands between them)", project[:64],
                            redact_url(hostname), peer)
        schema = body.get("schema")
        if isinstance(schema, str) and schema.strip():
            # a config we cannot serve is reported when the model is connected
            label_config.parse(schema, self.settings.max_label_config_bytes, self.settings.max_labels)
        return {"model_version": self.model_version}

    def _share_access(self, project: str, hostname: str, token: str) -> None:
        if self._sealer is not None:
            sealed = self._sealer.seal(json.dumps({"url": hostname, "token": token}).encode())
            self.store.put(ACCESS, _project_key(project), sealed, ACCESS_TTL)

    def _access(self, project: str) -> LabelStudioAccess | None:
        """The Label Studio /setup named for `project`: this worker's, else the sealed one in the shared store."""
        access = self._projects.get(project)
        if access is not None or self._sealer is None:
            return access
        sealed = self.store.get(ACCESS, _project_key(project))
        opened = self._sealer.open(sealed) if sealed is not None else None
        if opened is None:
            return None
        try:
            data = json.loads(opened)
            access = LabelStudioAccess(url=data["url"], token=data["token"])
        except (ValueError, KeyError, TypeError):
            return None
        self._projects.put(project, access)
        return access

    # ---- /predict -----------------------------------------------------------------------------------
    def predict(self, body: Any) -> dict:
        body = _object(body, "body")
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("body.tasks must be a non-empty list of tasks")
        if len(tasks) > self.settings.max_tasks_per_call:  # before any work: each task costs an answer item
            raise RequestError(f"body.tasks has {len(tasks)} tasks, more than MAX_TASKS_PER_CALL="
                               f"{self.settings.max_tasks_per_call}; send them in smaller batches", status=413)
        schema = body.get("label_config")
        if not isinstance(schema, str) or not schema.strip():
            raise RequestError("body.label_config must be the project's labeling config (XML)")
        config = label_config.parse(schema, self.settings.max_label_config_bytes, self.settings.max_labels)
        params = body.get("params")
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise RequestError("body.params must be an object or null")
        regions = context.parse_context(params.get("context"), config)
        project = body.get("project")
        if isinstance(project, bool) or not isinstance(project, (str, int, type(None))):
            raise RequestError("body.project must be the project's id (a string or integer) or null")
        fallback = self._access(project) if isinstance(project, str) else None
        tasks = [_task(task, index) for index, task in enumerate(tasks)]  # all checked before any work
        if regions and len(tasks) > 1:
            # Label Studio's smart tools send the one task being annotated; a context applied to many tasks
            # would decode every one of them (100 tasks: 12.7 s of CPU) for an answer of which it reads results[0].
            raise RequestError(f"body.tasks has {len(tasks)} tasks, but an interactive call (params.context) is "
                               f"for the one task being annotated")
        answers = []
        for index, task in enumerate(tasks):
            if regions:
                answers.append(self._interactive(task, index, config, regions, project, fallback))
            else:
                self._prewarm(task, index, config, fallback)
                answers.append(results.task_result([], self.model_version))
        return {"results": answers}

    def _interactive(self, task: Mapping, index: int, config: label_config.ProjectConfig,
                     regions: list[context.Region], project: Any, fallback: LabelStudioAccess | None) -> dict:
        image_name = config.prompt_tags[regions[0].group[0]].to_name
        url = _image_url(task, index, config, image_name)
        where = _image_field(index, config, image_name)
        fetched: dict[str, tuple[tuple[str, str], bytes]] = {}  # this call's download, for its crops too
        embedding = self._embedding(url, task, fallback, where, fetched=fetched)
        context.check_sizes(regions, embedding.original_size, redact_url(url))
        task_key = (project, task.get("id"), url)
        size = embedding.original_size
        found = []
        settings = self.settings if self._zoom_in == self.settings.zoom_in else replace(self.settings, zoom_in=False)
        for target, prompt in prompting.assemble(regions, task, config, self.memory, task_key, size, settings):
            # a crop around a small object (sam.zoom) has an embedding of its own, got before a decode slot
            seen = embedding if prompt.view is None else self._embedding(url, task, fallback, where, prompt.view,
                                                                          fetched)
            with self._clicks:
                prediction = refinement.decode(self.predictor, seen, zoom.into(prompt, prompt.view))
                self.memory.remember_mask(task_key, target, prompt, prediction.low_res_logits)
                mask = zoom.paste(prediction.mask, prompt.view, size)
                if mask.any():
                    found += results.mask_results(mask, prediction.score, target, image_name, config, self.settings)
                # decoded in the whole image: the crop a next click would have, embedded meanwhile when nothing
                # else is (many objects get one click only; later moves of a crop depend on where the click
                # lands, and are embedded when it comes)
                upcoming = zoom.choose(None, prediction.low_res_logits, prompt, size) \
                    if self._zoom_in and prompt.box is None and prompt.view is None else None
                del prediction, mask  # the full-size mask, before the next click may start
            if upcoming is not None and self.cache.idle:
                self.cache.prewarm((url, upcoming), lambda view=upcoming: self._embedding(
                    url, task, fallback, where, view, fetched))
        return results.task_result(found, self.model_version)

    def _embedding(self, url: str, task: Mapping, fallback: LabelStudioAccess | None, where: str,
                   view: zoom.View | None = None,
                   fetched: dict[str, tuple[tuple[str, str], bytes]] | None = None) -> Embedding:
        """The embedding of the task's image, or of its crop `view` (`sam.zoom`). `where` names the task field
        holding `url`, for decode errors.

        The image is downloaded unless this URL is a Label Studio upload that gave an embedded image less than
        IMAGE_URL_TTL seconds ago, or `fetched` (one call's downloads: url -> (cache key, bytes)) holds it.
        """
        source = (url, fallback.url if fallback is not None else None)  # a relative URL means the fallback's
        # Only Label Studio's uploads keep their content under their URL; local files and cloud keys can be
        # replaced in place, so they are read again on every call (a stale image would give wrong masks).
        immutable = is_immutable(url)
        known = self.recent.get(source) if immutable else None
        if known is not None:
            embedding = self.cache.get(known if view is None else (*known, view))
            if embedding is not None:
                return embedding
        if fetched is not None and url in fetched:
            key, data = fetched[url]  # the image as this call saw it: a crop of the same bytes
        else:
            key, data = self._download(url, task, fallback)
            if fetched is not None:
                fetched[url] = key, data

        def embed() -> Embedding:
            pixels, size = self._decode(data, url, where)
            return self.predictor.embed(*((pixels, size) if view is None else zoom.crop_pixels(pixels, size, view)))

        return self.cache.get_or_compute(key if view is None else (*key, view), embed)

    def _download(self, url: str, task: Mapping, fallback: LabelStudioAccess | None) -> tuple[tuple[str, str], bytes]:
        """The image's bytes and its embedding's cache key; remembers the key of a Label Studio upload's URL."""
        data = self.images.fetch(url, fallback, task_id=_task_id(task))
        key = (self.model_version, hashlib.sha256(data).hexdigest())
        if is_immutable(url):
            self.recent.put((url, fallback.url if fallback is not None else None), key)
        return key, data

    def _decode(self, data: bytes, url: str, where: str) -> tuple[Any, tuple[int, int]]:
        """(pixels for the encoder, the image's (H, W)); ImageError naming `where` and the URL."""
        try:
            image = ImageLoader.decode_for_encoder(data, self.settings.max_image_pixels)
        except ImageError as error:
            raise ImageError(error.status, f"{where} ({redact_url(url)}): {error.message}") from None
        return image.pixels, image.size

    def _prewarm(self, task: Mapping, index: int, config: label_config.ProjectConfig,
                 fallback: LabelStudioAccess | None) -> None:
        """Compute the embedding of a task Label Studio just opened, so the first click is a warm one."""
        image_name = next(iter(config.image_tags))
        try:
            url = _image_url(task, index, config, image_name)
        except RequestError:
            return
        where = _image_field(index, config, image_name)
        self.cache.prewarm(url, lambda: self._embedding(url, task, fallback, where))


    # ---- /webhook ------------------------------------------------------------------------------------
    def webhook(self, body: Any) -> dict:
        """Label Studio's events. "Start training" (START_TRAINING) starts the project job JOB_ON_TRAINING names in
        a background thread of this worker (one per project: a job already running, here or elsewhere, is left
        alone); every other event is acknowledged and ignored."""
        action = body.get("action") if isinstance(body, Mapping) else None
        if not isinstance(action, str):  # echo event names only: not NaN (no JSON) or a whole payload
            action = None
        if action != "START_TRAINING" or not self.settings.job_on_training:
            return {"status": "ok", "action": action}
        project = body.get("project")
        project_id = project.get("id") if isinstance(project, Mapping) else project
        if isinstance(project_id, bool) or not isinstance(project_id, int):
            raise RequestError("body.project.id must be the project's id (an integer) for START_TRAINING")
        if not (self.settings.label_studio_url and self.settings.label_studio_api_key):
            # Answered 2xx: Label Studio marks the model as failed on any error answer (also when it starts
            # training every N annotations) and shows only the status line, never this reason.
            reason = ("a project job needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set on the backend (a user's "
                      "token that may read the project and write predictions); set JOB_ON_TRAINING= to ignore it")
            log.warning("START_TRAINING for project %s skipped: %s", project_id, reason)
            return {"status": "skipped", "action": action, "project": project_id, "reason": reason}
        with self._jobs_lock:
            self._job_threads = {p: t for p, t in self._job_threads.items() if t.is_alive()}
            running = self._job_threads.get(project_id)
            if (running is not None and running.is_alive()) or self.store.held(f"project-job:{project_id}"):
                return {"status": "running", "action": action, "project": project_id}
            options = JobOptions(steps=self.settings.job_on_training,
                                 auto_label=self.settings.job_auto_label or None,
                                 max_embeddings=self.embedding_budget(), nice=self.settings.encoder_nice)
            job = ProjectJob(LabelStudioApi(self.settings.label_studio_url, self.settings.label_studio_api_key),
                             self, self.jobs, project_id, options)
            thread = threading.Thread(target=self._run_job, args=(job,), name=f"project-job-{project_id}",
                                      daemon=True)
            self._job_threads[project_id] = thread
            thread.start()
        log.info("project job %s started by Label Studio (%s)", project_id, ", ".join(options.steps))
        return {"status": "started", "action": action, "project": project_id, "steps": list(options.steps)}

    @staticmethod
    def _run_job(job: ProjectJob) -> None:
        try:
            report = job.run()
        except JobBusy as error:  # another process took the project's lease first
            log.info("project job %s not started: %s", job.project, error)
            return
        for line in report.lines():
            log.info("%s", line)

    def embedding_budget(self) -> int | None:
        """How many embeddings a job may store before it only evicts its own first ones: the shared store's
        byte budget (Redis is bounded by its own maxmemory), or this worker's cache without a shared store."""
        if not self.store.shared:
            return self.settings.embedding_cache_size
        if self.store.kind == "redis":
            return None
        return max(1, self.settings.state_store_max_bytes // EMBEDDING_RECORD_BYTES)

    # ---- project jobs (sam_backend.jobs.runner.TaskWorker) --------------------------------------------------
    def embed_task(self, task: Mapping, config: label_config.ProjectConfig) -> Embedding:
        """The embedding of the task's (first) image, from the cache or the store, else computed and stored.
        The image is fetched as for /predict, with LABEL_STUDIO_URL for Label Studio's relative URLs."""
        image_name = next(iter(config.image_tags))
        url = _image_url(task, 0, config, image_name)
        return self._embedding(url, task, None, f"data.{config.image_tags[image_name]}")

    @property
    def embed_batch_size(self) -> int:
        """Images `embed_tasks` sends through the encoder at once (the predictor's batch_size; 1 on a CPU)."""
        return max(1, int(getattr(self.predictor, "batch_size", 1)))

    def embed_tasks(self, tasks: list[Mapping], config: label_config.ProjectConfig) -> list[Embedding | ClientError]:
        """`embed_task` of each task, the images not cached or stored yet embedded together, `embed_batch_size`
        at a time; a task whose image fails gets its error in its place."""
        if self.embed_batch_size <= 1:
            return [self._or_error(self.embed_task, task, config) for task in tasks]
        image_name = next(iter(config.image_tags))
        where = f"data.{config.image_tags[image_name]}"
        found: list[Embedding | ClientError | None] = [None] * len(tasks)
        pending = []
        for index, task in enumerate(tasks):
            try:
                url = _image_url(task, 0, config, image_name)
                key, data = self._download(url, task, None)
                found[index] = self.cache.get(key)
                if found[index] is None:
                    pending.append((index, key, self._decode(data, url, where)))
            except ClientError as error:
                found[index] = error
        for start in range(0, len(pending), self.embed_batch_size):
            chunk = pending[start:start + self.embed_batch_size]
            embeddings = self.predictor.embed_batch([image for _, _, image in chunk])
            for (index, key, _), embedding in zip(chunk, embeddings):
                found[index] = self.cache.put(key, embedding)
        return found

    @staticmethod
    def _or_error(function, *args) -> Any:
        try:
            return function(*args)
        except ClientError as error:
            return error

    def box_prediction(self, task: Mapping, config: label_config.ProjectConfig, embedding: Embedding,
                       own_versions: tuple[str, ...] = ()) -> list[dict]:
        """One mask per rectangle of the task (`labelstudio.boxes`), of the rectangle's class: the regions of a
        prediction (brush, and polygons with OUT_POLY and a PolygonLabels tag); [] without rectangles."""
        found: list[dict] = []
        for image_name in config.image_tags:
            for box in boxes.task_boxes(task, config, image_name, own_versions):
                prompt = prompting.build_prompt([box], embedding.original_size, self.settings.max_points)
                if prompt is None:
                    continue
                with self._clicks:
                    prediction = self.predictor.decode(embedding, prompt)
                if prediction.mask.any():
                    found += results.mask_results(prediction.mask, prediction.score, box.target_key, image_name,
                                                  config, self.settings)
                del prediction
        return found

    def auto_prediction(self, task: Mapping, config: label_config.ProjectConfig, embedding: Embedding,
                        label: str, options: automatic.AutoMaskOptions) -> list[dict]:
        """SAM's automatic masks of the task's image (`sam.automatic`), each a region of brush label `label`."""
        target = _brush_target(config, label)
        image_name = config.brush_tags[target[0]]
        found: list[dict] = []
        for auto in automatic.generate(self.predictor, embedding, options):
            found += results.mask_results(auto.mask, auto.score, target, image_name, config, self.settings)
        return found


def _brush_target(config: label_config.ProjectConfig, label: str) -> tuple[str, str]:
    """(brush tag, label) of the brush label `label` (its value, as the prompt tags map to it)."""
    for tag in config.prompt_tags.values():
        for target in tag.targets.values():
            if target.label == label:
                return target.brush_tag, target.label
    raise RequestError(f"the labeling config has no brush label {label!r} that a prompt label maps to "
                       f"(the auto step's masks need one)", status=422)


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _project_key(project: str) -> str:
    return hashlib.sha256(project.encode("utf-8", "surrogatepass")).hexdigest()


def _object(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise RequestError(f"{where} must be a JSON object")
    return value


def _task(task: Any, index: int) -> Mapping:
    task = _object(task, f"body.tasks[{index}]")
    task_id = task.get("id")
    if isinstance(task_id, bool) or not isinstance(task_id, (int, str, type(None))):
        raise RequestError(f"body.tasks[{index}].id must be the task's id (an integer) or null")
    return task


def _task_id(task: Mapping) -> int | None:
    task_id = task.get("id")
    return task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None


def _image_field(index: int, config: label_config.ProjectConfig, image_name: str) -> str:
    return f"body.tasks[{index}].data.{config.image_tags[image_name]}"


def _image_url(task: Mapping, index: int, config: label_config.ProjectConfig, image_name: str) -> str:
    data = task.get("data")
    key = config.image_tags[image_name]
    if not isinstance(data, Mapping) or not isinstance(data.get(key), str) or not data.get(key):
        raise RequestError(f"body.tasks[{index}].data.{key} must be the URL of the task's image "
                           f"(the config's <Image name={image_name!r} value='${key}'>)")
    return data[key]
