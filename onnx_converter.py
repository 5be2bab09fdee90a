"""Export SAM (ViT-B/L/H) or MobileSAM (ViT-T) to ONNX for the torch-free server (`onnx_sam.OnnxSamPredictor`).

    python onnx_converter.py --model-type vit_t --checkpoint models/mobile_sam.pt [--quantize]

writes `models/vit_t.encoder.onnx` and `models/vit_t.decoder.onnx` (the defaults of `settings.Settings.onnx_paths`;
`--quantize` adds `*.int8.onnx` next to them), then checks them against torch on real photos of several sizes
and aspect ratios with every kind of prompt, and exits non-zero when a mask of the ONNX models differs from
torch's by IoU < 0.99 (`--min-iou`).

What is exported:

* encoder: the model's `image_encoder`, input `image` (1, 3, 1024, 1024) float32 = the output of
  `transforms.preprocess_image`, which is plain NumPy/PIL and documented, so serving needs no torch;
  output `image_embeddings` (1, 256, 64, 64).
* decoder: `SamDecoderOnnx`, exactly what `advanced_sam.TorchSamPredictor.decode_low_res` computes (the same
  `_sparse_embedding`, `mask_downscaling` / `no_mask_embed`, `get_dense_pe` and `predict_masks`, SAM's
  `MaskDecoder.predict_masks` with its output head as matrix products; its attention always in the image's
  channels, `two_way_transformer`, which torch uses up to 11 clicks: in ONNX Runtime it is the faster form
  even at 20 clicks, 31.9 against 31.5 ms there and 20 against 28 ms for one or two clicks on two threads),
  inputs `image_embeddings`, `point_coords` (1, N, 2), `point_labels` (1, N), `mask_input` (1, 1, 256, 256),
  `has_mask_input` (1,), N dynamic; outputs `low_res_masks` (1, 4, 256, 256), `iou_predictions` (1, 4).
  It holds nothing of the image size: scaling prompts in and masks out happens in NumPy
  (`transforms.decoder_points`, `best_prediction`), so one decoder file serves every image size.

Exporter: the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript), torch 2.14's
default. It exports TinyViT, the ViT-B/L/H encoders and the decoder correctly (max abs difference to torch
about 2e-6 for MobileSAM's embedding, 1e-5 for ViT-B's, 1e-4 for the decoder's logits), and its dynamic
dimension (`torch.export.Dim`) gives a decoder whose only dynamic axis is the named point count while every
output shape stays static. The legacy TorchScript exporter (`--exporter torchscript`, dynamo=False) exports
equally correct files here, three to eight times faster, but it is deprecated, traces by example (its
TracerWarnings on TinyViT's shape asserts are harmless only because every image is 1024x1024) and leaves the
decoder's output shapes unnamed and dynamic; it is kept as a fallback. Opset 20 by default (17 at least):
from opset 20 on a GELU is one `Gelu` operator, which ONNX Runtime runs as one kernel (fused with the bias
before it into `BiasGelu` in the decoder); before, it is five (Div, Erf, Add, Mul, Mul) in an order its
fusion does not match. MobileSAM, 2 cores of an AMD EPYC (AVX2), ONNX Runtime 1.32, opset 18 -> 20: encoder
1038 -> 865 ms, int8 encoder 968 -> 820 ms, decoder 1.4-2.5 ms less (the BiasGelu fusion of the standard Gelu
needs ONNX Runtime 1.21 or later; 1.20 runs the Gelu kernel after a separate Add). SAM 2's export goes to opset 20
as well (at least 18).

Quantization (`--quantize [encoder|decoder|both]`; bare: what `--parts` exports):
`onnxruntime.quantization.quantize_dynamic` with 8-bit weights, per output channel, of MatMul/Gemm only.
The weights are unsigned (QUInt8, so activations x weights run on ONNX Runtime's U8U8 kernels): with signed
weights (U8S8) CPUs without AVX-512 VNNI (e.g. an AMD EPYC with AVX2 only) multiply with VPMADDUBSW, whose 16-bit
sums saturate, so the same file gives other numbers there than on a VNNI CPU. Measured (chelsea 640x480, one
click, int8 vs fp32 mask IoU): U8S8 0.998 on a VNNI Xeon/EPYC but 0.032 on AVX2 (emulated with `qemu-x86_64 -cpu
Haswell`, which reproduced CI's failure exactly); U8U8 0.998 and 0.997; U8S8 with reduce_range (7-bit weights,
ONNX Runtime's other remedy) 0.995 on both, but it costs accuracy everywhere (GrabCut20 mIoU@1 0.768 vs fp32
0.809; U8U8 0.798, NoC@90 1.50 = fp32's). U8U8's encoder costs about the same CPU time as U8S8 on VNNI
(1.22-1.45 s vs 1.29-1.32 s at 1920x1080 on 2 threads, fp32 1.50-1.71 s).
Measured on MobileSAM: quantizing the encoder's convolutions too (the default op list) destroys its masks (IoU
vs fp32 down to 0.23), per-tensor MatMul weights cost several points of IoU, and the two MatMuls that project
point coordinates onto the random Fourier features of the positional encoding (K = 2) must stay float: a tiny
error there becomes a phase error of the sin/cos. With this recipe int8 masks agree with fp32 at IoU >= 0.988
on prompts with a click or a box (median 0.998); a mask prompt without clicks, ill-posed for SAM even in fp32,
can drop far lower. On 2 CPU threads int8 embeds a 1920x1080 image about 20% faster than fp32 ONNX. The
exporter's `value_info` is dropped before quantizing: it lists the weights' shapes, which go stale when the
quantizer rewrites Gemm as MatMul with a transposed weight, and ONNX shape inference then fails.

Needs what requirements-dev.txt installs (torch, the SAM packages, onnx, onnxscript, scikit-image for the
check's photos); serving the result needs only requirements-onnx.txt.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from advanced_sam import (MODEL_TYPES, CheckpointError, TorchSamPredictor, _sparse_embedding, build_sam,
                          predict_masks)
from onnx_sam import (DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, META_MODEL_TYPE, META_PART,
                      META_QUANTIZATION, META_WEIGHTS, OnnxSamPredictor, open_session)
from sam_backend import catalog
from sam_backend.sam.types import Embedding, Prompt

log = logging.getLogger("onnx_converter")

DEFAULT_OUT_DIR = catalog.MODELS_DIR
DEFAULT_OPSET = 20
MIN_OPSET = 17
INT8_MIN_IOU = 0.9  # below this an int8 model's mask is reported as a warning
#: Prompts left out of the int8 verdict (but still checked fp32 vs torch, and still reported): a mask with no
#: point at all is ill-posed for SAM; its fp32 output is itself a guess (predicted IoU about 0.24, most logits
#: within +-1 of the threshold on the sample photos), so int8's small logit errors flip large parts of it.
INT8_UNCOUNTED = {"refine: mask only"}


def onnx_paths(out_dir: Path, model_type: str, int8: bool = False) -> tuple[Path, Path]:
    """(encoder, decoder) file names in `out_dir` (`catalog.onnx_paths`)."""
    return catalog.onnx_paths(model_type, out_dir, int8)


class SamDecoderOnnx(torch.nn.Module):
    """`TorchSamPredictor.decode_low_res` as one graph of tensors in, tensors out.

    The one change: whether `mask_input` is used is the tensor `has_mask_input` rather than a Python branch, so
    both branches are in the graph, dense = has * mask_downscaling(mask_input) + (1 - has) * no_mask_embed. For
    has in {0, 1} that is exactly the chosen branch (x * 1 + y * 0 == x for finite x, y). The attention takes
    the form torch takes for few clicks (`predict_masks(reassociate=True)`) for every point count.
    """

    def __init__(self, sam: torch.nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.prompt_encoder
        sparse = _sparse_embedding(encoder, point_coords, point_labels)
        has_mask = has_mask_input.reshape(1, 1, 1, 1)
        dense = (has_mask * encoder.mask_downscaling(mask_input)
                 + (1 - has_mask) * encoder.no_mask_embed.weight.reshape(1, -1, 1, 1))
        return predict_masks(self.mask_decoder, image_embeddings, encoder.get_dense_pe(), sparse, dense,
                             reassociate=True)


def decoder_example() -> tuple[torch.Tensor, ...]:
    """Example decoder inputs with three points (a click, a negative click, the padding point)."""
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 256, 64, 64, generator=generator),
            torch.tensor([[[500.0, 375.0], [200.0, 100.0], [0.0, 0.0]]]),
            torch.tensor([[1.0, 0.0, -1.0]]),
            torch.randn(1, 1, 256, 256, generator=generator),
            torch.ones(1))


def _stamp(path: Path, metadata: dict[str, str]) -> None:
    """Write `metadata` into the model's metadata_props (external weights, if any, are left where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    props.update(metadata)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def _move_into_place(folder: Path, model: Path) -> None:
    """Move the files written in `folder` next to `model`: external data first, the model last, so a reader
    that finds the .onnx finds its weights too. Each gets the model file's permissions (onnxruntime's quantizer
    writes external data owner-only, which a server running as another user could not read)."""
    mode = (folder / model.name).stat().st_mode & 0o777
    for file in sorted(folder.iterdir(), key=lambda f: f.name == model.name):
        os.chmod(file, mode)
        os.replace(file, model.parent / file.name)


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
            output_names: list[str], dynamic: dict[str, dict[int, str]], exporter: str, opset: int,
            metadata: dict[str, str]) -> None:
    """Export `module` to `path`; files appear only once complete (written in a temporary folder beside)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        partial = Path(tmp) / path.name
        if exporter == "dynamo":
            dims = {label: torch.export.Dim(label, min=1) for axes in dynamic.values() for label in axes.values()}
            shapes = tuple({axis: dims[label] for axis, label in dynamic[name].items()} if name in dynamic else None
                           for name in input_names)  # by position: the modules' own argument names may differ
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=shapes, verbose=False)
            program.save(str(partial))  # weights go to <name>.data only past protobuf's 2 GB limit
        else:
            torch.onnx.export(module, args, str(partial), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        _stamp(partial, metadata)
        onnx.checker.check_model(str(partial))
        _move_into_place(Path(tmp), path)


def export_decoder(model: torch.nn.Module, path: Path, exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write `SamDecoderOnnx(model)` to `path`; `metadata` (onnx_sam.META_* keys) goes into the file."""
    wrapper = SamDecoderOnnx(model).eval()
    with torch.no_grad():
        _export(wrapper, decoder_example(), path, list(DECODER_INPUTS), list(DECODER_OUTPUTS),
                {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}, exporter, opset,
                {**(metadata or {}), META_PART: "decoder"})
    return path


