#!/usr/bin/env python
"""Parse time of large labeling configs (issue #11, item 2), in the shapes projects have.

    .venv/bin/python -m tools.bench_config                    # 1k / 5k / 10k labels, both conventions
    .venv/bin/python -m tools.bench_config --labels 2000 --sdk  # also time label_studio_sdk's LabelInterface
    .venv/bin/python -m tools.bench_config --labels 5000 --profile native   # cProfile one parse
    .venv/bin/python -m tools.bench_config --http --labels 5000   # /setup over HTTP, /health during 8 at once

Shapes (see sam_backend/labelstudio/label_config.py):

* native: BrushLabels, KeyPointLabels and RectangleLabels sharing N label values;
* alias: BrushLabels `N` (alias `N_brush`), KeyPointLabels `(+N)`/`(-N)` (aliases `N`/`-N`), RectangleLabels
  `[N]` (alias `N`).

--http serves the app in-process (werkzeug, threaded, as the service tests do; the predictor is a stub, since
/setup never runs the model), times one /setup of a new config, then polls /health every 50 ms while 8 /setup
calls with 8 different configs run at once.

Every parse is of a fresh string (the parse cache is cleared), so the numbers are of parsing, not of the cache.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def native_config(count: int) -> str:
    """Three tags sharing `count` label values (the README's native convention)."""
    labels = "".join(f'<Label value="Class {i}" background="#FF0000"/>' for i in range(count))
    smart = "".join(f'<Label value="Class {i}" smart="true"/>' for i in range(count))
    return ('<View><Image name="image" value="$image" zoom="true"/>'
            f'<BrushLabels name="tag" toName="image">{labels}</BrushLabels>'
            f'<KeyPointLabels name="tag2" toName="image" smart="true">{smart}</KeyPointLabels>'
            f'<RectangleLabels name="tag3" toName="image" smart="true">{smart}</RectangleLabels></View>')


def alias_config(count: int) -> str:
    """`count` classes in the seed's alias convention (keypoints: two labels per class)."""
    brush = "".join(f'<Label value="{i}" background="blue" alias="{i}_brush"/>' for i in range(1, count + 1))
    points = "".join(f'<Label value="(+{i})" alias="{i}"/><Label value="(-{i})" alias="-{i}"/>'
                     for i in range(1, count + 1))
    boxes = "".join(f'<Label value="[{i}]" alias="{i}"/>' for i in range(1, count + 1))
    return ('<View><Image name="image" value="$image" zoom="true"/>'
            f'<BrushLabels name="brush" toName="image">{brush}</BrushLabels>'
            f'<KeyPointLabels name="tag2" toName="image">{points}</KeyPointLabels>'
            f'<RectangleLabels name="tag4" toName="image">{boxes}</RectangleLabels></View>')


SHAPES = {"native": native_config, "alias": alias_config}


def time_parse(xml: str, repeat: int = 1) -> float:
    """Best of `repeat` uncached parses, in seconds."""
    from sam_backend.labelstudio import label_config

    best = float("inf")
    for _ in range(repeat):
        _clear_cache(label_config)
        started = time.perf_counter()
        label_config.parse(xml)
        best = min(best, time.perf_counter() - started)
    _clear_cache(label_config)
    return best


def time_sdk(xml: str) -> float:
    from label_studio_sdk.label_interface import LabelInterface

    started = time.perf_counter()
    LabelInterface(xml)
    return time.perf_counter() - started


class _StubPredictor:
    model_version = "bench-config-stub"


def http_bench(count: int, shape: str, concurrent: int = 8) -> None:
    import json
    import statistics
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from werkzeug.serving import make_server

    from model import SamModel
    from sam_backend.http import create_app
    from sam_backend.settings import Settings

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per call
    settings = Settings(device="cpu")
    server = make_server("127.0.0.1", 0, create_app(SamModel(_StubPredictor(), settings), settings), threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def setup(tag: str) -> tuple[float, int]:
        xml = SHAPES[shape](count).replace('name="image"', f'name="image{tag}"').replace(
            'toName="image"', f'toName="image{tag}"')  # a config of its own: no cache hit
        started = time.perf_counter()
        answer = requests.post(url + "/setup", data=json.dumps({"project": "1", "schema": xml}),
                               headers={"Content-Type": "application/json"}, timeout=900)
        return time.perf_counter() - started, answer.status_code

    try:
        seconds, status = setup("single")
        print(f"/setup, {shape} {count} labels ({len(SHAPES[shape](count)) / 1024:.0f} KiB): {seconds:.3f} s "
              f"(HTTP {status})", flush=True)
        latencies: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                started = time.perf_counter()
                requests.get(url + "/health", timeout=900).raise_for_status()
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            results = list(pool.map(setup, [f"c{i}" for i in range(concurrent)]))
        wall = time.perf_counter() - started
        done.set()
        poller.join()
        print(f"{concurrent} concurrent /setup: {wall:.2f} s wall, each {min(r[0] for r in results):.2f}-"
              f"{max(r[0] for r in results):.2f} s, statuses {sorted({r[1] for r in results})}")
        print(f"/health during them: {len(latencies)} calls, median {statistics.median(latencies) * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms")
    finally:
        server.shutdown()


def _clear_cache(module) -> None:
    clear = getattr(module, "clear_cache", None) or getattr(module.parse, "cache_clear", None)
    if clear is not None:
        clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sdk", action="store_true", help="also time label_studio_sdk's LabelInterface alone")
    parser.add_argument("--http", action="store_true", help="time /setup and /health over HTTP instead")
    parser.add_argument("--profile", choices=list(SHAPES), help="cProfile one parse of this shape instead")
    args = parser.parse_args(argv)

    if args.http:
        for shape in args.shapes:
            for count in args.labels:
                http_bench(count, shape)
        return 0

    if args.profile:
        from sam_backend.labelstudio import label_config

        xml = SHAPES[args.profile](args.labels[0])
        _clear_cache(label_config)
        profile = cProfile.Profile()
        profile.runcall(label_config.parse, xml)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
        return 0

    print(f"{'shape':8} {'labels':>7} {'KiB':>7} {'parse s':>9}" + (f" {'SDK s':>9}" if args.sdk else ""))
    for shape in args.shapes:
        for count in args.labels:
            xml = SHAPES[shape](count)
            line = f"{shape:8} {count:>7} {len(xml.encode()) / 1024:>7.0f} {time_parse(xml, args.repeat):>9.4f}"
            if args.sdk:
                line += f" {time_sdk(xml):>9.4f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
