#!/usr/bin/env python
"""Slow clients and stalled image hosts against the backend as `make run` serves it (issue #11, item 1).

    .venv/bin/python -m tools.slow_clients                          # 16 + 16 slow clients, 8 stalled fetches
    .venv/bin/python -m tools.slow_clients --slow-headers 4 --slow-bodies 4 --stalled 8 --window 10
    .venv/bin/python -m tools.slow_clients --env THREADS=64         # the server with other settings
    .venv/bin/python -m tools.slow_clients --front nginx            # through a buffering nginx (if installed)

A benchmark that prints numbers, not a test. Everything runs on loopback and ends within --max-seconds:

1. Starts the backend as `make run` does (`gunicorn -c gunicorn.conf.py --bind 127.0.0.1:<port> _wsgi:app`,
   the defaults of gunicorn.conf.py and settings.py, MobileSAM on torch) against a loopback stand-in Label
   Studio that serves one photo composite (tools/harness/scenes.py) to `Authorization: Token <token>`, and a
   stalling image host: a TCP listener that accepts connections and never answers. The backend gets
   ALLOW_PRIVATE_IMAGE_HOSTS=true, else it would refuse the loopback image host up front.
2. Idle: one cold click computes the image's embedding; then /health and warm clicks (a /predict on the cached
   image, the click moved a little, a new task each time; bodies as Label Studio 1.23 sends them,
   tools/harness/recordings) are timed one after the other, each on a new connection as Label Studio makes
   them.
3. Load: --slow-headers clients send a request head at --rate bytes/s (it never ends: a header value keeps
   growing), --slow-bodies clients send a whole head at once and then the body of a POST /predict at --rate
   bytes/s; a client the server cuts (closes, or answers) is replaced at once, so that many stay in flight.
   --stalled clients post /predict calls whose image lives on the stalling host, one after the other. After
   --ramp seconds, /health and warm clicks are timed again for --window seconds (two probe threads, each request
   cut at --probe-timeout), then the bench waits up to --wait seconds for the first stalled predicts to answer.
4. Prints /health and warm-click latency idle vs under load (p50, p95, max), how many slow clients the server
   cut and after how long (and with which status line), and how the stalled predicts ended; writes the raw
   samples to artifacts/slow_clients.json (--json).

The machine may be shared: the load average is printed with the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.bench.over_http import TaskIds, click_body
from tools.bench.plan import CONTROLLED, ROOT, TOKEN, ImageSet
from tools.bench.report import load, summary
from tools.harness.processes import GunicornBackend, free_port
from tools.harness.stub_label_studio import FakeLabelStudio

DEFAULT_JSON = ROOT / "artifacts" / "slow_clients.json"
SIZE = "640x480"
#: the stand-in's and the bench's own variables; the caller's values of these never reach the server
SERVER_ENV = {"RUN_ONNX_SAM": "false", "DEVICE": "cpu", "ALLOW_PRIVATE_IMAGE_HOSTS": "true", "WORKERS": "1"}


# ---- the stalling image host ------------------------------------------------------------------------------------------
class StallingHost:
    """Accepts TCP connections on loopback and never answers; `close()` drops them all."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._open = True
        threading.Thread(target=self._accept, daemon=True, name="stalling-host").start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.jpg"

    def _accept(self) -> None:
        while self._open:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(connection)

    def close(self) -> None:
        self._open = False
        for connection in [self.listener, *self._held]:
            try:
                connection.close()
            except OSError:
                pass


# ---- slow clients -----------------------------------------------------------------------------------------------------
@dataclass
class _Slow:
    kind: str  # "header" or "body"
    sock: socket.socket
    opened: float
    pending: bytes  # what is still to be sent, one byte per tick
    answer: bytes = b""


@dataclass
class Cut:
    kind: str
    seconds: float  # from connect to the server's answer or close
    status: str  # the answer's status line, or "closed" (no answer)


