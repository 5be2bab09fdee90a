"""Gunicorn settings for `gunicorn -c gunicorn.conf.py _wsgi:app`, read from the environment.

    PORT     port to listen on, on all interfaces (default 9090)
    WORKERS  worker processes (default 1). Each worker loads its own copy of the model, so memory grows
             with WORKERS; one worker with several threads is the right shape for one CPU or one GPU.
    THREADS  threads per worker for requests with a body, i.e. /predict and /setup (default 32). A thread is
             held while the app runs a request, including while it waits for an image host (up to 3 x
             IMAGE_TIMEOUT): threads are for those waits. The model work they start stays bounded on its own
             (MAX_CONCURRENT_EMBEDDINGS encoder runs at once); torch and onnxruntime release the GIL.
    TIMEOUT  seconds a worker may stay silent before it is restarted (default 120). It also bounds the model
             load at worker start and the slowest request: a first ViT-H embedding on a CPU takes tens of
             seconds.
    REQUEST_READ_TIMEOUT  seconds a request may take to arrive in full, head and body (default 10); past it
             the worker answers 408 and closes the connection. Also the socket timeout of writing an answer.
    LOG_LEVEL  also the backend's own level (settings.py); gunicorn takes it lower-cased.
    STATE_STORE  where the workers keep shared state (settings.py); with WORKERS > 1 and none set, a disk store
             all workers share. STATE_STORE_SECRET defaults to a random one per server start (`on_starting`).

The worker class is `sam_backend.worker.BufferingWorker`: gthread, except that the event loop reads each request
in full (with the deadline above) before a thread sees it, so slow clients hold no thread, and requests without a
body (/health) have 2 threads of their own (see that module). The access log goes to stdout (`docker compose
logs sam` shows it). Each worker limits glibc to 2 malloc arenas (`post_fork`) unless MALLOC_ARENA_MAX is set.
Gunicorn applies GUNICORN_CMD_ARGS and command-line options after this file, so they override it.

Run as a script (`python gunicorn.conf.py`) this file is the container health check: it asks
http://127.0.0.1:$PORT/health, with HTTP Basic credentials when BASIC_AUTH_USER/BASIC_AUTH_PASS are set (the
backend then guards every route), and exits 0 on HTTP 200, 1 otherwise. Keeping it here keeps the port in one
place.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys


def _int_from_env(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={raw} must be a positive number of seconds")
    return value


port = _int_from_env("PORT", 9090, 1)
if port > 65535:
    raise ValueError(f"PORT={port} is not a TCP port")

bind = f"0.0.0.0:{port}"
workers = _int_from_env("WORKERS", 1, 1)
threads = _int_from_env("THREADS", 32, 1)
timeout = _int_from_env("TIMEOUT", 120, 0)  # 0 disables the worker timeout
request_read_timeout = _seconds_from_env("REQUEST_READ_TIMEOUT", 10.0)

accesslog = "-"  # stdout
errorlog = "-"  # stderr
loglevel = os.environ.get("LOG_LEVEL", "info").strip().lower() or "info"

# The worker heartbeat file: on tmpfs where there is one (Docker mounts /dev/shm), so a slow disk or a
# read-only image layer never stalls it.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _worker_class():
    """BufferingWorker with this file's settings; imported only when gunicorn loads the file, not for the health
    check. The file's folder goes on sys.path, as gunicorn may run from anywhere with `-c path/gunicorn.conf.py`."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from sam_backend.settings import Settings
    from sam_backend.worker import BufferingWorker

    # Bodies up to the app's limit are buffered; a larger one goes to the app unread, which answers 413.
    max_body = _int_from_env("MAX_CONTENT_LENGTH", Settings.max_content_length, 0)
    return BufferingWorker.configured(read_timeout=request_read_timeout, max_body=max_body)


if __name__ != "__main__":
    worker_class = _worker_class()


def on_starting(server) -> None:
    """In the master, before any worker forks: tell the app how many workers there are (WORKERS picks the default
    state store: more than one share a disk store; a --workers option given after this file counts too), and give
    the workers of this server one random STATE_STORE_SECRET when none is set, to seal /setup's Label Studio token
    in the shared store (sam_backend/store/sealing.py). Nothing sealed with it outlives the server."""
    import secrets

    os.environ["WORKERS"] = str(server.cfg.workers)
    if not os.environ.get("STATE_STORE_SECRET"):
        os.environ["STATE_STORE_SECRET"] = secrets.token_urlsafe(32)


def post_fork(server, worker) -> None:
    """Limit the worker to 2 glibc malloc arenas before its request threads start.

    glibc gives threads their own arenas (up to 8 per core), and memory freed in one stays mapped there: with 8
    threads decoding images and masks, make bench measured the ONNX worker at 781 MiB with 32 cached images,
    712 MiB with 2 arenas, at the same click latency. MALLOC_ARENA_MAX set by the user wins (glibc reads it at
    start); off glibc (musl, macOS) there is nothing to tune.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-8, 2)  # M_ARENA_MAX from malloc.h


def _health_check() -> int:
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:
        print(f"health check failed: {error}")
        return 1


if __name__ == "__main__":
    raise SystemExit(_health_check())
