"""Shared fixtures: real MobileSAM weights, real photos, a predictor, and a local image server."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

# Two cores: one torch thread per test process keeps the suite's timing stable beside Label Studio.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def mobile_sam_checkpoint() -> Path:
    """The real, sha256-verified MobileSAM checkpoint (fetched once if missing)."""
    import weights

    return weights.fetch("mobile_sam")


@pytest.fixture(scope="session")
def torch_predictor(mobile_sam_checkpoint):
    """MobileSAM on torch, CPU, real weights."""
    from advanced_sam import TorchSamPredictor

    return TorchSamPredictor.load("vit_t", mobile_sam_checkpoint, "cpu", model_version="MobileSAM-test")


# ---- real HTTP on loopback ------------------------------------------------------------------------------
import io  # noqa: E402
import threading  # noqa: E402
from dataclasses import replace  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

LS_TOKEN = "test0legacy0token"


class FakeLabelStudio:
    """Plays Label Studio's file serving on loopback: GET /data/upload/... with `Token <LS_TOKEN>` only."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (path, Authorization header)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                owner.requests.append((self.path, self.headers.get("Authorization", "")))
                if self.headers.get("Authorization") != f"Token {LS_TOKEN}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = owner.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_image(self, path: str, image) -> str:
        """Serve `image` ((H, W, 3) uint8) as a JPEG at `path`; returns the path."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        self.files[path] = buffer.getvalue()
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LiveServer:
    """The backend's WSGI app on a real loopback port (werkzeug, threaded)."""

    def __init__(self, app) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def fake_label_studio():
    server = FakeLabelStudio()
    yield server
    server.close()


@pytest.fixture(scope="session")
def base_settings(fake_label_studio, mobile_sam_checkpoint):
    from settings import Settings

    # Refinement off: each answer is then a pure function of its prompt, which the tests recompute.
    return Settings(label_studio_url=fake_label_studio.url, label_studio_api_key=LS_TOKEN,
                    mobilesam_checkpoint=mobile_sam_checkpoint, device="cpu", refine_masks=False)


@pytest.fixture(scope="session")
def live_backend(base_settings, torch_predictor):
    """The backend with MobileSAM on torch, over real HTTP, sharing the session's predictor."""
    from server import create_app

    server = LiveServer(create_app(base_settings, predictor=torch_predictor))
    yield server
    server.close()


def make_live_backend(settings, predictor, **changes) -> LiveServer:
    from server import create_app

    return LiveServer(create_app(replace(settings, **changes), predictor=predictor))
