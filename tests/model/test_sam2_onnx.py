"""SAM 2.1 exported to ONNX (onnx_converter.export_sam2) and served by onnx_sam2.OnnxSam2Predictor, against torch.

Random-init tiny (seeded), exported once per module into a temporary folder (about half a minute).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_backend.sam.types import Prompt

sam2_predictor = pytest.importorskip("sam2_predictor")
onnx_converter = pytest.importorskip("onnx_converter")
onnx_sam2 = pytest.importorskip("onnx_sam2")
test_sam2 = pytest.importorskip("test_sam2", reason="tests/model/test_sam2.py holds the images and prompts")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    torch_predictor = sam2_predictor.Sam2Predictor.load("tiny", None, "cpu")
    folder = tmp_path_factory.mktemp("sam2-onnx")
    encoder, decoder = folder / "sam2.1_tiny.encoder.onnx", folder / "sam2.1_tiny.decoder.onnx"
    onnx_converter.export_sam2(torch_predictor.model, encoder, decoder)
    return torch_predictor, onnx_sam2.OnnxSam2Predictor.load(encoder, decoder, model_version="SAM2.1-tiny-onnx")


@pytest.mark.parametrize("name", ["portrait", "exif"])
def test_onnx_masks_are_torchs(pair, name):
    """The ONNX encoder takes the image at its own size (the resize is in the graph); every prompt kind gives
    torch's mask, and decoding torch's embedding gives torch's mask too."""
    torch_predictor, onnx_predictor = pair
    image = test_sam2.images()[name]
    ours, theirs = onnx_predictor.embed(image), torch_predictor.embed(image)
    for key, array in theirs.arrays().items():
        assert ours.arrays()[key].shape == array.shape
        assert np.abs(ours.arrays()[key] - array).max() < 1e-3, key
    height, width = image.shape[:2]
    first = torch_predictor.decode(theirs, Prompt(*test_sam2.points((0.5 * width, 0.5 * height, 1))))
    for kind, prompt in test_sam2.prompt_mix(height, width, first.low_res_logits).items():
        expected = torch_predictor.decode(theirs, prompt)
        same_input = onnx_predictor.decode(theirs, prompt)
        assert (same_input.mask != expected.mask).mean() < 1e-4, kind
        assert same_input.score == pytest.approx(expected.score, abs=1e-4), kind
        end_to_end = onnx_predictor.decode(ours, prompt)
        assert (end_to_end.mask != expected.mask).mean() < 1e-3, kind
        assert end_to_end.mask.shape == (height, width)


def test_many_points_and_float16_embeddings(pair):
    torch_predictor, onnx_predictor = pair
    image = test_sam2.images()["strip"]
    embedding = onnx_predictor.embed(image).astype(np.float16)
    rng = np.random.default_rng(1)
    points = (rng.random((40, 2)) * [image.shape[1], image.shape[0]]).astype(np.float32)
    prompt = Prompt(points, (rng.random(40) > 0.5).astype(np.int32))
    a, b = torch_predictor.decode(embedding, prompt), onnx_predictor.decode(embedding, prompt)
    assert (a.mask != b.mask).mean() < 1e-3
