"""Embed a whole Label Studio project ahead, and pre-annotate it from its boxes or with SAM's automatic masks.

    .venv/bin/python -m tools.project_job --project 3                       # embed ahead + masks from boxes
    .venv/bin/python -m tools.project_job --project 3 --steps embed         # embeddings only
    .venv/bin/python -m tools.project_job --project 3 --steps auto --auto-label Object --points-per-side 16

It uses the server's settings (the same environment: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, SAM_CHOICE,
RUN_ONNX_SAM, STATE_STORE, ...): the embeddings it stores are the ones the server's clicks then find, so the
store must be the server's shared one (STATE_STORE=disk:<folder> on the same machine, or redis://...).
A progress bar on the terminal, the progress record in the store (the server's /health and /metrics show it),
and a report at the end: which tasks failed and why (`--report file.json` writes it). Stopped with Ctrl-C or
SIGTERM, or killed, the job resumes where it left off when started again with the same steps.

Exit status: 0 every task done; 1 some tasks failed (see the report); 2 the job could not run.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

from model import SamModel
from sam_backend.errors import ModelError
from sam_backend.http import configure_logging
from sam_backend.jobs.api import LabelStudioApi
from sam_backend.jobs.runner import STEPS, JobBusy, JobOptions, ProjectJob
from sam_backend.sam import loading
from sam_backend.sam.automatic import AutoMaskOptions
from sam_backend.settings import from_environment

log = logging.getLogger("project_job")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=int, required=True, help="the Label Studio project's id")
    parser.add_argument("--steps", default="embed,boxes",
                        help=f"comma list of {', '.join(STEPS)} (default: %(default)s)")
    parser.add_argument("--auto-label", help="the brush label of the auto step's masks")
    parser.add_argument("--points-per-side", type=int, default=16, help="the auto step's grid (default: 16)")
    parser.add_argument("--page-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="tasks in progress at once (default: 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="calls to Label Studio at once (default: 4)")
    parser.add_argument("--rate", type=float, default=20.0, help="calls to Label Studio per second at most")
    parser.add_argument("--retries", type=int, default=5, help="retries of a call on 429, 5xx or timeouts")
    parser.add_argument("--max-tasks", type=int, help="stop after this many tasks (resume later)")
    parser.add_argument("--lease-seconds", type=float, default=60.0,
                        help="a killed job frees its project this long after its last sign of life (default: 60)")
    parser.add_argument("--report", type=Path, help="write the report (JSON) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = from_environment()
        options = JobOptions(steps=tuple(s.strip() for s in args.steps.split(",") if s.strip()),
                             auto_label=args.auto_label, auto=AutoMaskOptions(points_per_side=args.points_per_side),
                             page_size=args.page_size, workers=args.workers, max_tasks=args.max_tasks)
        api = LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key, concurrency=args.concurrency,
                             rate=args.rate, retries=args.retries)
    except ValueError as error:
        print(f"project_job: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        model = SamModel(loading.load(settings), settings)
    except ModelError as error:
        print(f"project_job: cannot load the model: {error}", file=sys.stderr)
        return 2
    if "embed" in options.steps and not model.store.shared:
        print("project_job: the embed step stores embeddings for the server, but STATE_STORE is this process's "
              "memory; set STATE_STORE to the server's (disk:<folder> or redis://...)", file=sys.stderr)
        return 2
    options = replace(options, max_embeddings=model.embedding_budget())
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(unit="task", desc=f"project {args.project}", dynamic_ncols=True)

    def on_task(progress) -> None:
        if bar is not None:
            if progress.total is not None and bar.total != progress.total:
                bar.total = progress.total
            bar.n = progress.done + progress.failed
            bar.set_postfix(embedded=progress.embedded, predicted=progress.predicted, failed=progress.failed,
                            refresh=False)
            bar.refresh()

    job = ProjectJob(api, model, model.jobs, args.project, options, on_task=on_task, lease_s=args.lease_seconds)
    try:
        report = job.run(stop)
    except JobBusy as error:
        print(f"project_job: {error}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    for line in report.lines():
        print(line)
    if args.report is not None:
        args.report.write_text(json.dumps({"progress": asdict(report.progress), "seconds": report.seconds,
                                           "retries": report.retries,
                                           "failures": [{"task": t, "reason": r} for t, r in report.failures]},
                                          indent=2))
    if report.progress.state == "failed":
        return 2
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
