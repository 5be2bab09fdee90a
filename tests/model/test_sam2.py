"""SAM 2.1 on torch (sam2_predictor.Sam2Predictor) against the `sam2` package's own SAM2ImagePredictor.

The real checkpoints cannot be had here, so the models are random-init (seeded): speed and the arithmetic do not
depend on the weights, and random weights still give masks that differ from prompt to prompt, so equality with
SAM2ImagePredictor on the same weights shows that every number is computed the same way. Tiny and small run by
default; base+ and large with SAM2_LARGE_TESTS=1 (minutes each on a CPU; marked sam2_large).
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from sam_backend.cache import EmbeddingCache
from sam_backend.images.decode import decode_image
from sam_backend.sam.types import Embedding, Prompt
from tools.harness.scenes import scene

sam2_predictor = pytest.importorskip("sam2_predictor")
SAM2ImagePredictor = pytest.importorskip("sam2.sam2_image_predictor").SAM2ImagePredictor


def random_init(size: str) -> sam2_predictor.Sam2Predictor:
    torch.manual_seed(0)
    return sam2_predictor.Sam2Predictor.load(size, None, "cpu", model_version=f"SAM2.1-{size}-random")


def exif_rotated_photo() -> np.ndarray:
    """chelsea (300 x 451) saved as a JPEG whose EXIF says "rotate 90 degrees clockwise", decoded as served."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, "JPEG", exif=exif, quality=95)
    image = decode_image(buffer.getvalue(), max_pixels=10**8)
    assert image.shape == (451, 300, 3)  # upright, as the user sees it
    return image


def images() -> dict[str, np.ndarray]:
    """Landscape 4:3, portrait 9:16, a small odd-sized strip and an EXIF-rotated photo."""
    return {
        "landscape": scene("star-astronaut-brick").image,
        "portrait": scene("ellipse-chelsea-gravel", size=(640, 360)).image,
        "strip": scene("horse-coffee-grass", size=(97, 211)).image,
        "exif": exif_rotated_photo(),
    }


def points(*xy_label):
    coords = np.array([[x, y] for x, y, _ in xy_label], np.float32).reshape(-1, 2)
    return coords, np.array([label for _, _, label in xy_label], np.int32)


def prompt_mix(height: int, width: int, previous: np.ndarray) -> dict[str, Prompt]:
    """Every prompt kind, placed relative to the image's size; `previous` (1, 256, 256) logits to refine from."""
    def at(fx, fy, label=1):
        return (fx * width, fy * height, label)

    box = np.array([0.2 * width, 0.25 * height, 0.7 * width, 0.8 * height], np.float32)
    none = points()
    return {
        "one click": Prompt(*points(at(0.5, 0.5))),
        "one negative click": Prompt(*points(at(0.3, 0.6, 0))),
        "clicks +/-": Prompt(*points(at(0.5, 0.5), at(0.2, 0.3, 0), at(0.7, 0.6), at(0.9, 0.1, 0))),
        "box": Prompt(*none, box=box),
        "box + clicks": Prompt(*points(at(0.4, 0.5), at(0.65, 0.3, 0)), box=box),
        "click + mask": Prompt(*points(at(0.5, 0.5)), mask_input=previous),
        "clicks + mask": Prompt(*points(at(0.5, 0.5), at(0.1, 0.9, 0)), mask_input=previous),
        "box + clicks + mask": Prompt(*points(at(0.4, 0.5)), box=box, mask_input=previous),
    }


def official(reference: SAM2ImagePredictor, prompt: Prompt) -> tuple[np.ndarray, float, np.ndarray]:
    """SAM2ImagePredictor's answer to `prompt` as our server uses SAM: three masks for a lone click, the best
    predicted IoU of them; one mask otherwise."""
    multimask = prompt.is_single_click
    masks, scores, low_res = reference.predict(
        point_coords=prompt.points if len(prompt.points) else None,
        point_labels=prompt.labels if len(prompt.points) else None,
        box=prompt.box, mask_input=prompt.mask_input, multimask_output=multimask)
    best = int(np.argmax(scores)) if multimask else 0
    return masks[best], float(scores[best]), low_res[best: best + 1]


@pytest.fixture(scope="module")
def tiny():
    return random_init("tiny")


@pytest.fixture(scope="module")
def tiny_embedded(tiny):
    return {name: (image, tiny.embed(image)) for name, image in images().items()}


