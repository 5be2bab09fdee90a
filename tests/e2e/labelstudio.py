"""End-to-end test harness: a real Label Studio and our backend, each in its own process.

`LabelStudio` runs `label-studio start` from its own virtualenv (scripts/install_label_studio.sh; its pins clash
with ours) and wraps the few REST calls the tests need. `Backend` runs this repository's server under gunicorn,
the way it is deployed. Both are tools/harness/processes.py's processes: they write their output to a log file,
bound every wait, and can be stopped cleanly.

Nothing here talks to anything but 127.0.0.1. See shared/label-studio-protocol.md for what Label Studio 1.23
sends to a backend.
"""
from __future__ import annotations

import copy
import os
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import requests

from tools.harness.processes import (GunicornBackend, HarnessError, Process, dump_logs, environment, free_port,
                                     wait_for)

REPO = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
DB_NAME = "label_studio.sqlite3"
#: What a data dir needs to skip the migrations: the database and the SECRET_KEY Label Studio generated for it.
TEMPLATE_FILES = (DB_NAME, ".env")

#: Seconds allowed for a first start (database migrations take about a minute on two shared cores).
LS_START_TIMEOUT = float(os.environ.get("LS_START_TIMEOUT", "300"))

#: The projects of the end-to-end tests: native labels, as in Label Studio's own SAM example ...
NATIVE_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Cat" background="#FF0000"/>
    <Label value="Dog" background="#0d14d3"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Cat" smart="true" background="#000000" showInline="true"/>
    <Label value="Dog" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Cat" smart="true" background="#000000" showInline="true"/>
    <Label value="Dog" smart="true" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>"""

#: ... and the seed's alias convention: keypoint alias N / -N, rectangle alias N, brush label N (alias N_brush).
ALIAS_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="brush" toName="image">
    <Label value="1" hint="brush" background="blue" alias="1_brush"/>
    <Label value="2" hint="brush" background="purple" alias="2_brush"/>
  </BrushLabels>
  <KeypointLabels name="tag2" toName="image">
    <Label value="(+1)" hint="keypoint" background="blue" alias="1"/>
    <Label value="(-1)" hint="keypoint" background="red" alias="-1"/>
    <Label value="(+2)" hint="keypoint" background="purple" alias="2"/>
    <Label value="(-2)" hint="keypoint" background="red" alias="-2"/>
  </KeypointLabels>
  <RectangleLabels name="tag4" toName="image">
    <Label value="[1]" hint="rectangle" background="blue" alias="1"/>
    <Label value="[2]" hint="rectangle" background="purple" alias="2"/>
  </RectangleLabels>
</View>"""
#: Seconds allowed for the backend to load its model and answer /health with model_loaded true.
BACKEND_START_TIMEOUT = float(os.environ.get("BACKEND_START_TIMEOUT", "300"))
#: Seconds allowed for one REST call to Label Studio (interactive calls wait for the backend's /predict).
HTTP_TIMEOUT = float(os.environ.get("LS_HTTP_TIMEOUT", "150"))


def ls_venv() -> Path:
    path = Path(os.environ.get("LS_VENV", ".venv-ls"))
    return path if path.is_absolute() else REPO / path


