"""SAM's image and prompt geometry in NumPy, shared by the torch and the ONNX predictor.

This is what `segment_anything.utils.transforms.ResizeLongestSide` and `Sam.preprocess` /
`Sam.postprocess_masks` do, without torch, so that both predictors feed their models the same numbers and a
torch-free server needs nothing of torch. The ONNX image encoder takes the output of `preprocess_image`.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from sam_backend.sam.types import Embedding, Prediction, Prompt

IMAGE_SIZE = 1024  # side of the square the image encoder sees
LOW_RES = 256  # side of the decoder's mask logits
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
MASK_THRESHOLD = 0.0


def sizes_of(image: np.ndarray, original_size: tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(original_size, input_size) of an embedding of `image`, a reduced copy of an image of `original_size`
    (None: `image` is the whole image)."""
    size = (int(original_size[0]), int(original_size[1])) if original_size else (int(image.shape[0]),
                                                                                  int(image.shape[1]))
    return size, input_size(size)


def input_size(original_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an image of `original_size` (H, W) once its longest side is scaled to 1024."""
    height, width = original_size
    scale = IMAGE_SIZE / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_image(image: np.ndarray, original_size: tuple[int, int] | None = None) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> (1, 3, 1024, 1024) float32: resized, normalised, zero-padded bottom/right.

    `original_size`: (H, W) of the image the user sees when `image` is a reduced copy of it (see
    `images.decode.DecodedImage`); it sets the size the image is resized to, `input_size(original_size)`, so that
    prompts and masks map to the encoder's frame as they would from the whole image. None: `image` is whole.
    Resizing uses PIL's bilinear filter, as `ResizeLongestSide.apply_image` does through torchvision.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    height, width = input_size(original_size or image.shape[:2])
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), dtype=np.float32)
    normalised = (resized - PIXEL_MEAN) / PIXEL_STD
    padded = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    padded[:height, :width] = normalised
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None])


def decoder_points(prompt: Prompt, original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Points and box of `prompt` as the SAM decoder takes them.

    Returns coords (1, N', 2) float32 in the 1024-frame and labels (1, N') float32, where a box adds its two
    corners with labels 2 and 3 and, without a box, a padding point with label -1 is added (exactly what
    `PromptEncoder` does with `pad=True`, and what SAM's ONNX decoder expects).
    """
    height, width = original_size
    scale = np.array([input_size(original_size)[1] / width, input_size(original_size)[0] / height],
                     dtype=np.float32)
    coords = [np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)]
    labels = [np.asarray(prompt.labels, dtype=np.float32).reshape(-1)]
    if prompt.box is not None:
        coords.append(np.asarray(prompt.box, dtype=np.float32).reshape(2, 2))
        labels.append(np.array([2, 3], dtype=np.float32))
    else:
        coords.append(np.zeros((1, 2), dtype=np.float32))
        labels.append(np.array([-1], dtype=np.float32))
    all_coords = np.concatenate(coords) * scale
    all_coords[np.concatenate(labels) == -1] = 0.0
    return all_coords[None].astype(np.float32), np.concatenate(labels)[None].astype(np.float32)