def assert_same_as_official(predictor, image: np.ndarray, embedding: Embedding) -> None:
    reference = SAM2ImagePredictor(predictor.model)
    reference.set_image(image)
    # the embedding is the official predictor's features, array for array
    assert np.array_equal(embedding.features, reference._features["image_embed"].numpy())
    for index, (name, channels, side) in enumerate(sam2_predictor.HIGH_RES):
        official_map = reference._features["high_res_feats"][index].numpy()
        assert official_map.shape == (1, channels, side, side)
        assert np.array_equal(embedding.extras[name], official_map), name
    height, width = image.shape[:2]
    first = predictor.decode(embedding, Prompt(*points((0.5 * width, 0.5 * height, 1))))
    masks = []
    for kind, prompt in prompt_mix(height, width, first.low_res_logits).items():
        ours = predictor.decode(embedding, prompt)
        mask, score, low_res = official(reference, prompt)
        assert ours.mask.shape == (height, width) and ours.mask.dtype == bool, kind
        assert np.array_equal(ours.mask, mask), kind
        assert ours.score == score, kind
        assert np.array_equal(ours.low_res_logits, low_res), kind
        masks.append(ours.mask)
    # random weights still answer each prompt differently (else equality above would show little)
    assert len({m.tobytes() for m in masks}) >= 4


@pytest.mark.parametrize("name", ["landscape", "portrait", "strip", "exif"])
def test_tiny_masks_are_the_official_predictors(tiny, tiny_embedded, name):
    image, embedding = tiny_embedded[name]
    assert_same_as_official(tiny, image, embedding)


def test_small_masks_are_the_official_predictors():
    small = random_init("small")
    image = images()["portrait"]
    assert_same_as_official(small, image, small.embed(image))


@pytest.mark.sam2_large
@pytest.mark.skipif(os.environ.get("SAM2_LARGE_TESTS") != "1", reason="opt in with SAM2_LARGE_TESTS=1 (minutes)")
@pytest.mark.parametrize("size", ["base_plus", "large"])
def test_large_sizes_masks_are_the_official_predictors(size):
    predictor = random_init(size)
    image = images()["landscape"]
    assert_same_as_official(predictor, image, predictor.embed(image))


def test_embedding_holds_the_high_res_features_and_caches_as_float16(tiny, tiny_embedded):
    image, embedding = tiny_embedded["landscape"]
    assert set(embedding.arrays()) == {"features", "high_res_0", "high_res_1"}
    assert embedding.nbytes == 4 * (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128)  # 16 MiB float32
    cache = EmbeddingCache(2, compact=True)
    try:
        stored = cache.get_or_compute("landscape", lambda: embedding)
    finally:
        cache.close()
    assert all(array.dtype == np.float16 for array in stored.arrays().values())
    assert stored.nbytes == embedding.nbytes // 2  # 8 MiB per cached image
    height, width = image.shape[:2]
    for kind, prompt in prompt_mix(height, width, tiny.decode(embedding, prompt_mix(height, width, None)
                                                              ["one click"]).low_res_logits).items():
        full, half = tiny.decode(embedding, prompt).mask, tiny.decode(stored, prompt).mask
        assert (full != half).mean() < 0.002, kind  # float16 moves at most a few border pixels


def test_threads_get_the_masks_they_get_alone(tiny, tiny_embedded):
    """Threads embedding and decoding different images at once get exactly the single-thread masks."""
    names = ["landscape", "portrait", "strip"]

    def masks(embedding: Embedding, image: np.ndarray) -> list[np.ndarray]:
        height, width = image.shape[:2]
        mix = prompt_mix(height, width, np.zeros((1, 256, 256), np.float32))
        return [tiny.decode(embedding, prompt).mask for prompt in mix.values()]

    alone = {name: masks(tiny_embedded[name][1], tiny_embedded[name][0]) for name in names}

    def run(name):
        image = tiny_embedded[name][0]
        embedding = tiny.embed(image) if name != "strip" else tiny_embedded[name][1]  # two embed while one decodes
        return masks(embedding, image)

    with ThreadPoolExecutor(len(names)) as pool:
        together = dict(zip(names, pool.map(run, names)))
    for name in names:
        for kind, (a, b) in enumerate(zip(alone[name], together[name])):
            assert np.array_equal(a, b), (name, kind)


def test_a_foreign_embedding_is_refused(tiny):
    mobile_sam_shaped = Embedding(features=np.zeros((1, 256, 64, 64), np.float32), original_size=(10, 10),
                                  input_size=(1024, 1024))
    with pytest.raises(ValueError, match="not a SAM 2 embedding"):
        tiny.decode(mobile_sam_shaped, Prompt(*points((5, 5, 1))))


def test_missing_and_corrupt_checkpoints_say_how_to_fetch(tmp_path):
    with pytest.raises(sam2_predictor.CheckpointError, match="tools.weights sam2.1_tiny"):
        sam2_predictor.build_sam2("tiny", tmp_path / "nope.pt", torch.device("cpu"))
    corrupt = tmp_path / "sam2.1_hiera_tiny.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(sam2_predictor.CheckpointError, match="not a valid SAM 2.1 tiny checkpoint"):
        sam2_predictor.build_sam2("tiny", corrupt, torch.device("cpu"))


def test_a_saved_checkpoint_loads_back(tiny, tmp_path):
    """A file in the official layout ({"model": state dict}) loads into the same weights."""
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny.model.state_dict()}, path)
    loaded = sam2_predictor.build_sam2("tiny", path, torch.device("cpu"))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, tiny.model.state_dict()[name]), name
