"""Slow clients and stalled image hosts against gunicorn as configured (issue #11, item 1), over real HTTP.

The backend runs as `make run` runs it (`gunicorn -c gunicorn.conf.py _wsgi:app`, real MobileSAM on torch), with
short deadlines so the test is quick: REQUEST_READ_TIMEOUT=2 s, IMAGE_TIMEOUT=1.5 s. Around it: the loopback
stand-in Label Studio of conftest.py (serves the task image) and an image host that accepts connections and
never answers. The facts checked are functional, with generous bounds; latencies are printed, not asserted tight
(tools/slow_clients.py measures them).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import skimage.data

from conftest import LS_TOKEN, ROOT
from tools.harness import recordings

pytestmark = [pytest.mark.slow, pytest.mark.weights]

READ_TIMEOUT = 2.0  # REQUEST_READ_TIMEOUT
IMAGE_TIMEOUT = 1.5
TOTAL_FETCH = 3 * IMAGE_TIMEOUT  # the images package bounds a whole fetch at 3 x IMAGE_TIMEOUT
MARGIN = 3.0  # the worker checks deadlines once a second; the machine is shared
SLOW_CLIENTS = 40  # more than the default THREADS (32): one thread per slow client would not do
STALLED = 4
CHELSEA = skimage.data.chelsea()  # 300 x 451
IMAGE = "/data/upload/11/chelsea.jpg"
RECORDED = recordings.document()


def click(image: str, task_id: int, x: float = 50.0) -> dict:
    call = next(c for c in RECORDED["calls"] if c["name"] == "keypoints_positive_and_negative"
                and c["path"] == "/predict")
    body = json.loads(json.dumps(call["body"]))
    body["tasks"][0].update(id=task_id)
    body["tasks"][0]["data"]["image"] = image
    region = body["params"]["context"]["result"][0]
    region["value"].update(x=x, y=50.0)
    region.update(id=f"slow{task_id}", is_positive=True)
    body["params"]["context"]["result"] = [region]
    return body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StallingHost:
    """Accepts connections on loopback and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        for sock in [self.listener, *self.held]:
            sock.close()


@pytest.fixture(scope="module")
def stalling_host():
    host = StallingHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake_label_studio, mobile_sam_checkpoint):
    """`gunicorn -c gunicorn.conf.py _wsgi:app` on a free loopback port, defaults but for the two deadlines."""
    fake_label_studio.add_image(IMAGE, CHELSEA)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in {"GUNICORN_CMD_ARGS", "THREADS", "WORKERS", "PORT"} and not k.startswith("BASIC_AUTH")}
    env.update(LABEL_STUDIO_URL=fake_label_studio.url, LABEL_STUDIO_API_KEY=LS_TOKEN, RUN_ONNX_SAM="false",
               DEVICE="cpu", MOBILESAM_CHECKPOINT=str(mobile_sam_checkpoint), ALLOW_PRIVATE_IMAGE_HOSTS="true",
               REQUEST_READ_TIMEOUT=str(READ_TIMEOUT), IMAGE_TIMEOUT=str(IMAGE_TIMEOUT))
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    gunicorn = Path(sys.executable).parent / "gunicorn"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(gunicorn), "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}",
                                    "_wsgi:app"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/health did not answer within 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        # the image's embedding, so later clicks are warm
        first = requests.post(url + "/predict", json=click(IMAGE, 1), timeout=120)
        assert first.status_code == 200, first.text
        yield url, port, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def open_slow(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def answer_of(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the server sends on `sock` until it closes it (or `timeout`), and after how many seconds."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - started


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaa"
SLOW_BODY = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
             b"\r\n{\"tasks\": ")


def test_health_and_clicks_answer_while_slow_clients_and_stalled_fetches_hold_connections(server, stalling_host):
    url, port, _ = server
    slow = [open_slow(port, SLOW_HEAD if i % 2 else SLOW_BODY) for i in range(SLOW_CLIENTS)]
    pool = ThreadPoolExecutor(STALLED)
    stalled = [pool.submit(requests.post, url + "/predict", timeout=60,
                           json=click(f"http://127.0.0.1:{stalling_host.port}/s{i}.jpg", 100 + i))
               for i in range(STALLED)]
    try:
        time.sleep(0.5)  # the stalled predicts are waiting on the image host now
        started = time.monotonic()
        health = requests.get(url + "/health", timeout=10)
        health_s = time.monotonic() - started
        started = time.monotonic()
        warm = requests.post(url + "/predict", json=click(IMAGE, 2, x=40.0), timeout=30)
        click_s = time.monotonic() - started
        print(f"\nwith {SLOW_CLIENTS} slow clients and {STALLED} stalled fetches: /health {health_s * 1000:.0f} ms, "
              f"warm click {click_s * 1000:.0f} ms")
        assert health.status_code == 200 and health.json()["status"] == "UP"
        assert health_s < 5, f"/health took {health_s:.1f} s"
        assert warm.status_code == 200, warm.text
        assert warm.json()["results"][0]["result"], "the warm click found no mask"
        assert click_s < 10, f"the warm click took {click_s:.1f} s"
    finally:
        for sock in slow:
            sock.close()
        for future in stalled:
            future.result(timeout=TOTAL_FETCH + 30)
        pool.shutdown()


@pytest.mark.parametrize("kind", ["head", "body"])
def test_a_request_that_does_not_arrive_in_time_is_answered_408_and_closed(server, kind):
    _, port, _ = server
    sock = open_slow(port, SLOW_HEAD if kind == "head" else SLOW_BODY)
    started = time.monotonic()
    stop = threading.Event()

    def trickle():  # one more byte every 0.3 s: the connection is never idle, only slow
        while not stop.wait(0.3):
            try:
                sock.send(b"a")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        data, _ = answer_of(sock, READ_TIMEOUT + MARGIN + 5)
    finally:
        stop.set()
        sock.close()
    seconds = time.monotonic() - started
    print(f"\nslow {kind}: cut after {seconds:.1f} s: {data[:60]!r}")
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"].startswith("Request Timeout")
    assert READ_TIMEOUT - 0.5 <= seconds <= READ_TIMEOUT + MARGIN, f"cut after {seconds:.1f} s"


def test_a_connection_that_sends_nothing_is_closed_at_the_read_deadline(server):
    _, port, _ = server
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        data, seconds = answer_of(sock, READ_TIMEOUT + MARGIN + 5)
    finally:
        sock.close()
    assert data == b"" and seconds <= READ_TIMEOUT + MARGIN, (data, seconds)


def test_a_stalled_image_host_gives_a_504_json_within_the_fetch_deadline(server, stalling_host):
    url, _, _ = server
    started = time.monotonic()
    response = requests.post(url + "/predict", json=click(f"http://127.0.0.1:{stalling_host.port}/x.jpg", 200),
                             timeout=60)
    seconds = time.monotonic() - started
    print(f"\nstalled image host: {response.status_code} after {seconds:.1f} s: {response.text[:120]}")
    assert response.status_code == 504, response.text
    assert "timed out" in response.json()["error"]
    assert seconds <= TOTAL_FETCH + MARGIN, f"answered after {seconds:.1f} s"


def test_the_server_still_serves_normally_after_all_this(server):
    url, _, log = server
    session = requests.Session()  # keep-alive: several requests on one connection
    for task_id in (300, 301):
        response = session.post(url + "/predict", json=click(IMAGE, task_id, x=45.0), timeout=30)
        assert response.status_code == 200, response.text
    assert session.get(url + "/health", timeout=10).status_code == 200
    assert "Traceback" not in log.read_text()
