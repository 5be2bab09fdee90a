"""Large labeling configs over real HTTP (issue #11, item 2): 10,000 labels are served, a config past the limits
gets a 413 naming the setting, and /health keeps answering while large configs are parsed.

Timings are printed (run with -s), never asserted beyond a generous sanity bound: the machine is shared.
"""
from __future__ import annotations

import itertools
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import make_live_backend
from sam_backend.labelstudio import label_config
from test_robustness import CHELSEA, IMAGE, assert_json_error, click_body, region, send
from tools.bench_config import alias_config, native_config

LABELS = 10_000
DEEP = 9_876  # a class near the end of the list
TASK_IDS = itertools.count(11_000)
#: /health must answer, but on a loaded two-core machine "responsive" is checked by eye (printed), not asserted
SANITY_SECONDS = 30


@pytest.fixture(scope="module")
def images(fake_label_studio):
    fake_label_studio.add_image(IMAGE, CHELSEA)
    return fake_label_studio


def setup_body(xml: str) -> dict:
    return {"project": "11.1", "schema": xml, "hostname": "", "access_token": "", "extra_params": None}


def click(config: str, from_name: str, label: str, positive: bool = True) -> dict:
    """One click at the recorded cat's point, with `label` of `from_name`, on a task of its own."""
    body = click_body()
    body["label_config"] = config
    body["tasks"][0]["id"] = next(TASK_IDS)
    click = region(body)
    click.update(from_name=from_name, is_positive=positive)
    click["value"].update(keypointlabels=[label], labels=[label])
    return body


def timed(call, *args, **kwargs):
    started = time.perf_counter()
    answer = call(*args, **kwargs)
    return answer, time.perf_counter() - started


def the_mask(answer: requests.Response) -> dict:
    assert answer.status_code == 200, answer.text[:500]
    (task,) = answer.json()["results"]
    (result,) = task["result"]
    return result


def test_ten_thousand_labels_are_served_by_setup_and_predict(live_backend, images):
    reference = the_mask(send(live_backend.url, click_body()))  # the same click with the recorded 2-class config
    for shape, xml, from_name, label, brush in [
        ("native", native_config(LABELS), "tag2", f"Class {DEEP}", ("tag", f"Class {DEEP}")),
        ("alias", alias_config(LABELS), "tag2", str(DEEP), ("brush", str(DEEP))),
    ]:
        answer, setup_seconds = timed(send, live_backend.url, setup_body(xml), path="/setup")
        assert answer.status_code == 200, answer.text[:500]
        answer, predict_seconds = timed(send, live_backend.url, click(xml, from_name, label))
        result = the_mask(answer)
        assert (result["from_name"], result["value"]["brushlabels"]) == (brush[0], [brush[1]])
        assert result["value"]["rle"] == reference["value"]["rle"]  # the click's mask, whatever the config's size
        print(f"\n{shape}, {LABELS} classes ({len(xml.encode()) / 1024:.0f} KiB): /setup {setup_seconds:.3f} s, "
              f"/predict (config cached) {predict_seconds:.3f} s")
    # the alias convention's negative label of a deep class is a negative click: no positive point, no mask
    answer = send(live_backend.url, click(alias_config(LABELS), "tag2", f"-{DEEP}", positive=True))
    assert answer.status_code == 200 and answer.json()["results"][0]["result"] == []
    # a label that is not in the config is still named
    assert_json_error(send(live_backend.url, click(native_config(LABELS), "tag2", f"Class {LABELS}")), 422,
                      f"Class {LABELS}")


def test_a_config_past_the_byte_limit_gets_a_413_naming_it(live_backend, images):
    xml = native_config(10)
    oversized = xml.replace("</View>", "<!--" + "x" * (label_config.MAX_BYTES - len(xml)) + "--></View>")
    assert len(oversized.encode()) == label_config.MAX_BYTES + 7  # inside MAX_CONTENT_LENGTH: the body is read
    for path, body in (("/setup", setup_body(oversized)), ("/predict", click(oversized, "tag2", "Class 1"))):
        answer, seconds = timed(send, live_backend.url, body, path=path)
        assert_json_error(answer, 413, f"MAX_LABEL_CONFIG_BYTES={label_config.MAX_BYTES}")
        print(f"\n{path} with a {len(oversized) / 2**20:.1f} MiB config: 413 in {seconds:.3f} s")
    assert requests.get(live_backend.url + "/health", timeout=10).status_code == 200


def test_a_config_past_the_label_limit_gets_a_413_naming_it(base_settings, torch_predictor, images):
    backend = make_live_backend(base_settings, torch_predictor, max_labels=1000)
    try:
        xml = native_config(400)  # 1,200 labels in three tags
        for path, body in (("/setup", setup_body(xml)), ("/predict", click(xml, "tag2", "Class 1"))):
            assert_json_error(send(backend.url, body, path=path), 413, "1200 labels")
            assert_json_error(send(backend.url, body, path=path), 413, "MAX_LABELS=1000")
        assert the_mask(send(backend.url, click(native_config(300), "tag2", "Class 1")))  # 900 labels: served
    finally:
        backend.close()


def test_health_answers_while_eight_large_setups_run(base_settings, torch_predictor):
    backend = make_live_backend(base_settings, torch_predictor)
    # eight different configs (no cache hits), in both conventions
    configs = [(alias_config if i % 2 else native_config)(LABELS).replace("$image", f"$image{i}") for i in range(8)]
    health: list[tuple[int, float]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            answer, seconds = timed(requests.get, backend.url + "/health", timeout=SANITY_SECONDS)
            health.append((answer.status_code, seconds))
            time.sleep(0.02)

    try:
        poller = threading.Thread(target=poll)
        poller.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(len(configs)) as pool:
            setups = list(pool.map(lambda xml: timed(send, backend.url, setup_body(xml), path="/setup"), configs))
        wall = time.perf_counter() - started
        time.sleep(0.1)
        stop.set()
        poller.join()
    finally:
        backend.close()
    assert [answer.status_code for answer, _ in setups] == [200] * len(configs)
    assert len(health) >= 2 and {status for status, _ in health} == {200}
    latencies = [seconds for _, seconds in health]
    print(f"\n8 concurrent /setup of {LABELS}-class configs: {wall:.2f} s wall, each "
          f"{min(s for _, s in setups):.2f}-{max(s for _, s in setups):.2f} s; /health {len(health)} calls, "
          f"median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < SANITY_SECONDS
