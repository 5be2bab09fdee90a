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
        best = transforms.whole_object(logits, scores, embedding.input_size, transforms.margin_for(prompt)) \
            if prompt.is_ambiguous else 0
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


def _reference_and_ours(decoder, prompt_encoder, seed, reassociate=None, clicks=2):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 256, 64, 64, generator=generator)
    coords = torch.rand(1, clicks + 2, 2, generator=generator) * 1024
    labels = torch.tensor([[1, 0] * (clicks // 2) + [1] * (clicks % 2) + [2, 3]])
    mask = torch.randn(1, 1, 256, 256, generator=generator) * 4
    with torch.inference_mode():
        sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=mask)
        image_pe = prompt_encoder.get_dense_pe()
        reference = decoder.predict_masks(features, image_pe, sparse, dense)
        ours = advanced_sam.predict_masks(decoder, features, image_pe, sparse, dense, reassociate)
    return reference, ours


@pytest.mark.parametrize("seed, reassociate, clicks", [(0, None, 2), (1, None, 2), (0, False, 2), (2, True, 1),
                                                        (3, True, 24), (3, None, 24)])
def test_the_matrix_product_head_is_sams_mask_decoder(sam_model, seed, reassociate, clicks):
    """`predict_masks` (the output head as matrix products, the attention in the image's channels
    (`two_way_transformer`), in the ONNX export too) against MobileSAM's own `MaskDecoder.predict_masks`, with
    the real weights, clicks, a box and a mask input; each form of the attention, for few clicks and many."""
    (masks, iou_pred), (ours, our_iou) = _reference_and_ours(sam_model.mask_decoder, sam_model.prompt_encoder, seed,
                                                             reassociate, clicks)
    assert ours.shape == masks.shape == (1, 4, 256, 256)
    assert torch.allclose(ours, masks, atol=2e-4, rtol=0)
    assert torch.allclose(our_iou, iou_pred, atol=1e-5, rtol=0)
    assert ((ours > 0) != (masks > 0)).float().mean() < 1e-4


@pytest.mark.parametrize("reassociate", [False, True])
def test_the_matrix_product_head_is_segment_anythings_mask_decoder(reassociate):
    """The same for segment_anything's decoder (that of ViT-B/L/H), random weights of its ViT-H layout."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(3)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)).eval()
    for module in decoder.modules():  # SAM initialises its norms to identity; random ones test the layout
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                   mask_in_chans=16).eval()
    for module in decoder.modules():  # random biases too: the attention's key bias must cancel, the others not
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.bias, 0.0, 0.3)
    (masks, iou_pred), (ours, our_iou) = _reference_and_ours(decoder, prompt_encoder, 4, reassociate)
    assert torch.allclose(ours, masks, atol=2e-4, rtol=0)
    assert torch.allclose(our_iou, iou_pred, atol=1e-5, rtol=0)
