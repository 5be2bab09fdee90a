"""tools/bench's machinery with tiny repeat counts. Nothing here checks a duration: the numbers belong to `make bench`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tools.bench import __main__ as cli, local, over_http, plan, report
from tools.harness import processes
from tools.harness.stub_label_studio import FakeLabelStudio

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def label_studio():
    server = FakeLabelStudio(plan.TOKEN)
    yield server
    server.close()


def test_summary_gives_median_and_p95():
    stats = report.summary([float(v) for v in range(1, 101)])
    assert stats == {"n": 100, "p50": 50.5, "p95": 95.05, "min": 1.0, "max": 100.0}
    assert report.summary([])["p50"] is None


def test_fake_label_studio_serves_only_with_the_token_and_counts_downloads(label_studio):
    label_studio.files["/data/upload/1/x.jpg"] = b"\xff\xd8\xffjpeg"
    url = label_studio.url + "/data/upload/1/x.jpg"
    assert requests.get(url, timeout=5).status_code == 401
    assert requests.get(url, headers={"Authorization": "Token wrong"}, timeout=5).status_code == 401
    assert label_studio.count("/data/upload/1/x.jpg") == 0
    answer = requests.get(url, headers={"Authorization": f"Token {plan.TOKEN}"}, timeout=5)
    assert answer.status_code == 200 and answer.content == b"\xff\xd8\xffjpeg"
    assert label_studio.count("/data/upload/1/x.jpg") == 1
    assert requests.get(label_studio.url + "/data/upload/1/none.jpg", timeout=5,
                        headers={"Authorization": f"Token {plan.TOKEN}"}).status_code == 404


def test_images_are_distinct_and_clicks_land_near_the_object(label_studio):
    images = plan.ImageSet(label_studio)
    made = [images.get("640x480", index) for index in (0, 1, 8, 9, 16, 40)]
    assert len({image.data for image in made}) == len(made), "every index must be new content for the cache"
    assert images.get("640x480", 0) is made[0]
    for image in made:
        assert label_studio.files[image.path] == image.data
        assert (image.width, image.height) == (640, 480)
        assert 0 < image.click[0] < 100 and 0 < image.click[1] < 100
        clicks = image.clicks(20, seed=3)
        assert clicks == image.clicks(20, seed=3) and len(set(clicks)) == 20
        assert all(abs(x - image.click[0]) <= 1.5001 and abs(y - image.click[1]) <= 1.5001 for x, y in clicks)


def test_bodies_mean_one_positive_click_and_an_opened_task(label_studio):
    from sam_backend.labelstudio import label_config
    from sam_backend.labelstudio import context, prompting

    image = plan.ImageSet(label_studio).get("640x480", 2)
    body = over_http.click_body(image, 12.5, 40.25, task_id=77)
    config = label_config.parse(body["label_config"])
    (region,) = context.parse_context(body["params"]["context"], config)
    assert region.positive and (region.x, region.y) == (12.5, 40.25)
    assert region.original_size == (640, 480)
    assert body["tasks"][0]["id"] == 77 and body["tasks"][0]["data"]["image"] == image.path
    prompt = prompting.build_prompt([region], (480, 640))
    expected = local.LocalPredictor.prompt(image, 12.5, 40.25)
    assert np.array_equal(prompt.points, expected.points) and np.array_equal(prompt.labels, expected.labels)
    opened = over_http.open_body(image, task_id=78)
    assert opened["params"]["context"] is None and opened["tasks"][0]["data"]["image"] == image.path


def test_children_and_memory_of_a_process():
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    child = None
    try:
        deadline = time.monotonic() + 30
        while not processes.children(parent.pid):
            assert time.monotonic() < deadline, "the child never appeared"
            time.sleep(0.05)
        (child,) = processes.children(parent.pid)
        memory = processes.memory_mb(child)
        assert memory["VmRSS"] > 1 and memory["VmHWM"] >= memory["VmRSS"]
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_a_reset_connection_is_retried_once_on_a_new_one():
    import socket
    import struct
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    body = b'{"results": []}'

    def serve():
        first, _ = listener.accept()
        first.recv(65536)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()  # RST, like a keep-alive connection the server dropped
        second, _ = listener.accept()
        second.recv(65536)
        second.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        second.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = over_http.Client(f"http://127.0.0.1:{listener.getsockname()[1]}")
    before = over_http.Client.retries
    try:
        elapsed, answer = client.predict({"tasks": []})
    finally:
        client.close()
        listener.close()
    assert answer == {"results": []} and elapsed > 0
    assert over_http.Client.retries == before + 1


def test_arguments():
    args = cli.parse_args(["--quick", "--modes", "onnx", "--sizes", "640x480,4000x3000", "--env", "ORT_NUM_THREADS=1",
                           "--cached", "6", "--users", "1,3", "--app", "patched:app"])
    made = cli.make_plan(args)
    assert args.modes == ["onnx"] and args.sizes == ["640x480", "4000x3000"] and args.app == "patched:app"
    assert cli.parse_args([]).app == "_wsgi:app"
    assert args.extra_env == {"ORT_NUM_THREADS": "1"}
    assert made.cached_images == 6 and made.rss_checkpoints == (2, 4, 6) and made.users == (1, 3)
    assert made.warm_repeats == plan.QUICK.warm_repeats
    for bad in (["--modes", "tensorrt"], ["--sizes", "10x10"], ["--env", "NOVALUE"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_server_env_controls_mode_and_label_studio(label_studio, monkeypatch):
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 4")
    monkeypatch.setenv("ONNX_DECODER_PATH", "/elsewhere.onnx")
    env = plan.server_env("onnx-int8", label_studio, {"ORT_NUM_THREADS": "1"})
    assert "GUNICORN_CMD_ARGS" not in env
    assert env["ONNX_DECODER_PATH"].endswith("vit_t.decoder.int8.onnx") and env["RUN_ONNX_SAM"] == "true"
    assert env["LABEL_STUDIO_URL"] == label_studio.url and env["LABEL_STUDIO_API_KEY"] == plan.TOKEN
    assert (env["WORKERS"], env["THREADS"], env["ORT_NUM_THREADS"]) == ("1", "8", "1")


def test_quick_run_end_to_end(tmp_path, mobile_sam_checkpoint):
    """One quick run of every available mode on the smallest size: it completes, every phase has its samples,
    concurrent masks equal the masks alone, and the table names the targets."""
    modes = ["torch"] + (["onnx"] if not plan.missing_models("onnx") else [])
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in plan.CONTROLLED}
    run = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--modes", ",".join(modes),
                          "--sizes", "640x480", "--prewarm-delay", "0.5", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Targets (issue #5)" in run.stdout and "Warm one-click" in run.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["cpus"] >= 1 and len(results["machine"]["loadavg_start"]) == 3
    for mode in modes:
        http, inside = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        assert http["warm_ms"]["640x480"]["n"] == plan.QUICK.warm_repeats
        assert http["cold_ms"]["640x480"]["n"] >= 1 and http["prewarmed_first_click_ms"]["n"] == 1
        # the image is downloaded for a task's first click only (IMAGE_URL_TTL): warm clicks fetch nothing
        assert http["downloads_per_warm_click"]["640x480"] == 0
        assert set(http["concurrent_ms"]) == {"1", "2"}
        assert all(c["masks_equal_alone"] and c["n"] >= 1 for c in http["concurrent_ms"].values())
        assert http["concurrent_embeddings_computed"] == 0 and http["connection_retries"] >= 0
        assert http["rss_startup_mb"]["VmRSS"] > 0
        assert http["rss_cached_mb"]["4"]["cached_images"] >= 4
        sizes = inside["sizes"]["640x480"]
        assert sizes["bare"]["n"] == plan.QUICK.warm_repeats and sizes["embed_ms"]["n"] == 1
        assert (tmp_path / f"bench-server-{mode}.log").is_file()
    assert results["rle"]["all_identical"] is True
    assert {t["target"].split(":")[0] for t in results["targets"]} == set(modes)


def test_the_project_job_bench_measures_a_real_job(onnx_files):
    """`make bench`'s project-job figures come from a real job (real photos, weights, store and downloads)."""
    from tools.bench import project_job

    figures = project_job.one_mode("onnx", auto_tasks=1, photos=2, onnx_files=onnx_files)
    assert figures["tasks"] == 2 and figures["encoder_runs"] == 2 and figures["encoder_runs_after_boxes"] == 2
    assert figures["images_per_s"] > 0 and figures["box_tasks_per_s"] > 0 and figures["auto_masks_per_task"] >= 1
    assert figures["rss_after_embed_mib"] >= figures["rss_after_load_mib"] > 0
