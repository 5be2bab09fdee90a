"""The HTTP measurements of one mode against the server under test (harness.GunicornBackend): the cold
first click, warm clicks, the click on a task opened earlier (prewarm), the cache fill with its RSS, and
concurrent users; with the bodies Label Studio 1.23 sends and a keep-alive client."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tools.bench.local import LocalPredictor
from tools.bench.plan import SIZES, BenchImage, ImageSet, Plan, hash_seed, main_size
from tools.bench.report import cpu_pressure, load, summary
from tools.harness.processes import GunicornBackend
from tools.harness.recordings import recorded
from tools.harness.stub_label_studio import FakeLabelStudio


# ---- request bodies, as Label Studio 1.23 sends them ------------------------------------------------------------------
def click_body(image: BenchImage, x: float, y: float, task_id: int) -> dict:
    """One positive keypoint at (x, y) percent: the first click on an object."""
    body = recorded("keypoints_positive_and_negative")
    task = body["tasks"][0]
    task["id"] = task_id
    task["data"]["image"] = image.path
    region = body["params"]["context"]["result"][0]
    region.update(original_width=image.width, original_height=image.height, id=f"b{task_id:09d}", is_positive=True)
    region["value"].update(x=x, y=y)
    body["params"]["context"]["result"] = [region]
    return body


def open_body(image: BenchImage, task_id: int) -> dict:
    """What Label Studio sends when a task is opened: no context (the backend prewarms the image's embedding)."""
    body = recorded("open_task")
    body["tasks"][0]["id"] = task_id
    body["tasks"][0]["data"]["image"] = image.path
    return body


# ---- a user of the server under test ---------------------------------------------------------------------------------------
class Client:
    """One user: a keep-alive HTTP session to the backend."""

    #: connection errors retried on a new connection, by every client (see `predict`)
    retries = 0

    def __init__(self, url: str) -> None:
        import requests

        self.url = url
        self.session = requests.Session()

    def predict(self, body: dict) -> tuple[float, dict]:
        """(milliseconds, answer) of one /predict; the body is serialised before the clock starts.

        gunicorn closes a keep-alive connection idle for 2 s at its next loop turn (about once a second), so a
        request sent on it just then is reset; it is sent again on a new connection and counted in
        `Client.retries` (the time is that of the second attempt).
        """
        import requests

        data = json.dumps(body).encode()
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                response = self.session.post(self.url + "/predict", data=data, timeout=600,
                                             headers={"Content-Type": "application/json"})
            except requests.ConnectionError:
                if attempt == 2:
                    raise
                Client.retries += 1
                self.fresh()
                continue
            break
        elapsed = (time.perf_counter() - started) * 1000.0
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:500]}")
        return elapsed, response.json()

    def fresh(self) -> None:
        """Drop the kept-alive connection: the next request opens a new one."""
        import requests

        self.session.close()
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()


def mask_of(answer: dict) -> tuple | None:
    """(width, height, sha256 of the RLE) of the answer's one region, None when there is none."""
    regions = answer["results"][0]["result"]
    if not regions:
        return None
    region = regions[0]
    digest = hashlib.sha256(bytes(region["value"]["rle"])).hexdigest()
    return region["original_width"], region["original_height"], digest


