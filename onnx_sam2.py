"""SAM 2.1 on ONNX Runtime, no torch: `OnnxSam2Predictor`, served with SAM_CHOICE=SAM2 RUN_ONNX_SAM=true.

The files (written by `python onnx_converter.py --model-type sam2.1_tiny ...`):

* `<model_type>.encoder.onnx`: input `image` (1, 3, H, W) uint8 RGB, any H and W (the resize to 1024 x 1024 with
  antialiasing and the normalisation are in the graph, as SAM2Transforms does them); outputs `image_embed`
  (1, 256, 64, 64), `high_res_0` (1, 32, 256, 256), `high_res_1` (1, 64, 128, 128) float32.
* `<model_type>.decoder.onnx`: inputs `image_embed`, `high_res_0`, `high_res_1`, `point_coords` (1, N, 2) float32
  in the 1024-frame (box corners first, then clicks, then one padding point), `point_labels` (1, N) float32
  (2/3 box corners, 1/0 clicks, -1 padding), `mask_input` (1, 1, 256, 256) float32, `has_mask_input` (1,) float32;
  outputs `masks` (1, 4, 256, 256) logits and `iou_predictions` (1, 4): all four of SAM 2's mask tokens.

Which mask is answered is chosen here as SAM 2's MaskDecoder chooses it: the best of tokens 1-3 for a lone click;
otherwise token 0 unless its stability score is below 0.98 (then the best of 1-3), the dynamic multimask fallback
`sam2.build_sam.build_sam2` switches on. Thread-safe: ONNX Runtime sessions may be run from many threads.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from sam_backend.errors import OnnxModelError
from sam_backend.sam.types import Embedding, Prediction, Prompt

IMAGE_SIZE = 1024
HIGH_RES = ("high_res_0", "high_res_1")
ENCODER_OUTPUTS = ["image_embed", *HIGH_RES]
DECODER_INPUTS = ["image_embed", *HIGH_RES, "point_coords", "point_labels", "mask_input", "has_mask_input"]
DECODER_OUTPUTS = ["masks", "iou_predictions"]
STABILITY_DELTA = 0.05  # build_sam2's dynamic_multimask_stability_delta
STABILITY_THRESH = 0.98  # and _thresh
LOGIT_LIMIT = 32.0


def _session(path: Path, threads: int) -> ort.InferenceSession:
    if not Path(path).is_file():
        raise OnnxModelError(f"ONNX file {path} does not exist; write it with `python onnx_converter.py "
                             f"--model-type <sam2.1_size> --checkpoint models/sam2.1_hiera_<size>.pt`")
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise OnnxModelError(f"{path} is not a loadable ONNX model ({str(error).splitlines()[0]})") from error


class OnnxSam2Predictor:
    """SAM 2.1's exported encoder and decoder behind the `Predictor` interface."""

    #: its (256, 256) low-resolution masks stretch the whole image over the frame, where SAM pads it: zoom-in's
    #: geometry (`sam.zoom`) is SAM's, so `SamModel` does not zoom with it
    stretches_frame = True

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, model_version: str) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.model_version = model_version

    @classmethod
    def load(cls, encoder_path: Path, decoder_path: Path, model_version: str, threads: int = 0) -> OnnxSam2Predictor:
        return cls(_session(encoder_path, threads), _session(decoder_path, threads), model_version)

    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        """(h, w, 3) uint8 RGB (a reduced copy of an image of `original_size` (H, W), or the whole image) ->
        SAM 2's features and high-resolution features, float32."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        pixels = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
        features, high_0, high_1 = self.encoder.run(ENCODER_OUTPUTS, {"image": pixels})
        size = original_size or image.shape[:2]
        return Embedding(features=np.asarray(features, np.float32), original_size=(int(size[0]), int(size[1])),
                         input_size=(IMAGE_SIZE, IMAGE_SIZE),
                         extras={"high_res_0": np.asarray(high_0, np.float32),
                                 "high_res_1": np.asarray(high_1, np.float32)})

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        masks, iou = self.decode_low_res(embedding, prompt)
        index = choose(masks, iou, prompt.is_single_click)
        logits = masks[index]
        height, width = embedding.original_size
        full = cv2.resize(logits, (width, height), interpolation=cv2.INTER_LINEAR)
        return Prediction(mask=full > 0.0, score=float(iou[index]),
                          low_res_logits=np.clip(logits, -LOGIT_LIMIT, LOGIT_LIMIT)[None].astype(np.float32))

    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
        """All four mask tokens: (4, 256, 256) float32 logits and (4,) predicted IoUs."""
        if any(name not in embedding.extras for name in HIGH_RES):
            raise ValueError(f"not a SAM 2 embedding: extras {sorted(embedding.extras)}")
        arrays = embedding.astype(np.float32)
        coords, labels = decoder_points(prompt, embedding.original_size)
        if prompt.mask_input is None:
            mask_input, has_mask = np.zeros((1, 1, 256, 256), np.float32), np.zeros(1, np.float32)
        else:
            mask_input = np.asarray(prompt.mask_input, np.float32).reshape(1, 1, 256, 256)
            has_mask = np.ones(1, np.float32)
        masks, iou = self.decoder.run(DECODER_OUTPUTS, {
            "image_embed": arrays.features, "high_res_0": arrays.extras["high_res_0"],
            "high_res_1": arrays.extras["high_res_1"], "point_coords": coords, "point_labels": labels,
            "mask_input": mask_input, "has_mask_input": has_mask})
        return np.asarray(masks[0], np.float32), np.asarray(iou[0], np.float32)


def decoder_points(prompt: Prompt, original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(1, N, 2) float32 coords in the 1024-frame and (1, N) float32 labels: box corners (2, 3), clicks, and the
    padding point (-1) SAM 2's prompt encoder appends when no box is given separately."""
    height, width = original_size
    coords = [np.zeros((0, 2), np.float32)]
    labels = [np.zeros(0, np.float32)]
    if prompt.box is not None:
        coords.append(np.asarray(prompt.box, np.float32).reshape(2, 2))
        labels.append(np.array([2, 3], np.float32))
    coords.append(np.asarray(prompt.points, np.float32).reshape(-1, 2))
    labels.append(np.asarray(prompt.labels, np.float32).reshape(-1))
    xy = np.concatenate(coords).astype(np.float32)
    xy = np.stack([xy[:, 0] / np.float32(width), xy[:, 1] / np.float32(height)], axis=1) * np.float32(IMAGE_SIZE)
    xy = np.concatenate([xy, np.zeros((1, 2), np.float32)])
    return xy[None].astype(np.float32), np.concatenate([*labels, np.array([-1], np.float32)])[None]


def choose(masks: np.ndarray, iou: np.ndarray, multimask: bool) -> int:
    """SAM 2's choice of mask token: the best of 1-3 for multimask; else 0 when stable, the best of 1-3 if not."""
    best = 1 + int(np.argmax(iou[1:]))
    if multimask:
        return best
    single = masks[0]
    union = int(np.count_nonzero(single > -STABILITY_DELTA))
    stability = np.float32(np.count_nonzero(single > STABILITY_DELTA)) / np.float32(union) if union else 1.0
    return 0 if stability >= STABILITY_THRESH else best