def export_encoder(model: torch.nn.Module, path: Path, exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write `model.image_encoder` to `path`; `metadata` (onnx_sam.META_* keys) goes into the file."""
    image = torch.randn(*ENCODER_INPUTS["image"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _export(model.image_encoder.eval(), (image,), path, list(ENCODER_INPUTS), list(ENCODER_OUTPUTS), {},
                exporter, opset, {**(metadata or {}), META_PART: "encoder"})
    return path


def model_metadata(model_type: str, checkpoint: Path | None, seed: int = 0) -> dict[str, str]:
    """What the converter stamps into its files, so that onnx_sam refuses an encoder and decoder that differ."""
    weights = f"random-{seed}" if checkpoint is None else catalog.sha256_of(Path(checkpoint))[:16]
    return {META_MODEL_TYPE: model_type, META_WEIGHTS: weights}


def _files_size(path: Path) -> int:
    """Bytes of an ONNX model and its external data files."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def quantize(source: Path, target: Path) -> Path:
    """Int8 dynamic quantization of `source` into `target` (see the module docstring for the recipe)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    del model.graph.value_info[:]
    weight_dims = {init.name: list(init.dims) for init in model.graph.initializer}
    keep_float = [node.name for node in model.graph.node
                  if node.op_type == "MatMul" and len(node.input) == 2 and weight_dims.get(node.input[1], [0])[0] == 2]
    large = _files_size(source) > 1_500_000_000
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        partial = Path(tmp) / target.name
        quantize_dynamic(model, partial, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         weight_type=QuantType.QUInt8, nodes_to_exclude=keep_float, use_external_data_format=large)
        _stamp(partial, {**metadata, META_QUANTIZATION: "uint8-dynamic"})
        _move_into_place(Path(tmp), target)
    return target


# --------------------------------------------------------------------------------------------------------------
# Checking the exported models against torch


@dataclass(frozen=True)
class Sample:
    """A real photo, cropped (fractions x0, y0, x1, y1 of the photo) and resized to `size` (width, height)."""

    photo: str  # a skimage.data photo
    size: tuple[int, int]
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    @property
    def name(self) -> str:
        return f"{self.photo} {self.size[0]}x{self.size[1]}"


#: Points and boxes on objects of each photo, as fractions of the whole photo: x, y (points), x0, y0, x1, y1 (boxes).
PHOTO_PROMPTS = {
    "chelsea": {"point": [(0.37, 0.38)], "positive": (0.50, 0.20), "negative": (0.93, 0.60),
                "box": (0.29, 0.25, 0.47, 0.52), "outer_box": (0.02, 0.02, 0.85, 0.98),
                "inner": (0.50, 0.50), "outside": (0.92, 0.45)},
    "astronaut": {"point": [(0.33, 0.75)], "positive": (0.20, 0.70), "negative": (0.43, 0.25),
                  "box": (0.30, 0.03, 0.60, 0.35), "outer_box": (0.04, 0.02, 0.70, 1.0),
                  "inner": (0.30, 0.65), "outside": (0.06, 0.30)},
    "coffee": {"point": [(0.48, 0.35)], "positive": (0.33, 0.40), "negative": (0.60, 0.70),
               "box": (0.53, 0.15, 0.70, 0.83), "outer_box": (0.12, 0.15, 0.80, 0.98),
               "inner": (0.20, 0.60), "outside": (0.45, 0.35)},
}

#: Landscape 4:3, 16:9, a 2:3 portrait and a square: every decoder check runs on all of them.
SAMPLES = (
    Sample("chelsea", (640, 480)),
    Sample("coffee", (1920, 1080)),
    Sample("astronaut", (720, 1080), crop=(0.03, 0.0, 0.70, 1.0)),
    Sample("astronaut", (512, 512)),
)


def sample_image(sample: Sample) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of `sample`."""
    import cv2
    import skimage.data

    photo = getattr(skimage.data, sample.photo)()
    height, width = photo.shape[:2]
    x0, y0, x1, y1 = sample.crop
    cropped = photo[int(round(y0 * height)):int(round(y1 * height)), int(round(x0 * width)):int(round(x1 * width))]
    return np.ascontiguousarray(cv2.resize(cropped, sample.size, interpolation=cv2.INTER_AREA))


def sample_prompts(sample: Sample) -> dict[str, Prompt]:
    """Prompts in the pixels of `sample`'s image: a click, clicks with a negative one, a box, box + clicks."""
    spec = PHOTO_PROMPTS[sample.photo]
    x0, y0, x1, y1 = sample.crop
    width, height = sample.size

    def pixels(*fractions: tuple[float, float]) -> np.ndarray:
        return np.array([((x - x0) / (x1 - x0) * width, (y - y0) / (y1 - y0) * height) for x, y in fractions],
                        dtype=np.float32).reshape(-1, 2)

    def box(fractions: tuple[float, float, float, float]) -> np.ndarray:
        return pixels(fractions[:2], fractions[2:]).reshape(4)

    no_points = np.zeros((0, 2), np.float32)
    return {
        "point": Prompt(pixels(*spec["point"]), np.array([1], np.int32)),
        "points+negative": Prompt(pixels(spec["point"][0], spec["positive"], spec["negative"]),
                                  np.array([1, 1, 0], np.int32)),
        "box": Prompt(no_points, np.zeros(0, np.int32), box(spec["box"])),
        "box+points": Prompt(pixels(spec["inner"], spec["outside"]), np.array([1, 0], np.int32),
                             box(spec["outer_box"])),
    }


def refinement_prompts(sample: Sample, earlier_logits: np.ndarray) -> dict[str, Prompt]:
    """Prompts that feed back an earlier prediction's low-res logits (SAM's interactive refinement)."""
    first = sample_prompts(sample)["points+negative"]
    return {
        "refine: mask+points": Prompt(first.points, first.labels, mask_input=earlier_logits),
        "refine: mask only": Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32), mask_input=earlier_logits),
    }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass(frozen=True)
