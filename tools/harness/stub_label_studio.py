"""Loopback HTTP servers for the tools and the tests: a generic one, and a stand-in for Label Studio.

`LoopbackServer` answers every request with `app(handler, body)` and logs it (method, path, headers, body and
the status it got). `FakeLabelStudio` plays Label Studio's media serving on it: GET /data/upload/... (or any
path added to `files`) only to `Authorization: Token <token>`, counting the downloads of each path. Tests
that need more of Label Studio (personal access tokens, presign, redirects) subclass it and extend
`authorized` and `app`.
"""
from __future__ import annotations

import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

#: the legacy token FakeLabelStudio accepts unless told another
TOKEN = "stub0legacy0token"
UNAUTHORIZED = b'{"detail": "Authentication credentials were not provided."}'


class Handler(BaseHTTPRequestHandler):
    server: "LoopbackServer"

    def log_message(self, *args) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.entry = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body,
                      "status": None}
        self.server.requests.append(self.entry)
        try:
            self.server.app(self, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch  # noqa: N815 (http.server's names)

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = -1) -> None:
        """Answer `status` with `body`; Content-Length is that of `body`, `length` if given, or none (None)."""
        self.entry["status"] = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length == -1:
            self.send_header("Content-Length", str(len(body)))
        elif length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)


App = Callable[[Handler, bytes], None]


class LoopbackServer(ThreadingHTTPServer):
    """An HTTP server on `host` (a loopback address), port chosen by the system, serving from a daemon thread.

    `keep_alive` speaks HTTP/1.1 (connections are kept open between requests); else HTTP/1.0.
    """

    daemon_threads = True

    def __init__(self, app: App, host: str = "127.0.0.1", keep_alive: bool = False) -> None:
        handler = type("Handler", (Handler,), {"protocol_version": "HTTP/1.1" if keep_alive else "HTTP/1.0"})
        super().__init__((host, 0), handler)
        self.app = app
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True,
                                       name=f"loopback-{host}")
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self.server_address[1]

    def authorizations(self) -> list[str | None]:
        return [r["headers"].get("Authorization") for r in self.requests]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    close = stop


def static(body: bytes = b"", status: int = 200, headers: dict | None = None) -> App:
    """An app that answers every request alike."""
    def app(h: Handler, _: bytes) -> None:
        h.send(status, body, headers)
    return app


class FakeLabelStudio:
    """Serves `files` like Label Studio's /data/upload/..., only to `Authorization: Token <token>`.

    Counts the successful GETs of each path (`count`), which tells how often the backend downloads an image it
    has seen; `requests` logs every request, `statuses` counts the answers.
    """

    def __init__(self, token: str = TOKEN, host: str = "127.0.0.1", keep_alive: bool = False) -> None:
        self.token = token
        self.files: dict[str, bytes] = {}
        self.downloads: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = LoopbackServer(self.app, host, keep_alive)
        self.url = self.server.url

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    def authorized(self, header: str | None) -> bool:
        return header == f"Token {self.token}"

    def app(self, h: Handler, body: bytes) -> None:
        if not self.authorized(h.headers.get("Authorization")):
            return h.send(401, UNAUTHORIZED, {"Content-Type": "application/json"})
        self.serve_file(h)

    def serve_file(self, h: Handler) -> None:
        data = self.files.get(h.path)
        if data is None or h.command != "GET":
            return h.send(404, b"not found")
        with self.lock:
            self.downloads[h.path] += 1
        kind = "image/png" if h.path.lower().endswith(".png") else "image/jpeg"
        h.send(200, data, {"Content-Type": kind})

    def add_image(self, path: str, image, quality: int = 95) -> str:
        """Serve `image` ((H, W, 3) uint8) as a JPEG at `path`; returns the path."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        self.files[path] = buffer.getvalue()
        return path

    def count(self, path: str) -> int:
        """Successful downloads of `path` so far."""
        with self.lock:
            return self.downloads[path]

    def statuses(self) -> Counter[int]:
        """How many requests got each status."""
        return Counter(r["status"] for r in list(self.requests))

    def close(self) -> None:
        self.server.stop()


__all__ = ["TOKEN", "FakeLabelStudio", "Handler", "LoopbackServer", "static"]
