"""How fast a project job goes: images embedded per second, tasks pre-annotated per second, peak memory.

    .venv/bin/python -m tools.bench.project_job                     # torch and ONNX, GrabCut20's 20 photos
    .venv/bin/python -m tools.bench.project_job --modes onnx --auto-tasks 0

Each mode runs in its own process (so that its peak RSS is its own): the server's `SamModel` with a disk state
store, images downloaded over HTTP from a loopback Label Studio stand-in (`FakeLabelStudio`), tasks listed and
predictions written by `StubProject` (so Label Studio's own API time is not in the figures: against a real
Label Studio 1.23 each task adds one listing share and one prediction write, tens of ms). Per mode:
1. embed: every photo's embedding computed and stored (a fresh store);
2. boxes: a new job over the same project: each task's image downloaded again, its embedding read from the
   store, one mask per box (a loose box around the ground truth) encoded as a prediction;
3. auto: SAM's automatic masks (16 x 16 grid) on the first `--auto-tasks` tasks.
The CPU, its vector extensions and the thread settings are printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="Object"/></RectangleLabels>
</View>"""


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_mode(mode: str, auto_tasks: int, photos: int, onnx_files: tuple[Path, Path] | None = None) -> dict:
    """The figures of one mode ("torch" or "onnx"; `onnx_files`: (encoder, decoder), default models/)."""
    from model import SamModel
    from sam_backend.jobs.progress import ProgressBook
    from sam_backend.jobs.runner import JobOptions, ProjectJob
    from sam_backend.sam import loading
    from sam_backend.settings import Settings
    from tools.harness.stub_label_studio import TOKEN, FakeLabelStudio
    from tools.harness.stub_project import StubProject
    from tools.quality import GRABCUT20, folder_items, loose_box

    items = folder_items(GRABCUT20)[:photos]
    images = FakeLabelStudio()
    tasks = []
    for index, item in enumerate(items, start=1):
        path = f"/data/upload/1/{item.name}.jpg"
        images.files[path] = (GRABCUT20 / "images" / f"{item.name}.jpg").read_bytes()
        height, width = item.truth.shape
        x0, y0, x1, y1 = (float(v) for v in loose_box(item.truth, 0.05))
        box = {"type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": width,
               "original_height": height, "value": {"x": 100 * x0 / width, "y": 100 * y0 / height,
                                                    "width": 100 * (x1 - x0) / width,
                                                    "height": 100 * (y1 - y0) / height, "rectanglelabels": ["Object"]}}
        tasks.append({"id": index, "data": {"image": path}, "annotations": [{"result": [box]}], "predictions": []})
    started_rss = peak_rss_mib()
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(sam_choice="MobileSAM", run_onnx_sam=mode == "onnx", device="auto",
                            state_store=f"disk:{folder}", label_studio_url=images.url, label_studio_api_key=TOKEN,
                            log_level="WARNING", onnx_encoder=onnx_files[0] if onnx_files else None,
                            onnx_decoder=onnx_files[1] if onnx_files else None)
        model = SamModel(loading.load(settings), settings)
        loaded_rss = peak_rss_mib()
        book = ProgressBook(model.store)
        figures = {"mode": mode, "model_version": model.model_version, "tasks": len(tasks),
                   "rss_after_load_mib": round(loaded_rss), "rss_before_load_mib": round(started_rss)}

        def run(steps, limit=None, **options):
            project = StubProject(tasks, CONFIG)
            book.store.delete("project-job", "1")  # a new job each time, over the same store
            job = ProjectJob(project, model, book, 1, JobOptions(steps=steps, max_tasks=limit, **options))
            began = time.perf_counter()
            report = job.run()
            seconds = time.perf_counter() - began
            assert not report.failures, report.lines()
            return seconds, report.progress, project

        seconds, progress, _ = run(("embed",))
        figures.update(embed_seconds=round(seconds, 2), images_per_s=round(progress.embedded / seconds, 3),
                       encoder_runs=model.cache.computed, rss_after_embed_mib=round(peak_rss_mib()))
        seconds, progress, project = run(("boxes",))
        figures.update(boxes_seconds=round(seconds, 2), box_tasks_per_s=round(len(project.written) / seconds, 2),
                       encoder_runs_after_boxes=model.cache.computed, rss_after_boxes_mib=round(peak_rss_mib()))
        if auto_tasks:
            from sam_backend.sam.automatic import AutoMaskOptions

            seconds, progress, project = run(("auto",), limit=auto_tasks, auto_label="Object",
                                             auto=AutoMaskOptions(points_per_side=16))
            regions = [len(result) for _, _, result in project.written]
            figures.update(auto_seconds_per_task=round(seconds / auto_tasks, 2),
                           auto_masks_per_task=round(sum(regions) / max(1, len(regions)), 1),
                           rss_after_auto_mib=round(peak_rss_mib()))
    images.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="torch,onnx")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--auto-tasks", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_mode(args.one, args.auto_tasks, args.photos)))
        return 0
    from tools.bench.report import machine_info

    machine = machine_info()
    print(f"project job bench on {machine['cpu_model']} ({', '.join(machine['cpu_vector_extensions'])}), "
          f"{machine['cpus_usable']} CPUs, TORCH_NUM_THREADS={os.environ.get('TORCH_NUM_THREADS', '-')} "
          f"ORT_NUM_THREADS={os.environ.get('ORT_NUM_THREADS', '-')}, commit {machine['commit']}")
    from tools.bench.plan import missing_models

    for mode in args.modes.split(","):
        missing = missing_models(mode)
        if missing:
            print(f"{mode}: skipped, missing {', '.join(missing)} (make onnx exports them)")
            continue
        done = subprocess.run([sys.executable, "-m", "tools.bench.project_job", "--one", mode, "--photos",
                               str(args.photos), "--auto-tasks", str(args.auto_tasks)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-3000:]}")
            return 1
        f = json.loads(done.stdout.strip().splitlines()[-1])
        line = (f"{mode:5s} {f['tasks']} tasks: embed {f['images_per_s']:.2f} images/s ({f['embed_seconds']} s, "
                f"{f['encoder_runs']} encoder runs); boxes {f['box_tasks_per_s']:.1f} tasks/s "
                f"({f['encoder_runs_after_boxes'] - f['encoder_runs']} more encoder runs)")
        if "auto_seconds_per_task" in f:
            line += f"; auto {f['auto_seconds_per_task']:.1f} s/task ({f['auto_masks_per_task']} masks)"
        line += (f"; peak RSS {f['rss_after_load_mib']} MiB loaded, {f['rss_after_embed_mib']} embedding, "
                 f"{f['rss_after_boxes_mib']} boxes" + (f", {f['rss_after_auto_mib']} auto" if 'rss_after_auto_mib'
                                                        in f else ""))
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