class Agreement:
    image: str
    prompt: str
    iou: float
    logits_diff: float  # max abs difference of the chosen low-res logits


def compare(reference, candidate, image: np.ndarray, sample: Sample, reference_embedding: Embedding,
            candidate_embedding: Embedding) -> list[Agreement]:
    """Masks of `candidate` against `reference` on every sample prompt (the refinements use the reference's
    logits as mask_input for both, so they test the decoders, not an earlier difference)."""
    results = []
    prompts = sample_prompts(sample)
    first = reference.decode(reference_embedding, prompts["points+negative"])
    prompts.update(refinement_prompts(sample, first.low_res_logits))
    for name, prompt in prompts.items():
        expected = reference.decode(reference_embedding, prompt)
        got = candidate.decode(candidate_embedding, prompt)
        results.append(Agreement(sample.name, name, mask_iou(expected.mask, got.mask),
                                 float(np.abs(expected.low_res_logits - got.low_res_logits).max())))
    return results


def _summary(results: list[Agreement]) -> str:
    ious = [r.iou for r in results]
    worst = min(results, key=lambda r: r.iou)
    return (f"IoU min {min(ious):.4f} median {float(np.median(ious)):.4f} over {len(ious)} masks "
            f"(worst: {worst.image}, {worst.prompt}); max |logit diff| {max(r.logits_diff for r in results):.2e}")


