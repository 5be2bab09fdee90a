"""SAM 2.1 image models (Hiera tiny / small / base+ / large, from the `sam2` package) on torch, CUDA when present.

`sam2.sam2_image_predictor.SAM2ImagePredictor` keeps the current image's features on the predictor (`set_image`),
so threads sharing it get each other's masks; this predictor keeps no per-image state: `embed` returns the
image embedding and SAM 2's two high-resolution feature maps as one `Embedding`, `decode` takes them back.
Every number is computed as `SAM2ImagePredictor` computes it (the same transforms, prompt order, decoder call
and upscaling), so the masks are identical to it on the same weights (tests/model/test_sam2.py).

SAM 2's image geometry differs from SAM's: the image is stretched to 1024 x 1024 (no aspect-preserving resize,
no padding), clicks are scaled by 1024 / W and 1024 / H, and the (256, 256) mask logits are interpolated
straight to (H, W).
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from sam_backend.sam import cpu_binding

with cpu_binding.openmp_bound_to_cores():
    import torch
import torch.nn.functional as F

from advanced_sam import choose_device
from sam_backend import catalog
from sam_backend.errors import CheckpointError
from sam_backend.sam.types import Embedding, Prediction, Prompt

log = logging.getLogger(__name__)

IMAGE_SIZE = 1024  # side of the square SAM 2's image encoder sees
#: (name in Embedding.extras, channels, side) of SAM 2's high-resolution features, finest first
HIGH_RES = (("high_res_0", 32, 256), ("high_res_1", 64, 128))
FEATURES_SHAPE = (1, 256, 64, 64)
LOGIT_LIMIT = 32.0  # SAM2ImagePredictor clamps the low-resolution logits it hands back to +-32
MASK_THRESHOLD = 0.0


def build_sam2(size: str, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
    """Build SAM 2.1 of `size` (tiny, small, base_plus, large), load `checkpoint` (None: random weights, for
    tests) and move it to `device`, in eval mode.

    Built as `sam2.build_sam.build_sam2` builds it (with its mask post-processing overrides: the dynamic
    multimask fallback of a single-mask answer), with the state dict read onto the CPU first (weights_only).
    """
    if size not in catalog.SAM2_CONFIGS:
        raise CheckpointError(f"unknown SAM 2.1 size {size!r}; choose one of {sorted(catalog.SAM2_CONFIGS)}")
    from sam2.build_sam import build_sam2 as sam2_builder

    model = sam2_builder(catalog.SAM2_CONFIGS[size], ckpt_path=None, device="cpu", mode="eval")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        fetch = f"fetch it with `{catalog.CHECKPOINTS[catalog.SAM2_PREFIX + size].fetch_command}`"
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist; {fetch}")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "model" not in state:
                raise RuntimeError("it holds no 'model' state dict, as SAM 2 checkpoints do")
            model.load_state_dict(state["model"])
        except Exception as error:
            own = isinstance(error, (RuntimeError, OSError, EOFError)) and str(error)
            reason = str(error).splitlines()[0] if own else "its contents are not a PyTorch state dict"
            raise CheckpointError(f"{checkpoint} is not a valid SAM 2.1 {size} checkpoint ({reason}); it may be "
                                  f"cut off or damaged: {fetch} again") from error
    model.eval()
    return model.to(device)


class Sam2Predictor:
    """A SAM 2.1 image model on torch behind the `Predictor` interface. Thread-safe (no per-image state)."""

    #: its (256, 256) low-resolution masks stretch the whole image over the frame, where SAM pads it: zoom-in's
    #: geometry (`sam.zoom`) is SAM's, so `SamModel` does not zoom with it
    stretches_frame = True

    def __init__(self, model: torch.nn.Module, model_version: str, device: torch.device) -> None:
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.model_version = model_version
        self.device = device
        # SAM2ImagePredictor's own image transform (ToTensor, a scripted Resize + Normalize): stateless
        self._transforms = SAM2Transforms(resolution=model.image_size, mask_threshold=MASK_THRESHOLD)

    @classmethod
    def load(cls, size: str, checkpoint: Path | None, device: str = "auto", model_version: str | None = None,
             threads: int = 0) -> Sam2Predictor:
        """Build and load SAM 2.1 of `size`; `threads` > 0 sets torch's intra-op threads (0: its default)."""
        if threads > 0:
            torch.set_num_threads(threads)
        torch_device = choose_device(device)
        model = build_sam2(size, checkpoint, torch_device)
        log.info("loaded SAM 2.1 %s from %s on %s", size, checkpoint, torch_device)
        return cls(model, model_version or catalog.model_name(catalog.SAM2_PREFIX + size), torch_device)

    @torch.inference_mode()
    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        """(h, w, 3) uint8 RGB -> features (1, 256, 64, 64) and extras high_res_0 (1, 32, 256, 256),
        high_res_1 (1, 64, 128, 128), float32: what `SAM2ImagePredictor.set_image` keeps. `original_size`:
        (H, W) of the image the user sees when `image` is a reduced copy of it (SAM 2 stretches either to the
        1024 square)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        with self._pinned():
            pixels = self._transforms(image)[None].to(self.device)
            backbone_out = self.model.forward_image(pixels)
            _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
            sides = [side for _, _, side in HIGH_RES] + [FEATURES_SHAPE[-1]]
            maps = [feat.permute(1, 2, 0).reshape(1, -1, side, side) for feat, side in zip(vision_feats, sides)]
            as_numpy = [m.float().cpu().numpy() for m in maps]
        size = original_size or image.shape[:2]
        return Embedding(features=as_numpy[-1], original_size=(int(size[0]), int(size[1])),
                         input_size=(IMAGE_SIZE, IMAGE_SIZE),
                         extras={name: array for (name, _, _), array in zip(HIGH_RES, as_numpy[:-1])})

    @torch.inference_mode()
    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        with self._pinned():
            low_res, iou = self.decode_low_res(embedding, prompt)
            index = int(torch.argmax(iou)) if prompt.is_single_click else 0
            logits = low_res[index: index + 1]
            mask = upscale(logits, embedding.original_size).cpu().numpy()
            low_res_logits = torch.clamp(logits, -LOGIT_LIMIT, LOGIT_LIMIT).float().cpu().numpy()
        return Prediction(mask=mask, score=float(iou[index]), low_res_logits=low_res_logits)

    @torch.inference_mode()
    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's answer to `prompt`: logits (3, 256, 256) and IoUs (3,) for a lone click (SAM's three
        choices), else (1, 256, 256) and (1,), unclamped, on the predictor's device."""
        with self._pinned():
            features, high_res = self._features(embedding)
            points = self.prompt_points(prompt, embedding.original_size)
            mask_input = None
            if prompt.mask_input is not None:  # (1, 256, 256) logits of an earlier answer
                mask_input = torch.as_tensor(np.asarray(prompt.mask_input, dtype=np.float32),
                                             device=self.device).reshape(1, 1, 4 * FEATURES_SHAPE[2], -1)
            encoder = self.model.sam_prompt_encoder
            sparse, dense = encoder(points=points, boxes=None, masks=mask_input)
            low_res, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=features,
                image_pe=encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=prompt.is_single_click,
                repeat_image=False,
                high_res_features=high_res,
            )
        return low_res[0], iou[0]

    def _pinned(self) -> AbstractContextManager[None]:
        """`cpu_binding.pinned` without pinning, for torch's intra-op threads on the CPU: OpenMP would leave the
        caller's thread on one core for good."""
        return cpu_binding.pinned(torch.get_num_threads() if self.device.type == "cpu" else 1, pin=False)

    def prompt_points(self, prompt: Prompt, original_size: tuple[int, int]) \
            -> tuple[torch.Tensor, torch.Tensor] | None:
        """(coords (1, N', 2) float32 in the 1024-frame, labels (1, N') int32) of the box corners (labels 2, 3)
        followed by the clicks (1 / 0), as SAM2ImagePredictor concatenates them; None without either."""
        height, width = original_size
        coords, labels = [], []
        if prompt.box is not None:
            coords.append(torch.as_tensor(np.asarray(prompt.box, dtype=np.float32).reshape(2, 2)))
            labels.append(torch.tensor([2, 3], dtype=torch.int32))
        if len(prompt.points):
            coords.append(torch.as_tensor(np.asarray(prompt.points, dtype=np.float32).reshape(-1, 2)))
            labels.append(torch.as_tensor(np.asarray(prompt.labels, dtype=np.int32).reshape(-1)))
        if not coords:
            return None
        xy = torch.cat(coords).to(self.device).clone()
        xy[:, 0] = xy[:, 0] / width
        xy[:, 1] = xy[:, 1] / height
        return (xy * IMAGE_SIZE)[None], torch.cat(labels).to(self.device)[None]

    def _features(self, embedding: Embedding) -> tuple[torch.Tensor, list[torch.Tensor]]:
        missing = [name for name, _, _ in HIGH_RES if name not in embedding.extras]
        if missing or tuple(embedding.features.shape) != FEATURES_SHAPE:
            raise ValueError(f"not a SAM 2 embedding: features {tuple(embedding.features.shape)}, "
                             f"extras {sorted(embedding.extras)}")
        as_float = embedding.astype(np.float32)
        features = torch.from_numpy(as_float.features).to(self.device)
        high_res = [torch.from_numpy(as_float.extras[name]).to(self.device) for name, _, _ in HIGH_RES]
        return features, high_res


def upscale(logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """(1, 256, 256) logits -> (H, W) bool mask: bilinear (half-pixel centres) straight to the image size,
    thresholded at 0, as `SAM2Transforms.postprocess_masks`."""
    full = F.interpolate(logits[None].float(), original_size, mode="bilinear", align_corners=False)
    return full[0, 0] > MASK_THRESHOLD
