"""Robustness and security over real HTTP (issue #6): bad input gets a clear answer, nobody gets in, nothing leaks.

* Every client fault is a 4xx with a JSON body `{"error": ...}` naming the field, label or (redacted) URL, and the
  server keeps serving (`/health` answers after each case). Bodies are Label Studio's recorded ones
  (tools/harness/bodies) with one thing broken.
* A server fault is a 5xx JSON body without a traceback; the traceback goes to the log.
* HTTP Basic auth guards every route; Label Studio's way of sending it (python-requests, Latin-1) works.
* No token or password reaches a log record or a response.
* Many threads on several images, classes and both label conventions get the single-threaded answers.
* A missing or corrupt model file, or a bad setting, stops `gunicorn _wsgi:app` with a clear message.

"""
from __future__ import annotations

import base64
import copy
import itertools
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

from conftest import LS_TOKEN, make_live_backend
from tools.harness.processes import GunicornBackend, environment
from tools.harness.scenes import scene
from tools.harness.stub_label_studio import LoopbackServer, static
from tools.harness.recordings import CHELSEA, recorded

IMAGE = "/data/upload/7/chelsea.jpg"
MISSING = "/data/upload/7/missing.jpg"
NOT_AN_IMAGE = "/data/upload/7/notes.jpg"

TASK_IDS = itertools.count(600)


def body_for(name: str, image: str = IMAGE, task_id: int | None = None) -> dict:
    """A recorded body on `image`, on a task of its own (the server remembers earlier regions of a task)."""
    body = recorded(name)
    task_id = next(TASK_IDS) if task_id is None else task_id
    for task in body["tasks"]:
        task["data"]["image"] = image
        task["id"] = task_id
    return body


def click_body(**value) -> dict:
    """One positive click of Cat on chelsea (native convention), its value updated with `value`."""
    body = body_for("keypoints_positive_and_negative")
    body["params"]["context"]["result"] = body["params"]["context"]["result"][:1]
    body["params"]["context"]["result"][0]["value"].update(value)
    return body


def rect_body(**value) -> dict:
    body = body_for("rectangle")
    body["params"]["context"]["result"][0]["value"].update(value)
    return body


def region(body: dict, index: int = 0) -> dict:
    return body["params"]["context"]["result"][index]


def edit(body: dict, change: Callable[[dict], Any]) -> dict:
    change(body)
    return body


class Raw(bytes):
    """A body sent as these exact bytes."""


class Chunked(list):
    """A body sent in chunks (Transfer-Encoding: chunked, no Content-Length)."""


@pytest.fixture(scope="module")
def images(fake_label_studio):
    fake_label_studio.add_image(IMAGE, CHELSEA)
    fake_label_studio.files[NOT_AN_IMAGE] = b"these are my notes, not a picture\n" * 20
    return fake_label_studio


def send(url: str, body: Any, path: str = "/predict", **kwargs) -> requests.Response:
    if isinstance(body, Chunked):
        data = iter(body)
    elif isinstance(body, (Raw, bytes)):
        data = bytes(body)
    else:
        data = json.dumps(body, allow_nan=True)
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120, **kwargs)


def assert_json_error(answer: requests.Response, status: int, message: str) -> None:
    assert answer.status_code == status, f"{answer.status_code}: {answer.text[:500]}"
    assert answer.headers["Content-Type"].startswith("application/json"), answer.headers["Content-Type"]
    error = answer.json()["error"]
    assert isinstance(error, str) and message in error, error
    assert "Traceback" not in answer.text


def assert_healthy(url: str, **kwargs) -> None:
    answer = requests.get(url + "/health", timeout=10, **kwargs)
    assert answer.status_code == 200 and answer.json()["status"] == "UP"


# ---- the table of client faults ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[], Any]
    status: int
    message: str


def deep(depth: int) -> Raw:
    return Raw(b"[" * depth + b"]" * depth)


LOL = "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 12))
BILLION_LAUGHS = (f'<?xml version="1.0"?><!DOCTYPE View [<!ENTITY l0 "lol">{LOL}]><View><Image name="image" '
                  f'value="$image"/><BrushLabels name="b" toName="image"><Label value="&l11;"/></BrushLabels>'
                  f'<KeyPointLabels name="k" toName="image"><Label value="&l11;"/></KeyPointLabels></View>')
NO_BRUSH = '<View><Image name="image" value="$image"/><KeyPointLabels name="k" toName="image"><Label value="Cat"/></KeyPointLabels></View>'
NO_IMAGE = '<View><Text name="text" value="$text"/></View>'