def check(torch_predictor: TorchSamPredictor, encoder_path: Path, decoder_path: Path, samples: tuple[Sample, ...],
          min_iou: float, int8_paths: tuple[Path, Path] | None = None, threads: int = 0) -> bool:
    """Compare the ONNX models with torch on `samples`; log every number; True when all IoUs >= min_iou."""
    onnx_predictor = OnnxSamPredictor.load(encoder_path, decoder_path, torch_predictor.model_version, threads,
                                           encoder=torch_predictor)
    has_encoder = encoder_path.is_file()
    # Each file opened once and shared by the predictors (ViT-H's sessions take gigabytes each).
    int8_encoder = int8_decoder = None
    if int8_paths is not None and int8_paths[0].is_file():
        int8_encoder = open_session(int8_paths[0], "encoder", threads)
    if int8_paths is not None and int8_paths[1].is_file():
        int8_decoder = open_session(int8_paths[1], "decoder", threads)
    int8 = {}
    if int8_encoder is not None:
        int8["int8 encoder"] = OnnxSamPredictor(int8_encoder, onnx_predictor.decoder, "int8")
    if int8_decoder is not None:
        int8["int8 decoder"] = OnnxSamPredictor(onnx_predictor.encoder, int8_decoder, "int8")
    if int8_encoder is not None and int8_decoder is not None:
        int8["int8 both"] = OnnxSamPredictor(int8_encoder, int8_decoder, "int8")
    decoder_only: list[Agreement] = []
    end_to_end: list[Agreement] = []
    int8_results: dict[str, list[Agreement]] = {name: [] for name in int8}
    embedding_diffs = []
    for index, sample in enumerate(samples, 1):
        started = time.perf_counter()
        image = sample_image(sample)
        reference = torch_predictor.embed(image)
        rows = compare(torch_predictor, onnx_predictor, image, sample, reference, reference)
        decoder_only += rows
        line = f"[check {index}/{len(samples)}] {sample.name}: decoder {_summary(rows)}"
        if has_encoder:
            embedded = onnx_predictor.embed(image)
            diff = float(np.abs(embedded.features - reference.features).max())
            embedding_diffs.append(diff)
            rows = compare(torch_predictor, onnx_predictor, image, sample, reference, embedded)
            end_to_end += rows
            line += (f"; embedding max |diff| {diff:.2e} (values up to {np.abs(reference.features).max():.2f}); "
                     f"encoder+decoder {_summary(rows)}")
        log.info("%s (%.1f s)", line, time.perf_counter() - started)
        fp32 = embedded if has_encoder else reference
        int8_embedding = int8["int8 encoder"].embed(image) if int8_encoder is not None else None
        for name, predictor in int8.items():
            candidate_embedding = fp32 if name == "int8 decoder" else int8_embedding
            rows = compare(onnx_predictor, predictor, image, sample, fp32, candidate_embedding)
            int8_results[name] += rows
            log.info("    %s vs fp32: %s", name, _summary([r for r in rows if r.prompt not in INT8_UNCOUNTED]))
    ok = True
    log.info("ONNX decoder vs torch (same embedding): %s", _summary(decoder_only))
    ok &= min(r.iou for r in decoder_only) >= min_iou
    if has_encoder:
        log.info("ONNX encoder vs torch: embedding max |diff| %.2e", max(embedding_diffs))
        log.info("ONNX encoder+decoder vs torch: %s", _summary(end_to_end))
        ok &= min(r.iou for r in end_to_end) >= min_iou
    for name, rows in int8_results.items():
        counted = [r for r in rows if r.prompt not in INT8_UNCOUNTED]
        log.info("%s vs fp32 ONNX: %s", name, _summary(counted))
        uncounted = [r for r in rows if r.prompt in INT8_UNCOUNTED]
        if uncounted:
            log.info("    not counted (ill-posed for SAM even in fp32): %s",
                     ", ".join(f"{r.image} {r.prompt} IoU {r.iou:.3f}" for r in uncounted))
        low = [r for r in counted if r.iou < INT8_MIN_IOU]
        for row in low:
            log.warning("    %s: %s, %s: IoU %.4f < %.2f", name, row.image, row.prompt, row.iou, INT8_MIN_IOU)
    return ok


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export SAM / MobileSAM to ONNX (encoder + size-independent decoder) and check it against "
                    "torch.", epilog="Example: python onnx_converter.py --model-type vit_t --checkpoint "
                    "models/mobile_sam.pt --quantize")
    parser.add_argument("--model-type", choices=sorted(MODEL_TYPES), default="vit_t",
                        help="vit_t = MobileSAM; vit_b/vit_l/vit_h = SAM (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path,
                        help="weights (default: models/<the file weights.py fetches for the model type>)")
    parser.add_argument("--random-weights", action="store_true",
                        help="export a randomly initialised model (tests of big models without their weights)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: models/)")
    parser.add_argument("--parts", nargs="+", choices=["encoder", "decoder"], default=["encoder", "decoder"],
                        help="what to export (default: both)")
    parser.add_argument("--quantize", nargs="?", const="exported", metavar="{encoder,decoder,both}",
                        help="also write int8 models (*.int8.onnx) of the encoder, decoder or both; without a "
                             "value: of what --parts exports")
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                        help="torch's ONNX exporter (default: %(default)s; see the module docstring)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--check-only", action="store_true",
                        help="export nothing: check the files already in --out-dir (int8 ones too, if present)")
    parser.add_argument("--check-images", type=int, default=len(SAMPLES),
                        help=f"photos to check on, 0 = no check (default: all {len(SAMPLES)})")
    parser.add_argument("--min-iou", type=float, default=0.99,
                        help="least mask IoU of ONNX vs torch for success (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0 = default)")
    args = parser.parse_args(argv)
    if args.quantize not in (None, "exported", "encoder", "decoder", "both"):
        parser.error(f"--quantize {args.quantize}: choose encoder, decoder or both (or give no value)")
    if args.check_only and (args.quantize or args.check_images == 0):
        parser.error("--check-only exports and quantizes nothing, and needs --check-images > 0")
    if args.check_only:
        args.parts = []
    if args.opset < MIN_OPSET:
        parser.error(f"--opset must be at least {MIN_OPSET}")
    if args.random_weights and args.checkpoint is not None:
        parser.error("--random-weights and --checkpoint exclude each other")
    if not 0 <= args.check_images <= len(SAMPLES):
        parser.error(f"--check-images must be between 0 and {len(SAMPLES)}")
    return args


