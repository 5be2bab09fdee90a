"""The torch predictor with real MobileSAM weights on real photos and on images with known masks."""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
import torch

import advanced_sam
from sam_backend.sam import transforms
from sam_backend.sam.types import Prompt
from tools.harness.scenes import interior_point, iou, scene

# Scenes whose object is one colour region; "horse-rocket-motorcycle" is two-toned on purpose (benchmark only).
CLEAR_SCENES = ["horse-coffee-grass", "ellipse-chelsea-gravel", "star-astronaut-brick", "ellipse-coffee-hubble",
                "star-chelsea-grass"]


def click(x, y, positive=True):
    return np.array([[x, y]], np.float32), np.array([1 if positive else 0], np.int32)


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.fixture(scope="module")
def embedded(torch_predictor):
    return {name: torch_predictor.embed(scene(name).image) for name in CLEAR_SCENES}


@pytest.mark.parametrize("name", CLEAR_SCENES)
def test_one_click_inside_an_object_finds_it(torch_predictor, embedded, name):
    truth = scene(name).mask
    points, labels = click(*interior_point(truth))
    prediction = torch_predictor.decode(embedded[name], Prompt(points, labels))
    assert prediction.mask.shape == truth.shape
    assert iou(prediction.mask, truth) >= 0.85
    assert prediction.score > 0.5  # predicted IoU; can exceed 1 slightly (a regression head)


@pytest.mark.parametrize("name", CLEAR_SCENES)
def test_box_only_finds_the_object(torch_predictor, embedded, name):
    truth = scene(name).mask
    prediction = torch_predictor.decode(embedded[name], Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32),
                                                               box=box_of(truth)))
    assert iou(prediction.mask, truth) >= 0.85


def test_negative_click_removes_a_region(torch_predictor):
    """On chelsea a click on the forehead takes the whole head; a negative click on the ear takes it away."""
    embedding = torch_predictor.embed(skimage.data.chelsea())
    forehead, ear = (135.0, 120.0), (340.0, 30.0)
    with_ear = torch_predictor.decode(embedding, Prompt(*click(*forehead))).mask
    assert with_ear[int(ear[1]), int(ear[0])], "the positive click alone should cover the ear"
    both = Prompt(np.array([forehead, ear], np.float32), np.array([1, 0], np.int32))
    without = torch_predictor.decode(embedding, both).mask
    assert not without[int(ear[1]), int(ear[0])]
    assert without[int(forehead[1]), int(forehead[0])]
    assert without.sum() < 0.97 * with_ear.sum()
    assert iou(without, with_ear) > 0.8, "the rest of the head stays"


def test_box_plus_points_mixes_prompts(torch_predictor, embedded):
    truth = scene("star-astronaut-brick").mask
    points, labels = click(*interior_point(truth))
    prediction = torch_predictor.decode(embedded["star-astronaut-brick"],
                                        Prompt(points, labels, box=box_of(truth)))
    assert iou(prediction.mask, truth) >= 0.9


def test_masks_match_the_official_predictor(torch_predictor):
    """Our stateless decode equals mobile_sam.SamPredictor's for every prompt kind."""
    from mobile_sam import SamPredictor

    image = skimage.data.coffee()
    embedding = torch_predictor.embed(image)
    official = SamPredictor(torch_predictor.model)
    official.set_image(image)
    assert np.array_equal(official.features.numpy(), embedding.features)
    prompts = [
        Prompt(*click(300, 200)),
        Prompt(np.array([[300, 200], [100, 50]], np.float32), np.array([1, 0], np.int32)),
        Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32), box=np.array([150, 50, 500, 380], np.float32)),
        Prompt(*click(300, 200), box=np.array([150, 50, 500, 380], np.float32)),
    ]
    for prompt in prompts:
        ours = torch_predictor.decode(embedding, prompt)
        masks, scores, logits = official.predict(
            point_coords=prompt.points if len(prompt.points) else None,
            point_labels=prompt.labels if len(prompt.points) else None,
            box=prompt.box, multimask_output=prompt.is_ambiguous)
        # of the reference's three masks, ours takes the one transforms.whole_object names (not the argmax)
        best = transforms.whole_object(logits, scores, embedding.input_size) if prompt.is_ambiguous else 0
        assert iou(ours.mask, masks[best]) >= 0.999
        assert ours.score == pytest.approx(float(scores[best]), abs=1e-4)


