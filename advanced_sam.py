"""AdvancedSAM: SAM (ViT-B/L/H) or MobileSAM (ViT-T) on torch, CUDA when present, CPU otherwise.

Unlike `segment_anything.SamPredictor`, which keeps the current image's features on the predictor (so two
threads calling `set_image` get each other's masks), this predictor keeps no per-image state: `embed` returns
the features and `decode` takes them back.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sam_backend.sam import cpu_binding

with cpu_binding.openmp_bound_to_cores():
    import torch

from sam_backend import catalog
from sam_backend.errors import CheckpointError
from sam_backend.sam import transforms
from sam_backend.sam.lanes import Decodes, EncoderLane
from sam_backend.sam.types import Embedding, Prediction, Prompt

log = logging.getLogger(__name__)

#: model type -> (registry module, registry key)
MODEL_TYPES = {
    "vit_t": ("mobile_sam", "vit_t"),
    "vit_b": ("segment_anything", "vit_b"),
    "vit_l": ("segment_anything", "vit_l"),
    "vit_h": ("segment_anything", "vit_h"),
}


def choose_device(requested: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when one is usable, else the CPU; anything else is taken as is."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {requested!r} was asked for, but torch sees no CUDA device")
    return device


def build_sam(model_type: str, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
    """Build a SAM model of `model_type`, load `checkpoint` (None: random weights, for tests) and move it.

    The state dict is read with `weights_only=True` onto the CPU first, so CUDA-saved checkpoints load on
    CPU-only machines. `.eval()` is called after loading: MobileSAM's builder calls it before the weights are
    in, which caches TinyViT's attention biases at their initial values.
    """
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r}; choose one of {sorted(MODEL_TYPES)}")
    package, key = MODEL_TYPES[model_type]
    if package == "mobile_sam":
        with warnings.catch_warnings():
            # mobile_sam imports timm's deprecated paths and registers its TinyViT names over timm's own: seven
            # lines of warnings at every start that say nothing about this server.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")
            warnings.filterwarnings("ignore", message="Overwriting tiny_vit_", category=UserWarning)
            from mobile_sam import sam_model_registry
    else:
        from segment_anything import sam_model_registry
    model = sam_model_registry[key](checkpoint=None)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        fetch = f"fetch it with `{catalog.CHECKPOINTS[model_type].fetch_command}`"
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist; {fetch}")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:  # noqa: BLE001 - a damaged file makes torch.load raise nearly any type
            # torch's own errors (a cut-off zip archive, a wrong state dict) say what broke in their first line;
            # its unpickling errors advise weights_only=False, no advice for a damaged download (and it would
            # run the file's code), and stray bytes raise anything (KeyError, IndexError, UnicodeDecodeError).
            own = isinstance(error, (RuntimeError, OSError, EOFError)) and str(error)
            reason = str(error).splitlines()[0] if own else "its contents are not a PyTorch state dict"
            raise CheckpointError(f"{checkpoint} is not a valid {model_type} checkpoint ({reason}); it may be "
                                  f"cut off or damaged: {fetch} again") from error
    model.eval()
    return model.to(device)


#: images embedded in one pass of the encoder on a GPU (project jobs; SAM ViT-H at 1024x1024 takes about 3 GB of
#: activations per image in float32)
GPU_BATCH = 4


class TorchSamPredictor:
    """A SAM or MobileSAM model on torch behind the `predictor.Predictor` interface. Thread-safe.

    On the CPU, the encoder runs on `lane` (threads of lower priority, see `sam.lanes`) with `embed_threads`
    threads (0: torch's default, one per core), and each decode in its caller's thread with `decode_threads`
    threads; 0: every core for a decode that runs alone, one for each of overlapping decodes, which then run
    side by side instead of spinning on each other's threads. torch keeps the count per calling thread.
    """

    def __init__(self, model: torch.nn.Module, model_version: str, device: torch.device, embed_threads: int = 0,
                 decode_threads: int = 0, lane: EncoderLane | None = None) -> None:
        self.model = model
        self.model_version = model_version
        self.device = device
        self.embed_threads = embed_threads
        self.decode_threads = decode_threads
        self.lane = lane or EncoderLane(nice=0)
        self._decodes = Decodes()
        self._image_pe: torch.Tensor | None = None

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's (1, 256, 64, 64) positional encoding of the image grid, a constant of the model,
        computed once (`get_dense_pe` costs 1-2 ms of sine and cosine per decode on the CPU)."""
        if self._image_pe is None:
            self._image_pe = self.model.prompt_encoder.get_dense_pe()
        return self._image_pe

    @classmethod
    def load(cls, model_type: str, checkpoint: Path | None, device: str = "auto", model_version: str | None = None,
             threads: int = 0, decode_threads: int = 0, encoder_nice: int = 0,
             encoder_workers: int = 1) -> TorchSamPredictor:
        """Build and load the model. `threads` > 0: torch's intra-op threads of an embedding (0: one per core);
        `decode_threads` of a decode (0: every core alone, one when decodes overlap); `encoder_nice`: how much
        lower the encoder's CPU priority is; `encoder_workers`: embeddings that may run at once."""
        torch_device = choose_device(device)
        model = build_sam(model_type, checkpoint, torch_device)
        log.info("loaded %s from %s on %s", model_type, checkpoint, torch_device)
        lane = EncoderLane(nice=encoder_nice if torch_device.type == "cpu" else 0, workers=encoder_workers)
        return cls(model, model_version or model_type, torch_device, embed_threads=threads,
                   decode_threads=decode_threads, lane=lane)

    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        return self.lane.run(self._embed, image, original_size)

    @property
    def batch_size(self) -> int:
        """Images `embed_batch` should be given at once: GPU_BATCH on a GPU; 1 on the CPU, where a batch is no
        faster than its images one by one and only needs more memory."""
        return GPU_BATCH if self.device.type == "cuda" else 1

    def embed_batch(self, images: Sequence[tuple[np.ndarray, tuple[int, int] | None]]) -> list[Embedding]:
        """`embed` of several (image, original_size) pairs in one pass of the encoder (a (B, 3, 1024, 1024)
        batch); the same embeddings as one by one, to float rounding."""
        return self.lane.run(self._embed_batch, list(images))

    @torch.inference_mode()
    def _embed_batch(self, images: list[tuple[np.ndarray, tuple[int, int] | None]]) -> list[Embedding]:
        batch = np.concatenate([transforms.preprocess_image(image, size) for image, size in images])
        with self._threads(self.embed_threads):
            features = self.model.image_encoder(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()
        embeddings = []
        for (image, size), one in zip(images, features):
            original, in_size = transforms.sizes_of(image, size)
            embeddings.append(Embedding(features=np.ascontiguousarray(one[None]), original_size=original,
                                        input_size=in_size))
        return embeddings

    @torch.inference_mode()
    def _embed(self, image: np.ndarray, original_size: tuple[int, int] | None) -> Embedding:
        pixels = transforms.preprocess_image(image, original_size)
        with self._threads(self.embed_threads):
            features = self.model.image_encoder(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy()
        size, in_size = transforms.sizes_of(image, original_size)
        return Embedding(features=features, original_size=size, input_size=in_size)

    @torch.inference_mode()
    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        low_res, iou = self.decode_low_res(embedding, prompt)
        return transforms.best_prediction(low_res, iou, prompt, embedding)

    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
        """All four decoder outputs: (4, 256, 256) float32 logits and (4,) predicted IoUs."""
        with self._decodes.running_after_rest(REST_S) as (alone, rested):
            with self._threads(self.decode_threads or (DEFAULT_THREADS if alone else 1), pin=rested):
                return self._decode_low_res(embedding, prompt)

    @contextmanager
    def _threads(self, count: int, pin: bool = False) -> Iterator[None]:
        """Compute in the block on `count` intra-op threads (0: DEFAULT_THREADS); `pin`: the calling thread beside
        its OpenMP team's workers on the CPU (`cpu_binding.pinned`)."""
        count = count or DEFAULT_THREADS
        _set_threads(count)
        with cpu_binding.pinned(count if self.device.type == "cpu" else 1, pin=pin):
            yield

    @torch.inference_mode()
    def _decode_low_res(self, embedding: Embedding, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
        coords, labels = transforms.decoder_points(prompt, embedding.original_size)
        mask_input, has_mask = transforms.mask_input_of(prompt)
        features = torch.from_numpy(embedding.features).to(self.device, torch.float32)
        encoder = self.model.prompt_encoder
        sparse = _sparse_embedding(encoder, torch.from_numpy(coords).to(self.device),
                                   torch.from_numpy(labels).to(self.device))
        if has_mask[0]:
            dense = encoder.mask_downscaling(torch.from_numpy(mask_input).to(self.device))
        else:
            dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, *encoder.image_embedding_size)
        low_res, iou = predict_masks(self.model.mask_decoder, features, self._dense_pe(), sparse, dense)
        return low_res[0].float().cpu().numpy(), iou[0].float().cpu().numpy()


#: a decode that starts after this many seconds without one keeps its thread on one core (`cpu_binding`): after
#: a rest of 0.1 s or more a click took 60 instead of 42 ms unpinned, 44-47 pinned (2 cores of an AMD EPYC); under
#: load, pinned threads waited longer behind the others
REST_S = 0.05

#: torch's intra-op threads when a predictor is told 0 ("its default"): one per core, as torch starts with
DEFAULT_THREADS = torch.get_num_threads()


def _set_threads(count: int) -> None:
    """Set the calling thread's intra-op thread count (torch keeps it per thread; 0: DEFAULT_THREADS)."""
    count = count or DEFAULT_THREADS
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _sparse_embedding(encoder: torch.nn.Module, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Embed (1, N, 2) points in the 1024-frame with (1, N) labels: -1 padding, 0/1 clicks, 2/3 box corners.

    The same arithmetic as `PromptEncoder._embed_points` plus `_embed_boxes`, over one label vector, as in
    SAM's ONNX decoder; the ONNX export (`onnx_converter.py`) traces this very function.
    """
    embedding = encoder.pe_layer.forward_with_coords(coords + 0.5, encoder.input_image_size)
    labels = labels[..., None]
    embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
    for index, point_embedding in enumerate(encoder.point_embeddings):
        embedding = embedding + point_embedding.weight * (labels == index)
    return embedding


def predict_masks(decoder: torch.nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                  sparse: torch.Tensor, dense: torch.Tensor,
                  reassociate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` for one prompt, with its output head as matrix products.

    image_embeddings, image_pe, dense: (1, 256, 64, 64); sparse: (1, N, 256). Returns (1, 4, 256, 256) mask logits
    and (1, 4) predicted IoUs, SAM's own to float rounding (tested: logits within 1e-4).

    SAM's head turns the transformer's image tokens back into an image and upscales it with two
    `ConvTranspose2d(kernel_size=2, stride=2)`, a `LayerNorm2d` between them. A transposed convolution whose stride
    equals its kernel is one matrix product per input pixel (each pixel's 2x2 outputs depend on it alone), and
    LayerNorm2d is a layer norm over the channels of each output pixel; so the head here stays in token order,
    (pixels, channels), from the transformer to the mask logits. On 2 cores of an AMD EPYC the ONNX decoder
    takes 47 ms instead of 55-60 on one thread and 30 instead of 40 on two (ONNX Runtime runs LayerNorm2d as
    separate reductions and its ConvTranspose through im2col); torch's decode 10-20 % less. After each product
    the rows are put in raster order, moving runs of 2 * channels floats (`_raster`), so the 4 masks come out of
    the last product in place: the ONNX decoder 0.7-1.9 ms faster than one 7-d permutation of the masks at the end
    (2-float runs), torch the same. Used by `TorchSamPredictor` and traced by the ONNX export.
    """
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, sparse[0]], dim=0)[None]
    if reassociate is None:
        reassociate = reassociation_pays(decoder.transformer, tokens.shape[1])
    if reassociate:
        hs, src = two_way_transformer(decoder.transformer, image_embeddings + dense, image_pe, tokens)
    else:
        hs, src = decoder.transformer(image_embeddings + dense, image_pe, tokens)  # src: (1, h * w, c)
    _, channels, height, width = image_embeddings.shape
    up1, norm, act1, up2, act2 = decoder.output_upscaling
    c1, c2 = up1.out_channels, up2.out_channels
    # ConvTranspose2d weight (in, out, 2, 2) -> (in, (i, j, out)): each pixel's four sub-pixels side by side
    x = _raster(src[0] @ up1.weight.permute(0, 2, 3, 1).reshape(channels, 4 * c1), height, width) + up1.bias
    x = act1(torch.nn.functional.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = act2(_raster(x @ up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2), 2 * height, 2 * width) + up2.bias)
    mask_tokens = hs[0, 1: 1 + decoder.num_mask_tokens]
    hyper = torch.stack([mlp(mask_tokens[i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)])
    masks = hyper @ x.T  # (masks, 4 height * 4 width), rows of x in raster order
    return masks.reshape(1, -1, 4 * height, 4 * width), decoder.iou_prediction_head(hs[:, 0, :])


def _raster(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A stride-2 transposed convolution's output as pixels: x (height * width, (i, j, c)), the 2x2 sub-pixels
    (i, j) of each input pixel in raster order, -> (2 height * 2 width, c), output pixel (2y + i, 2x + j)."""
    channels = x.shape[1] // 4
    return x.reshape(height, width, 2, 2 * channels).transpose(1, 2).reshape(-1, channels)


def reassociation_pays(transformer: torch.nn.Module, tokens: int) -> bool:
    """Whether `two_way_transformer` multiplies less than SAM's own for `tokens` prompt tokens T. Per cross
    attention and pixel it multiplies 2 * heads * T * C times, SAM's 2 * (C + T) * D (C channels, D internal):
    for MobileSAM and SAM (C 256, D 128, 8 heads) while T <= 17, i.e. up to 11 clicks (a box: 10)."""
    attention = transformer.final_attn_token_to_image
    channels, internal = attention.embedding_dim, attention.internal_dim
    return attention.num_heads * tokens * channels < (channels + tokens) * internal


def two_way_transformer(transformer: torch.nn.Module, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                        tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayTransformer.forward` for one prompt, its attention between the prompt's tokens and the image's
    grid computed in the image's channel space (`_token_to_image`, `_image_to_token`).

    image_embedding, image_pe: (1, C, h, w); tokens: (1, T, C). Returns the tokens (1, T, C) and the image's
    (1, h * w, C), SAM's own to float rounding (tested against both TwoWayTransformers).
    """
    keys = image_embedding.flatten(2)[0].T  # (h * w, C)
    key_pe = image_pe.flatten(2)[0].T
    queries = query_pe = tokens[0]
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries[None], k=queries[None], v=queries[None])[0]
        else:
            q = (queries + query_pe)[None]
            queries = queries + layer.self_attn(q=q, k=q, v=queries[None])[0]
        queries = layer.norm1(queries)
        k = keys + key_pe
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _image_to_token(layer.cross_attn_image_to_token, k, queries + query_pe, queries))
    attended = _token_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + attended)[None], keys[None]


def _heads(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """A projection's (D, C) weight as (heads, D / heads, C)."""
    return linear.weight.reshape(heads, -1, linear.weight.shape[1])


def _token_to_image(attention: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's `Attention(q, k, v)` of T tokens to P pixels: q (T, C); k, v (P, C). Returns (T, C).

    SAM projects the P keys and values into the attention's D channels (D = C / 2) and splits them into heads.
    The same scores are the query of each head carried back into the C input channels, (heads * T, C), times the
    unprojected keys; the key bias adds one constant to each query's scores, which softmax removes. The values
    are mixed first and projected after. For a few clicks (`reassociation_pays`) that is about half the
    multiplications, and no (P, D) tensor is made or split into heads.
    """
    heads = attention.num_heads
    queries = attention.q_proj(q).reshape(q.shape[0], heads, -1).transpose(0, 1)  # (heads, T, d)
    scale = queries.shape[-1] ** -0.5
    carried = torch.bmm(queries * scale, _heads(attention.k_proj, heads))  # (heads, T, C)
    weights = torch.softmax(carried.reshape(-1, k.shape[1]) @ k.T, dim=-1)  # (heads * T, P)
    mixed = (weights @ v).reshape(heads, q.shape[0], -1)  # (heads, T, C)
    values = torch.bmm(mixed, _heads(attention.v_proj, heads).transpose(1, 2))  # (heads, T, d)
    values = values.transpose(0, 1).reshape(q.shape[0], -1)
    return attention.out_proj(values + attention.v_proj.bias)


def _image_to_token(attention: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's `Attention(q, k, v)` of P pixels to T tokens: q (P, C); k, v (T, C). Returns (P, C).

    The tokens' keys are carried into the pixels' C input channels through the query projection, (C, heads * T),
    so the P queries are never projected; the query bias becomes one score per key. Each head's values are
    projected through its slice of the output projection ahead, (heads * T, C), so the softmax weights give the
    output directly.
    """
    heads = attention.num_heads
    keys = attention.k_proj(k).reshape(k.shape[0], heads, -1).transpose(0, 1)  # (heads, T, d)
    values = attention.v_proj(v).reshape(k.shape[0], heads, -1).transpose(0, 1)
    keys = keys * keys.shape[-1] ** -0.5
    carried = torch.bmm(_heads(attention.q_proj, heads).transpose(1, 2), keys.transpose(1, 2))  # (heads, C, T)
    carried = carried.transpose(0, 1).reshape(q.shape[1], -1)  # (C, heads * T)
    bias = (keys @ attention.q_proj.bias.reshape(heads, -1, 1)).reshape(-1)  # (heads * T,)
    weights = torch.softmax((q @ carried + bias).reshape(q.shape[0], heads, k.shape[0]), dim=-1)  # (P, heads, T)
    out_weight = attention.out_proj.weight.reshape(-1, heads, keys.shape[-1]).permute(1, 2, 0)  # (heads, d, C)
    projected = torch.bmm(values, out_weight).reshape(heads * k.shape[0], -1)  # (heads * T, C)
    return weights.reshape(q.shape[0], -1) @ projected + attention.out_proj.bias