def _hide_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Please consider to run pre-processing before quantization")


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if any(a.startswith(catalog.SAM2_PREFIX) for a in arguments):  # --model-type sam2.1_<size>: its own exporter
        return sam2_main(arguments)
    args = parse_args(argv)
    # Our progress at INFO; other libraries (the exporter's optimizer logs every rewrite at INFO) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    # MobileSAM's imports of timm, every run; the exporter, on the two inputs that share the point-count axis.
    for noise in ("Importing from timm", "Overwriting tiny_vit", "# The axis name: num_points will not be used"):
        warnings.filterwarnings("ignore", message=noise)
    # quantize_dynamic advises its pre-processing (shape inference + graph optimisation) on every call; on these
    # models it changes neither the masks nor the speed, measured, so it is not run and the advice not shown.
    if _hide_preprocessing_advice not in logging.getLogger().filters:
        logging.getLogger().addFilter(_hide_preprocessing_advice)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = None if args.random_weights else args.checkpoint or catalog.CHECKPOINTS[args.model_type].default_path
    stages = 2 + len(args.parts) + (1 if args.quantize else 0)
    stage = iter(range(1, stages + 1))

    started = time.perf_counter()
    log.info("[%d/%d] building %s from %s", next(stage), stages, args.model_type, checkpoint or "random weights")
    if args.random_weights:
        torch.manual_seed(0)
    try:
        model = build_sam(args.model_type, checkpoint, torch.device("cpu"))
    except CheckpointError as error:
        log.error("%s", error)
        return 2
    metadata = model_metadata(args.model_type, checkpoint)
    encoder_path, decoder_path = onnx_paths(args.out_dir, args.model_type)
    for part, path, export in (("decoder", decoder_path, export_decoder), ("encoder", encoder_path, export_encoder)):
        if part in args.parts:
            log.info("[%d/%d] exporting the %s to %s with the %s exporter, opset %d", next(stage), stages, part,
                     path, args.exporter, args.opset)
            began = time.perf_counter()
            try:
                export(model, path, args.exporter, args.opset, metadata)
            except Exception:  # the exporters raise many kinds; say which stage failed and what to try
                log.exception("exporting the %s failed%s", part, "; try --exporter torchscript"
                              if args.exporter == "dynamo" else "")
                return 1
            log.info("    %s: %.1f MB in %.1f s", path.name, _files_size(path) / 1e6, time.perf_counter() - began)
    int8_paths = onnx_paths(args.out_dir, args.model_type, int8=True)
    if args.quantize:
        log.info("[%d/%d] quantizing (int8 dynamic, MatMul/Gemm weights per channel)", next(stage), stages)
        wanted = args.parts if args.quantize == "exported" else ["encoder", "decoder"] if args.quantize == "both" \
            else [args.quantize]
        for part, source, target in zip(("encoder", "decoder"), (encoder_path, decoder_path), int8_paths):
            if part not in wanted:
                continue
            if not source.is_file():
                log.error("cannot quantize the %s: %s does not exist (export it with --parts %s)", part, source,
                          part)
                return 2
            began = time.perf_counter()
            quantize(source, target)
            log.info("    %s: %.1f MB in %.1f s", target.name, _files_size(target) / 1e6, time.perf_counter() - began)
    number = next(stage)
    if args.check_images == 0:
        log.info("[%d/%d] no check (--check-images 0); done in %.0f s", number, stages, time.perf_counter() - started)
        return 0
    if not decoder_path.is_file():
        log.error("no decoder at %s to check; export it with --parts decoder", decoder_path)
        return 2
    log.info("[%d/%d] checking against torch on %d photos (decoder alone on torch's embedding, then encoder + "
             "decoder%s)", number, stages, args.check_images,
             ", then int8 vs fp32" if args.quantize or args.check_only and any(p.is_file() for p in int8_paths) else "")
    torch_predictor = TorchSamPredictor(model, args.model_type, torch.device("cpu"))
    ok = check(torch_predictor, encoder_path, decoder_path, SAMPLES[:args.check_images], args.min_iou,
               int8_paths if args.quantize or args.check_only else None, args.threads)
    if not ok:
        log.error("ONNX masks differ from torch's (IoU < %.2f): do not serve these files", args.min_iou)
        return 1
    log.info("OK: ONNX agrees with torch (IoU >= %.2f); done in %.0f s", args.min_iou, time.perf_counter() - started)
    return 0