class SlowClients:
    """`headers` + `bodies` connections that trickle their request at `rate` bytes/s; replaced when cut."""

    def __init__(self, port: int, headers: int, bodies: int, rate: float) -> None:
        self.port = port
        self.counts = {"header": headers, "body": bodies}
        self.interval = 1.0 / rate
        self.cuts: list[Cut] = []
        self.opened = 0
        self.open_failures = 0
        self._clients: list[_Slow] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="slow-clients")

    def start(self) -> None:
        for kind, count in self.counts.items():
            for _ in range(count):
                self._open(kind)
        self._thread.start()

    def _open(self, kind: str) -> None:
        head_only = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-header\r\nX-Slow: "
                     + b"a" * 100_000)  # never ends within a run
        body = b'{"tasks": [{"id": 1, "data": {"image": "/data/upload/1/x.jpg"}}], "padding": "' + b"b" * 100_000
        head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-body\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (len(body) + 2))
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if kind == "body":
                sock.sendall(head)
            sock.setblocking(False)
        except OSError:
            self.open_failures += 1
            return
        self.opened += 1
        self._clients.append(_Slow(kind, sock, time.monotonic(), head_only if kind == "header" else body))

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            with selectors.DefaultSelector() as selector:
                for client in self._clients:
                    selector.register(client.sock, selectors.EVENT_READ, client)
                events = selector.select(timeout=max(0.0, next_tick - time.monotonic())) if self._clients \
                    else time.sleep(max(0.0, next_tick - time.monotonic())) or []
            for key, _ in events:
                self._read(key.data)
            if time.monotonic() >= next_tick:
                next_tick += self.interval
                for client in list(self._clients):
                    if client in self._clients and client.pending:
                        try:
                            sent = client.sock.send(client.pending[:1])
                            client.pending = client.pending[sent:]
                        except BlockingIOError:
                            pass
                        except OSError:
                            self._cut(client)

    def _read(self, client: _Slow) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            client.answer += data
            if b"\r\n" not in client.answer:
                return
        self._cut(client)

    def _cut(self, client: _Slow) -> None:
        if client not in self._clients:
            return
        self._clients.remove(client)
        status = client.answer.split(b"\r\n", 1)[0].decode("latin-1") if client.answer else "closed"
        self.cuts.append(Cut(client.kind, round(time.monotonic() - client.opened, 2), status))
        client.sock.close()
        if not self._stop.is_set():
            self._open(client.kind)

    def in_flight(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for client in self._clients:
            client.sock.close()
        self._clients.clear()


# ---- stalled predicts -------------------------------------------------------------------------------------------------
class StalledPredicts:
    """`count` threads, each posting /predict calls on an image of the stalling host, one after the other."""

    def __init__(self, url: str, host: StallingHost, count: int, timeout: float) -> None:
        self.url = url
        self.host = host
        self.count = count
        self.timeout = timeout
        self.started = 0
        self.answers: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True, name=f"stalled-{index}")
                         for index in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        import requests

        ids = TaskIds(900_000 + 10_000 * index)
        round_ = 0
        while not self._stop.is_set():
            task_id = ids()
            body = stalled_body(self.host.url(f"stall-{index}-{round_}"), task_id)
            round_ += 1
            with self._lock:
                self.started += 1
            began = time.monotonic()
            try:
                response = requests.post(self.url + "/predict", json=body, timeout=self.timeout)
                status, text = response.status_code, response.text[:200]
            except requests.RequestException as error:
                status, text = None, type(error).__name__
            with self._lock:
                self.answers.append({"seconds": round(time.monotonic() - began, 2), "status": status,
                                     "text": text, "started_at": began})

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def stalled_body(url: str, task_id: int) -> dict:
    """A one-click /predict whose task image is `url` (absolute, outside Label Studio), 640 x 480."""
    from tools.bench import BenchImage

    image = BenchImage(path=url, data=b"", height=480, width=640, click=(50.0, 50.0))
    return click_body(image, 50.0, 50.0, task_id)


