"""Helpers for driving Label Studio's real editor in Debian's Chromium (tests/test_browser.py).

- `install_browser()` runs scripts/install_browser.sh (quick when /usr/bin/chromium is there).
- `RecordingProxy` sits between Label Studio and our backend on loopback and keeps every request body, so the test
  knows exactly what the editor caused Label Studio to send.
- `launch_chromium()` starts Chromium with Playwright's bundled driver (no browser download) and a fresh profile.

Nothing here talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class BrowserUnavailable(RuntimeError):
    """Chromium (or Playwright) cannot be had on this machine."""


def install_browser(timeout: float = 900) -> Path:
    """Run scripts/install_browser.sh; return the Chromium executable or raise BrowserUnavailable with why."""
    script = REPO / "scripts" / "install_browser.sh"
    try:
        done = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise BrowserUnavailable(f"{script} did not finish in {timeout:.0f} s") from error
    if done.returncode != 0 or not CHROMIUM.exists():
        raise BrowserUnavailable(f"{script} exited {done.returncode}, {CHROMIUM} "
                                 f"{'exists' if CHROMIUM.exists() else 'is missing'}:\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return CHROMIUM


# ---- a recording reverse proxy ---------------------------------------------------------------------------------
@dataclass
class Call:
    """One request Label Studio made to the backend, and the backend's answer."""

    method: str
    path: str
    body: Any
    status: int
    answer: Any
    seconds: float
    at: float = field(default_factory=time.time)


class RecordingProxy:
    """A loopback HTTP server that forwards every request to `target` and records it (thread-safe).

    Label Studio is given the proxy's URL as the ML backend's URL. Request bodies are kept as parsed JSON (or
    text); answers too, so a failing call can be shown exactly.
    """

    def __init__(self, target: str, timeout: float = 150) -> None:
        self.target = target.rstrip("/")
        self.timeout = timeout
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {key: value for key, value in self.headers.items()
                           if key.lower() in ("content-type", "authorization", "accept")}
                started = time.monotonic()
                try:
                    response = requests.request(self.command, owner.target + self.path, data=raw, headers=headers,
                                                timeout=owner.timeout)
                    status, content = response.status_code, response.content
                    content_type = response.headers.get("Content-Type", "application/json")
                except requests.RequestException as error:
                    status, content, content_type = 502, json.dumps({"proxy_error": repr(error)}).encode(), \
                        "application/json"
                owner._record(self.command, self.path, raw, status, content, time.monotonic() - started)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815 (http.server's names)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _parse(raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _record(self, method, path, raw, status, content, seconds) -> None:
        call = Call(method, path, self._parse(raw), status, self._parse(content), seconds)
        with self._changed:
            self.calls.append(call)
            self._changed.notify_all()

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def predict_calls(self, since: int = 0, interactive: bool | None = None) -> list[Call]:
        """The /predict calls from index `since` on; `interactive` True/False keeps those with/without a context."""
        calls = [c for c in self.snapshot()[since:] if c.path == "/predict" and isinstance(c.body, dict)]
        if interactive is not None:
            calls = [c for c in calls if bool((c.body.get("params") or {}).get("context")) == interactive]
        return calls

    def wait_for_predict(self, since: int, timeout: float, interactive: bool = True) -> Call:
        """Wait until a /predict (with a context, by default) arrives after index `since`; return the first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                calls = [c for c in self.calls[since:] if c.path == "/predict" and isinstance(c.body, dict)
                         and bool((c.body.get("params") or {}).get("context")) == interactive]
                if calls:
                    return calls[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {'interactive ' if interactive else ''}/predict within {timeout:.0f} s; "
                                       f"calls so far: {[(c.method, c.path, c.status) for c in self.calls]}")
                self._changed.wait(min(left, 1.0))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- Chromium ---------------------------------------------------------------------------------------------------
class Chromium:
    """Debian's Chromium driven by Playwright (sync API), with a fresh profile removed on close."""

    def __init__(self, executable: Path = CHROMIUM, viewport=(1400, 900)) -> None:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as error:  # pragma: no cover - requirements-dev.txt has it
            raise BrowserUnavailable(f"the Python package playwright is missing: {error}") from error
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
        self._playwright = sync_playwright().start()
        try:
            self.context = self._playwright.chromium.launch_persistent_context(
                str(self.profile), executable_path=str(executable), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": viewport[0], "height": viewport[1]}, timeout=60_000)
        except BaseException:
            self._playwright.stop()
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.context.set_default_timeout(30_000)
        self.context.set_default_navigation_timeout(60_000)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def close(self) -> None:
        try:
            self.context.close()
        finally:
            self._playwright.stop()
            shutil.rmtree(self.profile, ignore_errors=True)


def log_in(page, url: str, email: str, password: str, timeout: float = 60) -> None:
    """Log in through Label Studio's login page, as a person would."""
    page.goto(f"{url}/user/login/", wait_until="domcontentloaded")
    page.fill("#email", email)
    page.fill("#password", password)
    with page.expect_navigation(timeout=timeout * 1000):
        page.click("button[type=submit]")
    if "/user/login" in page.url:
        raise AssertionError(f"login failed, still on {page.url}")


def wait_js(page, expression: str, timeout: float, what: str, arg: Any = None, interval_ms: int = 250) -> Any:
    """Poll a JS expression in the page until it is truthy; return its value."""
    handle = page.wait_for_function(expression, arg=arg, timeout=timeout * 1000, polling=interval_ms)
    return handle.json_value()


# ---- what a sequence of interactive calls asks for --------------------------------------------------------------
def expected_prompts(contexts: list[dict]) -> list[dict]:
    """For the interactive calls of ONE task, in order, the SAM prompt each one means to this backend.

    Label Studio resends every region of the call's group (type + label); the backend remembers the other
    groups of the task (README, prompts.py). So call k means: every keypoint of the latest copy of each group
    seen up to k, and the newest rectangle. A keypoint is negative when `is_positive` is false or its label is a
    seed alias `-N`. Returns [{"points": [(x%, y%, positive)], "box": (x%, y%, w%, h%) | None}] in percent.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    box = None
    prompts = []
    for context in contexts:
        call: dict[tuple[str, str], list[dict]] = {}
        for region in context["result"]:
            value = region["value"]
            label = (value.get(region["type"]) or value.get("labels"))[0]
            call.setdefault((region["from_name"], label), []).append(region)
        groups.update(call)
        rectangles = [r for rs in call.values() for r in rs if r["type"] == "rectanglelabels"]
        if rectangles:
            value = rectangles[-1]["value"]
            box = (value["x"], value["y"], value["width"], value["height"])
        points = []
        for (_, label), regions in groups.items():
            for region in regions:
                if region["type"] == "keypointlabels":
                    positive = region.get("is_positive", True) and not label.startswith("-")
                    points.append((region["value"]["x"], region["value"]["y"], bool(positive)))
        prompts.append({"points": points, "box": box})
    return prompts


def decode_brush(region: dict):
    """(H, W) bool mask of a brushlabels region, decoded with the SDK Label Studio itself relies on."""
    from label_studio_sdk.converter.brush import decode_rle

    width, height = region["original_width"], region["original_height"]
    flat = decode_rle(region["value"]["rle"])
    if flat.size != width * height * 4:
        raise AssertionError(f"RLE decodes to {flat.size} values, not {width}*{height}*4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def iou(a, b) -> float:
    import numpy as np

    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
