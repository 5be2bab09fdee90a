"""The server over real HTTP on a random-init SAM 2.1 tiny, answering the bodies a real Label Studio sent.

Refinement is off (base_settings), so each mask is a pure function of its prompt, recomputed here with the same
predictor on the very JPEG the server downloads.
"""
from __future__ import annotations

import numpy as np
import pytest
import requests
import torch

from sam_backend.sam.types import Prompt
from tools.harness.recordings import CHELSEA, bodies, decoded, recorded, with_image

sam2_predictor = pytest.importorskip("sam2_predictor")
H, W = CHELSEA.shape[:2]


@pytest.fixture(scope="module")
def sam2_tiny():
    torch.manual_seed(0)
    return sam2_predictor.Sam2Predictor.load("tiny", None, "cpu", model_version="SAM2.1-tiny-random")


@pytest.fixture(scope="module")
def backend(base_settings, sam2_tiny):
    from conftest import make_live_backend

    server = make_live_backend(base_settings, sam2_tiny)
    yield server
    server.close()


@pytest.fixture(scope="module")
def chelsea_path(fake_label_studio):
    return fake_label_studio.add_image("/data/upload/7/chelsea-sam2.jpg", CHELSEA)


@pytest.fixture(scope="module")
def chelsea_embedding(sam2_tiny, fake_label_studio, chelsea_path):
    from sam_backend.images import ImageLoader

    return sam2_tiny.embed(ImageLoader.decode(fake_label_studio.files[chelsea_path], 10**8))


def post(backend, body, path="/predict"):
    return requests.post(backend.url + path, json=body, timeout=300)


def px(value):
    return value["x"] * W / 100, value["y"] * H / 100


def test_every_recorded_body_gets_an_answer(backend, chelsea_path):
    """Each /predict body Label Studio sent (clicks, boxes, aliases, opening a task, retrieving predictions)
    gets a 200 with one result per task; those with a prompt get a W x H brush mask from SAM 2.1."""
    for name, body in bodies("/predict").items():
        body = with_image(body, chelsea_path)
        answer = post(backend, body)
        assert answer.status_code == 200, (name, answer.text)
        results = answer.json()["results"]
        assert len(results) == len(body["tasks"]), name
        if (body.get("params") or {}).get("context"):
            regions = [r for r in results[0]["result"] if r["type"] == "brushlabels"]
            assert regions, name
            assert results[0]["model_version"] == "SAM2.1-tiny-random", name
            assert decoded(regions[0]).shape == (H, W), name


def test_clicks_give_the_predictors_mask(backend, sam2_tiny, chelsea_embedding, chelsea_path):
    body = with_image(recorded("keypoints_positive_and_negative"), chelsea_path, task_id=701)
    (region,) = post(backend, body).json()["results"][0]["result"]
    clicks = body["params"]["context"]["result"]
    points = np.array([px(c["value"]) for c in clicks], np.float32)
    labels = np.array([1 if c.get("is_positive", True) else 0 for c in clicks], np.int32)
    expected = sam2_tiny.decode(chelsea_embedding, Prompt(points, labels)).mask
    # the server decodes from its float16 cache; float32 here: a few border pixels may differ
    assert (decoded(region) != expected).mean() < 0.002


def test_rectangle_gives_the_predictors_mask(backend, sam2_tiny, chelsea_embedding, chelsea_path):
    body = with_image(recorded("rectangle"), chelsea_path, task_id=702)
    (rect,) = body["params"]["context"]["result"]
    value = rect["value"]
    box = np.array([value["x"] * W / 100, value["y"] * H / 100, (value["x"] + value["width"]) * W / 100,
                    (value["y"] + value["height"]) * H / 100], np.float32)
    (region,) = post(backend, body).json()["results"][0]["result"]
    expected = sam2_tiny.decode(chelsea_embedding, Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32),
                                                          box=box)).mask
    assert (decoded(region) != expected).mean() < 0.002


def test_setup_names_the_sam2_model(backend):
    answer = post(backend, recorded("add_model", "/setup"), "/setup")
    assert answer.status_code == 200 and answer.json()["model_version"] == "SAM2.1-tiny-random"