# ---- probes -------------------------------------------------------------------------------------------------------------
class Probe:
    """Times one kind of request on new connections; a request that does not answer within `timeout` counts
    as `timeout` seconds and is listed in `failures`."""

    def __init__(self, name: str, send, timeout: float) -> None:
        self.name = name
        self.send = send  # callable(timeout) -> status code
        self.timeout = timeout
        self.samples_ms: list[float] = []
        self.failures: list[str] = []

    def once(self) -> None:
        import requests

        started = time.perf_counter()
        try:
            status = self.send(self.timeout)
            if status != 200:
                self.failures.append(f"HTTP {status}")
        except requests.RequestException as error:
            self.failures.append(type(error).__name__)
        self.samples_ms.append((time.perf_counter() - started) * 1000.0)

    def loop(self, until: float, pause: float) -> None:
        while time.monotonic() < until:
            self.once()
            time.sleep(pause)


@dataclass
class Plan:
    slow_headers: int = 16
    slow_bodies: int = 16
    stalled: int = 8
    rate: float = 1.0
    idle_samples: int = 15
    ramp: float = 3.0
    window: float = 20.0
    wait: float = 45.0
    probe_timeout: float = 20.0
    pause: float = 0.25
    max_seconds: float = 240.0
    extra_env: dict[str, str] = field(default_factory=dict)


# ---- a buffering front server (optional) ----------------------------------------------------------------------------------
NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_header_timeout 10s;
  client_body_timeout 10s;
  client_max_body_size 16m;
  keepalive_timeout 5s;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