# ---- over HTTP --------------------------------------------------------------------------------------------------------------
class TaskIds:
    def __init__(self, start: int = 1000) -> None:
        self._next = start
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def http_run(mode: str, env: dict[str, str], plan: Plan, images: ImageSet, sizes: list[str],
             label_studio: FakeLabelStudio, local: LocalPredictor, log_dir: Path,
             say: Callable[[str], None], app: str = "_wsgi:app") -> tuple[dict, dict]:
    """The HTTP measurements of one mode; also returns the in-process click parts (ms) per size, each taken
    `plan.pause` seconds after the warm HTTP click of the same prompt."""
    # `gunicorn -c gunicorn.conf.py --bind 127.0.0.1:<port> _wsgi:app` with one worker of 8 threads (see server_env)
    server = GunicornBackend(log_dir / f"bench-server-{mode}.log", app, append=False)
    ids = TaskIds()
    out: dict[str, Any] = {"loadavg_before": load(), "cpu_pressure_avg60_before": cpu_pressure()}
    retries = Client.retries
    used: dict[str, int] = {size: 0 for size in SIZES}  # images of each size this server has seen

    def new_image(size: str) -> BenchImage:
        image = images.get(size, used[size])
        used[size] += 1
        return image

    try:
        server.start(env, interval=0.2, single_worker=True)
        out["startup_s"] = round(server.startup_s, 2)
        time.sleep(1.0)
        out["rss_startup_mb"] = server.memory()
        say(f"  server up in {out['startup_s']} s, worker {server.worker}, RSS {out['rss_startup_mb']}")
        client = Client(server.url)
        cold: dict[str, list[float]] = {}
        warm: dict[str, list[float]] = {}
        downloads: dict[str, float] = {}
        parts: dict[str, list[dict]] = {}
        server_cpu: dict[str, float] = {}
        in_app: dict[str, float] = {}
        for size in sizes:
            image = new_image(size)  # index 0: the image the in-process numbers are taken on
            cold[size] = [client.predict(click_body(image, *image.click, ids()))[0]]
            for _ in range(plan.extra_cold.get(size, 0)):
                extra = new_image(size)
                cold[size].append(client.predict(click_body(extra, *extra.click, ids()))[0])
            before = label_studio.count(image.path)
            warm[size], parts[size] = [], []
            cpu, routes = server.cpu(), server.metrics()["routes"]["/predict"]
            for x, y in image.clicks(plan.warm_repeats, seed=hash_seed(size)):
                warm[size].append(client.predict(click_body(image, x, y, ids()))[0])
                time.sleep(plan.pause)
                parts[size].append(local.click(size, x, y, plan.pause))
                time.sleep(plan.pause)
            server_cpu[size] = round((server.cpu() - cpu) * 1000.0 / plan.warm_repeats, 1)
            after = server.metrics()["routes"]["/predict"]  # the app's own timing, from before_request on
            in_app[size] = round((after["seconds_total"] - routes["seconds_total"]) * 1000.0
                                 / max(1, after["count"] - routes["count"]), 2)
            downloads[size] = (label_studio.count(image.path) - before) / plan.warm_repeats
            say(f"  {size}: cold {summary(cold[size])['p50']} ms, warm p50 {summary(warm[size])['p50']} ms")
        out["cold_ms"] = {size: summary(values) for size, values in cold.items()}
        out["warm_ms"] = {size: summary(values) for size, values in warm.items()}
        out["downloads_per_warm_click"] = downloads
        out["server_cpu_ms_per_warm_click"] = server_cpu
        out["app_ms_per_warm_click"] = in_app  # mean, from the server's /metrics

        main = main_size(sizes)
        prewarmed, opened = [], []
        for _ in range(plan.prewarm_runs):
            image = new_image(main)
            task_id = ids()
            opened.append(client.predict(open_body(image, task_id))[0])
            time.sleep(plan.prewarm_delay)
            client.fresh()  # the server may be closing the idle connection right now; Label Studio would reconnect
            prewarmed.append(client.predict(click_body(image, *image.click, task_id))[0])
        out["prewarm_delay_s"] = plan.prewarm_delay
        out["open_task_ms"] = summary(opened)
        out["prewarmed_first_click_ms"] = summary(prewarmed)
        say(f"  prewarmed first click p50 {out['prewarmed_first_click_ms']['p50']} ms")

        # Fill the cache with new images at the main size: each is a cold click too
        rss_at: dict[str, dict] = {}
        fill: list[BenchImage] = []
        checkpoints = sorted(plan.rss_checkpoints)
        while True:
            items = server.metrics()["embedding_cache"]["items"]
            for checkpoint in [c for c in checkpoints if c <= items and str(c) not in rss_at]:
                rss_at[str(checkpoint)] = {**server.memory(), "cached_images": items}
            if items >= max(checkpoints + [plan.cached_images]) or len(fill) > 2 * plan.cached_images:
                break
            image = new_image(main)
            fill.append(image)
            cold[main].append(client.predict(click_body(image, *image.click, ids()))[0])
        out["cold_ms"][main] = summary(cold[main])
        out["rss_cached_mb"] = rss_at
        out["images_seen"] = {size: count for size, count in used.items() if count}
        say(f"  RSS with cached images: {rss_at}")

        # Concurrent users, each clicking on its own cached image
        users = max(plan.users)
        mine = (fill[-users:] if len(fill) >= users else
                [images.get(main, i) for i in range(users)])
        for image in mine:  # make sure every user's image is cached
            client.predict(click_body(image, *image.click, ids()))
        bodies = [[click_body(image, x, y, ids()) for x, y in image.clicks(plan.clicks_per_user, seed=u)]
                  for u, image in enumerate(mine)]
        misses_before = server.metrics()["embedding_cache"]["misses"]
        alone = [[mask_of(client.predict(body)[1]) for body in user] for user in bodies]
        client.close()
        concurrency: dict[str, Any] = {}
        for count in plan.users:
            latencies: list[float] = []
            mismatches = 0
            barrier = threading.Barrier(count)
            lock = threading.Lock()
            errors: list[BaseException] = []

            def user(index: int) -> None:
                nonlocal mismatches
                own = Client(server.url)
                try:
                    barrier.wait()
                    for body, expected in zip(bodies[index], alone[index]):
                        elapsed, answer = own.predict(body)
                        with lock:
                            latencies.append(elapsed)
                            mismatches += mask_of(answer) != expected
                except BaseException as error:  # reported after the join
                    errors.append(error)
                finally:
                    own.close()

            threads = [threading.Thread(target=user, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            concurrency[str(count)] = {**summary(latencies), "masks_equal_alone": mismatches == 0,
                                       "mismatches": mismatches}
            say(f"  {count} users: p50 {concurrency[str(count)]['p50']} ms, p95 {concurrency[str(count)]['p95']} ms,"
                f" masks equal: {mismatches == 0}")
        out["concurrent_ms"] = concurrency
        out["concurrent_embeddings_computed"] = server.metrics()["embedding_cache"]["misses"] - misses_before
        out["rss_end_mb"] = server.memory()
        metrics = server.metrics()
        out["server_metrics"] = {"embedding_cache": metrics["embedding_cache"],
                                 "predict": metrics["routes"].get("/predict")}
        out["raw_ms"] = {"cold": cold, "warm": warm, "prewarmed": prewarmed}
    finally:
        server.stop()
    out["loadavg_after"] = load()
    out["cpu_pressure_avg60_after"] = cpu_pressure()
    out["connection_retries"] = Client.retries - retries
    clicks = {}
    for size, rows in parts.items():
        clicks[size] = {key: summary([row[key] for row in rows])
                        for key in ("bare", "bare_cpu", "decoder", "upscale", "rle", "json", "bare_fp32_features",
                                    "reference")
                        if all(key in row for row in rows)}
        clicks[size]["answer_bytes"] = rows[0]["answer_bytes"] if rows else None
        # what the server spends beyond the measured parts: HTTP, Flask, body parsing, image download and hash
        clicks[size]["rest"] = summary([w - sum(row[k] for k in ("bare", "rle", "json"))
                                        for w, row in zip(warm[size], rows)])
        clicks[size]["raw_bare"] = [round(row["bare"], 2) for row in rows]
    return out, clicks