def install_label_studio(timeout: float = 900) -> Path:
    """Run scripts/install_label_studio.sh (quick when already installed); return the `label-studio` executable."""
    script = REPO / "scripts" / "install_label_studio.sh"
    try:
        done = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise HarnessError(f"{script} did not finish in {timeout:.0f} s") from error
    if done.returncode != 0:
        raise HarnessError(f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    executable = ls_venv() / "bin" / "label-studio"
    if not executable.is_file():
        raise HarnessError(f"{script} succeeded but {executable} is missing")
    return executable


class LabelStudio(Process):
    """A Label Studio server on 127.0.0.1 and a REST client for it, authenticated with the legacy token.

    The organization is created by the first start with legacy tokens enabled (`--enable-legacy-api-token`);
    `set_token_settings` can change that later.
    """

    USERNAME = "e2e@example.com"
    PASSWORD = "e2e-password-123"
    TOKEN = "e2e0legacy0token0123456789"

    def __init__(self, log_path: Path, executable: Path | None = None) -> None:
        super().__init__(log_path)
        self.executable = Path(executable) if executable else ls_venv() / "bin" / "label-studio"
        self.port: int | None = None
        self.data_dir: Path | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {self.TOKEN}"
        self._pat: str | None = None
        self._bearer_pat: str | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise HarnessError("Label Studio is not started")
        return f"http://127.0.0.1:{self.port}"

    # ---- process ----------------------------------------------------------------------------------------------
    def start(self, data_dir: Path, port: int | None = None, timeout: float = LS_START_TIMEOUT,
              env: dict[str, str] | None = None, template: bool | None = None) -> "LabelStudio":
        """Start on `data_dir` (created if missing) and wait until the legacy token works.

        A first start on an empty directory migrates a new database (about a minute here). With `template`
        (default: on unless LS_TEMPLATE=0) an empty `data_dir` is seeded from a snapshot of a freshly
        migrated one kept beside the Label Studio venv, and the first start that has none makes it: later
        starts take seconds.
        """
        if not self.executable.is_file():
            raise HarnessError(f"{self.executable} is missing: run scripts/install_label_studio.sh")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if template is None:
            template = os.environ.get("LS_TEMPLATE", "1").strip().lower() not in ("0", "false", "no", "off")
        fresh = not (self.data_dir / DB_NAME).exists()
        seeded = template and fresh and self._seed_from_template()
        self.port = port or free_port()
        child_env = {key: value for key, value in os.environ.items()
                     if not key.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV", "PYTHON"))}
        child_env.update({
            "PATH": f"{self.executable.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # The backend is on 127.0.0.1: both default to on and would reject it (see the protocol notes).
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.data_dir),
            # An interactive call waits for our /predict, which embeds the image on its first call.
            "ML_TIMEOUT_PREDICT": "120",
            "ML_TIMEOUT_SETUP": "5",
            "ML_TIMEOUT_HEALTH": "3",
            "COLLECT_ANALYTICS": "false",
            "LOG_LEVEL": "INFO",
        })
        child_env.update(env or {})
        args = [str(self.executable), "start", "--no-browser", "--data-dir", str(self.data_dir),
                "--internal-host", "127.0.0.1", "--port", str(self.port),
                "--username", self.USERNAME, "--password", self.PASSWORD, "--user-token", self.TOKEN,
                "--enable-legacy-api-token"]
        self.spawn(args, child_env, cwd=self.data_dir)
        try:
            wait_for(self._ready, timeout, interval=1.0, what=f"Label Studio on port {self.port}",
                     alive=self.alive, log=self.log_path)
        except BaseException:
            self.stop()
            raise
        if template and fresh and not seeded:
            self._save_template()
        return self

    # ---- a snapshot of a freshly migrated data dir ---------------------------------------------------------
    @property
    def template_dir(self) -> Path:
        """Beside the venv's interpreter: goes away with the venv, so it never outlives its Label Studio."""
        return self.executable.parent.parent / f"e2e-template-{LS_VERSION}"

    def _seed_from_template(self) -> bool:
        files = [self.template_dir / name for name in TEMPLATE_FILES]
        if not all(path.is_file() for path in files):
            return False
        for path in files:
            shutil.copy2(path, self.data_dir / path.name)
        return True

    def _save_template(self) -> None:
        """Snapshot the new database (sqlite's online backup: consistent while the server runs) and the
        secret key file Label Studio made beside it; written to a temporary dir and renamed into place."""
        if self.template_dir.exists() or not all((self.data_dir / name).is_file() for name in TEMPLATE_FILES):
            return
        staging = self.template_dir.with_name(f"{self.template_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            source = sqlite3.connect(f"file:{self.data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)
            target = sqlite3.connect(staging / DB_NAME)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
            shutil.copy2(self.data_dir / ".env", staging / ".env")
            staging.rename(self.template_dir)
        except (OSError, sqlite3.Error):
            pass  # another process made it first, or the disk refused: only speed is lost
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _ready(self) -> bool:
        if requests.get(f"{self.url}/health", timeout=3).status_code != 200:
            return False
        # /health answers before the user exists on a first start; the token must work too.
        return self.session.get(f"{self.url}/api/current-user/whoami", timeout=5).status_code == 200

    # ---- REST -------------------------------------------------------------------------------------------------
    def api(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kwargs) -> Any:
        """Call the REST API (legacy token, or see `authenticate_with`); return the JSON (or None); raise on
        another status."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        response = self.session.request(method, f"{self.url}{path}", **kwargs)
        if response.status_code == 401 and self._bearer_pat:
            # The access token lives 300 s: refresh it once and retry.
            self.session.headers["Authorization"] = f"Bearer {self.access_token(self._bearer_pat)}"
            response = self.session.request(method, f"{self.url}{path}", **kwargs)
        if response.status_code not in expect:
            raise HarnessError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def sign_up(self, email: str, password: str) -> "LabelStudio":
        """A new user of the organization, signed up through the web form with its invite link as a person would
        (the link works also where sign-up without one is disabled): a client of this server that acts as that user
        (their legacy token) and cannot stop it."""
        invite = f"{self.url}/user/signup/?token={self.api('GET', '/api/invite')['token']}"
        session = requests.Session()
        session.get(invite, timeout=HTTP_TIMEOUT)
        answer = session.post(invite, timeout=HTTP_TIMEOUT, allow_redirects=False,
                              data={"email": email, "password": password,
                                    "csrfmiddlewaretoken": session.cookies.get("csrftoken", "")},
                              headers={"Referer": invite})
        if answer.status_code != 302:
            raise HarnessError(f"signing up {email}: {answer.status_code} {answer.text[:500]}")
        token = session.get(f"{self.url}/api/current-user/token", timeout=HTTP_TIMEOUT).json()["token"]
        session.close()
        other = copy.copy(self)
        other.process, other._logs, other._at_exit = None, [], True  # the server stays this object's to stop
        other.session = requests.Session()
        other.session.headers["Authorization"] = f"Token {token}"
        other._pat = other._bearer_pat = None
        return other

    def create_project(self, label_config: str, title: str | None = None, **fields: Any) -> dict:
        body = {"title": title or f"e2e {uuid.uuid4().hex[:8]}", "label_config": label_config, **fields}
        return self.api("POST", "/api/projects/", json=body)

    def import_file(self, project_id: int, path: Path) -> dict:
        """Upload one image through the import API; return its task (with `data`)."""
        before = {task["id"] for task in self.tasks(project_id)}
        with open(path, "rb") as handle:
            self.api("POST", f"/api/projects/{project_id}/import", files={Path(path).name: handle})
        created = [task for task in self.tasks(project_id) if task["id"] not in before]
        if len(created) != 1:
            raise HarnessError(f"importing {path} created {len(created)} tasks")
        return created[0]

    def tasks(self, project_id: int) -> list[dict]:
        body = self.api("GET", "/api/tasks", params={"project": project_id, "page_size": 1000})
        return body["tasks"] if isinstance(body, dict) else body

    def task(self, task_id: int) -> dict:
        """The task with its annotations, drafts (of this user) and predictions.

        Note: with the project's "retrieve predictions automatically" on, this also makes Label Studio call the
        backend's /predict (context null) when the task has no prediction yet, as opening it in the editor does.
        """
        return self.api("GET", f"/api/tasks/{task_id}/")

    def predictions(self, task_id: int) -> list[dict]:
        return self.api("GET", "/api/predictions/", params={"task": task_id})

    def image_url(self, task: dict, variable: str = "image") -> str:
        """The absolute URL of a task's uploaded image (the task holds a path relative to Label Studio)."""
        value = task["data"][variable]
        return value if value.startswith("http") else f"{self.url}{value}"

    def save_draft(self, task_id: int, result: list[dict]) -> dict:
        """Save a draft for this user, as the editor's autosave does (`tasks[0].drafts` of interactive calls)."""
        return self.api("POST", f"/api/tasks/{task_id}/drafts", json={"result": result, "lead_time": 1.0})

    def delete_drafts(self, task_id: int) -> None:
        for draft in self.task(task_id).get("drafts") or []:
            self.api("DELETE", f"/api/drafts/{draft['id']}/", expect=(200, 204))

    def create_annotation(self, task_id: int, result: list[dict]) -> dict:
        return self.api("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result, "lead_time": 1.0})

    # ---- tokens -----------------------------------------------------------------------------------------------
    def token_settings(self) -> dict:
        """{"api_tokens_enabled": bool, "legacy_api_tokens_enabled": bool} of the organization."""
        return self.api("GET", "/api/jwt/settings")

    def set_token_settings(self, *, legacy: bool | None = None, personal: bool | None = None) -> dict:
        """Enable or disable legacy tokens / personal access tokens for the organization.

        Careful: with legacy tokens disabled this client's own token stops working; switch back with a PAT
        (`as_bearer`).
        """
        body = self.token_settings()
        if legacy is not None:
            body["legacy_api_tokens_enabled"] = legacy
        if personal is not None:
            body["api_tokens_enabled"] = personal
        return self.api("POST", "/api/jwt/settings", json=body)

    def personal_access_token(self) -> str:
        """A personal access token (a JWT refresh token) of the user; created once and kept.

        Label Studio lets a user hold one at a time (POST /api/token/ answers 409 otherwise): an existing one,
        whose full text we no longer have, is revoked first.
        """
        if self._pat:
            return self._pat
        response = self.session.post(f"{self.url}/api/token/", timeout=HTTP_TIMEOUT)
        if response.status_code == 409:
            for item in self.api("GET", "/api/token/"):
                self.api("POST", "/api/token/blacklist/", json={"refresh": item["token"]}, expect=(200, 204))
            response = self.session.post(f"{self.url}/api/token/", timeout=HTTP_TIMEOUT)
        if response.status_code not in (200, 201):
            raise HarnessError(f"POST /api/token/ -> {response.status_code}: {response.text[:1000]}")
        self._pat = response.json()["token"]
        return self._pat

    def authenticate_with(self, pat: str | None) -> None:
        """Make this client use `Bearer <access token of pat>` (refreshed on 401), or the legacy token again
        (None). Needed while the organization has legacy tokens disabled."""
        self._bearer_pat = pat
        if pat:
            self.session.headers["Authorization"] = f"Bearer {self.access_token(pat)}"
        else:
            self.session.headers["Authorization"] = f"Token {self.TOKEN}"

    def access_token(self, refresh: str | None = None) -> str:
        """A short-lived (300 s) access token for a personal access token, to send as `Bearer`."""
        response = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": refresh or self.personal_access_token()},
                                 timeout=HTTP_TIMEOUT)
        if response.status_code != 200:
            raise HarnessError(f"POST /api/token/refresh/ -> {response.status_code}: {response.text[:1000]}")
        return response.json()["access"]

    # ---- ML backends ------------------------------------------------------------------------------------------
    def add_ml_backend(self, project_id: int, url: str, title: str = "SAM", is_interactive: bool = True,
                       **fields: Any) -> dict:
        """Connect a backend to a project, as "Add Model" does (LS calls /health and /setup before answering)."""
        body = {"url": url, "project": project_id, "title": title, "is_interactive": is_interactive, **fields}
        return self.api("POST", "/api/ml/", json=body)

    def ml_backends(self, project_id: int) -> list[dict]:
        """The project's backends; listing makes Label Studio refresh their state (/health and /setup)."""
        return self.api("GET", "/api/ml/", params={"project": project_id})

    def ml_backend(self, ml_id: int) -> dict:
        return self.api("GET", f"/api/ml/{ml_id}")

    def update_ml_backend(self, ml_id: int, **fields: Any) -> dict:
        return self.api("PATCH", f"/api/ml/{ml_id}", json=fields)

    def delete_ml_backend(self, ml_id: int) -> None:
        self.api("DELETE", f"/api/ml/{ml_id}", expect=(200, 204))

    def interactive_annotating(self, ml_id: int, task_id: int, context: dict | None) -> dict:
        """What the editor posts for a smart-tool click or box; LS answers {"data": results[0]} or {"errors": [...]}."""
        return self.api("POST", f"/api/ml/{ml_id}/interactive-annotating",
                        json={"task": task_id, "context": context})

    def retrieve_predictions(self, project_id: int, task_ids: list[int]) -> dict:
        """The Data Manager's "Retrieve predictions" action on the given tasks (one /predict, context null)."""
        return self.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
                        json={"selectedItems": {"all": False, "included": list(task_ids)}})


# ---- regions as the editor sends them in `context.result` (percent of the image's natural size) ---------------
def keypoint(x: float, y: float, label: str, *, width: int, height: int, from_name: str = "tag2",
             to_name: str = "image", is_positive: bool | None = True, smart: bool = True) -> dict:
    """A keypoint region. `smart=False` mimics one drawn with the plain tool: no `is_positive`, no `labels`."""
    value: dict[str, Any] = {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}
    region: dict[str, Any] = {"original_width": width, "original_height": height, "image_rotation": 0,
                              "value": value, "id": uuid.uuid4().hex[:10], "from_name": from_name,
                              "to_name": to_name, "type": "keypointlabels", "origin": "manual"}
    if smart:
        value["labels"] = [label]
        if is_positive is not None:
            region["is_positive"] = is_positive
    return region


def rectangle(x: float, y: float, w: float, h: float, label: str, *, width: int, height: int,
              from_name: str = "tag3", to_name: str = "image") -> dict:
    """A rectangle region (no `is_positive`: the editor never sends one for rectangles)."""
    return {"original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
            "id": uuid.uuid4().hex[:10], "from_name": from_name, "to_name": to_name,
            "type": "rectanglelabels", "origin": "manual"}


class Backend(GunicornBackend):
    """This repository's backend under gunicorn, as deployed: `gunicorn _wsgi:app` in the repo root, with the
    tests' worker, thread and timeout options on the command line."""

    stop_timeout = 20  # twice its --graceful-timeout

    def start(self, env: dict[str, str] | None = None, timeout: float = BACKEND_START_TIMEOUT, workers: int = 1,
              threads: int = 4) -> "Backend":
        # gunicorn.conf.py in the repo root is read as in production; nothing from the caller's shell may
        # override the command line below (`environment` drops GUNICORN_CMD_ARGS).
        child_env = environment({"TORCH_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **(env or {})})
        options = ["--workers", str(workers), "--threads", str(threads), "--timeout", "120", "--graceful-timeout",
                   "10", "--access-logfile", "-"]
        super().start(child_env, options, timeout=timeout, interval=1.0, ready=self._ready)
        return self

    def _ready(self) -> bool:
        response = requests.get(f"{self.url}/health", timeout=3)
        return response.status_code == 200 and response.json().get("model_loaded") is True

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return requests.get(f"{self.url}{path}", **kwargs)

    def post(self, path: str, body: Any, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return requests.post(f"{self.url}{path}", json=body, **kwargs)


__all__ = ["Backend", "HarnessError", "LabelStudio", "dump_logs", "free_port", "install_label_studio", "keypoint",
           "rectangle", "wait_for"]