# ---- SAM 2.1 -------------------------------------------------------------------------------------------------
class Sam2Encoder(torch.nn.Module):
    """(1, 3, H, W) uint8 RGB, any size -> image_embed, high_res_0, high_res_1: what `sam2_predictor.embed`
    computes, the 1024 x 1024 antialiased resize and normalisation of SAM2Transforms included."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.nn.functional.interpolate(image.float() / 255.0, size=(1024, 1024), mode="bilinear",
                                                 align_corners=False, antialias=True)
        mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.STD).view(1, 3, 1, 1)
        backbone_out = self.model.forward_image((pixels - mean) / std)
        _, feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(1, -1, side, side) for f, side in zip(feats, (256, 128, 64))]
        return maps[2], maps[0], maps[1]


class Sam2Decoder(torch.nn.Module):
    """SAM 2's prompt encoder + mask decoder over already padded points (see onnx_sam2.decoder_points), the mask
    input blended in by a flag; answers all four mask tokens (onnx_sam2.choose picks one as MaskDecoder does)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embed, high_res_0, high_res_1, point_coords, point_labels, mask_input, has_mask_input):
        encoder = self.model.sam_prompt_encoder
        sparse = encoder._embed_points(point_coords, point_labels, pad=False)
        flag = has_mask_input.reshape(1, 1, 1, 1)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *encoder.image_embedding_size)
        dense = encoder.mask_downscaling(mask_input) * flag + no_mask * (1 - flag)
        masks, iou, _, _ = self.model.sam_mask_decoder.predict_masks(
            image_embeddings=image_embed, image_pe=encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, repeat_image=False, high_res_features=[high_res_0, high_res_1])
        return masks, iou