def many_clicks(count: int) -> dict:
    body = click_body()
    first = region(body)
    clicks = []
    for i in range(count):
        click = copy.deepcopy(first)
        click["id"] = f"c{i}"
        click["value"].update(x=5 + (i % 90), y=5 + (i // 90) % 90)
        clicks.append(click)
    body["params"]["context"]["result"] = clicks
    return body


BAD: list[Case] = [
    # the body as a whole
    Case("invalid JSON", lambda: Raw(b"{not json"), 400, "not valid JSON"),
    Case("truncated JSON", lambda: Raw(json.dumps(click_body()).encode()[:-7]), 400, "not valid JSON"),
    Case("empty body", lambda: Raw(b""), 400, "empty"),
    Case("whitespace body", lambda: Raw(b"  \n "), 400, "empty"),
    Case("invalid UTF-8", lambda: Raw(b'{"tasks": "\xff\xfe"}'), 400, "not valid JSON"),
    Case("JSON null", lambda: None, 400, "body must be a JSON object"),
    Case("JSON list", lambda: [click_body()], 400, "body must be a JSON object"),
    Case("JSON string", lambda: "tasks", 400, "body must be a JSON object"),
    Case("nested 100000 deep", lambda: deep(100_000), 400, "nested too deeply"),
    Case("object nested 5000 deep", lambda: Raw(b'{"tasks": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 400,
         "nested too deeply"),
    Case("integer of 5000 digits", lambda: Raw(b'{"tasks": ' + b"7" * 5000 + b"}"), 400, "not valid JSON"),
    # tasks
    Case("tasks missing", lambda: edit(click_body(), lambda b: b.pop("tasks")), 400, "body.tasks"),
    Case("tasks null", lambda: edit(click_body(), lambda b: b.update(tasks=None)), 400, "body.tasks"),
    Case("tasks an object", lambda: edit(click_body(), lambda b: b.update(tasks={"id": 1})), 400, "body.tasks"),
    Case("tasks a string", lambda: edit(click_body(), lambda b: b.update(tasks="1,2")), 400, "body.tasks"),
    Case("tasks empty", lambda: edit(click_body(), lambda b: b.update(tasks=[])), 400, "body.tasks"),
    Case("task a string", lambda: edit(click_body(), lambda b: b.update(tasks=["task"])), 400,
         "body.tasks[0] must be a JSON object"),
    Case("second task null", lambda: edit(click_body(), lambda b: b["tasks"].append(None)), 400,
         "body.tasks[1] must be a JSON object"),
    Case("task id a list", lambda: edit(click_body(), lambda b: b["tasks"][0].update(id=[1])), 400,
         "body.tasks[0].id"),
    Case("task id an object", lambda: edit(click_body(), lambda b: b["tasks"][0].update(id={"n": 1})), 400,
         "body.tasks[0].id"),
    # task data
    Case("data missing", lambda: edit(click_body(), lambda b: b["tasks"][0].pop("data")), 400,
         "body.tasks[0].data.image"),
    Case("data a list", lambda: edit(click_body(), lambda b: b["tasks"][0].update(data=[IMAGE])), 400,
         "body.tasks[0].data.image"),
    Case("data.image missing", lambda: edit(click_body(), lambda b: b["tasks"][0].update(data={"img": IMAGE})),
         400, "body.tasks[0].data.image"),
    Case("data.image a number", lambda: edit(click_body(), lambda b: b["tasks"][0]["data"].update(image=7)), 400,
         "body.tasks[0].data.image"),
    Case("data.image empty", lambda: edit(click_body(), lambda b: b["tasks"][0]["data"].update(image="")), 400,
         "body.tasks[0].data.image"),
    Case("data.image not found", lambda: edit(click_body(), lambda b: b["tasks"][0]["data"].update(image=MISSING)),
         404, "/data/upload/7/missing.jpg"),
    Case("data.image not an image", lambda: edit(click_body(), lambda b: b["tasks"][0]["data"].update(
        image=NOT_AN_IMAGE)), 415, "notes.jpg"),
    Case("data.image a data: URI", lambda: edit(click_body(), lambda b: b["tasks"][0]["data"].update(
        image="data:image/png;base64,iVBORw0KGgo=")), 400, "data: URIs"),
    Case("data.image a relative path off Label Studio", lambda: edit(
        click_body(), lambda b: b["tasks"][0]["data"].update(image="/api/projects/")), 400, "not a Label Studio media path"),
    # label config
    Case("label_config missing", lambda: edit(click_body(), lambda b: b.pop("label_config")), 400, "label_config"),
    Case("label_config a number", lambda: edit(click_body(), lambda b: b.update(label_config=1)), 400,
         "label_config"),
    Case("label_config not XML", lambda: edit(click_body(), lambda b: b.update(label_config="<View")), 422,
         "labeling config does not parse"),
    Case("label_config without Image", lambda: edit(click_body(), lambda b: b.update(label_config=NO_IMAGE)), 422,
         "<Image>"),
    Case("label_config without BrushLabels", lambda: edit(click_body(), lambda b: b.update(label_config=NO_BRUSH)),
         422, "BrushLabels"),
    Case("label_config with an entity bomb", lambda: edit(click_body(), lambda b: b.update(label_config=BILLION_LAUGHS)),
         422, "labeling config does not parse"),
    # params and project
    Case("params a list", lambda: edit(click_body(), lambda b: b.update(params=[{"context": None}])), 400,
         "body.params"),
    Case("params a string", lambda: edit(click_body(), lambda b: b.update(params="context")), 400, "body.params"),
    Case("params zero", lambda: edit(click_body(), lambda b: b.update(params=0)), 400, "body.params"),
    Case("params an empty list", lambda: edit(click_body(), lambda b: b.update(params=[])), 400, "body.params"),
    Case("project an object", lambda: edit(click_body(), lambda b: b.update(project={"id": 2})), 400,
         "body.project"),
    # context
    Case("context a list", lambda: edit(click_body(), lambda b: b["params"].update(context=[1])), 400,
         "params.context"),
    Case("context a string", lambda: edit(click_body(), lambda b: b["params"].update(context="click")), 400,
         "params.context"),
    Case("context.result an object", lambda: edit(click_body(), lambda b: b["params"]["context"].update(
        result={"x": 1})), 400, "params.context.result"),
    Case("context.result a string", lambda: edit(click_body(), lambda b: b["params"]["context"].update(
        result="[]")), 400, "params.context.result"),
    # result items
    Case("result item a string", lambda: edit(click_body(), lambda b: b["params"]["context"].update(
        result=["click"])), 400, "params.context.result[0] must be an object"),
    Case("second result item null", lambda: edit(click_body(), lambda b: b["params"]["context"]["result"].append(
        None)), 400, "params.context.result[1] must be an object"),
    Case("type missing", lambda: edit(click_body(), lambda b: region(b).pop("type")), 400,
         "params.context.result[0].type"),
    Case("type empty", lambda: edit(click_body(), lambda b: region(b).update(type="")), 400,
         "params.context.result[0].type"),
    Case("type unknown", lambda: edit(click_body(), lambda b: region(b).update(type="polygonlabels")), 400,
         "params.context.result[0].type"),
    Case("type a number", lambda: edit(click_body(), lambda b: region(b).update(type=3)), 400,
         "params.context.result[0].type"),
    Case("from_name missing", lambda: edit(click_body(), lambda b: region(b).pop("from_name")), 400,
         "params.context.result[0].from_name"),
    Case("from_name a list", lambda: edit(click_body(), lambda b: region(b).update(from_name=["tag2"])), 400,
         "params.context.result[0].from_name"),
    Case("from_name unknown", lambda: edit(click_body(), lambda b: region(b).update(from_name="nope")), 422,
         "'nope'"),
    Case("from_name of the other tool", lambda: edit(click_body(), lambda b: region(b).update(from_name="tag3")),
         400, "rectanglelabels tag"),
    Case("value missing", lambda: edit(click_body(), lambda b: region(b).pop("value")), 400,
         "params.context.result[0].value must be an object"),
    Case("value a list", lambda: edit(click_body(), lambda b: region(b).update(value=[40, 45])), 400,
         "params.context.result[0].value must be an object"),
    Case("labels missing", lambda: edit(click_body(), lambda b: [region(b)["value"].pop(k) for k in
                                                              ("keypointlabels", "labels")]), 400,
         "value.keypointlabels"),
    Case("labels empty", lambda: click_body(keypointlabels=[], labels=[]), 400, "value.keypointlabels"),
    Case("labels a string", lambda: click_body(keypointlabels="Cat", labels="Cat"), 400, "value.keypointlabels"),
    Case("labels of numbers", lambda: click_body(keypointlabels=[1], labels=[1]), 400, "value.keypointlabels"),
    Case("label unknown", lambda: click_body(keypointlabels=["Zebra"], labels=["Zebra"]), 422, "'Zebra'"),
    Case("rectangle label unknown", lambda: rect_body(rectanglelabels=["Zebra"]), 422, "'Zebra'"),
    Case("is_positive a string", lambda: edit(click_body(), lambda b: region(b).update(is_positive="no")), 400,
         "params.context.result[0].is_positive"),
    Case("is_positive a number", lambda: edit(click_body(), lambda b: region(b).update(is_positive=0)), 400,
         "params.context.result[0].is_positive"),
    Case("is_positive null", lambda: edit(click_body(), lambda b: region(b).update(is_positive=None)), 400,
         "params.context.result[0].is_positive"),
    # coordinates
    Case("x missing", lambda: edit(click_body(), lambda b: region(b)["value"].pop("x")), 400,
         "params.context.result[0].value.x must be a number"),
    Case("x a string", lambda: click_body(x="40"), 400, "params.context.result[0].value.x must be a number"),
    Case("x a boolean", lambda: click_body(x=True), 400, "params.context.result[0].value.x must be a number"),
    Case("x a list", lambda: click_body(x=[40]), 400, "params.context.result[0].value.x must be a number"),
    Case("x NaN", lambda: click_body(x=math.nan), 400, "params.context.result[0].value.x must be finite"),
    Case("y infinite", lambda: click_body(y=math.inf), 400, "params.context.result[0].value.y must be finite"),
    Case("y minus infinite", lambda: click_body(y=-math.inf), 400, "params.context.result[0].value.y"),
    Case("x 1e400 (JSON infinity)", lambda: Raw(json.dumps(click_body(x=123.5)).replace('"x": 123.5', '"x": 1e400')
                                                  .encode()), 400, "params.context.result[0].value.x"),
    Case("x a 400-digit integer", lambda: click_body(x=10 ** 400), 400, "params.context.result[0].value.x"),
    Case("x huge", lambda: click_body(x=1e300), 400, "params.context.result[0].value.x"),
    Case("x far right of the image", lambda: click_body(x=150), 400, "params.context.result[0].value.x is 150"),
    Case("y far above the image", lambda: click_body(y=-40), 400, "params.context.result[0].value.y is -40"),
    Case("original_width a string", lambda: edit(click_body(), lambda b: region(b).update(original_width="451")),
         400, "params.context.result[0].original_width"),
    Case("original_width zero", lambda: edit(click_body(), lambda b: region(b).update(original_width=0)), 400,
         "original_width and original_height must be positive"),
    Case("original_height negative", lambda: edit(click_body(), lambda b: region(b).update(original_height=-300)),
         400, "original_width and original_height must be positive"),
    Case("original_height NaN", lambda: edit(click_body(), lambda b: region(b).update(original_height=math.nan)),
         400, "params.context.result[0].original_height must be finite"),
    Case("original_height missing, width sent", lambda: edit(click_body(), lambda b: region(b).pop(
        "original_height")), 400, "params.context.result[0].original_height must be a number"),
    Case("original_width a 400-digit integer", lambda: edit(click_body(), lambda b: region(b).update(
        original_width=10 ** 400)), 400, "params.context.result[0].original_width"),
    Case("original_width disagrees with the image", lambda: edit(click_body(), lambda b: region(b).update(
        original_width=1000)), 400, "1000x300"),
    Case("original_height disagrees with the image", lambda: edit(click_body(), lambda b: region(b).update(
        original_height=150)), 400, "451x150"),
    # rectangles
    Case("rectangle of zero width", lambda: rect_body(width=0), 400, "positive width and height"),
    Case("rectangle of zero height", lambda: rect_body(height=0.0), 400, "positive width and height"),
    Case("rectangle inverted (negative width)", lambda: rect_body(x=70, width=-60), 400, "positive width and height"),
    Case("rectangle inverted (negative height)", lambda: rect_body(y=95, height=-90), 400,
         "positive width and height"),
    Case("rectangle width missing", lambda: edit(rect_body(), lambda b: region(b)["value"].pop("width")), 400,
         "params.context.result[0].value.width"),
    Case("rectangle height a string", lambda: rect_body(height="90"), 400, "params.context.result[0].value.height"),
    Case("rectangle rotation a string", lambda: rect_body(rotation="0"), 400,
         "params.context.result[0].value.rotation"),
    Case("rectangle width infinite", lambda: rect_body(width=math.inf), 400, "params.context.result[0].value.width"),
    Case("rectangle far outside (huge)", lambda: rect_body(x=-1e308, width=1e308), 400,
         "params.context.result[0].value.x"),
    Case("rectangle running far off the image", lambda: rect_body(x=50, width=200), 400,
         "params.context.result[0].value.width"),
    Case("rectangle beside the image", lambda: rect_body(x=102, width=5), 400, "lies outside the image"),
    Case("rectangle smaller than a pixel", lambda: rect_body(width=1e-6), 400, "covers less than a pixel"),
    # too much
    Case("more keypoints than MAX_POINTS", lambda: many_clicks(257), 400, "257 keypoints"),
    Case("more regions in one call than context.MAX_REGIONS", lambda: many_clicks(4097), 400, "4097 regions"),
    Case("more objects in one call than context.MAX_OBJECTS", lambda: labelled_clicks(
        [f"L{i}" for i in range(17)], next(TASK_IDS), many_labels_config(20)), 400, "17 objects"),
    Case("body over MAX_CONTENT_LENGTH", lambda: Raw(b'{"tasks": "' + b"x" * (17 << 20) + b'"}'), 413,
         "Too Large"),
    Case("chunked body over MAX_CONTENT_LENGTH", lambda: Chunked([b'{"tasks": "'] + [b"x" * (1 << 20)] * 17 +
                                                                 [b'"}']), 413, "Too Large"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_client_fault_gets_a_clear_4xx_and_the_server_keeps_serving(live_backend, images, case):
    answer = send(live_backend.url, case.body())
    assert_healthy(live_backend.url)
    assert_json_error(answer, case.status, case.message)


def test_max_points_follows_the_setting(base_settings, torch_predictor, images):
    backend = make_live_backend(base_settings, torch_predictor, max_points=3)
    try:
        assert send(backend.url, many_clicks(3)).status_code == 200
        assert_json_error(send(backend.url, many_clicks(4)), 400, "4 keypoints")
        assert_json_error(send(backend.url, many_clicks(4)), 400, "'Cat'")
    finally:
        backend.close()


def test_small_max_content_length_answers_413_json(base_settings, torch_predictor, images):
    backend = make_live_backend(base_settings, torch_predictor, max_content_length=4096)
    try:
        body = click_body()
        body["padding"] = "x" * 5000
        assert_json_error(send(backend.url, body), 413, "Too Large")
        assert_json_error(send(backend.url, Chunked([json.dumps(body).encode()])), 413, "Too Large")
        assert_json_error(send(backend.url, body, path="/setup"), 413, "Too Large")
        assert send(backend.url, click_body()).status_code == 200
        assert_healthy(backend.url)
    finally:
        backend.close()


ROUTE_FAULTS = [
    ("GET", "/predict", 405, "Method Not Allowed"),
    ("PUT", "/setup", 405, "Method Not Allowed"),
    ("POST", "/health", 405, "Method Not Allowed"),
    ("GET", "/no/such/route", 404, "Not Found"),
    ("GET", "/predict/../../etc/passwd", 404, "Not Found"),
]


@pytest.mark.parametrize("method,path,status,message", ROUTE_FAULTS)
def test_unknown_routes_and_methods_answer_json(live_backend, method, path, status, message):
    answer = requests.request(method, live_backend.url + path, timeout=10)
    assert_json_error(answer, status, message)


SETUP_FAULTS = [
    ("not JSON", Raw(b"project=1"), 400, "not valid JSON"),
    ("a list", [1, 2], 400, "body must be a JSON object"),
    ("an unusable schema", {"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"}, 422,
     "BrushLabels"),
    ("a schema that is not XML", {"project": "1.1", "schema": "<<<"}, 422, "does not parse"),
]


@pytest.mark.parametrize("name,body,status,message", SETUP_FAULTS, ids=[f[0] for f in SETUP_FAULTS])
def test_setup_faults(live_backend, name, body, status, message):
    assert_json_error(send(live_backend.url, body, path="/setup"), status, message)
    assert_healthy(live_backend.url)


def strict_json(text: str) -> Any:
    """JSON as the standard has it: no NaN or Infinity."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_webhook_survives_any_body(live_backend):
    for body in (Raw(b""), Raw(b"{oops"), deep(100_000), None, [1], {"action": math.nan},
                 {"action": {"nested": [1] * 1000}}):
        answer = send(live_backend.url, body, path="/webhook")
        assert answer.status_code == 200, answer.text
        assert strict_json(answer.text) == {"status": "ok", "action": None}
    answer = send(live_backend.url, {"action": "ANNOTATION_CREATED"}, path="/webhook")
    assert strict_json(answer.text) == {"status": "ok", "action": "ANNOTATION_CREATED"}
    assert_healthy(live_backend.url)


# ---- odd but meaningful input is served ---------------------------------------------------------------------------
def decoded(answer: requests.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"][0]["result"]
    width, height = result["original_width"], result["original_height"]
    return decode_rle(result["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def test_a_click_just_outside_the_image_means_its_border(live_backend, images):
    for border, outside in [((100, 50), [(100.5, 50), (104, 50), (110, 50)]),
                            ((0, 60), [(-0.01, 60), (-3, 60), (-10, 60)])]:
        on_border = decoded(send(live_backend.url, click_body(x=border[0], y=border[1])))
        assert on_border.any()
        for x, y in outside:
            assert np.array_equal(decoded(send(live_backend.url, click_body(x=x, y=y))), on_border), (x, y)


def test_a_rectangle_spilling_over_the_border_is_clipped(live_backend, images):
    inside = decoded(send(live_backend.url, rect_body(x=60, y=20, width=40, height=80)))
    spilling = decoded(send(live_backend.url, rect_body(x=60, y=20, width=45, height=85)))
    assert np.array_equal(inside, spilling)


ACCEPTED = [
    ("context null", lambda: edit(click_body(), lambda b: b["params"].update(context=None)), 0),
    ("context empty", lambda: edit(click_body(), lambda b: b["params"].update(context={})), 0),
    ("context.result empty", lambda: edit(click_body(), lambda b: b["params"]["context"].update(result=[])), 0),
    ("context.result null", lambda: edit(click_body(), lambda b: b["params"]["context"].update(result=None)), 0),
    ("params missing", lambda: edit(click_body(), lambda b: b.pop("params")), 0),
    ("extra keys everywhere", lambda: edit(click_body(), lambda b: (
        b.update(extra={"a": [1]}), b["tasks"][0].update(extra=1), b["params"].update(extra=None),
        b["params"]["context"].update(extra="x"), region(b).update(extra=[]), region(b)["value"].update(extra={}))),
     1),
    ("is_positive absent", lambda: edit(click_body(), lambda b: region(b).pop("is_positive")), 1),
    ("original size absent", lambda: edit(click_body(), lambda b: [region(b).pop(k) for k in
                                                                   ("original_width", "original_height")]), 1),
    ("original_width off by one pixel", lambda: edit(click_body(), lambda b: region(b).update(original_width=452)),
     1),
    ("only the generic labels key", lambda: edit(click_body(), lambda b: region(b)["value"].pop("keypointlabels")),
     1),
    ("integer coordinates as floats", lambda: click_body(x=40.0, y=45.0), 1),
    ("rotated rectangle", lambda: rect_body(rotation=30), 1),
    ("a negative click only", lambda: edit(click_body(), lambda b: region(b).update(is_positive=False)), 0),
    ("two objects in one call", lambda: labelled_clicks(["L0", "L1"], next(TASK_IDS), many_labels_config(3)), 2),
]


@pytest.mark.parametrize("name,body,regions", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_odd_but_meaningful_input_is_served(live_backend, images, name, body, regions):
    answer = send(live_backend.url, body())
    assert answer.status_code == 200, answer.text
    (task,) = answer.json()["results"]
    assert len(task["result"]) == regions


# ---- bounded work and memory per call ----------------------------------------------------------------------------
def many_labels_config(count: int) -> str:
    labels = "".join(f'<Label value="L{i}"/>' for i in range(count))
    return (f'<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">{labels}'
            f'</BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">{labels}</KeyPointLabels></View>')


def labelled_clicks(labels: list[str], task_id: int, config: str) -> dict:
    body = click_body()
    body["tasks"][0]["id"] = task_id
    body["label_config"] = config
    template = region(body)
    clicks = []
    for index, label in enumerate(labels):
        click = copy.deepcopy(template)
        click.update(id=f"{label}-{index}", from_name="kp")
        click["value"].update(x=10 + (index * 17) % 80, y=10 + (index * 29) % 80, keypointlabels=[label],
                              labels=[label])
        clicks.append(click)
    body["params"]["context"]["result"] = clicks
    return body


def test_prompt_memory_holds_at_most_prompt_memory_size_masks(base_settings, torch_predictor, images):
    """PROMPT_MEMORY_SIZE bounds the remembered (task, class) masks (256 KiB each), however many classes a
    project has: one class per call, as Label Studio sends, on a few tasks."""
    config = many_labels_config(6)
    backend = make_live_backend(base_settings, torch_predictor, prompt_memory_size=4, refine_masks=True)
    memory = backend.app.extensions["sam_model"].memory
    try:
        for task_id in (901, 902):
            for label in ("L0", "L1", "L2", "L3", "L4", "L5"):
                answer = send(backend.url, labelled_clicks([label], task_id, config))
                assert answer.status_code == 200, answer.text
                remembered = sum(len(task.masks) for task in memory._tasks.values())
                assert remembered <= 4, f"{remembered} masks remembered with PROMPT_MEMORY_SIZE=4"
        # the newest are kept: a further click on the last class still refines its previous mask
        newest = list(memory._tasks.values())[-1]
        assert ("brush", "L5") in newest.masks and ("brush", "L4") in newest.masks
    finally:
        backend.close()


# ---- server faults -----------------------------------------------------------------------------------------------
class ExplodingPredictor:
    """A test double for the server-fault test only: embeds to zeros, and its decode (or embed) raises."""

    model_version = "exploding-test-double"

    def __init__(self, where: str) -> None:
        self.where = where

    def embed(self, image, original_size=None):
        from sam_backend.sam.types import Embedding

        if self.where == "embed":
            raise RuntimeError("encoder exploded at /opt/secret/internal/path.py")
        return Embedding(np.zeros((1, 256, 64, 64), np.float32), original_size or image.shape[:2], (1024, 1024))

    def decode(self, embedding, prompt):
        raise RuntimeError("decoder exploded at /opt/secret/internal/path.py")


@pytest.mark.parametrize("where", ["decode", "embed"])
def test_a_server_fault_is_a_500_json_without_traceback_and_is_logged(base_settings, images, caplog, where):
    caplog.set_level(logging.INFO)
    backend = make_live_backend(base_settings, ExplodingPredictor(where))
    try:
        answer = send(backend.url, click_body())
        assert answer.status_code == 500
        assert answer.headers["Content-Type"].startswith("application/json")
        error = answer.json()["error"]
        assert "internal error" in error and "RuntimeError" in error
        for leak in ("Traceback", "exploded", "/opt/secret", 'File "', "line "):
            assert leak not in answer.text
        assert_healthy(backend.url)
        assert send(backend.url, click_body(keypointlabels=["Zebra"], labels=["Zebra"])).status_code == 422
    finally:
        backend.close()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert failures, "the fault was not logged with its traceback"
    text = logging.Formatter().formatException(failures[0].exc_info)
    assert "Traceback" in text and f"in {where}" in text and "exploded" in text
    assert "POST /predict" in failures[0].getMessage()


# ---- end-to-end SSRF and traversal through /predict ---------------------------------------------------------------
@pytest.fixture()
def not_label_studio():
    """A loopback web server on 127.0.0.2 serving a JPEG to anyone: not Label Studio, so never to be fetched."""
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.fromarray(CHELSEA).save(buffer, format="JPEG")
    server = LoopbackServer(static(buffer.getvalue(), headers={"Content-Type": "image/jpeg"}), "127.0.0.2")
    yield server.url, server.requests
    server.stop()


def test_a_loopback_server_that_is_not_label_studio_is_refused(live_backend, images, not_label_studio):
    url, hits = not_label_studio
    for image in (f"{url}/cat.jpg", f"{url}/data/upload/7/chelsea.jpg?token=abc",
                  f"http://127.0.0.2:{url.rsplit(':', 1)[1]}/x.jpg", f"http://[::ffff:127.0.0.2]:{url.rsplit(':', 1)[1]}/x.jpg"):
        body = body_for("keypoints_positive_and_negative", image)
        answer = send(live_backend.url, body)
        assert_json_error(answer, 403, "127.0.0.2")
        assert "abc" not in answer.text
    assert hits == [], "the backend connected to a forbidden address"
    assert_healthy(live_backend.url)


def test_local_files_traversal_never_returns_the_file(base_settings, torch_predictor, images, tmp_path):
    root = tmp_path / "files"
    (root / "photos").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("root:x:0:0:secret outside the document root\n")
    (root / "photos" / "escape").symlink_to(tmp_path / "secret.txt")
    backend = make_live_backend(base_settings, torch_predictor, local_files_root=root)
    try:
        for reference in ("/data/local-files/?d=../../etc/passwd", "/data/local-files/?d=../secret.txt",
                          "/data/local-files/?d=photos/../../secret.txt", "/data/local-files/?d=%2e%2e/secret.txt",
                          "/data/local-files/?d=/etc/passwd", "/data/local-files/?d=photos/escape",
                          "/data/local-files/?d=photos/../../../../../../etc/passwd"):
            answer = send(backend.url, body_for("keypoints_positive_and_negative", reference))
            assert answer.status_code in (403, 404), (reference, answer.status_code, answer.text)
            assert answer.headers["Content-Type"].startswith("application/json")
            assert "error" in answer.json()
            assert "root:x:0:0" not in answer.text and "secret outside" not in answer.text
        assert_healthy(backend.url)
    finally:
        backend.close()


def test_local_files_fifos_and_links_neither_hang_nor_escape(base_settings, torch_predictor, tmp_path):
    """A FIFO under the root used to hang the request thread (opened before the regular-file check), and a folder
    swapped for a link between the path check and the open escaped the root: now nothing blocks and no link is
    followed (the file is opened component by component from the root)."""
    import os

    root = tmp_path / "files"
    (root / "photos").mkdir(parents=True)
    os.mkfifo(root / "photos" / "pipe.jpg")
    (root / "linked").symlink_to(tmp_path)  # as if swapped in for a real folder after a check
    (tmp_path / "secret.jpg").write_bytes(b"secret outside the root")
    backend = make_live_backend(base_settings, torch_predictor, local_files_root=root)
    try:
        started = time.monotonic()
        answer = send(backend.url, body_for("keypoints_positive_and_negative", "/data/local-files/?d=photos/pipe.jpg"))
        assert_json_error(answer, 404, "not a regular file")
        assert time.monotonic() - started < 30
        answer = send(backend.url, body_for("keypoints_positive_and_negative", "/data/local-files/?d=linked/secret.jpg"))
        assert_json_error(answer, 403, "symbolic link")
        assert "secret outside" not in answer.text
        assert_healthy(backend.url)
    finally:
        backend.close()


def test_a_local_file_replaced_in_place_is_read_again(base_settings, torch_predictor, tmp_path):
    """IMAGE_URL_TTL reused a local file's old content for 600 s: a file replaced by one of another size gave 400
    (size mismatch) and one of the same size silently stale masks. Only Label Studio's uploads are reused now."""
    import cv2

    root = tmp_path / "files"
    root.mkdir()
    photo = scene("star-astronaut-brick", (300, 451)).image
    cv2.imwrite(str(root / "task.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    backend = make_live_backend(base_settings, torch_predictor, local_files_root=root)
    try:
        body = body_for("keypoints_positive_and_negative", "/data/local-files/?d=task.png")
        first = send(backend.url, body)
        assert first.status_code == 200, first.text
        flipped = np.ascontiguousarray(photo[:, ::-1])  # same size, other content
        cv2.imwrite(str(root / "task.png"), cv2.cvtColor(flipped, cv2.COLOR_RGB2BGR))
        second = send(backend.url, body)
        assert second.status_code == 200, second.text
        masks = [decode_rle(r.json()["results"][0]["result"][0]["value"]["rle"]) for r in (first, second)]
        assert not np.array_equal(masks[0], masks[1]), "the replaced file was not read again"
    finally:
        backend.close()


def test_setup_hostname_counts_only_from_the_label_studio_it_names(base_settings, torch_predictor, images):
    """Without LABEL_STUDIO_URL, /setup's hostname and token become the project's image source: only when the
    call comes from that host, so a stranger cannot point a project's downloads at an internal address."""
    backend = make_live_backend(base_settings, torch_predictor, label_studio_url="", label_studio_api_key="")
    try:
        body = body_for("keypoints_positive_and_negative")
        for hostname in ("http://10.255.0.1:9", "http://169.254.169.254"):
            setup = {"project": body["project"], "hostname": hostname, "access_token": LS_TOKEN, "schema": ""}
            assert send(backend.url, setup, "/setup").status_code == 200
            assert_json_error(send(backend.url, body), 400, "no Label Studio is known")
        setup["hostname"] = images.url  # Label Studio on 127.0.0.1, the address the call comes from
        assert send(backend.url, setup, "/setup").status_code == 200
        answer = send(backend.url, body)
        assert answer.status_code == 200 and answer.json()["results"][0]["result"], answer.text
    finally:
        backend.close()


@pytest.mark.parametrize("image", ["s3://bucket/\ud800.png", "http://us\udfffer:pw@127.0.0.1:9/a.png"])
def test_a_lone_surrogate_in_an_image_url_is_a_400(live_backend, image):
    """JSON's \\ud800 escapes decode to lone surrogates; encoding them for the URL was a 500 with a traceback."""
    answer = send(live_backend.url, body_for("keypoints_positive_and_negative", image))
    assert_json_error(answer, 400, "surrogate")
    assert_healthy(live_backend.url)


def test_an_interactive_call_is_for_one_task(live_backend):
    """Label Studio's smart tools send the task being annotated; a context over 100 tasks decoded all of them."""
    body = body_for("keypoints_positive_and_negative")
    body["tasks"] = [copy.deepcopy(body["tasks"][0]) for _ in range(100)]
    started = time.monotonic()
    answer = send(live_backend.url, body)
    assert_json_error(answer, 400, "100 tasks")
    assert "interactive" in answer.json()["error"] and time.monotonic() - started < 10
    assert_healthy(live_backend.url)


def test_a_batch_has_at_most_max_tasks_per_call(live_backend, base_settings, torch_predictor):
    """2 MB of empty tasks gave 698,850 results in a 41 MB answer; now a 413 naming the setting, before any work."""
    body = body_for("retrieve_predictions")
    body["tasks"] = [{}] * 699_000
    answer = send(live_backend.url, Raw(json.dumps(body).encode()))
    assert_json_error(answer, 413, "MAX_TASKS_PER_CALL=10000")
    assert len(answer.content) < 1000
    small = make_live_backend(base_settings, torch_predictor, max_tasks_per_call=3)
    try:
        body["tasks"] = [copy.deepcopy(body_for("retrieve_predictions")["tasks"][0]) for _ in range(3)]
        assert send(small.url, body).status_code == 200
        body["tasks"].append(body["tasks"][0])
        assert_json_error(send(small.url, body), 413, "4 tasks, more than MAX_TASKS_PER_CALL=3")
        assert_healthy(small.url)
    finally:
        small.close()


# ---- HTTP Basic auth ----------------------------------------------------------------------------------------------
USER, PASSWORD = "labeler", "s3cret-pässwörd:with:colons"


@pytest.fixture(scope="module")
def guarded(base_settings, torch_predictor):
    backend = make_live_backend(base_settings, torch_predictor, basic_auth_user=USER, basic_auth_pass=PASSWORD)
    yield backend
    backend.close()


def basic(user: str, password: str, encoding: str = "utf-8", scheme: str = "Basic") -> dict:
    token = base64.b64encode(f"{user}:{password}".encode(encoding)).decode()
    return {"Authorization": f"{scheme} {token}"}


def route_calls() -> list[tuple[str, str, Any]]:
    return [("GET", "/", None), ("GET", "/health", None), ("GET", "/metrics", None),
            ("POST", "/setup", recorded("add_model", "/setup")),
            ("POST", "/predict", click_body()),
            ("POST", "/webhook", {"action": "ANNOTATION_CREATED"}),
            ("GET", "/no/such/route", None), ("OPTIONS", "/predict", None)]


def call(backend, method: str, path: str, body: Any, **kwargs) -> requests.Response:
    data = None if body is None else json.dumps(body)
    return requests.request(method, backend.url + path, data=data, timeout=120,
                            headers={"Content-Type": "application/json", **kwargs.pop("headers", {})}, **kwargs)


WRONG = {
    "no header": {},
    "empty header": {"Authorization": ""},
    "wrong password": basic(USER, "s3cret-passw0rd"),
    "wrong user": basic("admin", PASSWORD),
    "password only": basic("", PASSWORD),
    "user only": {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},
    "password prefix": basic(USER, PASSWORD[:-1]),
    "scheme without credentials": {"Authorization": "Basic"},
    "not base64": {"Authorization": "Basic !!!not*base64!!!"},
    "base64 of binary": {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe\x00:\x80").decode()},
    "a bearer token": {"Authorization": f"Bearer {PASSWORD}"},
    "Label Studio's token scheme": {"Authorization": f"Token {LS_TOKEN}"},
    "credentials in the wrong order": basic(PASSWORD, USER),
    "two schemes": {"Authorization": basic(USER, PASSWORD)["Authorization"] + ", Basic abc"},
}


@pytest.mark.parametrize("wrong", list(WRONG), ids=list(WRONG))
def test_every_route_refuses_missing_or_wrong_credentials(guarded, images, wrong):
    for method, path, body in route_calls():
        answer = call(guarded, method, path, body, headers=WRONG[wrong])
        assert answer.status_code == 401, (method, path, answer.status_code, answer.text[:200])
        assert answer.json() == {"error": "authentication required"}
        assert answer.headers["WWW-Authenticate"].startswith("Basic ")
        assert PASSWORD not in answer.text


def test_a_refused_request_is_not_parsed(guarded):
    """401 comes before the body is read: no hint of what the body would have caused."""
    for body in (Raw(b"{oops"), Raw(b'{"tasks": ' + b"1" * 5000 + b"}"), deep(100_000)):
        assert send(guarded.url, body).status_code == 401
    assert send(guarded.url, Raw(b"x" * (17 << 20))).status_code in (401, 413)


RIGHT = {
    "utf-8 (curl, browsers)": basic(USER, PASSWORD, "utf-8"),
    "latin-1 (python-requests, as Label Studio sends it)": basic(USER, PASSWORD, "latin-1"),
    "lower-case scheme": basic(USER, PASSWORD, scheme="basic"),
}


@pytest.mark.parametrize("right", list(RIGHT), ids=list(RIGHT))
def test_every_route_answers_with_the_right_credentials(guarded, images, right):
    expected = {"/": 200, "/health": 200, "/metrics": 200, "/setup": 200, "/predict": 200, "/webhook": 200,
                "/no/such/route": 404}
    for method, path, body in route_calls():
        answer = call(guarded, method, path, body, headers=RIGHT[right])
        if method == "OPTIONS":
            assert answer.status_code == 200 and "POST" in answer.headers["Allow"]
            continue
        assert answer.status_code == expected[path], (path, answer.status_code, answer.text[:300])
        assert answer.headers["Content-Type"].startswith("application/json")
    answer = call(guarded, "POST", "/predict", click_body(), headers=RIGHT[right])
    assert len(answer.json()["results"][0]["result"]) == 1


def test_label_studio_basic_auth_setting_works(guarded, images):
    """Label Studio's ML backend connection with "basic auth" on: python-requests' HTTPBasicAuth, as in
    label_studio/ml/api_connector.py (the same library Label Studio uses to call the backend)."""
    session = requests.Session()
    session.auth = requests.auth.HTTPBasicAuth(USER, PASSWORD)
    assert session.get(guarded.url + "/health", timeout=10).status_code == 200
    assert session.post(guarded.url + "/setup", json=recorded("add_model", "/setup"), timeout=30).status_code == 200
    answer = session.post(guarded.url + "/predict", json=click_body(), timeout=120)
    assert answer.status_code == 200 and len(answer.json()["results"][0]["result"]) == 1
    session.auth = requests.auth.HTTPBasicAuth(USER, "wrong")
    assert session.get(guarded.url + "/health", timeout=10).status_code == 401


def test_without_auth_settings_no_credentials_are_needed(live_backend):
    assert requests.get(live_backend.url + "/health", timeout=10).status_code == 200
    assert requests.get(live_backend.url + "/health", headers=basic("any", "thing"), timeout=10).status_code == 200


# ---- secrets stay secret ------------------------------------------------------------------------------------------
SECRETS = ["SECRETquery0001", "SECRETuser0002", "SECRETfragment0003", "SECRETsig0004", "SECRETsetup0005",
           "SECREThost0006", "SECRETpassword0007", "SECRETbasic0009", LS_TOKEN]


def test_tokens_never_reach_logs_or_answers(base_settings, torch_predictor, images, fake_label_studio, caplog,
                                            not_label_studio):
    caplog.set_level(logging.DEBUG)
    other, _ = not_label_studio
    ls_port = fake_label_studio.url.rsplit(":", 1)[1]
    backend = make_live_backend(base_settings, torch_predictor, log_level="DEBUG")
    guarded = make_live_backend(base_settings, torch_predictor, basic_auth_user=USER,
                                basic_auth_pass="SECRETbasic0009")
    answers = []
    try:
        images_with_secrets = [
            f"{MISSING}?token=SECRETquery0001",
            f"http://leaky:SECRETuser0002@127.0.0.1:{ls_port}{MISSING}",
            f"{fake_label_studio.url}{MISSING}#access_token=SECRETfragment0003",
            f"{other}/cat.jpg?X-Amz-Signature=SECRETsig0004",
            "s3://bucket/cat.jpg",
            f"{IMAGE}?token=SECRETquery0001",
            "http://user:SECRETuser0002@127.0.0.2:1/x.jpg",
            "/data/upload/7/../../api/token?token=SECRETquery0001",
        ]
        setup = recorded("add_model", "/setup")
        setup.update(access_token="SECRETsetup0005", hostname="http://admin:SECREThost0006@127.0.0.1:9")
        answers.append(send(backend.url, setup, path="/setup"))
        for image in images_with_secrets:
            body = body_for("keypoints_positive_and_negative", image)
            body["project"] = setup["project"]
            body["params"].update(login="admin", password="SECRETpassword0007")
            answers.append(send(backend.url, body))
            bad = copy.deepcopy(body)
            region(bad)["value"]["x"] = "not a number"
            answers.append(send(backend.url, bad))
        for headers in (basic(USER, "SECRETbasic0009x"), basic("SECRETbasic0009", "x"), {"Authorization": "x"}):
            answers.append(requests.post(guarded.url + "/predict", json=click_body(), headers=headers, timeout=30))
        # Label Studio refusing a configured key: reported as a bad gateway naming the kind of token, not the token
        wrong_key = make_live_backend(base_settings, torch_predictor, label_studio_api_key="SECRETsetup0005")
        try:
            refused = send(wrong_key.url, click_body())
            assert refused.status_code == 502, refused.text
            assert "legacy token" in refused.json()["error"]
            answers.append(refused)
        finally:
            wrong_key.close()
    finally:
        backend.close()
        guarded.close()
    statuses = [a.status_code for a in answers]
    assert 200 in statuses and 404 in statuses and 403 in statuses and 401 in statuses, statuses
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "fetching image" in logged, "the run did not log at DEBUG"
    texts = [a.text + json.dumps(dict(a.headers)) for a in answers]
    for secret in SECRETS:
        encoded = base64.b64encode(secret.encode()).decode()
        for where, text in [("log", logged)] + [(f"answer {i}", t) for i, t in enumerate(texts)]:
            assert secret not in text and encoded not in text, f"{secret} leaked into the {where}"


def test_a_cloud_uri_with_a_query_does_not_leak_it(live_backend, images):
    body = body_for("keypoints_positive_and_negative", "s3://bucket/cat.jpg?X-Amz-Signature=SECRETs3sig0008")
    answer = send(live_backend.url, body)
    assert answer.status_code == 404, answer.text
    assert "SECRETs3sig0008" not in answer.text
    assert "s3://bucket/cat.jpg" in answer.text, "the message should name the cloud URI (redacted)"
    for encoded in re.findall(r"fileuri=([A-Za-z0-9_=-]+)", answer.text):
        assert b"SECRETs3sig0008" not in base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def test_an_image_size_mismatch_does_not_leak_url_credentials(live_backend, images, fake_label_studio):
    ls_port = fake_label_studio.url.rsplit(":", 1)[1]
    for image in (f"http://leaky:SECRETuser0002@127.0.0.1:{ls_port}{IMAGE}",
                  f"{fake_label_studio.url}{IMAGE}#access_token=SECRETfragment0003"):
        body = body_for("keypoints_positive_and_negative", image)
        region(body)["original_width"] = 1000
        answer = send(live_backend.url, body)
        assert answer.status_code == 400 and "1000x300" in answer.json()["error"], answer.text
        assert "SECRET" not in answer.text


# ---- concurrency -------------------------------------------------------------------------------------------------
NATIVE_CLASSES = ("Cat", "Dog")
ALIAS_CLASSES = ("1", "2")


def concurrency_jobs(fake_label_studio) -> list[dict]:
    """Clicks, boxes and click pairs of two classes in each convention, on five images of four sizes."""
    paths = []  # (path, (height, width))
    for index, (name, size) in enumerate([("horse-coffee-grass", (300, 451)), ("ellipse-chelsea-gravel", (240, 320)),
                                          ("star-astronaut-brick", (400, 300)), ("star-chelsea-grass", (300, 451)),
                                          ("ellipse-coffee-hubble", (256, 256))]):
        paths.append((fake_label_studio.add_image(f"/data/upload/8/{index}-{name}.jpg", scene(name, size).image), size))
    jobs = []
    for number, (path, (height, width)) in enumerate(paths):
        for convention in ("native", "alias"):
            classes = NATIVE_CLASSES if convention == "native" else ALIAS_CLASSES
            for kind, label in (("click", classes[0]), ("box", classes[1]), ("clicks", classes[1])):
                if convention == "native":
                    body = body_for("rectangle" if kind == "box" else "keypoints_positive_and_negative", path)
                else:
                    body = body_for("alias_rectangle" if kind == "box" else "alias_positive_keypoint", path)
                first = region(body)
                first.update(original_width=width, original_height=height)  # as the editor measures them
                key = "rectanglelabels" if kind == "box" else "keypointlabels"
                first["value"][key] = [label]
                first["value"].pop("labels", None)
                if kind == "box":
                    first["value"].update(x=20 + 5 * number, y=15, width=50, height=60)
                else:
                    first["value"].update(x=45 + number, y=55)
                    clicks = [first]
                    if kind == "clicks":  # native: a positive and a negative click; alias: two positive clicks
                        second = copy.deepcopy(first)  # (the alias convention's negatives come alone, as -N)
                        second["id"] = "second"
                        if convention == "native":
                            second["value"].update(x=10, y=10)
                            second["is_positive"] = False
                        else:
                            second["value"].update(x=30, y=40)
                        clicks.append(second)
                    body["params"]["context"]["result"] = clicks
                jobs.append(body)
    return jobs


def test_many_threads_on_mixed_images_classes_and_conventions_get_the_single_threaded_answers(
        live_backend, fake_label_studio):
    jobs = concurrency_jobs(fake_label_studio)
    assert len(jobs) == 30

    def run(body: dict, task_id: int) -> np.ndarray:
        body = copy.deepcopy(body)
        body["tasks"][0]["id"] = task_id  # each answer on its own task: no prompt memory shared between jobs
        answer = send(live_backend.url, body)
        assert answer.status_code == 200, answer.text
        (result,) = answer.json()["results"][0]["result"]
        label = (region(body)["value"].get("keypointlabels") or region(body)["value"]["rectanglelabels"])[0]
        assert result["value"]["brushlabels"] == [label]
        return decoded(answer)

    alone = [run(body, 10_000 + index) for index, body in enumerate(jobs)]

    def chatter(step: int) -> int:
        """Calls Label Studio makes between predictions: health, setup of both projects, metrics, webhooks."""
        if step % 4 == 0:
            return requests.get(live_backend.url + "/health", timeout=30).status_code
        if step % 4 == 1:
            name = "add_model" if step % 8 == 1 else "add_model_alias"
            return send(live_backend.url, recorded(name, "/setup"), path="/setup").status_code
        if step % 4 == 2:
            return requests.get(live_backend.url + "/metrics", timeout=30).status_code
        return send(live_backend.url, {"action": "ANNOTATION_UPDATED"}, path="/webhook").status_code

    # every job twice (on two tasks), and Label Studio's other calls, shuffled together
    work = [("job", index, repeat) for index in range(len(jobs)) for repeat in (0, 1)]
    work += [("chatter", step, 0) for step in range(40)]
    np.random.default_rng(6).shuffle(work)

    def do(item):
        kind, index, repeat = item
        if kind == "job":
            return index, run(jobs[index], 20_000 + 1_000 * repeat + index)
        return None, chatter(index)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(do, work))
    compared = 0
    for index, value in results:
        if index is None:
            assert value == 200
            continue
        assert np.array_equal(value, alone[index]), f"job {index} differs under concurrency"
        compared += 1
    assert compared == 2 * len(jobs)


# ---- start-up ----------------------------------------------------------------------------------------------------
def start_gunicorn(tmp_path: Path, timeout: float = 180, **environ: str) -> tuple[int | None, str, float]:
    """Run `gunicorn -c gunicorn.conf.py --bind 127.0.0.1:<free port> _wsgi:app` as users do; (exit code or None
    if still running after `timeout`, its output, seconds)."""
    backend = GunicornBackend(tmp_path / "gunicorn.log", append=False)
    started = time.monotonic()
    backend.launch(environment(environ, drop=("GUNICORN_CMD_ARGS", "BASIC_AUTH_USER", "BASIC_AUTH_PASS")))
    try:
        code = backend.wait(timeout)
    finally:
        backend.stop()
    return code, backend.log_path.read_text(errors="replace"), time.monotonic() - started


@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory, mobile_sam_checkpoint) -> Path:
    path = tmp_path_factory.mktemp("weights") / "mobile_sam.pt"
    with open(mobile_sam_checkpoint, "rb") as source:
        path.write_bytes(source.read(5 << 20))  # a download cut off after 5 MiB
    return path


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage"])
def test_a_missing_or_corrupt_model_stops_the_server_with_a_clear_message(tmp_path, truncated_checkpoint, kind):
    if kind == "missing":
        checkpoint = tmp_path / "nowhere" / "mobile_sam.pt"
    elif kind == "truncated":
        checkpoint = truncated_checkpoint
    else:
        checkpoint = tmp_path / "mobile_sam.pt"
        checkpoint.write_bytes(os.urandom(4096))
    code, stderr, seconds = start_gunicorn(tmp_path, MOBILESAM_CHECKPOINT=str(checkpoint))
    assert code is not None, f"gunicorn kept running for {seconds:.0f} s with a {kind} checkpoint"
    assert code != 0
    assert str(checkpoint) in stderr, stderr[-3000:]
    assert "python -m tools.weights mobile_sam" in stderr, f"no `python -m tools.weights mobile_sam` hint:\n{stderr[-3000:]}"
    assert "weights_only" not in stderr, "torch's advice to load without weights_only reached the message"


@pytest.mark.parametrize("variable,value,message", [
    ("SAM_CHOICE", "foo", "SAM_CHOICE='foo': use MobileSAM, SAM or SAM2"),
    ("EMBEDDING_CACHE_SIZE", "x", "EMBEDDING_CACHE_SIZE='x' is not a whole number"),
    ("EMBEDDING_CACHE_SIZE", "0", "EMBEDDING_CACHE_SIZE must be at least 1"),
    ("BASIC_AUTH_USER", "only-a-user", "set both BASIC_AUTH_USER and BASIC_AUTH_PASS"),
])
def test_a_bad_setting_stops_the_server_with_a_clear_message(tmp_path, variable, value, message):
    code, stderr, seconds = start_gunicorn(tmp_path, timeout=120, **{variable: value})
    assert code is not None and code != 0, f"gunicorn kept running for {seconds:.0f} s with {variable}={value}"
    assert message in stderr, stderr[-3000:]