def test_threads_get_the_masks_they_get_alone(torch_predictor):
    """Four threads embedding and decoding different images at once get exactly the single-thread masks."""
    names = CLEAR_SCENES[:4]

    def run(name):
        truth = scene(name).mask
        embedding = torch_predictor.embed(scene(name).image)
        return torch_predictor.decode(embedding, Prompt(*click(*interior_point(truth)))).mask

    alone = {name: run(name) for name in names}
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(names, pool.map(run, names)))
    for name in names:
        assert np.array_equal(alone[name], together[name]), name


def test_missing_and_corrupt_checkpoints_say_how_to_fetch(tmp_path):
    with pytest.raises(advanced_sam.CheckpointError, match="tools.weights mobile_sam"):
        advanced_sam.build_sam("vit_t", tmp_path / "nope.pt", torch.device("cpu"))
    corrupt = tmp_path / "mobile_sam.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(advanced_sam.CheckpointError, match="not a valid vit_t checkpoint"):
        advanced_sam.build_sam("vit_t", corrupt, torch.device("cpu"))


def test_device_choice_is_explicit():
    assert advanced_sam.choose_device("cpu").type == "cpu"
    assert advanced_sam.choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(advanced_sam.CheckpointError, match="no CUDA device"):
            advanced_sam.choose_device("cuda")


def test_eval_after_loading_refreshes_tinyvit_attention_biases(mobile_sam_checkpoint):
    """MobileSAM's builder calls eval() before loading; our builder must leave the cached biases current."""
    model = advanced_sam.build_sam("vit_t", mobile_sam_checkpoint, torch.device("cpu"))
    stale = [m for m in model.image_encoder.modules()
             if hasattr(m, "ab") and not torch.equal(m.ab, m.attention_biases[:, m.attention_bias_idxs])]
    assert not stale


def _nice_of_threads() -> dict[int, int]:
    """tid -> nice value of every thread of this process (field 19 of /proc/self/task/<tid>/stat)."""
    values = {}
    for task in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{task}/stat").read()
        except OSError:
            continue
        values[int(task)] = int(stat.rsplit(")", 1)[1].split()[16])
    return values


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_the_encoder_runs_at_lower_priority_and_decodes_single_threaded(mobile_sam_checkpoint):
    """Clicks before embeddings (issue #16): the embedding's threads, OpenMP's included, run at ENCODER_NICE; a
    decode runs in its caller's thread with DECODE_THREADS=1, at the caller's priority, and its masks are those of
    the default thread count."""
    predictor = advanced_sam.TorchSamPredictor.load("vit_t", mobile_sam_checkpoint, "cpu", threads=2,
                                                    decode_threads=1, encoder_nice=7)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = set(_nice_of_threads())
    seen: list[int] = []
    original = predictor.model.image_encoder.forward

    def spy(*args, **kwargs):  # inside the encoder: which thread, at which priority, how many intra-op threads
        seen.extend([os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), torch.get_num_threads()])
        return original(*args, **kwargs)

    predictor.model.image_encoder.forward = spy
    image = scene("ellipse-chelsea-gravel").image
    embedding = predictor.embed(image)
    assert seen == [min(base + 7, 19), 2]
    new_threads = {tid: nice for tid, nice in _nice_of_threads().items() if tid not in before}
    assert new_threads and set(new_threads.values()) == {min(base + 7, 19)}  # the lane and its OpenMP team

    truth = scene("ellipse-chelsea-gravel").mask
    points, labels = click(*interior_point(truth))
    single = predictor.decode(embedding, Prompt(points, labels))
    assert torch.get_num_threads() == 1 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    predictor.decode_threads = 0
    default = predictor.decode(embedding, Prompt(points, labels))
    assert iou(single.mask, default.mask) >= 0.999 and iou(single.mask, truth) >= 0.85
