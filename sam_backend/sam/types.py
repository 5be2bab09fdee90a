"""The one interface every SAM predictor offers: embed an image, decode prompts into a mask.

Both predictors (`advanced_sam.TorchSamPredictor`, `onnx_sam.OnnxSamPredictor`) are stateless after
construction: an `Embedding` is a value handed back to the caller, never stored on the predictor, so one
predictor serves any number of threads and images at once.

Geometry shared by both predictors lives in `sam_transforms`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import cv2
import numpy as np


def convert(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """`array` as `dtype`, C-contiguous. float16 <-> float32 goes through OpenCV's vectorised conversion (F16C):
    0.13 ms for MobileSAM's (1, 256, 64, 64) features on an AMD EPYC core where numpy's `astype` takes 2.0 ms,
    the same values. Every click on a cached (float16) embedding pays it once per array."""
    pair = {array.dtype, np.dtype(dtype)}
    fast = getattr(cv2, "convertFp16", None)  # OpenCV 4; numpy's own conversion where a build lacks it
    if fast is not None and pair == {np.dtype(np.float16), np.dtype(np.float32)} and array.ndim and array.size:
        flat = np.ascontiguousarray(array).reshape(-1, array.shape[-1])
        return fast(flat).view(dtype).reshape(array.shape)  # to float16, OpenCV hands back the bits as int16
    return np.asarray(array, dtype=dtype, order="C")


@dataclass(frozen=True)
class Embedding:
    """The image encoder's output for one image: named arrays plus the image's geometry.

    features: (1, 256, 64, 64) float32 or float16, the image embedding (SAM, MobileSAM and SAM 2 alike).
    original_size: (H, W) of the image in pixels, as the user sees it (EXIF orientation applied).
    input_size: (h, w) of the image in the encoder's 1024-frame before padding: the longest side scaled to
        1024 for SAM and MobileSAM; (1024, 1024) for SAM 2, which stretches the image to the square.
    extras: further named arrays a model family needs besides `features`, of the same dtype; empty for SAM
        and MobileSAM, SAM 2's high-resolution features for SAM 2 (`high_res_0` (1, 32, 256, 256) and
        `high_res_1` (1, 64, 128, 128)).

    `arrays()` enumerates every array by name (`features` first), so a cache or a store can convert, count
    or serialise an embedding without knowing its family; `with_arrays` builds the same embedding from
    converted arrays.
    """

    features: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the embedding by name: {"features": ..., **extras}."""
        return {"features": self.features, **self.extras}

    def with_arrays(self, arrays: Mapping[str, np.ndarray]) -> Embedding:
        """The same image's embedding made of `arrays` (the names `arrays()` gives)."""
        extras = {name: array for name, array in arrays.items() if name != "features"}
        return Embedding(features=arrays["features"], original_size=self.original_size,
                         input_size=self.input_size, extras=extras)

    def astype(self, dtype: np.dtype | type) -> Embedding:
        """Every array converted to `dtype` (float16 to cache, float32 to decode); self where nothing changes."""
        if all(array.dtype == dtype for array in self.arrays().values()):
            return self
        return self.with_arrays({name: convert(array, dtype) for name, array in self.arrays().items()})

    @property
    def nbytes(self) -> int:
        """Bytes of every array together."""
        return int(sum(array.nbytes for array in self.arrays().values()))


#: prompts of at most this many clicks and no box are decoded as ambiguous (`Prompt.is_ambiguous`)
MULTIMASK_POINTS = 2


@dataclass(frozen=True)
class Prompt:
    """What the user asked for, in pixels of the original image.

    points: (N, 2) float32 x, y; N may be 0.
    labels: (N,) int32, 1 for a positive click, 0 for a negative one.
    box: (4,) float32 x0, y0, x1, y1, or None.
    mask_input: (1, 256, 256) float32 low-resolution logits of an earlier prediction of the same object,
        or None (SAM's interactive refinement input).
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    #: answer with SAM's three-mask output (True) or its single output (False); None: as `is_ambiguous` says
    multimask: bool | None = None
    #: the box was drawn just now, after the clicks: `refinement.decode` may answer with the box alone
    new_box: bool = False
    #: (x0, y0, x1, y1) in the image's pixels: decode in this crop of the image (`zoom`), mask_input being the
    #: crop's; None: the whole image
    view: tuple[int, int, int, int] | None = None
    #: the embedding is a crop made around the object (`zoom.into`): `transforms.whole_object` leaves out masks
    #: that fill it
    enclosed: bool = False
    #: (1, 256, 256) logits of the object's last mask in this view when they are not SAM's input (an ambiguous
    #: prompt, `is_ambiguous`): `refinement.decode` catches an answer that jumps away from it
    previous: np.ndarray | None = None

    @property
    def is_ambiguous(self) -> bool:
        """At most MULTIMASK_POINTS clicks and nothing else: SAM's three-mask output answers it (the whole object
        of the masks SAM rates about as good, `transforms.whole_object`). Measured on GrabCut20 through the server (tools/quality.py): at the second click SAM's single
        output refined from the first mask gave mIoU@2 0.83 and dropped good masks (0.97 -> 0.06); the
        multimask output of both clicks, without the first mask, 0.92."""
        if self.multimask is not None:
            return self.multimask
        return self.box is None and self.mask_input is None and 1 <= len(self.points) <= MULTIMASK_POINTS

    @property
    def is_single_click(self) -> bool:
        """One point and nothing else (SAM 2's three-mask case, as SAM2ImagePredictor's users call it)."""
        return len(self.points) == 1 and self.box is None and self.mask_input is None


def distinct_clicks(prompt: Prompt) -> Prompt:
    """`prompt` with one click of each label per image pixel, at the place it was last made (the newest click
    stays last); itself if none repeats. Label Studio sends percentages, so two clicks on one pixel at other
    zoom levels differ in their fractions: the pixel (floor of x, y) is what counts."""
    rows = np.column_stack([np.floor(prompt.points), prompt.labels.astype(np.float32)])
    _, from_end = np.unique(rows[::-1], axis=0, return_index=True)
    if len(from_end) == len(rows):
        return prompt
    keep = np.sort(len(rows) - 1 - from_end)
    return replace(prompt, points=prompt.points[keep], labels=prompt.labels[keep])


@dataclass(frozen=True)
class Prediction:
    """One mask for one prompt.

    mask: (H, W) bool, in the original image's pixels.
    score: SAM's predicted IoU of the mask, 0..1.
    low_res_logits: (1, 256, 256) float32, to feed back as `Prompt.mask_input`.
    """

    mask: np.ndarray
    score: float
    low_res_logits: np.ndarray


class Predictor(Protocol):
    """A loaded SAM model. Implementations must be safe to call from many threads at once."""

    #: Names the weights, e.g. "MobileSAM-6dbb9052"; shown to Label Studio as model_version.
    model_version: str

    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        """Encode an (h, w, 3) uint8 RGB image. Slow: about 1-2 s for MobileSAM on a laptop CPU.

        `original_size`: (H, W) of the image the user sees when `image` is a reduced copy of it (same aspect
        ratio, longest side at least 1024; see `images.decode.DecodedImage`); the embedding's `original_size`.
        None: `image` is the whole image.
        """
        ...

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        """Turn a prompt on an embedded image into its best mask. Fast: tens of milliseconds."""
        ...

