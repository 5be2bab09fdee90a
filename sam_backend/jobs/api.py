"""The few Label Studio API calls a project job makes, through label-studio-sdk, each one `Polite`.

Authentication is the server's own: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a legacy token or a personal
access token; the SDK exchanges a PAT for access tokens and refreshes them). The job reads tasks with their
annotations and predictions, and creates predictions; it never writes annotations.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from sam_backend.jobs.polite import CallFailed, Polite

__all__ = ["CallFailed", "LabelStudioApi", "retryable"]


def retryable(error: BaseException) -> tuple[bool, int | None]:
    """(retry?, HTTP status): Label Studio busy or failing (429, 5xx), a timeout or a refused connection."""
    if isinstance(error, ApiError):
        status = error.status_code
        return status is None or status == 429 or status >= 500, status
    if isinstance(error, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return False, None  # a wrong LABEL_STUDIO_URL or request: trying again cannot help
    if isinstance(error, (httpx.TimeoutException, httpx.TransportError)):
        return True, None
    return False, None


def describe(error: BaseException) -> str:
    """An SDK error in one line: the HTTP status and the start of Label Studio's answer."""
    if isinstance(error, ApiError):
        body = error.body if isinstance(error.body, str) else repr(error.body)
        return f"HTTP {error.status_code}: {body[:300]}"
    return f"{type(error).__name__}: {str(error)[:300]}"


class LabelStudioApi:
    """url, api_key: Label Studio and a token of a user who may read the project and write predictions.
    timeout: seconds per call; the other keywords are `Polite`'s."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, client: Any = None, **polite: Any) -> None:
        if not url or not api_key:
            raise ValueError("a project job needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a legacy token or a "
                             "personal access token of a user of the project)")
        self.url = url.rstrip("/")
        self._client = client or LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        self._options = {"max_retries": 0, "timeout": timeout}  # Polite retries, with its own backoff
        self.polite = Polite(retryable, describe=describe, **polite)

    def label_config(self, project: int) -> str:
        found = self.polite.call(f"reading project {project}",
                                 lambda: self._client.projects.get(project, request_options=self._options))
        return found.label_config

    def task_pages(self, project: int, page_size: int = 100, first_page: int = 1) -> Iterator[tuple[int, list[dict]]]:
        """(page number, tasks as dicts with their annotations and predictions), page by page from `first_page`."""
        page = first_page
        while True:
            try:
                pager = self.polite.call(
                    f"listing page {page} of project {project}'s tasks",
                    lambda: self._client.tasks.list(project=project, page=page, page_size=page_size, fields="all",
                                                    request_options=self._options))
            except CallFailed as error:
                if error.status == 404 and page > first_page:  # Label Studio's answer past the last page
                    return
                raise
            tasks = [_as_dict(task) for task in pager.items or []]
            if tasks:
                yield page, tasks
            if len(tasks) < page_size or not pager.has_next:
                return
            page += 1

    def total(self, project: int) -> int | None:
        """How many tasks the project has (None when Label Studio does not say)."""
        found = self.polite.call(f"reading project {project}",
                                 lambda: self._client.projects.get(project, request_options=self._options))
        count = getattr(found, "task_number", None)
        return count if isinstance(count, int) else None

    def create_prediction(self, task: int, result: list[dict], score: float, model_version: str) -> int:
        """Write one prediction; its id. A write whose answer was lost (a timeout, a 5xx from a proxy) may have
        been saved: before each retry the task's predictions are read, and one of `model_version` is taken as
        this write's, so that a retry never writes a second one."""
        tries = 0

        def create() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1:
                for existing in self._client.predictions.list(task=task, request_options=self._options):
                    if existing.model_version == model_version:
                        return existing
            return self._client.predictions.create(task=task, result=result, score=score,
                                                   model_version=model_version, request_options=self._options)

        return self.polite.call(f"writing the prediction of task {task}", create).id


def _as_dict(task: Any) -> dict:
    if isinstance(task, dict):
        return task
    return task.model_dump() if hasattr(task, "model_dump") else dict(task)