def mask_input_of(prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """(1, 1, 256, 256) float32 mask logits and (1,) float32 flag saying whether they are used."""
    if prompt.mask_input is None:
        return np.zeros((1, 1, LOW_RES, LOW_RES), dtype=np.float32), np.zeros(1, dtype=np.float32)
    return prompt.mask_input.reshape(1, 1, LOW_RES, LOW_RES).astype(np.float32), np.ones(1, dtype=np.float32)


def best_prediction(low_res: np.ndarray, iou: np.ndarray, prompt: Prompt, embedding: Embedding) -> Prediction:
    """Pick SAM's mask for `prompt` from the decoder's four outputs and scale it to the original image.

    low_res: (4, 256, 256) float32 logits; iou: (4,) predicted IoUs. Index 0 is the single-mask output;
    1..3 are the multimask outputs, used for an ambiguous prompt (one or two clicks, `Prompt.is_ambiguous`),
    where `whole_object` picks one.
    """
    if prompt.is_ambiguous:
        index = 1 + whole_object(low_res[1:], iou[1:], embedding.input_size, margin_for(prompt),
                                 enclosed=prompt.enclosed)
    else:
        index = 0
    logits = low_res[index]
    mask = upscale_mask(logits, embedding.input_size, embedding.original_size)
    return Prediction(mask=mask, score=float(iou[index]), low_res_logits=logits[None].astype(np.float32))


def margin_for(prompt: Prompt) -> float:
    """`whole_object`'s margin for an ambiguous `prompt`: WHOLE_OBJECT_MARGIN for one click alone, CLICKS_MARGIN
    for anything more (or a box)."""
    return WHOLE_OBJECT_MARGIN if len(prompt.points) == 1 and prompt.box is None else CLICKS_MARGIN


def low_res_extent(in_size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the (256, 256) logit frame that hold the image (the rest is the 1024-frame's padding);
    in_size: (h, w) of the image in the 1024-frame."""
    return max(1, round(in_size[0] * LOW_RES / IMAGE_SIZE)), max(1, round(in_size[1] * LOW_RES / IMAGE_SIZE))


#: of SAM's three masks for one click, the largest whose predicted IoU is within this of the best wins
WHOLE_OBJECT_MARGIN = 0.05
#: the same for two or more clicks (`Prompt.is_ambiguous`, `refinement.decode`'s fresh answer to a jump) or a box
#: asked for three masks (`margin_for`): there 0.05 took the object's surroundings in a crop around a small object
#: (`zoom`; GrabCut 304074 in mosaic3, the second click: 0.67 -> 0.29)
CLICKS_MARGIN = 0.03
#: ... among those at least this stable (`stability`), unless none is
MIN_STABILITY = 0.7
#: logit offset of `stability` (segment_anything's automatic mask generator uses 1.0)
STABILITY_OFFSET = 1.0


def whole_object(logits: np.ndarray, iou: np.ndarray, in_size: tuple[int, int],
                 margin: float = WHOLE_OBJECT_MARGIN, enclosed: bool = False,
                 min_stability: float = MIN_STABILITY) -> int:
    """Which of SAM's multimask outputs answers an ambiguous prompt. logits: (3, 256, 256); iou: (3,) predicted
    IoUs; in_size: (h, w) of the image in the 1024-frame.

    The largest mask (pixels over the image's part of the low-resolution frame) among those whose predicted IoU
    is within `margin` of the best, and at least `min_stability` stable (and not empty) if any of those is. SAM's
    three masks are a part, a larger part and the whole, and its predicted IoU often ranks a crisp part a few
    hundredths above the whole object; a mask that shrinks by half when its logits move by one is no whole
    object but a guess at one (an ellipse with its surroundings: stability 0.38). First clicks through the
    decoder (ONNX), mIoU: best predicted IoU 0.809 on GrabCut20; margin 0.03 without stability 0.926 on
    GrabCut20, 0.730 on the synthetic scenes, 0.839 on mosaic3; margin 0.05 without: 0.929, 0.756, 0.862; with
    stability >= 0.7 (the same from 0.5 to 0.8): 0.929, 0.780, 0.862; margin 0.1 with it: 0.929, 0.741, 0.884.
    Clicking a part of an object may then give the object; a negative click on the rest takes it back to the
    part.
    """
    rows, cols = low_res_extent(in_size)
    candidates = list(range(len(iou)))
    if enclosed:
        candidates = [i for i in candidates if _edges_touched(logits[i, :rows, :cols] > MASK_THRESHOLD) < 3] \
            or candidates
    best = max(float(iou[i]) for i in candidates)
    near = [i for i in candidates if iou[i] >= best - margin]
    stable = [i for i in near if _filled(logits[i, :rows, :cols])
              and stability(logits[i, :rows, :cols]) >= min_stability]
    near = stable or near
    return max(near, key=lambda i: (int(np.count_nonzero(logits[i, :rows, :cols] > MASK_THRESHOLD)), float(iou[i])))


def _filled(logits: np.ndarray) -> bool:
    """Whether the mask of `logits` has a pixel (an empty mask is "stable" and no object)."""
    return bool(np.any(logits > MASK_THRESHOLD))


def stability(logits: np.ndarray, offset: float = STABILITY_OFFSET) -> float:
    """How little a mask changes with its threshold: the IoU of the masks of `logits` > MASK_THRESHOLD + offset and
    > MASK_THRESHOLD - offset (the first lies inside the second), 0..1; 1 for logits that are all below both.
    Segment Anything's automatic mask generator keeps masks of stability >= 0.95 (`calculate_stability_score`)."""
    outer = int(np.count_nonzero(logits > MASK_THRESHOLD - offset))
    return int(np.count_nonzero(logits > MASK_THRESHOLD + offset)) / outer if outer else 1.0


def _edges_touched(mask: np.ndarray) -> int:
    """How many of a (h, w) bool mask's four edges it reaches."""
    return int(mask[0].any()) + int(mask[-1].any()) + int(mask[:, 0].any()) + int(mask[:, -1].any())


#: images of more pixels than this get their mask in strips of rows: a 100 Mpx image would otherwise need a
#: 400 MB float32 logit image per click, on top of the 100 MB mask itself
STRIP_PIXELS = 4_000_000
STRIP_ROWS = 256


def upscale_mask(logits: np.ndarray, in_size: tuple[int, int], original_size: tuple[int, int],
                 strip_pixels: int = STRIP_PIXELS) -> np.ndarray:
    """(256, 256) logits -> (H, W) bool mask: `upscale_logits(...) > MASK_THRESHOLD`, in bounded memory.

    Up to `strip_pixels` pixels it is exactly that. Larger images are interpolated the same way (bilinear, half-pixel
    centres, separable: along rows first, to full width, then down the columns) in strips of STRIP_ROWS output
    rows, each widening only the rows of the 1024-frame it reads, so the float32 temporaries stay about
    4 x STRIP_ROWS x W whatever H is (10 MB a strip at W = 10000) and the mask itself is the one full-size array.
    Masks then agree with the one-piece path except where a logit is within float rounding of the threshold.
    """
    height, width = original_size
    if height * width <= strip_pixels:
        return upscale_logits(logits, in_size, original_size) > MASK_THRESHOLD
    full = cv2.resize(logits.astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    cropped = np.ascontiguousarray(full[: in_size[0], : in_size[1]])
    source_height = in_size[0]
    mask = np.empty((height, width), dtype=bool)
    for top in range(0, height, STRIP_ROWS):
        y = np.arange(top, min(top + STRIP_ROWS, height), dtype=np.float64)
        source = np.maximum((y + 0.5) * (source_height / height) - 0.5, 0.0)
        above = np.minimum(np.floor(source).astype(np.int64), source_height - 1)
        below = np.minimum(above + 1, source_height - 1)
        weight = (source - np.floor(source)).astype(np.float32)[:, None]
        first, last = int(above[0]), int(below[-1]) + 1  # the source rows this strip reads
        # widening rows alone (their count unchanged) is exact: cv2 interpolates each axis on its own
        rows = cv2.resize(cropped[first:last], (width, last - first), interpolation=cv2.INTER_LINEAR)
        strip = rows[above - first] * (1.0 - weight)
        strip += rows[below - first] * weight
        np.greater(strip, MASK_THRESHOLD, out=mask[top: top + len(y)])
    return mask


def upscale_logits(logits: np.ndarray, in_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """(256, 256) logits -> (H, W) logits: to 1024x1024, crop the padding, then to the original size.

    Bilinear with half-pixel centres, as `Sam.postprocess_masks` (`align_corners=False`).
    """
    full = cv2.resize(logits.astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    cropped = full[: in_size[0], : in_size[1]]
    height, width = original_size
    return cv2.resize(np.ascontiguousarray(cropped), (width, height), interpolation=cv2.INTER_LINEAR)
