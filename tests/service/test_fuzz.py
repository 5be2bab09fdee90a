"""Property-based fuzzing of `/predict` over real HTTP (issue #6): whatever the body, never a 5xx, always JSON.

Bodies are mutations of the ones a real Label Studio 1.23.2 sent (tools/harness/bodies): values of random types at random
paths, special numbers (NaN, infinities, huge, negative, tiny), random strings and labels, missing keys, extra keys,
deep nesting, lists in place of objects and the reverse. Each answer must be either 200 with `results` (one per task)
or a 4xx with a non-empty `error` string, and the server must answer `/health` after it.

No mutation can make the backend reach outside loopback: generated strings contain no `:` (so no URL with a host
or scheme), and the backend under test only allows the image host 127.0.0.1 (other hosts are refused before any
name lookup).
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import requests
import skimage.data
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from conftest import LS_TOKEN, make_live_backend
from tools.harness import recordings

IMAGE = "/data/upload/11/chelsea.jpg"
BASES = recordings.bodies("/predict")

# A known defect outside this suite's files (see tests/test_robustness.py, MODEL_TASK_KEY): an unhashable
# body.project or tasks[i].id is a TypeError -> 500 in model.py. Tolerated here only with exactly that signature.
KNOWN_UNHASHABLE_KEY = "internal error (TypeError)"

LABELS = ["Cat", "Dog", "1", "-1", "2", "-2", "(+1)", "[1]", "1_brush", "Zebra", "", " Cat", "cat", "tag", "tag2",
          "tag3", "tag4", "brush", "image", "keypointlabels", "rectanglelabels", "brushlabels", "polygonlabels"]
KEYS = ["tasks", "data", "image", "params", "context", "result", "value", "x", "y", "width", "height", "rotation",
        "keypointlabels", "rectanglelabels", "labels", "is_positive", "from_name", "to_name", "type", "id",
        "original_width", "original_height", "drafts", "project", "label_config", "__proto__", ""]
SPECIAL_NUMBERS = [math.nan, math.inf, -math.inf, 0, -0.0, -1, -5, 1e-300, 5e-324, 1e308, -1e308, 100, 100.0001,
                   101, 110, 110.5, 1e6, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 10 ** 400, 0.5, 451, 300, 1000]

no_colon = st.characters(blacklist_characters=":", blacklist_categories=("Cs",))
texts = st.one_of(st.text(no_colon, max_size=20), st.sampled_from(LABELS),
                  st.sampled_from([IMAGE, "/data/upload/11/missing.jpg", "/data/local-files/?d=../../etc/passwd",
                                   "s3//bucket/x.jpg", "/data/../api/x", "//evil/x.jpg", "\x00", "é" * 50]))
numbers = st.one_of(st.sampled_from(SPECIAL_NUMBERS), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(min_value=-(10 ** 20), max_value=10 ** 20), st.floats(-20, 120))
leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(no_colon, max_size=8)), children, max_size=4)),
    max_leaves=12)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into `node` (keys and indexes), the root included."""
    found = [prefix]
    if isinstance(node, dict):
        for key, child in node.items():
            found += paths(child, prefix + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += paths(child, prefix + (index,))
    return found


def get(node: Any, path: tuple) -> Any:
    for step in path:
        node = node[step]
    return node


def put(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    get(root, path[:-1])[path[-1]] = value
    return root


class Deep(str):
    """Stands for a value nested `depth` lists deep (json.dumps itself would recurse too deeply to write it)."""


def serialise(body: Any) -> str:
    markers: dict[str, int] = {}

    def swap(node: Any) -> Any:
        if isinstance(node, Deep):
            marker = f"@@deep{len(markers)}@@"
            markers[marker] = int(node)
            return marker
        if isinstance(node, dict):
            return {key: swap(child) for key, child in node.items()}
        if isinstance(node, list):
            return [swap(child) for child in node]
        return node

    text = json.dumps(swap(body), allow_nan=True)
    for marker, depth in markers.items():
        text = text.replace(json.dumps(marker), "[" * depth + "]" * depth)
    return text


@st.composite
def mutated_bodies(draw) -> Any:
    name = draw(st.sampled_from(sorted(BASES)))
    body = copy.deepcopy(BASES[name])
    for task in body["tasks"]:
        task["data"]["image"] = IMAGE
    for _ in range(draw(st.integers(1, 4))):
        every = paths(body)
        # Aim half of the mutations at the regions, where most of the parsing is.
        regions = [p for p in every if p[:2] == ("params", "context")] or every
        path = draw(st.sampled_from(regions)) if draw(st.booleans()) else draw(st.sampled_from(every))
        target = get(body, path)
        parent = get(body, path[:-1]) if path else None
        kind = draw(st.sampled_from(["value", "number", "label", "delete", "extra key", "wrap in list",
                                     "object to list", "list to object", "deep", "empty", "duplicate"]))
        note(f"{kind} at {path!r}")
        if kind == "value":
            body = put(body, path, draw(values))
        elif kind == "number":
            body = put(body, path, draw(numbers))
        elif kind == "label":
            body = put(body, path, draw(st.one_of(st.sampled_from(LABELS), st.lists(st.sampled_from(LABELS),
                                                                                     max_size=3))))
        elif kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "delete" and isinstance(parent, list):
            parent.pop(path[-1])
        elif kind == "extra key" and isinstance(target, dict):
            target[draw(st.one_of(st.sampled_from(KEYS), st.text(no_colon, max_size=8)))] = draw(values)
        elif kind == "wrap in list":
            body = put(body, path, [target])
        elif kind == "object to list" and isinstance(target, dict):
            body = put(body, path, list(target.values()))
        elif kind == "list to object" and isinstance(target, list):
            body = put(body, path, {str(i): v for i, v in enumerate(target)})
        elif kind == "deep":
            body = put(body, path, Deep(draw(st.sampled_from([50, 900, 1100, 5000, 100_000]))))
        elif kind == "empty":
            body = put(body, path, {dict: {}, list: [], str: ""}.get(type(target)))
        elif kind == "duplicate" and isinstance(target, list):
            target.extend(copy.deepcopy(target[:draw(st.integers(0, 3))]))
    return body


@pytest.fixture(scope="module")
def fuzz_backend(base_settings, torch_predictor, fake_label_studio):
    fake_label_studio.add_image(IMAGE, skimage.data.chelsea())
    backend = make_live_backend(base_settings, torch_predictor, allowed_hosts=("127.0.0.1",))
    yield backend
    backend.close()


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(body=mutated_bodies())
def test_any_mutated_body_gets_json_and_never_a_5xx(fuzz_backend, body):
    text = serialise(body)
    answer = requests.post(fuzz_backend.url + "/predict", data=text, timeout=120,
                           headers={"Content-Type": "application/json"})
    note(f"{answer.status_code} {answer.text[:300]}")
    event(f"HTTP {answer.status_code}")
    assert answer.headers["Content-Type"].startswith("application/json")
    answered = answer.json()
    assert isinstance(answered, dict)
    assert LS_TOKEN not in answer.text and "Traceback" not in answer.text
    if answer.status_code == 500 and answered.get("error", "").startswith(KNOWN_UNHASHABLE_KEY) and \
            unhashable_key(body):
        event("known model.py defect: unhashable project or task id")
    elif answer.status_code == 200:
        assert isinstance(answered["results"], list)
        assert len(answered["results"]) == len(body["tasks"])
        for task in answered["results"]:
            assert isinstance(task["result"], list)
            for region in task["result"]:
                assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    else:
        assert 400 <= answer.status_code < 500, f"{answer.status_code}: {answer.text[:500]}"
        assert isinstance(answered["error"], str) and answered["error"]
    health = requests.get(fuzz_backend.url + "/health", timeout=30)
    assert health.status_code == 200


def unhashable_key(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    unhashable = (dict, list)
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    return isinstance(body.get("project"), unhashable) or any(
        isinstance(task, dict) and isinstance(task.get("id"), unhashable) for task in tasks)


def test_the_mutations_reach_deep_and_special_values():
    """The generator itself: it must produce the kinds of bodies the property is about."""
    seen = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(body=mutated_bodies())
    def collect(body):
        text = serialise(body)
        if "[" * 900 in text:
            seen.add("deep")
        if "NaN" in text or "Infinity" in text:
            seen.add("special")
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            seen.add("broken tasks")
        context = body.get("params", {}).get("context") if isinstance(body, dict) and isinstance(
            body.get("params"), dict) else None
        if isinstance(context, dict) and isinstance(context.get("result"), list) and any(
                isinstance(r, dict) and isinstance(r.get("value"), dict) and
                not isinstance(r["value"].get("x"), (int, float)) for r in context["result"]):
            seen.add("bad coordinate")

    collect()
    assert seen == {"deep", "special", "broken tasks", "bad coordinate"}, seen
