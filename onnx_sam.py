"""SAM / MobileSAM on ONNX Runtime, with no torch: `OnnxSamPredictor` behind the `predictor.Predictor` interface.

Two files, built by `onnx_converter.py` from a checkpoint:

* `<model_type>.encoder.onnx`: input `image` (1, 3, 1024, 1024) float32, the output of
  `transforms.preprocess_image`; output `image_embeddings` (1, 256, 64, 64) float32.
* `<model_type>.decoder.onnx`: inputs `image_embeddings` (1, 256, 64, 64), `point_coords` (1, N, 2) in the
  1024-frame, `point_labels` (1, N) (-1 padding, 0/1 clicks, 2/3 box corners), `mask_input` (1, 1, 256, 256),
  `has_mask_input` (1,), all float32, N dynamic; outputs `low_res_masks` (1, 4, 256, 256) and
  `iou_predictions` (1, 4). The decoder knows nothing of the image's size: scaling the prompt into the
  1024-frame and the mask back out of it is done here in NumPy (`sam_transforms`), so one decoder file serves
  every image size and aspect ratio.

Int8 variants (`*.int8.onnx`, `onnx_converter.py --quantize`) have the same inputs and outputs.

The predictor keeps no per-image state and `InferenceSession.run` is thread-safe, so one instance serves any
number of threads at once.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import onnxruntime as ort

from sam_backend import catalog
from sam_backend.errors import OnnxModelError
from sam_backend.sam import transforms
from sam_backend.sam.lanes import Decodes, EncoderLane
from sam_backend.sam.types import Embedding, Prediction, Prompt, convert

log = logging.getLogger(__name__)

EMBEDDING_SHAPE = (1, 256, 64, 64)

#: name -> shape of what each model takes and gives; None marks a dynamic dimension.
ENCODER_INPUTS = {"image": (1, 3, transforms.IMAGE_SIZE, transforms.IMAGE_SIZE)}
ENCODER_OUTPUTS = {"image_embeddings": EMBEDDING_SHAPE}
DECODER_INPUTS = {
    "image_embeddings": EMBEDDING_SHAPE,
    "point_coords": (1, None, 2),
    "point_labels": (1, None),
    "mask_input": (1, 1, transforms.LOW_RES, transforms.LOW_RES),
    "has_mask_input": (1,),
}
DECODER_OUTPUTS = {"low_res_masks": (1, 4, transforms.LOW_RES, transforms.LOW_RES),
                   "iou_predictions": (1, 4)}


#: metadata_props that onnx_converter.py writes into every file it builds
META_MODEL_TYPE = "sam_model_type"  # vit_t, vit_b, vit_l, vit_h
META_WEIGHTS = "sam_weights"  # sha256 prefix of the checkpoint, or "random-<seed>"
META_PART = "sam_part"  # encoder or decoder
META_QUANTIZATION = "sam_quantization"  # absent for float32, "uint8-dynamic" (8-bit weights, U8U8)



class ImageEncoder(Protocol):
    """Anything that embeds images, e.g. `advanced_sam.TorchSamPredictor` (used when no encoder.onnx exists)."""

    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        ...


def build_command(path: Path) -> str:
    """The command that builds the model `path` names, for error messages."""
    match = re.fullmatch(r"(vit_[tblh])\.(?:encoder|decoder)(\.int8)?\.onnx", Path(path).name)
    model_type = match.group(1) if match else "vit_t"
    command = catalog.build_command(model_type, Path(path).parent, int8=bool(match and match.group(2)))
    if match:
        return f"`{command}`"
    return f"`{command}` (it writes <model_type>.encoder.onnx and <model_type>.decoder.onnx)"


def _shape_matches(actual: Sequence, expected: Sequence) -> bool:
    """Static dimensions must agree; a dimension that either side leaves dynamic (a name or None) matches."""
    if len(actual) != len(expected):
        return False
    return all(not isinstance(a, int) or e is None or a == e for a, e in zip(actual, expected))


def _check_signature(session: ort.InferenceSession, path: Path, kind: str,
                     inputs: dict[str, tuple], outputs: dict[str, tuple]) -> None:
    problems = []
    for expected, found in ((inputs, session.get_inputs()), (outputs, session.get_outputs())):
        found_by_name = {arg.name: arg for arg in found}
        side = "input" if expected is inputs else "output"
        for name, shape in expected.items():
            arg = found_by_name.get(name)
            if arg is None:
                problems.append(f"no {side} {name!r}")
            elif arg.type != "tensor(float)":
                problems.append(f"{side} {name!r} is {arg.type}, expected tensor(float)")
            elif not _shape_matches(arg.shape, shape):
                problems.append(f"{side} {name!r} has shape {arg.shape}, expected "
                                f"{['N' if d is None else d for d in shape]}")
        if side == "input":
            extra = sorted(set(found_by_name) - set(expected))
            if extra:
                problems.append(f"unexpected input(s) {extra}")
    if problems:
        hint = ""
        names = {arg.name for arg in session.get_inputs()}
        if kind == "encoder" and names == set(DECODER_INPUTS) or kind == "decoder" and names == set(ENCODER_INPUTS):
            hint = f" It is the {'decoder' if kind == 'encoder' else 'encoder'}: are the two paths swapped?"
        elif kind == "decoder" and "orig_im_size" in names:
            hint = (" It looks like segment_anything's own export (scripts/export_onnx_model.py), which "
                    "upscales masks to one fixed image size inside the model; this server needs its own decoder.")
        raise OnnxModelError(f"{path} is not a SAM {kind} this server can use: {'; '.join(problems)}.{hint} "
                             f"Build it with {build_command(path)}")


def _providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


#: ONNX Runtime fusions left out. SkipLayerNormFusion joins each residual Add with the LayerNormalization after it;
#: its CPU kernel took 5 ms for one (4096, 256) norm in the decoder where the two unfused ops take 0.7 (ONNX
#: Runtime 1.32, AMD EPYC, one thread): without it a decode takes 47 instead of 55 ms, an embedding 692 instead
#: of 736 ms. Outputs agree to 5e-5.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def open_session(path: Path | str, kind: str, threads: int = 0,
                 providers: Sequence[str] | None = None, spin: bool = False) -> ort.InferenceSession:
    """An InferenceSession for the `kind` ("encoder" or "decoder") model at `path`, its signature checked.
    `spin`: its pool threads spin between operators while a run is on (see below)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX {kind} {path} does not exist; build it with {build_command(path)}")
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's idle pool threads spin for a while after each run: on a busy machine they take the cores
    # from the other session's work (a decode took 2x longer beside a spinning encoder pool, measured). A
    # decode is ~300 small operators, though, and a pool thread that sleeps between them is woken for each; so
    # the session of a lone click (`spin`) spins while its run is on and stops when it returns
    # (force_spinning_stop; the stop waits for the last of overlapping runs, hence only a session that runs
    # alone). Decoder alone, 2 cores of an AMD EPYC: 44 -> 37 ms, the same CPU time per run, none after it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if kind == "encoder":
        # The memory pattern pre-plans one block for all of the encoder's activations and keeps it for the life
        # of the session. Without it, MobileSAM's server holds 320 MB less (a 1920x1080 embedding: RSS 839 ->
        # 519 MB in a bare process) for about 5 % more encoder time (678 -> 710 ms on 2 cores).
        options.enable_mem_pattern = False
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers or _providers()),
                                       disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as error:  # onnxruntime raises its own (unexported) exception types for bad files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxModelError(f"cannot load ONNX {kind} {path}: {first_line}; rebuild it with "
                             f"{build_command(path)}") from error
    if kind == "encoder":
        _check_signature(session, path, kind, ENCODER_INPUTS, ENCODER_OUTPUTS)
    else:
        _check_signature(session, path, kind, DECODER_INPUTS, DECODER_OUTPUTS)
    return session


def metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The model's metadata_props (onnx_converter.py's `sam_*` keys, or nothing for files built elsewhere)."""
    return dict(session.get_modelmeta().custom_metadata_map)


def _check_pair(encoder: ort.InferenceSession, decoder: ort.InferenceSession, encoder_path: Path,
                decoder_path: Path) -> None:
    """Refuse an encoder and a decoder built from different weights: their masks would be silently wrong."""
    ours, theirs = metadata(encoder), metadata(decoder)
    for key in (META_MODEL_TYPE, META_WEIGHTS):
        if key in ours and key in theirs and ours[key] != theirs[key]:
            raise OnnxModelError(
                f"{encoder_path} ({key}={ours[key]}) and {decoder_path} ({key}={theirs[key]}) come from different "
                f"models; build both from one checkpoint with {build_command(decoder_path)}")


class OnnxSamPredictor:
    """SAM or MobileSAM on ONNX Runtime behind the `predictor.Predictor` interface. Thread-safe, torch-free."""

    def __init__(self, encoder: ort.InferenceSession | ImageEncoder, decoder: ort.InferenceSession,
                 model_version: str, lane: EncoderLane | None = None,
                 decoder_single: ort.InferenceSession | None = None) -> None:
        """`decoder` runs a click that decodes alone; `decoder_single` (one thread), when given, each of
        overlapping ones."""
        self.encoder = encoder
        self.decoder = decoder
        self.decoder_single = decoder_single
        self.model_version = model_version
        self.lane = lane or EncoderLane(nice=0)
        self._decodes = Decodes()

    @classmethod
    def load(cls, encoder_path: Path | str | None, decoder_path: Path | str, model_version: str,
             threads: int = 0, encoder: ImageEncoder | None = None,
             providers: Sequence[str] | None = None, decode_threads: int = 0, encoder_nice: int = 0,
             encoder_workers: int = 1) -> OnnxSamPredictor:
        """Open both models. `threads` > 0 sets ONNX Runtime's intra-op thread count of the encoder (0: one per
        core); `decode_threads` > 0 that of the decoder, and 0 opens it twice: on every core for a click that
        decodes alone, on one thread for each of overlapping clicks. `providers` defaults to CUDA when
        onnxruntime-gpu offers it, else the CPU. The encoder runs on an `EncoderLane` of `encoder_workers`
        threads at `encoder_nice`; its session is opened on that lane, so that its pool threads inherit the
        lane's priority.

        When `encoder_path` is None or names no file and `encoder` is given (anything with an `embed` method,
        e.g. a `TorchSamPredictor`), images are embedded by `encoder` and only the decoder runs on ONNX.
        """
        lane = EncoderLane(nice=encoder_nice, workers=encoder_workers)
        if encoder is not None and (encoder_path is None or not Path(encoder_path).is_file()):
            log.info("no ONNX encoder at %s: embedding with %s", encoder_path, type(encoder).__name__)
            image_encoder: ort.InferenceSession | ImageEncoder = encoder
        elif encoder_path is None:
            raise OnnxModelError("no ONNX encoder path and no encoder object given; build the encoder with "
                                 f"{build_command(Path(decoder_path).with_name('vit_t.encoder.onnx'))}")
        else:
            image_encoder = lane.run(open_session, encoder_path, "encoder", threads, providers)
        # with DECODE_THREADS=0 the parallel session only ever runs one click at a time (`Decodes`), so it spins
        decoder = open_session(decoder_path, "decoder", decode_threads, providers, spin=decode_threads == 0)
        single = open_session(decoder_path, "decoder", 1, providers) if decode_threads == 0 else None
        if isinstance(image_encoder, ort.InferenceSession):
            _check_pair(image_encoder, decoder, Path(encoder_path), Path(decoder_path))
        log.info("loaded ONNX SAM %s: encoder %s, decoder %s", model_version,
                 encoder_path if isinstance(image_encoder, ort.InferenceSession) else type(encoder).__name__,
                 decoder_path)
        return cls(image_encoder, decoder, model_version, lane, decoder_single=single)

    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        if not isinstance(self.encoder, ort.InferenceSession):
            return self.encoder.embed(image, original_size)
        return self.lane.run(self._embed, image, original_size)

    def _embed(self, image: np.ndarray, original_size: tuple[int, int] | None) -> Embedding:
        pixels = transforms.preprocess_image(image, original_size)
        (features,) = self.encoder.run(["image_embeddings"], {"image": pixels})
        size, in_size = transforms.sizes_of(image, original_size)
        return Embedding(features=np.asarray(features, dtype=np.float32), original_size=size, input_size=in_size)

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        low_res, iou = self.decode_low_res(embedding, prompt)
        return transforms.best_prediction(low_res, iou, prompt, embedding)

    def decode_low_res(self, embedding: Embedding, prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
        """All four decoder outputs: (4, 256, 256) float32 logits and (4,) predicted IoUs."""
        if tuple(embedding.features.shape) != EMBEDDING_SHAPE:
            raise ValueError(f"embedding features have shape {embedding.features.shape}, expected {EMBEDDING_SHAPE}")
        coords, labels = transforms.decoder_points(prompt, embedding.original_size)
        mask_input, has_mask = transforms.mask_input_of(prompt)
        with self._decodes.running() as alone:
            session = self.decoder if alone or self.decoder_single is None else self.decoder_single
            return self._run_decoder(session, embedding, coords, labels, mask_input, has_mask)

    @staticmethod
    def _run_decoder(session: ort.InferenceSession, embedding: Embedding, coords: np.ndarray, labels: np.ndarray,
                     mask_input: np.ndarray, has_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        low_res, iou = session.run(["low_res_masks", "iou_predictions"], {
            "image_embeddings": convert(embedding.features, np.float32),
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": mask_input,
            "has_mask_input": has_mask,
        })
        return low_res[0], iou[0]