class NginxFront:
    """nginx (from PATH or $NGINX) on loopback in front of `backend_port`, buffering requests as its docs say."""

    def __init__(self, backend_port: int) -> None:
        binary = os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).is_file():
            raise SystemExit("--front nginx: no nginx binary (set NGINX=/path/to/nginx)")
        self.dir = Path(tempfile.mkdtemp(prefix="slow-clients-nginx-"))
        self.port = free_port()
        (self.dir / "nginx.conf").write_text(NGINX_CONF.format(dir=self.dir, backend=backend_port, port=self.port))
        self.process = subprocess.Popen([binary, "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c",
                                         str(self.dir / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise SystemExit(f"nginx did not start; see {self.dir}/error.log")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---- the run ---------------------------------------------------------------------------------------------------------------
def server_env(label_studio: FakeLabelStudio, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED and k not in SERVER_ENV
           and k not in ("THREADS", "IMAGE_TIMEOUT", "TIMEOUT")}
    env.update(SERVER_ENV, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=TOKEN)
    env.update(extra)
    return env


def run(plan: Plan, front: str | None, say) -> dict[str, Any]:
    import requests

    began = time.monotonic()
    label_studio = FakeLabelStudio()
    image = ImageSet(label_studio).get(SIZE, 0)
    stall = StallingHost()
    env = server_env(label_studio, plan.extra_env)
    log_dir = DEFAULT_JSON.parent
    server = GunicornBackend(log_dir / "slow-clients-server.log", append=False)
    nginx: NginxFront | None = None
    slow: SlowClients | None = None
    stalled: StalledPredicts | None = None
    out: dict[str, Any] = {"plan": plan.__dict__, "front": front, "loadavg_before": load(),
                           "server_env": {k: env[k] for k in sorted(set(plan.extra_env) | set(SERVER_ENV))}}
    try:
        server.start(env, interval=0.2, single_worker=True)
        out["startup_s"] = round(server.startup_s, 2)
        url = server.url
        if front == "nginx":
            nginx = NginxFront(server.port)
            url = f"http://127.0.0.1:{nginx.port}"
        port = int(url.rsplit(":", 1)[1])
        say(f"server up in {out['startup_s']} s at {url}")
        ids = TaskIds()
        clicks = iter(image.clicks(10_000, seed=11))

        def health(timeout: float) -> int:
            return requests.get(url + "/health", timeout=timeout).status_code

        def warm_click(timeout: float) -> int:
            x, y = next(clicks)
            return requests.post(url + "/predict", json=click_body(image, x, y, ids()), timeout=timeout).status_code

        cold = Probe("cold", warm_click, 120)
        cold.once()
        out["cold_click_ms"] = round(cold.samples_ms[0], 1)
        if cold.failures:
            raise RuntimeError(f"the first click failed: {cold.failures}")
        warm = Probe("warm", warm_click, plan.probe_timeout)
        for _ in range(3):
            warm.once()  # decoder warm-up
        idle = {"health": Probe("health", health, plan.probe_timeout), "click": Probe("click", warm_click,
                                                                                         plan.probe_timeout)}
        for _ in range(plan.idle_samples):
            for probe in idle.values():
                probe.once()
                time.sleep(0.05)
        say(f"idle: /health p50 {summary(idle['health'].samples_ms)['p50']} ms, warm click p50 "
            f"{summary(idle['click'].samples_ms)['p50']} ms")

        slow = SlowClients(port, plan.slow_headers, plan.slow_bodies, plan.rate)
        stalled = StalledPredicts(url, stall, plan.stalled, timeout=plan.max_seconds)
        load_started = time.monotonic()
        slow.start()
        stalled.start()
        time.sleep(plan.ramp)
        loaded = {"health": Probe("health", health, plan.probe_timeout), "click": Probe("click", warm_click,
                                                                                           plan.probe_timeout)}
        until = time.monotonic() + plan.window
        threads = [threading.Thread(target=probe.loop, args=(until, plan.pause), daemon=True)
                   for probe in loaded.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(plan.window + plan.probe_timeout + 5)
        out["slow_in_flight_at_end_of_window"] = slow.in_flight()
        say(f"load: /health p50 {summary(loaded['health'].samples_ms)['p50']} ms, warm click p50 "
            f"{summary(loaded['click'].samples_ms)['p50']} ms; {len(slow.cuts)} slow clients cut so far")
        stalled.stop()
        budget = max(0.0, min(plan.wait, plan.max_seconds - (time.monotonic() - began)))
        stalled.join(budget)
        out["load_seconds"] = round(time.monotonic() - load_started, 1)
        slow.close()
        out["slow_clients"] = {"opened": slow.opened, "open_failures": slow.open_failures,
                               "cuts": [c.__dict__ for c in slow.cuts]}
        out["stalled"] = {"started": stalled.started, "answers": stalled.answers,
                          "image_host_connections": stall.accepted}
        for name, probes in (("idle", idle), ("load", loaded)):
            out[name] = {key: {**summary(probe.samples_ms), "failures": probe.failures}
                         for key, probe in probes.items()}
        out["warmup_click_ms"] = [round(v, 1) for v in warm.samples_ms]
    finally:
        if slow is not None:
            slow.close()
        if stalled is not None:
            stalled.stop()
        stall.close()  # the stalled fetches fail at once, so the server stops quickly
        if nginx is not None:
            nginx.close()
        server.stop()
        label_studio.close()
    out["loadavg_after"] = load()
    out["duration_s"] = round(time.monotonic() - began, 1)
    out["server_log_tail"] = server.log_tail(15)
    return out


def _ms(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "-" if value is None else (f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms")


def report(out: dict[str, Any]) -> str:
    plan = out["plan"]
    lines = [f"backend: gunicorn -c gunicorn.conf.py _wsgi:app, MobileSAM on torch (CPU), {SIZE} image"
             + (f", behind {out['front']}" if out["front"] else "")
             + (f", env {out['server_env']}" if out["server_env"] else ""),
             (f"load: {plan['slow_headers']} slow-header + {plan['slow_bodies']} slow-body clients at "
              f"{plan['rate']:g} byte/s, {plan['stalled']} predicts on a stalled image host; load average "
              f"{out['loadavg_before']} -> {out['loadavg_after']}"),
             "",
             f"{'':<14}{'idle p50':>10}{'p95':>9}{'max':>9}   {'load p50':>10}{'p95':>9}{'max':>9}  failures"]
    for key, name in (("health", "/health"), ("click", "warm click")):
        idle, loaded = out["idle"][key], out["load"][key]
        failures = loaded["failures"]
        shown = f"{len(failures)} ({', '.join(sorted(set(failures)))})" if failures else "0"
        lines.append(f"{name:<14}{_ms(idle, 'p50'):>10}{_ms(idle, 'p95'):>9}{_ms(idle, 'max'):>9}   "
                     f"{_ms(loaded, 'p50'):>10}{_ms(loaded, 'p95'):>9}{_ms(loaded, 'max'):>9}  {shown}"
                     f"  (n={idle['n']}/{loaded['n']})")
    ratio = (out["load"]["click"]["p50"] or 0) / (out["idle"]["click"]["p50"] or 1)
    lines.append(f"warm click under load / idle (p50): {ratio:.2f}x")
    cuts = out["slow_clients"]["cuts"]
    for kind in ("header", "body"):
        mine = [c for c in cuts if c["kind"] == kind]
        statuses: dict[str, int] = {}
        for c in mine:
            statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        seconds = sorted(c["seconds"] for c in mine)
        when = f", after {seconds[0]:.1f}-{seconds[-1]:.1f} s" if seconds else ""
        lines.append(f"slow-{kind} clients cut by the server: {len(mine)} in {out['load_seconds']} s{when} "
                     f"{statuses or ''}")
    answers = out["stalled"]["answers"]
    statuses = {}
    for a in answers:
        statuses[str(a["status"])] = statuses.get(str(a["status"]), 0) + 1
    seconds = sorted(a["seconds"] for a in answers)
    lines.append(f"stalled predicts: {out['stalled']['started']} sent, {len(answers)} answered {statuses}"
                 + (f" after {seconds[0]:.1f}-{seconds[-1]:.1f} s" if seconds else "")
                 + (f"; e.g. {answers[0]['text'][:120]!r}" if answers else ""))
    lines.append(f"cold click {out['cold_click_ms']:.0f} ms; run took {out['duration_s']} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Plan()
    parser.add_argument("--slow-headers", type=int, default=defaults.slow_headers)
    parser.add_argument("--slow-bodies", type=int, default=defaults.slow_bodies)
    parser.add_argument("--stalled", type=int, default=defaults.stalled, help="predicts on the stalling host")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="bytes per second of a slow client")
    parser.add_argument("--idle-samples", type=int, default=defaults.idle_samples)
    parser.add_argument("--ramp", type=float, default=defaults.ramp, help="seconds of load before probing")
    parser.add_argument("--window", type=float, default=defaults.window, help="seconds of probing under load")
    parser.add_argument("--wait", type=float, default=defaults.wait,
                        help="seconds to wait after the window for the stalled predicts to answer")
    parser.add_argument("--probe-timeout", type=float, default=defaults.probe_timeout)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="server environment on top of the defaults (repeatable)")
    parser.add_argument("--front", choices=["nginx"], default=None, help="serve through a buffering front server")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    extra = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env {item!r} is not KEY=VALUE")
        extra[key] = value
    plan = Plan(args.slow_headers, args.slow_bodies, args.stalled, args.rate, args.idle_samples, args.ramp,
                args.window, args.wait, args.probe_timeout, pause=defaults.pause, max_seconds=args.max_seconds,
                extra_env=extra)
    return plan, args


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say(f"load average {load()} on {os.cpu_count()} CPUs")
    out = run(plan, args.front, say)
    table = report(out)
    out["table"] = table
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1, default=str))
    print(table)
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