def export_sam2(model: torch.nn.Module, encoder_path: Path, decoder_path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write SAM 2.1's encoder (any image size) and decoder (any number of points) with the dynamo exporter."""
    from onnx_sam2 import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_OUTPUTS

    height, width = torch.export.Dim("height", min=2, max=16384), torch.export.Dim("width", min=2, max=16384)
    image = torch.zeros((1, 3, 480, 640), dtype=torch.uint8)
    encoder_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(Sam2Encoder(model).eval(), (image,), dynamo=True, verbose=False,
                                    opset_version=max(opset, 18),
                                    input_names=["image"], output_names=ENCODER_OUTPUTS,
                                    dynamic_shapes={"image": {2: height, 3: width}})
        program.save(str(encoder_path))
        points = torch.export.Dim("num_points", min=1, max=4096)
        example = (torch.zeros(1, 256, 64, 64), torch.zeros(1, 32, 256, 256), torch.zeros(1, 64, 128, 128),
                   torch.rand(1, 3, 2) * 1024, torch.tensor([[1.0, 0.0, -1.0]]), torch.zeros(1, 1, 256, 256),
                   torch.zeros(1))
        shapes = {name: None for name in DECODER_INPUTS}
        shapes["point_coords"], shapes["point_labels"] = {1: points}, {1: points}
        program = torch.onnx.export(Sam2Decoder(model).eval(), example, dynamo=True, verbose=False,
                                    opset_version=max(opset, 18),
                                    input_names=DECODER_INPUTS, output_names=DECODER_OUTPUTS,
                                    dynamic_shapes=tuple(shapes[name] for name in DECODER_INPUTS))
        program.save(str(decoder_path))


def sam2_main(argv: list[str] | None = None) -> int:
    """`python onnx_converter.py --model-type sam2.1_tiny [--checkpoint F | --random-weights] [--out-dir D]`."""
    parser = argparse.ArgumentParser(description="Export SAM 2.1's encoder and decoder to ONNX")
    parser.add_argument("--model-type", required=True, choices=[t for t in catalog.CHECKPOINTS if catalog.is_sam2(t)])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    from sam2_predictor import build_sam2

    if args.random_weights:
        torch.manual_seed(0)
    checkpoint = None if args.random_weights else args.checkpoint or catalog.CHECKPOINTS[args.model_type].default_path
    try:
        model = build_sam2(catalog.sam2_size(args.model_type), checkpoint, torch.device("cpu"))
    except CheckpointError as error:
        log.error("%s", error)
        return 2
    encoder_path, decoder_path = onnx_paths(args.out_dir, args.model_type)
    began = time.perf_counter()
    export_sam2(model, encoder_path, decoder_path)
    log.info("wrote %s and %s in %.0f s", encoder_path, decoder_path, time.perf_counter() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
