#!/usr/bin/env python
"""Latency, memory and RLE numbers of the backend, measured the way users run it (issues #5 and #2).

    .venv/bin/python -m tools.bench                      # full run (5-10 min on 2 cores): torch, onnx, onnx-int8
    .venv/bin/python -m tools.bench --quick --modes torch --sizes 640x480   # smoke run, about a minute
    .venv/bin/python -m tools.bench --modes onnx --env ORT_NUM_THREADS=1     # the server with other settings
    .venv/bin/python -m tools.bench --modes onnx --app patched:app --env PYTHONPATH=/tmp/exp   # try a fix first

For every mode the server is started as `make run` starts it (`gunicorn -c gunicorn.conf.py --bind
127.0.0.1:<free port> _wsgi:app`, WORKERS=1, THREADS=8) against a loopback image server playing Label Studio
(it serves /data/upload/... only to `Authorization: Token <token>`), and is fed bodies shaped like the ones a real
Label Studio 1.23 sent (tools/harness/bodies/ls_1_23_interactive_bodies.json). Measured, per mode:

* in-process, before the server starts: image download from the loopback Label Studio, sha256 of the bytes,
  image decode, embedding (preprocessing and encoder; after one untimed warm-up run);
* over HTTP: the cold first click on a new image; warm one-click latency (median, p95) at each size with the
  click moved a little each time, the worker's CPU time per warm click (/proc/<worker>/stat) and the app's own
  time per click (the server's /metrics); the first click on a task "opened" (a context-less /predict) N
  seconds earlier; warm clicks of 1, 4 and 8 concurrent users on different images (every mask compared with
  the mask the same request gets alone); the worker's RSS (/proc/<worker>/status VmRSS) after start-up and
  with N cached images;
* in-process, between two warm HTTP clicks (the server idle), for the same prompt: the bare
  `predictor.decode` and its parts (decoder, mask upscaling), `rle.encode` and the JSON encoding of the
  answer, on the embedding in the form the server caches (float16 by default);
* once: `rle.encode` against `label_studio_sdk.converter.brush.mask2rle` on real SAM masks.

Prints a table with the targets of issue #5 next to the numbers and writes everything, raw samples included, to
artifacts/bench.json (--json), the server logs next to it. The machine is shared in CI and on laptops: the load
average and Linux's CPU pressure are recorded before and after each mode; numbers taken under load are noisy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.local import LocalPredictor, rle_comparison
from tools.bench.over_http import http_run
from tools.bench.plan import (DEFAULT_JSON, MODES, QUICK, SIZES, TOKEN, ImageSet, Plan, main_size, missing_models,
                              server_env)
from tools.bench.report import cpu_pressure, evaluate, load, machine_info, report
from tools.harness.stub_label_studio import FakeLabelStudio


# ---- main -------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few repeats of everything (smoke test)")
    parser.add_argument("--modes", default="torch,onnx,onnx-int8",
                        help="comma list of torch, onnx, onnx-int8 (default: %(default)s)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma list of %(default)s")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results (%(default)s)")
    parser.add_argument("--repeats", type=int, help="warm clicks per size (default 30, --quick 3)")
    parser.add_argument("--prewarm-delay", type=float, help="seconds between opening a task and clicking (3)")
    parser.add_argument("--cached", type=int, help="images to fill the cache with (default 32, --quick 4)")
    parser.add_argument("--users", help="comma list of concurrent user counts (default 1,4,8; --quick 1,2)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server setting, e.g. ORT_NUM_THREADS=1 (repeatable)")
    parser.add_argument("--app", default="_wsgi:app",
                        help="the WSGI app gunicorn serves (default %(default)s); another module that patches the "
                             "serving code before importing _wsgi tries a fix without editing it (with --env "
                             "PYTHONPATH=<its directory>); the in-process numbers stay those of the unpatched code")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for size in args.sizes:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if not args.modes or not args.sizes:
        parser.error("give at least one mode and one size")
    extra = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r} is not KEY=VALUE")
        extra[key] = value
    args.extra_env = extra
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.repeats is not None:
        changes["warm_repeats"] = max(1, args.repeats)
    if args.prewarm_delay is not None:
        changes["prewarm_delay"] = args.prewarm_delay
    if args.cached is not None:
        changes["cached_images"] = max(1, args.cached)
        changes["rss_checkpoints"] = tuple(sorted({c for c in plan.rss_checkpoints if c < args.cached}
                                                  | {max(1, args.cached)}))
    if args.users:
        changes["users"] = tuple(int(u) for u in args.users.split(","))
    if changes:
        plan = replace(plan, **changes)
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    started = time.monotonic()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "plan": plan.__dict__,
                               "sizes": args.sizes, "main_size": main_size(args.sizes), "extra_env": args.extra_env, "app": args.app,
                               "modes": {}}
    say(f"load average {results['machine']['loadavg_start']} on {results['machine']['cpus']} CPUs "
        f"({results['machine']['cpu_model']})")
    label_studio = FakeLabelStudio(TOKEN)
    images = ImageSet(label_studio)
    masks: list[np.ndarray] = []
    try:
        for mode in args.modes:
            missing = missing_models(mode)
            if missing:
                results["modes"][mode] = {"skipped": f"missing {', '.join(missing)}; build the ONNX files with "
                                                     f"`make onnx`"}
                say(f"{mode}: skipped, missing {missing}")
                continue
            env = server_env(mode, label_studio, args.extra_env)
            say(f"{mode}: in-process measurements (load {load()})")
            local = LocalPredictor(env)
            try:
                inside: dict[str, Any] = {"load_ms": round(local.load_ms, 1),
                                          "embedding_float16": local.settings.embedding_float16, "sizes": {}}
                for size in args.sizes:
                    repeats = plan.embed_repeats if size == main_size(args.sizes) else 1
                    inside["sizes"][size] = local.prepare(size, images.get(size, 0), plan.small_repeats, repeats)
                main = main_size(args.sizes)
                if not masks:
                    masks = local.masks(main, plan.rle_masks)
                say(f"{mode}: HTTP measurements")
                http, clicks = http_run(mode, env, plan, images, args.sizes, label_studio, local, args.json.parent,
                                        say, args.app)
                for size, entry in clicks.items():
                    inside["sizes"][size].update(entry)
            finally:
                local.close()
            results["modes"][mode] = {"in_process": inside, "http": http}
        if masks:
            say("RLE: rle.encode vs mask2rle")
            results["rle"] = rle_comparison(masks, plan)
    finally:
        label_studio.close()
    results["loadavg_end"] = load()
    results["cpu_pressure_avg60_end"] = cpu_pressure()
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["targets"] = evaluate(results)
    table = report(results)
    results["table"] = table
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(table)
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
